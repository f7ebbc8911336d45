//! An in-process fake upstream registry: serves manifests, blobs (with Range) and tag lists
//! from memory, counts every request per method and path, and injects faults per blob.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use regcache::http::body::Body;
use tokio::sync::Notify;

/// What the next GET of a blob does; each GET takes the next fault from the blob's queue.
#[derive(Clone)]
pub enum Fault {
    /// Serve one flipped byte.
    Corrupt,
    /// Announce the full length, send this many bytes, then break the connection.
    Truncate(usize),
    /// Send this many bytes, then wait for the gate before sending the rest.
    Gate(usize, Arc<Notify>),
    /// Answer with this status and an OCI error body.
    Status(u16),
    /// Wait for the gate before answering at all (then answer as usual, 404 included).
    Hold(Arc<Notify>),
    /// Send this many bytes, then one more byte every interval (an upstream that drips).
    Drip(usize, std::time::Duration),
    /// Serve the blob without a Content-Length (chunked), as some CDNs do.
    NoLength,
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
}

/// How the fake wants clients to authenticate.
#[derive(Clone)]
pub enum AuthMode {
    /// Bearer tokens from `realm` (a URL; `/token` on a fake with `serve_tokens` issues them).
    Token { realm: String },
    /// Plain Basic auth with these credentials.
    Basic(String, String),
}

/// Who may get tokens from `/token` (anyone when `None`), and the lifetime it announces.
type TokenService = (Option<(String, String)>, Option<u64>);

