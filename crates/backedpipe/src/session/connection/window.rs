//! The sender's in-flight window in session mode: how many unacknowledged bytes the writer
//! lets out at once, below the replay buffer's capacity.
//!
//! Every unacknowledged byte sits in the replay buffer, so the buffer's write position is as
//! far behind its oldest byte as there are bytes in flight. On loopback or a LAN the socket
//! buffers alone take several MiB, which pushes every copy into the buffer out of the CPU's
//! caches, while the path needs only a few hundred KiB in flight to run at full speed. On a
//! long fat network the same several MiB may be what the path needs.
//!
//! So the window follows what the path needs, as BBR sizes its congestion window: a gain times
//! the delivery rate times the path's minimum round trip, never less than a floor. Both are
//! measured from acknowledgements. Two traps, and how they are avoided:
//! - A round trip measured while the window is full includes the queue the window itself built
//!   (on loopback it is nothing but that queue), so a window sized from it would feed on itself
//!   and grow without bound. The minimum round trip is therefore re-measured every
//!   [`MIN_RTT_EXPIRY`] with at most [`PROBE_INFLIGHT`] bytes in flight (BBR's ProbeRTT), which
//!   costs about two round trips of reduced sending (draining, then one sample) every ten
//!   seconds.
//! - A window too large costs only cache misses; one too small caps a long fat network's
//!   throughput. So where an estimate is unsure it errs large: the rate is a windowed maximum,
//!   a round trip includes the peer's acknowledgement delay, the floor covers four of the
//!   peer's acknowledgement intervals, and a new transport starts afresh at 1 MiB. What
//!   it cannot see is a path whose round trip grew without a reconnect: the window lags it by
//!   up to [`MIN_RTT_EXPIRY`].
//!
//! Writes wait once the window is full, so a session buffers less in flight than before on
//! short paths (a few hundred KiB rather than whatever the socket buffers take): an application that
//! writes a few MiB in both directions before reading either deadlocks sooner, as it would
//! over plain TCP with smaller socket buffers.
//!
//! It is sans-IO: it takes sequence numbers and `Instant`s.

use std::time::{Duration, Instant};

/// The smallest window: four of the default acknowledgement intervals, so a path with nothing
/// measured yet never waits on a single acknowledgement, and far above TCP's own initial window,
/// so a fresh path is held back by TCP's slow start rather than by this. (On loopback, floors
/// of 128-384 KiB measured alike and better than 1 MiB: the window then follows the measured
/// product, about 300 KiB.)
pub(crate) const FLOOR: u64 = 256 * 1024;

/// The window until a round trip and a rate are measured: a path of unknown length starts as
/// the unchanged session did in its first round trip, with more than TCP's slow start can use.
/// On loopback the measurements arrive within a millisecond.
const INITIAL: u64 = 1024 * 1024;

/// The window is this many times the delivery rate times the minimum round trip. BBR's two
/// covers the path and as much again; the rate measured here lags a round trip behind a path
/// that is still speeding up, and a third keeps the window ahead of TCP's own slow start (with
/// two, an emulated 100 ms path took a round trip or two longer to reach full speed). On
/// loopback the product stays far below the floor either way.
const GAIN: f64 = 3.0;

/// How long a minimum round trip or a maximum rate stays valid before it is measured afresh.
const MIN_RTT_EXPIRY: Duration = Duration::from_secs(10);

/// In-flight bytes while re-measuring the round trip: two of the default acknowledgement
/// intervals, so the peer acknowledges at once rather than after its acknowledgement delay.
const PROBE_INFLIGHT: u64 = 128 * 1024;

/// Rates are measured over at least this long (acknowledgements come in bursts).
const RATE_INTERVAL_MIN: Duration = Duration::from_millis(10);

/// The peer's acknowledgement interval is taken as the smallest step between acknowledgements
/// over this many of them. The sender may apply several of the peer's acknowledgements at once
/// (only the latest counts), which makes single steps look larger than the peer's interval;
/// the smallest over a run of them is the interval itself while data flows.
const ACK_STEP_RUN: u32 = 32;

