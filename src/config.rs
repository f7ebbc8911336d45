//! Configuration: TOML text -> typed, validated [`Config`]. Unknown keys are rejected, every
//! default lives here, and `config.example.toml` (embedded) is the default configuration.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The embedded default configuration: the documented example file itself.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config.example.toml");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // `cause`, not `source`: the message already says it, and a source would be printed a
    // second time by the `{:#}` that `main` prints errors with.
    #[error("cannot read config file {path}: {cause}")]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default, rename = "sync", skip_serializing_if = "Vec::is_empty")]
    pub syncs: Vec<SyncConfig>,
    #[serde(default, rename = "policy", skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyConfig>,
}

/// A `[[policy]]` entry: the signatures the images of matching repositories must carry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Names the policy in denials, metrics and logs (default `policy-<n>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `<upstream>/<repo>`, where `*` matches any run of characters
    /// (`docker.io/library/*`, `ghcr.io/acme/*`); the most specific match governs.
    #[serde(rename = "match")]
    pub pattern: String,
    #[serde(default)]
    pub mode: PolicyMode,
    /// Cosign public keys (PEM files); a signature by any of them passes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<PathBuf>,
    /// Keyless signers (Fulcio certificates); needs `trusted_root`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<IdentityConfig>,
    /// A Sigstore `trusted_root.json` (Fulcio CAs, Rekor and CT log keys, TSAs); with it,
    /// key signatures' transparency-log entries are verified too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_root: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// Unsigned or badly signed images are refused (403 DENIED).
    #[default]
    Enforce,
    /// They are served, logged and counted.
    Warn,
    /// Not checked (exempts repositories from a broader policy).
    Off,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The OIDC issuer in the certificate (`https://token.actions.githubusercontent.com`).
    pub issuer: String,
    /// The certificate's subject (email or URI), exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Or a regular expression the subject must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_regex: Option<String>,
}

/// A `[[sync]]` entry: images kept fresh in the cache while the upstream can be reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Names the entry in metrics and logs (default `sync-<n>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Images as Docker names them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// A repository whose tags matching `tags` are taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Tag patterns for `repository`: a glob (`v1.*`), `regex:^v\\d+$`, or
    /// `semver:>=1.2, <2` (a leading `v` is ignored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// `os/arch[/variant]`, or `all`; default: this machine's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    #[serde(default = "default_sync_interval")]
    pub interval: HumanDuration,
}

fn default_sync_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// On SIGTERM/SIGINT: how long in-flight responses and fills may take to finish.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
    /// Serve HTTPS (HTTP/1.1 and h2 by ALPN) instead of plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// The URL clients reach regcache at (e.g. "https://mirror.example.com" behind a
    /// TLS-terminating load balancer); the token realm is built from it. Unset: from the
    /// request's Host header and whether regcache itself serves TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Addresses or CIDR blocks of reverse proxies whose `X-Forwarded-Proto` and
    /// `X-Forwarded-Host` are believed (for the token realm); from anyone else they are
    /// ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// Pin each connection thread to a CPU of its own and give it the connections whose
    /// packets arrive on that CPU (for a machine, or a container's cpuset, regcache has to
    /// itself); a connection whose requests come to arrive on another thread's CPU (a local
    /// client the scheduler moved) is asked to reconnect there. Applied only when regcache
    /// may use exactly as many CPUs as it runs connection threads. Off by default: a pinned
    /// thread cannot move off a CPU that other work keeps busy.
    #[serde(default)]
    pub pin_threads: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            shutdown_grace: default_shutdown_grace(),
            tls: None,
            public_url: None,
            trusted_proxies: Vec::new(),
            pin_threads: false,
        }
    }
}

