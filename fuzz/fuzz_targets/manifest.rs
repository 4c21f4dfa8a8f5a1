//! Manifest text from an untrusted client: decoding and normalizing must never panic, and whatever normalizes
//! must be a fixed point of normalize and survive a JSON round trip.
//!
//! How to run it: see `fuzz/README.md`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(resources) = model::decode_manifests(text) else {
        return;
    };
    for r in resources {
        let _ = model::references(&r);
        let Ok(normalized) = model::normalize(r) else {
            continue;
        };
        let again =
            model::normalize(normalized.clone()).expect("a normalized resource stays valid");
        assert_eq!(again, normalized, "normalize is not idempotent");
        let json = serde_json::to_string(&normalized).expect("resources serialize");
        let back = model::decode_manifests(&json).expect("a normalized resource decodes");
        assert_eq!(back, vec![normalized], "JSON round trip changed a resource");
    }
});
