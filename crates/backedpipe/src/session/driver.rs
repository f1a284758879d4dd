//! The session's driver: one task per session (not per transport) that does what the
//! application's reads and writes leave undone. It keeps one timer for the connection's next
//! deadline, writes what the transport would not take at once, reads while the application
//! does not (acknowledgements and pings must not wait behind unread data), and, on a client,
//! dials a new transport after a loss, with backoff. A server's driver waits for its client to
//! resume through the [`SessionServer`](crate::SessionServer).
//!
//! It only moves bytes and sleeps: every decision is the [`Connection`](super::Connection)'s.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

use super::client::{Dial, Resuming};
use super::server::ServerInner;
use super::shared::{now, Shared};
use crate::backoff::Backoff;
use crate::error::Error;

/// How many turns the driver takes in a row before it yields to other tasks.
const TURNS_PER_POLL: u32 = 16;

/// What a client's driver needs to resume.
pub(crate) struct Resumer {
    pub(crate) dial: Arc<dyn Dial>,
    pub(crate) backoff: Backoff,
    /// Failed attempts allowed in a row before the session fails (`None`: forever).
    pub(crate) max_attempts: Option<u32>,
}

/// A server's session table entry, forgotten when the session ends.
pub(crate) struct Registration {
    pub(crate) server: Weak<ServerInner>,
}

/// The task of one session; see the module docs.
#[must_use = "a session's driver does nothing unless spawned"]
pub(crate) struct Driver {
    shared: Arc<Shared>,
    resumer: Option<Resumer>,
    registration: Option<Registration>,
    /// A client's resume in flight.
    dial: Option<Resuming>,
    /// When a client may dial again.
    retry_at: Option<Instant>,
    /// Failed attempts in a row.
    failures: u32,
    /// A client's current path: when it started and how long its dial took (`None` on a
    /// server, and once its loss was seen).
    path_since: Option<(Instant, Duration)>,
    /// When the client's resume in flight started.
    dial_started: Instant,
    sleep: Pin<Box<Sleep>>,
    /// The deadline `sleep` is set to.
    armed: Option<Instant>,
    /// The driver left a read to the application's reader once; next time it reads itself.
    yielded: bool,
}

impl Driver {
    pub(crate) fn new(
        shared: Arc<Shared>,
        resumer: Option<Resumer>,
        registration: Option<Registration>,
    ) -> Driver {
        // A client starts with its first path.
        let path_since = resumer.as_ref().map(|_| (now(), Duration::ZERO));
        Driver {
            shared,
            resumer,
            registration,
            dial: None,
            retry_at: None,
            failures: 0,
            path_since,
            dial_started: now(),
            sleep: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
            armed: None,
            yielded: false,
        }
    }

    /// Runs the session until it ends.
    pub(crate) async fn run(mut self) {
        poll_fn(|cx| self.poll(cx)).await;
        self.shared.wakers().clear_driver();
        let id = self.shared.lock().conn.id();
        let expired = matches!(
            self.shared.lock().conn.error(),
            Some(Error::SessionExpired(_))
        );
        if let Some(server) = self.registration.and_then(|r| r.server.upgrade()) {
            server.forget(id, expired);
        }
        self.shared.finished.cancel();
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..TURNS_PER_POLL {
            self.poll_dial(cx);
            let reader_notified = self.shared.wakers().set_driver(cx.waker());
            let (progress, deadline, ended) = {
                let mut st = self.shared.lock();
                let now = now();
                // The application's reader was woken for these bytes and takes payloads
                // without a copy: let it go first, and read after it if it did not.
                let read = !reader_notified || self.yielded;
                self.yielded = !read;
                if read {
                    self.shared.wakers().clear_reader_notified();
                }
                let mut progress = self.shared.drive_io(&mut st, now, read);
                if !read {
                    cx.waker().wake_by_ref();
                }
                let ended = st.conn.is_ended();
                if !ended && !st.conn.has_path() && self.dial.is_none() {
                    if let Some(resumer) = self.resumer.as_mut() {
                        if let Some((since, dial)) = self.path_since.take() {
                            // The path just ended. One that proved itself (its peer sent a
                            // frame, or it outlived its own dial) is resumed at once; one
                            // that did not waits for the next backoff delay, so a server that
                            // drops every resumed transport at once gets no tight loop of
                            // handshakes.
                            let proven = st.conn.path_heard_from()
                                || now.saturating_duration_since(since) > dial;
                            if proven {
                                resumer.backoff.reset();
                            } else if !st.dial_now {
                                self.retry_at = Some(now + resumer.backoff.next_delay());
                            }
                        }
                        let due = st.dial_now || self.retry_at.is_none_or(|at| now >= at);
                        if due {
                            st.dialing = true;
                            st.dial_now = false;
                            self.retry_at = None;
                            self.dial_started = now;
                            self.dial = Some(Arc::clone(&resumer.dial).dial(self.shared.clone()));
                            progress = true;
                        }
                    }
                }
                let mut deadline = st.conn.poll_timeout();
                if self.dial.is_none() {
                    deadline = earliest(deadline, self.retry_at);
                }
                st.driver_deadline = deadline;
                let wakes = st.settle();
                drop(st);
                self.shared.wake(wakes);
                (progress, deadline, ended)
            };
            if ended {
                return Poll::Ready(());
            }
            if progress {
                continue;
            }
            let Some(deadline) = deadline else {
                return Poll::Pending;
            };
            if self.armed != Some(deadline) {
                self.sleep.as_mut().reset(deadline.into());
                self.armed = Some(deadline);
            }
            // Checked against the clock, not only the sleep: tokio's cooperative budget may
            // make a due sleep report pending.
            if now() < deadline && self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.armed = None;
        }
        // Plenty done: let other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Polls a client's resume in flight, and settles its outcome.
    fn poll_dial(&mut self, cx: &mut Context<'_>) {
        let Some(dial) = self.dial.as_mut() else {
            return;
        };
        let Poll::Ready(result) = dial.as_mut().poll(cx) else {
            return;
        };
        self.dial = None;
        let Some(resumer) = self.resumer.as_mut() else {
            return;
        };
        let failures = &mut self.failures;
        let retry_at = &mut self.retry_at;
        let path_since = &mut self.path_since;
        let dial_started = self.dial_started;
        self.shared.with(|st, now| {
            st.dialing = false;
            match result {
                Ok(()) => {
                    // The backoff starts again once the path proves itself (see above).
                    *failures = 0;
                    *path_since = Some((now, now.saturating_duration_since(dial_started)));
                }
                Err(Error::PipeClosed) if st.conn.is_closing() => {
                    // The session was closed while this resume was under way; the new
                    // transport carried the CLOSE.
                    st.conn.fail(now, Error::PipeClosed);
                }
                Err(err) if err.is_terminal() => {
                    tracing::info!(session = %st.conn.id(), error = %err, "the session cannot be resumed");
                    st.conn.fail(now, err);
                }
                Err(err) => {
                    *failures += 1;
                    if resumer.max_attempts.is_some_and(|max| *failures >= max) {
                        st.conn.fail(now, Error::reconnect_failed(err));
                        return;
                    }
                    let delay = resumer.backoff.next_delay();
                    tracing::debug!(session = %st.conn.id(), error = %err, ?delay, attempt = *failures, "resume failed; retrying");
                    *retry_at = Some(now + delay);
                }
            }
        });
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
