//! A session: the handshake, the reader and writer tasks, and the streams.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes, BytesMut};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};
use tunnel::{Frame, RecvWindow, SendCredit, Side, StreamId, StreamIds};

use crate::transport::Transport;

/// Largest `Data` payload a stream write sends in one frame.
const MAX_CHUNK: usize = 64 * 1024;
/// A batch of queued frames is sent as one message until it reaches this size.
const MAX_BATCH: usize = 256 * 1024;

/// How a session behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// What this side is, for the peer's logs (e.g. `kiln-agent 0.1.0`).
    pub name: String,
    /// The window this side grants each stream it receives on.
    pub window: u32,
    /// How often this side pings the peer.
    pub keepalive: Duration,
    /// How long the peer may stay silent before the session is taken as dead.
    pub timeout: Duration,
    /// How long the handshake may take.
    pub handshake_timeout: Duration,
}

impl Config {
    pub fn new(name: impl Into<String>) -> Config {
        Config {
            name: name.into(),
            window: tunnel::DEFAULT_WINDOW,
            keepalive: Duration::from_secs(2),
            timeout: Duration::from_secs(6),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a session could not start, or ended.
#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    /// The peer refused the session; its reason.
    Refused(String),
    Incompatible(tunnel::Incompatible),
    /// The peer broke a rule of the protocol.
    Protocol(String),
    Timeout(&'static str),
    /// The transport closed during the handshake.
    Closed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "tunnel transport: {e}"),
            Error::Refused(r) => write!(f, "the peer refused the tunnel: {r}"),
            Error::Incompatible(i) => i.fmt(f),
            Error::Protocol(p) => write!(f, "tunnel protocol error: {p}"),
            Error::Timeout(what) => write!(f, "tunnel: timed out {what}"),
            Error::Closed => {
                f.write_str("tunnel: the peer closed the connection during the handshake")
            }
        }
    }
}

impl std::error::Error for Error {}

/// What the peer sends that is not a reply: streams it opens, and session messages.
#[derive(Debug)]
pub enum Event {
    Stream(Incoming),
    Message(Bytes),
}

/// One end of a session (cheap to clone; the session lives until [`Session::close`], the peer ends it, or
/// the transport breaks).
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.shared.peer)
            .field("version", &self.shared.version)
            .finish()
    }
}

struct Shared {
    side: Side,
    peer: String,
    version: u16,
    window: u32,
    out: mpsc::UnboundedSender<Out>,
    /// The reason, once the session has ended.
    ended: watch::Sender<Option<String>>,
    state: Mutex<State>,
    start: Instant,
}

enum Out {
    /// Encoded frames.
    Frames(Bytes),
    /// Send `GoAway` with this reason, then close the transport.
    Close(String),
}

struct State {
    streams: HashMap<StreamId, StreamState>,
    ids: StreamIds,
    ended: Option<String>,
    rtt: Option<Duration>,
}

#[derive(Default)]
struct StreamState {
    recv: VecDeque<Bytes>,
    /// Set once this side accepted the stream (or opened it).
    window: Option<RecvWindow>,
    fin_in: bool,
    reader: Option<Waker>,
    credit: Option<SendCredit>,
    fin_out: bool,
    writer: Option<Waker>,
    /// The stream is over: the peer reset it, or the session ended.
    reset: Option<String>,
    /// This side opened the stream and waits for the peer's answer.
    opening: Option<oneshot::Sender<Result<(), String>>>,
}

impl StreamState {
    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    fn end(&mut self, reason: String) {
        if let Some(tx) = self.opening.take() {
            let _ = tx.send(Err(reason.clone()));
        }
        self.reset.get_or_insert(reason);
        self.wake();
    }
}

/// Opens a session on a transport this side dialed: says `Hello`, waits for `Welcome`.
pub async fn dial(
    mut transport: impl Transport,
    config: Config,
) -> Result<(Session, mpsc::UnboundedReceiver<Event>), Error> {
    let hello = Frame::Hello {
        min: tunnel::MIN_VERSION,
        max: tunnel::VERSION,
        peer: config.name.clone(),
    };
    transport.send(hello.to_bytes()).await.map_err(Error::Io)?;
    let answer = first_frame(&mut transport, config.handshake_timeout).await?;
    let (version, peer) = match answer {
        Frame::Welcome { version, peer } => (version, peer),
        Frame::Refuse { reason } => return Err(Error::Refused(reason)),
        other => {
            return Err(Error::Protocol(format!(
                "expected Welcome or Refuse, got {:?}",
                other.frame_type()
            )))
        }
    };
    if !(tunnel::MIN_VERSION..=tunnel::VERSION).contains(&version) {
        return Err(Error::Protocol(format!(
            "the peer chose version {version}, which this side did not offer"
        )));
    }
    Ok(start(transport, Side::Dialer, peer, version, config))
}