#[derive(Default)]
struct State {
    /// (repo, tag or digest) -> the manifests served there, by media type (first = preferred).
    manifests: HashMap<(String, String), Vec<(String, Bytes)>>,
    tags: HashMap<String, BTreeMap<String, ()>>,
    blobs: HashMap<String, Bytes>,
    /// Blobs that exist only in these repositories (404 under any other), like a private
    /// repository's layers; blobs not listed here are served under every repository.
    blob_repos: HashMap<String, Vec<String>>,
    faults: HashMap<String, VecDeque<Fault>>,
    /// (method, path part, status, Retry-After): the next requests that match answer so.
    path_faults: VecDeque<(Method, String, u16, Option<String>)>,
    seen: Vec<Seen>,
    auth: Option<AuthMode>,
    /// Tokens this fake's `/token` endpoint issued and still honours.
    tokens: Vec<String>,
    /// What `/token` checks credentials against, and the lifetime it announces.
    token_service: Option<TokenService>,
    ratelimit: Option<(u32, u32)>,
    /// Blob GETs are redirected to this base URL (another fake).
    redirect_blobs: Option<String>,
    /// The status of those redirects (307 unless set).
    redirect_status: Option<u16>,
    /// (repo, subject digest) -> referrer descriptors; `None` = no referrers API (404).
    referrers: Option<HashMap<(String, String), Vec<serde_json::Value>>>,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
    /// Dropped with the fake: ends every open connection too, like a dead host.
    _alive: tokio::sync::watch::Sender<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        FakeUpstream::start_on("127.0.0.1:0").await
    }

    /// Starts on a given address (to bring a "dead" upstream back at the same place).
    pub async fn start_on(addr: &str) -> FakeUpstream {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state: Arc<Mutex<State>> = Arc::default();
        let shared = state.clone();
        let (alive, watch) = tokio::sync::watch::channel(());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| serve(state.clone(), req));
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = watch.changed() => {}
                    }
                });
            }
        });
        FakeUpstream {
            addr,
            state,
            task,
            _alive: alive,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Adds a blob; returns its digest.
    pub fn add_blob(&self, bytes: &[u8]) -> String {
        let digest = crate::harness::sha256(bytes);
        self.lock().blobs.insert(digest.clone(), Bytes::copy_from_slice(bytes));
        digest
    }

    /// Adds a blob that only `repo` holds; returns its digest.
    pub fn add_blob_in(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = self.add_blob(bytes);
        self.lock()
            .blob_repos
            .entry(digest.clone())
            .or_default()
            .push(repo.to_owned());
        digest
    }

    /// Publishes an OCI image of one config and one layer at `repo:tag`: returns the
    /// (manifest, config, layer) digests.
    pub fn add_one_layer_image(&self, repo: &str, tag: &str, config: &[u8], layer: &[u8]) -> (String, String, String) {
        const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
        let (c, l) = (self.add_blob(config), self.add_blob(layer));
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": config.len(), "digest": c},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": layer.len(), "digest": l}],
        }))
        .expect("a manifest");
        (self.add_manifest(repo, tag, OCI_MANIFEST, &manifest), c, l)
    }

    /// Publishes a manifest at `repo:tag` (several media types may share a tag) and at its
    /// digest; returns the digest.
    pub fn add_manifest(&self, repo: &str, tag: &str, media_type: &str, bytes: &[u8]) -> String {
        let digest = crate::harness::sha256(bytes);
        let mut s = self.lock();
        let entry = (media_type.to_owned(), Bytes::copy_from_slice(bytes));
        s.manifests
            .insert((repo.to_owned(), digest.clone()), vec![entry.clone()]);
        let at_tag = s.manifests.entry((repo.to_owned(), tag.to_owned())).or_default();
        at_tag.retain(|(t, _)| t != media_type);
        at_tag.push(entry);
        s.tags.entry(repo.to_owned()).or_default().insert(tag.to_owned(), ());
        digest
    }

    /// Moves a tag to new content of one media type (dropping the others).
    pub fn retag(&self, repo: &str, tag: &str, media_type: &str, bytes: &[u8]) -> String {
        self.lock().manifests.remove(&(repo.to_owned(), tag.to_owned()));
        self.add_manifest(repo, tag, media_type, bytes)
    }

    pub fn add_tag_only(&self, repo: &str, tag: &str) {
        self.lock()
            .tags
            .entry(repo.to_owned())
            .or_default()
            .insert(tag.to_owned(), ());
    }

    /// Queues faults for the next GETs of a blob.
    pub fn fault(&self, digest: &str, faults: impl IntoIterator<Item = Fault>) {
        self.lock().faults.entry(digest.to_owned()).or_default().extend(faults);
    }

    /// Makes the next request with `method` whose path contains `path_part` answer
    /// `status` (with `Retry-After: retry_after` when given); queue several for several.
    pub fn fault_path(&self, method: Method, path_part: &str, status: u16, retry_after: Option<&str>) {
        self.lock()
            .path_faults
            .push_back((method, path_part.to_owned(), status, retry_after.map(str::to_owned)));
    }

    /// How many requests with this method had a path containing `path_part`.
    pub fn count(&self, method: &str, path_part: &str) -> usize {
        self.lock()
            .seen
            .iter()
            .filter(|s| s.method == method && s.path.contains(path_part))
            .count()
    }

    /// Requires authentication on every `/v2/` request.
    pub fn require_auth(&self, mode: AuthMode) {
        self.lock().auth = Some(mode);
    }

    /// Makes this fake's `/token` endpoint issue tokens (to anyone, or to these credentials).
    pub fn serve_tokens(&self, credentials: Option<(String, String)>, expires_in: Option<u64>) {
        self.lock().token_service = Some((credentials, expires_in));
    }

    /// Invalidates every issued token, as if they had expired.
    pub fn expire_tokens(&self) {
        self.lock().tokens.clear();
    }

    pub fn set_ratelimit(&self, limit: u32, remaining: u32) {
        self.lock().ratelimit = Some((limit, remaining));
    }

    /// Redirects blob GETs with this status instead of 307 (301, 302, 303, 308).
    pub fn redirect_blobs_with(&self, base_url: &str, status: u16) {
        let mut s = self.lock();
        s.redirect_blobs = Some(base_url.to_owned());
        s.redirect_status = Some(status);
    }

    pub fn redirect_blobs_to(&self, base_url: &str) {
        self.lock().redirect_blobs = Some(base_url.to_owned());
    }

    /// Turns the referrers API on and adds a referrer descriptor for `subject`.
    pub fn add_referrer(&self, repo: &str, subject: &str, descriptor: serde_json::Value) {
        self.lock()
            .referrers
            .get_or_insert_with(HashMap::new)
            .entry((repo.to_owned(), subject.to_owned()))
            .or_default()
            .push(descriptor);
    }

    pub fn total_requests(&self) -> usize {
        self.lock().seen.len()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }
}

