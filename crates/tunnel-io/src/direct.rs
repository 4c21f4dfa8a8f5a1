//! Direct streams: one TCP connection per stream, for the byte streams where throughput and latency matter
//! (port forwarding, SSH).
//!
//! A direct stream starts as an HTTP/1.1 request with `Connection: Upgrade` and `Upgrade: kiln-stream` (and a
//! bearer token); after the server's `101 Switching Protocols` the connection carries the stream's bytes and
//! nothing else: no framing, no masking, no flow control of its own (TCP's is the stream's). A relay between
//! two such connections therefore only moves bytes, which on Linux it does with `splice(2)` through a pipe,
//! so they are never copied into the relaying process.
//!
//! Agents keep a few of them open to the server, idle, for the server to hand out: the server writes the
//! stream's target as one line (`tcp:127.0.0.1:3000\n`, `ssh\n`), and the agent answers one line, `ok` or
//! `error <reason>`, before the stream's bytes.

use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::http::Uri;

use crate::dial::ConnectError;

/// The `Upgrade` token of a direct stream.
pub const UPGRADE: &str = "kiln-stream";
/// The longest target or answer line, newline included.
pub const MAX_LINE: usize = 4096;
/// The largest response head a dialer reads.
const MAX_HEAD: usize = 16 * 1024;
/// The largest error body a dialer keeps.
const MAX_BODY: usize = 16 * 1024;
/// How long a dialer waits for the server's answer (the server waits for the agent's, at most 17 s).
const ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// How long a head or line that came in part may wait for the rest.
const REST_WITHIN: Duration = Duration::from_secs(10);
/// A connection whose peer went away without a word is found out within about this long (TCP keepalive:
/// idle 15 s, then 3 probes 5 s apart), so relays of vanished laptops end.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

/// Sets a direct stream's connection up: no Nagle delay, and keepalive probes so a peer that vanished (a
/// suspended laptop, a cut network) ends the stream instead of holding it, and its workspace's activity,
/// for ever. Every side calls it on every direct stream connection.
pub fn prepare(conn: &TcpStream) {
    let _ = conn.set_nodelay(true);
    #[cfg(target_os = "linux")]
    {
        use rustix::net::sockopt;
        let _ = sockopt::set_socket_keepalive(conn, true);
        let _ = sockopt::set_tcp_keepidle(conn, KEEPALIVE_IDLE);
        let _ = sockopt::set_tcp_keepintvl(conn, KEEPALIVE_INTERVAL);
        let _ = sockopt::set_tcp_keepcnt(conn, KEEPALIVE_PROBES);
    }
}

/// Opens a direct stream: `GET` of `url`'s path and query on its server (`ws://` or `http://`; a direct
/// stream has no TLS of its own, so `wss://` and `https://` are refused and callers use a session's stream
/// instead) with `token` as a bearer token. Returns the connection once the server switched protocols; the
/// stream's first byte is the connection's next.
pub async fn dial(url: &str, token: &str) -> Result<TcpStream, ConnectError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| ConnectError::Request(format!("{url}: {e}")))?;
    let port = match uri.scheme_str() {
        Some("ws" | "http") => uri.port_u16().unwrap_or(80),
        other => {
            return Err(ConnectError::Request(format!(
                "{url}: a direct stream needs a plain ws:// or http:// server, not {}",
                other.unwrap_or("a URL without a scheme")
            )))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| ConnectError::Request(format!("{url}: no host")))?;
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    if token.bytes().any(|b| b.is_ascii_control()) {
        return Err(ConnectError::Request(
            "the token is not a valid header value".into(),
        ));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let mut conn = TcpStream::connect((bare, port))
        .await
        .map_err(|e| ConnectError::Transport(format!("connecting to {host}:{port}: {e}")))?;
    prepare(&conn);
    let authority = match uri.port_u16() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\n\
         Connection: Upgrade\r\nUpgrade: {UPGRADE}\r\n\r\n"
    );
    let broken = |e: io::Error| ConnectError::Transport(format!("{url}: {e}"));
    conn.write_all(request.as_bytes()).await.map_err(broken)?;
    // The head is peeked and then read to its end, so what follows it stays in the socket. The server may
    // wait for the workspace's agent before it answers, but not for ever.
    let head = peek_until(&mut conn, MAX_HEAD, |buf| {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buf) {
            Ok(httparse::Status::Partial) => Ok(None),
            Ok(httparse::Status::Complete(len)) => {
                let length: Option<usize> = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok());
                Ok(Some((response.code.unwrap_or(0), len, length)))
            }
            Err(e) => Err(format!("the server's answer is not HTTP: {e}")),
        }
    });
    let (status, head_len, length) = match tokio::time::timeout(ANSWER_WITHIN, head).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return Err(ConnectError::Transport(format!("{url}: {e}"))),
        Err(_) => {
            return Err(ConnectError::Transport(format!(
                "{url}: no answer within {} s",
                ANSWER_WITHIN.as_secs()
            )))
        }
    };
    let mut head = vec![0u8; head_len];
    conn.read_exact(&mut head).await.map_err(broken)?;
    if status == 101 {
        return Ok(conn);
    }
    // An error: its body says why.
    let want = length.unwrap_or(0).min(MAX_BODY);
    let mut body = vec![0u8; want];
    let got = read_up_to(&mut conn, &mut body).await;
    body.truncate(got);
    Err(ConnectError::Status(
        status,
        problem_detail(&body).unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned()),
    ))
}

