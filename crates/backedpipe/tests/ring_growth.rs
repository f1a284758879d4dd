//! How a [`ReplayBuffer`] grows: memory is committed only as bytes are written, and what it
//! holds stays where it is while it grows (a growing ring used to move into a fresh allocation
//! twice its size at every doubling, copying and first-touching everything again).

use std::collections::VecDeque;

use backedpipe::ReplayBuffer;
use proptest::prelude::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Every byte `ring` holds, oldest first.
fn contents(ring: &ReplayBuffer) -> Vec<u8> {
    let (a, b) = ring.read_last(ring.len()).expect("read_last");
    [a, b].concat()
}

/// The address of the oldest byte held.
fn oldest_at(ring: &ReplayBuffer) -> *const u8 {
    ring.read_last(ring.len()).expect("read_last").0.as_ptr()
}

/// Chunk `k` of a stream of 64 KiB chunks: its number, then a filler derived from it.
fn chunk(k: usize) -> Vec<u8> {
    let mut c = vec![(k % 253) as u8; 64 * KIB];
    c[..8].copy_from_slice(&(k as u64).to_le_bytes());
    c
}

/// Raw mode's pattern (writes only, never trimmed): while a large ring fills, it commits
/// exactly the bytes written, and once it is past its small-ring stage the bytes it holds never
/// move again, through filling up and wrapping around.
#[test]
fn a_filling_ring_commits_what_it_holds_and_never_moves_it() {
    const CAP: usize = 8 * MIB;
    let mut ring = ReplayBuffer::new(CAP).unwrap();
    let mut pinned: Option<*const u8> = None;
    let chunks = CAP / (64 * KIB) + 40; // wraps by 40 chunks
    for k in 0..chunks {
        ring.write(&chunk(k));
        let written = (k + 1) * 64 * KIB;
        if written <= CAP {
            assert_eq!(ring.committed(), written, "committed more than written");
        } else {
            assert_eq!(ring.committed(), CAP);
        }
        if written > 2 * MIB {
            // Past 1 MiB the whole capacity is reserved: nothing moves from here on.
            let storage_start = if written <= CAP {
                oldest_at(&ring)
            } else {
                // Wrapped: the second slice starts at the front of the storage.
                ring.read_last(ring.len()).unwrap().1.as_ptr()
            };
            assert_eq!(*pinned.get_or_insert(storage_start), storage_start, "moved");
        }
    }
    let all = contents(&ring);
    assert_eq!(all.len(), CAP);
    for (i, c) in all.chunks_exact(64 * KIB).enumerate() {
        assert_eq!(c, chunk(40 + i), "chunk {}", 40 + i);
    }
}

/// Session mode's pattern: bytes appended and trimmed as they are acknowledged. A ring that
/// never holds much keeps a small span, so its write position stays in a small region (it does
/// not march through its whole capacity).
#[test]
fn a_ring_that_holds_little_stays_small() {
    let mut ring = ReplayBuffer::new(64 * MIB).unwrap();
    for k in 0..1000 {
        assert_eq!(ring.append(&chunk(k)), 64 * KIB);
        // The peer acknowledges all but the newest 200 KiB.
        ring.trim_to(ring.end_seq().saturating_sub(200 * KIB as u64));
    }
    assert_eq!(ring.len(), 200 * KIB);
    assert!(
        ring.committed() <= 512 * KIB,
        "committed {} for at most 264 KiB held at once",
        ring.committed()
    );
}

#[derive(Debug, Clone)]
enum Op {
    Write(usize),
    Append(usize),
    /// Trim all but this many of the newest bytes.
    TrimKeeping(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..9 * KIB).prop_map(Op::Write),
        (0usize..9 * KIB).prop_map(Op::Append),
        (0usize..40 * KIB).prop_map(Op::TrimKeeping),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Writes, appends and trims on rings large enough to grow several times, so that they
    /// grow while wrapped around (the one case where growing moves bytes): the ring agrees
    /// with a deque model, and commits no more than its capacity.
    #[test]
    fn growing_while_wrapped_keeps_every_byte(
        capacity in 4 * KIB..48 * KIB,
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let mut ring = ReplayBuffer::new(capacity).unwrap();
        let mut model: VecDeque<u8> = VecDeque::new();
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Write(n) => {
                    let data: Vec<u8> = (next..next + n as u64).map(|i| (i % 251) as u8).collect();
                    next += n as u64;
                    model.extend(&data);
                    let excess = model.len().saturating_sub(capacity);
                    model.drain(..excess);
                    prop_assert_eq!(ring.write(&data), excess);
                }
                Op::Append(n) => {
                    let taken = n.min(capacity - model.len());
                    let data: Vec<u8> = (next..next + n as u64).map(|i| (i % 251) as u8).collect();
                    next += taken as u64;
                    model.extend(&data[..taken]);
                    prop_assert_eq!(ring.append(&data), taken);
                }
                Op::TrimKeeping(keep) => {
                    let drop = model.len().saturating_sub(keep);
                    model.drain(..drop);
                    ring.trim_to(ring.end_seq() - model.len() as u64);
                }
            }
            prop_assert_eq!(ring.len(), model.len());
            prop_assert_eq!(ring.end_seq(), next);
            prop_assert!(ring.committed() <= capacity);
            prop_assert!(ring.committed() >= ring.len());
            let held: Vec<u8> = model.iter().copied().collect();
            prop_assert_eq!(contents(&ring), held.clone());
            let start = ring.start_seq();
            let mid = start + held.len() as u64 / 2;
            let (a, b) = ring.slices_from(mid).unwrap();
            prop_assert_eq!([a, b].concat(), &held[(mid - start) as usize..]);
        }
    }
}
