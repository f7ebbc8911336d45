//! Operating regcache: exact metrics, the admin endpoints, TLS (h2, skopeo, certificate
//! reload), client access control, limits that hold while others are served, and the
//! graceful drain on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use http::Method;
use http_body_util::{BodyExt, Empty};

use crate::fake_upstream::{FakeUpstream, Fault};
use crate::harness::*;
use crate::peers::skopeo_copy;

const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A 3-layer image on the fake upstream; returns (manifest digest, layer digests, sizes).
fn image(up: &FakeUpstream, repo: &str, tag: &str) -> (String, Vec<String>, u64) {
    let layers: Vec<Vec<u8>> = (0..3)
        .map(|i| random_bytes(100_000 * (i + 1), 300 + i as u64))
        .collect();
    let digests: Vec<String> = layers.iter().map(|l| up.add_blob(l)).collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": DOCKER_V2,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": layers[0].len(), "digest": digests[0]},
        "layers": digests.iter().zip(&layers).map(|(d, l)| serde_json::json!({"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": l.len(), "digest": d})).collect::<Vec<_>>(),
    });
    let digest = up.add_manifest(repo, tag, DOCKER_V2, manifest.to_string().as_bytes());
    (digest, digests, layers.iter().map(|l| l.len() as u64).sum())
}

