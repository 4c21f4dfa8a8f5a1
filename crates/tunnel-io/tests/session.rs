//! Sessions over in-process transports and a real WebSocket on loopback.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tunnel::Frame;
use tunnel_io::{
    accept, dial, memory_pair, Config, Error, Event, MemoryTransport, Session, TunnelStream,
};

async fn pair(
    window: u32,
) -> (
    Session,
    mpsc::UnboundedReceiver<Event>,
    Session,
    mpsc::UnboundedReceiver<Event>,
) {
    let (a, b) = memory_pair();
    let mut ca = Config::new("dialer");
    ca.window = window;
    let mut cb = Config::new("acceptor");
    cb.window = window;
    let (d, a) = tokio::join!(dial(a, ca), accept(b, cb));
    let (ds, de) = d.unwrap();
    let (as_, ae) = a.unwrap();
    (ds, de, as_, ae)
}

/// Accepts every stream and echoes it until the opener's Fin.
fn echo(mut events: mpsc::UnboundedReceiver<Event>) {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let Event::Stream(inc) = ev {
                assert_eq!(inc.target(), "echo");
                let s = inc.accept().unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(s);
                    tokio::io::copy(&mut r, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                });
            }
        }
    });
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn round_trip(mut s: TunnelStream, data: Vec<u8>) {
    let (mut r, mut w) = tokio::io::split(&mut s);
    let expected = data.clone();
    let send = async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(send, recv);
    assert!(
        got == expected,
        "echoed {} bytes of {}",
        got.len(),
        expected.len()
    );
}

#[tokio::test]
async fn handshake_names_the_peers_and_the_version() {
    let (d, _de, a, _ae) = pair(tunnel::DEFAULT_WINDOW).await;
    assert_eq!(d.peer(), "acceptor");
    assert_eq!(a.peer(), "dialer");
    assert_eq!(d.version(), tunnel::VERSION);
    assert_eq!(a.version(), tunnel::VERSION);
}

