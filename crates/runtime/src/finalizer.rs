//! The finalizer helper in the kube-runtime manner: keeps a finalizer on the object while it lives, and turns a
//! reconcile into either [`Event::Apply`] or, once deletion was requested, [`Event::Cleanup`] followed by the
//! removal of the finalizer (which lets the store delete the object).

use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use model::Resource;
use store::StoreError;

use crate::Action;

/// Writes an object's spec, labels, annotations and finalizers, with the `resourceVersion` precondition. The
/// store implements it; tests fake it.
pub trait Updater: Send + Sync {
    /// Updates `obj`; fails with [`StoreError::Conflict`] if its `resourceVersion` is no longer current.
    fn update(&self, obj: Resource) -> BoxFuture<'_, Result<Resource, StoreError>>;
}

/// What the reconciler is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The object lives (and carries the finalizer): bring the world in line with it.
    Apply(Arc<Resource>),
    /// Deletion was requested: release what the object owns. The finalizer is removed when this succeeds, so it
    /// must be idempotent and must succeed for things already gone.
    Cleanup(Arc<Resource>),
}

/// Why [`finalizer()`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FinalizerError<E: std::error::Error + 'static> {
    #[error("apply failed")]
    ApplyFailed(#[source] E),
    #[error("cleanup failed")]
    CleanupFailed(#[source] E),
    #[error("adding the finalizer failed")]
    AddFinalizer(#[source] StoreError),
    #[error("removing the finalizer failed")]
    RemoveFinalizer(#[source] StoreError),
}

/// Runs `reconcile` under the finalizer `name`:
/// - the object lives without the finalizer: adds it (one update) and waits for the change that update causes;
/// - the object lives with it: `reconcile(Event::Apply(obj))`;
/// - deletion was requested and the finalizer is present: `reconcile(Event::Cleanup(obj))`, then removes the
///   finalizer and returns the cleanup's action;
/// - deletion was requested and the finalizer is gone: nothing to do.
///
/// Both updates carry the object's `resourceVersion`, so a concurrent change fails them with a conflict (and the
/// object is reconciled again at its newer version).
pub async fn finalizer<U, F, Fut, E>(
    api: &U,
    name: &str,
    obj: Arc<Resource>,
    reconcile: F,
) -> Result<Action, FinalizerError<E>>
where
    U: Updater + ?Sized,
    F: FnOnce(Event) -> Fut,
    Fut: Future<Output = Result<Action, E>>,
    E: std::error::Error + 'static,
{
    let has_finalizer = obj.metadata.finalizers.iter().any(|f| f == name);
    let deleting = obj.metadata.deletion_timestamp.is_some();
    match (deleting, has_finalizer) {
        (false, false) => {
            let mut updated = Resource::clone(&obj);
            updated.metadata.finalizers.push(name.to_owned());
            api.update(updated)
                .await
                .map_err(FinalizerError::AddFinalizer)?;
            Ok(Action::await_change())
        }
        (false, true) => reconcile(Event::Apply(obj))
            .await
            .map_err(FinalizerError::ApplyFailed),
        (true, true) => {
            let action = reconcile(Event::Cleanup(obj.clone()))
                .await
                .map_err(FinalizerError::CleanupFailed)?;
            let mut updated = Resource::clone(&obj);
            updated.metadata.finalizers.retain(|f| f != name);
            api.update(updated)
                .await
                .map_err(FinalizerError::RemoveFinalizer)?;
            Ok(action)
        }
        (true, false) => Ok(Action::await_change()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use model::{Kind, ObjectMeta, API_VERSION};
    use store::Key;

    use super::*;

    const NAME: &str = "kiln.dev/test";

    /// Records updates; fails them all when `fail` is set.
    #[derive(Default)]
    struct Fake {
        updates: Mutex<Vec<Resource>>,
        fail: bool,
    }

    impl Updater for Fake {
        fn update(&self, obj: Resource) -> BoxFuture<'_, Result<Resource, StoreError>> {
            Box::pin(async move {
                if self.fail {
                    let key = Key::of(&obj).ok_or_else(|| StoreError::Backend("no kind".into()))?;
                    return Err(StoreError::Conflict {
                        key,
                        current: "2".into(),
                        requested: "1".into(),
                    });
                }
                self.updates.lock().unwrap().push(obj.clone());
                Ok(obj)
            })
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("boom")]
    struct Boom;

    fn org(finalizers: &[&str], deleting: bool) -> Arc<Resource> {
        Arc::new(Resource {
            api_version: API_VERSION.into(),
            kind: Kind::Organization.as_str().into(),
            metadata: ObjectMeta {
                name: "acme".into(),
                resource_version: Some("1".into()),
                finalizers: finalizers.iter().map(|f| f.to_string()).collect(),
                deletion_timestamp: deleting.then(|| "2024-01-01T00:00:00Z".into()),
                ..ObjectMeta::default()
            },
            spec: serde_json::Value::Null,
            status: serde_json::Value::Null,
        })
    }

    /// Runs the helper and returns its result and the event the reconciler got.
    async fn run(
        api: &Fake,
        obj: Arc<Resource>,
        result: Result<Action, Boom>,
    ) -> (Result<Action, String>, Option<Event>) {
        let seen = Mutex::new(None);
        let out = finalizer(api, NAME, obj, |ev| {
            *seen.lock().unwrap() = Some(ev);
            async { result }
        })
        .await;
        (
            out.map_err(|e| crate::ErrorChain(&e).to_string()),
            seen.into_inner().unwrap(),
        )
    }

    #[tokio::test]
    async fn adds_the_finalizer_first_without_reconciling() {
        let api = Fake::default();
        let (out, seen) = run(
            &api,
            org(&["other"], false),
            Ok(Action::requeue(Duration::from_secs(1))),
        )
        .await;
        assert_eq!(out, Ok(Action::await_change()));
        assert_eq!(seen, None);
        let updates = api.updates.lock().unwrap();
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].metadata.finalizers, ["other", NAME]);
        assert_eq!(
            updates[0].metadata.resource_version.as_deref(),
            Some("1"),
            "update must carry the rv"
        );
    }

    #[tokio::test]
    async fn applies_a_live_object_that_has_the_finalizer() {
        let api = Fake::default();
        let obj = org(&[NAME], false);
        let action = Action::requeue(Duration::from_secs(9));
        let (out, seen) = run(&api, obj.clone(), Ok(action)).await;
        assert_eq!(out, Ok(action));
        assert_eq!(seen, Some(Event::Apply(obj)));
        assert!(api.updates.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn cleans_up_then_removes_only_its_own_finalizer() {
        let api = Fake::default();
        let obj = org(&["other", NAME], true);
        let (out, seen) = run(&api, obj.clone(), Ok(Action::await_change())).await;
        assert_eq!(out, Ok(Action::await_change()));
        assert_eq!(seen, Some(Event::Cleanup(obj)));
        let updates = api.updates.lock().unwrap();
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].metadata.finalizers, ["other"]);
    }

    #[tokio::test]
    async fn a_failed_cleanup_keeps_the_finalizer() {
        let api = Fake::default();
        let (out, _) = run(&api, org(&[NAME], true), Err(Boom)).await;
        assert_eq!(out, Err("cleanup failed: boom".to_owned()));
        assert!(api.updates.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_apply_and_failed_updates_are_reported() {
        let api = Fake::default();
        let (out, _) = run(&api, org(&[NAME], false), Err(Boom)).await;
        assert_eq!(out, Err("apply failed: boom".to_owned()));

        let api = Fake {
            fail: true,
            ..Fake::default()
        };
        let (out, _) = run(&api, org(&[], false), Ok(Action::await_change())).await;
        assert!(out
            .unwrap_err()
            .starts_with("adding the finalizer failed: "));
        let (out, _) = run(&api, org(&[NAME], true), Ok(Action::await_change())).await;
        assert!(out
            .unwrap_err()
            .starts_with("removing the finalizer failed: "));
    }

    #[tokio::test]
    async fn nothing_to_do_for_a_deleting_object_without_the_finalizer() {
        let api = Fake::default();
        let (out, seen) = run(
            &api,
            org(&["other"], true),
            Ok(Action::requeue(Duration::from_secs(1))),
        )
        .await;
        assert_eq!(out, Ok(Action::await_change()));
        assert_eq!(seen, None);
        assert!(api.updates.lock().unwrap().is_empty());
    }
}
