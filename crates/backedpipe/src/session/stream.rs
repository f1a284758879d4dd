//! [`Session`]: the application's handle on a session-mode stream, client or server side, and
//! its halves.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::client::Dialer;
use super::connection::{Connection, CLOSE_LINGER};
use super::driver::{Driver, Resumer};
use super::options::SessionOptions;
use super::shared::{now, Shared};
use crate::backoff::{random_seed, Backoff};
use crate::error::{Error, Result};
use crate::pipe::PipeState;
use crate::proto::{CloseCode, SessionId, Side};
use crate::transport::Connector;

/// A byte stream in session mode: the framed protocol of `docs/PROTOCOL.md` over a transport
/// that may be lost and replaced any number of times.
///
/// Every byte written is delivered exactly once and in order across reconnects, and a session
///
/// - acknowledges what the application has read, so the sender keeps only unacknowledged bytes
///   and a write waits once the capacity of them is outstanding (nothing unacknowledged is
///   ever dropped), or while more is in flight than the path needs;
/// - probes an idle path and replaces a path that stays silent for about two heartbeats, even
///   while the application neither reads nor writes;
/// - ends cleanly: [`shutdown`](Self::shutdown) sends FIN after the data (the peer reads
///   `Ok(0)` only then, and from then on), and [`close`](Self::close) (or dropping the
///   session) sends CLOSE, which fails the peer's writes, and its reads once it has read what
///   came before, with [`Error::ClosedByPeer`] instead of leaving it to reconnect (a peer that
///   read end-of-stream keeps reading `Ok(0)`);
/// - resumes only with proof of the session's secret, from any address;
/// - holds bounded memory whatever the peer does: the replay buffer's capacity, the receive
///   limit and a few KiB (see [`Connection`]).
///
/// A client makes one with [`Session::connect`]; a server gets one from
/// [`SessionServer::accept`](crate::SessionServer::accept) or a
/// [`SessionListener`](crate::SessionListener).
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
    handle: Arc<Handle>,
}

/// The application's hold on a session: dropping the last one closes it.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    close_timeout: Duration,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close(CloseCode::Normal, "closed");
    }
}

