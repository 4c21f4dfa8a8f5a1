//! The docker data plane through the whole server: components run from an image of the test service built
//! `FROM scratch`, answer through the gateway, reach a declared dependency at a Kiln address on their
//! project-environment network, and that address is closed to containers of other project-environments; a
//! scheduled task runs on request in a container, its exit and output kept.
//!
//! Without a reachable Docker Engine the test prints `SKIPPED` and passes, except under `CI=true`, where it
//! fails.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Whether the Engine answers; under CI it must.
pub(crate) fn docker_available() -> bool {
    let up = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !up {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and the Docker Engine is not reachable"
        );
        eprintln!("\n*** SKIPPED: Docker Engine not reachable ***\n");
    }
    up
}

fn binding(s: &Server, project: &str, name: &str) -> Option<serde_json::Value> {
    let out = s.kiln(&["get", "releasebinding", name, "-p", project, "-o", "json"]);
    out.status
        .success()
        .then(|| serde_json::from_str(&stdout(&out)).expect("json"))
}

fn ready(b: &serde_json::Value) -> bool {
    b["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Waits (up to 90 s) until the binding exists and `f` holds for it.
fn wait_binding(
    s: &Server,
    project: &str,
    name: &str,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let b = binding(s, project, name);
        if let Some(b) = &b {
            if f(b) {
                return b.clone();
            }
        }
        assert!(Instant::now() < deadline, "{project}/{name}: {what}: {b:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_ready(s: &Server, project: &str, name: &str) -> serde_json::Value {
    wait_binding(s, project, name, "never became Ready", ready)
}

/// A docker DataPlane, its environments `ddev` and `dstage`, and the pipeline `dline` between them.
const PLATFORM: &str = "apiVersion: kiln.dev/v1\nkind: DataPlane\nmetadata: {name: dock}\nspec: {type: docker}\n---\n\
    apiVersion: kiln.dev/v1\nkind: Environment\nmetadata: {name: ddev}\nspec: {dataPlaneRef: dock}\n---\n\
    apiVersion: kiln.dev/v1\nkind: Environment\nmetadata: {name: dstage}\nspec: {dataPlaneRef: dock}\n---\n\
    apiVersion: kiln.dev/v1\nkind: DeploymentPipeline\nmetadata: {name: dline}\n\
    spec: {promotionPaths: [{sourceEnvironmentRef: ddev, targetEnvironmentRefs: [{name: dstage}]}]}\n";

/// Deletes the projects and waits until their containers and networks are gone.
fn delete_projects(s: &Server, cleanup: &testsvc::DockerCleanup, projects: &[&str]) {
    for p in projects {
        ok(s.kiln(&["delete", "project", p]));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cleanup.containers().is_empty() || !cleanup.networks().is_empty() {
        assert!(
            Instant::now() < deadline,
            "containers {:?} and networks {:?} left after deleting the projects",
            cleanup.containers(),
            cleanup.networks()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// GET through the server until it answers 200 (a fresh route may take a moment to reach the gateway's table).
fn get_ok(url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http_get(url);
        if let Ok((200, body)) = &r {
            return body.clone();
        }
        assert!(Instant::now() < deadline, "GET {url}: {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn docker_components_serve_through_the_gateway_and_reach_only_declared_dependencies() {
    if !docker_available() {
        return;
    }
    let image = testsvc::docker_image();
    let pid = std::process::id();
    let (pa, pb) = (format!("dk{pid}a"), format!("dk{pid}b"));
    let _cleanup = testsvc::DockerCleanup {
        prefixes: vec![format!("default/{pa}/"), format!("default/{pb}/")],
    };
    let s = Server::start();
    let component = |project: &str, name: &str, visibility: &str, deps: &str| {
        format!(
            "---\napiVersion: kiln.dev/v1\nkind: Component\nmetadata: {{name: {name}, project: {project}}}\nspec:\n  \
             type: service\n  workload:\n    image: {image}\n    env: [{{name: SERVICE_NAME, value: {name}}}]\n  \
             endpoints: [{{name: http, port: 8080, visibility: {visibility}}}]\n  dependencies: {deps}\n  \
             probes:\n    readiness: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}\n",
            image = image.tag,
        )
    };
    let manifest = format!(
        "{PLATFORM}---\n\
         apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {{name: {pa}}}\nspec: {{deploymentPipelineRef: dline}}\n---\n\
         apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {{name: {pb}}}\nspec: {{deploymentPipelineRef: dline}}\n{}{}{}",
        component(&pa, "api", "project", "[]"),
        component(&pa, "web", "public", "[{component: api, endpoint: http}]"),
        component(&pb, "intruder", "public", "[]"),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docker.yaml");
    std::fs::write(&file, manifest).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));

    wait_ready(&s, &pa, "api-ddev");
    let web = wait_ready(&s, &pa, "web-ddev");
    wait_ready(&s, &pb, "intruder-ddev");
    let deps = &web["status"]["dependencies"]["api"];
    assert_eq!(deps["forwarding"], true, "{web}");
    let kiln_addr = deps["address"].as_str().expect("api's address").to_string();
    assert!(
        !kiln_addr.starts_with("127."),
        "a container's dependency address must be on its network, not the host's loopback: {web}"
    );

    // Through the gateway to a container; the api endpoint is project-only, so not served there.
    let base = |project: &str, component: &str| {
        format!("{}/x/default/{project}/ddev/{component}/http", s.url)
    };
    let hello = get_ok(&format!("{}/", base(&pa, "web")));
    assert!(hello.contains("hello from web"), "{hello}");
    let (code, body) = http_get(&format!("{}/", base(&pa, "api"))).unwrap();
    assert_eq!(code, 404, "{body}");

    // The container's variables point at the Kiln address, which reaches api.
    let url = get_ok(&format!("{}/env/API_URL", base(&pa, "web")));
    assert_eq!(url.trim(), format!("http://{kiln_addr}/"));
    let via = get_ok(&format!("{}/get/$API/env/SERVICE_NAME", base(&pa, "web")));
    assert!(via.contains(" 200 OK\napi\n"), "{via}");

    // A container of another project-environment cannot use the address (that it cannot reach api's containers
    // directly is the docker driver's own test).
    let (code, refused) = http_get(&format!(
        "{}/get/{kiln_addr}/env/SERVICE_NAME",
        base(&pb, "intruder")
    ))
    .unwrap();
    assert_eq!(code, 502, "{refused}");
    assert!(!refused.contains("api"), "{refused}");

    // Deleting the projects removes their containers and networks.
    delete_projects(&s, &_cleanup, &[&pa, &pb]);
}

#[test]
fn a_docker_scheduled_task_runs_on_request_and_keeps_its_exit_and_output() {
    if !docker_available() {
        return;
    }
    let image = testsvc::docker_image();
    let project = format!("dk{}t", std::process::id());
    let cleanup = testsvc::DockerCleanup {
        prefixes: vec![format!("default/{project}/")],
    };
    let s = Server::start();
    // The test service in its task mode: two lines, then exit 0. The schedule is yearly: the run is asked for.
    let manifest = format!(
        "{PLATFORM}---\napiVersion: kiln.dev/v1\nkind: Project\nmetadata: {{name: {project}}}\n\
         spec: {{deploymentPipelineRef: dline}}\n---\n\
         apiVersion: kiln.dev/v1\nkind: Component\nmetadata: {{name: tick, project: {project}}}\nspec:\n  \
         type: scheduled-task\n  schedule: \"0 0 1 1 *\"\n  workload:\n    image: {image}\n    \
         env: [{{name: TASK_EXIT, value: \"0\"}}]\n",
        image = image.tag,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("task.yaml");
    std::fs::write(&file, manifest).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));
    wait_ready(&s, &project, "tick-ddev");

    ok(s.kiln(&["task", "run", "tick", "--env", "ddev", "-p", &project]));
    let b = wait_binding(&s, &project, "tick-ddev", "no run succeeded", |b| {
        b["status"]["runs"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["state"] == "Succeeded"))
    });
    let run = &b["status"]["runs"][0];
    let n = run["run"].as_u64().expect("a run number");
    assert_eq!(run["exitCode"], 0, "{b}");
    assert_eq!(run["message"], "exited with code 0", "{b}");
    assert_eq!(
        run["lastLogs"],
        serde_json::json!([format!("run {n} starts"), format!("run {n} ends")]),
        "{b}"
    );
    assert!(ready(&b), "{b}");
    let logs = ok(s.kiln(&[
        "logs",
        "tick",
        "--env",
        "ddev",
        "-p",
        &project,
        "--run",
        &n.to_string(),
    ]));
    assert!(
        logs.contains(&format!("run {n} starts")) && logs.contains(&format!("run {n} ends")),
        "{logs}"
    );
    // One container, kept after the run ended.
    assert_eq!(cleanup.containers().len(), 1);

    // Deleting the project removes the run's container and the network.
    delete_projects(&s, &cleanup, &[&project]);
}
