//! Route -> proxy call -> response: headers, HEAD vs GET, `Range`, and the client-facing
//! view of names (`OCI-Namespace`, `Link` rewritten to the client's own path).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::header::{ACCEPT, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LINK, RANGE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};

use tracing::Instrument;

use super::auth;
use super::body::Body;
use super::error::ApiError;
use super::routes::{self, query_param, Endpoint, Route};
use crate::cache::blob_store::Kind;
use crate::cache::fill::{stream_file, stream_verified, Reader};
use crate::digest::Digest;
use crate::oci::{self, AcceptSet, Reference};
use crate::proxy::{self, BlobAnswer, Proxy};
use crate::upstream::Target;
use crate::App;

pub const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
pub const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
const OCI_NAMESPACE: HeaderName = HeaderName::from_static("oci-namespace");
/// Set on answers served from cache because the upstream could not confirm them.
pub const STALE: HeaderName = HeaderName::from_static("x-regcache-stale");

/// Serves one request; every failure becomes an OCI error response, never a panic.
pub async fn handle<B>(app: Arc<App>, req: Request<B>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    if req.uri().path() == "/token" {
        return Ok(Box::pin(auth::token_endpoint(&app, &req)).await);
    }
    if let Some(digest) = req.uri().path().strip_prefix("/_regcache/peer/blobs/") {
        return Ok(Box::pin(peer_blob(&app, &req, digest))
            .await
            .unwrap_or_else(ApiError::into_response));
    }
    let route = routes::parse(req.method(), req.uri().path());
    let label = route_label(&route);
    // The span gives context to whatever is logged inside the request; at debug level, as
    // an enabled span per request costs a quarter of a warm manifest answer's time.
    let span = tracing::debug_span!(
        "request",
        method = %req.method(),
        route = label,
        repo = tracing::field::Empty,
        reference = tracing::field::Empty,
    );
    let mut work = std::pin::pin!(proxy::lookup_scope(dispatch(&app, &req, route).instrument(span)));
    let result = work.as_mut().await;
    let (cache, policy) = proxy::recorded(work);
    let mut resp = result.unwrap_or_else(ApiError::into_response);
    // A manifest answer has it already (its headers are made once per manifest).
    resp.headers_mut().entry(API_VERSION).or_insert_with(api_version);
    if req.method() == Method::HEAD {
        *resp.body_mut() = Body::empty();
    }
    let method = match *req.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        _ => "other",
    };
    let elapsed = started.elapsed();
    app.proxy
        .metrics
        .answered(label, method, resp.status(), elapsed.as_secs_f64());
    let bytes = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    crate::logging::access(&crate::logging::AccessLine {
        method: req.method().as_str(),
        path: req.uri().path(),
        route: label,
        status: resp.status().as_u16(),
        bytes,
        duration: elapsed,
        cache,
        policy,
    });
    Ok(resp)
}

/// `Docker-Distribution-API-Version`, on every answer, as Distribution sends it.
pub fn api_version() -> HeaderValue {
    HeaderValue::from_static("registry/2.0")
}

/// A small, fixed set of route names for metric labels (never the raw path).
fn route_label(route: &Result<Route, routes::RouteError>) -> &'static str {
    match route.as_ref().map(|r| &r.endpoint) {
        Ok(Endpoint::Base) => "base",
        Ok(Endpoint::Catalog) => "catalog",
        Ok(Endpoint::Manifest(_)) => "manifest",
        Ok(Endpoint::Blob(_)) => "blob",
        Ok(Endpoint::TagsList) => "tags_list",
        Ok(Endpoint::Referrers(_)) => "referrers",
        Ok(Endpoint::Upload) | Err(routes::RouteError::MethodNotAllowed) => "unsupported",
        Err(routes::RouteError::NotFound) => "unknown",
    }
}

