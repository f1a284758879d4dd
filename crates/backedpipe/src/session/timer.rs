//! The session's timers: one table, one next deadline.

use std::time::Instant;

/// A timer of the session core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Acknowledge delivered bytes that have waited long enough.
    AckDelay = 0,
    /// Probe a path that has been quiet in our direction.
    Heartbeat = 1,
    /// Declare the path dead: nothing heard from the peer for too long.
    Idle = 2,
}

impl Timer {
    const ALL: [Timer; 3] = [Timer::AckDelay, Timer::Heartbeat, Timer::Idle];
}

/// Deadlines of every [`Timer`]; the outside world sees only the earliest.
#[derive(Debug, Clone, Default)]
pub struct TimerTable {
    deadlines: [Option<Instant>; 3],
}

impl TimerTable {
    /// Arms `timer` for `at`, replacing any earlier setting.
    pub fn set(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer as usize] = Some(at);
    }

    /// Disarms `timer`.
    pub fn stop(&mut self, timer: Timer) {
        self.deadlines[timer as usize] = None;
    }

    /// The deadline of `timer`, if armed.
    pub fn get(&self, timer: Timer) -> Option<Instant> {
        self.deadlines[timer as usize]
    }

    /// Disarms and returns every timer whose deadline is at or before `now`, in table order.
    pub fn take_expired(&mut self, now: Instant) -> impl Iterator<Item = Timer> {
        let mut expired = Vec::new();
        for timer in Timer::ALL {
            if self.get(timer).is_some_and(|at| at <= now) {
                self.stop(timer);
                expired.push(timer);
            }
        }
        expired.into_iter()
    }

    /// The earliest armed deadline.
    pub fn next(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }
}
