//! `immortal forward`: a local listener whose every connection is its own immortal stream.
//!
//! Each accepted connection gets a stream on the agent and a session of its own, carried with
//! half-close in both directions; when both directions have ended, the session is closed and
//! the stream deleted. Ctrl-C (or SIGTERM) stops accepting and winds every connection down the
//! same way.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use backedpipe::Session;
use clap::Args;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::common::{
    carry, report_status, session_error, termination, ClientArgs, SessionArgs, Until,
};
use super::CliError;
use crate::api::StreamInfo;
use crate::client::{network_changes, probe_on_network_changes, ApiClient, ClientError};

/// Forward a local port to a port on the agent's host, each connection an immortal stream.
///
/// Listens on LOCAL_ADDR; every connection accepted there becomes a new stream to
/// TARGET_PORT on the agent's host, which survives network loss like `connect` does. Closing
/// the local connection removes its stream. Runs until Ctrl-C.
///
/// Example: immortal forward --server db.example:7400 127.0.0.1:5432:5432
#[derive(Debug, Clone, Args)]
pub struct ForwardArgs {
    /// Where the agent is and how to reach it.
    #[command(flatten)]
    pub client: ClientArgs,
    /// How the stream's connections travel and are watched.
    #[command(flatten)]
    pub session: SessionArgs,
    /// LOCAL_ADDR:TARGET_PORT, e.g. 127.0.0.1:8080:80 (a bare LOCAL_PORT:TARGET_PORT
    /// listens on 127.0.0.1).
    #[arg(value_name = "LOCAL_ADDR:TARGET_PORT")]
    pub spec: ForwardSpec,
}

/// What `forward` listens on and where it forwards to.
///
/// ```
/// use immortal::cli::forward::ForwardSpec;
///
/// let spec: ForwardSpec = "127.0.0.1:8080:80".parse().unwrap();
/// assert_eq!(spec.local.to_string(), "127.0.0.1:8080");
/// assert_eq!(spec.target_port, 80);
/// let spec: ForwardSpec = "[::1]:2222:22".parse().unwrap();
/// assert_eq!(spec.local.to_string(), "[::1]:2222");
/// let spec: ForwardSpec = "8080:80".parse().unwrap();
/// assert_eq!(spec.local.to_string(), "127.0.0.1:8080");
/// assert!("127.0.0.1:8080".parse::<ForwardSpec>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardSpec {
    /// The local address to listen on.
    pub local: SocketAddr,
    /// The port on the agent's host each connection is forwarded to.
    pub target_port: u16,
}

impl FromStr for ForwardSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not LOCAL_ADDR:TARGET_PORT (e.g. 127.0.0.1:8080:80)");
        let (local, target) = text.rsplit_once(':').ok_or_else(bad)?;
        let target_port = target.parse::<u16>().ok().filter(|&p| p != 0);
        let target_port = target_port.ok_or_else(bad)?;
        let local = match local.parse::<u16>() {
            Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
            Err(_) => local.parse::<SocketAddr>().map_err(|_| bad())?,
        };
        Ok(ForwardSpec { local, target_port })
    }
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.local, self.target_port)
    }
}

/// How long, after Ctrl-C, connections get to close their sessions and delete their streams.
const WIND_DOWN: Duration = Duration::from_secs(5);

/// Runs until interrupted.
pub async fn run(args: ForwardArgs) -> Result<(), CliError> {
    let api = args.client.api_client()?;
    // Fail now, with the right exit code, if the agent is unreachable or refuses the token,
    // rather than at the first connection.
    api.list().await?;
    // Each forwarded connection holds two descriptors (its local connection and its transport
    // to the agent): a shell's soft limit of 1,024 would cap it at about 500.
    super::common::raise_open_file_limit();
    let listener = TcpListener::bind(args.spec.local)
        .await
        .map_err(|err| CliError::Other(format!("cannot listen on {}: {err}", args.spec.local)))?;
    let local = listener.local_addr().unwrap_or(args.spec.local);
    tracing::info!(
        "forwarding {local} to port {} on the agent at {}",
        args.spec.target_port,
        api.server()
    );
    let stop = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut number = 0u64;
    let stopped_by = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    number += 1;
                    let forward = Forwarding {
                        api: api.clone(),
                        args: args.clone(),
                        number,
                        peer,
                        stop: stop.child_token(),
                    };
                    connections.spawn(forward.run(tcp));
                }
                Err(err) => {
                    // Out of descriptors, say: the same error would come back at once, so give
                    // the connections that hold them a moment to finish.
                    tracing::warn!(%err, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            signal = termination() => break signal,
        }
    };
    tracing::info!(
        "stopped by {stopped_by}; closing {} connection(s)",
        connections.len()
    );
    drop(listener);
    stop.cancel();
    let wind_down = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(WIND_DOWN, wind_down).await.is_err() {
        tracing::warn!("some connections did not close in time; their streams expire on the agent");
    }
    Ok(())
}

/// How long `forward` waits after a failed accept before it accepts again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// One forwarded connection.
struct Forwarding {
    api: ApiClient,
    args: ForwardArgs,
    number: u64,
    peer: SocketAddr,
    stop: CancellationToken,
}

impl Forwarding {
    async fn run(self, tcp: TcpStream) {
        let number = self.number;
        let _ = tcp.set_nodelay(true);
        let name = format!("forward {} from {}", self.args.spec.local, self.peer);
        let stream = tokio::select! {
            created = self.api.create_stream(self.args.spec.target_port, Some(name)) => created,
            () = self.stop.cancelled() => return,
        };
        let stream = match stream {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(connection = number, "{}", CliError::from(err));
                return;
            }
        };
        tracing::info!(connection = number, peer = %self.peer, stream = %stream.id, "forwarding");
        let result = self.carry_stream(tcp, &stream).await;
        match &result {
            Ok(()) => tracing::info!(connection = number, "closed"),
            Err(err) => tracing::warn!(connection = number, "{err}"),
        }
        match self.api.delete(&stream.id).await {
            Ok(()) | Err(ClientError::NotFound(_)) => {}
            Err(err) => tracing::debug!(connection = number, %err, "could not delete the stream"),
        }
    }

    /// Carries the connection on a new session of `stream` until both directions end,
    /// the stream fails, or forwarding stops.
    async fn carry_stream(&self, tcp: TcpStream, stream: &StreamInfo) -> Result<(), CliError> {
        let connector = self.args.session.connector(&self.api, stream);
        let mut gone = connector.gone_signal();
        let options = self.args.session.session_options();
        let session = tokio::select! {
            session = Session::connect(connector, options) => session,
            () = self.stop.cancelled() => return Ok(()),
        };
        let session = session.map_err(|err| {
            gone.get()
                .map(CliError::from)
                .unwrap_or_else(|| session_error(&err))
        })?;
        let number = self.number;
        let reporter = tokio::spawn(report_status(session.status(), "", move |status| {
            tracing::info!(connection = number, "{}", status.text());
        }));
        let (input, output) = tcp.into_split();
        let carried = tokio::select! {
            carried = carry(&session, &mut gone, input, output, Until::BothEnd) => Some(carried),
            () = self.stop.cancelled() => None,
            never = probe_on_network_changes(&session, network_changes()) => match never {},
        };
        reporter.abort();
        // A clean end closes gracefully (the agent acknowledges what we sent first); being
        // stopped or failing closes at once.
        match carried {
            Some(Ok(_)) => drop(session.close().await),
            _ => drop(session),
        }
        carried.map_or(Ok(()), |carried| carried.map(drop))
    }
}
