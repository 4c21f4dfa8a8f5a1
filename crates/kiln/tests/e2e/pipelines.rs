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
fn repository(root: &Path) -> (String, String) {
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

fn run_status(s: &Server, run: &str) -> serde_json::Value {
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
        lines[1].starts_with("shop-ci/2") && lines[1].contains("Succeeded"),
        "{runs}"
    );
    assert!(
        lines[2].contains("build:ok lint:ok publish:ok notify-failure:skipped"),
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
