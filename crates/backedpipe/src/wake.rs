//! A fan-out waker: one waker handed to a transport that wakes every task waiting on it.
//!
//! Several tasks may wait on one half of a transport (concurrent writes, a write racing a
//! replay), but a transport keeps only the last waker it was polled with. Every poll of a
//! transport therefore goes through [`WaitList::context`], whose waker wakes all registered
//! tasks; state changes (attach, detach, close) call [`WaitList::wake_all`] too.

use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Wake, Waker};

/// Tasks waiting for a transport or a state change.
#[derive(Debug, Default)]
pub(crate) struct WaitList {
    waiters: Mutex<Vec<Waker>>,
}

impl WaitList {
    /// Returns the shared list and the waker that wakes everything on it.
    pub(crate) fn new() -> (Arc<Self>, Waker) {
        let list = Arc::new(WaitList::default());
        let waker = Waker::from(list.clone());
        (list, waker)
    }

    /// Registers the task behind `waker` to be woken at the next [`wake_all`](Self::wake_all).
    /// Must be called *before* polling the transport, so a wake-up cannot slip in between.
    pub(crate) fn register(&self, waker: &Waker) {
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
    }

    /// Wakes and forgets every registered task.
    pub(crate) fn wake_all(&self) {
        let waiters =
            std::mem::take(&mut *self.waiters.lock().unwrap_or_else(PoisonError::into_inner));
        for waker in waiters {
            waker.wake();
        }
    }

    /// Registers `cx`'s task and returns a context carrying the fan-out waker.
    pub(crate) fn context<'a>(&self, cx: &Context<'_>, fanout: &'a Waker) -> Context<'a> {
        self.register(cx.waker());
        Context::from_waker(fanout)
    }
}

impl Wake for WaitList {
    fn wake(self: Arc<Self>) {
        self.wake_all();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_all();
    }
}
