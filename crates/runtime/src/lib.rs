//! Controller machinery in the kube-runtime manner, separate from the reconcilers that use it.
//!
//! A [`Controller`] follows a [`Source`] (list, then watch from the list's revision; re-list when the watch
//! expires), keeps the latest copy of every object in a [`Cache`], and feeds the keys of changed objects into a
//! de-duplicating work queue. Workers (at most [`Controller::concurrency`] at once) take keys from the queue, read
//! the *latest* object from the cache and hand it to the [`Reconciler`], which answers with an [`Action`]:
//! requeue after a delay, or wait for the next change. Failures are retried with per-object exponential
//! [`Backoff`].
//!
//! Architecture invariants:
//! - Never two reconciles of one object at once: a key that changes while it is being reconciled is queued
//!   again only after the running reconcile finished.
//! - Reconciles are level-triggered: the reconciler sees the newest cached object, never an event; an object
//!   that is gone from the cache (deleted) is not reconciled.
//! - The machinery never writes to the store itself; only reconcilers (and the [`finalizer()`] helper) do.

mod action;
mod backoff;
pub mod conditions;
mod controller;
pub mod finalizer;
mod queue;
mod source;
mod stats;
mod store_source;
mod watcher;

pub use action::{Action, Context, Reconciler};
pub use backoff::Backoff;
pub use controller::{Controller, Mapper};
pub use finalizer::{finalizer, Event, FinalizerError, Updater};
pub use source::{Cache, EventStream, Listing, Source};
pub use stats::{render_prometheus, ControllerStats, StatsSnapshot};
pub use store_source::StoreSource;

/// Formats an error with its chain of sources, `outer: inner: innermost`, for log lines.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}
