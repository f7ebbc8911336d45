//! The pull-through policy. Digests are immutable: once cached they are served without
//! asking upstream. Tags are trusted for their upstream's `tag_ttl`, then revalidated with a
//! HEAD (free on Docker Hub) and fetched again only when the digest changed; if the upstream
//! cannot be reached, the cached answer is served, marked stale. Blob misses become fills.

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use crate::cache::associations::Pair;
use crate::cache::blob_store::Kind;
use crate::cache::fill::{FillError, Fills, Kept, Opener, Progress, Source, State};
use crate::cache::tags::{TagKey, TagKeyParts, TagKeyRef, TagRecord};
use crate::cache::{Cache, Manifest};
use crate::config::LimitsConfig;
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::oci::{self, AcceptSet, Reference};
use crate::single_flight::SingleFlight;
use crate::upstream::{self, RouteError, Target, Upstreams};

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    #[error("blob unknown: {0}")]
    BlobUnknown(String),
    #[error("repository unknown: {0}")]
    NameUnknown(String),
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    #[error("upstream {upstream} served bad content: {message}")]
    BadContent { upstream: String, message: String },
    #[error("fetching the blob failed: {0}")]
    Fill(Arc<FillError<upstream::Error>>),
    #[error("cache storage error: {0}")]
    Io(Arc<io::Error>),
    /// A signature policy refuses the content (the message names the policy and why).
    #[error("{0}")]
    Denied(String),
    /// Out of file descriptors (or a like limit): refuse rather than stream uncoalesced.
    #[error("regcache is out of resources ({0}); retry shortly")]
    Overloaded(String),
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

/// Turns an upstream 404 into the error that names what was missing.
fn not_found(e: upstream::Error, missing: impl FnOnce() -> Error) -> Error {
    if e.status() == Some(http::StatusCode::NOT_FOUND) {
        missing()
    } else {
        Error::Upstream(e)
    }
}

/// What the cache did for the request being served (hit, miss, coalesced, stale) and what a
/// signature policy decided, for its access log line ("-" when nothing was looked up or
/// decided).
pub type LookupResult = std::cell::Cell<(&'static str, &'static str)>;

tokio::task_local! {
    static LOOKUP_RESULT: LookupResult;
}

/// A request's work, run where `note_*` and `lookup` can record its results. A plain scope
/// rather than an async wrapper: a wrapper holds the work twice (as its argument and as what
/// it awaits), and hyper moves the whole request future on every request.
pub fn lookup_scope<F: std::future::Future>(work: F) -> tokio::task::futures::TaskLocalFuture<LookupResult, F> {
    LOOKUP_RESULT.scope(std::cell::Cell::new(("-", "-")), work)
}

/// What a finished `lookup_scope` recorded: the cache result and the policy decision.
pub fn recorded<F: std::future::Future>(
    scope: std::pin::Pin<&mut tokio::task::futures::TaskLocalFuture<LookupResult, F>>,
) -> (&'static str, &'static str) {
    scope.take_value().map_or(("-", "-"), |r| r.get())
}

/// The cache result so far (to be put back after work that is not the client's).
pub fn current_lookup_result() -> &'static str {
    LOOKUP_RESULT.try_with(|r| r.get().0).unwrap_or("-")
}

pub fn restore_lookup_result(result: &'static str) {
    let _ = LOOKUP_RESULT.try_with(|r| r.set((result, r.get().1)));
}

/// Notes what a policy decided for the request being served.
pub fn note_policy_decision(decision: &'static str) {
    let _ = LOOKUP_RESULT.try_with(|r| r.set((r.get().0, decision)));
}

#[derive(Clone)]
pub struct ManifestAnswer {
    pub manifest: Arc<Manifest>,
    /// Served from cache because the upstream could not confirm it.
    pub stale: bool,
}

/// A blob to stream: its file and, while it is still being filled, the fill's progress.
pub enum BlobAnswer {
    File {
        file: Arc<File>,
        total: Option<u64>,
        progress: Option<watch::Receiver<Progress<upstream::Error>>>,
    },
    /// The cache disk cannot take it: streamed from the upstream, verified on the way.
    PassThrough(Source),
    /// Read from the shared bucket per request (a Range as a ranged GET): a replica
    /// without a local tier, or a part of a blob the tier does not hold.
    Bucket {
        bucket: Arc<crate::cache::bucket::Bucket>,
        total: u64,
    },
}

/// How much of a blob a client asked for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Whole,
    /// A `Range`: served from the bucket rather than waiting for a fill to reach it.
    Part,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Flight {
    /// By (upstream, repository, digest): a flight's answer is that pair's to give.
    Digest(String, String, Digest),
    Tag(TagKey),
}

/// What kind of content an access confirmation asks the upstream about.
#[derive(Clone, Copy)]
enum Content {
    Manifest,
    Blob,
}

pub struct Proxy {
    pub cache: Arc<Cache>,
    pub upstreams: Upstreams,
    pub metrics: Arc<Metrics>,
    fills: Arc<Fills<upstream::Error>>,
    /// Background writes not yet finished (see [`Proxy::in_background`]).
    writes: Arc<std::sync::atomic::AtomicUsize>,
    manifest_flights: SingleFlight<Flight, Result<ManifestAnswer, Error>>,
    /// Access rules limit who may pull which repository: cached content is then served to
    /// an (upstream, repository) only when that pair is known to hold it.
    restricted: bool,
    /// Signature policies and their verdicts.
    pub gate: crate::policy::Gate,
    /// The bucket replicas share (`[cache.s3]`): read before the upstream, written after.
    pub bucket: Option<Arc<crate::cache::bucket::Bucket>>,
    /// Who fetches what for the whole cluster (leases in the bucket, peer streaming).
    pub cluster: Option<Arc<crate::cache::cluster::Cluster>>,
    /// The bucket's budget (`[cache.s3] max_size`), which learns here what is used.
    pub budget: Option<Arc<crate::cache::bucket_budget::BucketBudget>>,
    /// `[cache] layers_ahead`: blob fetches started at a time, once a client asks for one
    /// layer of an image whose manifest missed, for the rest of it (0: none).
    pub layers_ahead: usize,
    /// Images whose manifest missed, by (upstream, repository, each layer they lack), until
    /// a client asks for one of those layers under that pair.
    ahead: moka::sync::Cache<AheadKey, Arc<Ahead>>,
}

type AheadKey = (String, String, Digest);

/// The blobs of an image to fetch ahead once its first layer is asked for.
struct Ahead {
    target: Target,
    blobs: Vec<Digest>,
    started: std::sync::atomic::AtomicBool,
}

/// How long a manifest miss waits for a request of one of its layers.
const AHEAD_WAIT: std::time::Duration = std::time::Duration::from_secs(600);
/// Layers waited for at once (beyond this, the oldest images' plans are dropped).
const AHEAD_LAYERS: u64 = 10_000;

/// What replicas share (`[cache.s3]`): the bucket, the cluster's leases, the bucket's budget.
#[derive(Default)]
pub struct SharedTier {
    pub bucket: Option<Arc<crate::cache::bucket::Bucket>>,
    pub cluster: Option<Arc<crate::cache::cluster::Cluster>>,
    pub budget: Option<Arc<crate::cache::bucket_budget::BucketBudget>>,
}

