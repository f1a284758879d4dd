//! Settings of a session, client or server side.

use std::time::Duration;

use super::config::SessionConfig;
use crate::config::PipeConfig;

/// Received bytes a session holds unread by default: enough to keep a fast path busy while the
/// application is between reads.
const DEFAULT_RECEIVE_LIMIT: usize = 1024 * 1024;

/// Settings of a [`Session`](crate::Session) and a [`SessionServer`](crate::SessionServer).
///
/// | setting | default | why |
/// |---|---|---|
/// | [`pipe`](Self::pipe) | [`PipeConfig::default`] | the capacity bounds unacknowledged bytes (writes wait beyond it); backoff between resume attempts |
/// | [`timing`](Self::timing) | [`SessionConfig::default`] | heartbeat every 5 s, dead after 11 s of silence, ack every 64 KiB or 20 ms |
/// | [`connect_timeout`](Self::connect_timeout) | 3 s | a dial that hangs (a black-holed route) is abandoned and retried |
/// | [`handshake_timeout`](Self::handshake_timeout) | 10 s | a client that connects and says nothing cannot hold a server task for long |
/// | [`ttl`](Self::ttl) | 24 h | how long a server keeps a disconnected session for its client to resume |
/// | [`receive_limit`](Self::receive_limit) | 1 MiB | received bytes the application has not read beyond which the transport is left unread (TCP's flow control then holds the peer back) |
/// | [`close_timeout`](Self::close_timeout) | 30 s | how long [`Session::close`](crate::Session::close) waits for the peer to acknowledge what was written before it sends CLOSE anyway: long enough to notice a dead path (11 s) and resume over a new one |
///
/// # Resource limits
///
/// Whatever the peer sends, one session holds at most: the replay buffer's capacity (written
/// and unacknowledged bytes; committed only as they are written), the receive limit plus one
/// read of 16 KiB (received and unread bytes, in one contiguous buffer: a frame costs its
/// payload and nothing more), the frame decoder's 16 KiB read plus a partial header (DATA
/// payloads stream through it), one pending frame of each control kind (ACK, PING, PONG, FIN,
/// CLOSE: under 300 bytes in all), and a few KiB of fixed state and its driver task. With the
/// defaults that is 64 MiB + 1 MiB + 32 KiB + a few KiB; an idle connected session measures
/// about 13 KiB (`bpbench memory`: 25.5 KiB per connected pair). Before its handshake, a
/// transport can make a server buffer at most one 4 KiB read and one handshake frame (265
/// bytes).
///
/// ```
/// use std::time::Duration;
/// use backedpipe::{PipeConfig, SessionOptions};
///
/// let options = SessionOptions::default()
///     .pipe(PipeConfig::default().buffer_capacity(1 << 20))
///     .ttl(Duration::from_secs(600));
/// assert_eq!(options.ttl_value(), Duration::from_secs(600));
/// ```
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub(crate) pipe: PipeConfig,
    pub(crate) timing: SessionConfig,
    pub(crate) connect_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) ttl: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) receive_limit: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            pipe: PipeConfig::default(),
            timing: SessionConfig::default(),
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(10),
            ttl: Duration::from_secs(24 * 60 * 60),
            close_timeout: Duration::from_secs(30),
            receive_limit: DEFAULT_RECEIVE_LIMIT,
        }
    }
}

impl SessionOptions {
    /// The pipe's settings: buffer capacity (the most bytes unacknowledged at once), backoff,
    /// retry budget.
    pub fn pipe(mut self, pipe: PipeConfig) -> Self {
        self.pipe = pipe;
        self
    }

    /// Acknowledgement and heartbeat timing.
    pub fn timing(mut self, timing: SessionConfig) -> Self {
        self.timing = timing;
        self
    }

    /// How long a client waits for its connector to produce a transport.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long either side waits for the handshake to finish.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How long a server keeps a disconnected session before forgetting it (its client then
    /// gets [`Error::SessionExpired`](crate::Error::SessionExpired)); taken as at most 100
    /// years.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long [`Session::close`](crate::Session::close) waits for the peer to acknowledge
    /// every byte written before it sends CLOSE regardless. A CLOSE never overtakes data the
    /// peer could still get; past this bound the caller's wish to be done wins.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// How many received bytes the application may leave unread before the transport is left
    /// unread (at least 1). Each session holds at most this much plus one read (16 KiB) of the
    /// peer's stream, whatever the peer sends.
    pub fn receive_limit(mut self, bytes: usize) -> Self {
        self.receive_limit = bytes.max(1);
        self
    }

    /// The configured time to live of a disconnected session.
    pub fn ttl_value(&self) -> Duration {
        self.ttl
    }
}
