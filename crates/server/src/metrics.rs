//! Prometheus text exposition of the server's own counters. Hand-rolled: a few atomics are all it needs.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the request latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const METHODS: [&str; 6] = ["GET", "POST", "PUT", "PATCH", "DELETE", "OTHER"];

#[derive(Default)]
pub struct Metrics {
    /// Requests by method × status class.
    requests: [[AtomicU64; 5]; 6],
    latency_buckets: [AtomicU64; 12],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    pub audit_failures: AtomicU64,
    pub watch_streams: AtomicU64,
    /// Gateway (proxied) requests by status class.
    gateway_requests: [AtomicU64; 5],
    /// Gateway requests whose backend could not be reached or failed mid-exchange.
    pub gateway_upstream_errors: AtomicU64,
    /// Users' direct streams to workspaces, by the way they reached the agent: an agent's own connection, or a
    /// stream of its session.
    pub workspace_streams_direct: AtomicU64,
    pub workspace_streams_session: AtomicU64,
}

impl Metrics {
    pub fn observe(&self, method: &str, status: u16, elapsed: Duration) {
        let m = METHODS
            .iter()
            .position(|x| *x == method)
            .unwrap_or(METHODS.len() - 1);
        let c = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[m][c].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts a request the gateway answered (proxied, or refused with an error page).
    pub fn observe_gateway(&self, status: u16) {
        let c = usize::from(status / 100).clamp(1, 5) - 1;
        self.gateway_requests[c].fetch_add(1, Ordering::Relaxed);
    }

    /// Renders every metric, plus the extra lines the caller passes (store and controller figures).
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP kiln_http_requests_total HTTP requests served, by method and status class.\n",
        );
        out.push_str("# TYPE kiln_http_requests_total counter\n");
        for (mi, m) in METHODS.iter().enumerate() {
            for (ci, c) in CLASSES.iter().enumerate() {
                let v = self.requests[mi][ci].load(Ordering::Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        out,
                        "kiln_http_requests_total{{method=\"{m}\",code=\"{c}\"}} {v}"
                    );
                }
            }
        }
        out.push_str(
            "# HELP kiln_http_request_duration_seconds Time to produce a response head.\n",
        );
        out.push_str("# TYPE kiln_http_request_duration_seconds histogram\n");
        for (i, b) in BUCKETS.iter().enumerate() {
            let v = self.latency_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "kiln_http_request_duration_seconds_bucket{{le=\"{b}\"}} {v}"
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "kiln_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "kiln_http_request_duration_seconds_sum {sum}");
        let _ = writeln!(out, "kiln_http_request_duration_seconds_count {count}");
        out.push_str(
            "# HELP kiln_watch_streams Open watch streams.\n# TYPE kiln_watch_streams gauge\n",
        );
        let _ = writeln!(
            out,
            "kiln_watch_streams {}",
            self.watch_streams.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP kiln_audit_write_failures_total Audit records that could not be written.\n",
        );
        out.push_str("# TYPE kiln_audit_write_failures_total counter\n");
        let _ = writeln!(
            out,
            "kiln_audit_write_failures_total {}",
            self.audit_failures.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP kiln_gateway_requests_total Requests answered by the gateway, by status class.\n",
        );
        out.push_str("# TYPE kiln_gateway_requests_total counter\n");
        for (ci, c) in CLASSES.iter().enumerate() {
            let v = self.gateway_requests[ci].load(Ordering::Relaxed);
            let _ = writeln!(out, "kiln_gateway_requests_total{{code=\"{c}\"}} {v}");
        }
        out.push_str("# HELP kiln_gateway_upstream_errors_total Gateway requests whose backend could not be reached or failed.\n");
        out.push_str("# TYPE kiln_gateway_upstream_errors_total counter\n");
        let _ = writeln!(
            out,
            "kiln_gateway_upstream_errors_total {}",
            self.gateway_upstream_errors.load(Ordering::Relaxed)
        );
        out.push_str("# HELP kiln_workspace_streams_total Direct streams users opened to workspaces, by how they reached the agent (its own connection, or its session).\n");
        out.push_str("# TYPE kiln_workspace_streams_total counter\n");
        for (path, v) in [
            ("direct", &self.workspace_streams_direct),
            ("session", &self.workspace_streams_session),
        ] {
            let v = v.load(Ordering::Relaxed);
            let _ = writeln!(out, "kiln_workspace_streams_total{{path=\"{path}\"}} {v}");
        }
        out.push_str(extra);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe("GET", 200, Duration::from_micros(300));
        m.observe("PUT", 404, Duration::from_millis(30));
        let text = m.render("");
        assert!(text.contains("kiln_http_requests_total{method=\"GET\",code=\"2xx\"} 1"));
        assert!(text.contains("kiln_http_requests_total{method=\"PUT\",code=\"4xx\"} 1"));
        assert!(text.contains("kiln_http_request_duration_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("kiln_http_request_duration_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("kiln_http_request_duration_seconds_count 2"));
    }
}
