//! What a reconciler is: the [`Reconciler`] trait, the [`Action`] it returns and the [`Context`] it is given.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use model::Resource;
use store::Key;

use crate::{Backoff, Cache};

/// What the controller should do with an object after a reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    requeue_after: Option<Duration>,
}

impl Action {
    /// Reconcile the object again after `after`, even if it does not change (an earlier change still wins).
    pub fn requeue(after: Duration) -> Self {
        Self {
            requeue_after: Some(after),
        }
    }

    /// Reconcile the object again only when it (or something mapped to it) changes.
    pub fn await_change() -> Self {
        Self {
            requeue_after: None,
        }
    }

    /// The requeue delay, `None` for [`Action::await_change`].
    pub fn requeue_after(&self) -> Option<Duration> {
        self.requeue_after
    }
}

/// What the controller tells a reconciler about the reconcile at hand.
#[derive(Clone)]
pub struct Context {
    /// The controller's name, for log lines and events.
    pub controller: Arc<str>,
    /// The key of the object being reconciled.
    pub key: Key,
    /// How many reconciles of this object failed in a row before this one.
    pub failures: u32,
    /// The controller's error backoff.
    pub backoff: Backoff,
    /// The controller's cache of the objects it follows (the latest copy of each).
    pub cache: Cache,
}

impl Context {
    /// The delay before retrying this object if this reconcile fails: `base * 2^failures`, capped.
    pub fn backoff_delay(&self) -> Duration {
        self.backoff.delay(self.failures)
    }
}

/// Brings the world in line with one object. Reconciles must be idempotent: they may run any number of times
/// for one version of an object, and they only ever see the latest version.
pub trait Reconciler: Send + Sync + 'static {
    /// The reconciler's own error type.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reconciles `obj`, the newest cached version of `ctx.key`.
    fn reconcile(
        &self,
        obj: Arc<Resource>,
        ctx: &Context,
    ) -> impl Future<Output = Result<Action, Self::Error>> + Send;

    /// Decides what follows a failed reconcile. The default retries with the controller's exponential backoff
    /// (see [`Context::backoff_delay`]); a reconciler may instead wait for a change (for errors a retry cannot
    /// fix) or pick its own delay. Consecutive failures are counted either way and reset by a success.
    fn error_policy(&self, obj: &Resource, error: &Self::Error, ctx: &Context) -> Action {
        let _ = (obj, error);
        Action::requeue(ctx.backoff_delay())
    }
}
