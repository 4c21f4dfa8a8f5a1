//! Group commit for PostgreSQL. One writer task per store takes every pending resource write and applies the
//! lot in one transaction:
//!
//! 1. lock the revision row (`SELECT ... FOR UPDATE`): from here to commit no other writer, in this process or
//!    another, runs, so revision order equals commit order;
//! 2. read the current rows of every key in the batch (after the lock, so they include every earlier commit);
//! 3. decide each request in memory, in arrival order, with the shared write semantics (`plan.rs`): a request
//!    that fails (conflict, not found, ...) is answered with its error and changes nothing, so requests stay
//!    atomic one by one without savepoints;
//! 4. write the final rows, the events and the new revision with a handful of array statements, `NOTIFY`, and
//!    commit; then hand the events to the tailer and answer every caller.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use model::Resource;
use tokio::sync::{mpsc, oneshot};

use super::pool::{pg_err, Pool};
use super::{col, tailer, to_i64, to_u64};
use crate::plan::{self, Applied, Mutation};
use crate::{EventType, Key, Result, StoreError, WatchEvent};

/// At most this many requests are committed together.
const MAX_BATCH: usize = 512;
/// Pending write requests before callers wait for room.
const QUEUE: usize = 4096;

/// One write waiting for the writer.
pub(crate) struct Request {
    pub mutation: Mutation,
    pub reply: oneshot::Sender<Result<Applied>>,
}

/// Starts the writer; it stops when the returned sender is dropped.
pub(crate) fn spawn(
    pool: Arc<Pool>,
    retention: u64,
    local_tx: mpsc::UnboundedSender<Vec<WatchEvent>>,
) -> mpsc::Sender<Request> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(pool, retention, local_tx, rx));
    tx
}

async fn run(
    pool: Arc<Pool>,
    retention: u64,
    local_tx: mpsc::UnboundedSender<Vec<WatchEvent>>,
    mut rx: mpsc::Receiver<Request>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let (mutations, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|r| (r.mutation, r.reply)).unzip();
        match commit(&pool, retention, mutations).await {
            Ok((results, events)) => {
                if !events.is_empty() {
                    // The tailer outlives the writer, so this cannot fail while we run.
                    let _ = local_tx.send(events);
                }
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, requests = replies.len(), "postgres write batch failed");
                let msg = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Backend(msg.clone())));
                }
            }
        }
    }
}

/// Column values of a key, owned.
fn cols(key: &Key) -> [String; 4] {
    let (k, o, p, n) = plan::key_columns(key);
    [k.to_string(), o.to_string(), p.to_string(), n.to_string()]
}

/// Four parallel text arrays (kind, organization, project, name) for a set of keys.
fn key_arrays<'a>(keys: impl Iterator<Item = &'a Key>) -> [Vec<String>; 4] {
    let mut arrays: [Vec<String>; 4] = Default::default();
    for key in keys {
        for (a, v) in arrays.iter_mut().zip(cols(key)) {
            a.push(v);
        }
    }
    arrays
}

/// Compares the unnested keys under the "C" collation the key columns use.
const KEY_MATCH: &str =
    "r.kind = k.kind COLLATE \"C\" AND r.organization = k.organization COLLATE \"C\" \
     AND r.project = k.project COLLATE \"C\" AND r.name = k.name COLLATE \"C\"";

type Outcome = (Vec<Result<Applied>>, Vec<WatchEvent>);

