//! Real disks fail: full filesystems (a small tmpfs the test mounts, so ENOSPC is real),
//! files damaged from outside, blobs bigger than the whole cache. A cache disk problem
//! costs the cache, never a client's verified download, and never the process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::Method;
use http_body_util::BodyExt;

use crate::fake_upstream::{FakeUpstream, Fault};
use crate::harness::{files_under, get, open, random_bytes, sha256, upstream_toml, TestProxy};

const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
pub(crate) struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    pub(crate) fn mount(size: &str) -> SmallDisk {
        SmallDisk::mount_with(size, "")
    }

    /// [`SmallDisk::mount`] with more mount options (`,noatime`).
    fn mount_with(size: &str, options: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}{options}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a {size} tmpfs (the tests run as root)");
        SmallDisk { dir }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills what is left of the disk with one file; returns its path.
    pub(crate) fn fill_up(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        unmount_lazily(self.dir.path());
    }
}

/// Detaches the filesystem at `path` now and frees it once nothing holds files there (a
/// test that failed may still).
fn unmount_lazily(path: &Path) {
    let _ = std::process::Command::new("umount").arg("-l").arg(path).status();
}

/// A thin-provisioned volume: an ext4 filesystem of `size` on a sparse image whose backing
/// store (a tmpfs of `backing`) is much smaller. Writes land in the page cache as on any
/// disk; the volume runs out only when they are written back, so the error comes at the
/// fsync (as on a thin LVM pool or a cloud volume that ran out), not at `write`.
struct ThinDisk {
    mount: tempfile::TempDir,
    _backing: SmallDisk,
}

/// The tests that drop the page cache run one at a time: a drop between another one's
/// failed fsync and its read-back takes that blob's pages, and its laggard is aborted.
static DROPS_PAGE_CACHE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl ThinDisk {
    fn mount(backing: &str, size: u64) -> ThinDisk {
        let backing = SmallDisk::mount(backing);
        let image = backing.path().join("volume.img");
        std::fs::File::create(&image).unwrap().set_len(size).unwrap();
        let run = |cmd: &mut std::process::Command| {
            let status = cmd.status().expect("runs");
            assert!(status.success(), "{cmd:?} (e2fsprogs, and the tests run as root)");
        };
        // No journal and lazy inode tables: nothing but the test's own writes uses the
        // backing store.
        run(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-E", "nodiscard,lazy_itable_init=1"])
            .arg(&image));
        let mount = tempfile::tempdir().unwrap();
        run(std::process::Command::new("mount")
            .args(["-o", "loop,errors=continue,noinit_itable"])
            .arg(&image)
            .arg(mount.path()));
        ThinDisk {
            mount,
            _backing: backing,
        }
    }

    fn path(&self) -> &Path {
        self.mount.path()
    }
}

impl Drop for ThinDisk {
    fn drop(&mut self) {
        // Before the backing tmpfs goes; the loop device is freed with the mount.
        unmount_lazily(self.mount.path());
    }
}

