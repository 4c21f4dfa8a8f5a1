//! Frames and their encoding.

use std::fmt;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

use crate::{StreamId, MAX_PAYLOAD, MAX_TEXT, MAX_WINDOW};

/// Bytes before a frame's payload: type, stream, length.
pub const HEADER_LEN: usize = 9;

/// A frame's type byte. Values are never reused; new types are appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 0,
    Welcome = 1,
    Refuse = 2,
    Open = 3,
    Accept = 4,
    Data = 5,
    Credit = 6,
    Fin = 7,
    Reset = 8,
    Ping = 9,
    Pong = 10,
    GoAway = 11,
    Message = 12,
}

impl FrameType {
    const ALL: [FrameType; 13] = [
        FrameType::Hello,
        FrameType::Welcome,
        FrameType::Refuse,
        FrameType::Open,
        FrameType::Accept,
        FrameType::Data,
        FrameType::Credit,
        FrameType::Fin,
        FrameType::Reset,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::GoAway,
        FrameType::Message,
    ];

    fn from_byte(b: u8) -> Option<FrameType> {
        FrameType::ALL.get(b as usize).copied()
    }

    /// Whether frames of this type belong to a stream (id ≠ 0) rather than to the session (id 0).
    pub fn on_stream(self) -> bool {
        matches!(
            self,
            FrameType::Open
                | FrameType::Accept
                | FrameType::Data
                | FrameType::Credit
                | FrameType::Fin
                | FrameType::Reset
        )
    }
}

/// One frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The dialer's first frame: the protocol versions it speaks, and what it is (for the acceptor's logs).
    Hello {
        min: u16,
        max: u16,
        peer: String,
    },
    /// The acceptor's answer to `Hello`: the version both now speak, and what the acceptor is.
    Welcome {
        version: u16,
        peer: String,
    },
    /// The acceptor's answer to a `Hello` it cannot serve; the session ends.
    Refuse {
        reason: String,
    },
    /// Opens a stream to `target` (what the target means is the application's business, e.g. `tcp:3000`);
    /// the opener accepts up to `window` bytes before granting more.
    Open {
        stream: StreamId,
        window: u32,
        target: String,
    },
    /// The stream is connected; the acceptor accepts up to `window` bytes before granting more.
    Accept {
        stream: StreamId,
        window: u32,
    },
    /// Bytes of a stream.
    Data {
        stream: StreamId,
        data: Bytes,
    },
    /// The sender has consumed `bytes` more of the stream: the peer may send that much more.
    Credit {
        stream: StreamId,
        bytes: u32,
    },
    /// The sender will send no more data on the stream (the other direction stays open).
    Fin {
        stream: StreamId,
    },
    /// The stream is over in both directions: refused (in answer to `Open`) or broken.
    Reset {
        stream: StreamId,
        reason: String,
    },
    /// Asks for a `Pong` with the same nonce (keepalive and round-trip time).
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// The sender is closing the session; streams end.
    GoAway {
        reason: String,
    },
    /// A message for the application on the session itself (by convention JSON).
    Message {
        data: Bytes,
    },
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello { .. } => FrameType::Hello,
            Frame::Welcome { .. } => FrameType::Welcome,
            Frame::Refuse { .. } => FrameType::Refuse,
            Frame::Open { .. } => FrameType::Open,
            Frame::Accept { .. } => FrameType::Accept,
            Frame::Data { .. } => FrameType::Data,
            Frame::Credit { .. } => FrameType::Credit,
            Frame::Fin { .. } => FrameType::Fin,
            Frame::Reset { .. } => FrameType::Reset,
            Frame::Ping { .. } => FrameType::Ping,
            Frame::Pong { .. } => FrameType::Pong,
            Frame::GoAway { .. } => FrameType::GoAway,
            Frame::Message { .. } => FrameType::Message,
        }
    }

    /// The stream the frame belongs to (0: the session).
    pub fn stream(&self) -> StreamId {
        match self {
            Frame::Open { stream, .. }
            | Frame::Accept { stream, .. }
            | Frame::Data { stream, .. }
            | Frame::Credit { stream, .. }
            | Frame::Fin { stream }
            | Frame::Reset { stream, .. } => *stream,
            _ => 0,
        }
    }

    /// Appends the frame's bytes to `out`. Text longer than [`MAX_TEXT`] is cut (at a character boundary),
    /// so what is sent always decodes.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u8(self.frame_type() as u8);
        out.put_u32(self.stream());
        out.put_u32(0);
        match self {
            Frame::Hello { min, max, peer } => {
                out.put_u16(*min);
                out.put_u16(*max);
                put_text(out, peer);
            }
            Frame::Welcome { version, peer } => {
                out.put_u16(*version);
                put_text(out, peer);
            }
            Frame::Refuse { reason } | Frame::GoAway { reason } | Frame::Reset { reason, .. } => {
                put_text(out, reason)
            }
            Frame::Open { window, target, .. } => {
                out.put_u32(*window);
                put_text(out, target);
            }
            Frame::Accept { window, .. } => out.put_u32(*window),
            Frame::Data { data, .. } | Frame::Message { data } => out.extend_from_slice(data),
            Frame::Credit { bytes, .. } => out.put_u32(*bytes),
            Frame::Fin { .. } => {}
            Frame::Ping { nonce } | Frame::Pong { nonce } => out.put_u64(*nonce),
        }
        let len = (out.len() - start - HEADER_LEN) as u32;
        out[start + 5..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    }

    /// The frame encoded on its own (one WebSocket message).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }
}

