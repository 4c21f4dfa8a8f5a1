//! The PostgreSQL backend (no TLS). Resource writes are group-committed by one writer task per store
//! (`writer.rs`) under the lock of the `kiln_revision` row, which serializes writers of every process until
//! commit, so revision order equals commit order across the database. Commits are published to watchers by
//! the tailer (`tailer.rs`), which also follows other processes' commits through LISTEN/NOTIFY. Reads that
//! need a consistent view (lists, event log reads) run in a read-only REPEATABLE READ transaction.

mod identity;
mod pool;
mod tailer;
mod writer;

use std::sync::Arc;

use model::Resource;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, IsolationLevel, Row};

use crate::list::Pager;
use crate::plan::{self, Applied, Mutation};
use crate::sql::{self, Param};
use crate::watch::{Batch, EventPage, Filter};
use crate::{Key, ListPage, ListQuery, Options, Result, StoreError, WatchEvent};
use pool::{pg_err, Pool};

/// Connections per store (per server process).
const POOL_SIZE: usize = 10;
/// Serializes schema migrations of concurrently starting servers.
const MIGRATION_LOCK: i64 = 0x6b69_6c6e; // "kiln"

/// Schema migrations; entry `i` brings the schema to version `i + 1`. Keys use the "C" collation so that list
/// order (and so continue tokens) is byte order, as in SQLite.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE kiln_revision (id INT PRIMARY KEY, rev BIGINT NOT NULL);
INSERT INTO kiln_revision (id, rev) VALUES (1, 0);
CREATE TABLE kiln_compaction (id INT PRIMARY KEY, through BIGINT NOT NULL);
INSERT INTO kiln_compaction (id, through) VALUES (1, 0);
CREATE TABLE kiln_resources (
    kind TEXT COLLATE "C" NOT NULL,
    organization TEXT COLLATE "C" NOT NULL,
    project TEXT COLLATE "C" NOT NULL,
    name TEXT COLLATE "C" NOT NULL,
    rev BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, organization, project, name)
);
CREATE INDEX kiln_resources_order ON kiln_resources (organization, project, name, kind);
CREATE TABLE kiln_events (
    rev BIGINT PRIMARY KEY,
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
    superuser BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE kiln_tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES kiln_users (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    last_used_at BIGINT
);
CREATE INDEX kiln_tokens_user ON kiln_tokens (user_id);
CREATE TABLE kiln_sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES kiln_users (id) ON DELETE CASCADE,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX kiln_sessions_user ON kiln_sessions (user_id);
CREATE TABLE kiln_audit (
    id BIGSERIAL PRIMARY KEY,
    time BIGINT NOT NULL,
    user_name TEXT NOT NULL,
    action TEXT NOT NULL,
    kind TEXT,
    organization TEXT,
    project TEXT,
    name TEXT,
    status INT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX kiln_audit_time ON kiln_audit (time);
CREATE TABLE kiln_object_events (
    id BIGSERIAL PRIMARY KEY,
    time BIGINT NOT NULL,
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
    stream TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    time BIGINT NOT NULL,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (stream, seq)
);
"#,
    r#"
CREATE TABLE kiln_blobs (
    name TEXT COLLATE "C" PRIMARY KEY,
    data BYTEA NOT NULL,
    updated BIGINT NOT NULL
);
"#,
];

/// The PostgreSQL backend.
pub(crate) struct Postgres {
    pool: Arc<Pool>,
    /// Resource writes go to the group-commit writer.
    writer_tx: mpsc::Sender<writer::Request>,
}

/// Binds our parameter list for tokio-postgres.
fn pg_params(ps: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    ps.iter()
        .map(|p| match p {
            Param::Text(s) => s as &(dyn ToSql + Sync),
            Param::Int(i) => i as &(dyn ToSql + Sync),
        })
        .collect()
}

/// Reads a column, as an error rather than a panic if the schema does not match.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, i: usize) -> Result<T> {
    r.try_get(i)
        .map_err(|e| StoreError::Backend(format!("postgres: unexpected column {i}: {e}")))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Backend(format!("revision {v} out of range")))
}

/// An event-log row (`rev, type, body`).
pub(crate) fn row_event(r: &Row) -> Result<WatchEvent> {
    Ok(WatchEvent {
        revision: to_u64(col(r, 0)?),
        type_: plan::parse_event_type(col(r, 1)?)?,
        object: plan::parse_body(col(r, 2)?)?,
    })
}

/// One object by key.
const GET_SQL: &str = "SELECT body FROM kiln_resources WHERE kind = $1 AND organization = $2 AND project = $3 AND name = $4";

