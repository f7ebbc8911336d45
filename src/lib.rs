//! regcache: a pull-through caching proxy for OCI / Docker registries.
//!
//! Wiring only: [`build`] makes the cache, upstreams, proxy, access control and TLS from a
//! [`Config`]; [`run`] serves them until shutdown.
#![deny(unsafe_code)]

pub mod access;
pub mod admin;
pub mod cache;
pub mod config;
pub mod cpus;
pub mod digest;
pub mod gc;
pub mod http;
pub mod inventory;
pub mod layout;
pub mod logging;
pub mod metrics;
pub mod oci;
pub mod policy;
pub mod prefetch;
pub mod proxy;
pub mod server;
pub mod signatures;
pub mod single_flight;
pub mod status;
pub mod sync;
pub mod tls;
pub mod upstream;
pub mod verify;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;
use proxy::Proxy;

/// Everything a running regcache serves with.
pub struct App {
    pub proxy: Arc<Proxy>,
    pub access: access::Access,
    pub limits: config::LimitsConfig,
    pub shutdown_grace: std::time::Duration,
    /// `[server] pin_threads`.
    pub pin_threads: bool,
    pub tls: Option<Arc<tls::Reloader>>,
    /// `[server] public_url`, without a trailing slash.
    pub public_url: Option<String>,
    /// `[server] trusted_proxies`.
    pub trusted_proxies: Vec<upstream::egress::Allowed>,
    /// What regcache's own jobs send (header [`INTERNAL_HEADER`]) on its loopback listener
    /// to skip client authentication; random per process.
    pub internal_secret: String,
}

/// The header that carries [`App::internal_secret`].
pub const INTERNAL_HEADER: &str = "x-regcache-internal";

fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        // No system randomness: the secret is then unguessable only locally; never fixed.
        let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
        return digest::Digest::sha256_of(seed.as_bytes()).hex().to_owned();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot open the cache directory {0}: {1}")]
    Cache(std::path::PathBuf, std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::Error),
    /// A config value that could not be put to use (a policy's files, the S3 client).
    #[error("invalid config: key `{0}`: {1}")]
    Policy(String, String),
}

/// Opens the cache (rebuilding its index) and sets up upstreams, metrics, access and TLS.
pub fn build(config: &Config) -> Result<Arc<App>, BuildError> {
    build_app(config, false)
}

/// Like [`build`], but the index is rebuilt on a thread of its own, so that regcache
/// answers at once whatever the cache holds (lookups meanwhile are answered from the disk).
pub fn build_loading_in_background(config: &Config) -> Result<Arc<App>, BuildError> {
    build_app(config, true)
}