/// PEM files; `cert` may hold the whole chain. Re-read on SIGHUP and when they change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Bounds that keep one bad client (or upstream) from exhausting the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request head (request line and headers) accepted.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// A client must send its whole request head within this time (against slowloris).
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: HumanDuration,
    /// Open client connections at once; more wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Upstream blob downloads at once; more wait for a slot.
    #[serde(default = "default_max_concurrent_fills")]
    pub max_concurrent_fills: usize,
    /// An upstream blob transfer that sends nothing for this long is broken (and resumed).
    #[serde(default = "default_upstream_idle_timeout")]
    pub upstream_idle_timeout: HumanDuration,
    /// Largest manifest (or tag list, or referrers answer) taken from an upstream.
    #[serde(default = "default_max_manifest_size")]
    pub max_manifest_size: ByteSize,
    /// A client connection with no request in flight and no traffic for this long is
    /// closed (HTTP/1.1 keep-alive and idle h2 connections alike).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// A response whose bytes the client has not taken for this long (its connection's
    /// writes blocked) is aborted and its connection closed: a stalled reader must not hold
    /// a connection slot, a file and a fill reader forever.
    #[serde(default = "default_send_stall_timeout")]
    pub send_stall_timeout: HumanDuration,
    /// Concurrent h2 streams per client connection.
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// Bytes per second an upstream blob transfer must bring, over each
    /// `upstream_idle_timeout`; slower counts as broken (resumed, then failed).
    #[serde(default = "default_fill_min_rate")]
    pub fill_min_rate: ByteSize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: default_max_header_bytes(),
            header_read_timeout: default_header_read_timeout(),
            max_connections: default_max_connections(),
            max_concurrent_fills: default_max_concurrent_fills(),
            upstream_idle_timeout: default_upstream_idle_timeout(),
            max_manifest_size: default_max_manifest_size(),
            idle_timeout: default_idle_timeout(),
            send_stall_timeout: default_send_stall_timeout(),
            max_streams_per_connection: default_max_streams_per_connection(),
            fill_min_rate: default_fill_min_rate(),
        }
    }
}

/// Client access control. With no users, pulls are anonymous.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether clients without credentials may pull; defaults to true only when no users
    /// are configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<bool>,
    /// What anonymous clients may pull, as `<upstream>/<repository>` patterns (`*` matches
    /// any run of characters). Empty: everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anonymous_allow: Vec<String>,
    #[serde(default, rename = "user", skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// A bcrypt hash (`regcache hash-password` makes one).
    pub password_hash: Redacted,
    /// What this user may pull, as `<upstream>/<repository>` patterns. Empty: everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

impl AuthConfig {
    pub fn anonymous_allowed(&self) -> bool {
        self.anonymous.unwrap_or(self.users.is_empty())
    }
}

/// The admin listener: `/metrics`, `/healthz`, `/readyz`, on a port of its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `""` turns the admin listener off.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
        }
    }
}

impl AdminConfig {
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default = "default_cache_dir")]
    pub dir: PathBuf,
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    #[serde(default = "default_memory_manifests")]
    pub memory_manifests: ByteSize,
    /// Never contact any upstream: serve what is cached, tags regardless of their TTL.
    #[serde(default)]
    pub offline: bool,
    /// On an image manifest fetched from the upstream, fetch its config and layers that the
    /// cache lacks this many at a time, before clients ask for them (0, the default: only
    /// when asked). With `[cache.s3]`, blobs the bucket holds or another replica fetches
    /// are left to clients.
    #[serde(default = "default_layers_ahead")]
    pub layers_ahead: usize,
    /// Images never evicted, their tags served regardless of TTL: `docker.io/library/alpine:3.20`,
    /// `ghcr.io/org/app` (every tag), `ghcr.io/org/*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned: Vec<String>,
    /// A bucket shared by replicas: each local miss reads it before the upstream, and what
    /// one replica verified is uploaded for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Config>,
}

