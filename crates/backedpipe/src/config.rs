//! Settings of a [`BackedPipe`](crate::BackedPipe), each with its default and the reason for it.

use std::time::Duration;

/// The default replay-buffer capacity, 64 MiB, as in the Go package. Memory is committed only as
/// bytes are written, so an idle pipe does not pay for it.
pub const DEFAULT_BUFFER_SIZE: usize = 64 * 1024 * 1024;

/// Settings of a [`BackedPipe`](crate::BackedPipe).
///
/// | setting | default | why |
/// |---|---|---|
/// | [`buffer_capacity`](Self::buffer_capacity) | 64 MiB ([`DEFAULT_BUFFER_SIZE`]) | the Go default; raw mode can resume only if the peer is less than this far behind |
/// | [`backoff`](Self::backoff) | 100 ms doubling to 5 s, full jitter | quick first retry, gentle on a server that lost every client at once |
/// | [`backoff_seed`](Self::backoff_seed) | random | set it for reproducible tests |
/// | [`max_reconnect_attempts`](Self::max_reconnect_attempts) | unlimited | a stream should outlive any outage; the pipe fails with the last error if a limit is reached |
///
/// ```
/// use std::time::Duration;
/// use backedpipe::PipeConfig;
///
/// let config = PipeConfig::default()
///     .buffer_capacity(1 << 20)
///     .backoff(Duration::from_millis(50), Duration::from_secs(2))
///     .backoff_seed(7);
/// assert_eq!(config.capacity(), 1 << 20);
/// ```
#[derive(Debug, Clone)]
pub struct PipeConfig {
    pub(crate) buffer_capacity: usize,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) backoff_seed: Option<u64>,
    pub(crate) max_reconnect_attempts: Option<u32>,
}

impl Default for PipeConfig {
    fn default() -> Self {
        PipeConfig {
            buffer_capacity: DEFAULT_BUFFER_SIZE,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            backoff_seed: None,
            max_reconnect_attempts: None,
        }
    }
}

impl PipeConfig {
    /// The replay buffer's capacity in bytes (must be at least 1; checked when the pipe is
    /// created).
    pub fn buffer_capacity(mut self, bytes: usize) -> Self {
        self.buffer_capacity = bytes;
        self
    }

    /// The first reconnect delay's ceiling and the largest delay.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// Seeds the backoff jitter, for reproducible runs.
    pub fn backoff_seed(mut self, seed: u64) -> Self {
        self.backoff_seed = Some(seed);
        self
    }

    /// Gives up after this many failed automatic reconnect attempts in a row; the pipe then
    /// fails with the last error. `None` retries forever.
    pub fn max_reconnect_attempts(mut self, attempts: Option<u32>) -> Self {
        self.max_reconnect_attempts = attempts;
        self
    }

    /// The configured replay-buffer capacity.
    pub fn capacity(&self) -> usize {
        self.buffer_capacity
    }
}
