//! Timing and acknowledgement settings of a session.

use std::time::Duration;

/// Timing and ack settings of a session.
///
/// | setting | default | why |
/// |---|---|---|
/// | `heartbeat_interval` | 5 s | probe an idle path this often (Eternal Terminal and Mosh use 3–5 s) |
/// | `dead_after` | 2 × heartbeat + 1 s | a path silent this long is dead; about two missed heartbeats |
/// | `ack_every` | 64 KiB | acknowledge at least this often while data flows, so the sender's buffer drains |
/// | `ack_delay` | 20 ms | and at most this long after a byte is delivered, so a trickle is acknowledged too |
///
/// ```
/// use std::time::Duration;
/// use backedpipe::session::SessionConfig;
///
/// let timing = SessionConfig {
///     heartbeat_interval: Duration::from_secs(1),
///     dead_after: Duration::from_secs(3),
///     ..SessionConfig::default()
/// };
/// assert_eq!(timing.ack_every, 64 * 1024);
/// ```
///
/// A session takes durations below 1 ms as 1 ms and above 100 years as 100 years, and
/// `ack_every` as at least 1 and at most 2^48.
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
