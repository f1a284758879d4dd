//! The send side: the bytes written, kept until the peer acknowledges them, and how many may
//! be in flight.

use std::time::Instant;

use super::window::InflightWindow;
use crate::error::{Error, Result};
use crate::ring::ReplayBuffer;

/// Our stream, on our side.
///
/// The replay buffer holds every byte written and not yet acknowledged: its start is the
/// peer's acknowledgement, its end what the application has written. Nothing else keeps
/// either number.
#[derive(Debug)]
pub(super) struct Send {
    ring: ReplayBuffer,
    window: InflightWindow,
    /// The furthest offset handed to any transport: the peer cannot have more.
    max_sent: u64,
}

impl Send {
    pub(super) fn new(capacity: usize, ack_interval: u64) -> Result<Send> {
        Ok(Send {
            ring: ReplayBuffer::new(capacity)?,
            window: InflightWindow::new(ack_interval),
            max_sent: 0,
        })
    }

    /// Bytes the peer has acknowledged.
    pub(super) fn acked(&self) -> u64 {
        self.ring.start_seq()
    }

    /// Bytes the application has written.
    pub(super) fn written(&self) -> u64 {
        self.ring.end_seq()
    }

    /// Bytes held for replay, and memory committed to hold them.
    pub(super) fn buffered(&self) -> (usize, usize) {
        (self.ring.len(), self.ring.committed())
    }

    /// Takes as much of `buf` as the capacity allows, unless the in-flight window is full:
    /// `None` means wait for an acknowledgement. The window is a threshold: the write that
    /// crosses it is taken whole (up to the capacity).
    pub(super) fn write(&mut self, now: Instant, buf: &[u8]) -> Option<usize> {
        let held = self.ring.len() as u64;
        if held >= self.window.limit(now) || self.ring.free() == 0 {
            return None;
        }
        Some(self.ring.append(buf))
    }

    /// The payload of a DATA frame: `len` bytes from `seq`, as (at most) two slices of the
    /// replay buffer.
    pub(super) fn payload(&self, seq: u64, len: usize) -> [&[u8]; 2] {
        match self.ring.slices_from(seq) {
            Ok((a, b)) => {
                let first = a.len().min(len);
                [&a[..first], &b[..(len - first).min(b.len())]]
            }
            // The caller only asks for bytes it holds (acknowledgements never pass what was
            // handed to a transport, and a frame being written was not).
            Err(_) => [&[], &[]],
        }
    }

    /// A DATA frame ending at `end` is about to be handed to the transport.
    pub(super) fn on_framed(&mut self, now: Instant, end: u64) {
        self.window.on_sent(now, end, self.acked());
    }

    /// Bytes up to `end` were handed to a transport.
    pub(super) fn on_sent(&mut self, end: u64) {
        self.max_sent = self.max_sent.max(end);
    }

    /// The peer acknowledged `seq` bytes, on a path that was handed our stream up to `sent`.
    /// Returns whether that released anything.
    ///
    /// # Errors
    /// An acknowledgement beyond what the path was sent is a lie ([`Error::Protocol`]): bytes
    /// an earlier path carried past the peer's resume offset never reached it. One below an
    /// earlier acknowledgement is old news and ignored (after a resume the peer's offset
    /// counts as one, and its later ACKs may carry less).
    pub(super) fn on_ack(&mut self, now: Instant, seq: u64, sent: u64) -> Result<bool> {
        if seq > sent {
            return Err(Error::Protocol(format!(
                "peer acknowledged {seq} bytes but this path was sent only {sent}"
            )));
        }
        if seq <= self.acked() {
            return Ok(false);
        }
        self.window.on_ack(now, self.acked(), seq);
        self.ring.trim_to(seq);
        Ok(true)
    }

    /// Checks a resuming peer's offset: it must lie between what it acknowledged and what was
    /// sent to it.
    ///
    /// # Errors
    /// [`Error::InvalidSequenceNumber`] past what was sent, [`Error::ReplayDataUnavailable`]
    /// before the oldest byte kept.
    pub(super) fn check_resume(&self, seq: u64) -> Result<()> {
        if seq > self.max_sent {
            return Err(Error::InvalidSequenceNumber {
                remote: seq,
                local: self.max_sent,
            });
        }
        self.ring.check_replay_from(seq)
    }

    /// A new path on which the peer holds every byte before `seq` (checked): that is an
    /// acknowledgement, and the window starts afresh, keeping what it learnt of the peer's
    /// acknowledgement interval.
    pub(super) fn on_new_path(&mut self, seq: u64) {
        self.ring.trim_to(seq);
        self.window = InflightWindow::new(self.window.ack_interval());
    }
}
