//! Which upstream serves a request. The set is closed: `?ns=<host>` (containerd), a leading
//! path segment naming a configured upstream (podman, CRI-O, skopeo), or the default
//! upstream for bare names (Docker's `registry-mirrors`). Anything else is refused, never
//! dialled and never passed on to the default.

use std::sync::Arc;

use super::client::Upstream;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::oci::RepoName;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("registry {0:?} is not one of this cache's upstreams")]
    UnknownUpstream(String),
    #[error("no default upstream is configured; name the registry with ?ns= or a path prefix")]
    NoDefault,
    #[error("invalid repository name {0:?}")]
    NameInvalid(String),
}

pub struct Upstreams {
    list: Vec<Arc<Upstream>>,
    default: Option<usize>,
}

/// Where a request goes: the upstream and the repository name as the upstream knows it.
#[derive(Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    pub repo: RepoName,
}

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_ALIASES: [&str; 3] = ["index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"];

fn looks_like_host(segment: &str) -> bool {
    segment.contains('.') || segment.contains(':') || segment == "localhost"
}

impl Upstreams {
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.list.iter()
    }

    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Upstreams, crate::tls::Error> {
        let roots = crate::tls::default_roots();
        let mut list = Vec::new();
        for c in &config.upstreams {
            let tls =
                crate::tls::upstream_client_config(&roots, c.ca_file.as_deref(), c.insecure_skip_verify, &c.name)?;
            list.push(Arc::new(Upstream::new(c, tls, metrics.clone(), config)));
        }
        Ok(Upstreams {
            list,
            default: config.upstreams.iter().position(|c| c.default),
        })
    }

    /// The default upstream's name (where bare names go), if one is configured.
    pub fn default_name(&self) -> Option<String> {
        self.default.map(|i| self.list[i].name.clone())
    }

    fn find(&self, host: &str) -> Option<&Arc<Upstream>> {
        let host = if DOCKER_HUB_ALIASES.iter().any(|a| a.eq_ignore_ascii_case(host)) {
            DOCKER_HUB
        } else {
            host
        };
        self.list.iter().find(|u| u.name.eq_ignore_ascii_case(host))
    }

    /// Routes `name` (the path between `/v2/` and the endpoint) given the request's `ns`.
    pub fn route(&self, ns: Option<&str>, name: &str) -> Result<Target, RouteError> {
        let (upstream, repo) = if let Some(ns) = ns {
            let up = self
                .find(ns)
                .ok_or_else(|| RouteError::UnknownUpstream(ns.to_owned()))?;
            (up, name)
        } else {
            let prefix = memchr::memchr(b'/', name.as_bytes())
                .map(|i| (&name[..i], &name[i + 1..]))
                .map(|(first, rest)| (first, rest, self.find(first)));
            match prefix {
                Some((_, rest, Some(up))) => (up, rest),
                Some((first, _, None)) if looks_like_host(first) => {
                    return Err(RouteError::UnknownUpstream(first.to_owned()));
                }
                _ => {
                    let up = self.default.map(|i| &self.list[i]).ok_or(RouteError::NoDefault)?;
                    (up, name)
                }
            }
        };
        let repo = RepoName::parse(repo).ok_or_else(|| RouteError::NameInvalid(name.to_owned()))?;
        let repo = if upstream.name == DOCKER_HUB && repo.segments() == 1 {
            RepoName::parse(&format!("library/{repo}")).ok_or_else(|| RouteError::NameInvalid(name.to_owned()))?
        } else {
            repo
        };
        Ok(Target {
            upstream: upstream.clone(),
            repo,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams() -> Upstreams {
        let mut c = Config::embedded_default();
        let mut lab = c.upstreams[1].clone();
        lab.name = "registry.lab:5000".into();
        lab.url = "http://127.0.0.1:1".into();
        c.upstreams.push(lab);
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()));
        Upstreams::new(&c, metrics).unwrap()
    }

    fn routed(ns: Option<&str>, name: &str) -> Result<(String, String), RouteError> {
        upstreams()
            .route(ns, name)
            .map(|t| (t.upstream.name.clone(), t.repo.to_string()))
    }

    fn ok(up: &str, repo: &str) -> Result<(String, String), RouteError> {
        Ok((up.to_owned(), repo.to_owned()))
    }

    #[tokio::test]
    async fn three_client_styles() {
        assert_eq!(
            routed(Some("docker.io"), "library/alpine"),
            ok("docker.io", "library/alpine")
        );
        assert_eq!(routed(Some("ghcr.io"), "org/app"), ok("ghcr.io", "org/app"));
        assert_eq!(
            routed(None, "docker.io/library/alpine"),
            ok("docker.io", "library/alpine")
        );
        assert_eq!(routed(None, "docker.io/alpine"), ok("docker.io", "library/alpine"));
        assert_eq!(routed(None, "ghcr.io/org/app"), ok("ghcr.io", "org/app"));
        assert_eq!(
            routed(None, "registry.lab:5000/team/app"),
            ok("registry.lab:5000", "team/app")
        );
        assert_eq!(routed(None, "alpine"), ok("docker.io", "library/alpine"));
        assert_eq!(routed(None, "bitnami/redis"), ok("docker.io", "bitnami/redis"));
        assert_eq!(
            routed(Some("index.docker.io"), "library/alpine"),
            ok("docker.io", "library/alpine")
        );
    }

    #[tokio::test]
    async fn unknown_registries_are_refused() {
        assert_eq!(
            routed(Some("evil.example"), "a/b"),
            Err(RouteError::UnknownUpstream("evil.example".into()))
        );
        assert_eq!(
            routed(None, "evil.example/a/b"),
            Err(RouteError::UnknownUpstream("evil.example".into()))
        );
        assert_eq!(
            routed(None, "localhost/a"),
            Err(RouteError::UnknownUpstream("localhost".into()))
        );
        assert_eq!(
            routed(None, "127.0.0.1:22/a"),
            Err(RouteError::UnknownUpstream("127.0.0.1:22".into()))
        );
        assert!(matches!(routed(None, "Bad/Name"), Err(RouteError::NameInvalid(_))));
        assert!(matches!(
            routed(Some("docker.io"), "a/../b"),
            Err(RouteError::NameInvalid(_))
        ));
    }
}
