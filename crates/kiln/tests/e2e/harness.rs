//! Starting and stopping real `kiln server` processes for tests.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `kiln` binary under test.
pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// `examples/local-environments.yaml`: the dev → staging → prod environments on local data planes.
pub const LOCAL_ENVIRONMENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/local-environments.yaml"
);

/// A free loopback port (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The PostgreSQL admin URL for tests, or `None` (skipping loudly) when unset outside CI. Under `CI=true` an
/// unset URL fails the test: CI must run the PostgreSQL cases.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("KILN_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: KILN_TEST_POSTGRES_URL must be set in CI (see scripts/pg-test-env)")
        }
        _ => {
            eprintln!("SKIPPED {test}: KILN_TEST_POSTGRES_URL unset (run `eval \"$(scripts/pg-test-env)\"` to include PostgreSQL)");
            None
        }
    }
}

/// A fresh, empty PostgreSQL database for one test; returns its URL.
pub fn fresh_postgres_db(admin_url: &str, label: &str) -> String {
    let name = format!("kiln_e2e_{label}_{}", std::process::id());
    let psql = |sql: &str| {
        Command::new("psql")
            .arg(admin_url)
            .arg("-qXc")
            .arg(sql)
            .output()
            .expect("psql runs")
    };
    let _ = psql(&format!("DROP DATABASE IF EXISTS {name}"));
    let out = psql(&format!("CREATE DATABASE {name}"));
    assert!(
        out.status.success(),
        "creating database {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("KILN_TEST_POSTGRES_URL {admin_url:?} has no database path"),
    }
}

/// A running server. Killed (SIGKILL) on drop if still running.
pub struct Server {
    pub child: Option<Child>,
    pub url: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on SQLite in a new temporary data directory and waits for `/readyz`.
    pub fn start() -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("data");
        let mut s = Server::start_in(&dir, None);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server with the given data directory (and PostgreSQL URL, if any) and waits for `/readyz`.
    pub fn start_in(data_dir: &Path, database_url: Option<&str>) -> Server {
        Self::start_with(data_dir, database_url, free_port(), &[])
    }

    pub fn start_with(
        data_dir: &Path,
        database_url: Option<&str>,
        port: u16,
        extra: &[&str],
    ) -> Server {
        let mut cmd = Command::new(kiln_bin());
        cmd.arg("server")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra);
        if let Some(db) = database_url {
            cmd.arg("--database-url").arg(db);
        }
        cmd.env_remove("KILN_DATABASE_URL")
            .env("KILN_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("kiln server starts");
        let s = Server {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            port,
            data_dir: data_dir.to_path_buf(),
            database_url: database_url.map(str::to_string),
            _tmp: None,
        };
        s.wait_ready(Duration::from_secs(30));
        s
    }

    /// Polls `/readyz` until it answers 200.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(resp) = http_get(&format!("{}/readyz", self.url)) {
                if resp.0 == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "server at {} not ready within {timeout:?}",
                self.url
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The owner's API token written at first start.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin-token"))
            .expect("admin-token exists")
            .trim()
            .to_string()
    }

    /// The password the server wrote for `admin` at its first start.
    pub fn admin_password(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin-password"))
            .expect("admin-password written at first start")
            .trim()
            .to_string()
    }

    /// Runs the CLI against this server as the owner.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.kiln_as(&self.admin_token(), args, None)
    }

    /// Pushes a Template manifest (a file without template files) as the owner; the CLI's output.
    pub fn push_template(&self, manifest: &str) -> String {
        let path = self.data_dir.join("template.yaml");
        std::fs::write(&path, manifest).expect("write the template manifest");
        ok(self.kiln(&["template", "push", path.to_str().unwrap()]))
    }

    /// A workspace as `kiln get workspace NAME -o json` prints it; `null` once it is gone.
    pub fn workspace(&self, name: &str) -> serde_json::Value {
        let out = self.kiln(&["get", "workspace", name, "-o", "json"]);
        if !out.status.success() {
            return serde_json::Value::Null;
        }
        serde_json::from_str(&stdout(&out)).expect("json")
    }

    /// Polls a workspace until `f` holds (90 s at most, then fails naming `what`).
    pub fn wait_workspace(
        &self,
        name: &str,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let w = self.workspace(name);
            if f(&w) {
                return w;
            }
            assert!(Instant::now() < deadline, "{what}: {w:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs the CLI with a token and optional standard input.
    pub fn kiln_as(&self, token: &str, args: &[&str], stdin: Option<&str>) -> Output {
        run_kiln(&self.url, token, args, stdin)
    }

    /// SIGKILL, no cleanup: what a crash looks like.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server running");
        let pid = c.id().to_string();
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(&pid)
            .status()
            .expect("kill runs");
        assert!(st.success());
        c.wait().expect("wait for server")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        // Agents of process workspaces outlive their server by design (they redial); a test's must not.
        kill_agents_under(&self.data_dir.join("workspaces"));
    }
}

/// Stops the agents whose `agent.pid` files lie under `dir` (a few levels deep), with their process groups.
/// A pid is signalled only while it is still a `kiln agent`, so a reused pid is left alone.
pub fn kill_agents_under(dir: &Path) {
    fn walk(dir: &Path, depth: u32, found: &mut Vec<u32>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() && depth > 0 {
                walk(&path, depth - 1, found);
            } else if e.file_name() == "agent.pid" {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
                    found.push(pid);
                }
            }
        }
    }
    let mut pids = Vec::new();
    walk(dir, 4, &mut pids);
    for pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("agent") {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs the CLI with `KILN_URL`/`KILN_TOKEN` set and an isolated config path.
pub fn run_kiln(url: &str, token: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(kiln_bin());
    cmd.args(args)
        .env("KILN_URL", url)
        .env("KILN_TOKEN", token)
        .env(
            "KILN_CONFIG",
            std::env::temp_dir().join(format!("kiln-e2e-config-{}.json", std::process::id())),
        )
        .env_remove("KILN_ORG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("kiln runs");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().expect("kiln finishes")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// A minimal blocking HTTP/1.1 GET over loopback: (status, body). Enough for health probes without a client crate.
pub fn http_get(url: &str) -> std::io::Result<(u16, String)> {
    http_request("GET", url, &[], None)
}

/// A minimal blocking HTTP/1.1 request: (status, body).
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<(u16, String)> {
    http_exchange(method, url, headers, body).map(|r| (r.status, r.body))
}

/// A response as [`http_exchange`] reads it.
pub struct HttpResponse {
    pub status: u16,
    /// Header fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first value of a header field.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 exchange on a new connection (no redirects followed), with the response's headers.
pub fn http_exchange(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<HttpResponse> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("http:// URLs only"))?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {host}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    if let Some(b) = body {
        s.write_all(b)?;
    }
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:.200}")))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    Ok(HttpResponse {
        status,
        body: if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
        headers,
    })
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// Kills a background child (its own pid) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An echo service on loopback, a thread per connection; answers its port.
pub fn echo_service() -> u16 {
    let service = TcpListener::bind("127.0.0.1:0").expect("bind the echo service");
    let port = service.local_addr().expect("its address").port();
    std::thread::spawn(move || {
        for conn in service.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// Connects to `port` (waiting up to 20 s for a forwarder to listen there), sends `len` bytes while reading
/// them back, and asserts the echo is exact.
pub fn echo_through(port: u16, len: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "nothing listens on {port}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut c = conn.try_clone().unwrap();
        let p = payload.clone();
        std::thread::spawn(move || c.write_all(&p).unwrap())
    };
    let mut back = vec![0u8; payload.len()];
    conn.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == payload, "the echo through port {port} differs");
}
