//! A laptop wired into an environment (`kiln connect`): the daemon, its supervisor, the DNS it answers, the
//! system changes it makes and undoes, and the messages it and the server exchange.
//!
//! - [`proto`]: the session messages and stream targets between a daemon and the server.
//! - [`dns`]: reading queries and writing answers (no I/O; fuzzed).
//! - [`system`]: the resolver configuration and hosts file changes, journaled so they can always be undone.
//! - [`daemon`]: `kiln daemon run`.
//! - [`supervisor`]: `kiln supervisor`.
//! - [`control`]: the CLI's client of the daemon's control socket.

pub mod control;
pub mod daemon;
pub mod dns;
pub mod proto;
pub mod supervisor;
pub mod system;
