//! The receive side: bytes of the peer's stream received and not yet read, what the
//! application has read, and what we acknowledged.

use bytes::{Buf, BytesMut};

use super::READ_CHUNK;

/// The peer's stream, on our side.
///
/// Received bytes are copied into one contiguous buffer, so a flood of tiny DATA frames costs
/// their payload bytes and nothing per frame. The connection stops reading its transport while
/// [`limit`](Self::has_room) bytes are held, so the buffer holds at most the limit plus one
/// read (the transport's own flow control holds the peer back meanwhile).
#[derive(Debug)]
pub(super) struct Recv {
    /// Received, not yet read by the application.
    buf: BytesMut,
    /// Bytes of the peer's stream the application has read.
    delivered: u64,
    /// The count our latest ACK carried, or the offset a resume told the peer: acknowledging
    /// less than that tells the peer nothing.
    acked: u64,
    /// An ACK should go out now.
    ack_due: bool,
    /// Received bytes held beyond which the transport is not read.
    limit: usize,
}

impl Recv {
    pub(super) fn new(limit: usize) -> Recv {
        Recv {
            buf: BytesMut::new(),
            delivered: 0,
            acked: 0,
            ack_due: false,
            limit,
        }
    }

    /// Bytes of the peer's stream the application has read.
    pub(super) fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Bytes of the peer's stream received (read or not): where a resume continues.
    pub(super) fn received(&self) -> u64 {
        self.delivered + self.buf.len() as u64
    }

    /// Received bytes not yet read.
    pub(super) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Memory the buffer holds.
    pub(super) fn committed(&self) -> usize {
        self.buf.capacity()
    }

    /// Whether more may be read from the transport.
    pub(super) fn has_room(&self) -> bool {
        self.buf.len() < self.limit
    }

    /// How many more bytes may be read from the transport before it is left alone.
    pub(super) fn room(&self) -> usize {
        self.limit.saturating_sub(self.buf.len())
    }

    /// Where raw payload bytes read from the transport go, with room for `additional` more.
    pub(super) fn buffer(&mut self, additional: usize) -> &mut BytesMut {
        self.make_room(additional);
        &mut self.buf
    }

    /// Payload bytes of a DATA frame arrived.
    pub(super) fn push(&mut self, payload: &[u8]) {
        self.make_room(payload.len());
        self.buf.extend_from_slice(payload);
    }

    /// Grows the buffer for `additional` more bytes: doubling, but never past the limit plus
    /// one read, so its memory stays within that bound (`BytesMut::reserve` alone may double
    /// past it).
    fn make_room(&mut self, additional: usize) {
        let needed = self.buf.len() + additional;
        if needed <= self.buf.capacity() {
            return;
        }
        let target = needed.max((self.buf.capacity() * 2).min(self.limit + READ_CHUNK));
        let mut grown = BytesMut::with_capacity(target);
        grown.extend_from_slice(&self.buf);
        self.buf = grown;
    }

    /// Copies received bytes into `out`; returns how many.
    pub(super) fn read(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf.advance(n);
        if self.buf.is_empty() {
            // Reuse the allocation from its start.
            self.buf.clear();
        }
        self.delivered += n as u64;
        n
    }

    /// The application read `n` bytes straight from the transport.
    pub(super) fn delivered_directly(&mut self, n: usize) {
        debug_assert!(self.buf.is_empty());
        self.delivered += n as u64;
    }

    /// Delivered bytes not yet acknowledged.
    pub(super) fn unacked(&self) -> u64 {
        self.delivered.saturating_sub(self.acked)
    }

    /// Asks for an ACK now, if there is anything to acknowledge.
    pub(super) fn request_ack(&mut self) {
        self.ack_due |= self.unacked() > 0;
    }

    /// Whether an ACK should go out now.
    pub(super) fn ack_due(&self) -> bool {
        self.ack_due
    }

    /// An ACK is being sent: returns the count it carries.
    pub(super) fn take_ack(&mut self) -> u64 {
        self.ack_due = false;
        self.acked = self.acked.max(self.delivered);
        self.delivered
    }

    /// A new path: the peer learnt in the handshake that we hold every byte we received, and
    /// takes that as an acknowledgement.
    pub(super) fn on_new_path(&mut self) {
        self.acked = self.acked.max(self.received());
        self.ack_due = false;
    }
}
