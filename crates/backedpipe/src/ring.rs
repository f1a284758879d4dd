//! The replay buffer: the newest bytes a writer sent, kept so they can be sent again after the
//! transport is lost (the Go package's `ringBuffer`).
//!
//! It owns storage and sequence accounting only. It knows nothing of transports, locks or
//! acknowledgements; the writer decides when bytes may be evicted or trimmed.
//!
//! Differences from the Go ring, all deliberate:
//! - memory is committed as bytes arrive (growing by doubling up to the capacity), so an idle
//!   pipe costs nothing instead of 64 MiB;
//! - reads hand out the (at most two) slices of the ring instead of copying into a new
//!   allocation, so a replay writes straight from the buffer;
//! - it counts absolute sequence numbers, so a replay offset is checked against
//!   `[start_seq, end_seq]` before anything is read;
//! - [`trim_to`](ReplayBuffer::trim_to) releases bytes the peer acknowledged, and an empty
//!   buffer restarts at the front of its storage, which keeps the write position cache-hot.

use crate::error::{Error, Result};

/// The smallest allocation the buffer makes once bytes arrive.
const MIN_COMMIT: usize = 4 * 1024;

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
    /// Committed storage; grows up to `capacity`.
    storage: Vec<u8>,
    capacity: usize,
    /// Index in `storage` of the oldest byte held.
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
        let size = self.storage.len();
        let start = (self.head + self.len - n) % size;
        if start + n <= size {
            (&self.storage[start..start + n], &[])
        } else {
            (&self.storage[start..], &self.storage[..n - (size - start)])
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
            (self.head + n) % self.storage.len()
        };
    }

    /// Copies `data` after the newest byte; the caller guarantees it fits in the capacity.
    fn copy_in(&mut self, data: &[u8]) {
        debug_assert!(self.len + data.len() <= self.capacity);
        self.reserve(data.len());
        let size = self.storage.len();
        let tail = (self.head + self.len) % size;
        let first = data.len().min(size - tail);
        self.storage[tail..tail + first].copy_from_slice(&data[..first]);
        self.storage[..data.len() - first].copy_from_slice(&data[first..]);
        self.len += data.len();
    }

    /// Makes room for `additional` more bytes, committing more memory if needed.
    fn reserve(&mut self, additional: usize) {
        let needed = self.len + additional;
        if needed <= self.storage.len() {
            return;
        }
        let new_size = needed
            .max(self.storage.len() * 2)
            .max(MIN_COMMIT)
            .min(self.capacity);
        // A fresh zeroed allocation (large ones come straight from the OS, already zero, so no
        // page is touched until a byte lands on it), then the held bytes copied to its front.
        let mut storage = vec![0; new_size];
        let (first, second) = self.last(self.len);
        storage[..first.len()].copy_from_slice(first);
        storage[first.len()..self.len].copy_from_slice(second);
        self.storage = storage;
        self.head = 0;
    }
}
