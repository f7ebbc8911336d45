//! Micro-benchmarks of regcache's hot paths (criterion):
//!
//! - `digest/sha256/<size>`: streaming digest verification throughput per chunk size;
//! - `routes/<path>`: request path -> route parsing;
//! - `blob_store/commit_4MiB`: temp file write + verify + fsync + rename + index commit;
//! - `loopback/*`: the cached hit path over 127.0.0.1: regcache in-process, fed once by a tiny
//!   in-process upstream, then GETs of the cached 1 MiB blob and of the cached manifest (by
//!   digest and by tag within its TTL) through a keep-alive hyper-util client.
//!
//! Run: `cargo bench --bench hot_paths` (about a minute; measurement time is 3 s per bench).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use regcache::cache::blob_store::{BlobStore, Kind};
use regcache::cache::index::Index;
use regcache::digest::{Algorithm, Digest, Verifier};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Deterministic pseudo-random bytes (xorshift64): no RNG crate needed.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn digest_verification(c: &mut Criterion) {
    let mut group = c.benchmark_group("digest");
    for size in [16 * KIB, 64 * KIB, 256 * KIB, MIB] {
        let data = random_bytes(size, size as u64);
        let expected = Digest::sha256_of(&data);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(
            BenchmarkId::new("sha256", format!("{}KiB", size / KIB)),
            &data,
            |b, data| {
                b.iter(|| {
                    let mut v = Verifier::new(Algorithm::Sha256);
                    v.update(black_box(data));
                    assert!(v.finish() == expected);
                })
            },
        );
    }
    group.finish();
}

fn route_parsing(c: &mut Criterion) {
    let hex = "a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";
    let paths = [
        ("base", "/v2/".to_owned()),
        ("manifest_tag", "/v2/library/alpine/manifests/3.19".to_owned()),
        (
            "manifest_digest_prefixed",
            format!("/v2/docker.io/library/alpine/manifests/sha256:{hex}"),
        ),
        (
            "blob_deep_name",
            format!("/v2/ghcr.io/org/team/project/app/blobs/sha256:{hex}"),
        ),
        ("tags_list", "/v2/library/alpine/tags/list".to_owned()),
    ];
    let mut group = c.benchmark_group("routes");
    for (label, path) in &paths {
        assert!(regcache::http::routes::parse(&Method::GET, path).is_ok());
        group.bench_with_input(BenchmarkId::from_parameter(label), path, |b, path| {
            b.iter(|| regcache::http::routes::parse(black_box(&Method::GET), black_box(path)))
        });
    }
    group.finish();
}

