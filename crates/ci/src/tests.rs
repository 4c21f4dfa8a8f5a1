use std::process::Command as StdCommand;
use std::sync::Mutex;

use model::kinds::PipelineSpec;
use serde_json::json;

use super::*;

#[derive(Default)]
struct Collect {
    lines: Mutex<Vec<(String, String)>>,
    updates: Mutex<Vec<Vec<StepStatus>>>,
    /// (step, path, contents) of each artifact saved.
    artifacts: Mutex<Vec<(String, String, String)>>,
}

fn runner(capacity: usize) -> Runner {
    Runner {
        name: "test".into(),
        capacity,
        cache_dir: None,
        docker: None,
    }
}

fn signals(cancel: watch::Receiver<bool>) -> Signals {
    let (_, approvals) = watch::channel(Vec::new());
    Signals { cancel, approvals }
}

impl Report for Collect {
    fn line(&self, source: &str, text: String) {
        self.lines.lock().unwrap().push((source.to_string(), text));
    }

    async fn steps(&self, steps: &[StepStatus], _commit: Option<&str>) {
        self.updates.lock().unwrap().push(steps.to_vec());
    }

    async fn artifact(&self, step: &str, path: &str, file: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
        self.artifacts
            .lock()
            .unwrap()
            .push((step.to_string(), path.to_string(), text));
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

fn git(dir: &Path, args: &[&str]) -> String {
    let out = StdCommand::new("git")
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

/// A bare repository with `main` holding `version` = `1` then `2`; answers (its path, the first commit).
fn repo(root: &Path) -> (String, String) {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "--quiet", "--initial-branch=main"]);
    std::fs::write(work.join("version"), "1\n").unwrap();
    git(&work, &["add", "version"]);
    git(&work, &["commit", "--quiet", "-m", "one"]);
    let first = git(&work, &["rev-parse", "HEAD"]);
    std::fs::write(work.join("version"), "2\n").unwrap();
    git(&work, &["commit", "--quiet", "-am", "two"]);
    let bare = root.join("repo.git");
    git(root, &["clone", "--quiet", "--bare", "work", "repo.git"]);
    (bare.to_string_lossy().into_owned(), first)
}

fn job(repo: &str, steps: serde_json::Value) -> RunJob {
    let snapshot: PipelineSpec = serde_json::from_value(json!({
        "source": {"repository": repo},
        "steps": steps,
    }))
    .expect("pipeline decodes");
    RunJob {
        organization: "default".into(),
        name: "ci-1".into(),
        epoch: 1,
        spec: PipelineRunSpec {
            pipeline: "ci".into(),
            number: 1,
            event: Default::default(),
            branch: "main".into(),
            commit: None,
            params: [("GREETING".to_string(), "hello".to_string())].into(),
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
    }
}

fn phase_of(end: &RunEnd, name: &str) -> StepPhase {
    end.steps
        .iter()
        .find(|s| s.name == name)
        .expect("step")
        .phase
}

#[tokio::test]
async fn steps_run_as_a_graph_on_the_checked_out_source() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repo(tmp.path());
    let j = job(
        &repo,
        json!([
            {"name": "read", "commands": ["cat version", "echo \"$GREETING from $KILN_PIPELINE #$KILN_RUN on $KILN_BRANCH\""]},
            {"name": "write", "commands": ["echo built > out.txt"]},
            {"name": "use", "dependsOn": ["read", "write"], "commands": ["cat out.txt"]},
            {"name": "broken", "commands": ["echo going", "exit 3", "echo never"]},
            {"name": "after-broken", "dependsOn": ["broken"], "commands": ["echo no"]},
            {"name": "cleanup", "dependsOn": ["broken"], "when": {"status": ["success", "failure"]}, "commands": ["echo always"]},
            {"name": "flaky-ok", "failure": "ignore", "commands": ["false"]},
            {"name": "after-ignored", "dependsOn": ["flaky-ok"], "commands": ["echo yes"]},
            {"name": "only-tags", "when": {"event": ["tag"]}, "commands": ["echo no"]},
            {"name": "only-release", "when": {"branch": ["release/*"]}, "commands": ["echo no"]},
        ]),
    );
    let report = Collect::default();
    let (_tx, rx) = watch::channel(false);
    let end = execute(
        &j,
        &tmp.path().join("run"),
        &runner(4),
        &report,
        signals(rx),
    )
    .await;

    assert_eq!(end.outcome, Outcome::Failed);
    assert_eq!(
        end.error.as_deref(),
        Some("step broken failed: exit code 3")
    );
    assert_eq!(end.commit.as_deref().map(str::len), Some(40));
    assert_eq!(
        report.text_of("read"),
        [
            "+ cat version",
            "2",
            "+ echo \"$GREETING from $KILN_PIPELINE #$KILN_RUN on $KILN_BRANCH\"",
            "hello from ci #1 on main"
        ]
    );
    assert_eq!(report.text_of("use"), ["+ cat out.txt", "built"]);
    assert_eq!(
        report.text_of("broken"),
        ["+ echo going", "going", "+ exit 3"]
    );
    for (name, phase) in [
        ("read", StepPhase::Succeeded),
        ("use", StepPhase::Succeeded),
        ("broken", StepPhase::Failed),
        ("after-broken", StepPhase::Skipped),
        ("cleanup", StepPhase::Succeeded),
        ("flaky-ok", StepPhase::Failed),
        ("after-ignored", StepPhase::Succeeded),
        ("only-tags", StepPhase::Skipped),
        ("only-release", StepPhase::Skipped),
    ] {
        assert_eq!(phase_of(&end, name), phase, "{name}: {:?}", end.steps);
    }
    let broken = end.steps.iter().find(|s| s.name == "broken").unwrap();
    assert_eq!((broken.exit_code, broken.attempts), (Some(3), 1));
    let skipped = end.steps.iter().find(|s| s.name == "after-broken").unwrap();
    assert_eq!(skipped.reason.as_deref(), Some("broken did not succeed"));
    assert!(
        end.steps
            .iter()
            .find(|s| s.name == "flaky-ok")
            .unwrap()
            .ignored
    );
    // The report saw each step pending, then running, then ended.
    let updates = report.updates.lock().unwrap();
    assert!(updates
        .iter()
        .any(|u| u.iter().any(|s| s.phase == StepPhase::Running)));
}

#[tokio::test]
async fn when_paths_looks_at_the_files_the_push_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, first) = repo(tmp.path());
    let steps = json!([
        {"name": "on-version", "when": {"paths": ["vers*"]}, "commands": ["echo \"$KILN_TRIGGER $KILN_PREVIOUS_COMMIT\""]},
        {"name": "on-docs", "when": {"paths": ["docs/*", "*.md"]}, "commands": ["echo no"]},
    ]);
    let mut pushed = job(&repo, steps.clone());
    pushed.spec.event = model::kinds::Event::Push;
    pushed.spec.trigger = Some(model::kinds::RunTrigger {
        name: "hook".into(),
        before: Some(first.clone()),
        ..Default::default()
    });
    let report = Collect::default();
    let (_tx, rx) = watch::channel(false);
    let end = execute(
        &pushed,
        &tmp.path().join("run"),
        &runner(4),
        &report,
        signals(rx),
    )
    .await;
    assert_eq!(end.outcome, Outcome::Succeeded, "{:?}", end.steps);
    assert_eq!(phase_of(&end, "on-version"), StepPhase::Succeeded);
    assert_eq!(report.text_of("on-version")[1], format!("hook {first}"));
    let docs = end.steps.iter().find(|s| s.name == "on-docs").unwrap();
    assert_eq!(
        (docs.phase, docs.reason.as_deref()),
        (
            StepPhase::Skipped,
            Some("when.paths (docs/*, *.md) matches none of the 1 changed files")
        )
    );

    // Without a previous commit (a manual run, a new branch) the paths are not checked.
    let manual = job(&repo, steps);
    let report = Collect::default();
    let (_tx, rx) = watch::channel(false);
    let end = execute(
        &manual,
        &tmp.path().join("run2"),
        &runner(4),
        &report,
        signals(rx),
    )
    .await;
    assert_eq!(phase_of(&end, "on-docs"), StepPhase::Succeeded);
}

