//! Copying into memory that is not in the CPU's caches: the write position of a large replay
//! buffer, which was last written a whole ring ago (DESIGN §6).
//!
//! A plain copy first reads every destination cache line from memory (to own it), then writes
//! it back when it is evicted: twice the memory traffic of the bytes copied. Non-temporal
//! (streaming) stores write whole lines straight to memory without reading them first and
//! without evicting what the caches hold. On the project's 2-vCPU guest, copying 64 KiB chunks
//! round a 64 MiB ring ran at 4.4-5.5 GB/s with `copy_from_slice` and 9.5-14 GB/s with these
//! stores, so in raw mode (which keeps the newest 64 MiB written) streaming halves the cost
//! of keeping a byte for replay; docs/BENCHMARKS.md has the measurements. Into memory that is
//! in cache they are slower than a plain copy, so the ring uses them only for large spans.
//!
//! This module owns that one copy and nothing else; it is the crate's only unsafe code.

#![allow(unsafe_code)] // Streaming stores have no safe interface; each block says why it is sound.

/// Copies `src` into `dst` (of the same length) with stores that bypass the caches where the
/// platform has them, and with a plain copy elsewhere. The copied bytes are visible to every
/// thread that synchronises with this one afterwards (a lock released after the call).
///
/// # Panics
/// If the lengths differ, as [`slice::copy_from_slice`] does.
pub(crate) fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "cold_copy::copy: lengths differ");
    #[cfg(target_arch = "x86_64")]
    x86_64::copy(dst, src);
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};

    /// A cache line: the unit a streaming store writes to memory at once when it is filled
    /// completely by consecutive stores.
    const LINE: usize = 64;

    /// SSE2 streaming stores, which every x86_64 CPU has (no feature detection needed).
    pub(super) fn copy(dst: &mut [u8], src: &[u8]) {
        debug_assert_eq!(dst.len(), src.len());
        // The bytes before the first line boundary of `dst`, and those after the last, go by a
        // plain copy: streaming stores must be aligned, and a partial line would be read anyway.
        let head = dst.as_ptr().align_offset(LINE).min(dst.len());
        dst[..head].copy_from_slice(&src[..head]);
        let (dst, src) = (&mut dst[head..], &src[head..]);
        let lines = dst.len() / LINE;
        let d = dst.as_mut_ptr().cast::<__m128i>();
        let s = src.as_ptr().cast::<__m128i>();
        for line in 0..lines {
            let at = line * (LINE / 16);
            // SAFETY: SSE2 is part of the x86_64 baseline, so the intrinsics are available.
            // `line < lines = dst.len() / 64` and `src.len() == dst.len()`, so the 64 bytes read
            // at `s + at` and written at `d + at` (four 16-byte lanes from `at`) lie inside
            // `src` and `dst`, which do not overlap (`&mut` and `&`). `d` is 64-byte aligned
            // (`head` above), so every `d + at + k` is 16-byte aligned as `_mm_stream_si128`
            // requires; the loads are unaligned loads.
            unsafe {
                let a = _mm_loadu_si128(s.add(at));
                let b = _mm_loadu_si128(s.add(at + 1));
                let c = _mm_loadu_si128(s.add(at + 2));
                let e = _mm_loadu_si128(s.add(at + 3));
                _mm_stream_si128(d.add(at), a);
                _mm_stream_si128(d.add(at + 1), b);
                _mm_stream_si128(d.add(at + 2), c);
                _mm_stream_si128(d.add(at + 3), e);
            }
        }
        // SAFETY: SSE is part of the x86_64 baseline; a fence has no memory-safety
        // preconditions. Streaming stores are weakly ordered: without it, another thread that
        // takes the lock this thread releases next could read the ring before they land.
        unsafe { _mm_sfence() };
        let done = lines * LINE;
        dst[done..].copy_from_slice(&src[done..]);
    }
}

#[cfg(test)]
mod tests {
    use super::copy;

    /// Every length and alignment around the line size, against a plain copy.
    #[test]
    fn copies_every_length_and_alignment() {
        let src: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        for offset in 0..70 {
            for len in [0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 300, 700] {
                let mut dst = vec![0xAAu8; 1024 + 128];
                copy(&mut dst[offset..offset + len], &src[5..5 + len]);
                assert_eq!(&dst[offset..offset + len], &src[5..5 + len]);
                assert!(dst[..offset].iter().all(|&b| b == 0xAA), "wrote before");
                assert!(
                    dst[offset + len..].iter().all(|&b| b == 0xAA),
                    "wrote after"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn different_lengths_panic() {
        copy(&mut [0; 3], &[0; 4]);
    }
}
