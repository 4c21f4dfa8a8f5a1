//! Readiness checks run by the driver against a replica's published port.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one check may take.
const TIMEOUT: Duration = Duration::from_secs(1);

/// A TCP connect succeeds.
pub async fn tcp(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// An HTTP GET answers 2xx or 3xx.
pub async fn http(addr: SocketAddr, path: &str) -> bool {
    let check = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kiln-probe\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.ok()?;
        // The status line is all that matters: `HTTP/1.1 200 OK`.
        let mut buf = Vec::with_capacity(64);
        let mut chunk = [0u8; 64];
        while !buf.contains(&b'\n') && buf.len() < 1024 {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(tokio::time::timeout(TIMEOUT, check).await, Ok(Some(true)))
}
