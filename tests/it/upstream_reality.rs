//! Real upstream behaviour against the fake: token auth (anonymous, with credentials,
//! expiry, herds, foreign realms), Basic-only registries, rate limits and 429, stale answers,
//! the circuit breaker, offline mode, redirects and the referrers API.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::fake_upstream::{AuthMode, FakeUpstream, Fault};
use crate::harness::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#;

fn upstream_with(name: &str, url: &str, extra: &str) -> String {
    format!("{}{extra}\n", upstream_toml(name, url, true, "5m"))
}

fn token_requests(up: &FakeUpstream) -> Vec<crate::fake_upstream::Seen> {
    up.seen().into_iter().filter(|s| s.path == "/token").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_token_flow_with_one_token_per_scope() {
    let up = FakeUpstream::start().await;
    up.require_auth(AuthMode::Token {
        realm: format!("{}/token", up.url()),
    });
    up.serve_tokens(None, Some(300));
    up.add_manifest("library/app", "1", OCI_MANIFEST, MANIFEST);
    up.add_manifest("library/app", "2", OCI_MANIFEST, MANIFEST);
    let blob = up.add_blob(b"layer bytes");
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(dir.path(), "1GiB", &upstream_toml("docker.io", &up.url(), true, "5m")).await;

    assert_eq!(get(&proxy.url("/v2/library/app/manifests/1")).await.status, 200);
    assert_eq!(get(&proxy.url("/v2/library/app/manifests/2")).await.status, 200);
    let b = get(&proxy.url(&format!("/v2/library/app/blobs/{blob}"))).await;
    assert_eq!(b.bytes().as_ref(), b"layer bytes");
    let tokens = token_requests(&up);
    assert_eq!(tokens.len(), 1, "one token serves every request of the scope");
    assert!(tokens[0].headers.get("authorization").is_none(), "anonymous");
    let query = tokens[0].query.clone().unwrap_or_default();
    assert!(query.contains("service=fake-registry"), "{query}");
    assert!(query.contains("scope=repository%3Alibrary%2Fapp%3Apull"), "{query}");
    assert_eq!(up.count("GET", "/manifests/"), 3, "one 401, then two with the token");
    assert_eq!(
        proxy.metric("regcache_upstream_tokens_fetched_total{upstream=\"docker.io\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_reach_the_token_service_and_expired_tokens_refresh_once() {
    let up = FakeUpstream::start().await;
    up.require_auth(AuthMode::Token {
        realm: format!("{}/token", up.url()),
    });
    up.serve_tokens(Some(("bob".into(), "s3cret".into())), None);
    up.add_manifest("team/app", "1", OCI_MANIFEST, MANIFEST);
    let dir = tempfile::tempdir().unwrap();
    let good = upstream_with("docker.io", &up.url(), "username = \"bob\"\npassword = \"s3cret\"");
    let proxy = TestProxy::start(dir.path(), "1GiB", &good).await;
    let url = proxy.url("/v2/team/app/manifests/1");
    assert_eq!(get(&url).await.status, 200);
    let tokens = token_requests(&up);
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].headers["authorization"], "Basic Ym9iOnMzY3JldA==");

    // The token dies upstream: one 401, one new token, and the answer.
    up.expire_tokens();
    let digest_url = proxy.url(&format!("/v2/team/app/manifests/{}", sha256(b"other")));
    up.add_manifest("team/app", &sha256(b"other"), OCI_MANIFEST, b"other");
    assert_eq!(get(&digest_url).await.status, 200);
    assert_eq!(token_requests(&up).len(), 2);
    proxy.stop().await;

    // Wrong credentials: the client is told, and no secret leaks into the answer.
    let dir2 = tempfile::tempdir().unwrap();
    let bad = upstream_with("docker.io", &up.url(), "username = \"bob\"\npassword = \"wrong-pass\"");
    let proxy = TestProxy::start(dir2.path(), "1GiB", &bad).await;
    let r = get(&proxy.url("/v2/team/app/manifests/1")).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (401, "UNAUTHORIZED"));
    assert!(!String::from_utf8_lossy(r.bytes()).contains("wrong-pass"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_of_cold_requests_makes_one_token_request() {
    let up = FakeUpstream::start().await;
    up.require_auth(AuthMode::Token {
        realm: format!("{}/token", up.url()),
    });
    up.serve_tokens(None, Some(300));
    let blobs: Vec<String> = (0..16).map(|i| up.add_blob(&random_bytes(10_000, 100 + i))).collect();
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(dir.path(), "1GiB", &upstream_toml("docker.io", &up.url(), true, "5m")).await;
    let mut tasks = Vec::new();
    for b in &blobs {
        let url = proxy.url(&format!("/v2/library/herd/blobs/{b}"));
        tasks.push(tokio::spawn(async move { get(&url).await }));
    }
    for (t, digest) in tasks.into_iter().zip(&blobs) {
        let r = t.await.unwrap();
        assert_eq!(&sha256(r.bytes()), digest);
    }
    assert_eq!(token_requests(&up).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_go_to_a_foreign_realm_unless_trusted() {
    let registry = FakeUpstream::start().await;
    let auth_server = FakeUpstream::start().await;
    // "localhost" is another registrable domain than the registry's "127.0.0.1".
    let realm = format!("http://localhost:{}/token", auth_server.addr.port());
    registry.require_auth(AuthMode::Token { realm: realm.clone() });
    auth_server.serve_tokens(None, Some(300));
    // The registry honours the tokens the auth server issues: share them by issuing on both.
    registry.add_manifest("library/app", "1", OCI_MANIFEST, MANIFEST);
    let creds = "username = \"bob\"\npassword = \"s3cret\"";

    for (trusted, expect_auth) in [("", false), ("trusted_realms = [\"localhost\"]", true)] {
        let dir = tempfile::tempdir().unwrap();
        let before = token_requests(&auth_server).len();
        let cfg = upstream_with("docker.io", &registry.url(), &format!("{creds}\n{trusted}"));
        let proxy = TestProxy::start(dir.path(), "1GiB", &cfg).await;
        // The registry does not know the auth server's tokens, so the pull fails after the
        // token request; what matters here is what reached the realm.
        let _ = get(&proxy.url("/v2/library/app/manifests/1")).await;
        let seen = token_requests(&auth_server);
        assert_eq!(seen.len(), before + 1);
        assert_eq!(
            seen[before].headers.contains_key("authorization"),
            expect_auth,
            "trusted={trusted:?}"
        );
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_only_registries_get_basic_credentials_up_front_after_one_challenge() {
    let up = FakeUpstream::start().await;
    up.require_auth(AuthMode::Basic("amy".into(), "pw".into()));
    up.add_manifest("lab/app", "1", OCI_MANIFEST, MANIFEST);
    let blob = up.add_blob(b"basic blob");
    let dir = tempfile::tempdir().unwrap();
    let cfg = upstream_with("docker.io", &up.url(), "username = \"amy\"\npassword = \"pw\"");
    let proxy = TestProxy::start(dir.path(), "1GiB", &cfg).await;
    assert_eq!(get(&proxy.url("/v2/lab/app/manifests/1")).await.status, 200);
    assert_eq!(
        get(&proxy.url(&format!("/v2/lab/app/blobs/{blob}")))
            .await
            .bytes()
            .as_ref(),
        b"basic blob"
    );
    let without_auth = up
        .seen()
        .iter()
        .filter(|s| !s.headers.contains_key("authorization"))
        .count();
    assert_eq!(without_auth, 1, "only the first request was challenged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_metrics_and_429_is_passed_on_and_honoured() {
    let up = FakeUpstream::start().await;
    up.set_ratelimit(100, 76);
    up.add_manifest("library/app", "1", OCI_MANIFEST, MANIFEST);
    let blob = up.add_blob(b"limited");
    let other = up.add_blob(b"other");
    up.fault(&blob, [Fault::Status(429)]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(dir.path(), "1GiB", &upstream_toml("docker.io", &up.url(), true, "0s")).await;
    assert_eq!(get(&proxy.url("/v2/library/app/manifests/1")).await.status, 200);
    assert_eq!(
        proxy.metric("regcache_upstream_ratelimit_limit{upstream=\"docker.io\"}"),
        100.0
    );
    assert_eq!(
        proxy.metric("regcache_upstream_ratelimit_remaining{upstream=\"docker.io\"}"),
        76.0
    );

    let r = get(&proxy.url(&format!("/v2/library/app/blobs/{blob}"))).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (429, "TOOMANYREQUESTS"));
    assert_eq!(r.header("retry-after"), Some("30"));
    // Within Retry-After blob downloads are left alone: one fails fast with 429 …
    let before = up.total_requests();
    let r = get(&proxy.url(&format!("/v2/library/app/blobs/{other}"))).await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    assert_eq!(up.total_requests(), before);
    // … but only blob downloads: a tag still revalidates with its (free) HEAD.
    let m = get(&proxy.url("/v2/library/app/manifests/1")).await;
    assert_eq!(m.status, 200);
    assert_eq!(m.header("x-regcache-stale"), None);
    assert_eq!(up.total_requests(), before + 1);
}

/// A TCP listener that accepts connections and never answers.
async fn black_hole(addr: &str) -> (std::net::SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let local = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (local, accepted, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_serves_cache_without_waiting_and_closes_when_the_upstream_returns() {
    let up = FakeUpstream::start().await;
    up.add_manifest("library/app", "1", OCI_MANIFEST, MANIFEST);
    let dir = tempfile::tempdir().unwrap();
    let warm = TestProxy::start(dir.path(), "1GiB", &upstream_toml("docker.io", &up.url(), true, "0s")).await;
    assert_eq!(get(&warm.url("/v2/library/app/manifests/1")).await.status, 200);
    warm.stop().await;
    drop(up);

    let (hole, accepted, hole_task) = black_hole("127.0.0.1:0").await;
    let cfg = format!(
        "{}response_timeout = \"300ms\"\ncircuit_failures = 2\ncircuit_cooldown = \"100ms\"\n",
        upstream_toml("docker.io", &format!("http://{hole}"), true, "0s")
    );
    let proxy = TestProxy::start(dir.path(), "1GiB", &cfg).await;
    let tag = proxy.url("/v2/library/app/manifests/1");
    for _ in 0..2 {
        let r = get(&tag).await;
        assert_eq!((r.status.as_u16(), r.header("x-regcache-stale")), (200, Some("1")));
    }
    assert_eq!(
        proxy.metric("regcache_upstream_circuit_open{upstream=\"docker.io\"}"),
        1.0
    );
    let dialled = accepted.load(Ordering::SeqCst);
    let r = get(&tag).await;
    assert_eq!((r.status.as_u16(), r.header("x-regcache-stale")), (200, Some("1")));
    let uncached = get(&proxy.url("/v2/library/app/manifests/2")).await;
    assert_eq!(
        (uncached.status.as_u16(), uncached.error_code().as_str()),
        (503, "UNAVAILABLE")
    );
    let blob = get(&proxy.url(&format!("/v2/library/app/blobs/{}", sha256(b"x")))).await;
    assert_eq!(blob.status, 503);
    assert!(
        accepted.load(Ordering::SeqCst) <= dialled + 1,
        "requests while the circuit is open do not dial (only the probe may)"
    );
    assert!(proxy.metric("regcache_cache_lookups_total{kind=\"tag\",result=\"stale\"}") >= 3.0);

    // The upstream comes back at the same address: the probe closes the circuit.
    hole_task.abort();
    let _ = hole_task.await;
    let back = FakeUpstream::start_on(&hole.to_string()).await;
    back.add_manifest("library/app", "1", OCI_MANIFEST, MANIFEST);
    let mut closed = false;
    for _ in 0..200 {
        if proxy.metric("regcache_upstream_circuit_open{upstream=\"docker.io\"}") == 0.0 {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(closed, "the probe closed the circuit");
    let fresh = get(&tag).await;
    assert_eq!((fresh.status.as_u16(), fresh.header("x-regcache-stale")), (200, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_serves_the_cache_and_never_dials() {
    let up = FakeUpstream::start().await;
    let blob_data = random_bytes(50_000, 200);
    let blob = up.add_blob(&blob_data);
    up.add_manifest("library/app", "1", OCI_MANIFEST, MANIFEST);
    let dir = tempfile::tempdir().unwrap();
    let online = upstream_toml("docker.io", &up.url(), true, "0s");
    let warm = TestProxy::start(dir.path(), "1GiB", &online).await;
    assert_eq!(get(&warm.url("/v2/library/app/manifests/1")).await.status, 200);
    assert_eq!(
        get(&warm.url(&format!("/v2/library/app/blobs/{blob}"))).await.status,
        200
    );
    warm.stop().await;
    let seen = up.total_requests();

    for (cache_keys, upstream) in [
        ("offline = true", online.clone()),
        ("", format!("{online}offline = true\n")),
    ] {
        let proxy = TestProxy::start_with(dir.path(), cache_keys, &upstream).await;
        let m = get(&proxy.url("/v2/library/app/manifests/1")).await;
        assert_eq!(m.status, 200, "tag served regardless of its TTL");
        assert_eq!(m.bytes().as_ref(), MANIFEST);
        assert_eq!(m.header("x-regcache-stale"), None);
        let b = get(&proxy.url(&format!("/v2/library/app/blobs/{blob}"))).await;
        assert_eq!(b.bytes().as_ref(), blob_data.as_slice());
        let miss = get(&proxy.url("/v2/library/app/manifests/2")).await;
        assert_eq!((miss.status.as_u16(), miss.error_code().as_str()), (503, "UNAVAILABLE"));
        proxy.stop().await;
    }
    assert_eq!(up.total_requests(), seen, "offline never contacts the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_stale_bounds_how_old_a_stale_answer_may_be() {
    let up = FakeUpstream::start().await;
    up.add_manifest("library/app", "1", OCI_MANIFEST, MANIFEST);
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}max_stale = \"0s\"\n",
        upstream_toml("docker.io", &up.url(), true, "0s")
    );
    let proxy = TestProxy::start(dir.path(), "1GiB", &cfg).await;
    assert_eq!(get(&proxy.url("/v2/library/app/manifests/1")).await.status, 200);
    drop(up);
    let r = get(&proxy.url("/v2/library/app/manifests/1")).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (502, "UNAVAILABLE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_blobs_get_no_authorization_and_the_target_is_not_cached() {
    let registry = FakeUpstream::start().await;
    let cdn = FakeUpstream::start().await;
    registry.require_auth(AuthMode::Basic("amy".into(), "pw".into()));
    let data = random_bytes(300_000, 201);
    let digest = registry.add_blob(&data);
    cdn.add_blob(&data);
    registry.redirect_blobs_to(&cdn.url());
    let dir = tempfile::tempdir().unwrap();
    let cfg = upstream_with("docker.io", &registry.url(), "username = \"amy\"\npassword = \"pw\"");
    let proxy = TestProxy::start(dir.path(), "1GiB", &cfg).await;
    let url = proxy.url(&format!("/v2/library/app/blobs/{digest}"));
    assert_eq!(get(&url).await.bytes().as_ref(), data.as_slice());
    let at_cdn = cdn.seen();
    assert_eq!(at_cdn.len(), 1);
    assert!(
        at_cdn[0].headers.get("authorization").is_none(),
        "credentials stayed home"
    );
    assert!(registry
        .seen()
        .iter()
        .any(|s| s.path.contains("/blobs/") && s.headers.contains_key("authorization")));
    // Served from the cache from now on: neither host is asked again.
    let (r_before, c_before) = (registry.total_requests(), cdn.total_requests());
    assert_eq!(get(&url).await.bytes().as_ref(), data.as_slice());
    assert_eq!((registry.total_requests(), cdn.total_requests()), (r_before, c_before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_from_the_api_and_from_the_tag_schema() {
    let subject = sha256(MANIFEST);
    let sig = serde_json::json!({"mediaType": OCI_MANIFEST, "digest": sha256(b"sig"), "size": 3, "artifactType": "application/vnd.example.sig"});
    let sbom = serde_json::json!({"mediaType": OCI_MANIFEST, "digest": sha256(b"sbom"), "size": 4, "artifactType": "application/spdx+json"});

    // An upstream with the referrers API.
    let up = FakeUpstream::start().await;
    up.add_referrer("library/app", &subject, sig.clone());
    up.add_referrer("library/app", &subject, sbom.clone());
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(dir.path(), "1GiB", &upstream_toml("docker.io", &up.url(), true, "5m")).await;
    let url = proxy.url(&format!("/v2/library/app/referrers/{subject}"));
    let all = get(&url).await;
    assert_eq!(all.status, 200);
    assert_eq!(
        all.header("content-type"),
        Some("application/vnd.oci.image.index.v1+json")
    );
    assert_eq!(all.json()["manifests"].as_array().unwrap().len(), 2);
    assert_eq!(all.header("oci-filters-applied"), None);
    let filtered = get(&format!("{url}?artifactType=application/vnd.example.sig")).await;
    assert_eq!(filtered.header("oci-filters-applied"), Some("artifactType"));
    assert_eq!(filtered.json()["manifests"], serde_json::json!([sig.clone()]));
    let before = up.total_requests();
    assert_eq!(get(&url).await.json()["manifests"].as_array().unwrap().len(), 2);
    assert_eq!(up.total_requests(), before, "cached within tag_ttl");
    // Arbitrary artifact types are filtered from the one cached answer: no upstream
    // request, no new record or manifest on disk per type. (The first answer's record is
    // written in the background: counted once it is there, and any new one would be too.)
    let writer = proxy.proxy.clone();
    wait_until(|| writer.work_in_flight() == 0).await;
    let on_disk = files_under(dir.path()).len();
    for i in 0..20 {
        let r = get(&format!("{url}?artifactType=application/x-random-{i}")).await;
        assert_eq!(r.json()["manifests"], serde_json::json!([]));
        assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    }
    wait_until(|| writer.work_in_flight() == 0).await;
    assert_eq!(up.total_requests(), before);
    assert_eq!(files_under(dir.path()).len(), on_disk);

    // An upstream without it (404): the sha256-<hex> tag, filtered by regcache.
    let old = FakeUpstream::start().await;
    let tag_index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [sig.clone(), sbom]});
    let tag = format!("sha256-{}", subject.trim_start_matches("sha256:"));
    old.add_manifest(
        "library/app",
        &tag,
        "application/vnd.oci.image.index.v1+json",
        tag_index.to_string().as_bytes(),
    );
    let dir2 = tempfile::tempdir().unwrap();
    let proxy2 = TestProxy::start(dir2.path(), "1GiB", &upstream_toml("docker.io", &old.url(), true, "5m")).await;
    let url2 = proxy2.url(&format!("/v2/library/app/referrers/{subject}"));
    assert_eq!(get(&url2).await.json()["manifests"].as_array().unwrap().len(), 2);
    let f = get(&format!("{url2}?artifactType=application/vnd.example.sig")).await;
    assert_eq!(f.header("oci-filters-applied"), Some("artifactType"));
    assert_eq!(f.json()["manifests"], serde_json::json!([sig]));
    // Nothing at all: an empty index, not a 404.
    let none = get(&proxy2.url(&format!("/v2/library/app/referrers/{}", sha256(b"lonely")))).await;
    assert_eq!(none.status, 200);
    assert_eq!(none.json()["manifests"], serde_json::json!([]));
}
