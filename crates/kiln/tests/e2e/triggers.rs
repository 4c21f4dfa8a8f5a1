//! Pipeline triggers through the real binary: real `git push`es to a local bare repository, picked up by a poll
//! trigger and announced by webhooks in GitHub's, GitLab's and Gitea's payload formats (signed as those hosts
//! sign them), and a registry's push notification; redeliveries start no second run, and refused deliveries
//! (bad signature, unknown event, malformed payload) leave nothing behind.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;
use crate::pipelines::git;

fn payload(name: &str) -> Value {
    let path = format!(
        "{}/../ci/tests/payloads/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The pipeline tests' bare repository (`version` at 2 on `main`), with the working copy it was made from set
/// up to push to it; answers (bare path, working copy).
fn repository(root: &Path) -> (String, std::path::PathBuf) {
    let (bare, _) = crate::pipelines::repository(root);
    let work = root.join("work");
    git(&work, &["remote", "add", "origin", &bare]);
    (bare, work)
}

/// Commits a change to `file` on the clone's current branch and pushes it; answers the new commit.
fn push_change(work: &Path, file: &str, text: &str, branch: &str) -> String {
    if let Some(dir) = Path::new(file).parent() {
        std::fs::create_dir_all(work.join(dir)).unwrap();
    }
    std::fs::write(work.join(file), text).unwrap();
    git(work, &["add", file]);
    git(
        work,
        &["commit", "--quiet", "-m", &format!("change {file}")],
    );
    git(
        work,
        &["push", "--quiet", "origin", &format!("HEAD:{branch}")],
    );
    git(work, &["rev-parse", "HEAD"])
}

fn runs_of(s: &Server, pipeline: &str) -> Vec<Value> {
    let out = ok(s.kiln(&[
        "get",
        "pipelineruns",
        "-l",
        &format!("kiln.dev/pipeline={pipeline}"),
        "-o",
        "json",
    ]));
    let v: Value = serde_json::from_str(&out).expect("json");
    let mut items = v["items"].as_array().cloned().unwrap_or_default();
    items.sort_by_key(|r| r["spec"]["number"].as_u64());
    items
}

/// Waits until `run` has ended; answers it.
fn ended(s: &Server, run: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = ok(s.kiln(&["get", "pipelinerun", run, "-o", "json"]));
        let v: Value = serde_json::from_str(&out).unwrap();
        if matches!(
            v["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed" | "Canceled")
        ) {
            return v;
        }
        assert!(Instant::now() < deadline, "run {run} did not end: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn deliver(s: &Server, trigger: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let url = format!("{}/api/v1/hooks/default/hooked/{trigger}", s.url);
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let (status, body) = http_request("POST", &url, &all, Some(body)).expect("delivery");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn sign(secret: &str, body: &[u8]) -> String {
    ci::hooks::hex(&ci::hooks::hmac_sha256(secret.as_bytes(), body))
}

#[test]
fn pushes_start_runs_through_polling_and_webhooks() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, work) = repository(tmp.path());
    let manifest = format!(
        r#"apiVersion: kiln.dev/v1
kind: Secret
metadata: {{name: hooks}}
spec:
  stringData: {{github: gh-s3cret, gitlab: gl-t0ken, gitea: tea-s3cret, registry: reg-t0ken}}
---
apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: polled}}
spec:
  source: {{repository: "{repo}"}}
  triggers:
    - name: every-second
      branches: [main, "release/*"]
      poll: {{interval: 1s}}
  steps:
    - name: build
      commands: ["echo $KILN_EVENT $KILN_BRANCH $(cat version)"]
    - name: docs
      when: {{paths: ["docs/*"]}}
      commands: ["echo docs changed"]
---
apiVersion: kiln.dev/v1
kind: Pipeline
metadata: {{name: hooked}}
spec:
  source: {{repository: "{repo}"}}
  triggers:
    - name: gh
      branches: [main]
      webhook: {{provider: github, secret: {{secret: hooks, key: github}}}}
    - name: lab
      webhook: {{provider: gitlab, secret: {{secret: hooks, key: gitlab}}, events: [tag]}}
    - name: tea
      webhook: {{provider: gitea, secret: {{secret: hooks, key: gitea}}, events: [pull_request]}}
    - name: images
      image: {{repository: "shop/*", secret: {{secret: hooks, key: registry}}}}
  steps:
    - name: show
      commands: ["echo event=$KILN_EVENT branch=$KILN_BRANCH commit=$KILN_COMMIT tag=$KILN_TAG pr=$KILN_PULL_REQUEST image=$KILN_IMAGE"]
"#
    );
    let file = tmp.path().join("ci.yaml");
    std::fs::write(&file, manifest).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));

    // Polling: its first read is the baseline; a push afterwards starts a run on the pushed commit, and
    // `when.paths` sees the files the push changed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(s.kiln(&["pipeline", "triggers", "polled"])).contains("refs read at") {
        assert!(
            Instant::now() < deadline,
            "the poll trigger never read the repository"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        runs_of(&s, "polled").is_empty(),
        "the baseline started a run"
    );
    let pushed = push_change(&work, "version", "3\n", "main");
    let deadline = Instant::now() + Duration::from_secs(30);
    while runs_of(&s, "polled").is_empty() {
        assert!(Instant::now() < deadline, "the push started no run");
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = ended(&s, "polled-1");
    assert_eq!(run["status"]["phase"], "Succeeded", "{run}");
    assert_eq!(run["spec"]["event"], "push");
    assert_eq!(run["status"]["commit"], pushed.as_str());
    assert_eq!(run["status"]["steps"][1]["phase"], "Skipped", "{run}");
    let log = ok(s.kiln(&["pipeline", "logs", "polled/1"]));
    assert!(log.contains("[build] push main 3"), "{log}");
    // A push to a branch the trigger does not watch starts nothing; one that changes docs runs that step.
    push_change(&work, "notes.txt", "x", "feature");
    let docs = push_change(&work, "docs/index.md", "# docs", "main");
    let deadline = Instant::now() + Duration::from_secs(30);
    while runs_of(&s, "polled").len() < 2 {
        assert!(Instant::now() < deadline, "the second push started no run");
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = ended(&s, "polled-2");
    assert_eq!(run["status"]["commit"], docs.as_str(), "{run}");
    assert_eq!(run["status"]["steps"][1]["phase"], "Succeeded", "{run}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        runs_of(&s, "polled").len(),
        2,
        "the feature branch started a run"
    );

    // GitHub: a signed push starts a run on the commit it names.
    let main_head = git(&work, &["rev-parse", "HEAD"]);
    let mut gh = payload("github-push");
    gh["after"] = main_head.clone().into();
    gh["before"] = pushed.clone().into();
    let body = gh.to_string().into_bytes();
    let sig = format!("sha256={}", sign("gh-s3cret", &body));
    let headers = [
        ("x-github-event", "push"),
        ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc956b"),
        ("x-hub-signature-256", sig.as_str()),
    ];
    let (status, answer) = deliver(&s, "gh", &headers, &body);
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["runs"][0], "hooked-1");
    let run = ended(&s, "hooked-1");
    assert_eq!(run["status"]["phase"], "Succeeded", "{run}");
    let log = ok(s.kiln(&["pipeline", "logs", "hooked/1"]));
    assert!(
        log.contains(&format!("event=push branch=main commit={main_head}")),
        "{log}"
    );
    // Redelivered: no second run.
    let (status, answer) = deliver(&s, "gh", &headers, &body);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["duplicate"], true, "{answer}");
    assert_eq!(answer["runs"][0], "hooked-1");

    // Refused deliveries: 4xx, and nothing stored (not even the delivery id: the same id, properly signed
    // afterwards, starts a run).
    let fresh = [("x-github-event", "push"), ("x-github-delivery", "d-2")];
    let wrong = format!("sha256={}", sign("not-the-secret", &body));
    let with = |extra: (&'static str, &str)| -> Vec<(&'static str, String)> {
        let mut h: Vec<(&'static str, String)> =
            fresh.iter().map(|(k, v)| (*k, v.to_string())).collect();
        h.push((extra.0, extra.1.to_string()));
        h
    };
    let send = |h: Vec<(&'static str, String)>, body: &[u8]| {
        let refs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        deliver(&s, "gh", &refs, body)
    };
    let (status, answer) = send(with(("x-hub-signature-256", &wrong)), &body);
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .contains("X-Hub-Signature-256 does not match"),
        "{answer}"
    );
    let (status, _) = send(
        fresh.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        &body,
    );
    assert_eq!(status, 401, "an unsigned delivery was taken");
    let malformed = br#"{"ref": "refs/heads/main", "after": 42}"#;
    let (status, answer) = send(
        with((
            "x-hub-signature-256",
            &format!("sha256={}", sign("gh-s3cret", malformed)),
        )),
        malformed,
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("malformed"),
        "{answer}"
    );
    let mut issues = with(("x-hub-signature-256", &sig));
    issues[0].1 = "issues".into();
    let (status, answer) = send(issues, &body);
    assert_eq!(status, 400, "{answer}");
    let mut bad_commit = gh.clone();
    bad_commit["after"] = "--upload-pack=touch /tmp/x".into();
    let bad_body = bad_commit.to_string().into_bytes();
    let (status, answer) = send(
        with((
            "x-hub-signature-256",
            &format!("sha256={}", sign("gh-s3cret", &bad_body)),
        )),
        &bad_body,
    );
    assert_eq!(status, 422, "{answer}");
    assert_eq!(
        runs_of(&s, "hooked").len(),
        1,
        "a refused delivery started a run"
    );
    let (status, answer) = send(with(("x-hub-signature-256", &sig)), &body);
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["runs"][0], "hooked-2");
    // A push to a branch outside the trigger's branches starts nothing.
    let mut other = gh.clone();
    other["ref"] = "refs/heads/feature".into();
    let other = other.to_string().into_bytes();
    let osig = format!("sha256={}", sign("gh-s3cret", &other));
    let (status, answer) = deliver(
        &s,
        "gh",
        &[("x-github-event", "push"), ("x-hub-signature-256", &osig)],
        &other,
    );
    assert_eq!(
        (status, answer["started"].clone()),
        (200, false.into()),
        "{answer}"
    );

    // GitLab: a tag push, with the token.
    let mut tag = payload("gitlab-tag_push");
    tag["after"] = main_head.clone().into();
    tag["checkout_sha"] = main_head.clone().into();
    let body = tag.to_string().into_bytes();
    let (status, answer) = deliver(
        &s,
        "lab",
        &[
            ("x-gitlab-event", "Tag Push Hook"),
            ("x-gitlab-token", "gl-t0ken"),
            (
                "x-gitlab-event-uuid",
                "1f3b5c2e-0000-4000-8000-000000000001",
            ),
        ],
        &body,
    );
    assert_eq!(status, 201, "{answer}");
    let run_name = answer["runs"][0].as_str().unwrap().to_string();
    ended(&s, &run_name);
    let log = ok(s.kiln(&["pipeline", "logs", &run_name]));
    assert!(log.contains("event=tag branch=main"), "{log}");
    assert!(log.contains("tag=v1.0.0"), "{log}");
    let (status, _) = deliver(
        &s,
        "lab",
        &[
            ("x-gitlab-event", "Tag Push Hook"),
            ("x-gitlab-token", "nope"),
        ],
        &body,
    );
    assert_eq!(status, 401);

    // Gitea: a pull request from the feature branch (its head is on no watched branch).
    let feature = git(&work, &["rev-parse", "origin/feature"]);
    let mut pr = payload("gitea-pull_request");
    pr["pull_request"]["head"]["sha"] = feature.clone().into();
    let body = pr.to_string().into_bytes();
    let tsig = sign("tea-s3cret", &body);
    let (status, answer) = deliver(
        &s,
        "tea",
        &[
            ("x-gitea-event", "pull_request"),
            ("x-gitea-delivery", "b3c9c9f4-6d4f-4e6e-9c55-4d7a4c5c0001"),
            ("x-gitea-signature", &tsig),
        ],
        &body,
    );
    assert_eq!(status, 201, "{answer}");
    let run_name = answer["runs"][0].as_str().unwrap().to_string();
    let run = ended(&s, &run_name);
    assert_eq!(run["status"]["phase"], "Succeeded", "{run}");
    let log = ok(s.kiln(&["pipeline", "logs", &run_name]));
    assert!(
        log.contains(&format!(
            "event=pull_request branch=feature commit={feature} tag= pr=3"
        )),
        "{log}"
    );

    // A registry's notification: the tagged manifest push of shop/api starts one run.
    let body = payload("registry-push").to_string().into_bytes();
    let (status, _) = deliver(&s, "images", &[("authorization", "Bearer wrong")], &body);
    assert_eq!(status, 401);
    let (status, answer) = deliver(
        &s,
        "images",
        &[("authorization", "Bearer reg-t0ken")],
        &body,
    );
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["runs"].as_array().unwrap().len(), 1, "{answer}");
    let run_name = answer["runs"][0].as_str().unwrap().to_string();
    ended(&s, &run_name);
    let log = ok(s.kiln(&["pipeline", "logs", &run_name]));
    assert!(
        log.contains("event=image branch=main")
            && log.contains("image=registry.example.com:5000/shop/api:1.4.0@sha256:"),
        "{log}"
    );

    // The triggers' view: URLs to give the hosts, and the last run of each.
    let view = ok(s.kiln(&["pipeline", "triggers", "hooked"]));
    assert!(
        view.contains(&format!("{}/api/v1/hooks/default/hooked/gh", s.url)),
        "{view}"
    );
    assert!(
        view.contains("hooked-2 (Succeeded)")
            || view.contains("hooked-2 (Running)")
            || view.contains("hooked-2 (Pending)"),
        "{view}"
    );
    // Unknown triggers and pipelines answer 404 alike.
    let (status, _) = deliver(&s, "nope", &[], b"{}");
    assert_eq!(status, 404);
}
