//! Kiln's tunnel protocol: many byte streams multiplexed over one WebSocket between the server and an agent
//! (or a CLI, or a laptop daemon). This crate is the wire format and the rules both ends keep; the I/O lives in
//! `tunnel-io`.
//!
//! A WebSocket binary message carries one or more whole [`Frame`]s. Every frame is
//!
//! ```text
//! type: u8 | stream: u32 (big-endian) | length: u32 (big-endian) | payload: length bytes
//! ```
//!
//! Session frames ([`Frame::Hello`], [`Frame::Ping`], ...) use stream 0; stream frames use the stream's id,
//! odd when the dialing side opened it and even when the accepting side did ([`Side`]), so either side can
//! open streams without the two ever picking the same id.
//!
//! A session begins with the dialer's `Hello` (the protocol versions it speaks); the acceptor answers
//! `Welcome` (the version chosen by [`negotiate`]) or `Refuse` (why, in words a person can act on). Frame
//! types are only ever appended: a version speaks every type of the versions before it.
//!
//! Each direction of each stream has a window ([`RecvWindow`], [`SendCredit`]): a side sends no more `Data`
//! than the peer granted in `Open`/`Accept` and later `Credit` frames, so one slow stream never stalls the
//! others. Data beyond the window is a protocol error that ends the session.

mod backoff;
mod frame;
mod window;

pub use backoff::Backoff;
pub use frame::{decode, encode_data_header, DecodeError, Frame, FrameType, HEADER_LEN};
pub use window::{FlowError, RecvWindow, SendCredit};

use std::fmt;

/// The newest protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The oldest protocol version this build still speaks.
pub const MIN_VERSION: u16 = 1;

/// The largest payload of one frame, in bytes.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// The largest text field (a target, a reason, a peer's name), in bytes.
pub const MAX_TEXT: usize = 4096;
/// The window each direction of a stream starts with, unless a side asks for another in `Open`/`Accept`.
pub const DEFAULT_WINDOW: u32 = 1 << 20;
/// The largest window a side may grant (so credit arithmetic never overflows).
pub const MAX_WINDOW: u32 = 1 << 30;

/// A stream's id: never 0 (stream 0 is the session itself).
pub type StreamId = u32;

/// Which end of the WebSocket a side is: the one that dialed it, or the one that accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Dialer,
    Acceptor,
}

impl Side {
    /// Whether streams with this id are opened by this side.
    pub fn opens(self, id: StreamId) -> bool {
        id != 0 && (id % 2 == 1) == (self == Side::Dialer)
    }

    /// The other end.
    pub fn peer(self) -> Side {
        match self {
            Side::Dialer => Side::Acceptor,
            Side::Acceptor => Side::Dialer,
        }
    }
}

/// Hands out the ids of the streams one side opens.
#[derive(Debug)]
pub struct StreamIds {
    next: Option<StreamId>,
}

impl StreamIds {
    pub fn new(side: Side) -> StreamIds {
        StreamIds {
            next: Some(match side {
                Side::Dialer => 1,
                Side::Acceptor => 2,
            }),
        }
    }

    /// The next id, or `None` once this side has used up its half of the id space (the session must then be
    /// replaced by a new one).
    pub fn next_id(&mut self) -> Option<StreamId> {
        let id = self.next?;
        self.next = id.checked_add(2);
        Some(id)
    }
}

/// Why two sides share no protocol version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatible {
    /// The versions the peer speaks, oldest and newest.
    pub peer: (u16, u16),
    /// The versions this side speaks.
    pub ours: (u16, u16),
}

impl fmt::Display for Incompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (pmin, pmax) = self.peer;
        let (omin, omax) = self.ours;
        let upgrade = if pmin > omax {
            "this side is older: upgrade it"
        } else {
            "the peer is older: upgrade it"
        };
        write!(
            f,
            "incompatible tunnel protocol: the peer speaks versions {pmin} to {pmax}, this side {omin} to \
             {omax} ({upgrade})"
        )
    }
}

impl std::error::Error for Incompatible {}

/// The version an acceptor speaking [`MIN_VERSION`]..=[`VERSION`] uses with a dialer speaking `min..=max`: the
/// newest both speak.
pub fn negotiate(min: u16, max: u16) -> Result<u16, Incompatible> {
    negotiate_between((min, max), (MIN_VERSION, VERSION))
}

/// [`negotiate`] for any two ranges (`peer`, `ours`), each (oldest, newest).
pub fn negotiate_between(peer: (u16, u16), ours: (u16, u16)) -> Result<u16, Incompatible> {
    let newest = peer.1.min(ours.1);
    if peer.0 > peer.1 || newest < peer.0.max(ours.0) {
        return Err(Incompatible { peer, ours });
    }
    Ok(newest)
}

/// Fuzzing entry points, shared by the cargo-fuzz target and the stable tests.
pub mod fuzzing {
    use bytes::{Bytes, BytesMut};

    use super::*;

    /// Decodes `data` as a message of frames. Whatever decodes must encode back to the same bytes, and decoding
    /// never panics or reads past the message.
    pub fn check(data: &[u8]) {
        let mut rest = Bytes::copy_from_slice(data);
        let mut reencoded = BytesMut::new();
        let mut consumed = 0;
        loop {
            let before = rest.len();
            match decode(&mut rest) {
                Ok(Some(frame)) => {
                    frame.encode(&mut reencoded);
                    consumed += before - rest.len();
                    assert_eq!(
                        &reencoded[..],
                        &data[..consumed],
                        "{frame:?} does not encode to the bytes it was decoded from"
                    );
                }
                Ok(None) => {
                    assert!(rest.len() < HEADER_LEN || rest.len() == before);
                    break;
                }
                Err(e) => {
                    assert!(e.offset <= data.len());
                    let _ = e.to_string();
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