#[tokio::test]
async fn a_run_checks_out_the_commit_it_names() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, first) = repo(tmp.path());
    let mut j = job(&repo, json!([{"name": "v", "commands": ["cat version"]}]));
    j.spec.commit = Some(first.clone());
    let report = Collect::default();
    let (_tx, rx) = watch::channel(false);
    let end = execute(
        &j,
        &tmp.path().join("run"),
        &runner(1),
        &report,
        signals(rx),
    )
    .await;
    assert_eq!(end.outcome, Outcome::Succeeded, "{:?}", report.lines);
    assert_eq!(end.commit.as_deref(), Some(first.as_str()));
    assert_eq!(report.text_of("v"), ["+ cat version", "1"]);
}

#[tokio::test]
async fn a_missing_repository_fails_the_run_at_checkout() {
    let tmp = tempfile::tempdir().unwrap();
    let j = job(
        "/nonexistent/repo.git",
        json!([{"name": "v", "commands": ["true"]}]),
    );
    let report = Collect::default();
    let (_tx, rx) = watch::channel(false);
    let end = execute(
        &j,
        &tmp.path().join("run"),
        &runner(1),
        &report,
        signals(rx),
    )
    .await;
    assert_eq!(end.outcome, Outcome::Failed);
    let error = end.error.clone().unwrap_or_default();
    assert!(error.starts_with("git clone failed: "), "{error}");
    assert_eq!(phase_of(&end, "v"), StepPhase::Skipped);
}

