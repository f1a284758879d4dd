//! `immortal connect --stdio`: one stream on stdin/stdout, for ssh's ProxyCommand.

use clap::Args;

use super::common::ClientArgs;
use super::CliError;

/// Carry one immortal stream on stdin/stdout (for ssh's ProxyCommand).
///
/// Creates a stream to TARGET_PORT on the agent and copies stdin to it and it to stdout,
/// surviving network loss for as long as the stream lives. Status goes to stderr.
///
/// Example: ssh -o ProxyCommand='immortal connect --stdio --server %h:7400 %p' myhost
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Use stdin and stdout as the local end (the only mode; required for clarity).
    #[arg(long, required = true)]
    pub stdio: bool,
    /// Print no status lines.
    #[arg(long, short)]
    pub quiet: bool,
    /// Where the agent is and how to reach it.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The TCP port on the agent's host to connect to (22 for its sshd).
    pub target_port: u16,
}

/// Runs until the remote service closes the stream.
pub async fn run(args: ConnectArgs) -> Result<(), CliError> {
    let _ = args;
    Err(CliError::Other("connect: not built yet".into()))
}
