//! Kiln's resource store: one generic store of [`model::Resource`]s over two SQL backends, SQLite (WAL, the
//! embedded default) and PostgreSQL, plus the identity, audit and event tables.
//!
//! Architecture invariants:
//! - Every write is one transaction that also appends a row to the event log under a new global revision; the
//!   revision order equals commit order, so a watcher resuming from revision N never misses a later commit.
//! - A write is acknowledged (the future resolves `Ok`) only after its transaction committed.
//! - The store knows nothing of users' permissions: callers filter by organization/project.
//! - Both backends pass the same conformance suite (`tests/conformance.rs`).
//! - The semantics of a write live in one place (`plan.rs`); backends only read, allocate revisions and persist.
//!
//! Durability: SQLite runs in WAL mode with `synchronous=NORMAL`. A committed write survives the process being
//! killed; a power loss or OS crash may drop the last few commits (the database stays consistent).
//! PostgreSQL durability is whatever the server is configured for.

// `StoreError` carries the conflicting key and versions by value; it is the shared contract, and boxing it
// would buy nothing measurable next to a database round trip.
#![allow(clippy::result_large_err)]

mod cursor;
mod error;
pub mod identity;
mod list;
mod logs;
mod patch;
mod plan;
mod postgres;
mod selector;
mod sql;
mod sqlite;
mod types;
mod watch;

use std::path::Path;
use std::sync::Arc;

use model::Resource;
use serde_json::Value;
use tokio::sync::broadcast;

pub use error::StoreError;
pub use identity::{AuditQuery, AuditRecord, Event, NewUser, Session, Token, User};
pub use logs::{LogLine, MAX_LOG_READ};
pub use patch::merge_patch;
pub use selector::Selector;
pub use types::{Deleted, EventType, Key, ListPage, ListQuery, Options, WatchEvent, WatchQuery};
pub use watch::Watch;

use plan::{Applied, Mutation};
use watch::{Batch, EventPage, Filter};

/// The result type of every store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How many times [`Store::patch`] re-reads and re-applies a patch after losing a race with another writer.
const PATCH_ATTEMPTS: usize = 8;

/// Capacity of the in-process event broadcast, in commit batches. A watcher further behind re-reads the log.
const BROADCAST_CAPACITY: usize = 1024;

/// A handle to the store. Cloning is cheap and every clone shares the same connections.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    events_tx: broadcast::Sender<Batch>,
    /// Names of the log streams appended to by this process, for live readers.
    logs_tx: broadcast::Sender<String>,
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.inner.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        };
        f.debug_struct("Store").field("backend", &backend).finish()
    }
}

/// Runs the same expression against whichever backend the store uses.
macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match &$self.inner.backend {
            Backend::Sqlite($b) => $e,
            Backend::Postgres($b) => $e,
        }
    };
}

impl Store {
    /// Opens the store at `url_or_path`: a `postgres://` or `postgresql://` URL selects PostgreSQL, anything
    /// else is the path of a SQLite database file (created if missing).
    pub async fn open(url_or_path: &str, opts: Options) -> Result<Store> {
        if url_or_path.starts_with("postgres://") || url_or_path.starts_with("postgresql://") {
            Store::open_postgres(url_or_path, opts).await
        } else {
            Store::open_sqlite(Path::new(url_or_path), opts).await
        }
    }

