//! Kiln's controllers: one reconciler per kind, built on the `runtime` crate, started together by
//! [`spawn_all`].
//!
//! Architecture invariants:
//! - Controllers write only `status` (through `Store::update_status`, based on the resourceVersion they read,
//!   so a concurrent change makes the write fail and the object is reconciled again), and only when it changed.
//! - A malformed spec never fails a reconcile: it becomes a condition that names the field.
//! - Child failures surface on the parent's conditions.

pub mod binding;
mod changes;
mod cleanup;
pub mod component;
pub mod environment;
pub mod jobs;
mod organization;
mod project;
pub mod schedule;
mod status;
pub mod workspace;

use std::sync::Arc;

use runtime::ControllerStats;
use store::{Key, Store, StoreError};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use binding::{BindingController, Drivers, Mesh, MeshRoute, MeshTarget};
pub use environment::EnvironmentController;
pub use organization::OrganizationController;
pub use project::ProjectController;

/// Why a reconcile failed (a store operation failed; everything else becomes a condition).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {key}")]
    Store {
        /// What was being done, e.g. `writing the status of`.
        what: &'static str,
        key: Key,
        #[source]
        source: StoreError,
    },
}

/// The running controllers: their stats, and a way to wait for them to stop.
pub struct Controllers {
    stats: Vec<Arc<ControllerStats>>,
    tasks: JoinSet<()>,
}

impl Controllers {
    /// Live stats of every controller, e.g. for `runtime::render_prometheus`.
    pub fn stats(&self) -> &[Arc<ControllerStats>] {
        &self.stats
    }

    /// Waits until every controller stopped (after the shutdown signal, once their reconciles in flight ended).
    pub async fn wait(mut self) {
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a controller task failed");
            }
        }
    }
}

/// Starts every controller on the current tokio runtime. They run until `shutdown` becomes `true` (or its sender
/// is dropped); then [`Controllers::wait`] returns once their reconciles in flight ended.
pub fn spawn_all(store: Store, drivers: Drivers, shutdown: watch::Receiver<bool>) -> Controllers {
    spawn_all_with_mesh(store, drivers, None, shutdown)
}

/// [`spawn_all`], with the mesh that serves consumers' dependency addresses (without one, dependencies on
/// components are reported as not routed).
pub fn spawn_all_with_mesh(
    store: Store,
    drivers: Drivers,
    mesh: Option<Arc<dyn Mesh>>,
    shutdown: watch::Receiver<bool>,
) -> Controllers {
    spawn_all_with(
        store,
        drivers,
        mesh,
        jobs::Provisioners::default(),
        shutdown,
    )
}

/// [`spawn_all_with_mesh`], with the registry of provisioners that workspace builds are queued for.
pub fn spawn_all_with(
    store: Store,
    drivers: Drivers,
    mesh: Option<Arc<dyn Mesh>>,
    provisioners: jobs::Provisioners,
    shutdown: watch::Receiver<bool>,
) -> Controllers {
    let mut tasks = JoinSet::new();
    let organizations = organization::controller(store.clone());
    let projects = project::controller(store.clone());
    let components = component::controller(store.clone());
    let environments = environment::controller(store.clone());
    let workspaces = workspace::controller(store.clone(), provisioners);
    let bindings = binding::controller(store, drivers, mesh);
    let stats = vec![
        organizations.stats(),
        projects.stats(),
        components.stats(),
        environments.stats(),
        bindings.stats(),
        workspaces.stats(),
    ];
    tasks.spawn(organizations.run(shutdown.clone()));
    tasks.spawn(projects.run(shutdown.clone()));
    tasks.spawn(components.run(shutdown.clone()));
    tasks.spawn(environments.run(shutdown.clone()));
    tasks.spawn(workspaces.run(shutdown.clone()));
    tasks.spawn(bindings.run(shutdown));
    Controllers { stats, tasks }
}

/// Runs every controller until `shutdown` (see [`spawn_all`]).
pub async fn run_all(store: Store, drivers: Drivers, shutdown: watch::Receiver<bool>) {
    spawn_all(store, drivers, shutdown).wait().await;
}