/// `[cache.s3]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// For anything but AWS itself: `https://s3.example.com`, `http://127.0.0.1:8333`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// Keys go under `<prefix>/v1/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// `https://endpoint/bucket/key` (most S3-compatible stores) instead of
    /// `https://bucket.endpoint/key`.
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// With `secret_access_key_file`; else the AWS environment variables, else the
    /// instance's role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// How the other replicas reach this one (`http://10.0.0.5:5000`, or
    /// `http://${POD_IP}:5000` from the environment); with
    /// `peer_secret_file`, replicas fetch each blob from the upstream once for the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_url: Option<String>,
    /// The cluster's shared secret (at least 16 characters), which peer requests carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_secret_file: Option<PathBuf>,
    /// Blobs at least this large that the bucket holds are answered with a 307 to a
    /// presigned URL of the bucket (valid 15 minutes), so clients download from the store
    /// itself. Off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_min_size: Option<ByteSize>,
    /// The bucket's budget for blobs, kept by one elected replica: blobs no manifest in
    /// the bucket references are collected, then the least recently used ones. None unless
    /// set (the bucket grows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
    /// How often each replica notes what it served and the elected one collects; blobs
    /// used within two intervals are never collected.
    #[serde(default = "default_collect_every")]
    pub collect_every: HumanDuration,
    /// Whether `[cache] dir` keeps a hot set in front of the bucket. `false`: the disk only
    /// stages a fill until the bucket holds it, and every other read is a GET (a Range, a
    /// ranged GET) of the bucket, for replicas with little disk.
    #[serde(default = "default_true")]
    pub local_tier: bool,
}

fn default_collect_every() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_prefix() -> String {
    "regcache".into()
}