async fn scalar(c: &impl GenericClient, sql: &str) -> Result<u64> {
    let row = c.query_one(sql, &[]).await.map_err(pg_err)?;
    Ok(to_u64(col(&row, 0)?))
}

const REVISION_SQL: &str = "SELECT rev FROM kiln_revision WHERE id = 1";
const COMPACTED_SQL: &str = "SELECT through FROM kiln_compaction WHERE id = 1";

async fn migrate(c: &mut tokio_postgres::Client) -> Result<()> {
    let tx = c.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kiln_schema (id INT PRIMARY KEY, version INT NOT NULL)",
    )
    .await
    .map_err(pg_err)?;
    let version: i32 = match tx
        .query_opt("SELECT version FROM kiln_schema WHERE id = 1", &[])
        .await
        .map_err(pg_err)?
    {
        Some(r) => col(&r, 0)?,
        None => 0,
    };
    let known = MIGRATIONS.len() as i32;
    if version > known {
        return Err(StoreError::Backend(format!(
            "postgres: the database has schema version {version}, newer than this build knows ({known}); upgrade kiln"
        )));
    }
    for m in MIGRATIONS
        .iter()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        tx.batch_execute(m).await.map_err(pg_err)?;
    }
    tx.execute(
        "INSERT INTO kiln_schema (id, version) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
        &[&known],
    )
    .await
    .map_err(pg_err)?;
    tx.commit().await.map_err(pg_err)
}

impl Postgres {
    pub async fn open(
        url: &str,
        opts: Options,
        events_tx: broadcast::Sender<Batch>,
    ) -> Result<Postgres> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("postgres: invalid connection URL: {e}")))?;
        let pool = Arc::new(Pool::new(config, POOL_SIZE));
        let published = {
            let mut c = pool.get().await?;
            migrate(&mut c).await?;
            scalar(&*c, REVISION_SQL).await?
        };
        let (local_tx, local_rx) = mpsc::unbounded_channel();
        tailer::spawn(pool.clone(), published, local_rx, events_tx);
        let writer_tx = writer::spawn(pool.clone(), opts.event_retention.max(1), local_tx);
        Ok(Postgres { pool, writer_tx })
    }

    pub async fn mutate(&self, m: Mutation) -> Result<Applied> {
        let (reply, rx) = oneshot::channel();
        let stopped = || StoreError::Backend("postgres: the writer stopped".into());
        self.writer_tx
            .send(writer::Request { mutation: m, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    pub async fn get(&self, key: &Key) -> Result<Resource> {
        let mut c = self.pool.get().await?;
        let (kind, org, project, name) = plan::key_columns(key);
        let row = c
            .query_opt_cached(GET_SQL, &[&kind, &org, &project, &name])
            .await?;
        row.map(|r| plan::parse_body(col(&r, 0)?))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(key.clone()))
    }

    pub async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        let mut pager = Pager::new(q)?;
        let mut c = self.pool.get().await?;
        let tx = c
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_err)?;
        let revision = scalar(&tx, REVISION_SQL).await?;
        loop {
            let n = pager.batch();
            let s = sql::scan('$', q, pager.after(), n);
            let rows = tx
                .query(&s.sql, &pg_params(&s.params))
                .await
                .map_err(pg_err)?;
            let items = rows
                .iter()
                .map(|r| plan::parse_body(col(r, 0)?))
                .collect::<Result<Vec<_>>>()?;
            if !pager.feed(items, n) {
                break;
            }
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(pager.finish(revision))
    }

    pub async fn revision(&self) -> Result<u64> {
        let c = self.pool.get().await?;
        scalar(&*c, REVISION_SQL).await
    }

    pub async fn compacted_through(&self) -> Result<u64> {
        let c = self.pool.get().await?;
        scalar(&*c, COMPACTED_SQL).await
    }

    pub async fn read_events(
        &self,
        after: u64,
        filter: &Filter,
        limit: usize,
    ) -> Result<EventPage> {
        let mut c = self.pool.get().await?;
        let tx = c
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_err)?;
        let compacted = scalar(&tx, COMPACTED_SQL).await?;
        if after < compacted {
            return Err(StoreError::Expired {
                requested: after,
                oldest: compacted + 1,
            });
        }
        let upto = scalar(&tx, REVISION_SQL).await?;
        let s = sql::events('$', filter, after, upto, limit);
        let rows = tx
            .query(&s.sql, &pg_params(&s.params))
            .await
            .map_err(pg_err)?;
        let events = rows.iter().map(row_event).collect::<Result<Vec<_>>>()?;
        tx.commit().await.map_err(pg_err)?;
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
    }
}
