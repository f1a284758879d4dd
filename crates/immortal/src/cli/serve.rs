//! `immortal serve`: runs the agent.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backedpipe::TlsAcceptor;
use clap::Args;

use super::common::{parse_bounded_duration, parse_heartbeat};
use super::CliError;
use crate::server::{check_stream_buffer, Agent, AgentConfig, DEFAULT_MAX_STREAMS};
use crate::token::Token;

/// Run the agent: expose this host's local TCP services as immortal streams.
///
/// The agent listens on one port speaking HTTP/1.1: a JSON management API under /v1/streams
/// and the streams themselves by HTTP upgrade. Clients authenticate with a bearer token; if the
/// token file does not exist, a new token is generated into it (mode 0600) and printed with
/// how to use it. One token is full access to the agent (every stream can be listed and
/// deleted), but a stream can be attached only by the client that created it.
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
    /// The most streams held at once; when full, the oldest disconnected stream is evicted
    /// (never one whose creator is still attaching), else a create is refused with "agent
    /// full".
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_STREAMS, value_parser = parse_count)]
    pub max_streams: usize,
    /// The most client connections open at once (default: max streams + 1000); at the cap,
    /// connections that have not presented the token are closed first.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub max_connections: Option<usize>,
    /// How long a stream with no client attached is kept after its client went away (e.g.
    /// 30s, 10m, 24h; at most 366 days). A new stream's creator must attach within twelve
    /// handshake timeouts (2 min), or this if shorter.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_bounded_duration)]
    pub ttl: Duration,
    /// How often an idle connection is probed (e.g. 5s, 500ms); a connection silent for two
    /// probes and a second is dropped and waits for its client to resume.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_heartbeat)]
    pub heartbeat: Duration,
    /// The most each stream holds of what its service sent and its client has not yet
    /// acknowledged (e.g. 4MiB, 512KiB; 64KiB to 1GiB). A client further behind waits, and the
    /// service is not read meanwhile; with the round trip it also caps a stream's speed.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub stream_buffer: usize,
    /// How long a client may take over each step of connecting: TLS, its whole HTTP request,
    /// the session handshake.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_bounded_duration)]
    pub handshake_timeout: Duration,
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
    config.max_connections = args
        .max_connections
        .unwrap_or(args.max_streams.saturating_add(1000));
    config.ttl = args.ttl;
    config.heartbeat = args.heartbeat;
    config.stream_buffer = args.stream_buffer;
    config.handshake_timeout = args.handshake_timeout;
    config.tls = tls;
    fit_open_files(&mut config);
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

/// Parses a size in bytes: a number with an optional binary unit (`KiB`, `MiB`, `GiB`, or
/// `K`, `M`, `G`), within [`STREAM_BUFFER_BOUNDS`].
pub(crate) fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 4MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        other => return Err(format!("unknown unit {other:?} (use KiB, MiB or GiB)")),
    };
    let bytes = number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text} is too large"))?;
    check_stream_buffer(bytes).map_err(|err| err.to_string())?;
    Ok(bytes)
}

/// Parses a count of at least one.
fn parse_count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(err) => Err(err.to_string()),
    }
}

/// Tells the person who just started the agent where the new token is and how clients use
/// it: on this host, and on another machine (where neither this file's path nor a loopback
/// address means anything).
fn print_token_hint(path: &Path, listening: SocketAddr) {
    let port = listening.port();
    let elsewhere = if listening.ip().is_loopback() {
        format!(
            "it listens on loopback only: reach it through a tunnel, e.g. \
             `ssh -N -L {port}:127.0.0.1:{port} THIS_HOST`, then use `--server 127.0.0.1:{port}`"
        )
    } else if listening.ip().is_unspecified() {
        format!("use `--server THIS_HOST:{port}`")
    } else {
        format!("use `--server {listening}`")
    };
    let here = if Token::default_path().as_deref() == Some(path) {
        "Clients run by you on this host find it there by default.".to_owned()
    } else {
        format!(
            "Clients on this host need `--token-file {}` (or IMMORTAL_TOKEN=$(cat {})).",
            path.display(),
            path.display()
        )
    };
    eprintln!(
        "immortal: generated a new token in {} (readable only by you).\n\
         {here}\n\
         On another machine, copy it into that machine's default token file \
         (~/.config/immortal/token, mode 600) or pass it as IMMORTAL_TOKEN, and {elsewhere}.\n\
         Anyone with the token has full access to this agent's streams: keep it like an ssh key.",
        path.display()
    );
}

/// Raises the open-file soft limit to the hard limit (a shell's default of 1024 is far below
/// what thousands of streams need), and lowers the agent's caps to fit if even the hard limit
/// is too low: a stream takes two descriptors (its client's connection and the local
/// service's), a connection one.
fn fit_open_files(config: &mut AgentConfig) {
    #[cfg(unix)]
    {
        let Some(limit) = super::common::raise_open_file_limit() else {
            return;
        };
        // Descriptors for everything else: the listener, the runtime, logs, the token file.
        const RESERVED: u64 = 64;
        let limit = usize::try_from(limit.saturating_sub(RESERVED)).unwrap_or(usize::MAX);
        let needed = config.max_connections.saturating_add(config.max_streams);
        if needed > limit {
            // Keep the proportion: every stream's client needs a connection, plus some room.
            let streams = (limit / 2).max(1).min(config.max_streams);
            let connections = limit.saturating_sub(streams).max(1);
            tracing::warn!(
                "the open-file limit allows about {limit} descriptors: serving at most {streams} \
                 streams and {connections} connections (raise the hard limit, `ulimit -Hn`, for more)"
            );
            config.max_streams = streams;
            config.max_connections = connections.min(config.max_connections);
        }
    }
}

/// A bind failure as one line that says what to do.
fn bind_error(listen: SocketAddr, err: &io::Error) -> CliError {
    if let Some(config) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<crate::server::ConfigError>())
    {
        return CliError::Other(config.to_string());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units_within_the_bounds() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("65536"), Ok(65536));
        for bad in ["63KiB", "2GiB", "4MB", "MiB", "-1", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad} was accepted");
        }
    }
}
