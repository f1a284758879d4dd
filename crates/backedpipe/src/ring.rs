//! The replay buffer: the newest bytes a writer sent, kept so they can be sent again after the
//! transport is lost (the Go package's `ringBuffer`).
//!
//! It owns storage and sequence accounting only. It knows nothing of transports, locks or
//! acknowledgements; the writer decides when bytes may be evicted or trimmed.
//!
//! Differences from the Go ring, all deliberate:
//! - memory is committed as bytes arrive, so an idle pipe costs nothing instead of 64 MiB. The
//!   ring's span grows by doubling up to the capacity, but what it holds never moves when it
//!   grows unless it had wrapped around (only after [`trim_to`](ReplayBuffer::trim_to), so never
//!   in raw mode): past [`RESERVE_ALL_ABOVE`] the whole capacity is reserved once as address
//!   space, which the system commits page by page as bytes land, so a large ring is neither
//!   copied nor faulted in twice while it fills;
//! - reads hand out the (at most two) slices of the ring instead of copying into a new
//!   allocation, so a replay writes straight from the buffer;
//! - it counts absolute sequence numbers, so a replay offset is checked against
//!   `[start_seq, end_seq]` before anything is read;
//! - [`trim_to`](ReplayBuffer::trim_to) releases bytes the peer acknowledged, and an empty
//!   buffer restarts at the front of its storage, which keeps the write position cache-hot.

use crate::cold_copy;
use crate::error::{Error, Result};

/// The smallest span the buffer uses once bytes arrive.
const MIN_COMMIT: usize = 4 * 1024;

/// From this span on, bytes written over older ones go by streaming stores
/// ([`cold_copy`]): the position was last written a whole span ago, and a span this large
/// has long left the caches. Measured on the project's guest, copying 64 KiB chunks round a
/// ring: a plain copy wins up to 8 MiB, the two are even at 16 MiB, streaming is twice as fast
/// from 32 MiB (docs/BENCHMARKS.md).
const STREAM_FROM_SPAN: usize = 32 * 1024 * 1024;

/// Up to this span the buffer reserves what its span needs (a small ring, as most pipes and
/// sessions have, reserves little); once it spans more, it reserves its whole capacity at once,
/// copying what it holds (at most this much) for the last time. The reservation is address
/// space only: the system commits a page when a byte is first written to it.
pub(crate) const RESERVE_ALL_ABOVE: usize = 1024 * 1024;

/// A fixed-capacity ring of the most recent bytes written, addressed by absolute sequence number.
///
/// ```
/// use backedpipe::ReplayBuffer;
///
/// let mut ring = ReplayBuffer::new(5)?;
/// ring.write(b"abcde");
/// ring.write(b"fg"); // evicts "ab"
/// let (a, b) = ring.read_last(5)?;
/// assert_eq!([a, b].concat(), b"cdefg");
/// assert_eq!((ring.start_seq(), ring.end_seq()), (2, 7));
/// # Ok::<(), backedpipe::Error>(())
/// ```
#[derive(Debug)]
pub struct ReplayBuffer {
    /// Storage. `storage.len()` bytes have been written at least once (committed); the Vec's
    /// spare capacity is reserved address space that no byte has reached yet. Every byte held
    /// lies below `storage.len()`.
    storage: Vec<u8>,
    /// The ring's span: positions wrap around at `span` (`storage.len() <= span <= capacity`).
    /// It grows by doubling as more is held at once, so a ring that never holds much keeps its
    /// write position in a small, cache-hot region.
    span: usize,
    capacity: usize,
    /// Position of the oldest byte held.
    head: usize,
    /// Number of bytes held.
    len: usize,
    /// Sequence number one past the newest byte held (total bytes ever written).
    end_seq: u64,
}

