// RB-8 (read_last of a negative count is an error) has no test: the count is a `usize`, so a negative count is unrepresentable in Rust.
//! Seed parity for the Go ring buffer (`ring_buffer_internal_test.go`): checklist section 1.1 of
//! `seed-behaviour.md`, one test per RB item, plus the code-only and historical lines and the
//! Rust-only parts of [`ReplayBuffer`] (lazy commit, sequence numbers, `trim_to`, `append`).

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use backedpipe::{BackedPipe, Error, PipeConfig, ReplayBuffer, DEFAULT_BUFFER_SIZE};
use common::*;
use proptest::prelude::*;

/// The newest `n` bytes of `ring`, joined into one vector.
fn last(ring: &ReplayBuffer, n: usize) -> Vec<u8> {
    let (a, b) = ring.read_last(n).expect("read_last");
    [a, b].concat()
}

/// Every byte `ring` holds, oldest first.
fn contents(ring: &ReplayBuffer) -> Vec<u8> {
    last(ring, ring.len())
}

/// A buffer of `capacity` bytes after writing each of `writes` in turn.
fn ring_with(capacity: usize, writes: &[&[u8]]) -> ReplayBuffer {
    let mut ring = ReplayBuffer::new(capacity).expect("capacity > 0");
    for w in writes {
        ring.write(w);
    }
    ring
}

/// Checks the accounting invariants that must hold after any operation.
fn assert_invariants(ring: &ReplayBuffer) {
    assert!(ring.len() <= ring.capacity(), "len exceeds capacity");
    assert!(
        ring.committed() <= ring.capacity(),
        "committed exceeds capacity"
    );
    assert!(
        ring.committed() >= ring.len(),
        "holds more than it committed"
    );
    assert_eq!(ring.start_seq() + ring.len() as u64, ring.end_seq());
    assert_eq!(ring.free(), ring.capacity() - ring.len());
    assert_eq!(ring.is_empty(), ring.start_seq() == ring.end_seq());
}

/// RB-1: a new buffer returns exactly what was written.
#[test]
fn rb01_new_buffer_returns_what_was_written() {
    let ring = ring_with(100, &[b"test"]);
    assert_eq!(ring.capacity(), 100);
    assert_eq!(ring.len(), 4);
    assert_eq!(last(&ring, 4), b"test");
    assert_invariants(&ring);
}

/// RB-2: read_last(n) returns the newest n bytes in write order.
#[test]
fn rb02_read_last_returns_newest_bytes_in_order() {
    let ring = ring_with(10, &[b"hello"]);
    assert_eq!(last(&ring, 4), b"ello");
    assert_eq!(last(&ring, 5), b"hello");
}

/// RB-3: writes append; a buffer filled exactly returns the tail of the second write.
#[test]
fn rb03_writes_append_until_exactly_full() {
    let ring = ring_with(10, &[b"hello", b"world"]);
    assert_eq!(ring.len(), 10);
    assert_eq!(ring.free(), 0);
    assert_eq!(last(&ring, 5), b"world");
    assert_eq!(last(&ring, 3), b"rld");
    assert_eq!(last(&ring, 10), b"helloworld");
}

/// RB-4: asking for more bytes than are stored is a typed error with the Go message.
#[test]
fn rb04_reading_more_than_stored_is_an_error() {
    let full = ring_with(10, &[b"helloworld"]);
    let three = ring_with(10, &[b"abc"]);
    let empty = ring_with(10, &[]);
    for (ring, requested, available) in [(&full, 15, 10), (&three, 10, 3), (&empty, 5, 0)] {
        let err = ring.read_last(requested).unwrap_err();
        assert!(
            matches!(err, Error::NotEnoughData { requested: r, available: a } if r == requested && a == available),
            "unexpected error {err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("requested {requested} bytes but only {available} available")
        );
        // The failed read changed nothing.
        assert_eq!(ring.len(), available);
    }
}

