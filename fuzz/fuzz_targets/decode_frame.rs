//! Arbitrary bytes through `FrameDecoder`, whole and in chunks of varying size derived from the
//! input: the decoder never panics, both ways of feeding give the same frames and the same error,
//! and every decoded frame re-encodes to bytes that decode to the same frame.
#![no_main]

use backedpipe::proto::{DecodeError, Frame, FrameDecoder};
use libfuzzer_sys::fuzz_target;

/// Frames, and the error (if any), from feeding `data` in the given chunk sizes.
fn run(data: &[u8], mut chunk: impl FnMut() -> usize) -> (Vec<Frame>, Option<DecodeError>, bool) {
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = chunk().clamp(1, rest.len());
        decoder.push(&rest[..n]);
        rest = &rest[n..];
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    assert!(decoder.is_failed());
                    assert_eq!(
                        decoder.next_frame(),
                        Err(e.clone()),
                        "a failed decoder stays failed"
                    );
                    return (frames, Some(e), true);
                }
            }
        }
    }
    let clean = decoder.finish().is_ok();
    (frames, None, clean)
}

fuzz_target!(|data: &[u8]| {
    // Chunk sizes from a small generator seeded by the input (FNV-1a), so the corpus stays plain
    // frame bytes and chunking still varies.
    let mut state = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let chunked = run(data, || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        1 + (state >> 33) as usize % 64
    });
    let whole = run(data, || usize::MAX);
    assert_eq!(chunked, whole, "chunking changed the result");

    for frame in &whole.0 {
        let bytes = frame.to_vec();
        assert_eq!(bytes.len(), frame.encoded_len());
        let (again, used) = Frame::decode(&bytes)
            .expect("a decoded frame re-encodes to valid bytes")
            .expect("a whole frame");
        assert_eq!(used, bytes.len());
        assert_eq!(&again, frame);
    }
});
