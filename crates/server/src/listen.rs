//! The HTTP listener: accepts TCP connections and serves HTTP/1.1 on each (keep-alive, upgrades, a 30 s limit on
//! reading a request's head). A connection starts on the gateway's forwarding path
//! ([`crate::gateway::forward`]), which forwards ordinary requests for public endpoints itself; at the first
//! request it does not take, the connection moves to hyper with the bytes read so far. There, gateway requests
//! (a gateway host or a `/x/` path) go straight to the general proxy ahead of every API layer; everything else
//! goes to the API and console router with the peer address as [`ConnectInfo`].
//!
//! Shutdown is graceful: when `signal` completes the listener stops accepting, every connection finishes the
//! request it is serving and closes, and [`serve`] returns once all have.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::Router;
use bytes::{Buf as _, Bytes};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::ServiceExt as _;

use crate::gateway::forward;
use crate::{gateway, AppState};

/// How long a connection may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `state`'s application on `listener` until `signal` completes (or this future is dropped), then
/// drains the open connections.
///
/// Connections are served by one thread per core, each with a single-threaded runtime of its own that accepts
/// on the shared listening socket and keeps every connection it accepted, with its backend connections, on
/// that thread (as nginx's workers do): a request's steps never hop between threads.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    signal: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (inboxes, mut receivers): (Vec<_>, Vec<_>) =
        (0..threads).map(|_| mpsc::unbounded_channel()).unzip();
    let shared = Arc::new(Shared {
        router: crate::app(state.clone()),
        state,
        load: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
        inboxes,
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    // Each listener thread holds a clone until its connections are closed.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    // Flipped by the signal; dropped (which the threads also take as the signal) if this future is.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let listener = listener.into_std()?;
    for index in (0..threads).rev() {
        let listener = listener.try_clone()?;
        let inbox = receivers.pop().expect("one inbox per thread");
        let shared = shared.clone();
        let builder = builder.clone();
        let open = open_tx.clone();
        let stop = stop_rx.clone();
        std::thread::Builder::new()
            .name(format!("kiln-http-{index}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a listener thread's runtime");
                        return;
                    }
                };
                forward::set_shard(index);
                runtime.block_on(accept(listener, shared, builder, stop, index, inbox));
                drop(open);
            })?;
    }
    drop(listener);
    drop(open_tx);
    signal.await;
    let _ = stop_tx.send(true);
    let _ = open_rx.recv().await;
    Ok(())
}

/// A connection one listener thread hands another.
type Handed = (std::net::TcpStream, SocketAddr);

/// One listener thread's loop: accepts until the stop signal, then waits for its connections to close.
///
/// The threads share one listening socket, and the first awake takes each connection, so a burst of
/// connections can land mostly on one thread. A thread that accepts one while another thread holds fewer open
/// connections hands it to that thread (once, at accept), so the load stays even.
async fn accept(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    builder: http1::Builder,
    mut stop: tokio::sync::watch::Receiver<bool>,
    index: usize,
    mut inbox: mpsc::UnboundedReceiver<Handed>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the listening socket");
            return;
        }
    };
    // Each connection task holds a clone; once all are gone, every connection of this thread is closed.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    // The stop signal as this thread's connections see it: a channel of the thread's own, so that the idle
    // waits of one thread's connections never touch what the other threads' touch.
    let (local_stop_tx, local_stop) = tokio::sync::watch::channel(false);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            Some((std, peer)) = inbox.recv() => match TcpStream::from_std(std) {
                Ok(s) => (s, peer),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take a connection from another listener thread");
                    continue;
                }
            },
            accepted = listener.accept() => match accepted {
                Ok((s, peer)) => match shared.hand_off(index, s, peer) {
                    Some(kept) => kept,
                    None => continue,
                },
                Err(e) => {
                    // Out of descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let front = Front {
            shared: shared.clone(),
            peer,
        };
        let builder = builder.clone();
        let open = open_tx.clone();
        let stop = local_stop.clone();
        let counted = shared.clone();
        counted.load[index].fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            connection(stream, front, builder, stop).await;
            counted.load[index].fetch_sub(1, Ordering::Relaxed);
            drop(open);
        });
    }
    drop(listener);
    let _ = local_stop_tx.send(true);
    drop(open_tx);
    let _ = open_rx.recv().await;
}

