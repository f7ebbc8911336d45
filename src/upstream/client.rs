//! Talking to one upstream registry: a hyper-util client over rustls (webpki and native
//! roots, HTTP/1.1 and h2 by ALPN), timeouts, redirects (bounded; `Authorization` never
//! follows to another host), authentication (see `auth.rs`), rate-limit headers, the
//! `Retry-After` back-off, the circuit breaker and offline mode; and the distribution API
//! calls regcache makes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{
    HeaderName, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LINK, LOCATION, RANGE, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::auth::{self, Challenge, Credentials, Secret, TokenCache};
use super::egress::{self, Egress};
use crate::cache::fill::Source;
use crate::config::{Config, UpstreamConfig};
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::oci::RepoName;
use crate::single_flight::SingleFlight;

pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector<egress::GuardedResolver>>, Empty<Bytes>>;

const MAX_REDIRECTS: usize = 5;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Without a usable `Retry-After`, a 429 keeps an upstream alone for this long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The longest back-off any `Retry-After` can ask for (a huge value must not overflow).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What a request asks for. A 429 quiets only requests of its class to the host that
/// answered it: Docker Hub limits manifest GETs, not the HEADs that revalidate tags, nor
/// blob downloads (which a CDN answers anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    ManifestGet,
    ManifestHead,
    BlobGet,
    BlobHead,
    Token,
    Other,
}

impl Class {
    fn of(method: &Method, path: &str) -> Class {
        let head = *method == Method::HEAD;
        if path.contains("/manifests/") {
            if head {
                Class::ManifestHead
            } else {
                Class::ManifestGet
            }
        } else if path.contains("/blobs/") {
            if head {
                Class::BlobHead
            } else {
                Class::BlobGet
            }
        } else {
            Class::Other
        }
    }
}

/// How long a 429 asks to wait: `Retry-After` seconds, capped; the default otherwise.
pub fn retry_after(value: Option<&str>) -> Duration {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY_AFTER, |s| {
            Duration::from_secs(s.min(MAX_RETRY_AFTER.as_secs()))
        })
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("upstream {upstream} answered {status} to {what}")]
    Status {
        upstream: String,
        status: StatusCode,
        retry_after: Option<String>,
        what: String,
    },
    #[error("cannot reach upstream {upstream}: {message}")]
    Unreachable { upstream: String, message: String },
    #[error("upstream {upstream} did not answer in time")]
    Timeout { upstream: String },
    #[error("upstream {upstream} sent a bad answer: {message}")]
    Protocol { upstream: String, message: String },
    #[error("upstream {upstream} is down (circuit open after repeated failures); not contacting it")]
    Down { upstream: String },
    #[error("upstream {upstream} is offline by configuration")]
    Offline { upstream: String },
    #[error("upstream {upstream} pointed regcache somewhere it may not go: {message}")]
    Refused { upstream: String, message: String },
    /// regcache itself is out of file descriptors: not the upstream's fault.
    #[error("cannot reach upstream {upstream}: regcache is out of file descriptors")]
    Overloaded { upstream: String },
}

impl Error {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The upstream could not give an answer (as opposed to answering "no"): the cases in
    /// which a cached answer is served instead.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Status { status, .. } => status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS,
            Error::Unreachable { .. } | Error::Timeout { .. } | Error::Down { .. } | Error::Offline { .. } => true,
            Error::Overloaded { .. } => true,
            Error::Protocol { .. } | Error::Refused { .. } => false,
        }
    }
}

/// An HTTP client (its own connection pool) for one upstream.
pub fn http_client(tls: rustls::ClientConfig, connect_timeout: Duration, egress: Egress) -> HttpClient {
    let mut http = HttpConnector::new_with_resolver(egress::GuardedResolver::new(egress));
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(https)
}

/// A manifest as the upstream answered it.
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub content_type: Option<String>,
    pub digest: Option<String>,
}

