//! The store's request and response types: keys, list and watch queries, pages, watch events, options.

use std::fmt;

use model::{Kind, Resource};

/// Identifies one object. `organization` is set for organization- and project-scoped kinds, `project` for
/// project-scoped kinds; both are `None` for cluster-scoped kinds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub kind: Kind,
    pub organization: Option<String>,
    pub project: Option<String>,
    pub name: String,
}

impl Key {
    /// The key of a resource, from its kind and metadata (`None` if `kind` is not a known kind).
    pub fn of(r: &Resource) -> Option<Key> {
        Some(Key {
            kind: r.kind()?,
            organization: r.metadata.organization.clone(),
            project: r.metadata.project.clone(),
            name: r.metadata.name.clone(),
        })
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.kind)?;
        if let Some(o) = &self.organization {
            write!(f, "{o}/")?;
        }
        if let Some(p) = &self.project {
            write!(f, "{p}/")?;
        }
        f.write_str(&self.name)
    }
}

/// What to list. `organization`/`project` narrow the scope; `None` means all (the caller filters by access).
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub kind: Option<Kind>,
    pub organization: Option<String>,
    pub project: Option<String>,
    /// A label selector in the Kubernetes syntax (`a=b,c!=d,e in (x,y),!f,g`).
    pub selector: Option<String>,
    /// At most this many items; `None` for all.
    pub limit: Option<usize>,
    /// The `continue_token` of the previous page.
    pub continue_token: Option<String>,
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub items: Vec<Resource>,
    /// Present when more items follow; pass it back as `ListQuery::continue_token`.
    pub continue_token: Option<String>,
    /// The store revision the list was read at; watch from it to follow changes after the list.
    pub revision: u64,
}

/// What to watch. `organization`/`project` narrow the scope as in [`ListQuery`].
#[derive(Debug, Clone, Default)]
pub struct WatchQuery {
    pub kind: Option<Kind>,
    pub organization: Option<String>,
    pub project: Option<String>,
    /// Deliver events with a revision strictly greater than this; `None` starts at the current revision.
    pub from_revision: Option<u64>,
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One committed change, as delivered to watchers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub type_: EventType,
    pub revision: u64,
    /// The object after the change; for `Deleted`, the last state before removal.
    pub object: Resource,
}

/// The outcome of a delete.
#[derive(Debug, Clone)]
pub enum Deleted {
    /// The object is gone.
    Gone(Resource),
    /// Finalizers remain: `deletionTimestamp` is set and the object stays until they are cleared.
    Pending(Resource),
}

/// Store tuning.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many events the log keeps before compaction; a watch older than that gets `Expired`.
    pub event_retention: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            event_retention: 100_000,
        }
    }
}
