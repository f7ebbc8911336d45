//! `regcache prefetch`: fills a cache with whole images before anyone pulls them (the edge
//! mirror's way in while the link is up). It is a client of a regcache server: a running
//! one (`--server`, no restart and no second writer on its cache), or one started in this
//! process on the cache dir (which takes the cache-dir lock). So every byte goes through the
//! server's own verified, coalesced fill path, and a second run fetches nothing upstream.
//!
//! For each image it takes the manifest (an index: the selected platforms' manifests), each
//! manifest's config and layers, and what is attached to each digest: OCI referrers and
//! cosign's `sha256-<hex>.sig` / `.att` / `.sbom` tags, with their blobs.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::oci;

/// An image as Docker names it, normalized: `alpine` is `docker.io/library/alpine:latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repo: String,
    /// A tag, or a digest (`sha256:…`).
    pub reference: String,
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = if self.reference.contains(':') { '@' } else { ':' };
        write!(f, "{}/{}{sep}{}", self.registry, self.repo, self.reference)
    }
}

/// Parses an image reference the way Docker does: a first component with a `.` or `:` (or
/// `localhost`) is the registry, else Docker Hub (with `library/` for one-part names); the
/// tag defaults to `latest`; `@digest` wins over a tag.
pub fn parse_image(text: &str) -> Result<ImageRef, String> {
    let bad = |why: &str| format!("{text:?} is not an image reference: {why}");
    let (name, digest) = match text.split_once('@') {
        Some((name, digest)) => {
            digest
                .parse::<crate::digest::Digest>()
                .map_err(|_| bad("invalid digest"))?;
            (name, Some(digest.to_owned()))
        }
        None => (text, None),
    };
    let (name, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
        _ => (name, None),
    };
    let (registry, repo) = match name.split_once('/') {
        Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            (first.to_ascii_lowercase(), rest.to_owned())
        }
        _ => ("docker.io".to_owned(), name.to_owned()),
    };
    let registry = match registry.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".to_owned(),
        _ => registry,
    };
    let repo = if registry == "docker.io" && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo
    };
    oci::RepoName::parse(&repo).ok_or_else(|| bad("invalid repository name"))?;
    let reference = match (digest, tag) {
        (Some(d), _) => d,
        (None, Some(t)) => {
            if !oci::is_valid_tag(t) {
                return Err(bad("invalid tag"));
            }
            t.to_owned()
        }
        (None, None) => "latest".to_owned(),
    };
    Ok(ImageRef {
        registry,
        repo,
        reference,
    })
}

/// `os/arch[/variant]`, as `--platform` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: (*os).to_owned(),
                arch: (*arch).to_owned(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => Ok(Platform {
                os: (*os).to_owned(),
                arch: (*arch).to_owned(),
                variant: Some((*variant).to_owned()),
            }),
            _ => Err(format!("{s:?} is not a platform like linux/amd64 or linux/arm/v7")),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// The platform of this machine, as Docker names it.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            arch: arch.into(),
            variant: None,
        }
    }

    /// Whether an index entry's `platform` object is this one (a variant left out here
    /// matches any).
    fn matches(&self, platform: &serde_json::Value) -> bool {
        let field = |k: &str| platform.get(k).and_then(|v| v.as_str());
        field("os") == Some(self.os.as_str())
            && field("architecture") == Some(self.arch.as_str())
            && self.variant.as_deref().is_none_or(|v| field("variant") == Some(v))
    }
}

pub struct Options {
    /// Platforms taken from an index; empty means this machine's.
    pub platforms: Vec<Platform>,
    pub all_platforms: bool,
    /// Blob downloads at once.
    pub jobs: usize,
}

/// What one image's prefetch went through.
#[derive(Debug, Default)]
pub struct Report {
    pub digest: String,
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
    pub referrers: usize,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Drives one regcache server (by its base URL, `http://host:port`).
pub struct Prefetcher {
    base: String,
    /// Sent with every request (regcache's own jobs: the internal secret).
    header: Option<(http::HeaderName, http::HeaderValue)>,
    /// Bytes of the current image and of the whole run, drawn on a terminal only.
    bars: Option<(indicatif::ProgressBar, indicatif::ProgressBar)>,
    client: HttpClient,
    jobs: Arc<tokio::sync::Semaphore>,
    options: Options,
}

struct Walk {
    manifests: AtomicUsize,
    blobs: AtomicUsize,
    bytes: AtomicU64,
    referrers: AtomicUsize,
    /// Digests already taken in this image (a layer shared by two platforms, a referrer
    /// attached twice): each is fetched once.
    seen: std::sync::Mutex<BTreeSet<String>>,
}

impl Walk {
    fn first_time(&self, digest: &str) -> bool {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.to_owned())
    }
}

