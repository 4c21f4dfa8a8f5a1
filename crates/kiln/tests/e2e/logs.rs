//! `kiln logs` against real processes: a component running the test service with two replicas logs each request
//! it serves; the CLI reads them from both replicas, one replica, the last lines, since a time, and follows new
//! ones. The API also answers Server-Sent Events, and hides the logs from other organizations.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Waits for the binding to be Ready on its release and returns its replicas' addresses.
fn ready_addresses(s: &Server, name: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = s.kiln(&["get", "releasebinding", name, "-p", "shop", "-o", "json"]);
        if out.status.success() {
            let b: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
            let ready = b["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let addrs: Vec<String> = b["status"]["endpoints"]["http"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect();
            if ready && b["status"]["release"] == b["spec"]["release"] && addrs.len() == 2 {
                return addrs;
            }
        }
        assert!(
            Instant::now() < deadline,
            "binding {name} never became ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `kiln logs …` until its output contains every one of `want` (log capture is asynchronous).
fn logs_until(s: &Server, args: &[&str], want: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = ok(s.kiln(args));
        if want.iter().all(|w| out.contains(w)) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "kiln {args:?} never showed {want:?}:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Deletes the binding if the test fails part-way, so its replicas do not outlive the server.
struct DeleteOnPanic<'a>(&'a Server);

impl Drop for DeleteOnPanic<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let _ = self
            .0
            .kiln(&["delete", "releasebinding", "api-dev", "-p", "shop"]);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline
            && self
                .0
                .kiln(&["get", "releasebinding", "api-dev", "-p", "shop"])
                .status
                .success()
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn logs_from_real_replicas_filtered_tailed_and_followed() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    ok(s.kiln(&["apply", "-f", LOCAL_ENVIRONMENTS]));
    let app = format!(
        "apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {{name: shop}}\n---\napiVersion: kiln.dev/v1\nkind: Component\n\
         metadata: {{name: api, project: shop}}\nspec:\n  type: service\n  replicas: 2\n  workload:\n    command: [{:?}]\n    \
         env: [{{name: SERVICE_NAME, value: api}}]\n  endpoints: [{{name: http, port: 8080, visibility: public}}]\n  probes:\n    \
         readiness: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}\n",
        testsvc::binary().display()
    );
    let file = dir.path().join("app.yaml");
    std::fs::write(&file, app).unwrap();
    ok(s.kiln(&["apply", "-f", file.to_str().unwrap()]));
    let _cleanup = DeleteOnPanic(&s);
    let addrs = ready_addresses(&s, "api-dev");

    // Which address is which replica: the service says so.
    let mut by_replica = vec![String::new(); 2];
    for a in &addrs {
        let (_, body) = http_get(&format!("http://{a}/")).unwrap();
        let i: usize = if body.contains("replica 1") { 1 } else { 0 };
        by_replica[i] = a.clone();
    }
    assert!(
        by_replica.iter().all(|a| !a.is_empty()),
        "{addrs:?} → {by_replica:?}"
    );
    for (i, a) in by_replica.iter().enumerate() {
        for n in 0..3 {
            http_get(&format!("http://{a}/mark-r{i}-{n}")).unwrap();
        }
    }

    // Both replicas, in order of time, each line tagged with its replica.
    let all = logs_until(
        &s,
        &["logs", "api", "--env", "dev"],
        &["[r0] GET /mark-r0-2", "[r1] GET /mark-r1-2"],
    );
    for i in 0..2 {
        let marks: Vec<&str> = all
            .lines()
            .filter(|l| l.contains(&format!("/mark-r{i}-")))
            .collect();
        assert_eq!(
            marks,
            (0..3)
                .map(|n| format!("[r{i}] GET /mark-r{i}-{n}"))
                .collect::<Vec<_>>(),
            "{all}"
        );
    }

    // One replica.
    let one = ok(s.kiln(&[
        "logs",
        "api",
        "--env",
        "dev",
        "--replica",
        "1",
        "-p",
        "shop",
    ]));
    assert!(one.contains("[r1] GET /mark-r1-0"), "{one}");
    assert!(
        one.lines().all(|l| l.starts_with("[r1] ")),
        "only replica 1:\n{one}"
    );

    // The last line of each replica; of one replica, exactly one line.
    let tail = ok(s.kiln(&["logs", "api", "--env", "dev", "--tail", "1"]));
    let lines: Vec<&str> = tail.lines().collect();
    assert!(
        lines.len() <= 2
            && lines.iter().filter(|l| l.starts_with("[r0] ")).count() <= 1
            && lines.iter().filter(|l| l.starts_with("[r1] ")).count() <= 1,
        "--tail 1 gives at most one line per replica:\n{tail}"
    );
    let tail = ok(s.kiln(&[
        "logs",
        "api",
        "--env",
        "dev",
        "--tail",
        "1",
        "--replica",
        "0",
    ]));
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.starts_with("[r0] "), "{tail}");

    // Since a time: what came before is left out; with --timestamps each line starts with its time.
    std::thread::sleep(Duration::from_millis(50));
    let cut = jiff::Timestamp::now();
    std::thread::sleep(Duration::from_millis(50));
    http_get(&format!("http://{}/late", by_replica[0])).unwrap();
    let since = logs_until(
        &s,
        &[
            "logs",
            "api",
            "--env",
            "dev",
            "--since",
            &cut.to_string(),
            "--timestamps",
        ],
        &["[r0] GET /late"],
    );
    assert!(!since.contains("/mark-"), "{since}");
    for l in since.lines() {
        let (time, rest) = l.split_once(' ').unwrap_or_else(|| panic!("{l:?}"));
        let t: jiff::Timestamp = time.parse().unwrap_or_else(|e| panic!("{l:?}: {e}"));
        assert!(t >= cut, "{l:?} is before {cut}");
        assert!(rest.starts_with("[r"), "{l:?}");
    }
    let recent = ok(s.kiln(&["logs", "api", "--env", "dev", "--since", "10m"]));
    assert!(
        recent.contains("/mark-r0-0") && recent.contains("/late"),
        "{recent}"
    );

    // Following: a line written after the CLI started shows up while it runs.
    let mut child = Command::new(kiln_bin())
        .args(["logs", "api", "--env", "dev", "-f", "--tail", "0"])
        .env("KILN_URL", &s.url)
        .env("KILN_TOKEN", s.admin_token())
        .env("KILN_CONFIG", dir.path().join("config.json"))
        .env_remove("KILN_ORG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln logs -f runs");
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let followed = 'wait: loop {
        // Keep writing until the follower has subscribed and passes a line on.
        http_get(&format!("http://{}/followed", by_replica[1])).unwrap();
        let until = Instant::now() + Duration::from_millis(300);
        while let Ok(line) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            let hit = line == "[r1] GET /followed";
            seen.push(line);
            if hit {
                break 'wait true;
            }
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    assert!(
        child.try_wait().unwrap().is_none(),
        "kiln logs -f exited on its own"
    );
    child.kill().unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(
        followed,
        "kiln logs -f never showed a new line: {seen:?} ({status})"
    );
    assert!(
        seen.iter().all(|l| !l.contains("/mark-")),
        "--tail 0 replays nothing: {seen:?}"
    );

    // Server-Sent Events for the console.
    let token = s.admin_token();
    let auth = format!("Bearer {token}");
    let (code, body) = http_request(
        "GET",
        &format!(
            "{}/api/v1/orgs/default/projects/shop/components/api/logs?env=dev&replica=0",
            s.url
        ),
        &[("Authorization", &auth), ("Accept", "text/event-stream")],
        None,
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let events: Vec<serde_json::Value> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{d:?}: {e}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["line"] == "GET /mark-r0-1" && e["replica"] == 0 && e["stream"] == "stdout"),
        "{body}"
    );

    // Errors name what is wrong, on stderr, with a failing exit.
    let out = s.kiln(&["logs", "api", "--env", "nowhere"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("environment nowhere does not exist"),
        "{}",
        stderr(&out)
    );
    let out = s.kiln(&["logs", "api", "--env", "prod"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not deployed in environment prod"),
        "{}",
        stderr(&out)
    );
    let out = s.kiln(&["logs", "api", "--env", "dev", "--since", "yesterday"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("since="), "{}", stderr(&out));

    // A viewer of another organization does not learn the component exists.
    ok(s.kiln(&["org", "create", "elsewhere"]));
    ok(s.kiln(&[
        "--org",
        "elsewhere",
        "user",
        "create",
        "eve",
        "--role",
        "viewer",
    ]));
    let eve = ok(s.kiln(&["--org", "elsewhere", "token", "create", "--user", "eve"]))
        .trim()
        .to_string();
    let out = s.kiln_as(&eve, &["logs", "api", "--env", "dev", "-p", "shop"], None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("not found") && !err.contains("GET /"), "{err}");

    // Deleting the binding stops the processes.
    ok(s.kiln(&["delete", "releasebinding", "api-dev", "-p", "shop"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while by_replica
        .iter()
        .any(|a| http_get(&format!("http://{a}/")).is_ok())
    {
        assert!(
            Instant::now() < deadline,
            "replicas kept running after their binding was deleted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
