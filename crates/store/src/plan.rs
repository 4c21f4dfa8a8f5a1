//! The semantics of every resource write, shared by both backends: given the request and the object as it is
//! now, decide what to write (or that nothing changes). Backends only supply the current row, allocate the
//! revision and persist the outcome.

use model::{Resource, Scope};
use serde_json::Value;

use crate::{EventType, Key, StoreError};

/// A resource write as the store receives it.
#[derive(Debug, Clone)]
pub(crate) enum Mutation {
    Create(Resource),
    Update(Resource),
    UpdateStatus {
        key: Key,
        status: Value,
        expected_rv: Option<String>,
    },
    Delete {
        key: Key,
        expected_rv: Option<String>,
    },
}

/// What a write does to the stored object.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Nothing changes: no revision, no event. Carries the current object.
    NoOp(Resource),
    /// Insert (`Added`) or replace (`Modified`) the object; its resourceVersion is stamped on commit.
    Put(Resource, EventType),
    /// Remove the object (`Deleted`); carries its last state.
    Remove(Resource),
}

/// The outcome of an applied mutation: the object as written (or current, for a no-op) and the event, if any.
#[derive(Debug, Clone)]
pub(crate) struct Applied {
    pub object: Resource,
    pub event: Option<EventType>,
}

/// Checks that the resource names a known kind and carries exactly the scope fields its kind needs.
pub(crate) fn validate_key(r: &Resource) -> Result<Key, StoreError> {
    let invalid = |path: &str, msg: String| StoreError::Invalid(model::Invalid::one(path, msg));
    let key = Key::of(r).ok_or_else(|| invalid("kind", format!("unknown kind {:?}", r.kind)))?;
    if key.name.is_empty() {
        return Err(invalid("metadata.name", "must not be empty".into()));
    }
    let scope = key.kind.scope();
    let needs_org = scope != Scope::Cluster;
    let needs_project = scope == Scope::Project;
    match (&key.organization, needs_org) {
        (None, true) => {
            return Err(invalid(
                "metadata.organization",
                format!("required for kind {}", key.kind),
            ))
        }
        (Some(_), false) => {
            return Err(invalid(
                "metadata.organization",
                format!("must not be set for kind {}", key.kind),
            ))
        }
        (Some(o), true) if o.is_empty() => {
            return Err(invalid("metadata.organization", "must not be empty".into()))
        }
        _ => {}
    }
    match (&key.project, needs_project) {
        (None, true) => {
            return Err(invalid(
                "metadata.project",
                format!("required for kind {}", key.kind),
            ))
        }
        (Some(_), false) => {
            return Err(invalid(
                "metadata.project",
                format!("must not be set for kind {}", key.kind),
            ))
        }
        (Some(p), true) if p.is_empty() => {
            return Err(invalid("metadata.project", "must not be empty".into()))
        }
        _ => {}
    }
    Ok(key)
}

impl Mutation {
    /// The key the mutation addresses, validated.
    pub fn key(&self) -> Result<Key, StoreError> {
        match self {
            Mutation::Create(r) | Mutation::Update(r) => validate_key(r),
            Mutation::UpdateStatus { key, .. } | Mutation::Delete { key, .. } => Ok(key.clone()),
        }
    }
}

/// The current time as stored in `creationTimestamp`/`deletionTimestamp`: RFC 3339, UTC, whole seconds.
pub(crate) fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn check_rv(key: &Key, current: &Resource, expected: Option<&str>) -> Result<(), StoreError> {
    let Some(requested) = expected else {
        return Ok(());
    };
    let current_rv = current
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    if requested != current_rv {
        return Err(StoreError::Conflict {
            key: key.clone(),
            current: current_rv,
            requested: requested.to_string(),
        });
    }
    Ok(())
}

