//! The agent: the HTTP server, its stream registry, and the upgrades that carry streams.
//!
//! One port speaks HTTP/1.1 (over TLS when configured). `routes` is the management API of
//! `docs/API.md`; `upgrade` turns `GET /v1/streams/{id}/connect` into a transport for the
//! stream's session (raw or in WebSocket messages); `registry` holds the streams and enforces
//! the limit; `stream` is one stream's life: the local connection, its session, and the bytes
//! carried between them. This file owns the listener and the per-connection tasks, and nothing
//! of what the requests mean.
//!
//! ```no_run
//! # async fn serve() -> std::io::Result<()> {
//! use immortal::server::{Agent, AgentConfig};
//! use immortal::token::Token;
//!
//! let agent = Agent::bind(AgentConfig::new("127.0.0.1:7400".parse().unwrap(), Token::generate())).await?;
//! println!("listening on {}", agent.local_addr());
//! agent.run().await // until dropped
//! # }
//! ```

mod connections;
mod metrics;
mod registry;
mod routes;
mod socket_agent;
mod stream;
mod upgrade;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backedpipe::session::SessionConfig;
use backedpipe::{BoxIo, PipeConfig, SessionOptions, TlsAcceptor};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::token::Token;

use self::connections::{ConnectionGate, Ticket};
use self::metrics::Metrics;
use self::registry::Registry;
pub use self::registry::{RemovalReason, StreamEvent};
pub use self::socket_agent::{SocketAgent, SocketAgentConfig, SocketAgentError, Stopped};

/// How long [`Agent::run_until`] waits for the streams to close once told to stop: enough for
/// each session's CLOSE to leave (a session waits about a second for that).
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// The agent's settings.
///
/// | setting | default ([`AgentConfig::new`]) | why |
/// |---|---|---|
/// | [`max_streams`](Self::max_streams) | 10,000 | 10,000 idle streams take about 163 MiB; each holds a local connection and, while busy, up to its replay buffer (see `docs/API.md`, "Limits and memory") |
/// | [`max_connections`](Self::max_connections) | 11,000 | every stream's client plus room for API requests; unauthenticated connections give way first |
/// | [`ttl`](Self::ttl) | 24 h | a laptop asleep overnight still finds its stream in the morning |
/// | [`handshake_timeout`](Self::handshake_timeout) | 10 s | a client that connects and says nothing (TLS, the whole HTTP request, session hello) cannot hold a task for long |
/// | [`heartbeat`](Self::heartbeat) | 5 s | an idle path is probed this often; one silent for 2 × heartbeat + 1 s is declared dead |
/// | [`stream_buffer`](Self::stream_buffer) | 64 MiB | the most each stream holds of what the service sent that its client has not acknowledged; a client further behind than this waits at the agent (the service is not read meanwhile) |
/// | [`tls`](Self::tls) | none | plain HTTP; fine on loopback, not beyond it |
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// The bearer token every request must present.
    pub token: Token,
    /// The most streams held at once. When full, creating a stream evicts the oldest
    /// disconnected one (never one created less than the handshake timeout ago that its
    /// creator has yet to attach), or is refused (503, "agent full") if there is none.
    pub max_streams: usize,
    /// The most client connections open at once (HTTP requests and upgraded streams). At the
    /// cap, the oldest connection that has not presented the token is closed to let a new one
    /// in; if every one has, the new one is closed.
    pub max_connections: usize,
    /// How long a stream with no client attached is kept after its client went away. A new
    /// stream whose creator has not attached is kept twelve handshake timeouts, or this if
    /// shorter.
    pub ttl: Duration,
    /// The longest a client may take over each handshake step: TLS, sending its whole HTTP
    /// request (head and body), and the session handshake after an upgrade.
    pub handshake_timeout: Duration,
    /// How often an idle session path is probed.
    pub heartbeat: Duration,
    /// Each stream's replay buffer in bytes, within [`STREAM_BUFFER_BOUNDS`]: what the service
    /// sent and the client has not acknowledged. The agent stops reading the service when it
    /// is full, so it bounds a stream's memory whatever its client does, and with the round
    /// trip it bounds a stream's speed (at most this much in flight).
    pub stream_buffer: usize,
    /// Serve HTTPS with this acceptor; plain HTTP when `None`.
    pub tls: Option<TlsAcceptor>,
}

impl AgentConfig {
    /// The defaults of the table above, listening on `listen` and accepting `token`.
    pub fn new(listen: SocketAddr, token: Token) -> AgentConfig {
        AgentConfig {
            listen,
            token,
            max_streams: DEFAULT_MAX_STREAMS,
            max_connections: DEFAULT_MAX_STREAMS + 1000,
            ttl: Duration::from_secs(24 * 60 * 60),
            handshake_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(5),
            stream_buffer: backedpipe::DEFAULT_BUFFER_SIZE,
            tls: None,
        }
    }