/// Opens a session on a transport this side accepted: waits for `Hello`, answers `Welcome` with the newest
/// version both speak, or `Refuse` saying why there is none.
pub async fn accept(
    mut transport: impl Transport,
    config: Config,
) -> Result<(Session, mpsc::UnboundedReceiver<Event>), Error> {
    let hello = first_frame(&mut transport, config.handshake_timeout).await?;
    let Frame::Hello { min, max, peer } = hello else {
        return Err(Error::Protocol(format!(
            "expected Hello, got {:?}",
            hello.frame_type()
        )));
    };
    let version = match tunnel::negotiate(min, max) {
        Ok(v) => v,
        Err(inc) => {
            let refuse = Frame::Refuse {
                reason: inc.to_string(),
            };
            let _ = transport.send(refuse.to_bytes()).await;
            let _ = transport.close().await;
            return Err(Error::Incompatible(inc));
        }
    };
    let welcome = Frame::Welcome {
        version,
        peer: config.name.clone(),
    };
    transport
        .send(welcome.to_bytes())
        .await
        .map_err(Error::Io)?;
    Ok(start(transport, Side::Acceptor, peer, version, config))
}

async fn first_frame(transport: &mut impl Transport, limit: Duration) -> Result<Frame, Error> {
    let msg = tokio::time::timeout(limit, transport.next())
        .await
        .map_err(|_| Error::Timeout("waiting for the handshake"))?;
    let mut msg = match msg {
        None => return Err(Error::Closed),
        Some(Err(e)) => return Err(Error::Io(e)),
        Some(Ok(m)) => m,
    };
    match tunnel::decode(&mut msg) {
        Ok(Some(f)) if msg.is_empty() => Ok(f),
        Ok(Some(_)) => Err(Error::Protocol(
            "the handshake message carries more than one frame".into(),
        )),
        Ok(None) => Err(Error::Protocol("the handshake frame is cut short".into())),
        Err(e) => Err(Error::Protocol(e.to_string())),
    }
}

fn start(
    transport: impl Transport,
    side: Side,
    peer: String,
    version: u16,
    config: Config,
) -> (Session, mpsc::UnboundedReceiver<Event>) {
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        side,
        peer,
        version,
        window: config.window.min(tunnel::MAX_WINDOW),
        out: out_tx,
        ended: watch::channel(None).0,
        state: Mutex::new(State {
            streams: HashMap::new(),
            ids: StreamIds::new(side),
            ended: None,
            rtt: None,
        }),
        start: Instant::now(),
    });
    let (sink, stream) = transport.split();
    let session = Session {
        shared: shared.clone(),
    };
    tokio::spawn(write_loop(sink, out_rx, shared.clone(), config.keepalive));
    tokio::spawn(read_loop(stream, events_tx, shared, config.timeout));
    (session, events_rx)
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<impl Transport, Bytes>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    shared: Arc<Shared>,
    keepalive: Duration,
) {
    let mut ended = shared.ended.subscribe();
    let mut tick = tokio::time::interval(keepalive);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = BytesMut::new();
    let reason = loop {
        let item = tokio::select! {
            biased;
            item = rx.recv() => item,
            _ = tick.tick() => {
                let nonce = shared.start.elapsed().as_micros() as u64;
                Some(Out::Frames(Frame::Ping { nonce }.to_bytes()))
            }
            _ = ended.wait_for(|e| e.is_some()) => None,
        };
        let first = match item {
            Some(Out::Frames(f)) => f,
            Some(Out::Close(reason)) => break go_away(&mut sink, reason).await,
            None => {
                let _ = sink.close().await;
                return;
            }
        };
        // Whatever else is queued goes in the same message, up to a limit; a frame alone is sent as it is,
        // without a copy.
        let mut close = None;
        while batch.len().max(first.len()) < MAX_BATCH {
            match rx.try_recv() {
                Ok(Out::Frames(f)) => {
                    if batch.is_empty() {
                        batch.extend_from_slice(&first);
                    }
                    batch.extend_from_slice(&f);
                }
                Ok(Out::Close(r)) => {
                    close = Some(r);
                    break;
                }
                Err(_) => break,
            }
        }
        let msg = if batch.is_empty() {
            first
        } else {
            batch.split().freeze()
        };
        if let Some(reason) = close {
            let _ = sink.send(msg).await;
            break go_away(&mut sink, reason).await;
        }
        if let Err(e) = sink.send(msg).await {
            break format!("sending to the peer failed: {e}");
        }
    };
    end(&shared, reason);
}