fn error(status: u16, code: &str) -> Response<Body> {
    let mut r = Response::new(Body::full(format!(
        "{{\"errors\":[{{\"code\":\"{code}\",\"message\":\"fake\"}}]}}"
    )));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

async fn serve(state: Arc<Mutex<State>>, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    state.lock().unwrap().seen.push(Seen {
        method: req.method().clone(),
        path: path.clone(),
        query: req.uri().query().map(str::to_owned),
        headers: req.headers().clone(),
    });
    let head = req.method() == Method::HEAD;
    let injected = {
        let mut s = state.lock().unwrap();
        let at = s
            .path_faults
            .iter()
            .position(|(m, part, _, _)| m == req.method() && path.contains(part.as_str()));
        at.and_then(|i| s.path_faults.remove(i))
    };
    if let Some((_, _, status, retry_after)) = injected {
        let mut r = error(
            status,
            if status == 429 {
                "TOOMANYREQUESTS"
            } else {
                "UNAVAILABLE"
            },
        );
        if let Some(v) = retry_after {
            r.headers_mut().insert("retry-after", v.parse().unwrap());
        }
        if head {
            *r.body_mut() = Body::empty();
        }
        return Ok(r);
    }
    if path == "/token" {
        return Ok(token(&state, &req));
    }
    if let Some(challenge) = unauthorized(&state, &req) {
        return Ok(challenge);
    }
    let mut resp = if path == "/v2/" {
        Response::new(Body::full("{}"))
    } else if let Some((repo, subject)) = path.strip_prefix("/v2/").and_then(|p| p.rsplit_once("/referrers/")) {
        referrers(&state, repo, subject, req.uri().query())
    } else if let Some(repo) = path.strip_prefix("/v2/").and_then(|p| p.strip_suffix("/tags/list")) {
        tags_list(&state, repo, req.uri().query())
    } else if let Some((repo, reference)) = path.strip_prefix("/v2/").and_then(|p| p.rsplit_once("/manifests/")) {
        manifest(&state, repo, reference, &req)
    } else if let Some((repo, digest)) = path.strip_prefix("/v2/").and_then(|p| p.rsplit_once("/blobs/")) {
        blob(&state, repo, digest, &req, head).await
    } else {
        error(404, "NOT_FOUND")
    };
    if head {
        *resp.body_mut() = Body::empty();
    }
    if let Some((limit, remaining)) = state.lock().unwrap().ratelimit {
        let h = resp.headers_mut();
        h.insert("ratelimit-limit", format!("{limit};w=21600").parse().unwrap());
        h.insert("ratelimit-remaining", format!("{remaining};w=21600").parse().unwrap());
    }
    Ok(resp)
}

pub fn basic(user: &str, pass: &str) -> String {
    let text = format!("{user}:{pass}");
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    format!("Basic {out}")
}

/// A 401 with a challenge when the request lacks acceptable credentials.
fn unauthorized(state: &Mutex<State>, req: &Request<hyper::body::Incoming>) -> Option<Response<Body>> {
    let s = state.lock().unwrap();
    let given = req.headers().get("authorization").and_then(|v| v.to_str().ok());
    let challenge = match s.auth.as_ref()? {
        AuthMode::Basic(user, pass) => {
            if given == Some(basic(user, pass).as_str()) {
                return None;
            }
            "Basic realm=\"fake\"".to_owned()
        }
        AuthMode::Token { realm, .. } => {
            if let Some(t) = given.and_then(|g| g.strip_prefix("Bearer ")) {
                if s.tokens.iter().any(|issued| issued == t) {
                    return None;
                }
            }
            let repo = req
                .uri()
                .path()
                .strip_prefix("/v2/")
                .and_then(|p| {
                    p.rsplit_once("/manifests/")
                        .or(p.rsplit_once("/blobs/"))
                        .or(p.rsplit_once("/tags/"))
                })
                .map(|(r, _)| r.to_owned())
                .unwrap_or_default();
            format!("Bearer realm=\"{realm}\",service=\"fake-registry\",scope=\"repository:{repo}:pull\"")
        }
    };
    let mut r = error(401, "UNAUTHORIZED");
    r.headers_mut().insert("www-authenticate", challenge.parse().unwrap());
    Some(r)
}

/// The token endpoint: issues `tok-N` to anyone, or only to the configured credentials.
fn token(state: &Mutex<State>, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    let mut s = state.lock().unwrap();
    let Some((credentials, expires_in)) = s.token_service.clone() else {
        return error(404, "NOT_FOUND");
    };
    let given = req.headers().get("authorization").and_then(|v| v.to_str().ok());
    if let Some((user, pass)) = &credentials {
        if given != Some(basic(user, pass).as_str()) {
            return error(401, "UNAUTHORIZED");
        }
    }
    let token = format!("tok-{}", s.tokens.len() + s.seen.len());
    s.tokens.push(token.clone());
    let mut body = serde_json::json!({"token": token});
    if let Some(e) = expires_in {
        body["expires_in"] = e.into();
    }
    Response::new(Body::full(body.to_string()))
}

fn referrers(state: &Mutex<State>, repo: &str, subject: &str, query: Option<&str>) -> Response<Body> {
    let s = state.lock().unwrap();
    let Some(all) = &s.referrers else {
        return error(404, "NOT_FOUND");
    };
    let mut list = all
        .get(&(repo.to_owned(), subject.to_owned()))
        .cloned()
        .unwrap_or_default();
    let filter = query.and_then(|q| q.split('&').find_map(|p| p.strip_prefix("artifactType=")));
    if let Some(t) = filter {
        let t = t.replace("%2F", "/").replace("%2B", "+");
        list.retain(|d| d["artifactType"] == t.as_str());
    }
    let body = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": list});
    let mut r = Response::new(Body::full(body.to_string()));
    r.headers_mut().insert(
        "content-type",
        "application/vnd.oci.image.index.v1+json".parse().unwrap(),
    );
    if filter.is_some() {
        r.headers_mut()
            .insert("oci-filters-applied", "artifactType".parse().unwrap());
    }
    r
}

fn manifest(state: &Mutex<State>, repo: &str, reference: &str, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    let accept: Vec<String> = req
        .headers()
        .get_all("accept")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_owned()).collect::<Vec<_>>())
        .collect();
    let s = state.lock().unwrap();
    let Some(candidates) = s.manifests.get(&(repo.to_owned(), reference.to_owned())) else {
        return error(404, "MANIFEST_UNKNOWN");
    };
    let chosen = candidates
        .iter()
        .find(|(t, _)| accept.is_empty() || accept.iter().any(|a| a == t || a == "*/*"));
    let Some((media_type, bytes)) = chosen else {
        return error(404, "MANIFEST_UNKNOWN");
    };
    let mut r = Response::new(Body::full(bytes.clone()));
    let h = r.headers_mut();
    h.insert("content-type", media_type.parse().unwrap());
    h.insert("content-length", bytes.len().into());
    h.insert("docker-content-digest", crate::harness::sha256(bytes).parse().unwrap());
    r
}

