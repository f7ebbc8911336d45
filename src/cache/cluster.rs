//! One upstream fetch per digest for the whole cluster: replicas sharing a bucket agree
//! through it on who fetches a blob that none holds. A small lease object under
//! `<prefix>/v1/leases/<hex>`, created with a conditional put (`If-None-Match: *`), names
//! the replica that fetches and how to reach it; it renews the lease (`If-Match`) while the
//! fill runs and removes it once the blob is in the bucket. The others stream the fill
//! in progress from that replica's peer endpoint (`/_regcache/peer/blobs/<digest>`, which
//! asks for the cluster's shared secret and never fetches anything itself), verifying it
//! as any fill. A lease whose holder stopped renewing expires, and the next replica to
//! miss takes it over. If the store does not honour conditional puts (found out at
//! startup), replicas coalesce each on its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;

use super::blob_store::Kind;
use super::bucket::Bucket;
use super::fill::{Reopen, Source, SourceBody};
use crate::config::S3Config;
use crate::digest::Digest;

/// The header that carries the cluster's secret to a peer endpoint.
pub const SECRET_HEADER: &str = "x-regcache-peer-secret";
/// How long a lease holds without renewal.
const LEASE_TTL: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How long a lease's create may go unanswered before this replica also reads who holds
/// the lease: SeaweedFS answers a create that raced another one only after about a second,
/// while the winner is already fetching.
const CREATE_PATIENCE: Duration = Duration::from_millis(200);

pub struct Cluster {
    bucket: Arc<Bucket>,
    /// This replica, for the leases it holds.
    id: String,
    /// How the others reach this replica's peer endpoint.
    peer_url: String,
    secret: String,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Empty<Bytes>,
    >,
    /// Whether the store honours conditional puts (else: no leases).
    leases: AtomicBool,
    /// Lease takeovers, for the metric.
    pub takeovers: prometheus::IntCounter,
}

/// Who fetches a digest.
pub enum Claim {
    /// This replica: fetch from the upstream, holding the lease until it is dropped.
    Mine(Lease),
    /// Another replica, reachable at this peer URL.
    Theirs(String),
    /// A lease seen here vanished before this replica could take it: its holder finished,
    /// and the bucket has the blob now.
    Stored,
}

