//! [`SocketAgent`]: the per-user agent on a Unix socket, for clients that arrive through
//! `immortal relay` (an ssh carrier). No HTTP and no token: the socket is in a directory only
//! its user can enter ([`RuntimeDir`]), so whoever connects is the user. Each connection says
//! what it wants in one line ([`socket_proto`](crate::socket_proto)): a new stream to a port,
//! or an existing stream to resume; then it carries the session protocol, handled exactly as
//! after an HTTP upgrade (the same registry, stream tasks and handshake).
//!
//! One agent per user: the agent holds an exclusive lock on a file in the directory for its
//! whole life, so a second one refuses to start ([`SocketAgentError::AlreadyRunning`]) instead
//! of taking the socket over. A relay-started agent exits by itself once it has held no
//! stream for [`SocketAgentConfig::idle_exit`].

use std::future::Future;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backedpipe::{BoxIo, SessionOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::registry::{CreateError, Registry, RemovalReason};
use super::upgrade::attach;
use crate::runtime_dir::{FileLock, RuntimeDir, RuntimeDirError};
use crate::socket_proto::{self, ErrorCode, Reply, Request};

/// The settings of a [`SocketAgent`].
///
/// | setting | default ([`SocketAgentConfig::default`]) |
/// |---|---|
/// | [`max_streams`](Self::max_streams) | 32 |
/// | [`ttl`](Self::ttl) | 24 h |
/// | [`handshake_timeout`](Self::handshake_timeout) | 10 s |
/// | [`heartbeat`](Self::heartbeat) | 5 s |
/// | [`idle_exit`](Self::idle_exit) | none: runs until stopped |
#[derive(Debug, Clone)]
pub struct SocketAgentConfig {
    /// The most streams held at once (when full, the oldest disconnected one is evicted).
    pub max_streams: usize,
    /// How long a stream with no client attached is kept after its client went away (a new
    /// stream's creator must attach within twelve handshake timeouts, or this if shorter).
    pub ttl: Duration,
    /// The longest a client may take over its request line, and over the session handshake.
    pub handshake_timeout: Duration,
    /// How often an idle session path is probed.
    pub heartbeat: Duration,
    /// Exit after holding no stream (and serving no request) for this long.
    pub idle_exit: Option<Duration>,
    /// Each stream's replay buffer in bytes, as
    /// [`AgentConfig::stream_buffer`](super::AgentConfig::stream_buffer).
    pub stream_buffer: usize,
}

impl Default for SocketAgentConfig {
    fn default() -> Self {
        SocketAgentConfig {
            max_streams: 32,
            ttl: Duration::from_secs(24 * 60 * 60),
            handshake_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(5),
            idle_exit: None,
            stream_buffer: backedpipe::DEFAULT_BUFFER_SIZE,
        }
    }
}

impl SocketAgentConfig {
    fn session_options(&self) -> SessionOptions {
        super::stream_session_options(
            self.heartbeat,
            self.stream_buffer,
            self.ttl,
            self.handshake_timeout,
        )
    }
}

/// Why a [`SocketAgent`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketAgentError {
    /// The directory is unusable.
    #[error(transparent)]
    Dir(#[from] RuntimeDirError),
    /// Another agent of this user holds the directory.
    #[error("an agent already runs for this user (lock {lock})")]
    AlreadyRunning {
        /// The lock file it holds.
        lock: PathBuf,
    },
    /// Locking, removing a stale socket, binding or listening failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

/// How a [`SocketAgent`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It held no stream for its idle time.
    Idle,
    /// The stop future resolved.
    Asked,
}

/// The per-user agent on a Unix socket: no HTTP and no token (the socket's directory is
/// private to its user), one request line per connection, then the session protocol. One
/// agent per user, by a lock file held for its whole life; with
/// [`SocketAgentConfig::idle_exit`] it exits once it has held no stream for that long.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use immortal::runtime_dir::RuntimeDir;
/// use immortal::server::{SocketAgent, SocketAgentConfig};
///
/// let agent = SocketAgent::bind(&RuntimeDir::locate(), SocketAgentConfig::default())?;
/// println!("listening on {}", agent.socket().display());
/// agent.run_until(std::future::pending()).await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SocketAgent {
    listener: UnixListener,
    socket: PathBuf,
    config: SocketAgentConfig,
    registry: Registry,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    _lock: FileLock,
}

