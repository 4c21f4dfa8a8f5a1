//! CI pipelines through the real binary: a local bare git repository as the source, `kiln apply` of a
//! pipeline and its secret, `kiln pipeline run -f` on the built-in runner (checkout with real git, steps as a
//! graph, parameters, masked secrets), `kiln runs`, a commit picked by the run, cancel, and apply-time
//! rejections with their field paths.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare repository whose `main` has two commits (`version` 1, then 2); answers its path and the first commit.
pub fn repository(root: &Path) -> (String, String) {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "--quiet", "--initial-branch=main"]);
    std::fs::write(work.join("version"), "1\n").unwrap();
    git(&work, &["add", "version"]);
    git(&work, &["commit", "--quiet", "-m", "one"]);
    let first = git(&work, &["rev-parse", "HEAD"]);
    std::fs::write(work.join("version"), "2\n").unwrap();
    git(&work, &["commit", "--quiet", "-am", "two"]);
    git(root, &["clone", "--quiet", "--bare", "work", "shop.git"]);
    (root.join("shop.git").display().to_string(), first)
}

pub fn run_status(s: &Server, run: &str) -> serde_json::Value {
    let out = ok(s.kiln(&["get", "pipelinerun", run, "-o", "json"]));
    serde_json::from_str(&out).expect("json")
}

#[test]
fn a_pipeline_runs_its_steps_on_the_checked_out_source() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, first) = repository(tmp.path());
    let manifest = format!(
        r#"apiVersion: kiln.dev/v1
kind: Secret
metadata: {{name: registry}}
spec:
  stringData: {{token: hunter2-registry}}
---
apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: shop-ci}}
spec:
  source: {{repository: "{repo}"}}
  params: [{{name: TARGET, default: all}}]
  steps:
    - name: build
      commands: ["echo building $TARGET at version $(cat version)", "echo artifact > out.txt"]
    - name: lint
      commands: ["echo lint ok"]
    - name: publish
      dependsOn: [build, lint]
      secrets: [{{secret: registry, key: token, env: REGISTRY_TOKEN}}]
      commands: ["cat out.txt", "echo pushing with $REGISTRY_TOKEN"]
    - name: notify-failure
      dependsOn: [publish]
      when: {{status: [failure]}}
      commands: ["echo never"]
"#
    );
    let file = tmp.path().join("shop-ci.yaml");
    std::fs::write(&file, manifest).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));

    let out = ok(s.kiln(&["pipeline", "run", "shop-ci", "--param", "TARGET=web", "-f"]));
    assert!(out.contains("pipelinerun/shop-ci-1 started"), "{out}");
    assert!(out.contains("[build] building web at version 2"), "{out}");
    assert!(out.contains("[publish] artifact"), "{out}");
    assert!(out.contains("[publish] pushing with ********"), "{out}");
    assert!(
        !out.contains("hunter2"),
        "a secret value reached the log: {out}"
    );
    assert!(out.contains("pipelinerun/shop-ci-1: Succeeded"), "{out}");
    let run = run_status(&s, "shop-ci-1");
    let steps: Vec<(String, String)> = run["status"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| {
            (
                st["name"].as_str().unwrap().to_string(),
                st["phase"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("build".to_string(), "Succeeded".to_string()),
            ("lint".into(), "Succeeded".into()),
            ("publish".into(), "Succeeded".into()),
            ("notify-failure".into(), "Skipped".into()),
        ]
    );
    assert_eq!(run["status"]["commit"].as_str().map(str::len), Some(40));
    assert_eq!(run["status"]["epoch"], 1);

    // A run of an older commit, and an unknown parameter refused.
    let out = ok(s.kiln(&["pipeline", "run", "shop-ci", "--commit", &first, "-f"]));
    assert!(out.contains("[build] building all at version 1"), "{out}");
    // A rerun repeats the run's commit and parameters, whatever the branch's head is now.
    let out = ok(s.kiln(&["pipeline", "rerun", "shop-ci/1", "-f"]));
    assert!(
        out.contains("pipelinerun/shop-ci-3 started (a rerun of shop-ci-1)"),
        "{out}"
    );
    assert!(out.contains("[build] building web at version 2"), "{out}");
    assert_eq!(run_status(&s, "shop-ci-3")["spec"]["rerunOf"], "shop-ci-1");
    let bad = s.kiln(&["pipeline", "run", "shop-ci", "--param", "NOPE=1"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad)
            .contains("pipeline shop-ci has no parameter \"NOPE\" (its parameters: TARGET)"),
        "{}",
        stderr(&bad)
    );

    let runs = ok(s.kiln(&["runs", "shop-ci"]));
    let lines: Vec<&str> = runs.lines().collect();
    assert!(lines[0].starts_with("RUN"), "{runs}");
    assert!(
        lines[1].starts_with("shop-ci/3") && lines[1].contains("Succeeded"),
        "{runs}"
    );
    assert!(lines[2].starts_with("shop-ci/2"), "{runs}");
    assert!(
        lines[3].contains("build:ok lint:ok publish:ok notify-failure:skipped"),
        "{runs}"
    );
}

#[test]
fn a_failing_step_fails_the_run_and_cancel_stops_a_running_one() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repository(tmp.path());
    let manifest = format!(
        r#"apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: broken}}
spec:
  source: {{repository: "{repo}"}}
  steps:
    - name: test
      commands: ["echo about to fail", "exit 4"]
---
apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: slow}}
spec:
  source: {{repository: "{repo}"}}
  steps:
    - name: wait
      commands: ["sleep 300"]
