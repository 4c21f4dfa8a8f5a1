use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::frame::Problem;
use crate::*;

fn every_frame() -> Vec<Frame> {
    vec![
        Frame::Hello {
            min: 1,
            max: 3,
            peer: "kiln-agent 0.1".into(),
        },
        Frame::Welcome {
            version: 1,
            peer: "kiln-server".into(),
        },
        Frame::Refuse {
            reason: "token expired".into(),
        },
        Frame::Open {
            stream: 1,
            window: DEFAULT_WINDOW,
            target: "tcp:127.0.0.1:3000".into(),
        },
        Frame::Accept {
            stream: 1,
            window: 4096,
        },
        Frame::Data {
            stream: 1,
            data: Bytes::from_static(b"hello \x00\xff"),
        },
        Frame::Data {
            stream: 2,
            data: Bytes::new(),
        },
        Frame::Credit {
            stream: 1,
            bytes: 65536,
        },
        Frame::Fin { stream: 7 },
        Frame::Reset {
            stream: 9,
            reason: "connection refused: nothing listens on 127.0.0.1:3000".into(),
        },
        Frame::Ping { nonce: u64::MAX },
        Frame::Pong { nonce: 42 },
        Frame::GoAway {
            reason: "server shutting down".into(),
        },
        Frame::Message {
            data: Bytes::from_static(br#"{"state":"ready"}"#),
        },
    ]
}

#[test]
fn every_frame_round_trips_alone_and_batched() {
    let mut batch = BytesMut::new();
    for frame in every_frame() {
        let mut alone = frame.to_bytes();
        assert_eq!(decode(&mut alone).unwrap(), Some(frame.clone()));
        assert!(alone.is_empty());
        frame.encode(&mut batch);
    }
    let mut batch = batch.freeze();
    let mut decoded = Vec::new();
    while let Some(f) = decode(&mut batch).unwrap() {
        decoded.push(f);
    }
    assert_eq!(decoded, every_frame());
    assert!(batch.is_empty());
}

#[test]
fn a_cut_frame_is_incomplete_and_nothing_is_taken() {
    let whole = Frame::Open {
        stream: 3,
        window: 10,
        target: "ssh".into(),
    }
    .to_bytes();
    for cut in 0..whole.len() {
        let mut part = whole.slice(..cut);
        assert_eq!(decode(&mut part).unwrap(), None, "cut at {cut}");
        assert_eq!(part.len(), cut);
    }
}

#[test]
fn data_header_matches_an_encoded_data_frame() {
    let mut out = BytesMut::new();
    encode_data_header(&mut out, 5, 3);
    out.extend_from_slice(b"abc");
    let expected = Frame::Data {
        stream: 5,
        data: Bytes::from_static(b"abc"),
    };
    assert_eq!(out.freeze(), expected.to_bytes());
}

fn problem_of(bytes: &[u8]) -> DecodeError {
    let mut b = Bytes::copy_from_slice(bytes);
    let err = decode(&mut b).expect_err("decodes");
    assert_eq!(b.len(), bytes.len(), "an error takes nothing");
    err
}

fn raw(ty: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![ty];
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[test]
fn broken_frames_are_refused_with_where_and_why() {
    let e = problem_of(&raw(200, 0, b""));
    assert_eq!(e.problem, Problem::UnknownType);
    assert_eq!(
        e.to_string(),
        "tunnel frame at byte 0 (type 200, stream 0): unknown frame type (the peer speaks a protocol \
         version it did not negotiate)"
    );

    let e = problem_of(&raw(FrameType::Data as u8, 0, b"x"));
    assert_eq!(e.problem, Problem::WrongStream);
    assert!(e.to_string().contains("(Data, stream 0)"), "{e}");
    assert_eq!(
        problem_of(&raw(FrameType::Ping as u8, 4, &[0; 8])).problem,
        Problem::WrongStream
    );

    let mut huge = raw(FrameType::Data as u8, 1, b"");
    huge[5..9].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
    // Refused from the header alone, before the payload arrives.
    assert_eq!(
        problem_of(&huge).problem,
        Problem::TooLarge {
            len: MAX_PAYLOAD as u64 + 1
        }
    );

    assert_eq!(
        problem_of(&raw(FrameType::Ping as u8, 0, &[0; 7])).problem,
        Problem::BadLength { len: 7 }
    );
    assert_eq!(
        problem_of(&raw(FrameType::Fin as u8, 3, b"x")).problem,
        Problem::BadLength { len: 1 }
    );
    assert_eq!(
        problem_of(&raw(FrameType::Hello as u8, 0, &[0, 1, 0])).problem,
        Problem::BadLength { len: 3 }
    );
    assert_eq!(
        problem_of(&raw(FrameType::Reset as u8, 3, b"\xff\xfe")).problem,
        Problem::NotUtf8
    );
    assert_eq!(
        problem_of(&raw(FrameType::GoAway as u8, 0, &[b'a'; MAX_TEXT + 1])).problem,
        Problem::TextTooLong { len: MAX_TEXT + 1 }
    );
    let mut open = (MAX_WINDOW + 1).to_be_bytes().to_vec();
    open.extend_from_slice(b"ssh");
    assert_eq!(
        problem_of(&raw(FrameType::Open as u8, 1, &open)).problem,
        Problem::WindowTooLarge {
            window: MAX_WINDOW + 1
        }
    );
}

#[test]
fn long_text_is_cut_at_a_character_boundary_and_still_decodes() {
    let reason = "é".repeat(MAX_TEXT);
    let mut b = Frame::GoAway { reason }.to_bytes();
    let Some(Frame::GoAway { reason }) = decode(&mut b).unwrap() else {
        panic!("not a GoAway")
    };
    assert!(reason.len() <= MAX_TEXT && reason.len() >= MAX_TEXT - 1);
    assert!(reason.chars().all(|c| c == 'é'));
}

#[test]
fn versions_negotiate_to_the_newest_shared_one_or_say_who_to_upgrade() {
    assert_eq!(negotiate(MIN_VERSION, VERSION), Ok(VERSION));
    assert_eq!(negotiate_between((1, 5), (2, 3)), Ok(3));
    assert_eq!(negotiate_between((1, 2), (2, 3)), Ok(2));
    let newer = negotiate_between((4, 6), (1, 3)).unwrap_err();
    assert_eq!(
        newer.to_string(),
        "incompatible tunnel protocol: the peer speaks versions 4 to 6, this side 1 to 3 (this side is \
         older: upgrade it)"
    );
    let older = negotiate_between((1, 1), (2, 3)).unwrap_err();
    assert!(older
        .to_string()
        .ends_with("(the peer is older: upgrade it)"));
    // A backwards range is nobody's version.
    assert!(negotiate_between((3, 1), (1, 3)).is_err());
}

#[test]
fn each_side_opens_streams_of_its_own_parity() {
    let mut dialer = StreamIds::new(Side::Dialer);
    let mut acceptor = StreamIds::new(Side::Acceptor);
    let d: Vec<_> = (0..3).map(|_| dialer.next_id().unwrap()).collect();
    let a: Vec<_> = (0..3).map(|_| acceptor.next_id().unwrap()).collect();
    assert_eq!(d, [1, 3, 5]);
    assert_eq!(a, [2, 4, 6]);
    assert!(d
        .iter()
        .all(|&id| Side::Dialer.opens(id) && !Side::Acceptor.opens(id)));
    assert!(a
        .iter()
        .all(|&id| Side::Acceptor.opens(id) && !Side::Dialer.opens(id)));
    assert!(!Side::Dialer.opens(0) && !Side::Acceptor.opens(0));
    assert_eq!(Side::Dialer.peer(), Side::Acceptor);

    let mut near_end = StreamIds {
        next: Some(u32::MAX),
    };
    assert_eq!(near_end.next_id(), Some(u32::MAX));
    assert_eq!(near_end.next_id(), None);
}

#[test]
fn send_credit_is_spent_and_granted_within_limits() {
    let mut c = SendCredit::new(10);
    assert_eq!(c.take(4), 4);
    assert_eq!(c.take(100), 6);
    assert_eq!(c.take(1), 0);
    c.grant(5).unwrap();
    assert_eq!(c.available(), 5);
    let err = c.grant(MAX_WINDOW).unwrap_err();
    assert_eq!(
        err,
        FlowError::Overgrant {
            total: u64::from(MAX_WINDOW) + 5
        }
    );
    assert_eq!(c.available(), 5, "a refused grant changes nothing");
}

#[test]
fn the_receiver_refuses_overruns_and_grants_back_in_halves() {
    let mut w = RecvWindow::new(100);
    w.received(60).unwrap();
    assert_eq!(w.consumed(30), None);
    assert_eq!(w.consumed(20), Some(50), "half the window owed goes back");
    // 40 left of the first grant + 50 granted back.
    w.received(90).unwrap();
    let err = w.received(1).unwrap_err();
    assert_eq!(
        err,
        FlowError::Overrun {
            received: 1,
            allowed: 0
        }
    );
    assert!(err.to_string().contains("0 bytes of window left"));
    assert_eq!(w.consumed(0), None);
}

#[test]
fn backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() {
    let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    assert_eq!(b.next_delay(0.999_999).as_millis(), 199);
    assert_eq!(b.next_delay(0.5), Duration::from_millis(300));
    for _ in 0..40 {
        let d = b.next_delay(1.0);
        assert!(d <= Duration::from_secs(2), "{d:?}");
    }
    assert_eq!(b.next_delay(0.0), Duration::from_secs(1));
    b.reset();
    assert_eq!(b.attempts(), 0);
    assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
}

/// The fuzz target's properties, over every frame and deterministic mutations of them.
#[test]
fn fuzz_properties_hold_on_mutated_frames() {
    let mut seeds: Vec<Vec<u8>> = every_frame()
        .iter()
        .map(|f| f.to_bytes().to_vec())
        .collect();
    let mut all = BytesMut::new();
    for f in every_frame() {
        f.encode(&mut all);
    }
    seeds.push(all.to_vec());
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for seed in &seeds {
        fuzzing::check(seed);
        for _ in 0..500 {
            let mut m = seed.clone();
            for _ in 0..=(rand() % 4) {
                let i = (rand() as usize) % m.len().max(1);
                match rand() % 4 {
                    0 if !m.is_empty() => m[i] = rand() as u8,
                    1 if !m.is_empty() => m.truncate(i),
                    2 => m.insert(i.min(m.len()), rand() as u8),
                    _ if !m.is_empty() => m[i] ^= 1 << (rand() % 8),
                    _ => {}
                }
            }
            fuzzing::check(&m);
        }
    }
}
