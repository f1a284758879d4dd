//! `immortal forward`: a local listener whose every connection is its own immortal stream.

use clap::Args;

use super::common::ClientArgs;
use super::CliError;

/// Forward a local port to a port on the agent's host, each connection an immortal stream.
///
/// Example: immortal forward --server db.example:7400 127.0.0.1:5432:5432
#[derive(Debug, Clone, Args)]
pub struct ForwardArgs {
    /// Where the agent is and how to reach it.
    #[command(flatten)]
    pub client: ClientArgs,
    /// LOCAL_ADDR:TARGET_PORT, e.g. 127.0.0.1:8080:80.
    pub spec: String,
}

/// Runs until interrupted.
pub async fn run(args: ForwardArgs) -> Result<(), CliError> {
    let _ = args;
    Err(CliError::Other("forward: not built yet".into()))
}