/// A manifest's descriptors: what an index lists (its entries, with their platforms), and
/// an image's config and layers (digest and size).
struct Descriptors {
    entries: Vec<serde_json::Value>,
    blobs: Vec<(String, u64)>,
}

fn parse_manifest(bytes: &[u8]) -> Result<Descriptors, String> {
    let doc: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
    let entries = doc
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    let mut blobs = Vec::new();
    let descriptor = |d: &serde_json::Value| -> Option<(String, u64)> {
        Some((d.get("digest")?.as_str()?.to_owned(), d.get("size")?.as_u64()?))
    };
    if let Some(config) = doc.get("config").and_then(descriptor) {
        blobs.push(config);
    }
    for key in ["layers", "blobs"] {
        for layer in doc.get(key).and_then(|l| l.as_array()).into_iter().flatten() {
            blobs.extend(descriptor(layer));
        }
    }
    Ok(Descriptors { entries, blobs })
}

impl Prefetcher {
    pub fn new(base: &str, options: Options) -> Result<Prefetcher, String> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Prefetcher {
            header: None,
            bars: None,
            base: base.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build(https),
            jobs: Arc::new(tokio::sync::Semaphore::new(options.jobs.max(1))),
            options,
        })
    }

    /// Counts bytes into two bars (this image's, the run's): their lengths grow as
    /// descriptors are found.
    pub fn with_progress(mut self, image: indicatif::ProgressBar, total: indicatif::ProgressBar) -> Prefetcher {
        self.bars = Some((image, total));
        self
    }

    fn progress(&self, f: impl Fn(&indicatif::ProgressBar)) {
        if let Some((image, total)) = &self.bars {
            f(image);
            f(total);
        }
    }

    /// Sends `name: value` with every request.
    pub fn with_header(mut self, name: &'static str, value: &str) -> Result<Prefetcher, String> {
        let value = http::HeaderValue::from_str(value).map_err(|e| e.to_string())?;
        self.header = Some((http::HeaderName::from_static(name), value));
        Ok(self)
    }

    fn request(&self, url: &str) -> http::request::Builder {
        let mut req = Request::get(url);
        if let Some((name, value)) = &self.header {
            req = req.header(name, value);
        }
        req
    }

    /// Every tag of a repository (following `Link` pages).
    pub async fn tags(&self, image: &ImageRef) -> Result<Vec<String>, String> {
        let mut tags = Vec::new();
        let mut next = Some(self.url(image, "tags/list"));
        let mut pages = 0;
        while let Some(url) = next.take() {
            pages += 1;
            let (status, headers, body) = self.get(&url, None).await?;
            if status != StatusCode::OK {
                return Err(format!("{}/{}: tags: {status}", image.registry, image.repo));
            }
            let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("tags list: {e}"))?;
            tags.extend(
                doc.get("tags")
                    .and_then(|t| t.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.as_str().map(str::to_owned)),
            );
            let link = headers.get(http::header::LINK).and_then(|l| l.to_str().ok());
            if let Some(path) = link
                .and_then(|l| l.split('<').nth(1)?.split('>').next())
                .filter(|_| pages < 1000)
            {
                let sep = if path.contains('?') { '&' } else { '?' };
                next = Some(format!("{}{path}{sep}ns={}", self.base, image.registry));
            }
        }
        Ok(tags)
    }

    fn url(&self, image: &ImageRef, tail: &str) -> String {
        format!("{}/v2/{}/{tail}?ns={}", self.base, image.repo, image.registry)
    }

    async fn get(&self, url: &str, accept: Option<&str>) -> Result<(StatusCode, http::HeaderMap, Bytes), String> {
        let mut req = self.request(url);
        if let Some(a) = accept {
            req = req.header(http::header::ACCEPT, a);
        }
        let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| format!("GET {url}: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| format!("GET {url}: {e}"))?.to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    /// A manifest by tag or digest: its digest and bytes, or `None` when there is none.
    async fn manifest(&self, image: &ImageRef, reference: &str) -> Result<Option<(String, Bytes)>, String> {
        let accept = oci::MANIFEST_TYPES.join(", ");
        let url = self.url(image, &format!("manifests/{reference}"));
        let (status, headers, body) = self.get(&url, Some(&accept)).await?;
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => {
                return Err(format!(
                    "{image}: manifest {reference}: {s}: {}",
                    String::from_utf8_lossy(&body)
                ))
            }
        }
        let digest = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| crate::digest::Digest::sha256_of(&body).to_string());
        Ok(Some((digest, body)))
    }

    /// What a pull of `image` is told by the server's signature policy: one line for the
    /// reference, and one per platform of an index (`label`, passed, what was said).
    pub async fn policy_answers(&self, image: &ImageRef) -> Result<Vec<(String, bool, String)>, String> {
        let accept = oci::MANIFEST_TYPES.join(", ");
        let mut answers = Vec::new();
        let mut queue = vec![(image.to_string(), image.reference.clone())];
        while let Some((label, reference)) = queue.pop() {
            let url = self.url(image, &format!("manifests/{reference}"));
            let (status, headers, body) = self.get(&url, Some(&accept)).await?;
            if status != StatusCode::OK {
                let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let message = doc["errors"][0]["message"].as_str().unwrap_or("no message").to_owned();
                answers.push((label, false, format!("{status}: {message}")));
                continue;
            }
            let digest = headers
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let said = headers
                .get("x-regcache-policy")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("no signature policy applies")
                .to_owned();
            answers.push((format!("{label} ({digest})"), true, said));
            if label == image.to_string() {
                let entries = parse_manifest(&body)?.entries;
                for entry in entries.iter().rev() {
                    let Some(d) = entry["digest"].as_str() else { continue };
                    let p = &entry["platform"];
                    let platform = match (p["os"].as_str(), p["architecture"].as_str()) {
                        (Some(os), Some(arch)) => match p["variant"].as_str() {
                            Some(v) => format!("{os}/{arch}/{v}"),
                            None => format!("{os}/{arch}"),
                        },
                        _ => "an entry".to_owned(),
                    };
                    queue.push((format!("  {platform}"), d.to_owned()));
                }
            }
        }
        Ok(answers)
    }

    /// Fetches one blob or manifest by digest through the server, so that it caches it
    /// (again): `regcache verify --repair`.
    pub async fn refetch(&self, image: &ImageRef, digest: &str, manifest: bool) -> Result<(), String> {
        if manifest {
            self.manifest(image, digest)
                .await?
                .map(|_| ())
                .ok_or_else(|| format!("{image}: the registry no longer has manifest {digest}"))
        } else {
            self.blob(image, digest, None).await.map(|_| ())
        }
    }

    /// Reads a blob through the server (which caches it) and throws the bytes away.
    async fn blob(&self, image: &ImageRef, digest: &str, size: Option<u64>) -> Result<u64, String> {
        let _slot = self.jobs.acquire().await.map_err(|e| e.to_string())?;
        let url = self.url(image, &format!("blobs/{digest}"));
        let req = self.request(&url).body(Empty::new()).map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| format!("GET {url}: {e}"))?;
        if resp.status() != StatusCode::OK {
            return Err(format!("{image}: blob {digest}: {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut got = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("{image}: blob {digest}: broken after {got} bytes: {e}"))?;
            let n = frame.into_data().map_or(0, |d| d.len() as u64);
            got += n;
            self.progress(|bar| bar.inc(n));
        }
        if let Some(size) = size.filter(|s| *s != got) {
            return Err(format!(
                "{image}: blob {digest}: {got} bytes, its descriptor says {size}"
            ));
        }
        Ok(got)
    }

    /// Prefetches one image and everything attached to it.
    pub async fn image(&self, image: &ImageRef) -> Result<Report, String> {
        if let Some((bar, _)) = &self.bars {
            bar.reset();
            bar.set_length(0);
            bar.set_message(image.to_string());
        }
        let walk = Walk {
            manifests: AtomicUsize::new(0),
            blobs: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            referrers: AtomicUsize::new(0),
            seen: Default::default(),
        };
        let (digest, bytes) = self
            .manifest(image, &image.reference)
            .await?
            .ok_or_else(|| format!("{image}: no such image"))?;
        walk.first_time(&digest);
        self.take(image, &digest, &bytes, &walk, true).await?;
        Ok(Report {
            digest,
            manifests: walk.manifests.load(Ordering::Relaxed),
            blobs: walk.blobs.load(Ordering::Relaxed),
            bytes: walk.bytes.load(Ordering::Relaxed),
            referrers: walk.referrers.load(Ordering::Relaxed),
        })
    }

    /// Takes a fetched manifest: its blobs, its selected platform manifests (recursively),
    /// and what is attached to it.
    fn take<'a>(
        &'a self,
        image: &'a ImageRef,
        digest: &'a str,
        bytes: &'a [u8],
        walk: &'a Walk,
        attachments: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            walk.manifests.fetch_add(1, Ordering::Relaxed);
            let Descriptors { entries, blobs } =
                parse_manifest(bytes).map_err(|e| format!("{image}: {digest}: {e}"))?;
            let fetches = blobs
                .into_iter()
                .filter(|(d, _)| walk.first_time(d))
                .inspect(|(_, size)| self.progress(|bar| bar.inc_length(*size)))
                .map(|(d, size)| async move {
                    let got = self.blob(image, &d, Some(size)).await?;
                    walk.blobs.fetch_add(1, Ordering::Relaxed);
                    walk.bytes.fetch_add(got, Ordering::Relaxed);
                    Ok::<_, String>(())
                });
            join_all_ok(fetches).await?;
            for entry in &entries {
                let selected = self.options.all_platforms
                    || match entry.get("platform") {
                        // Attestation manifests ride along with the platform they describe.
                        Some(p) if p.get("os").and_then(|o| o.as_str()) == Some("unknown") => true,
                        Some(p) => {
                            let host = [Platform::host()];
                            let wanted = if self.options.platforms.is_empty() {
                                &host[..]
                            } else {
                                &self.options.platforms[..]
                            };
                            wanted.iter().any(|w| w.matches(p))
                        }
                        None => true,
                    };
                let Some(child) = entry.get("digest").and_then(|d| d.as_str()) else {
                    continue;
                };
                if !selected || !walk.first_time(child) {
                    continue;
                }
                let (child_digest, child_bytes) = self
                    .manifest(image, child)
                    .await?
                    .ok_or_else(|| format!("{image}: the index lists {child}, which the registry does not have"))?;
                self.take(image, &child_digest, &child_bytes, walk, true).await?;
            }
            if attachments {
                self.attachments(image, digest, walk).await?;
            }
            Ok(())
        })
    }

    /// Referrers (OCI 1.1) and cosign's tag scheme for `digest`.
    async fn attachments(&self, image: &ImageRef, digest: &str, walk: &Walk) -> Result<(), String> {
        let mut attached = Vec::new();
        let url = self.url(image, &format!("referrers/{digest}"));
        let (status, _, body) = self.get(&url, None).await?;
        if status == StatusCode::OK {
            let entries = parse_manifest(&body)
                .map_err(|e| format!("{image}: referrers of {digest}: {e}"))?
                .entries;
            attached.extend(
                entries
                    .iter()
                    .filter_map(|e| e.get("digest")?.as_str().map(str::to_owned)),
            );
        }
        if let Some(hex) = digest.strip_prefix("sha256:") {
            for suffix in ["sig", "att", "sbom"] {
                if let Some((d, bytes)) = self.manifest(image, &format!("sha256-{hex}.{suffix}")).await? {
                    if walk.first_time(&d) {
                        walk.referrers.fetch_add(1, Ordering::Relaxed);
                        self.take(image, &d, &bytes, walk, false).await?;
                    }
                }
            }
        }
        for d in attached {
            if !walk.first_time(&d) {
                continue;
            }
            if let Some((d, bytes)) = self.manifest(image, &d).await? {
                walk.referrers.fetch_add(1, Ordering::Relaxed);
                // A signature of a signature is not followed.
                self.take(image, &d, &bytes, walk, false).await?;
            }
        }
        Ok(())
    }
}

