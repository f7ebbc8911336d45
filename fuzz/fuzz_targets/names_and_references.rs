//! Invariant: a repository name that parses has no `.`/`..`/empty path component (it is
//! used to build upstream URLs), and a reference that parses prints back as itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use regcache::oci::{Reference, RepoName};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some(name) = RepoName::parse(s) {
        assert!(!name.as_str().split('/').any(|c| c.is_empty() || c == "." || c == ".."));
    }
    if let Some(r) = Reference::parse(s) {
        assert_eq!(r.to_string(), s);
    }
});
