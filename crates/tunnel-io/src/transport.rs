//! What a session runs over: binary messages in both directions.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// Binary messages in (`None`: the peer closed) and out.
pub trait Transport:
    Stream<Item = io::Result<Bytes>> + Sink<Bytes, Error = io::Error> + Send + Unpin + 'static
{
}

impl<T> Transport for T where
    T: Stream<Item = io::Result<Bytes>> + Sink<Bytes, Error = io::Error> + Send + Unpin + 'static
{
}

/// A tokio-tungstenite WebSocket as a [`Transport`]: binary messages pass, pings are answered by tungstenite,
/// a close ends the stream, and a text message is an error (the protocol never sends one).
pub struct WsTransport<S> {
    ws: WebSocketStream<S>,
}

impl<S> WsTransport<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsTransport { ws }
    }
}

fn ws_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for WsTransport<S> {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let msg = match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None => return Poll::Ready(None),
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(ws_error(e)))),
                Some(Ok(m)) => m,
            };
            return Poll::Ready(match msg {
                Message::Binary(b) => Some(Ok(b)),
                Message::Close(_) => None,
                Message::Text(_) => Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the peer sent a text message; the tunnel protocol uses binary messages only",
                ))),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            });
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Sink<Bytes> for WsTransport<S> {
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_ready(cx).map_err(ws_error)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Bytes) -> io::Result<()> {
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(item))
            .map_err(ws_error)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_error)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_error(e))),
        }
    }
}

/// One end of an in-process transport: messages sent on one end arrive at the other. Dropping or closing an
/// end ends the other's stream, as a WebSocket's close does.
pub struct MemoryTransport {
    rx: mpsc::UnboundedReceiver<Bytes>,
    tx: Option<mpsc::UnboundedSender<Bytes>>,
}

/// Two connected in-process transports.
pub fn memory_pair() -> (MemoryTransport, MemoryTransport) {
    let (a_tx, b_rx) = mpsc::unbounded_channel();
    let (b_tx, a_rx) = mpsc::unbounded_channel();
    (
        MemoryTransport {
            rx: a_rx,
            tx: Some(a_tx),
        },
        MemoryTransport {
            rx: b_rx,
            tx: Some(b_tx),
        },
    )
}

impl Stream for MemoryTransport {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|m| m.map(Ok))
    }
}

impl Sink<Bytes> for MemoryTransport {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: Bytes) -> io::Result<()> {
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "the other end is gone");
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        tx.send(item).map_err(|_| closed())
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx = None;
        Poll::Ready(Ok(()))
    }
}