fn build_app(config: &Config, background: bool) -> Result<Arc<App>, BuildError> {
    let metrics = Arc::new(metrics::Metrics::new(prometheus::Registry::new()));
    metrics
        .cache_budget
        .set(i64::try_from(config.cache.max_size.0).unwrap_or(i64::MAX));
    let cache = cache::Cache::open_unindexed(
        &config.cache.dir,
        config.cache.max_size.0,
        config.cache.memory_manifests.0,
    )
    .map_err(|e| BuildError::Cache(config.cache.dir.clone(), e))?;
    cache.pins.configure(
        config
            .cache
            .pinned
            .iter()
            .filter_map(|p| cache::pins::normalize(p).ok())
            .collect(),
    );
    let cache = Arc::new(cache);
    let load = {
        let cache = cache.clone();
        move || {
            let started = std::time::Instant::now();
            // Pinned first, so that rebuilding an index over budget never evicts a pin.
            cache.apply_pins();
            match cache.load_index() {
                Ok(()) => {
                    tracing::info!(
                        entries = cache.index.entry_count(),
                        seconds = started.elapsed().as_secs_f64(),
                        "cache index loaded"
                    );
                    // Only a complete index tells which tag records are orphans.
                    cache.start_collector(std::time::Duration::from_secs(3600));
                    cache.start_pinning(std::time::Duration::from_secs(30));
                    cache.start_noting_uses(std::time::Duration::from_secs(60));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot list the cache directory; serving what it finds on demand")
                }
            }
        }
    };
    if background {
        std::thread::Builder::new()
            .name("index-loader".into())
            .spawn(load)
            .map_err(|e| BuildError::Cache(config.cache.dir.clone(), e))?;
    } else {
        load();
    }
    let upstreams = upstream::Upstreams::new(config, metrics.clone())?;
    // Only access rules that limit repositories make rights differ between clients.
    let restricted = !config.auth.anonymous_allow.is_empty() || config.auth.users.iter().any(|u| !u.allow.is_empty());
    let policies = policy::Policies::from_config(&config.policies).map_err(|(key, e)| BuildError::Policy(key, e))?;
    let bucket = match &config.cache.s3 {
        Some(s3) => Some(Arc::new(
            cache::bucket::Bucket::new(s3).map_err(|e| BuildError::Policy("cache.s3".into(), e))?,
        )),
        None => None,
    };
    let cluster = match (&bucket, &config.cache.s3) {
        (Some(b), Some(s3)) => cache::cluster::Cluster::new(b.clone(), s3, metrics.lease_takeovers.clone())
            .map_err(|e| BuildError::Policy("cache.s3.peer_secret_file".into(), e))?
            .map(Arc::new),
        _ => None,
    };
    if let (Some(c), Ok(runtime)) = (&cluster, tokio::runtime::Handle::try_current()) {
        let c = c.clone();
        runtime.spawn(async move { c.probe().await });
    }
    let budget = match (&bucket, &config.cache.s3) {
        (Some(b), Some(s3)) => s3.max_size.map(|max| {
            Arc::new(cache::bucket_budget::BucketBudget::new(
                b.clone(),
                max.0,
                s3.collect_every.0,
                cache::bucket_budget::BudgetMetrics {
                    bytes: metrics.bucket_size.clone(),
                    budget: metrics.bucket_budget.clone(),
                    collected: metrics.bucket_collected.clone(),
                },
            ))
        }),
        _ => None,
    };
    if let (Some(b), Ok(_)) = (&budget, tokio::runtime::Handle::try_current()) {
        b.start(cache.clone());
    }
    let mut proxy = Proxy::new(
        cache,
        upstreams,
        metrics,
        &config.limits,
        restricted,
        policies,
        proxy::SharedTier {
            bucket,
            cluster,
            budget,
        },
    );
    proxy.layers_ahead = config.cache.layers_ahead;
    let proxy = Arc::new(proxy);
    let tls = match &config.server.tls {
        Some(t) => Some(tls::Reloader::new(&t.cert, &t.key)?),
        None => None,
    };
    Ok(Arc::new(App {
        internal_secret: random_secret(),
        proxy,
        access: access::Access::new(&config.auth),
        limits: config.limits.clone(),
        shutdown_grace: config.server.shutdown_grace.0,
        pin_threads: config.server.pin_threads,
        tls,
        public_url: config
            .server
            .public_url
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_owned()),
        trusted_proxies: config
            .server
            .trusted_proxies
            .iter()
            .filter_map(|p| upstream::egress::Allowed::parse(p))
            .collect(),
    }))
}

/// Starts the admin endpoints on `listener` before the cache is opened (`/healthz`
/// answers at once, `/readyz` once `loaded` is set); they stop when the returned sender is
/// dropped.
pub fn start_admin(listener: tokio::net::TcpListener, loaded: admin::Loaded) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(admin::serve(listener, loaded, async {
        let _ = stopped.await;
    }));
    stop
}

/// Serves the registry API on `listener` until `shutdown` resolves, then drains within the
/// shutdown grace.
pub async fn run(app: Arc<App>, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()>) {
    server::serve(listener, app, shutdown).await;
}

/// Serves regcache's own jobs (sync) on a loopback `listener`, without client
/// authentication, until `shutdown` resolves.
pub async fn run_internal(app: Arc<App>, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()>) {
    server::serve_as(listener, app, shutdown, true).await;
}