    /// Opens (creating if needed) a SQLite database file and runs the schema migrations. One process should
    /// own a database file at a time: watchers only see the commits of their own process.
    pub async fn open_sqlite(path: &Path, opts: Options) -> Result<Store> {
        let (events_tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let backend = sqlite::Sqlite::open(path.to_path_buf(), opts, events_tx.clone()).await?;
        Ok(Store {
            inner: Arc::new(Inner {
                backend: Backend::Sqlite(backend),
                events_tx,
                logs_tx: broadcast::channel(BROADCAST_CAPACITY).0,
            }),
        })
    }

    /// Connects to PostgreSQL (without TLS) and runs the schema migrations. Several processes may share one
    /// database: each sees the others' commits through LISTEN/NOTIFY wake-ups.
    pub async fn open_postgres(url: &str, opts: Options) -> Result<Store> {
        let (events_tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let backend = postgres::Postgres::open(url, opts, events_tx.clone()).await?;
        Ok(Store {
            inner: Arc::new(Inner {
                backend: Backend::Postgres(backend),
                events_tx,
                logs_tx: broadcast::channel(BROADCAST_CAPACITY).0,
            }),
        })
    }

    async fn mutate(&self, m: Mutation) -> Result<Applied> {
        dispatch!(self, b => b.mutate(m).await)
    }

    /// Creates an object. The store sets `uid`, `resourceVersion`, `generation = 1` and `creationTimestamp`, and
    /// clears `deletionTimestamp`. Fails with `AlreadyExists` if the key is taken, `Invalid` if the kind is
    /// unknown or the scope fields do not fit the kind.
    pub async fn create(&self, obj: Resource) -> Result<Resource> {
        Ok(self.mutate(Mutation::Create(obj)).await?.object)
    }

    /// Reads one object.
    pub async fn get(&self, key: &Key) -> Result<Resource> {
        dispatch!(self, b => b.get(key).await)
    }

    /// Lists objects in (organization, project, name) order, filtered by kind, scope and label selector, one page
    /// at a time. A `limit` of zero means no limit.
    pub async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        dispatch!(self, b => b.list(q).await)
    }

    /// Replaces the spec, labels, annotations and finalizers of an object; everything else in `obj` is
    /// ignored. With `metadata.resourceVersion` set, fails with `Conflict` unless it is current. `generation`
    /// grows only when the spec changes; a write that changes nothing is a no-op (no revision, no event). When
    /// the object is being deleted and the update clears its finalizers, the object is removed.
    pub async fn update(&self, obj: Resource) -> Result<Resource> {
        Ok(self.mutate(Mutation::Update(obj)).await?.object)
    }

    /// Replaces the status of an object (the spec and generation are untouched). With `expected_rv`, fails with
    /// `Conflict` unless it is current. An identical status is a no-op.
    pub async fn update_status(
        &self,
        key: &Key,
        status: Value,
        expected_rv: Option<&str>,
    ) -> Result<Resource> {
        let m = Mutation::UpdateStatus {
            key: key.clone(),
            status,
            expected_rv: expected_rv.map(str::to_string),
        };
        Ok(self.mutate(m).await?.object)
    }

    /// Applies an RFC 7396 JSON merge patch to an object, validates the result with `check`, and writes it as
    /// an update based on the version read (re-reading and re-applying on conflict a few times).
    ///
    /// Only `metadata.labels`, `metadata.annotations`, `metadata.finalizers` and `spec` take effect; changes the
    /// patch makes to any other field (name, scope, status, server-set metadata) are ignored, as are changes
    /// `check` makes to the object's identity. A patch that leaves the object unreadable (e.g. a label set to a
    /// number, or an unknown metadata field) is `Invalid`.
    pub async fn patch(
        &self,
        key: &Key,
        patch: &Value,
        check: impl Fn(Resource) -> Result<Resource, model::Invalid> + Send,
    ) -> Result<Resource> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self.get(key).await?;
            let mut doc = serde_json::to_value(&current)
                .map_err(|e| StoreError::Backend(format!("cannot serialise {key}: {e}")))?;
            merge_patch(&mut doc, patch);
            let patched: Resource = serde_json::from_value(doc).map_err(|e| {
                StoreError::Invalid(model::Invalid::one(
                    "",
                    format!("the patched object is malformed: {e}"),
                ))
            })?;
            let mut next = current.clone();
            next.spec = patched.spec;
            next.metadata.labels = patched.metadata.labels;
            next.metadata.annotations = patched.metadata.annotations;
            next.metadata.finalizers = patched.metadata.finalizers;
            let mut checked = check(next)?;
            // The identity and version come from what was read, whatever `check` did.
            checked.kind = current.kind.clone();
            checked.metadata.name = current.metadata.name.clone();
            checked.metadata.organization = current.metadata.organization.clone();
            checked.metadata.project = current.metadata.project.clone();
            checked.metadata.resource_version = current.metadata.resource_version.clone();
            match self.update(checked).await {
                Err(StoreError::Conflict { .. }) if attempt < PATCH_ATTEMPTS => continue,
                other => return other,
            }
        }
    }

    /// Deletes an object. With finalizers left, sets `deletionTimestamp` (once) and returns `Pending`; otherwise
    /// removes it and returns `Gone` with its last state. With `expected_rv`, fails with `Conflict` unless it is
    /// current.
    pub async fn delete(&self, key: &Key, expected_rv: Option<&str>) -> Result<Deleted> {
        let m = Mutation::Delete {
            key: key.clone(),
            expected_rv: expected_rv.map(str::to_string),
        };
        let applied = self.mutate(m).await?;
        Ok(match applied.event {
            Some(EventType::Deleted) => Deleted::Gone(applied.object),
            _ => Deleted::Pending(applied.object),
        })
    }

    /// The current (latest committed) revision.
    pub async fn revision(&self) -> Result<u64> {
        dispatch!(self, b => b.revision().await)
    }

    /// Watches changes in revision order. `from_revision = None` starts after the current revision; a revision
    /// older than the retained event log fails with `Expired` (re-list, then watch from the list's revision).
    pub async fn watch(&self, q: &WatchQuery) -> Result<Watch> {
        watch::start(self, q).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Batch> {
        self.inner.events_tx.subscribe()
    }

    /// Revisions up to and including this one have been compacted out of the event log.
    async fn compacted_through(&self) -> Result<u64> {
        dispatch!(self, b => b.compacted_through().await)
    }

    async fn read_events(&self, after: u64, filter: &Filter, limit: usize) -> Result<EventPage> {
        dispatch!(self, b => b.read_events(after, filter, limit).await)
    }

    // ---- identity ----

    /// Creates a user; `Duplicate` if the name is taken.
    pub async fn create_user(&self, new: NewUser) -> Result<User> {
        dispatch!(self, b => b.create_user(new).await)
    }

    /// The user with this name, if any.
    pub async fn user_by_name(&self, name: &str) -> Result<Option<User>> {
        dispatch!(self, b => b.user_by_name(name).await)
    }

    /// The user with this id, if any.
    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>> {
        dispatch!(self, b => b.user_by_id(id).await)
    }

    /// Every user, by name.
    pub async fn list_users(&self) -> Result<Vec<User>> {
        dispatch!(self, b => b.list_users().await)
    }

    /// Sets (or, with `None`, clears) a user's password hash; `Missing` if there is no such user.
    pub async fn set_password(&self, user_id: &str, hash: Option<&str>) -> Result<()> {
        dispatch!(self, b => b.set_password(user_id, hash).await)
    }

    /// Deletes a user with their tokens and sessions; `Missing` if there is no such user.
    pub async fn delete_user(&self, user_id: &str) -> Result<()> {
        dispatch!(self, b => b.delete_user(user_id).await)
    }

    /// How many users exist (zero means the server is not set up yet).
    pub async fn count_users(&self) -> Result<u64> {
        dispatch!(self, b => b.count_users().await)
    }

    /// Stores an API token by the hash of its secret; `Missing` if the user does not exist, `Duplicate` if the
    /// hash is already stored.
    pub async fn create_token(
        &self,
        user_id: &str,
        name: &str,
        hash: &str,
        expires_at: Option<jiff::Timestamp>,
    ) -> Result<Token> {
        dispatch!(self, b => b.create_token(user_id, name, hash, expires_at).await)
    }

    /// The token with this hash, if any (revoked and expired tokens included: the caller checks).
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
        dispatch!(self, b => b.token_by_hash(hash).await)
    }

    /// The tokens of one user, or of all users, oldest first.
    pub async fn list_tokens(&self, user_id: Option<&str>) -> Result<Vec<Token>> {
        dispatch!(self, b => b.list_tokens(user_id).await)
    }

    /// Marks a token revoked (idempotent); `Missing` if there is no such token.
    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        dispatch!(self, b => b.revoke_token(id).await)
    }

    /// Records that a token was used now. Best-effort: a token that no longer exists is ignored.
    pub async fn touch_token(&self, id: &str) -> Result<()> {
        dispatch!(self, b => b.touch_token(id).await)
    }

    /// Stores a console session by the hash of its cookie; `Missing` if the user does not exist.
    pub async fn create_session(
        &self,
        user_id: &str,
        hash: &str,
        expires_at: jiff::Timestamp,
    ) -> Result<Session> {
        dispatch!(self, b => b.create_session(user_id, hash, expires_at).await)
    }

    /// The session with this hash, if any (expired ones included: the caller checks).
    pub async fn session_by_hash(&self, hash: &str) -> Result<Option<Session>> {
        dispatch!(self, b => b.session_by_hash(hash).await)
    }

    /// Deletes a session (idempotent).
    pub async fn delete_session(&self, hash: &str) -> Result<()> {
        dispatch!(self, b => b.delete_session(hash).await)
    }

    /// Appends an audit record and returns its id. Times are kept to the microsecond.
    pub async fn append_audit(&self, rec: AuditRecord) -> Result<u64> {
        dispatch!(self, b => b.append_audit(rec).await)
    }

    /// Audit records matching the query, newest first (at most `limit`, default 100).
    pub async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        dispatch!(self, b => b.list_audit(q).await)
    }

    /// Records an event about an object; only the newest [`EVENTS_PER_OBJECT`] per object are kept.
    pub async fn record_event(&self, ev: Event) -> Result<()> {
        dispatch!(self, b => b.record_event(ev).await)
    }

    /// The newest events about one object, newest first, at most `limit`.
    pub async fn list_events(
        &self,
        kind: &str,
        organization: Option<&str>,
        project: Option<&str>,
        name: &str,
        limit: usize,
    ) -> Result<Vec<Event>> {
        dispatch!(self, b => b.list_events(kind, organization, project, name, limit).await)
    }
}

