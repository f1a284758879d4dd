//! The cap on client connections, and which connection gives way when it is reached.
//!
//! Every accepted connection takes a [`Ticket`] from the [`ConnectionGate`] and holds it for as
//! long as it is open, upgraded or not. A connection starts unauthenticated and becomes
//! authenticated when one of its requests presents the agent's token. At the cap, a new
//! connection is let in by closing the oldest unauthenticated one (strangers who connect and
//! say nothing, or say nothing valid, cannot crowd out the agent's own clients); when every
//! connection is authenticated, the new one is closed at once.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// Hands out connection slots, at most `max` at once.
#[derive(Debug)]
pub(crate) struct ConnectionGate {
    max: usize,
    metrics: Arc<Metrics>,
    inner: Mutex<GateInner>,
}

#[derive(Debug, Default)]
struct GateInner {
    next_id: u64,
    open: usize,
    /// The unauthenticated connections, oldest first (ids grow with time), and how to close
    /// each.
    unauthenticated: BTreeMap<u64, CancellationToken>,
}

/// One connection's slot: released when the last clone is dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    gate: Arc<ConnectionGate>,
    id: u64,
    close: CancellationToken,
}

impl ConnectionGate {
    /// A gate with room for `max` connections (at least one).
    pub(crate) fn new(max: usize, metrics: Arc<Metrics>) -> Arc<ConnectionGate> {
        Arc::new(ConnectionGate {
            max: max.max(1),
            metrics,
            inner: Mutex::new(GateInner::default()),
        })
    }

    /// A slot for a new connection, making room by closing the oldest unauthenticated
    /// connection if the gate is full; `None` (close the new connection) if every open one is
    /// authenticated. The ticket's [`closing`](Ticket::closing) token is a child of `parent`.
    pub(crate) fn admit(self: &Arc<Self>, parent: &CancellationToken) -> Option<Ticket> {
        let mut inner = self.inner();
        if inner.open >= self.max {
            Metrics::bump(&self.metrics.connections_shed);
            let (_, oldest) = inner.unauthenticated.pop_first()?;
            // Its task ends at once and drops its ticket; until then the count runs over by
            // one, which only this path can cause and only once per closed connection.
            oldest.cancel();
        }
        inner.open += 1;
        let id = inner.next_id;
        inner.next_id += 1;
        let close = parent.child_token();
        inner.unauthenticated.insert(id, close.clone());
        self.metrics.connections.fetch_add(1, Ordering::Relaxed);
        Some(Ticket {
            gate: self.clone(),
            id,
            close,
        })
    }

    /// Connections open now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.inner().open
    }

    fn inner(&self) -> MutexGuard<'_, GateInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Ticket {
    /// Marks the connection as authenticated: it is no longer closed to make room.
    pub(crate) fn authenticate(&self) {
        self.gate.inner().unauthenticated.remove(&self.id);
    }

    /// Cancelled when the gate closes this connection to make room for another (or when the
    /// parent given to [`ConnectionGate::admit`] is).
    pub(crate) fn closing(&self) -> &CancellationToken {
        &self.close
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self.gate.inner();
        inner.unauthenticated.remove(&self.id);
        inner.open -= 1;
        self.gate
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_unauthenticated_connection_gives_way() {
        let gate = ConnectionGate::new(3, Arc::new(Metrics::default()));
        let root = CancellationToken::new();
        let a = gate.admit(&root).unwrap();
        let b = gate.admit(&root).unwrap();
        let c = gate.admit(&root).unwrap();
        a.authenticate();
        // Full: `b`, the oldest stranger, is told to close; `a` has the token and stays.
        let d = gate.admit(&root).unwrap();
        assert!(b.close.is_cancelled());
        assert!(!a.close.is_cancelled() && !c.close.is_cancelled());
        drop(b);
        assert_eq!(gate.open(), 3);
        c.authenticate();
        d.authenticate();
        // Every connection has the token: the newcomer is the one refused.
        assert!(gate.admit(&root).is_none());
        assert_eq!(gate.open(), 3);
        drop((a, c, d));
        assert_eq!(gate.open(), 0);
        assert_eq!(gate.metrics.connections.load(Ordering::Relaxed), 0);
        assert_eq!(gate.metrics.connections_shed.load(Ordering::Relaxed), 2);
    }
}
