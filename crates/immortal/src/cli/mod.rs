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
mod status_line;

pub use self::error::CliError;

/// Logs go to stderr (stdout may carry a stream's data), at the level `RUST_LOG` asks for
/// (default: warnings, and `info` from this program), in colour only when stderr is a
/// terminal and `NO_COLOR` is not set.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,immortal=info"));
    let colour = use_colour(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .try_init();
}

/// Whether to colour stderr: only a terminal, and not when `NO_COLOR` is set to anything but
/// the empty string (<https://no-color.org>).
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(std::ffi::OsStr::new(""))));
        assert!(!use_colour(true, Some(std::ffi::OsStr::new("1"))));
        assert!(!use_colour(false, None));
    }
}
