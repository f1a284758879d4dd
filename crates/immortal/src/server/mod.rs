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
use backedpipe::{BoxIo, SessionOptions, TlsAcceptor};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::token::Token;

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
/// | [`max_streams`](Self::max_streams) | 32 | each stream holds a local connection and up to a replay buffer of memory |
/// | [`ttl`](Self::ttl) | 24 h | a laptop asleep overnight still finds its stream in the morning |
/// | [`handshake_timeout`](Self::handshake_timeout) | 10 s | a client that connects and says nothing (TLS, HTTP head, session hello) cannot hold a task for long |
/// | [`heartbeat`](Self::heartbeat) | 5 s | an idle path is probed this often; one silent for 2 × heartbeat + 1 s is declared dead |
/// | [`tls`](Self::tls) | none | plain HTTP; fine on loopback, not beyond it |
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// The bearer token every request must present.
    pub token: Token,
    /// The most streams held at once. When full, creating a stream evicts the oldest
    /// disconnected one, or is refused (503) if every stream has a client attached.
    pub max_streams: usize,
    /// How long a stream with no client attached is kept: after its client went away, or after
    /// its creation if no client ever attached.
    pub ttl: Duration,
    /// The longest a client may take over each handshake step: TLS, sending its HTTP request,
    /// and the session handshake after an upgrade.
    pub handshake_timeout: Duration,
    /// How often an idle session path is probed.
    pub heartbeat: Duration,
    /// Serve HTTPS with this acceptor; plain HTTP when `None`.
    pub tls: Option<TlsAcceptor>,
}

impl AgentConfig {
    /// The defaults of the table above, listening on `listen` and accepting `token`.
    pub fn new(listen: SocketAddr, token: Token) -> AgentConfig {
        AgentConfig {
            listen,
            token,
            max_streams: 32,
            ttl: Duration::from_secs(24 * 60 * 60),
            handshake_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(5),
            tls: None,
        }
    }

    /// The session settings each stream's sessions run with.
    fn session_options(&self) -> SessionOptions {
        let timing = SessionConfig {
            heartbeat_interval: self.heartbeat,
            dead_after: self.heartbeat * 2 + Duration::from_secs(1),
            ..SessionConfig::default()
        };
        SessionOptions::default()
            .timing(timing)
            .ttl(self.ttl)
            .handshake_timeout(self.handshake_timeout)
    }
}

/// A bound agent. [`run`](Self::run) serves until the future is dropped; dropping it also
/// closes every stream (their sessions get CLOSE, their local connections are dropped).
#[derive(Debug)]
pub struct Agent {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    shared: Arc<Shared>,
}

/// What every request handler needs.
#[derive(Debug)]
struct Shared {
    token: Token,
    registry: Registry,
    /// Cancelled when the agent stops: every connection and stream task ends.
    shutdown: CancellationToken,
    handshake_timeout: Duration,
}

impl Agent {
    /// Binds the listening socket. Nothing is served until [`run`](Self::run).
    ///
    /// # Errors
    /// The bind's failure (address in use, permission denied, address not local).
    pub async fn bind(config: AgentConfig) -> io::Result<Agent> {
        let listener = listen(config.listen)?;
        let local_addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let registry = Registry::new(
            config.max_streams,
            config.ttl,
            config.session_options(),
            shutdown.clone(),
        );
        Ok(Agent {
            listener,
            local_addr,
            tls: config.tls,
            handshake_timeout: config.handshake_timeout,
            shared: Arc::new(Shared {
                token: config.token,
                registry,
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
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = &mut stop => break,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(%err, "accept failed; retrying");
                    // Out of descriptors or similar: give the system a moment rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            tracing::debug!(%peer, "connection");
            tokio::spawn(serve_connection(
                tcp,
                peer,
                self.tls.clone(),
                router.clone(),
                self.handshake_timeout,
                self.shared.shutdown.clone(),
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
    tls: Option<TlsAcceptor>,
    router: axum::Router,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let io: BoxIo = match tls {
        None => Box::new(tcp),
        Some(acceptor) => {
            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(Box::new(tcp)));
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
        hyper::service::Service::call(&router, request.map(axum::body::Body::new))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
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
