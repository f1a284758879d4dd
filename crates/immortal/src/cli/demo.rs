//! `immortal demo`: the whole thing in one process, with nothing set up.

use clap::Args;

use super::CliError;

/// Show it working: an agent, a local service and a client in one process, data pushed both
/// ways through a connection that is cut again and again, every byte checked.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// MiB to send each way.
    #[arg(long, default_value_t = 64)]
    pub mib: u64,
    /// How many times to cut the connection.
    #[arg(long, default_value_t = 10)]
    pub cuts: u32,
}

/// Runs the demo; fails unless every byte arrived exactly once.
pub async fn run(args: DemoArgs) -> Result<(), CliError> {
    let _ = args;
    Err(CliError::Other("demo: not built yet".into()))
}
