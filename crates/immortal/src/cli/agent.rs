//! `immortal agent`: the per-user agent on a Unix socket, which `immortal relay` finds or
//! starts.

use std::io::Write;
use std::time::Duration;

use clap::Args;

use super::common::parse_heartbeat;
use super::serve::parse_size;
use super::CliError;
use crate::runtime_dir::RuntimeDir;
use crate::server::{SocketAgent, SocketAgentConfig, SocketAgentError};

/// Run your per-user agent on a Unix socket (normally started by `immortal relay`).
///
/// The agent listens on `agent.sock` in a directory only you can enter:
/// `$XDG_RUNTIME_DIR/immortal/` when XDG_RUNTIME_DIR is set, else `immortal-<uid>/` in the
/// temporary directory (IMMORTAL_RUNTIME_DIR overrides both). No token is needed: whoever can
/// open the socket is you. One agent runs per user; a second one exits with status 8. When it
/// is ready it prints `listening on <socket>` on stdout.
///
/// `immortal relay` starts it with --idle-exit 10m, so that nothing lingers on servers; run
/// it yourself (under a service manager, say) to keep it up.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Exit after holding no stream for this long (e.g. 10m). Default: run until stopped.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub idle_exit: Option<Duration>,
    /// The most streams held at once; when full, the oldest disconnected stream is evicted.
    #[arg(long, default_value_t = 32)]
    pub max_streams: usize,
    /// How long a stream with no client attached is kept after its client went away (e.g.
    /// 30s, 10m, 24h). A new stream's creator must attach within two minutes, or this if
    /// shorter.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// How often an idle connection is probed; one silent for two probes and a second is
    /// dropped and waits for its client to resume.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_heartbeat)]
    pub heartbeat: Duration,
    /// The most each stream holds of what its service sent and its client has not yet
    /// acknowledged (e.g. 4MiB; 64KiB to 1GiB).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub stream_buffer: usize,
}

/// The exit status of an agent that found another one running.
pub const ALREADY_RUNNING: u8 = 8;

/// Runs the agent until it is idle for its idle time, or stopped (SIGINT, SIGTERM).
pub async fn run(args: AgentArgs) -> Result<(), CliError> {
    let dir = RuntimeDir::locate();
    let config = SocketAgentConfig {
        max_streams: args.max_streams,
        ttl: args.ttl,
        heartbeat: args.heartbeat,
        idle_exit: args.idle_exit,
        stream_buffer: args.stream_buffer,
        ..SocketAgentConfig::default()
    };
    let agent = match SocketAgent::bind(&dir, config) {
        Ok(agent) => agent,
        Err(err @ SocketAgentError::AlreadyRunning { .. }) => {
            return Err(CliError::AgentRunning(err.to_string()))
        }
        Err(err) => return Err(CliError::Other(err.to_string())),
    };
    let socket = agent.socket().display().to_string();
    // The line a starting relay waits for; it may have closed the pipe since.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on {socket}").and_then(|()| stdout.flush());
    tracing::info!("listening on {socket}");
    let stop = super::common::termination();
    agent
        .run_until(async {
            stop.await;
        })
        .await;
    Ok(())
}