async fn dispatch<B>(
    app: &App,
    req: &Request<B>,
    route: Result<Route<'_>, routes::RouteError>,
) -> Result<Response<Body>, ApiError> {
    let proxy = &*app.proxy;
    let route = route.map_err(|e| match e {
        routes::RouteError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint"),
        routes::RouteError::MethodNotAllowed => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "regcache is a pull-through cache: push and delete are not supported",
        ),
    })?;
    if route.endpoint == Endpoint::Base {
        auth::check(app, req, None).await?;
        return Ok(json_response(b"{}".to_vec()));
    }
    let query = req.uri().query();
    if route.endpoint == Endpoint::Catalog {
        auth::check(app, req, None).await?;
        return Box::pin(catalog(app, req, query)).await;
    }
    let ns = query_param(query, "ns");
    let target = proxy
        .upstreams
        .route(ns.as_deref(), route.name)
        .map_err(proxy::Error::from)?;
    let span = tracing::Span::current();
    span.record("repo", tracing::field::display(&target.repo));
    if let Endpoint::Manifest(r) | Endpoint::Blob(r) | Endpoint::Referrers(r) = &route.endpoint {
        span.record("reference", r);
    }
    auth::check(app, req, Some((&target.upstream.name, target.repo.as_str()))).await?;
    let head = req.method() == Method::HEAD;
    let mut resp = match route.endpoint {
        Endpoint::Manifest(reference) => manifest(&app.proxy, &target, reference, req.headers()).await?,
        Endpoint::Blob(digest) => Box::pin(blob(&app.proxy, &target, &parse_digest(digest)?, req, head)).await?,
        Endpoint::TagsList => Box::pin(tags_list(proxy, &target, route.name, ns.as_deref(), query)).await?,
        Endpoint::Referrers(digest) => {
            let artifact_type = query_param(query, "artifactType");
            Box::pin(referrers(
                proxy,
                &target,
                &parse_digest(digest)?,
                artifact_type.as_deref(),
            ))
            .await?
        }
        Endpoint::Base | Endpoint::Catalog | Endpoint::Upload => unreachable_route(),
    };
    if let Some(v) = ns.and_then(|ns| HeaderValue::from_str(&ns).ok()) {
        resp.headers_mut().insert(OCI_NAMESPACE, v);
    }
    Ok(resp)
}

/// Most names one catalog page holds.
const CATALOG_MAX_PAGE: usize = 10_000;

/// `/v2/_catalog`: the repositories with a cached manifest, as `<upstream>/<repo>` (what a
/// path-prefix client asks for) and, for the default upstream, also bare; only those the
/// client may pull; paginated by `n` and `last` with a `Link` to the next page.
async fn catalog<B>(app: &App, req: &Request<B>, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID", m);
    let n = match query_param(query, "n") {
        Some(n) => n.parse::<usize>().map_err(|_| bad("n must be a number"))?,
        None => CATALOG_MAX_PAGE,
    }
    .min(CATALOG_MAX_PAGE);
    let last = query_param(query, "last");
    let who = auth::identity(app, req).await;
    let proxy = &*app.proxy;
    let cache = proxy.cache.clone();
    let pairs = tokio::task::spawn_blocking(move || {
        cache
            .associations
            .pairs_holding(|d| cache.index.peek(crate::cache::blob_store::Kind::Manifest, d))
    })
    .await
    .unwrap_or_default();
    let default = proxy.upstreams.default_name();
    let mut names = std::collections::BTreeSet::new();
    for (upstream, repo) in pairs {
        if !auth::may_pull(app, &who, &upstream, &repo) {
            continue;
        }
        if default.as_deref() == Some(upstream.as_str()) {
            names.insert(repo.clone());
        }
        names.insert(format!("{upstream}/{repo}"));
    }
    let mut page: Vec<&String> = names
        .iter()
        .filter(|name| last.as_deref().is_none_or(|l| name.as_str() > l))
        .take(n + 1)
        .collect();
    let more = page.len() > n;
    page.truncate(n);
    let body = serde_json::to_vec(&serde_json::json!({ "repositories": page })).unwrap_or_default();
    let mut resp = json_response(body);
    if let (true, Some(last)) = (more, page.last()) {
        let link = format!("</v2/_catalog?n={n}&last={}>; rel=\"next\"", percent_encode_query(last));
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(http::header::LINK, v);
        }
    }
    Ok(resp)
}

/// Encodes a repository name for a query string (`/` kept; it is legal there).
fn percent_encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'/' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn unreachable_route() -> Response<Body> {
    ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint").into_response()
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse().map_err(|e: crate::digest::InvalidDigest| {
        ApiError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string())
    })
}

