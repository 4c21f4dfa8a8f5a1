//! Shared by the reconcilers: writing a status only when it changed, and recording events on transitions.

use std::time::Duration;

use model::Resource;
use runtime::Action;
use serde_json::Value;
use store::{Key, Store, StoreError};

use crate::Error;

/// How soon to retry after a status write lost a race (the watch usually brings the newer object sooner).
pub(crate) const CONFLICT_RETRY: Duration = Duration::from_millis(200);

/// The outcome of [`write_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// The status was already as computed: nothing written.
    Unchanged,
    Updated,
    /// The object changed (or vanished) since it was read: reconcile again.
    Stale,
}

impl Written {
    /// The action that follows a reconcile that ended with this write.
    pub(crate) fn action(self) -> Action {
        match self {
            Written::Unchanged | Written::Updated => Action::await_change(),
            Written::Stale => Action::requeue(CONFLICT_RETRY),
        }
    }
}

/// Writes `status` to `obj` unless it equals the current one, based on the resourceVersion read.
pub(crate) async fn write_status(
    store: &Store,
    key: &Key,
    obj: &Resource,
    status: Value,
) -> Result<Written, Error> {
    if status == obj.status {
        return Ok(Written::Unchanged);
    }
    match store
        .update_status(key, status, obj.metadata.resource_version.as_deref())
        .await
    {
        Ok(_) => Ok(Written::Updated),
        Err(StoreError::Conflict { .. }) => {
            tracing::debug!(%key, "status write conflicted, retrying");
            Ok(Written::Stale)
        }
        // Deleted since it was read: its deletion event follows and there is nothing left to report on.
        Err(StoreError::NotFound(_)) => Ok(Written::Unchanged),
        Err(source) => Err(Error::Store {
            what: "writing the status of",
            key: key.clone(),
            source,
        }),
    }
}

/// Records an event about `key`. An event is informative only, so a
/// failure is logged rather than failing the reconcile.
pub(crate) async fn record_event(
    store: &Store,
    key: &Key,
    type_: EventType,
    reason: &str,
    message: String,
) {
    let event = store::Event {
        time: jiff::Timestamp::now(),
        kind: key.kind.as_str().to_owned(),
        organization: key.organization.clone(),
        project: key.project.clone(),
        name: key.name.clone(),
        type_: type_.as_str().to_owned(),
        reason: reason.to_owned(),
        message,
    };
    if let Err(e) = store.record_event(event).await {
        tracing::warn!(%key, reason, error = %e, "recording an event failed");
    }
}

/// The type of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}
