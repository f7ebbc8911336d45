//! Upstream authentication against the real Distribution registry: token auth (a token
//! service written here, RS256 JWTs the registry verifies against a certificate made with
//! the `openssl` CLI), anonymous and with credentials, wrong credentials, and Basic auth
//! (htpasswd). The registry is seeded while open, then restarted with `auth:` on the same
//! storage. Clients are skopeo and containerd's ctr; everything is on 127.0.0.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};

use crate::harness::{self, TestProxy};
use crate::peers::*;

const KIB: usize = 1024;
const NAME: &str = "library/testimg";
const SERVICE: &str = "test-registry";
const ISSUER: &str = "test-issuer";
const USER: &str = "puller";
const PASS: &str = "s3cret-Pass-1";
const WRONG_PASS: &str = "wrong-Pass-42";

// ---------------------------------------------------------------------------------------
// Encodings
// ---------------------------------------------------------------------------------------

/// base64url without padding (JWT segments).
fn b64url(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Standard base64 with padding (a Basic `Authorization` value).
fn b64std(input: &[u8]) -> String {
    let mut s = b64url(input).replace('-', "+").replace('_', "/");
    while !s.len().is_multiple_of(4) {
        s.push('=');
    }
    s
}

/// RFC 4648 base32, no padding.
fn base32(input: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in input {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The libtrust key id of a public key: SHA-256 of its SPKI DER, first 30 bytes, base32,
/// in 12 groups of 4 joined by `:`.
fn libtrust_kid(spki_der: &[u8]) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, spki_der);
    let b32 = base32(&hash.as_ref()[..30]);
    assert_eq!(b32.len(), 48);
    b32.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":")
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", b64std(format!("{user}:{pass}").as_bytes()))
}

/// Decodes one `application/x-www-form-urlencoded` value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 3 <= bytes.len() && s.is_char_boundary(i + 3) => match u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                }
                Err(_) => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------
// Keys and the token service
// ---------------------------------------------------------------------------------------

fn openssl(args: &[&str], cwd: &Path) {
    let out: Output = Command::new("/usr/bin/openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl {args:?}: {e}"));
    assert_success(&out, &format!("openssl {}", args.join(" ")));
}

/// An RSA key and a self-signed certificate for it, made with the openssl CLI in `dir`.
struct SigningKey {
    cert: PathBuf,
    pkcs8: Vec<u8>,
    kid: String,
}

fn make_signing_key(dir: &Path) -> SigningKey {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=token",
        ],
        dir,
    );
    openssl(
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", "key.pem", "-outform", "DER", "-out", "key.pk8",
        ],
        dir,
    );
    openssl(
        &[
            "pkey", "-in", "key.pem", "-pubout", "-outform", "DER", "-out", "pub.der",
        ],
        dir,
    );
    SigningKey {
        cert: dir.join("cert.pem"),
        pkcs8: std::fs::read(dir.join("key.pk8")).expect("key.pk8"),
        kid: libtrust_kid(&std::fs::read(dir.join("pub.der")).expect("pub.der")),
    }
}

/// One request the token service answered.
#[derive(Clone, Debug)]
struct TokenRequest {
    method: String,
    path: String,
    service: Option<String>,
    scopes: Vec<String>,
    authorization: Option<String>,
    status: u16,
}

struct Issuer {
    key: RsaKeyPair,
    kid: String,
    rng: SystemRandom,
    /// The exact `Authorization` a client must send to get a token; anyone when `None`.
    required: Option<String>,
    seq: AtomicU64,
    seen: Mutex<Vec<TokenRequest>>,
}