/// The in-flight window of one path (see the module docs).
#[derive(Debug)]
pub(crate) struct InflightWindow {
    /// The round-trip sample in progress: the stream offset it waits to see acknowledged, and
    /// when the byte before it was sent.
    timing: Option<(u64, Instant)>,
    /// The smallest round trip seen, and when.
    min_rtt: Option<(Duration, Instant)>,
    /// Re-measuring the minimum round trip with little in flight.
    probing: bool,
    /// Where the current rate interval started: bytes acknowledged, and when.
    rate_mark: Option<(u64, Instant)>,
    /// The highest delivery rate seen (bytes per second), and when.
    max_rate: Option<(f64, Instant)>,
    /// The peer's acknowledgement interval: the smallest step between two acknowledgements
    /// over the latest complete run of [`ACK_STEP_RUN`] (until one completes, the interval
    /// the window was created with).
    ack_step: u64,
    /// The smallest step in the run in progress, and its length.
    run_min: u64,
    run_len: u32,
}

impl InflightWindow {
    /// A window for a new path whose peer acknowledges about every `ack_interval` bytes (what a previous path of the session
    /// measured, else the local setting, which a peer normally shares): the floor covers four
    /// of them from the start, so a peer that acknowledges rarely is never left waiting for
    /// its acknowledgement delay.
    pub(crate) fn new(ack_interval: u64) -> Self {
        InflightWindow {
            timing: None,
            min_rtt: None,
            probing: false,
            rate_mark: None,
            max_rate: None,
            ack_step: ack_interval,
            run_min: u64::MAX,
            run_len: 0,
        }
    }

    /// The peer's acknowledgement interval as last measured (or as given to [`new`](Self::new)),
    /// for the next path's window.
    pub(crate) fn ack_interval(&self) -> u64 {
        self.ack_step
    }

    /// The most bytes that may be unacknowledged at `now` before writes wait.
    pub(crate) fn limit(&mut self, now: Instant) -> u64 {
        if !self.probing
            && self
                .min_rtt
                .is_some_and(|(_, at)| now.saturating_duration_since(at) >= MIN_RTT_EXPIRY)
        {
            // Re-measure: the sample in progress was taken with the full window in flight.
            self.probing = true;
            self.timing = None;
        }
        let floor = FLOOR.max(4 * self.ack_step);
        if self.probing {
            return PROBE_INFLIGHT.max(2 * self.ack_step);
        }
        let (Some((rtt, _)), Some((rate, _))) = (self.min_rtt, self.max_rate) else {
            return floor.max(INITIAL);
        };
        let bdp = GAIN * rate * rtt.as_secs_f64();
        floor.max(bdp.min(u64::MAX as f64 / 2.0) as u64)
    }

    /// Bytes up to `end_seq` were handed to the transport, in a write that started at `now`
    /// (taken before the write: a sender preempted after it would otherwise time a round trip
    /// that was partly over before the clock was read), while the peer had acknowledged `acked`.
    pub(crate) fn on_sent(&mut self, now: Instant, end_seq: u64, acked: u64) {
        if self.timing.is_none() && end_seq > acked {
            self.timing = Some((end_seq, now));
        }
    }

