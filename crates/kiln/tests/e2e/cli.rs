//! The CLI against a real server: manifests in and out, bad input, organizations, users, tokens, login, audit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// The OpenChoreo example manifests the model crate's tests decode.
fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/openchoreo")
}

/// Asserts failure and returns stderr.
#[track_caller]
fn fails(o: Output) -> String {
    assert!(
        !o.status.success(),
        "command should have failed:\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    stderr(&o)
}

/// Writes `text` to `dir/name` and returns the path as a string.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write manifest");
    p.display().to_string()
}

fn project(name: &str, labels: &[(&str, &str)]) -> String {
    let mut m = format!("apiVersion: kiln.dev/v1\nkind: Project\nmetadata:\n  name: {name}\n");
    if !labels.is_empty() {
        m.push_str("  labels:\n");
        for (k, v) in labels {
            m.push_str(&format!("    {k}: {v}\n"));
        }
    }
    m.push_str("spec:\n  description: made by the CLI tests\n");
    m
}

/// Names printed by `get KIND -o name`, e.g. `project/web`.
fn names(s: &Server, args: &[&str]) -> Vec<String> {
    ok(s.kiln(args)).lines().map(str::to_string).collect()
}

/// Runs the CLI with only a config file for credentials: no `KILN_TOKEN`, no `KILN_URL`.
fn kiln_with_config(config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(kiln_bin())
        .args(args)
        .env("KILN_CONFIG", config)
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_URL")
        .env_remove("KILN_ORG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln runs");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("kiln finishes")
}

/// `kiln token create` prints the secret on stdout and `token ID for USER created ...` on stderr.
fn create_token(s: &Server, args: &[&str]) -> (String, String) {
    let out = s.kiln(args);
    let err = stderr(&out);
    let secret = ok(out).trim().to_string();
    assert!(secret.starts_with("kiln_"), "token secret: {secret:?}");
    let id = err
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no token id in {err:?}"))
        .to_string();
    (secret, id)
}

const UNAUTHENTICATED: &str = "missing, invalid, expired or revoked credentials";