/// What a HEAD of a manifest said.
pub struct ManifestHead {
    pub digest: Option<String>,
    pub content_type: Option<String>,
    pub length: Option<u64>,
}

/// The upstream's health as regcache sees it.
#[derive(Default)]
struct Health {
    consecutive_failures: u32,
    circuit_open: bool,
    probing: bool,
    /// A 429's `Retry-After` for (request class, host that answered): no such request
    /// before then.
    quiet_until: std::collections::HashMap<(Class, String), Instant>,
}

pub struct Upstream {
    pub name: String,
    base: String,
    pub tag_ttl: Duration,
    pub max_stale: Option<Duration>,
    pub offline: bool,
    http: HttpClient,
    metrics: Arc<Metrics>,
    credentials: Option<Credentials>,
    trusted_realms: Vec<String>,
    egress: Egress,
    response_timeout: Duration,
    /// Largest manifest, tag list or referrers answer accepted.
    max_body: usize,
    circuit_failures: u32,
    circuit_cooldown: Duration,
    health: Arc<Mutex<Health>>,
    tokens: TokenCache,
    token_flights: SingleFlight<String, Result<Secret, Error>>,
    /// The upstream asked for Basic auth once: send it up front from then on.
    basic_only: std::sync::atomic::AtomicBool,
}

