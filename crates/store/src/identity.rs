//! Identity rows (users, API tokens, console sessions), the audit log and per-object events. These live in
//! their own tables, not as resources. Times are stored as integer microseconds in both backends, so values
//! read back equal what was written to the microsecond.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// A person (or robot) who signs in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    /// Unique, DNS-1123 label.
    pub name: String,
    /// A PHC string (argon2id); `None` for users who sign in with tokens only.
    #[serde(skip)]
    pub password_hash: Option<String>,
    /// May create organizations and sees every organization (the first user of a server).
    pub superuser: bool,
    pub created_at: Timestamp,
}

/// What [`crate::Store::create_user`] needs; the store assigns the id and creation time.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub name: String,
    pub password_hash: Option<String>,
    pub superuser: bool,
}

/// An API token (stored by hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    pub user_id: String,
    pub name: String,
    /// SHA-256 of the secret, hex. The secret itself is never stored.
    #[serde(skip)]
    pub hash: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
}

/// A console sign-in (stored by the hash of its cookie).
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: String,
    pub user_id: String,
    /// SHA-256 of the cookie value, hex.
    pub hash: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
}

/// One mutating request: who did what to which object, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// Assigned by the store on append.
    #[serde(default)]
    pub id: u64,
    pub time: Timestamp,
    /// The user's name, or `anonymous` for requests that failed authentication.
    pub user: String,
    /// HTTP method and path, e.g. `PUT /api/v1/orgs/default/projects/shop`.
    pub action: String,
    pub kind: Option<String>,
    pub organization: Option<String>,
    pub project: Option<String>,
    pub name: Option<String>,
    /// The HTTP status code of the response.
    pub status: u16,
    /// A short outcome: `created`, `updated`, `deleted`, or the error message.
    pub outcome: String,
}

/// Filters for [`crate::Store::list_audit`]; `since`/`until` are inclusive.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub user: Option<String>,
    pub kind: Option<String>,
    pub organization: Option<String>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    /// Newest first, at most this many (default 100).
    pub limit: Option<usize>,
}

/// A Kubernetes-style event about one object (`kiln describe` shows the recent ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub time: Timestamp,
    pub kind: String,
    pub organization: Option<String>,
    pub project: Option<String>,
    pub name: String,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
}

/// Identity and audit times are stored as integer microseconds since the Unix epoch, in both backends.
pub(crate) fn to_micros(t: Timestamp) -> i64 {
    t.as_microsecond()
}

/// The inverse of [`to_micros`].
pub(crate) fn from_micros(us: i64) -> Result<Timestamp, crate::StoreError> {
    Timestamp::from_microsecond(us)
        .map_err(|e| crate::StoreError::Backend(format!("corrupt stored time {us}: {e}")))
}

/// The current time at the precision it is stored with, so a returned row equals the row read back later.
pub(crate) fn now() -> Timestamp {
    Timestamp::from_microsecond(Timestamp::now().as_microsecond())
        .unwrap_or_else(|_| Timestamp::now())
}