#[test]
fn apply_seeds_then_get_in_every_format() {
    let s = Server::start();
    let seeds = seeds_dir();
    let seeds = seeds.to_str().expect("utf-8 path");

    let first = ok(s.kiln(&["apply", "-f", seeds]));
    let lines: Vec<&str> = first.lines().collect();
    let files = std::fs::read_dir(seeds).expect("seeds dir").count();
    assert_eq!(lines.len(), files, "one line per manifest:\n{first}");
    assert!(
        lines.iter().all(|l| l.ends_with(" created")),
        "first apply creates everything:\n{first}"
    );
    assert!(lines.contains(&"component/user-service created"), "{first}");
    let second = ok(s.kiln(&["apply", "-f", seeds]));
    assert_eq!(second.lines().count(), files, "{second}");
    assert!(
        second.lines().all(|l| l.ends_with(" unchanged")),
        "applying the same manifests again changes nothing:\n{second}"
    );

    let wide = ok(s.kiln(&["get", "components", "-o", "wide"]));
    let row = wide
        .lines()
        .find(|l| l.starts_with("user-service "))
        .unwrap_or_else(|| panic!("no user-service row:\n{wide}"));
    assert!(
        row.contains("e-commerce-platform") && row.contains("api:8080"),
        "wide row shows project and endpoints: {row}"
    );

    let yaml = ok(s.kiln(&["get", "component", "user-service", "-o", "yaml"]));
    let obj: Value = serde_yaml::from_str(&yaml).expect("-o yaml is YAML");
    assert_eq!(obj["metadata"]["project"], "e-commerce-platform", "{yaml}");
    let spec = &obj["spec"];
    assert_eq!(spec["endpoints"][0]["protocol"], "HTTP", "{yaml}");
    assert_eq!(spec["replicas"], 1, "{yaml}");
    assert_eq!(spec["autoDeploy"], true, "{yaml}");
    for line in ["protocol: HTTP", "replicas: 1", "autoDeploy: true"] {
        assert!(yaml.contains(line), "{line:?} in\n{yaml}");
    }

    let json = ok(s.kiln(&["get", "components", "-o", "json"]));
    let list: Value = serde_json::from_str(&json).expect("-o json is JSON");
    let items = list["items"].as_array().expect("{\"items\": [...]}");
    assert_eq!(items.len(), 1, "{json}");
    assert_eq!(items[0]["metadata"]["name"], "user-service");
    assert_eq!(items[0]["kind"], "Component");

    assert_eq!(
        names(&s, &["get", "components", "-o", "name"]),
        ["component/user-service"]
    );
    assert_eq!(
        names(&s, &["get", "dataplanes", "-o", "name"]),
        [
            "dataplane/development",
            "dataplane/hybrid",
            "dataplane/production"
        ]
    );

    // Label selectors.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "web.yaml", &project("web", &[("tier", "frontend")]));
    write(dir, "db.yaml", &project("db", &[("tier", "backend")]));
    let out = ok(s.kiln(&["apply", "-f", dir.to_str().unwrap()]));
    assert!(
        out.contains("project/web created") && out.contains("project/db created"),
        "{out}"
    );
    assert_eq!(
        names(
            &s,
            &["get", "projects", "-l", "tier=frontend", "-o", "name"]
        ),
        ["project/web"]
    );
    assert_eq!(
        names(&s, &["get", "projects", "-l", "tier=backend", "-o", "name"]),
        ["project/db"]
    );
    let not_frontend = names(
        &s,
        &["get", "projects", "-l", "tier!=frontend", "-o", "name"],
    );
    assert!(
        not_frontend.contains(&"project/db".to_string())
            && !not_frontend.contains(&"project/web".to_string()),
        "{not_frontend:?}"
    );
    let all = names(&s, &["get", "projects", "-o", "name"]);
    for p in ["project/web", "project/db", "project/e-commerce-platform"] {
        assert!(all.contains(&p.to_string()), "{p} in {all:?}");
    }
}

