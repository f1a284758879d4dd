//! `immortal serve`: runs the agent.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backedpipe::TlsAcceptor;
use clap::Args;

use super::CliError;
use crate::server::{Agent, AgentConfig};
use crate::token::Token;

/// Run the agent: expose this host's local TCP services as immortal streams.
///
/// The agent listens on one port speaking HTTP/1.1: a JSON management API under /v1/streams
/// and the streams themselves by HTTP upgrade. Clients authenticate with a bearer token; if the
/// token file does not exist, a new token is generated into it (mode 0600) and printed with
/// how to use it.
///
/// Example: immortal serve --listen 0.0.0.0:7400 --tls-cert cert.pem --tls-key key.pem
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// File holding the token clients must present (generated if missing). Default: the file
    /// `immortal/token` in your configuration directory.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The most streams held at once; when full, the oldest disconnected stream is evicted.
    #[arg(long, default_value_t = 32)]
    pub max_streams: usize,
    /// How long a stream with no client attached is kept (e.g. 30s, 10m, 24h).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// How often an idle connection is probed (e.g. 5s, 500ms); a connection silent for two
    /// probes and a second is dropped and waits for its client to resume.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = super::common::parse_heartbeat)]
    pub heartbeat: Duration,
    /// TLS certificate chain (PEM); serves HTTPS with --tls-key.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Runs the agent until interrupted (Ctrl-C or SIGTERM), then exits successfully.
pub async fn run(args: ServeArgs) -> Result<(), CliError> {
    let token_path = match &args.token_file {
        Some(path) => path.clone(),
        None => Token::default_path().ok_or_else(|| {
            CliError::Other(
                "this system has no configuration directory for the token; pass --token-file"
                    .into(),
            )
        })?,
    };
    let (token, generated) =
        Token::load_or_generate(&token_path).map_err(|err| CliError::Other(err.to_string()))?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            TlsAcceptor::from_pem_files(cert, key)
                .map_err(|err| CliError::Other(format!("TLS: {err}")))?,
        ),
        _ => None,
    };
    if tls.is_none() && !args.listen.ip().is_loopback() {
        tracing::warn!(
            "serving on {} WITHOUT TLS: the token and every stream's bytes cross the network \
             in the clear. Pass --tls-cert and --tls-key, or listen on 127.0.0.1 and reach the \
             agent through a tunnel.",
            args.listen
        );
    }
    let mut config = AgentConfig::new(args.listen, token);
    config.max_streams = args.max_streams;
    config.ttl = args.ttl;
    config.heartbeat = args.heartbeat;
    config.tls = tls;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let agent = match Agent::bind(config).await {
        Ok(agent) => agent,
        Err(err) => {
            if generated {
                // Said now or never: the next start finds the token and says nothing.
                print_token_hint(&token_path, args.listen);
            }
            return Err(bind_error(args.listen, &err));
        }
    };
    if generated {
        print_token_hint(&token_path, agent.local_addr());
    }
    let stop =
        stop_signal().map_err(|err| CliError::Other(format!("cannot handle Ctrl-C: {err}")))?;
    tracing::info!("listening on {scheme}://{}", agent.local_addr());
    let interrupted = async {
        stop.await;
        tracing::info!("interrupted; closing every stream and stopping");
    };
    agent
        .run_until(interrupted)
        .await
        .map_err(|err| CliError::Other(format!("the agent stopped: {err}")))
}

/// Tells the person who just started the agent where the new token is and how clients use it.
fn print_token_hint(path: &Path, listening: SocketAddr) {
    let server = if listening.ip().is_unspecified() {
        format!("HOST:{}", listening.port())
    } else {
        listening.to_string()
    };
    let where_clients_look = if Token::default_path().as_deref() == Some(path) {
        "Clients run by you on this host find it there by default."
    } else {
        "Clients on this host need --token-file to find it there."
    };
    let path = path.display();
    eprintln!(
        "immortal: generated a new token in {path} (readable only by you).\n\
         {where_clients_look} Elsewhere, copy it and run, e.g.\n\
         \n    IMMORTAL_TOKEN=$(cat {path}) immortal ls --server {server}\n\
         \nor pass --token-file {path}."
    );
}

/// A bind failure as one line that says what to do.
fn bind_error(listen: SocketAddr, err: &io::Error) -> CliError {
    CliError::Other(match err.kind() {
        io::ErrorKind::AddrInUse => format!(
            "cannot listen on {listen}: the address is in use (is another agent running? \
             choose another with --listen)"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "cannot listen on {listen}: permission denied (ports below 1024 need privileges)"
        ),
        io::ErrorKind::AddrNotAvailable => {
            format!("cannot listen on {listen}: no interface of this host has that address")
        }
        _ => format!("cannot listen on {listen}: {err}"),
    })
}

/// A future that resolves on Ctrl-C (SIGINT), or SIGTERM where there is such a thing. The
/// handlers are installed before this returns, so a signal sent as soon as the agent says it is
/// listening is caught rather than killing the process.
fn stop_signal() -> io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if tokio::signal::ctrl_c().await.is_err() {
                // No signal handling: serve until killed.
                std::future::pending::<()>().await;
            }
        })
    }
}
