//! Where a session stands, as one enum: open, each direction's FIN, closing, closed, failed.

use crate::error::Error;

/// The session's lifecycle. Every transition goes through a method here, so a reader finds
/// each rule once.
///
/// FIN is sent once per path (again after a resume, since the peer may have missed it) and
/// ends our direction for good; the peer's FIN ends its direction once every byte before it
/// has been read. CLOSE ends both: ours leaves at the next frame boundary, after no more
/// data (see [`Connection::close`](super::Connection::close); a session's `close` first
/// waits for the peer to acknowledge what was written); the peer's ends writes at once and
/// reads once the bytes received before it have been read.
#[derive(Debug, Clone)]
pub(crate) enum Lifecycle {
    /// Both directions open.
    Open,
    /// We shut our direction down: FIN follows the data.
    FinSent,
    /// The peer shut its direction down.
    FinReceived,
    /// Both directions are shut down; the session stays until one side closes it.
    FinBoth,
    /// A CLOSE is queued, on the current path or the next (the linger timer bounds how long
    /// it may take to leave).
    /// `reason` is what reads and writes report meanwhile.
    Closing { fin_received: bool, reason: Error },
    /// Closed locally: reads end, writes fail with [`Error::PipeClosed`].
    Closed,
    /// Ended for another reason: the peer closed it, it broke the protocol, it expired, ...
    Failed { fin_received: bool, error: Error },
}

impl Lifecycle {
    /// Whether the peer's FIN arrived.
    pub(crate) fn fin_received(&self) -> bool {
        match self {
            Lifecycle::FinReceived | Lifecycle::FinBoth => true,
            Lifecycle::Closing { fin_received, .. } | Lifecycle::Failed { fin_received, .. } => {
                *fin_received
            }
            Lifecycle::Open | Lifecycle::FinSent | Lifecycle::Closed => false,
        }
    }

    /// Whether we shut our direction down (FIN follows the data on every path).
    pub(crate) fn fin_sent(&self) -> bool {
        matches!(self, Lifecycle::FinSent | Lifecycle::FinBoth)
    }

    /// Whether the session carries stream bytes (open, or half closed).
    pub(crate) fn is_live(&self) -> bool {
        matches!(
            self,
            Lifecycle::Open | Lifecycle::FinSent | Lifecycle::FinReceived | Lifecycle::FinBoth
        )
    }

    /// Whether nothing will ever happen again.
    pub(crate) fn is_ended(&self) -> bool {
        matches!(self, Lifecycle::Closed | Lifecycle::Failed { .. })
    }

    /// Whether we closed it ourselves (reads then end quietly).
    pub(crate) fn closed_locally(&self) -> bool {
        match self {
            Lifecycle::Closed => true,
            Lifecycle::Closing { reason, .. } => matches!(reason, Error::PipeClosed),
            _ => false,
        }
    }

    /// The error a write gets, if writing is over.
    pub(crate) fn write_error(&self) -> Option<Error> {
        match self {
            Lifecycle::Open | Lifecycle::FinReceived => None,
            Lifecycle::FinSent | Lifecycle::FinBoth => Some(Error::WriteAfterShutdown),
            Lifecycle::Closing { reason, .. } => Some(reason.clone()),
            Lifecycle::Closed => Some(Error::PipeClosed),
            Lifecycle::Failed { error, .. } => Some(error.clone()),
        }
    }

    /// The error a read gets once the bytes received have been read (and the end of stream,
    /// if FIN came): `None` while reads may still get bytes.
    pub(crate) fn read_error(&self) -> Option<Error> {
        match self {
            Lifecycle::Closing { reason, .. } => Some(reason.clone()),
            Lifecycle::Failed { error, .. } => Some(error.clone()),
            _ => None,
        }
    }

    /// Our direction is shut down. Idempotent.
    pub(crate) fn shut_down(&mut self) {
        *self = match self {
            Lifecycle::Open => Lifecycle::FinSent,
            Lifecycle::FinReceived => Lifecycle::FinBoth,
            _ => return,
        };
    }

    /// The peer's FIN arrived.
    pub(crate) fn peer_finished(&mut self) {
        *self = match self {
            Lifecycle::Open => Lifecycle::FinReceived,
            Lifecycle::FinSent => Lifecycle::FinBoth,
            _ => return,
        };
    }

    /// A CLOSE is queued, for `reason`.
    pub(crate) fn closing(&mut self, reason: Error) {
        let fin_received = self.fin_received();
        *self = Lifecycle::Closing {
            fin_received,
            reason,
        };
    }

    /// The end: closed locally if that was the reason, else failed with `error`.
    pub(crate) fn end(&mut self, error: Error) {
        let fin_received = self.fin_received();
        *self = match error {
            Error::PipeClosed => Lifecycle::Closed,
            error => Lifecycle::Failed {
                fin_received,
                error,
            },
        };
    }

    /// A queued CLOSE has left (or given up on): the connection ends with its reason.
    pub(crate) fn closed(&mut self) {
        if let Lifecycle::Closing { reason, .. } = self {
            let reason = reason.clone();
            self.end(reason);
        }
    }
}
