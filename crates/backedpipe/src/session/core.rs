//! The session core: acknowledgements, heartbeats and liveness, as a deterministic state
//! machine. It takes events and `Instant`s and returns what to send and when to wake; it owns no
//! bytes of the stream and touches no socket or clock.
//!
//! Methods come in four kinds, as in quinn's `Connection`:
//! - getters (`&self`): [`delivered`](SessionCore::delivered), [`peer_acked`](SessionCore::peer_acked);
//! - inputs from the network or the clock: `handle_*`;
//! - inputs from the application: [`on_delivered`](SessionCore::on_delivered),
//!   [`on_transmit`](SessionCore::on_transmit), [`on_new_path`](SessionCore::on_new_path);
//! - outputs: [`poll_transmit`](SessionCore::poll_transmit), then
//!   [`poll_timeout`](SessionCore::poll_timeout), then [`poll_event`](SessionCore::poll_event).
//!
//! Every input carries `now`, and successive `now`s must not go backwards.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::timer::{Timer, TimerTable};

/// Timing and ack settings of a session.
///
/// | setting | default | why |
/// |---|---|---|
/// | `heartbeat_interval` | 5 s | probe an idle path this often (Eternal Terminal and Mosh use 3–5 s) |
/// | `dead_after` | 2 × heartbeat + 1 s | a path silent this long is dead; about two missed heartbeats |
/// | `ack_every` | 64 KiB | acknowledge at least this often while data flows, so the sender's buffer drains |
/// | `ack_delay` | 20 ms | and at most this long after a byte is delivered, so a trickle is acknowledged too |
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// How long our direction may stay quiet before a PING goes out.
    pub heartbeat_interval: Duration,
    /// How long the peer may stay silent before the path is declared dead.
    pub dead_after: Duration,
    /// Delivered bytes that trigger an immediate ACK.
    pub ack_every: u64,
    /// The longest an ACK waits after a delivery.
    pub ack_delay: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        let heartbeat_interval = Duration::from_secs(5);
        SessionConfig {
            heartbeat_interval,
            dead_after: heartbeat_interval * 2 + Duration::from_secs(1),
            ack_every: 64 * 1024,
            ack_delay: Duration::from_millis(20),
        }
    }
}

/// A control message the core wants sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transmit {
    /// Acknowledge this many delivered bytes (cumulative).
    Ack(u64),
    /// A heartbeat probe.
    Ping(u64),
    /// The answer to the peer's probe.
    Pong(u64),
}

/// Something the driver must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The peer has delivered this many of our bytes: trim the replay buffer to it.
    PeerAcked(u64),
    /// Nothing was heard from the peer for `dead_after`: drop the transport and reconnect.
    PathDead,
}

/// The peer broke the rules of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionViolation {
    /// The peer acknowledged bytes that were never sent.
    #[error("peer acknowledged {acked} bytes but only {sent} were sent")]
    AckBeyondSent {
        /// The acknowledged count.
        acked: u64,
        /// Bytes sent so far.
        sent: u64,
    },
    /// The peer's cumulative acknowledgement went backwards.
    #[error("peer acknowledgement went back from {previous} to {acked}")]
    AckWentBackwards {
        /// The acknowledged count.
        acked: u64,
        /// The previous acknowledgement.
        previous: u64,
    },
}

/// Acknowledgement, heartbeat and liveness logic of one session (both directions of one side).
///
/// ```
/// use std::time::{Duration, Instant};
/// use backedpipe::session::{Event, SessionConfig, SessionCore, Transmit};
///
/// let start = Instant::now();
/// let mut core = SessionCore::new(SessionConfig::default(), start);
/// core.on_delivered(start, 10); // the application read 10 bytes
/// assert_eq!(core.poll_transmit(), None); // a trickle waits for the ack delay
/// let wake = core.poll_timeout().unwrap();
/// core.handle_timeout(wake);
/// assert_eq!(core.poll_transmit(), Some(Transmit::Ack(10)));
///
/// // Silence from the peer for longer than `dead_after` kills the path.
/// core.handle_timeout(start + Duration::from_secs(12));
/// assert_eq!(core.poll_event(), Some(Event::PathDead));
/// ```
#[derive(Debug)]
pub struct SessionCore {
    config: SessionConfig,
    timers: TimerTable,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// Bytes of the peer's stream delivered to our application.
    delivered: u64,
    /// The last count we acknowledged.
    ack_sent: u64,
    /// The peer's latest acknowledgement of our stream.
    peer_acked: u64,
    next_ping: u64,
}