#[tokio::test]
async fn retries_follow_the_policy_and_timeouts_stop_the_attempt() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repo(tmp.path());
    let j = job(
        &repo,
        json!([
            // Fails twice, then succeeds: the counter lives in the shared working directory.
            {"name": "flaky", "retry": {"attempts": 3, "delay": "1s", "backoff": 1.0},
             "commands": ["n=$(cat n 2>/dev/null || echo 0); n=$((n+1)); echo $n > n; test $n -ge 3"]},
            {"name": "slow", "timeout": "1s", "commands": ["sleep 30"]},
        ]),
    );
    let report = Collect::default();
    let (_tx, rx) = watch::channel(false);
    let end = execute(
        &j,
        &tmp.path().join("run"),
        &runner(2),
        &report,
        signals(rx),
    )
    .await;
    let flaky = end.steps.iter().find(|s| s.name == "flaky").unwrap();
    assert_eq!((flaky.phase, flaky.attempts), (StepPhase::Succeeded, 3));
    let retries: Vec<String> = report
        .text_of("flaky")
        .into_iter()
        .filter(|l| l.starts_with("attempt "))
        .collect();
    assert_eq!(
        retries,
        [
            "attempt 1 of 3 failed (exit code 1); retrying in 1.0 s",
            "attempt 2 of 3 failed (exit code 1); retrying in 1.0 s"
        ]
    );
    let slow = end.steps.iter().find(|s| s.name == "slow").unwrap();
    assert_eq!(slow.phase, StepPhase::Failed);
    assert_eq!(slow.reason.as_deref(), Some("timed out after 1s"));
    assert_eq!(end.outcome, Outcome::Failed);
}

#[tokio::test]
async fn cancel_stops_running_steps_and_skips_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repo(tmp.path());
    let marker = tmp.path().join("child.pid");
    let j = job(
        &repo,
        json!([
            {"name": "long", "commands": [format!("sleep 300 & echo $! > {}; wait", marker.display())]},
            {"name": "next", "dependsOn": ["long"], "commands": ["true"]},
        ]),
    );
    let report = Collect::default();
    let (tx, rx) = watch::channel(false);
    let cancel = async {
        while !marker.exists()
            || std::fs::read_to_string(&marker)
                .unwrap_or_default()
                .trim()
                .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tx.send_replace(true);
    };
    let dir = tmp.path().join("run");
    let one = runner(1);
    let (end, ()) = tokio::join!(execute(&j, &dir, &one, &report, signals(rx)), cancel);
    assert_eq!(end.outcome, Outcome::Canceled);
    assert_eq!(phase_of(&end, "long"), StepPhase::Canceled);
    assert_eq!(phase_of(&end, "next"), StepPhase::Skipped);
    // The step's background child went with its process group.
    let pid = std::fs::read_to_string(&marker).unwrap().trim().to_string();
    let alive = || {
        // Gone, or a zombie waiting for its new parent to reap it.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    };
    for _ in 0..100 {
        if !alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(), "sleep {pid} outlived the canceled step");
}

#[tokio::test]
async fn secret_values_are_given_to_their_step_and_masked_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repo(tmp.path());
    let mut j = job(
        &repo,
        json!([
            {"name": "use", "commands": ["echo token is $API_TOKEN", "echo \"$API_TOKEN\" | wc -c"]},
            {"name": "other", "commands": ["echo \"[$API_TOKEN]\""]},
        ]),
    );
    j.secrets.insert(
        "use".into(),
        [("API_TOKEN".to_string(), "s3cr3t-value".to_string())].into(),
    );
    let report = Collect::default();
    let (_tx, rx) = watch::channel(false);
    let end = execute(
        &j,
        &tmp.path().join("run"),
        &runner(2),
        &report,
        signals(rx),
    )
    .await;
    assert_eq!(end.outcome, Outcome::Succeeded);
    assert_eq!(
        report.text_of("use"),
        [
            "+ echo token is $API_TOKEN",
            "token is ********",
            "+ echo \"$API_TOKEN\" | wc -c",
            "13"
        ]
    );
    // Only the step that names the secret gets it.
    assert_eq!(report.text_of("other"), ["+ echo \"[$API_TOKEN]\"", "[]"]);
}