fn default_true() -> bool {
    true
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: default_cache_dir(),
            max_size: default_max_size(),
            memory_manifests: default_memory_manifests(),
            offline: false,
            layers_ahead: default_layers_ahead(),
            pinned: Vec::new(),
            s3: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub default: bool,
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl: HumanDuration,
    /// How old (since the upstream last confirmed it) a cached tag may be when it is served
    /// because the upstream is failing. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_stale: Option<HumanDuration>,
    /// Never contact this upstream; serve what is cached.
    #[serde(default)]
    pub offline: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Redacted>,
    /// A file holding the password (trailing newline ignored), e.g. a mounted secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Token realm hosts that may receive the credentials besides the upstream's own
    /// registrable domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_realms: Vec<String>,
    /// Internal hosts, addresses or CIDR blocks this upstream may redirect regcache to
    /// (or name as its token realm), e.g. a MinIO on the LAN behind a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirect_allow: Vec<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// How long to wait for response headers.
    #[serde(default = "default_response_timeout")]
    pub response_timeout: HumanDuration,
    /// Consecutive failures (connect errors, timeouts, 5xx) that open the circuit.
    #[serde(default = "default_circuit_failures")]
    pub circuit_failures: u32,
    /// How often a background probe checks an open circuit's upstream.
    #[serde(default = "default_circuit_cooldown")]
    pub circuit_cooldown: HumanDuration,
    /// Extra CA certificates (PEM) to trust for this upstream, e.g. a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate from this upstream. Dangerous; logged loudly.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A secret in the config: read as text, printed as `<redacted>`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Redacted {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// The environment variable prefix for an upstream's credentials:
/// `REGCACHE_UPSTREAM_DOCKER_IO` for `docker.io`, then `_USERNAME` / `_PASSWORD`.
pub fn credentials_env_prefix(name: &str) -> String {
    let mangled: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("REGCACHE_UPSTREAM_{mangled}")
}

impl UpstreamConfig {
    /// The username and password to use, if any: the environment
    /// (`REGCACHE_UPSTREAM_<NAME>_USERNAME` / `_PASSWORD`) wins over `password_file`, which
    /// wins over `password`.
    pub fn credentials(&self) -> Result<Option<(String, String)>, String> {
        let prefix = credentials_env_prefix(&self.name);
        let env_user = std::env::var(format!("{prefix}_USERNAME")).ok();
        let env_pass = std::env::var(format!("{prefix}_PASSWORD")).ok();
        let password = match (env_pass, &self.password_file, &self.password) {
            (Some(p), _, _) => Some(p),
            (None, Some(file), _) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| format!("cannot read password_file {}: {e}", file.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            (None, None, Some(p)) => Some(p.0.clone()),
            (None, None, None) => None,
        };
        match (env_user.or_else(|| self.username.clone()), password) {
            (Some(u), Some(p)) => Ok(Some((u, p))),
            (None, None) => Ok(None),
            (Some(_), None) => Err("a username needs a password (password, password_file or the environment)".into()),
            (None, Some(_)) => Err("a password needs a username".into()),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5000))
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_max_header_bytes() -> ByteSize {
    ByteSize(64 << 10)
}
fn default_header_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}
fn default_send_stall_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_max_streams_per_connection() -> u32 {
    32
}
fn default_fill_min_rate() -> ByteSize {
    ByteSize(1024)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_concurrent_fills() -> usize {
    64
}
fn default_upstream_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_max_manifest_size() -> ByteSize {
    ByteSize(4 << 20)
}
fn default_admin_listen() -> String {
    "127.0.0.1:9090".to_owned()
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from("./regcache-data")
}
fn default_max_size() -> ByteSize {
    ByteSize(20 << 30)
}
fn default_layers_ahead() -> usize {
    0
}
fn default_memory_manifests() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_tag_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_response_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_circuit_failures() -> u32 {
    5
}
fn default_circuit_cooldown() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, Error> {
        let config: Config = serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            // One line naming the key and the place, not toml's multi-line snippet.
            let key = e.path().to_string();
            let inner = e.into_inner();
            let place = inner
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!(" (line {line}, column {column})")
                })
                .unwrap_or_default();
            let message = inner.message().trim().replace('\n', " ");
            if key.is_empty() || key == "." {
                Error::Parse(format!("{message}{place}"))
            } else {
                invalid(key, format!("{message}{place}"))
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|cause| Error::Read {
            path: path.to_owned(),
            cause,
        })?;
        Config::from_toml(&text)
    }

    pub fn embedded_default() -> Config {
        Config::from_toml(EMBEDDED_DEFAULT).expect("the embedded default config is valid")
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// What `serve` needs beyond what every command needs: an upstream. The commands that
    /// only read the cache dir take a config with none.
    pub fn servable(&self) -> Result<(), Error> {
        if self.upstreams.is_empty() {
            return Err(invalid(
                "upstream",
                "none is configured, so nothing can be served: add a [[upstream]] table \
                 (`regcache check-config` without --config prints the embedded default's)",
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), Error> {
        if let Some(s3) = &self.cache.s3 {
            if s3.bucket.is_empty() {
                return Err(invalid("cache.s3.bucket", "must name a bucket"));
            }
            if let Some(e) = &s3.endpoint {
                let ok = e
                    .parse::<http::Uri>()
                    .ok()
                    .is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
                if !ok {
                    return Err(invalid(
                        "cache.s3.endpoint",
                        format!("{e:?} is not a URL like \"https://s3.example.com\""),
                    ));
                }
            }
            if s3.collect_every.0 < Duration::from_secs(1) {
                return Err(invalid("cache.s3.collect_every", "must be at least 1s"));
            }
            crate::cache::bucket::Bucket::new(s3).map_err(|e| invalid("cache.s3", e))?;
        }
        crate::policy::Policies::from_config(&self.policies).map_err(|(key, message)| invalid(key, message))?;
        for (i, sync) in self.syncs.iter().enumerate() {
            crate::sync::Job::new(i, sync).map_err(|e| invalid(format!("sync[{i}]"), &e))?;
        }
        for p in &self.cache.pinned {
            crate::cache::pins::normalize(p).map_err(|e| invalid("cache.pinned", &e))?;
        }
        if self.limits.max_header_bytes.0 < 8192 {
            return Err(invalid("limits.max_header_bytes", "must be at least 8KiB"));
        }
        if self.limits.idle_timeout.0.is_zero() {
            return Err(invalid("limits.idle_timeout", "must be more than 0s"));
        }
        if self.limits.send_stall_timeout.0.is_zero() {
            return Err(invalid("limits.send_stall_timeout", "must be more than 0s"));
        }
        if self.limits.max_streams_per_connection == 0 {
            return Err(invalid("limits.max_streams_per_connection", "must be at least 1"));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if self.limits.max_concurrent_fills == 0 {
            return Err(invalid("limits.max_concurrent_fills", "must be at least 1"));
        }
        if self.limits.header_read_timeout.0.is_zero() || self.limits.upstream_idle_timeout.0.is_zero() {
            return Err(invalid("limits", "timeouts must be above zero"));
        }
        if let Some(tls) = &self.server.tls {
            for (k, path) in [("server.tls.cert", &tls.cert), ("server.tls.key", &tls.key)] {
                if let Err(e) = std::fs::metadata(path) {
                    return Err(invalid(k, format!("{}: {e}", path.display())));
                }
            }
        }
        for (i, user) in self.auth.users.iter().enumerate() {
            if user.name.is_empty() || user.name.contains(':') {
                return Err(invalid(
                    format!("auth.user[{i}].name"),
                    "must be non-empty and contain no ':'",
                ));
            }
            if !user.password_hash.0.starts_with("$2") {
                return Err(invalid(
                    format!("auth.user[{i}].password_hash"),
                    "must be a bcrypt hash; make one with `regcache hash-password`",
                ));
            }
            if self.auth.users[..i].iter().any(|u| u.name == user.name) {
                return Err(invalid(
                    format!("auth.user[{i}].name"),
                    format!("{:?} is listed twice", user.name),
                ));
            }
        }
        if let Some(url) = &self.server.public_url {
            let ok = url
                .parse::<http::Uri>()
                .ok()
                .is_some_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            if !ok {
                return Err(invalid(
                    "server.public_url",
                    format!("{url:?} is not a URL like \"https://mirror.example.com\""),
                ));
            }
        }
        for (i, p) in self.server.trusted_proxies.iter().enumerate() {
            let net = crate::upstream::egress::Allowed::parse(p);
            if !matches!(net, Some(crate::upstream::egress::Allowed::Net(..))) {
                return Err(invalid(
                    format!("server.trusted_proxies[{i}]"),
                    format!("{p:?} is not an address or a CIDR block like \"10.0.0.0/8\""),
                ));
            }
        }
        if !self.admin.listen.is_empty() && self.admin.addr().is_none() {
            return Err(invalid(
                "admin.listen",
                format!("{:?} is not an address like \"127.0.0.1:9090\"", self.admin.listen),
            ));
        }
        if self.cache.max_size.0 < 1024 * 1024 {
            return Err(invalid("cache.max_size", "must be at least 1MiB"));
        }
        if self.cache.dir.as_os_str().is_empty() {
            return Err(invalid("cache.dir", "must not be empty"));
        }
        let mut defaults = 0;
        for (i, up) in self.upstreams.iter().enumerate() {
            let key = |k: &str| format!("upstream[{i}].{k}");
            if !is_registry_host(&up.name) {
                return Err(invalid(
                    key("name"),
                    format!(
                        "{:?} is not a registry host name like \"ghcr.io\" or \"registry.lab:5000\"",
                        up.name
                    ),
                ));
            }
            if self.upstreams[..i].iter().any(|o| o.name == up.name) {
                return Err(invalid(key("name"), format!("{:?} is listed twice", up.name)));
            }
            let uri: http::Uri = up
                .url
                .parse()
                .map_err(|e| invalid(key("url"), format!("{:?}: {e}", up.url)))?;
            match uri.scheme_str() {
                Some("http") | Some("https") => {}
                _ => return Err(invalid(key("url"), "must start with http:// or https://")),
            }
            if uri.host().is_none() {
                return Err(invalid(key("url"), "has no host"));
            }
            up.credentials().map_err(|m| invalid(key("password"), m))?;
            for (j, allow) in up.redirect_allow.iter().enumerate() {
                if crate::upstream::egress::Allowed::parse(allow).is_none() {
                    return Err(invalid(
                        format!("upstream[{i}].redirect_allow[{j}]"),
                        format!("{allow:?} is not a host, an address or a CIDR block like \"10.0.0.0/8\""),
                    ));
                }
            }
            if let Some(ca) = &up.ca_file {
                if let Err(e) = std::fs::metadata(ca) {
                    return Err(invalid(key("ca_file"), format!("{}: {e}", ca.display())));
                }
            }
            if up.circuit_failures == 0 {
                return Err(invalid(key("circuit_failures"), "must be at least 1"));
            }
            if up.connect_timeout.0.is_zero() || up.response_timeout.0.is_zero() {
                return Err(invalid(key("response_timeout"), "timeouts must be above zero"));
            }
            if up.default {
                defaults += 1;
                if defaults > 1 {
                    return Err(invalid(key("default"), "only one upstream may be the default"));
                }
            }
        }
        Ok(())
    }
}

/// A registry host as clients write it: DNS labels, optional port. `localhost` counts.
pub fn is_registry_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A size in bytes, written like "20GiB", "500MB" or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
        let (num, unit) = (s[..split].trim(), s[split..].trim());
        let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a size like \"20GiB\""))?;
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" | "k" => 1_000,
            "mb" | "m" => 1_000_000,
            "gb" | "g" => 1_000_000_000,
            "tb" | "t" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => return Err(format!("{s:?} has an unknown unit {unit:?}")),
        };
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("{s:?} is out of range"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (unit, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// A duration written like "5m", "30s", "1h30m", "250ms".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a duration like \"5m\", \"30s\" or \"1h30m\"");
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let unit = match &rest[..unit_len] {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n.saturating_mul(60)),
                "h" => Duration::from_secs(n.saturating_mul(3600)),
                "d" => Duration::from_secs(n.saturating_mul(86400)),
                _ => return Err(bad()),
            };
            total = total.saturating_add(unit);
            rest = &rest[unit_len..];
        }
        Ok(HumanDuration(total))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let s = ms / 1000;
        match s {
            0 => write!(f, "0s"),
            s if s % 3600 == 0 => write!(f, "{}h", s / 3600),
            s if s % 60 == 0 => write!(f, "{}m", s / 60),
            s => write!(f, "{s}s"),
        }
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    Text(String),
                    Number(u64),
                }
                match Raw::deserialize(d)? {
                    Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
                    Raw::Number(n) => n.to_string().parse().map_err(serde::de::Error::custom),
                }
            }
        }
    };
}
string_serde!(ByteSize);
string_serde!(HumanDuration);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_is_the_embedded_default_and_valid() {
        let c = Config::embedded_default();
        assert_eq!(c.server.listen, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(c.cache.max_size, ByteSize(20 << 30));
        assert_eq!(c.cache.dir, PathBuf::from("./regcache-data"));
        let names: Vec<_> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "docker.io",
                "ghcr.io",
                "quay.io",
                "registry.k8s.io",
                "gcr.io",
                "mcr.microsoft.com",
                "public.ecr.aws"
            ]
        );
        let hub = &c.upstreams[0];
        assert!(hub.default && hub.url == "https://registry-1.docker.io");
        assert_eq!(hub.tag_ttl, HumanDuration(Duration::from_secs(300)));
        // Round trip through check-config's output.
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(again.upstreams.len(), 7);
        assert_eq!(again.cache.max_size, c.cache.max_size);
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!("20GiB".parse::<ByteSize>().unwrap(), ByteSize(20 << 30));
        assert_eq!("1.5 KiB".parse::<ByteSize>().unwrap(), ByteSize(1536));
        assert_eq!("500MB".parse::<ByteSize>().unwrap(), ByteSize(500_000_000));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert_eq!("1h30m".parse::<HumanDuration>().unwrap().0, Duration::from_secs(5400));
        assert_eq!("250ms".parse::<HumanDuration>().unwrap().0, Duration::from_millis(250));
        assert!("5 minutes".parse::<HumanDuration>().is_err());
        assert!("".parse::<HumanDuration>().is_err());
        assert_eq!(ByteSize(20 << 30).to_string(), "20GiB");
        assert_eq!(HumanDuration(Duration::from_secs(300)).to_string(), "5m");
    }

    fn err_of(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn bad_configs_name_the_key() {
        assert!(err_of("[cache]\nmax_sise = \"1GiB\"\n").contains("max_sise"));
        assert!(err_of("[cache]\nmax_size = \"lots\"\n").contains("max_size"));
        let two_defaults = "[[upstream]]\nname=\"a.io\"\nurl=\"http://127.0.0.1:1\"\ndefault=true\n\
                            [[upstream]]\nname=\"b.io\"\nurl=\"http://127.0.0.1:2\"\ndefault=true\n";
        assert!(err_of(two_defaults).contains("upstream[1].default"));
        let bad_url = "[[upstream]]\nname=\"a.io\"\nurl=\"ftp://x\"\n";
        assert!(err_of(bad_url).contains("upstream[0].url"));
        let bad_name = "[[upstream]]\nname=\"a/b\"\nurl=\"http://x\"\n";
        assert!(err_of(bad_name).contains("upstream[0].name"));
    }

    #[test]
    fn secrets_are_redacted_and_credentials_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "[[upstream]]\nname=\"private.example\"\nurl=\"https://private.example\"\n\
             username=\"bob\"\npassword=\"hunter2\"\n\
             [[upstream]]\nname=\"other.example\"\nurl=\"https://other.example\"\n\
             username=\"amy\"\npassword_file=\"{}\"\n",
            file.display()
        );
        let c = Config::from_toml(&text).unwrap();
        let shown = c.to_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(
            c.upstreams[0].credentials().unwrap(),
            Some(("bob".into(), "hunter2".into()))
        );
        assert_eq!(
            c.upstreams[1].credentials().unwrap(),
            Some(("amy".into(), "from-file".into()))
        );
        assert_eq!(
            credentials_env_prefix("registry.lab:5000"),
            "REGCACHE_UPSTREAM_REGISTRY_LAB_5000"
        );
        let missing =
            "[[upstream]]\nname=\"a.io\"\nurl=\"https://a.io\"\nusername=\"x\"\npassword_file=\"/nonexistent/pw\"\n";
        assert!(err_of(missing).contains("upstream[0].password"));
        let no_pass = "[[upstream]]\nname=\"a.io\"\nurl=\"https://a.io\"\nusername=\"x\"\n";
        assert!(err_of(no_pass).contains("needs a password"));
    }

    #[test]
    fn registry_hosts() {
        for ok in ["docker.io", "localhost", "127.0.0.1:5000", "registry.lab:5000", "a-b.c"] {
            assert!(is_registry_host(ok), "{ok}");
        }
        for bad in ["", "a/b", "-a.io", "a..io", "a.io:", "a.io:123456", "A_B"] {
            assert!(!is_registry_host(bad), "{bad}");
        }
    }

    proptest::proptest! {
        /// Whatever the file holds, parsing ends in a config or an error naming the cause.
        #[test]
        fn config_parser_never_panics(s in "\\PC{0,300}") {
            if let Err(e) = Config::from_toml(&s) {
                proptest::prop_assert!(!e.to_string().contains('\n'), "one line: {}", e);
            }
        }

        #[test]
        fn sizes_and_durations_never_panic(s in "[0-9]{0,25}[a-zA-Z]{0,4}") {
            let _ = s.parse::<ByteSize>();
            let _ = s.parse::<HumanDuration>();
        }
    }
}