/// Reads until `buf` is full or the connection ends; how much was read.
async fn read_up_to(conn: &mut TcpStream, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match conn.read(&mut buf[got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// Peeks at what `conn` received until `done` finds what it looks for in it (`Ok(Some(_))`), without taking
/// anything from the connection.
async fn peek_until<T>(
    conn: &mut TcpStream,
    limit: usize,
    mut done: impl FnMut(&[u8]) -> Result<Option<T>, String>,
) -> io::Result<T> {
    let mut buf = vec![0u8; limit];
    let mut seen = 0;
    let mut since = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let n = conn.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before answering",
            ));
        }
        match done(&buf[..n]) {
            Ok(Some(found)) => return Ok(found),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            Ok(None) if n >= limit => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("no end within {limit} bytes"),
                ))
            }
            Ok(None) => {}
        }
        // Part of it came: peeking again at once would see the same bytes, so wait for the rest (a peek
        // cannot see the peer's end behind them, hence the limit).
        if n == seen {
            if since.elapsed() > REST_WITHIN {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the peer sent part and nothing more for {} s",
                        REST_WITHIN.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        } else {
            seen = n;
            since = Instant::now();
            pause = Duration::from_millis(1);
        }
    }
}

/// The `detail` of a problem document, which says what went wrong better than the whole document.
fn problem_detail(body: &[u8]) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(doc.get("detail")?.as_str()?.to_owned())
}

/// Reads one line (at most [`MAX_LINE`] bytes, ending in `\n`) from `conn`, without its newline; what
/// follows the line stays in the connection.
pub async fn read_line(conn: &mut TcpStream) -> io::Result<String> {
    let len = peek_until(conn, MAX_LINE, |buf| {
        Ok(buf.iter().position(|b| *b == b'\n').map(|end| end + 1))
    })
    .await?;
    let mut line = vec![0u8; len];
    conn.read_exact(&mut line).await?;
    line.pop();
    String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "the line is not UTF-8"))
}

/// Writes one line; `text` loses any newline it has, so it stays one line.
pub async fn write_line(conn: &mut TcpStream, text: &str) -> io::Result<()> {
    let mut line = text.replace(['\r', '\n'], " ");
    let mut end = line.len().min(MAX_LINE - 1);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line.truncate(end);
    line.push('\n');
    conn.write_all(line.as_bytes()).await
}

/// Copies both ways between two TCP connections until both directions ended (each half-closes the other
/// side when its source ends); the bytes moved from `a` to `b` and from `b` to `a`. On Linux the bytes go
/// through a pipe with `splice(2)` and never enter this process.
pub async fn relay_tcp(a: &mut TcpStream, b: &mut TcpStream) -> io::Result<(u64, u64)> {
    #[cfg(target_os = "linux")]
    {
        if let (Ok(ab), Ok(ba)) = (splice::Pipe::new(), splice::Pipe::new()) {
            let (a, b) = (&*a, &*b);
            return tokio::try_join!(ab.pump(a, b), ba.pump(b, a));
        }
        // No pipes to be had (descriptors or the user's pipe quota exhausted): copy instead.
        crate::relay(a, b).await
    }
    #[cfg(not(target_os = "linux"))]
    {
        crate::relay(a, b).await
    }
}

#[cfg(target_os = "linux")]
mod splice {
    use std::io;

    use rustix::pipe::{
        fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags,
    };
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// The largest pipe a direction grows to: the largest an unprivileged process may ask for. Bulk data then
    /// moves in few large calls (measured: a quarter less CPU per byte than with 256 KiB). A pipe starts at
    /// the kernel's default and grows only once a transfer fills it, so idle streams (an SSH session left
    /// open) hold little of the user's pipe quota (`pipe-user-pages-soft`); where the kernel refuses to grow
    /// it, it keeps the size it has.
    const PIPE: usize = 1024 * 1024;

    /// One direction's pipe.
    pub(super) struct Pipe {
        out: rustix::fd::OwnedFd,
        into: rustix::fd::OwnedFd,
        size: usize,
    }

    impl Pipe {
        pub(super) fn new() -> io::Result<Pipe> {
            let (out, into) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
            let size = fcntl_getpipe_size(&into).unwrap_or(64 * 1024);
            Ok(Pipe { out, into, size })
        }