impl Issuer {
    fn jwt(&self, subject: &str, scopes: &[String]) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        // `repository:NAME:pull,push`: the type before the first colon, the actions after
        // the last (a name may hold a colon: `host:port/repo`). Grant what was asked.
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|scope| {
                let (kind, rest) = scope.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                Some(serde_json::json!({
                    "type": kind,
                    "name": name,
                    "actions": actions.split(',').filter(|a| !a.is_empty()).collect::<Vec<_>>(),
                }))
            })
            .collect();
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "kid": self.kid});
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("regcache-test-{}", self.seq.fetch_add(1, Ordering::SeqCst)),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, signing_input.as_bytes(), &mut signature)
            .expect("RS256 signature");
        format!("{signing_input}.{}", b64url(&signature))
    }

    fn answer(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let mut service = None;
        let mut scopes = Vec::new();
        for pair in req.uri().query().unwrap_or_default().split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "service" => service = Some(percent_decode(v)),
                "scope" => scopes.extend(percent_decode(v).split(' ').map(str::to_owned)),
                _ => {}
            }
        }
        let authorization = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or("<not ASCII>").to_owned());
        let (status, body) = if req.uri().path() != "/token" || req.method() != http::Method::GET {
            (StatusCode::NOT_FOUND, "{}".to_owned())
        } else if self.required.is_some() && authorization != self.required {
            (StatusCode::UNAUTHORIZED, r#"{"details":"bad credentials"}"#.to_owned())
        } else {
            let subject = if self.required.is_some() { USER } else { "" };
            let token = self.jwt(subject, &scopes);
            (
                StatusCode::OK,
                serde_json::json!({"token": token, "expires_in": 300}).to_string(),
            )
        };
        self.seen.lock().unwrap().push(TokenRequest {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            service,
            scopes,
            authorization,
            status: status.as_u16(),
        });
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, "application/json".parse().unwrap());
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                r#"Basic realm="token""#.parse().unwrap(),
            );
        }
        resp
    }
}

