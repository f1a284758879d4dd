//! The streaming frame decoder: bytes in arbitrary chunks in, whole frames out, with a hard
//! maximum on what one frame can make it buffer.

use bytes::{Buf, Bytes, BytesMut};

use super::error::{DecodeError, TruncatedFrame};
use super::frame::{Frame, FrameHeader, FrameType, HEADER_LEN};

/// Where the decoder is within the current frame.
#[derive(Debug, Clone, Copy)]
enum ReadState {
    /// Waiting for the five header bytes.
    Header,
    /// The header was validated; waiting for `header.length` payload bytes.
    Payload {
        /// The validated header (already removed from the buffer).
        header: FrameHeader,
    },
    /// A decode error was returned; the connection is dead and every later call returns it again.
    Failed,
}

/// Decodes a byte stream, received in chunks of any size, into frames.
///
/// Feed received bytes with [`push`](Self::push), then call [`next_frame`](Self::next_frame) until
/// it returns `Ok(None)`; repeat. At end of input call [`finish`](Self::finish): bytes left over
/// mean the transport was lost mid-frame ([`TruncatedFrame`]), which is not corruption.
///
/// A header is validated as soon as its five bytes are present, so an unknown type, an oversized
/// length ([`DecodeError::FrameTooLarge`]) or a wrong length for the type is rejected before any
/// payload is buffered. If the caller drains frames after each push, the decoder holds at most one
/// frame plus one pushed chunk: `HEADER_LEN + MAX_FRAME_PAYLOAD` plus the chunk size. After an
/// error the decoder stays failed and returns the same error again.
///
/// ```
/// use backedpipe::proto::{Frame, FrameDecoder};
///
/// let wire = [Frame::ping(7).to_vec(), Frame::fin().to_vec()].concat();
/// let mut decoder = FrameDecoder::new();
/// let mut frames = Vec::new();
/// for chunk in wire.chunks(3) {
///     decoder.push(chunk);
///     while let Some(frame) = decoder.next_frame().unwrap() {
///         frames.push(frame);
///     }
/// }
/// assert_eq!(frames, [Frame::ping(7), Frame::fin()]);
/// assert!(decoder.finish().is_ok());
///
/// decoder.push(&[0x03, 0, 0]); // the connection drops mid-header
/// assert_eq!(decoder.next_frame().unwrap(), None);
/// assert_eq!(decoder.finish().unwrap_err().buffered, 3);
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    state: ReadState,
    error: Option<DecodeError>,
    /// Before the handshake ends only handshake frames and CLOSE are accepted, so a peer that
    /// has proved nothing can make us buffer no more than one of those (at most 265 bytes)
    /// beyond one read.
    handshake: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::new(),
            state: ReadState::Header,
            error: None,
            handshake: false,
        }
    }

    /// A decoder for a transport whose handshake has not finished: any frame but HELLO,
    /// WELCOME, RESUMED and CLOSE is refused at its header
    /// ([`DecodeError::NotAHandshakeFrame`]), so nothing of a frame a handshake never needs is
    /// buffered. Call [`end_handshake`](Self::end_handshake) once the handshake is done.
    ///
    /// ```
    /// use backedpipe::proto::{DecodeError, Frame, FrameDecoder, FrameType};
    ///
    /// let mut decoder = FrameDecoder::handshake();
    /// decoder.push(&[0x01, 0x00, 0x10, 0x00, 0x00]); // a DATA header announcing 1 MiB
    /// assert_eq!(decoder.next_frame(), Err(DecodeError::NotAHandshakeFrame(FrameType::Data)));
    /// ```
    pub fn handshake() -> FrameDecoder {
        FrameDecoder {
            handshake: true,
            ..FrameDecoder::new()
        }
    }

    /// The handshake is done: every frame type is accepted from now on.
    pub fn end_handshake(&mut self) {
        self.handshake = false;
    }

    /// Appends received bytes. Ignored once the decoder has failed.
    pub fn push(&mut self, bytes: &[u8]) {
        if !matches!(self.state, ReadState::Failed) {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The buffer [`push`](Self::push) appends to, for a driver that reads from its transport
    /// straight into it (no intermediate copy). Only append to it; `None` once the decoder has
    /// failed.
    pub fn receive_buffer(&mut self) -> Option<&mut BytesMut> {
        match self.state {
            ReadState::Failed => None,
            _ => Some(&mut self.buf),
        }
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or the first decode error (which
    /// is then returned on every later call).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        match self.step() {
            Err(err) => {
                self.state = ReadState::Failed;
                self.buf = BytesMut::new();
                self.error = Some(err.clone());
                Err(err)
            }
            ok => ok,
        }
    }

    fn step(&mut self) -> Result<Option<Frame>, DecodeError> {
        loop {
            match self.state {
                ReadState::Failed => {
                    return Err(self.error.clone().expect("failed decoder keeps its error"))
                }
                ReadState::Header => {
                    // Reject an unknown type from its first byte.
                    if let Some(&ty) = self.buf.first() {
                        if FrameType::from_u8(ty).is_none() {
                            return Err(DecodeError::UnknownType(ty));
                        }
                    }
                    if self.buf.len() < HEADER_LEN {
                        return Ok(None);
                    }
                    let mut head = [0u8; HEADER_LEN];
                    head.copy_from_slice(&self.buf[..HEADER_LEN]);
                    let header = FrameHeader::parse(head)?;
                    let frame_type = header.frame_type;
                    if self.handshake
                        && !frame_type.is_handshake()
                        && frame_type != FrameType::Close
                    {
                        return Err(DecodeError::NotAHandshakeFrame(frame_type));
                    }
                    self.buf.advance(HEADER_LEN);
                    self.state = ReadState::Payload { header };
                }
                ReadState::Payload { header } => {
                    let len = header.length as usize;
                    if self.buf.len() < len {
                        // No reservation here: `push` grows the buffer as bytes come, and a
                        // driver reading into `receive_buffer` sizes its own reads (reserving
                        // for a whole payload would copy the bytes held whenever earlier
                        // payloads still share the allocation).
                        return Ok(None);
                    }
                    let payload = self.buf.split_to(len).freeze();
                    self.state = ReadState::Header;
                    return Frame::decode_payload(header, payload).map(Some);
                }
            }
        }
    }

    /// How many more bytes complete the header or the frame being decoded: a reader that wants
    /// no byte past the current frame reads at most this many. Zero when a whole header or frame
    /// is already held (call [`next_frame`](Self::next_frame)) and once the decoder has failed.
    ///
    /// ```
    /// use backedpipe::proto::{Frame, FrameDecoder};
    ///
    /// let mut decoder = FrameDecoder::new();
    /// assert_eq!(decoder.wanted(), 5); // a header
    /// decoder.push(&Frame::ack(1).to_vec()[..5]);
    /// assert_eq!(decoder.next_frame().unwrap(), None);
    /// assert_eq!(decoder.wanted(), 8); // the ACK's payload
    /// ```
    pub fn wanted(&self) -> usize {
        match self.state {
            ReadState::Header => HEADER_LEN.saturating_sub(self.buf.len()),
            ReadState::Payload { header } => {
                (header.length as usize).saturating_sub(self.buf.len())
            }
            ReadState::Failed => 0,
        }
    }

    /// After [`next_frame`](Self::next_frame) returned `Ok(None)` inside a DATA frame: hands
    /// over the payload bytes held so far and how many more are still to come, and moves on to
    /// the next frame's header. The caller then takes exactly that many bytes of the stream
    /// itself (straight into its own buffer) before pushing anything more here, so a large
    /// payload is never buffered by the decoder. `None` in any other state.
    ///
    /// ```
    /// use backedpipe::proto::{Frame, FrameDecoder};
    ///
    /// let wire = Frame::data(&b"hello"[..]).to_vec();
    /// let mut decoder = FrameDecoder::new();
    /// decoder.push(&wire[..7]); // the header and "he"
    /// assert_eq!(decoder.next_frame().unwrap(), None);
    /// let (held, rest) = decoder.take_partial_data().unwrap();
    /// assert_eq!((&held[..], rest), (&b"he"[..], 3));
    /// decoder.push(&Frame::fin().to_vec()); // after the caller has read "llo" itself
    /// assert_eq!(decoder.next_frame().unwrap(), Some(Frame::fin()));
    /// ```
    pub fn take_partial_data(&mut self) -> Option<(Bytes, usize)> {
        let ReadState::Payload { header } = self.state else {
            return None;
        };
        let len = header.length as usize;
        if header.frame_type != FrameType::Data || self.buf.len() >= len {
            return None;
        }
        let held = self.buf.split().freeze();
        self.state = ReadState::Header;
        let rest = len - held.len();
        Some((held, rest))
    }

    /// How many received bytes are held that do not yet form a whole frame (after
    /// [`next_frame`](Self::next_frame) returned `Ok(None)`), including a consumed header.
    pub fn buffered(&self) -> usize {
        match self.state {
            ReadState::Payload { .. } => HEADER_LEN + self.buf.len(),
            _ => self.buf.len(),
        }
    }

    /// Whether the decoder has failed with a decode error.
    pub fn is_failed(&self) -> bool {
        matches!(self.state, ReadState::Failed)
    }

    /// Checks the end of input: `Ok(())` if it fell between frames, [`TruncatedFrame`] if it fell
    /// inside one (transport loss, not corruption). Call it after draining
    /// [`next_frame`](Self::next_frame); a failed decoder reports `Ok(())` here, its error having
    /// been returned already.
    pub fn finish(&self) -> Result<(), TruncatedFrame> {
        match self.buffered() {
            0 => Ok(()),
            _ if self.is_failed() => Ok(()),
            buffered => Err(TruncatedFrame { buffered }),
        }
    }
}