/// RB-5: overflow evicts the oldest bytes.
#[test]
fn rb05_overflow_evicts_oldest() {
    let ring = ring_with(5, &[b"abcde", b"fg"]);
    assert_eq!(contents(&ring), b"cdefg");
    assert_eq!((ring.start_seq(), ring.end_seq()), (2, 7));
    assert_invariants(&ring);
}

/// RB-6: one write larger than the capacity keeps only its last `capacity` bytes and drops all
/// earlier content.
#[test]
fn rb06_oversized_write_keeps_only_its_tail() {
    let ring = ring_with(5, &[b"abcdefghij"]);
    assert_eq!(contents(&ring), b"fghij");
    // Earlier content is dropped too.
    let ring = ring_with(5, &[b"xy", b"abcdefghij"]);
    assert_eq!(contents(&ring), b"fghij");
    assert_eq!((ring.start_seq(), ring.end_seq()), (7, 12));
    assert_invariants(&ring);
}

/// RB-7: wrap-around is read correctly.
#[test]
fn rb07_wrap_around_is_correct() {
    let ring = ring_with(5, &[b"abcde", b"fgh"]);
    assert_eq!(contents(&ring), b"defgh");
    assert_eq!(last(&ring, 3), b"fgh");
    assert_invariants(&ring);
}

/// RB-9: a count of zero returns empty data and no error, even from an empty buffer.
#[test]
fn rb09_zero_count_returns_empty() {
    let ring = ring_with(10, &[b"hello"]);
    let (a, b) = ring.read_last(0).unwrap();
    assert!(a.is_empty() && b.is_empty());
    let empty = ring_with(10, &[]);
    let (a, b) = empty.read_last(0).unwrap();
    assert!(a.is_empty() && b.is_empty());
}

/// RB-10: reading exactly the stored size returns everything.
#[test]
fn rb10_read_exactly_stored_size() {
    let ring = ring_with(3, &[b"hello"]);
    assert_eq!(ring.len(), 3);
    assert_eq!(last(&ring, 3), b"llo");
    assert!(ring.read_last(4).is_err());
}

/// RB-11: an empty write is a no-op; the buffer stays empty (and commits no memory).
#[test]
fn rb11_empty_write_is_a_noop() {
    let mut ring = ReplayBuffer::new(10).unwrap();
    assert_eq!(ring.write(b""), 0);
    assert!(ring.is_empty());
    assert_eq!((ring.len(), ring.end_seq(), ring.committed()), (0, 0, 0));
    ring.write(b"abc");
    assert_eq!(ring.write(b""), 0);
    assert_eq!(contents(&ring), b"abc");
    assert_eq!(ring.end_seq(), 3);
}

/// RB-12: small writes concatenate.
#[test]
fn rb12_small_writes_concatenate() {
    let ring = ring_with(10, &[b"ab", b"cd", b"ef"]);
    assert_eq!(last(&ring, 6), b"abcdef");
    assert_eq!(last(&ring, 4), b"cdef");
    assert_eq!(last(&ring, 2), b"ef");
}

/// RB-13: a single byte written to a full buffer evicts exactly one byte.
#[test]
fn rb13_single_byte_eviction_when_full() {
    let mut ring = ring_with(3, &[b"abc"]);
    assert_eq!(ring.write(b"d"), 1);
    assert_eq!(contents(&ring), b"bcd");
    assert_eq!(ring.start_seq(), 1);
}

/// RB-14: repeated wrap-arounds stay correct.
#[test]
fn rb14_repeated_wrap() {
    let mut ring = ring_with(8, &[b"12345678", b"abcd"]);
    assert_eq!(contents(&ring), b"5678abcd");
    ring.write(b"xyz");
    assert_eq!(contents(&ring), b"8abcdxyz");
    assert_eq!(last(&ring, 7), b"abcdxyz");
    assert_eq!(last(&ring, 4), b"dxyz");
    assert_invariants(&ring);
}

/// The 1 KiB block number `k` of the RB-15 workload: its number, then a filler derived from it.
fn block(k: u64) -> [u8; 1024] {
    let mut b = [(k % 251) as u8; 1024];
    b[..8].copy_from_slice(&k.to_le_bytes());
    b
}