fn header_str(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// The `pull` scope of a repository, as token services expect it.
fn pull_scope(repo: &RepoName) -> String {
    format!("repository:{repo}:pull")
}

/// Query-string encoding of one value (RFC 3986 unreserved characters pass through).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Upstream {
    /// The registry's base URL, as configured.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn new(config: &UpstreamConfig, tls: rustls::ClientConfig, metrics: Arc<Metrics>, all: &Config) -> Upstream {
        let credentials = config
            .credentials()
            .ok()
            .flatten()
            .map(|(username, password)| Credentials {
                username,
                password: Secret(password),
            });
        metrics.circuit_open.with_label_values(&[&config.name]).set(0);
        Upstream {
            name: config.name.clone(),
            base: config.url.trim_end_matches('/').to_owned(),
            tag_ttl: config.tag_ttl.0,
            max_stale: config.max_stale.map(|d| d.0),
            offline: config.offline || all.cache.offline,
            max_body: all.limits.max_manifest_size.0.min(usize::MAX as u64) as usize,
            http: http_client(tls, config.connect_timeout.0, upstream_egress(config)),
            metrics,
            credentials,
            trusted_realms: config.trusted_realms.iter().map(|r| r.to_ascii_lowercase()).collect(),
            egress: upstream_egress(config),
            response_timeout: config.response_timeout.0,
            circuit_failures: config.circuit_failures,
            circuit_cooldown: config.circuit_cooldown.0,
            health: Arc::default(),
            tokens: TokenCache::default(),
            token_flights: SingleFlight::default(),
            basic_only: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn circuit_is_open(&self) -> bool {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).circuit_open
    }

    /// Counts one upstream exchange: its status, or `error`/`timeout`.
    fn observe(&self, method: &Method, outcome: &str, started: Instant) {
        self.metrics
            .upstream_requests
            .with_label_values(&[&self.name, method.as_str(), outcome])
            .inc();
        self.metrics
            .upstream_duration
            .with_label_values(&[&self.name, method.as_str()])
            .observe(started.elapsed().as_secs_f64());
    }

    fn unreachable(&self, message: impl ToString) -> Error {
        Error::Unreachable {
            upstream: self.name.clone(),
            message: message.to_string(),
        }
    }

    fn protocol(&self, message: impl ToString) -> Error {
        Error::Protocol {
            upstream: self.name.clone(),
            message: message.to_string(),
        }
    }

    /// Refuses at once when the upstream must not be contacted now.
    fn admit(&self) -> Result<(), Error> {
        if self.offline {
            return Err(Error::Offline {
                upstream: self.name.clone(),
            });
        }
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if health.circuit_open {
            return Err(Error::Down {
                upstream: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Records how an exchange went, for the circuit breaker and the 429 back-off.
    fn record(self: &Arc<Self>, outcome: &Result<Response<Incoming>, Error>) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let failed = match outcome {
            // A 429 is an answer (the back-off is recorded per class and host by exchange).
            Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS => false,
            Ok(resp) => resp.status().is_server_error(),
            Err(Error::Unreachable { .. } | Error::Timeout { .. }) => true,
            Err(_) => false,
        };
        if !failed {
            health.consecutive_failures = 0;
            return;
        }
        health.consecutive_failures += 1;
        if health.consecutive_failures >= self.circuit_failures && !health.circuit_open {
            health.circuit_open = true;
            self.metrics.circuit_open.with_label_values(&[&self.name]).set(1);
            tracing::warn!(upstream = %self.name, failures = health.consecutive_failures,
                "upstream marked down; answering from cache until a probe succeeds");
            if !health.probing {
                health.probing = true;
                tokio::spawn(self.clone().probe());
            }
        }
    }

    /// While the circuit is open: every cool-down, ask `/v2/`; any answer below 500 closes it.
    async fn probe(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.circuit_cooldown).await;
            let url = format!("{}/v2/", self.base);
            let Ok(req) = Request::get(url).body(Empty::new()) else {
                return;
            };
            let up = matches!(
                tokio::time::timeout(self.response_timeout, self.http.request(req)).await,
                Ok(Ok(resp)) if !resp.status().is_server_error()
            );
            if up {
                let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
                health.circuit_open = false;
                health.probing = false;
                health.consecutive_failures = 0;
                self.metrics.circuit_open.with_label_values(&[&self.name]).set(0);
                tracing::info!(upstream = %self.name, "upstream answers again; circuit closed");
                return;
            }
        }
    }

    fn note_rate_limit(&self, headers: &HeaderMap) {
        // "100;w=21600": the number before any parameter.
        let value =
            |name: &str| -> Option<i64> { headers.get(name)?.to_str().ok()?.split(';').next()?.trim().parse().ok() };
        if let Some(limit) = value("ratelimit-limit") {
            self.metrics.ratelimit_limit.with_label_values(&[&self.name]).set(limit);
        }
        if let Some(remaining) = value("ratelimit-remaining") {
            self.metrics
                .ratelimit_remaining
                .with_label_values(&[&self.name])
                .set(remaining);
        }
    }

    /// One request, following redirects; returns whatever status the last hop answered.
    /// Every hop the upstream chose (redirects; the first one too when `untrusted`, as for
    /// a token realm) is checked against the egress rules first, and no request of a class
    /// goes to a host still within the `Retry-After` of a 429 it gave for that class.
    async fn exchange(
        &self,
        method: &Method,
        url: &str,
        headers: &[(HeaderName, String)],
        class: Class,
        untrusted: bool,
    ) -> Result<Response<Incoming>, Error> {
        let mut url: Uri = url.parse().map_err(|e| self.protocol(format!("bad URL: {e}")))?;
        let origin = url.authority().cloned();
        let mut previous: Option<Uri> = None;
        for _hop in 0..=MAX_REDIRECTS {
            if untrusted || previous.is_some() {
                let from = previous.clone().unwrap_or_else(|| self.egress_base());
                if let Err(refused) = self.egress.check(&from, &url).await {
                    tracing::warn!(upstream = %self.name, error = %refused, "refusing an upstream-chosen target");
                    return Err(Error::Refused {
                        upstream: self.name.clone(),
                        message: refused.to_string(),
                    });
                }
            }
            let host = url
                .authority()
                .map(|a| a.as_str().to_ascii_lowercase())
                .unwrap_or_default();
            self.check_quiet(class, &host)?;
            let same_host = url.authority() == origin.as_ref();
            let mut req = Request::builder().method(method.clone()).uri(url.clone()).header(
                http::header::USER_AGENT,
                concat!("regcache/", env!("CARGO_PKG_VERSION")),
            );
            for (name, value) in headers {
                // Credentials belong to the upstream's own host only (S3 and CDNs reject them).
                if *name == AUTHORIZATION && !same_host {
                    continue;
                }
                req = req.header(name, value);
            }
            let req = req
                .body(Empty::new())
                .map_err(|e| self.protocol(format!("cannot build request: {e}")))?;
            let started = Instant::now();
            let resp = match tokio::time::timeout(self.response_timeout, self.http.request(req)).await {
                Err(_) => {
                    self.observe(method, "timeout", started);
                    return Err(Error::Timeout {
                        upstream: self.name.clone(),
                    });
                }
                Ok(Err(e)) => {
                    self.observe(method, "error", started);
                    if out_of_descriptors(&e) {
                        return Err(Error::Overloaded {
                            upstream: self.name.clone(),
                        });
                    }
                    return Err(self.unreachable(error_chain(&e)));
                }
                Ok(Ok(resp)) => resp,
            };
            let status = resp.status();
            self.observe(method, status.as_str(), started);
            self.note_rate_limit(resp.headers());
            if status == StatusCode::TOO_MANY_REQUESTS {
                let wait = retry_after(header_str(resp.headers(), RETRY_AFTER).as_deref());
                let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
                health.quiet_until.insert((class, host.clone()), Instant::now() + wait);
                tracing::warn!(upstream = %self.name, %host, ?class, ?wait, "upstream rate limit hit; backing off");
            }
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                let location =
                    header_str(resp.headers(), LOCATION).ok_or_else(|| self.protocol("redirect without Location"))?;
                let next = resolve(&url, &location)
                    .ok_or_else(|| self.protocol(format!("bad redirect Location {location:?}")))?;
                previous = Some(std::mem::replace(&mut url, next));
                continue;
            }
            return Ok(resp);
        }
        Err(self.protocol(format!("more than {MAX_REDIRECTS} redirects")))
    }

    fn egress_base(&self) -> Uri {
        self.base.parse().unwrap_or_default()
    }

    /// Refuses a request of `class` to `host` while a 429's `Retry-After` runs.
    fn check_quiet(&self, class: Class, host: &str) -> Result<(), Error> {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let Some(until) = health.quiet_until.get(&(class, host.to_owned())) else {
            return Ok(());
        };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        Err(Error::Status {
            upstream: self.name.clone(),
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(left.as_secs().max(1).to_string()),
            what: "a request (still within its Retry-After)".into(),
        })
    }

    /// The `Authorization` to send up front for a scope: a cached token, or Basic for a
    /// registry known to want it.
    fn authorization(&self, scope: &str) -> Option<String> {
        if let Some(token) = self.tokens.get(scope, Instant::now()) {
            return Some(format!("Bearer {}", token.0));
        }
        if self.basic_only.load(std::sync::atomic::Ordering::Relaxed) {
            return self.credentials.as_ref().map(Credentials::basic_header);
        }
        None
    }

    /// Sends a request for `scope`, answering an auth challenge once; any answer but 2xx
    /// becomes an error.
    async fn send(
        self: &Arc<Self>,
        method: Method,
        path: &str,
        headers: &[(HeaderName, String)],
        scope: &str,
    ) -> Result<Response<Incoming>, Error> {
        self.admit()?;
        let url = format!("{}{path}", self.base);
        let mut all = headers.to_vec();
        let sent_auth = self.authorization(scope);
        if let Some(a) = &sent_auth {
            all.push((AUTHORIZATION, a.clone()));
        }
        let class = Class::of(&method, path);
        let mut result = self.exchange(&method, &url, &all, class, false).await;
        if let Ok(resp) = &result {
            if resp.status() == StatusCode::UNAUTHORIZED {
                let challenge = header_str(resp.headers(), WWW_AUTHENTICATE).and_then(|h| auth::parse_challenge(&h));
                if let Some(authorization) = self.answer(challenge, scope, sent_auth.is_some()).await? {
                    all.retain(|(n, _)| *n != AUTHORIZATION);
                    all.push((AUTHORIZATION, authorization));
                    result = self.exchange(&method, &url, &all, class, false).await;
                }
            }
        }
        self.record(&result);
        let resp = result?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status == StatusCode::UNAUTHORIZED {
            self.tokens.forget(scope);
        }
        Err(Error::Status {
            upstream: self.name.clone(),
            status,
            // Passed on to clients: as capped seconds, never the upstream's raw text.
            retry_after: (status == StatusCode::TOO_MANY_REQUESTS).then(|| {
                retry_after(header_str(resp.headers(), RETRY_AFTER).as_deref())
                    .as_secs()
                    .to_string()
            }),
            what: format!("{method} {path}"),
        })
    }

    /// What to send after a 401: a fresh token for a Bearer challenge, Basic credentials for
    /// a Basic one; `None` when there is nothing better to try.
    async fn answer(&self, challenge: Option<Challenge>, scope: &str, had_auth: bool) -> Result<Option<String>, Error> {
        match challenge {
            Some(Challenge::Bearer {
                realm,
                service,
                scope: asked,
            }) => {
                if had_auth {
                    self.tokens.forget(scope);
                }
                let scope_key = scope.to_owned();
                let token = self
                    .token_flights
                    .run(scope_key, || {
                        self.fetch_token(&realm, service.as_deref(), asked.as_deref().unwrap_or(scope), scope)
                    })
                    .await?;
                Ok(Some(format!("Bearer {}", token.0)))
            }
            Some(Challenge::Basic) => {
                let Some(c) = &self.credentials else { return Ok(None) };
                // Basic already went with this request: the credentials are wrong.
                let was_basic = self.basic_only.swap(true, std::sync::atomic::Ordering::Relaxed);
                let sent_basic = had_auth && was_basic;
                Ok((!sent_basic).then(|| c.basic_header()))
            }
            None => Ok(None),
        }
    }

    /// Whether credentials may be sent to this token realm.
    fn trusts_realm(&self, realm: &Uri) -> bool {
        let Some(realm_host) = realm.host() else { return false };
        let realm_host = realm_host.to_ascii_lowercase();
        if self.trusted_realms.contains(&realm_host) {
            return true;
        }
        let Some(own) = self.base.parse::<Uri>().ok().and_then(|u| u.host().map(str::to_owned)) else {
            return false;
        };
        // No credentials over plain HTTP to a realm unless the upstream itself is plain HTTP.
        let downgrade = realm.scheme_str() == Some("http") && self.base.starts_with("https://");
        !downgrade && egress::registrable_domain(&realm_host) == egress::registrable_domain(&own)
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        cache_key: &str,
    ) -> Result<Secret, Error> {
        if let Some(token) = self.tokens.get(cache_key, Instant::now()) {
            return Ok(token);
        }
        let realm_uri: Uri = realm
            .parse()
            .map_err(|_| self.protocol(format!("bad token realm {realm:?}")))?;
        if !matches!(realm_uri.scheme_str(), Some("http" | "https")) {
            return Err(self.protocol(format!("bad token realm {realm:?}")));
        }
        let mut query = Vec::new();
        if let Some(service) = service {
            query.push(format!("service={}", encode(service)));
        }
        if !scope.is_empty() {
            query.push(format!("scope={}", encode(scope)));
        }
        let sep = if realm.contains('?') { '&' } else { '?' };
        let url = if query.is_empty() {
            realm.to_owned()
        } else {
            format!("{realm}{sep}{}", query.join("&"))
        };
        let mut headers = Vec::new();
        match &self.credentials {
            Some(c) if self.trusts_realm(&realm_uri) => headers.push((AUTHORIZATION, c.basic_header())),
            Some(_) => tracing::warn!(upstream = %self.name, realm_host = ?realm_uri.host(),
                "token realm is not on the upstream's domain nor in trusted_realms; asking it anonymously"),
            None => {}
        }
        let resp = self.exchange(&Method::GET, &url, &headers, Class::Token, true).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(Error::Status {
                upstream: self.name.clone(),
                status: if status == StatusCode::FORBIDDEN {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::UNAUTHORIZED
                },
                retry_after: None,
                what: format!("the token request (token service answered {status})"),
            });
        }
        let body = read_small(resp, &self.name, self.response_timeout, self.max_body).await?;
        let token = auth::parse_token_response(&body, Instant::now())
            .ok_or_else(|| self.protocol("the token service's answer has no token"))?;
        self.metrics.tokens_fetched.with_label_values(&[&self.name]).inc();
        self.tokens.put(cache_key, token.clone());
        Ok(token.value)
    }

    pub async fn get_manifest(
        self: &Arc<Self>,
        repo: &RepoName,
        reference: &str,
        accept: &str,
    ) -> Result<FetchedManifest, Error> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(Method::GET, &path, &[(ACCEPT, accept.to_owned())], &pull_scope(repo))
            .await?;
        let content_type = header_str(resp.headers(), CONTENT_TYPE);
        let digest = header_str(resp.headers(), HeaderName::from_static("docker-content-digest"));
        let bytes = read_small(resp, &self.name, self.response_timeout, self.max_body).await?;
        Ok(FetchedManifest {
            bytes,
            content_type,
            digest,
        })
    }

    pub async fn head_manifest(
        self: &Arc<Self>,
        repo: &RepoName,
        reference: &str,
        accept: &str,
    ) -> Result<ManifestHead, Error> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(Method::HEAD, &path, &[(ACCEPT, accept.to_owned())], &pull_scope(repo))
            .await?;
        let h = resp.headers();
        Ok(ManifestHead {
            digest: header_str(h, HeaderName::from_static("docker-content-digest")),
            content_type: header_str(h, CONTENT_TYPE),
            length: header_str(h, CONTENT_LENGTH).and_then(|v| v.parse().ok()),
        })
    }

    /// Opens a blob from byte `offset` on, for a fill.
    pub async fn get_blob(self: &Arc<Self>, repo: &RepoName, digest: &Digest, offset: u64) -> Result<Source, Error> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let mut headers = Vec::new();
        if offset > 0 {
            headers.push((RANGE, format!("bytes={offset}-")));
        }
        let resp = self.send(Method::GET, &path, &headers, &pull_scope(repo)).await?;
        let h = resp.headers();
        let length: Option<u64> = header_str(h, CONTENT_LENGTH).and_then(|v| v.parse().ok());
        let (start, total) = if resp.status() == StatusCode::PARTIAL_CONTENT {
            // "bytes START-END/TOTAL"
            let range = header_str(h, CONTENT_RANGE).unwrap_or_default();
            let parsed = range.strip_prefix("bytes ").and_then(|r| {
                let (span, total) = r.split_once('/')?;
                let start: u64 = span.split_once('-')?.0.parse().ok()?;
                Some((start, total.parse::<u64>().ok()))
            });
            parsed.ok_or_else(|| self.protocol(format!("bad Content-Range {range:?}")))?
        } else {
            (0, length)
        };
        let received = self.metrics.upstream_bytes.with_label_values(&[&self.name]);
        let body = resp
            .into_body()
            .map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    received.inc_by(data.len() as u64);
                }
                frame
            })
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
        Ok(Source {
            total,
            offset: start,
            body: body.boxed(),
            reopen: None,
        })
    }

    pub async fn head_blob(self: &Arc<Self>, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, Error> {
        let resp = self
            .send(
                Method::HEAD,
                &format!("/v2/{repo}/blobs/{digest}"),
                &[],
                &pull_scope(repo),
            )
            .await?;
        Ok(header_str(resp.headers(), CONTENT_LENGTH).and_then(|v| v.parse().ok()))
    }

    /// `tags/list` with the client's `n`/`last`; returns the body and the upstream's `Link`.
    pub async fn tags_list(self: &Arc<Self>, repo: &RepoName, query: &str) -> Result<(Bytes, Option<String>), Error> {
        let mut path = format!("/v2/{repo}/tags/list");
        if !query.is_empty() {
            path.push('?');
            path.push_str(query);
        }
        let resp = self.send(Method::GET, &path, &[], &pull_scope(repo)).await?;
        let link = header_str(resp.headers(), LINK);
        Ok((
            read_small(resp, &self.name, self.response_timeout, self.max_body).await?,
            link,
        ))
    }

    /// The referrers API (OCI 1.1). Returns the index bytes and whether the upstream applied
    /// the `artifactType` filter.
    pub async fn referrers(
        self: &Arc<Self>,
        repo: &RepoName,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<(Bytes, bool), Error> {
        let mut path = format!("/v2/{repo}/referrers/{digest}");
        if let Some(t) = artifact_type {
            path.push_str(&format!("?artifactType={}", encode(t)));
        }
        let accept = (ACCEPT, crate::oci::OCI_INDEX.to_owned());
        let resp = self.send(Method::GET, &path, &[accept], &pull_scope(repo)).await?;
        let filtered = header_str(resp.headers(), HeaderName::from_static("oci-filters-applied"))
            .is_some_and(|v| v.split(',').any(|f| f.trim() == "artifactType"));
        Ok((
            read_small(resp, &self.name, self.response_timeout, self.max_body).await?,
            filtered,
        ))
    }
}

async fn read_small(resp: Response<Incoming>, upstream: &str, timeout: Duration, max: usize) -> Result<Bytes, Error> {
    let limited = Limited::new(resp.into_body(), max);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) => Err(Error::Protocol {
            upstream: upstream.to_owned(),
            message: format!("reading body: {e}"),
        }),
        Err(_) => Err(Error::Timeout {
            upstream: upstream.to_owned(),
        }),
    }
}