impl ReplayBuffer {
    /// Creates an empty buffer that holds at most `capacity` bytes. No memory is committed until
    /// bytes are written.
    ///
    /// # Errors
    /// [`Error::InvalidCapacity`] if `capacity` is zero (the Go ring panics).
    pub fn new(capacity: usize) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::InvalidCapacity);
        }
        Ok(ReplayBuffer {
            storage: Vec::new(),
            span: 0,
            capacity,
            head: 0,
            len: 0,
            end_seq: 0,
        })
    }

    /// The most bytes the buffer holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no bytes are held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes that can be appended without evicting anything.
    pub fn free(&self) -> usize {
        self.capacity - self.len
    }

    /// Bytes of memory committed to storage (at most the capacity).
    pub fn committed(&self) -> usize {
        self.storage.len()
    }

    /// The sequence number after the newest byte: the total number of bytes ever written.
    pub fn end_seq(&self) -> u64 {
        self.end_seq
    }

    /// The sequence number of the oldest byte held (equal to `end_seq` when empty).
    pub fn start_seq(&self) -> u64 {
        self.end_seq - self.len as u64
    }

    /// Appends `data`, evicting the oldest bytes if it does not fit, and returns how many bytes
    /// were evicted. A write larger than the capacity keeps only its last `capacity` bytes.
    pub fn write(&mut self, data: &[u8]) -> usize {
        if data.is_empty() {
            return 0;
        }
        self.end_seq += data.len() as u64;
        let mut evicted = 0;
        let data = if data.len() >= self.capacity {
            evicted = self.len + (data.len() - self.capacity);
            self.head = 0;
            self.len = 0;
            &data[data.len() - self.capacity..]
        } else {
            let overflow = (self.len + data.len()).saturating_sub(self.capacity);
            if overflow > 0 {
                self.discard_front(overflow);
                evicted = overflow;
            }
            data
        };
        self.copy_in(data);
        evicted
    }

    /// Appends as much of `data` as fits without evicting anything and returns how many bytes
    /// were taken.
    pub fn append(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.free());
        if n > 0 {
            self.end_seq += n as u64;
            self.copy_in(&data[..n]);
        }
        n
    }

    /// Returns the newest `n` bytes, in write order, as the two slices of the ring they occupy
    /// (the second is empty unless the bytes wrap around).
    ///
    /// # Errors
    /// [`Error::NotEnoughData`] if fewer than `n` bytes are held.
    pub fn read_last(&self, n: usize) -> Result<(&[u8], &[u8])> {
        if n > self.len {
            return Err(Error::NotEnoughData {
                requested: n,
                available: self.len,
            });
        }
        Ok(self.last(n))
    }

    /// The newest `n <= len` bytes as two slices.
    fn last(&self, n: usize) -> (&[u8], &[u8]) {
        debug_assert!(n <= self.len);
        if n == 0 {
            return (&[], &[]);
        }
        let span = self.span;
        let start = (self.head + self.len - n) % span;
        if start + n <= span {
            (&self.storage[start..start + n], &[])
        } else {
            // Wrapped: the ring has written up to its span, so `storage.len() == span`.
            (
                &self.storage[start..span],
                &self.storage[..n - (span - start)],
            )
        }
    }

    /// Returns every byte from sequence number `seq` to the end, as two slices.
    ///
    /// # Errors
    /// [`Error::FutureSequence`] if `seq` is past the end, [`Error::ReplayDataUnavailable`] if
    /// it is older than the oldest byte held. Either way nothing is read.
    pub fn slices_from(&self, seq: u64) -> Result<(&[u8], &[u8])> {
        self.check_replay_from(seq)?;
        self.read_last((self.end_seq - seq) as usize)
    }

    /// Checks that a replay may start at `seq`: within `[start_seq, end_seq]`.
    ///
    /// # Errors
    /// As for [`slices_from`](Self::slices_from).
    pub fn check_replay_from(&self, seq: u64) -> Result<()> {
        if seq > self.end_seq {
            Err(Error::FutureSequence {
                requested: seq,
                written: self.end_seq,
            })
        } else if seq < self.start_seq() {
            Err(Error::ReplayDataUnavailable {
                requested: seq,
                oldest: self.start_seq(),
            })
        } else {
            Ok(())
        }
    }

    /// Drops every byte before sequence number `seq` (the peer has acknowledged them). Offsets
    /// outside the held range are clamped.
    pub fn trim_to(&mut self, seq: u64) {
        let seq = seq.min(self.end_seq);
        if seq > self.start_seq() {
            self.discard_front((seq - self.start_seq()) as usize);
        }
    }

    fn discard_front(&mut self, n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        self.head = if self.len == 0 {
            0
        } else {
            (self.head + n) % self.span
        };
    }

    /// Copies `data` after the newest byte; the caller guarantees it fits in the capacity.
    fn copy_in(&mut self, data: &[u8]) {
        debug_assert!(self.len + data.len() <= self.capacity);
        if self.len + data.len() > self.span {
            self.grow(self.len + data.len());
        }
        let tail = (self.head + self.len) % self.span;
        let first = data.len().min(self.span - tail);
        self.put(tail, &data[..first]);
        self.put(0, &data[first..]);
        self.len += data.len();
    }

    /// Writes `bytes` at position `at`, which is at most `storage.len()` and leaves room for
    /// them below the span: over bytes written before, then past them (committing memory).
    fn put(&mut self, at: usize, bytes: &[u8]) {
        debug_assert!(at <= self.storage.len() && at + bytes.len() <= self.span);
        let over = bytes.len().min(self.storage.len() - at);
        let (dst, src) = (&mut self.storage[at..at + over], &bytes[..over]);
        if self.span >= STREAM_FROM_SPAN {
            // Last written a whole span ago: long out of the caches.
            cold_copy::copy(dst, src);
        } else {
            dst.copy_from_slice(src);
        }
        // Within the reservation (see `grow`): no reallocation, nothing moves.
        self.storage.extend_from_slice(&bytes[over..]);
    }

    /// Widens the span to hold `needed` bytes. What is held stays where it is, unless it wraps
    /// around the old span: then the wrapped part (the bytes at the front) moves up behind the
    /// rest, as far as the new span reaches.
    fn grow(&mut self, needed: usize) {
        debug_assert!(needed > self.span && needed <= self.capacity);
        let old = self.span;
        let span = needed.max(old * 2).max(MIN_COMMIT).min(self.capacity);
        let reserve = if span > RESERVE_ALL_ABOVE {
            self.capacity
        } else {
            span
        };
        // A no-op once the reservation is made; before that, the copy of a small ring.
        self.storage
            .reserve_exact(reserve.saturating_sub(self.storage.len()));
        self.span = span;
        if self.head + self.len > old {
            // Wrapped: [head, old) then [0, wrapped). The first `moved` of the front bytes go
            // up to [old, old + moved); the rest shift down to the front.
            debug_assert_eq!(self.storage.len(), old);
            let wrapped = self.head + self.len - old;
            let moved = wrapped.min(span - old);
            self.storage.extend_from_within(..moved);
            self.storage.copy_within(moved..wrapped, 0);
        }
    }
}
