//! Health probes against a replica's loopback ports: an HTTP GET (2xx/3xx is healthy) or a TCP connect.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Probe;

/// How long one probe may take.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs one probe; `ports` maps port names to the replica's host ports.
pub(crate) async fn check(probe: &Probe, ports: &BTreeMap<String, u16>) -> bool {
    tokio::time::timeout(PROBE_TIMEOUT, run(probe, ports))
        .await
        .unwrap_or(false)
}

async fn run(probe: &Probe, ports: &BTreeMap<String, u16>) -> bool {
    match probe {
        Probe::Tcp { port } => match ports.get(port) {
            Some(&p) => tcp(p).await,
            None => false,
        },
        Probe::Http { port, path } => match ports.get(port) {
            Some(&p) => http(p, path).await,
            None => false,
        },
    }
}

/// Whether something accepts connections on the loopback port.
pub(crate) async fn tcp(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

async fn http(port: u16, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: kiln-probe\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    // Only the status line matters.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    status_ok(&head)
}

fn status_ok(head: &[u8]) -> bool {
    let line = String::from_utf8_lossy(head);
    let mut parts = line.split_whitespace();
    let version_ok = parts.next().is_some_and(|v| v.starts_with("HTTP/"));
    let code = parts.next().and_then(|c| c.parse::<u16>().ok());
    version_ok && matches!(code, Some(200..=399))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert!(status_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_ok(b"HTTP/1.0 302 Found\r\n"));
        assert!(!status_ok(b"HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(!status_ok(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!status_ok(b""));
    }

    #[tokio::test]
    async fn probes_a_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ");
                let status = if ok { "204 No Content" } else { "500 Oops" };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let ports = BTreeMap::from([("http".to_string(), port)]);
        let http = |path: &str| Probe::Http {
            port: "http".into(),
            path: path.into(),
        };
        assert!(check(&http("/ok"), &ports).await);
        assert!(!check(&http("/bad"), &ports).await);
        assert!(
            check(
                &Probe::Tcp {
                    port: "http".into()
                },
                &ports
            )
            .await
        );
        assert!(
            !check(
                &Probe::Tcp {
                    port: "other".into()
                },
                &ports
            )
            .await
        );
    }
}
