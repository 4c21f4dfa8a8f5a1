//! The SQLite backend: one database file in WAL mode with `synchronous=NORMAL`.
//!
//! One dedicated writer thread owns the only write connection. Writes reach it through a channel and are
//! applied by group commit: the writer drains every pending request, runs each inside its own SAVEPOINT (so a
//! failing request rolls back alone), commits the lot once, publishes the batch's events to watchers, and only
//! then answers the callers. Reads run on a small pool of read-only connections on the blocking thread pool;
//! WAL lets them proceed while the writer commits.

mod identity;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use model::Resource;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::list::Pager;
use crate::plan::{self, Applied, Mutation};
use crate::sql::{self, Param};
use crate::watch::{Batch, EventPage, Filter};
use crate::{Key, ListPage, ListQuery, Options, Result, StoreError, WatchEvent};

/// At most this many requests are committed together.
const MAX_BATCH: usize = 1024;
/// Pending write requests before callers wait for room.
const QUEUE: usize = 4096;
/// Concurrent reads, and idle read connections kept open.
const MAX_IDLE_READERS: usize = 8;
/// How long a connection waits on a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(format!("sqlite: {e}"))
    }
}

/// Schema migrations; entry `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE kiln_revision (id INTEGER PRIMARY KEY, rev INTEGER NOT NULL);
INSERT INTO kiln_revision (id, rev) VALUES (1, 0);
CREATE TABLE kiln_compaction (id INTEGER PRIMARY KEY, through INTEGER NOT NULL);
INSERT INTO kiln_compaction (id, through) VALUES (1, 0);
CREATE TABLE kiln_resources (
    kind TEXT NOT NULL,
    organization TEXT NOT NULL,
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    rev INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, organization, project, name)
);
CREATE INDEX kiln_resources_order ON kiln_resources (organization, project, name, kind);
CREATE TABLE kiln_events (
    rev INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    kind TEXT NOT NULL,
    organization TEXT NOT NULL,
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE kiln_users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT,
    superuser INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE kiln_tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES kiln_users (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER,
    last_used_at INTEGER
);
CREATE INDEX kiln_tokens_user ON kiln_tokens (user_id);
CREATE TABLE kiln_sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES kiln_users (id) ON DELETE CASCADE,
    hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX kiln_sessions_user ON kiln_sessions (user_id);
CREATE TABLE kiln_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    user_name TEXT NOT NULL,
    action TEXT NOT NULL,
    kind TEXT,
    organization TEXT,
    project TEXT,
    name TEXT,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX kiln_audit_time ON kiln_audit (time);
CREATE TABLE kiln_object_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    organization TEXT NOT NULL,
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX kiln_object_events_object ON kiln_object_events (kind, organization, project, name, id);
"#,
    r#"
CREATE TABLE kiln_logs (
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time INTEGER NOT NULL,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (stream, seq)
);
"#,
    r#"
CREATE TABLE kiln_blobs (
    name TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    updated INTEGER NOT NULL
);
"#,
];

/// The SQLite backend.
pub(crate) struct Sqlite {
    jobs_tx: mpsc::Sender<Box<dyn WriteJob>>,
    readers: Arc<ReadPool>,
}

/// State the writer thread lends to each write request.
pub(crate) struct WriteCtx<'c> {
    pub conn: &'c Connection,
    /// The latest revision allocated in the open transaction.
    rev: u64,
    events: Vec<WatchEvent>,
}

