//! A webhook delivery from anyone who can reach the server: verifying and parsing it must never panic, and
//! what parses must be consistent (`ci::hooks::fuzzing::check`, also run on stable by `cargo test -p ci`).
//!
//! How to run it: see `fuzz/README.md`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ci::hooks::fuzzing::check(data);
});