#[test]
fn bad_manifests_name_file_and_field_and_store_nothing() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let home = write(dir, "home.yaml", &project("home", &[]));
    ok(s.kiln(&["apply", "-f", &home]));

    struct Case {
        file: &'static str,
        text: &'static str,
        expect: &'static [&'static str],
        kind: &'static str,
        name: &'static str,
    }
    let cases = [
        Case {
            file: "bad-port.yaml",
            text: "apiVersion: kiln.dev/v1\nkind: Component\nmetadata:\n  name: bad-port\n  project: home\n\
                   spec:\n  type: service\n  source:\n    git:\n      repository: github.com/acme/svc\n\
                   \x20 endpoints:\n    - name: api\n      port: 70000\n",
            expect: &["spec.endpoints[0].port: must be 1-65535"],
            kind: "components",
            name: "bad-port",
        },
        Case {
            file: "malformed.yaml",
            text: "apiVersion: kiln.dev/v1\nkind: Project\nmetadata:\n  name: malformed\n  labels: [a: b\nspec: {}\n",
            expect: &["line 6"],
            kind: "projects",
            name: "malformed",
        },
        Case {
            file: "unknown-field.yaml",
            text: "apiVersion: kiln.dev/v1\nkind: Project\nmetadata:\n  name: unknown-field\nspec:\n  colour: blue\n",
            expect: &["spec.colour", "unknown field"],
            kind: "projects",
            name: "unknown-field",
        },
        Case {
            file: "wrong-api.yaml",
            text: "apiVersion: choreo.dev/v1\nkind: Project\nmetadata:\n  name: wrong-api\nspec: {}\n",
            expect: &["apiVersion", "kiln.dev/v1", "choreo.dev/v1"],
            kind: "projects",
            name: "wrong-api",
        },
        Case {
            file: "upper.yaml",
            text: "apiVersion: kiln.dev/v1\nkind: Project\nmetadata:\n  name: BadName\nspec: {}\n",
            expect: &["metadata.name", "BadName", "upper-case"],
            kind: "projects",
            name: "badname",
        },
        Case {
            file: "env.yaml",
            text: "apiVersion: kiln.dev/v1\nkind: Environment\nmetadata:\n  name: staging\nspec:\n  dataPlaneRef: nowhere\n",
            expect: &["spec.dataPlaneRef", "nowhere"],
            kind: "environments",
            name: "staging",
        },
    ];
    for c in &cases {
        let path = write(dir, c.file, c.text);
        let err = fails(s.kiln(&["apply", "-f", &path]));
        assert!(
            err.contains(&path),
            "{}: stderr names the file:\n{err}",
            c.file
        );
        for e in c.expect {
            assert!(err.contains(e), "{}: stderr has {e:?}:\n{err}", c.file);
        }
        assert!(!err.contains("panicked"), "{err}");
        let stored = ok(s.kiln(&["get", c.kind, "-o", "name"])).to_ascii_lowercase();
        assert!(
            !stored.lines().any(|l| l.ends_with(&format!("/{}", c.name))),
            "{}: nothing may be stored, but get {} shows:\n{stored}",
            c.file,
            c.kind
        );
    }
    let out = s.kiln(&["get", "component", "bad-port", "-p", "home"]);
    assert!(fails(out).contains("not found"));

    // A directory with one bad file among good ones: the good ones still apply, the run fails naming the bad one.
    let mixed = tempfile::tempdir().unwrap();
    write(mixed.path(), "a.yaml", &project("good-one", &[]));
    let bad = write(
        mixed.path(),
        "b.yaml",
        "apiVersion: kiln.dev/v1\nkind: Project\nmetadata:\n  name: Bad\nspec: {}\n",
    );
    let out = s.kiln(&["apply", "-f", mixed.path().to_str().unwrap()]);
    assert!(
        stdout(&out).contains("project/good-one created"),
        "{}",
        stdout(&out)
    );
    let err = fails(out);
    assert!(err.contains(&bad) && err.contains("metadata.name"), "{err}");
}