fn json_response(body: Vec<u8>) -> Response<Body> {
    let len = body.len();
    let mut resp = Response::new(Body::full(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(CONTENT_LENGTH, len.into());
    resp
}

async fn manifest(
    proxy: &Arc<Proxy>,
    target: &Target,
    reference: &str,
    headers: &HeaderMap,
) -> Result<Response<Body>, ApiError> {
    // A reference that is neither a tag nor a digest names a manifest that cannot exist:
    // 404 MANIFEST_UNKNOWN, as Distribution answers and the conformance suite expects
    // (it asks for `.INVALID_MANIFEST_NAME`). Nothing reaches the upstream or the disk.
    let reference = Reference::parse(reference).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("{reference:?} is neither a tag nor a digest"),
        )
    })?;
    // A digest names one manifest whatever the client accepts; only a tag's answer depends on it.
    let accept = match reference {
        Reference::Tag(_) => AcceptSet::from_headers(headers.get_all(ACCEPT).iter().filter_map(|v| v.to_str().ok())),
        Reference::Digest(_) => AcceptSet::ALL,
    };
    let answer = proxy.manifest(target, &reference, accept).await?;
    let admission = admitted(proxy.admit_manifest(target, &answer.manifest).await)?;
    let m = &answer.manifest;
    if proxy::current_lookup_result() == "miss" {
        proxy.note_layers_ahead(target, m);
    }
    let mut resp = Response::new(Body::full(m.bytes.clone()));
    let h = resp.headers_mut();
    *h = match admission.and_then(|a| a.headers) {
        Some(headers) => headers,
        None => m.headers.clone(),
    };
    if answer.stale {
        h.insert(STALE, HeaderValue::from_static("1"));
    }
    Ok(resp)
}

async fn referrers(
    proxy: &Proxy,
    target: &Target,
    digest: &Digest,
    artifact_type: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let answer = proxy.referrers(target, digest, artifact_type).await?;
    let m = &answer.manifest;
    let mut resp = Response::new(Body::full(m.bytes.clone()));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(oci::OCI_INDEX));
    h.insert(CONTENT_LENGTH, m.bytes.len().into());
    if artifact_type.is_some() {
        h.insert(
            HeaderName::from_static("oci-filters-applied"),
            HeaderValue::from_static("artifactType"),
        );
    }
    if answer.stale {
        h.insert(STALE, HeaderValue::from_static("1"));
    }
    Ok(resp)
}

/// Notes a policy's decision for the access log.
fn admitted(
    admission: Result<Option<crate::policy::Admission>, proxy::Error>,
) -> Result<Option<crate::policy::Admission>, proxy::Error> {
    match &admission {
        Ok(Some(a)) => proxy::note_policy_decision(a.decision.as_str()),
        Err(proxy::Error::Denied(_)) => proxy::note_policy_decision("denied"),
        _ => {}
    }
    admission
}

fn digest_header(d: &Digest) -> HeaderValue {
    // Concatenated, not formatted: every manifest and blob answer carries one.
    let mut text = String::with_capacity(d.hex().len() + 7);
    text.push_str(d.algorithm().name());
    text.push(':');
    text.push_str(d.hex());
    HeaderValue::try_from(text).unwrap_or(HeaderValue::from_static(""))
}

async fn blob<B>(
    proxy: &Arc<Proxy>,
    target: &Target,
    digest: &Digest,
    req: &Request<B>,
    head: bool,
) -> Result<Response<Body>, ApiError> {
    let headers = req.headers();
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(DOCKER_CONTENT_DIGEST, digest_header(digest));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    admitted(proxy.admit_blob(target, digest))?;
    if head {
        if let Some(len) = proxy.blob_size(target, digest).await? {
            resp.headers_mut().insert(CONTENT_LENGTH, len.into());
        }
        return Ok(resp);
    }
    if let Some(location) = proxy.redirect(target, digest).await {
        if let Ok(v) = HeaderValue::from_str(&location) {
            *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            resp.headers_mut().insert(http::header::LOCATION, v);
            resp.headers_mut().remove(CONTENT_TYPE);
            return Ok(resp);
        }
    }
    let want = match headers.get(RANGE) {
        Some(_) => proxy::Want::Part,
        None => proxy::Want::Whole,
    };
    let answer = proxy.blob(target, digest, want).await?;
    // Not cached here (from the upstream, or from the bucket replicas share): the client is
    // pulling, the rest of its image may be fetched ahead.
    if matches!(proxy::current_lookup_result(), "miss" | "bucket") {
        proxy.layer_requested(target, digest);
    }
    send_blob(proxy, digest, answer, req, resp).await
}