/// Appends a `Data` frame's header for `len` bytes of `stream`: the payload is to follow in `out`. Lets a
/// writer read a stream's bytes straight into the buffer it sends.
pub fn encode_data_header(out: &mut BytesMut, stream: StreamId, len: u32) {
    out.put_u8(FrameType::Data as u8);
    out.put_u32(stream);
    out.put_u32(len);
}

fn put_text(out: &mut BytesMut, text: &str) {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&text.as_bytes()[..end]);
}

/// A frame that cannot be decoded: where it was and what was wrong. The session that received it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Offset of the frame in the bytes given to [`decode`] (from where the buffer stood when it was called).
    pub offset: usize,
    /// The frame's type byte and stream, when they were read.
    pub frame: Option<(u8, StreamId)>,
    pub problem: Problem,
}

/// What was wrong with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    UnknownType,
    TooLarge {
        len: u64,
    },
    /// A session frame on a stream, or a stream frame on stream 0.
    WrongStream,
    /// The payload's size does not fit the type.
    BadLength {
        len: usize,
    },
    NotUtf8,
    TextTooLong {
        len: usize,
    },
    WindowTooLarge {
        window: u32,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tunnel frame at byte {}", self.offset)?;
        if let Some((ty, stream)) = self.frame {
            match FrameType::from_byte(ty) {
                Some(t) => write!(f, " ({t:?}, stream {stream})")?,
                None => write!(f, " (type {ty}, stream {stream})")?,
            }
        }
        f.write_str(": ")?;
        match &self.problem {
            Problem::UnknownType => f.write_str(
                "unknown frame type (the peer speaks a protocol version it did not negotiate)",
            ),
            Problem::TooLarge { len } => {
                write!(
                    f,
                    "payload of {len} bytes is over the limit of {MAX_PAYLOAD}"
                )
            }
            Problem::WrongStream => f.write_str(
                "stream frames need a stream id other than 0, session frames stream id 0",
            ),
            Problem::BadLength { len } => {
                write!(f, "a payload of {len} bytes does not fit the type")
            }
            Problem::NotUtf8 => f.write_str("text is not UTF-8"),
            Problem::TextTooLong { len } => {
                write!(f, "text of {len} bytes is over the limit of {MAX_TEXT}")
            }
            Problem::WindowTooLarge { window } => {
                write!(
                    f,
                    "window of {window} bytes is over the limit of {MAX_WINDOW}"
                )
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Takes the first frame off `buf`. `Ok(None)`: `buf` holds less than a whole frame (nothing is taken; in a
/// WebSocket message that means the message was cut). A frame that breaks the rules is an error, and `buf`
/// is left as it was.
pub fn decode(buf: &mut Bytes) -> Result<Option<Frame>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let ty = buf[0];
    let stream = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let len = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) as usize;
    let fail = |problem| DecodeError {
        offset: 0,
        frame: Some((ty, stream)),
        problem,
    };
    let Some(kind) = FrameType::from_byte(ty) else {
        return Err(fail(Problem::UnknownType));
    };
    if len > MAX_PAYLOAD {
        return Err(fail(Problem::TooLarge { len: len as u64 }));
    }
    if kind.on_stream() == (stream == 0) {
        return Err(fail(Problem::WrongStream));
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let mut p = buf.slice(HEADER_LEN..HEADER_LEN + len);
    let exact = |p: &Bytes, n: usize| {
        if p.len() == n {
            Ok(())
        } else {
            Err(fail(Problem::BadLength { len: p.len() }))
        }
    };
    let at_least = |p: &Bytes, n: usize| {
        if p.len() >= n {
            Ok(())
        } else {
            Err(fail(Problem::BadLength { len: p.len() }))
        }
    };
    let text = |p: Bytes| -> Result<String, DecodeError> {
        if p.len() > MAX_TEXT {
            return Err(fail(Problem::TextTooLong { len: p.len() }));
        }
        String::from_utf8(p.to_vec()).map_err(|_| fail(Problem::NotUtf8))
    };
    let window = |w: u32| {
        if w > MAX_WINDOW {
            Err(fail(Problem::WindowTooLarge { window: w }))
        } else {
            Ok(w)
        }
    };
    let frame = match kind {
        FrameType::Hello => {
            at_least(&p, 4)?;
            let (min, max) = (p.get_u16(), p.get_u16());
            Frame::Hello {
                min,
                max,
                peer: text(p)?,
            }
        }
        FrameType::Welcome => {
            at_least(&p, 2)?;
            let version = p.get_u16();
            Frame::Welcome {
                version,
                peer: text(p)?,
            }
        }
        FrameType::Refuse => Frame::Refuse { reason: text(p)? },
        FrameType::GoAway => Frame::GoAway { reason: text(p)? },
        FrameType::Open => {
            at_least(&p, 4)?;
            let w = window(p.get_u32())?;
            Frame::Open {
                stream,
                window: w,
                target: text(p)?,
            }
        }
        FrameType::Accept => {
            exact(&p, 4)?;
            Frame::Accept {
                stream,
                window: window(p.get_u32())?,
            }
        }
        FrameType::Data => Frame::Data { stream, data: p },
        FrameType::Message => Frame::Message { data: p },
        FrameType::Credit => {
            exact(&p, 4)?;
            Frame::Credit {
                stream,
                bytes: window(p.get_u32())?,
            }
        }
        FrameType::Fin => {
            exact(&p, 0)?;
            Frame::Fin { stream }
        }
        FrameType::Reset => Frame::Reset {
            stream,
            reason: text(p)?,
        },
        FrameType::Ping => {
            exact(&p, 8)?;
            Frame::Ping { nonce: p.get_u64() }
        }
        FrameType::Pong => {
            exact(&p, 8)?;
            Frame::Pong { nonce: p.get_u64() }
        }
    };
    buf.advance(HEADER_LEN + len);
    Ok(Some(frame))
}
