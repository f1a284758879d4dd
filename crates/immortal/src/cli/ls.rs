//! `immortal ls`: lists the agent's streams.

use clap::Args;

use super::common::ClientArgs;
use super::CliError;

/// List the agent's streams.
///
/// Example: immortal ls --server myhost:7400 --json
#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    /// Where the agent is and how to reach it.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Prints the streams.
pub async fn run(args: LsArgs) -> Result<(), CliError> {
    let _ = args;
    Err(CliError::Other("ls: not built yet".into()))
}
