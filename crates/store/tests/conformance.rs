//! The store conformance suite: every case runs against SQLite (in a temporary directory) and PostgreSQL (a
//! fresh database per test on the server named by `KILN_TEST_POSTGRES_URL`; see `scripts/pg-test-env`).
//! Without that variable the PostgreSQL half is skipped loudly, except under `CI=true`, where it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use model::{ObjectMeta, Resource};
use serde_json::{json, Value};
use store::{
    AuditQuery, AuditRecord, Deleted, Event, EventType, Key, ListQuery, LogLine, NewUser, Options,
    Store, StoreError, Watch, WatchEvent, WatchQuery,
};

// ---- harness ----

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

/// An open store plus whatever must outlive it (the temp dir, or the test database, dropped at the end).
struct Harness {
    store: Store,
    _dir: Option<tempfile::TempDir>,
    _db: Option<PgDb>,
}

impl std::ops::Deref for Harness {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

/// A database created for one test, dropped (best-effort) when the test ends.
struct PgDb {
    admin_url: String,
    name: String,
    url: String,
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    if let Err(e) = client.batch_execute(&sql).await {
                        eprintln!("warning: could not drop test database {name}: {e}");
                    }
                }
            });
        });
        let _ = dropper.join();
    }
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

async fn create_pg_database() -> Option<PgDb> {
    let admin_url = match std::env::var("KILN_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "PostgreSQL is required in CI: set KILN_TEST_POSTGRES_URL \
                     (eval \"$(scripts/pg-test-env)\")"
                );
            }
            eprintln!(
                "SKIPPED: KILN_TEST_POSTGRES_URL unset (run: eval \"$(scripts/pg-test-env)\")"
            );
            return None;
        }
    };
    let name = format!("kiln_test_{}", uuid::Uuid::new_v4().simple());
    let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {admin_url}: {e}"));
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
    let url = with_database(&admin_url, &name);
    Some(PgDb {
        admin_url,
        name,
        url,
    })
}

async fn open(backend: Backend, opts: Options) -> Option<Harness> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Store::open(&dir.path().join("kiln.db").to_string_lossy(), opts)
                .await
                .expect("open sqlite");
            Some(Harness {
                store,
                _dir: Some(dir),
                _db: None,
            })
        }
        Backend::Postgres => {
            let db = create_pg_database().await?;
            let store = Store::open(&db.url, opts).await.expect("open postgres");
            Some(Harness {
                store,
                _dir: None,
                _db: Some(db),
            })
        }
    }
}

