//! [`Session`]: the application's handle on a session-mode stream, client or server side.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::client::SessionDialer;
use super::conn::{SessionConn, CLOSE_LINGER};
use super::link::SessionLink;
use super::options::SessionOptions;
use crate::error::{Error, Result};
use crate::pipe::{BackedPipe, OwnedReadHalf, OwnedWriteHalf, PipeState};
use crate::proto::SessionId;
use crate::transport::Connector;

/// A byte stream in session mode: a [`BackedPipe`] whose transports carry the framed session
/// protocol (`docs/PROTOCOL.md`).
///
/// On top of the pipe's exactly-once, in-order delivery across reconnects, a session
///
/// - acknowledges what the application has read, so the sender keeps only unacknowledged bytes
///   and a write waits once the pipe's capacity of them is outstanding (nothing unacknowledged is
///   ever dropped);
/// - probes an idle path and replaces a path that stays silent for about two heartbeats, even
///   while the application neither reads nor writes;
/// - ends cleanly: [`shutdown`](Self::shutdown) sends FIN after the data (the peer reads
///   `Ok(0)` only then), and [`close`](Self::close) (or dropping the session) sends CLOSE, which
///   fails the peer's reads and writes with [`Error::ClosedByPeer`] instead of leaving it to
///   reconnect;
/// - resumes only with proof of the session's secret, from any address.
///
/// A client makes one with [`Session::connect`]; a server gets one from
/// [`SessionServer::accept`](crate::SessionServer::accept).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use backedpipe::{Accepted, BoxIo, Session, SessionOptions, SessionServer, connector_fn};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// let server = SessionServer::new(SessionOptions::default());
/// let accepting = server.clone();
/// // Every connection the client opens is an in-memory link whose far end the server accepts.
/// let connector = connector_fn(move || {
///     let server = accepting.clone();
///     async move {
///         let (ours, theirs) = tokio::io::duplex(64 * 1024);
///         tokio::spawn(async move {
///             if let Ok(Accepted::New(mut session)) = server.accept(theirs).await {
///                 let mut buf = [0; 5];
///                 session.read_exact(&mut buf).await.unwrap();
///                 session.write_all(&buf).await.unwrap();
///                 session.shutdown().await.unwrap();
///             }
///         });
///         Ok::<BoxIo, std::io::Error>(Box::new(ours))
///     }
/// });
/// let mut session = Session::connect(connector, SessionOptions::default()).await?;
/// session.write_all(b"hello").await?;
/// let mut echoed = Vec::new();
/// session.read_to_end(&mut echoed).await?; // ends at the server's FIN
/// assert_eq!(echoed, b"hello");
/// session.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Session {
    pipe: BackedPipe<SessionConn>,
    link: Arc<SessionLink>,
    id: SessionId,
    close_timeout: Duration,
}

