//! A WebSocket as a byte stream: binary messages in and out of `AsyncRead`/`AsyncWrite`.
//!
//! [`WsIo`] lets the session protocol, which wants a byte stream, travel inside WebSocket
//! messages (so a stream passes through HTTP proxies that only know WebSockets). It owns the
//! mapping between bytes and messages and nothing else: it knows no HTTP (the WebSocket
//! handshake is done before it is built) and nothing of the bytes' meaning.
//!
//! - Each `poll_write` sends one binary message of at most [`MAX_MESSAGE_LEN`] bytes; message
//!   boundaries carry no meaning.
//! - Reads return binary payloads in order, across as many reads as the caller's buffer needs: a
//!   message larger than the buffer is never truncated.
//! - Pings are answered (by the WebSocket layer, as reads and writes drive it); pongs are ignored.
//! - The peer's close message is end-of-stream (`Ok(0)`); the connection ending without one is an
//!   error of kind `ConnectionReset`, so a dropped connection never looks like a clean end.
//! - A text message is an error of kind `InvalidData`: this stream carries bytes only.
//! - `poll_shutdown` sends a close message.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The most bytes one `poll_write` puts in one message. Larger writes are accepted in part, as
/// `AsyncWrite` allows; 64 KiB keeps a message's copy cache-sized and well under any
/// receiver's message limit.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// A [`WebSocketStream`] read and written as a byte stream of binary messages.
///
/// ```no_run
/// # async fn demo(ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> std::io::Result<()> {
/// use immortal::ws_io::WsIo;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// let mut io = WsIo::new(ws);
/// io.write_all(b"hello").await?;
/// io.flush().await?;
/// let mut reply = Vec::new();
/// io.read_to_end(&mut reply).await?; // until the peer's close message
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// What is left of the message being read.
    pending: Bytes,
    /// The peer closed (or the stream ended cleanly): every later read is end-of-stream.
    read_closed: bool,
}

impl<S> WsIo<S> {
    /// Wraps a WebSocket whose handshake is complete.
    pub fn new(ws: WebSocketStream<S>) -> WsIo<S> {
        WsIo {
            ws,
            pending: Bytes::new(),
            read_closed: false,
        }
    }

    /// The WebSocket inside.
    pub fn get_ref(&self) -> &WebSocketStream<S> {
        &self.ws
    }

    /// Unwraps the WebSocket. Bytes of a message not yet read are lost.
    pub fn into_inner(self) -> WebSocketStream<S> {
        self.ws
    }
}

/// A WebSocket error as an I/O error, keeping the operating system's error when there is one.
fn to_io_error(err: WsError) -> io::Error {
    match err {
        WsError::Io(err) => err,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket is closed")
        }
        WsError::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            "the WebSocket connection ended without a close message",
        ),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S> AsyncRead for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pending.has_remaining() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(payload))) => this.pending = payload,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text WebSocket message on a binary stream",
                    )))
                }
                // The WebSocket layer queues the pong itself; it leaves with the next read or
                // write.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => this.read_closed = true,
                Some(Err(err)) => return Poll::Ready(Err(to_io_error(err))),
            }
        }
    }
}

impl<S> AsyncWrite for WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut ws = Pin::new(&mut self.ws);
        ready!(ws.as_mut().poll_ready(cx)).map_err(to_io_error)?;
        let n = buf.len().min(MAX_MESSAGE_LEN);
        ws.start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(to_io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(to_io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (client, server)
    }

    #[tokio::test]
    async fn a_message_larger_than_the_buffer_is_read_whole() {
        let (mut raw, ws) = pair().await;
        let mut io = WsIo::new(ws);
        let message: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        raw.send(Message::Binary(message.clone().into()))
            .await
            .unwrap();
        raw.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        raw.send(Message::Binary(Bytes::from_static(b"tail")))
            .await
            .unwrap();
        raw.close(None).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let n = io.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&got[..100_000], &message[..]);
        assert_eq!(&got[100_000..], b"tail");
        // The ping was answered.
        io.flush().await.unwrap();
        assert!(matches!(raw.next().await, Some(Ok(Message::Pong(_)))));
    }

    #[tokio::test]
    async fn writes_become_bounded_binary_messages() {
        let (mut raw, ws) = pair().await;
        let mut io = WsIo::new(ws);
        let data = vec![7u8; MAX_MESSAGE_LEN + 10];
        io.write_all(&data).await.unwrap();
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        let mut lens = Vec::new();
        while let Some(message) = raw.next().await {
            match message.unwrap() {
                Message::Binary(payload) => lens.push(payload.len()),
                Message::Close(_) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(lens, vec![MAX_MESSAGE_LEN, 10]);
    }

    #[tokio::test]
    async fn text_is_invalid_data() {
        let (mut raw, ws) = pair().await;
        let mut io = WsIo::new(ws);
        raw.send(Message::text("hi")).await.unwrap();
        let err = io.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_drop_without_close_is_not_end_of_stream() {
        let (raw, ws) = pair().await;
        let mut io = WsIo::new(ws);
        drop(raw);
        let err = io.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