/// Each case becomes two tests, one per backend.
macro_rules! conformance {
    ($($case:ident => $sqlite:ident, $postgres:ident;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $sqlite() {
                $case(Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $postgres() {
                $case(Backend::Postgres).await
            }
        )*
    };
}

conformance! {
    create_get_already_exists => sqlite_create_get_already_exists, postgres_create_get_already_exists;
    list_scope_and_selectors => sqlite_list_scope_and_selectors, postgres_list_scope_and_selectors;
    list_paging_under_concurrent_inserts => sqlite_list_paging_under_concurrent_inserts, postgres_list_paging_under_concurrent_inserts;
    update_conflict => sqlite_update_conflict, postgres_update_conflict;
    generation_only_on_spec_change => sqlite_generation_only_on_spec_change, postgres_generation_only_on_spec_change;
    status_is_separate => sqlite_status_is_separate, postgres_status_is_separate;
    noop_writes => sqlite_noop_writes, postgres_noop_writes;
    merge_patch => sqlite_merge_patch, postgres_merge_patch;
    delete_with_finalizers => sqlite_delete_with_finalizers, postgres_delete_with_finalizers;
    watch_replays_then_follows => sqlite_watch_replays_then_follows, postgres_watch_replays_then_follows;
    watch_expired => sqlite_watch_expired, postgres_watch_expired;
    watch_filters => sqlite_watch_filters, postgres_watch_filters;
    watch_lagging_reader_misses_nothing => sqlite_watch_lagging_reader_misses_nothing, postgres_watch_lagging_reader_misses_nothing;
    concurrent_writers_gap_free => sqlite_concurrent_writers_gap_free, postgres_concurrent_writers_gap_free;
    many_watchers => sqlite_many_watchers, postgres_many_watchers;
    bulk_creates => sqlite_bulk_creates, postgres_bulk_creates;
    users_tokens_sessions => sqlite_users_tokens_sessions, postgres_users_tokens_sessions;
    audit_and_events => sqlite_audit_and_events, postgres_audit_and_events;
    log_streams => sqlite_log_streams, postgres_log_streams;
    blobs => sqlite_blobs, postgres_blobs;
}

// ---- helpers ----

fn resource(kind: &str, org: Option<&str>, project: Option<&str>, name: &str) -> Resource {
    Resource {
        api_version: model::API_VERSION.to_string(),
        kind: kind.to_string(),
        metadata: ObjectMeta {
            name: name.to_string(),
            organization: org.map(str::to_string),
            project: project.map(str::to_string),
            ..Default::default()
        },
        spec: json!({"replicas": 1}),
        status: Value::Null,
    }
}

fn component(org: &str, project: &str, name: &str) -> Resource {
    resource("Component", Some(org), Some(project), name)
}

fn labelled(mut r: Resource, labels: &[(&str, &str)]) -> Resource {
    r.metadata.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    r
}

fn key(r: &Resource) -> Key {
    Key::of(r).expect("known kind")
}

fn rv(r: &Resource) -> u64 {
    r.metadata
        .resource_version
        .as_deref()
        .expect("resourceVersion")
        .parse()
        .expect("numeric resourceVersion")
}

fn names(items: &[Resource]) -> Vec<String> {
    items
        .iter()
        .map(|r| {
            let m = &r.metadata;
            [
                m.organization.as_deref(),
                m.project.as_deref(),
                Some(m.name.as_str()),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("/")
        })
        .collect()
}

async fn next(w: &mut Watch) -> WatchEvent {
    match tokio::time::timeout(Duration::from_secs(20), w.next_event()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within 20s"),
    }
}

fn ts(s: &str) -> jiff::Timestamp {
    s.parse().expect("timestamp")
}

// ---- cases ----

async fn create_get_already_exists(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let r0 = s.revision().await.unwrap();
    let mut input = component("acme", "shop", "web");
    input.metadata.uid = Some("client-chosen".into());
    input.metadata.resource_version = Some("999".into());
    input.metadata.deletion_timestamp = Some("2020-01-01T00:00:00Z".into());
    input.metadata.generation = Some(7);
    let created = s.create(input).await.unwrap();
    let m = &created.metadata;
    assert_ne!(m.uid.as_deref(), Some("client-chosen"));
    assert_eq!(
        m.uid.as_deref().map(str::len),
        Some(36),
        "uuid v4 uid: {:?}",
        m.uid
    );
    assert_eq!(rv(&created), r0 + 1);
    assert_eq!(s.revision().await.unwrap(), r0 + 1);
    assert_eq!(m.generation, Some(1));
    assert_eq!(m.deletion_timestamp, None);
    let created_at = ts(m.creation_timestamp.as_deref().expect("creationTimestamp"));
    assert!((jiff::Timestamp::now() - created_at).get_seconds().abs() < 60);
    assert!(m.creation_timestamp.as_deref().unwrap().ends_with('Z'));

    assert_eq!(s.get(&key(&created)).await.unwrap(), created);

    match s.create(component("acme", "shop", "web")).await {
        Err(StoreError::AlreadyExists(k)) => assert_eq!(k, key(&created)),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    // The same name elsewhere is another object.
    s.create(component("acme", "blog", "web")).await.unwrap();
    s.create(component("other", "shop", "web")).await.unwrap();

    let missing = key(&component("acme", "shop", "nope"));
    assert!(matches!(s.get(&missing).await, Err(StoreError::NotFound(k)) if k == missing));

    match s.create(resource("Gizmo", None, None, "x")).await {
        Err(StoreError::Invalid(inv)) => assert_eq!(inv.errors[0].path, "kind"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    match s
        .create(resource("Component", Some("acme"), None, "x"))
        .await
    {
        Err(StoreError::Invalid(inv)) => assert_eq!(inv.errors[0].path, "metadata.project"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    match s
        .create(resource("Organization", Some("acme"), None, "x"))
        .await
    {
        Err(StoreError::Invalid(inv)) => assert_eq!(inv.errors[0].path, "metadata.organization"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    // Failed writes consumed no revision.
    assert_eq!(s.revision().await.unwrap(), r0 + 3);
}

async fn list_scope_and_selectors(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    for org in ["b", "a"] {
        s.create(resource("Organization", None, None, org))
            .await
            .unwrap();
        s.create(resource("Environment", Some(org), None, "dev"))
            .await
            .unwrap();
    }
    let comps = [
        ("a", "p2", "api", &[("tier", "web"), ("team", "x")][..]),
        ("a", "p1", "web", &[("tier", "web")][..]),
        ("a", "p1", "db", &[("tier", "db")][..]),
        ("a", "p1", "cron", &[][..]),
        ("b", "p1", "web", &[("tier", "web"), ("team", "y")][..]),
    ];
    for (o, p, n, l) in comps {
        s.create(labelled(component(o, p, n), l)).await.unwrap();
    }
    let list = |q: ListQuery| {
        let s = s.store.clone();
        async move { s.list(&q).await.unwrap() }
    };
    let comp = |org: Option<&str>, project: Option<&str>, sel: Option<&str>| ListQuery {
        kind: Some(model::Kind::Component),
        organization: org.map(str::to_string),
        project: project.map(str::to_string),
        selector: sel.map(str::to_string),
        ..Default::default()
    };

    let all = list(comp(None, None, None)).await;
    assert_eq!(
        names(&all.items),
        ["a/p1/cron", "a/p1/db", "a/p1/web", "a/p2/api", "b/p1/web"]
    );
    assert_eq!(all.revision, s.revision().await.unwrap());
    assert_eq!(all.continue_token, None);
    assert_eq!(
        names(&list(comp(Some("a"), None, None)).await.items),
        ["a/p1/cron", "a/p1/db", "a/p1/web", "a/p2/api"]
    );
    assert_eq!(
        names(&list(comp(Some("a"), Some("p1"), None)).await.items),
        ["a/p1/cron", "a/p1/db", "a/p1/web"]
    );
    assert_eq!(
        names(&list(comp(None, Some("p1"), None)).await.items),
        ["a/p1/cron", "a/p1/db", "a/p1/web", "b/p1/web"]
    );

    // Every kind in one organization: organization-scoped objects (no project) sort first.
    let q = ListQuery {
        organization: Some("a".into()),
        ..Default::default()
    };
    let mixed = list(q).await;
    assert_eq!(
        names(&mixed.items),
        ["a/dev", "a/p1/cron", "a/p1/db", "a/p1/web", "a/p2/api"]
    );
    assert_eq!(mixed.items[0].kind, "Environment");
    let orgs = list(ListQuery {
        kind: Some(model::Kind::Organization),
        ..Default::default()
    })
    .await;
    assert_eq!(names(&orgs.items), ["a", "b"]);

    let sel = |q: &str| comp(None, None, Some(q));
    assert_eq!(
        names(&list(sel("tier=web")).await.items),
        ["a/p1/web", "a/p2/api", "b/p1/web"]
    );
    assert_eq!(
        names(&list(sel("tier==web,team=x")).await.items),
        ["a/p2/api"]
    );
    assert_eq!(
        names(&list(sel("tier!=web")).await.items),
        ["a/p1/cron", "a/p1/db"]
    );
    assert_eq!(
        names(&list(sel("tier in (db, web),team")).await.items),
        ["a/p2/api", "b/p1/web"]
    );
    assert_eq!(
        names(&list(sel("tier notin (web)")).await.items),
        ["a/p1/cron", "a/p1/db"]
    );
    assert_eq!(names(&list(sel("!tier")).await.items), ["a/p1/cron"]);
    assert_eq!(
        names(&list(sel("tier")).await.items),
        ["a/p1/db", "a/p1/web", "a/p2/api", "b/p1/web"]
    );

    match s.list(&sel("tier in web")).await {
        Err(StoreError::Invalid(inv)) => assert_eq!(inv.errors[0].path, "labelSelector"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    let bad_token = ListQuery {
        continue_token: Some("garbage!".into()),
        ..Default::default()
    };
    assert!(matches!(
        s.list(&bad_token).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn list_paging_under_concurrent_inserts(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    // Even-numbered objects exist throughout; odd ones are inserted and even-numbered extras deleted while we page.
    for i in (0..60).step_by(2) {
        s.create(labelled(
            component("o", "p", &format!("c{i:03}")),
            &[("keep", "yes")],
        ))
        .await
        .unwrap();
    }
    for i in 0..10 {
        s.create(component("o", "p", &format!("d{i:03}")))
            .await
            .unwrap();
    }
    let writer = {
        let s = s.store.clone();
        tokio::spawn(async move {
            for i in (1..60).step_by(2) {
                s.create(labelled(
                    component("o", "p", &format!("c{i:03}")),
                    &[("keep", "yes")],
                ))
                .await
                .unwrap();
                if i < 20 {
                    s.delete(&key(&component("o", "p", &format!("d{i:03}"))), None)
                        .await
                        .ok();
                }
            }
        })
    };
    let mut seen: Vec<String> = Vec::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let q = ListQuery {
            kind: Some(model::Kind::Component),
            selector: Some("keep=yes".into()),
            limit: Some(4),
            continue_token: token.take(),
            ..Default::default()
        };
        let page = s.list(&q).await.unwrap();
        assert!(page.items.len() <= 4);
        pages += 1;
        seen.extend(page.items.iter().map(|r| r.metadata.name.clone()));
        match page.continue_token {
            Some(t) => {
                assert_eq!(page.items.len(), 4, "a page with a continue token is full");
                token = Some(t);
            }
            None => break,
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    assert!(pages >= 8, "{pages} pages");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "pages are in order with no repeats");
    for i in (0..60).step_by(2) {
        assert!(
            seen.contains(&format!("c{i:03}")),
            "c{i:03} was skipped: {seen:?}"
        );
    }
    assert!(
        seen.iter().all(|n| n.starts_with('c')),
        "selector applied: {seen:?}"
    );

    // Deterministically: an insert before the cursor is not seen, one after it is.
    let q = ListQuery {
        kind: Some(model::Kind::Component),
        limit: Some(3),
        ..Default::default()
    };
    let first = s.list(&q).await.unwrap();
    assert_eq!(names(&first.items), ["o/p/c000", "o/p/c001", "o/p/c002"]);
    s.create(component("o", "p", "c000a")).await.unwrap();
    s.create(component("o", "p", "c002a")).await.unwrap();
    let q2 = ListQuery {
        continue_token: first.continue_token.clone(),
        ..q.clone()
    };
    let second = s.list(&q2).await.unwrap();
    assert_eq!(names(&second.items), ["o/p/c002a", "o/p/c003", "o/p/c004"]);
    assert!(second.revision > first.revision);

    // The last page has no token; a limit of exactly the remainder too.
    let total = s.list(&ListQuery::default()).await.unwrap().items.len();
    let exact = s
        .list(&ListQuery {
            limit: Some(total),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(exact.items.len(), total);
    assert_eq!(exact.continue_token, None);
}

async fn update_conflict(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let v1 = s.create(component("o", "p", "web")).await.unwrap();
    let mut edit = v1.clone();
    edit.spec = json!({"replicas": 2});
    let v2 = s.update(edit).await.unwrap();
    assert!(rv(&v2) > rv(&v1));

    let mut stale = v1.clone();
    stale.spec = json!({"replicas": 3});
    match s.update(stale.clone()).await {
        Err(e @ StoreError::Conflict { .. }) => {
            let msg = e.to_string();
            let StoreError::Conflict {
                key: k,
                current,
                requested,
            } = e
            else {
                unreachable!()
            };
            assert_eq!(k, key(&v1));
            assert_eq!(current, rv(&v2).to_string());
            assert_eq!(requested, rv(&v1).to_string());
            assert!(msg.contains(&current), "{msg}");
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(s.get(&key(&v1)).await.unwrap().spec, json!({"replicas": 2}));

    // No resourceVersion: unconditional.
    stale.metadata.resource_version = None;
    let v3 = s.update(stale).await.unwrap();
    assert_eq!(v3.spec, json!({"replicas": 3}));

    let mut missing = component("o", "p", "nope");
    missing.spec = json!({});
    assert!(matches!(
        s.update(missing).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.update_status(&key(&v1), json!({"x": 1}), Some("1")).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        s.delete(&key(&v1), Some("1")).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(s.get(&key(&v1)).await.is_ok());
}

async fn generation_only_on_spec_change(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let v1 = s.create(component("o", "p", "web")).await.unwrap();
    let mut e = v1.clone();
    e.metadata.labels.insert("a".into(), "b".into());
    e.metadata.annotations.insert("note".into(), "hi".into());
    e.status = json!({"ignored": true});
    e.metadata.uid = Some("forged".into());
    e.metadata.generation = Some(40);
    e.metadata.creation_timestamp = Some("2000-01-01T00:00:00Z".into());
    let v2 = s.update(e).await.unwrap();
    assert_eq!(v2.metadata.generation, Some(1));
    assert!(rv(&v2) > rv(&v1));
    assert_eq!(v2.metadata.labels.get("a").map(String::as_str), Some("b"));
    assert_eq!(v2.status, Value::Null, "update does not write status");
    assert_eq!(v2.metadata.uid, v1.metadata.uid);
    assert_eq!(
        v2.metadata.creation_timestamp,
        v1.metadata.creation_timestamp
    );

    let mut e = v2.clone();
    e.spec = json!({"replicas": 5});
    let v3 = s.update(e).await.unwrap();
    assert_eq!(v3.metadata.generation, Some(2));
    let mut e = v3.clone();
    e.spec = json!({"replicas": 5, "image": "x"});
    e.metadata.finalizers = vec!["f".into()];
    let v4 = s.update(e).await.unwrap();
    assert_eq!(v4.metadata.generation, Some(3));
    assert_eq!(s.get(&key(&v1)).await.unwrap(), v4);
}

async fn status_is_separate(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let v1 = s.create(component("o", "p", "web")).await.unwrap();
    let st = json!({"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]});
    let v2 = s
        .update_status(&key(&v1), st.clone(), Some(&rv(&v1).to_string()))
        .await
        .unwrap();
    assert_eq!(v2.status, st);
    assert_eq!(v2.spec, v1.spec);
    assert_eq!(v2.metadata.generation, Some(1));
    assert!(rv(&v2) > rv(&v1));

    // A spec update keeps the status.
    let mut e = v2.clone();
    e.spec = json!({"replicas": 9});
    e.status = Value::Null;
    let v3 = s.update(e).await.unwrap();
    assert_eq!(v3.status, st);
    assert_eq!(v3.metadata.generation, Some(2));

    // The same status again: no new revision.
    let rev = s.revision().await.unwrap();
    let same = s.update_status(&key(&v1), st.clone(), None).await.unwrap();
    assert_eq!(same, v3);
    assert_eq!(s.revision().await.unwrap(), rev);

    let stale = s
        .update_status(&key(&v1), json!({}), Some(&rv(&v2).to_string()))
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    let missing = key(&component("o", "p", "nope"));
    assert!(matches!(
        s.update_status(&missing, json!({}), None).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn noop_writes(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let v1 = s
        .create(labelled(component("o", "p", "web"), &[("a", "1")]))
        .await
        .unwrap();
    let rev = s.revision().await.unwrap();
    let mut w = s
        .watch(&WatchQuery {
            from_revision: Some(rev),
            ..Default::default()
        })
        .await
        .unwrap();

    // Identical spec/labels/annotations/finalizers, with or without the current resourceVersion.
    let mut same = v1.clone();
    same.status = json!({"not": "written"});
    assert_eq!(s.update(same.clone()).await.unwrap(), v1);
    same.metadata.resource_version = None;
    assert_eq!(s.update(same).await.unwrap(), v1);
    assert_eq!(
        s.update_status(&key(&v1), Value::Null, None).await.unwrap(),
        v1
    );
    assert_eq!(s.revision().await.unwrap(), rev);
    // A stale version is still a conflict, even when nothing would change.
    let mut stale = v1.clone();
    stale.metadata.resource_version = Some("1".into());
    if rv(&v1) != 1 {
        assert!(matches!(
            s.update(stale).await,
            Err(StoreError::Conflict { .. })
        ));
    }

    let mut real = v1.clone();
    real.metadata.labels.insert("b".into(), "2".into());
    let v2 = s.update(real).await.unwrap();
    assert_eq!(rv(&v2), rev + 1);
    let ev = next(&mut w).await;
    assert_eq!(
        (ev.type_, ev.revision),
        (EventType::Modified, rev + 1),
        "no event for the no-ops"
    );
    assert_eq!(ev.object, v2);
}

async fn merge_patch(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let mut r = labelled(component("o", "p", "web"), &[("keep", "1"), ("drop", "1")]);
    r.spec = json!({"replicas": 1, "env": {"A": "1", "B": "2"}});
    let v1 = s.create(r).await.unwrap();
    let k = key(&v1);
    let ok = |r: Resource| -> Result<Resource, model::Invalid> { Ok(r) };

    let patch = json!({
        "metadata": {"labels": {"drop": null, "new": "2"}, "annotations": {"a": "b"}},
        "spec": {"env": {"A": null, "C": "3"}, "replicas": 2}
    });
    let v2 = s.patch(&k, &patch, ok).await.unwrap();
    assert_eq!(v2.spec, json!({"replicas": 2, "env": {"B": "2", "C": "3"}}));
    let labels: BTreeMap<_, _> = [
        ("keep".to_string(), "1".to_string()),
        ("new".into(), "2".into()),
    ]
    .into();
    assert_eq!(v2.metadata.labels, labels);
    assert_eq!(
        v2.metadata.annotations.get("a").map(String::as_str),
        Some("b")
    );
    assert_eq!(v2.metadata.generation, Some(2));

    // Fields outside labels/annotations/finalizers/spec are ignored.
    let sneaky = json!({"metadata": {"name": "other", "uid": "x", "generation": 99}, "status": {"hacked": true}, "kind": "Project"});
    let v3 = s.patch(&k, &sneaky, ok).await.unwrap();
    assert_eq!(v3, v2, "nothing that counts changed: a no-op");
    assert!(matches!(
        s.get(&key(&component("o", "p", "other"))).await,
        Err(StoreError::NotFound(_))
    ));

    // The check closure validates ...
    let reject = |_: Resource| -> Result<Resource, model::Invalid> {
        Err(model::Invalid::one("spec.replicas", "must be at most 10"))
    };
    match s
        .patch(&k, &json!({"spec": {"replicas": 50}}), reject)
        .await
    {
        Err(StoreError::Invalid(inv)) => assert_eq!(inv.errors[0].path, "spec.replicas"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    // ... and normalises, but cannot move the object.
    let normalise = |mut r: Resource| -> Result<Resource, model::Invalid> {
        r.spec["defaulted"] = json!(true);
        r.metadata.name = "elsewhere".into();
        Ok(r)
    };
    let v4 = s
        .patch(&k, &json!({"metadata": {"finalizers": ["f1"]}}), normalise)
        .await
        .unwrap();
    assert_eq!(v4.metadata.name, "web");
    assert_eq!(v4.metadata.finalizers, ["f1"]);
    assert_eq!(v4.spec["defaulted"], json!(true));
    assert_eq!(s.get(&k).await.unwrap(), v4);

    // A patch that makes the object unreadable is rejected.
    let bad = s
        .patch(&k, &json!({"metadata": {"labels": {"x": 5}}}), ok)
        .await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");
    let missing = key(&component("o", "p", "nope"));
    assert!(matches!(
        s.patch(&missing, &json!({}), ok).await,
        Err(StoreError::NotFound(_))
    ));

    // Concurrent patches of different fields all land (conflicts are retried).
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let (s, k) = (s.store.clone(), k.clone());
            tokio::spawn(async move {
                let p = json!({"metadata": {"labels": {format!("l{i}"): "x"}}});
                s.patch(&k, &p, Ok).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let end = s.get(&k).await.unwrap();
    for i in 0..6 {
        assert!(
            end.metadata.labels.contains_key(&format!("l{i}")),
            "{:?}",
            end.metadata.labels
        );
    }
}

async fn delete_with_finalizers(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let mut r = component("o", "p", "web");
    r.metadata.finalizers = vec!["kiln.dev/cleanup".into()];
    let v1 = s.create(r).await.unwrap();
    let k = key(&v1);
    let mut w = s
        .watch(&WatchQuery {
            from_revision: Some(rv(&v1)),
            ..Default::default()
        })
        .await
        .unwrap();

    let pending = match s.delete(&k, Some(&rv(&v1).to_string())).await.unwrap() {
        Deleted::Pending(r) => r,
        Deleted::Gone(r) => panic!("finalizers remain, but it is gone: {r:?}"),
    };
    let when = pending
        .metadata
        .deletion_timestamp
        .clone()
        .expect("deletionTimestamp");
    ts(&when);
    assert!(rv(&pending) > rv(&v1));
    // Deleting again changes nothing.
    match s.delete(&k, None).await.unwrap() {
        Deleted::Pending(again) => assert_eq!(again, pending),
        Deleted::Gone(r) => panic!("gone: {r:?}"),
    }
    assert_eq!(s.get(&k).await.unwrap(), pending);
    let ev = next(&mut w).await;
    assert_eq!(
        (ev.type_, ev.object.clone()),
        (EventType::Modified, pending.clone())
    );

    // An update cannot clear deletionTimestamp; clearing the finalizers removes the object.
    let mut e = pending.clone();
    e.metadata.deletion_timestamp = None;
    e.metadata.labels.insert("x".into(), "y".into());
    let still = s.update(e).await.unwrap();
    assert_eq!(still.metadata.deletion_timestamp, Some(when.clone()));
    let mut e = still.clone();
    e.metadata.finalizers.clear();
    let last = s.update(e).await.unwrap();
    assert!(last.metadata.finalizers.is_empty());
    assert!(matches!(s.get(&k).await, Err(StoreError::NotFound(_))));
    assert_eq!(next(&mut w).await.type_, EventType::Modified);
    let ev = next(&mut w).await;
    assert_eq!(ev.type_, EventType::Deleted);
    assert_eq!(ev.object, last);
    assert_eq!(ev.revision, rv(&last));

    // Without finalizers, delete removes at once and returns the last state.
    let v = s.create(component("o", "p", "api")).await.unwrap();
    match s.delete(&key(&v), None).await.unwrap() {
        Deleted::Gone(r) => {
            assert_eq!(r.metadata.uid, v.metadata.uid);
            assert!(rv(&r) > rv(&v));
        }
        Deleted::Pending(r) => panic!("pending: {r:?}"),
    }
    assert!(matches!(
        s.delete(&key(&v), None).await,
        Err(StoreError::NotFound(_))
    ));
    let ev = next(&mut w).await;
    assert_eq!(
        (ev.type_, ev.object.metadata.name.as_str()),
        (EventType::Added, "api")
    );
    assert_eq!(next(&mut w).await.type_, EventType::Deleted);
    // Re-creating after removal works.
    s.create(component("o", "p", "web")).await.unwrap();
}

async fn watch_replays_then_follows(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let start = s.revision().await.unwrap();
    let a = s.create(component("o", "p", "a")).await.unwrap();
    let bb = s.create(component("o", "p", "b")).await.unwrap();
    let mut a2 = a.clone();
    a2.spec = json!({"replicas": 3});
    let a2 = s.update(a2).await.unwrap();

    let mut w = s
        .watch(&WatchQuery {
            from_revision: Some(start),
            ..Default::default()
        })
        .await
        .unwrap();
    let replayed: Vec<_> = [next(&mut w).await, next(&mut w).await, next(&mut w).await].into();
    assert_eq!(
        replayed
            .iter()
            .map(|e| (e.type_, e.revision))
            .collect::<Vec<_>>(),
        [
            (EventType::Added, rv(&a)),
            (EventType::Added, rv(&bb)),
            (EventType::Modified, rv(&a2))
        ]
    );
    assert_eq!(replayed[2].object, a2);

    // A watch from "now" sees only what follows.
    let mut now = s.watch(&WatchQuery::default()).await.unwrap();
    let c = s.create(component("o", "p", "c")).await.unwrap();
    let ev = next(&mut w).await;
    assert_eq!((ev.type_, ev.object.clone()), (EventType::Added, c.clone()));
    assert_eq!(next(&mut now).await.object, c);
    let gone = match s.delete(&key(&bb), None).await.unwrap() {
        Deleted::Gone(r) => r,
        Deleted::Pending(r) => panic!("pending: {r:?}"),
    };
    for watch in [&mut w, &mut now] {
        let ev = next(watch).await;
        assert_eq!((ev.type_, ev.revision), (EventType::Deleted, rv(&gone)));
        assert_eq!(ev.object.metadata.name, "b");
    }
    // Resuming from a list's revision.
    let page = s.list(&ListQuery::default()).await.unwrap();
    let mut resumed = s
        .watch(&WatchQuery {
            from_revision: Some(page.revision),
            ..Default::default()
        })
        .await
        .unwrap();
    let d = s.create(component("o", "p", "d")).await.unwrap();
    assert_eq!(next(&mut resumed).await.object, d);
}

async fn watch_expired(b: Backend) {
    let Some(s) = open(b, Options { event_retention: 8 }).await else {
        return;
    };
    let mut w0 = s
        .watch(&WatchQuery {
            from_revision: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
    let first = s.create(component("o", "p", "x")).await.unwrap();
    // Once it has caught up, this watcher follows the live broadcast.
    assert_eq!(next(&mut w0).await.revision, 1);
    for i in 0..40 {
        let mut e = first.clone();
        e.metadata.resource_version = None;
        e.spec = json!({"replicas": 100 + i});
        s.update(e).await.unwrap();
    }
    let rev = s.revision().await.unwrap();
    assert_eq!(rev, rv(&first) + 40);
    match s
        .watch(&WatchQuery {
            from_revision: Some(1),
            ..Default::default()
        })
        .await
    {
        Err(StoreError::Expired { requested, oldest }) => {
            assert_eq!(requested, 1);
            assert!(
                oldest > 2 && oldest <= rev - 8 + 1,
                "oldest {oldest}, revision {rev}"
            );
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    // The newest `event_retention` events are kept.
    let mut w = s
        .watch(&WatchQuery {
            from_revision: Some(rev - 8),
            ..Default::default()
        })
        .await
        .unwrap();
    for r in rev - 7..=rev {
        assert_eq!(next(&mut w).await.revision, r);
    }
    // A watcher that kept up saw every event, compaction notwithstanding.
    for r in 2..=rev {
        assert_eq!(next(&mut w0).await.revision, r);
    }
}

async fn watch_filters(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let from = Some(s.revision().await.unwrap());
    let q = |kind: Option<model::Kind>, org: Option<&str>, project: Option<&str>| WatchQuery {
        kind,
        organization: org.map(str::to_string),
        project: project.map(str::to_string),
        from_revision: from,
    };
    let mut by_project = s
        .watch(&q(Some(model::Kind::Component), Some("a"), Some("p1")))
        .await
        .unwrap();
    let mut by_org = s.watch(&q(None, Some("a"), None)).await.unwrap();
    let mut by_kind = s
        .watch(&q(Some(model::Kind::Environment), None, None))
        .await
        .unwrap();

    s.create(resource("Organization", None, None, "a"))
        .await
        .unwrap();
    s.create(resource("Environment", Some("a"), None, "dev"))
        .await
        .unwrap();
    s.create(resource("Environment", Some("b"), None, "dev"))
        .await
        .unwrap();
    s.create(component("a", "p1", "web")).await.unwrap();
    s.create(component("a", "p2", "web")).await.unwrap();
    s.create(component("b", "p1", "web")).await.unwrap();
    s.create(component("a", "p1", "zz-last")).await.unwrap();
    s.create(resource("Environment", Some("a"), None, "zz-last"))
        .await
        .unwrap();

    assert_eq!(
        read_until_last(&mut by_project).await,
        ["Component:a/p1/web", "Component:a/p1/zz-last"]
    );
    assert_eq!(
        read_until_last(&mut by_kind).await,
        [
            "Environment:a/dev",
            "Environment:b/dev",
            "Environment:a/zz-last"
        ]
    );
    assert_eq!(
        read_until_last(&mut by_org).await,
        [
            "Environment:a/dev",
            "Component:a/p1/web",
            "Component:a/p2/web",
            "Component:a/p1/zz-last"
        ]
    );
}

async fn read_until_last(w: &mut Watch) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let ev = next(w).await;
        let name = names(std::slice::from_ref(&ev.object)).remove(0);
        got.push(format!("{}:{name}", ev.object.kind));
        if ev.object.metadata.name == "zz-last" {
            return got;
        }
    }
}

async fn watch_lagging_reader_misses_nothing(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let from = s.revision().await.unwrap();
    // Subscribed, but not read while far more commits than the broadcast holds go by.
    let mut w = s
        .watch(&WatchQuery {
            from_revision: Some(from),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut live = s.watch(&WatchQuery::default()).await.unwrap();
    let obj = s.create(component("o", "p", "busy")).await.unwrap();
    let n = 1200;
    for i in 1..n {
        let mut e = obj.clone();
        e.metadata.resource_version = None;
        e.spec = json!({"replicas": 100 + i});
        s.update(e).await.unwrap();
    }
    for i in 1..=n {
        let ev = next(&mut w).await;
        assert_eq!(ev.revision, from + i, "gap-free after lagging");
        let ev = next(&mut live).await;
        assert_eq!(ev.revision, from + i);
    }
}

async fn concurrent_writers_gap_free(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let from = s.revision().await.unwrap();
    let mut w = s
        .watch(&WatchQuery {
            from_revision: Some(from),
            ..Default::default()
        })
        .await
        .unwrap();
    let (tasks, writes) = (8, 50);
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let s = s.store.clone();
            tokio::spawn(async move {
                let mut rvs = Vec::new();
                let mut obj = s
                    .create(component("o", "p", &format!("w{t}")))
                    .await
                    .unwrap();
                rvs.push(rv(&obj));
                for i in 1..writes {
                    obj.spec = json!({"replicas": 100 + i});
                    obj = s.update(obj).await.unwrap();
                    rvs.push(rv(&obj));
                }
                rvs
            })
        })
        .collect();
    let mut acked = BTreeSet::new();
    for h in handles {
        let rvs = h.await.unwrap();
        assert!(
            rvs.windows(2).all(|p| p[0] < p[1]),
            "one writer's revisions increase: {rvs:?}"
        );
        acked.extend(rvs);
    }
    let total = (tasks * writes) as u64;
    assert_eq!(
        acked,
        (from + 1..=from + total).collect::<BTreeSet<_>>(),
        "every revision acknowledged once"
    );
    let mut last_per_object: BTreeMap<String, i64> = BTreeMap::new();
    for expected in from + 1..=from + total {
        let ev = next(&mut w).await;
        assert_eq!(
            ev.revision, expected,
            "events arrive gap-free in revision order"
        );
        assert_eq!(rv(&ev.object), ev.revision);
        // Each object's own writes are seen in the order they were made.
        let replicas = ev.object.spec["replicas"].as_i64().unwrap_or(0);
        let prev = last_per_object.insert(ev.object.metadata.name.clone(), replicas);
        assert!(
            prev.is_none_or(|p| p < replicas),
            "{prev:?} then {replicas}"
        );
    }
    assert_eq!(s.revision().await.unwrap(), from + total);
    // The same sequence replayed from the log.
    let mut replay = s
        .watch(&WatchQuery {
            from_revision: Some(from),
            ..Default::default()
        })
        .await
        .unwrap();
    for expected in from + 1..=from + total {
        assert_eq!(next(&mut replay).await.revision, expected);
    }
}

async fn many_watchers(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let n = 1000;
    let mut watches = Vec::with_capacity(n);
    for _ in 0..n {
        watches.push(
            s.watch(&WatchQuery {
                kind: Some(model::Kind::Component),
                ..Default::default()
            })
            .await
            .unwrap(),
        );
    }
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    let handles: Vec<_> = watches
        .into_iter()
        .map(|mut w| {
            let ready_tx = ready_tx.clone();
            tokio::spawn(async move {
                let _ = ready_tx.send(()).await;
                let ev = next(&mut w).await;
                (Instant::now(), ev.revision)
            })
        })
        .collect();
    for _ in 0..n {
        ready_rx.recv().await.unwrap();
    }
    let t0 = Instant::now();
    let created = s.create(component("o", "p", "hello")).await.unwrap();
    let mut latencies = Vec::with_capacity(n);
    for h in handles {
        let (at, revision) = h.await.unwrap();
        assert_eq!(revision, rv(&created));
        latencies.push(at.duration_since(t0));
    }
    latencies.sort();
    let p50 = latencies[n / 2];
    let p99 = latencies[n * 99 / 100];
    eprintln!("{b:?}: {n} watchers, commit-to-delivery p50 {p50:?}, p99 {p99:?}");
    // Delivery latency is a benchmark figure (`cargo xtask bench`), not a test assertion: this test checks
    // that every watcher received exactly the change.
}

async fn bulk_creates(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let (tasks, per_task) = (32, 10_000 / 32 + 1);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let s = s.store.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    s.create(component("o", &format!("p{t}"), &format!("c{i}")))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let took = t0.elapsed();
    let total = tasks * per_task;
    eprintln!("{b:?}: {total} creates from {tasks} tasks in {took:?}");
    assert_eq!(s.revision().await.unwrap(), total as u64);
    let all = s
        .list(&ListQuery {
            kind: Some(model::Kind::Component),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.items.len(), total);
}

async fn users_tokens_sessions(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    assert_eq!(s.count_users().await.unwrap(), 0);
    let admin = s
        .create_user(NewUser {
            name: "admin".into(),
            password_hash: Some("$argon2id$x".into()),
            superuser: true,
        })
        .await
        .unwrap();
    let dev = s
        .create_user(NewUser {
            name: "dev".into(),
            password_hash: None,
            superuser: false,
        })
        .await
        .unwrap();
    assert!(matches!(
        s.create_user(NewUser {
            name: "dev".into(),
            password_hash: None,
            superuser: false
        })
        .await,
        Err(StoreError::Duplicate(_))
    ));
    assert_eq!(s.count_users().await.unwrap(), 2);
    assert_eq!(s.user_by_name("admin").await.unwrap(), Some(admin.clone()));
    assert_eq!(s.user_by_id(&dev.id).await.unwrap(), Some(dev.clone()));
    assert_eq!(s.user_by_name("nobody").await.unwrap(), None);
    assert_eq!(s.list_users().await.unwrap(), [admin.clone(), dev.clone()]);
    s.set_password(&dev.id, Some("$argon2id$y")).await.unwrap();
    assert_eq!(
        s.user_by_id(&dev.id)
            .await
            .unwrap()
            .unwrap()
            .password_hash
            .as_deref(),
        Some("$argon2id$y")
    );
    assert!(matches!(
        s.set_password("no-such-id", None).await,
        Err(StoreError::Missing(_))
    ));

    let expires = ts("2030-01-02T03:04:05.123456Z");
    let t1 = s
        .create_token(&dev.id, "ci", "hash-1", Some(expires))
        .await
        .unwrap();
    let t2 = s
        .create_token(&admin.id, "laptop", "hash-2", None)
        .await
        .unwrap();
    assert_eq!(t1.expires_at, Some(expires));
    assert!(matches!(
        s.create_token(&dev.id, "dup", "hash-1", None).await,
        Err(StoreError::Duplicate(_))
    ));
    assert!(matches!(
        s.create_token("no-such-id", "x", "hash-3", None).await,
        Err(StoreError::Missing(_))
    ));
    assert_eq!(s.token_by_hash("hash-1").await.unwrap(), Some(t1.clone()));
    assert_eq!(s.token_by_hash("nope").await.unwrap(), None);
    assert_eq!(
        s.list_tokens(Some(&dev.id)).await.unwrap(),
        std::slice::from_ref(&t1)
    );
    assert_eq!(s.list_tokens(None).await.unwrap().len(), 2);
    s.touch_token(&t1.id).await.unwrap();
    s.touch_token("no-such-token").await.unwrap();
    assert!(s
        .token_by_hash("hash-1")
        .await
        .unwrap()
        .unwrap()
        .last_used_at
        .is_some());
    s.revoke_token(&t2.id).await.unwrap();
    let revoked = s.token_by_hash("hash-2").await.unwrap().unwrap();
    let revoked_at = revoked.revoked_at.expect("revoked_at");
    s.revoke_token(&t2.id).await.unwrap();
    assert_eq!(
        s.token_by_hash("hash-2").await.unwrap().unwrap().revoked_at,
        Some(revoked_at),
        "revocation time kept"
    );
    assert!(matches!(
        s.revoke_token("no-such-token").await,
        Err(StoreError::Missing(_))
    ));

    let sess_exp = ts("2031-05-06T07:08:09Z");
    let sess = s
        .create_session(&dev.id, "cookie-hash", sess_exp)
        .await
        .unwrap();
    assert_eq!(
        s.session_by_hash("cookie-hash").await.unwrap(),
        Some(sess.clone())
    );
    assert_eq!(sess.expires_at, sess_exp);
    assert!(matches!(
        s.create_session("no-such-id", "c2", sess_exp).await,
        Err(StoreError::Missing(_))
    ));
    s.delete_session("cookie-hash").await.unwrap();
    s.delete_session("cookie-hash").await.unwrap();
    assert_eq!(s.session_by_hash("cookie-hash").await.unwrap(), None);

    // Deleting a user takes their tokens and sessions along.
    s.create_session(&dev.id, "cookie-2", sess_exp)
        .await
        .unwrap();
    s.delete_user(&dev.id).await.unwrap();
    assert_eq!(s.user_by_id(&dev.id).await.unwrap(), None);
    assert_eq!(s.token_by_hash("hash-1").await.unwrap(), None);
    assert_eq!(s.session_by_hash("cookie-2").await.unwrap(), None);
    assert_eq!(s.list_tokens(None).await.unwrap(), [revoked]);
    assert!(matches!(
        s.delete_user(&dev.id).await,
        Err(StoreError::Missing(_))
    ));
    assert_eq!(s.count_users().await.unwrap(), 1);
}

async fn audit_and_events(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let rec =
        |t: &str, user: &str, kind: Option<&str>, org: Option<&str>, status: u16| AuditRecord {
            id: 0,
            time: ts(t),
            user: user.into(),
            action: "PUT /api/v1/x".into(),
            kind: kind.map(str::to_string),
            organization: org.map(str::to_string),
            project: None,
            name: Some("n".into()),
            status,
            outcome: "updated".into(),
        };
    let inputs = [
        rec(
            "2024-01-01T00:00:00Z",
            "alice",
            Some("Component"),
            Some("acme"),
            200,
        ),
        rec(
            "2024-01-02T00:00:00.000001Z",
            "bob",
            Some("Project"),
            Some("acme"),
            201,
        ),
        rec(
            "2024-01-03T00:00:00Z",
            "alice",
            Some("Component"),
            Some("other"),
            403,
        ),
        rec("2024-01-04T00:00:00Z", "anonymous", None, None, 401),
    ];
    let mut ids = Vec::new();
    for r in inputs.iter().cloned() {
        ids.push(s.append_audit(r).await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let all = s.list_audit(&AuditQuery::default()).await.unwrap();
    let expected: Vec<AuditRecord> = inputs
        .iter()
        .cloned()
        .zip(&ids)
        .map(|(mut r, id)| {
            r.id = *id;
            r
        })
        .rev()
        .collect();
    assert_eq!(all, expected, "round-trip, newest first");
    let users = |q: AuditQuery| {
        let s = s.store.clone();
        async move {
            s.list_audit(&q)
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.user, r.status))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        users(AuditQuery {
            user: Some("alice".into()),
            ..Default::default()
        })
        .await,
        [("alice".into(), 403), ("alice".into(), 200)]
    );
    assert_eq!(
        users(AuditQuery {
            kind: Some("Project".into()),
            ..Default::default()
        })
        .await,
        [("bob".into(), 201)]
    );
    assert_eq!(
        users(AuditQuery {
            organization: Some("acme".into()),
            ..Default::default()
        })
        .await
        .len(),
        2
    );
    assert_eq!(
        users(AuditQuery {
            since: Some(ts("2024-01-02T00:00:00.000001Z")),
            until: Some(ts("2024-01-03T00:00:00Z")),
            ..Default::default()
        })
        .await,
        [("alice".into(), 403), ("bob".into(), 201)]
    );
    assert_eq!(
        users(AuditQuery {
            limit: Some(1),
            ..Default::default()
        })
        .await,
        [("anonymous".into(), 401)]
    );

    let event = |name: &str, i: usize| Event {
        time: jiff::Timestamp::from_second(1_700_000_000 + i as i64).unwrap(),
        kind: "Component".into(),
        organization: Some("acme".into()),
        project: Some("shop".into()),
        name: name.into(),
        type_: ["Normal", "Warning"][i % 2].into(),
        reason: format!("Reason{i}"),
        message: format!("message {i}"),
    };
    for i in 0..60 {
        s.record_event(event("web", i)).await.unwrap();
    }
    s.record_event(event("api", 0)).await.unwrap();
    let evs = s
        .list_events("Component", Some("acme"), Some("shop"), "web", 100)
        .await
        .unwrap();
    assert_eq!(evs.len(), store::EVENTS_PER_OBJECT);
    assert_eq!(evs[0], event("web", 59), "newest first");
    assert_eq!(evs.last(), Some(&event("web", 10)));
    assert_eq!(
        s.list_events("Component", Some("acme"), Some("shop"), "web", 3)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        s.list_events("Component", Some("acme"), Some("shop"), "api", 100)
            .await
            .unwrap(),
        [event("api", 0)]
    );
    assert!(s
        .list_events("Component", Some("acme"), None, "web", 100)
        .await
        .unwrap()
        .is_empty());
}

/// Two store handles on one PostgreSQL database stand in for two server processes: each sees the other's
/// commits through LISTEN/NOTIFY, in revision order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_watchers_see_other_processes() {
    let Some(db) = create_pg_database().await else {
        return;
    };
    let a = Store::open(&db.url, Options::default())
        .await
        .expect("open a");
    let b = Store::open(&db.url, Options::default())
        .await
        .expect("open b");
    let mut on_b = b.watch(&WatchQuery::default()).await.unwrap();
    let mut on_a = a.watch(&WatchQuery::default()).await.unwrap();
    let mut revs = Vec::new();
    for i in 0..20 {
        let writer = if i % 2 == 0 { &a } else { &b };
        revs.push(rv(&writer
            .create(component("o", "p", &format!("c{i}")))
            .await
            .unwrap()));
    }
    for r in &revs {
        assert_eq!(next(&mut on_b).await.revision, *r);
        assert_eq!(next(&mut on_a).await.revision, *r);
    }
    // Concurrent writers in both processes still give one gap-free sequence.
    let from = b.revision().await.unwrap();
    let mut w = b
        .watch(&WatchQuery {
            from_revision: Some(from),
            ..Default::default()
        })
        .await
        .unwrap();
    let hs: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            tokio::spawn(async move {
                for j in 0..30 {
                    s.create(component("o", &format!("q{i}"), &format!("c{j}")))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.await.unwrap();
    }
    for r in from + 1..=from + 60 {
        assert_eq!(next(&mut w).await.revision, r);
    }
}

#[test]
fn database_url_rewrite() {
    assert_eq!(
        with_database("postgres://u:p@h:5432/kiln", "t1"),
        "postgres://u:p@h:5432/t1"
    );
    assert_eq!(
        with_database("postgres://u:p@h/kiln?sslmode=disable", "t1"),
        "postgres://u:p@h/t1?sslmode=disable"
    );
    assert_eq!(with_database("postgresql://h", "t1"), "postgresql://h/t1");
}

async fn log_streams(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    let line = |t: &str| LogLine::now("build", t);
    assert_eq!(s.append_logs("job/a", vec![]).await.unwrap(), 0);
    let mut appends = s.log_appends();
    assert_eq!(
        s.append_logs("job/a", vec![line("one"), line("two")])
            .await
            .unwrap(),
        2
    );
    assert_eq!(appends.recv().await.unwrap(), "job/a");
    assert_eq!(
        s.append_logs("job/b", vec![line("other")]).await.unwrap(),
        1
    );
    assert_eq!(
        s.append_logs("job/a", vec![line("three")]).await.unwrap(),
        3
    );

    let all = s.read_logs("job/a", 0, 100).await.unwrap();
    let texts: Vec<(u64, &str)> = all.iter().map(|l| (l.seq, l.text.as_str())).collect();
    assert_eq!(texts, [(1, "one"), (2, "two"), (3, "three")]);
    assert_eq!(all[0].source, "build");
    let after = s.read_logs("job/a", 1, 1).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].text, "two");
    assert!(s.read_logs("job/a", 3, 100).await.unwrap().is_empty());
    assert!(s.read_logs("job/none", 0, 100).await.unwrap().is_empty());
    assert_eq!(s.last_log_seq("job/a").await.unwrap(), 3);
    assert_eq!(s.last_log_seq("job/b").await.unwrap(), 1);
    assert_eq!(s.last_log_seq("job/none").await.unwrap(), 0);

    // Appenders racing on one stream: every line gets its own number, none is lost.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                let lines = vec![LogLine::now("w", format!("{w}-{i}"))];
                s.append_logs("job/race", lines).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let raced = s.read_logs("job/race", 0, 1000).await.unwrap();
    let seqs: Vec<u64> = raced.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());
    let mut texts: Vec<String> = raced.into_iter().map(|l| l.text).collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), 40);

    s.delete_logs("job/a").await.unwrap();
    s.delete_logs("job/a").await.unwrap();
    assert!(s.read_logs("job/a", 0, 100).await.unwrap().is_empty());
    assert_eq!(s.read_logs("job/b", 0, 100).await.unwrap().len(), 1);
}

async fn blobs(b: Backend) {
    let Some(s) = open(b, Options::default()).await else {
        return;
    };
    assert_eq!(s.get_blob("tf/a").await.unwrap(), None);
    s.put_blob("tf/a", b"one".to_vec()).await.unwrap();
    s.put_blob("tf/b", vec![0, 255, 1]).await.unwrap();
    s.put_blob("tg/c", b"x".to_vec()).await.unwrap();
    assert_eq!(
        s.get_blob("tf/a").await.unwrap().as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(s.get_blob("tf/b").await.unwrap(), Some(vec![0, 255, 1]));
    s.put_blob("tf/a", b"two".to_vec()).await.unwrap();
    assert_eq!(
        s.get_blob("tf/a").await.unwrap().as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(s.blob_names("tf/").await.unwrap(), ["tf/a", "tf/b"]);
    // A prefix is matched literally: `_` and `%` are no wildcards.
    s.put_blob("t_/d", b"y".to_vec()).await.unwrap();
    assert_eq!(s.blob_names("t_/").await.unwrap(), ["t_/d"]);
    assert!(s.delete_blob("tf/a").await.unwrap());
    assert!(!s.delete_blob("tf/a").await.unwrap());
    assert_eq!(s.get_blob("tf/a").await.unwrap(), None);
    assert_eq!(s.blob_names("tf/").await.unwrap(), ["tf/b"]);
    // A claim: of racing creators of one name, exactly one wins, and the stored value is the winner's.
    let claims = (0..8u8).map(|i| {
        let s = s.clone();
        async move { (i, s.create_blob("hook/x", vec![i]).await.unwrap()) }
    });
    let results = futures_util::future::join_all(claims).await;
    let winners: Vec<u8> = results
        .iter()
        .filter(|(_, won)| *won)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert_eq!(s.get_blob("hook/x").await.unwrap(), Some(vec![winners[0]]));
    assert!(!s.create_blob("hook/x", vec![9]).await.unwrap());
}
