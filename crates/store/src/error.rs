use crate::Key;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(Key),
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
    #[error("storage backend: {0}")]
    Backend(String),
}