/// A write request as the writer thread sees it: run inside the open transaction, then told how the commit
/// went.
trait WriteJob: Send {
    /// Runs the request; `false` means it failed and its savepoint must be rolled back.
    fn run(&mut self, ctx: &mut WriteCtx<'_>) -> bool;
    /// Answers the caller once the batch committed (`Ok`) or failed as a whole (`Err`).
    fn finish(self: Box<Self>, commit: Result<(), &str>);
}

struct TypedJob<T, F> {
    f: Option<F>,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> WriteJob for TypedJob<T, F>
where
    T: Send,
    F: FnOnce(&mut WriteCtx<'_>) -> Result<T> + Send,
{
    fn run(&mut self, ctx: &mut WriteCtx<'_>) -> bool {
        let Some(f) = self.f.take() else { return false };
        let r = f(ctx);
        let ok = r.is_ok();
        self.result = Some(r);
        ok
    }

    fn finish(self: Box<Self>, commit: Result<(), &str>) {
        let answer = match (self.result, commit) {
            (Some(Err(e)), _) => Err(e),
            (_, Err(msg)) => Err(StoreError::Backend(format!("sqlite: commit failed: {msg}"))),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (None, Ok(())) => Err(StoreError::Backend(
                "sqlite: the write failed unexpectedly".into(),
            )),
        };
        // The caller may have gone away (its future dropped); the write still happened.
        let _ = self.reply.send(answer);
    }
}

/// Read-only connections, opened on demand and kept while idle.
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// Bounds concurrent reads (and so open connections and blocking threads).
    permits: tokio::sync::Semaphore,
}

impl ReadPool {
    fn take(&self) -> Result<Connection> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(c);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(|e| {
            StoreError::Backend(format!("sqlite: cannot open {}: {e}", self.path.display()))
        })?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
    }
}

fn open_writer(path: &PathBuf) -> Result<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| StoreError::Backend(format!("sqlite: cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Backend(format!(
            "sqlite: {} cannot use WAL mode (got {mode}); use a local file system",
            path.display()
        )));
    }
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    migrate(&conn)?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let r = (|| -> Result<()> {
        conn.execute_batch("CREATE TABLE IF NOT EXISTS kiln_schema (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")?;
        let version: i64 = conn
            .query_row("SELECT version FROM kiln_schema WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0);
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::Backend(format!(
                "sqlite: the database has schema version {version}, newer than this build knows ({}); upgrade kiln",
                MIGRATIONS.len()
            )));
        }
        for m in MIGRATIONS.iter().skip(version as usize) {
            conn.execute_batch(m)?;
        }
        conn.execute(
            "INSERT INTO kiln_schema (id, version) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            [MIGRATIONS.len() as i64],
        )?;
        Ok(())
    })();
    match r {
        Ok(()) => Ok(conn.execute_batch("COMMIT")?),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Binds our parameter list for rusqlite.
fn params(ps: &[Param]) -> impl rusqlite::Params + '_ {
    rusqlite::params_from_iter(ps.iter().map(|p| match p {
        Param::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Param::Int(i) => rusqlite::types::Value::Integer(*i),
    }))
}

/// Statements each connection keeps prepared (its hot ones, plus the list queries of the usual shapes).
const STATEMENT_CACHE: usize = 64;

/// Runs a statement through the connection's statement cache, so that the write path's statements are
/// parsed and planned once per connection rather than once per use.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn get_row(conn: &Connection, key: &Key) -> Result<Option<Resource>> {
    let (kind, org, project, name) = plan::key_columns(key);
    let body: Option<String> = conn
        .prepare_cached(
            "SELECT body FROM kiln_resources WHERE kind = ?1 AND organization = ?2 AND project = ?3 AND name = ?4",
        )?
        .query_row(
            [kind, org, project, name],
            |r| r.get(0),
        )
        .optional()?;
    body.as_deref().map(plan::parse_body).transpose()
}

fn scalar(conn: &Connection, sql: &str) -> Result<u64> {
    let v: i64 = conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?;
    Ok(u64::try_from(v).unwrap_or(0))
}

const REVISION_SQL: &str = "SELECT rev FROM kiln_revision WHERE id = 1";
const COMPACTED_SQL: &str = "SELECT through FROM kiln_compaction WHERE id = 1";

