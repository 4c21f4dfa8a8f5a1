//! Crashes and restarts: every acknowledged write survives SIGKILL (SQLite and PostgreSQL), SIGTERM drains
//! in-flight requests and ends watch streams, and a restart neither forgets nor re-runs the first start.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

const WRITERS: usize = 8;

fn project_url(base: &str, name: &str) -> String {
    format!("{base}/api/v1/orgs/default/projects/{name}")
}

fn project_body(name: &str, description: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "kiln.dev/v1",
        "kind": "Project",
        "metadata": {"name": name, "labels": {"suite": "durability"}},
        "spec": {"description": description},
    }))
    .expect("a JSON body")
}

fn put_project(
    base: &str,
    token: &str,
    name: &str,
    description: &str,
) -> std::io::Result<(u16, String)> {
    let auth = format!("Bearer {token}");
    http_request(
        "PUT",
        &project_url(base, name),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(&project_body(name, description)),
    )
}

fn get_project(base: &str, token: &str, name: &str) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let (code, body) = http_request(
        "GET",
        &project_url(base, name),
        &[("Authorization", &auth)],
        None,
    )
    .unwrap_or_else(|e| panic!("GET {name}: {e}"));
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// What a writer knows about one of its objects: the last description the server acknowledged, and the one it
/// sent without an answer (the crash may or may not have kept it).
#[derive(Debug, Default, Clone)]
struct Written {
    acked: Option<String>,
    unanswered: Option<String>,
    acked_revision: u64,
}

