//! Invariant: any request line parses to a route or an error without panicking, and a
//! parsed route's name is never empty (the handlers then check it against the grammar).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    for method in [http::Method::GET, http::Method::HEAD, http::Method::PUT] {
        if let Ok(route) = regcache::http::routes::parse(&method, path) {
            assert!(route.name.is_empty() == (route.endpoint == regcache::http::routes::Endpoint::Base));
        }
    }
    let _ = regcache::http::routes::query_param(Some(path), "ns");
});
