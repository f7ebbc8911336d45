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
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
}

#[derive(Default)]
struct State {
    /// (repo, tag or digest) -> the manifests served there, by media type (first = preferred).
    manifests: HashMap<(String, String), Vec<(String, Bytes)>>,
    tags: HashMap<String, BTreeMap<String, ()>>,
    blobs: HashMap<String, Bytes>,
    faults: HashMap<String, VecDeque<Fault>>,
    seen: Vec<Seen>,
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
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

    /// How many requests with this method had a path containing `path_part`.
    pub fn count(&self, method: &str, path_part: &str) -> usize {
        self.lock()
            .seen
            .iter()
            .filter(|s| s.method == method && s.path.contains(path_part))
            .count()
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
    let mut resp = if path == "/v2/" {
        Response::new(Body::full("{}"))
    } else if let Some(repo) = path.strip_prefix("/v2/").and_then(|p| p.strip_suffix("/tags/list")) {
        tags_list(&state, repo, req.uri().query())
    } else if let Some((repo, reference)) = path.strip_prefix("/v2/").and_then(|p| p.rsplit_once("/manifests/")) {
        manifest(&state, repo, reference, &req)
    } else if let Some((_, digest)) = path.strip_prefix("/v2/").and_then(|p| p.rsplit_once("/blobs/")) {
        blob(&state, digest, &req, head)
    } else {
        error(404, "NOT_FOUND")
    };
    if head {
        *resp.body_mut() = Body::empty();
    }
    Ok(resp)
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

fn blob(state: &Mutex<State>, digest: &str, req: &Request<hyper::body::Incoming>, head: bool) -> Response<Body> {
    let (bytes, fault) = {
        let mut s = state.lock().unwrap();
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
        return error(code, "UNAVAILABLE");
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
    h.insert("content-length", len.into());
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
