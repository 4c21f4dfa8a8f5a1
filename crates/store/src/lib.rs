//! Kiln's resource store: one generic store of [`model::Resource`]s over two SQL backends, SQLite (WAL, the
//! embedded default) and PostgreSQL, plus the identity, audit and event tables.
//!
//! Architecture invariants:
//! - Every write is one transaction that also appends a row to the event log under a new global revision; the
//!   revision order equals commit order, so a watcher resuming from revision N never misses a later commit.
//! - A write is acknowledged (the future resolves `Ok`) only after its transaction committed.
//! - The store knows nothing of users' permissions: callers filter by organization/project.
//! - Both backends pass the same conformance suite (`tests/conformance.rs`).

mod error;
pub mod identity;
mod types;

pub use error::StoreError;
pub use identity::{AuditQuery, AuditRecord, Event, NewUser, Session, Token, User};
pub use types::{Deleted, EventType, Key, ListPage, ListQuery, Options, WatchEvent, WatchQuery};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
