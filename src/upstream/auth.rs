//! Authenticating to an upstream: `WWW-Authenticate` challenges, the bearer token flow
//! (anonymous or with credentials), Basic-only registries, and a token cache per scope.
//! Credentials only go to a token realm on the upstream's own registrable domain, or one the
//! configuration trusts by name; secrets never appear in logs or errors.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A secret string: never printed, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    pub fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            base64(format!("{}:{}", self.username, self.password.0).as_bytes())
        )
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses the first challenge regcache can answer. Never panics on any input.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

/// `key=value, key="quoted, \"value\""` pairs.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next() != Some('=') {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_owned();
        }
        out.push((key.trim().to_owned(), value));
    }
}

/// A token the upstream's token service issued, with when to stop using it.
#[derive(Clone, Debug)]
pub struct Token {
    pub value: Secret,
    pub expires: Instant,
}

/// Tokens per scope, until shortly before they expire.
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<String, Token>>,
}

impl TokenCache {
    pub fn get(&self, scope: &str, now: Instant) -> Option<Secret> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.get(scope).filter(|t| t.expires > now).map(|t| t.value.clone())
    }

    pub fn put(&self, scope: &str, token: Token) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        tokens.retain(|_, t| t.expires > now);
        tokens.insert(scope.to_owned(), token);
    }

    pub fn forget(&self, scope: &str) {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).remove(scope);
    }
}

/// The token service's JSON answer.
#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    /// Any JSON number: what a token service sends is not trusted to fit a `u64`.
    expires_in: Option<f64>,
}

/// The longest token lifetime regcache believes (a huge `expires_in` must not overflow).
const MAX_TOKEN_LIFETIME: u64 = 24 * 3600;

/// Reads a token answer; `expires_in` defaults to 60 s, and a token is dropped a little
/// before it expires so that a request never carries one that dies in flight.
pub fn parse_token_response(body: &[u8], received: Instant) -> Option<Token> {
    let r: TokenResponse = serde_json::from_slice(body).ok()?;
    let value = r.token.or(r.access_token).filter(|t| !t.is_empty())?;
    let seconds = r.expires_in.filter(|s| s.is_finite()).unwrap_or(60.0);
    let lifetime = Duration::from_secs(seconds.clamp(1.0, MAX_TOKEN_LIFETIME as f64) as u64);
    let margin = (lifetime / 10).min(Duration::from_secs(10));
    Some(Token {
        value: Secret(value),
        expires: received + lifetime - margin,
    })
}

fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn docker_hub_challenge() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            parse_challenge(h),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
        let commas = r#"Bearer realm="https://r/t", scope="repository:a:pull,push", error="invalid_token""#;
        match parse_challenge(commas) {
            Some(Challenge::Bearer { scope, service, .. }) => {
                assert_eq!(scope.as_deref(), Some("repository:a:pull,push"));
                assert_eq!(service, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn token_responses() {
        let now = Instant::now();
        let t = parse_token_response(br#"{"token":"abc","expires_in":300}"#, now).unwrap();
        assert_eq!(t.value.0, "abc");
        assert_eq!(t.expires, now + Duration::from_secs(290));
        let t = parse_token_response(br#"{"access_token":"xyz"}"#, now).unwrap();
        assert_eq!(t.value.0, "xyz");
        assert_eq!(t.expires, now + Duration::from_secs(54));
        assert!(parse_token_response(b"{}", now).is_none());
        // Hostile lifetimes neither overflow nor make a token immortal or instantly dead.
        let t = parse_token_response(br#"{"token":"a","expires_in":18446744073709551615}"#, now).unwrap();
        assert!(t.expires <= now + Duration::from_secs(MAX_TOKEN_LIFETIME));
        let t = parse_token_response(br#"{"token":"a","expires_in":1e300}"#, now).unwrap();
        assert!(t.expires <= now + Duration::from_secs(MAX_TOKEN_LIFETIME));
        let t = parse_token_response(br#"{"token":"a","expires_in":-5}"#, now).unwrap();
        assert!(t.expires >= now);
        assert!(parse_token_response(b"not json", now).is_none());
        assert_eq!(format!("{:?}", t.value), "<redacted>");
    }

    #[test]
    fn token_cache_expires() {
        let cache = TokenCache::default();
        let now = Instant::now();
        cache.put(
            "repository:a:pull",
            Token {
                value: Secret("t".into()),
                expires: now + Duration::from_secs(60),
            },
        );
        assert!(cache.get("repository:a:pull", now).is_some());
        assert!(cache.get("repository:b:pull", now).is_none());
        assert!(cache.get("repository:a:pull", now + Duration::from_secs(61)).is_none());
        cache.forget("repository:a:pull");
        assert!(cache.get("repository:a:pull", now).is_none());
    }

    #[test]
    fn basic_header() {
        let c = Credentials {
            username: "user".into(),
            password: Secret("pass".into()),
        };
        assert_eq!(c.basic_header(), "Basic dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
    }

    proptest! {
        #[test]
        fn challenge_parser_never_panics(s in "\\PC{0,200}") {
            let _ = parse_challenge(&s);
        }

        #[test]
        fn token_answers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200), n in any::<f64>()) {
            let now = Instant::now();
            let _ = parse_token_response(&body, now);
            let json = format!("{{\"token\":\"t\",\"expires_in\":{n}}}");
            if let Some(t) = parse_token_response(json.as_bytes(), now) {
                prop_assert!(t.expires <= now + Duration::from_secs(MAX_TOKEN_LIFETIME));
            }
        }
    }
}