impl Session {
    /// Closes a session the application never saw, telling its client why.
    pub(crate) fn refuse(self, reason: &str) {
        self.shared().close(CloseCode::Normal, reason);
    }

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
    /// protocol), [`Error::ClosedByPeer`] (the server refused), [`Error::NoRuntime`],
    /// [`Error::InvalidCapacity`].
    pub async fn connect<C: Connector>(connector: C, options: SessionOptions) -> Result<Session> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (dialer, established, decoder, io) = Dialer::open(connector, options.clone()).await?;
        let now = now();
        let mut conn = Connection::new(Side::Client, established.session_id(), &options, now)?;
        conn.start_path(now, decoder, established.remote_reader_seq())?;
        let shared = Shared::new(conn, Some(io));
        let pipe = &options.pipe;
        let resumer = Resumer {
            dial: Arc::new(dialer),
            backoff: Backoff::new(
                pipe.backoff_initial,
                pipe.backoff_max,
                pipe.backoff_seed.unwrap_or_else(random_seed),
            ),
            max_attempts: pipe.max_reconnect_attempts,
        };
        runtime.spawn(Driver::new(shared.clone(), Some(resumer), None).run());
        Ok(Session::new(shared, options.close_timeout))
    }

    /// A handle on a session whose driver runs.
    pub(crate) fn new(shared: Arc<Shared>, close_timeout: Duration) -> Session {
        Session {
            handle: Arc::new(Handle {
                shared,
                close_timeout,
            }),
        }
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// The session's id (not secret: it names the session, the secret proves it).
    pub fn id(&self) -> SessionId {
        self.shared().lock().conn.id()
    }

    /// How many transports have carried the session so far (1 once connected; each resume
    /// adds one).
    pub fn generation(&self) -> u64 {
        self.shared().lock().conn.generation()
    }

    /// Bytes the application has written.
    pub fn bytes_written(&self) -> u64 {
        self.shared().lock().conn.written()
    }

    /// Bytes of the peer's stream the application has read.
    pub fn bytes_read(&self) -> u64 {
        self.shared().lock().conn.delivered()
    }

    /// Bytes of our stream the peer has acknowledged (after a resume this includes what it
    /// had received and not yet read).
    pub fn bytes_acked(&self) -> u64 {
        self.shared().lock().conn.peer_acked()
    }

    /// Bytes held for replay (written and not acknowledged), and the memory committed to hold
    /// them.
    pub fn buffered(&self) -> (usize, usize) {
        self.shared().lock().conn.buffered()
    }

    /// The current state.
    pub fn state(&self) -> PipeState {
        self.shared().status().borrow().clone()
    }

    /// True while a transport is attached.
    pub fn connected(&self) -> bool {
        self.shared().lock().conn.has_path()
    }

    /// A receiver that sees every state transition.
    pub fn status(&self) -> watch::Receiver<PipeState> {
        self.shared().status()
    }

    /// Reads into `buf`, waiting while disconnected; `Ok(0)` once the peer has shut down its
    /// direction and every byte before has been read (and from then on), or after a local
    /// close.
    ///
    /// # Errors
    /// The session's terminal error ([`Error::ClosedByPeer`], [`Error::SessionUnknown`], ...),
    /// once every byte received before it has been read.
    pub async fn read(&self, buf: &mut [u8]) -> Result<usize> {
        read(self.shared(), buf).await
    }

    /// Writes as much of `buf` as may go now (at least one byte), waiting while the capacity
    /// or the in-flight window is full. The bytes are then part of the stream: sent now if a
    /// transport is attached, else after the next resume.
    ///
    /// # Errors
    /// [`Error::WriteAfterShutdown`] after [`shutdown`](Self::shutdown), or the session's
    /// terminal error.
    pub async fn write(&self, buf: &[u8]) -> Result<usize> {
        write(self.shared(), buf).await
    }

    /// Writes all of `buf` (see [`write`](Self::write)).
    ///
    /// # Errors
    /// As for [`write`](Self::write); bytes written before the error stay in the stream.
    pub async fn write_all(&self, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            let n = self.write(buf).await?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Ends this side's direction: FIN follows the bytes written (and follows them again after
    /// any reconnect), so the peer reads end-of-stream once it has every byte. Reading goes on.
    /// Returns once FIN is in the transport.
    ///
    /// # Errors
    /// The session's terminal error.
    pub async fn shutdown(&self) -> Result<()> {
        poll_fn(|cx| self.shared().poll_shutdown(cx))
            .await
            .map_err(from_io)
    }

    /// Waits until the peer acknowledged every byte written so far, across reconnects.
    /// Returns at once when nothing is outstanding, and when the session has ended (its reads
    /// and writes then say why).
    pub async fn acknowledged(&self) {
        poll_fn(|cx| self.shared().poll_acknowledged(cx)).await
    }

    /// Drops the current transport; a client dials a new one at once (a server waits for its
    /// client). Returns once a newer transport carries the session.
    ///
    /// # Errors
    /// The session's error if it ends first.
    pub async fn force_reconnect(&self) -> Result<()> {
        let generation = self.generation();
        let mut status = self.status();
        self.shared().with(|st, now| {
            st.conn.handle_transport_lost(now);
            st.dial_now = true;
        });
        loop {
            {
                let st = self.shared().lock();
                if st.conn.generation() > generation && st.conn.has_path() {
                    return Ok(());
                }
                if st.conn.is_ended() {
                    return Err(st.conn.error().unwrap_or(Error::PipeClosed));
                }
            }
            if status.changed().await.is_err() {
                return Err(Error::PipeClosed);
            }
        }
    }

    /// A client without a transport dials at once instead of waiting out its backoff (call it
    /// when the network has come back). Does nothing on a connected session or a server.
    pub fn resume_now(&self) {
        self.shared().with(|st, _| {
            if !st.conn.has_path() {
                st.dial_now = true;
            }
        });
        self.shared().wake(super::shared::Wakes::all());
    }

    /// Checks the current transport at once, for when there is reason to doubt it (the
    /// machine's network changed: an address came or went, Wi-Fi was switched, the lid
    /// opened). A PING goes out now, and once the transport has taken it the transport is
    /// declared dead unless anything arrives from the peer within `within`; a client then
    /// resumes at once, rather than after the liveness bound
    /// ([`SessionConfig::dead_after`](crate::session::SessionConfig), 11 s by default). A
    /// transport whose address went away drops packets without a word, so this is how a
    /// roaming client resumes in about `within` instead. A healthy transport answers and is
    /// kept; so is one while this side's application leaves the receive limit full. A peer
    /// whose application stopped reading answers only with its heartbeat, so a `within`
    /// shorter than the heartbeat interval may replace a working transport (one resume,
    /// nothing lost). Without a transport, a client dials at once, as
    /// [`resume_now`](Self::resume_now). See [`Connection::probe_path`].
    ///
    /// ```
    /// # async fn example(session: backedpipe::Session) {
    /// // Told by the platform that an address appeared:
    /// session.probe_path(std::time::Duration::from_secs(3));
    /// # }
    /// ```
    pub fn probe_path(&self, within: Duration) {
        self.shared().with(|st, _| {
            if !st.conn.probe_path(within) && !st.conn.has_path() && st.conn.side() == Side::Client
            {
                st.dial_now = true;
            }
        });
        self.shared().wake(super::shared::Wakes::all());
    }

    /// Closes the session gracefully: waits (at most the
    /// [`close_timeout`](SessionOptions::close_timeout), 30 s by default, enough to replace a
    /// dead path) for the peer to acknowledge every byte written, so that the CLOSE cannot
    /// overtake data the peer could still get; then the peer gets CLOSE and its writes fail
    /// with [`Error::ClosedByPeer`], as do its reads once it has read everything before (and
    /// a peer that had read end-of-stream keeps reading `Ok(0)`); a server forgets the
    /// session. Waits at most about a second more for the CLOSE to leave: a client without a
    /// transport dials at once to deliver it (its resume is answered with the CLOSE), a server
    /// without one answers its client's resume with it. Dropping the session closes it the
    /// same way, without waiting for anything.
    ///
    /// # Errors
    /// None at present; the signature leaves room for reporting a failed close.
    pub async fn close(&self) -> Result<()> {
        let _ = tokio::time::timeout(self.handle.close_timeout, self.acknowledged()).await;
        self.shared().close(CloseCode::Normal, "closed");
        let finished = self.shared().finished.clone();
        let _ = tokio::time::timeout(CLOSE_LINGER * 2, finished.cancelled()).await;
        Ok(())
    }

    /// Splits the session into halves for different tasks. Shutting down the write half sends
    /// FIN; the session closes (sending CLOSE) when both halves are dropped.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        (
            ReadHalf {
                handle: self.handle.clone(),
            },
            WriteHalf {
                handle: self.handle,
            },
        )
    }
}

