//! Shared by the reconcilers that hold a finalizer until what their object deployed is gone: keeping the
//! finalizer on a live object, listing and deleting the children, and the `Deleting` condition that says what a
//! deletion waits for.
//!
//! The order of a deletion is: workloads first (each ReleaseBinding's own finalizer removes its workload), then
//! the bindings, then the releases, then the owner. A Project deletes its Components and waits for them; a
//! Component deletes its bindings, waits until they are gone, then deletes its releases; an Environment deletes
//! the bindings that deploy into it.

use std::time::Duration;

use model::{ConditionStatus, Resource};
use runtime::conditions::{new_condition, set_condition};
use runtime::Action;
use serde_json::{json, Value};
use store::{Key, ListQuery, Store, StoreError};

use crate::status::{write_status, CONFLICT_RETRY};
use crate::Error;

/// How often a deletion re-checks whether what it waits for is gone (the watches usually wake it sooner).
pub(crate) const WAIT_RECHECK: Duration = Duration::from_millis(500);

/// Every object the query matches, across pages.
pub(crate) async fn list_all(
    store: &Store,
    mut query: ListQuery,
    owner: &Key,
) -> Result<Vec<Resource>, Error> {
    let mut items = Vec::new();
    loop {
        let page = store.list(&query).await.map_err(|source| Error::Store {
            what: "listing the children of",
            key: owner.clone(),
            source,
        })?;
        items.extend(page.items);
        match page.continue_token {
            Some(token) => query.continue_token = Some(token),
            None => return Ok(items),
        }
    }
}

/// Requests the deletion of each object not already being deleted (those gone meanwhile are fine).
pub(crate) async fn delete_each(store: &Store, items: &[Resource]) -> Result<(), Error> {
    for item in items
        .iter()
        .filter(|i| i.metadata.deletion_timestamp.is_none())
    {
        let Some(key) = Key::of(item) else { continue };
        match store.delete(&key, None).await {
            Ok(_) | Err(StoreError::NotFound(_)) => {}
            Err(source) => {
                return Err(Error::Store {
                    what: "deleting",
                    key,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Adds (`present`) or removes the finalizer `name`; `Some(action)` when it wrote (or lost a race), meaning
/// the reconcile should end with that action and see the object again.
pub(crate) async fn set_finalizer(
    store: &Store,
    key: &Key,
    obj: &Resource,
    name: &str,
    present: bool,
) -> Result<Option<Action>, Error> {
    let has = obj.metadata.finalizers.iter().any(|f| f == name);
    if has == present {
        return Ok(None);
    }
    let mut next = obj.clone();
    if present {
        next.metadata.finalizers.push(name.to_owned());
    } else {
        next.metadata.finalizers.retain(|f| f != name);
    }
    match store.update(next).await {
        // The update comes back through the watch (or, removed, the object is gone).
        Ok(_) | Err(StoreError::NotFound(_)) => Ok(Some(Action::await_change())),
        Err(StoreError::Conflict { .. }) => Ok(Some(Action::requeue(CONFLICT_RETRY))),
        Err(source) => Err(Error::Store {
            what: "updating the finalizers of",
            key: key.clone(),
            source,
        }),
    }
}

/// The names of `items`, for messages: the first few, then how many more.
pub(crate) fn names(items: &[Resource]) -> String {
    const SHOWN: usize = 5;
    let mut out = items
        .iter()
        .take(SHOWN)
        .map(|i| i.metadata.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        out.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    out
}

/// Writes the `Deleting` condition (status True, the reason and message saying what the deletion waits for)
/// and asks to be reconciled again soon.
pub(crate) async fn waiting(
    store: &Store,
    key: &Key,
    obj: &Resource,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let mut status = if obj.status.is_object() {
        obj.status.clone()
    } else {
        json!({})
    };
    set_condition(
        &mut status,
        new_condition(
            "Deleting",
            ConditionStatus::True,
            reason,
            message,
            obj.metadata.generation,
        ),
    );
    write_status(store, key, obj, status).await?;
    Ok(Action::requeue(WAIT_RECHECK))
}

/// A field of the spec as a string.
pub(crate) fn spec_str<'a>(obj: &'a Resource, field: &str) -> Option<&'a str> {
    obj.spec.get(field).and_then(Value::as_str)
}
