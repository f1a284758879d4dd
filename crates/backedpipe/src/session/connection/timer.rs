//! The connection's timers: one table, one next deadline (as quinn's `TimerTable`).

use std::time::Instant;

/// A timer of the session [`Connection`](super::Connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Acknowledge delivered bytes that have waited long enough.
    AckDelay = 0,
    /// Probe a path that has been quiet in our direction.
    Heartbeat = 1,
    /// Declare the path dead: nothing heard from the peer for too long.
    Idle = 2,
    /// Give up on a CLOSE that the transport will not take, and end anyway.
    Linger = 3,
    /// Forget a session left without a path for its time to live (server side).
    Expiry = 4,
}

impl Timer {
    const ALL: [Timer; 5] = [
        Timer::AckDelay,
        Timer::Heartbeat,
        Timer::Idle,
        Timer::Linger,
        Timer::Expiry,
    ];
}

/// Deadlines of every [`Timer`]; the outside world sees only the earliest.
#[derive(Debug, Clone, Default)]
pub(crate) struct TimerTable {
    deadlines: [Option<Instant>; Timer::ALL.len()],
}

impl TimerTable {
    /// Arms `timer` for `at`, replacing any earlier setting.
    pub(crate) fn set(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer as usize] = Some(at);
    }

    /// Disarms `timer`.
    pub(crate) fn stop(&mut self, timer: Timer) {
        self.deadlines[timer as usize] = None;
    }

    /// The deadline of `timer`, if armed.
    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.deadlines[timer as usize]
    }

    /// Disarms and returns the first timer (in table order) whose deadline is at or before
    /// `now`.
    pub(crate) fn take_expired(&mut self, now: Instant) -> Option<Timer> {
        let timer = Timer::ALL
            .into_iter()
            .find(|t| self.get(*t).is_some_and(|at| at <= now))?;
        self.stop(timer);
        Some(timer)
    }

    /// The earliest armed deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }
}