impl Proxy {
    pub fn new(
        cache: Arc<Cache>,
        upstreams: Upstreams,
        metrics: Arc<Metrics>,
        limits: &LimitsConfig,
        restricted: bool,
        policies: crate::policy::Policies,
        shared: SharedTier,
    ) -> Proxy {
        let fills = Arc::new(Fills::new(
            cache.store.clone(),
            cache.index.clone(),
            limits.upstream_idle_timeout.0,
            limits.fill_min_rate.0,
            limits.max_concurrent_fills,
        ));
        Proxy {
            cache,
            upstreams,
            metrics,
            fills,
            writes: Arc::default(),
            manifest_flights: SingleFlight::default(),
            restricted,
            gate: crate::policy::Gate::new(policies),
            bucket: shared.bucket,
            cluster: shared.cluster,
            budget: shared.budget,
            layers_ahead: 0,
            ahead: moka::sync::Cache::builder()
                .max_capacity(AHEAD_LAYERS)
                .time_to_live(AHEAD_WAIT)
                .build(),
        }
    }

    /// Lets `target` have cached content `digest` only if its (upstream, repository) is
    /// known to hold it, or the upstream confirms with one HEAD under that very target
    /// (free on Docker Hub; then recorded). Offline, or with the circuit open, the HEAD
    /// fails and only known pairs are served. Without access rules every admitted client
    /// may pull anything the upstream credentials reach, so nothing is checked.
    async fn authorize(&self, target: &Target, content: Content, digest: &Digest) -> Result<(), Error> {
        let (up, repo) = (&target.upstream, target.repo.as_str());
        if !self.restricted || self.cache.associations.contains(digest, &up.name, repo) {
            return Ok(());
        }
        // Boxed: the slow path's state would otherwise be carried (and moved) by every hit.
        Box::pin(self.confirm_pair(target, content, digest)).await
    }

    /// [`Proxy::authorize`] for a pair this replica has not seen hold `digest`.
    async fn confirm_pair(&self, target: &Target, content: Content, digest: &Digest) -> Result<(), Error> {
        let (up, repo) = (&target.upstream, target.repo.as_str());
        // Perhaps imported beside this server since it read the log.
        let (cache, d, u, r) = (self.cache.clone(), digest.clone(), up.name.clone(), repo.to_owned());
        let imported = tokio::task::spawn_blocking(move || {
            cache.associations.reread();
            cache.associations.contains(&d, &u, &r)
        })
        .await
        .unwrap_or(false);
        if imported {
            return Ok(());
        }
        // Perhaps another replica of the shared bucket knows the pair.
        if let Some(bucket) = &self.bucket {
            if bucket.has_pair(digest, &up.name, repo).await {
                self.cache.associations.record(digest, &up.name, repo);
                return Ok(());
            }
        }
        let confirmed = match content {
            Content::Blob => up.head_blob(&target.repo, digest).await.map(|_| ()),
            Content::Manifest => up
                .head_manifest(
                    &target.repo,
                    &digest.to_string(),
                    &format!("{}, */*", AcceptSet::ALL.header_value()),
                )
                .await
                .map(|_| ()),
        };
        let result = if confirmed.is_ok() { "confirmed" } else { "refused" };
        self.metrics.access_confirmations.with_label_values(&[result]).inc();
        match confirmed {
            Ok(()) => {
                self.record_pair(digest, &up.name, repo);
                Ok(())
            }
            Err(e) => Err(not_found(e, || match content {
                Content::Blob => Error::BlobUnknown(digest.to_string()),
                Content::Manifest => Error::ManifestUnknown(format!("{repo}@{digest}")),
            })),
        }
    }

    /// Keeps a verified manifest in memory, where the answer and every later request get
    /// it, and writes it to disk in the background: an answer never waits for an fsync
    /// (which on a real disk can wait for another file's commit of gigabytes). A disk that
    /// cannot take it costs the cache, not the answer.
    fn keep_manifest(&self, manifest: Arc<Manifest>) {
        self.cache.remember_manifest(manifest.clone());
        let cache = self.cache.clone();
        self.in_background(move || {
            if let Err(e) = cache.put_manifest(manifest.clone()) {
                tracing::warn!(digest = %manifest.digest, error = %e,
                    "cannot store a manifest on the cache disk; answering from memory");
            }
        });
    }

    /// [`Proxy::keep_manifest`] for a manifest fetched from the upstream, which also goes to
    /// the shared bucket.
    fn store_manifest(&self, manifest: Arc<Manifest>) {
        self.keep_manifest(manifest.clone());
        if let Some(bucket) = self.bucket.clone() {
            let m = manifest.clone();
            let record = Bytes::from([m.media_type.as_bytes(), b"\n", &m.bytes].concat());
            self.upload_in_background(
                async move { bucket.put_bytes(Kind::Manifest, &m.digest, record).await },
                format!("manifest {}", manifest.digest),
            );
        }
    }

    /// Keeps a tag mapping in memory and persists it in the background: `durable` (fsync)
    /// for a new mapping; a revalidation only refreshes its time, which a crash may lose at
    /// the cost of one early HEAD.
    fn store_tag(&self, record: TagRecord, durable: bool) {
        let record = self.cache.tags.remember(record);
        if let (Some(bucket), Ok(json)) = (self.bucket.clone(), serde_json::to_vec(&*record)) {
            let id = record.key().id();
            self.upload_in_background(
                async move { bucket.put_tag(&id, Bytes::from(json)).await },
                "a tag mapping".to_owned(),
            );
        }
        let cache = self.cache.clone();
        self.in_background(move || {
            if let Err(e) = cache.tags.persist(&record, durable) {
                cache.store.note_write_error();
                tracing::warn!(error = %e, "cannot persist a tag mapping");
            }
        });
    }

    /// Runs an upload to the shared bucket as a task of its own, counted like
    /// [`Proxy::in_background`] work.
    fn upload_in_background(
        &self,
        work: impl std::future::Future<Output = Result<(), String>> + Send + 'static,
        what: String,
    ) {
        upload_counted(self.writes.clone(), work, what);
    }

    /// Runs disk work on the blocking pool, counted in [`Proxy::work_in_flight`] so that a
    /// shutdown waits for it.
    fn in_background(&self, work: impl FnOnce() + Send + 'static) {
        let done = InFlight::count(&self.writes);
        tokio::task::spawn_blocking(move || {
            let _done = done;
            work();
        });
    }

    fn associate(&self, target: &Target, digest: &Digest) {
        self.record_pair(digest, &target.upstream.name, target.repo.as_str());
    }

    /// Records that (upstream, repo) holds `digest`, here and (new pairs only) in the
    /// shared bucket, where the other replicas' access checks find it.
    fn record_pair(&self, digest: &Digest, upstream: &str, repo: &str) {
        if self.cache.associations.record(digest, upstream, repo) {
            if let Some(bucket) = self.bucket.clone() {
                let (d, u, r) = (digest.clone(), upstream.to_owned(), repo.to_owned());
                self.upload_in_background(
                    async move { bucket.put_pair(&d, &u, &r).await },
                    format!("pair {upstream}/{repo}"),
                );
            }
        }
    }

    pub fn fills_in_flight(&self) -> usize {
        self.fills.in_flight()
    }

    /// Fills and background writes (manifests, tag records) not yet finished.
    pub fn work_in_flight(&self) -> usize {
        self.fills.in_flight() + self.writes_in_flight()
    }

