//! `immortal rm`: deletes a stream.

use clap::Args;

use super::common::ClientArgs;
use super::CliError;

/// Delete a stream (its client gets end-of-stream... or an error if it was mid-transfer).
///
/// Example: immortal rm 3f2a...
#[derive(Debug, Clone, Args)]
pub struct RmArgs {
    /// Where the agent is and how to reach it.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The stream's id (see `immortal ls`).
    pub id: String,
}

/// Deletes the stream.
pub async fn run(args: RmArgs) -> Result<(), CliError> {
    let _ = args;
    Err(CliError::Other("rm: not built yet".into()))
}