async fn commit(pool: &Pool, retention: u64, mutations: Vec<Mutation>) -> Result<Outcome> {
    let mut c = pool.get().await?;
    let tx = c.transaction().await.map_err(pg_err)?;
    let row = tx
        .query_one("SELECT rev FROM kiln_revision WHERE id = 1 FOR UPDATE", &[])
        .await
        .map_err(pg_err)?;
    let base = to_u64(col(&row, 0)?);

    let keys: Vec<Result<Key>> = mutations.iter().map(Mutation::key).collect();
    let distinct: HashSet<&Key> = keys.iter().filter_map(|k| k.as_ref().ok()).collect();
    let mut state: HashMap<Key, Option<Resource>> =
        distinct.iter().map(|k| ((*k).clone(), None)).collect();
    if !distinct.is_empty() {
        let [kinds, orgs, projects, names] = key_arrays(distinct.iter().copied());
        let rows = tx
            .query(
                &format!(
                    "SELECT r.body FROM kiln_resources r, \
                     UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS k(kind, organization, project, name) \
                     WHERE {KEY_MATCH}"
                ),
                &[&kinds, &orgs, &projects, &names],
            )
            .await
            .map_err(pg_err)?;
        for r in rows {
            let obj = plan::parse_body(col(&r, 0)?)?;
            if let Some(k) = Key::of(&obj) {
                state.insert(k, Some(obj));
            }
        }
    }

    let now = plan::now_rfc3339();
    let mut rev = base;
    let mut results = Vec::with_capacity(mutations.len());
    let mut events: Vec<WatchEvent> = Vec::new();
    let mut touched: HashSet<Key> = HashSet::new();
    for (m, key) in mutations.into_iter().zip(keys) {
        let key = match key {
            Ok(k) => k,
            Err(e) => {
                results.push(Err(e));
                continue;
            }
        };
        let current = state.get(&key).cloned().flatten();
        let planned = match plan::plan(m, current, &now) {
            Ok(p) => p,
            Err(e) => {
                results.push(Err(e));
                continue;
            }
        };
        match planned.stamp(rev + 1) {
            (object, None) => results.push(Ok(Applied {
                object,
                event: None,
            })),
            (object, Some(ty)) => {
                rev += 1;
                let next = (ty != EventType::Deleted).then(|| object.clone());
                state.insert(key.clone(), next);
                touched.insert(key);
                events.push(WatchEvent {
                    type_: ty,
                    revision: rev,
                    object: object.clone(),
                });
                results.push(Ok(Applied {
                    object,
                    event: Some(ty),
                }));
            }
        }
    }
    if rev == base {
        tx.rollback().await.map_err(pg_err)?;
        return Ok((results, events));
    }

    // Final rows: upsert what exists after the batch, delete what does not.
    let (present, absent): (Vec<&Key>, Vec<&Key>) = touched
        .iter()
        .partition(|k| state.get(*k).is_some_and(Option::is_some));
    let [kinds, orgs, projects, names] = key_arrays(present.iter().copied());
    let mut revs: Vec<i64> = Vec::with_capacity(present.len());
    let mut bodies: Vec<String> = Vec::with_capacity(present.len());
    for k in &present {
        if let Some(Some(obj)) = state.get(*k) {
            let r: u64 = obj
                .metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse().ok())
                .unwrap_or(rev);
            revs.push(to_i64(r)?);
            bodies.push(plan::body_of(obj)?);
        }
    }
    let upsert = async {
        if present.is_empty() {
            return Ok(0);
        }
        tx.execute(
            "INSERT INTO kiln_resources (kind, organization, project, name, rev, body) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[]) \
             ON CONFLICT (kind, organization, project, name) DO UPDATE SET rev = EXCLUDED.rev, body = EXCLUDED.body",
            &[&kinds, &orgs, &projects, &names, &revs, &bodies],
        )
        .await
    };
    let [dkinds, dorgs, dprojects, dnames] = key_arrays(absent.iter().copied());
    let delete = async {
        if absent.is_empty() {
            return Ok(0);
        }
        tx.execute(
            &format!(
                "DELETE FROM kiln_resources r \
                 USING UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS k(kind, organization, project, name) \
                 WHERE {KEY_MATCH}"
            ),
            &[&dkinds, &dorgs, &dprojects, &dnames],
        )
        .await
    };
    let mut ev_revs = Vec::with_capacity(events.len());
    let mut ev_types = Vec::with_capacity(events.len());
    let mut ev_keys: [Vec<String>; 4] = Default::default();
    let mut ev_bodies = Vec::with_capacity(events.len());
    for e in &events {
        ev_revs.push(to_i64(e.revision)?);
        ev_types.push(plan::event_type_str(e.type_));
        let key = Key::of(&e.object)
            .ok_or_else(|| StoreError::Backend("event for an unknown kind".into()))?;
        for (a, v) in ev_keys.iter_mut().zip(cols(&key)) {
            a.push(v);
        }
        ev_bodies.push(plan::body_of(&e.object)?);
    }
    let [ekinds, eorgs, eprojects, enames] = &ev_keys;
    let log = async {
        tx.execute(
            "INSERT INTO kiln_events (rev, type, kind, organization, project, name, body) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])",
            &[&ev_revs, &ev_types, ekinds, eorgs, eprojects, enames, &ev_bodies],
        )
        .await
    };
    let rev_i = to_i64(rev)?;
    let bump = async {
        tx.execute("UPDATE kiln_revision SET rev = $1 WHERE id = 1", &[&rev_i])
            .await
    };
    let rev_text = rev.to_string();
    // Delivered at commit, to every server process listening on this database.
    let notify = async {
        tx.execute("SELECT pg_notify($1, $2)", &[&tailer::CHANNEL, &rev_text])
            .await
    };
    // Issued together, the statements are pipelined on the connection.
    tokio::try_join!(upsert, delete, log, bump, notify).map_err(pg_err)?;

    let step = plan::compaction_step(retention);
    if rev / step > base / step && rev > retention {
        let through = to_i64(rev - retention)?;
        tx.execute("DELETE FROM kiln_events WHERE rev <= $1", &[&through])
            .await
            .map_err(pg_err)?;
        tx.execute(
            "UPDATE kiln_compaction SET through = GREATEST(through, $1) WHERE id = 1",
            &[&through],
        )
        .await
        .map_err(pg_err)?;
    }
    tx.commit().await.map_err(pg_err)?;
    Ok((results, events))
}
