//! HTTP/1.1 as the gateway's forwarding path sees it: a request head from a client, the head it forwards to a
//! backend, a backend's response head, the head it forwards back, and the end of a chunked body. Pure functions
//! over bytes; the I/O lives in the server.
//!
//! The forwarding path takes the common case only. Anything else in a request head (HTTP/1.0, a chunked or
//! upgrading request, `Expect`, an absolute-form target, a missing or doubled `Host`, conflicting lengths, the
//! console's session cookie) is [`Parse::Fallback`]: the caller hands the connection to the general HTTP server,
//! which serves every case. A response head it cannot forward is a [`BadResponse`] (the caller answers 502).
//!
//! Bodies are forwarded verbatim in their transfer coding, so the path never decodes one; [`Chunked`] only finds
//! where a chunked body ends.

use std::fmt;
use std::io::Write as _;

pub use httparse::{Header, EMPTY_HEADER};

/// The largest request or response head accepted, in bytes.
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in one head.
pub const MAX_HEADERS: usize = 100;

/// The outcome of parsing a request head.
#[derive(Debug)]
pub enum Parse<T> {
    /// More bytes are needed.
    Partial,
    /// A head the forwarding path handles.
    Done(T),
    /// Not for the forwarding path (the reason says why); the general server takes the connection.
    Fallback(&'static str),
}

/// A client's request head that the forwarding path handles.
#[derive(Debug)]
pub struct Request<'h, 'b> {
    /// Bytes of the head, up to and including the blank line.
    pub head_len: usize,
    pub method: &'b str,
    /// The target's path (origin form: starts with `/`), without the query.
    pub path: &'b str,
    pub query: Option<&'b str>,
    /// The one `Host` header's value.
    pub host: &'b str,
    /// The body's length (`None`: no `Content-Length`, so no body).
    pub content_length: Option<u64>,
    /// The client asked to close the connection after this exchange.
    pub close: bool,
    pub headers: &'h [Header<'b>],
    /// The head has a `Connection` header.
    connection: bool,
}

impl Request<'_, '_> {
    /// The body's length in bytes.
    pub fn body_len(&self) -> u64 {
        self.content_length.unwrap_or(0)
    }
}

fn is(name: &str, wanted: &str) -> bool {
    name.eq_ignore_ascii_case(wanted)
}

