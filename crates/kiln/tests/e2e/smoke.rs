//! First start, health endpoints, and a graceful stop.

use crate::harness::*;

#[test]
fn first_start_writes_private_token_and_serves_health() {
    let mut s = Server::start();
    let token_path = s.data_dir.join("admin-token");
    let meta = std::fs::metadata(&token_path).expect("admin-token written");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "admin-token must be mode 0600"
    );
    assert!(s.admin_token().starts_with("kiln_"));
    assert_eq!(http_get(&format!("{}/healthz", s.url)).unwrap().0, 200);
    assert_eq!(http_get(&format!("{}/readyz", s.url)).unwrap().0, 200);
    let (code, metrics) = http_get(&format!("{}/metrics", s.url)).unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("# TYPE kiln_http_requests_total counter"),
        "{metrics}"
    );
    let who = ok(s.kiln(&["whoami"]));
    assert!(
        who.contains("user:      admin") && who.contains("org default"),
        "{who}"
    );
    let status = s.terminate();
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
}
