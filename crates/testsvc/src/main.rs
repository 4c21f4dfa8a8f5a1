//! `kiln-testsvc`: the workload Kiln's own tests and benchmarks deploy. Standard library only, so that it builds
//! as a static binary for a `FROM scratch` image.
//!
//! It listens on `$PORT` (default 8080) on `$BIND` (default 0.0.0.0) and answers:
//! - `GET /` — `hello from <SERVICE_NAME> (release <KILN_RELEASE>, replica <KILN_REPLICA>)`;
//! - `GET /healthz` — 200, or 503 while the file named by `$UNHEALTHY_FILE` exists;
//! - `GET /env/<NAME>` — the value of an environment variable (404 if unset);
//! - `GET /exit/<CODE>` — exits the process with that code after answering;
//! - anything else — 404.
//!
//! Every request is logged to stdout; `$EXIT_AFTER_MS` makes it exit with code 3 after that many milliseconds,
//! after printing a last line to stderr (a crashing workload for tests).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

fn handle(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Drain the headers.
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    println!("{method} {path}");
    let name = env("SERVICE_NAME", "testsvc");
    match path {
        "/" => {
            let body = format!(
                "hello from {name} (release {}, replica {})\n",
                env("KILN_RELEASE", "-"),
                env("KILN_REPLICA", "-")
            );
            respond(&mut stream, "200 OK", &body);
        }
        "/healthz" => {
            let unhealthy = std::env::var("UNHEALTHY_FILE")
                .ok()
                .is_some_and(|f| std::path::Path::new(&f).exists());
            if unhealthy {
                respond(&mut stream, "503 Service Unavailable", "unhealthy\n");
            } else {
                respond(&mut stream, "200 OK", "ok\n");
            }
        }
        p if p.starts_with("/env/") => match std::env::var(&p[5..]) {
            Ok(v) => respond(&mut stream, "200 OK", &format!("{v}\n")),
            Err(_) => respond(&mut stream, "404 Not Found", "unset\n"),
        },
        p if p.starts_with("/exit/") => {
            let code: i32 = p[6..].parse().unwrap_or(1);
            respond(&mut stream, "200 OK", &format!("exiting with {code}\n"));
            eprintln!("exiting with {code} as asked");
            std::process::exit(code);
        }
        _ => respond(&mut stream, "404 Not Found", "not found\n"),
    }
}

fn main() {
    let addr = format!("{}:{}", env("BIND", "0.0.0.0"), env("PORT", "8080"));
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            std::process::exit(2);
        }
    };
    println!("listening on {addr}");
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
        std::thread::spawn(move || handle(stream));
    }
}
