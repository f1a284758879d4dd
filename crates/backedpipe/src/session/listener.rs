//! [`SessionListener`]: a server that listens. It takes transports from an [`Incoming`] source
//! (a TCP or Unix listener, a channel of in-memory streams, ...), runs each one's handshakes (TLS,
//! then the session's) in a task of its own, hands new sessions to the application and attaches
//! resumes to their sessions.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};

use super::server::{Accepted, SessionServer};
use super::stream::Session;
use crate::error::{Error, Result};
use crate::tls::TlsAcceptor;
use crate::transport::BoxIo;

/// How many handshakes a listener runs at once unless told otherwise.
const DEFAULT_MAX_HANDSHAKES: usize = 1024;

/// How many new sessions wait for [`SessionListener::accept`] unless told otherwise.
const DEFAULT_BACKLOG: usize = 128;

/// How long a TLS handshake may take unless told otherwise (the session handshake that follows
/// is bounded by the server's own handshake timeout).
const DEFAULT_TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// The pause after a failed accept (out of file descriptors, ...), so that a listener in
/// trouble does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Where a [`SessionListener`] gets its transports: every transport a client opened, one at a
/// time.
///
/// Implemented for [`tokio::net::TcpListener`] (with `TCP_NODELAY` set on every connection),
/// [`tokio::net::UnixListener`], and for tokio channels of [`BoxIo`] (transports made in
/// memory, or accepted by code of the caller's own). Implement it for any other listener.
///
/// ```
/// use backedpipe::session::Incoming;
/// use backedpipe::BoxIo;
///
/// /// Transports from a channel, as `mpsc::Receiver<BoxIo>` already does.
/// struct FromChannel(tokio::sync::mpsc::Receiver<BoxIo>);
///
/// impl Incoming for FromChannel {
///     async fn next(&mut self) -> Option<std::io::Result<BoxIo>> {
///         self.0.recv().await.map(Ok)
///     }
/// }
/// ```
pub trait Incoming: Send + 'static {
    /// The next transport a client opened; `Some(Err(_))` if accepting one failed (the listener
    /// logs it and asks again, after a short pause unless the error concerns only that
    /// connection: aborted, reset, refused, interrupted); `None` once no transport will ever
    /// come (the listener then stops taking new ones).
    fn next(&mut self) -> impl Future<Output = Option<io::Result<BoxIo>>> + Send;
}

impl Incoming for tokio::net::TcpListener {
    async fn next(&mut self) -> Option<io::Result<BoxIo>> {
        Some(self.accept().await.and_then(|(stream, peer)| {
            tracing::trace!(%peer, "accepted a TCP connection");
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as BoxIo)
        }))
    }
}

#[cfg(unix)]
impl Incoming for tokio::net::UnixListener {
    async fn next(&mut self) -> Option<io::Result<BoxIo>> {
        Some(
            self.accept()
                .await
                .map(|(stream, _peer)| Box::new(stream) as BoxIo),
        )
    }
}

impl Incoming for mpsc::Receiver<BoxIo> {
    async fn next(&mut self) -> Option<io::Result<BoxIo>> {
        self.recv().await.map(Ok)
    }
}

impl Incoming for mpsc::UnboundedReceiver<BoxIo> {
    async fn next(&mut self) -> Option<io::Result<BoxIo>> {
        self.recv().await.map(Ok)
    }
}

/// A session server that listens: it accepts transports from an [`Incoming`] source, runs
/// each one's handshakes concurrently in a task of its own (so a slow or silent client stalls
/// nobody else), hands every new session to [`accept`](Self::accept) and attaches every resume
/// to its session without the application's help.
///
/// The work happens in a background task started by [`new`](Self::new) (or
/// [`ListenerBuilder::start`]): resumes are attached
/// even while the application is not calling `accept`. A handshake that fails (a client that
/// never finishes it, a wrong secret, a session the server does not know, garbage, a TLS
/// failure) is logged at debug level and affects nothing else; the client was sent the matching
/// CLOSE. Dropping the listener stops accepting (and cancels handshakes in flight); the sessions
/// already accepted go on, but can no longer resume through it.
///
/// Settings, through [`builder`](Self::builder):
///
/// | setting | default | why |
/// |---|---|---|
/// | [`tls`](ListenerBuilder::tls) | none | run a TLS handshake on every transport before the session's |
/// | [`tls_timeout`](ListenerBuilder::tls_timeout) | 10 s | a client that stalls its TLS handshake holds a task only this long |
/// | [`max_handshakes`](ListenerBuilder::max_handshakes) | 1024 | handshakes at once; beyond it, accepting waits |
/// | [`backlog`](ListenerBuilder::backlog) | 128 | new sessions waiting for [`accept`](Self::accept); as many more wait for room (holding no handshake slot); beyond that they are closed |
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use backedpipe::{Session, SessionListener, SessionOptions, SessionServer, TcpConnector};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = tcp.local_addr()?;
/// let server = SessionServer::new(SessionOptions::default());
/// let mut listener = SessionListener::new(tcp, server)?;
/// tokio::spawn(async move {
///     // One task per session; the listener keeps accepting meanwhile.
///     while let Ok(mut session) = listener.accept().await {
///         tokio::spawn(async move {
///             let mut buf = [0; 5];
///             if session.read_exact(&mut buf).await.is_ok() && session.write_all(&buf).await.is_ok() {
///                 let _ = session.shutdown().await;
///             }
///         });
///     }
/// });
///
/// let mut session = Session::connect(TcpConnector::new(addr), SessionOptions::default()).await?;
/// session.write_all(b"hello").await?;
/// let mut echoed = Vec::new();
/// session.read_to_end(&mut echoed).await?;
/// assert_eq!(echoed, b"hello");
/// session.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SessionListener {
    new_sessions: mpsc::Receiver<Session>,
    task: AbortHandle,
}