    /// Background writes (manifests, tag records, uploads) not yet finished.
    pub fn writes_in_flight(&self) -> usize {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn manifest(
        &self,
        target: &Target,
        reference: &Reference,
        accept: AcceptSet,
    ) -> Result<ManifestAnswer, Error> {
        match reference {
            Reference::Digest(digest) => {
                if let Some(manifest) = self.cache.load_manifest(digest).await {
                    self.authorize(target, Content::Manifest, digest).await?;
                    self.lookup("manifest", "hit");
                    return Ok(ManifestAnswer { manifest, stale: false });
                }
                let flight = Flight::Digest(target.upstream.name.clone(), target.repo.to_string(), digest.clone());
                // Boxed, as is the tag's miss below: a fetch's state is most of this future's
                // size, which every warm hit would otherwise move (about 20 KiB, twice).
                Box::pin(
                    self.manifest_flights
                        .run(flight, || self.fetch_by_digest(target, digest)),
                )
                .await
            }
            Reference::Tag(tag) => {
                // A warm hit, looked up by the request's own strings.
                let parts = TagKeyRef {
                    upstream: &target.upstream.name,
                    repo: target.repo.as_str(),
                    tag,
                    accept: accept.bits(),
                };
                let in_memory = match self.cache.tag_in_memory(&parts) {
                    Some((record, manifest)) if self.is_fresh(&record, &target.upstream, &parts) => {
                        self.lookup("tag", "hit");
                        return Ok(ManifestAnswer { manifest, stale: false });
                    }
                    found => found.is_some(),
                };
                let key = TagKey {
                    upstream: target.upstream.name.clone(),
                    repo: target.repo.to_string(),
                    tag: tag.clone(),
                    accept: accept.bits(),
                };
                // A record in memory but stale is not looked at again; one not in memory
                // may be on disk (or, pinned, held for another Accept list).
                if !in_memory {
                    if let Some(answer) = self.fresh_tag(&key, &target.upstream).await {
                        self.lookup("tag", "hit");
                        return Ok(answer);
                    }
                }
                Box::pin(
                    self.manifest_flights
                        .run(Flight::Tag(key.clone()), || self.resolve_tag(target, key, accept)),
                )
                .await
            }
        }
    }

    /// A cached tag answer that needs no upstream: within its TTL, or any age when the
    /// upstream is offline by configuration.
    async fn fresh_tag(&self, key: &TagKey, up: &upstream::Upstream) -> Option<ManifestAnswer> {
        self.fresh_of(key, up, self.cache.load_tag(key).await).await
    }

    /// [`Proxy::fresh_tag`] with the record already looked up.
    async fn fresh_of(
        &self,
        key: &TagKey,
        up: &upstream::Upstream,
        found: Option<(Arc<TagRecord>, Arc<Manifest>)>,
    ) -> Option<ManifestAnswer> {
        let (record, manifest) = match found {
            Some(found) => found,
            // A pinned tag is answered from what the cache holds for any client's Accept.
            None if self.cache.pins.matches(&key.upstream, &key.repo, &key.tag) => {
                self.tag_for_another_accept(key, AcceptSet::from_bits(key.accept))
                    .await?
            }
            None => return None,
        };
        self.is_fresh(&record, up, key)
            .then_some(ManifestAnswer { manifest, stale: false })
    }

    /// Whether a tag's record may be answered without the upstream: within its TTL (or
    /// pinned, and not expired by hand), or any age when the upstream is offline by
    /// configuration.
    fn is_fresh(&self, record: &TagRecord, up: &upstream::Upstream, key: &dyn TagKeyParts) -> bool {
        // Pins are looked at only when the answer depends on them (not on a fresh hit).
        let pinned = || {
            let (upstream, repo, tag, _) = key.parts();
            self.cache.pins.matches(upstream, repo, tag)
        };
        up.offline || !(record.expired() || (record.age() >= up.tag_ttl && !pinned()))
    }

    async fn fetch_by_digest(&self, target: &Target, digest: &Digest) -> Result<ManifestAnswer, Error> {
        // Another flight may have stored it while this one queued.
        if let Some(manifest) = self.cache.load_manifest(digest).await {
            self.authorize(target, Content::Manifest, digest).await?;
            self.lookup("manifest", "coalesced");
            return Ok(ManifestAnswer { manifest, stale: false });
        }
        if let Some(manifest) = self.manifest_from_bucket(target, digest).await {
            self.lookup("manifest", "bucket");
            self.associate(target, digest);
            self.keep_manifest(manifest.clone());
            return Ok(ManifestAnswer { manifest, stale: false });
        }
        self.lookup("manifest", "miss");
        let up = &target.upstream;
        let fetched = up
            .get_manifest(
                &target.repo,
                &digest.to_string(),
                &format!("{}, */*", AcceptSet::ALL.header_value()),
            )
            .await
            .map_err(|e| not_found(e, || Error::ManifestUnknown(format!("{}@{digest}", target.repo))))?;
        let manifest = Arc::new(self.check_manifest(up, fetched, Some(digest))?);
        self.associate(target, digest);
        self.store_manifest(manifest.clone());
        Ok(ManifestAnswer { manifest, stale: false })
    }

    /// A cached mapping of the tag recorded under another Accept set whose media type
    /// `accept` takes.
    async fn tag_for_another_accept(&self, key: &TagKey, accept: AcceptSet) -> Option<(Arc<TagRecord>, Arc<Manifest>)> {
        for bits in (1..=AcceptSet::ALL.bits()).rev().filter(|b| *b != key.accept) {
            let other = TagKey {
                accept: bits,
                ..key.clone()
            };
            if let Some(found) = self.cache.load_tag(&other).await {
                if accept.contains(&found.0.media_type) {
                    return Some(found);
                }
            }
        }
        None
    }

    /// The answer when the upstream could not map a tag: the cached mapping, within
    /// `max_stale`. Without one, a mapping recorded for another client's Accept set serves
    /// too, if this client accepts its media type (prefetch and docker differ there); that
    /// costs a disk probe per Accept set, so it is looked for only here, never before the
    /// upstream is asked.
    async fn stale_tag(
        &self,
        key: &TagKey,
        accept: AcceptSet,
        up: &crate::upstream::Upstream,
        cached: Option<&(Arc<TagRecord>, Arc<Manifest>)>,
        e: upstream::Error,
    ) -> Result<ManifestAnswer, Error> {
        let fallback = match cached {
            Some(_) => None,
            None if e.is_unavailable() => self.tag_for_another_accept(key, accept).await,
            None => None,
        };
        match cached.or(fallback.as_ref()) {
            Some((record, manifest)) if e.is_unavailable() && up.max_stale.is_none_or(|max| record.age() < max) => {
                tracing::warn!(upstream = %up.name, repo = %key.repo, tag = %key.tag, error = %e,
                    "upstream unavailable; serving cached tag");
                self.lookup("tag", "stale");
                Ok(ManifestAnswer {
                    manifest: manifest.clone(),
                    stale: true,
                })
            }
            _ => Err(not_found(e, || {
                Error::ManifestUnknown(format!("{}:{}", key.repo, key.tag))
            })),
        }
    }

    async fn resolve_tag(&self, target: &Target, key: TagKey, accept: AcceptSet) -> Result<ManifestAnswer, Error> {
        let up = &target.upstream;
        // Looked up once: whether another flight stored it meanwhile, and what to check
        // with the upstream if not.
        let cached = self.cache.load_tag(&key).await;
        if let Some(answer) = self.fresh_of(&key, up, cached.clone()).await {
            self.lookup("tag", "coalesced");
            return Ok(answer);
        }
        if let Some(answer) = self.tag_from_bucket(target, &key).await {
            return Ok(answer);
        }
        self.lookup("tag", "miss");
        let accept_header = accept.header_value();
        if let Some((record, manifest)) = &cached {
            match up.head_manifest(&target.repo, &key.tag, &accept_header).await {
                Ok(head) if head.digest.as_deref() == Some(record.digest.as_str()) => {
                    self.associate(target, &manifest.digest);
                    self.store_tag(record.reconfirmed(), false);
                    return Ok(ManifestAnswer {
                        manifest: manifest.clone(),
                        stale: false,
                    });
                }
                Ok(_) => {} // moved (or no digest header): fetch it below
                Err(e) => return self.stale_tag(&key, accept, up, cached.as_ref(), e).await,
            }
        }
        let fetched = match up.get_manifest(&target.repo, &key.tag, &accept_header).await {
            Ok(f) => f,
            Err(e) => return self.stale_tag(&key, accept, up, cached.as_ref(), e).await,
        };
        let manifest = Arc::new(self.check_manifest(up, fetched, None)?);
        self.associate(target, &manifest.digest);
        self.store_manifest(manifest.clone());
        let record = TagRecord::new(
            &key,
            &manifest.digest,
            &manifest.media_type,
            manifest.bytes.len() as u64,
        );
        self.store_tag(record, true);
        Ok(ManifestAnswer { manifest, stale: false })
    }

    /// The referrers of `digest` (OCI 1.1) as an image index, filtered by `artifact_type`
    /// when given. Upstreams without the API are asked for the `sha256-<hex>` tag instead;
    /// with neither, the answer is an empty index. One unfiltered answer per subject is
    /// cached like a tag (for `tag_ttl`) and filtered here, so clients asking for arbitrary
    /// artifact types cost no upstream request and no disk write each.
    pub async fn referrers(
        &self,
        target: &Target,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ManifestAnswer, Error> {
        let key = TagKey {
            upstream: target.upstream.name.clone(),
            repo: target.repo.to_string(),
            tag: format!("referrers/{digest}"),
            accept: 0,
        };
        let all = match self.fresh_tag(&key, &target.upstream).await {
            Some(answer) => {
                self.lookup("tag", "hit");
                answer
            }
            None => {
                self.manifest_flights
                    .run(Flight::Tag(key.clone()), || self.fetch_referrers(target, digest, key))
                    .await?
            }
        };
        let Some(t) = artifact_type else {
            return Ok(all);
        };
        let filtered = filter_index(parse_index(&all.manifest.bytes).unwrap_or_default(), Some(t));
        let bytes = Bytes::from(serde_json::to_vec(&index_document(filtered)).unwrap_or_default());
        Ok(ManifestAnswer {
            manifest: Arc::new(Manifest::new(
                bytes.clone(),
                oci::OCI_INDEX.to_owned(),
                Digest::sha256_of(&bytes),
            )),
            stale: all.stale,
        })
    }

    async fn fetch_referrers(&self, target: &Target, digest: &Digest, key: TagKey) -> Result<ManifestAnswer, Error> {
        let up = &target.upstream;
        if let Some(answer) = self.fresh_tag(&key, up).await {
            self.lookup("tag", "coalesced");
            return Ok(answer);
        }
        self.lookup("tag", "miss");
        let index = match up.referrers(&target.repo, digest, None).await {
            Ok((bytes, _)) => parse_index(&bytes).ok_or_else(|| Error::BadContent {
                upstream: up.name.clone(),
                message: "the referrers answer is not an image index".into(),
            })?,
            Err(e) if e.status() == Some(http::StatusCode::NOT_FOUND) => {
                // No referrers API upstream: the tag schema fallback.
                let tag = Reference::Tag(format!("{}-{}", digest.algorithm().name(), digest.hex()));
                match self.manifest(target, &tag, AcceptSet::ALL).await {
                    Ok(answer) => parse_index(&answer.manifest.bytes).unwrap_or_default(),
                    Err(Error::ManifestUnknown(_)) => serde_json::Map::new(),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => {
                let cached = self
                    .cache
                    .load_tag(&key)
                    .await
                    .filter(|(r, _)| e.is_unavailable() && up.max_stale.is_none_or(|max| r.age() < max))
                    .map(|(_, manifest)| manifest);
                return match cached {
                    Some(manifest) => {
                        self.lookup("tag", "stale");
                        Ok(ManifestAnswer { manifest, stale: true })
                    }
                    None => Err(Error::Upstream(e)),
                };
            }
        };
        let bytes = Bytes::from(serde_json::to_vec(&index_document(index)).unwrap_or_default());
        let manifest = Arc::new(Manifest::new(
            bytes.clone(),
            oci::OCI_INDEX.to_owned(),
            Digest::sha256_of(&bytes),
        ));
        self.store_manifest(manifest.clone());
        let record = TagRecord::new(&key, &manifest.digest, oci::OCI_INDEX, manifest.bytes.len() as u64);
        self.store_tag(record, true);
        Ok(ManifestAnswer { manifest, stale: false })
    }

    /// Checks an upstream manifest: a media type regcache serves (never schema 1) and bytes
    /// that match the digest asked for, or the upstream's `Docker-Content-Digest`.
    fn check_manifest(
        &self,
        up: &upstream::Upstream,
        fetched: upstream::client::FetchedManifest,
        expected: Option<&Digest>,
    ) -> Result<Manifest, Error> {
        let bad = |message: String| Error::BadContent {
            upstream: up.name.clone(),
            message,
        };
        let declared = fetched
            .content_type
            .as_deref()
            .map(|t| t.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|t| {
                !t.is_empty() && t != "application/json" && t != "text/plain" && t != "application/octet-stream"
            });
        let media_type = declared
            .or_else(|| oci::sniff_media_type(&fetched.bytes))
            .ok_or_else(|| bad("the manifest has no media type".into()))?;
        if oci::is_schema1(&media_type) {
            return Err(Error::ManifestUnknown(
                "the upstream offers only a schema 1 manifest, which regcache does not serve".into(),
            ));
        }
        let digest = match expected {
            Some(d) if d.matches(&fetched.bytes) => d.clone(),
            Some(d) => return Err(bad(format!("manifest bytes do not match {d}"))),
            None => {
                let computed = Digest::sha256_of(&fetched.bytes);
                if let Some(header) = &fetched.digest {
                    match header.parse::<Digest>() {
                        Ok(h) if h.matches(&fetched.bytes) => {}
                        _ => {
                            return Err(bad(format!(
                                "manifest bytes hash to {computed}, not the announced {header}"
                            )))
                        }
                    }
                }
                computed
            }
        };
        Ok(Manifest::new(fetched.bytes, media_type, digest))
    }

    /// The shared bucket, if the caller may take `digest` from it: with access rules, only
    /// a pair known (or confirmed upstream) to hold it, as for local content.
    async fn bucket_for(&self, target: &Target, digest: &Digest) -> Option<Arc<crate::cache::bucket::Bucket>> {
        let bucket = self.bucket.clone()?;
        // An upstream HEAD only when the bucket has something to give.
        if self.restricted
            && (!bucket.contains(Kind::Blob, digest).await
                || self.authorize(target, Content::Blob, digest).await.is_err())
        {
            return None;
        }
        Some(bucket)
    }

    /// A tag mapping another replica recorded in the shared bucket, if still fresh, with its
    /// manifest (from this cache or the bucket).
    async fn tag_from_bucket(&self, target: &Target, key: &TagKey) -> Option<ManifestAnswer> {
        let bucket = self.bucket.clone()?;
        let raw = match bucket.get_tag(&key.id()).await {
            Ok(raw) => raw?,
            Err(e) => {
                tracing::warn!(bucket = %bucket.name, error = %e, "shared bucket unreadable; asking the upstream");
                return None;
            }
        };
        let record: TagRecord = serde_json::from_slice(&raw).ok()?;
        let up = &target.upstream;
        if record.key() != *key || (!up.offline && (record.expired() || record.age() >= up.tag_ttl)) {
            return None;
        }
        let digest = record.digest()?;
        // The mapping says this repository holds the digest.
        self.associate(target, &digest);
        let manifest = match self.cache.load_manifest(&digest).await {
            Some(m) => m,
            None => {
                let m = self.manifest_from_bucket(target, &digest).await?;
                self.keep_manifest(m.clone());
                m
            }
        };
        let record = self.cache.tags.remember(record);
        let cache = self.cache.clone();
        self.in_background(move || {
            if let Err(e) = cache.tags.persist(&record, false) {
                cache.store.note_write_error();
                tracing::warn!(error = %e, "cannot persist a tag mapping");
            }
        });
        self.lookup("tag", "bucket");
        Some(ManifestAnswer { manifest, stale: false })
    }

    /// A manifest another replica verified, from the shared bucket (verified again here).
    async fn manifest_from_bucket(&self, target: &Target, digest: &Digest) -> Option<Arc<Manifest>> {
        let bucket = self.bucket.clone()?;
        if self.restricted && self.authorize(target, Content::Manifest, digest).await.is_err() {
            return None;
        }
        let raw = match bucket.get_bytes(Kind::Manifest, digest).await {
            Ok(raw) => raw?,
            Err(e) => {
                tracing::warn!(bucket = %bucket.name, %digest, error = %e, "shared bucket unreadable; asking the upstream");
                return None;
            }
        };
        let nl = raw.iter().position(|&b| b == b'\n')?;
        let media_type = std::str::from_utf8(&raw[..nl]).ok()?.to_owned();
        let bytes = raw.slice(nl + 1..);
        if !digest.matches(&bytes) {
            tracing::warn!(bucket = %bucket.name, %digest, "a manifest in the shared bucket does not match its digest; ignored");
            return None;
        }
        Some(Arc::new(Manifest::new(bytes, media_type, digest.clone())))
    }

    /// Where to send the client for a large blob the bucket holds (`redirect_min_size`):
    /// a presigned URL, for a caller that may have the blob (with access rules: a pair
    /// known, or confirmed upstream, to hold it).
    pub async fn redirect(&self, target: &Target, digest: &Digest) -> Option<String> {
        let bucket = self.bucket.as_ref()?;
        let min = bucket.redirect_min_size?;
        if self.restricted && self.authorize(target, Content::Blob, digest).await.is_err() {
            return None;
        }
        let url = bucket.presigned(digest, min).await?;
        if let Some(budget) = &self.budget {
            budget.touch(digest);
        }
        Some(url)
    }

    /// What a peer replica may have of `digest`: the cached blob or the fill in progress,
    /// never a new fetch.
    pub async fn peer_blob(&self, digest: &Digest) -> Result<Option<BlobAnswer>, Error> {
        if let Some(answer) = self.cached_blob(digest).await? {
            return Ok(Some(answer));
        }
        Ok(self.fills.running(digest).map(|fill| {
            let total = fill.progress.borrow().total;
            BlobAnswer::File {
                file: fill.file,
                total,
                progress: Some(fill.progress),
            }
        }))
    }

    /// A blob to stream: from the cache, or from the fill that fetches it (joined or started).
    pub async fn blob(&self, target: &Target, digest: &Digest, want: Want) -> Result<BlobAnswer, Error> {
        let answer = self.find_blob(target, digest, want).await;
        if let (Ok(_), Some(budget)) = (&answer, &self.budget) {
            budget.touch(digest);
        }
        answer
    }

    async fn find_blob(&self, target: &Target, digest: &Digest, want: Want) -> Result<BlobAnswer, Error> {
        if let Some(answer) = self.cached_blob(digest).await? {
            self.authorize(target, Content::Blob, digest).await?;
            self.lookup("blob", "hit");
            return Ok(answer);
        }
        if let Some(answer) = self.bucket_read(target, digest, want).await {
            self.lookup("blob", "bucket");
            return Ok(answer);
        }
        let own = pair_of(target);
        // A joiner whose fill failed for reasons of the fill's own target (its credentials,
        // its repository, its upstream's rate limit) tries once more under its own.
        let mut retried = false;
        let mut evicted_meanwhile = 0;
        loop {
            let (mut fill, started_here, origin) = match self.join_fill(target, digest, &own).await? {
                Joined::Fill(fill, started_here, origin) => (fill, started_here, origin),
                Joined::Cached(answer) => return Ok(answer),
                Joined::DiskUnusable => {
                    self.lookup("blob", "miss");
                    return self.pass_through(target, digest).await;
                }
                // Committed and evicted again between the miss and the join: still a miss.
                Joined::Gone if evicted_meanwhile < 3 => {
                    evicted_meanwhile += 1;
                    continue;
                }
                Joined::Gone => return Err(Error::BlobUnknown(digest.to_string())),
            };
            if !started_here && fill.owner != own {
                // Someone else's download: only for a pair known (or confirmed) to hold it.
                self.authorize(target, Content::Blob, digest).await?;
            }
            if !started_here {
                self.lookup("blob", "coalesced");
            }
            let started = fill.started().await;
            if started_here {
                // Where the fill reads is known once it has opened its source.
                self.lookup("blob", if origin.reads_bucket() { "bucket" } else { "miss" });
            }
            match started.state {
                State::Failed(e) => {
                    let theirs = !started_here && fill.owner != own;
                    if theirs && !retried && matches!(*e, FillError::Source(_)) {
                        retried = true;
                        tracing::info!(%digest, error = %e, "joined fill failed under its own target; retrying under ours");
                        continue;
                    }
                    return Err(fill_error(e, digest));
                }
                _ => {
                    // A relayed fill (the disk would not take the rest of the blob) keeps only
                    // its last bytes in memory: a client that would need bytes it dropped
                    // downloads on its own.
                    let relay = fill.progress.borrow().relay.clone();
                    if relay.is_some_and(|r| !r.holds(r.from) && !r.follows_peer()) {
                        tracing::info!(%digest, "the relayed download is past what it keeps; passing the blob through on its own");
                        return self.pass_through(target, digest).await;
                    }
                    return Ok(BlobAnswer::File {
                        file: fill.file,
                        total: started.total,
                        progress: Some(fill.progress),
                    });
                }
            }
        }
    }

    /// After an image manifest came from the upstream (and passed any policy): notes its
    /// config and the layers the cache lacks, to be fetched `layers_ahead` at a time under
    /// the same target once a client asks for one of those layers under that target
    /// ([`Proxy::layer_requested`]). A client that then fetches the rest one after another
    /// (skopeo, a CI job) finds each blob fetched or on its way instead of waiting for the
    /// upstream each time, while one that only reads the manifest or the config (Renovate,
    /// scanners, `skopeo inspect`) costs no download. Each fetch is an ordinary fill: a
    /// client that asks meanwhile joins it. An index is left alone (its client picks one
    /// platform), and so is an image bigger than a quarter of the cache, which would evict
    /// more than it saves. On a shared bucket, the replica whose client asked fetches for
    /// the whole cluster, through the usual leases; blobs the bucket holds or another
    /// replica is fetching are left to the clients' requests.
    pub fn note_layers_ahead(self: &Arc<Self>, target: &Target, manifest: &Manifest) {
        if self.layers_ahead == 0 || target.upstream.offline {
            return;
        }
        let (children, blobs) = crate::layout::references(&manifest.bytes);
        let total = blobs.iter().fold(0u64, |sum, (_, size)| sum.saturating_add(*size));
        if !children.is_empty() || blobs.is_empty() || total > self.cache.index.budget() / 4 {
            return;
        }
        let lacking: Vec<Digest> = blobs
            .iter()
            .filter_map(|(d, _)| d.parse().ok())
            .filter(|d| !self.cache.index.peek(Kind::Blob, d))
            .collect();
        // The config is read by clients that pull nothing (`skopeo inspect`): not a trigger.
        let config: Option<Digest> = serde_json::from_slice::<serde_json::Value>(&manifest.bytes)
            .ok()
            .and_then(|doc| doc.get("config")?.get("digest")?.as_str()?.parse().ok());
        let ahead = Arc::new(Ahead {
            target: target.clone(),
            blobs: lacking,
            started: std::sync::atomic::AtomicBool::new(false),
        });
        for layer in ahead.blobs.iter().filter(|d| config.as_ref() != Some(*d)) {
            self.ahead.insert(ahead_key(target, layer), ahead.clone());
        }
    }

    /// A client asked for `digest` and it missed: if it is a layer of an image noted by
    /// [`Proxy::note_layers_ahead`] under the same (upstream, repository), the rest of
    /// that image is fetched now (once per image).
    pub fn layer_requested(self: &Arc<Self>, target: &Target, digest: &Digest) {
        if self.layers_ahead == 0 {
            return;
        }
        // Looked up under the asking pair only: another repository's request for the same
        // layer says nothing of what this image's clients will want.
        let Some(ahead) = self.ahead.remove(&ahead_key(target, digest)) else {
            return;
        };
        if ahead.started.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        for other in &ahead.blobs {
            self.ahead.invalidate(&ahead_key(target, other));
        }
        let digests: Vec<Digest> = ahead
            .blobs
            .iter()
            .filter(|d| *d != digest && !self.cache.index.peek(Kind::Blob, d) && self.fills.running(d).is_none())
            .cloned()
            .collect();
        if digests.is_empty() {
            return;
        }
        let (proxy, target) = (self.clone(), ahead.target.clone());
        let own = pair_of(&target);
        tokio::spawn(async move {
            use futures_util::StreamExt as _;
            futures_util::stream::iter(digests)
                .for_each_concurrent(proxy.layers_ahead, |digest| {
                    let (proxy, target, own) = (&proxy, &target, &own);
                    async move {
                        if proxy.held_in_cluster(&digest).await {
                            return;
                        }
                        // Only a fill started here is waited for; anything else is someone's.
                        if let Ok(Joined::Fill(mut fill, true, _)) = proxy.join_fill(target, &digest, own).await {
                            proxy.metrics.layers_ahead.inc();
                            fill.finished().await;
                        }
                    }
                })
                .await;
        });
    }

    /// Whether the shared bucket holds `digest` or another replica is fetching it: a fetch
    /// ahead of clients leaves it to their own requests (here it would only be read to be
    /// dropped, or streamed from that replica to no one).
    async fn held_in_cluster(&self, digest: &Digest) -> bool {
        let Some(bucket) = &self.bucket else {
            return false;
        };
        if bucket.contains(Kind::Blob, digest).await {
            return true;
        }
        match &self.cluster {
            Some(cluster) => cluster.fetched_elsewhere(digest).await,
            None => false,
        }
    }

    /// A part of a blob the shared bucket holds, read there for this request alone (one
    /// ranged GET) when no local fill of it runs: a fill would have to reach the part first.
    /// A whole blob is read by a fill instead, once for every client that asks meanwhile:
    /// into the local tier, or without one relayed from memory.
    async fn bucket_read(&self, target: &Target, digest: &Digest, want: Want) -> Option<BlobAnswer> {
        let bucket = self.bucket.as_ref()?;
        if want == Want::Whole || self.fills.running(digest).is_some() {
            return None;
        }
        let total = bucket.size_of(Kind::Blob, digest).await?;
        if self.restricted && self.authorize(target, Content::Blob, digest).await.is_err() {
            return None;
        }
        Some(BlobAnswer::Bucket {
            bucket: bucket.clone(),
            total,
        })
    }

    /// The blob streamed to this client alone, uncached (verified on the way, last byte held
    /// back): from the shared bucket if it holds it for this caller, else the upstream.
    async fn pass_through(&self, target: &Target, digest: &Digest) -> Result<BlobAnswer, Error> {
        if let Some(bucket) = self.bucket_for(target, digest).await {
            if let Ok(Some(source)) = bucket.get(Kind::Blob, digest, 0).await {
                return Ok(BlobAnswer::PassThrough(source));
            }
        }
        let source = target
            .upstream
            .get_blob(&target.repo, digest, 0)
            .await
            .map_err(|e| not_found(e, || Error::BlobUnknown(digest.to_string())))?;
        Ok(BlobAnswer::PassThrough(source))
    }

    /// Joins the fill of `digest`, or starts one under `target`.
    async fn join_fill(&self, target: &Target, digest: &Digest, own: &Pair) -> Result<Joined, Error> {
        let mut started_here = false;
        let bucket = match (&self.bucket, &self.cluster) {
            // With access rules, another replica's download, and the bucket's copy it leaves,
            // go to a client whose pair is known or confirmed to hold the blob (one upstream
            // HEAD): without the check such a client fetched the blob again on its own.
            (Some(b), Some(_)) if self.restricted => self
                .authorize(target, Content::Blob, digest)
                .await
                .is_ok()
                .then(|| b.clone()),
            _ => self.bucket_for(target, digest).await,
        };
        let origin: Arc<Origin> = Arc::default();
        let cluster = self.cluster.clone().filter(|_| bucket.is_some());
        let uploader = self.bucket.clone().map(|b| {
            (
                b,
                self.writes.clone(),
                self.cache.store.path(Kind::Blob, digest),
                origin.clone(),
            )
        });
        let metrics = self.metrics.clone();
        let joined = self.fills.join(
            digest,
            own.clone(),
            || {
                started_here = true;
                metrics.fills_in_flight.inc();
                opener(target, digest, bucket.clone(), cluster.clone(), origin.clone())
            },
            {
                let (metrics, digest, started) = (self.metrics.clone(), digest.clone(), std::time::Instant::now());
                let (cache, upstream, repo) = (self.cache.clone(), own.0.clone(), own.1.clone());
                let source = origin.clone();
                move |result, resumes| {
                    let from_bucket = source.reads_bucket();
                    metrics.fills_in_flight.dec();
                    metrics.fill_resumes.inc_by(u64::from(resumes));
                    let outcome = match result {
                        Ok(Kept::Committed) => "committed",
                        Ok(Kept::Relayed) => "relayed",
                        Ok(Kept::AtPeer) if from_bucket => "from_bucket",
                        Ok(Kept::AtPeer) => "at_peer",
                        Err(e) => match **e {
                            FillError::DigestMismatch { .. } => "digest_mismatch",
                            FillError::WrongLength { .. } | FillError::Broken { .. } => "truncated",
                            FillError::Source(_) => "upstream_error",
                            FillError::Io(_) => "disk_error",
                        },
                    };
                    metrics.fills.with_label_values(&[outcome]).inc();
                    metrics
                        .fill_duration
                        .with_label_values(&[outcome])
                        .observe(started.elapsed().as_secs_f64());
                    match result {
                        Ok(kept @ (Kept::Committed | Kept::AtPeer)) => {
                            let new_pair = cache.associations.record(&digest, &upstream, &repo);
                            match kept {
                                Kept::Committed => tracing::info!(%digest, resumes, "fill committed"),
                                _ if from_bucket => tracing::info!(%digest, resumes, "blob relayed from the shared bucket"),
                                _ => tracing::info!(%digest, resumes, "fill relayed from the replica that holds it"),
                            }
                            if let Some((bucket, writes, path, origin)) = uploader {
                                if new_pair {
                                    let (b, d, u, r) = (bucket.clone(), digest.clone(), upstream.clone(), repo.clone());
                                    upload_counted(writes.clone(), async move { b.put_pair(&d, &u, &r).await }, "a pair".into());
                                }
                                // A fill that resumed from the upstream after its peer failed
                                // uploads once committed (one that began there uploads as it streams).
                                if *kept == Kept::Committed && origin.claim_upload() {
                                    let d = digest.clone();
                                    upload_counted(
                                        writes,
                                        async move {
                                            let uploaded = bucket.put_file(&d, path).await;
                                            origin.release_lease(); // the others now find the blob in the bucket
                                            if uploaded.is_ok() && !bucket.local_tier {
                                                cache.drop_blob(&d);
                                            }
                                            uploaded
                                        },
                                        format!("blob {digest}"),
                                    );
                                }
                            }
                        }
                        Ok(Kept::Relayed) => tracing::warn!(%digest, resumes, "fill verified and relayed, not cached (cache disk full or failing)"),
                        Err(e) => tracing::warn!(%digest, resumes, error = %e, "fill failed"),
                    }
                }
            },
        );
        if let (Ok(Some(fill)), true, Some(bucket)) = (&joined, started_here, self.bucket.clone()) {
            let (mut fill, origin, d, cache) = (fill.clone(), origin.clone(), digest.clone(), self.cache.clone());
            upload_counted(
                self.writes.clone(),
                async move {
                    // A fill the upstream refused (an unknown digest) has nothing to upload.
                    if matches!(fill.started().await.state, State::Failed(_)) {
                        return Ok(());
                    }
                    let uploaded = if origin.claim_upload() {
                        let uploaded = bucket.put_while_filling(&d, fill).await;
                        origin.release_lease();
                        uploaded
                    } else if bucket.local_tier || origin.reads_bucket() {
                        // Nothing staged here: a tier fill stays, a relay from the bucket wrote nothing.
                        return Ok(());
                    } else {
                        // Streamed from a peer, which holds it.
                        fill.finished().await;
                        Ok(())
                    };
                    // Without a local tier the disk only stages a fill until the bucket has it.
                    if uploaded.is_ok() && !bucket.local_tier && bucket.contains(Kind::Blob, &d).await {
                        cache.drop_blob(&d);
                    }
                    uploaded
                },
                format!("blob {digest}"),
            );
        }
        match joined {
            Ok(Some(fill)) => Ok(Joined::Fill(fill, started_here, origin)),
            Ok(None) => {
                // Committed between the caller's miss and the join (and perhaps evicted since).
                let Some(answer) = self.cached_blob(digest).await? else {
                    return Ok(Joined::Gone);
                };
                self.authorize(target, Content::Blob, digest).await?;
                self.lookup("blob", "hit");
                Ok(Joined::Cached(answer))
            }
            // Out of descriptors is the process's limit, not the disk's: streaming uncoalesced
            // from the upstream would need more of them, once per client.
            Err(e) if matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) => {
                tracing::warn!(error = %e, %digest, "out of file descriptors; refusing the blob for now");
                Err(Error::Overloaded(e.to_string()))
            }
            Err(e) => {
                tracing::warn!(error = %e, %digest, "cache disk unusable; the blob is not cached");
                Ok(Joined::DiskUnusable)
            }
        }
    }

    fn lookup(&self, kind: &str, result: &'static str) {
        self.metrics.looked_up(kind, result);
        let _ = LOOKUP_RESULT.try_with(|r| r.set((result, r.get().1)));
    }

    /// Brings the gauges that are read rather than counted up to date, before a scrape.
    pub fn refresh_metrics(&self) {
        let m = &self.metrics;
        m.cache_size.set(self.cache.index.total_bytes() as i64);
        m.cache_entries.set(self.cache.index.entry_count() as i64);
        m.cache_pinned.set(self.cache.index.pinned_bytes() as i64);
        catch_up(&m.cache_evictions, self.cache.index.evictions());
        catch_up(&m.cache_quarantined, self.cache.store.quarantined());
        catch_up(
            &m.cache_write_errors,
            self.cache.store.write_errors() + self.cache.associations.write_errors(),
        );
    }

    async fn cached_blob(&self, digest: &Digest) -> Result<Option<BlobAnswer>, Error> {
        Ok(self.cache.load_blob(digest).await?.map(|(file, len)| BlobAnswer::File {
            file,
            total: Some(len),
            progress: None,
        }))
    }

    /// The size of a blob, without fetching it.
    pub async fn blob_size(&self, target: &Target, digest: &Digest) -> Result<Option<u64>, Error> {
        if let Some((_, len)) = self.cache.load_blob(digest).await? {
            self.authorize(target, Content::Blob, digest).await?;
            return Ok(Some(len));
        }
        if let Some(BlobAnswer::Bucket { total, .. }) = self.bucket_read(target, digest, Want::Part).await {
            return Ok(Some(total));
        }
        target
            .upstream
            .head_blob(&target.repo, digest)
            .await
            .map_err(|e| not_found(e, || Error::BlobUnknown(digest.to_string())))
    }

    /// The upstream's tag list; when the upstream cannot be asked (offline, down), the tags
    /// this cache holds for the repository (then unpaginated), or `NAME_UNKNOWN` if none.
    pub async fn tags_list(&self, target: &Target, query: &str) -> Result<(Bytes, Option<String>), Error> {
        match target.upstream.tags_list(&target.repo, query).await {
            Ok(answer) => Ok(answer),
            Err(e) if e.is_unavailable() => {
                let (cache, upstream, repo) = (
                    self.cache.clone(),
                    target.upstream.name.clone(),
                    target.repo.to_string(),
                );
                let tags = tokio::task::spawn_blocking(move || {
                    cache
                        .tags
                        .tags_of(&upstream, &repo, |d| cache.index.peek(Kind::Manifest, d))
                })
                .await
                .unwrap_or_default();
                if tags.is_empty() {
                    return Err(Error::Upstream(e));
                }
                tracing::warn!(upstream = %target.upstream.name, repo = %target.repo, error = %e,
                    "upstream unavailable; listing the cached tags");
                let body = serde_json::json!({"name": target.repo.to_string(), "tags": tags});
                Ok((Bytes::from(serde_json::to_vec(&body).unwrap_or_default()), None))
            }
            Err(e) => Err(not_found(e, || Error::NameUnknown(target.repo.to_string()))),
        }
    }
}

/// Too many open files, in the process / in the system (Linux errno values).
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// Brings a counter kept elsewhere (an atomic the cache counts in) up to `total`.
fn catch_up(counter: &prometheus::IntCounter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

enum Joined {
    /// A fill to tail, whether this request started it, and (if it did) where it reads.
    Fill(crate::cache::fill::Fill<upstream::Error>, bool, Arc<Origin>),
    Cached(BlobAnswer),
    /// No fill can start (the cache disk refuses a temp file): a client's request passes
    /// through uncached, a fetch ahead of clients does nothing.
    DiskUnusable,
    /// Committed, then evicted before it could be opened: join again.
    Gone,
}

/// The (upstream, repository) a fill started for `target` is keyed by.
fn ahead_key(target: &Target, digest: &Digest) -> AheadKey {
    (target.upstream.name.clone(), target.repo.to_string(), digest.clone())
}

fn pair_of(target: &Target) -> Pair {
    (
        Arc::from(target.upstream.name.as_str()),
        Arc::from(target.repo.as_str()),
    )
}

fn fill_error(e: Arc<FillError<upstream::Error>>, digest: &Digest) -> Error {
    match &*e {
        FillError::Source(u) if u.status() == Some(http::StatusCode::NOT_FOUND) => {
            Error::BlobUnknown(digest.to_string())
        }
        FillError::Source(u) => Error::Upstream(u.clone()),
        _ => Error::Fill(e),
    }
}

/// Where a fill's bytes come from, as its opener found out, and the cluster lease it took.
#[derive(Default)]
struct Origin {
    /// The shared bucket served the start (a resumption stays there).
    bucket: std::sync::atomic::AtomicBool,
    /// The replica whose fill this one streams.
    peer: std::sync::Mutex<Option<String>>,
    /// The upstream was asked, first or on a resumption: this replica then uploads the blob.
    upstream: std::sync::atomic::AtomicBool,
    uploading: std::sync::atomic::AtomicBool,
    lease: std::sync::Mutex<Option<crate::cache::cluster::Lease>>,
}

impl Origin {
    /// Whether the caller is the one to upload the blob: its bytes came from the upstream
    /// and no upload was started yet.
    fn claim_upload(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.upstream.load(Relaxed) && !self.uploading.swap(true, Relaxed)
    }

    /// Whether the shared bucket is the fill's source.
    fn reads_bucket(&self) -> bool {
        self.bucket.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn release_lease(&self) {
        drop(self.lease.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// Opens a blob's source at an offset, in this order: the shared bucket when it holds the
/// blob (and the caller may have it); the replica whose lease says it is fetching it; the
/// upstream, under this replica's own lease. A resumption stays with the source that
/// served the start, falling back to the upstream if it fails.
fn opener(
    target: &Target,
    digest: &Digest,
    bucket: Option<Arc<crate::cache::bucket::Bucket>>,
    cluster: Option<Arc<crate::cache::cluster::Cluster>>,
    origin: Arc<Origin>,
) -> Opener<upstream::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let (upstream, repo, digest) = (target.upstream.clone(), target.repo.clone(), digest.clone());
    Box::new(move |offset| {
        let (upstream, repo, digest, bucket, cluster, origin) = (
            upstream.clone(),
            repo.clone(),
            digest.clone(),
            bucket.clone(),
            cluster.clone(),
            origin.clone(),
        );
        Box::pin(async move {
            if let Some(b) = bucket.as_ref().filter(|_| offset == 0 || origin.reads_bucket()) {
                if let Some(source) = from_bucket(b, &digest, offset, &origin).await {
                    return Ok(source);
                }
            }
            if let Some(cluster) = cluster {
                use crate::cache::cluster::Claim;
                let known = origin.peer.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let peer = match known {
                    Some(p) => Some(p),
                    None if offset == 0 => match cluster.claim(&digest).await {
                        Some(Claim::Mine(held)) => {
                            *origin.lease.lock().unwrap_or_else(|p| p.into_inner()) = Some(held);
                            None
                        }
                        Some(Claim::Theirs(p)) => Some(p),
                        Some(Claim::Stored) => {
                            if let Some(b) = &bucket {
                                if let Some(source) = from_bucket(b, &digest, offset, &origin).await {
                                    return Ok(source);
                                }
                            }
                            None
                        }
                        None => None,
                    },
                    None => None,
                };
                if let Some(peer) = peer {
                    match cluster.from_peer(&peer, &digest, offset).await {
                        Ok(mut source) => {
                            source.reopen = Some(cluster.reopen(&peer, &digest));
                            *origin.peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(peer);
                            return Ok(source);
                        }
                        Err(e) => {
                            *origin.peer.lock().unwrap_or_else(|p| p.into_inner()) = None;
                            tracing::warn!(%digest, error = %e, "the replica fetching this blob cannot stream it; asking the upstream");
                        }
                    }
                }
            }
            origin.upstream.store(true, Relaxed);
            upstream.get_blob(&repo, &digest, offset).await
        })
    })
}

/// The bucket's copy of a blob from `offset` on, if it holds one (noted in `origin`).
async fn from_bucket(
    b: &Arc<crate::cache::bucket::Bucket>,
    digest: &Digest,
    offset: u64,
    origin: &Origin,
) -> Option<crate::cache::fill::Source> {
    match b.get(Kind::Blob, digest, offset).await {
        Ok(Some(mut source)) => {
            origin.bucket.store(true, std::sync::atomic::Ordering::Relaxed);
            if !b.local_tier {
                // Nothing to keep on this disk: relayed from memory, and a reader left
                // behind reads the bucket at its own offset.
                source.reopen = Some(bucket_reopen(b.clone(), digest.clone()));
            }
            Some(source)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(bucket = %b.name, %digest, error = %e, "shared bucket unreadable; asking the upstream");
            None
        }
    }
}

/// Opens the bucket's copy of a blob at an offset, for readers a relayed fill left behind.
fn bucket_reopen(bucket: Arc<crate::cache::bucket::Bucket>, digest: Digest) -> crate::cache::fill::Reopen {
    Arc::new(move |offset| {
        let (bucket, digest) = (bucket.clone(), digest.clone());
        Box::pin(async move {
            bucket
                .get(Kind::Blob, &digest, offset)
                .await?
                .ok_or_else(|| format!("{digest} left the shared bucket"))
        })
    })
}

/// One piece of background work, counted in [`Proxy::work_in_flight`] while it lives.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn count(counter: &Arc<std::sync::atomic::AtomicUsize>) -> InFlight {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs an upload to the shared bucket, counted in `writes` (a shutdown waits for it).
fn upload_counted(
    writes: Arc<std::sync::atomic::AtomicUsize>,
    work: impl std::future::Future<Output = Result<(), String>> + Send + 'static,
    what: String,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let done = InFlight::count(&writes);
    runtime.spawn(async move {
        let _done = done;
        if let Err(e) = work.await {
            tracing::warn!(%what, error = %e, "cannot upload to the shared bucket");
        }
    });
}

type JsonObject = serde_json::Map<String, serde_json::Value>;

/// An image index's JSON object, if `bytes` is one.
fn parse_index(bytes: &[u8]) -> Option<JsonObject> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let object = value.as_object()?;
    object.get("manifests")?.as_array()?;
    Some(object.clone())
}

/// Keeps the descriptors of one artifact type (all of them without a filter).
fn filter_index(mut index: JsonObject, artifact_type: Option<&str>) -> JsonObject {
    if let (Some(t), Some(serde_json::Value::Array(list))) = (artifact_type, index.get_mut("manifests")) {
        list.retain(|d| d.get("artifactType").and_then(|v| v.as_str()) == Some(t));
    }
    index
}

/// The referrers answer: always an OCI image index, `manifests` possibly empty.
fn index_document(index: JsonObject) -> serde_json::Value {
    let manifests = index
        .get("manifests")
        .cloned()
        .unwrap_or_else(|| serde_json::Value::Array(Vec::new()));
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_INDEX,
        "manifests": manifests,
    })
}