/// Tells the peer why this side ends the session and closes the transport; returns the session's end reason.
async fn go_away<S: futures_util::Sink<Bytes> + Unpin>(sink: &mut S, reason: String) -> String {
    let _ = sink
        .send(
            Frame::GoAway {
                reason: reason.clone(),
            }
            .to_bytes(),
        )
        .await;
    let _ = sink.close().await;
    format!("closed by this side: {reason}")
}

async fn read_loop(
    mut stream: futures_util::stream::SplitStream<impl Transport>,
    events: mpsc::UnboundedSender<Event>,
    shared: Arc<Shared>,
    timeout: Duration,
) {
    let mut ended = shared.ended.subscribe();
    let reason = loop {
        let msg = tokio::select! {
            msg = tokio::time::timeout(timeout, stream.next()) => msg,
            _ = ended.wait_for(|e| e.is_some()) => return,
        };
        let mut msg = match msg {
            Err(_) => {
                break format!(
                    "the peer sent nothing for {} s (keepalive timeout)",
                    timeout.as_secs_f64()
                )
            }
            Ok(None) => break "the peer closed the connection".to_owned(),
            Ok(Some(Err(e))) => break format!("receiving from the peer failed: {e}"),
            Ok(Some(Ok(m))) => m,
        };
        let stop = loop {
            match tunnel::decode(&mut msg) {
                Ok(Some(frame)) => {
                    if let Err(stop) = apply(&shared, &events, frame) {
                        break Some(stop);
                    }
                }
                Ok(None) if msg.is_empty() => break None,
                Ok(None) => break Some(Stop::Broken("a message ends inside a frame".to_owned())),
                Err(e) => break Some(Stop::Broken(e.to_string())),
            }
        };
        match stop {
            None => {}
            Some(Stop::GoAway(reason)) => break format!("the peer is going away: {reason}"),
            Some(Stop::Broken(p)) => {
                let reason = format!("protocol error: {p}");
                let _ = shared.out.send(Out::Close(reason.clone()));
                break reason;
            }
        }
    };
    end(&shared, reason);
}

/// Ends the session: every stream's reads and writes fail with `reason` (after the data already received).
fn end(shared: &Shared, reason: String) {
    let mut state = shared.lock();
    if state.ended.is_some() {
        return;
    }
    tracing::debug!(peer = %shared.peer, %reason, "tunnel session ended");
    let msg = format!("tunnel closed: {reason}");
    for s in state.streams.values_mut() {
        s.end(msg.clone());
    }
    state.ended = Some(reason.clone());
    drop(state);
    shared.ended.send_replace(Some(reason));
}

/// Why a frame from the peer ends the session.
enum Stop {
    /// The peer said goodbye.
    GoAway(String),
    /// The peer broke a rule of the protocol.
    Broken(String),
}

impl From<String> for Stop {
    fn from(s: String) -> Stop {
        Stop::Broken(s)
    }
}