#[test]
fn describe_shows_spec_and_conditions_and_delete_removes() {
    let s = Server::start();
    let seeds = seeds_dir();
    ok(s.kiln(&["apply", "-f", seeds.to_str().unwrap()]));

    let d = ok(s.kiln(&["describe", "component", "user-service"]));
    for want in [
        "Name:          user-service",
        "Kind:          Component",
        "Project:       e-commerce-platform",
        "Spec:",
        "protocol: HTTP",
        "Conditions:",
        "Events:",
    ] {
        assert!(d.contains(want), "describe shows {want:?}:\n{d}");
    }
    let missing = fails(s.kiln(&["describe", "component", "no-such-thing"]));
    assert!(missing.contains("not found"), "{missing}");

    // Deleting a project that still holds components is accepted: once the Project controller holds it with
    // its finalizer, the delete is pending while the components (and what they deployed) go first, then the
    // project goes.
    wait_for(&s, "the project's finalizer", |s| {
        let out = s.kiln(&["get", "project", "e-commerce-platform", "-o", "json"]);
        let p: Value = serde_json::from_str(&stdout(&out)).unwrap_or(Value::Null);
        p["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "kiln.dev/project"))
    });
    assert!(!ok(s.kiln(&["get", "components", "-o", "name"])).is_empty());
    let out = ok(s.kiln(&["delete", "project", "e-commerce-platform"]));
    assert!(
        out.contains("project/e-commerce-platform deletion requested"),
        "{out}"
    );
    wait_for(&s, "the project and its components to go", |s| {
        !s.kiln(&["get", "project", "e-commerce-platform"])
            .status
            .success()
            && ok(s.kiln(&["get", "components", "-o", "name"])).is_empty()
    });

    // A component goes the same way: accepted, then gone.
    ok(s.kiln(&["apply", "-f", seeds.to_str().unwrap()]));
    let out = ok(s.kiln(&["delete", "component", "user-service"]));
    assert!(
        out.contains("component/user-service deleted")
            || out.contains("component/user-service deletion requested"),
        "{out}"
    );
    wait_for(&s, "the component to go", |s| {
        !s.kiln(&["get", "component", "user-service"])
            .status
            .success()
    });
    let gone = fails(s.kiln(&["get", "component", "user-service"]));
    assert!(gone.contains("not found"), "{gone}");
    assert!(ok(s.kiln(&["get", "components", "-o", "name"])).is_empty());

    // delete -f: what the manifests name goes, the rest stays.
    let dp = seeds_dir().join("dataplane-hybrid.yaml");
    let out = ok(s.kiln(&["delete", "-f", dp.to_str().unwrap()]));
    assert!(out.contains("dataplane/hybrid deleted"), "{out}");
    assert_eq!(
        names(&s, &["get", "dataplanes", "-o", "name"]),
        ["dataplane/development", "dataplane/production"]
    );
    let again = fails(s.kiln(&["delete", "-f", dp.to_str().unwrap()]));
    assert!(again.contains("not found"), "{again}");

    // Manifests from standard input, applied and deleted.
    let text = project("from-stdin", &[]);
    let out = ok(s.kiln_as(&s.admin_token(), &["apply", "-f", "-"], Some(&text)));
    assert_eq!(out.trim(), "project/from-stdin created");
    let out = ok(s.kiln_as(&s.admin_token(), &["delete", "-f", "-"], Some(&text)));
    assert!(
        out.trim() == "project/from-stdin deleted"
            || out.trim() == "project/from-stdin deletion requested (waiting for finalizers)",
        "{out}"
    );
    wait_for(&s, "project from-stdin to go", |s| {
        !s.kiln_as(&s.admin_token(), &["get", "project", "from-stdin"], None)
            .status
            .success()
    });
}

/// Polls `done` until it holds, failing after 30 seconds.
#[track_caller]
fn wait_for(s: &Server, what: &str, done: impl Fn(&Server) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(s) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn organizations_users_logins_and_tokens() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // A superuser creates an organization and is bound as its owner.
    let out = ok(s.kiln(&["org", "create", "team-a"]));
    assert!(out.contains("organization/team-a created"), "{out}");
    let who = ok(s.kiln(&["whoami"]));
    assert!(who.contains("org team-a:"), "{who}");
    let binding = ok(s.kiln(&[
        "--org",
        "team-a",
        "get",
        "rolebinding",
        "admin-owner",
        "-o",
        "json",
    ]));
    let binding: Value = serde_json::from_str(&binding).unwrap();
    assert_eq!(binding["spec"]["roleRef"], "owner", "{binding}");
    assert_eq!(binding["spec"]["subjects"][0]["name"], "admin", "{binding}");
    let orgs = ok(s.kiln(&["org", "list"]));
    assert!(
        orgs.contains("team-a") && orgs.contains("default"),
        "{orgs}"
    );

    // A second organization with an object in it.
    ok(s.kiln(&["org", "create", "team-b"]));
    let secret_project = write(dir, "b.yaml", &project("b-secret", &[]));
    ok(s.kiln(&["--org", "team-b", "apply", "-f", &secret_project]));

    // A user with a generated password logs in with it; later commands use the stored config.
    let out = ok(s.kiln(&[
        "--org", "team-a", "user", "create", "alice", "--role", "viewer",
    ]));
    let password = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap_or_else(|| panic!("no generated password in {out:?}"))
        .to_string();
    let config = dir.join("alice").join("config.json");
    let out = ok(kiln_with_config(
        &config,
        &["login", &s.url, "--username", "alice", "--password-stdin"],
        Some(&format!("{password}\n")),
    ));
    assert!(out.contains("as alice"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config)
        .expect("config written")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the stored token is private");
    let who = ok(kiln_with_config(&config, &["whoami"], None));
    assert!(
        who.contains("user:      alice") && who.contains("org team-a: viewer"),
        "{who}"
    );
    let wrong = fails(kiln_with_config(
        &dir.join("nobody.json"),
        &["login", &s.url, "--username", "alice", "--password-stdin"],
        Some("not-the-password\n"),
    ));
    assert!(
        !dir.join("nobody.json").exists(),
        "a failed login stores nothing: {wrong}"
    );

    // A viewer reads but may not write.
    let (viewer, viewer_id) = create_token(
        &s,
        &["--org", "team-a", "token", "create", "--user", "alice"],
    );
    ok(s.kiln(&[
        "--org",
        "team-a",
        "apply",
        "-f",
        &write(dir, "a.yaml", &project("a-one", &[])),
    ]));
    let seen = ok(s.kiln_as(
        &viewer,
        &["--org", "team-a", "get", "projects", "-o", "name"],
        None,
    ));
    assert!(seen.contains("project/a-one"), "{seen}");
    let attempt = write(dir, "viewer.yaml", &project("viewer-attempt", &[]));
    let err = fails(s.kiln_as(&viewer, &["--org", "team-a", "apply", "-f", &attempt], None));
    assert!(
        err.contains("you may not create Project") && err.contains("viewer"),
        "{err}"
    );
    let listed = ok(s.kiln(&["--org", "team-a", "get", "projects", "-o", "name"]));
    assert!(!listed.contains("viewer-attempt"), "{listed}");

    // Another organization's objects do not exist for alice.
    for args in [
        &["--org", "team-b", "get", "projects"][..],
        &["--org", "team-b", "get", "project", "b-secret"],
        &["--org", "team-b", "describe", "project", "b-secret"],
    ] {
        let err = fails(s.kiln_as(&viewer, args, None));
        assert!(err.contains("not found"), "{args:?}: {err}");
    }

    // An expiring token stops working.
    let (short, short_id) = create_token(
        &s,
        &[
            "token",
            "create",
            "--user",
            "alice",
            "--expires",
            "1s",
            "--name",
            "short",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = s.kiln_as(&short, &["whoami"], None);
        if !out.status.success() {
            let err = stderr(&out);
            assert!(err.contains(UNAUTHENTICATED), "{err}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a 1s token still works after 30s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let tokens = ok(s.kiln(&["token", "list", "--user", "alice"]));
    let row = tokens
        .lines()
        .find(|l| l.starts_with(&short_id))
        .unwrap_or_else(|| panic!("{short_id} in\n{tokens}"));
    let expires = row.split_whitespace().nth(4).unwrap_or_default();
    assert!(expires.starts_with("20"), "the expiry is listed: {row}");

    // A revoked token stops working at once and is listed as revoked.
    let (doomed, doomed_id) = create_token(
        &s,
        &["token", "create", "--user", "alice", "--name", "doomed"],
    );
    assert!(ok(s.kiln_as(&doomed, &["whoami"], None)).contains("alice"));
    let out = ok(s.kiln(&["token", "revoke", &doomed_id]));
    assert!(out.contains(&format!("token {doomed_id} revoked")), "{out}");
    let err = fails(s.kiln_as(&doomed, &["whoami"], None));
    assert!(err.contains(UNAUTHENTICATED), "{err}");
    let err = fails(s.kiln_as(&doomed, &["--org", "team-a", "get", "projects"], None));
    assert!(err.contains(UNAUTHENTICATED), "{err}");
    let tokens = ok(s.kiln(&["token", "list", "--user", "alice"]));
    let state_of = |id: &str| {
        tokens
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} in\n{tokens}"))
            .split_whitespace()
            .nth(3)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(state_of(&doomed_id), "revoked", "{tokens}");
    assert_eq!(state_of(&viewer_id), "active", "{tokens}");
    // The viewer's own token is untouched.
    assert!(ok(s.kiln_as(&viewer, &["whoami"], None)).contains("alice"));
    let unknown = fails(s.kiln(&["token", "revoke", "no-such-token"]));
    assert!(!unknown.is_empty());
}

#[test]
fn audit_lists_writes_and_filters() {
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "one.yaml", &project("audit-one", &[]));
    write(dir, "two.yaml", &project("audit-two", &[]));
    ok(s.kiln(&["apply", "-f", dir.to_str().unwrap()]));
    ok(s.kiln(&["delete", "project", "audit-two"]));
    ok(s.kiln(&["user", "create", "watcher", "--role", "viewer"]));

    let table = ok(s.kiln(&["audit", "--user", "admin"]));
    for want in [
        "PUT /api/v1/orgs/default/projects/audit-one",
        "PUT /api/v1/orgs/default/projects/audit-two",
        "DELETE /api/v1/orgs/default/projects/audit-two",
        "POST /api/v1/users",
    ] {
        assert!(table.contains(want), "{want:?} in\n{table}");
    }
    let nobody = ok(s.kiln(&["audit", "--user", "watcher"]));
    assert!(!nobody.contains("audit-one"), "{nobody}");

    let json = ok(s.kiln(&["audit", "--kind", "Project", "-o", "json"]));
    let v: Value = serde_json::from_str(&json).expect("audit -o json is JSON");
    let items = v["items"].as_array().expect("{\"items\": [...]}");
    assert!(items.len() >= 3, "{json}");
    assert!(
        items.iter().all(|i| i["kind"] == "Project"),
        "--kind Project filters:\n{json}"
    );
    let outcomes: Vec<(&str, &str)> = items
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or_default(),
                i["outcome"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    for want in [
        ("audit-one", "created"),
        ("audit-two", "created"),
        ("audit-two", "deleted"),
    ] {
        assert!(outcomes.contains(&want), "{want:?} in {outcomes:?}");
    }
    assert!(items.iter().all(|i| i["user"] == "admin"), "{json}");
    let users = ok(s.kiln(&["audit", "--kind", "User", "-o", "json"]));
    let v: Value = serde_json::from_str(&users).unwrap();
    let items = v["items"].as_array().unwrap();
    assert!(!items.is_empty(), "{users}");
    assert!(items.iter().all(|i| i["kind"] == "User"), "{users}");

    // Refused writes are audited too.
    let (viewer, _) = create_token(&s, &["token", "create", "--user", "watcher"]);
    let attempt = write(dir, "three.yaml", &project("audit-three", &[]));
    fails(s.kiln_as(&viewer, &["apply", "-f", &attempt], None));
    let json = ok(s.kiln(&["audit", "--user", "watcher", "-o", "json"]));
    let v: Value = serde_json::from_str(&json).unwrap();
    let refused = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "audit-three")
        .unwrap_or_else(|| panic!("refused write audited:\n{json}"));
    assert_eq!(refused["status"], 403, "{refused}");
}

#[test]
fn version_and_completions() {
    let s = Server::start();
    let v = ok(s.kiln(&["version"]));
    let pkg = env!("CARGO_PKG_VERSION");
    assert!(v.contains(&format!("client: kiln {pkg}")), "{v}");
    assert!(v.contains(&format!("server: kiln {pkg}")), "{v}");
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(s.kiln(&["completions", shell]));
        assert!(
            script.len() > 100 && script.contains("kiln"),
            "{shell}:\n{script}"
        );
        assert!(script.contains("apply"), "{shell} completes subcommands");
    }
    fails(s.kiln(&["completions", "tcsh"]));
}
