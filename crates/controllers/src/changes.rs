//! Data plane change notifications as reconcile triggers for the ReleaseBinding controller: when a driver says a
//! workload's status may have changed (a replica started, became ready, crashed), the bindings it concerns are
//! reconciled at once instead of waiting for a poll.
//!
//! A change to workload W queues W's own binding, and the bindings in W's organization and environment whose
//! `DependenciesReady` is `False` (they may be waiting for W). When a receiver lags (notifications were lost),
//! every binding that is not `Ready` is queued; `Ready` ones are caught by the periodic resync.

use std::sync::Arc;

use dataplane::{DataPlane, WorkloadId};
use futures_util::stream::{self, Stream, StreamExt};
use model::kinds::ReleaseBindingSpec;
use model::{ConditionStatus, Kind, Resource};
use runtime::Cache;
use store::Key;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::binding::{Drivers, Waiting, DEPENDENCIES_READY};

/// What one receiver reports.
enum Change {
    Workload(WorkloadId),
    /// This many notifications were lost.
    Lagged(u64),
}

/// The keys of the bindings to reconcile, from the change notifications of every driver in `drivers`.
pub(crate) fn binding_triggers(
    drivers: &Drivers,
    cache: Cache,
    waiting: Waiting,
) -> impl Stream<Item = Key> + Send {
    let mut planes: Vec<&Arc<dyn DataPlane>> = Vec::new();
    for d in [drivers.process.as_ref(), drivers.docker.as_ref()]
        .into_iter()
        .flatten()
    {
        // One driver may serve several data plane types (the no-op driver): subscribe once.
        if !planes.iter().any(|p| Arc::ptr_eq(p, d)) {
            planes.push(d);
        }
    }
    let receivers: Vec<_> = planes
        .into_iter()
        .map(|d| changes(d.changes()).boxed())
        .collect();
    // Notifications that arrive together are handled together, so a burst costs one pass over the cache.
    stream::select_all(receivers)
        .ready_chunks(4096)
        .flat_map(move |batch| stream::iter(keys_for_batch(&cache, &waiting, batch)))
}

/// The keys for a batch of notifications, without duplicates; at most one scan of the cache for the batch.
fn keys_for_batch(cache: &Cache, waiting: &Waiting, batch: Vec<Change>) -> Vec<Key> {
    let mut keys: Vec<Key> = Vec::new();
    let mut unnamed: Vec<WorkloadId> = Vec::new();
    let mut places: Vec<(String, String)> = Vec::new();
    for change in batch {
        match change {
            Change::Lagged(_) => return keys_for(cache, change),
            Change::Workload(id) => {
                let named = named_binding(&id);
                if cache.get(&named).is_some_and(|b| runs(&b, &id)) {
                    keys.push(named);
                } else {
                    unnamed.push(id.clone());
                }
                let place = (id.organization, id.environment);
                if !places.contains(&place) {
                    places.push(place);
                }
            }
        }
    }
    // Bindings waiting on a dependency in one of the batch's organization-environments.
    let waiters: Vec<Key> = waiting
        .lock()
        .map(|w| w.iter().cloned().collect())
        .unwrap_or_default();
    for k in waiters {
        let in_place = cache.get(&k).is_some_and(|r| {
            places.iter().any(|(org, env)| {
                r.metadata.organization.as_deref() == Some(org.as_str())
                    && spec_is(&r, "environment", env)
            })
        });
        if in_place {
            keys.push(k);
        }
    }
    // A workload whose binding is not named by convention: one scan for all of them.
    if !unnamed.is_empty() {
        let found = cache.filter(|r| unnamed.iter().any(|id| runs(r, id)));
        keys.extend(found.iter().filter_map(|r| Key::of(r)));
    }
    keys.sort_by(|a, b| {
        (&a.organization, &a.project, &a.name).cmp(&(&b.organization, &b.project, &b.name))
    });
    keys.dedup();
    keys
}

fn changes(rx: broadcast::Receiver<WorkloadId>) -> impl Stream<Item = Change> + Send {
    stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(id) => Some((Change::Workload(id), rx)),
            Err(RecvError::Lagged(n)) => Some((Change::Lagged(n), rx)),
            Err(RecvError::Closed) => None,
        }
    })
}