/// RB-15: the Go benchmark workload (64 MiB buffer, 1 KiB writes, then read_last of 1..=100
/// bytes) returns correct content, and committed memory never exceeds the capacity.
#[test]
fn rb15_benchmark_workload_is_correct_and_bounded() {
    const CAP: usize = 64 * 1024 * 1024;
    const BLOCKS: u64 = (CAP / 1024) as u64 + 123; // wraps by 123 blocks
    let mut ring = ReplayBuffer::new(CAP).unwrap();
    let mut evicted = 0;
    for k in 0..BLOCKS {
        evicted += ring.write(&block(k));
        assert!(
            ring.committed() <= CAP,
            "committed {} > capacity",
            ring.committed()
        );
    }
    assert_eq!(evicted, 123 * 1024);
    assert_eq!(ring.len(), CAP);
    assert_eq!(ring.committed(), CAP);
    assert_eq!(ring.end_seq(), BLOCKS * 1024);
    let newest = block(BLOCKS - 1);
    for n in 1..=100 {
        assert_eq!(last(&ring, n), &newest[1024 - n..], "read_last({n})");
    }
    // The whole window holds exactly blocks 123..BLOCKS, in order.
    let all = contents(&ring);
    for (i, chunk) in all.chunks_exact(1024).enumerate() {
        assert_eq!(chunk, block(123 + i as u64), "block {}", 123 + i);
    }
}

/// RB-16: no background task outlives a pipe (the Go goleak check): after `close` the runtime
/// has exactly the tasks it had before the pipe was created.
#[tokio::test(flavor = "current_thread")]
async fn rb16_no_task_outlives_a_closed_pipe() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let (rc, mut dialled) = MockReconnector::new();
    let pipe = BackedPipe::with_config(rc, PipeConfig::default().buffer_capacity(1024)).unwrap();
    pipe.connect().await.unwrap();
    assert!(pipe.connected());
    let conn = dialled.recv().await.unwrap();
    assert!(
        metrics.num_alive_tasks() > baseline,
        "the pipe runs a background task while open"
    );
    pipe.close().await.unwrap();
    assert!(!pipe.connected());
    assert_eq!(
        metrics.num_alive_tasks(),
        baseline,
        "a task outlived pipe.close()"
    );
    drop(conn);
}

/// Code-only: a capacity of zero panics in Go; here it is a typed error (for the writer too).
#[test]
fn rb_code_only_zero_capacity_is_a_typed_error() {
    assert!(matches!(ReplayBuffer::new(0), Err(Error::InvalidCapacity)));
    let (tx, _rx) = events();
    let writer = backedpipe::BackedWriter::<MockWriter>::new(0, tx);
    assert!(matches!(writer, Err(Error::InvalidCapacity)));
    assert!(ReplayBuffer::new(1).is_ok());
}

/// Code-only: Go's read_last copies into a fresh allocation. Rust deliberately differs: it
/// borrows the (at most two) slices of the ring, so a replay writes straight from the buffer.
/// Two reads return the same memory, and a wrapped range comes back as two slices.
#[test]
fn rb_code_only_read_last_borrows_instead_of_copying() {
    let ring = ring_with(5, &[b"abcde", b"fgh"]);
    let (a1, b1) = ring.read_last(5).unwrap();
    let (a2, b2) = ring.read_last(5).unwrap();
    assert_eq!(a1.as_ptr(), a2.as_ptr());
    assert_eq!(b1.as_ptr(), b2.as_ptr());
    assert!(
        !a1.is_empty() && !b1.is_empty(),
        "wrapped data spans two slices"
    );
    assert_eq!(a1.len() + b1.len(), 5);
    assert_eq!([a1, b1].concat(), b"defgh");
}

