//! Starting the controllers with the server and stopping them on shutdown.

use store::Store;
use tokio::sync::watch;

/// The running controllers.
pub struct Handle(controllers::Controllers);

impl Handle {
    /// The controllers' counters in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        runtime::render_prometheus(self.0.stats())
    }

    /// Waits for the controllers to finish their in-flight reconciles (they stop when shutdown flips).
    pub async fn stop(self) {
        self.0.wait().await;
    }
}

/// Starts the controllers; `mesh` serves consumers' dependency addresses.
pub fn start(
    store: Store,
    drivers: controllers::Drivers,
    mesh: Option<std::sync::Arc<dyn controllers::Mesh>>,
    provisioners: controllers::jobs::Provisioners,
    shutdown: watch::Receiver<bool>,
) -> Handle {
    Handle(controllers::spawn_all_with(
        store,
        drivers,
        mesh,
        provisioners,
        shutdown,
    ))
}