impl SessionCore {
    /// A core for a fresh path at `now`.
    pub fn new(config: SessionConfig, now: Instant) -> Self {
        let mut core = SessionCore {
            config,
            timers: TimerTable::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            delivered: 0,
            ack_sent: 0,
            peer_acked: 0,
            next_ping: 0,
        };
        core.on_new_path(now, 0, 0);
        core
    }

    /// Bytes of the peer's stream delivered to the application.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The peer's latest acknowledgement of our stream.
    pub fn peer_acked(&self) -> u64 {
        self.peer_acked
    }

    /// A new transport is attached. `delivered` and `peer_acked` are the offsets both sides
    /// agreed on in the handshake; the path counts as alive from `now`.
    pub fn on_new_path(&mut self, now: Instant, delivered: u64, peer_acked: u64) {
        self.delivered = delivered;
        self.ack_sent = delivered;
        self.peer_acked = self.peer_acked.max(peer_acked);
        self.transmits.clear();
        self.timers = TimerTable::default();
        self.timers
            .set(Timer::Heartbeat, now + self.config.heartbeat_interval);
        self.timers.set(Timer::Idle, now + self.config.dead_after);
    }

    /// The application consumed `n` more bytes of the peer's stream.
    pub fn on_delivered(&mut self, now: Instant, n: u64) {
        self.delivered += n;
        if self.delivered - self.ack_sent >= self.config.ack_every {
            self.queue_ack();
        } else if self.delivered > self.ack_sent && self.timers.get(Timer::AckDelay).is_none() {
            self.timers
                .set(Timer::AckDelay, now + self.config.ack_delay);
        }
    }

    /// Something (data or control) went out on the path: no heartbeat is needed for a while.
    pub fn on_transmit(&mut self, now: Instant) {
        self.timers
            .set(Timer::Heartbeat, now + self.config.heartbeat_interval);
    }

    /// Any frame arrived from the peer: the path is alive.
    pub fn handle_received(&mut self, now: Instant) {
        self.timers.set(Timer::Idle, now + self.config.dead_after);
    }

    /// The peer acknowledged `acked` bytes of our stream, of which `sent` have been sent.
    ///
    /// # Errors
    /// A [`SessionViolation`] if the acknowledgement is beyond what was sent or goes backwards;
    /// the driver closes the session with a protocol-violation code.
    pub fn handle_ack(
        &mut self,
        now: Instant,
        acked: u64,
        sent: u64,
    ) -> Result<(), SessionViolation> {
        self.handle_received(now);
        if acked > sent {
            return Err(SessionViolation::AckBeyondSent { acked, sent });
        }
        if acked < self.peer_acked {
            return Err(SessionViolation::AckWentBackwards {
                acked,
                previous: self.peer_acked,
            });
        }
        if acked > self.peer_acked {
            self.peer_acked = acked;
            self.events.push_back(Event::PeerAcked(acked));
        }
        Ok(())
    }

    /// The peer probed the path.
    pub fn handle_ping(&mut self, now: Instant, nonce: u64) {
        self.handle_received(now);
        self.transmits.push_back(Transmit::Pong(nonce));
    }

    /// Timers due at `now` fire.
    pub fn handle_timeout(&mut self, now: Instant) {
        for timer in self.timers.take_expired(now).collect::<Vec<_>>() {
            match timer {
                Timer::AckDelay => self.queue_ack(),
                Timer::Heartbeat => {
                    self.transmits.push_back(Transmit::Ping(self.next_ping));
                    self.next_ping = self.next_ping.wrapping_add(1);
                    self.timers
                        .set(Timer::Heartbeat, now + self.config.heartbeat_interval);
                }
                Timer::Idle => {
                    self.timers = TimerTable::default();
                    self.events.push_back(Event::PathDead);
                }
            }
        }
    }

    /// Acknowledges everything delivered now, without waiting for the ack delay: the last
    /// thing said before a CLOSE, so that the peer knows what arrived.
    pub fn flush_ack(&mut self) {
        self.queue_ack();
    }

    /// Whether a control message is waiting for [`poll_transmit`](Self::poll_transmit).
    pub fn has_transmit(&self) -> bool {
        !self.transmits.is_empty()
    }