#[tokio::test]
async fn secret_files_are_private_outside_the_checkout_and_masked() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repo(tmp.path());
    let mut j = job(
        &repo,
        json!([
            {"name": "deploy", "commands": [
                "stat -c %a \"$KUBECONFIG\"",
                "case \"$KUBECONFIG\" in \"$PWD\"/*) echo inside;; *) echo outside;; esac",
                "cat \"$KUBECONFIG\"",
            ]},
        ]),
    );
    j.secret_files.insert(
        "deploy".into(),
        [(
            "KUBECONFIG".to_string(),
            "apiVersion: v1\ntoken: abc123\n".to_string(),
        )]
        .into(),
    );
    let report = Collect::default();
    let (_tx, rx) = watch::channel(false);
    let end = execute(
        &j,
        &tmp.path().join("run"),
        &runner(2),
        &report,
        signals(rx),
    )
    .await;
    assert_eq!(end.outcome, Outcome::Succeeded, "{:?}", end.steps);
    let out = report.text_of("deploy");
    assert_eq!(out[1], "600");
    assert_eq!(out[3], "outside");
    // Each line of the value is masked.
    assert_eq!(&out[5..], ["********", "********"]);
}

#[test]
fn masking_covers_longer_values_first_and_each_line_of_a_multi_line_value() {
    let m = Masker::new([
        "abc".to_string(),
        "abcdef".to_string(),
        "line one\nline two".to_string(),
        String::new(),
    ]);
    assert_eq!(m.mask("x abcdef y abc"), "x ******** y ********");
    assert_eq!(m.mask("got line two"), "got ********");
    assert_eq!(m.mask("nothing here"), "nothing here");
}

