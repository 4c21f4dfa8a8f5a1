//! Container steps and services on the real Docker Engine, with images built `FROM scratch` (a static busybox
//! for the steps, `kiln-testsvc` for the service). When the Engine cannot be reached the test prints `SKIPPED`
//! and passes, except under `CI=true`, where it fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use ci::{execute, Outcome, Report, RunJob, Runner, Signals, StepPhase, StepStatus};
use model::kinds::{PipelineRunSpec, PipelineSpec};
use serde_json::json;

#[derive(Default)]
struct Collect {
    lines: Mutex<Vec<(String, String)>>,
}

impl Report for Collect {
    fn line(&self, source: &str, text: String) {
        self.lines.lock().unwrap().push((source.to_string(), text));
    }
    async fn steps(&self, _steps: &[StepStatus], _commit: Option<&str>) {}
    async fn artifact(&self, _step: &str, _path: &str, _file: &Path) -> Result<(), String> {
        Ok(())
    }
}

impl Collect {
    fn text_of(&self, source: &str) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|(s, _)| s == source)
            .map(|(_, t)| t.clone())
            .collect()
    }
}

async fn docker() -> Option<ci::container::Docker> {
    match ci::container::Docker::connect().await {
        Ok(d) => Some(d),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and the Docker Engine is not reachable: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: the Docker Engine is not reachable: {e}");
            None
        }
    }
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}");
}

#[tokio::test]
async fn container_steps_share_the_checkout_and_reach_services_by_name() {
    let Some(docker) = docker().await else {
        return;
    };
    let busybox = match testsvc::busybox_image() {
        Ok(i) => i,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("CI=true: {e}"),
        Err(e) => return eprintln!("SKIPPED: {e}"),
    };
    let service = testsvc::docker_image();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "--quiet", "--initial-branch=main"]);
    std::fs::write(work.join("version"), "7\n").unwrap();
    git(&work, &["add", "version"]);
    git(&work, &["commit", "--quiet", "-m", "one"]);
    let snapshot: PipelineSpec = serde_json::from_value(json!({
        "source": {"repository": work.to_string_lossy()},
        "services": [{"name": "api", "image": service.tag, "environment": {"PORT": "8080", "NAME": "api-svc"}}],
        "steps": [
            {"name": "build", "image": busybox.tag, "commands": [
                "echo \"version $(cat version) in $PWD as $KILN_STEP\"",
                "echo built > out.txt",
                "echo image=shop/api:$(cat version) >> \"$KILN_OUTPUT\"",
                "test -z \"$HOME_OF_RUNNER\""]},
            {"name": "call", "image": busybox.tag, "dependsOn": ["build"], "retry": {"attempts": 10, "delay": "1s", "backoff": 1},
             "commands": ["cat out.txt", "wget -q -O - http://api:8080/env/NAME"]},
            {"name": "host", "dependsOn": ["build"], "commands": ["test \"$(cat out.txt)\" = built", "echo \"api at $API_HOST\""]},
            {"name": "fails", "image": busybox.tag, "failure": "ignore", "commands": ["exit 4"]},
            {"name": "missing-image", "image": "kiln-no-such-image:1", "failure": "ignore", "commands": ["true"]},
        ],
    }))
    .unwrap();
    let job = RunJob {
        organization: "default".into(),
        name: format!("ct{}-1", std::process::id()),
        epoch: 1,
        spec: PipelineRunSpec {
            pipeline: "ct".into(),
            number: 1,
            event: Default::default(),
            branch: "main".into(),
            commit: None,
            params: BTreeMap::new(),
            snapshot,
            started_by: "test".into(),
            cancel: false,
            trigger: None,
            rerun_of: None,
            approvals: Vec::new(),
        },
        secrets: BTreeMap::new(),
        secret_files: BTreeMap::new(),
        attempts_used: BTreeMap::new(),
    };
    std::env::set_var("HOME_OF_RUNNER", "/root");
    let runner = Runner {
        name: format!("ct{}", std::process::id()),
        capacity: 4,
        cache_dir: None,
        docker: Some(docker.clone()),
    };
    let report = Collect::default();
    let (signals, _cancel, _approvals) = Signals::none();
    let end = execute(&job, &tmp.path().join("run"), &runner, &report, signals).await;
    let show = || format!("{:#?}", report.lines.lock().unwrap());
    assert_eq!(
        end.outcome,
        Outcome::Succeeded,
        "{:?} {}",
        end.error,
        show()
    );
    assert!(
        report
            .text_of("build")
            .contains(&"version 7 in /kiln/src as build".to_string()),
        "{}",
        show()
    );
    assert_eq!(
        end.outputs.get("image").map(String::as_str),
        Some("shop/api:7")
    );
    let call = report.text_of("call");
    assert!(call.contains(&"built".to_string()), "{}", show());
    assert!(call.iter().any(|l| l.contains("api-svc")), "{}", show());
    assert!(report
        .text_of("host")
        .iter()
        .any(|l| l.starts_with("api at ") && l.len() > 7));
    let step = |n: &str| end.steps.iter().find(|s| s.name == n).unwrap().clone();
    assert_eq!(step("fails").exit_code, Some(4));
    assert!(step("fails").ignored);
    let missing = step("missing-image");
    assert_eq!(missing.phase, StepPhase::Failed);
    assert!(missing
        .reason
        .unwrap()
        .contains("is not on the runner's Docker Engine"));
    // The service's own output is in the log, and nothing of the run is left on the Engine.
    assert!(!report.text_of("service/api").is_empty(), "{}", show());
    let left = Command::new("docker")
        .args([
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=kiln.dev/ci-runner={}", runner.name),
        ])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "containers left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    let nets = Command::new("docker")
        .args([
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label=kiln.dev/ci-runner={}", runner.name),
        ])
        .output()
        .unwrap();
    assert!(nets.stdout.is_empty(), "networks left");
    drop(busybox);
}