    /// The next control message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn queue_ack(&mut self) {
        self.timers.stop(Timer::AckDelay);
        if self.delivered > self.ack_sent {
            self.ack_sent = self.delivered;
            self.transmits.push_back(Transmit::Ack(self.delivered));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core() -> (SessionCore, Instant) {
        let now = Instant::now();
        (SessionCore::new(SessionConfig::default(), now), now)
    }

    #[test]
    fn bulk_delivery_is_acknowledged_every_64_kib() {
        let (mut core, now) = core();
        core.on_delivered(now, 60 * 1024);
        assert_eq!(core.poll_transmit(), None);
        core.on_delivered(now, 4 * 1024);
        assert_eq!(core.poll_transmit(), Some(Transmit::Ack(64 * 1024)));
        assert_eq!(
            core.timers.get(Timer::AckDelay),
            None,
            "the delayed ack is cancelled"
        );
    }

    #[test]
    fn a_trickle_is_acknowledged_after_the_ack_delay() {
        let (mut core, now) = core();
        core.on_delivered(now, 1);
        core.on_delivered(now + Duration::from_millis(5), 1);
        assert_eq!(core.poll_timeout(), Some(now + Duration::from_millis(20)));
        core.handle_timeout(now + Duration::from_millis(20));
        assert_eq!(core.poll_transmit(), Some(Transmit::Ack(2)));
        core.handle_timeout(now + Duration::from_millis(40));
        assert_eq!(core.poll_transmit(), None, "nothing new, no second ack");
    }

    #[test]
    fn an_idle_path_is_probed_and_a_silent_one_declared_dead() {
        let (mut core, now) = core();
        core.handle_timeout(now + Duration::from_secs(5));
        assert_eq!(core.poll_transmit(), Some(Transmit::Ping(0)));
        // The pong keeps the path alive past the first dead line.
        core.handle_received(now + Duration::from_secs(6));
        core.handle_timeout(now + Duration::from_secs(11));
        assert_eq!(core.poll_event(), None);
        core.handle_timeout(now + Duration::from_secs(17));
        assert_eq!(core.poll_event(), Some(Event::PathDead));
        assert_eq!(core.poll_timeout(), None, "a dead path arms nothing");
    }

    #[test]
    fn sending_postpones_the_heartbeat() {
        let (mut core, now) = core();
        core.on_transmit(now + Duration::from_secs(4));
        core.handle_timeout(now + Duration::from_secs(5));
        assert_eq!(core.poll_transmit(), None);
        core.handle_timeout(now + Duration::from_secs(9));
        assert_eq!(core.poll_transmit(), Some(Transmit::Ping(0)));
    }

    #[test]
    fn a_flushed_ack_goes_out_at_once_and_only_when_there_is_news() {
        let (mut core, now) = core();
        core.flush_ack();
        assert_eq!(
            core.poll_transmit(),
            None,
            "nothing delivered, nothing to say"
        );
        core.on_delivered(now, 7);
        core.flush_ack();
        assert_eq!(core.poll_transmit(), Some(Transmit::Ack(7)));
        assert_eq!(core.timers.get(Timer::AckDelay), None);
    }

    #[test]
    fn pings_are_answered() {
        let (mut core, now) = core();
        core.handle_ping(now, 42);
        assert_eq!(core.poll_transmit(), Some(Transmit::Pong(42)));
    }

    #[test]
    fn acks_trim_and_lies_are_violations() {
        let (mut core, now) = core();
        core.handle_ack(now, 10, 100).unwrap();
        assert_eq!(core.poll_event(), Some(Event::PeerAcked(10)));
        core.handle_ack(now, 10, 100).unwrap();
        assert_eq!(core.poll_event(), None, "a repeated ack is not news");
        assert_eq!(
            core.handle_ack(now, 101, 100),
            Err(SessionViolation::AckBeyondSent {
                acked: 101,
                sent: 100
            })
        );
        assert_eq!(
            core.handle_ack(now, 5, 100),
            Err(SessionViolation::AckWentBackwards {
                acked: 5,
                previous: 10
            })
        );
    }

    #[test]
    fn a_new_path_restarts_the_clocks_from_the_agreed_offsets() {
        let (mut core, now) = core();
        core.handle_timeout(now + Duration::from_secs(12));
        assert_eq!(core.poll_event(), Some(Event::PathDead));
        let later = now + Duration::from_secs(20);
        core.on_new_path(later, 500, 300);
        assert_eq!((core.delivered(), core.peer_acked()), (500, 300));
        assert_eq!(core.poll_timeout(), Some(later + Duration::from_secs(5)));
    }
}