"#
    );
    let file = tmp.path().join("p.yaml");
    std::fs::write(&file, manifest).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));

    let out = s.kiln(&["pipeline", "run", "broken", "-f"]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("[test] about to fail"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("pipelinerun/broken-1: Failed step test failed: exit code 4"),
        "{}",
        stderr(&out)
    );

    ok(s.kiln(&["pipeline", "run", "slow"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while run_status(&s, "slow-1")["status"]["steps"][0]["phase"] != "Running" {
        assert!(Instant::now() < deadline, "the step never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let asked = Instant::now();
    ok(s.kiln(&["pipeline", "cancel", "slow/1"]));
    loop {
        let run = run_status(&s, "slow-1");
        if run["status"]["phase"] == "Canceled" {
            assert_eq!(run["status"]["steps"][0]["phase"], "Canceled");
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "not canceled within 10 s: {run}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = ok(s.kiln(&["pipeline", "logs", "slow/1"]));
    assert!(log.contains("[queue] canceled by admin"), "{log}");
}

#[test]
fn apply_rejects_a_cycle_an_unknown_step_and_an_unknown_secret_with_their_paths() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.yaml");
    std::fs::write(
        &file,
        r#"apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {name: graph}
spec:
  source: {repository: /srv/none.git}
  steps:
    - {name: a, commands: ["true"], dependsOn: [b]}
    - {name: b, commands: ["true"], dependsOn: [a, c]}
---
apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {name: secretive}
spec:
  source: {repository: /srv/none.git}
  steps:
    - name: a
      commands: ["true"]
      secrets: [{secret: missing, key: k, env: K}]
"#,
    )
    .unwrap();
    let out = s.kiln(&["apply", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("spec.steps[1].dependsOn[1]: unknown step \"c\"; the steps are a, b"),
        "{err}"
    );
    assert!(
        err.contains(
            "spec.steps[0].dependsOn: the steps depend on each other in a cycle: a → b → a"
        ),
        "{err}"
    );
    assert!(err.contains("spec.steps[0].secrets[0].secret: Secret missing does not exist in organization default"), "{err}");
    // Nothing was stored.
    let list = ok(s.kiln(&["get", "pipelines"]));
    assert!(
        !list.contains("graph") && !list.contains("secretive"),
        "{list}"
    );
}

/// Secret values are sealed before they reach the store: the database files never hold them, `get` shows only
/// the keys, applying the same manifest again changes nothing, and after a restart (the key kept in the data
/// directory) a step still receives the value, as a variable or as a file.
#[test]
fn secret_values_are_sealed_at_rest_and_never_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut s = Server::start_in(&data, None);
    let (repo, _) = repository(tmp.path());
    let manifest = format!(
        r#"apiVersion: kiln.dev/v1
kind: Secret
metadata: {{name: deploy}}
spec:
  stringData: {{token: plain-TOKEN-4c1d, kubeconfig: "kind: Config"}}
  data: {{binary: c2VhbGVkLUJJTkFSWS05ZjJh}}
---
apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: deployer}}
spec:
  source: {{repository: "{repo}"}}
  steps:
    - name: use
      secrets:
        - {{secret: deploy, key: token, env: TOKEN}}
        - {{secret: deploy, key: binary, env: BINARY}}
        - {{secret: deploy, key: kubeconfig, env: KUBECONFIG, file: true}}
      commands:
        # Compared in upper case, so that the pipeline itself does not hold the values.
        - test "$(echo $TOKEN | tr a-z A-Z)" = PLAIN-TOKEN-4C1D && test "$(echo $BINARY | tr a-z A-Z)" = SEALED-BINARY-9F2A && echo values ok
        - 'test "$(cat "$KUBECONFIG")" = "kind: Config" && echo file ok'
"#
    );
    let file = tmp.path().join("deploy.yaml");
    std::fs::write(&file, &manifest).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));
    let again = ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));
    assert!(again.contains("secret/deploy unchanged"), "{again}");

    let shown = ok(s.kiln(&["get", "secret", "deploy", "-o", "json"]));
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let keys: Vec<&str> = v["spec"]["sealed"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["binary", "kubeconfig", "token"], "{shown}");
    assert!(
        v["spec"]["sealed"]
            .as_object()
            .unwrap()
            .values()
            .all(|x| x == ""),
        "{shown}"
    );
    // What get shows applies back without losing a value.
    let shown_file = tmp.path().join("shown.json");
    std::fs::write(&shown_file, &shown).unwrap();
    let reapplied = ok(s.kiln(&["apply", "-f", shown_file.to_str().unwrap()]));
    assert!(reapplied.contains("secret/deploy unchanged"), "{reapplied}");

    let out = ok(s.kiln(&["pipeline", "run", "deployer", "-f"]));
    assert!(
        out.contains("[use] values ok") && out.contains("[use] file ok"),
        "{out}"
    );
    s.terminate();

    // Nothing in the database files holds a value.
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("kiln.db")
        {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for value in [
            "plain-TOKEN-4c1d",
            "sealed-BINARY-9f2a",
            "c2VhbGVkLUJJTkFSWS05ZjJh",
        ] {
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "{} holds {value}",
                path.display()
            );
        }
    }
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(data.join("secret.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let s = Server::start_in(&data, None);
    let out = ok(s.kiln(&["pipeline", "run", "deployer", "-f"]));
    assert!(
        out.contains("[use] values ok") && out.contains("[use] file ok"),
        "{out}"
    );
}

/// Parses a Server-Sent Events body: (id, event name, data) per event.
fn sse_events(body: &str) -> Vec<(Option<u64>, String, String)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty() && !e.starts_with(':'))
        .map(|e| {
            let (mut id, mut event, mut data) = (None, "message".to_string(), String::new());
            for l in e.lines() {
                if let Some(v) = l.strip_prefix("id: ") {
                    id = v.parse().ok();
                } else if let Some(v) = l.strip_prefix("event: ") {
                    event = v.to_string();
                } else if let Some(v) = l.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            (id, event, data)
        })
        .collect()
}

