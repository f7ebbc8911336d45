//! Faults: bad bytes, broken and resumed transfers, client disconnects, upstream errors and
//! outages, and `kill -9` in the middle of a fill. Nothing bad is ever cached or handed to a
//! client as a complete response.

use std::path::Path;
use std::sync::Arc;

use http::Method;
use http_body_util::BodyExt;

use crate::fake_upstream::{FakeUpstream, Fault};
use crate::harness::*;

fn cached_blobs(dir: &Path) -> usize {
    files_under(&dir.join("v1/blobs")).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_upstream_blob_is_never_cached_nor_served_complete() {
    let (up, proxy, dir) = setup("5m").await;
    let data = random_bytes(700_000, 20);
    let digest = up.add_blob(&data);
    up.fault(&digest, [Fault::Corrupt]);
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    let bad = get(&url).await;
    assert!(bad.body.is_err(), "a corrupt blob must not arrive as a complete body");
    assert_eq!(cached_blobs(dir.path()), 0);
    assert!(files_under(&dir.path().join("v1/tmp")).is_empty());

    let good = get(&url).await;
    assert_eq!(good.bytes().as_ref(), data.as_slice());
    assert_eq!(up.count("GET", "/blobs/"), 2, "the next request fetched again");
    assert_eq!(cached_blobs(dir.path()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_manifest_by_digest_is_refused_and_not_cached() {
    let (up, proxy, dir) = setup("5m").await;
    let real = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
    let digest = sha256(real);
    // The upstream serves other bytes under that digest.
    let other = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[1]}"#;
    up.add_manifest(
        "library/x",
        &digest,
        "application/vnd.oci.image.manifest.v1+json",
        other,
    );
    let r = get(&proxy.url(&format!("/v2/library/x/manifests/{digest}"))).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), "UNAVAILABLE");
    assert!(files_under(&dir.path().join("v1/manifests")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_transfer_is_resumed_with_a_range_request() {
    let (up, proxy, dir) = setup("5m").await;
    let data = random_bytes(2 << 20, 21);
    let digest = up.add_blob(&data);
    up.fault(&digest, [Fault::Truncate(700_000)]);
    let r = get(&proxy.url(&format!("/v2/library/x/blobs/{digest}"))).await;
    assert_eq!(r.bytes().as_ref(), data.as_slice());
    let gets: Vec<_> = up.seen().into_iter().filter(|s| s.path.contains("/blobs/")).collect();
    assert_eq!(gets.len(), 2);
    assert!(gets[0].headers.get("range").is_none());
    let resumed_at: u64 = gets[1].headers["range"]
        .to_str()
        .unwrap()
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(resumed_at > 0 && resumed_at <= 700_000, "resumed at {resumed_at}");
    assert_eq!(cached_blobs(dir.path()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_that_keeps_breaking_fails_and_caches_nothing() {
    let (up, proxy, dir) = setup("5m").await;
    let data = random_bytes(1 << 20, 22);
    let digest = up.add_blob(&data);
    up.fault(&digest, (0..4).map(|_| Fault::Truncate(100_000)));
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    let r = get(&url).await;
    assert!(r.body.is_err(), "the client's response is aborted");
    assert_eq!(up.count("GET", "/blobs/"), 4, "first try and three resumes");
    assert_eq!(cached_blobs(dir.path()), 0);
    assert!(files_under(&dir.path().join("v1/tmp")).is_empty());
    // The upstream recovers: the next request fetches again and succeeds.
    assert_eq!(get(&url).await.bytes().as_ref(), data.as_slice());
    assert_eq!(cached_blobs(dir.path()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_does_not_stop_the_fill() {
    let (up, proxy, dir) = setup("5m").await;
    let data = random_bytes(3 << 20, 23);
    let digest = up.add_blob(&data);
    let gate = Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(1 << 20, gate.clone())]);
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));

    let resp = open(Method::GET, &url, &[]).await;
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(!first.is_empty());
    drop(body); // the only client leaves mid-blob
    gate.notify_one();

    let again = get(&url).await;
    assert_eq!(again.bytes().as_ref(), data.as_slice());
    assert_eq!(
        up.count("GET", "/blobs/"),
        1,
        "the first fill went on and served the second client"
    );
    assert_eq!(cached_blobs(dir.path()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_map_to_oci_errors() {
    let (up, proxy, _dir) = setup("5m").await;
    let digest = up.add_blob(b"some blob");
    up.fault(&digest, [Fault::Status(503), Fault::Status(401), Fault::Status(403)]);
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    let r = get(&url).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (502, "UNAVAILABLE"));
    let r = get(&url).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (401, "UNAUTHORIZED"));
    let r = get(&url).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (403, "DENIED"));
    assert_eq!(get(&url).await.bytes().as_ref(), b"some blob");

    let unknown = get(&proxy.url(&format!("/v2/library/x/blobs/{}", sha256(b"absent")))).await;
    assert_eq!(
        (unknown.status.as_u16(), unknown.error_code().as_str()),
        (404, "BLOB_UNKNOWN")
    );
    let unknown = get(&proxy.url("/v2/library/x/manifests/absent")).await;
    assert_eq!(
        (unknown.status.as_u16(), unknown.error_code().as_str()),
        (404, "MANIFEST_UNKNOWN")
    );

    // Last, as a 429 makes regcache leave the upstream alone for its Retry-After.
    let limited = up.add_blob(b"limited blob");
    up.fault(&limited, [Fault::Status(429)]);
    let r = get(&proxy.url(&format!("/v2/library/x/blobs/{limited}"))).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (429, "TOOMANYREQUESTS"));
    assert_eq!(r.header("retry-after"), Some("30"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_serves_cached_tags_stale_and_refuses_the_rest() {
    let (up, proxy, _dir) = setup("0s").await;
    let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
    let digest = up.add_manifest("library/app", "1", "application/vnd.oci.image.manifest.v1+json", m);
    let url = proxy.url("/v2/library/app/manifests/1");
    let fresh = get(&url).await;
    assert_eq!(fresh.status, 200);
    assert!(fresh.header("x-regcache-stale").is_none());
    drop(up);

    let stale = get(&url).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.bytes().as_ref(), m);
    assert_eq!(stale.header("x-regcache-stale"), Some("1"));
    assert_eq!(stale.header("docker-content-digest"), Some(digest.as_str()));
    let by_digest = get(&proxy.url(&format!("/v2/library/app/manifests/{digest}"))).await;
    assert_eq!(by_digest.status, 200);
    let uncached = get(&proxy.url("/v2/library/app/manifests/2")).await;
    assert_eq!(
        (uncached.status.as_u16(), uncached.error_code().as_str()),
        (502, "UNAVAILABLE")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_fill_leaves_nothing_partial_behind() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(3 << 20, 24);
    let digest = up.add_blob(&data);
    let gate = Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(1 << 20, gate)]); // never opened: the fill hangs mid-blob

    let mut first = Process::start(dir.path(), &up.url(), "");
    let url = first.url(&format!("/v2/library/x/blobs/{digest}"));
    let resp = open(Method::GET, &url, &[]).await;
    let mut body = resp.into_body();
    let got = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(!got.is_empty());
    let tmp = dir.path().join("cache/v1/tmp");
    assert_eq!(files_under(&tmp).len(), 1, "a partial fill is on disk");
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    drop(body);

    let second = Process::start(dir.path(), &up.url(), "");
    assert!(files_under(&tmp).is_empty(), "leftovers are removed at startup");
    assert!(files_under(&dir.path().join("cache/v1/blobs")).is_empty());
    let r = get(&second.url(&format!("/v2/library/x/blobs/{digest}"))).await;
    assert_eq!(r.bytes().as_ref(), data.as_slice());
    assert_eq!(up.count("GET", "/blobs/"), 2);
    let cached = files_under(&dir.path().join("cache/v1/blobs"));
    assert_eq!(cached.len(), 1);
    assert_eq!(sha256(&std::fs::read(&cached[0]).unwrap()), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_cache_disk_passes_blobs_through_verified_and_uncached() {
    let (up, proxy, dir) = setup("5m").await;
    let data = random_bytes(600_000, 25);
    let digest = up.add_blob(&data);
    let bad = up.add_blob(&random_bytes(300_000, 26));
    up.fault(&bad, [Fault::Corrupt]);
    // The cache can no longer create files: its tmp dir is gone, a file in its place.
    let tmp = dir.path().join("v1/tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();

    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    let r = get(&url).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes().as_ref(), data.as_slice());
    assert_eq!(r.header("content-length"), Some("600000"));
    assert_eq!(get(&url).await.bytes().as_ref(), data.as_slice());
    assert_eq!(up.count("GET", &digest), 2, "nothing was cached");
    assert_eq!(cached_blobs(dir.path()), 0);
    assert_eq!(
        proxy.metric(r#"regcache_bytes_served_total{source="upstream"}"#),
        1_200_000.0
    );
    // Bad bytes are still never handed over as a complete body.
    let r = get(&proxy.url(&format!("/v2/library/x/blobs/{bad}"))).await;
    assert!(r.body.is_err());
}