/// A held lease: renewed while alive; dropping it stops the renewal and removes the lease.
pub struct Lease {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseBody {
    holder: String,
    peer: String,
    expires_ms: u64,
}

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `peer_url` with each `${NAME}` replaced by that environment variable (a pod's
/// `POD_IP`, from the downward API), so that one config serves every replica.
fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in {text:?}"))?
            + start;
        let name = &rest[start + 2..end];
        out.push_str(&std::env::var(name).map_err(|_| format!("{text:?} names ${{{name}}}, which is not set"))?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Cluster {
    /// `None` unless `[cache.s3]` names this replica's `peer_url` and a `peer_secret_file`.
    pub fn new(
        bucket: Arc<Bucket>,
        config: &S3Config,
        takeovers: prometheus::IntCounter,
    ) -> Result<Option<Cluster>, String> {
        let (Some(peer_url), Some(secret_file)) = (&config.peer_url, &config.peer_secret_file) else {
            return Ok(None);
        };
        let secret = std::fs::read_to_string(secret_file)
            .map_err(|e| format!("{}: {e}", secret_file.display()))?
            .trim()
            .to_owned();
        if secret.len() < 16 {
            return Err("the peer secret must be at least 16 characters".into());
        }
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let mut id = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        Ok(Some(Cluster {
            bucket,
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            peer_url: expand_env(peer_url)?.trim_end_matches('/').to_owned(),
            secret,
            client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https),
            leases: AtomicBool::new(true),
            takeovers,
        }))
    }

    /// Whether `presented` is the cluster's secret (compared in constant time).
    pub fn admits(&self, presented: &[u8]) -> bool {
        let expected = self.secret.as_bytes();
        presented.len() == expected.len() && presented.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// Finds out whether the store honours `If-None-Match: *` (a second create of one name
    /// must fail); if not, says so and turns leases off.
    pub async fn probe(&self) {
        let name = format!("probe-{}", self.id);
        let first = self.bucket.create_lease(&name, Bytes::from_static(b"{}")).await;
        let second = self.bucket.create_lease(&name, Bytes::from_static(b"{}")).await;
        self.bucket.delete_lease(&name).await;
        match (first, second) {
            (Ok(true), Ok(false)) => {
                tracing::info!(bucket = %self.bucket.name, "cluster leases on: the store honours conditional puts")
            }
            other => {
                self.leases.store(false, Ordering::Relaxed);
                tracing::warn!(bucket = %self.bucket.name, result = ?other,
                    "the store does not honour conditional puts; each replica fetches on its own (no cluster-wide coalescing)");
            }
        }
    }

    fn body(&self) -> Bytes {
        let body = LeaseBody {
            holder: self.id.clone(),
            peer: self.peer_url.clone(),
            expires_ms: now_ms() + LEASE_TTL.as_millis() as u64,
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// Who fetches `digest`: this replica (a new lease, or an expired one taken over), or
    /// the live holder. `None` when leases are off or the bucket cannot tell.
    pub async fn claim(self: &Arc<Self>, digest: &Digest) -> Option<Claim> {
        if !self.leases.load(Ordering::Relaxed) {
            return None;
        }
        let name = digest.hex().to_owned();
        for _ in 0..3 {
            let mut create = {
                let (bucket, name, body) = (self.bucket.clone(), name.clone(), self.body());
                tokio::spawn(async move { bucket.create_lease(&name, body).await })
            };
            let created = tokio::select! {
                created = &mut create => created,
                () = tokio::time::sleep(CREATE_PATIENCE) => match self.live_holder(&name).await {
                    Some(peer) => {
                        let (bucket, name) = (self.bucket.clone(), name.clone());
                        tokio::spawn(async move {
                            // Created after all (its holder was gone by then): not this
                            // replica's to fetch, so not left to name it.
                            if let Ok(Ok(true)) = create.await {
                                bucket.delete_lease(&name).await;
                            }
                        });
                        return Some(Claim::Theirs(peer));
                    }
                    None => create.await,
                },
            };
            match created.unwrap_or_else(|e| Err(e.to_string())) {
                Ok(true) => {
                    let (_, version) = self.bucket.read_lease(&name).await.ok()??;
                    return Some(Claim::Mine(self.hold(name, version)));
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(bucket = %self.bucket.name, error = %e, "cannot create a lease; fetching without one");
                    return None;
                }
            }
            let Ok(Some((body, version))) = self.bucket.read_lease(&name).await else {
                // Removed meanwhile. Its holder removes it once the blob is in the bucket
                // (the create that lost may have waited that long: SeaweedFS answers one
                // that raced another after about a second), so look there before fetching
                // it a second time; else try to create the lease again.
                if self.bucket.contains(Kind::Blob, digest).await {
                    return Some(Claim::Stored);
                }
                continue;
            };
            let Ok(lease) = serde_json::from_slice::<LeaseBody>(&body) else {
                continue;
            };
            if self.held_elsewhere(&lease) {
                return Some(Claim::Theirs(lease.peer));
            }
            // Its holder stopped renewing: take it over.
            if let Ok(Some(version)) = self.bucket.replace_lease(&name, self.body(), version).await {
                self.takeovers.inc();
                tracing::info!(%digest, previous = %lease.holder, "took over an expired lease");
                return Some(Claim::Mine(self.hold(name, version)));
            }
        }
        None
    }

    /// Whether another replica is fetching `digest` now (a live lease names it).
    pub async fn fetched_elsewhere(&self, digest: &Digest) -> bool {
        self.leases.load(Ordering::Relaxed) && self.live_holder(digest.hex()).await.is_some()
    }

    /// The peer URL of another replica that holds a live lease called `name`.
    async fn live_holder(&self, name: &str) -> Option<String> {
        let (body, _) = self.bucket.read_lease(name).await.ok()??;
        let lease = serde_json::from_slice::<LeaseBody>(&body).ok()?;
        self.held_elsewhere(&lease).then_some(lease.peer)
    }

    /// Whether another replica holds `lease` and still renews it.
    fn held_elsewhere(&self, lease: &LeaseBody) -> bool {
        lease.expires_ms > now_ms() && lease.holder != self.id
    }

    /// Renews the lease until the returned handle is dropped, then removes it (if still ours).
    fn hold(self: &Arc<Self>, name: String, mut version: object_store::UpdateVersion) -> Lease {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(RENEW_EVERY) => {
                        match this.bucket.replace_lease(&name, this.body(), version.clone()).await {
                            Ok(Some(v)) => version = v,
                            Ok(None) => {
                                tracing::warn!(lease = %name, "lost a lease to another replica");
                                return;
                            }
                            Err(e) => tracing::warn!(lease = %name, error = %e, "cannot renew a lease"),
                        }
                    }
                }
            }
            this.bucket.delete_lease(&name).await;
        });
        Lease { stop: Some(stop) }
    }

    /// How to open the peer's copy of `digest` again at an offset (for a reader that a
    /// relay of it left behind).
    pub fn reopen(self: &Arc<Self>, peer: &str, digest: &Digest) -> Reopen {
        let (this, peer, digest) = (self.clone(), peer.to_owned(), digest.clone());
        Arc::new(move |offset| {
            let (this, peer, digest) = (this.clone(), peer.clone(), digest.clone());
            Box::pin(async move { this.from_peer(&peer, &digest, offset).await })
        })
    }

    /// The fill in progress (or the blob) at the peer, from byte `offset` on.
    pub async fn from_peer(&self, peer: &str, digest: &Digest, offset: u64) -> Result<Source, String> {
        let url = format!("{}/_regcache/peer/blobs/{digest}", peer.trim_end_matches('/'));
        let mut req = http::Request::get(&url).header(SECRET_HEADER, &self.secret);
        if offset > 0 {
            req = req.header(http::header::RANGE, format!("bytes={offset}-"));
        }
        let req = req.body(http_body_util::Empty::new()).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| format!("peer {peer} did not answer"))?
            .map_err(|e| format!("peer {peer}: {e}"))?;
        let status = resp.status();
        let length = |name| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (start, total) = match status {
            http::StatusCode::OK => (0, length(http::header::CONTENT_LENGTH).and_then(|v| v.parse().ok())),
            http::StatusCode::PARTIAL_CONTENT => {
                let range = length(http::header::CONTENT_RANGE).unwrap_or_default();
                let (span, total) = range.trim_start_matches("bytes ").split_once('/').unwrap_or(("", ""));
                let start = span.split('-').next().and_then(|s| s.parse().ok()).unwrap_or(0);
                (start, total.parse().ok())
            }
            s => return Err(format!("peer {peer} answered {s}")),
        };
        let body: SourceBody = resp
            .into_body()
            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
            .boxed();
        Ok(Source {
            total,
            offset: start,
            body,
            reopen: None,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peer_urls_take_the_environment() {
        std::env::set_var("REGCACHE_TEST_POD_IP", "10.1.2.3");
        assert_eq!(
            super::expand_env("http://${REGCACHE_TEST_POD_IP}:5000").unwrap(),
            "http://10.1.2.3:5000"
        );
        assert_eq!(super::expand_env("http://plain:5000").unwrap(), "http://plain:5000");
        assert!(super::expand_env("http://${REGCACHE_TEST_UNSET_VAR}:5000").is_err());
        assert!(super::expand_env("http://${OPEN:5000").is_err());
    }
}