/// The settings of a [`SessionListener`] not yet started: made by
/// [`SessionListener::builder`], started by [`start`](Self::start).
#[derive(Debug)]
pub struct ListenerBuilder<I> {
    incoming: I,
    server: SessionServer,
    tls: Option<TlsAcceptor>,
    tls_timeout: Duration,
    max_handshakes: usize,
    backlog: usize,
}

impl SessionListener {
    /// A listener with the default settings that takes transports from `incoming` and runs
    /// the session handshake of `server` on each; it is listening when this returns.
    ///
    /// `server` can be shared (it is cheap to clone): sessions of one server can resume
    /// through any of its listeners, for example one on TCP and one on a Unix socket.
    ///
    /// # Errors
    /// [`Error::NoRuntime`] outside a tokio runtime.
    pub fn new<I: Incoming>(incoming: I, server: SessionServer) -> Result<SessionListener> {
        Self::builder(incoming, server).start()
    }

    /// Settings for a listener, as [`new`](Self::new) but with TLS or other settings; call
    /// [`start`](ListenerBuilder::start) to begin listening.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use backedpipe::{SessionListener, SessionOptions, SessionServer};
    ///
    /// let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let listener = SessionListener::builder(tcp, SessionServer::new(SessionOptions::default()))
    ///     .max_handshakes(64)
    ///     .backlog(16)
    ///     .start()?;
    /// # drop(listener);
    /// # Ok(()) }
    /// ```
    pub fn builder<I: Incoming>(incoming: I, server: SessionServer) -> ListenerBuilder<I> {
        ListenerBuilder {
            incoming,
            server,
            tls: None,
            tls_timeout: DEFAULT_TLS_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            backlog: DEFAULT_BACKLOG,
        }
    }

    /// The next new session. Resumes never come here: they attach to their session by
    /// themselves.
    ///
    /// Cancel safe: a session is never lost by dropping this future.
    ///
    /// # Errors
    /// [`Error::Io`] (kind `NotConnected`) once the [`Incoming`] source has ended and every
    /// handshake in flight has finished: no session will ever come.
    pub async fn accept(&mut self) -> Result<Session> {
        self.new_sessions.recv().await.ok_or_else(|| {
            Error::Io(Arc::new(io::Error::new(
                io::ErrorKind::NotConnected,
                "the listener's source of transports has ended",
            )))
        })
    }
}

impl Drop for SessionListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<I: Incoming> ListenerBuilder<I> {
    /// Runs a TLS handshake through `acceptor` on every transport before the session
    /// handshake. A transport whose TLS handshake fails or stalls is dropped.
    pub fn tls(mut self, acceptor: TlsAcceptor) -> Self {
        self.tls = Some(acceptor);
        self
    }

    /// How long a TLS handshake may take before its transport is dropped.
    pub fn tls_timeout(mut self, timeout: Duration) -> Self {
        self.tls_timeout = timeout;
        self
    }

    /// How many handshakes may run at once (at least one). While that many are in flight the
    /// listener takes no new transport; the operating system's backlog holds them meanwhile.
    pub fn max_handshakes(mut self, max: usize) -> Self {
        self.max_handshakes = max.max(1);
        self
    }

    /// How many new sessions may wait for [`SessionListener::accept`] (at least one). Beyond
    /// it as many more wait for room, without holding a handshake slot (resumes never wait
    /// behind them); beyond that a new session is closed at once, its client reading a
    /// normal CLOSE that says the server is busy.
    pub fn backlog(mut self, backlog: usize) -> Self {
        self.backlog = backlog.max(1);
        self
    }

    /// Starts listening: from now on transports are taken from the source and handshaken in
    /// the background.
    ///
    /// # Errors
    /// [`Error::NoRuntime`] outside a tokio runtime.
    pub fn start(self) -> Result<SessionListener> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (new_tx, new_sessions) = mpsc::channel(self.backlog);
        let handshakes = Arc::new(Semaphore::new(self.max_handshakes));
        let accepting = Accepting {
            waiting: Arc::new(Semaphore::new(self.backlog)),
            server: self.server,
            tls: self.tls,
            tls_timeout: self.tls_timeout,
            new_sessions: new_tx,
        };
        let task = runtime.spawn(listen(self.incoming, accepting, handshakes));
        Ok(SessionListener {
            new_sessions,
            task: task.abort_handle(),
        })
    }
}