fn tags_list(state: &Mutex<State>, repo: &str, query: Option<&str>) -> Response<Body> {
    let s = state.lock().unwrap();
    let Some(tags) = s.tags.get(repo) else {
        return error(404, "NAME_UNKNOWN");
    };
    let param = |k: &str| {
        query?
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{k}=")).map(str::to_owned))
    };
    let n: usize = param("n").and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
    let last = param("last");
    let all: Vec<&String> = tags.keys().filter(|t| last.as_ref().is_none_or(|l| *t > l)).collect();
    let page: Vec<&String> = all.iter().take(n).copied().collect();
    let mut r = Response::new(Body::full(serde_json::json!({"name": repo, "tags": page}).to_string()));
    if all.len() > page.len() {
        let link = format!(
            "</v2/{repo}/tags/list?last={}&n={n}>; rel=\"next\"",
            page.last().unwrap()
        );
        r.headers_mut().insert("link", link.parse().unwrap());
    }
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

async fn blob(
    state: &Mutex<State>,
    repo: &str,
    digest: &str,
    req: &Request<hyper::body::Incoming>,
    head: bool,
) -> Response<Body> {
    if !head {
        let hold = {
            let mut s = state.lock().unwrap();
            let queue = s.faults.get_mut(digest);
            match queue {
                Some(q) if matches!(q.front(), Some(Fault::Hold(_))) => match q.pop_front() {
                    Some(Fault::Hold(gate)) => Some(gate),
                    _ => None,
                },
                _ => None,
            }
        };
        if let Some(gate) = hold {
            gate.notified().await;
        }
    }
    blob_now(state, repo, digest, req, head)
}

fn blob_now(
    state: &Mutex<State>,
    repo: &str,
    digest: &str,
    req: &Request<hyper::body::Incoming>,
    head: bool,
) -> Response<Body> {
    let (bytes, fault) = {
        let mut s = state.lock().unwrap();
        if s.blob_repos
            .get(digest)
            .is_some_and(|repos| !repos.iter().any(|r| r == repo))
        {
            return error(404, "BLOB_UNKNOWN");
        }
        if let Some(base) = &s.redirect_blobs {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::from_u16(s.redirect_status.unwrap_or(307)).unwrap();
            let location = format!("{base}/v2/cdn/blobs/{digest}?signature=abc");
            r.headers_mut().insert("location", location.parse().unwrap());
            return r;
        }
        let Some(bytes) = s.blobs.get(digest).cloned() else {
            return error(404, "BLOB_UNKNOWN");
        };
        let fault = if head {
            None
        } else {
            s.faults.get_mut(digest).and_then(VecDeque::pop_front)
        };
        (bytes, fault)
    };
    if let Some(Fault::Status(code)) = fault {
        let mut r = error(code, "UNAVAILABLE");
        if code == 429 {
            r.headers_mut().insert("retry-after", "30".parse().unwrap());
        }
        return r;
    }
    let total = bytes.len();
    let start = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|s| *s < total);
    let mut body = bytes.slice(start.unwrap_or(0)..);
    if let Some(Fault::Corrupt) = fault {
        let mut v = body.to_vec();
        if let Some(b) = v.last_mut() {
            *b ^= 0xff;
        }
        body = Bytes::from(v);
    }
    let len = body.len();
    let mut r = Response::new(Body::empty());
    let h = r.headers_mut();
    if !matches!(fault, Some(Fault::NoLength)) {
        h.insert("content-length", len.into());
    }
    h.insert("docker-content-digest", digest.parse().unwrap());
    h.insert("content-type", "application/octet-stream".parse().unwrap());
    if let Some(s) = start {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        r.headers_mut().insert(
            "content-range",
            format!("bytes {s}-{}/{total}", total - 1).parse().unwrap(),
        );
    }
    if head {
        return r;
    }
    let (tx, stream) = Body::channel();
    *r.body_mut() = stream;
    tokio::spawn(async move {
        if let Some(Fault::Drip(n, every)) = fault {
            let _ = tx.send(Ok(body.slice(..n.min(len)))).await;
            for i in n.min(len)..len {
                tokio::time::sleep(every).await;
                if tx.send(Ok(body.slice(i..i + 1))).await.is_err() {
                    return;
                }
            }
            return;
        }
        let (cut, gate) = match fault {
            Some(Fault::Truncate(n)) => (Some(n.min(len)), None),
            Some(Fault::Gate(n, g)) => (Some(n.min(len)), Some(g)),
            _ => (None, None),
        };
        let first = body.slice(..cut.unwrap_or(len));
        for chunk in first.chunks(64 * 1024) {
            if tx.send(Ok(Bytes::copy_from_slice(chunk))).await.is_err() {
                return;
            }
        }
        match (cut, gate) {
            (Some(_), None) => {
                let _ = tx.send(Err(std::io::Error::other("injected reset"))).await;
            }
            (Some(n), Some(gate)) => {
                gate.notified().await;
                for chunk in body.slice(n..).chunks(64 * 1024) {
                    if tx.send(Ok(Bytes::copy_from_slice(chunk))).await.is_err() {
                        return;
                    }
                }
            }
            _ => {}
        }
    });
    r
}
