//! Talking to one upstream registry: the shared hyper-util client over rustls (webpki and
//! native roots, HTTP/1.1 and h2 by ALPN), timeouts, redirects (bounded; `Authorization`
//! never follows to another host), and the distribution API calls regcache makes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{
    HeaderName, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LINK, LOCATION, RANGE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::cache::fill::Source;
use crate::config::UpstreamConfig;
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::oci::RepoName;

pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

const MAX_REDIRECTS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Manifests and tag lists are small; anything larger is refused, not buffered.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

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
    #[error("upstream {upstream} did not answer within {0:?}", RESPONSE_TIMEOUT)]
    Timeout { upstream: String },
    #[error("upstream {upstream} sent a bad answer: {message}")]
    Protocol { upstream: String, message: String },
}

impl Error {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Builds the one HTTP client shared by every upstream (one pool, one TLS config).
pub fn http_client() -> HttpClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(native_roots = added, "TLS roots loaded");
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .unwrap_or_else(|e| panic!("ring supports the default TLS versions: {e}"));
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
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

pub struct Upstream {
    pub name: String,
    base: String,
    pub tag_ttl: Duration,
    http: HttpClient,
    metrics: Arc<Metrics>,
}

fn header_str(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, http: HttpClient, metrics: Arc<Metrics>) -> Upstream {
        Upstream {
            name: config.name.clone(),
            base: config.url.trim_end_matches('/').to_owned(),
            tag_ttl: config.tag_ttl.0,
            http,
            metrics,
        }
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

    /// Sends one request, following redirects; any answer but 2xx becomes an error.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(HeaderName, String)],
    ) -> Result<Response<Incoming>, Error> {
        let mut url: Uri = format!("{}{}", self.base, path)
            .parse()
            .map_err(|e| self.protocol(format!("bad URL: {e}")))?;
        let origin = url.authority().cloned();
        for _hop in 0..=MAX_REDIRECTS {
            let same_host = url.authority() == origin.as_ref();
            let mut req = Request::builder().method(method.clone()).uri(url.clone());
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
            let resp = match tokio::time::timeout(RESPONSE_TIMEOUT, self.http.request(req)).await {
                Err(_) => {
                    self.observe(&method, "timeout", started);
                    return Err(Error::Timeout {
                        upstream: self.name.clone(),
                    });
                }
                Ok(Err(e)) => {
                    self.observe(&method, "error", started);
                    return Err(self.unreachable(error_chain(&e)));
                }
                Ok(Ok(resp)) => resp,
            };
            let status = resp.status();
            self.observe(&method, status.as_str(), started);
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                let location =
                    header_str(resp.headers(), LOCATION).ok_or_else(|| self.protocol("redirect without Location"))?;
                url = resolve(&url, &location)
                    .ok_or_else(|| self.protocol(format!("bad redirect Location {location:?}")))?;
                continue;
            }
            if !status.is_success() {
                return Err(Error::Status {
                    upstream: self.name.clone(),
                    status,
                    retry_after: header_str(resp.headers(), http::header::RETRY_AFTER),
                    what: format!("{method} {path}"),
                });
            }
            return Ok(resp);
        }
        Err(self.protocol(format!("more than {MAX_REDIRECTS} redirects")))
    }

    pub async fn get_manifest(&self, repo: &RepoName, reference: &str, accept: &str) -> Result<FetchedManifest, Error> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self.send(Method::GET, &path, &[(ACCEPT, accept.to_owned())]).await?;
        let content_type = header_str(resp.headers(), CONTENT_TYPE);
        let digest = header_str(resp.headers(), HeaderName::from_static("docker-content-digest"));
        let bytes = read_small(resp, &self.name).await?;
        Ok(FetchedManifest {
            bytes,
            content_type,
            digest,
        })
    }

    pub async fn head_manifest(&self, repo: &RepoName, reference: &str, accept: &str) -> Result<ManifestHead, Error> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self.send(Method::HEAD, &path, &[(ACCEPT, accept.to_owned())]).await?;
        let h = resp.headers();
        Ok(ManifestHead {
            digest: header_str(h, HeaderName::from_static("docker-content-digest")),
            content_type: header_str(h, CONTENT_TYPE),
            length: header_str(h, CONTENT_LENGTH).and_then(|v| v.parse().ok()),
        })
    }

    /// Opens a blob from byte `offset` on, for a fill.
    pub async fn get_blob(&self, repo: &RepoName, digest: &Digest, offset: u64) -> Result<Source, Error> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let mut headers = Vec::new();
        if offset > 0 {
            headers.push((RANGE, format!("bytes={offset}-")));
        }
        let resp = self.send(Method::GET, &path, &headers).await?;
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
        let body = resp
            .into_body()
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
        Ok(Source {
            total,
            offset: start,
            body: body.boxed(),
        })
    }

    pub async fn head_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, Error> {
        let resp = self
            .send(Method::HEAD, &format!("/v2/{repo}/blobs/{digest}"), &[])
            .await?;
        Ok(header_str(resp.headers(), CONTENT_LENGTH).and_then(|v| v.parse().ok()))
    }

    /// `tags/list` with the client's `n`/`last`; returns the body and the upstream's `Link`.
    pub async fn tags_list(&self, repo: &RepoName, query: &str) -> Result<(Bytes, Option<String>), Error> {
        let mut path = format!("/v2/{repo}/tags/list");
        if !query.is_empty() {
            path.push('?');
            path.push_str(query);
        }
        let resp = self.send(Method::GET, &path, &[]).await?;
        let link = header_str(resp.headers(), LINK);
        Ok((read_small(resp, &self.name).await?, link))
    }
}

async fn read_small(resp: Response<Incoming>, upstream: &str) -> Result<Bytes, Error> {
    let limited = Limited::new(resp.into_body(), MAX_MANIFEST_BYTES);
    match tokio::time::timeout(RESPONSE_TIMEOUT, limited.collect()).await {
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
}
