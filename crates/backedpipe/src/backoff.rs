//! Reconnect delays: exponential backoff with full jitter, seedable for reproducible tests.

use std::time::Duration;

/// Exponential backoff with full jitter: the n-th delay is drawn uniformly from
/// `[0, min(max, initial * 2^n)]`, which spreads a crowd of clients that lost the same server.
///
/// ```
/// use std::time::Duration;
/// use backedpipe::Backoff;
///
/// let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 7);
/// let first = backoff.next_delay();
/// assert!(first <= Duration::from_millis(100));
/// backoff.reset(); // after a successful reconnect
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: SplitMix64,
}

impl Backoff {
    /// Creates a backoff starting at `initial`, capped at `max`, with jitter drawn from a
    /// generator seeded with `seed` (the same seed gives the same delays).
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
            rng: SplitMix64(seed),
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.below_inclusive(nanos))
    }

    /// The number of delays handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts again from `initial` (after a successful reconnect).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A tiny, well-known generator (SplitMix64); jitter needs spread, not cryptographic quality.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below_inclusive(&mut self, bound: u64) -> u64 {
        match bound.checked_add(1) {
            Some(range) => self.next() % range,
            None => self.next(),
        }
    }
}

/// A seed that differs between processes and pipes, for when none is configured.
pub(crate) fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_an_exponential_ceiling_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 1);
        for n in 0..20u32 {
            let ceiling =
                (Duration::from_millis(100) * 2u32.saturating_pow(n)).min(Duration::from_secs(1));
            assert!(backoff.next_delay() <= ceiling);
        }
        backoff.reset();
        assert_eq!(backoff.attempt(), 0);
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let delays = |seed| {
            let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(5), seed);
            (0..10).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(delays(42), delays(42));
        assert_ne!(delays(42), delays(43));
    }
}