impl Store {
    /// Appends lines to a log stream, numbering them after its last line, and returns the number of the last
    /// one appended (the stream's last number when `lines` is empty).
    pub async fn append_logs(&self, stream: &str, lines: Vec<LogLine>) -> Result<u64> {
        let last = dispatch!(self, b => b.append_logs(stream, lines).await)?;
        let _ = self.inner.logs_tx.send(stream.to_string());
        Ok(last)
    }

    /// Lines of a stream numbered after `after`, oldest first, at most `limit` (capped at [`MAX_LOG_READ`]).
    pub async fn read_logs(&self, stream: &str, after: u64, limit: usize) -> Result<Vec<LogLine>> {
        let limit = limit.min(MAX_LOG_READ);
        dispatch!(self, b => b.read_logs(stream, after, limit).await)
    }

    /// The number of a stream's last line (0 for an empty or unknown stream); a read, unlike an empty append.
    pub async fn last_log_seq(&self, stream: &str) -> Result<u64> {
        dispatch!(self, b => b.last_log_seq(stream).await)
    }

    /// Deletes a log stream (idempotent).
    pub async fn delete_logs(&self, stream: &str) -> Result<()> {
        dispatch!(self, b => b.delete_logs(stream).await)
    }

    /// Stores `data` under `name`, replacing what was there. Blobs are small opaque values that belong to no
    /// resource and are never shown through the API as they are (e.g. a workspace's Terraform state, which
    /// holds its agent's token; provisioner keys).
    pub async fn put_blob(&self, name: &str, data: Vec<u8>) -> Result<()> {
        dispatch!(self, b => b.put_blob(name, data).await)
    }

    /// Stores a blob only if none is stored under `name`; whether it did. Two racing callers: exactly one gets
    /// `true` (a claim, e.g. of a webhook delivery's id).
    pub async fn create_blob(&self, name: &str, data: Vec<u8>) -> Result<bool> {
        dispatch!(self, b => b.create_blob(name, data).await)
    }

    /// The blob stored under `name`, if any.
    pub async fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>> {
        dispatch!(self, b => b.get_blob(name).await)
    }

    /// Names of the blobs that start with `prefix`, in byte order.
    pub async fn blob_names(&self, prefix: &str) -> Result<Vec<String>> {
        dispatch!(self, b => b.blob_names(prefix).await)
    }

    /// Deletes a blob; whether it existed.
    pub async fn delete_blob(&self, name: &str) -> Result<bool> {
        dispatch!(self, b => b.delete_blob(name).await)
    }

    /// Names of the streams this process appends to, as it does. Another process's appends (a shared
    /// PostgreSQL) are not announced: a live reader also re-reads on a timer.
    pub fn log_appends(&self) -> broadcast::Receiver<String> {
        self.inner.logs_tx.subscribe()
    }
}

/// How many events per object [`Store::record_event`] keeps.
pub const EVENTS_PER_OBJECT: usize = 50;