    /// Checks that every duration is within [`DURATION_BOUNDS`] and the limits are not zero.
    ///
    /// # Errors
    /// [`ConfigError`] naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("heartbeat", self.heartbeat),
            ("ttl", self.ttl),
            ("handshake timeout", self.handshake_timeout),
        ] {
            check_duration(name, value)?;
        }
        if self.max_streams == 0 || self.max_connections == 0 {
            return Err(ConfigError::ZeroLimit);
        }
        check_stream_buffer(self.stream_buffer)?;
        Ok(())
    }

    /// The session settings each stream's sessions run with.
    fn session_options(&self) -> SessionOptions {
        stream_session_options(
            self.heartbeat,
            self.stream_buffer,
            self.ttl,
            self.handshake_timeout,
        )
    }
}

/// The session settings of an agent's streams: its heartbeat (a path silent for two of them
/// and a second is dead), its stream buffer as each session's replay capacity, its TTL and
/// handshake timeout.
fn stream_session_options(
    heartbeat: Duration,
    stream_buffer: usize,
    ttl: Duration,
    handshake_timeout: Duration,
) -> SessionOptions {
    let timing = SessionConfig {
        heartbeat_interval: heartbeat,
        dead_after: heartbeat * 2 + Duration::from_secs(1),
        ..SessionConfig::default()
    };
    SessionOptions::default()
        .timing(timing)
        .pipe(PipeConfig::default().buffer_capacity(stream_buffer))
        .ttl(ttl)
        .handshake_timeout(handshake_timeout)
}

/// The smallest and largest [`AgentConfig::stream_buffer`]: below 64 KiB a stream could not
/// keep one frame in flight; above 1 GiB one stream could hold more than a small host has.
pub const STREAM_BUFFER_BOUNDS: (usize, usize) = (64 * 1024, 1 << 30);

/// Checks a stream buffer size against [`STREAM_BUFFER_BOUNDS`].
///
/// # Errors
/// [`ConfigError::StreamBuffer`] outside them.
pub fn check_stream_buffer(bytes: usize) -> Result<(), ConfigError> {
    let (min, max) = STREAM_BUFFER_BOUNDS;
    if (min..=max).contains(&bytes) {
        Ok(())
    } else {
        Err(ConfigError::StreamBuffer(bytes))
    }
}

/// The default of [`AgentConfig::max_streams`].
pub const DEFAULT_MAX_STREAMS: usize = 10_000;

/// The shortest and longest duration any setting of the agent (or of a client's session) may
/// have: longer ones overflow the arithmetic of deadlines, shorter ones would spin.
pub const DURATION_BOUNDS: (Duration, Duration) = (
    Duration::from_millis(100),
    Duration::from_secs(366 * 24 * 60 * 60),
);

/// Checks `value` against [`DURATION_BOUNDS`].
///
/// # Errors
/// [`ConfigError::Duration`] naming `name` and the bounds.
///
/// ```
/// use std::time::Duration;
/// use immortal::server::check_duration;
///
/// assert!(check_duration("ttl", Duration::from_secs(3600)).is_ok());
/// assert!(check_duration("ttl", Duration::MAX).is_err());
/// ```
pub fn check_duration(name: &'static str, value: Duration) -> Result<(), ConfigError> {
    let (min, max) = DURATION_BOUNDS;
    if value < min || value > max {
        return Err(ConfigError::Duration { name, value });
    }
    Ok(())
}

/// An [`AgentConfig`] that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration outside [`DURATION_BOUNDS`].
    #[error(
        "the {name} of {} is out of range: it must be between 100 ms and 366 days",
        humantime::format_duration(*value)
    )]
    Duration {
        /// The setting.
        name: &'static str,
        /// The value given.
        value: Duration,
    },
    /// `max_streams` or `max_connections` is zero.
    #[error("the agent needs room for at least one stream and one connection")]
    ZeroLimit,
    /// A stream buffer outside [`STREAM_BUFFER_BOUNDS`].
    #[error("a stream buffer of {0} bytes is out of range: it must be between 64 KiB and 1 GiB")]
    StreamBuffer(usize),
}

/// A bound agent. [`run`](Self::run) serves until the future is dropped; dropping it also
/// closes every stream (their sessions get CLOSE, their local connections are dropped).
#[derive(Debug)]
pub struct Agent {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    gate: Arc<ConnectionGate>,
    shared: Arc<Shared>,
}