#[tokio::test]
async fn many_streams_from_both_sides_carry_their_bytes_intact() {
    let (d, de, a, ae) = pair(64 * 1024).await;
    echo(de);
    echo(ae);
    let mut tasks = Vec::new();
    for i in 0..40u8 {
        let opener = if i % 2 == 0 { d.clone() } else { a.clone() };
        tasks.push(tokio::spawn(async move {
            let s = opener.open("echo").await.unwrap();
            round_trip(s, pattern(200_000 + usize::from(i) * 1000, i)).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Streams are gone from both sides once both ends are done.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(d.stream_count(), 0);
    assert_eq!(a.stream_count(), 0);
}

#[tokio::test]
async fn a_stalled_reader_holds_up_only_its_own_stream() {
    let window = 32 * 1024;
    let (d, _de, _a, mut ae) = pair(window).await;
    let stalled_writer = tokio::spawn({
        let d = d.clone();
        async move {
            let mut s = d.open("sink").await.unwrap();
            s.write_all(&pattern(1 << 20, 1)).await.unwrap();
            s.shutdown().await.unwrap();
            s
        }
    });
    let Some(Event::Stream(inc)) = ae.recv().await else {
        panic!("no stream")
    };
    assert_eq!(inc.target(), "sink");
    let mut sink = inc.accept().unwrap();
    echo(ae);
    // Not reading `sink`: its writer stops at the window, while another stream works.
    let other = d.open("echo").await.unwrap();
    round_trip(other, pattern(300_000, 2)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !stalled_writer.is_finished(),
        "the writer went past the window"
    );
    let mut got = Vec::new();
    sink.read_to_end(&mut got).await.unwrap();
    assert!(got == pattern(1 << 20, 1));
    stalled_writer.await.unwrap();
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    let (d, _de, _a, mut ae) = pair(tunnel::DEFAULT_WINDOW).await;
    let server = tokio::spawn(async move {
        let Some(Event::Stream(inc)) = ae.recv().await else {
            panic!()
        };
        let mut s = inc.accept().unwrap();
        let mut req = String::new();
        s.read_to_string(&mut req).await.unwrap();
        // The client's side is shut; this side still answers.
        s.write_all(format!("got {req}").as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let mut s = d.open("svc").await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let err = s.write_all(b"more").await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "got ping");
    server.await.unwrap();
}

#[tokio::test]
async fn refused_and_unanswered_streams_fail_with_the_reason() {
    let (d, _de, a, mut ae) = pair(tunnel::DEFAULT_WINDOW).await;
    let refuser = tokio::spawn(async move {
        let Some(Event::Stream(inc)) = ae.recv().await else {
            panic!()
        };
        inc.refuse("connection refused: nothing listens on 127.0.0.1:3000");
        // Nobody takes the next one.
        drop(ae);
    });
    let err = d.open("tcp:127.0.0.1:3000").await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(
        err.to_string(),
        "stream to tcp:127.0.0.1:3000: connection refused: nothing listens on 127.0.0.1:3000"
    );
    refuser.await.unwrap();
    let err = d.open("ssh").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("nothing on the other side takes this stream"),
        "{err}"
    );
    assert_eq!(d.stream_count(), 0);
    assert_eq!(a.stream_count(), 0);
}

#[tokio::test]
async fn messages_pass_on_the_session() {
    let (d, _de, _a, mut ae) = pair(tunnel::DEFAULT_WINDOW).await;
    d.send_message(Bytes::from_static(b"{\"state\":\"ready\"}"))
        .unwrap();
    let Some(Event::Message(m)) = ae.recv().await else {
        panic!()
    };
    assert_eq!(&m[..], b"{\"state\":\"ready\"}");
}

#[tokio::test]
async fn closing_ends_streams_on_both_sides_with_the_reason() {
    let (d, _de, a, mut ae) = pair(tunnel::DEFAULT_WINDOW).await;
    let opened = tokio::spawn({
        let d = d.clone();
        async move { d.open("x").await.unwrap() }
    });
    let Some(Event::Stream(inc)) = ae.recv().await else {
        panic!()
    };
    let mut theirs = inc.accept().unwrap();
    let mut ours = opened.await.unwrap();
    ours.write_all(b"last words").await.unwrap();
    d.close("agent shutting down");
    assert_eq!(d.closed().await, "closed by this side: agent shutting down");
    assert_eq!(
        a.closed().await,
        "the peer is going away: agent shutting down"
    );
    // What arrived before the end is still read, then the reason.
    let mut buf = [0u8; 10];
    theirs.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"last words");
    let err = theirs.read_u8().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "tunnel closed: the peer is going away: agent shutting down"
    );
    assert!(ours.write_all(b"x").await.is_err());
    assert!(d.open("y").await.is_err());
    assert!(d.send_message(Bytes::new()).is_err());
}

/// A raw peer: handshakes by hand, then does what the test says.
async fn raw_acceptor(mut t: MemoryTransport) -> MemoryTransport {
    let mut hello = t.next().await.unwrap().unwrap();
    assert!(matches!(
        tunnel::decode(&mut hello),
        Ok(Some(Frame::Hello { .. }))
    ));
    t.send(
        Frame::Welcome {
            version: 1,
            peer: "raw".into(),
        }
        .to_bytes(),
    )
    .await
    .unwrap();
    t
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_ends_the_session_after_the_timeout() {
    let (a, b) = memory_pair();
    let mut config = Config::new("agent");
    config.keepalive = Duration::from_secs(2);
    config.timeout = Duration::from_secs(6);
    let (raw, dialed) = tokio::join!(raw_acceptor(b), dial(a, config));
    let (session, _events) = dialed.unwrap();
    let started = tokio::time::Instant::now();
    let reason = session.closed().await;
    assert_eq!(reason, "the peer sent nothing for 6 s (keepalive timeout)");
    assert_eq!(started.elapsed().as_secs(), 6);
    drop(raw);
}

#[tokio::test(start_paused = true)]
async fn an_answering_peer_keeps_the_session_and_gives_a_round_trip_time() {
    let (d, _de, a, _ae) = pair(tunnel::DEFAULT_WINDOW).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(d.ended(), None);
    assert_eq!(a.ended(), None);
    assert!(d.rtt().is_some());
}

#[tokio::test]
async fn a_peer_that_overruns_its_window_is_cut_off() {
    let (a, b) = memory_pair();
    let mut config = Config::new("agent");
    config.window = 16;
    let (raw, dialed) = tokio::join!(raw_acceptor(b), dial(a, config));
    let mut raw = raw;
    let (session, _events) = dialed.unwrap();
    let opening = tokio::spawn({
        let s = session.clone();
        async move { s.open("x").await }
    });
    let mut open = raw.next().await.unwrap().unwrap();
    let Ok(Some(Frame::Open {
        stream, window: 16, ..
    })) = tunnel::decode(&mut open)
    else {
        panic!("not an Open")
    };
    let mut msg = BytesMut::new();
    Frame::Accept { stream, window: 16 }.encode(&mut msg);
    Frame::Data {
        stream,
        data: Bytes::from_static(&[7; 17]),
    }
    .encode(&mut msg);
    raw.send(msg.freeze()).await.unwrap();
    let reason = session.closed().await;
    assert_eq!(
        reason,
        "protocol error: stream 1: the peer sent 17 bytes on a stream with 16 bytes of window left"
    );
    // The peer is told why.
    let mut goaway = raw.next().await.unwrap().unwrap();
    let frames = std::iter::from_fn(|| tunnel::decode(&mut goaway).unwrap()).collect::<Vec<_>>();
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, Frame::GoAway { reason: r } if r == &reason)),
        "{frames:?}"
    );
    drop(opening);
}

#[tokio::test]
async fn an_incompatible_peer_is_refused_with_a_clear_message() {
    let (mut a, b) = memory_pair();
    let acceptor = tokio::spawn(accept(b, Config::new("server")));
    a.send(
        Frame::Hello {
            min: 7,
            max: 9,
            peer: "kiln-agent 9".into(),
        }
        .to_bytes(),
    )
    .await
    .unwrap();
    let mut answer = a.next().await.unwrap().unwrap();
    let Ok(Some(Frame::Refuse { reason })) = tunnel::decode(&mut answer) else {
        panic!()
    };
    let expected = format!(
        "incompatible tunnel protocol: the peer speaks versions 7 to 9, this side {} to {} (this side is \
         older: upgrade it)",
        tunnel::MIN_VERSION,
        tunnel::VERSION
    );
    assert_eq!(reason, expected);
    assert!(matches!(
        acceptor.await.unwrap(),
        Err(Error::Incompatible(_))
    ));

    // The dialer's view of a refusal.
    let (a, mut b) = memory_pair();
    let refuser = tokio::spawn(async move {
        let _hello = b.next().await;
        b.send(
            Frame::Refuse {
                reason: "incompatible tunnel protocol: ...".into(),
            }
            .to_bytes(),
        )
        .await
        .unwrap();
    });
    let err = dial(a, Config::new("agent")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the peer refused the tunnel: incompatible tunnel protocol: ..."
    );
    refuser.await.unwrap();
}

/// The real thing: tokio-tungstenite on both ends of a loopback TCP connection, with the bearer token
/// checked at the upgrade.
#[tokio::test]
async fn sessions_run_over_a_real_websocket_with_a_checked_token() {
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                // tungstenite's callback signature, not ours.
                #[allow(clippy::result_large_err)]
                let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                    let ok = req
                        .headers()
                        .get("authorization")
                        .is_some_and(|v| v == "Bearer good");
                    if ok {
                        Ok(resp)
                    } else {
                        let mut e = ErrorResponse::new(Some("invalid token".into()));
                        *e.status_mut() =
                            tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
                        Err(e)
                    }
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
                    return;
                };
                let (_s, events) = accept(tunnel_io::WsTransport::new(ws), Config::new("server"))
                    .await
                    .unwrap();
                echo(events);
                std::future::pending::<()>().await;
            });
        }
    });
    let url = format!("ws://{addr}/tunnel");
    let err = tunnel_io::connect(&url, "bad", Config::new("agent"))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "the server answered 401: invalid token");
    assert!(!err.is_transient());

    let (session, _events) = tunnel_io::connect(&url, "good", Config::new("agent"))
        .await
        .unwrap();
    assert_eq!(session.peer(), "server");
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let s = session.clone();
        tasks.push(tokio::spawn(async move {
            round_trip(s.open("echo").await.unwrap(), pattern(3 << 20, i)).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = format!("ws://{}/tunnel", closed.local_addr().unwrap());
    drop(closed);
    let err = tunnel_io::connect(&nowhere, "good", Config::new("agent"))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("connecting to {nowhere}: ")),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn redial_waits_grow_with_jitter_and_start_over_after_a_connection() {
    let mut r = tunnel_io::Redial::new(Duration::from_millis(100), Duration::from_secs(1));
    let mut waits = Vec::new();
    for _ in 0..6 {
        waits.push(r.wait().await);
    }
    let caps = [100, 200, 400, 800, 1000, 1000];
    for (w, cap) in waits.iter().zip(caps) {
        let ms = w.as_millis() as u64;
        assert!(ms >= cap / 2 && ms <= cap, "{waits:?}");
    }
    assert_eq!(r.attempts(), 6);
    r.connected();
    assert!(r.wait().await <= Duration::from_millis(100));
    let j: Vec<f64> = (0..100).map(|_| tunnel_io::jitter()).collect();
    assert!(j.iter().all(|x| (0.0..1.0).contains(x)));
    assert!(j.windows(2).any(|w| w[0] != w[1]));
}