/// Another replica of the cluster asking for a blob it knows this one is fetching: with the
/// cluster's secret only, and only what this replica has or is fetching (never a new fetch:
/// it is no proxy).
async fn peer_blob<B>(app: &App, req: &Request<B>, digest: &str) -> Result<Response<Body>, ApiError> {
    let proxy = &*app.proxy;
    let refused = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "peer requests need the cluster's secret",
        )
    };
    let cluster = proxy.cluster.as_ref().ok_or_else(refused)?;
    let presented = req
        .headers()
        .get(crate::cache::cluster::SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !cluster.admits(presented) {
        return Err(refused());
    }
    let digest = parse_digest(digest)?;
    let answer = proxy
        .peer_blob(&digest)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", format!("not here: {digest}")))?;
    let mut resp = Response::new(Body::empty());
    resp.headers_mut().insert(DOCKER_CONTENT_DIGEST, digest_header(&digest));
    resp.headers_mut()
        .insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    send_blob(proxy, &digest, answer, req, resp).await
}

/// Streams a blob answer into `resp` (its headers set), honouring Range.
async fn send_blob<B>(
    proxy: &Proxy,
    digest: &Digest,
    answer: BlobAnswer,
    req: &Request<B>,
    mut resp: Response<Body>,
) -> Result<Response<Body>, ApiError> {
    let headers = req.headers();
    // hyper writes an HTTP/1.1 body's chunks to the socket as they are; h2 and TLS copy
    // (and so read) them in user space, where a mapped page that faults would be a signal.
    let plain_tcp = crate::server::Peer::of(req).is_some_and(|p| p.plain_tcp);
    let reader = if plain_tcp && req.version() <= http::Version::HTTP_11 {
        Reader::Mapped
    } else {
        Reader::Client
    };
    let range = headers.get(RANGE).and_then(|v| v.to_str().ok()).and_then(parse_range);
    let (file, mut total, mut progress) = match answer {
        BlobAnswer::File { file, total, progress } => (file, total, progress),
        BlobAnswer::Bucket { bucket, total } => {
            let (start, end) = match place_range(range, Some(total), &mut resp) {
                Ok(placed) => placed,
                Err(total) => return Ok(unsatisfiable(total)),
            };
            let end = end.unwrap_or(total);
            let whole = start == 0 && end == total;
            let got = if whole {
                bucket.get(Kind::Blob, digest, 0).await
            } else {
                bucket.get_blob_range(digest, start, end).await
            };
            let source = match got {
                Ok(Some(source)) => source,
                // Collected or unreadable since it was found there: the client's retry
                // takes the next source.
                Ok(None) => {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UNAVAILABLE",
                        format!("{digest} left the shared bucket"),
                    ))
                }
                Err(e) => {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UNAVAILABLE",
                        format!("the shared bucket failed: {e}"),
                    ))
                }
            };
            resp.headers_mut().insert(CONTENT_LENGTH, (end - start).into());
            let (tx, body) = Body::channel();
            let served = proxy.metrics.bytes_served.with_label_values(&["bucket"]);
            let digest = digest.clone();
            tokio::spawn(async move {
                // The whole blob is verified on the way; a part cannot be (the bucket holds
                // only verified blobs), but must be exactly as long as asked.
                let sent = if whole {
                    stream_verified(source, digest, tx).await
                } else {
                    stream_exact(source, end - start, tx).await
                };
                served.inc_by(sent);
            });
            *resp.body_mut() = body;
            return Ok(resp);
        }
        BlobAnswer::PassThrough(source) => {
            // No file to seek in: the whole blob (RFC 9110 lets a server ignore Range).
            if let Some(total) = source.total {
                resp.headers_mut().insert(CONTENT_LENGTH, total.into());
            }
            let (tx, body) = Body::channel();
            let served = proxy.metrics.bytes_served.with_label_values(&["upstream"]);
            let digest = digest.clone();
            tokio::spawn(async move {
                served.inc_by(stream_verified(source, digest, tx).await);
            });
            *resp.body_mut() = body;
            return Ok(resp);
        }
    };
    if range.is_some() && total.is_none() {
        // Upstream sent no length: a range can only be placed once the fill is done.
        if let Some(progress) = &mut progress {
            let _ = progress
                .wait_for(|p| p.total.is_some() || matches!(p.state, crate::cache::fill::State::Failed(_)))
                .await;
            total = progress.borrow().total;
        }
    }
    let (start, end) = match place_range(range, total, &mut resp) {
        Ok(placed) => placed,
        Err(total) => return Ok(unsatisfiable(total)),
    };
    if let Some(end) = end {
        resp.headers_mut().insert(CONTENT_LENGTH, (end - start).into());
    }
    let (tx, body) = Body::channel();
    let source = if progress.is_some() { "fill" } else { "cache" };
    let served = proxy.metrics.bytes_served.with_label_values(&[source]);
    // Weak: a response still streaming must not keep a stopped cache (and its lock) open.
    let (cache, digest) = (Arc::downgrade(&proxy.cache), digest.clone());
    tokio::spawn(async move {
        let streamed = stream_file(file, start, end, progress, tx, reader).await;
        served.inc_by(streamed.sent);
        if let Some(cache) = cache.upgrade().filter(|_| streamed.damaged) {
            // One aborted response, then a refetch: never the process, never a wrong 200.
            let _ = tokio::task::spawn_blocking(move || cache.quarantine(Kind::Blob, &digest)).await;
        }
    });
    *resp.body_mut() = body;
    Ok(resp)
}