async fn pull(proxy: &TestProxy, repo: &str, tag: &str, layers: &[String]) {
    assert_eq!(
        get(&proxy.url(&format!("/v2/{repo}/manifests/{tag}"))).await.status,
        200
    );
    for l in layers {
        let r = get(&proxy.url(&format!("/v2/{repo}/blobs/{l}"))).await;
        assert_eq!(&sha256(r.bytes()), l);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_cold_then_warm_pull_exactly() {
    let up = FakeUpstream::start().await;
    let (_, layers, bytes) = image(&up, "library/app", "1");
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(dir.path(), "1GiB", &upstream_toml("docker.io", &up.url(), true, "5m")).await;
    pull(&proxy, "library/app", "1", &layers).await;
    pull(&proxy, "library/app", "1", &layers).await;

    let m = |s: &str| proxy.metric(s);
    assert_eq!(m(r#"regcache_cache_lookups_total{kind="tag",result="miss"}"#), 1.0);
    assert_eq!(m(r#"regcache_cache_lookups_total{kind="tag",result="hit"}"#), 1.0);
    assert_eq!(m(r#"regcache_cache_lookups_total{kind="blob",result="miss"}"#), 3.0);
    assert_eq!(m(r#"regcache_cache_lookups_total{kind="blob",result="hit"}"#), 3.0);
    assert_eq!(m(r#"regcache_bytes_served_total{source="fill"}"#), bytes as f64);
    assert_eq!(m(r#"regcache_bytes_served_total{source="cache"}"#), bytes as f64);
    assert_eq!(m(r#"regcache_fills_total{result="committed"}"#), 3.0);
    assert_eq!(m("regcache_fills_in_flight"), 0.0);
    assert_eq!(
        m(r#"regcache_upstream_requests_total{method="GET",status="200",upstream="docker.io"}"#),
        4.0
    );
    assert_eq!(
        m(r#"regcache_upstream_bytes_total{upstream="docker.io"}"#),
        bytes as f64
    );
    assert_eq!(
        m(r#"regcache_http_requests_total{method="GET",route="blob",status="200"}"#),
        6.0
    );
    assert_eq!(
        m(r#"regcache_http_requests_total{method="GET",route="manifest",status="200"}"#),
        2.0
    );
    assert_eq!(m("regcache_cache_entries"), 4.0, "3 blobs and a manifest");
    assert!(m("regcache_cache_size_bytes") >= bytes as f64);
    assert_eq!(m("regcache_cache_budget_bytes"), (1u64 << 30) as f64);
    assert_eq!(up.count("GET", "/blobs/"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_liveness_readiness_and_metrics() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let loaded = regcache::admin::Loaded::default();
    let _stop = regcache::start_admin(listener, loaded.clone());
    let url = |p: &str| format!("http://{addr}{p}");
    assert_eq!(get(&url("/healthz")).await.status, 200);
    assert_eq!(
        get(&url("/readyz")).await.status,
        503,
        "not ready before the index is loaded"
    );

    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(dir.path(), "1GiB", "").await;
    let _ = loaded.set(proxy.proxy.clone());
    assert_eq!(get(&url("/readyz")).await.status, 200);
    let metrics = get(&url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(metrics.bytes().to_vec()).unwrap();
    assert!(text.contains("regcache_cache_budget_bytes 1073741824"), "{text}");
    assert_eq!(get(&url("/nope")).await.status, 404);
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI.
/// Returns (certificate chain file, key file, CA file).
fn make_cert(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let (ca, ca_key) = (format!("{name}-ca.crt"), format!("{name}-ca.key"));
    let (leaf, key, csr, ext) = (
        format!("{name}-leaf.crt"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    let subject = format!("/CN={name} test CA");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend(["-days", "2", "-subj", &subject, "-keyout", &ca_key, "-out", &ca]);
    openssl(&args, dir);
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-subj", "/CN=127.0.0.1", "-keyout", &key, "-out", &csr]);
    openssl(&args, dir);
    std::fs::write(
        dir.join(&ext),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &leaf,
        ],
        dir,
    );
    // The served file holds the chain: leaf, then CA.
    let chain = dir.join(format!("{name}.crt"));
    let mut pem = std::fs::read(dir.join(&leaf)).unwrap();
    pem.extend(std::fs::read(dir.join(&ca)).unwrap());
    std::fs::write(&chain, pem).unwrap();
    (chain, dir.join(key), dir.join(ca))
}

/// An h2-only TLS client trusting exactly `ca`.
fn tls_client(
    ca: &Path,
) -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<bytes::Bytes>,
> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(regcache::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http2()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build(https)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_h2_to_clients_and_skopeo_and_reloads_its_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, ca) = make_cert(certs.path(), "old");
    let served_cert = certs.path().join("served.crt");
    let served_key = certs.path().join("served.key");
    std::fs::copy(&cert, &served_cert).unwrap();
    std::fs::copy(&key, &served_key).unwrap();
    let up = FakeUpstream::start().await;
    let (digest, layers, _) = image(&up, "library/app", "1");
    let dir = tempfile::tempdir().unwrap();
    let tls = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        served_cert.display(),
        served_key.display()
    );
    let proxy = behind(&up, dir.path(), &tls).await;
    let base = format!("https://127.0.0.1:{}", proxy.addr.port());

    let client = tls_client(&ca);
    let req = http::Request::get(format!("{base}/v2/library/app/blobs/{}", layers[0]))
        .body(Empty::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(sha256(&body), layers[0]);

    // skopeo over TLS, trusting the CA in a cert dir.
    let cert_dir = certs.path().join("skopeo-certs");
    std::fs::create_dir_all(&cert_dir).unwrap();
    std::fs::copy(&ca, cert_dir.join("ca.crt")).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let src = format!("docker://127.0.0.1:{}/library/app:1", proxy.addr.port());
    let cert_dir_arg = cert_dir.display().to_string();
    let out = skopeo_copy(
        &src,
        out_dir.path(),
        &["--src-tls-verify=true", "--src-cert-dir", &cert_dir_arg],
    )
    .await;
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
    let manifest = std::fs::read(out_dir.path().join("manifest.json")).unwrap();
    assert_eq!(sha256(&manifest), digest);

    // A renewed certificate: new connections get it, without a restart.
    let (new_cert, new_key, new_ca) = make_cert(certs.path(), "new");
    std::fs::copy(&new_cert, &served_cert).unwrap();
    std::fs::copy(&new_key, &served_key).unwrap();
    proxy.app.tls.as_ref().unwrap().reload().unwrap();
    let fresh = tls_client(&new_ca)
        .request(http::Request::get(format!("{base}/v2/")).body(Empty::new()).unwrap())
        .await;
    assert_eq!(fresh.unwrap().status(), 200);
    let stale = tls_client(&ca)
        .request(http::Request::get(format!("{base}/v2/")).body(Empty::new()).unwrap())
        .await;
    assert!(stale.is_err(), "the old certificate is no longer served");
}

fn users_section(hash: &str) -> String {
    format!(
        "[auth]\n[[auth.user]]\nname = \"ci\"\npassword_hash = \"{hash}\"\n\
         [[auth.user]]\nname = \"limited\"\npassword_hash = \"{hash}\"\nallow = [\"docker.io/library/public*\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_access_control_with_basic_and_tokens() {
    let up = FakeUpstream::start().await;
    let (digest, _, _) = image(&up, "library/app", "1");
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let proxy = behind(&up, dir.path(), &users_section(&hash)).await;
    let manifest = proxy.url("/v2/library/app/manifests/1");

    // Anonymous: 401 with the challenge clients follow.
    let r = get(&manifest).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (401, "UNAUTHORIZED"));
    let challenge = r.header("www-authenticate").unwrap().to_owned();
    let realm = format!("http://{}/token", proxy.addr);
    assert!(
        challenge.starts_with(&format!("Bearer realm=\"{realm}\"")),
        "{challenge}"
    );
    assert!(challenge.contains("scope=\"repository:library/app:pull\""));
    assert_eq!(get(&proxy.url("/v2/")).await.status, 401, "docker login probes /v2/");

    // Basic, right and wrong.
    let good = "Basic Y2k6czNjcmV0"; // ci:s3cret
    let bad = "Basic Y2k6d3Jvbmc="; // ci:wrong
    assert_eq!(get_with(&manifest, &[("authorization", good)]).await.status, 200);
    assert_eq!(get_with(&manifest, &[("authorization", bad)]).await.status, 401);

    // The token flow.
    assert_eq!(get(&realm).await.status, 401, "no anonymous tokens");
    let t = get_with(
        &format!("{realm}?service=regcache&scope=repository:library/app:pull"),
        &[("authorization", good)],
    )
    .await;
    assert_eq!(t.status, 200);
    let token = t.json()["token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {token}");
    let r = get_with(&manifest, &[("authorization", &bearer)]).await;
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(
        get_with(&manifest, &[("authorization", "Bearer forged.token")])
            .await
            .status,
        401
    );

    // Allow rules: a user limited to other repositories is denied this one.
    let limited = "Basic bGltaXRlZDpzM2NyZXQ="; // limited:s3cret
    let r = get_with(&manifest, &[("authorization", limited)]).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (403, "DENIED"));
    assert_eq!(
        proxy.metric("regcache_auth_failures_total"),
        2.0,
        "the wrong password and the forged token"
    );

    // skopeo with --src-creds goes through the token flow.
    let src = format!("docker://{}/library/app:1", proxy.addr);
    let out_dir = tempfile::tempdir().unwrap();
    let out = skopeo_copy(&src, out_dir.path(), &["--src-creds", "ci:s3cret"]).await;
    assert!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
    let manifest = std::fs::read(out_dir.path().join("manifest.json")).unwrap();
    assert_eq!(sha256(&manifest), digest);
    let fail_dir = tempfile::tempdir().unwrap();
    let fail = skopeo_copy(&src, fail_dir.path(), &["--src-creds", "ci:wrong"]).await;
    assert!(!fail.status.success());
}

/// Reads until the server closes the connection; true if it did.
fn closed_by_server(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off_while_others_are_served() {
    let up = FakeUpstream::start().await;
    let (_, layers, _) = image(&up, "library/app", "1");
    let dir = tempfile::tempdir().unwrap();
    let limits = "[limits]\nheader_read_timeout = \"500ms\"\nmax_connections = 8\n";
    let proxy = behind(&up, dir.path(), limits).await;
    let addr = proxy.addr;

    // A flood of connections that never send a byte, and slowloris ones that never finish
    // their headers: more than max_connections in all.
    let mut idle = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(addr).unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
        }
        idle.push(s);
    }
    // A normal pull still completes.
    pull(&proxy, "library/app", "1", &layers).await;
    // And every stuck connection was closed by the server.
    let closed = tokio::task::spawn_blocking(move || {
        idle.into_iter()
            .filter(|s| closed_by_server(s.try_clone().unwrap()))
            .count()
    })
    .await
    .unwrap();
    assert_eq!(closed, 20);
}

/// A client that drips a request head a byte at a time never finishes it: its time counts
/// from the head's first byte, not its last, and so for the next request on a kept-alive
/// connection as for the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_dripped_byte_by_byte_is_cut_off() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = behind(&up, dir.path(), "[limits]\nheader_read_timeout = \"500ms\"\n").await;
    let addr = proxy.addr;
    let cut = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut answer = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        answer.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line:?}");
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
        let started = std::time::Instant::now();
        while started.elapsed() < HANG {
            std::thread::sleep(std::time::Duration::from_millis(50));
            if s.write_all(b"a").is_err() {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(cut, "a head dripped for {HANG:?} was never cut off");
}

/// An h2 connection carries the client's frames between requests (window updates, pings):
/// they are not taken for a request head that never ends, so a connection quiet for longer
/// than `header_read_timeout` between requests is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_connection_quiet_between_requests_is_kept() {
    let up = FakeUpstream::start().await;
    let digest = up.add_blob(&random_bytes(300_000, 402));
    let dir = tempfile::tempdir().unwrap();
    let proxy = behind(&up, dir.path(), "[limits]\nheader_read_timeout = \"300ms\"\n").await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // The client pings while quiet, as long-lived h2 clients do.
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(std::time::Duration::from_millis(100))
        .keep_alive_while_idle(true)
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(conn);
    for round in 0..3 {
        let url = proxy.url(&format!("/v2/library/x/blobs/{digest}"));
        let req = http::Request::get(url).body(Empty::<bytes::Bytes>::new()).unwrap();
        let resp = tokio::time::timeout(HANG, send.send_request(req))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("request {round} on the same connection: {e}"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(sha256(&body), digest);
        tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    }
    assert!(!connection.is_finished(), "the server closed the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_headers_and_huge_manifests_are_refused() {
    let up = FakeUpstream::start().await;
    let big = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{DOCKER_V2}\",\"layers\":[],\"pad\":\"{}\"}}",
        "x".repeat(20_000)
    );
    up.add_manifest("library/big", "1", DOCKER_V2, big.as_bytes());
    let (_, layers, _) = image(&up, "library/app", "1");
    let dir = tempfile::tempdir().unwrap();
    let limits = "[limits]\nmax_header_bytes = \"8KiB\"\nmax_manifest_size = \"16KiB\"\n";
    let proxy = behind(&up, dir.path(), limits).await;
    let r = get(&proxy.url("/v2/library/big/manifests/1")).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (502, "UNAVAILABLE"));
    assert!(files_under(&dir.path().join("v1/manifests")).is_empty());

    let mut s = TcpStream::connect(proxy.addr).unwrap();
    let huge = format!(
        "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let _ = s.write_all(huge.as_bytes());
    let mut answer = String::new();
    let _ = BufReader::new(&s).read_line(&mut answer);
    assert!(answer.is_empty() || answer.contains(" 431 "), "{answer:?}");
    pull(&proxy, "library/app", "1", &layers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fills_are_bounded() {
    let up = FakeUpstream::start().await;
    let a = up.add_blob(&random_bytes(2 << 20, 400));
    let b = up.add_blob(&random_bytes(100_000, 401));
    let gate = Arc::new(tokio::sync::Notify::new());
    up.fault(&a, [Fault::Gate(1 << 20, gate.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let limits = "[limits]\nmax_concurrent_fills = 1\n";
    let proxy = behind(&up, dir.path(), limits).await;
    let (url_a, url_b) = (
        proxy.url(&format!("/v2/library/x/blobs/{a}")),
        proxy.url(&format!("/v2/library/x/blobs/{b}")),
    );
    // The first fill takes the only slot and hangs at the gate …
    let first = tokio::spawn(async move { get(&url_a).await });
    crate::harness::wait_until(|| up.count("GET", &a) == 1).await;
    // … so the second fill exists but may not talk to the upstream.
    let second = tokio::spawn(async move { get(&url_b).await });
    crate::harness::wait_until(|| proxy.metric("regcache_fills_in_flight") == 2.0).await;
    assert_eq!(up.count("GET", &b), 0);
    gate.notify_one();
    assert_eq!(sha256(first.await.unwrap().bytes()), a);
    assert_eq!(sha256(second.await.unwrap().bytes()), b);
    assert_eq!(up.count("GET", "/blobs/"), 2);
}

/// Polls a condition (bounded: 10 s) for things that happen on other tasks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_download_in_flight_finish_and_exits_cleanly() {
    let up = FakeUpstream::start().await;
    let data = random_bytes(8 << 20, 500);
    let digest = up.add_blob(&data);
    let gate = Arc::new(tokio::sync::Notify::new());
    up.fault(&digest, [Fault::Gate(1 << 20, gate.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Process::start(dir.path(), &up.url(), "shutdown_grace = \"60s\"");
    let url = format!("http://{}/v2/library/x/blobs/{digest}", daemon.addr);
    let resp = open(Method::GET, &url, &[]).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = body.frame().await.unwrap().unwrap().into_data().unwrap().to_vec();

    daemon.signal("TERM");
    // It stops accepting new connections …
    let mut refused = false;
    for _ in 0..200 {
        if TcpStream::connect(&daemon.addr).is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(refused, "no new connections after SIGTERM");
    // … while the download in flight completes.
    gate.notify_one();
    while let Some(frame) = body.frame().await {
        got.extend_from_slice(&frame.expect("the download is not cut").into_data().unwrap());
    }
    assert_eq!(sha256(&got), digest);
    let status = tokio::task::spawn_blocking(move || daemon.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(files_under(&dir.path().join("cache/v1/tmp")).is_empty());
    assert_eq!(files_under(&dir.path().join("cache/v1/blobs")).len(), 1);
}

/// Makes a certificate named `name` in `dir` and copies it to the served (cert, key) files;
/// returns its CA.
fn serve_certificate(dir: &Path, served: &(std::path::PathBuf, std::path::PathBuf), name: &str) -> std::path::PathBuf {
    let (cert, key, ca) = make_cert(dir, name);
    std::fs::copy(&cert, &served.0).unwrap();
    std::fs::copy(&key, &served.1).unwrap();
    ca
}

/// The regcache binary serving TLS from files that a test can replace, as cert-manager or
/// certbot does.
struct TlsDaemon {
    daemon: Process,
    dir: tempfile::TempDir,
    base: String,
    served: (std::path::PathBuf, std::path::PathBuf),
    _up: FakeUpstream,
}

impl TlsDaemon {
    /// Started with a first certificate; returns it and the CA that signed it.
    async fn start() -> (TlsDaemon, std::path::PathBuf) {
        let up = FakeUpstream::start().await;
        let dir = tempfile::tempdir().unwrap();
        let served = (dir.path().join("served.crt"), dir.path().join("served.key"));
        let tls = format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"",
            served.0.display(),
            served.1.display()
        );
        let ca = serve_certificate(dir.path(), &served, "first");
        let daemon = Process::start(dir.path(), &up.url(), &tls);
        let base = format!("https://{}", daemon.addr);
        let me = TlsDaemon {
            daemon,
            dir,
            base,
            served,
            _up: up,
        };
        (me, ca)
    }

    /// Writes a new certificate over the served files; returns its CA.
    fn replace_certificate(&self, name: &str) -> std::path::PathBuf {
        serve_certificate(self.dir.path(), &self.served, name)
    }

    /// Whether a new connection trusting only `ca` gets an answer.
    async fn answers_trusting(&self, ca: &Path) -> bool {
        tls_client(ca)
            .request(
                http::Request::get(format!("{}/v2/", self.base))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .is_ok_and(|r| r.status() == 200)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_makes_the_running_binary_serve_a_renewed_certificate() {
    let (mut tls, ca) = TlsDaemon::start().await;
    assert!(tls.answers_trusting(&ca).await);
    let new_ca = tls.replace_certificate("second");
    tls.daemon.signal("HUP");
    // The signal is handled asynchronously: new connections get the new certificate soon
    // (well before the 10 s file check could).
    let mut renewed = false;
    for _ in 0..500 {
        if tls.answers_trusting(&new_ca).await {
            renewed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(renewed, "the renewed certificate is served after SIGHUP");
    assert!(!tls.answers_trusting(&ca).await, "the old one is not");
    // Still the same process: a reload, not a restart.
    assert!(tls.daemon.child.try_wait().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_a_private_ca_is_trusted_through_ca_file_only() {
    use crate::peers::{push_image, Registry};
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, ca) = make_cert(certs.path(), "registry");
    let storage = tempfile::tempdir().unwrap();
    // Seeded over plain HTTP, then restarted on the same storage with TLS.
    let plain = Registry::start_with(storage.path(), "").await;
    let image = push_image(&plain, "library/app", "1", &[150_000, 90_000], 77).await;
    plain.stop();
    let tls_yaml = format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        cert.display(),
        key.display()
    );
    let registry = Registry::start_with(storage.path(), &tls_yaml).await;
    let url = format!("https://127.0.0.1:{}", registry.addr.port());

    let dir = tempfile::tempdir().unwrap();
    let trusted = format!(
        "{}ca_file = \"{}\"\n",
        upstream_toml("docker.io", &url, true, "5m"),
        ca.display()
    );
    let proxy = TestProxy::start(dir.path(), "1GiB", &trusted).await;
    let m = get(&proxy.url("/v2/library/app/manifests/1")).await;
    assert_eq!(m.status, 200, "{:?}", m.body);
    assert_eq!(sha256(m.bytes()), image.manifest_digest);
    for (digest, bytes) in image.blobs() {
        let r = get(&proxy.url(&format!("/v2/library/app/blobs/{digest}"))).await;
        assert_eq!(r.bytes().as_ref(), bytes);
    }
    proxy.stop().await;

    // The same upstream without ca_file: its certificate is not trusted, nothing is served.
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(dir.path(), "1GiB", &upstream_toml("docker.io", &url, true, "5m")).await;
    let r = get(&proxy.url("/v2/library/app/manifests/1")).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    assert!(files_under(&dir.path().join("v1/manifests")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_file_is_picked_up_without_any_signal() {
    let (tls, ca) = TlsDaemon::start().await;
    assert!(tls.answers_trusting(&ca).await);
    // cert-manager or certbot replaces the files; nobody tells regcache. It checks them
    // every 10 s.
    let new_ca = tls.replace_certificate("after");
    let started = std::time::Instant::now();
    while !tls.answers_trusting(&new_ca).await {
        assert!(started.elapsed() < HANG, "the renewed certificate was never served");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        !tls.answers_trusting(&ca).await,
        "the old certificate is no longer served"
    );
}