fn blob_store_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = BlobStore::open(dir.path()).expect("open store");
    let store = Arc::new(store);
    let index = Index::new(store.clone(), 1 << 30);
    let data = random_bytes(4 * MIB, 4);
    let digest = Digest::sha256_of(&data);
    let mut group = c.benchmark_group("blob_store");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("write_verify_commit_4MiB", |b| {
        b.iter(|| {
            let (tmp, mut file) = store.temp_file().expect("temp file");
            let mut verifier = Verifier::new(digest.algorithm());
            // Like a fill: 256 KiB chunks, hashed and appended.
            for chunk in data.chunks(256 * KIB) {
                verifier.update(chunk);
                file.write_all(chunk).expect("write");
            }
            assert!(verifier.finish() == digest);
            store.make_durable(&file).expect("fsync");
            index
                .commit(Kind::Blob, &digest, data.len() as u64, || {
                    store.place(&tmp, Kind::Blob, &digest)
                })
                .expect("commit");
            store.sync_parent(Kind::Blob, &digest).expect("dir fsync");
        })
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------
// The cached hit path over loopback
// ---------------------------------------------------------------------------------------

type Contents = Arc<HashMap<String, (&'static str, Bytes)>>;

/// A minimal upstream: serves fixed paths from memory (GET and HEAD) with the headers a
/// registry sends.
async fn start_upstream(contents: Contents) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let contents = contents.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let contents = contents.clone();
                    async move {
                        let resp = match contents.get(req.uri().path()) {
                            Some((ctype, bytes)) => {
                                let body = if req.method() == Method::HEAD {
                                    Bytes::new()
                                } else {
                                    bytes.clone()
                                };
                                let mut r = Response::new(Full::new(body));
                                let h = r.headers_mut();
                                h.insert("content-type", ctype.parse().unwrap());
                                h.insert("content-length", bytes.len().into());
                                h.insert(
                                    "docker-content-digest",
                                    Digest::sha256_of(bytes).to_string().parse().unwrap(),
                                );
                                r
                            }
                            None => {
                                let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
                                *r.status_mut() = StatusCode::NOT_FOUND;
                                r
                            }
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

struct Loopback {
    client: Client<HttpConnector, Empty<Bytes>>,
    blob_url: String,
    manifest_digest_url: String,
    manifest_tag_url: String,
    blob_len: usize,
    manifest_len: usize,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Loopback {
    async fn start() -> Loopback {
        let blob = Bytes::from(random_bytes(MIB, 1));
        let config = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
        let blob_digest = Digest::sha256_of(&blob);
        let config_digest = Digest::sha256_of(&config);
        let manifest = Bytes::from(
            serde_json::to_vec_pretty(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "size": config.len(), "digest": config_digest.to_string()},
                "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                            "size": blob.len(), "digest": blob_digest.to_string()}],
            }))
            .expect("manifest JSON"),
        );
        let manifest_digest = Digest::sha256_of(&manifest);
        let repo = "/v2/library/bench";
        let mut contents = HashMap::new();
        let octet = "application/octet-stream";
        contents.insert(format!("{repo}/blobs/{blob_digest}"), (octet, blob.clone()));
        contents.insert(format!("{repo}/blobs/{config_digest}"), (octet, config));
        contents.insert(
            format!("{repo}/manifests/{manifest_digest}"),
            (DOCKER_MANIFEST, manifest.clone()),
        );
        contents.insert(format!("{repo}/manifests/1"), (DOCKER_MANIFEST, manifest.clone()));
        let upstream = start_upstream(Arc::new(contents)).await;

        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n\
             [cache]\ndir = \"{}\"\nmax_size = \"1GiB\"\n\
             [[upstream]]\nname = \"docker.io\"\nurl = \"http://{upstream}\"\ndefault = true\ntag_ttl = \"1h\"\n",
            dir.path().join("cache").display()
        );
        let config = regcache::Config::from_toml(&text).expect("bench config is valid");
        let proxy = regcache::build(&config).expect("cache opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(regcache::server::serve(listener, proxy, async {
            let _ = stopped.await;
        }));

        let client = Client::builder(TokioExecutor::new()).build_http();
        let lb = Loopback {
            client,
            blob_url: format!("http://{addr}{repo}/blobs/{blob_digest}"),
            manifest_digest_url: format!("http://{addr}{repo}/manifests/{manifest_digest}"),
            manifest_tag_url: format!("http://{addr}{repo}/manifests/1"),
            blob_len: blob.len(),
            manifest_len: manifest.len(),
            _stop: stop,
            _dir: dir,
        };
        // Warm the cache: one GET of each (the blob GET completes only once committed).
        assert_eq!(lb.get(&lb.blob_url).await, lb.blob_len);
        assert_eq!(lb.get(&lb.manifest_digest_url).await, lb.manifest_len);
        assert_eq!(lb.get(&lb.manifest_tag_url).await, lb.manifest_len);
        lb
    }

    /// GETs `url`, reads and discards the body, returns its length; panics unless 200.
    async fn get(&self, url: &str) -> usize {
        let req = Request::get(url)
            .header("accept", DOCKER_MANIFEST)
            .body(Empty::new())
            .expect("request");
        let resp = self.client.request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK, "GET {url}");
        let mut body = resp.into_body();
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("body").into_data() {
                n += data.len();
            }
        }
        n
    }
}

fn cached_hit_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let lb = rt.block_on(Loopback::start());
    let mut group = c.benchmark_group("loopback");
    group.throughput(Throughput::Bytes(lb.blob_len as u64));
    group.bench_function("cached_blob_1MiB", |b| {
        b.iter(|| assert_eq!(rt.block_on(lb.get(&lb.blob_url)), lb.blob_len))
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("cached_manifest_by_digest", |b| {
        b.iter(|| assert_eq!(rt.block_on(lb.get(&lb.manifest_digest_url)), lb.manifest_len))
    });
    group.bench_function("cached_manifest_by_tag", |b| {
        b.iter(|| assert_eq!(rt.block_on(lb.get(&lb.manifest_tag_url)), lb.manifest_len))
    });
    group.finish();
    drop(lb);
    rt.shutdown_timeout(Duration::from_secs(5));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = digest_verification, route_parsing, blob_store_commit, cached_hit_path
}
criterion_main!(benches);