/// The reading half of a [`Session`], from [`Session::into_split`].
#[derive(Debug)]
pub struct ReadHalf {
    handle: Arc<Handle>,
}

/// The writing half of a [`Session`], from [`Session::into_split`].
#[derive(Debug)]
pub struct WriteHalf {
    handle: Arc<Handle>,
}

impl ReadHalf {
    /// As [`Session::read`].
    ///
    /// # Errors
    /// As [`Session::read`].
    pub async fn read(&self, buf: &mut [u8]) -> Result<usize> {
        read(&self.handle.shared, buf).await
    }
}

impl WriteHalf {
    /// As [`Session::write`].
    ///
    /// # Errors
    /// As [`Session::write`].
    pub async fn write(&self, buf: &[u8]) -> Result<usize> {
        write(&self.handle.shared, buf).await
    }
}

/// The crate error an I/O error from the session's own polls carries.
fn from_io(err: io::Error) -> Error {
    match Error::from_io(&err) {
        Some(ours) => ours.clone(),
        None => Error::io(err),
    }
}

async fn read(shared: &Shared, buf: &mut [u8]) -> Result<usize> {
    poll_fn(|cx| {
        let mut into = ReadBuf::new(buf);
        ready!(shared.poll_read(cx, &mut into)).map_err(from_io)?;
        Poll::Ready(Ok(into.filled().len()))
    })
    .await
}

async fn write(shared: &Shared, buf: &[u8]) -> Result<usize> {
    poll_fn(|cx| shared.poll_write(cx, buf))
        .await
        .map_err(from_io)
}

macro_rules! impl_io {
    (read $ty:ty) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                self.handle.shared.poll_read(cx, buf)
            }
        }
    };
    (write $ty:ty) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.handle.shared.poll_write(cx, buf)
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.handle.shared.poll_flush(cx)
            }

            /// Sends FIN after the data (see [`Session::shutdown`]).
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.handle.shared.poll_shutdown(cx)
            }
        }
    };
}

impl_io!(read Session);
impl_io!(write Session);
impl_io!(read ReadHalf);
impl_io!(write WriteHalf);
