//! Where a controller's objects come from ([`Source`]) and where it keeps their latest copies ([`Cache`]).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use model::Resource;
use store::{Key, StoreError, WatchEvent};

/// A stream of changes, as the store's watch delivers them.
pub type EventStream = BoxStream<'static, Result<WatchEvent, StoreError>>;

/// Every current object of a source, read at one store revision.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub items: Vec<Resource>,
    /// Watch from this revision to see every change after the list.
    pub revision: u64,
}

/// A list-and-watch view of one set of objects (usually one kind, maybe narrowed to an organization). The store
/// implements it through `StoreSource`; tests implement it in memory.
pub trait Source: Send + Sync + 'static {
    /// Every current object.
    fn list(&self) -> BoxFuture<'_, Result<Listing, StoreError>>;

    /// The changes with a revision strictly greater than `from_revision`. Fails, or ends the stream, with
    /// [`StoreError::Expired`] when those changes are no longer kept; the caller then lists again.
    fn watch(&self, from_revision: u64) -> BoxFuture<'_, Result<EventStream, StoreError>>;
}

/// The latest copy of every object a controller follows, kept up to date by its watcher. Cheap to clone; all
/// clones share one map.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    objects: Arc<RwLock<HashMap<Key, Arc<Resource>>>>,
}

impl Cache {
    /// The latest copy of `key`, `None` if it does not exist (or was not seen yet).
    pub fn get(&self, key: &Key) -> Option<Arc<Resource>> {
        self.read().get(key).cloned()
    }

    /// Every cached object for which `keep` holds.
    pub fn filter(&self, keep: impl Fn(&Resource) -> bool) -> Vec<Arc<Resource>> {
        self.read().values().filter(|r| keep(r)).cloned().collect()
    }

    /// How many objects are cached.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no object is cached.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// A cache holding `items` (for testing the mappers and triggers that read a controller's cache).
    pub fn of(items: Vec<Resource>) -> Cache {
        let cache = Cache::default();
        cache.replace(items);
        cache
    }

    /// Replaces the whole content with a fresh listing; returns the keys of the listed objects, in listing order.
    pub(crate) fn replace(&self, items: Vec<Resource>) -> Vec<Key> {
        let fresh: Vec<(Key, Arc<Resource>)> = items
            .into_iter()
            .filter_map(|r| Some((Key::of(&r)?, Arc::new(r))))
            .collect();
        let keys = fresh.iter().map(|(k, _)| k.clone()).collect();
        *self.objects.write().unwrap_or_else(PoisonError::into_inner) = fresh.into_iter().collect();
        keys
    }

    /// Applies one watch event; returns the key of the changed object.
    pub(crate) fn apply(&self, event: WatchEvent) -> Option<Key> {
        let key = Key::of(&event.object)?;
        let mut objects = self.objects.write().unwrap_or_else(PoisonError::into_inner);
        match event.type_ {
            store::EventType::Deleted => {
                objects.remove(&key);
            }
            store::EventType::Added | store::EventType::Modified => {
                objects.insert(key.clone(), Arc::new(event.object));
            }
        }
        Some(key)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Key, Arc<Resource>>> {
        // A panic while holding the lock cannot leave the map half-updated (each write is one insert, remove or
        // swap), so a poisoned lock is still safe to read.
        self.objects.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A cache holding `items` (objects of unknown kind are skipped), e.g. to test a [`crate::Mapper`].
impl FromIterator<Resource> for Cache {
    fn from_iter<I: IntoIterator<Item = Resource>>(items: I) -> Self {
        let cache = Cache::default();
        cache.replace(items.into_iter().collect());
        cache
    }
}
