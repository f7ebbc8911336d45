//! Invariant: a digest that parses prints back exactly as given (it names a path on disk).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(d) = s.parse::<regcache::digest::Digest>() {
        assert_eq!(d.to_string(), s);
        assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
});