impl WriteCtx<'_> {
    /// Applies one resource mutation inside the open transaction.
    fn mutate(&mut self, m: Mutation) -> Result<Applied> {
        let key = m.key()?;
        let current = get_row(self.conn, &key)?;
        let plan = plan::plan(m, current, &plan::now_rfc3339())?;
        let rev = self.rev + 1;
        let (object, ty) = match plan.stamp(rev) {
            (object, Some(ty)) => (object, ty),
            (object, None) => {
                return Ok(Applied {
                    object,
                    event: None,
                })
            }
        };
        let (kind, org, project, name) = plan::key_columns(&key);
        let body = plan::body_of(&object)?;
        let rev_i =
            i64::try_from(rev).map_err(|_| StoreError::Backend("revision overflow".into()))?;
        match row_op(ty) {
            RowOp::Insert => exec(
                self.conn,
                "INSERT INTO kiln_resources (kind, organization, project, name, rev, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![kind, org, project, name, rev_i, body],
            )?,
            RowOp::Update => exec(
                self.conn,
                "UPDATE kiln_resources SET rev = ?5, body = ?6 WHERE kind = ?1 AND organization = ?2 AND project = ?3 AND name = ?4",
                rusqlite::params![kind, org, project, name, rev_i, body],
            )?,
            RowOp::Delete => exec(
                self.conn,
                "DELETE FROM kiln_resources WHERE kind = ?1 AND organization = ?2 AND project = ?3 AND name = ?4",
                rusqlite::params![kind, org, project, name],
            )?,
        };
        exec(
            self.conn,
            "INSERT INTO kiln_events (rev, type, kind, organization, project, name, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            rusqlite::params![rev_i, plan::event_type_str(ty), kind, org, project, name, body],
        )?;
        self.rev = rev;
        self.events.push(WatchEvent {
            type_: ty,
            revision: rev,
            object: object.clone(),
        });
        Ok(Applied {
            object,
            event: Some(ty),
        })
    }
}

enum RowOp {
    Insert,
    Update,
    Delete,
}

fn row_op(ty: crate::EventType) -> RowOp {
    match ty {
        crate::EventType::Added => RowOp::Insert,
        crate::EventType::Modified => RowOp::Update,
        crate::EventType::Deleted => RowOp::Delete,
    }
}

/// The writer thread: group commit until every sender is gone.
fn writer_loop(
    conn: Connection,
    mut jobs_rx: mpsc::Receiver<Box<dyn WriteJob>>,
    events_tx: broadcast::Sender<Batch>,
    retention: u64,
) {
    while let Some(first) = jobs_rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match jobs_rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        match run_batch(&conn, &mut jobs, retention) {
            Ok(events) => {
                if !events.is_empty() {
                    // No receivers is fine: nobody is watching.
                    let _ = events_tx.send(Arc::new(events));
                }
                for j in jobs {
                    j.finish(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, requests = jobs.len(), "sqlite write batch failed");
                let _ = conn.execute_batch("ROLLBACK");
                let msg = e.to_string();
                for j in jobs {
                    j.finish(Err(&msg));
                }
            }
        }
    }
}

/// Runs one batch in one transaction; returns the events it committed.
fn run_batch(
    conn: &Connection,
    jobs: &mut [Box<dyn WriteJob>],
    retention: u64,
) -> Result<Vec<WatchEvent>> {
    exec(conn, "BEGIN IMMEDIATE", [])?;
    let base = scalar(conn, REVISION_SQL)?;
    let mut ctx = WriteCtx {
        conn,
        rev: base,
        events: Vec::new(),
    };
    for job in jobs.iter_mut() {
        exec(conn, "SAVEPOINT request", [])?;
        let (rev0, n0) = (ctx.rev, ctx.events.len());
        let ok = std::panic::catch_unwind(AssertUnwindSafe(|| job.run(&mut ctx))).unwrap_or(false);
        if ok {
            exec(conn, "RELEASE request", [])?;
        } else {
            exec(conn, "ROLLBACK TO request", [])?;
            exec(conn, "RELEASE request", [])?;
            ctx.rev = rev0;
            ctx.events.truncate(n0);
        }
    }
    let rev = ctx.rev;
    if rev != base {
        exec(
            conn,
            "UPDATE kiln_revision SET rev = ?1 WHERE id = 1",
            [i64::try_from(rev).unwrap_or(i64::MAX)],
        )?;
        let step = plan::compaction_step(retention);
        if rev / step > base / step && rev > retention {
            let through = i64::try_from(rev - retention).unwrap_or(i64::MAX);
            conn.execute("DELETE FROM kiln_events WHERE rev <= ?1", [through])?;
            conn.execute(
                "UPDATE kiln_compaction SET through = max(through, ?1) WHERE id = 1",
                [through],
            )?;
        }
    }
    exec(conn, "COMMIT", [])?;
    Ok(ctx.events)
}

