//! The real [`Source`] and [`Updater`]: the resource store, read through `list` and `watch`, written through
//! `update`.

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use model::{Kind, Resource};
use store::{ListQuery, Store, StoreError, WatchQuery};

use crate::{EventStream, Listing, Source, Updater};

/// The objects of one kind in the store, optionally narrowed to one organization (and project).
#[derive(Debug, Clone)]
pub struct StoreSource {
    store: Store,
    kind: Kind,
    organization: Option<String>,
    project: Option<String>,
}

impl StoreSource {
    /// Every object of `kind`.
    pub fn new(store: Store, kind: Kind) -> Self {
        Self {
            store,
            kind,
            organization: None,
            project: None,
        }
    }

    /// Only the objects of `kind` in `organization` (and `project`, when given).
    pub fn scoped(store: Store, kind: Kind, organization: &str, project: Option<&str>) -> Self {
        Self {
            store,
            kind,
            organization: Some(organization.to_owned()),
            project: project.map(str::to_owned),
        }
    }
}

impl Source for StoreSource {
    fn list(&self) -> BoxFuture<'_, Result<Listing, StoreError>> {
        Box::pin(async move {
            let mut query = ListQuery {
                kind: Some(self.kind),
                organization: self.organization.clone(),
                project: self.project.clone(),
                ..ListQuery::default()
            };
            let first = self.store.list(&query).await?;
            // Later pages may be read at later revisions; watching from the first page's revision replays
            // whatever changed meanwhile, so the cache still ends up at the newest state.
            let revision = first.revision;
            let mut items = first.items;
            let mut next = first.continue_token;
            while let Some(token) = next {
                query.continue_token = Some(token);
                let page = self.store.list(&query).await?;
                items.extend(page.items);
                next = page.continue_token;
            }
            Ok(Listing { items, revision })
        })
    }

    fn watch(&self, from_revision: u64) -> BoxFuture<'_, Result<EventStream, StoreError>> {
        Box::pin(async move {
            let query = WatchQuery {
                kind: Some(self.kind),
                organization: self.organization.clone(),
                project: self.project.clone(),
                from_revision: Some(from_revision),
            };
            Ok(self.store.watch(&query).await?.boxed())
        })
    }
}

impl Updater for Store {
    fn update(&self, obj: Resource) -> BoxFuture<'_, Result<Resource, StoreError>> {
        Box::pin(Store::update(self, obj))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::StreamExt;
    use model::{ObjectMeta, API_VERSION};
    use serde_json::Value;
    use store::{Deleted, EventType, Key, Options};

    use super::*;
    use crate::{finalizer, Action, Event};

    fn resource(kind: Kind, org: Option<&str>, name: &str) -> Resource {
        Resource {
            api_version: API_VERSION.into(),
            kind: kind.as_str().into(),
            metadata: ObjectMeta {
                name: name.into(),
                organization: org.map(Into::into),
                ..ObjectMeta::default()
            },
            spec: Value::Null,
            status: Value::Null,
        }
    }

    async fn open(dir: &tempfile::TempDir, event_retention: u64) -> Store {
        let path = dir.path().join("kiln.db");
        Store::open_sqlite(&path, Options { event_retention })
            .await
            .expect("open sqlite")
    }

    #[tokio::test]
    async fn lists_then_watches_and_an_old_revision_is_expired() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 2).await;
        for i in 0..5 {
            store
                .create(resource(Kind::Organization, None, &format!("o{i}")))
                .await
                .unwrap();
        }
        store
            .create(resource(Kind::Project, Some("o0"), "p"))
            .await
            .unwrap();

        let orgs = StoreSource::new(store.clone(), Kind::Organization);
        let listing = orgs.list().await.unwrap();
        assert_eq!(listing.items.len(), 5, "only the kind asked for");
        assert_eq!(listing.revision, 6);
        let err = orgs
            .watch(0)
            .await
            .err()
            .expect("revision 0 was compacted away");
        assert!(matches!(err, StoreError::Expired { .. }), "{err}");

        let mut events = orgs.watch(listing.revision).await.unwrap();
        store
            .create(resource(Kind::Project, Some("o0"), "q"))
            .await
            .unwrap();
        store
            .create(resource(Kind::Organization, None, "late"))
            .await
            .unwrap();
        let event = events.next().await.unwrap().unwrap();
        assert_eq!(
            (event.type_, event.object.metadata.name.as_str()),
            (EventType::Added, "late")
        );

        let projects = StoreSource::scoped(store.clone(), Kind::Project, "o0", None);
        let names: Vec<String> = projects
            .list()
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|r| r.metadata.name)
            .collect();
        assert_eq!(names, ["p", "q"]);
        let elsewhere = StoreSource::scoped(store, Kind::Project, "o1", None);
        assert!(elsewhere.list().await.unwrap().items.is_empty());
    }

    #[tokio::test]
    async fn the_finalizer_helper_holds_a_deletion_until_cleanup_succeeded() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 1000).await;
        let key = Key {
            kind: Kind::Organization,
            organization: None,
            project: None,
            name: "acme".into(),
        };
        store
            .create(resource(Kind::Organization, None, "acme"))
            .await
            .unwrap();
        let never = |_: Event| async { Ok::<_, StoreError>(Action::await_change()) };

        let obj = Arc::new(store.get(&key).await.unwrap());
        assert_eq!(
            finalizer(&store, "kiln.dev/t", obj, never).await.unwrap(),
            Action::await_change()
        );
        assert_eq!(
            store.get(&key).await.unwrap().metadata.finalizers,
            ["kiln.dev/t"]
        );

        let Deleted::Pending(deleting) = store.delete(&key, None).await.unwrap() else {
            panic!("the finalizer must hold the deletion");
        };
        let mut seen = None;
        let out = finalizer(&store, "kiln.dev/t", Arc::new(deleting), |ev| {
            seen = Some(ev);
            async { Ok::<_, StoreError>(Action::await_change()) }
        })
        .await;
        assert!(out.is_ok(), "{out:?}");
        assert!(matches!(seen, Some(Event::Cleanup(_))));
        assert!(
            matches!(store.get(&key).await, Err(StoreError::NotFound(_))),
            "gone once cleaned up"
        );
    }
}
