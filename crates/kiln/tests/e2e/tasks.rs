//! Scheduled tasks on the process data plane: runs on the cron schedule and on request, the concurrency policy,
//! each run's exit and output kept, and `kiln logs --run`.

use std::time::{Duration, Instant};

use crate::harness::*;

/// The binding, or `null` while it does not exist yet (the component controller creates it).
fn binding(s: &Server) -> serde_json::Value {
    let out = s.kiln(&[
        "get",
        "releasebinding",
        "tick-dev",
        "-p",
        "cron",
        "-o",
        "json",
    ]);
    if !out.status.success() {
        return serde_json::Value::Null;
    }
    serde_json::from_str(&stdout(&out)).expect("json")
}

fn wait_for(s: &Server, what: &str, limit: Duration, f: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let b = binding(s);
        if f(&b) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {b}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn runs(b: &serde_json::Value) -> Vec<serde_json::Value> {
    b["status"]["runs"].as_array().cloned().unwrap_or_default()
}

#[test]
fn scheduled_tasks_run_on_schedule_and_on_request_and_keep_their_runs() {
    let s = Server::start();
    ok(s.kiln(&["apply", "-f", LOCAL_ENVIRONMENTS]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("task.yaml");
    std::fs::write(
        &file,
        "apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {name: cron}\n---\n\
         apiVersion: kiln.dev/v1\nkind: Component\nmetadata: {name: tick, project: cron}\nspec:\n  \
         type: scheduled-task\n  schedule: \"* * * * *\"\n  timezone: Europe/Paris\n  concurrencyPolicy: Forbid\n  \
         runHistoryLimit: 2\n  workload:\n    \
         command: [sh, -c, 'echo \"run $KILN_RUN starts\"; sleep \"${PAUSE:-4}\"; echo \"run $KILN_RUN ends\"; exit 3']\n",
    )
    .unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));
    wait_for(&s, "never scheduled", Duration::from_secs(30), |b| {
        b["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["reason"] == "Scheduled")
        })
    });

    // A run on request; a second request while it runs is skipped (Forbid).
    ok(s.kiln(&["task", "run", "tick", "--env", "dev", "-p", "cron"]));
    wait_for(
        &s,
        "the requested run never started",
        Duration::from_secs(20),
        |b| runs(b).first().is_some_and(|r| r["state"] == "Running"),
    );
    let first = runs(&binding(&s))[0]["run"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    ok(s.kiln(&["task", "run", "tick", "--env", "dev", "-p", "cron"]));
    let asked = binding(&s)["metadata"]["annotations"]["kiln.dev/run-requested"].clone();
    wait_for(
        &s,
        "the second request was not handled",
        Duration::from_secs(20),
        |b| b["status"]["runRequested"] == asked,
    );
    let now = binding(&s);
    assert_eq!(
        runs(&now).len(),
        1,
        "Forbid must skip the second run: {now}"
    );

    // The run ends with its exit code and last lines kept.
    wait_for(&s, "the run never ended", Duration::from_secs(30), |b| {
        runs(b)
            .iter()
            .any(|r| r["run"] == first && r["state"] == "Failed")
    });
    let b = binding(&s);
    let r = runs(&b).into_iter().find(|r| r["run"] == first).unwrap();
    assert_eq!(r["exitCode"], 3, "{b}");
    assert_eq!(r["message"], "exited with code 3", "{b}");
    assert_eq!(
        r["lastLogs"],
        serde_json::json!([format!("run {first} starts"), format!("run {first} ends")]),
        "{b}"
    );
    let logs = ok(s.kiln(&[
        "logs",
        "tick",
        "--env",
        "dev",
        "-p",
        "cron",
        "--run",
        &first.to_string(),
    ]));
    assert!(
        logs.contains(&format!("run {first} starts"))
            && logs.contains(&format!("run {first} ends")),
        "{logs}"
    );

    // The schedule itself starts a run within the next minute.
    wait_for(
        &s,
        "no scheduled run within a minute",
        Duration::from_secs(75),
        |b| runs(b).iter().any(|r| r["run"].as_u64() > Some(first)),
    );
    let b = binding(&s);
    assert!(b["status"]["nextScheduleTime"].is_string(), "{b}");
    assert!(b["status"]["lastScheduleTime"].is_string(), "{b}");

    // Removing the component stops its runs and forgets them.
    ok(s.kiln(&["delete", "project", "cron"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while s
        .kiln(&["get", "releasebinding", "tick-dev", "-p", "cron"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the binding was never removed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let leftovers = std::fs::read_dir(s.data_dir.join("workloads").join("runs"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "runs left on disk after the delete");
}