/// A run's log reaches every kind of viewer whole and in order: late viewers over SSE (all at once), a
/// resumed SSE viewer (`Last-Event-ID`), a WebSocket viewer and `kiln logs run P/N -f`; secrets stay masked.
#[test]
fn run_logs_stream_to_late_and_resuming_viewers_over_sse_websocket_and_the_cli() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repository(tmp.path());
    let manifest = format!(
        r#"apiVersion: kiln.dev/v1
kind: Secret
metadata: {{name: tok}}
spec:
  stringData: {{value: sekrit-7a7a}}
---
apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: chatty}}
spec:
  source: {{repository: "{repo}"}}
  steps:
    - name: talk
      secrets: [{{secret: tok, key: value, env: TOK}}]
      commands:
        - for i in $(seq 1 3000); do echo "line $i"; done
        - sleep 2
        - echo "token $TOK"
        - for i in $(seq 3001 4000); do echo "line $i"; done
"#
    );
    let file = tmp.path().join("chatty.yaml");
    std::fs::write(&file, manifest).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));
    ok(s.kiln(&["pipeline", "run", "chatty"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while run_status(&s, "chatty-1")["status"]["steps"][0]["phase"] != "Running" {
        assert!(Instant::now() < deadline, "the step never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let token = s.admin_token();
    let url = format!(
        "{}/api/v1/orgs/default/pipelineruns/chatty-1/logs?follow=true",
        s.url
    );
    let auth = format!("Bearer {token}");

    // Ten SSE viewers at once, joining while the run writes, each following to the end.
    let viewers: Vec<_> = (0..10)
        .map(|_| {
            let (url, auth) = (url.clone(), auth.clone());
            std::thread::spawn(move || {
                let headers = [
                    ("authorization", auth.as_str()),
                    ("accept", "text/event-stream"),
                ];
                http_exchange("GET", &url, &headers, None).expect("sse")
            })
        })
        .collect();
    // A WebSocket viewer.
    let ws_url = format!(
        "{}/api/v1/orgs/default/pipelineruns/chatty-1/logs/ws",
        s.url.replace("http://", "ws://")
    );
    let addr = s.url.strip_prefix("http://").unwrap().to_string();
    let ws_lines = tokio::runtime::Runtime::new().unwrap().block_on(async {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = ws_url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", auth.parse().unwrap());
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        let mut got: Vec<serde_json::Value> = Vec::new();
        while let Some(m) = ws.next().await {
            let m = m.unwrap();
            if m.is_text() {
                got.push(serde_json::from_str(m.to_text().unwrap()).unwrap());
            }
            if got.last().is_some_and(|v| v["type"] == "end") {
                break;
            }
        }
        got
    });
    let ws_seqs: Vec<u64> = ws_lines
        .iter()
        .filter(|v| v["type"] == "line")
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ws_lines.last().unwrap()["phase"],
        "Succeeded",
        "{:?}",
        ws_lines.last()
    );
    let total = *ws_seqs.last().unwrap();
    assert_eq!(
        ws_seqs,
        (1..=total).collect::<Vec<u64>>(),
        "the WebSocket viewer missed or repeated lines"
    );

    for v in viewers {
        let resp = v.join().unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("text/event-stream"));
        let events = sse_events(&resp.body);
        let ids: Vec<u64> = events.iter().filter_map(|e| e.0).collect();
        assert_eq!(
            ids,
            (1..=total).collect::<Vec<u64>>(),
            "an SSE viewer missed or repeated lines"
        );
        let end = events.last().unwrap();
        assert_eq!(end.1, "end");
        assert!(end.2.contains("Succeeded"), "{}", end.2);
        let texts: String = events.iter().map(|e| e.2.as_str()).collect();
        assert!(texts.contains("line 4000") && texts.contains("token ********"));
        assert!(!texts.contains("sekrit-7a7a"), "a secret reached a viewer");
    }

    // A viewer resuming after line 1500 gets exactly the rest.
    let headers = [
        ("authorization", auth.as_str()),
        ("accept", "text/event-stream"),
        ("last-event-id", "1500"),
    ];
    let resp = http_exchange("GET", &url, &headers, None).unwrap();
    let ids: Vec<u64> = sse_events(&resp.body).iter().filter_map(|e| e.0).collect();
    assert_eq!(ids, (1501..=total).collect::<Vec<u64>>());

    // The CLI's form of the same.
    let out = ok(s.kiln(&["logs", "run", "chatty/1", "-f"]));
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("[talk] line "))
            .count(),
        4000
    );
    assert!(out.contains("[talk] token ********"), "{out}");
    let bad = s.kiln(&["logs", "chatty"]);
    assert!(
        stderr(&bad).contains("--env is required"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn a_successful_run_on_the_branch_becomes_a_release_deployed_to_the_first_environment() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repository(tmp.path());
    ok(s.kiln(&["apply", "-f", LOCAL_ENVIRONMENTS]));
    let manifest = format!(
        r#"apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: api-ci}}
spec:
  source: {{repository: "{repo}"}}
  steps:
    - name: build
      environment: {{TESTSVC: "{svc}"}}
      artifacts: [dist/api]
      commands: ["mkdir -p dist", "cp \"$TESTSVC\" dist/api", "echo artifact=dist/api >> \"$KILN_OUTPUT\""]
---
apiVersion: kiln.dev/v1
kind: Project
metadata: {{name: shop}}
---
apiVersion: kiln.dev/v1
kind: Component
metadata: {{name: api, project: shop}}
spec:
  type: service
  build: {{pipeline: api-ci}}
  workload:
    env: [{{name: SERVICE_NAME, value: api}}]
  endpoints: [{{name: http, port: 8080, visibility: public}}]
  probes:
    readiness: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
"#,
        svc = testsvc::binary().display()
    );
    let file = tmp.path().join("built.yaml");
    std::fs::write(&file, manifest).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));

    // Nothing is released before a build.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c: serde_json::Value = serde_json::from_str(&ok(s.kiln(&[
            "get",
            "component",
            "api",
            "-p",
            "shop",
            "-o",
            "json",
        ])))
        .unwrap();
        let released = c["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Released")
            .cloned();
        if let Some(r) = released {
            assert_eq!(r["reason"], "AwaitingBuild", "{c:#}");
            assert!(
                r["message"].as_str().unwrap().contains("pipeline api-ci"),
                "{c:#}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{c:#}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A successful run makes the release, and auto-deploy runs the built file in dev.
    let out = s.kiln(&["pipeline", "run", "api-ci", "-f"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let (release, addrs) = crate::delivery::ready_binding(&s, "api-dev", None);
    let (_, body) = http_get(&format!("http://{}/", addrs[0])).unwrap();
    assert_eq!(
        body,
        format!("hello from api (release {release}, replica 0)\n")
    );
    let r: serde_json::Value = serde_json::from_str(&ok(
        s.kiln(&["get", "release", &release, "-p", "shop", "-o", "json"])
    ))
    .unwrap();
    assert_eq!(r["spec"]["snapshot"]["artifact"], "dist/api", "{r:#}");
    let program = r["spec"]["snapshot"]["workload"]["command"][0]
        .as_str()
        .unwrap_or_default();
    assert!(
        program.ends_with("artifacts/default/api-ci-1/dist/api"),
        "{r:#}"
    );

    // The next successful run is the next release.
    let out = s.kiln(&["pipeline", "run", "api-ci", "-f"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let (second, _) = crate::delivery::ready_binding(&s, "api-dev", Some(&release));
    assert_ne!(second, release);
}
