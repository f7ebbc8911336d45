//! An upstream that lies or attacks: redirects and token realms aimed at internal
//! addresses, hostile `Retry-After` values, and rate limits that must not silence more than
//! the class of request that hit them.

use http::Method;

use crate::fake_upstream::{AuthMode, FakeUpstream};
use crate::harness::{files_under, get, random_bytes, request, upstream_toml, TestProxy};

const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";

async fn proxy_for(up: &FakeUpstream, dir: &std::path::Path, extra: &str) -> TestProxy {
    let table = format!("{}{extra}\n", upstream_toml("docker.io", &up.url(), true, "5m"));
    TestProxy::start(dir, "1GiB", &table).await
}

/// A second fake at another loopback address: "internal", and not where the upstream is.
async fn internal_host() -> FakeUpstream {
    FakeUpstream::start_on("127.0.0.2:0").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_an_internal_address_is_refused_unless_allowed() {
    let up = FakeUpstream::start().await;
    let inside = internal_host().await;
    let data = random_bytes(100_000, 90);
    let digest = up.add_blob(&data);
    inside.add_blob(&data);
    up.redirect_blobs_to(&inside.url());
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&up, dir.path(), "").await;
    let url = proxy.url(&format!("/v2/library/app/blobs/{digest}"));
    let r = get(&url).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (502, "UNAVAILABLE"));
    assert!(r.json()["errors"][0]["message"].as_str().unwrap().contains("127.0.0.2"));
    assert_eq!(inside.total_requests(), 0, "the internal host was never contacted");
    assert!(files_under(&dir.path().join("v1/blobs")).is_empty());
    proxy.stop().await;

    // Allowed by configuration: followed.
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&up, dir.path(), "redirect_allow = [\"127.0.0.2\"]").await;
    let r = get(&proxy.url(&format!("/v2/library/app/blobs/{digest}"))).await;
    assert_eq!(r.bytes().as_ref(), data.as_slice());
    assert_eq!(inside.total_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_realm_at_an_internal_address_is_never_asked() {
    let up = FakeUpstream::start().await;
    let inside = internal_host().await;
    inside.serve_tokens(None, None);
    up.require_auth(AuthMode::Token {
        realm: format!("{}/token", inside.url()),
    });
    up.add_manifest("library/app", "1", DOCKER_V2, br#"{"schemaVersion":2}"#);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&up, dir.path(), "username = \"u\"\npassword = \"p\"").await;
    let r = get(&proxy.url("/v2/library/app/manifests/1")).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    assert_eq!(inside.total_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_429_does_not_silence_heads_or_blobs() {
    let up = FakeUpstream::start().await;
    let blob = random_bytes(50_000, 91);
    let digest = up.add_blob(&blob);
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#;
    for tag in ["1", "2", "3"] {
        up.add_manifest("library/app", tag, DOCKER_V2, manifest);
    }
    let dir = tempfile::tempdir().unwrap();
    // Tags expire at once, so every tag request revalidates with a HEAD.
    let table = upstream_toml("docker.io", &up.url(), true, "1ms");
    let proxy = TestProxy::start(dir.path(), "1GiB", &table).await;
    assert_eq!(get(&proxy.url("/v2/library/app/manifests/2")).await.status, 200);

    up.fault_path(Method::GET, "/manifests/1", 429, Some("3000"));
    let r = get(&proxy.url("/v2/library/app/manifests/1")).await;
    assert_eq!((r.status.as_u16(), r.header("retry-after")), (429, Some("3000")));
    // Another manifest GET waits out the Retry-After without asking.
    let gets = up.count("GET", "/manifests/");
    assert_eq!(get(&proxy.url("/v2/library/app/manifests/3")).await.status, 429);
    assert_eq!(up.count("GET", "/manifests/"), gets);
    // A tag revalidation (a HEAD) still goes through and is answered fresh, not stale.
    let heads = up.count("HEAD", "/manifests/2");
    let r = get(&proxy.url("/v2/library/app/manifests/2")).await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-regcache-stale").is_none());
    assert_eq!(up.count("HEAD", "/manifests/2"), heads + 1);
    // Blob GETs and blob HEADs too.
    let r = get(&proxy.url(&format!("/v2/library/app/blobs/{digest}"))).await;
    assert_eq!(r.bytes().as_ref(), blob.as_slice());
    let other = up.add_blob(&random_bytes(10, 92));
    let r = request(Method::HEAD, &proxy.url(&format!("/v2/library/app/blobs/{other}")), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("10"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_retry_after_values_neither_panic_nor_silence_forever() {
    let up = FakeUpstream::start().await;
    let blob = random_bytes(50_000, 93);
    let digest = up.add_blob(&blob);
    up.fault_path(Method::GET, "/blobs/", 429, Some("18446744073709551615"));
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&up, dir.path(), "").await;
    let url = proxy.url(&format!("/v2/library/app/blobs/{digest}"));
    let r = get(&url).await;
    assert_eq!(r.status, 429);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(wait <= 3600, "capped: {wait}");
    // The server is alive and still answers (the back-off did not overflow a clock).
    assert_eq!(get(&proxy.url("/v2/")).await.status, 200);
    let again = get(&url).await;
    assert_eq!(again.status, 429);
    let wait: u64 = again.header("retry-after").unwrap().parse().unwrap();
    assert!(wait <= 3600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_drips_is_cut_off_and_resumed() {
    use crate::fake_upstream::Fault;
    let up = FakeUpstream::start().await;
    let data = random_bytes(1 << 20, 94);
    let digest = up.add_blob(&data);
    // 100 KiB at once, then a byte every 20 ms: a day and a half for the rest.
    up.fault(&digest, [Fault::Drip(100 << 10, std::time::Duration::from_millis(20))]);
    let dir = tempfile::tempdir().unwrap();
    let limits = "[limits]\nupstream_idle_timeout = \"300ms\"\nfill_min_rate = \"64KiB\"\n";
    let proxy = crate::harness::behind(&up, dir.path(), limits).await;
    let r = get(&proxy.url(&format!("/v2/library/app/blobs/{digest}"))).await;
    assert_eq!(r.bytes().as_ref(), data.as_slice());
    assert_eq!(up.count("GET", "/blobs/"), 2, "cut off once, then resumed");
    let resumed = up
        .seen()
        .into_iter()
        .filter(|s| s.path.contains("/blobs/"))
        .filter_map(|s| s.headers.get("range").map(|v| v.to_str().unwrap().to_owned()))
        .collect::<Vec<_>>();
    assert_eq!(resumed.len(), 1);
    assert_eq!(proxy.metric("regcache_fill_resumes_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redirect_status_and_a_chain_of_them_is_followed() {
    let data = random_bytes(200_000, 96);
    for status in [301u16, 302, 303, 307, 308] {
        let up = FakeUpstream::start().await;
        let hop = FakeUpstream::start().await;
        let cdn = FakeUpstream::start().await;
        let digest = up.add_blob(&data);
        hop.add_blob(&data);
        cdn.add_blob(&data);
        up.redirect_blobs_with(&hop.url(), status);
        hop.redirect_blobs_with(&cdn.url(), status);
        let dir = tempfile::tempdir().unwrap();
        let proxy = proxy_for(&up, dir.path(), "").await;
        let r = get(&proxy.url(&format!("/v2/library/app/blobs/{digest}"))).await;
        assert_eq!(r.bytes().as_ref(), data.as_slice(), "status {status}");
        assert_eq!((hop.total_requests(), cdn.total_requests()), (1, 1), "status {status}");
        assert_eq!(files_under(&dir.path().join("v1/blobs")).len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_without_content_length_is_verified_cached_and_ranged() {
    use crate::fake_upstream::Fault;
    let up = FakeUpstream::start().await;
    let data = random_bytes(700_000, 97);
    let digest = up.add_blob(&data);
    up.fault(&digest, [Fault::NoLength]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_for(&up, dir.path(), "").await;
    let url = proxy.url(&format!("/v2/library/app/blobs/{digest}"));
    // A cold Range request waits for the length, then gets its bytes.
    let r = request(Method::GET, &url, &[("range", "bytes=100-199")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.bytes().as_ref(), &data[100..200]);
    assert_eq!(r.header("content-range"), Some("bytes 100-199/700000"));
    let r = get(&url).await;
    assert_eq!(r.bytes().as_ref(), data.as_slice());
    assert_eq!(up.count("GET", "/blobs/"), 1);

    // Without a length and bigger than the whole budget: relayed, not written to the end.
    let big = random_bytes(3 << 20, 98);
    let big_digest = up.add_blob(&big);
    up.fault(&big_digest, [Fault::NoLength]);
    let dir = tempfile::tempdir().unwrap();
    let small = TestProxy::start(dir.path(), "2MiB", &upstream_toml("docker.io", &up.url(), true, "5m")).await;
    let r = get(&small.url(&format!("/v2/library/app/blobs/{big_digest}"))).await;
    assert_eq!(r.bytes().as_ref(), big.as_slice());
    assert!(files_under(&dir.path().join("v1/blobs")).is_empty());
    assert_eq!(small.metric("regcache_fills_total{result=\"relayed\"}"), 1.0);
}