/// The comma-separated tokens of every `Connection` header.
fn connection_tokens<'h, 'b>(headers: &'h [Header<'b>]) -> impl Iterator<Item = &'b [u8]> + 'h {
    headers
        .iter()
        .filter(|h| is(h.name, "connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn has_token(headers: &[Header<'_>], token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The headers that describe one connection and are never forwarded (RFC 9110 §7.6.1), besides those the
/// `Connection` header names. `transfer-encoding` is handled apart: see [`write_response_head`]. Matched by
/// length first: this runs for every header of every forwarded message.
fn fixed_hop_by_hop(name: &str) -> bool {
    match name.len() {
        2 => is(name, "te"),
        7 => is(name, "upgrade"),
        10 => is(name, "connection") || is(name, "keep-alive"),
        16 => is(name, "proxy-connection"),
        18 => is(name, "proxy-authenticate"),
        19 => is(name, "proxy-authorization"),
        _ => false,
    }
}

/// The headers the gateway sets itself on forwarded requests (a client's values are replaced).
fn set_by_gateway(name: &str) -> bool {
    match name.len() {
        15 => is(name, "x-forwarded-for"),
        16 => is(name, "x-forwarded-host"),
        17 => is(name, "x-forwarded-proto"),
        18 => is(name, "x-forwarded-prefix"),
        _ => false,
    }
}

/// Whether a header is not forwarded: hop-by-hop, or named by `Connection` (`connection`: the message has a
/// `Connection` header at all).
fn hop_by_hop(headers: &[Header<'_>], name: &str, connection: bool) -> bool {
    fixed_hop_by_hop(name) || (connection && has_token(headers, name))
}

/// A `Content-Length` value: decimal digits only, at most 19 of them (so it fits a u64).
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The message's `Content-Length`: `Ok(None)` when absent, `Err` when malformed or when several disagree.
fn lengths(headers: &[Header<'_>]) -> Result<Option<u64>, ()> {
    let mut found = None;
    for h in headers.iter().filter(|h| is(h.name, "content-length")) {
        let n = content_length(h.value.trim_ascii()).ok_or(())?;
        if found.is_some_and(|f| f != n) {
            return Err(());
        }
        found = Some(n);
    }
    Ok(found)
}

/// Parses a request head at the start of `buf`. `session_cookie` is the console's session cookie name: a
/// request carrying it falls back, so the general server can strip it before forwarding.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut [Header<'b>],
    session_cookie: &str,
) -> Parse<Request<'h, 'b>> {
    let mut req = httparse::Request::new(storage);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Parse::Fallback("head too large")
        }
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Fallback("not a valid HTTP/1 request head"),
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parse::Fallback("not HTTP/1.1");
    };
    if !target.starts_with('/') {
        return Parse::Fallback("not an origin-form target");
    }
    let headers: &'h [Header<'b>] = req.headers;
    let mut host = None;
    let mut connection = false;
    for h in headers {
        let n = h.name;
        if is(n, "connection") {
            connection = true;
        } else if is(n, "host") {
            if host.is_some() {
                return Parse::Fallback("several Host headers");
            }
            host = Some(h.value);
        } else if is(n, "transfer-encoding") || is(n, "upgrade") || is(n, "expect") {
            return Parse::Fallback("a transfer coding, upgrade or expectation");
        } else if is(n, "cookie") && contains(h.value, session_cookie.as_bytes()) {
            return Parse::Fallback("the console's session cookie");
        }
    }
    let Some(host) = host
        .filter(|v| !v.is_empty() && v.iter().all(u8::is_ascii_graphic))
        .and_then(|v| std::str::from_utf8(v).ok())
    else {
        return Parse::Fallback("no valid Host header");
    };
    if connection && has_token(headers, "upgrade") {
        return Parse::Fallback("an upgrade");
    }
    let Ok(content_length) = lengths(headers) else {
        return Parse::Fallback("an invalid Content-Length");
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    Parse::Done(Request {
        head_len,
        method,
        path,
        query,
        host,
        content_length,
        close: connection && has_token(headers, "close"),
        headers,
        connection,
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Where a forwarded request goes and what the gateway adds to it.
pub struct Forward<'a> {
    /// The backend's path and query.
    pub target: &'a str,
    /// The client's address, appended to `X-Forwarded-For`.
    pub client_ip: &'a str,
    /// `X-Forwarded-Prefix`: the path prefix the gateway stripped (path-form URLs).
    pub prefix: Option<&'a str>,
}

/// Appends the head to send to the backend for `req`: the backend's target, the client's headers without the
/// hop-by-hop ones, and `X-Forwarded-For`/`-Host`/`-Proto`/`-Prefix` set by the gateway.
pub fn write_request_head(out: &mut Vec<u8>, req: &Request<'_, '_>, fwd: &Forward<'_>) {
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(fwd.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut xff_seen = false;
    for h in req.headers {
        if is(h.name, "x-forwarded-for") {
            out.extend_from_slice(if xff_seen {
                b", "
            } else {
                b"x-forwarded-for: "
            });
            out.extend_from_slice(h.value.trim_ascii());
            xff_seen = true;
        }
    }
    if xff_seen {
        out.extend_from_slice(b", ");
    } else {
        out.extend_from_slice(b"x-forwarded-for: ");
    }
    out.extend_from_slice(fwd.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in req.headers {
        // `Host` goes whatever `Connection` names: a request without it is not HTTP/1.1.
        let host = is(h.name, "host");
        if is(h.name, "content-length")
            || set_by_gateway(h.name)
            || (!host && hop_by_hop(req.headers, h.name, req.connection))
        {
            continue;
        }
        header(out, h.name, h.value);
    }
    header(out, "x-forwarded-host", req.host.as_bytes());
    header(out, "x-forwarded-proto", b"http");
    if let Some(p) = fwd.prefix {
        header(out, "x-forwarded-prefix", p.as_bytes());
    }
    if let Some(n) = req.content_length {
        let _ = write!(out, "content-length: {n}\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (1xx, 204, 304, or the answer to HEAD).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked: [`Chunked`] finds the end.
    Chunked,
    /// Whatever comes until the backend closes the connection.
    UntilClose,
}

/// A backend's response head.
#[derive(Debug)]
pub struct Response<'h, 'b> {
    pub head_len: usize,
    pub status: u16,
    pub reason: &'b str,
    pub framing: Framing,
    /// The backend keeps the connection open after this response (HTTP/1.1, no `Connection: close`, and a
    /// body whose end is known).
    pub reusable: bool,
    pub headers: &'h [Header<'b>],
    /// The head has a `Connection` header.
    connection: bool,
}

impl Response<'_, '_> {
    /// A 1xx other than 101: an interim response, followed by the final one.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Why a backend's response head cannot be forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadResponse(pub String);

impl fmt::Display for BadResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadResponse {}

/// Parses a response head at the start of `buf`: `Ok(None)` when more bytes are needed. `head` says whether it
/// answers a HEAD request (so it has no body whatever its headers say).
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut [Header<'b>],
    head: bool,
) -> Result<Option<Response<'h, 'b>>, BadResponse> {
    let mut resp = httparse::Response::new(storage);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(BadResponse(format!(
                "the response head is larger than {} KiB",
                MAX_HEAD / 1024
            )))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(BadResponse(format!(
                "not a valid HTTP/1 response head: {e}"
            )))
        }
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(BadResponse("not a valid HTTP/1 response head".into()));
    };
    let reason = resp.reason.unwrap_or("");
    let headers: &'h [Header<'b>] = resp.headers;
    let chunked = headers
        .iter()
        .filter(|h| is(h.name, "transfer-encoding"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .rfind(|t| !t.is_empty())
        .map(|last| last.eq_ignore_ascii_case(b"chunked"));
    // A malformed length is refused even where the body's length does not depend on it (it would be
    // forwarded as it is).
    let Ok(length) = lengths(headers) else {
        return Err(BadResponse("an invalid Content-Length".into()));
    };
    let framing = if head || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    let connection = headers.iter().any(|h| is(h.name, "connection"));
    let reusable = version == 1
        && framing != Framing::UntilClose
        && !(connection && has_token(headers, "close"));
    Ok(Some(Response {
        head_len,
        status,
        reason,
        framing,
        reusable,
        headers,
        connection,
    }))
}

/// Appends the head to send to the client for `resp`: the backend's headers without the hop-by-hop ones and
/// without `Set-Cookie` for the console's session cookie; `Connection: close` when `close`. The body is
/// forwarded verbatim, so `Transfer-Encoding` stays as the backend sent it (and `Content-Length` goes when
/// both are present, RFC 9112 §6.3).
pub fn write_response_head(
    out: &mut Vec<u8>,
    resp: &Response<'_, '_>,
    close: bool,
    session_cookie: &str,
) {
    let _ = write!(out, "HTTP/1.1 {:03} {}\r\n", resp.status, resp.reason);
    let framed_by_coding = matches!(resp.framing, Framing::Chunked | Framing::UntilClose)
        && resp.headers.iter().any(|h| is(h.name, "transfer-encoding"));
    for h in resp.headers {
        if hop_by_hop(resp.headers, h.name, resp.connection)
            || (framed_by_coding && is(h.name, "content-length"))
            || (is(h.name, "set-cookie") && sets_cookie(h.value, session_cookie))
        {
            continue;
        }
        header(out, h.name, h.value);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a `Set-Cookie` value sets cookie `name` (an unreadable value counts as setting it).
fn sets_cookie(value: &[u8], name: &str) -> bool {
    match value.iter().position(|&b| b == b'=') {
        Some(i) => value[..i].trim_ascii() == name.as_bytes(),
        None => false,
    }
}

/// Finds the end of a chunked body fed to it in pieces (RFC 9112 §7.1): chunk sizes, extensions, data, the
/// last chunk and the trailer section. It keeps no bytes, so a body of any size costs nothing but the scan.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a chunk-size: its value so far and how many digits.
    Size {
        value: u64,
        digits: u8,
    },
    /// Whitespace after the size, before `;` or CR.
    SizeWs {
        value: u64,
    },
    /// In the chunk extensions, up to CR.
    Ext {
        value: u64,
    },
    /// After the size line's CR.
    SizeLf {
        value: u64,
    },
    /// Chunk data still to come.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Default for State {
    fn default() -> Self {
        State::Size {
            value: 0,
            digits: 0,
        }
    }
}

/// A chunked body that breaks the grammar, and the byte where it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError(pub &'static str);

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid chunked body: {}", self.0)
    }
}

impl std::error::Error for ChunkError {}

impl Chunked {
    /// Whether the whole body, trailers included, has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Scans `input`, the body's next bytes. Returns how many belong to the body: all of them, or fewer when
    /// the body ends inside `input`.
    pub fn advance(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Data(n) => {
                    let take = n.min((input.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == n {
                        State::DataCr
                    } else {
                        State::Data(n - take)
                    };
                    continue;
                }
                State::Size { value, digits } => match hex(b) {
                    Some(d) if digits < 16 => State::Size {
                        value: value << 4 | u64::from(d),
                        digits: digits + 1,
                    },
                    Some(_) => return Err(ChunkError("a chunk size longer than 16 digits")),
                    None if digits == 0 => return Err(ChunkError("a chunk size without digits")),
                    None => match b {
                        b' ' | b'\t' => State::SizeWs { value },
                        b';' => State::Ext { value },
                        b'\r' => State::SizeLf { value },
                        _ => return Err(ChunkError("a stray byte after a chunk size")),
                    },
                },
                State::SizeWs { value } => match b {
                    b' ' | b'\t' => State::SizeWs { value },
                    b';' => State::Ext { value },
                    b'\r' => State::SizeLf { value },
                    _ => return Err(ChunkError("a stray byte after a chunk size")),
                },
                State::Ext { value } => match b {
                    b'\r' => State::SizeLf { value },
                    b'\n' => return Err(ChunkError("a bare LF in a chunk extension")),
                    _ => State::Ext { value },
                },
                State::SizeLf { value } => match b {
                    b'\n' if value == 0 => State::TrailerStart,
                    b'\n' => State::Data(value),
                    _ => return Err(ChunkError("no LF after a chunk size line's CR")),
                },
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(ChunkError("no CRLF after chunk data")),
                },
                State::DataLf => match b {
                    b'\n' => State::default(),
                    _ => return Err(ChunkError("no CRLF after chunk data")),
                },
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    b'\n' => return Err(ChunkError("a bare LF in the trailer section")),
                    _ => State::Trailer,
                },
                State::Trailer => match b {
                    b'\r' => State::TrailerLf,
                    b'\n' => return Err(ChunkError("a bare LF in the trailer section")),
                    _ => State::Trailer,
                },
                State::TrailerLf => match b {
                    b'\n' => State::TrailerStart,
                    _ => return Err(ChunkError("no LF after a trailer line's CR")),
                },
                State::EndLf => match b {
                    b'\n' => State::Done,
                    _ => return Err(ChunkError("no LF after the body's final CR")),
                },
            };
            i += 1;
        }
        Ok(i)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests;

/// The properties the `h1` fuzz target checks on arbitrary bytes (also run by this crate's tests). The first
/// byte picks how the rest is split into reads and the flags of the response head.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    pub fn check(data: &[u8]) {
        let Some((&split, data)) = data.split_first() else {
            return;
        };
        let mut storage = [EMPTY_HEADER; MAX_HEADERS];
        if let Parse::Done(req) = parse_request(data, &mut storage, "kiln_session") {
            assert!(req.head_len <= data.len());
            let mut out = Vec::new();
            write_request_head(
                &mut out,
                &req,
                &Forward {
                    target: "/backend",
                    client_ip: "127.0.0.1",
                    prefix: Some("/x/o/p/e/c/ep"),
                },
            );
            // The gateway adds up to four headers.
            let mut again = [EMPTY_HEADER; MAX_HEADERS + 4];
            let reparsed = parse_request(&out, &mut again, "kiln_session");
            assert!(
                matches!(reparsed, Parse::Done(_)),
                "a forwarded head does not parse ({reparsed:?}): {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        let mut storage = [EMPTY_HEADER; MAX_HEADERS];
        if let Ok(Some(resp)) = parse_response(data, &mut storage, split & 1 == 1) {
            assert!(resp.head_len <= data.len());
            let mut out = Vec::new();
            write_response_head(&mut out, &resp, split & 2 == 2, "kiln_session");
            let mut again = [EMPTY_HEADER; MAX_HEADERS + 1];
            assert!(
                matches!(
                    parse_response(&out, &mut again, split & 1 == 1),
                    Ok(Some(_))
                ),
                "a forwarded response head does not parse: {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        let whole = Chunked::default().advance(data);
        let mut pieces = Chunked::default();
        let mut split_result = Ok(0);
        let mut used = 0;
        for piece in data.chunks(usize::from(split).max(1)) {
            match pieces.advance(piece) {
                Ok(n) => {
                    used += n;
                    split_result = Ok(used);
                    if n < piece.len() {
                        break;
                    }
                }
                Err(e) => {
                    split_result = Err(e);
                    break;
                }
            }
        }
        match (&whole, &split_result) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "the body's end moved with the split"),
            (Err(a), Err(b)) => assert_eq!(a, b),
            _ => panic!("whole {whole:?}, split {split_result:?}"),
        }
    }
}
