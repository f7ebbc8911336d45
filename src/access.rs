//! Client access control: who may pull what. Users are configured with bcrypt hashes;
//! clients authenticate with Basic credentials or with the registry token flow (a 401 with
//! `WWW-Authenticate: Bearer realm=…/token`, then `GET /token` with Basic credentials).
//! Tokens are HMAC-signed (a key made at startup) and short-lived; a verified Basic header
//! is remembered for a while so bcrypt's cost is paid once, not per layer.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;

use crate::config::AuthConfig;
use crate::digest::Digest;

const TOKEN_TTL: Duration = Duration::from_secs(300);
/// How long a wrong credential pair is answered from memory, without bcrypt.
const FAILED_TTL: Duration = Duration::from_secs(30);
/// bcrypt checks running at once (on the blocking pool). Each costs tens of milliseconds
/// of CPU: more at once would only queue behind the cores, and must never sit on the
/// async workers that serve warm pulls.
const BCRYPT_SLOTS: usize = 2;
/// Verifies against this when the user does not exist, so that a wrong name costs the same
/// time as a wrong password.
const DUMMY_HASH: &str = "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy";

/// Who a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    User(String),
    /// Credentials were given and are wrong.
    Invalid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Ask for credentials (401 with a challenge).
    Challenge,
    /// Known, but not allowed this (403).
    Deny,
}

struct User {
    hash: String,
    allow: Vec<String>,
}

pub struct Access {
    users: HashMap<String, User>,
    anonymous: bool,
    anonymous_allow: Vec<String>,
    key: hmac::Key,
    verified: moka::sync::Cache<Digest, String>,
    failed: moka::sync::Cache<Digest, ()>,
    bcrypt_slots: tokio::sync::Semaphore,
    /// Concurrent first checks of one credential pair (a pull's parallel layers) run
    /// bcrypt once.
    checks: crate::single_flight::SingleFlight<Digest, bool>,
    bcrypt_runs: std::sync::atomic::AtomicU64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `*` matches any run of characters; everything else matches itself. The crate's one
/// glob matcher (access rules, policies, pins, sync and `ls` filters).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let text = text.as_bytes();
    matches_bytes(pattern.as_bytes(), text.len(), |i| text[i])
}

/// Whether `pattern` matches the name `<upstream>/<repo>`, without building that name:
/// policies and access rules are matched on every request.
pub fn name_matches(pattern: &str, upstream: &str, repo: &str) -> bool {
    // The usual pattern, `docker.io/library/*`: its literal part is the whole name or its
    // start, compared in place.
    if let Some(head) = pattern.strip_suffix('*').filter(|h| !h.contains('*')) {
        return match head.strip_prefix(upstream) {
            Some(rest) => match rest.strip_prefix('/') {
                Some(rest) => repo.starts_with(rest),
                None => rest.is_empty(),
            },
            None => upstream.starts_with(head),
        };
    }
    let (u, r) = (upstream.as_bytes(), repo.as_bytes());
    let at = |i: usize| match i.cmp(&u.len()) {
        std::cmp::Ordering::Less => u[i],
        std::cmp::Ordering::Equal => b'/',
        std::cmp::Ordering::Greater => r[i - u.len() - 1],
    };
    matches_bytes(pattern.as_bytes(), u.len() + 1 + r.len(), at)
}

