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