/// Where a requested range lies in a blob of `total` bytes: `(start, end)` with the 206
/// status and `Content-Range` set on `resp`, the whole blob without a range (or a length),
/// or `Err(total)` when the range lies outside.
fn place_range(
    range: Option<RangeSpec>,
    total: Option<u64>,
    resp: &mut Response<Body>,
) -> Result<(u64, Option<u64>), u64> {
    let (Some(spec), Some(total)) = (range, total) else {
        return Ok((0, total));
    };
    let Some((start, end)) = spec.resolve(total) else {
        return Err(total);
    };
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    let value = format!("bytes {start}-{}/{total}", end - 1);
    resp.headers_mut().insert(
        CONTENT_RANGE,
        HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("")),
    );
    Ok((start, Some(end)))
}

/// The 416 answer for a range outside a blob of `total` bytes.
fn unsatisfiable(total: u64) -> Response<Body> {
    let mut err = ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "BLOB_UNKNOWN",
        format!("range not satisfiable for a blob of {total} bytes"),
    )
    .into_response();
    let value = format!("bytes */{total}");
    err.headers_mut().insert(
        CONTENT_RANGE,
        HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("")),
    );
    err
}

/// Forwards exactly `len` bytes of `source`; a body that ends short or runs long is cut
/// with an error, never passed off as complete.
async fn stream_exact(
    mut source: crate::cache::fill::Source,
    len: u64,
    tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
) -> u64 {
    use http_body_util::BodyExt as _;
    let mut sent = 0u64;
    while let Some(frame) = source.body.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Err(e) => {
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                return sent;
            }
        };
        if sent + data.len() as u64 > len {
            let _ = tx
                .send(Err(std::io::Error::other("the bucket sent more than the range")))
                .await;
            return sent;
        }
        sent += data.len() as u64;
        if tx.send(Ok(data)).await.is_err() {
            return sent;
        }
    }
    if sent != len {
        let _ = tx
            .send(Err(std::io::Error::other(format!(
                "the bucket sent {sent} of {len} bytes"
            ))))
            .await;
    }
    sent
}

/// One `Range: bytes=…` spec; anything else (several ranges, other units) is ignored and
/// answered with the whole blob, as RFC 9110 allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    From(u64),
    FromTo(u64, u64),
    Suffix(u64),
}

pub fn parse_range(value: &str) -> Option<RangeSpec> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, false) => b.parse().ok().map(RangeSpec::Suffix),
        (false, true) => a.parse().ok().map(RangeSpec::From),
        (false, false) => {
            let (a, b) = (a.parse().ok()?, b.parse().ok()?);
            (a <= b).then_some(RangeSpec::FromTo(a, b))
        }
        (true, true) => None,
    }
}

impl RangeSpec {
    /// `[start, end)` within a blob of `total` bytes; `None` when unsatisfiable (416).
    pub fn resolve(self, total: u64) -> Option<(u64, u64)> {
        match self {
            RangeSpec::From(a) if a < total => Some((a, total)),
            RangeSpec::FromTo(a, b) if a < total => Some((a, b.saturating_add(1).min(total))),
            RangeSpec::Suffix(n) if n > 0 && total > 0 => Some((total.saturating_sub(n), total)),
            _ => None,
        }
    }
}

async fn tags_list(
    proxy: &Proxy,
    target: &Target,
    client_name: &str,
    ns: Option<&str>,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let n = query_param(query, "n");
    let last = query_param(query, "last");
    if n.as_deref().is_some_and(|n| n.parse::<u32>().is_err()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "PAGINATION_NUMBER_INVALID",
            "n must be a number",
        ));
    }
    if last.as_deref().is_some_and(|l| !oci::is_valid_tag(l)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
            "last must be a tag",
        ));
    }
    let upstream_query = pagination_query(n.as_deref(), last.as_deref());
    let (body, link) = proxy.tags_list(target, &upstream_query).await?;
    let mut resp = json_response(body.to_vec());
    if let Some(link) = link.and_then(|l| client_link(&l, client_name, ns)) {
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(LINK, v);
        }
    }
    Ok(resp)
}