/// Glob matching with backtracking to the last `*`, over a text of `len` bytes read by `at`.
fn matches_bytes(p: &[u8], len: usize, at: impl Fn(usize) -> u8) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < len {
        if pi < p.len() && p[pi] != b'*' && p[pi] == at(ti) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

fn allowed(rules: &[String], upstream: &str, repo: &str) -> bool {
    rules.is_empty() || rules.iter().any(|r| name_matches(r, upstream, repo))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim().bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

impl Access {
    pub fn new(config: &AuthConfig) -> Access {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
            // No system randomness: derive a key from the clock and pid (still unguessable
            // enough for short-lived tokens on one host, and never a fixed key).
            let seed = format!("{:?}{}", SystemTime::now(), std::process::id());
            hmac::Key::new(hmac::HMAC_SHA256, Digest::sha256_of(seed.as_bytes()).hex().as_bytes())
        });
        Access {
            users: config
                .users
                .iter()
                .map(|u| {
                    let user = User {
                        hash: u.password_hash.0.clone(),
                        allow: u.allow.clone(),
                    };
                    (u.name.clone(), user)
                })
                .collect(),
            anonymous: config.anonymous_allowed(),
            anonymous_allow: config.anonymous_allow.clone(),
            key,
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(TOKEN_TTL)
                .build(),
            failed: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(FAILED_TTL)
                .build(),
            bcrypt_slots: tokio::sync::Semaphore::new(BCRYPT_SLOTS),
            checks: crate::single_flight::SingleFlight::default(),
            bcrypt_runs: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether any request could be refused (so that challenges are worth sending).
    pub fn enforced(&self) -> bool {
        !self.anonymous || !self.anonymous_allow.is_empty()
    }

    /// Checks Basic credentials: bcrypt once (on the blocking pool, a bounded number at a
    /// time), then remembered for a few minutes; a wrong pair is remembered briefly too.
    async fn check_basic(&self, encoded: &str) -> Identity {
        let Some(decoded) = decode_base64(encoded).and_then(|b| String::from_utf8(b).ok()) else {
            return Identity::Invalid;
        };
        let Some((name, password)) = decoded.split_once(':') else {
            return Identity::Invalid;
        };
        let fingerprint = Digest::sha256_of(decoded.as_bytes());
        if let Some(user) = self.verified.get(&fingerprint) {
            return Identity::User(user);
        }
        if self.failed.contains_key(&fingerprint) {
            return Identity::Invalid;
        }
        let (hash, exists) = match self.users.get(name) {
            Some(u) => (u.hash.clone(), true),
            None => (DUMMY_HASH.to_owned(), false),
        };
        let (password, user) = (password.to_owned(), name.to_owned());
        let key = fingerprint.clone();
        let ok = self
            .checks
            .run(fingerprint, || async move {
                // A flight that ended just before this one may have settled it already.
                if self.failed.contains_key(&key) {
                    return false;
                }
                if self.verified.contains_key(&key) {
                    return true;
                }
                let Ok(_slot) = self.bcrypt_slots.acquire().await else {
                    return false;
                };
                self.bcrypt_runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                    .await
                    .unwrap_or(false)
                    && exists;
                // Remembered before the flight ends, so that no request arriving just after
                // it runs bcrypt again.
                if ok {
                    self.verified.insert(key, user);
                } else {
                    self.failed.insert(key, ());
                }
                ok
            })
            .await;
        if ok {
            Identity::User(name.to_owned())
        } else {
            Identity::Invalid
        }
    }

    /// How many bcrypt checks have run (each one costs tens of milliseconds of CPU).
    pub fn bcrypt_runs(&self) -> u64 {
        self.bcrypt_runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A token for `user` ("" for anonymous): `v1.<hex user>.<expiry>.<hex hmac>`.
    pub fn issue_token(&self, user: &str) -> (String, u64) {
        let expires = now_secs() + TOKEN_TTL.as_secs();
        let body = format!("v1.{}.{expires}", hex(user.as_bytes()));
        let tag = hmac::sign(&self.key, body.as_bytes());
        (format!("{body}.{}", hex(tag.as_ref())), TOKEN_TTL.as_secs())
    }

    fn check_token(&self, token: &str) -> Identity {
        let Some((body, tag)) = token.rsplit_once('.') else {
            return Identity::Invalid;
        };
        let Some(tag) = unhex(tag) else {
            return Identity::Invalid;
        };
        if hmac::verify(&self.key, body.as_bytes(), &tag).is_err() {
            return Identity::Invalid;
        }
        let mut parts = body.split('.');
        let (Some("v1"), Some(user), Some(expires)) = (parts.next(), parts.next(), parts.next()) else {
            return Identity::Invalid;
        };
        let expired = expires.parse::<u64>().map_or(true, |e| e < now_secs());
        match unhex(user).and_then(|u| String::from_utf8(u).ok()) {
            Some(_) if expired => Identity::Invalid,
            Some(u) if u.is_empty() => Identity::Anonymous,
            Some(u) => Identity::User(u),
            None => Identity::Invalid,
        }
    }

    /// Who sent a request with this `Authorization` header.
    pub async fn identify(&self, authorization: Option<&str>) -> Identity {
        let Some(value) = authorization else {
            return Identity::Anonymous;
        };
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            self.check_basic(rest).await
        } else if scheme.eq_ignore_ascii_case("bearer") {
            self.check_token(rest.trim())
        } else {
            Identity::Invalid
        }
    }

    /// Whether `who` may pull `repo` from `upstream` (`None` for `/v2/` itself).
    pub fn authorize(&self, who: &Identity, target: Option<(&str, &str)>) -> Decision {
        match who {
            Identity::Invalid => Decision::Challenge,
            Identity::Anonymous => match target {
                _ if !self.anonymous => Decision::Challenge,
                None => Decision::Allow,
                Some((up, repo)) if allowed(&self.anonymous_allow, up, repo) => Decision::Allow,
                Some(_) => Decision::Challenge,
            },
            Identity::User(name) => match (self.users.get(name), target) {
                (None, _) => Decision::Challenge,
                (Some(_), None) => Decision::Allow,
                (Some(u), Some((up, repo))) if allowed(&u.allow, up, repo) => Decision::Allow,
                (Some(_), Some(_)) => Decision::Deny,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Redacted, UserConfig};

    fn access(anonymous: Option<bool>) -> Access {
        Access::new(&AuthConfig {
            anonymous,
            anonymous_allow: vec!["docker.io/library/*".into()],
            users: vec![UserConfig {
                name: "ci".into(),
                password_hash: Redacted(bcrypt::hash("pw", 4).unwrap()),
                allow: vec!["docker.io/*".into(), "ghcr.io/team/*".into()],
            }],
        })
    }

    #[test]
    fn globs() {
        assert!(glob_match("docker.io/*", "docker.io/library/alpine"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("ghcr.io/*/app", "ghcr.io/org/app"));
        assert!(!glob_match("ghcr.io/*/app", "ghcr.io/org/app2"));
        assert!(!glob_match("docker.io/library/*", "docker.io/bitnami/redis"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(glob_match("*alpine*", "docker.io/library/alpine:3.20"));
        assert!(glob_match("ghcr.io/org/app", "ghcr.io/org/app"));
        assert!(!glob_match("ghcr.io/org/app", "ghcr.io/org/app2"));
        assert!(!glob_match("*/app", "ghcr.io/org/apps"));
        assert!(glob_match("a*b*c", "a-b-b-c"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(name_matches("docker.io/library/*", "docker.io", "library/alpine"));
        assert!(name_matches("*o/l*", "docker.io", "library/alpine"));
        assert!(!name_matches("docker.io/library/*", "docker.io", "bitnami/redis"));
        assert!(!name_matches("docker.io", "docker.io", "library/alpine"));
        // Where the two parts meet (cases the property below once shrank to).
        for (pattern, upstream, repo) in [("*//", "/", ""), ("*", "", ""), ("*", "/", ""), ("a/*", "a", "")] {
            let joined = format!("{upstream}/{repo}");
            assert_eq!(
                name_matches(pattern, upstream, repo),
                glob_match(pattern, &joined),
                "{pattern} {joined}"
            );
        }
    }

    proptest::proptest! {
        /// A name matched in its two parts matches as the joined name would.
        #[test]
        fn a_name_matches_as_its_joined_text_would(
            pattern in "[a-c/*]{0,8}\\*?",
            upstream in "[a-c/]{0,5}",
            repo in "[a-c/]{0,5}",
        ) {
            let joined = format!("{upstream}/{repo}");
            proptest::prop_assert_eq!(name_matches(&pattern, &upstream, &repo), glob_match(&pattern, &joined));
        }
    }

    #[tokio::test]
    async fn basic_and_tokens() {
        let a = access(None);
        assert!(a.enforced());
        let good = format!("Basic {}", "Y2k6cHc="); // ci:pw
        assert_eq!(a.identify(Some(&good)).await, Identity::User("ci".into()));
        assert_eq!(a.identify(Some("Basic Y2k6bm9wZQ==")).await, Identity::Invalid); // ci:nope
        assert_eq!(a.identify(Some("Basic bm9ib2R5OnB3")).await, Identity::Invalid); // nobody:pw
        assert_eq!(a.identify(Some("Basic !!!")).await, Identity::Invalid);
        let (token, ttl) = a.issue_token("ci");
        assert_eq!(ttl, 300);
        assert_eq!(
            a.identify(Some(&format!("Bearer {token}"))).await,
            Identity::User("ci".into())
        );
        let forged = token.replacen("v1.6369", "v1.6368", 1);
        assert_eq!(a.identify(Some(&format!("Bearer {forged}"))).await, Identity::Invalid);
        let (anon, _) = a.issue_token("");
        assert_eq!(a.identify(Some(&format!("Bearer {anon}"))).await, Identity::Anonymous);
        assert_eq!(a.identify(Some("Bearer garbage")).await, Identity::Invalid);
    }

    #[test]
    fn decisions() {
        let a = access(None);
        let ci = Identity::User("ci".into());
        assert_eq!(a.authorize(&ci, Some(("ghcr.io", "team/app"))), Decision::Allow);
        assert_eq!(a.authorize(&ci, Some(("ghcr.io", "other/app"))), Decision::Deny);
        assert_eq!(a.authorize(&Identity::Anonymous, None), Decision::Challenge);
        assert_eq!(a.authorize(&Identity::Invalid, None), Decision::Challenge);
        let open = access(Some(true));
        assert_eq!(
            open.authorize(&Identity::Anonymous, Some(("docker.io", "library/alpine"))),
            Decision::Allow
        );
        assert_eq!(
            open.authorize(&Identity::Anonymous, Some(("docker.io", "bitnami/redis"))),
            Decision::Challenge
        );
        let nobody = Access::new(&AuthConfig::default());
        assert!(!nobody.enforced());
        assert_eq!(
            nobody.authorize(&Identity::Anonymous, Some(("x", "y"))),
            Decision::Allow
        );
    }
}
