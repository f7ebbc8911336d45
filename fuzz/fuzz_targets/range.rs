//! Invariant: a `Range` header resolves, for any blob size, to a non-empty span inside the
//! blob or to "unsatisfiable"; never a panic or an out-of-bounds span.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, u64)| {
    let (header, total) = input;
    if let Some((start, end)) = regcache::http::handlers::parse_range(header).and_then(|r| r.resolve(total)) {
        assert!(start < end && end <= total);
    }
});
