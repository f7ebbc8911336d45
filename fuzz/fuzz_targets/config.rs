//! Invariant: any config file ends in a valid config or a one-line error; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = regcache::Config::from_toml(text) {
            assert!(!e.to_string().contains('\n'));
        }
    }
});