    /// The peer acknowledged every byte before `seq`, having acknowledged `acked` before
    /// (the caller checks that `seq` is no more than was sent).
    pub(crate) fn on_ack(&mut self, now: Instant, acked: u64, seq: u64) {
        if seq <= acked {
            return;
        }
        self.run_min = self.run_min.min(seq - acked);
        self.run_len += 1;
        if self.run_len == ACK_STEP_RUN {
            self.ack_step = self.run_min;
            self.run_min = u64::MAX;
            self.run_len = 0;
        }
        if let Some((want, sent_at)) = self.timing {
            if seq >= want {
                self.timing = None;
                let rtt = now.saturating_duration_since(sent_at);
                let replace = self.probing
                    || match self.min_rtt {
                        None => true,
                        Some((min, at)) => {
                            rtt <= min || now.saturating_duration_since(at) >= MIN_RTT_EXPIRY
                        }
                    };
                if replace {
                    self.min_rtt = Some((rtt, now));
                }
                self.probing = false;
            }
        }
        match self.rate_mark {
            None => self.rate_mark = Some((seq, now)),
            Some((from, since)) => {
                let interval = now.saturating_duration_since(since);
                let long_enough =
                    RATE_INTERVAL_MIN.max(self.min_rtt.map_or(Duration::ZERO, |m| m.0));
                if interval >= long_enough {
                    let rate = (seq - from) as f64 / interval.as_secs_f64();
                    let replace = match self.max_rate {
                        None => true,
                        Some((max, at)) => {
                            rate >= max || now.saturating_duration_since(at) >= MIN_RTT_EXPIRY
                        }
                    };
                    if replace {
                        self.max_rate = Some((rate, now));
                    }
                    self.rate_mark = Some((seq, now));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A path delivering `rate` bytes per ms with a round trip of `rtt`, the sender keeping the
    /// window full: returns the window after `rounds` round trips.
    fn steady(rate_per_ms: u64, rtt: Duration, rounds: u32) -> u64 {
        let start = Instant::now();
        let mut w = InflightWindow::new(0);
        let mut now = start;
        let mut sent = 0u64;
        let mut acked = 0u64;
        let step = Duration::from_micros(10);
        let mut in_flight: std::collections::VecDeque<(u64, Instant)> = Default::default();
        let end = start + rtt * rounds;
        while now < end {
            // Send while the window allows, at most the path's rate.
            let limit = w.limit(now);
            let budget = rate_per_ms * step.as_micros() as u64 / 1000;
            let mut room = limit.saturating_sub(sent - acked).min(budget);
            while room > 0 {
                let n = room.min(64 * 1024);
                sent += n;
                room -= n;
                w.on_sent(now, sent, acked);
                in_flight.push_back((sent, now));
            }
            now += step;
            while let Some(&(seq, at)) = in_flight.front() {
                if now.duration_since(at) < rtt {
                    break;
                }
                in_flight.pop_front();
                w.on_ack(now, acked, seq);
                acked = seq;
            }
        }
        w.limit(now)
    }

    #[test]
    fn starts_at_the_initial_window() {
        let mut w = InflightWindow::new(0);
        assert_eq!(w.limit(Instant::now()), INITIAL);
    }

    #[test]
    fn a_fast_short_path_keeps_little_in_flight() {
        // 2.5 GB/s with a 50 us round trip: 125 KB in flight is all it needs.
        let limit = steady(2_500_000, Duration::from_micros(50), 20_000);
        assert!(limit <= 3 * 125_000 * 12 / 10, "window {limit}");
    }

    #[test]
    fn a_long_fat_path_gets_three_times_its_bandwidth_delay_product() {
        // 100 MB/s, 100 ms: 10 MB in flight needed.
        let limit = steady(100_000, 100 * MS, 50);
        let bdp = 100_000 * 100;
        assert!(
            limit >= 3 * bdp * 9 / 10,
            "window {limit} for a {bdp}-byte path"
        );
        assert!(
            limit <= 3 * bdp * 12 / 10,
            "window {limit} for a {bdp}-byte path"
        );
    }

    #[test]
    fn a_peer_known_to_acknowledge_rarely_is_covered_from_the_first_byte() {
        // The peer acknowledges every 4 MiB (its setting, or what an earlier path measured):
        // the window must hold four of those before any measurement, or the peer would only
        // acknowledge after its acknowledgement delay.
        let mut w = InflightWindow::new(4 << 20);
        assert_eq!(w.limit(Instant::now()), 16 << 20);
        assert_eq!(w.ack_interval(), 4 << 20);
    }

    #[test]
    fn a_large_acknowledgement_interval_raises_the_floor() {
        let start = Instant::now();
        let mut w = InflightWindow::new(0);
        w.on_sent(start, 64 << 20, 0);
        let mut acked = 0;
        for i in 1..=ACK_STEP_RUN as u64 {
            // Every step at least 1 MiB, some of them several acknowledgements at once.
            w.on_ack(start + MS, acked, (i * i) << 20);
            acked = (i * i) << 20;
        }
        assert_eq!(w.limit(start + MS), 4 << 20);
    }

    #[test]
    fn the_minimum_round_trip_is_re_measured_with_little_in_flight() {
        let start = Instant::now();
        let mut w = InflightWindow::new(0);
        w.on_sent(start, 64 * 1024, 0);
        w.on_ack(start + MS, 0, 64 * 1024);
        // A rate: 128 KiB in 20 ms.
        w.on_sent(start + MS, 192 * 1024, 64 * 1024);
        w.on_ack(start + 21 * MS, 64 * 1024, 192 * 1024);
        assert_eq!(w.limit(start + 21 * MS), FLOOR);
        let later = start + MIN_RTT_EXPIRY + MS;
        assert_eq!(w.limit(later), PROBE_INFLIGHT);
        w.on_sent(later, 320 * 1024, 192 * 1024);
        w.on_ack(later + 2 * MS, 192 * 1024, 320 * 1024);
        assert_eq!(w.limit(later + 2 * MS), FLOOR);
        assert_eq!(w.min_rtt.map(|m| m.0), Some(2 * MS));
    }
}
