//! Failure reports from a reader or writer to whoever manages their connection.

use std::fmt;
use std::io;

/// Which half of a pipe saw a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    /// The [`BackedReader`](crate::BackedReader).
    Reader,
    /// The [`BackedWriter`](crate::BackedWriter).
    Writer,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Component::Reader => "reader",
            Component::Writer => "writer",
        })
    }
}

/// A transport failure seen by a reader or writer, tagged with the connection generation it
/// belongs to so that failures of an old connection can be told apart and ignored.
///
/// Readers and writers send at most one event per generation (after a failure they are
/// disconnected until a new connection arrives), so the unbounded channel carrying them stays
/// small and never drops the current generation's failure (the Go channel could).
#[derive(Debug)]
pub struct ErrorEvent {
    /// The transport's error, with its original message. End-of-stream from a transport is
    /// reported as [`io::ErrorKind::UnexpectedEof`].
    pub err: io::Error,
    /// Which half saw it.
    pub component: Component,
    /// The connection generation current when it happened.
    pub generation: u64,
}

impl fmt::Display for ErrorEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} error (generation {}): {}",
            self.component, self.generation, self.err
        )
    }
}

/// Where readers and writers send their [`ErrorEvent`]s.
pub type EventSender = tokio::sync::mpsc::UnboundedSender<ErrorEvent>;
