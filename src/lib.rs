//! regcache: a pull-through caching proxy for OCI / Docker registries.
//!
//! Wiring only: [`build`] makes the cache, the upstreams and the proxy from a [`Config`];
//! [`run`] serves them on a listener until shutdown.
#![forbid(unsafe_code)]

pub mod cache;
pub mod config;
pub mod digest;
pub mod http;
pub mod oci;
pub mod proxy;
pub mod server;
pub mod single_flight;
pub mod upstream;

use std::future::Future;
use std::io;
use std::sync::Arc;

pub use config::Config;
use proxy::Proxy;

/// Opens the cache (rebuilding its index) and sets up the upstreams.
pub fn build(config: &Config) -> io::Result<Arc<Proxy>> {
    let cache = cache::Cache::open(
        &config.cache.dir,
        config.cache.max_size.0,
        config.cache.memory_manifests.0,
    )?;
    let upstreams = upstream::Upstreams::new(&config.upstreams, upstream::client::http_client());
    Ok(Arc::new(Proxy::new(Arc::new(cache), upstreams)))
}

/// Serves the registry API on `listener` until `shutdown` resolves.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let proxy = build(config)?;
    server::serve(listener, proxy, shutdown).await;
    Ok(())
}