/// Resolves a redirect `Location` (absolute, or a path on the same host).
fn resolve(base: &Uri, location: &str) -> Option<Uri> {
    let loc: Uri = location.parse().ok()?;
    if loc.scheme().is_some() {
        return match loc.scheme_str() {
            Some("http") | Some("https") if loc.authority().is_some() => Some(loc),
            _ => None,
        };
    }
    if !location.starts_with('/') {
        return None;
    }
    Uri::builder()
        .scheme(base.scheme()?.clone())
        .authority(base.authority()?.clone())
        .path_and_query(location)
        .build()
        .ok()
}

/// The egress rules of one upstream: its own URL and its `redirect_allow` list.
fn upstream_egress(config: &UpstreamConfig) -> Egress {
    Egress::new(
        config.url.parse().unwrap_or_default(),
        config
            .redirect_allow
            .iter()
            .filter_map(|a| egress::Allowed::parse(a))
            .collect(),
    )
}

/// Whether an error was caused by this process (or the system) running out of descriptors.
fn out_of_descriptors(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(23 | 24)) {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// An error with its sources, for messages that say what actually failed.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_resolution() {
        let base: Uri = "https://registry-1.docker.io/v2/library/alpine/blobs/sha256:x"
            .parse()
            .unwrap();
        assert_eq!(
            resolve(&base, "https://cdn.example/abc?sig=1").unwrap().to_string(),
            "https://cdn.example/abc?sig=1"
        );
        assert_eq!(
            resolve(&base, "/other/path").unwrap().to_string(),
            "https://registry-1.docker.io/other/path"
        );
        assert!(resolve(&base, "ftp://x/y").is_none());
        assert!(resolve(&base, "relative").is_none());
    }

    #[test]
    fn query_encoding() {
        assert_eq!(
            encode("repository:library/alpine:pull"),
            "repository%3Alibrary%2Falpine%3Apull"
        );
        assert_eq!(encode("registry.docker.io"), "registry.docker.io");
    }
}