/// Serves one connection: the forwarding path first, then hyper if a request needs it.
async fn connection(
    mut stream: TcpStream,
    front: Front,
    builder: http1::Builder,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let state = &front.shared.state;
    let outcome = forward::serve(
        state,
        &mut stream,
        front.peer,
        &mut stop,
        HEADER_READ_TIMEOUT,
    )
    .await;
    let read = match outcome {
        forward::Outcome::Closed => return,
        forward::Outcome::Handoff(read) => read.freeze(),
    };
    let conn = builder.serve_connection(TokioIo::new(Rewind { read, stream }), front);
    let mut conn = pin!(conn.with_upgrades());
    tokio::select! {
        biased;
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        }
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

struct Shared {
    state: AppState,
    router: Router,
    /// Connections open on each listener thread.
    load: Vec<AtomicUsize>,
    /// Each listener thread's inbox of connections handed to it.
    inboxes: Vec<mpsc::UnboundedSender<Handed>>,
}

impl Shared {
    /// A connection thread `index` accepted: kept when no thread holds fewer open connections, else handed to
    /// the one holding the fewest (`None`).
    fn hand_off(
        &self,
        index: usize,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<(TcpStream, SocketAddr)> {
        let mine = self.load[index].load(Ordering::Relaxed);
        let (least, fewest) = self
            .load
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|(_, n)| *n)?;
        if least == index || fewest >= mine {
            return Some((stream, peer));
        }
        match stream.into_std() {
            Ok(std) => match self.inboxes[least].send((std, peer)) {
                Ok(()) => None,
                // That thread has stopped: serve it here after all.
                Err(back) => TcpStream::from_std(back.0 .0).ok().map(|s| (s, peer)),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to another listener thread");
                None
            }
        }
    }
}

/// One connection's service: the gateway or the router.
#[derive(Clone)]
struct Front {
    shared: Arc<Shared>,
    peer: SocketAddr,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl hyper::service::Service<hyper::Request<Incoming>> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture;

    fn call(&self, req: hyper::Request<Incoming>) -> BoxFuture {
        let mut req = req.map(Body::new);
        let state = &self.shared.state;
        if let Some(target) = crate::workspaces::apps::target(&state.config.base_domain, &req) {
            let shared = self.shared.clone();
            let peer = self.peer;
            return Box::pin(async move {
                Ok(crate::workspaces::apps::handle(&shared.state, target, req, peer).await)
            });
        }
        match gateway::target(&self.shared.state.config.base_domain, &req) {
            Some(target) => {
                let shared = self.shared.clone();
                let peer = self.peer;
                Box::pin(async move { Ok(gateway::handle(&shared.state, target, req, peer).await) })
            }
            None => {
                req.extensions_mut().insert(ConnectInfo(self.peer));
                let router = self.shared.router.clone();
                Box::pin(router.oneshot(req))
            }
        }
    }
}

/// The TCP connection under a request that switched protocols, and the bytes already read from it past the
/// request (to be taken before the socket's); the upgraded connection back when it is not a plain TCP
/// connection served here.
pub(crate) fn into_tcp(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(TcpStream, Vec<u8>), hyper::upgrade::Upgraded> {
    let parts = upgraded.downcast::<TokioIo<Rewind>>()?;
    let rewind = parts.io.into_inner();
    let mut early = parts.read_buf.to_vec();
    early.extend_from_slice(&rewind.read);
    Ok((rewind.stream, early))
}

/// A connection whose first bytes were already read: they are read again before the socket's.
struct Rewind {
    read: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read.has_remaining() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
