//! Bytes from an untrusted client or backend, as the gateway's forwarding path reads them: parsing a request or
//! response head, and writing the head forwarded from it, must never panic; a forwarded head parses again; a
//! chunked body's end does not depend on how its bytes were split into reads. The properties are
//! `h1::fuzzing::check`, which the h1 crate's tests also run on stable over deterministic mutations.
//!
//! How to run it: see `fuzz/README.md`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    h1::fuzzing::check(data);
});