impl Session {
    /// Opens a new session through `connector` and returns it connected. From then on the
    /// session resumes by itself through the same connector after every transport loss, with
    /// backoff and full jitter, forever unless [`PipeConfig::max_reconnect_attempts`] says
    /// otherwise; it stops with a typed error when the server says the session is unknown or
    /// expired.
    ///
    /// [`PipeConfig::max_reconnect_attempts`]: crate::PipeConfig::max_reconnect_attempts
    ///
    /// # Errors
    /// The first connection's failure: [`Error::Io`] (the connector failed or timed out),
    /// [`Error::HandshakeTimeout`], [`Error::Protocol`] (the server is not speaking this
    /// protocol), [`Error::ClosedByPeer`] (the server refused), [`Error::NoRuntime`].
    pub async fn connect<C: Connector>(connector: C, options: SessionOptions) -> Result<Session> {
        let link = Arc::new(SessionLink::default());
        let credentials = Arc::default();
        let dialer = SessionDialer {
            connector,
            options: options.clone(),
            link: link.clone(),
            credentials: Arc::clone(&credentials),
        };
        let pipe = BackedPipe::session_mode(Some(dialer), options.pipe)?;
        pipe.set_ack_interval(options.timing.ack_every);
        link.attach_pipe(pipe.hooks());
        pipe.connect().await?;
        let id = credentials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|resumable| resumable.session_id)
            .ok_or(Error::PipeClosed)?;
        Ok(Session {
            pipe,
            link,
            id,
            close_timeout: options.close_timeout,
        })
    }

    /// A session the server side accepted.
    pub(crate) fn from_parts(
        pipe: BackedPipe<SessionConn>,
        link: Arc<SessionLink>,
        id: SessionId,
        close_timeout: Duration,
    ) -> Session {
        Session {
            pipe,
            link,
            id,
            close_timeout,
        }
    }

    /// The session's id (not secret: it names the session, the secret proves it).
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The underlying pipe: sequence numbers, buffered bytes, generation, status.
    pub fn pipe(&self) -> &BackedPipe<SessionConn> {
        &self.pipe
    }

    /// The current state.
    pub fn state(&self) -> PipeState {
        self.pipe.state()
    }

    /// True while a transport is attached and caught up.
    pub fn connected(&self) -> bool {
        self.pipe.connected()
    }

    /// A receiver that sees every state transition.
    pub fn status(&self) -> watch::Receiver<PipeState> {
        self.pipe.status()
    }

    /// Reads into `buf`, waiting while disconnected; `Ok(0)` once the peer has shut down its
    /// direction and every byte before has been read, or after a local close.
    ///
    /// # Errors
    /// The session's terminal error ([`Error::ClosedByPeer`], [`Error::SessionUnknown`], ...).
    pub async fn read(&self, buf: &mut [u8]) -> Result<usize> {
        self.pipe.read(buf).await
    }

    /// Writes all of `buf`, returning once it has been handed to a live transport. Waits while
    /// disconnected, and while the pipe's capacity of bytes is unacknowledged.
    ///
    /// # Errors
    /// [`Error::WriteAfterShutdown`] after [`shutdown`](Self::shutdown), or the session's
    /// terminal error.
    pub async fn write(&self, buf: &[u8]) -> Result<usize> {
        self.pipe.write(buf).await
    }

    /// Ends this side's direction: FIN follows the bytes written (and follows them again after
    /// any reconnect), so the peer reads end-of-stream once it has every byte. Reading goes on.
    ///
    /// # Errors
    /// The session's terminal error.
    pub async fn shutdown(&self) -> Result<()> {
        poll_fn(|cx| self.pipe.poll_shutdown_shared(cx)).await
    }

    /// Waits until the peer's application has read every byte written so far (the peer has
    /// acknowledged them all), across reconnects. Returns at once when nothing is
    /// outstanding, and when the session has ended (its reads and writes then say why).
    pub async fn acknowledged(&self) {
        poll_fn(|cx| self.pipe.poll_acknowledged(cx)).await
    }

    /// Closes the session gracefully: waits (at most the
    /// [`close_timeout`](SessionOptions::close_timeout), 30 s by default, enough to replace a dead path) for the peer to
    /// acknowledge every byte written, so that the CLOSE cannot overtake data the peer could
    /// still get; then the peer gets CLOSE and its reads and writes fail with
    /// [`Error::ClosedByPeer`] (after it has read everything, and the end-of-stream if
    /// [`shutdown`](Self::shutdown) was called); a server forgets the session. Waits at most
    /// about a second more for the CLOSE to leave. Dropping the session closes it at once,
    /// without waiting for anything.
    ///
    /// # Errors
    /// None at present; the signature leaves room for reporting a failed close.
    pub async fn close(&self) -> Result<()> {
        let _ = tokio::time::timeout(self.close_timeout, self.acknowledged()).await;
        let finished = self.link.current_finished();
        self.pipe.close().await?;
        if let Some(finished) = finished {
            let _ = tokio::time::timeout(CLOSE_LINGER, finished.cancelled()).await;
        }
        Ok(())
    }

    /// Splits the session into halves for different tasks. Shutting down the write half sends
    /// FIN; the session closes (sending CLOSE) when both halves are dropped or either is closed.
    pub fn into_split(self) -> (OwnedReadHalf<SessionConn>, OwnedWriteHalf<SessionConn>) {
        self.pipe.into_split()
    }
}

impl AsyncRead for Session {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_read(cx, buf)
    }
}

impl AsyncWrite for Session {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.pipe).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_flush(cx)
    }

    /// Sends FIN after the data (see [`Session::shutdown`]).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_shutdown(cx)
    }
}