impl SocketAgent {
    /// Creates the directory if need be, takes the agent lock, and listens on the socket (a
    /// stale socket file left by an agent that died is replaced). Must be called within a
    /// Tokio runtime.
    ///
    /// # Errors
    /// [`SocketAgentError::AlreadyRunning`] when another agent holds the lock; the others
    /// when the directory, the lock or the socket cannot be used.
    pub fn bind(
        dir: &RuntimeDir,
        config: SocketAgentConfig,
    ) -> Result<SocketAgent, SocketAgentError> {
        dir.ensure()?;
        let lock_path = dir.agent_lock();
        let io_error = |what, path: &PathBuf| {
            let path = path.clone();
            move |source| SocketAgentError::Io { what, path, source }
        };
        let lock = FileLock::try_acquire(&lock_path)
            .map_err(io_error("cannot lock", &lock_path))?
            .ok_or_else(|| SocketAgentError::AlreadyRunning {
                lock: lock_path.clone(),
            })?;
        // The pid, for people and tools; the lock, not the pid, is what counts.
        let mut file = lock.file();
        let _ = file
            .set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        let socket = dir.socket();
        // Holding the lock, nobody else serves this socket: a file there is stale.
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_error("cannot remove the stale socket", &socket)(err)),
        }
        let listener =
            UnixListener::bind(&socket).map_err(io_error("cannot listen on", &socket))?;
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::new(
            config.max_streams,
            config.ttl,
            // A new stream is safe from eviction while its creator's HELLO may still come.
            config.handshake_timeout,
            config.session_options(),
            shutdown.clone(),
            Arc::clone(&metrics),
        );
        Ok(SocketAgent {
            listener,
            socket,
            config,
            registry,
            metrics,
            shutdown,
            _lock: lock,
        })
    }

    /// The socket the agent listens on.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Serves until `stop` resolves or, with [`SocketAgentConfig::idle_exit`], until the agent
    /// has been idle that long. Then closes every stream, removes the socket file, releases
    /// the lock (another agent may start from then on), and returns why it stopped.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> Stopped {
        let _stop_all = self.shutdown.clone().drop_guard();
        // Connections still saying what they want: not idle while there are any.
        let requests = Arc::new(watch::Sender::new(0usize));
        let idle = idle_for(
            self.config.idle_exit,
            self.registry.held(),
            requests.subscribe(),
        );
        let mut stop = std::pin::pin!(stop);
        let mut idle = std::pin::pin!(idle);
        let stopped = loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = &mut stop => break Stopped::Asked,
                () = &mut idle => break Stopped::Idle,
            };
            match accepted {
                Ok((stream, _)) => {
                    requests.send_modify(|n| *n += 1);
                    let pending = Pending(Arc::clone(&requests));
                    tokio::spawn(serve(
                        stream,
                        self.registry.clone(),
                        Arc::clone(&self.metrics),
                        self.config.handshake_timeout,
                        self.shutdown.clone(),
                        pending,
                    ));
                }
                Err(err) => {
                    tracing::warn!(%err, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        match stopped {
            Stopped::Idle => tracing::info!(
                "no stream for {}; exiting",
                humantime::format_duration(self.config.idle_exit.unwrap_or_default())
            ),
            Stopped::Asked => tracing::info!("stopping; closing every stream"),
        }
        let _ = std::fs::remove_file(&self.socket);
        drop(self.listener);
        self.shutdown.cancel();
        let closed = self.registry.wait_empty();
        if tokio::time::timeout(super::STOP_GRACE, closed)
            .await
            .is_err()
        {
            tracing::warn!("some streams did not close in time");
        }
        stopped
    }
}

/// Counts a connection as a request in progress until dropped.
struct Pending(Arc<watch::Sender<usize>>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Resolves once nothing has been held for `idle` (never without it): no stream, and no
/// connection in the middle of its request.
async fn idle_for(
    idle: Option<Duration>,
    mut streams: watch::Receiver<usize>,
    mut requests: watch::Receiver<usize>,
) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    loop {
        if *streams.borrow_and_update() == 0 && *requests.borrow_and_update() == 0 {
            tokio::select! {
                () = tokio::time::sleep(idle) => return,
                changed = streams.changed() => if changed.is_err() { return std::future::pending().await },
                changed = requests.changed() => if changed.is_err() { return std::future::pending().await },
            }
        } else {
            tokio::select! {
                changed = streams.changed() => if changed.is_err() { return std::future::pending().await },
                changed = requests.changed() => if changed.is_err() { return std::future::pending().await },
            }
        }
    }
}

/// One connection: its request, the reply, and for a stream the session handshake.
async fn serve(
    mut io: UnixStream,
    registry: Registry,
    metrics: Arc<Metrics>,
    timeout: Duration,
    shutdown: CancellationToken,
    pending: Pending,
) {
    let request = match tokio::time::timeout(timeout, socket_proto::read_line(&mut io)).await {
        Ok(Ok(Some(line))) => Request::parse(&line),
        Ok(Ok(None)) => return,
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("no request within the handshake timeout".into()),
    };
    let request = match request {
        Ok(request) => request,
        Err(message) => {
            tracing::debug!(%message, "bad request on the socket");
            let _ = reply(&mut io, error(ErrorCode::BadRequest, message)).await;
            return;
        }
    };
    let creating = matches!(request, Request::New { .. });
    let stream = match request {
        Request::Info => {
            let info = format!(
                "pid={},streams={}",
                std::process::id(),
                *registry.held().borrow()
            );
            let _ = reply(&mut io, Reply::Ok(info)).await;
            return;
        }
        // `sshd`: the relay has put in the port the sshd listens on, if it could tell.
        Request::New { port, .. } => match registry.create(port, None).await {
            Ok(info) => registry.get(&info.id),
            Err(err) => {
                let code = match err {
                    CreateError::Full(_) => ErrorCode::Full,
                    CreateError::Dial { .. } => ErrorCode::DialFailed,
                };
                let _ = reply(&mut io, error(code, err.to_string())).await;
                return;
            }
        },
        Request::Resume { id } => registry.get(&id),
    };
    let Some(stream) = stream else {
        let _ = reply(
            &mut io,
            error(
                ErrorCode::NotFound,
                "no such stream on the agent (expired, removed, or the agent restarted)".into(),
            ),
        )
        .await;
        return;
    };
    if reply(&mut io, Reply::Ok(stream.id().to_owned()))
        .await
        .is_err()
    {
        return;
    }
    // From here on the stream (not the request) keeps the agent busy.
    drop(pending);
    let io: BoxIo = Box::new(io);
    // No attach key and no connection ticket: whoever can open the socket is the user, and
    // the stream's session secret proves each resume.
    shutdown
        .run_until_cancelled(attach(&stream, io, None, timeout, &metrics))
        .await;
    if creating && stream.awaits_first_session() {
        // Its first session was to come on this connection, and did not: nobody can ever
        // attach it, so it goes now rather than at the end of its time to live.
        registry.remove(
            stream.id(),
            RemovalReason::Failed("its creator left before the session's first handshake".into()),
        );
    }
}

fn error(code: ErrorCode, message: String) -> Reply {
    Reply::Error { code, message }
}

async fn reply(io: &mut UnixStream, reply: Reply) -> io::Result<()> {
    io.write_all(reply.to_line().as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_stream_and_no_request_for_the_whole_time() {
        let streams = watch::Sender::new(0usize);
        let requests = watch::Sender::new(0usize);
        let second = Duration::from_secs(1);
        let idle = tokio::spawn(idle_for(
            Some(10 * second),
            streams.subscribe(),
            requests.subscribe(),
        ));
        let start = tokio::time::Instant::now();
        tokio::time::sleep(6 * second).await;
        requests.send_replace(1);
        tokio::time::sleep(second).await;
        requests.send_replace(0);
        streams.send_replace(1);
        tokio::time::sleep(30 * second).await;
        assert!(!idle.is_finished(), "a stream is held: not idle");
        streams.send_replace(0);
        idle.await.unwrap();
        assert_eq!(start.elapsed(), 47 * second);
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_idle_time_the_agent_is_never_idle() {
        let streams = watch::Sender::new(0usize);
        let requests = watch::Sender::new(0usize);
        let idle = idle_for(None, streams.subscribe(), requests.subscribe());
        let waited = tokio::time::timeout(Duration::from_secs(3600), idle).await;
        assert!(waited.is_err());
    }
}
