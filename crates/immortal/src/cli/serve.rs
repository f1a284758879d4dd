//! `immortal serve`: runs the agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::CliError;

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
    /// File holding the token clients must present (generated if missing).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The most streams held at once; when full, the oldest disconnected stream is evicted.
    #[arg(long, default_value_t = 32)]
    pub max_streams: usize,
    /// How long a stream with no client attached is kept (e.g. 30s, 10m, 24h).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// TLS certificate chain (PEM); serves HTTPS with --tls-key.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Runs the agent until interrupted.
pub async fn run(args: ServeArgs) -> Result<(), CliError> {
    let _ = args;
    Err(CliError::Other("serve: not built yet".into()))
}