/// Historical: write returned (written, evicted). Rust's write returns the evicted count; the
/// bytes kept show in `len`.
#[test]
fn rb_hist_write_reports_evictions() {
    let mut ring = ReplayBuffer::new(5).unwrap();
    assert_eq!(ring.write(b"abcde"), 0);
    assert_eq!(ring.len(), 5);
    assert_eq!(ring.write(b"fg"), 2);
    assert_eq!(ring.len(), 5);
    let mut fresh = ReplayBuffer::new(5).unwrap();
    assert_eq!(fresh.write(b"0123456789"), 5);
    assert_eq!(fresh.len(), 5);
    assert_eq!(contents(&fresh), b"56789");
}

/// Historical: reading from an empty buffer was an error ("buffer is empty"). It still is, now
/// reported as [`Error::NotEnoughData`] (RB-4); read_last(-1) is unrepresentable.
#[test]
fn rb_hist_empty_buffer_read_is_an_error() {
    let ring = ReplayBuffer::new(5).unwrap();
    assert!(matches!(
        ring.read_last(1),
        Err(Error::NotEnoughData {
            requested: 1,
            available: 0
        })
    ));
}

/// Historical: a default 64 MiB constructor existed; here it is the default pipe capacity.
#[test]
fn rb_hist_default_capacity_is_64_mib() {
    assert_eq!(DEFAULT_BUFFER_SIZE, 64 * 1024 * 1024);
    assert_eq!(PipeConfig::default().capacity(), DEFAULT_BUFFER_SIZE);
    let ring = ReplayBuffer::new(DEFAULT_BUFFER_SIZE).unwrap();
    assert_eq!(ring.capacity(), DEFAULT_BUFFER_SIZE);
    assert_eq!(ring.committed(), 0);
}

/// A record written by the concurrent test: writer id, write number, checksum, padding.
const RECORD: usize = 8;

fn record(writer: u8, n: u16) -> [u8; RECORD] {
    let [hi, lo] = n.to_be_bytes();
    [
        writer,
        hi,
        lo,
        writer ^ hi ^ lo ^ 0x5a,
        0xee,
        0xee,
        0xee,
        0xee,
    ]
}

/// Parses a window of whole records, checking each is intact, and returns them.
fn parse_records(bytes: &[u8]) -> Vec<(u8, u16)> {
    assert_eq!(bytes.len() % RECORD, 0, "window holds a torn record");
    bytes
        .chunks_exact(RECORD)
        .map(|r| {
            let n = u16::from_be_bytes([r[1], r[2]]);
            assert_eq!(r, record(r[0], n), "corrupt record");
            (r[0], n)
        })
        .collect()
}

/// Historical [C]: 10 writers × 100 writes and 5 readers run concurrently (real threads; the
/// buffer behind a Mutex, as the writer holds it), and the buffer stays valid: every window a
/// reader sees is whole, uncorrupted records with each writer's records in order, and at the
/// end the accounting matches exactly.
#[test]
fn rb_hist_concurrent_writers_and_readers_keep_buffer_valid() {
    const WRITERS: u8 = 10;
    const WRITES: u16 = 100;
    const READERS: usize = 5;
    let ring = Arc::new(Mutex::new(ReplayBuffer::new(64 * RECORD).unwrap()));
    let start = Arc::new(Barrier::new(WRITERS as usize + READERS));
    let writers_done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));

    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (ring, start, done, reads) = (
                ring.clone(),
                start.clone(),
                writers_done.clone(),
                reads.clone(),
            );
            thread::spawn(move || {
                start.wait();
                loop {
                    let finished = done.load(Ordering::SeqCst);
                    {
                        let ring = ring.lock().unwrap();
                        assert_invariants(&ring);
                        let mut seen = [None::<u16>; WRITERS as usize];
                        for (w, n) in parse_records(&contents(&ring)) {
                            let prev = seen[w as usize].replace(n);
                            assert!(prev.is_none_or(|p| p < n), "writer {w} out of order");
                        }
                    }
                    reads.fetch_add(1, Ordering::SeqCst);
                    if finished {
                        break;
                    }
                    thread::yield_now();
                }
            })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (ring, start) = (ring.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                for n in 0..WRITES {
                    ring.lock().unwrap().write(&record(w, n));
                }
            })
        })
        .collect();
    for t in writers {
        t.join().unwrap();
    }
    writers_done.store(true, Ordering::SeqCst);
    for t in readers {
        t.join().unwrap();
    }
    assert!(reads.load(Ordering::SeqCst) >= READERS);

    let ring = ring.lock().unwrap();
    assert_invariants(&ring);
    let total = WRITERS as u64 * WRITES as u64 * RECORD as u64;
    assert_eq!(ring.end_seq(), total);
    assert_eq!(ring.len(), 64 * RECORD);
    let records = parse_records(&contents(&ring));
    assert_eq!(records.len(), 64);
    // The newest record is the final write of whichever writer finished last.
    assert!(records.iter().any(|&(_, n)| n == WRITES - 1));
}