/// What every request handler needs.
#[derive(Debug)]
struct Shared {
    token: Token,
    registry: Registry,
    metrics: Arc<Metrics>,
    /// Cancelled when the agent stops: every connection and stream task ends.
    shutdown: CancellationToken,
    handshake_timeout: Duration,
}

impl Agent {
    /// Binds the listening socket. Nothing is served until [`run`](Self::run).
    ///
    /// # Errors
    /// The bind's failure (address in use, permission denied, address not local); a
    /// [`ConfigError`] (as the source of an error of kind `InvalidInput`).
    pub async fn bind(config: AgentConfig) -> io::Result<Agent> {
        config
            .validate()
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        let listener = listen(config.listen)?;
        let local_addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::new(
            config.max_streams,
            config.ttl,
            config.handshake_timeout,
            config.session_options(),
            shutdown.clone(),
            metrics.clone(),
        );
        Ok(Agent {
            listener,
            local_addr,
            tls: config.tls,
            handshake_timeout: config.handshake_timeout,
            gate: ConnectionGate::new(config.max_connections, metrics.clone()),
            shared: Arc::new(Shared {
                token: config.token,
                registry,
                metrics,
                shutdown,
                handshake_timeout: config.handshake_timeout,
            }),
        })
    }

    /// The address the agent listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Events about streams (created, attached, removed and why), for logs and tests. Events
    /// that a slow receiver misses are dropped for it alone (it sees `Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<StreamEvent> {
        self.shared.registry.subscribe()
    }

    /// Serves until the returned future is dropped. Each connection is handled in its own task
    /// (TLS handshake, then HTTP/1.1 with upgrades), so a slow client delays nobody else.
    ///
    /// # Errors
    /// None at present: a failed accept (out of file descriptors, say) is logged and retried.
    pub async fn run(self) -> io::Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// Serves until `stop` resolves, then closes every stream (attached clients receive a
    /// session CLOSE, so they stop instead of trying to resume) and returns once they are
    /// closed, or after [`STOP_GRACE`] at most. Dropping the future stops everything at once,
    /// without waiting.
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> io::Result<()> {
        // Dropping this future (or returning) stops every task the agent started.
        let _stop_all = self.shared.shutdown.clone().drop_guard();
        let router = routes::router(self.shared.clone());
        let mut stop = std::pin::pin!(stop);
        // Accept failures in a row: the first is a warning, its repeats are not (out of
        // descriptors, the loop would otherwise log ten lines a second).
        let mut failing = 0u64;
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = &mut stop => break,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    if failing == 0 {
                        tracing::warn!(
                            %err,
                            "accept failed; retrying (repeats are logged at debug level)"
                        );
                    } else {
                        tracing::debug!(%err, failing, "accept failed again");
                    }
                    failing += 1;
                    // Out of descriptors or similar: give the system a moment rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if failing > 0 {
                tracing::info!(failing, "accepting again after failures");
                failing = 0;
            }
            let Some(ticket) = self.gate.admit(&self.shared.shutdown) else {
                tracing::debug!(%peer, "connection refused: at the connection cap");
                continue;
            };
            tracing::debug!(%peer, "connection");
            tokio::spawn(serve_connection(
                tcp,
                peer,
                Arc::new(ticket),
                self.tls.clone(),
                router.clone(),
                self.handshake_timeout,
            ));
        }
        drop(self.listener);
        self.shared.shutdown.cancel();
        let closed = self.shared.registry.wait_empty();
        if tokio::time::timeout(STOP_GRACE, closed).await.is_err() {
            tracing::warn!("some streams did not close in time");
        }
        Ok(())
    }
}

/// Serves one client connection: TLS if configured, then HTTP/1.1 with upgrades, until the
/// client goes away or the agent stops. An upgraded connection leaves this task (see
/// [`upgrade`]).
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    ticket: Arc<Ticket>,
    tls: Option<TlsAcceptor>,
    router: axum::Router,
    handshake_timeout: Duration,
) {
    let _ = tcp.set_nodelay(true);
    serve_io(Box::new(tcp), peer, ticket, tls, router, handshake_timeout).await;
}