/// A token service on 127.0.0.1: `GET /token?service=&scope=` answers
/// `{"token": JWT, "expires_in": 300}` and records every request. Stopped on drop.
struct TokenServer {
    addr: SocketAddr,
    issuer: Arc<Issuer>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenServer {
    async fn start(key: &SigningKey, required: Option<String>) -> TokenServer {
        let issuer = Arc::new(Issuer {
            key: RsaKeyPair::from_pkcs8(&key.pkcs8).expect("PKCS#8 RSA key"),
            kid: key.kid.clone(),
            rng: SystemRandom::new(),
            required,
            seq: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = issuer.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let issuer = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let resp = issuer.answer(&req);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        TokenServer { addr, issuer, task }
    }

    fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn requests(&self) -> Vec<TokenRequest> {
        self.issuer.seen.lock().unwrap().clone()
    }

    fn log_text(&self) -> String {
        self.requests()
            .iter()
            .map(|r| {
                format!(
                    "{} {} service={:?} scopes={:?} authorization={} -> {}\n",
                    r.method,
                    r.path,
                    r.service,
                    r.scopes,
                    match &r.authorization {
                        None => "none".to_owned(),
                        Some(a) if a.starts_with("Basic ") => "Basic <…>".to_owned(),
                        Some(_) => "other".to_owned(),
                    },
                    r.status
                )
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// Seeds `images` (`(name, tag, seed)`) into an open registry on `storage`, stops it, and
/// starts a registry with `auth_yaml` on the same storage.
async fn seed_then_protect(
    storage: &Path,
    images: &[(&str, &str, u64)],
    auth_yaml: &str,
) -> (Registry, Vec<PushedImage>) {
    let open = Registry::start_with(storage, "").await;
    let mut pushed = Vec::new();
    for (name, tag, seed) in images {
        pushed.push(push_image(&open, name, tag, &[256 * KIB, 64 * KIB], *seed).await);
    }
    open.stop();
    let registry = Registry::start_with(storage, auth_yaml).await;
    (registry, pushed)
}

/// A registry with token auth whose realm is `tokens`, seeded with `images`.
async fn token_registry(
    dir: &Path,
    key: &SigningKey,
    tokens: &TokenServer,
    images: &[(&str, &str, u64)],
) -> (Registry, Vec<PushedImage>) {
    let auth = format!(
        "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
        tokens.realm(),
        key.cert.display()
    );
    let (registry, images) = seed_then_protect(&dir.join("storage"), images, &auth).await;
    // The registry now wants a token from our realm for the image's manifest.
    let reply = harness::get(&format!("{}/v2/{NAME}/manifests/1", registry.url())).await;
    assert_eq!(reply.status, 401, "anonymous manifest GET at the protected registry");
    let challenge = reply.header("www-authenticate").unwrap_or_default().to_owned();
    assert!(
        challenge.starts_with("Bearer ") && challenge.contains(&tokens.realm()),
        "the registry's challenge: {challenge:?}"
    );
    (registry, images)
}

async fn start_proxy(cache: &Path, registry: &Registry, credentials: Option<(&str, &str)>) -> TestProxy {
    let mut upstreams = harness::upstream_toml("docker.io", &registry.url(), true, "5m");
    if let Some((user, pass)) = credentials {
        upstreams.push_str(&format!("username = \"{user}\"\npassword = \"{pass}\"\n"));
    }
    TestProxy::start(cache, "1GiB", &upstreams).await
}

/// Panics with skopeo's output and both peers' logs unless the copy succeeded.
async fn assert_copied(out: &Output, what: &str, registry: &Registry, tokens: Option<&TokenServer>) {
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n--- skopeo stdout\n{}\n--- skopeo stderr\n{}\n--- registry access log\n{}\
             --- registry log\n{}\n--- token service\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            registry.access_log_text().await,
            registry.log_text(),
            tokens.map(TokenServer::log_text).unwrap_or_default(),
        );
    }
}

/// Every blob of `image` was fetched from the registry once, successfully.
async fn assert_one_good_get_per_blob(registry: &Registry, image: &PushedImage) {
    let log = registry.access_log().await;
    for (digest, _) in image.blobs() {
        let path = format!("/v2/{}/blobs/{digest}", image.name);
        let ok = log
            .iter()
            .filter(|e| e.method == "GET" && e.uri == path && e.status == 200)
            .count();
        assert_eq!(
            ok,
            1,
            "successful upstream GETs of {digest}; registry access log:\n{}",
            registry.access_log_text().await
        );
    }
}

/// A manifest GET through regcache that must fail with 401 `UNAUTHORIZED`, and must not
/// give the password away.
async fn assert_unauthorized(proxy: &TestProxy, password: Option<&str>) {
    let reply = harness::get_with(
        &proxy.url(&format!("/v2/{NAME}/manifests/1")),
        &[("accept", DOCKER_MANIFEST)],
    )
    .await;
    let body = String::from_utf8_lossy(reply.bytes()).into_owned();
    assert_eq!(reply.status, 401, "manifest through regcache: {body}");
    assert_eq!(reply.error_code(), "UNAUTHORIZED", "{body}");
    if let Some(password) = password {
        assert!(!body.contains(password), "the password leaked into the answer: {body}");
        let encoded = b64std(format!("{USER}:{password}").as_bytes());
        assert!(!body.contains(&encoded), "the Basic credentials leaked: {body}");
        for (name, value) in &reply.headers {
            let value = value.to_str().unwrap_or_default();
            assert!(
                !value.contains(password) && !value.contains(&encoded),
                "the password leaked into header {name}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn encoders() {
    assert_eq!(b64url(b"\xfb\xff"), "-_8");
    assert_eq!(b64url(b"abc"), "YWJj");
    assert_eq!(b64std(b"a"), "YQ==");
    assert_eq!(basic("user", "pass"), "Basic dXNlcjpwYXNz");
    // RFC 4648 test vectors, without padding.
    assert_eq!(base32(b"f"), "MY");
    assert_eq!(base32(b"foob"), "MZXW6YQ");
    assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    assert_eq!(
        percent_decode("repository%3Alibrary%2Ftestimg%3Apull"),
        "repository:library/testimg:pull"
    );
    assert_eq!(percent_decode("a+b%2"), "a b%2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_anonymous_pull() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_signing_key(dir.path());
    let tokens = TokenServer::start(&key, None).await;
    let (registry, images) = token_registry(dir.path(), &key, &tokens, &[(NAME, "1", 11)]).await;
    let image = &images[0];
    let proxy = start_proxy(&dir.path().join("cache"), &registry, None).await;

    let src = format!("docker://{}/{NAME}:1", proxy.addr);
    let cold = dir.path().join("cold");
    let out = skopeo_copy(&src, &cold, &[]).await;
    assert_copied(&out, "cold skopeo copy through regcache", &registry, Some(&tokens)).await;
    assert_dir_copy(&cold, image);
    assert_one_good_get_per_blob(&registry, image).await;

    let seen = tokens.requests();
    assert!(!seen.is_empty(), "regcache never asked the token service");
    for r in &seen {
        assert_eq!(
            r.authorization,
            None,
            "an anonymous token request:\n{}",
            tokens.log_text()
        );
        assert_eq!((r.method.as_str(), r.path.as_str(), r.status), ("GET", "/token", 200));
        assert_eq!(r.service.as_deref(), Some(SERVICE));
        assert_eq!(r.scopes, [format!("repository:{NAME}:pull")]);
    }
    // One token serves the whole pull: it is cached per scope.
    assert_eq!(seen.len(), 1, "token requests:\n{}", tokens.log_text());

    let blob_gets = registry.count_requests("GET", "/blobs/").await;
    let warm = dir.path().join("warm");
    let out = skopeo_copy(&src, &warm, &[]).await;
    assert_copied(&out, "warm skopeo copy through regcache", &registry, Some(&tokens)).await;
    assert_dir_copy(&warm, image);
    assert_eq!(
        tokens.requests().len(),
        seen.len(),
        "a warm pull asks for no token:\n{}",
        tokens.log_text()
    );
    assert_eq!(
        registry.count_requests("GET", "/blobs/").await,
        blob_gets,
        "a warm pull fetches no blob upstream; registry access log:\n{}",
        registry.access_log_text().await
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_with_credentials_skopeo_and_ctr() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_signing_key(dir.path());
    let expected = basic(USER, PASS);
    let tokens = TokenServer::start(&key, Some(expected.clone())).await;
    let (registry, images) = token_registry(
        dir.path(),
        &key,
        &tokens,
        &[(NAME, "1", 21), ("library/other", "2", 22)],
    )
    .await;
    let (image, other) = (&images[0], &images[1]);
    let proxy = start_proxy(&dir.path().join("cache"), &registry, Some((USER, PASS))).await;

    let out_dir = dir.path().join("out");
    let out = skopeo_copy(&format!("docker://{}/{NAME}:1", proxy.addr), &out_dir, &[]).await;
    assert_copied(
        &out,
        "skopeo copy through regcache with credentials",
        &registry,
        Some(&tokens),
    )
    .await;
    assert_dir_copy(&out_dir, image);
    assert_one_good_get_per_blob(&registry, image).await;
    let seen = tokens.requests();
    assert_eq!(seen.len(), 1, "token requests:\n{}", tokens.log_text());
    assert_eq!(seen[0].authorization.as_deref(), Some(expected.as_str()));
    assert_eq!(seen[0].status, 200);
    assert_eq!(seen[0].scopes, [format!("repository:{NAME}:pull")]);

    // containerd through the same regcache, for a repository regcache has no token for yet.
    let containerd = Containerd::start().await;
    let hosts = containerd.scratch("hosts");
    write_hosts_toml(&hosts, "docker.io", proxy.addr);
    let reference = "docker.io/library/other:2";
    let out = containerd.ctr_pull(&hosts, reference).await;
    if !out.status.success() {
        panic!(
            "ctr pull failed:\n{}\n--- registry access log\n{}--- token service\n{}",
            String::from_utf8_lossy(&out.stderr),
            registry.access_log_text().await,
            tokens.log_text()
        );
    }
    assert_eq!(
        containerd.image_digest(reference).await.as_deref(),
        Some(other.manifest_digest.as_str()),
        "digest of the image ctr pulled"
    );
    for (digest, bytes) in other.blobs() {
        assert_eq!(containerd.content(&digest).await, bytes, "content {digest}");
    }
    assert_one_good_get_per_blob(&registry, other).await;
    let seen = tokens.requests();
    assert_eq!(seen.len(), 2, "token requests:\n{}", tokens.log_text());
    assert_eq!(seen[1].authorization.as_deref(), Some(expected.as_str()));
    assert_eq!(seen[1].status, 200);
    assert_eq!(seen[1].scopes, ["repository:library/other:pull".to_owned()]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_wrong_password_is_unauthorized() {
    let dir = tempfile::tempdir().unwrap();
    let key = make_signing_key(dir.path());
    let tokens = TokenServer::start(&key, Some(basic(USER, PASS))).await;
    let (registry, _images) = token_registry(dir.path(), &key, &tokens, &[(NAME, "1", 31)]).await;
    let proxy = start_proxy(&dir.path().join("cache"), &registry, Some((USER, WRONG_PASS))).await;

    let out = skopeo_copy(
        &format!("docker://{}/{NAME}:1", proxy.addr),
        &dir.path().join("out"),
        &[],
    )
    .await;
    assert!(
        !out.status.success(),
        "skopeo must fail when regcache's credentials are wrong:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains(WRONG_PASS),
        "the password leaked to the client: {stderr}"
    );
    assert_unauthorized(&proxy, Some(WRONG_PASS)).await;

    // regcache did present the (wrong) credentials, and was refused.
    let seen = tokens.requests();
    assert!(!seen.is_empty(), "regcache never asked the token service");
    for r in &seen {
        assert_eq!(r.authorization.as_deref(), Some(basic(USER, WRONG_PASS).as_str()));
        assert_eq!(r.status, 401);
    }
    // Nothing was served: the registry answered every manifest request 401.
    let log = registry.access_log().await;
    assert!(
        log.iter().all(|e| !e.uri.contains("/manifests/") || e.status == 401),
        "registry access log:\n{}",
        registry.access_log_text().await
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_htpasswd() {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash(PASS, 5).expect("bcrypt");
    assert!(hash.starts_with("$2"), "{hash}");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("{USER}:{hash}\n")).unwrap();
    let auth = format!(
        "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
        htpasswd.display()
    );
    let (registry, images) = seed_then_protect(&dir.path().join("storage"), &[(NAME, "1", 41)], &auth).await;
    let image = &images[0];
    let manifest_url = format!("{}/v2/{NAME}/manifests/1", registry.url());
    let reply = harness::get(&manifest_url).await;
    assert_eq!(reply.status, 401, "anonymous manifest GET at the protected registry");
    assert_eq!(reply.header("www-authenticate"), Some(r#"Basic realm="test""#));
    // The entry made here is one the registry accepts.
    let reply = harness::get_with(
        &manifest_url,
        &[("authorization", &basic(USER, PASS)), ("accept", DOCKER_MANIFEST)],
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "manifest GET with the htpasswd credentials; registry log:\n{}",
        registry.log_text()
    );

    let proxy = start_proxy(&dir.path().join("cache"), &registry, Some((USER, PASS))).await;
    let out_dir = dir.path().join("out");
    let out = skopeo_copy(&format!("docker://{}/{NAME}:1", proxy.addr), &out_dir, &[]).await;
    assert_copied(
        &out,
        "skopeo copy through regcache with Basic credentials",
        &registry,
        None,
    )
    .await;
    assert_dir_copy(&out_dir, image);
    assert_one_good_get_per_blob(&registry, image).await;
    proxy.stop().await;

    // Without credentials, and with a wrong password, regcache is refused and says so.
    let anonymous = start_proxy(&dir.path().join("cache-anon"), &registry, None).await;
    assert_unauthorized(&anonymous, None).await;
    anonymous.stop().await;
    let wrong = start_proxy(&dir.path().join("cache-wrong"), &registry, Some((USER, WRONG_PASS))).await;
    assert_unauthorized(&wrong, Some(WRONG_PASS)).await;
    // A second request: the Basic credentials now go up front, and are still refused.
    assert_unauthorized(&wrong, Some(WRONG_PASS)).await;
    wrong.stop().await;
}
