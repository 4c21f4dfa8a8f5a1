//! Bytes of a WebSocket message from an untrusted tunnel peer (an agent, a CLI, a laptop daemon), as
//! `tunnel::decode` reads them: decoding never panics or reads past the message, an error leaves the buffer
//! as it was, and every frame that decodes encodes back to exactly the bytes it came from. The properties are
//! `tunnel::fuzzing::check`, which the tunnel crate's tests also run on stable over deterministic mutations.
//!
//! How to run it: see `fuzz/README.md`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tunnel::fuzzing::check(data);
});