fn pagination_query(n: Option<&str>, last: Option<&str>) -> String {
    let mut parts = Vec::new();
    if let Some(n) = n {
        parts.push(format!("n={n}"));
    }
    if let Some(last) = last {
        parts.push(format!("last={last}"));
    }
    parts.join("&")
}

/// The upstream's `Link: </v2/<upstream name>/tags/list?…>; rel="next"`, pointing at the
/// same page through regcache as this client addresses it.
fn client_link(upstream_link: &str, client_name: &str, ns: Option<&str>) -> Option<String> {
    let inner = upstream_link.split('>').next()?.trim().strip_prefix('<')?;
    let query = inner.split_once('?').map(|(_, q)| q);
    let n = query_param(query, "n").filter(|n| n.parse::<u32>().is_ok());
    let last = query_param(query, "last").filter(|l| oci::is_valid_tag(l));
    let mut q = pagination_query(n.as_deref(), last.as_deref());
    if let Some(ns) = ns {
        if !q.is_empty() {
            q.push('&');
        }
        q.push_str("ns=");
        q.push_str(ns);
    }
    Some(format!("</v2/{client_name}/tags/list?{q}>; rel=\"next\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, from its type alone.
    fn future_size<A, R, F: std::future::Future>(_: fn(A, R) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_request_future_stays_small_so_warm_hits_do_not_move_the_cold_paths_state() {
        // hyper moves each request's future into its connection's slot; when fetches, policy
        // checks and blob streaming were inlined it was 19.7 KiB (release build), copied on
        // every warm manifest hit. The slow paths are boxed; this keeps them so.
        let size = future_size(handle::<http_body_util::Empty<bytes::Bytes>>);
        assert!(size <= 6 * 1024, "handle's future is {size} bytes");
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=10-"), Some(RangeSpec::From(10)));
        assert_eq!(parse_range("bytes=0-99"), Some(RangeSpec::FromTo(0, 99)));
        assert_eq!(parse_range("bytes=-5"), Some(RangeSpec::Suffix(5)));
        assert_eq!(parse_range("bytes=5-1"), None);
        assert_eq!(parse_range("bytes=0-1,5-6"), None);
        assert_eq!(parse_range("items=0-1"), None);
        assert_eq!(RangeSpec::From(10).resolve(100), Some((10, 100)));
        assert_eq!(RangeSpec::From(100).resolve(100), None);
        assert_eq!(RangeSpec::FromTo(90, 500).resolve(100), Some((90, 100)));
        assert_eq!(RangeSpec::Suffix(500).resolve(100), Some((0, 100)));
        assert_eq!(RangeSpec::Suffix(0).resolve(100), None);
    }

    proptest::proptest! {
        #[test]
        fn ranges_never_panic_and_stay_inside_the_blob(s in "\\PC{0,60}", total in 0u64..u64::MAX) {
            if let Some((start, end)) = parse_range(&s).and_then(|r| r.resolve(total)) {
                proptest::prop_assert!(start < end && end <= total);
            }
        }

        #[test]
        fn numeric_ranges_resolve_as_rfc_9110_says(a in 0u64..1000, b in 0u64..1000, total in 1u64..1000) {
            if let Some((start, end)) = parse_range(&format!("bytes={a}-{b}")).and_then(|r| r.resolve(total)) {
                proptest::prop_assert_eq!((start, end), (a, (b + 1).min(total)));
            } else {
                proptest::prop_assert!(a > b || a >= total);
            }
        }
    }

    #[test]
    fn links_point_back_through_regcache() {
        let up = "</v2/library/alpine/tags/list?last=3.18&n=2>; rel=\"next\"";
        assert_eq!(
            client_link(up, "docker.io/library/alpine", None).unwrap(),
            "</v2/docker.io/library/alpine/tags/list?n=2&last=3.18>; rel=\"next\""
        );
        assert_eq!(
            client_link(up, "library/alpine", Some("docker.io")).unwrap(),
            "</v2/library/alpine/tags/list?n=2&last=3.18&ns=docker.io>; rel=\"next\""
        );
    }
}