/// Runs futures concurrently; the first error (after all have ended).
async fn join_all_ok<F: std::future::Future<Output = Result<(), String>>>(
    futures: impl IntoIterator<Item = F>,
) -> Result<(), String> {
    let mut pending: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut first_error = None;
    std::future::poll_fn(|cx| {
        pending.retain_mut(|f| match f.as_mut().poll(cx) {
            std::task::Poll::Ready(result) => {
                if let Err(e) = result {
                    first_error.get_or_insert(e);
                }
                false
            }
            std::task::Poll::Pending => true,
        });
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalized_as_docker_does() {
        let r = |s: &str| parse_image(s).unwrap().to_string();
        assert_eq!(r("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(r("alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(r("docker.io/library/alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(r("index.docker.io/bitnami/redis"), "docker.io/bitnami/redis:latest");
        assert_eq!(r("ghcr.io/org/app:v1"), "ghcr.io/org/app:v1");
        assert_eq!(r("localhost:5000/team/app"), "localhost:5000/team/app:latest");
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            r(&format!("ghcr.io/org/app:v1@{digest}")),
            format!("ghcr.io/org/app@{digest}")
        );
        for bad in ["", "UPPER/case", "alpine:bad tag", "alpine@sha256:short", "a//b"] {
            assert!(parse_image(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn platforms_parse_and_match_index_entries() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert!(p.matches(&serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v7"})));
        assert!(!p.matches(&serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v6"})));
        let any_variant: Platform = "linux/arm64".parse().unwrap();
        assert!(any_variant.matches(&serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"})));
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//v7".parse::<Platform>().is_err());
    }
}