/// [`serve_connection`] on any transport.
async fn serve_io(
    io: BoxIo,
    peer: SocketAddr,
    ticket: Arc<Ticket>,
    tls: Option<TlsAcceptor>,
    router: axum::Router,
    handshake_timeout: Duration,
) {
    // Cancelled by the connection cap or by the agent stopping, whichever comes first.
    let shutdown = ticket.closing().clone();
    let io: BoxIo = match tls {
        None => io,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(io));
            match shutdown.run_until_cancelled(handshake).await {
                Some(Ok(Ok(io))) => io,
                Some(Ok(Err(err))) => {
                    tracing::debug!(%peer, %err, "TLS handshake failed");
                    return;
                }
                Some(Err(_)) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
                None => return,
            }
        }
    };
    // The router takes axum's body type; hyper gives its own.
    let router = TowerToHyperService::new(router);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut request = request.map(axum::body::Body::new);
        request
            .extensions_mut()
            .insert(ConnectionTicket(ticket.clone()));
        // The whole request, body included, within the handshake timeout: a body that
        // trickles in a byte at a time cannot hold the connection (and its buffers) for long.
        let response = tokio::time::timeout(
            handshake_timeout,
            hyper::service::Service::call(&router, request),
        );
        async move {
            match response.await {
                Ok(response) => response,
                Err(_) => Ok(routes::request_timeout()),
            }
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .max_buf_size(MAX_HTTP_BUFFER)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    // Boxed as `Send` here: left to inference, rustc fails to prove the spawned future `Send`
    // (a higher-ranked lifetime limitation with hyper's connection type).
    let connection: Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>> =
        Box::pin(connection);
    if let Some(Err(err)) = shutdown.run_until_cancelled(connection).await {
        tracing::debug!(%peer, %err, "HTTP connection ended");
    }
}

/// A way in for the fuzz target of the agent's HTTP handling (`fuzz/`), built only under
/// `cfg(fuzzing)`.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    use super::connections::ConnectionGate;
    use super::metrics::Metrics;
    use super::registry::Registry;
    use super::{routes, serve_io, AgentConfig, Shared};
    use crate::token::Token;

    /// The token of the fuzzed agent (the seed corpus carries it, so that the fuzzer reaches
    /// the authenticated routes).
    pub const TOKEN: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    /// Feeds `input` to a fresh agent as one client connection's bytes (then end of input),
    /// on simulated time, and returns everything the agent answered.
    pub fn http_exchange(input: &[u8]) -> Vec<u8> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let token = Token::from_hex(TOKEN).expect("a token");
            let mut config = AgentConfig::new(([127, 0, 0, 1], 0).into(), token);
            config.max_streams = 2;
            let shutdown = CancellationToken::new();
            let metrics = Arc::new(Metrics::default());
            let registry = Registry::new(
                config.max_streams,
                config.ttl,
                config.handshake_timeout,
                config.session_options(),
                shutdown.clone(),
                metrics.clone(),
            );
            let shared = Arc::new(Shared {
                token: config.token.clone(),
                registry,
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
                handshake_timeout: config.handshake_timeout,
            });
            let gate = ConnectionGate::new(4, metrics);
            let ticket = Arc::new(gate.admit(&shutdown).expect("room"));
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let serve = tokio::spawn(serve_io(
                Box::new(server),
                ([127, 0, 0, 1], 1).into(),
                ticket,
                None,
                routes::router(shared),
                config.handshake_timeout,
            ));
            let (mut read, mut write) = tokio::io::split(&mut client);
            let send = async {
                let _ = write.write_all(input).await;
                let _ = write.shutdown().await;
            };
            let mut answer = Vec::new();
            let receive =
                tokio::time::timeout(Duration::from_secs(60), read.read_to_end(&mut answer));
            let _ = tokio::join!(send, receive);
            shutdown.cancel();
            serve.abort();
            answer
        })
    }
}

/// The most a connection's HTTP read buffer holds (a request head must fit; hyper's default
/// lets it grow to about 400 KiB per connection).
const MAX_HTTP_BUFFER: usize = 16 * 1024;

/// The slot of the connection a request arrived on (a request extension), so that
/// authenticating the request marks the connection and an upgrade keeps the slot.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionTicket(pub(crate) Arc<Ticket>);

/// A listen queue long enough for a reconnect storm: when a network blip cuts many clients at
/// once they all come back within milliseconds, and a queue of 128 (tokio's default) overflows,
/// making the kernel retry the dropped ones only after a second (`bpbench scale` shows it).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the agent's listening socket, with [`LISTEN_BACKLOG`] and, as usual for servers,
/// `SO_REUSEADDR` so that a restarted agent can bind while old connections linger.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_buffer_is_each_sessions_replay_capacity_and_bounded() {
        let mut config = AgentConfig::new("127.0.0.1:0".parse().unwrap(), Token::generate());
        assert_eq!(config.stream_buffer, backedpipe::DEFAULT_BUFFER_SIZE);
        config.stream_buffer = 4 << 20;
        assert_eq!(config.validate(), Ok(()));
        let options = format!("{:?}", config.session_options());
        assert!(options.contains("buffer_capacity: 4194304"), "{options}");
        for bad in [0, 64 * 1024 - 1, (1 << 30) + 1] {
            config.stream_buffer = bad;
            assert_eq!(config.validate(), Err(ConfigError::StreamBuffer(bad)));
        }
    }
}
