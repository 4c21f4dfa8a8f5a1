//! The one error type of the store. Variants map onto API responses: `NotFound` → 404, `AlreadyExists` and
//! `Conflict` → 409, `Expired` → 410, `Invalid` → 422, `Missing`/`Duplicate` for identity rows, `Backend` →
//! 500 (the message names the backend and, for PostgreSQL, the SQLSTATE).

use crate::Key;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No object under this key.
    #[error("{0} not found")]
    NotFound(Key),
    /// A create found the key taken.
    #[error("{0} already exists")]
    AlreadyExists(Key),
    /// A write carried a `resourceVersion` that is no longer current.
    #[error("{key} was modified: the current resourceVersion is {current}, the write was based on {requested}")]
    Conflict {
        key: Key,
        current: String,
        requested: String,
    },
    /// A watch asked to resume from a revision whose events were already compacted away.
    #[error("revision {requested} is expired (the oldest kept is {oldest}): re-list and watch from the list's revision")]
    Expired { requested: u64, oldest: u64 },
    /// A patch produced an object that fails validation.
    #[error("{0}")]
    Invalid(#[from] model::Invalid),
    /// An identity row (user, token, session) that does not exist or was revoked.
    #[error("{0}")]
    Missing(String),
    /// An identity row that would duplicate a unique name.
    #[error("{0}")]
    Duplicate(String),
    /// The database failed (I/O, connection, corrupt rows); not the caller's fault.
    #[error("storage backend: {0}")]
    Backend(String),
}
