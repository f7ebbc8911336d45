//! OCI distribution vocabulary: repository names, references (tag or digest), manifest media
//! types and the `Accept` negotiation over them. Pure: no I/O.

use std::fmt;

use crate::digest::Digest;

pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The manifest media types regcache serves, in the order it asks upstreams for them.
/// Schema 1 is deliberately absent: it is never requested nor served.
pub const MANIFEST_TYPES: [&str; 4] = [OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST_V2];

pub fn is_schema1(media_type: &str) -> bool {
    let t = media_type.split(';').next().unwrap_or("").trim();
    t == DOCKER_SCHEMA1 || t == DOCKER_SCHEMA1_SIGNED
}

/// A repository name per the distribution spec grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Option<RepoName> {
        // A byte split: `str`'s char searcher cost more than the grammar check itself.
        if s.is_empty() || s.len() > 255 || !s.as_bytes().split(|&b| b == b'/').all(valid_component) {
            return None;
        }
        Some(RepoName(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn segments(&self) -> usize {
        memchr::memchr_iter(b'/', self.0.as_bytes()).count() + 1
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_component(b: &[u8]) -> bool {
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-", always followed by alnum.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_valid_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    /// A digest if it has a `:`, else a tag; `None` when it is neither.
    pub fn parse(s: &str) -> Option<Reference> {
        if s.contains(':') {
            s.parse().ok().map(Reference::Digest)
        } else if is_valid_tag(s) {
            Some(Reference::Tag(s.to_owned()))
        } else {
            None
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// The manifest media types a client accepts, reduced to the ones regcache serves. Two
/// clients with the same set get the same answer for a tag, so the set keys tag mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AcceptSet(u8);

impl AcceptSet {
    pub const ALL: AcceptSet = AcceptSet(0b1111);

    /// From every `Accept` header value of a request (clients send one list or many lines).
    /// No header, `*/*`, or nothing regcache knows (e.g. only schema 1) means all types.
    pub fn from_headers<'a>(values: impl Iterator<Item = &'a str>) -> AcceptSet {
        let mut bits = 0u8;
        let mut any = false;
        // Split with `memchr`: `str`'s char searcher cost half of this function.
        let before = |s: &'a str, b: u8| memchr::memchr(b, s.as_bytes()).map_or(s, |i| &s[..i]);
        for value in values {
            let items = memchr::memchr_iter(b',', value.as_bytes()).chain([value.len()]);
            let mut start = 0;
            for end in items {
                let item = &value[start..end];
                start = end + 1;
                let t = before(item, b';').trim();
                if t == "*/*" || t == "application/*" {
                    any = true;
                }
                // As clients write them, compared whole (a `memcmp`) before byte by byte.
                if let Some(i) = MANIFEST_TYPES.iter().position(|m| *m == t || m.eq_ignore_ascii_case(t)) {
                    bits |= 1 << i;
                }
            }
        }
        if any || bits == 0 {
            AcceptSet::ALL
        } else {
            AcceptSet(bits)
        }
    }

    pub fn contains(self, media_type: &str) -> bool {
        let t = media_type.split(';').next().unwrap_or("").trim();
        MANIFEST_TYPES
            .iter()
            .position(|m| *m == t)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }

    /// The `Accept` header value to send upstream for this set.
    pub fn header_value(self) -> String {
        MANIFEST_TYPES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, m)| *m)
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    /// The set a tag record was keyed by ([`AcceptSet::bits`]); no known type means all.
    pub fn from_bits(bits: u8) -> AcceptSet {
        match bits & AcceptSet::ALL.0 {
            0 => AcceptSet::ALL,
            b => AcceptSet(b),
        }
    }
}

/// The media type of manifest bytes when the upstream did not say: the `mediaType` field,
/// else inferred from its shape as containerd does.
pub fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        config: Option<serde_json::Value>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    if let Some(t) = p.media_type {
        return Some(t);
    }
    match (p.schema_version, p.manifests.is_some(), p.config.is_some()) {
        (Some(1), _, _) => Some(DOCKER_SCHEMA1.to_owned()),
        (_, true, _) => Some(OCI_INDEX.to_owned()),
        (_, _, true) => Some(OCI_MANIFEST.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn repo_names() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-org/my_app",
            "a__b",
            "a.b-c",
            "x--y",
            "0",
        ] {
            assert!(RepoName::parse(ok).is_some(), "{ok}");
        }
        for bad in [
            "", "Alpine", "a//b", "/a", "a/", "..", "a/../b", "a/./b", "-a", "a-", "a___b", "a_.b", "a b", "a%2fb",
        ] {
            assert!(RepoName::parse(bad).is_none(), "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_none());
    }

    #[test]
    fn references() {
        assert_eq!(Reference::parse("3.19"), Some(Reference::Tag("3.19".into())));
        assert!(Reference::parse(".hidden").is_none());
        assert!(Reference::parse(&"t".repeat(129)).is_none());
        assert!(Reference::parse("sha256:abc").is_none());
        assert!(matches!(
            Reference::parse("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            Some(Reference::Digest(_))
        ));
    }

    #[test]
    fn accept_sets() {
        let skopeo = [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            "application/vnd.docker.distribution.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.oci.image.index.v1+json",
        ];
        assert_eq!(AcceptSet::from_headers(skopeo.into_iter()), AcceptSet::ALL);
        let old = AcceptSet::from_headers(["application/vnd.docker.distribution.manifest.v2+json"].into_iter());
        assert!(old.contains(DOCKER_MANIFEST_V2));
        assert!(!old.contains(DOCKER_MANIFEST_LIST));
        assert_eq!(old.header_value(), DOCKER_MANIFEST_V2);
        assert_eq!(AcceptSet::from_headers(std::iter::empty()), AcceptSet::ALL);
        assert_eq!(
            AcceptSet::from_headers(["application/vnd.oci.image.manifest.v1+json, */*"].into_iter()),
            AcceptSet::ALL
        );
        assert!(is_schema1(DOCKER_SCHEMA1_SIGNED));
    }

    proptest! {
        #[test]
        fn an_accept_list_names_exactly_its_manifest_types(
            picks in proptest::collection::vec((0usize..6, "[ ]{0,2}", "(;q=0\\.[0-9])?"), 1..8),
        ) {
            let types = [OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST_V2, "text/plain", "application/json"];
            let header = picks
                .iter()
                .map(|(i, space, q)| format!("{space}{}{q}", types[*i]))
                .collect::<Vec<_>>()
                .join(",");
            let set = AcceptSet::from_headers(std::iter::once(header.as_str()));
            let named = |t: &str| picks.iter().any(|(i, ..)| types[*i] == t);
            if !MANIFEST_TYPES.iter().any(|t| named(t)) {
                prop_assert_eq!(set, AcceptSet::ALL);
            }
            for t in MANIFEST_TYPES.iter().filter(|t| named(t)) {
                prop_assert!(set.contains(t), "{header}: {t}");
            }
            if set != AcceptSet::ALL {
                for t in MANIFEST_TYPES.iter().filter(|t| !named(t)) {
                    prop_assert!(!set.contains(t), "{header}: {t}");
                }
            }
        }

        #[test]
        fn parsers_never_panic(s in "\\PC{0,300}") {
            let _ = RepoName::parse(&s);
            let _ = Reference::parse(&s);
            let _ = AcceptSet::from_headers(std::iter::once(s.as_str()));
            let _ = sniff_media_type(s.as_bytes());
        }

        #[test]
        fn valid_tags_round_trip(t in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}") {
            prop_assert_eq!(Reference::parse(&t), Some(Reference::Tag(t.clone())));
        }

        #[test]
        fn valid_names_have_no_path_tricks(s in "[a-z0-9._/-]{1,40}") {
            if let Some(n) = RepoName::parse(&s) {
                prop_assert!(!n.as_str().split('/').any(|c| c == "." || c == ".." || c.is_empty()));
            }
        }
    }
}
