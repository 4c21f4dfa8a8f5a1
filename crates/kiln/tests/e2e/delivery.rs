//! Delivery through the CLI with real workloads: a component running the test service as local processes gets a
//! release, runs in dev, is promoted to staging and rolled back, and its replicas answer over HTTP.

use std::time::{Duration, Instant};

use crate::harness::*;

/// Polls the binding until it is Ready on a release, returning (release, endpoint addresses).
pub fn ready_binding(s: &Server, name: &str, not: Option<&str>) -> (String, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = s.kiln(&["get", "releasebinding", name, "-p", "shop", "-o", "json"]);
        if out.status.success() {
            let b: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
            let ready = b["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let release = b["spec"]["release"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if ready
                && b["status"]["release"] == b["spec"]["release"]
                && Some(release.as_str()) != not
            {
                let addrs = b["status"]["endpoints"]["http"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.as_str().map(str::to_string))
                    .collect();
                return (release, addrs);
            }
        }
        assert!(
            Instant::now() < deadline,
            "binding {name} never became ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn apply_run_promote_and_roll_back_real_processes() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    ok(s.kiln(&["apply", "-f", LOCAL_ENVIRONMENTS]));
    let app = |replicas: u32| {
        format!(
            "apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {{name: shop}}\n---\napiVersion: kiln.dev/v1\nkind: Component\n\
             metadata: {{name: api, project: shop}}\nspec:\n  type: service\n  replicas: {replicas}\n  workload:\n    command: [{:?}]\n    \
             env: [{{name: SERVICE_NAME, value: api}}]\n  endpoints: [{{name: http, port: 8080, visibility: public}}]\n  probes:\n    \
             readiness: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}\n",
            testsvc::binary().display()
        )
    };
    let file = dir.path().join("app.yaml");
    std::fs::write(&file, app(2)).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));
    let (first, addrs) = ready_binding(&s, "api-dev", None);
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    let mut replicas: Vec<String> = addrs
        .iter()
        .map(|a| http_get(&format!("http://{a}/")).unwrap().1)
        .collect();
    replicas.sort();
    assert_eq!(
        replicas,
        [
            format!("hello from api (release {first}, replica 0)\n"),
            format!("hello from api (release {first}, replica 1)\n")
        ]
    );

    // The public endpoint is served by the gateway, in path and subdomain form, across both replicas.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 2 {
        let (code, body) = http_get(&format!("{}/x/default/shop/dev/api/http/", s.url)).unwrap();
        if code == 200 {
            assert!(
                body.contains(&format!("hello from api (release {first}")),
                "{body}"
            );
            seen.insert(body);
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never reached both replicas: {seen:?}"
        );
    }
    let host = format!("http--api--shop--dev.localhost:{}", s.port);
    let (code, body) = http_request(
        "GET",
        &format!("{}/env/SERVICE_NAME", s.url),
        &[("Host", &host)],
        None,
    )
    .unwrap();
    assert_eq!((code, body.as_str()), (200, "api\n"));

    // Promotion is refused off the pipeline, and follows it otherwise.
    let refused = s.kiln(&["promote", "api", "--from", "dev", "--to", "prod"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("no promotion path dev → prod"),
        "{}",
        stderr(&refused)
    );
    let out = ok(s.kiln(&["promote", "api", "--from", "dev", "--to", "staging"]));
    assert!(out.contains("promoted from dev to staging"), "{out}");
    let (staging, addrs) = ready_binding(&s, "api-staging", None);
    assert_eq!(staging, first);
    assert!(http_get(&format!("http://{}/", addrs[0]))
        .unwrap()
        .1
        .contains(&first));

    // A new release reaches dev, is promoted, then staging is rolled back to the first.
    std::fs::write(&file, app(1)).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));
    let (second, _) = ready_binding(&s, "api-dev", Some(&first));
    ok(s.kiln(&["promote", "api", "--from", "dev", "--to", "staging"]));
    assert_eq!(ready_binding(&s, "api-staging", Some(&first)).0, second);
    let out = ok(s.kiln(&["rollback", "api", "--env", "staging"]));
    assert!(
        out.contains(&format!("rolled back from {second} to {first}")),
        "{out}"
    );
    let (back, addrs) = ready_binding(&s, "api-staging", Some(&second));
    assert_eq!(back, first);
    assert!(http_get(&format!("http://{}/", addrs[0]))
        .unwrap()
        .1
        .contains(&first));
    let table = ok(s.kiln(&["releases", "api"]));
    assert!(
        table.contains("staging") && table.contains(&second) && table.contains(&first),
        "{table}"
    );
    let audit = ok(s.kiln(&["audit", "--kind", "Component"]));
    assert!(
        audit.contains("/promote") && audit.contains("/rollback"),
        "{audit}"
    );

    // Deleting the bindings stops the processes (their finalizer removes the workload first).
    for b in ["api-dev", "api-staging"] {
        ok(s.kiln(&["delete", "releasebinding", b, "-p", "shop"]));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(&format!("http://{}/", addrs[0])).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the staging replica kept running after its binding was deleted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
