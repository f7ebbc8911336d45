//! The shared tier (`[cache.s3]`): verified blobs and manifests of every replica in one
//! S3-compatible bucket (AWS S3, Ceph RGW, SeaweedFS, MinIO, R2, GCS interop) under
//! `<prefix>/v1/`. The local cache stays in front of it: a local miss reads the bucket
//! before the upstream, and what a replica fetched and verified is uploaded for the others.
//! Only content that passed its digest on this replica is ever uploaded, so a key under
//! `blobs/` always holds verified bytes (and what comes back is verified again on the way in).
//!
//! The S3 client is `object_store`'s, driven through regcache's own hyper + rustls
//! ([`HyperConnector`]) and signing with ring: no second HTTP stack or TLS provider.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::BodyExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart};

use super::blob_store::Kind;
use super::fill::{stream_file, Fill, Reader, Source, SourceBody, State};
use crate::config::S3Config;
use crate::digest::Digest;

/// Parts of a blob upload: memory stays flat whatever the blob's size.
const PART_BYTES: usize = 8 << 20;

pub struct Bucket {
    store: AmazonS3,
    prefix: String,
    /// `[cache.s3] redirect_min_size`.
    pub redirect_min_size: Option<u64>,
    /// `[cache.s3] local_tier`: false when the local disk only stages fills.
    pub local_tier: bool,
    /// What logs call it: `s3://bucket/prefix`.
    pub name: String,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Bucket {
    /// Credentials: `access_key_id` with `secret_access_key_file`, else the standard AWS
    /// environment variables, else the instance's role (web identity, ECS or EC2 metadata).
    pub fn new(config: &S3Config) -> Result<Bucket, String> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_http_connector(HyperConnector)
            // A bucket that does not answer must not hold a miss for minutes (the default):
            // the upstream is asked instead.
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig::default(),
                max_retries: 2,
                retry_timeout: std::time::Duration::from_secs(5),
            })
            .with_virtual_hosted_style_request(!config.path_style)
            // A signed payload would hash every part on an async worker (an 8 MiB part is
            // milliseconds of SHA-256, a 512 MiB blob a third of a CPU-second) for nothing:
            // the blob was verified against its digest before the upload completes, and every
            // read of the bucket verifies it again.
            .with_unsigned_payload(true);
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint.trim_end_matches('/'))
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(id) = &config.access_key_id {
            let file = config
                .secret_access_key_file
                .as_ref()
                .ok_or("access_key_id needs secret_access_key_file")?;
            let secret = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            builder = builder.with_access_key_id(id).with_secret_access_key(secret.trim());
        }
        let store = builder.build().map_err(|e| e.to_string())?;
        let prefix = config.prefix.trim_matches('/').to_owned();
        Ok(Bucket {
            name: format!("s3://{}/{prefix}", config.bucket),
            store,
            prefix,
            redirect_min_size: config.redirect_min_size.map(|s| s.0),
            local_tier: config.local_tier,
        })
    }

    fn path(&self, kind: Kind, digest: &Digest) -> Path {
        let dir = match kind {
            Kind::Manifest => "manifests",
            _ => "blobs",
        };
        self.key(&format!("{dir}/{}/{}", digest.algorithm().name(), digest.hex()))
    }

    /// `<prefix>/v1/<rest>` (no leading `/` when the prefix is empty).
    fn key(&self, rest: &str) -> Path {
        match self.prefix.as_str() {
            "" => Path::from(format!("v1/{rest}")),
            prefix => Path::from(format!("{prefix}/v1/{rest}")),
        }
    }

    /// Whether the bucket answers (for `/readyz`).
    pub async fn check(&self) -> Result<(), String> {
        let probe = self.key("ready");
        match self.store.head(&probe).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Content from byte `offset` on, or `None` if the bucket does not hold it.
    pub async fn get(&self, kind: Kind, digest: &Digest, offset: u64) -> Result<Option<Source>, String> {
        self.get_range(kind, digest, (offset > 0).then_some(GetRange::Offset(offset)))
            .await
    }

    /// Bytes `start..end` of a blob (one ranged GET), or `None` if the bucket does not hold it.
    pub async fn get_blob_range(&self, digest: &Digest, start: u64, end: u64) -> Result<Option<Source>, String> {
        self.get_range(Kind::Blob, digest, Some(GetRange::Bounded(start..end)))
            .await
    }

    async fn get_range(&self, kind: Kind, digest: &Digest, range: Option<GetRange>) -> Result<Option<Source>, String> {
        let options = GetOptions {
            range,
            ..Default::default()
        };
        let got = match self.store.get_opts(&self.path(kind, digest), options).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let total = got.meta.size;
        let start = got.range.start;
        let body: SourceBody = StreamingBody(std::sync::Mutex::new(got.into_stream())).boxed();
        Ok(Some(Source {
            total: Some(total),
            offset: start,
            body,
            reopen: None,
        }))
    }

    /// A small object's bytes (a manifest), or `None`.
    pub async fn get_bytes(&self, kind: Kind, digest: &Digest) -> Result<Option<Bytes>, String> {
        self.get_at(&self.path(kind, digest)).await
    }

    async fn get_at(&self, path: &Path) -> Result<Option<Bytes>, String> {
        match self.store.get(path).await {
            Ok(got) => got.bytes().await.map(Some).map_err(|e| e.to_string()),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn put_at(&self, path: &Path, body: Bytes) -> Result<(), String> {
        self.store
            .put(path, PutPayload::from_bytes(body))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// A tag mapping another replica recorded (its JSON), by [`TagKey::id`](super::tags::TagKey::id).
    pub async fn get_tag(&self, id: &str) -> Result<Option<Bytes>, String> {
        self.get_key(&format!("tags/{id}.json")).await
    }

    pub async fn put_tag(&self, id: &str, json: Bytes) -> Result<(), String> {
        self.put_key(&format!("tags/{id}.json"), json).await
    }

    fn lease_path(&self, name: &str) -> Path {
        self.key(&format!("leases/{name}"))
    }

    /// Creates a lease object only if none exists (`If-None-Match: *`): `Ok(true)` if this
    /// call created it.
    pub async fn create_lease(&self, name: &str, body: Bytes) -> Result<bool, String> {
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.lease_path(name), PutPayload::from_bytes(body), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A lease's body and the version a replacement must name, or `None`.
    pub async fn read_lease(&self, name: &str) -> Result<Option<(Bytes, object_store::UpdateVersion)>, String> {
        match self.store.get(&self.lease_path(name)).await {
            Ok(got) => {
                let version = object_store::UpdateVersion {
                    e_tag: got.meta.e_tag.clone(),
                    version: got.meta.version.clone(),
                };
                let body = got.bytes().await.map_err(|e| e.to_string())?;
                Ok(Some((body, version)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Replaces a lease only if it is still the version read (`If-Match`): `Ok(true)` if so.
    pub async fn replace_lease(
        &self,
        name: &str,
        body: Bytes,
        version: object_store::UpdateVersion,
    ) -> Result<Option<object_store::UpdateVersion>, String> {
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Update(version),
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.lease_path(name), PutPayload::from_bytes(body), opts)
            .await
        {
            Ok(done) => Ok(Some(object_store::UpdateVersion {
                e_tag: done.e_tag,
                version: done.version,
            })),
            Err(object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn delete_lease(&self, name: &str) {
        let _ = self.store.delete(&self.lease_path(name)).await;
    }

    /// A small object under `<prefix>/v1/` by the rest of its key, or `None`.
    pub async fn get_key(&self, rest: &str) -> Result<Option<Bytes>, String> {
        self.get_at(&self.key(rest)).await
    }

    pub async fn put_key(&self, rest: &str, body: Bytes) -> Result<(), String> {
        self.put_at(&self.key(rest), body).await
    }

    pub async fn delete_key(&self, rest: &str) {
        let _ = self.store.delete(&self.key(rest)).await;
    }

    /// Every object under `<prefix>/v1/<rest>`.
    pub async fn list_keys(&self, rest: &str) -> Result<Vec<object_store::ObjectMeta>, String> {
        let prefix = self.key(rest.trim_end_matches('/'));
        let mut listed = self.store.list(Some(&prefix));
        let mut all = Vec::new();
        while let Some(meta) = listed.next().await {
            all.push(meta.map_err(|e| e.to_string())?);
        }
        Ok(all)
    }

    /// Removes a blob and the (upstream, repo) pairs recorded for it.
    pub async fn delete_blob(&self, hex: &str) -> Result<(), String> {
        self.store
            .delete(&self.key(&format!("blobs/sha256/{hex}")))
            .await
            .map_err(|e| e.to_string())?;
        for pair in self.list_keys(&format!("pairs/{hex}/")).await? {
            let _ = self.store.delete(&pair.location).await;
        }
        Ok(())
    }

    /// A presigned GET URL of a blob the bucket holds, if it is at least `min` bytes.
    pub async fn presigned(&self, digest: &Digest, min: u64) -> Option<String> {
        use object_store::signer::Signer as _;
        let path = self.path(Kind::Blob, digest);
        let meta = self.store.head(&path).await.ok()?;
        if meta.size < min {
            return None;
        }
        let url = self
            .store
            .signed_url(http::Method::GET, &path, std::time::Duration::from_secs(15 * 60))
            .await
            .ok()?;
        Some(url.to_string())
    }

    /// Where the bucket records that (upstream, repo) holds a digest: an empty object.
    fn pair_path(&self, digest: &Digest, upstream: &str, repo: &str) -> Path {
        let pair = Digest::sha256_of(format!("{upstream}\n{repo}").as_bytes());
        self.key(&format!("pairs/{}/{}", digest.hex(), pair.hex()))
    }

    pub async fn has_pair(&self, digest: &Digest, upstream: &str, repo: &str) -> bool {
        self.store.head(&self.pair_path(digest, upstream, repo)).await.is_ok()
    }

    pub async fn put_pair(&self, digest: &Digest, upstream: &str, repo: &str) -> Result<(), String> {
        self.put_at(&self.pair_path(digest, upstream, repo), Bytes::new()).await
    }

    pub async fn contains(&self, kind: Kind, digest: &Digest) -> bool {
        self.size_of(kind, digest).await.is_some()
    }

    /// The size of what the bucket holds, or `None` (absent or unreadable).
    pub async fn size_of(&self, kind: Kind, digest: &Digest) -> Option<u64> {
        self.store.head(&self.path(kind, digest)).await.ok().map(|m| m.size)
    }

    pub async fn put_bytes(&self, kind: Kind, digest: &Digest, bytes: Bytes) -> Result<(), String> {
        self.put_at(&self.path(kind, digest), bytes).await
    }

    /// Uploads a blob while its fill streams: each part goes up as soon as the fill has
    /// written it (read back like any reader of the fill, so the last byte only once the
    /// digest matched), and the upload is completed only after that; a fill that fails or
    /// does not match aborts it. A key under `blobs/` thus appears only with verified bytes.
    pub async fn put_while_filling<E: std::error::Error + Send + Sync + 'static>(
        &self,
        digest: &Digest,
        fill: Fill<E>,
    ) -> Result<(), String> {
        let path = self.path(Kind::Blob, digest);
        if self.store.head(&path).await.is_ok() {
            return Ok(());
        }
        let Fill { file, progress, .. } = fill;
        let total = progress.borrow().total;
        let upload = self.store.put_multipart(&path).await.map_err(|e| e.to_string())?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let reader = tokio::spawn(stream_file(
            file,
            0,
            total,
            Some(progress.clone()),
            tx,
            Reader::Anchored,
        ));
        let mut sent = 0u64;
        while let Some(chunk) = rx.recv().await {
            let failed = match chunk {
                Ok(bytes) => match writer.wait_for_capacity(2).await {
                    Ok(()) => {
                        sent += bytes.len() as u64;
                        writer.put(bytes);
                        continue;
                    }
                    Err(e) => e.to_string(),
                },
                Err(e) => format!("the fill failed: {e}"),
            };
            drop(rx);
            let _ = writer.abort().await;
            return Err(format!("{failed}; upload aborted"));
        }
        let _ = reader.await;
        let end = progress.borrow().clone();
        let complete = matches!(end.state, State::Done) && sent == end.total.unwrap_or(end.written);
        if !complete {
            let _ = writer.abort().await;
            return Err(format!("the fill ended after {sent} bytes unverified; upload aborted"));
        }
        writer.finish().await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Uploads a verified, committed blob from its cache file, in parts (a multipart upload,
    /// completed only once every part is in; aborted on any failure).
    pub async fn put_file(&self, digest: &Digest, file: std::path::PathBuf) -> Result<(), String> {
        let path = self.path(Kind::Blob, digest);
        if self.store.head(&path).await.is_ok() {
            return Ok(());
        }
        let upload = self.store.put_multipart(&path).await.map_err(|e| e.to_string())?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(2);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut f = match std::fs::File::open(&file) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            loop {
                let mut buf = vec![0u8; PART_BYTES];
                let mut filled = 0;
                while filled < buf.len() {
                    match f.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            return;
                        }
                    }
                }
                if filled == 0 {
                    return;
                }
                buf.truncate(filled);
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return;
                }
            }
        });
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Ok(bytes) => {
                    writer.wait_for_capacity(2).await.map_err(|e| e.to_string())?;
                    writer.put(bytes);
                }
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(e.to_string());
                }
            }
        }
        writer.finish().await.map(|_| ()).map_err(|e| e.to_string())
    }
}

/// An object's byte stream as a body (the mutex only makes it `Sync`; it is never contended).
struct StreamingBody(std::sync::Mutex<futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>>);

impl http_body::Body for StreamingBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let stream = self.0.get_mut().unwrap_or_else(|p| p.into_inner());
        stream.poll_next_unpin(cx).map(|next| {
            next.map(|chunk| {
                chunk
                    .map(http_body::Frame::data)
                    .map_err(|e| -> Self::Error { Box::new(e) })
            })
        })
    }
}

/// `object_store`'s HTTP through hyper-util's client with rustls (ring), as everything else
/// regcache sends.
#[derive(Debug)]
struct HyperConnector;

impl HttpConnector for HyperConnector {
    fn connect(&self, _options: &object_store::ClientOptions) -> object_store::Result<HttpClient> {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(std::time::Duration::from_secs(2)));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        Ok(HttpClient::new(HyperService(Arc::new(client))))
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    object_store::client::HttpRequestBody,
>;

#[derive(Debug)]
struct HyperService(Arc<Client>);

#[async_trait::async_trait]
impl HttpService for HyperService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let resp = self
            .0
            .request(req)
            .await
            .map_err(|e| HttpError::new(HttpErrorKind::Connect, e))?;
        let (parts, body) = resp.into_parts();
        let body = body.map_err(|e| HttpError::new(HttpErrorKind::Decode, e));
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}
