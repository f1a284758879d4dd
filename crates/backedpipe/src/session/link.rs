//! What the connections of one session share: the way back to the session's pipe, and the
//! connection in use (to close it gracefully).

use std::io;
use std::sync::{Mutex, OnceLock, PoisonError, Weak};

use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::pipe::PipeHooks;

/// The session-wide state every [`SessionConn`](super::SessionConn) of a session holds.
///
/// The pipe is created after its first connection can be (its reconnector makes them), so the
/// pipe is attached here once it exists; until then there is nothing to acknowledge to.
#[derive(Default)]
pub(crate) struct SessionLink {
    pipe: OnceLock<Weak<dyn PipeHooks>>,
    /// The `finished` token of the connection now carrying the session.
    current: Mutex<Option<CancellationToken>>,
}

impl std::fmt::Debug for SessionLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLink").finish_non_exhaustive()
    }
}

impl SessionLink {
    /// Connects the link to its pipe (once).
    pub(crate) fn attach_pipe(&self, hooks: Weak<dyn PipeHooks>) {
        let _ = self.pipe.set(hooks);
    }

    /// Remembers the connection now carrying the session, by its `finished` token.
    pub(crate) fn set_current(&self, finished: CancellationToken) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(finished);
    }

    /// The `finished` token of the current connection.
    pub(crate) fn current_finished(&self) -> Option<CancellationToken> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the pipe is closed or gone: a connection it drops must then send CLOSE.
    pub(crate) fn pipe_closed(&self) -> bool {
        self.pipe
            .get()
            .and_then(Weak::upgrade)
            .is_none_or(|pipe| pipe.is_closed())
    }

    /// Checks a resumed peer's offset against what the pipe's writer holds (nothing to check
    /// before the pipe exists: a new session starts at 0). A peer claiming bytes never sent is
    /// [`Error::InvalidSequenceNumber`], as the pipe itself would say.
    pub(crate) fn check_replay_from(&self, seq: u64) -> Result<(), Error> {
        let Some(pipe) = self.pipe.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        pipe.check_replay_from(seq).map_err(|err| match err {
            Error::FutureSequence { requested, written } => Error::InvalidSequenceNumber {
                remote: requested,
                local: written,
            },
            other => other,
        })
    }

    pub(crate) fn acknowledge(&self, seq: u64) {
        if let Some(pipe) = self.pipe.get().and_then(Weak::upgrade) {
            if let Err(err) = pipe.acknowledge(seq) {
                // The connection checked the ack against what it sent; this is a bug, not a lie.
                tracing::error!(error = %err, seq, "acknowledgement rejected by the writer");
            }
        }
    }

    pub(crate) fn transport_lost(&self, err: io::Error) {
        if let Some(pipe) = self.pipe.get().and_then(Weak::upgrade) {
            pipe.transport_lost(err);
        }
    }
}
