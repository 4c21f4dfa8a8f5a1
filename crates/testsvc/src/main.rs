//! `kiln-testsvc`: the workload Kiln's own tests and benchmarks deploy. Standard library only, so that it builds
//! as a static binary for a `FROM scratch` image.
//!
//! It listens on `$PORT` (default 8080) on `$BIND` (default 0.0.0.0) and answers:
//! - `GET /` — `hello from <SERVICE_NAME> (release <KILN_RELEASE>, replica <KILN_REPLICA>)`;
//! - `GET /healthz` — 200, or 503 while the file named by `$UNHEALTHY_FILE` exists;
//! - `GET /env/<NAME>` — the value of an environment variable (404 if unset);
//! - `GET /bytes/<N>` — N bytes of body (throughput measurements);
//! - `GET /upgrade` with `Upgrade: P` — `101 Switching Protocols` to P, then every byte echoed back (a stand-in for
//!   a WebSocket echo server, framing aside);
//! - `GET /exit/<CODE>` — exits the process with that code after answering;
//! - `GET /get/<HOST:PORT>/<PATH>` — makes `GET /<PATH>` to `HOST:PORT` (or, for `$NAME`, to the address in
//!   `$NAME_HOST` and `$NAME_PORT`: a dependency's variables) and answers 200 with the status line and body it
//!   got, or 502 naming what failed (to test what a workload can reach);
//!   (headers named in `$PROPAGATE`, comma-separated, are passed on, as a service propagates a routing header);
//! - anything else — 404.
//!
//! Connections are HTTP/1.1 keep-alive: requests are answered in turn until the client closes, sends
//! `Connection: close` (or speaks HTTP/1.0 without `Connection: keep-alive`), stays idle for 10 s, or has sent
//! 10,000 requests. Request bodies (`Content-Length`) are read and ignored; chunked bodies end the connection.
//!
//! Every request is logged to stdout, unless `$QUIET` is set; `$EXIT_AFTER_MS` makes it exit with code 3 after
//! that many milliseconds, after printing a last line to stderr (a crashing workload for tests).
//!
//! With `$TASK_EXIT` set it is a task instead (a run of a scheduled task for tests): it listens on nothing,
//! prints `run <KILN_RUN> starts`, waits `$TASK_MS` milliseconds (default 0), prints `run <KILN_RUN> ends` (both
//! on stdout) and exits with the code `$TASK_EXIT` names.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// Requests served on one connection before it is closed.
const MAX_REQUESTS_PER_CONNECTION: usize = 10_000;
/// How long a connection may sit idle (or a request take to arrive).
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line or header line accepted.
const MAX_LINE: usize = 16 * 1024;
/// Most header lines accepted per request.
const MAX_HEADERS: usize = 100;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn respond(out: &mut impl Write, status: &str, body: &str, keep_alive: bool) -> bool {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
        body.len()
    )
    .and_then(|_| out.flush())
    .is_ok()
}

/// Reads one line (up to `MAX_LINE` bytes) into `buf`. `None` on end of stream, error, timeout or overlong line.
fn read_line(reader: &mut impl BufRead, buf: &mut String) -> Option<()> {
    buf.clear();
    let n = reader.by_ref().take(MAX_LINE as u64).read_line(buf).ok()?;
    if n == 0 || !buf.ends_with('\n') {
        return None;
    }
    Some(())
}

/// One parsed request head.
struct Request {
    method: String,
    path: String,
    keep_alive: bool,
    content_length: u64,
    chunked: bool,
    /// `Name: value` of the headers to pass on (`$PROPAGATE`).
    propagate: Vec<String>,
    /// The protocol an `Upgrade` header asks for.
    upgrade: Option<String>,
}

fn read_request(reader: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    // Tolerate blank lines between requests (RFC 9112 §2.2).
    loop {
        read_line(reader, &mut line)?;
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("/").to_string();
    let version = parts.next().unwrap_or("HTTP/1.0");
    let mut keep_alive = version == "HTTP/1.1";
    let mut content_length = 0;
    let mut chunked = false;
    let mut headers = 0;
    let wanted = env("PROPAGATE", "");
    let mut propagate = Vec::new();
    let mut upgrade = None;
    loop {
        read_line(reader, &mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        headers += 1;
        if headers > MAX_HEADERS {
            return None;
        }
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if wanted
            .split(',')
            .any(|w| !w.is_empty() && w.trim().eq_ignore_ascii_case(name.trim()))
        {
            propagate.push(format!("{}: {value}", name.trim()));
        }
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = Some(value.to_string());
        }
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = !value.eq_ignore_ascii_case("identity");
        }
    }
    Some(Request {
        method,
        path,
        keep_alive,
        content_length,
        chunked,
        propagate,
        upgrade,
    })
}

fn handle(stream: TcpStream, quiet: bool) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut out = BufWriter::new(write_half);
    for served in 1..=MAX_REQUESTS_PER_CONNECTION {
        let Some(req) = read_request(&mut reader) else {
            return;
        };
        // Skip a body we do not use; a chunked one we do not parse, so that connection ends after this answer.
        if req.content_length > 0
            && std::io::copy(
                &mut reader.by_ref().take(req.content_length),
                &mut std::io::sink(),
            )
            .ok()
                != Some(req.content_length)
        {
            return;
        }
        if let (Some(proto), "/upgrade") = (&req.upgrade, req.path.as_str()) {
            upgraded(reader, out, proto);
            return;
        }
        let keep_alive = req.keep_alive && !req.chunked && served < MAX_REQUESTS_PER_CONNECTION;
        if !quiet {
            println!("{} {}", req.method, req.path);
        }
        if !answer(&mut out, &req.path, &req.propagate, keep_alive) || !keep_alive {
            return;
        }
    }
}

