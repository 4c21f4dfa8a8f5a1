//! External provisioners and the terraform provider: a template that asks for tags waits (saying why) until a
//! `kiln provisioner start` with a key carrying those tags connects; that provisioner builds the workspace with
//! the real `terraform` binary (built-in resources only), its agent dials back, the state is kept between
//! builds, stop keeps the home, delete destroys it; another key's provisioner cannot touch the job, a deleted
//! key is refused.

use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::*;

/// Whether `terraform` runs here; under `CI=true` it must.
fn terraform_available() -> bool {
    let ok = Command::new("terraform")
        .arg("version")
        .env("CHECKPOINT_DISABLE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "terraform is required under CI=true"
        );
        eprintln!(
            "SKIPPED: no `terraform` on the PATH; the terraform provisioner test did not run"
        );
    }
    ok
}

/// Stops the agents a provisioner started under its directory when the test ends, passed or not.
struct AgentsUnder(std::path::PathBuf);

impl Drop for AgentsUnder {
    fn drop(&mut self) {
        kill_agents_under(&self.0);
    }
}

fn start_provisioner(s: &Server, key: &str, name: &str, dir: &std::path::Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(kiln_bin())
            .args([
                "provisioner",
                "start",
                "--name",
                name,
                "--types",
                "terraform",
            ])
            .arg("--dir")
            .arg(dir)
            .env("KILN_URL", &s.url)
            .env("KILN_PROVISIONER_KEY", key)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

fn provisioner_call(s: &Server, key: &str, path: &str, body: &str) -> (u16, String) {
    let auth = format!("Bearer {key}");
    http_request(
        "POST",
        &format!("{}{path}", s.url),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        Some(body.as_bytes()),
    )
    .unwrap()
}

#[test]
fn external_provisioner_with_a_tagged_key_builds_terraform_workspaces() {
    if !terraform_available() {
        return;
    }
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let tpl = tmp.path().join("tpl");
    std::fs::create_dir_all(&tpl).unwrap();
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/templates/terraform");
    std::fs::copy(example.join("main.tf"), tpl.join("main.tf")).unwrap();
    let manifest = std::fs::read_to_string(example.join("template.yaml"))
        .unwrap()
        .replace(
            "  provisioner: terraform\n",
            "  provisioner: terraform\n  provisionerTags:\n    site: lab\n",
        );
    std::fs::write(tpl.join("template.yaml"), manifest).unwrap();
    let pushed = ok(s.kiln(&["template", "push", tpl.to_str().unwrap()]));
    assert!(pushed.contains("template/terraform created"), "{pushed}");

    // No provisioner carries the tag yet: the workspace says why it waits.
    ok(s.kiln(&[
        "workspace",
        "create",
        "dev",
        "-t",
        "terraform",
        "-p",
        "greeting=hi",
        "--no-wait",
    ]));
    let w = s.wait_workspace("dev", "the workspace says why it waits", |w| {
        w["status"]["waiting"].is_string()
    });
    let why = w["status"]["waiting"].as_str().unwrap();
    assert!(
        why.contains("terraform") && why.contains("site=lab") && why.contains("kiln provisioner"),
        "{why}"
    );

    // Keys: administrators make them; the secret is printed once.
    let key = ok(s.kiln(&["provisioner", "keys", "create", "lab", "--tag", "site=lab"]))
        .trim()
        .to_string();
    assert!(key.starts_with("default.lab."), "{key}");
    let other = ok(s.kiln(&[
        "provisioner",
        "keys",
        "create",
        "other",
        "--tag",
        "site=elsewhere",
    ]))
    .trim()
    .to_string();
    let listed = ok(s.kiln(&["provisioner", "keys", "list"]));
    assert!(
        listed.contains("site=lab") && listed.contains("admin"),
        "{listed}"
    );
    assert!(
        !listed.contains(&key[12..]),
        "the secret is never listed: {listed}"
    );
    let dup = s.kiln(&["provisioner", "keys", "create", "lab"]);
    assert!(stderr(&dup).contains("already exists"), "{}", stderr(&dup));
    let bad_tag = s.kiln(&["provisioner", "keys", "create", "x", "--tag", "bad key=1"]);
    assert!(
        stderr(&bad_tag).contains("tags.bad key"),
        "{}",
        stderr(&bad_tag)
    );

    // A wrong key is refused at once, saying what to do.
    let wrong = s.kiln(&[
        "provisioner",
        "start",
        "--key",
        "default.lab.nope",
        "--types",
        "terraform",
    ]);
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("invalid provisioner key"),
        "{}",
        stderr(&wrong)
    );

    // The key's provisioner takes the job and builds it with terraform; the agent dials back.
    let pdir = tmp.path().join("prov");
    let _agents = AgentsUnder(pdir.clone());
    let prov = start_provisioner(&s, &key, "lab-1", &pdir);
    let w = s.wait_workspace("dev", "running with a ready agent", |w| {
        w["status"]["phase"] == "running" && w["status"]["agent"]["lifecycle"] == "ready"
    });
    let uid = w["metadata"]["uid"].as_str().unwrap().to_string();
    let home = pdir.join("terraform/default").join(&uid).join("home");
    assert_eq!(
        std::fs::read_to_string(home.join(".greeting")).unwrap(),
        "hi\n"
    );
    let logs = ok(s.kiln(&["workspace", "logs", "dev"]));
    assert!(
        logs.contains("[queue] taken by provisioner default/lab/lab-1"),
        "{logs}"
    );
    assert!(
        logs.contains("[terraform] Apply complete! Resources: 2 added"),
        "{logs}"
    );
    let out = ok(s.kiln(&["ssh", "dev", "--", "cat", "welcome.txt"]));
    assert_eq!(out.trim(), "hi from dev");
    let live = ok(s.kiln(&["provisioner", "list"]));
    assert!(
        live.contains("default/lab/lab-1")
            && live.contains("external")
            && live.contains("site=lab"),
        "{live}"
    );
    assert!(live.contains("built-in"), "{live}");
    let job = ok(s.kiln(&["get", "provisionerjob", "dev-build-1", "-o", "json"]));
    let job: Value = serde_json::from_str(&job).unwrap();
    assert_eq!(
        job["status"]["outputs"]["home"],
        home.display().to_string(),
        "{job:#}"
    );

    // Another key's provisioner cannot touch the job; the holder's stale epoch is refused.
    let (code, body) = provisioner_call(
        &s,
        &other,
        "/api/v1/provisioner/jobs/default/dev-build-1/renew",
        r#"{"epoch":1}"#,
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("not by one using key other"), "{body}");
    let (code, body) = provisioner_call(
        &s,
        &key,
        "/api/v1/provisioner/jobs/default/dev-build-1/renew",
        r#"{"epoch":7}"#,
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("stale"), "{body}");
    let (code, body) = provisioner_call(&s, &key, "/api/v1/provisioner/acquire", r#"{"name":"x"}"#);
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("types"), "{body}");

    // Stop: terraform destroys the agent (the ephemeral part), the home stays.
    ok(s.kiln(&["workspace", "stop", "dev"]));
    s.wait_workspace("dev", "stopped, agent disconnected", |w| {
        w["status"]["phase"] == "stopped" && w["status"]["agent"]["status"] == "disconnected"
    });
    assert!(home.join(".greeting").is_file());
    let logs = ok(s.kiln(&["workspace", "logs", "dev", "--build", "2"]));
    assert!(logs.contains("1 destroyed"), "{logs}");

    // Start again: the kept state means only the agent is made anew.
    ok(s.kiln(&["workspace", "start", "dev"]));
    let logs = ok(s.kiln(&["workspace", "logs", "dev", "--build", "3"]));
    assert!(
        logs.contains("Resources: 1 added, 0 changed, 0 destroyed"),
        "{logs}"
    );

    // Delete: everything the template made is destroyed, the directory goes.
    ok(s.kiln(&["workspace", "delete", "dev"]));
    s.wait_workspace("dev", "workspace deleted", Value::is_null);
    assert!(!pdir.join("terraform/default").join(&uid).exists());

    // A deleted key is refused from the next request on.
    ok(s.kiln(&["provisioner", "keys", "delete", "lab"]));
    let (code, body) = provisioner_call(
        &s,
        &key,
        "/api/v1/provisioner/acquire?wait=0",
        r#"{"name":"x","types":["terraform"]}"#,
    );
    assert_eq!(code, 401, "{body}");
    drop(prov);
}
