//! `immortal rm`: deletes a stream.

use clap::Args;

use super::common::ClientArgs;
use super::CliError;
use crate::client::ClientError;

/// Delete a stream (its client gets end-of-stream... or an error if it was mid-transfer).
///
/// Exits 4 if the agent has no stream with that id.
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
    let api = args.client.api_client()?;
    match api.delete(&args.id).await {
        Ok(()) => {
            println!("removed stream {}", args.id);
            Ok(())
        }
        Err(ClientError::NotFound(_)) => Err(CliError::StreamGone(format!(
            "no stream {} on the agent (never created, already removed, or expired)",
            args.id
        ))),
        Err(err) => Err(err.into()),
    }
}
