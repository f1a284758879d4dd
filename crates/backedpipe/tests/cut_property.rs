//! Property: two pipes joined by an in-memory link that is cut at random points, with random
//! write and read sizes and both directions flowing at once, deliver to each side exactly the
//! bytes the other wrote, once, in order.
//!
//! The link has a relay task in the middle; a cut aborts it, so whatever was in flight is lost
//! and both pipes see their transport fail. The left pipe reconnects through its reconnector;
//! the right one is passive and is attached with `detach` + `accept_reconnection`, as a server
//! would be. Each case runs on a single-threaded runtime with paused time, so it is
//! deterministic for its inputs; a case that stops making progress fails on a virtual timeout
//! instead of hanging.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backedpipe::{reconnector_fn, BackedPipe, BoxError, PipeConfig};
use proptest::prelude::*;
use tokio::io::DuplexStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

type Pipe = Arc<BackedPipe<DuplexStream>>;

/// The byte at `offset` of stream `stream`: a hash, so loss, duplication or reordering of any
/// run of bytes shows.
fn pattern(stream: u64, offset: u64) -> u8 {
    let mut z = offset.wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u8
}

/// Sizes drawn from a seeded generator, so each case is reproducible.
struct Sizes(u64);

impl Sizes {
    fn next(&mut self, max: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let z = (self.0 ^ (self.0 >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        1 + (z ^ (z >> 29)) as usize % max
    }
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    left_bytes: usize,
    right_bytes: usize,
    max_write: usize,
    max_read: usize,
    link_buffer: usize,
    /// Cut when the right side has received this many bytes...
    cuts_left_to_right: Vec<usize>,
    /// ...and when the left side has received this many.
    cuts_right_to_left: Vec<usize>,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        0usize..300_000,
        0usize..300_000,
        1usize..40_000,
        1usize..40_000,
        1usize..32_768,
        proptest::collection::vec(0usize..300_000, 0..8),
        proptest::collection::vec(0usize..300_000, 0..8),
    )
        .prop_map(
            |(seed, left_bytes, right_bytes, max_write, max_read, link_buffer, mut lr, mut rl)| {
                lr.sort_unstable();
                rl.sort_unstable();
                Case {
                    seed,
                    left_bytes,
                    right_bytes,
                    max_write,
                    max_read,
                    link_buffer,
                    cuts_left_to_right: lr,
                    cuts_right_to_left: rl,
                }
            },
        )
}

/// The relay of the current link.
type Link = Arc<Mutex<Option<JoinHandle<()>>>>;

/// Builds the connected pair.
async fn pair(link_buffer: usize) -> Result<(Pipe, Pipe, Link), BoxError> {
    let config = PipeConfig::default()
        .buffer_capacity(1 << 20)
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
        .backoff_seed(3);
    let right: Pipe = Arc::new(BackedPipe::passive(config.clone())?);
    let link: Link = Arc::default();
    let left = {
        let (right, link) = (right.clone(), link.clone());
        BackedPipe::with_config(
            reconnector_fn(move |left_read| {
                let (right, link) = (right.clone(), link.clone());
                async move {
                    let (left_end, relay_left) = tokio::io::duplex(link_buffer);
                    let (relay_right, right_end) = tokio::io::duplex(link_buffer);
                    let relay = tokio::spawn(async move {
                        let (mut a, mut b) = (relay_left, relay_right);
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    });
                    *link.lock().unwrap() = Some(relay);
                    let right_read = right.detach().await?;
                    tokio::spawn(right.accept_reconnection(left_read, right_end));
                    Ok::<_, BoxError>((left_end, right_read))
                }
            }),
            config,
        )?
    };
    left.connect().await?;
    Ok((Arc::new(left), right, link))
}

async fn send(
    pipe: Pipe,
    total: usize,
    stream: u64,
    mut sizes: Sizes,
    max: usize,
) -> Result<(), BoxError> {
    let mut offset = 0;
    let mut chunk = Vec::new();
    while offset < total {
        let n = sizes.next(max).min(total - offset);
        chunk.clear();
        chunk.extend((offset..offset + n).map(|i| pattern(stream, i as u64)));
        assert_eq!(pipe.write(&chunk).await?, n);
        offset += n;
    }
    Ok(())
}

/// Reads and checks `total` bytes, reports `done`, then keeps a read in flight (as a reader loop
/// of a real application would) until the pipe closes: the raw byte stream has no liveness
/// check, so a transport failure is noticed only by a read or write in progress. Any byte
/// beyond `total` is an error.
async fn receive(
    pipe: Pipe,
    total: usize,
    stream: u64,
    mut sizes: Sizes,
    max: usize,
    progress: watch::Sender<usize>,
    done: oneshot::Sender<()>,
) -> Result<(), BoxError> {
    let mut buf = vec![0; max];
    let mut offset = 0;
    let mut done = Some(done);
    loop {
        if offset == total {
            if let Some(done) = done.take() {
                let _ = done.send(());
            }
        }
        let want = sizes.next(max);
        let n = pipe.read(&mut buf[..want]).await?;
        if n == 0 {
            return if offset == total {
                Ok(())
            } else {
                Err(format!("stream {stream} ended at {offset} of {total}").into())
            };
        }
        if offset + n > total {
            return Err(format!(
                "stream {stream}: {} bytes more than were written",
                offset + n - total
            )
            .into());
        }
        for (i, byte) in buf[..n].iter().enumerate() {
            let at = offset + i;
            if *byte != pattern(stream, at as u64) {
                return Err(format!("stream {stream}: wrong byte at offset {at}").into());
            }
        }
        offset += n;
        progress.send_replace(offset);
    }
}

/// Cuts the link each time a receiver passes one of its thresholds.
async fn cutter(link: Link, mut progress: watch::Receiver<usize>, thresholds: Vec<usize>) -> usize {
    let mut cuts = 0;
    for at in thresholds {
        if progress.wait_for(|got| *got >= at).await.is_err() {
            break;
        }
        if let Some(relay) = link.lock().unwrap().take() {
            relay.abort();
            cuts += 1;
        }
    }
    cuts
}

async fn run(case: Case) -> Result<usize, BoxError> {
    let (left, right, link) = pair(case.link_buffer).await?;
    let (lr_tx, lr_rx) = watch::channel(0);
    let (rl_tx, rl_rx) = watch::channel(0);
    let (right_done_tx, right_done) = oneshot::channel();
    let (left_done_tx, left_done) = oneshot::channel();
    let seed = case.seed;
    let senders = [
        tokio::spawn(send(
            left.clone(),
            case.left_bytes,
            1,
            Sizes(seed),
            case.max_write,
        )),
        tokio::spawn(send(
            right.clone(),
            case.right_bytes,
            2,
            Sizes(seed ^ 1),
            case.max_write,
        )),
    ];
    let receivers = [
        tokio::spawn(receive(
            right.clone(),
            case.left_bytes,
            1,
            Sizes(seed ^ 2),
            case.max_read,
            lr_tx,
            right_done_tx,
        )),
        tokio::spawn(receive(
            left.clone(),
            case.right_bytes,
            2,
            Sizes(seed ^ 3),
            case.max_read,
            rl_tx,
            left_done_tx,
        )),
    ];
    let cutters = [
        tokio::spawn(cutter(link.clone(), lr_rx, case.cuts_left_to_right.clone())),
        tokio::spawn(cutter(link.clone(), rl_rx, case.cuts_right_to_left.clone())),
    ];
    for sender in senders {
        sender.await??;
    }
    // A receiver that fails reports through its task; one that finishes says so.
    let _ = tokio::join!(right_done, left_done);
    left.close().await?;
    right.close().await?;
    for receiver in receivers {
        receiver.await??;
    }
    let mut cuts = 0;
    for cutter in cutters {
        cutter.abort();
        cuts += cutter.await.unwrap_or(0);
    }
    Ok(cuts)
}

fn run_case(case: Case) -> Result<usize, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        match tokio::time::timeout(Duration::from_secs(3600), run(case)).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("no progress: the pair stalled".to_string()),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_byte_arrives_once_in_order_across_random_cuts(case in cases()) {
        let outcome = run_case(case.clone());
        prop_assert!(outcome.is_ok(), "{:?}: {:?}", case, outcome);
    }
}

/// A fixed heavy case, so at least one run cuts many times mid-stream in both directions.
#[test]
fn many_cuts_both_ways() {
    let case = Case {
        seed: 7,
        left_bytes: 2 << 20,
        right_bytes: 2 << 20,
        max_write: 50_000,
        max_read: 30_000,
        link_buffer: 16_384,
        cuts_left_to_right: (1..40).map(|i| i * 50_000).collect(),
        cuts_right_to_left: (1..40).map(|i| i * 50_000 + 25_000).collect(),
    };
    let cuts = run_case(case).expect("every byte once, in order");
    assert!(cuts >= 40, "only {cuts} cuts landed");
}
