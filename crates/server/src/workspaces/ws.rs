//! An axum WebSocket as a tunnel transport: binary messages are the tunnel's messages.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures_util::{Sink, Stream};

/// The largest WebSocket message a tunnel peer may send (a batch of frames).
pub const MAX_MESSAGE: usize = 2 * tunnel::MAX_PAYLOAD + 64 * 1024;

pub struct AxumWs(pub WebSocket);

impl Stream for AxumWs {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            return Poll::Ready(match ready!(Pin::new(&mut self.0).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => None,
                Some(Err(e)) => Some(Err(io::Error::other(e))),
                Some(Ok(Message::Binary(b))) => Some(Ok(b)),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Text(_))) => Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the tunnel takes binary WebSocket messages only",
                ))),
            });
        }
    }
}

impl Sink<Bytes> for AxumWs {
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0)
            .poll_ready(cx)
            .map_err(io::Error::other)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Bytes) -> io::Result<()> {
        Pin::new(&mut self.0)
            .start_send(Message::Binary(item))
            .map_err(io::Error::other)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}