/// Rust-only: memory is committed lazily. A 64 MiB buffer commits nothing until written, a
/// small write commits a small block, and growth never exceeds the capacity.
#[test]
fn rb_rust_memory_is_committed_lazily() {
    let mut ring = ReplayBuffer::new(64 * 1024 * 1024).unwrap();
    assert_eq!(ring.committed(), 0);
    ring.write(b"0123456789");
    assert!(ring.committed() >= 10);
    assert!(
        ring.committed() <= 8 * 1024,
        "committed {}",
        ring.committed()
    );
    ring.write(&[7; 100 * 1024]);
    assert!(
        ring.committed() <= 256 * 1024,
        "committed {}",
        ring.committed()
    );
    assert_eq!(&last(&ring, 100 * 1024 + 10)[..10], b"0123456789");

    let mut tiny = ReplayBuffer::new(5).unwrap();
    tiny.write(b"abcdefgh");
    assert_eq!(tiny.committed(), 5);
}

/// Rust-only: growing the storage while the data wraps keeps it in order.
#[test]
fn rb_rust_growth_preserves_wrapped_content() {
    let mut ring = ReplayBuffer::new(64 * 1024).unwrap();
    // Fill the first 4 KiB commitment, trim the front, and wrap.
    ring.write(&[1; 4096]);
    ring.trim_to(4000);
    ring.write(&[2; 100]); // wraps inside the 4 KiB block
    let before = contents(&ring);
    ring.write(&[3; 5000]); // forces growth
    assert!(ring.committed() > 4096);
    let after = contents(&ring);
    assert_eq!(&after[..before.len()], &before[..]);
    assert!(after[before.len()..].iter().all(|&b| b == 3));
    assert_invariants(&ring);
}

/// Rust-only: sequence numbers, slices_from and check_replay_from. A replay offset inside
/// `[start_seq, end_seq]` yields the bytes from there; past the end is FutureSequence; before
/// the oldest byte held is ReplayDataUnavailable; neither error reads or changes anything.
#[test]
fn rb_rust_slices_from_and_check_replay_from() {
    let ring = ring_with(5, &[b"abcde", b"fgh"]);
    assert_eq!((ring.start_seq(), ring.end_seq()), (3, 8));
    for (seq, want) in [(3, &b"defgh"[..]), (5, b"fgh"), (7, b"h"), (8, b"")] {
        ring.check_replay_from(seq).unwrap();
        let (a, b) = ring.slices_from(seq).unwrap();
        assert_eq!([a, b].concat(), want, "slices_from({seq})");
    }
    let future = ring.slices_from(9).unwrap_err();
    assert!(matches!(
        future,
        Error::FutureSequence {
            requested: 9,
            written: 8
        }
    ));
    assert!(matches!(
        ring.check_replay_from(9),
        Err(Error::FutureSequence { .. })
    ));
    let gone = ring.slices_from(2).unwrap_err();
    assert!(matches!(
        gone,
        Error::ReplayDataUnavailable {
            requested: 2,
            oldest: 3
        }
    ));
    assert!(matches!(
        ring.check_replay_from(0),
        Err(Error::ReplayDataUnavailable { .. })
    ));
    assert!(future.is_terminal() && gone.is_terminal());
    assert_eq!(contents(&ring), b"defgh");
}

