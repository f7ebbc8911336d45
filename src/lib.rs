//! regcache: a pull-through caching proxy for OCI / Docker registries.
//!
//! Wiring only: [`build`] makes the cache, the upstreams and the proxy from a [`Config`];
//! [`run`] serves them on a listener until shutdown.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cache;
pub mod config;
pub mod digest;
pub mod http;
pub mod metrics;
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

/// Opens the cache (rebuilding its index) and sets up the upstreams and metrics.
pub fn build(config: &Config) -> io::Result<Arc<Proxy>> {
    let metrics = Arc::new(metrics::Metrics::new(prometheus::Registry::new()));
    metrics
        .cache_budget
        .set(i64::try_from(config.cache.max_size.0).unwrap_or(i64::MAX));
    let cache = cache::Cache::open(
        &config.cache.dir,
        config.cache.max_size.0,
        config.cache.memory_manifests.0,
    )?;
    let upstreams = upstream::Upstreams::new(&config.upstreams, metrics.clone(), config.cache.offline);
    Ok(Arc::new(Proxy::new(Arc::new(cache), upstreams, metrics)))
}

/// Serves the registry API on `listener` (and the admin endpoints on `admin`, if given)
/// until `shutdown` resolves.
pub async fn run(
    proxy: Arc<Proxy>,
    listener: tokio::net::TcpListener,
    admin: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(admin) = admin {
        tokio::spawn(admin::serve(admin, proxy.clone(), async {
            let _ = admin_stopped.await;
        }));
    }
    server::serve(listener, proxy, shutdown).await;
    let _ = stop_admin.send(());
}