impl Sqlite {
    pub async fn open(
        path: PathBuf,
        opts: Options,
        events_tx: broadcast::Sender<Batch>,
    ) -> Result<Sqlite> {
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || open_writer(&p))
            .await
            .map_err(|e| StoreError::Backend(format!("sqlite: open task failed: {e}")))??;
        let (jobs_tx, jobs_rx) = mpsc::channel(QUEUE);
        let retention = opts.event_retention.max(1);
        std::thread::Builder::new()
            .name("kiln-sqlite-writer".into())
            .spawn(move || writer_loop(conn, jobs_rx, events_tx, retention))
            .map_err(|e| {
                StoreError::Backend(format!("sqlite: cannot start the writer thread: {e}"))
            })?;
        Ok(Sqlite {
            jobs_tx,
            readers: Arc::new(ReadPool {
                path,
                idle: Mutex::new(Vec::new()),
                permits: tokio::sync::Semaphore::new(MAX_IDLE_READERS),
            }),
        })
    }

    /// Runs `f` on the writer thread inside the current batch's transaction; resolves after the commit.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn WriteJob> = Box::new(TypedJob {
            f: Some(f),
            result: None,
            reply,
        });
        let stopped = || StoreError::Backend("sqlite: the writer thread stopped".into());
        self.jobs_tx.send(job).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Runs `f` on a read-only connection on the blocking thread pool.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let pool = self.readers.clone();
        let _permit = pool
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Backend("sqlite: the read pool is closed".into()))?;
        let pool = pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.take()?;
            let r = f(&mut conn);
            pool.put(conn);
            r
        })
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite: read task failed: {e}")))?
    }

    pub async fn mutate(&self, m: Mutation) -> Result<Applied> {
        self.write(move |ctx| ctx.mutate(m)).await
    }

    pub async fn get(&self, key: &Key) -> Result<Resource> {
        let k = key.clone();
        self.read(move |conn| get_row(conn, &k)?.ok_or(StoreError::NotFound(k)))
            .await
    }

    pub async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        let mut pager = Pager::new(q)?;
        let q = q.clone();
        self.read(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
            let revision = scalar(&tx, REVISION_SQL)?;
            loop {
                let n = pager.batch();
                let s = sql::scan('?', &q, pager.after(), n);
                let mut stmt = tx.prepare_cached(&s.sql)?;
                let rows = stmt
                    .query_map(params(&s.params), |r| r.get::<_, String>(0))?
                    .map(|b| {
                        b.map_err(StoreError::from)
                            .and_then(|b| plan::parse_body(&b))
                    })
                    .collect::<Result<Vec<_>>>()?;
                if !pager.feed(rows, n) {
                    break;
                }
            }
            Ok(pager.finish(revision))
        })
        .await
    }

    pub async fn revision(&self) -> Result<u64> {
        self.read(|conn| scalar(conn, REVISION_SQL)).await
    }

    pub async fn compacted_through(&self) -> Result<u64> {
        self.read(|conn| scalar(conn, COMPACTED_SQL)).await
    }

    pub async fn read_events(
        &self,
        after: u64,
        filter: &Filter,
        limit: usize,
    ) -> Result<EventPage> {
        let f = filter.clone();
        self.read(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
            let compacted = scalar(&tx, COMPACTED_SQL)?;
            if after < compacted {
                return Err(StoreError::Expired {
                    requested: after,
                    oldest: compacted + 1,
                });
            }
            let upto = scalar(&tx, REVISION_SQL)?;
            let s = sql::events('?', &f, after, upto, limit);
            let mut stmt = tx.prepare_cached(&s.sql)?;
            let events = stmt
                .query_map(params(&s.params), |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })?
                .map(|row| {
                    let (rev, ty, body) = row?;
                    Ok(WatchEvent {
                        type_: plan::parse_event_type(&ty)?,
                        revision: u64::try_from(rev).unwrap_or(0),
                        object: plan::parse_body(&body)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let complete = events.len() < limit;
            let through = if complete {
                upto
            } else {
                events.last().map_or(upto, |e| e.revision)
            };
            Ok(EventPage {
                events,
                through,
                complete,
            })
        })
        .await
    }
}
