//! The Environment controller: an environment is `Ready` when the DataPlane it names exists
//! (`DataPlaneNotFound` otherwise), and its finalizer `kiln.dev/environment` holds a deleted environment until
//! every ReleaseBinding deploying into it (in any project of its organization) is gone, each binding's own
//! finalizer removing its workload first. Meanwhile the `Deleting` condition says what it waits for.

use std::sync::Arc;

use model::kinds::EnvironmentSpec;
use model::{ConditionStatus, Kind, Resource};
use runtime::conditions::{condition_status, new_condition, set_condition};
use runtime::{Action, Cache, Context, Controller, Reconciler, StoreSource};
use store::{Key, ListQuery, Store, StoreError};

use crate::cleanup::{self, delete_each, list_all, set_finalizer, spec_str};
use crate::status::{record_event, write_status, EventType, Written};
use crate::Error;

/// Finalizer that holds an environment until the bindings deploying into it are gone.
pub const FINALIZER: &str = "kiln.dev/environment";

/// Reconciles Environments.
pub struct EnvironmentController {
    store: Store,
}

/// The controller, ready to run: Environments, re-checked when a DataPlane changes and, while deleting, when a
/// ReleaseBinding into them changes or goes.
pub(crate) fn controller(store: Store) -> Controller<EnvironmentController> {
    let environments = StoreSource::new(store.clone(), Kind::Environment);
    let planes = StoreSource::new(store.clone(), Kind::DataPlane);
    let bindings = StoreSource::new(store.clone(), Kind::ReleaseBinding);
    Controller::new(
        "environments",
        environments,
        EnvironmentController { store },
    )
    .concurrency(2)
    .watches(planes, environments_on_plane)
    .watches(bindings, environment_of_binding)
}

fn environments_on_plane(plane: &Resource, environments: &Cache) -> Vec<Key> {
    let org = &plane.metadata.organization;
    let name = plane.metadata.name.as_str();
    environments
        .filter(|e| &e.metadata.organization == org && spec_str(e, "dataPlaneRef") == Some(name))
        .iter()
        .filter_map(|e| Key::of(e))
        .collect()
}

/// The environment a binding deploys into, when it is being deleted (and so waits for its bindings to go).
fn environment_of_binding(binding: &Resource, environments: &Cache) -> Vec<Key> {
    let Some(env) = spec_str(binding, "environment") else {
        return Vec::new();
    };
    let key = Key {
        kind: Kind::Environment,
        organization: binding.metadata.organization.clone(),
        project: None,
        name: env.to_owned(),
    };
    let deleting = environments
        .get(&key)
        .is_some_and(|e| e.metadata.deletion_timestamp.is_some());
    if deleting {
        vec![key]
    } else {
        Vec::new()
    }
}

impl EnvironmentController {
    /// The ReleaseBindings of the organization that deploy into the environment.
    async fn bindings(&self, env: &Resource, key: &Key) -> Result<Vec<Resource>, Error> {
        let query = ListQuery {
            kind: Some(Kind::ReleaseBinding),
            organization: env.metadata.organization.clone(),
            ..ListQuery::default()
        };
        let mut items = list_all(&self.store, query, key).await?;
        items.retain(|b| spec_str(b, "environment") == Some(env.metadata.name.as_str()));
        Ok(items)
    }

    async fn clean_up(&self, obj: &Resource, key: &Key) -> Result<Action, Error> {
        let bindings = self.bindings(obj, key).await?;
        if !bindings.is_empty() {
            delete_each(&self.store, &bindings).await?;
            let message = format!(
                "waiting for {} release binding(s) to remove their workloads: {}",
                bindings.len(),
                cleanup::names(&bindings)
            );
            return cleanup::waiting(&self.store, key, obj, "RemovingBindings", message).await;
        }
        Ok(set_finalizer(&self.store, key, obj, FINALIZER, false)
            .await?
            .unwrap_or_else(Action::await_change))
    }

    async fn plane_exists(&self, org: &Option<String>, name: &str) -> Result<bool, Error> {
        let key = Key {
            kind: Kind::DataPlane,
            organization: org.clone(),
            project: None,
            name: name.to_owned(),
        };
        match self.store.get(&key).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(source) => Err(Error::Store {
                what: "reading",
                key,
                source,
            }),
        }
    }
}

impl Reconciler for EnvironmentController {
    type Error = Error;

    async fn reconcile(&self, obj: Arc<Resource>, ctx: &Context) -> Result<Action, Error> {
        if obj.metadata.deletion_timestamp.is_some() {
            if !obj.metadata.finalizers.iter().any(|f| f == FINALIZER) {
                return Ok(Action::await_change());
            }
            return self.clean_up(&obj, &ctx.key).await;
        }
        if let Some(action) = set_finalizer(&self.store, &ctx.key, &obj, FINALIZER, true).await? {
            return Ok(action);
        }
        let generation = obj.metadata.generation;
        let (status, reason, message) = match model::typed_spec::<EnvironmentSpec>(&obj) {
            Err(e) => (ConditionStatus::False, "InvalidSpec", e.to_string()),
            Ok(spec) => {
                let plane = spec.data_plane_ref;
                if self
                    .plane_exists(&obj.metadata.organization, &plane)
                    .await?
                {
                    (
                        ConditionStatus::True,
                        "Ready",
                        format!("data plane {plane} found"),
                    )
                } else {
                    (
                        ConditionStatus::False,
                        "DataPlaneNotFound",
                        format!("data plane {plane} does not exist"),
                    )
                }
            }
        };
        let was = condition_status(&obj.status, "Ready");
        let mut next = if obj.status.is_object() {
            obj.status.clone()
        } else {
            serde_json::json!({})
        };
        set_condition(
            &mut next,
            new_condition("Ready", status, reason, message.clone(), generation),
        );
        let written = write_status(&self.store, &ctx.key, &obj, next).await?;
        if written == Written::Updated && was != Some(status) {
            let type_ = match status {
                ConditionStatus::True => EventType::Normal,
                _ => EventType::Warning,
            };
            record_event(&self.store, &ctx.key, type_, reason, message).await;
        }
        Ok(written.action())
    }
}
