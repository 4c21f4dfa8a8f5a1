//! Per-controller counters and gauges, as plain atomics, and their Prometheus text rendering.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counters (`_total`) and gauges of one controller. The controller updates them; anyone may read them.
#[derive(Debug, Default)]
pub struct ControllerStats {
    /// The controller's name, the `controller` label of every metric.
    pub name: String,
    /// Finished reconciles, successful or not.
    pub reconciles_total: AtomicU64,
    /// Reconciles that returned an error (or panicked).
    pub errors_total: AtomicU64,
    /// Lists after the first one (after an expired watch or a failed list).
    pub relists_total: AtomicU64,
    /// Failed lists, failed watches and watch streams that ended or broke.
    pub watch_errors_total: AtomicU64,
    /// Gauge: keys waiting for a worker.
    pub queue_depth: AtomicU64,
    /// Gauge: keys waiting for a requeue or backoff timer.
    pub scheduled: AtomicU64,
    /// Gauge: reconciles running now.
    pub in_flight: AtomicU64,
}

/// A point-in-time copy of [`ControllerStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub name: String,
    pub reconciles_total: u64,
    pub errors_total: u64,
    pub relists_total: u64,
    pub watch_errors_total: u64,
    pub queue_depth: u64,
    pub scheduled: u64,
    pub in_flight: u64,
}

impl ControllerStats {
    /// Fresh, zeroed stats for the controller `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Reads every value.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            name: self.name.clone(),
            reconciles_total: get(&self.reconciles_total),
            errors_total: get(&self.errors_total),
            relists_total: get(&self.relists_total),
            watch_errors_total: get(&self.watch_errors_total),
            queue_depth: get(&self.queue_depth),
            scheduled: get(&self.scheduled),
            in_flight: get(&self.in_flight),
        }
    }

    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set(gauge: &AtomicU64, value: usize) {
        gauge.store(u64::try_from(value).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Renders the stats of several controllers in the Prometheus text exposition format (one family per metric,
/// one sample per controller, labelled `controller="<name>"`).
pub fn render_prometheus(stats: &[Arc<ControllerStats>]) -> String {
    let snapshots: Vec<StatsSnapshot> = stats.iter().map(|s| s.snapshot()).collect();
    type Field = fn(&StatsSnapshot) -> u64;
    let families: [(&str, &str, &str, Field); 7] = [
        ("reconciles_total", "counter", "Finished reconciles.", |s| {
            s.reconciles_total
        }),
        (
            "reconcile_errors_total",
            "counter",
            "Failed reconciles.",
            |s| s.errors_total,
        ),
        (
            "relists_total",
            "counter",
            "Re-lists after an expired or failed watch.",
            |s| s.relists_total,
        ),
        (
            "watch_errors_total",
            "counter",
            "Failed or interrupted lists and watches.",
            |s| s.watch_errors_total,
        ),
        (
            "queue_depth",
            "gauge",
            "Objects waiting for a worker.",
            |s| s.queue_depth,
        ),
        (
            "scheduled",
            "gauge",
            "Objects waiting for a requeue or backoff timer.",
            |s| s.scheduled,
        ),
        ("in_flight", "gauge", "Reconciles running now.", |s| {
            s.in_flight
        }),
    ];
    let mut out = String::new();
    for (name, type_, help, field) in families {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP kiln_controller_{name} {help}");
        let _ = writeln!(out, "# TYPE kiln_controller_{name} {type_}");
        for s in &snapshots {
            let label = s
                .name
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(
                out,
                "kiln_controller_{name}{{controller=\"{label}\"}} {}",
                field(s)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_family_per_metric_and_one_sample_per_controller() {
        let a = Arc::new(ControllerStats::new("projects"));
        let b = Arc::new(ControllerStats::new("we\"ird"));
        ControllerStats::incr(&a.reconciles_total);
        ControllerStats::incr(&a.reconciles_total);
        ControllerStats::set(&b.queue_depth, 7);
        let text = render_prometheus(&[a, b]);
        assert!(text.contains("# TYPE kiln_controller_reconciles_total counter\n"));
        assert!(text.contains("kiln_controller_reconciles_total{controller=\"projects\"} 2\n"));
        assert!(text.contains("kiln_controller_queue_depth{controller=\"we\\\"ird\"} 7\n"));
        assert_eq!(text.matches("# TYPE ").count(), 7);
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 14);
    }
}
