//! The pull API against the fake upstream: manifests, tags, blobs, Range, routing, restart,
//! eviction, coalescing, and bad input. Assertions are on bytes, digests and request counts.

use std::sync::Arc;

use http::{Method, StatusCode};
use http_body_util::BodyExt;

use crate::fake_upstream::{FakeUpstream, Fault};
use crate::harness::*;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ALL_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

fn image_manifest(layer: &str, size: usize) -> Vec<u8> {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_V2,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2, "digest": layer},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": size, "digest": layer}]
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_endpoint_and_unsupported_methods() {
    let (up, proxy, _dir) = setup("5m").await;
    let r = get(&proxy.url("/v2/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("docker-distribution-api-version"), Some("registry/2.0"));
    for (method, path) in [
        (Method::PUT, "/v2/library/alpine/manifests/3"),
        (Method::POST, "/v2/library/alpine/blobs/uploads/"),
        (Method::PATCH, "/v2/library/alpine/blobs/uploads/abc"),
        (Method::DELETE, "/v2/library/alpine/manifests/3"),
        (
            Method::DELETE,
            "/v2/library/alpine/blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ),
    ] {
        let r = request(method.clone(), &proxy.url(path), &[]).await;
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.error_code(), "UNSUPPORTED");
    }
    let r = get(&proxy.url("/v2/library/alpine/nothing")).await;
    assert_eq!(r.status, 404);
    assert!(r.json()["errors"].is_array());
    assert_eq!(up.total_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_by_tag_is_exact_and_cached_within_ttl() {
    let (up, proxy, _dir) = setup("5m").await;
    let layer = up.add_blob(b"layer");
    let bytes = image_manifest(&layer, 5);
    let digest = up.add_manifest("library/alpine", "3", DOCKER_V2, &bytes);

    let r = get_with(&proxy.url("/v2/library/alpine/manifests/3"), &[("accept", ALL_TYPES)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes().as_ref(), bytes.as_slice());
    assert_eq!(r.header("content-type"), Some(DOCKER_V2));
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(r.header("content-length"), Some(bytes.len().to_string().as_str()));

    // Within the TTL: tag, HEAD, short name and digest are all answered without upstream.
    let before = up.total_requests();
    let again = get_with(&proxy.url("/v2/library/alpine/manifests/3"), &[("accept", ALL_TYPES)]).await;
    assert_eq!(again.bytes(), r.bytes());
    let h = request(
        Method::HEAD,
        &proxy.url("/v2/alpine/manifests/3"),
        &[("accept", ALL_TYPES)],
    )
    .await;
    assert_eq!(h.status, 200);
    assert_eq!(h.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(h.header("content-length"), Some(bytes.len().to_string().as_str()));
    assert_eq!(h.header("content-type"), Some(DOCKER_V2));
    assert!(h.bytes().is_empty());
    let d = get(&proxy.url(&format!("/v2/library/alpine/manifests/{digest}"))).await;
    assert_eq!(d.bytes().as_ref(), bytes.as_slice());
    assert_eq!(up.total_requests(), before);
    assert_eq!(up.count("GET", "/manifests/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tags_revalidate_with_head_and_refetch_only_on_change() {
    let (up, proxy, _dir) = setup("0s").await;
    let v1 = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","layers":[],"config":{}}"#;
    up.add_manifest("library/app", "latest", DOCKER_V2, v1);
    let url = proxy.url("/v2/library/app/manifests/latest");
    assert_eq!(get(&url).await.bytes().as_ref(), v1);
    assert_eq!(
        (up.count("GET", "/manifests/"), up.count("HEAD", "/manifests/")),
        (1, 0)
    );

    assert_eq!(get(&url).await.bytes().as_ref(), v1);
    assert_eq!(
        (up.count("GET", "/manifests/"), up.count("HEAD", "/manifests/")),
        (1, 1)
    );

    let v2 = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","layers":[],"config":{"x":1}}"#;
    let d2 = up.retag("library/app", "latest", DOCKER_V2, v2);
    let r = get(&url).await;
    assert_eq!(r.bytes().as_ref(), v2);
    assert_eq!(r.header("docker-content-digest"), Some(d2.as_str()));
    assert_eq!(
        (up.count("GET", "/manifests/"), up.count("HEAD", "/manifests/")),
        (2, 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_answers_follow_the_client_accept_list() {
    let (up, proxy, _dir) = setup("5m").await;
    let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
    let single =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","layers":[]}"#;
    up.add_manifest("library/multi", "1", OCI_INDEX, index);
    up.add_manifest("library/multi", "1", DOCKER_V2, single);
    let url = proxy.url("/v2/library/multi/manifests/1");

    let modern = get_with(&url, &[("accept", ALL_TYPES)]).await;
    assert_eq!(modern.header("content-type"), Some(OCI_INDEX));
    assert_eq!(modern.bytes().as_ref(), index);
    let old = get_with(&url, &[("accept", DOCKER_V2)]).await;
    assert_eq!(old.header("content-type"), Some(DOCKER_V2));
    assert_eq!(old.bytes().as_ref(), single);
    // skopeo's six Accept lines (schema 1 among them) count as "everything".
    let many = request(
        Method::GET,
        &url,
        &[
            ("accept", "application/vnd.oci.image.manifest.v1+json"),
            ("accept", "application/vnd.docker.distribution.manifest.v1+prettyjws"),
            ("accept", DOCKER_V2),
            ("accept", OCI_INDEX),
            ("accept", "application/vnd.docker.distribution.manifest.list.v2+json"),
        ],
    )
    .await;
    assert_eq!(many.bytes().as_ref(), index);
    assert_eq!(up.count("GET", "/manifests/"), 2, "one upstream fetch per accept set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema1_is_never_served() {
    let (up, proxy, _dir) = setup("5m").await;
    let s1 = br#"{"schemaVersion":1,"name":"library/old","tag":"1","fsLayers":[]}"#;
    up.add_manifest(
        "library/old",
        "1",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        s1,
    );
    let r = get(&proxy.url("/v2/library/old/manifests/1")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
}

/// 32 clients ask for one cold blob at once: one upstream GET, 32 complete correct bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_gets_make_one_upstream_fetch() {
    let (up, proxy, dir) = setup("5m").await;
    let data = random_bytes(4 << 20, 1);
    let digest = up.add_blob(&data);
    let gate = Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(1 << 20, gate.clone())]);
    let url = proxy.url(&format!("/v2/library/big/blobs/{digest}"));

    let (headers_in, mut all_in) = tokio::sync::mpsc::channel::<()>(32);
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (url, headers_in) = (url.clone(), headers_in.clone());
        clients.push(tokio::spawn(async move {
            let resp = open(Method::GET, &url, &[]).await;
            headers_in.send(()).await.unwrap();
            let status = resp.status();
            let len = resp.headers()["content-length"].to_str().unwrap().to_owned();
            let body = resp.into_body().collect().await.map(|c| c.to_bytes());
            (status, len, body)
        }));
    }
    // Every client has its headers (so has joined the fill) before the upstream may finish.
    for _ in 0..32 {
        all_in.recv().await.unwrap();
    }
    gate.notify_one();
    for c in clients {
        let (status, len, body) = c.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(len, data.len().to_string());
        let body = body.expect("complete body");
        assert_eq!(sha256(&body), digest);
    }
    assert_eq!(up.count("GET", "/blobs/"), 1);
    let cached: Vec<_> = files_under(&dir.path().join("v1/blobs"));
    assert_eq!(cached.len(), 1);
    assert_eq!(std::fs::read(&cached[0]).unwrap(), data);
}

/// A client that joins a fill after its first 12 MiB reads them back from the disk (the
/// fill keeps only its last 4 MiB in memory; on plain HTTP/1.1 the written part is mapped),
/// then tails the rest: its body, and a Range inside the written part, are the blob's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_joining_a_fill_late_reads_the_written_part_from_disk() {
    let (up, proxy, dir) = setup("5m").await;
    let data = random_bytes(16 << 20, 3);
    let digest = up.add_blob(&data);
    let gate = Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(12 << 20, gate.clone())]);
    let url = proxy.url(&format!("/v2/library/big/blobs/{digest}"));
    let first = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    let tmp = dir.path().join("v1/tmp");
    let written = |len: u64| {
        files_under(&tmp)
            .iter()
            .any(|f| std::fs::metadata(f).is_ok_and(|m| m.len() == len))
    };
    wait_until(|| written(12 << 20)).await;
    let late = open(Method::GET, &url, &[]).await;
    let part = open(Method::GET, &url, &[("range", "bytes=1000-2000999")]).await;
    assert_eq!(
        (late.status(), part.status()),
        (StatusCode::OK, StatusCode::PARTIAL_CONTENT)
    );
    gate.notify_one();
    let first = first.await.unwrap();
    assert!(
        first.bytes().as_ref() == data.as_slice(),
        "the first client got wrong bytes"
    );
    let late = late.into_body().collect().await.expect("complete body").to_bytes();
    assert!(late.as_ref() == data.as_slice(), "the late client got wrong bytes");
    let part = part.into_body().collect().await.expect("complete body").to_bytes();
    assert!(part.as_ref() == &data[1000..2_001_000], "the range got wrong bytes");
    assert_eq!(up.count("GET", "/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_blobs_and_ranges_come_from_disk() {
    let (up, proxy, _dir) = setup("5m").await;
    let data = random_bytes(1_000_000, 2);
    let digest = up.add_blob(&data);
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    let cold = get(&url).await;
    assert_eq!(cold.status, 200);
    assert_eq!(cold.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(cold.header("accept-ranges"), Some("bytes"));
    assert_eq!(cold.bytes().as_ref(), data.as_slice());

    let warm = get(&url).await;
    assert_eq!(warm.bytes().as_ref(), data.as_slice());
    let part = get_with(&url, &[("range", "bytes=1000-1999")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), Some("bytes 1000-1999/1000000"));
    assert_eq!(part.bytes().as_ref(), &data[1000..2000]);
    let tail = get_with(&url, &[("range", "bytes=999990-")]).await;
    assert_eq!(tail.status, 206);
    assert_eq!(tail.bytes().as_ref(), &data[999_990..]);
    let suffix = get_with(&url, &[("range", "bytes=-10")]).await;
    assert_eq!(suffix.bytes().as_ref(), &data[999_990..]);
    let bad = get_with(&url, &[("range", "bytes=1000000-")]).await;
    assert_eq!(bad.status, 416);
    assert_eq!(bad.header("content-range"), Some("bytes */1000000"));
    let h = head(&url).await;
    assert_eq!(h.header("content-length"), Some("1000000"));
    // Different repository, same digest: content-addressed, still no upstream request.
    let other = get(&proxy.url(&format!("/v2/library/other/blobs/{digest}"))).await;
    assert_eq!(other.bytes().as_ref(), data.as_slice());
    assert_eq!(up.count("GET", "/blobs/"), 1);
    assert_eq!(up.count("HEAD", "/blobs/"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_on_a_cold_miss_is_served_from_the_fill() {
    let (up, proxy, _dir) = setup("5m").await;
    let data = random_bytes(3 << 20, 3);
    let digest = up.add_blob(&data);
    let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
    let part = get_with(&url, &[("range", "bytes=2000000-2000099")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 2000000-2000099/{}", data.len()).as_str())
    );
    assert_eq!(part.bytes().as_ref(), &data[2_000_000..2_000_100]);
    let full = get(&url).await;
    assert_eq!(full.bytes().as_ref(), data.as_slice());
    assert_eq!(up.count("GET", "/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_cold_blob_does_not_download_it() {
    let (up, proxy, dir) = setup("5m").await;
    let digest = up.add_blob(&random_bytes(50_000, 4));
    let h = head(&proxy.url(&format!("/v2/library/x/blobs/{digest}"))).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some("50000"));
    assert_eq!(up.count("GET", "/blobs/"), 0);
    assert!(files_under(&dir.path().join("v1/blobs")).is_empty());
    let missing = head(&proxy.url(&format!("/v2/library/x/blobs/{}", sha256(b"nope")))).await;
    assert_eq!(missing.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_blobs_manifests_and_tags_even_with_upstream_gone() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let upstreams = upstream_toml("docker.io", &up.url(), true, "1h");
    let proxy = TestProxy::start(dir.path(), "1GiB", &upstreams).await;
    let data = random_bytes(200_000, 5);
    let layer = up.add_blob(&data);
    let manifest = image_manifest(&layer, data.len());
    let digest = up.add_manifest("library/app", "v1", DOCKER_V2, &manifest);
    assert_eq!(get(&proxy.url("/v2/library/app/manifests/v1")).await.status, 200);
    assert_eq!(
        get(&proxy.url(&format!("/v2/library/app/blobs/{layer}"))).await.status,
        200
    );
    proxy.stop().await;
    let seen = up.total_requests();
    drop(up); // the upstream is gone for good

    let proxy = TestProxy::start(dir.path(), "1GiB", &upstreams).await;
    let m = get(&proxy.url("/v2/library/app/manifests/v1")).await;
    assert_eq!(m.status, 200);
    assert_eq!(m.bytes().as_ref(), manifest.as_slice());
    assert_eq!(m.header("docker-content-digest"), Some(digest.as_str()));
    let b = get(&proxy.url(&format!("/v2/library/app/blobs/{layer}"))).await;
    assert_eq!(b.bytes().as_ref(), data.as_slice());
    assert_eq!(seen, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_cache_under_its_budget() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(dir.path(), "1MiB", &upstream_toml("docker.io", &up.url(), true, "5m")).await;
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| random_bytes(400 * 1024, 10 + i)).collect();
    let digests: Vec<String> = blobs.iter().map(|b| up.add_blob(b)).collect();
    for d in &digests {
        let r = get(&proxy.url(&format!("/v2/library/x/blobs/{d}"))).await;
        assert_eq!(r.status, 200);
        // Evicted files are deleted by a background thread, off the request path.
        proxy.proxy.cache.index.settle_deletions();
        let on_disk: u64 = files_under(&dir.path().join("v1/blobs"))
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert!(on_disk <= 1 << 20, "{on_disk} bytes on disk over a 1 MiB budget");
    }
    // The oldest went first; asking again goes upstream again and still succeeds.
    proxy.proxy.cache.index.settle_deletions();
    assert_eq!(files_under(&dir.path().join("v1/blobs")).len(), 2);
    let again = get(&proxy.url(&format!("/v2/library/x/blobs/{}", digests[0]))).await;
    assert_eq!(again.bytes().as_ref(), blobs[0].as_slice());
    assert_eq!(up.count("GET", &digests[0]), 2);
    assert_eq!(up.count("GET", &digests[3]), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_routing_styles_and_a_closed_upstream_list() {
    let hub = FakeUpstream::start().await;
    let ghcr = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let upstreams = format!(
        "{}{}",
        upstream_toml("docker.io", &hub.url(), true, "5m"),
        upstream_toml("ghcr.io", &ghcr.url(), false, "5m")
    );
    let proxy = TestProxy::start(dir.path(), "1GiB", &upstreams).await;
    let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;
    hub.add_manifest("library/alpine", "3", "application/vnd.oci.image.manifest.v1+json", m);
    ghcr.add_manifest("org/app", "1", "application/vnd.oci.image.manifest.v1+json", m);

    let r = get(&proxy.url("/v2/org/app/manifests/1?ns=ghcr.io")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("oci-namespace"), Some("ghcr.io"));
    assert_eq!(get(&proxy.url("/v2/ghcr.io/org/app/manifests/1")).await.status, 200);
    assert_eq!(get(&proxy.url("/v2/alpine/manifests/3")).await.status, 200);
    assert_eq!(
        get(&proxy.url("/v2/docker.io/library/alpine/manifests/3")).await.status,
        200
    );
    assert_eq!(
        get(&proxy.url("/v2/library/alpine/manifests/3?ns=docker.io"))
            .await
            .status,
        200
    );
    assert_eq!(ghcr.count("GET", "/v2/org/app/manifests/1"), 1);
    assert_eq!(hub.count("GET", "/v2/library/alpine/manifests/3"), 1);

    let (hub_before, ghcr_before) = (hub.total_requests(), ghcr.total_requests());
    for path in [
        "/v2/library/alpine/manifests/3?ns=evil.example",
        "/v2/evil.example/library/alpine/manifests/3",
        "/v2/127.0.0.1:22/x/manifests/3",
        "/v2/localhost/x/blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ] {
        let r = get(&proxy.url(path)).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.error_code(), "NAME_UNKNOWN", "{path}");
    }
    assert_eq!((hub.total_requests(), ghcr.total_requests()), (hub_before, ghcr_before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_paginates_with_links_through_regcache() {
    let (up, proxy, _dir) = setup("5m").await;
    for t in ["a", "b", "c"] {
        up.add_tag_only("library/app", t);
    }
    let r = get(&proxy.url("/v2/docker.io/library/app/tags/list?n=2")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["tags"], serde_json::json!(["a", "b"]));
    let link = r.header("link").unwrap().to_owned();
    assert_eq!(link, "</v2/docker.io/library/app/tags/list?n=2&last=b>; rel=\"next\"");
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    let r2 = get(&proxy.url(next)).await;
    assert_eq!(r2.json()["tags"], serde_json::json!(["c"]));
    assert!(r2.header("link").is_none());
    assert_eq!(
        get(&proxy.url("/v2/library/nope/tags/list")).await.error_code(),
        "NAME_UNKNOWN"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_oci_errors_and_never_reaches_upstream_or_disk() {
    let (up, proxy, dir) = setup("5m").await;
    let cases = [
        (
            "/v2/library/alpine/manifests/sha256:totallywrong",
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("/v2/library/alpine/manifests/.hidden", 404, "MANIFEST_UNKNOWN"),
        // What the OCI conformance suite's pull workflow asks for.
        (
            "/v2/library/alpine/manifests/.INVALID_MANIFEST_NAME",
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("/v2/library/alpine/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        (
            "/v2/library/alpine/blobs/sha256:../../../../etc/passwd",
            404,
            "NOT_FOUND",
        ),
        (
            "/v2/library/alpine/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            400,
            "DIGEST_INVALID",
        ),
        ("/v2/Library/Alpine/manifests/3", 400, "NAME_INVALID"),
        ("/v2/library/../../etc/manifests/3", 400, "NAME_INVALID"),
        ("/v2/library/%2e%2e/manifests/3", 400, "NAME_INVALID"),
        ("/v2/a//b/manifests/3", 400, "NAME_INVALID"),
        ("/v2/library/alpine/tags/list?n=many", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/library/alpine/referrers/sha256:abc", 400, "DIGEST_INVALID"),
    ];
    for (path, status, code) in cases {
        let r = get(&proxy.url(path)).await;
        assert_eq!((r.status.as_u16(), r.error_code().as_str()), (status, code), "{path}");
    }
    let long = format!("/v2/{}/manifests/1", "a".repeat(300));
    assert_eq!(get(&proxy.url(&long)).await.status, 400);
    assert_eq!(up.total_requests(), 0);
    assert!(files_under(&dir.path().join("v1/blobs")).is_empty());
    assert!(files_under(&dir.path().join("v1/manifests")).is_empty());
}

/// An image manifest `layers` over a config blob and layer blobs (sizes from the bytes).
fn image_of(config: (&str, usize), layers: &[(&str, usize)]) -> Vec<u8> {
    let layers: Vec<_> = layers
        .iter()
        .map(|(d, size)| serde_json::json!({"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": size, "digest": d}))
        .collect();
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_V2,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config.1, "digest": config.0},
        "layers": layers
    })
    .to_string()
    .into_bytes()
}

/// An image of a 300-byte config and layers of these sizes (random bytes from `seed` on),
/// added to `up` as `<repo>:1`: (config, its digest, layers, their digests).
fn image_in(
    up: &FakeUpstream,
    repo: &str,
    seed: u64,
    layer_sizes: &[usize],
) -> (Vec<u8>, String, Vec<Vec<u8>>, Vec<String>) {
    let config = random_bytes(300, seed);
    let layers: Vec<Vec<u8>> = (0..layer_sizes.len())
        .map(|i| random_bytes(layer_sizes[i], seed + 1 + i as u64))
        .collect();
    let config_digest = up.add_blob(&config);
    let layer_digests: Vec<String> = layers.iter().map(|l| up.add_blob(l)).collect();
    let sizes: Vec<(&str, usize)> = layer_digests
        .iter()
        .map(String::as_str)
        .zip(layers.iter().map(Vec::len))
        .collect();
    up.add_manifest(repo, "1", DOCKER_V2, &image_of((&config_digest, config.len()), &sizes));
    (config, config_digest, layers, layer_digests)
}

/// `[cache] layers_ahead`: a manifest fetched from the upstream starts nothing by itself (a
/// client that reads only the manifest or the config costs no download), nor does one of its
/// layers asked for under another repository. The first layer asked for under the image's
/// own repository starts the fetches of the rest, each once; the client then gets every blob
/// from the cache, exact, with no further upstream request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_layer_request_fetches_the_rest_of_the_image_before_the_client_asks() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let upstreams = upstream_toml("docker.io", &up.url(), true, "5m");
    let proxy = TestProxy::start_with(dir.path(), "layers_ahead = 4", &upstreams).await;
    let (config, config_digest, layers, layer_digests) =
        image_in(&up, "library/app", 61, &[1 << 20, 2 << 20, 3 << 20, 4 << 20, 5 << 20]);

    let r = get_with(&proxy.url("/v2/library/app/manifests/1"), &[("accept", ALL_TYPES)]).await;
    assert_eq!(r.status, 200);
    let c = get(&proxy.url(&format!("/v2/library/app/blobs/{config_digest}"))).await;
    assert!(c.bytes().as_ref() == config.as_slice());
    wait_until(|| proxy.proxy.fills_in_flight() == 0).await;
    assert_eq!(
        up.count("GET", "/blobs/"),
        1,
        "the manifest and the config start no download"
    );
    let elsewhere = get(&proxy.url(&format!("/v2/library/other/blobs/{}", layer_digests[4]))).await;
    assert!(elsewhere.bytes().as_ref() == layers[4].as_slice());
    wait_until(|| proxy.proxy.fills_in_flight() == 0).await;
    assert_eq!(
        up.count("GET", "/blobs/"),
        2,
        "a layer asked for under another repository starts nothing more"
    );
    assert_eq!(proxy.metric("regcache_layers_ahead_total"), 0.0);

    let first = get(&proxy.url(&format!("/v2/library/app/blobs/{}", layer_digests[0]))).await;
    assert!(first.bytes().as_ref() == layers[0].as_slice());
    // The three layers nobody asked for yet are fetched, once.
    wait_until(|| up.count("GET", "/blobs/") == 6 && proxy.proxy.fills_in_flight() == 0).await;
    assert_eq!(proxy.metric("regcache_layers_ahead_total"), 3.0);
    for (digest, bytes) in std::iter::once((&config_digest, &config)).chain(layer_digests.iter().zip(&layers)) {
        let b = get(&proxy.url(&format!("/v2/library/app/blobs/{digest}"))).await;
        assert_eq!(b.status, 200);
        assert!(b.bytes().as_ref() == bytes.as_slice(), "wrong bytes for {digest}");
    }
    assert_eq!(up.count("GET", "/blobs/"), 6);
    assert_eq!(
        proxy.metric(r#"regcache_cache_lookups_total{kind="blob",result="hit"}"#),
        6.0
    );
}

/// A cache disk that cannot take files fetches nothing ahead: each blob would be read from the
/// upstream only to be thrown away. A client's own blob request still passes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_disk_that_cannot_take_files_fetches_nothing_ahead() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let upstreams = upstream_toml("docker.io", &up.url(), true, "5m");
    let proxy = TestProxy::start_with(dir.path(), "layers_ahead = 4", &upstreams).await;
    let (_, _, layers, layer_digests) = image_in(&up, "library/app", 81, &[200_000; 3]);
    // The cache can no longer create files: its tmp dir is gone, a file in its place.
    let tmp = dir.path().join("v1/tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();

    let r = get_with(&proxy.url("/v2/library/app/manifests/1"), &[("accept", ALL_TYPES)]).await;
    assert_eq!(r.status, 200);
    // The client's first layer, which would start the fetches of the others.
    let l = get(&proxy.url(&format!("/v2/library/app/blobs/{}", layer_digests[0]))).await;
    assert!(l.bytes().as_ref() == layers[0].as_slice());
    wait_until(|| proxy.proxy.fills_in_flight() == 0).await;
    assert_eq!(
        up.count("GET", "/blobs/"),
        1,
        "only the client's own blob request reaches the upstream"
    );
    assert_eq!(proxy.metric("regcache_layers_ahead_total"), 0.0);
}

/// An image that would take more than a quarter of the cache is not fetched ahead (it would
/// evict more than it saves), and without `layers_ahead` nothing is: in both, only what the
/// client asks for reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_images_and_a_cache_without_layers_ahead_leave_the_blobs_to_their_clients() {
    let up = FakeUpstream::start().await;
    let config = random_bytes(200, 71);
    let layer = random_bytes(1 << 20, 72);
    let (config_digest, layer_digest) = (up.add_blob(&config), up.add_blob(&layer));
    let manifest = image_of((&config_digest, config.len()), &[(&layer_digest, layer.len())]);
    up.add_manifest("library/big", "1", DOCKER_V2, &manifest);
    up.add_manifest("library/off", "1", DOCKER_V2, &manifest);
    let upstreams = upstream_toml("docker.io", &up.url(), true, "5m");
    let (small_dir, off_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let small = TestProxy::start_with(small_dir.path(), "max_size = \"3MiB\"\nlayers_ahead = 4", &upstreams).await;
    let off = TestProxy::start(off_dir.path(), "1GiB", &upstreams).await;
    for (proxy, repo) in [(&small, "library/big"), (&off, "library/off")] {
        let before = up.count("GET", "/blobs/");
        let r = get_with(&proxy.url(&format!("/v2/{repo}/manifests/1")), &[("accept", ALL_TYPES)]).await;
        assert_eq!(r.status, 200);
        // The client's first layer, which would start the fetch of the config.
        let l = get(&proxy.url(&format!("/v2/{repo}/blobs/{layer_digest}"))).await;
        assert!(l.bytes().as_ref() == layer.as_slice());
        wait_until(|| proxy.proxy.fills_in_flight() == 0).await;
        assert_eq!(
            up.count("GET", "/blobs/") - before,
            1,
            "{repo}: only the layer, which the client asked for"
        );
        assert_eq!(proxy.metric("regcache_layers_ahead_total"), 0.0);
    }
}