/// Applies one frame from the peer.
fn apply(
    shared: &Arc<Shared>,
    events: &mpsc::UnboundedSender<Event>,
    frame: Frame,
) -> Result<(), Stop> {
    match frame {
        Frame::Ping { nonce } => shared.send(&Frame::Pong { nonce }),
        Frame::Pong { nonce } => {
            let now = shared.start.elapsed().as_micros() as u64;
            shared.lock().rtt = Some(Duration::from_micros(now.saturating_sub(nonce)));
        }
        Frame::GoAway { reason } => return Err(Stop::GoAway(reason)),
        Frame::Message { data } => {
            let _ = events.send(Event::Message(data));
        }
        Frame::Hello { .. } | Frame::Welcome { .. } | Frame::Refuse { .. } => {
            return Err(Stop::Broken("a handshake frame after the handshake".into()))
        }
        Frame::Open {
            stream,
            window,
            target,
        } => {
            if !shared.side.peer().opens(stream) {
                return Err(
                    format!("the peer opened stream {stream}, an id of this side's").into(),
                );
            }
            let mut state = shared.lock();
            if state.streams.contains_key(&stream) {
                return Err(format!("the peer opened stream {stream} twice").into());
            }
            state.streams.insert(
                stream,
                StreamState {
                    credit: Some(SendCredit::new(window)),
                    ..StreamState::default()
                },
            );
            drop(state);
            let incoming = Incoming {
                id: stream,
                target,
                session: Session {
                    shared: shared.clone(),
                },
                answered: false,
            };
            // Nobody takes streams: the Incoming's drop refuses it.
            let _ = events.send(Event::Stream(incoming));
        }
        Frame::Accept { stream, window } => {
            let mut state = shared.lock();
            let Some(s) = state.streams.get_mut(&stream) else {
                return Ok(());
            };
            let Some(tx) = s.opening.take() else {
                return Err(format!(
                    "the peer accepted stream {stream}, which was not waiting for it"
                )
                .into());
            };
            s.credit = Some(SendCredit::new(window));
            let _ = tx.send(Ok(()));
            s.wake();
        }
        Frame::Data { stream, data } => {
            let mut state = shared.lock();
            // Data for a stream this side has dropped: it was reset; drop the bytes.
            let Some(s) = state.streams.get_mut(&stream) else {
                return Ok(());
            };
            let Some(window) = s.window.as_mut() else {
                return Err(format!("data on stream {stream} before it was accepted").into());
            };
            if s.fin_in {
                return Err(format!("data on stream {stream} after its Fin").into());
            }
            window
                .received(data.len())
                .map_err(|e| format!("stream {stream}: {e}"))?;
            if !data.is_empty() {
                s.recv.push_back(data);
            }
            if let Some(w) = s.reader.take() {
                w.wake();
            }
        }
        Frame::Credit { stream, bytes } => {
            let mut state = shared.lock();
            let Some(s) = state.streams.get_mut(&stream) else {
                return Ok(());
            };
            if let Some(c) = s.credit.as_mut() {
                c.grant(bytes)
                    .map_err(|e| format!("stream {stream}: {e}"))?;
            }
            if let Some(w) = s.writer.take() {
                w.wake();
            }
        }
        Frame::Fin { stream } => {
            let mut state = shared.lock();
            if let Some(s) = state.streams.get_mut(&stream) {
                s.fin_in = true;
                if let Some(w) = s.reader.take() {
                    w.wake();
                }
            }
        }
        Frame::Reset { stream, reason } => {
            let mut state = shared.lock();
            if let Some(s) = state.streams.get_mut(&stream) {
                s.end(reason);
            }
        }
    }
    Ok(())
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, frame: &Frame) {
        let _ = self.out.send(Out::Frames(frame.to_bytes()));
    }
}

impl Session {
    /// What the peer said it is in the handshake.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// The protocol version the two sides speak.
    pub fn version(&self) -> u16 {
        self.shared.version
    }

    /// The round-trip time of the last keepalive.
    pub fn rtt(&self) -> Option<Duration> {
        self.shared.lock().rtt
    }

    /// Streams open now.
    pub fn stream_count(&self) -> usize {
        self.shared.lock().streams.len()
    }

    /// Why the session ended, if it has.
    pub fn ended(&self) -> Option<String> {
        self.shared.lock().ended.clone()
    }

    /// Waits until the session ends; returns why.
    pub async fn closed(&self) -> String {
        let mut rx = self.shared.ended.subscribe();
        let r = rx.wait_for(|e| e.is_some()).await;
        match r {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the session is gone".to_owned(),
        }
    }

    /// Ends the session, telling the peer why.
    pub fn close(&self, reason: impl Into<String>) {
        let _ = self.shared.out.send(Out::Close(reason.into()));
    }

    /// Sends a message on the session (see [`Event::Message`]).
    pub fn send_message(&self, data: Bytes) -> io::Result<()> {
        if let Some(reason) = self.ended() {
            return Err(io::Error::new(io::ErrorKind::NotConnected, reason));
        }
        self.shared.send(&Frame::Message { data });
        Ok(())
    }