/// Writes Projects from `WRITERS` threads until the server stops answering; each object is created and then
/// updated once, so both inserts and updates are in flight when the crash comes.
fn write_until_crash(s: &mut Server, token: &str) -> HashMap<String, Written> {
    let log: Arc<Mutex<HashMap<String, Written>>> = Arc::default();
    let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (log, acks, stop) = (log.clone(), acks.clone(), stop.clone());
            let (url, token) = (s.url.clone(), token.to_string());
            std::thread::spawn(move || {
                for k in 0.. {
                    let name = format!("crash-{w}-{k}");
                    for version in ["v1", "v2"] {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let description = format!("{name} {version}");
                        log.lock()
                            .unwrap()
                            .entry(name.clone())
                            .or_default()
                            .unanswered = Some(description.clone());
                        let Ok((code, body)) = put_project(&url, &token, &name, &description)
                        else {
                            return; // the server is gone
                        };
                        assert!(
                            code == 200 || code == 201,
                            "PUT {name} answered {code}: {body}"
                        );
                        let obj: Value = serde_json::from_str(&body).expect("the stored object");
                        let revision = obj["metadata"]["resourceVersion"]
                            .as_str()
                            .and_then(|r| r.parse().ok())
                            .expect("resourceVersion");
                        let mut log = log.lock().unwrap();
                        let entry = log.get_mut(&name).expect("entry");
                        entry.acked = entry.unanswered.take();
                        entry.acked_revision = revision;
                        acks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Let the writers get going (and a good number of writes be acknowledged), then crash.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    while started.elapsed() < Duration::from_millis(1500) || acks.load(Ordering::Relaxed) < 40 {
        assert!(Instant::now() < deadline, "writers made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("writer thread");
    }
    let log = log.lock().unwrap().clone();
    log
}

/// After the restart: every acknowledged object holds its acknowledged content (or the newer, unanswered one);
/// objects never acknowledged hold nothing else; the revision sequence goes on and writes work.
fn check_after_restart(s: &Server, token: &str, log: &HashMap<String, Written>) {
    let acked = log.values().filter(|w| w.acked.is_some()).count();
    assert!(
        acked >= 20,
        "only {acked} objects were acknowledged before the crash"
    );
    let mut max_revision = 0;
    for (name, w) in log {
        let (code, obj) = get_project(&s.url, token, name);
        let stored = obj["spec"]["description"].as_str().map(str::to_string);
        match (&w.acked, code) {
            (Some(acked), 200) => {
                let stored = stored.expect("a description");
                assert!(
                    &stored == acked || Some(&stored) == w.unanswered.as_ref(),
                    "{name}: acknowledged {acked:?} (unanswered {:?}) but stored {stored:?}",
                    w.unanswered
                );
            }
            (Some(acked), _) => {
                panic!("{name}: acknowledged {acked:?} but lost after SIGKILL ({code}: {obj})")
            }
            (None, 200) => assert_eq!(
                stored.as_ref(),
                w.unanswered.as_ref(),
                "{name}: never acknowledged, stored with other content"
            ),
            (None, 404) => {}
            (None, _) => panic!("{name}: GET answered {code}: {obj}"),
        }
        max_revision = max_revision.max(w.acked_revision);
    }
    let (code, body) = put_project(&s.url, token, "after-restart", "written after the crash")
        .expect("PUT after restart");
    assert_eq!(
        code, 201,
        "the store accepts writes after the restart: {body}"
    );
    let obj: Value = serde_json::from_str(&body).unwrap();
    let revision: u64 = obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .expect("resourceVersion");
    assert!(
        revision > max_revision,
        "revision {revision} after the restart must follow the acknowledged {max_revision}"
    );
    let (code, obj) = get_project(&s.url, token, "after-restart");
    assert_eq!(code, 200);
    assert_eq!(obj["spec"]["description"], "written after the crash");
    // An update of an object written before the crash works too.
    let (name, _) = log
        .iter()
        .find(|(_, w)| w.acked.is_some())
        .expect("an acknowledged object");
    let (code, body) = put_project(&s.url, token, name, "updated after the crash").unwrap();
    assert_eq!(code, 200, "{body}");
}

fn crash_and_recover(data_dir: &Path, database_url: Option<&str>) {
    let mut s = Server::start_in(data_dir, database_url);
    let token = s.admin_token();
    let log = write_until_crash(&mut s, &token);
    let s = Server::start_in(data_dir, database_url);
    assert_eq!(s.admin_token(), token, "the admin token file survives");
    check_after_restart(&s, &token, &log);
}

#[test]
fn sigkill_during_concurrent_applies_loses_no_acknowledged_write_sqlite() {
    let tmp = tempfile::tempdir().unwrap();
    crash_and_recover(&tmp.path().join("data"), None);
}

#[test]
fn sigkill_during_concurrent_applies_loses_no_acknowledged_write_postgres() {
    let Some(admin) =
        postgres_url("sigkill_during_concurrent_applies_loses_no_acknowledged_write_postgres")
    else {
        return;
    };
    let db = fresh_postgres_db(&admin, "crash");
    let tmp = tempfile::tempdir().unwrap();
    crash_and_recover(&tmp.path().join("data"), Some(&db));
}

/// Reads an HTTP/1.1 response head from a raw stream; returns the status line and the bytes read past the head.
fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return (head, buf[end + 4..].to_vec());
        }
        let n = stream.read(&mut chunk).expect("reading a response head");
        assert!(
            n > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn sigterm_drains_in_flight_requests_and_ends_watches() {
    let s = Server::start();
    let token = s.admin_token();
    let host = format!("127.0.0.1:{}", s.port);

    // A watch stream: open until the server ends it.
    let mut watch = TcpStream::connect(&host).unwrap();
    watch
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        watch,
        "GET /api/v1/orgs/default/projects?watch=true HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let (head, _) = read_head(&mut watch);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // A write whose body is only half sent: in flight when the signal arrives.
    let body = project_body("in-flight", "finished during the drain");
    let (first, rest) = body.split_at(body.len() / 2);
    let mut slow = TcpStream::connect(&host).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        slow,
        "PUT /api/v1/orgs/default/projects/in-flight HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    slow.write_all(first).unwrap();
    slow.flush().unwrap();
    // Make sure the server has the request (a later request on another connection is answered after it is read).
    assert_eq!(http_get(&format!("{}/healthz", s.url)).unwrap().0, 200);

    let mut s = s;
    let data_dir = s.data_dir.clone();
    let stopper = std::thread::spawn(move || {
        let status = s.terminate();
        (status, s)
    });

    // The watch ends cleanly (a final empty chunk, then EOF) once draining starts.
    let mut rest_of_watch = Vec::new();
    watch
        .read_to_end(&mut rest_of_watch)
        .expect("the watch stream ends rather than hanging");
    let tail = String::from_utf8_lossy(&rest_of_watch);
    assert!(
        tail.ends_with("0\r\n\r\n"),
        "the watch stream ends with the last chunk, got {tail:?}"
    );

    // Draining has begun; the half-sent write is still answered.
    slow.write_all(rest).unwrap();
    let mut response = Vec::new();
    slow.read_to_end(&mut response)
        .expect("the in-flight request is answered");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 201"),
        "the in-flight write completes during the drain: {response}"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    while !stopper.is_finished() {
        assert!(
            Instant::now() < deadline,
            "server still running 20s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _s) = stopper.join().expect("terminate");
    assert!(status.success(), "SIGTERM must exit 0, got {status}");

    // What was answered was stored.
    let s = Server::start_in(&data_dir, None);
    let (code, obj) = get_project(&s.url, &s.admin_token(), "in-flight");
    assert_eq!(code, 200, "{obj}");
    assert_eq!(obj["spec"]["description"], "finished during the drain");
}

#[test]
fn restart_keeps_the_admin_token_and_does_not_rerun_first_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut s = Server::start_in(&dir, None);
    let token_file = std::fs::read(dir.join("admin-token")).unwrap();
    let password_file = std::fs::read(dir.join("admin-password")).unwrap();
    let token = s.admin_token();
    let p = tmp.path().join("p.yaml");
    std::fs::write(
        &p,
        "apiVersion: kiln.dev/v1\nkind: Project\nmetadata:\n  name: before-restart\nspec: {}\n",
    )
    .unwrap();
    ok(s.kiln(&["apply", "-f", p.to_str().unwrap()]));
    assert!(next_stdout_line(&mut s).starts_with("Kiln is listening"));
    assert!(s.terminate().success());

    let mut s = Server::start_in(&dir, None);
    let _listening = next_stdout_line(&mut s);
    let second = next_stdout_line(&mut s);
    assert!(
        second.starts_with("Admin token file:"),
        "the second start is not a first start: {second:?}"
    );
    assert_eq!(std::fs::read(dir.join("admin-token")).unwrap(), token_file);
    assert_eq!(
        std::fs::read(dir.join("admin-password")).unwrap(),
        password_file
    );
    let who = ok(s.kiln_as(&token, &["whoami"], None));
    assert!(who.contains("user:      admin"), "{who}");
    let tokens = ok(s.kiln(&["token", "list"]));
    assert_eq!(
        tokens.lines().filter(|l| l.contains("admin-token")).count(),
        1,
        "no second admin token:\n{tokens}"
    );
    let users = ok(s.kiln(&["user", "list"]));
    assert_eq!(
        users.lines().count(),
        2,
        "only the header and admin:\n{users}"
    );
    let projects = ok(s.kiln(&["get", "projects", "-o", "name"]));
    assert!(projects.contains("project/before-restart"), "{projects}");
}

/// The next line the server printed on stdout.
fn next_stdout_line(s: &mut Server) -> String {
    let child = s.child.as_mut().expect("server running");
    let out = child.stdout.as_mut().expect("stdout piped");
    // Read byte by byte so that nothing past the line is buffered away.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).expect("server stdout") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}
