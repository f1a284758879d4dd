//! Pushes data both ways through a pair of pipes while cutting their connection over and over,
//! then checks that every byte arrived exactly once, in order.
//!
//! The two pipes are joined by in-memory links with a relay task in the middle; a cut aborts the
//! relay, so whatever was in flight is lost and both sides see their transport fail, as they
//! would when a laptop sleeps. The left pipe reconnects through its `Reconnector`; the right one
//! is passive and is attached by `accept_reconnection`, as a server would be.
//!
//! Run: `cargo run --release --example cutting [MEBIBYTES] [CUTS]`

use std::sync::{Arc, Mutex};
use std::time::Instant;

use backedpipe::{reconnector_fn, BackedPipe, BoxError, PipeConfig};
use tokio::io::DuplexStream;
use tokio::task::JoinHandle;

/// The relay of the current link, so the main task can cut it.
type CurrentLink = Arc<Mutex<Option<JoinHandle<()>>>>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut args = std::env::args().skip(1);
    let mebibytes: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let cuts: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let total = mebibytes << 20;
    let config = PipeConfig::default().buffer_capacity(8 << 20);

    let right = Arc::new(BackedPipe::<DuplexStream>::passive(config.clone())?);
    let link: CurrentLink = Arc::default();
    // The first connection counts as a reconnector call too.
    let reconnects = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let left = {
        let (right, link, reconnects) = (right.clone(), link.clone(), reconnects.clone());
        BackedPipe::with_config(
            reconnector_fn(move |left_read| {
                let (right, link, reconnects) = (right.clone(), link.clone(), reconnects.clone());
                async move {
                    let (left_end, relay_left) = tokio::io::duplex(64 * 1024);
                    let (relay_right, right_end) = tokio::io::duplex(64 * 1024);
                    *link.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(tokio::spawn(relay(relay_left, relay_right)));
                    // The right side stops reading its old link and says how far it got.
                    let right_read = right.detach().await?;
                    // Attached on its own task: the right side's replay may need the left side to
                    // read, which it does only once this call returns. If the attach fails, the
                    // link dies and the left side simply reconnects again.
                    tokio::spawn(right.accept_reconnection(left_read, right_end));
                    reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok::<_, BoxError>((left_end, right_read))
                }
            }),
            config,
        )?
    };
    left.connect().await?;

    let start = Instant::now();
    let left = Arc::new(left);
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let sending = tokio::spawn(send(left.clone(), total, 1));
    let echoing = {
        let right = right.clone();
        tokio::spawn(async move {
            // The right side sends its own stream back while it receives.
            let (r, s) = tokio::join!(
                receive(right.clone(), total, 1, Some(progress_tx)),
                send(right, total, 2)
            );
            s?;
            r
        })
    };
    let receiving = tokio::spawn(receive(left.clone(), total, 2, None));

    // Cut at evenly spaced points of the left-to-right transfer.
    let mut cut = 0;
    for i in 1..=cuts {
        let at = total / (cuts + 1) * i;
        if progress.wait_for(|got| *got >= at).await.is_err() {
            break;
        }
        if let Some(relay) = link.lock().unwrap_or_else(|e| e.into_inner()).take() {
            relay.abort();
            cut += 1;
        }
    }
    let to_right = echoing.await??;
    let to_left = receiving.await??;
    sending.await??;
    let elapsed = start.elapsed();
    right.close().await?;
    // `receive` checked every byte against the pattern as it arrived.
    let reconnects = reconnects.load(std::sync::atomic::Ordering::Relaxed) - 1;
    println!(
        "{mebibytes} MiB each way, {cut} cuts, {reconnects} reconnects, {:.2} s: \
         left->right {to_right} bytes intact, exactly once, right->left {to_left} bytes intact, exactly once",
        elapsed.as_secs_f64(),
    );
    Ok(())
}

/// Copies both ways between the two halves of a link until cut.
async fn relay(mut a: DuplexStream, mut b: DuplexStream) {
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

/// The byte at offset `i` of stream number `stream`: a pattern that exposes any loss,
/// duplication or reordering.
fn pattern(stream: u8, i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 13)) as u8 ^ stream
}

async fn send(
    pipe: Arc<BackedPipe<DuplexStream>>,
    total: usize,
    stream: u8,
) -> Result<(), BoxError> {
    let mut off = 0;
    let mut chunk = Vec::with_capacity(32 * 1024);
    while off < total {
        let n = (total - off).min(32 * 1024);
        chunk.clear();
        chunk.extend((off..off + n).map(|i| pattern(stream, i)));
        pipe.write(&chunk).await?;
        off += n;
    }
    Ok(())
}

/// Reads and checks `total` bytes, reporting progress to the cutter if asked.
async fn receive(
    pipe: Arc<BackedPipe<DuplexStream>>,
    total: usize,
    stream: u8,
    progress: Option<tokio::sync::watch::Sender<usize>>,
) -> Result<usize, BoxError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < total {
        let n = pipe.read(&mut buf).await?;
        check(&buf[..n], off, stream)?;
        off += n;
        if let Some(progress) = &progress {
            progress.send_replace(off);
        }
    }
    Ok(off)
}

fn check(got: &[u8], off: usize, stream: u8) -> Result<(), BoxError> {
    if got.is_empty() {
        return Err(format!("stream {stream} ended early at byte {off}").into());
    }
    match got
        .iter()
        .enumerate()
        .find(|(i, b)| **b != pattern(stream, off + i))
    {
        Some((i, _)) => Err(format!("stream {stream}: wrong byte at offset {}", off + i).into()),
        None => Ok(()),
    }
}
