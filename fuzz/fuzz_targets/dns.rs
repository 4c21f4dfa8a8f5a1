//! A DNS query from anyone who can reach a laptop daemon's resolver, as `connect::dns::handle` reads it: it
//! never panics, and an answer carries the query's id and question (`connect::dns::fuzzing::check`, which the
//! connect crate's tests also run on stable over deterministic mutations).
//!
//! How to run it: see `fuzz/README.md`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    connect::dns::fuzzing::check(data);
});
