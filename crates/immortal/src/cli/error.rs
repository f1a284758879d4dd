//! What a subcommand can fail with, and the exit status each failure gives.

use std::process::ExitCode;

/// A subcommand's failure: one clear line for the user, and an exit status a script can test.
///
/// | status | meaning |
/// |---|---|
/// | 0 | success (for `connect`: the remote service closed the stream) |
/// | 1 | anything else ([`CliError::Other`]) |
/// | 2 | bad arguments (clap's own status) |
/// | 3 | the agent refused the token ([`CliError::Unauthorized`]) |
/// | 4 | the stream is unknown or expired ([`CliError::StreamGone`]) |
/// | 5 | the agent could not connect to the target port ([`CliError::DialFailed`]) |
/// | 6 | the agent is full ([`CliError::TooManyStreams`]) |
/// | 7 | the agent could not be reached ([`CliError::Unreachable`]) |
/// | 8 | `immortal agent`: another agent runs for this user ([`CliError::AgentRunning`]) |
/// | 130 | stopped by a signal ([`CliError::Stopped`]); SIGHUP ends `connect` with 0, silently (ssh sends it when the session is over) |
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The agent answered 401: the token is missing or wrong.
    #[error("the agent refused the token: {0}")]
    Unauthorized(String),
    /// The stream does not exist on the agent (never created, deleted, or expired).
    #[error("{0}")]
    StreamGone(String),
    /// The agent could not connect to the requested local port.
    #[error("{0}")]
    DialFailed(String),
    /// The agent holds its maximum of streams and all are in use.
    #[error("{0}")]
    TooManyStreams(String),
    /// The agent could not be reached at all.
    #[error("cannot reach the agent at {server}: {reason}")]
    Unreachable {
        /// The address tried.
        server: String,
        /// Why it failed.
        reason: String,
    },
    /// `immortal agent` found another agent of the same user running.
    #[error("{0}")]
    AgentRunning(String),
    /// The process was asked to stop (the signal's name).
    #[error("stopped by {0}")]
    Stopped(&'static str),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// The process exit status for this failure.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CliError::Other(_) => 1,
            CliError::Unauthorized(_) => 3,
            CliError::StreamGone(_) => 4,
            CliError::DialFailed(_) => 5,
            CliError::TooManyStreams(_) => 6,
            CliError::Unreachable { .. } => 7,
            CliError::AgentRunning(_) => 8,
            CliError::Stopped(_) => 130,
        })
    }
}