async fn proxy_on(up: &FakeUpstream, dir: &Path, max_size: &str) -> TestProxy {
    TestProxy::start(dir, max_size, &upstream_toml("docker.io", &up.url(), true, "5m")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_file_truncated_from_outside_is_quarantined_and_refetched() {
    let up = FakeUpstream::start().await;
    let data = random_bytes(3 << 20, 110);
    let digest = up.add_blob(&data);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_on(&up, dir.path(), "1GiB").await;
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    assert_eq!(sha256(get(&url).await.bytes()), digest);

    let blobs = files_under(&dir.path().join("v1/blobs"));
    assert_eq!(blobs.len(), 1);
    truncate(&blobs[0], 1000);
    // Never a short 200: the damaged file is set aside and the blob fetched anew.
    let r = get(&url).await;
    assert_eq!(r.status, 200);
    assert_eq!(sha256(r.bytes()), digest);
    assert_eq!(up.count("GET", "/blobs/"), 2);
    assert_eq!(files_under(&dir.path().join("v1/quarantine")).len(), 1);
    assert_eq!(proxy.metric("regcache_cache_quarantined_total"), 1.0);
    assert_eq!(std::fs::metadata(&blobs[0]).unwrap().len(), data.len() as u64);
}

/// Plain HTTP/1.1 sends committed blobs from memory maps (cache/mapped.rs): a file cut
/// short while its pages are mapped must cost that one response, never the process (a
/// SIGBUS would end this whole test binary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_file_truncated_while_it_is_served_aborts_one_response() {
    let up = FakeUpstream::start().await;
    let data = random_bytes(48 << 20, 112);
    let digest = up.add_blob(&data);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let proxy = proxy_on(&up, dir.path(), "1GiB").await;
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    assert_eq!(sha256(get(&url).await.bytes()), digest);
    let blobs = files_under(&dir.path().join("v1/blobs"));
    assert_eq!(blobs.len(), 1);

    let resp = open(Method::GET, &url, &[]).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = 0usize;
    while received < 2 << 20 {
        let frame = body.frame().await.expect("a first frame").expect("bytes");
        received += frame.data_ref().map_or(0, |d| d.len());
    }
    truncate(&blobs[0], 4096);
    let rest = tokio::time::timeout(std::time::Duration::from_secs(30), body.collect())
        .await
        .expect("the response ends");
    match rest {
        Err(_) => {}
        Ok(rest) => {
            let got = received + rest.to_bytes().len();
            assert!(got < data.len(), "a cut file served as a complete {got}-byte body");
        }
    }

    // Still serving, and the damaged file is set aside and fetched anew.
    let r = get(&url).await;
    assert_eq!(r.status, 200);
    assert_eq!(sha256(r.bytes()), digest);
    assert_eq!(up.count("GET", "/blobs/"), 2);
    assert_eq!(files_under(&dir.path().join("v1/quarantine")).len(), 1);
}

/// `clients` requests for one 24 MiB blob, whose single download the upstream holds at
/// 1 MiB until `gate` is notified.
struct GatedPull {
    up: FakeUpstream,
    proxy: TestProxy,
    url: String,
    digest: String,
    gate: Arc<tokio::sync::Notify>,
    clients: Vec<http::Response<hyper::body::Incoming>>,
}

async fn gated_pull(dir: &Path, clients: usize, seed: u64) -> GatedPull {
    let up = FakeUpstream::start().await;
    let digest = up.add_blob(&random_bytes(24 << 20, seed));
    let gate = Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(1 << 20, gate.clone())]);
    let proxy = proxy_on(&up, dir, "1GiB").await;
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    let mut opened = Vec::new();
    for _ in 0..clients {
        opened.push(open(Method::GET, &url, &[]).await);
    }
    GatedPull {
        up,
        proxy,
        url,
        digest,
        gate,
        clients: opened,
    }
}

