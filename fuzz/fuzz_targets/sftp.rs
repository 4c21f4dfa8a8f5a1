//! An SFTP packet from an untrusted client (a user's `scp`, `sftp` or any program on the SSH channel), as
//! the workspace agent's SFTP server decodes it: decoding never panics, never reads past the packet, and a
//! packet that decodes keeps decoding the same way (`agent::sftp::fuzzing::check`, which the agent's tests
//! also run on stable over deterministic mutations).
//!
//! How to run it: see `fuzz/README.md`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    agent::sftp::fuzzing::check(data);
});
