use super::*;

const SESSION: &str = "kiln_session";

fn request(raw: &str) -> Result<(usize, String, Option<u64>, bool), &'static str> {
    let mut storage = [EMPTY_HEADER; MAX_HEADERS];
    match parse_request(raw.as_bytes(), &mut storage, SESSION) {
        Parse::Done(r) => Ok((
            r.head_len,
            format!("{} {} {:?} {}", r.method, r.path, r.query, r.host),
            r.content_length,
            r.close,
        )),
        Parse::Partial => Err("partial"),
        Parse::Fallback(why) => Err(why),
    }
}

fn forwarded(raw: &str, fwd: &Forward<'_>) -> String {
    let mut storage = [EMPTY_HEADER; MAX_HEADERS];
    let Parse::Done(r) = parse_request(raw.as_bytes(), &mut storage, SESSION) else {
        panic!("{raw:?} does not parse");
    };
    let mut out = Vec::new();
    write_request_head(&mut out, &r, fwd);
    String::from_utf8(out).unwrap()
}

#[test]
fn plain_requests_parse() {
    let raw = "GET /x/o/p/e/c/ep/a?b=1 HTTP/1.1\r\nHost: localhost:7080\r\nAccept: */*\r\n\r\nNEXT";
    let (len, line, cl, close) = request(raw).unwrap();
    assert_eq!(len, raw.len() - 4);
    assert_eq!(line, "GET /x/o/p/e/c/ep/a Some(\"b=1\") localhost:7080");
    assert_eq!((cl, close), (None, false));
    let (_, _, cl, close) = request(
        "POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 12\r\nContent-Length: 12\r\nConnection: keep-alive, close\r\n\r\n",
    )
    .unwrap();
    assert_eq!((cl, close), (Some(12), true));
    assert_eq!(request("GET / HTTP/1.1\r\nHost: h\r\n"), Err("partial"));
}

#[test]
fn unusual_requests_fall_back() {
    for (raw, why) in [
        ("GET / HTTP/1.0\r\nHost: h\r\n\r\n", "not HTTP/1.1"),
        (
            "GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
            "not an origin-form target",
        ),
        ("GET / HTTP/1.1\r\n\r\n", "no valid Host header"),
        ("GET / HTTP/1.1\r\nHost: \r\n\r\n", "no valid Host header"),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "several Host headers",
        ),
        (
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            "a transfer coding, upgrade or expectation",
        ),
        (
            "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "a transfer coding, upgrade or expectation",
        ),
        (
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n\r\n",
            "an upgrade",
        ),
        (
            "PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "a transfer coding, upgrade or expectation",
        ),
        (
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "an invalid Content-Length",
        ),
        (
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -3\r\n\r\n",
            "an invalid Content-Length",
        ),
        (
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "an invalid Content-Length",
        ),
        (
            "GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1; kiln_session=s\r\n\r\n",
            "the console's session cookie",
        ),
        (
            "GET / HTTP/1.1\r\nHo st: h\r\n\r\n",
            "not a valid HTTP/1 request head",
        ),
    ] {
        assert_eq!(request(raw), Err(why), "{raw:?}");
    }
    let huge = format!("GET / HTTP/1.1\r\nHost: h\r\nX: {}", "a".repeat(MAX_HEAD));
    assert_eq!(request(&huge), Err("head too large"));
}

#[test]
fn forwarded_heads_drop_hop_by_hop_headers_and_say_where_they_came_from() {
    let raw = "POST /x/o/p/e/c/ep/a HTTP/1.1\r\nHost: gw:7080\r\nConnection: keep-alive, X-Secret\r\n\
               X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\n\
               X-Forwarded-For: 10.0.0.2\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Prefix: /evil\r\n\
               Content-Length: 2\r\nAccept: */*\r\n\r\nhi";
    let out = forwarded(
        raw,
        &Forward {
            target: "/api/a",
            client_ip: "127.0.0.1",
            prefix: Some("/x/o/p/e/c/ep"),
        },
    );
    assert_eq!(
        out,
        "POST /api/a HTTP/1.1\r\nx-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\nHost: gw:7080\r\n\
         Accept: */*\r\nx-forwarded-host: gw:7080\r\nx-forwarded-proto: http\r\n\
         x-forwarded-prefix: /x/o/p/e/c/ep\r\ncontent-length: 2\r\n\r\n"
    );
    // A client cannot make the gateway drop Host by naming it in Connection.
    let out = forwarded(
        "GET /a HTTP/1.1\r\nHost: h\r\nConnection: host\r\n\r\n",
        &Forward {
            target: "/a",
            client_ip: "::1",
            prefix: None,
        },
    );
    assert!(out.contains("\r\nHost: h\r\n"), "{out}");
    let out = forwarded(
        "GET /a HTTP/1.1\r\nHost: h\r\n\r\n",
        &Forward {
            target: "/a",
            client_ip: "::1",
            prefix: None,
        },
    );
    assert_eq!(
        out,
        "GET /a HTTP/1.1\r\nx-forwarded-for: ::1\r\nHost: h\r\nx-forwarded-host: h\r\n\
         x-forwarded-proto: http\r\n\r\n"
    );
}