/// Answers one request; false when the answer could not be written.
fn answer(out: &mut impl Write, path: &str, propagate: &[String], keep_alive: bool) -> bool {
    let name = env("SERVICE_NAME", "testsvc");
    match path {
        "/" => {
            let body = format!(
                "hello from {name} (release {}, replica {})\n",
                env("KILN_RELEASE", "-"),
                env("KILN_REPLICA", "-")
            );
            respond(out, "200 OK", &body, keep_alive)
        }
        "/healthz" => {
            let unhealthy = std::env::var("UNHEALTHY_FILE")
                .ok()
                .is_some_and(|f| std::path::Path::new(&f).exists());
            if unhealthy {
                respond(out, "503 Service Unavailable", "unhealthy\n", keep_alive)
            } else {
                respond(out, "200 OK", "ok\n", keep_alive)
            }
        }
        p if p.starts_with("/env/") => match std::env::var(&p[5..]) {
            Ok(v) => respond(out, "200 OK", &format!("{v}\n"), keep_alive),
            Err(_) => respond(out, "404 Not Found", "unset\n", keep_alive),
        },
        p if p.starts_with("/get/") => match fetch(&p[5..], propagate) {
            Ok(got) => respond(out, "200 OK", &got, keep_alive),
            Err(e) => respond(out, "502 Bad Gateway", &format!("{e}\n"), keep_alive),
        },
        p if p.starts_with("/bytes/") => match p[7..].parse::<u64>() {
            Ok(n) => send_bytes(out, n, keep_alive),
            Err(_) => respond(
                out,
                "400 Bad Request",
                "expected /bytes/<count>\n",
                keep_alive,
            ),
        },
        p if p.starts_with("/exit/") => {
            let code: i32 = p[6..].parse().unwrap_or(1);
            respond(out, "200 OK", &format!("exiting with {code}\n"), false);
            eprintln!("exiting with {code} as asked");
            std::process::exit(code);
        }
        _ => respond(out, "404 Not Found", "not found\n", keep_alive),
    }
}

/// Switches to the protocol asked for and echoes every byte back until the client closes (what a WebSocket echo
/// server does, without the framing: proxies only need to pass the upgrade and the bytes).
fn upgraded(mut reader: BufReader<TcpStream>, mut out: BufWriter<TcpStream>, proto: &str) {
    let name = env("SERVICE_NAME", "testsvc");
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: {proto}\r\nX-Served-By: {name}\r\n\r\n"
    );
    if out
        .write_all(head.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return;
    }
    let _ = reader.get_ref().set_read_timeout(None);
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    return;
                }
            }
        }
    }
}

/// Answers with `n` bytes of body (for throughput measurements).
fn send_bytes(out: &mut impl Write, n: u64, keep_alive: bool) -> bool {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    if write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: {connection}\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    // Not on the stack: a static build's threads have small ones.
    static CHUNK: [u8; 64 * 1024] = [b'k'; 64 * 1024];
    let chunk = &CHUNK;
    let mut left = n;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        if out.write_all(&chunk[..take]).is_err() {
            return false;
        }
        left -= take as u64;
    }
    out.flush().is_ok()
}

/// `HOST:PORT/PATH` (or `$NAME/PATH`, where `$NAME_HOST` and `$NAME_PORT` give the address): one HTTP/1.0 GET,
/// answered as `<status line>\n<body>`.
fn fetch(spec: &str, propagate: &[String]) -> Result<String, String> {
    let (addr, path) = spec.split_once('/').unwrap_or((spec, ""));
    let addr = match addr.strip_prefix('$') {
        Some(name) => {
            let var = |suffix: &str| {
                std::env::var(format!("{name}_{suffix}"))
                    .map_err(|_| format!("{name}_{suffix} is not set"))
            };
            format!("{}:{}", var("HOST")?, var("PORT")?)
        }
        None => addr.to_string(),
    };
    let sock: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let mut conn = TcpStream::connect_timeout(&sock, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let extra: String = propagate.iter().map(|h| format!("{h}\r\n")).collect();
    write!(conn, "GET /{path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    match text.split_once("\r\n\r\n") {
        Some((head, body)) => Ok(format!("{}\n{body}", head.lines().next().unwrap_or(""))),
        None if text.is_empty() => Err(format!("{addr} closed the connection without answering")),
        None => Err(format!("{addr} sent no complete answer: {text:?}")),
    }
}

/// The `$TASK_EXIT` mode: print, wait, exit with the code.
fn task(code: i32) -> ! {
    let run = env("KILN_RUN", "?");
    println!("run {run} starts");
    let ms = env("TASK_MS", "0").parse().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(ms));
    println!("run {run} ends");
    std::process::exit(code)
}

fn main() {
    if let Some(code) = std::env::var("TASK_EXIT").ok().and_then(|c| c.parse().ok()) {
        task(code);
    }
    let addr = format!("{}:{}", env("BIND", "0.0.0.0"), env("PORT", "8080"));
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            std::process::exit(2);
        }
    };
    println!("listening on {addr}");
    let quiet = std::env::var_os("QUIET").is_some_and(|v| !v.is_empty());
    if let Some(ms) = std::env::var("EXIT_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            eprintln!("crashing on purpose after {ms} ms");
            std::process::exit(3);
        });
    }
    for stream in listener.incoming().flatten() {
        // A small stack: a connection needs little, and the 1,000-replica benchmark runs many of these.
        let _ = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || handle(stream, quiet));
    }
}
