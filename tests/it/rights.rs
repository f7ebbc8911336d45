//! Shared content, unshared rights: the store is content-addressed, but a client allowed
//! only some repositories must never get another repository's content by asking for its
//! digest (cached hit, HEAD size, manifest by digest, or a fill in flight). And a client
//! that joins someone else's fill must not inherit that fill's failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt;

use crate::fake_upstream::{basic, FakeUpstream, Fault};
use crate::harness::{behind, get, get_with, open, random_bytes, request, sha256, upstream_toml, TestProxy};

const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Anonymous clients may pull `docker.io/library/*`; user `acme` (password `pw`) may pull
/// `docker.io/acme/*`.
async fn restricted(up: &FakeUpstream, dir: &std::path::Path) -> TestProxy {
    let hash = bcrypt::hash("pw", 4).unwrap();
    let auth = format!(
        "[auth]\nanonymous = true\nanonymous_allow = [\"docker.io/library/*\"]\n\
         [[auth.user]]\nname = \"acme\"\npassword_hash = \"{hash}\"\nallow = [\"docker.io/acme/*\"]\n"
    );
    behind(up, dir, &auth).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_private_content_is_not_served_under_an_allowed_repository() {
    let up = FakeUpstream::start().await;
    let layer = random_bytes(300 << 10, 80);
    let private = up.add_blob_in("acme/app", &layer);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_V2}","config":{{"mediaType":"application/octet-stream","size":1,"digest":"{private}"}},"layers":[]}}"#
    );
    let manifest_digest = up.add_manifest("acme/app", "1", DOCKER_V2, manifest.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    let proxy = restricted(&up, dir.path()).await;
    let acme = basic("acme", "pw");
    let auth = [("authorization", acme.as_str())];

    // The owner pulls: now the layer and the manifest are cached.
    let r = get_with(&proxy.url("/v2/acme/app/manifests/1"), &auth).await;
    assert_eq!(r.status, 200);
    let r = get_with(&proxy.url(&format!("/v2/acme/app/blobs/{private}")), &auth).await;
    assert_eq!(sha256(r.bytes()), private);
    let blob_gets = up.count("GET", "/blobs/");

    // An anonymous client allowed library/* asks for the same digests under library/alpine.
    let r = get(&proxy.url(&format!("/v2/library/alpine/blobs/{private}"))).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (404, "BLOB_UNKNOWN"));
    let r = request(
        Method::HEAD,
        &proxy.url(&format!("/v2/library/alpine/blobs/{private}")),
        &[],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_ne!(r.header("content-length"), Some(layer.len().to_string().as_str()));
    let r = get(&proxy.url(&format!("/v2/library/alpine/manifests/{manifest_digest}"))).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (404, "MANIFEST_UNKNOWN"));
    // Each was checked with the upstream under the asker's own repository, never served.
    assert!(up.count("HEAD", &format!("/v2/library/alpine/blobs/{private}")) >= 1);
    assert_eq!(
        up.count("GET", "/blobs/"),
        blob_gets,
        "no byte fetched for the refused client"
    );
    assert!(proxy.metric("regcache_access_confirmations_total{result=\"refused\"}") >= 3.0);

    // The owner still gets a warm hit with no upstream request.
    let before = up.total_requests();
    let r = get_with(&proxy.url(&format!("/v2/acme/app/blobs/{private}")), &auth).await;
    assert_eq!(sha256(r.bytes()), private);
    assert_eq!(up.total_requests(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_blob_cached_under_one_repository_is_confirmed_once_for_another() {
    let up = FakeUpstream::start().await;
    let data = random_bytes(200 << 10, 81);
    let digest = up.add_blob(&data); // present in every repository
    let dir = tempfile::tempdir().unwrap();
    let proxy = restricted(&up, dir.path()).await;
    assert_eq!(
        sha256(
            get(&proxy.url(&format!("/v2/library/alpine/blobs/{digest}")))
                .await
                .bytes()
        ),
        digest
    );
    assert_eq!(up.count("GET", "/blobs/"), 1);

    let other = proxy.url(&format!("/v2/library/busybox/blobs/{digest}"));
    assert_eq!(sha256(get(&other).await.bytes()), digest);
    assert_eq!(
        up.count("HEAD", "/v2/library/busybox/blobs/"),
        1,
        "confirmed with one HEAD"
    );
    assert_eq!(up.count("GET", "/blobs/"), 1, "and served from the cache");
    // Recorded: the next request needs no HEAD.
    assert_eq!(sha256(get(&other).await.bytes()), digest);
    assert_eq!(up.count("HEAD", "/v2/library/busybox/blobs/"), 1);
    assert_eq!(
        proxy.metric("regcache_access_confirmations_total{result=\"confirmed\"}"),
        1.0
    );

    // The association survives a restart (it is persisted), so still no HEAD.
    proxy.stop().await;
    let proxy = restricted(&up, dir.path()).await;
    let other = proxy.url(&format!("/v2/library/busybox/blobs/{digest}"));
    assert_eq!(sha256(get(&other).await.bytes()), digest);
    assert_eq!(up.count("HEAD", "/v2/library/busybox/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_a_private_fill_in_flight_is_refused() {
    let up = FakeUpstream::start().await;
    let layer = random_bytes(1 << 20, 82);
    let private = up.add_blob_in("acme/app", &layer);
    let gate = Arc::new(tokio::sync::Notify::new());
    up.fault(&private, [Fault::Gate(256 << 10, gate.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = restricted(&up, dir.path()).await;
    let acme = basic("acme", "pw");

    let owner = open(
        Method::GET,
        &proxy.url(&format!("/v2/acme/app/blobs/{private}")),
        &[("authorization", acme.as_str())],
    )
    .await;
    assert_eq!(owner.status(), 200);
    assert_eq!(proxy.proxy.fills_in_flight(), 1);

    let r = get(&proxy.url(&format!("/v2/library/alpine/blobs/{private}"))).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (404, "BLOB_UNKNOWN"));
    assert_eq!(
        proxy.metric("regcache_cache_lookups_total{kind=\"blob\",result=\"coalesced\"}"),
        0.0
    );

    gate.notify_one();
    let body = owner
        .into_body()
        .collect()
        .await
        .expect("the owner's download completes");
    assert_eq!(sha256(&body.to_bytes()), private);
    assert_eq!(up.count("GET", "/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_retries_under_its_own_target_when_the_leaders_fill_fails() {
    // An open mirror: anyone may join any fill. The leader asks under a repository that
    // does not hold the blob (404 upstream); the joiner asks under the right one.
    let up = FakeUpstream::start().await;
    let data = random_bytes(512 << 10, 83);
    let digest = up.add_blob_in("library/good", &data);
    let hold = Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Hold(hold.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(dir.path(), "1GiB", &upstream_toml("docker.io", &up.url(), true, "5m")).await;
    let leader_url = proxy.url(&format!("/v2/library/bad/blobs/{digest}"));
    let leader = tokio::spawn(async move { get(&leader_url).await });
    // The leader's fill is waiting on the held upstream answer.
    let started = Instant::now();
    while up.count("GET", "/v2/library/bad/blobs/") == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the leader never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let joiner_url = proxy.url(&format!("/v2/library/good/blobs/{digest}"));
    let joiner = tokio::spawn(async move { get(&joiner_url).await });
    let started = Instant::now();
    while proxy.metric("regcache_cache_lookups_total{kind=\"blob\",result=\"coalesced\"}") < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the joiner never joined");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    hold.notify_one();
    let leader = leader.await.unwrap();
    assert_eq!(
        (leader.status.as_u16(), leader.error_code().as_str()),
        (404, "BLOB_UNKNOWN")
    );
    let joiner = joiner.await.unwrap();
    assert_eq!(joiner.status, 200);
    assert_eq!(sha256(joiner.bytes()), digest);
    assert_eq!(up.count("GET", "/v2/library/good/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_tls_load_balancer_the_token_realm_is_the_public_url() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    let auth = format!("[auth]\n[[auth.user]]\nname = \"u\"\npassword_hash = \"{hash}\"\n");
    let proxy = TestProxy::start_sections(
        dir.path(),
        "public_url = \"https://mirror.example.com/\"",
        "max_size = \"1GiB\"",
        &auth,
        &upstream_toml("docker.io", &up.url(), true, "5m"),
    )
    .await;
    // The load balancer speaks plain HTTP to regcache and forwards the Host header.
    let r = get_with(&proxy.url("/v2/"), &[("host", "mirror.example.com")]).await;
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap();
    assert!(
        challenge.starts_with("Bearer realm=\"https://mirror.example.com/token\""),
        "{challenge}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_count_only_from_a_trusted_proxy() {
    let up = FakeUpstream::start().await;
    let hash = bcrypt::hash("pw", 4).unwrap();
    let auth = format!("[auth]\n[[auth.user]]\nname = \"u\"\npassword_hash = \"{hash}\"\n");
    let forwarded = [
        ("host", "10.1.2.3:5000"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "mirror.example.com"),
    ];
    let realm_of = |r: &crate::harness::Reply| r.header("www-authenticate").unwrap().to_owned();
    for (trusted, expected) in [
        ("[\"127.0.0.0/8\"]", "Bearer realm=\"https://mirror.example.com/token\""),
        // The test client is not in this list: its forwarded headers are ignored.
        ("[\"10.0.0.0/8\"]", "Bearer realm=\"http://10.1.2.3:5000/token\""),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let proxy = TestProxy::start_sections(
            dir.path(),
            &format!("trusted_proxies = {trusted}"),
            "max_size = \"1GiB\"",
            &auth,
            &upstream_toml("docker.io", &up.url(), true, "5m"),
        )
        .await;
        let r = get_with(&proxy.url("/v2/"), &forwarded).await;
        assert_eq!(r.status, 401);
        assert!(realm_of(&r).starts_with(expected), "{trusted}: {}", realm_of(&r));

        // The same over h2c, where each stream is a task of its own (the connection it came
        // on travels differently than for HTTP/1.1).
        let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let mut req = http::Request::get(proxy.url("/v2/"))
            .body(http_body_util::Empty::new())
            .unwrap();
        for (name, value) in &forwarded[1..] {
            req.headers_mut().insert(*name, value.parse().unwrap());
        }
        let resp = tokio::time::timeout(crate::harness::HANG, h2.request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((resp.version(), resp.status().as_u16()), (http::Version::HTTP_2, 401));
        let realm = resp.headers()["www-authenticate"].to_str().unwrap();
        let expected = expected.replace("10.1.2.3:5000", &proxy.url("").replace("http://", ""));
        assert!(realm.starts_with(&expected), "h2c, {trusted}: {realm}");
    }
}