fn response(raw: &str, head: bool) -> Result<Option<(usize, u16, Framing, bool)>, BadResponse> {
    let mut storage = [EMPTY_HEADER; MAX_HEADERS];
    Ok(parse_response(raw.as_bytes(), &mut storage, head)?
        .map(|r| (r.head_len, r.status, r.framing, r.reusable)))
}

#[test]
fn response_framing() {
    let ok = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(
        response(ok, false),
        Ok(Some((ok.len() - 5, 200, Framing::Length(5), true)))
    );
    assert_eq!(
        response(ok, true).unwrap().unwrap().2,
        Framing::Empty,
        "the answer to HEAD has no body"
    );
    for (raw, framing, reusable) in [
        ("HTTP/1.1 204 No Content\r\n\r\n", Framing::Empty, true),
        ("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", Framing::Empty, true),
        ("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", Framing::Empty, true),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", Framing::Chunked, true),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            Framing::Chunked,
            true,
        ),
        ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", Framing::UntilClose, false),
        ("HTTP/1.1 200 OK\r\n\r\n", Framing::UntilClose, false),
        ("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n", Framing::Length(1), false),
        ("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Framing::Length(1), false),
    ] {
        let (_, _, f, r) = response(raw, false).unwrap().unwrap();
        assert_eq!((f, r), (framing, reusable), "{raw:?}");
    }
    assert_eq!(response("HTTP/1.1 200 OK\r\n", false), Ok(None));
    assert!(response(
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        false
    )
    .is_err());
    assert!(response("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
    assert!(
        response("HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\n", true).is_err(),
        "a malformed length is refused in the answer to HEAD too"
    );
    assert!(response("SSH-2.0-OpenSSH\r\n\r\n", false).is_err());
}

#[test]
fn client_heads_keep_the_coding_and_lose_the_session_cookie() {
    let raw = "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nTransfer-Encoding: chunked\r\n\
               Content-Length: 10\r\nSet-Cookie: kiln_session=evil; Path=/\r\nSet-Cookie: app=1\r\n\
               Keep-Alive: timeout=5\r\n\r\n";
    let mut storage = [EMPTY_HEADER; MAX_HEADERS];
    let resp = parse_response(raw.as_bytes(), &mut storage, false)
        .unwrap()
        .unwrap();
    let mut out = Vec::new();
    write_response_head(&mut out, &resp, true, SESSION);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nSet-Cookie: app=1\r\nconnection: close\r\n\r\n"
    );
}

/// Scans `input` in pieces of `step` bytes; returns the bytes consumed and whether the body ended.
fn scan(input: &[u8], step: usize) -> Result<(usize, bool), ChunkError> {
    let mut c = Chunked::default();
    let mut used = 0;
    for piece in input.chunks(step.max(1)) {
        let n = c.advance(piece)?;
        used += n;
        if n < piece.len() {
            break;
        }
    }
    Ok((used, c.is_done()))
}

#[test]
fn chunked_bodies_end_where_they_end_however_they_are_split() {
    let body =
        b"5\r\nhello\r\n1A;name=\"v\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0 \r\nX-Sum: 1\r\n\r\n";
    let mut input = body.to_vec();
    input.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    for step in 1..=input.len() {
        assert_eq!(scan(&input, step), Ok((body.len(), true)), "step {step}");
    }
    assert_eq!(scan(b"0\r\n\r\n", 1), Ok((5, true)));
    assert_eq!(scan(b"5\r\nhel", 2), Ok((6, false)));
    for (bad, why) in [
        (&b"\r\n"[..], "a chunk size without digits"),
        (b"g\r\n", "a chunk size without digits"),
        (
            b"11111111111111111\r\n",
            "a chunk size longer than 16 digits",
        ),
        (b"1\r\nab", "no CRLF after chunk data"),
        (b"1\nab", "a stray byte after a chunk size"),
        (b"0\r\nX\n", "a bare LF in the trailer section"),
        (b"0\r\n\r\r", "no LF after the body's final CR"),
    ] {
        assert_eq!(scan(bad, 1), Err(ChunkError(why)), "{bad:?}");
    }
}

/// The fuzz target's properties over deterministic mutations of valid messages (the fuzzer itself needs
/// nightly; see `fuzz/README.md`).
#[test]
fn mutated_messages_keep_the_properties() {
    let seeds: [&[u8]; 5] = [
        b"\x07GET /x/o/p/e/c/ep/a?b=1 HTTP/1.1\r\nHost: h\r\nConnection: close, x-a\r\nx-a: 1\r\nContent-Length: 3\r\n\r\nabc",
        b"\x02HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: x-b\r\nX-B: 1\r\n\r\n",
        b"\x03HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.0 200 OK\r\n\r\n",
        b"\x01a\r\n0123456789\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n",
        b"\x05f\r\n0123456789abcde\r\n0\r\n\r\n",
    ];
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet = b"\r\n:;, 0aA-/?=\x00\xff";
    for seed in seeds {
        fuzzing::check(seed);
        for _ in 0..2000 {
            let mut m = seed.to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() % m.len() as u64) as usize;
                let byte = alphabet[(next() % alphabet.len() as u64) as usize];
                match next() % 3 {
                    0 => m[at] = byte,
                    1 => m.insert(at, byte),
                    _ => {
                        m.remove(at);
                        if m.is_empty() {
                            m.push(byte);
                        }
                    }
                }
            }
            fuzzing::check(&m);
        }
    }
}