/// `/readyz` of the admin port of `proxy`, as status and body.
fn readiness(proxy: &TestProxy) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = (u16, String)>>> {
    let loaded: regcache::admin::Loaded = Arc::default();
    let _ = loaded.set(proxy.proxy.clone());
    move || {
        let loaded = loaded.clone();
        Box::pin(async move {
            let req = http::Request::get("/readyz").body(()).unwrap();
            let resp = regcache::admin::handle(loaded, req).await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    }
}

/// The blob went to its clients but not into the cache in `dir` (the disk's one failure
/// counted), and its temp file is gone.
fn assert_relayed_uncached(proxy: &TestProxy, dir: &Path) {
    assert_eq!(proxy.metric("regcache_cache_write_errors_total"), 1.0);
    assert_eq!(proxy.metric("regcache_fills_total{result=\"relayed\"}"), 1.0);
    assert_eq!(proxy.metric("regcache_fills_total{result=\"committed\"}"), 0.0);
    assert!(files_under(&dir.join("v1/blobs")).is_empty(), "not cached");
    assert!(files_under(&dir.join("v1/tmp")).is_empty(), "its temp file is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_mid_fill_relays_the_verified_blob_to_every_client() {
    let disk = SmallDisk::mount("16m");
    let pull = gated_pull(disk.path(), 4, 111).await;
    assert_eq!(pull.up.count("GET", "/blobs/"), 1);
    pull.gate.notify_one();
    for resp in pull.clients {
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("a complete, verified body");
        assert_eq!(sha256(&body.to_bytes()), pull.digest);
    }
    assert_eq!(pull.up.count("GET", "/blobs/"), 1, "one download for all four");
    assert_relayed_uncached(&pull.proxy, disk.path());
    pull.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fails_at_the_fsync_still_hands_the_verified_blob_to_its_clients() {
    let _alone = DROPS_PAGE_CACHE.lock().await;
    let disk = ThinDisk::mount("8m", 512 << 20);
    let pull = gated_pull(disk.path(), 2, 114).await;
    let readyz = readiness(&pull.proxy);
    assert_eq!(readyz().await.0, 200);
    pull.gate.notify_one();
    // Read one after the other: the second client lags the whole download behind, and
    // reads the rest only once the kernel has dropped every clean page of the file.
    for (i, resp) in pull.clients.into_iter().enumerate() {
        assert_eq!(resp.status(), 200);
        if i == 1 {
            let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
        }
        let body = resp.into_body().collect().await.expect("a complete, verified body");
        assert_eq!(sha256(&body.to_bytes()), pull.digest);
    }
    assert_eq!(pull.up.count("GET", "/blobs/"), 1, "one download for both");
    assert_relayed_uncached(&pull.proxy, disk.path());
    // The readiness probe's own small write may well land where the volume has room: the
    // failed commit is what says the disk cannot take data.
    let (status, why) = readyz().await;
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("could not make a verified blob durable"), "{why}");

    // The disk still takes writes and loses them: every pull still gets the blob.
    let r = get(&pull.url).await;
    assert_eq!((r.status.as_u16(), sha256(r.bytes())), (200, pull.digest.clone()));
    assert_eq!(pull.up.count("GET", "/blobs/"), 2);
    assert_eq!(pull.proxy.metric("regcache_cache_write_errors_total"), 2.0);
    pull.proxy.stop().await;
}

/// What a failed fsync leaves in the file reads back as zeros once the kernel drops those
/// pages: a client too far behind to finish from what is kept in memory (the last 64 MiB)
/// is aborted, never handed the file's bytes as a complete body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_a_blob_the_disk_lost_is_aborted_not_handed_zeros() {
    let _alone = DROPS_PAGE_CACHE.lock().await;
    let disk = ThinDisk::mount("8m", 512 << 20);
    let up = FakeUpstream::start().await;
    let data = random_bytes(96 << 20, 115);
    let digest = up.add_blob(&data);
    let proxy = proxy_on(&up, disk.path(), "1GiB").await;
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));

    let resp = open(Method::GET, &url, &[]).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a first frame").expect("bytes");
    let mut received = first.data_ref().map_or(0, |d| d.len());
    // The client reads no further until the fill has ended.
    let p = proxy.proxy.clone();
    crate::harness::wait_until(|| p.fills_in_flight() == 0).await;
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    let outcome = tokio::time::timeout(crate::harness::HANG, async {
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            received += frame.data_ref().map_or(0, |d| d.len());
        }
        Ok::<_, hyper::Error>(())
    })
    .await
    .expect("the response ends");
    assert!(
        outcome.is_err(),
        "a complete {received}-byte body from a file whose write-back failed"
    );
    assert!(received < data.len());
    assert_eq!(proxy.metric("regcache_fills_total{result=\"committed\"}"), 0.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_full_disk_manifests_are_answered_and_readiness_says_why() {
    let disk = SmallDisk::mount("4m");
    let up = FakeUpstream::start().await;
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","layers":[]}"#;
    let digest = up.add_manifest("library/x", "1", DOCKER_V2, manifest);
    let proxy = proxy_on(&up, disk.path(), "1GiB").await;
    let readyz = readiness(&proxy);
    assert_eq!(readyz().await.0, 200);

    let filler = disk.fill_up();
    let r = get(&proxy.url("/v2/library/x/manifests/1")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(r.bytes().as_ref(), manifest.as_slice());
    // Stored in the background, where the full disk refuses the manifest, the tag's record
    // and the record of which repository holds it: each counted.
    crate::harness::wait_until(|| proxy.metric("regcache_cache_write_errors_total") == 3.0).await;
    let (status, why) = readyz().await;
    assert_eq!(status, 503);
    assert!(why.contains("No space left"), "{why:?}");

    std::fs::remove_file(filler).unwrap();
    assert_eq!(readyz().await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_bigger_than_the_budget_is_relayed_not_cached() {
    let up = FakeUpstream::start().await;
    let data = random_bytes(3 << 20, 112);
    let digest = up.add_blob(&data);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_on(&up, dir.path(), "2MiB").await;
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    let r = get(&url).await;
    assert_eq!(sha256(r.bytes()), digest);
    assert_eq!(proxy.metric("regcache_fills_total{result=\"relayed\"}"), 1.0);
    assert_eq!(proxy.metric("regcache_fills_total{result=\"committed\"}"), 0.0);
    assert!(files_under(&dir.path().join("v1/blobs")).is_empty());
    assert!(files_under(&dir.path().join("v1/tmp")).is_empty());
}

/// A client that asks for a relayed blob once the relay no longer holds its start (it
/// keeps only the last 64 MiB in memory) is passed the blob on its own, not aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_client_of_a_relayed_blob_gets_it_whole() {
    let up = FakeUpstream::start().await;
    let data = random_bytes(80 << 20, 113);
    let digest = up.add_blob(&data);
    let gate = Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(72 << 20, gate.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_on(&up, dir.path(), "2MiB").await;
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    let first = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    // The relay is past its first 64 MiB: byte 0 is gone from memory.
    let p = proxy.proxy.clone();
    crate::harness::wait_until(|| p.metrics.upstream_bytes.with_label_values(&["docker.io"]).get() >= 72 << 20).await;
    let late = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    // The late client's own download (not gated) completes first.
    let r = late.await.unwrap();
    assert_eq!(
        (r.status.as_u16(), sha256(r.bytes())),
        (200, digest.clone()),
        "the late client: {:?}",
        r.body.as_ref().err()
    );
    gate.notify_one();
    let r = first.await.unwrap();
    assert_eq!(sha256(r.bytes()), digest);
    assert_eq!(up.count("GET", &format!("/blobs/{digest}")), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_recently_read_blob_outlives_an_older_unread_one() {
    let up = FakeUpstream::start().await;
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(400 << 10, 120 + i)).collect();
    let digests: Vec<String> = blobs.iter().map(|b| up.add_blob(b)).collect();
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_on(&up, dir.path(), "2MiB").await;
    for d in &digests {
        assert_eq!(
            sha256(get(&proxy.url(&format!("/v2/library/x/blobs/{d}"))).await.bytes()),
            *d
        );
    }
    proxy.stop().await;
    // Committed in the order 0, 1, 2, each an hour apart; blob 0 was then read just now
    // (its access time), blobs 1 and 2 not since their commit.
    let now = std::time::SystemTime::now();
    let hour = std::time::Duration::from_secs(3600);
    let path = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        dir.path().join(format!("v1/blobs/sha256/{}/{hex}", &hex[..2]))
    };
    for (i, d) in digests.iter().enumerate() {
        let committed = now - hour * (4 - i as u32);
        let read = if i == 0 { now } else { committed };
        let f = std::fs::File::options().write(true).open(path(d)).unwrap();
        f.set_times(std::fs::FileTimes::new().set_modified(committed).set_accessed(read))
            .unwrap();
    }
    // A smaller budget after the restart: one of the three must go, the least recently used.
    let proxy = proxy_on(&up, dir.path(), "1MiB").await;
    proxy.proxy.cache.index.settle_deletions();
    assert!(path(&digests[0]).exists(), "the recently read blob is kept");
    assert!(!path(&digests[1]).exists(), "the oldest unread blob is evicted first");
    assert!(path(&digests[2]).exists());
}

/// Where the kernel keeps no access times (`noatime`, common on nodes tuned for I/O),
/// regcache notes the uses itself: a blob read before a restart outlives older unread ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_noatime_disk_a_restart_still_keeps_the_recently_read_blob() {
    let up = FakeUpstream::start().await;
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(400 << 10, 125 + i)).collect();
    let digests: Vec<String> = blobs.iter().map(|b| up.add_blob(b)).collect();
    let disk = SmallDisk::mount_with("64M", ",noatime");
    let path = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        disk.path().join(format!("v1/blobs/sha256/{}/{hex}", &hex[..2]))
    };
    let blob = |proxy: &TestProxy, d: &str| proxy.url(&format!("/v2/library/x/blobs/{d}"));
    let proxy = proxy_on(&up, disk.path(), "2MiB").await;
    for d in &digests {
        assert_eq!(sha256(get(&blob(&proxy, d)).await.bytes()), *d);
    }
    proxy.stop().await;
    // Committed in the order 0, 1, 2, each an hour apart, and not read since.
    let now = std::time::SystemTime::now();
    let hour = std::time::Duration::from_secs(3600);
    for (i, d) in digests.iter().enumerate() {
        let committed = now - hour * (4 - i as u32);
        let f = std::fs::File::options().write(true).open(path(d)).unwrap();
        f.set_times(
            std::fs::FileTimes::new()
                .set_modified(committed)
                .set_accessed(committed),
        )
        .unwrap();
    }
    // Blob 0, the oldest, is read now: this disk does not note it, regcache must.
    let proxy = proxy_on(&up, disk.path(), "2MiB").await;
    assert_eq!(sha256(get(&blob(&proxy, &digests[0])).await.bytes()), digests[0]);
    proxy.stop().await;
    // A smaller budget after the restart: one of the three must go, the least recently used.
    let proxy = proxy_on(&up, disk.path(), "1MiB").await;
    proxy.proxy.cache.index.settle_deletions();
    assert!(path(&digests[0]).exists(), "the recently read blob is kept");
    assert!(!path(&digests[1]).exists(), "the oldest unread blob is evicted first");
    assert!(path(&digests[2]).exists());
    assert_eq!(up.count("GET", "/blobs/"), 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_is_served_from_disk_while_the_index_is_still_being_rebuilt() {
    let up = FakeUpstream::start().await;
    let data = random_bytes(300 << 10, 130);
    let digest = up.add_blob(&data);
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","layers":[]}"#;
    let manifest_digest = up.add_manifest("library/x", "1", DOCKER_V2, manifest);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_on(&up, dir.path(), "1GiB").await;
    assert_eq!(
        get(&proxy.url(&format!("/v2/library/x/blobs/{digest}"))).await.status,
        200
    );
    assert_eq!(get(&proxy.url("/v2/library/x/manifests/1")).await.status, 200);
    proxy.stop().await;

    // Opened, not yet indexed: what is on disk is found (and indexed) on demand.
    let cache = regcache::cache::Cache::open_unindexed(dir.path(), 1 << 30, 1 << 20).unwrap();
    assert!(cache.loading());
    assert_eq!(cache.index.entry_count(), 0);
    let (_, len) = cache
        .open_blob(&digest.parse().unwrap())
        .unwrap()
        .expect("found on disk");
    assert_eq!(len, data.len() as u64);
    let m = cache
        .manifest(&manifest_digest.parse().unwrap())
        .expect("found on disk");
    assert_eq!(m.bytes.as_ref(), manifest.as_slice());
    assert!(cache
        .open_blob(&sha256(b"never cached").parse().unwrap())
        .unwrap()
        .is_none());
    cache.load_index().unwrap();
    assert!(!cache.loading());
    assert_eq!(cache.index.entry_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_in_flight_is_reserved_against_the_budget_before_it_fills_the_disk() {
    let up = FakeUpstream::start().await;
    let old: Vec<Vec<u8>> = (0..2).map(|i| random_bytes(1 << 20, 140 + i)).collect();
    let old_digests: Vec<String> = old.iter().map(|b| up.add_blob(b)).collect();
    let big = random_bytes(2 << 20, 142);
    let big_digest = up.add_blob(&big);
    let gate = Arc::new(tokio::sync::Notify::new());
    up.fault(&big_digest, [Fault::Gate(256 << 10, gate.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_on(&up, dir.path(), "3MiB").await;
    for d in &old_digests {
        assert_eq!(
            sha256(get(&proxy.url(&format!("/v2/library/x/blobs/{d}"))).await.bytes()),
            *d
        );
    }
    // The 2 MiB download has only begun, and already the least recently used blob made
    // room for it: cached content plus downloads in flight stay within the budget.
    let resp = open(
        Method::GET,
        &proxy.url(&format!("/v2/library/x/blobs/{big_digest}")),
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200);
    proxy.proxy.cache.index.settle_deletions();
    let cached = files_under(&dir.path().join("v1/blobs"));
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(cached[0].ends_with(old_digests[1].trim_start_matches("sha256:")));
    gate.notify_one();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(sha256(&body), big_digest);
    proxy.proxy.cache.index.settle_deletions();
    assert_eq!(files_under(&dir.path().join("v1/blobs")).len(), 2);
    assert!(proxy.proxy.cache.index.total_bytes() <= 3 << 20);
}

/// A disk fuller than the budget says (other files share it): the fill that hits ENOSPC
/// evicts the least recently used blob and is cached after all, instead of relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_room_by_evicting_the_least_recently_used() {
    let disk = SmallDisk::mount("16m");
    let up = FakeUpstream::start().await;
    let (old, recent, new) = (
        up.add_blob(&random_bytes(6 << 20, 120)),
        up.add_blob(&random_bytes(6 << 20, 121)),
        random_bytes(8 << 20, 122),
    );
    let new_digest = up.add_blob(&new);
    let proxy = proxy_on(&up, disk.path(), "1GiB").await;
    let blob = |d: &str| proxy.url(&format!("/v2/library/x/blobs/{d}"));
    for d in [&old, &recent] {
        assert_eq!(sha256(get(&blob(d)).await.bytes()), *d);
    }
    assert_eq!(files_under(&disk.path().join("v1/blobs")).len(), 2);

    // 12 MiB held on a 16 MiB disk: the 8 MiB blob does not fit unless one goes.
    assert_eq!(sha256(get(&blob(&new_digest)).await.bytes()), new_digest);
    assert_eq!(proxy.metric("regcache_fills_total{result=\"committed\"}"), 3.0);
    assert_eq!(proxy.metric("regcache_fills_total{result=\"relayed\"}"), 0.0);
    proxy.proxy.cache.index.settle_deletions();
    let names: Vec<String> = files_under(&disk.path().join("v1/blobs"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let hex = |d: &str| d.trim_start_matches("sha256:").to_owned();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.contains(&hex(&recent)) && names.contains(&hex(&new_digest)),
        "{names:?}"
    );

    // Both cached blobs are served from the disk (no upstream GET), the evicted one anew.
    let before = up.count("GET", "/blobs/");
    for d in [&recent, &new_digest] {
        assert_eq!(sha256(get(&blob(d)).await.bytes()), *d);
    }
    assert_eq!(up.count("GET", "/blobs/"), before);
    proxy.stop().await;
}

/// Cuts a cache file to `len` bytes from outside, as a disk fault or an operator would.
fn truncate(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// A blob file cut short while regcache was down: at restart the file's own size is all the
/// disk says, so the size recorded at commit must catch it. Never a complete 200 of the
/// wrong bytes; the blob is set aside and fetched anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_file_truncated_while_regcache_is_down_is_set_aside_at_restart() {
    let up = FakeUpstream::start().await;
    let data = random_bytes(1 << 20, 113);
    let digest = up.add_blob(&data);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let proxy = proxy_on(&up, dir.path(), "1GiB").await;
    let path = format!("/v2/library/x/blobs/{digest}");
    assert_eq!(sha256(get(&proxy.url(&path)).await.bytes()), digest);
    proxy.stop().await;

    let blobs = files_under(&dir.path().join("v1/blobs"));
    assert_eq!(blobs.len(), 1);
    let damaged = || {
        regcache::inventory::Inventory::read(dir.path())
            .unwrap()
            .usage()
            .damaged
    };
    assert_eq!(damaged(), 0);
    truncate(&blobs[0], 4096);
    assert_eq!(damaged(), 1, "`regcache du` reports the cut file");
    let proxy = proxy_on(&up, dir.path(), "1GiB").await;
    let r = get(&proxy.url(&path)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.bytes().len(),
        data.len(),
        "a file cut while down was served at its cut size"
    );
    assert_eq!(sha256(r.bytes()), digest);
    assert_eq!(up.count("GET", "/blobs/"), 2);
    assert_eq!(files_under(&dir.path().join("v1/quarantine")).len(), 1);
    assert_eq!(proxy.metric("regcache_cache_quarantined_total"), 1.0);
    proxy.stop().await;
    assert_eq!(damaged(), 0, "set aside and fetched anew");
}