        /// Moves what `from` receives to `to` until `from` ends, then shuts `to`'s write side.
        pub(super) async fn pump(mut self, from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
            let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
            let mut total = 0u64;
            loop {
                // The pipe is empty here, so `EAGAIN` says the socket has nothing to read (a full pipe would
                // say the same and leave tokio believing the socket drained).
                let got = match from.try_io(Interest::READABLE, || {
                    Ok(splice(from, None, &self.into, None, self.size, flags)?)
                }) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        from.readable().await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if got == 0 {
                    let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
                    return Ok(total);
                }
                let mut left = got;
                while left > 0 {
                    match to.try_io(Interest::WRITABLE, || {
                        Ok(splice(&self.out, None, to, None, left, flags)?)
                    }) {
                        Ok(n) => left -= n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                        Err(e) => return Err(e),
                    }
                }
                total += got as u64;
                // A transfer that (about) fills the pipe is bulk: let it move more per call.
                if got >= self.size / 2 && self.size < PIPE {
                    if let Ok(size) = fcntl_setpipe_size(&self.into, PIPE) {
                        self.size = size;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn relay_moves_every_byte_both_ways_and_passes_half_closes_on() {
        // client ⇄ (x relay y) ⇄ server
        let (mut client, mut x) = pair().await;
        let (mut y, mut server) = pair().await;
        let relay = tokio::spawn(async move { relay_tcp(&mut x, &mut y).await });
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let (u, d) = (up.clone(), down.clone());
        let writer = tokio::spawn(async move {
            client.write_all(&u).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(
            got == up,
            "the server read other bytes than the client wrote"
        );
        server.write_all(&d).await.unwrap();
        server.shutdown().await.unwrap();
        assert!(writer.await.unwrap() == down);
        let (ab, ba) = relay.await.unwrap().unwrap();
        assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn lines_are_read_with_what_follows_and_bounded() {
        let (mut a, mut b) = pair().await;
        a.write_all(b"ok\nSSH-2.0-x\r\n").await.unwrap();
        assert_eq!(read_line(&mut b).await.unwrap(), "ok");
        let mut rest = [0u8; 11];
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(
            &rest, b"SSH-2.0-x\r\n",
            "what follows the line stays in the connection"
        );
        // A line that comes in pieces.
        a.write_all(b"error two").await.unwrap();
        let reader = tokio::spawn(async move { (read_line(&mut b).await.unwrap(), b) });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        write_line(&mut a, "\nlines").await.unwrap();
        let (line, mut b) = reader.await.unwrap();
        assert_eq!(line, "error two lines");
        a.write_all(&vec![b'x'; MAX_LINE + 10]).await.unwrap();
        let e = read_line(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // A long line is cut at a character boundary, never inside one.
        let (mut a, mut b) = pair().await;
        write_line(&mut a, &format!("{}é", "x".repeat(MAX_LINE - 2)))
            .await
            .unwrap();
        let line = read_line(&mut b).await.unwrap();
        assert_eq!(line.len(), MAX_LINE - 2);
        drop(a);
        assert!(read_line(&mut b).await.is_err());
    }

    #[tokio::test]
    async fn dialing_reads_the_switch_and_what_follows_it_or_the_refusal() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let problem = r#"{"title":"Conflict","detail":"the agent is \"gone\""}"#;
        let refusal = format!(
            "HTTP/1.1 409 Conflict\r\ncontent-length: {}\r\n\r\n{problem}",
            problem.len()
        );
        let server = tokio::spawn(async move {
            let mut heads = Vec::new();
            for answer in [
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: kiln-stream\r\n\r\nhello",
                refusal.as_str(),
            ] {
                let (mut c, _) = l.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    c.read_exact(&mut b).await.unwrap();
                    head.push(b[0]);
                }
                heads.push(String::from_utf8(head).unwrap());
                c.write_all(answer.as_bytes()).await.unwrap();
            }
            heads
        });
        let url = format!("ws://{addr}/api/v1/x?target=tcp:1");
        let mut conn = dial(&url, "tok").await.unwrap();
        let mut hello = String::new();
        conn.read_to_string(&mut hello).await.unwrap();
        assert_eq!(hello, "hello");
        match dial(&url, "tok").await {
            Err(ConnectError::Status(409, detail)) => assert_eq!(detail, "the agent is \"gone\""),
            other => panic!("expected the refusal, got {other:?}"),
        }
        let heads = server.await.unwrap();
        assert!(heads[0].starts_with("GET /api/v1/x?target=tcp:1 HTTP/1.1\r\n"));
        assert!(heads[0].contains("Authorization: Bearer tok\r\n"));
        assert!(heads[0].contains("Upgrade: kiln-stream\r\n"));
        assert!(matches!(
            dial("wss://example.com/x", "t").await,
            Err(ConnectError::Request(_))
        ));
    }
}
