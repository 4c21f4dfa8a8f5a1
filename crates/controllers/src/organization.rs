//! The Organization controller: an organization has nothing to wait for yet, so it is marked `Ready`; the
//! moment it becomes ready is recorded as an event.

use std::sync::Arc;

use model::{ConditionStatus, Kind, Resource};
use runtime::conditions::{condition_status, new_condition, set_condition};
use runtime::{Action, Context, Controller, Reconciler, StoreSource};
use store::Store;

use crate::status::{record_event, write_status, EventType, Written};
use crate::Error;

/// Reconciles Organizations.
pub struct OrganizationController {
    store: Store,
}

impl OrganizationController {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// The controller, ready to run.
pub(crate) fn controller(store: Store) -> Controller<OrganizationController> {
    let source = StoreSource::new(store.clone(), Kind::Organization);
    Controller::new("organizations", source, OrganizationController::new(store)).concurrency(2)
}

impl Reconciler for OrganizationController {
    type Error = Error;

    async fn reconcile(&self, obj: Arc<Resource>, ctx: &Context) -> Result<Action, Error> {
        if obj.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        let was_ready = condition_status(&obj.status, "Ready") == Some(ConditionStatus::True);
        let mut status = obj.status.clone();
        let ready = new_condition(
            "Ready",
            ConditionStatus::True,
            "Ready",
            "the organization is ready",
            obj.metadata.generation,
        );
        set_condition(&mut status, ready);
        let written = write_status(&self.store, &ctx.key, &obj, status).await?;
        if written == Written::Updated && !was_ready {
            let message = format!("organization {} is ready", obj.metadata.name);
            record_event(&self.store, &ctx.key, EventType::Normal, "Ready", message).await;
        }
        Ok(written.action())
    }
}