/// Decides what `m` does to `current` (the stored object under `m.key()`, if any). `now` is the timestamp to
/// use for creation/deletion.
pub(crate) fn plan(m: Mutation, current: Option<Resource>, now: &str) -> Result<Plan, StoreError> {
    let key = m.key()?;
    match m {
        Mutation::Create(mut obj) => {
            if current.is_some() {
                return Err(StoreError::AlreadyExists(key));
            }
            let meta = &mut obj.metadata;
            meta.uid = Some(uuid::Uuid::new_v4().to_string());
            meta.resource_version = None;
            meta.generation = Some(1);
            meta.creation_timestamp = Some(now.to_string());
            meta.deletion_timestamp = None;
            Ok(Plan::Put(obj, EventType::Added))
        }
        Mutation::Update(obj) => {
            let cur = current.ok_or_else(|| StoreError::NotFound(key.clone()))?;
            check_rv(&key, &cur, obj.metadata.resource_version.as_deref())?;
            let unchanged = cur.spec == obj.spec
                && cur.metadata.labels == obj.metadata.labels
                && cur.metadata.annotations == obj.metadata.annotations
                && cur.metadata.finalizers == obj.metadata.finalizers;
            if unchanged {
                return Ok(Plan::NoOp(cur));
            }
            let mut next = cur.clone();
            if next.spec != obj.spec {
                next.metadata.generation = Some(cur.metadata.generation.unwrap_or(0) + 1);
                next.spec = obj.spec;
            }
            next.metadata.labels = obj.metadata.labels;
            next.metadata.annotations = obj.metadata.annotations;
            next.metadata.finalizers = obj.metadata.finalizers;
            if next.metadata.deletion_timestamp.is_some() && next.metadata.finalizers.is_empty() {
                return Ok(Plan::Remove(next));
            }
            Ok(Plan::Put(next, EventType::Modified))
        }
        Mutation::UpdateStatus {
            status,
            expected_rv,
            ..
        } => {
            let cur = current.ok_or_else(|| StoreError::NotFound(key.clone()))?;
            check_rv(&key, &cur, expected_rv.as_deref())?;
            if cur.status == status {
                return Ok(Plan::NoOp(cur));
            }
            let mut next = cur;
            next.status = status;
            Ok(Plan::Put(next, EventType::Modified))
        }
        Mutation::Delete { expected_rv, .. } => {
            let cur = current.ok_or_else(|| StoreError::NotFound(key.clone()))?;
            check_rv(&key, &cur, expected_rv.as_deref())?;
            if cur.metadata.finalizers.is_empty() {
                return Ok(Plan::Remove(cur));
            }
            if cur.metadata.deletion_timestamp.is_some() {
                return Ok(Plan::NoOp(cur));
            }
            let mut next = cur;
            next.metadata.deletion_timestamp = Some(now.to_string());
            Ok(Plan::Put(next, EventType::Modified))
        }
    }
}

impl Plan {
    /// The object to persist with the new revision stamped on it, and the event (`None` for a no-op, whose
    /// object is returned unchanged).
    pub fn stamp(self, rev: u64) -> (Resource, Option<EventType>) {
        let (mut obj, ty) = match self {
            Plan::NoOp(obj) => return (obj, None),
            Plan::Put(obj, ty) => (obj, ty),
            Plan::Remove(obj) => (obj, EventType::Deleted),
        };
        obj.metadata.resource_version = Some(rev.to_string());
        (obj, Some(ty))
    }
}

/// The column values that identify a row: kind, organization, project (absent = empty string), name.
pub(crate) fn key_columns(key: &Key) -> (&'static str, &str, &str, &str) {
    (
        key.kind.as_str(),
        key.organization.as_deref().unwrap_or(""),
        key.project.as_deref().unwrap_or(""),
        key.name.as_str(),
    )
}

/// The string stored for an event type.
pub(crate) fn event_type_str(t: EventType) -> &'static str {
    match t {
        EventType::Added => "Added",
        EventType::Modified => "Modified",
        EventType::Deleted => "Deleted",
    }
}

/// Parses a stored event type.
pub(crate) fn parse_event_type(s: &str) -> Result<EventType, StoreError> {
    match s {
        "Added" => Ok(EventType::Added),
        "Modified" => Ok(EventType::Modified),
        "Deleted" => Ok(EventType::Deleted),
        other => Err(StoreError::Backend(format!(
            "corrupt event log: unknown event type {other:?}"
        ))),
    }
}

/// Parses a stored object body.
pub(crate) fn parse_body(body: &str) -> Result<Resource, StoreError> {
    serde_json::from_str(body)
        .map_err(|e| StoreError::Backend(format!("corrupt stored object: {e}")))
}

/// Serialises an object for storage.
pub(crate) fn body_of(r: &Resource) -> Result<String, StoreError> {
    serde_json::to_string(r)
        .map_err(|e| StoreError::Backend(format!("cannot serialise object: {e}")))
}

/// How many revisions pass between two compactions of the event log.
pub(crate) fn compaction_step(retention: u64) -> u64 {
    (retention / 16).max(1)
}