    /// Opens a stream to `target` and waits for the peer to accept it. A refusal is an error carrying the
    /// peer's reason.
    pub async fn open(&self, target: &str) -> io::Result<TunnelStream> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.shared.lock();
            if let Some(reason) = &state.ended {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("tunnel closed: {reason}"),
                ));
            }
            let Some(id) = state.ids.next_id() else {
                return Err(io::Error::other(
                    "this tunnel session has used all its stream ids",
                ));
            };
            state.streams.insert(
                id,
                StreamState {
                    window: Some(RecvWindow::new(self.shared.window)),
                    opening: Some(tx),
                    ..StreamState::default()
                },
            );
            self.shared.send(&Frame::Open {
                stream: id,
                window: self.shared.window,
                target: target.to_owned(),
            });
            id
        };
        // Dropped before the answer (the caller gave up): the stream's drop resets it.
        let stream = TunnelStream {
            id,
            shared: self.shared.clone(),
        };
        match rx.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(reason)) => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("stream to {target}: {reason}"),
            )),
            Err(_) => Err(io::Error::other("the tunnel session ended")),
        }
    }
}

/// A stream the peer opened, waiting for this side to accept or refuse it (dropped unanswered: refused).
pub struct Incoming {
    id: StreamId,
    target: String,
    session: Session,
    answered: bool,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("id", &self.id)
            .field("target", &self.target)
            .finish()
    }
}

impl Incoming {
    /// What the peer asked to reach.
    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Accepts the stream.
    pub fn accept(mut self) -> io::Result<TunnelStream> {
        self.answered = true;
        let shared = self.session.shared.clone();
        let mut state = shared.lock();
        let Some(s) = state.streams.get_mut(&self.id) else {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the stream is gone",
            ));
        };
        if let Some(reason) = &s.reset {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                reason.clone(),
            ));
        }
        s.window = Some(RecvWindow::new(shared.window));
        shared.send(&Frame::Accept {
            stream: self.id,
            window: shared.window,
        });
        drop(state);
        Ok(TunnelStream {
            id: self.id,
            shared,
        })
    }

    /// Refuses the stream; the opener's `open` fails with `reason`.
    pub fn refuse(mut self, reason: &str) {
        self.answered = true;
        self.reset(reason);
    }

    fn reset(&self, reason: &str) {
        let shared = &self.session.shared;
        shared.lock().streams.remove(&self.id);
        shared.send(&Frame::Reset {
            stream: self.id,
            reason: reason.to_owned(),
        });
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.answered {
            self.reset("nothing on the other side takes this stream");
        }
    }
}

/// A byte stream through the tunnel.
pub struct TunnelStream {
    id: StreamId,
    shared: Arc<Shared>,
}

impl fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelStream")
            .field("id", &self.id)
            .finish()
    }
}

impl TunnelStream {
    pub fn id(&self) -> StreamId {
        self.id
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        let Some(s) = state.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if s.recv.is_empty() {
            if s.fin_in {
                return Poll::Ready(Ok(()));
            }
            if let Some(reason) = &s.reset {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    reason.clone(),
                )));
            }
            s.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut copied = 0;
        while buf.remaining() > 0 {
            let Some(front) = s.recv.front_mut() else {
                break;
            };
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                s.recv.pop_front();
            }
            copied += n;
        }
        if let Some(credit) = s.window.as_mut().and_then(|w| w.consumed(copied)) {
            self.shared.send(&Frame::Credit {
                stream: self.id,
                bytes: credit,
            });
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.shared.lock();
        let Some(s) = state.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if let Some(reason) = &s.reset {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                reason.clone(),
            )));
        }
        if s.fin_out {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream's write side was shut down",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = s
            .credit
            .as_mut()
            .map_or(0, |c| c.take(buf.len().min(MAX_CHUNK)));
        if n == 0 {
            s.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut frame = BytesMut::with_capacity(tunnel::HEADER_LEN + n);
        tunnel::encode_data_header(&mut frame, self.id, n as u32);
        frame.extend_from_slice(&buf[..n]);
        if self.shared.out.send(Out::Frames(frame.freeze())).is_err() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the tunnel session ended",
            )));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        if let Some(s) = state.streams.get_mut(&self.id) {
            if !s.fin_out && s.reset.is_none() {
                s.fin_out = true;
                self.shared.send(&Frame::Fin { stream: self.id });
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let Some(s) = state.streams.remove(&self.id) else {
            return;
        };
        if s.reset.is_some() || state.ended.is_some() {
            return;
        }
        // The peer reads what was sent, then the end; its writes from now on fail.
        if !s.fin_out {
            self.shared.send(&Frame::Fin { stream: self.id });
        }
        if !s.fin_in {
            self.shared.send(&Frame::Reset {
                stream: self.id,
                reason: "the other side closed the stream".into(),
            });
        }
    }
}