#[tokio::test]
async fn a_matrix_fans_out_and_outputs_and_artifacts_are_collected() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repo(tmp.path());
    let j = job(
        &repo,
        json!([
            {"name": "test", "matrix": {"V": ["a", "b"], "W": ["1"]},
             "commands": ["echo \"v=$V w=$W\"", "echo \"seen_$V=yes\" >> \"$KILN_OUTPUT\""]},
            {"name": "pack", "dependsOn": ["test"], "artifacts": ["dist"], "commands": [
                "mkdir -p dist/sub", "echo bin > dist/app", "echo x > dist/sub/y",
                "echo artifact=dist/app >> \"$KILN_OUTPUT\"", "echo 'not an output' >> \"$KILN_OUTPUT\""]},
            {"name": "missing", "failure": "ignore", "artifacts": ["nope"], "commands": ["true"]},
        ]),
    );
    let report = Collect::default();
    let (_tx, rx) = watch::channel(false);
    let end = execute(
        &j,
        &tmp.path().join("run"),
        &runner(4),
        &report,
        signals(rx),
    )
    .await;
    assert_eq!(end.outcome, Outcome::Succeeded, "{:?}", end.error);
    let names: Vec<&str> = end.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["test (V=a, W=1)", "test (V=b, W=1)", "pack", "missing"]
    );
    assert_eq!(report.text_of("test (V=b, W=1)")[1], "v=b w=1");
    // pack waited for every expansion of test.
    let pack = end.steps.iter().find(|s| s.name == "pack").unwrap();
    for t in &end.steps[..2] {
        assert!(t.finished_at.as_deref().unwrap() <= pack.started_at.as_deref().unwrap());
    }
    let want: BTreeMap<String, String> = [
        ("artifact", "dist/app"),
        ("seen_a", "yes"),
        ("seen_b", "yes"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into();
    assert_eq!(end.outputs, want);
    assert!(report
        .text_of("pack")
        .iter()
        .any(|l| l.contains("\"not an output\" is not NAME=value")));
    let artifacts = report.artifacts.lock().unwrap().clone();
    assert_eq!(
        artifacts,
        [
            (
                "pack".to_string(),
                "dist/app".to_string(),
                "bin\n".to_string()
            ),
            ("pack".into(), "dist/sub/y".into(), "x\n".into()),
        ]
    );
    let missing = end.steps.iter().find(|s| s.name == "missing").unwrap();
    assert_eq!(missing.phase, StepPhase::Failed);
    assert!(missing.ignored);
    assert_eq!(
        missing.reason.as_deref(),
        Some("artifact nope does not exist after the step")
    );
}

#[tokio::test]
async fn an_approval_step_waits_for_its_approval_or_rejection() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _) = repo(tmp.path());
    let j = job(
        &repo,
        json!([
            {"name": "build", "commands": ["true"]},
            {"name": "gate", "dependsOn": ["build"], "approval": {"message": "ship it?"}},
            {"name": "deploy", "dependsOn": ["gate"], "commands": ["echo deployed"]},
        ]),
    );
    for reject in [false, true] {
        let report = Collect::default();
        let (_cancel_tx, cancel) = watch::channel(false);
        let (approve_tx, approvals) = watch::channel(Vec::new());
        let dir = tmp.path().join(format!("run-{reject}"));
        let approve = async {
            // Only once the gate waits.
            loop {
                let waiting = report.updates.lock().unwrap().iter().any(|u| {
                    u.iter()
                        .any(|s| s.name == "gate" && s.phase == StepPhase::Waiting)
                });
                if waiting {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            approve_tx.send_replace(vec![StepApproval {
                step: "gate".into(),
                by: "ana".into(),
                at: jiff::Timestamp::now().to_string(),
                rejected: reject,
            }]);
        };
        let two = runner(2);
        let run = execute(&j, &dir, &two, &report, Signals { cancel, approvals });
        let (end, ()) = tokio::join!(run, approve);
        let gate = end.steps.iter().find(|s| s.name == "gate").unwrap();
        assert_eq!(gate.approved_by.as_deref(), Some("ana"));
        let waited = report.updates.lock().unwrap().iter().any(|u| {
            u.iter().any(|s| {
                s.name == "gate" && s.reason.as_deref() == Some("waiting for approval: ship it?")
            })
        });
        assert!(waited);
        if reject {
            assert_eq!(end.outcome, Outcome::Failed);
            assert_eq!(gate.reason.as_deref(), Some("rejected by ana"));
            assert_eq!(phase_of(&end, "deploy"), StepPhase::Skipped);
        } else {
            assert_eq!(end.outcome, Outcome::Succeeded, "{:?}", end.error);
            assert_eq!(report.text_of("deploy").last().unwrap(), "deployed");
        }
    }
    // Without an approval the wait ends at the step's timeout.
    let j = job(
        &repo,
        json!([{"name": "gate", "timeout": "1s", "approval": {}}]),
    );
    let report = Collect::default();
    let (_tx, rx) = watch::channel(false);
    let end = execute(
        &j,
        &tmp.path().join("run-late"),
        &runner(1),
        &report,
        signals(rx),
    )
    .await;
    assert_eq!(end.outcome, Outcome::Failed);
    assert_eq!(
        end.steps[0].reason.as_deref(),
        Some("no approval within 1s")
    );
}

#[tokio::test]
async fn a_cache_is_restored_by_the_contents_of_its_key_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, first) = repo(tmp.path());
    let mut r = runner(1);
    r.cache_dir = Some(tmp.path().join("cache"));
    let mut j = job(
        &repo,
        json!([{"name": "build", "cache": {"paths": ["deps"], "files": ["version"]}, "commands": [
            "if test -f deps/marker; then echo \"hit $(cat deps/marker)\"; else echo miss; fi",
            "mkdir -p deps", "test -f deps/marker || echo \"$KILN_RUN\" > deps/marker"]}]),
    );
    let mut seen = Vec::new();
    for (n, commit) in [(1, None), (2, None), (3, Some(first))] {
        j.spec.number = n;
        j.spec.commit = commit;
        let report = Collect::default();
        let (_tx, rx) = watch::channel(false);
        let dir = tmp.path().join(format!("run-{n}"));
        let end = execute(&j, &dir, &r, &report, signals(rx)).await;
        assert_eq!(end.outcome, Outcome::Succeeded, "{:?}", end.error);
        let lines = report.text_of("build");
        seen.push(
            lines
                .iter()
                .find(|l| *l == "miss" || l.starts_with("hit"))
                .cloned()
                .unwrap(),
        );
    }
    // Run 2 has run 1's directory; run 3 is at a commit whose key file differs, so it starts anew.
    assert_eq!(seen, ["miss", "hit 1", "miss"]);
}
