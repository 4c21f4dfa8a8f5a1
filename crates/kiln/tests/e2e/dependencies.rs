//! Dependencies between components on the process data plane: the consumer gets `<NAME>_URL`/`_HOST`/`_PORT`
//! pointing at a Kiln address that reaches the dependency's replicas, and a dependency on a missing endpoint is a
//! condition on the consumer's binding while the consumer runs.

use std::time::{Duration, Instant};

use crate::harness::*;

/// Deletes the bindings when the test ends, passing or not, and waits until they are gone (their finalizer stops
/// the replicas), so no replica outlives the server.
struct Cleanup<'a>(&'a Server);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for b in ["api-dev", "web-dev"] {
            let _ = self.0.kiln(&["delete", "releasebinding", b, "-p", "shop"]);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline
            && ["api-dev", "web-dev"].iter().any(|b| {
                self.0
                    .kiln(&["get", "releasebinding", b, "-p", "shop"])
                    .status
                    .success()
            })
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn binding(s: &Server, name: &str) -> Option<serde_json::Value> {
    let out = s.kiln(&["get", "releasebinding", name, "-p", "shop", "-o", "json"]);
    out.status
        .success()
        .then(|| serde_json::from_str(&stdout(&out)).expect("json"))
}

fn condition<'a>(b: &'a serde_json::Value, type_: &str) -> Option<&'a serde_json::Value> {
    b["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Polls a binding until `f` accepts it.
fn wait_for(
    s: &Server,
    name: &str,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(b) = binding(s, name) {
            if f(&b) {
                return b;
            }
            assert!(Instant::now() < deadline, "{name}: {what}: {b}");
        }
        assert!(Instant::now() < deadline, "{name}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ready(b: &serde_json::Value) -> bool {
    condition(b, "Ready").is_some_and(|c| c["status"] == "True")
}

#[test]
fn a_consumer_reaches_its_dependency_through_a_kiln_address() {
    let s = Server::start();
    let _cleanup = Cleanup(&s);
    let dir = tempfile::tempdir().unwrap();
    ok(s.kiln(&["apply", "-f", LOCAL_ENVIRONMENTS]));
    let bin = testsvc::binary().display().to_string();
    let component = |name: &str, deps: &str| {
        format!(
            "---\napiVersion: kiln.dev/v1\nkind: Component\nmetadata: {{name: {name}, project: shop}}\nspec:\n  type: service\n  \
             workload:\n    command: [{bin:?}]\n    env: [{{name: SERVICE_NAME, value: {name}}}]\n  \
             endpoints: [{{name: http, port: 8080}}]\n  dependencies: {deps}\n  probes:\n    \
             readiness: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}\n"
        )
    };
    let app = format!(
        "apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {{name: shop}}\n{}{}",
        component("api", "[]"),
        component(
            "web",
            "[{component: api, endpoint: http}, {name: search, component: api, endpoint: grpc}]"
        )
    );
    let file = dir.path().join("app.yaml");
    std::fs::write(&file, app).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));

    wait_for(&s, "api-dev", "never ready", ready);
    // The consumer runs although one dependency names a missing endpoint: that one is a condition.
    let web = wait_for(
        &s,
        "web-dev",
        "never ready with its dependency condition",
        |b| ready(b) && condition(b, "DependenciesReady").is_some(),
    );
    let cond = condition(&web, "DependenciesReady").unwrap();
    assert_eq!(cond["status"], "False", "{web}");
    assert_eq!(cond["reason"], "DependencyNotFound", "{web}");
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("has no endpoint grpc"),
        "{web}"
    );
    let kiln_addr = web["status"]["dependencies"]["api"]["address"]
        .as_str()
        .expect("the api dependency's address")
        .to_string();
    let replica = web["status"]["endpoints"]["http"][0]
        .as_str()
        .expect("a ready web replica")
        .to_string();

    // The consumer's variables point at the Kiln address, not at a replica of api.
    let (code, url) = http_get(&format!("http://{replica}/env/API_URL")).unwrap();
    assert_eq!(
        (code, url.trim()),
        (200, format!("http://{kiln_addr}/").as_str())
    );
    let (_, port) = http_get(&format!("http://{replica}/env/API_PORT")).unwrap();
    assert_eq!(port.trim(), kiln_addr.rsplit(':').next().unwrap());
    let api_addrs: Vec<String> = binding(&s, "api-dev").unwrap()["status"]["endpoints"]["http"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert!(!api_addrs.contains(&kiln_addr));

    // The address reaches api.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, body)) = http_get(&format!("http://{kiln_addr}/env/SERVICE_NAME")) {
            assert_eq!(body, "api\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Kiln address never reached api"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = http_get(&format!("http://{kiln_addr}/")).unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("hello from api"), "{body}");
}
