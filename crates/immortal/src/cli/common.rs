//! Options every client subcommand takes: where the agent is, how to authenticate, how to
//! reach it.

use std::path::PathBuf;

use clap::Args;

/// Where the agent is and how to talk to it.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The agent, as HOST:PORT.
    #[arg(long, env = "IMMORTAL_SERVER", default_value = "127.0.0.1:7400")]
    pub server: String,
    /// File holding the agent's token (default: the file `immortal serve` generates). The
    /// IMMORTAL_TOKEN environment variable, when set, takes precedence.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Use TLS, trusting the CA certificates in this PEM file.
    #[arg(long, value_name = "PATH", conflicts_with = "tls_pin")]
    pub tls_ca: Option<PathBuf>,
    /// Use TLS, trusting exactly the certificate in this PEM file (for a self-signed agent).
    #[arg(long, value_name = "PATH")]
    pub tls_pin: Option<PathBuf>,
    /// Carry the stream in WebSocket messages instead of a raw HTTP upgrade (for proxies that
    /// only pass WebSocket).
    #[arg(long)]
    pub websocket: bool,
}
