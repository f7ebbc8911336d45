//! Invariant: any `WWW-Authenticate` value an upstream sends parses or is refused without
//! panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = regcache::upstream::auth::parse_challenge(s);
    }
});