/// Rust-only: trim_to drops acknowledged bytes, clamps offsets outside the held range, and an
/// emptied buffer keeps counting sequence numbers.
#[test]
fn rb_rust_trim_to_releases_acknowledged_bytes() {
    let mut ring = ring_with(100, &[b"hello world"]);
    ring.trim_to(6);
    assert_eq!((ring.start_seq(), ring.end_seq()), (6, 11));
    assert_eq!(contents(&ring), b"world");
    ring.trim_to(3); // already trimmed: no-op
    assert_eq!(contents(&ring), b"world");
    assert!(matches!(
        ring.check_replay_from(5),
        Err(Error::ReplayDataUnavailable {
            requested: 5,
            oldest: 6
        })
    ));
    ring.trim_to(1000); // clamped to the end
    assert!(ring.is_empty());
    assert_eq!((ring.start_seq(), ring.end_seq()), (11, 11));
    ring.check_replay_from(11).unwrap();
    ring.write(b"x");
    assert_eq!(contents(&ring), b"x");
    assert_eq!((ring.start_seq(), ring.end_seq()), (11, 12));
    assert_invariants(&ring);
}

/// Rust-only: append takes only what fits without evicting, and returns how much it took.
#[test]
fn rb_rust_append_never_evicts() {
    let mut ring = ReplayBuffer::new(5).unwrap();
    assert_eq!(ring.append(b"abc"), 3);
    assert_eq!(ring.append(b"defg"), 2);
    assert_eq!(contents(&ring), b"abcde");
    assert_eq!(ring.append(b"z"), 0);
    assert_eq!(contents(&ring), b"abcde");
    assert_eq!(ring.end_seq(), 5);
    ring.trim_to(2);
    assert_eq!(ring.append(b"fgh"), 2);
    assert_eq!(contents(&ring), b"cdefg");
    assert_eq!((ring.start_seq(), ring.end_seq()), (2, 7));
    assert_eq!(ring.append(b""), 0);
}

#[derive(Debug, Clone)]
enum Op {
    Write(Vec<u8>),
    Append(Vec<u8>),
    Trim(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Op::Write),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Op::Append),
        (0u64..400).prop_map(Op::Trim),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Rust-only: any sequence of write/append/trim_to agrees with a plain deque model, for
    /// every read_last and slices_from.
    #[test]
    fn rb_rust_matches_a_deque_model(capacity in 1usize..24, ops in prop::collection::vec(op(), 0..40)) {
        let mut ring = ReplayBuffer::new(capacity).unwrap();
        let mut model: VecDeque<u8> = VecDeque::new();
        let mut end = 0u64;
        for op in ops {
            match op {
                Op::Write(data) => {
                    let before = model.len();
                    model.extend(&data);
                    end += data.len() as u64;
                    let excess = model.len().saturating_sub(capacity);
                    model.drain(..excess);
                    let evicted = ring.write(&data);
                    prop_assert_eq!(evicted, before + data.len() - model.len());
                }
                Op::Append(data) => {
                    let n = data.len().min(capacity - model.len());
                    model.extend(&data[..n]);
                    end += n as u64;
                    prop_assert_eq!(ring.append(&data), n);
                }
                Op::Trim(seq) => {
                    let start = end - model.len() as u64;
                    let drop = seq.clamp(start, end) - start;
                    model.drain(..drop as usize);
                    ring.trim_to(seq);
                }
            }
            assert_invariants(&ring);
            prop_assert_eq!(ring.end_seq(), end);
            prop_assert_eq!(ring.len(), model.len());
            let held: Vec<u8> = model.iter().copied().collect();
            for n in 0..=held.len() {
                prop_assert_eq!(last(&ring, n), &held[held.len() - n..]);
            }
            prop_assert!(ring.read_last(held.len() + 1).is_err());
            let start = ring.start_seq();
            for seq in start..=end {
                let (a, b) = ring.slices_from(seq).unwrap();
                prop_assert_eq!([a, b].concat(), &held[(seq - start) as usize..]);
            }
            prop_assert!(ring.slices_from(end + 1).is_err());
            if start > 0 {
                prop_assert!(ring.slices_from(start - 1).is_err());
            }
        }
    }
}