/// What every handshake task needs.
#[derive(Clone)]
struct Accepting {
    server: SessionServer,
    tls: Option<TlsAcceptor>,
    tls_timeout: Duration,
    new_sessions: mpsc::Sender<Session>,
    /// Room for new sessions waiting for room in a full backlog (as many as the backlog).
    waiting: Arc<Semaphore>,
}

/// The listener's background task: takes transports and starts a handshake task for each.
/// Handshake tasks live in a [`JoinSet`] owned here, so aborting this task cancels them too.
async fn listen<I: Incoming>(mut incoming: I, accepting: Accepting, handshakes: Arc<Semaphore>) {
    let mut tasks = JoinSet::new();
    loop {
        // Wait for room before taking a transport, reaping finished handshakes meanwhile.
        let permit = loop {
            tokio::select! {
                permit = Arc::clone(&handshakes).acquire_owned() => {
                    break permit.expect("the semaphore is never closed");
                }
                Some(done) = tasks.join_next() => reap(done),
            }
        };
        let next = {
            let next = incoming.next();
            tokio::pin!(next);
            loop {
                tokio::select! {
                    next = &mut next => break next,
                    Some(done) = tasks.join_next() => reap(done),
                }
            }
        };
        match next {
            Some(Ok(io)) => {
                let accepting = accepting.clone();
                tasks.spawn(accepting.handshake(io, permit));
            }
            Some(Err(err)) if concerns_one_connection(&err) => {
                tracing::debug!(error = %err, "a connection failed before it was accepted");
            }
            Some(Err(err)) => {
                tracing::warn!(error = %err, "accepting a transport failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
            None => break,
        }
    }
    tracing::debug!("the listener's source ended; finishing the handshakes in flight");
    // The session channel closes (and `accept` fails) once the last handshake is done.
    while let Some(done) = tasks.join_next().await {
        reap(done);
    }
}

/// Whether an accept error concerns only the connection being accepted (its client gave up),
/// rather than the listener (out of file descriptors, ...), which deserves a pause.
fn concerns_one_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Reports a handshake task that panicked (a bug: handshakes report failures as errors).
fn reap(done: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(err) = done {
        if err.is_panic() {
            tracing::error!(error = %err, "a handshake task panicked");
        }
    }
}

impl Accepting {
    /// One transport's handshakes. Every failure stays here: it concerns only this transport.
    /// Runs the TLS and session handshakes on `io`, holding `permit` (one of the concurrent
    /// handshakes) until they are done, not while a new session waits for the application.
    async fn handshake(self, io: BoxIo, permit: OwnedSemaphorePermit) {
        let io = match &self.tls {
            None => io,
            Some(acceptor) => {
                match tokio::time::timeout(self.tls_timeout, acceptor.accept(io)).await {
                    Ok(Ok(io)) => io,
                    Ok(Err(err)) => {
                        tracing::debug!(error = %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(timeout = ?self.tls_timeout, "TLS handshake timed out");
                        return;
                    }
                }
            }
        };
        let accepted = self.server.accept(io).await;
        // Resumes must not wait behind new sessions the application has not accepted.
        drop(permit);
        match accepted {
            Ok(Accepted::New(session)) => self.hand_over(session).await,
            Ok(Accepted::Resumed(id)) => {
                tracing::debug!(session = %id, "resume attached");
            }
            Err(err) => {
                tracing::debug!(error = %err, "session handshake failed");
            }
        }
    }

    /// Queues a new session for [`SessionListener::accept`]. With the backlog full it waits
    /// for room, if fewer than a backlog's worth of sessions already wait; otherwise the
    /// session is closed (its client reads a normal CLOSE saying why), so an application that
    /// stops accepting costs a bounded number of sessions.
    async fn hand_over(&self, session: Session) {
        let id = session.id();
        let session = match self.new_sessions.try_send(session) {
            Ok(()) => return,
            Err(TrySendError::Closed(_)) => {
                // The listener is gone; dropping the session closes it.
                tracing::debug!(session = %id, "new session dropped: the listener is gone");
                return;
            }
            Err(TrySendError::Full(session)) => session,
        };
        let Ok(_waiting) = Arc::clone(&self.waiting).try_acquire_owned() else {
            tracing::warn!(session = %id, "new session refused: the backlog is full and the application is not accepting");
            session.refuse("server busy: too many new sessions waiting to be accepted");
            return;
        };
        if self.new_sessions.send(session).await.is_err() {
            tracing::debug!(session = %id, "new session dropped: the listener is gone");
        }
    }
}
