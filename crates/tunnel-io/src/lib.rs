//! Tunnel sessions on tokio: the I/O half of Kiln's tunnel protocol (the `tunnel` crate is the wire format).
//!
//! A [`Session`] runs over any [`Transport`] (a WebSocket: [`WsTransport`] on the dialing side, the server's
//! own adapter on the accepting side, or [`memory_pair`] in tests). [`dial`] and [`accept`] do the version
//! handshake; then either side opens streams ([`Session::open`]) that the other receives as [`Event::Stream`]
//! and accepts or refuses. A [`TunnelStream`] is `AsyncRead + AsyncWrite` with TCP's semantics: half-close
//! with `shutdown`, reset on drop, and per-stream flow control so one stalled reader holds up only its own
//! stream. The session pings its peer; a peer silent for longer than [`Config::timeout`] ends it, and so do
//! a transport error, the peer's `GoAway` and any broken protocol rule. When a session ends every stream's
//! reads and writes fail with the reason.
//!
//! Two tasks run each session: a reader that applies the peer's frames, and a writer that sends this side's
//! frames, batching what is queued into one WebSocket message. Neither waits on the other, so two peers
//! writing at once never deadlock.
//!
//! [`direct`] is the other way to carry a stream: a TCP connection of its own, switched from HTTP/1.1, whose
//! relays move bytes with `splice(2)`; port forwarding and SSH take it where the server offers it.

mod dial;
pub mod direct;
mod relay;
mod session;
mod transport;

pub use dial::{connect, jitter, ConnectError, Redial};
pub use relay::{relay, RELAY_BUFFER};
pub use session::{accept, dial, Config, Error, Event, Incoming, Session, TunnelStream};
pub use transport::{memory_pair, MemoryTransport, Transport, WsTransport};
