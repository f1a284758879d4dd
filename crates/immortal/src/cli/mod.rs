//! The subcommands of the `immortal` binary, one file each, and what they share: the error
//! type with its exit codes, logging, and the options every client subcommand takes.

pub mod agent;
pub mod common;
pub mod config_ssh;
pub mod connect;
pub mod demo;
mod error;
pub mod forward;
pub mod ls;
pub mod relay;
pub mod rm;
pub mod serve;
pub mod ssh;

pub use self::error::CliError;

/// Logs go to stderr (stdout may carry a stream's data), at the level `RUST_LOG` asks for
/// (default: warnings, and `info` from this program).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,immortal=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