/// Whether the condition `type_` has `status`, read straight from the JSON (this runs over every cached binding).
fn condition_is(r: &Resource, type_: &str, status: ConditionStatus) -> bool {
    let want = match status {
        ConditionStatus::True => "True",
        ConditionStatus::False => "False",
        ConditionStatus::Unknown => "Unknown",
    };
    r.status
        .get("conditions")
        .and_then(|c| c.as_array())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(|t| t.as_str()) == Some(type_)
                    && c.get("status").and_then(|s| s.as_str()) == Some(want)
            })
        })
}

fn spec_is(r: &Resource, field: &str, value: &str) -> bool {
    r.spec.get(field).and_then(|v| v.as_str()) == Some(value)
}

/// Whether binding `r` runs workload `id`.
fn runs(r: &Resource, id: &WorkloadId) -> bool {
    r.metadata.organization.as_deref() == Some(id.organization.as_str())
        && r.metadata.project.as_deref() == Some(id.project.as_str())
        && spec_is(r, "component", &id.component)
        && spec_is(r, "environment", &id.environment)
}

/// The key a workload's binding has when it is named the usual way, `<component>-<environment>`.
fn named_binding(id: &WorkloadId) -> Key {
    Key {
        kind: Kind::ReleaseBinding,
        organization: Some(id.organization.clone()),
        project: Some(id.project.clone()),
        name: ReleaseBindingSpec::name_for(&id.component, &id.environment),
    }
}

fn keys_for(cache: &Cache, change: Change) -> Vec<Key> {
    match change {
        Change::Workload(id) => {
            // The binding of a workload is normally named <component>-<environment>; look it up by name first.
            let named = named_binding(&id);
            let own_by_name = cache.get(&named).is_some_and(|b| runs(&b, &id));
            let found = cache.filter(|r| {
                let same_place = r.metadata.organization.as_deref()
                    == Some(id.organization.as_str())
                    && spec_is(r, "environment", &id.environment);
                same_place
                    && (condition_is(r, DEPENDENCIES_READY, ConditionStatus::False)
                        || (!own_by_name && runs(r, &id)))
            });
            let mut keys: Vec<Key> = found.iter().filter_map(|r| Key::of(r)).collect();
            if own_by_name && !keys.contains(&named) {
                keys.push(named);
            }
            keys
        }
        Change::Lagged(n) => {
            tracing::warn!(
                lost = n,
                "data plane change notifications were lost; reconciling every binding that is not ready"
            );
            cache
                .filter(|r| !condition_is(r, "Ready", ConditionStatus::True))
                .iter()
                .filter_map(|r| Key::of(r))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn binding(project: &str, component: &str, env: &str, deps_ready: Option<bool>) -> Resource {
        let mut conditions = vec![];
        if let Some(ok) = deps_ready {
            conditions.push(
                json!({"type": DEPENDENCIES_READY, "status": if ok { "True" } else { "False" },
                "reason": "x", "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}),
            );
        }
        serde_json::from_value(json!({
            "apiVersion": "kiln.dev/v1", "kind": "ReleaseBinding",
            "metadata": {"name": format!("{component}-{env}"), "organization": "acme", "project": project},
            "spec": {"component": component, "environment": env, "release": format!("{component}-0123456789")},
            "status": {"conditions": conditions}
        }))
        .unwrap()
    }

    fn id(project: &str, component: &str, env: &str) -> WorkloadId {
        WorkloadId {
            organization: "acme".into(),
            project: project.into(),
            environment: env.into(),
            component: component.into(),
        }
    }

    #[test]
    fn a_change_queues_its_binding_and_the_consumers_waiting_in_its_environment() {
        let cache = Cache::of(vec![
            binding("shop", "api", "dev", None),
            binding("shop", "api", "prod", None),
            binding("shop", "web", "dev", Some(false)),
            binding("blog", "feed", "dev", Some(false)),
            binding("blog", "feed", "prod", Some(false)),
            binding("shop", "admin", "dev", Some(true)),
        ]);
        let mut names: Vec<String> = keys_for(&cache, Change::Workload(id("shop", "api", "dev")))
            .into_iter()
            .map(|k| format!("{}/{}", k.project.unwrap(), k.name))
            .collect();
        names.sort();
        assert_eq!(names, ["blog/feed-dev", "shop/api-dev", "shop/web-dev"]);
        assert!(keys_for(&cache, Change::Workload(id("shop", "gone", "staging"))).is_empty());
    }
}
