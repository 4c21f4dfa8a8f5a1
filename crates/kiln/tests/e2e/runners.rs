//! Runners through the real binary: `kiln runner` processes with labels and a runner token take the runs the
//! built-in runner cannot; one killed mid-step (SIGKILL) is replaced by another within one lease, which retries
//! the interrupted step (or, when its retry policy allows no other attempt, the run fails naming the lost
//! runner); an approval step waits for `kiln approve`; artifacts are downloaded with `kiln artifacts get`; and
//! the built-in runner runs container steps beside a service on the real Docker Engine.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;
use crate::pipelines::{repository, run_status};

fn start_runner(s: &Server, token: &str, name: &str, dir: &Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(kiln_bin())
            .args([
                "runner",
                "--server",
                &s.url,
                "--name",
                name,
                "--labels",
                "pool=ext",
                "--no-docker",
            ])
            .arg("--dir")
            .arg(dir)
            .env("KILN_RUNNER_TOKEN", token)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

/// Waits until `cond` holds for the run's object; answers it.
fn wait_run(s: &Server, run: &str, what: &str, secs: u64, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let r = run_status(s, run);
        if cond(&r) {
            return r;
        }
        if Instant::now() >= deadline {
            let log = stdout(&s.kiln(&["logs", "run", run]));
            panic!("{what}: {r:#}\nits log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["status"]["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or(&Value::Null)
}

#[test]
fn external_runners_take_labelled_runs_and_a_killed_one_is_replaced_within_a_lease() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repository(tmp.path());
    let manifest = format!(
        r#"apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: ext-ci}}
spec:
  source: {{repository: "{repo}"}}
  runnerLabels: {{pool: ext}}
  steps:
    - name: prep
      commands: ["echo prepared > prep.txt"]
    - name: slow
      dependsOn: [prep]
      retry: {{attempts: 2, delay: 1s}}
      commands: ["cat prep.txt", "echo slow-started", "sleep 6", "echo slow-done"]
    - name: pack
      dependsOn: [slow]
      artifacts: [dist]
      commands: ["mkdir -p dist", "echo binary-v$(cat version) > dist/app"]
    - name: gate
      dependsOn: [pack]
      approval: {{message: "ship it?"}}
    - name: ship
      dependsOn: [gate]
      commands: ["echo shipped"]
---
apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: ext-once}}
spec:
  source: {{repository: "{repo}"}}
  runnerLabels: {{pool: ext}}
  steps:
    - name: slow
      commands: ["echo once-started", "sleep 6"]
"#
    );
    let file = tmp.path().join("pipelines.yaml");
    std::fs::write(&file, manifest).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));

    // No runner carries the labels yet: the run says so.
    ok(s.kiln(&["pipeline", "run", "ext-ci"]));
    wait_run(&s, "ext-ci-1", "the run says why it waits", 30, |r| {
        r["status"]["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("no connected runner has the labels pool=ext"))
    });

    let token = ok(s.kiln(&["runner", "tokens", "create", "lab"]))
        .trim()
        .to_string();
    let mut a = start_runner(&s, &token, "a", &tmp.path().join("runner-a"));
    let r = wait_run(&s, "ext-ci-1", "runner a runs the slow step", 60, |r| {
        step(r, "slow")["phase"] == "Running"
    });
    assert_eq!(r["status"]["holder"], "default/lab/a", "{r:#}");
    assert!(r["status"].get("waiting").is_none(), "{r:#}");
    let listed = ok(s.kiln(&["runner", "list"]));
    assert!(
        listed.contains("default/lab/a") && listed.contains("pool=ext"),
        "{listed}"
    );

    // Runner a dies mid-step; runner b takes the run once its lease expires and retries the step.
    a.0.kill().unwrap();
    let _ = a.0.wait();
    let killed = Instant::now();
    let _b = start_runner(&s, &token, "b", &tmp.path().join("runner-b"));
    let r = wait_run(&s, "ext-ci-1", "runner b takes the run over", 60, |r| {
        r["status"]["holder"] == "default/lab/b" && step(r, "slow")["phase"] == "Running"
    });
    let taken_after = killed.elapsed();
    assert!(
        taken_after < Duration::from_secs(10 + 4),
        "taken over after {taken_after:?} (the lease is 10 s): {r:#}"
    );
    let r = wait_run(&s, "ext-ci-1", "the gate waits for approval", 60, |r| {
        step(r, "gate")["phase"] == "Waiting"
    });
    assert_eq!(step(&r, "slow")["phase"], "Succeeded", "{r:#}");
    assert_eq!(step(&r, "slow")["attempts"], 2, "{r:#}");
    assert_eq!(step(&r, "gate")["reason"], "waiting for approval: ship it?");
    let log = ok(s.kiln(&["logs", "run", "ext-ci/1"]));
    assert!(
        log.contains(
            "the lease of runner default/lab/a expired; re-queued and taken by default/lab/b"
        ),
        "{log}"
    );
    assert!(log.contains("slow-done"), "{log}");

    // Approval through the CLI lets the run go on.
    let approved = ok(s.kiln(&["approve", "ext-ci/1"]));
    assert!(
        approved.contains("step gate of run ext-ci-1 approved"),
        "{approved}"
    );
    let r = wait_run(&s, "ext-ci-1", "the run succeeds", 60, |r| {
        r["status"]["phase"] == "Succeeded"
    });
    assert_eq!(step(&r, "gate")["approvedBy"], "admin", "{r:#}");
    let again = s.kiln(&["approve", "ext-ci/1"]);
    assert!(!again.status.success());

    // The artifact the step saved on runner b comes back through the server.
    let listed = ok(s.kiln(&["artifacts", "list", "ext-ci/1"]));
    assert!(listed.contains("dist/app"), "{listed}");
    let out = tmp.path().join("app");
    ok(s.kiln(&[
        "artifacts",
        "get",
        "ext-ci/1",
        "dist/app",
        "-o",
        out.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "binary-v2\n");
    let missing = s.kiln(&["artifacts", "get", "ext-ci/1", "dist/nope", "-o", "-"]);
    assert!(
        stderr(&missing).contains("has no artifact dist/nope"),
        "{}",
        stderr(&missing)
    );

    // A step with no retry left fails the run when its runner is lost.
    drop(_b);
    let mut c = start_runner(&s, &token, "c", &tmp.path().join("runner-c"));
    ok(s.kiln(&["pipeline", "run", "ext-once"]));
    wait_run(&s, "ext-once-1", "runner c runs the step", 60, |r| {
        step(r, "slow")["phase"] == "Running"
    });
    c.0.kill().unwrap();
    let _ = c.0.wait();
    let r = wait_run(&s, "ext-once-1", "the run fails", 30, |r| {
        r["status"]["phase"] == "Failed"
    });
    let error = r["status"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("runner default/lab/c was lost while the step ran")
            && error.contains("allows no other attempt"),
        "{r:#}"
    );
    // A token that was deleted is refused.
    ok(s.kiln(&["runner", "tokens", "delete", "lab"]));
    let refused = Command::new(kiln_bin())
        .args(["runner", "--server", &s.url, "--no-docker", "--name", "d"])
        .arg("--dir")
        .arg(tmp.path().join("runner-d"))
        .env("KILN_RUNNER_TOKEN", &token)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("invalid runner token"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn the_built_in_runner_runs_container_steps_beside_a_service() {
    let Some(busybox) = crate::workspaces::busybox_image() else {
        return;
    };
    let service = testsvc::docker_image();
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repository(tmp.path());
    let manifest = format!(
        r#"apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: boxed}}
spec:
  source: {{repository: "{repo}"}}
  services:
    - name: api
      image: {svc}
      environment: {{PORT: "8080", GREETING: from-the-service}}
  steps:
    - name: build
      image: {bb}
      commands: ["echo built-v$(cat version) > out.txt", "echo image=shop/api:v$(cat version) >> $KILN_OUTPUT"]
    - name: call
      image: {bb}
      dependsOn: [build]
      retry: {{attempts: 10, delay: 1s, backoff: 1}}
      commands: ["cat out.txt", "wget -q -O - http://api:8080/env/GREETING"]
"#,
        svc = service.tag,
        bb = busybox.tag,
    );
    let file = tmp.path().join("boxed.yaml");
    std::fs::write(&file, manifest).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));
    let out = s.kiln(&["pipeline", "run", "boxed", "-f"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("built-v2"), "{text}");
    assert!(text.contains("from-the-service"), "{text}");
    let r = run_status(&s, "boxed-1");
    assert_eq!(r["status"]["outputs"]["image"], "shop/api:v2", "{r:#}");
}
