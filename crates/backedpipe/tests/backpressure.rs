//! Session-mode retention: bytes are kept until the peer acknowledges them, writes wait when
//! the capacity is unacknowledged, and memory stays bounded whatever the peer does.

mod common;

use backedpipe::{BackedWriter, Error, Retention};
use common::*;
use tokio::io::AsyncReadExt;

/// Lets every other task on this single-threaded runtime run until it parks.
async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

/// The peer reads but never acknowledges: the writer stops at the capacity (no eviction), and
/// each acknowledgement lets exactly that much more through.
#[tokio::test(start_paused = true)]
async fn a_writer_blocks_at_the_capacity_until_acknowledged() {
    let (events, _failures) = events();
    let writer = std::sync::Arc::new(
        BackedWriter::with_retention(1024, Retention::UntilAcked, events).unwrap(),
    );
    let (transport, mut peer) = tokio::io::duplex(1 << 20);
    writer.reconnect(0, transport).await.unwrap();

    writer.write(&[1; 1000]).await.unwrap();
    let blocked = {
        let writer = writer.clone();
        tokio::spawn(async move { writer.write(&[2; 100]).await })
    };
    // Only 24 bytes fit; the rest waits for an acknowledgement. On this single-threaded
    // runtime, yielding lets the spawned write run until it parks.
    settle().await;
    assert!(!blocked.is_finished());
    assert_eq!(writer.sequence_num(), 1024);
    assert_eq!(
        writer.buffered().0,
        1024,
        "nothing unacknowledged was evicted"
    );

    writer.acknowledge(500).unwrap();
    assert_eq!(blocked.await.unwrap().unwrap(), 100);
    assert_eq!(writer.sequence_num(), 1100);
    assert_eq!(writer.buffered().0, 600);
    let mut got = vec![0; 1100];
    peer.read_exact(&mut got).await.unwrap();
    assert!(got[..1000].iter().all(|b| *b == 1) && got[1000..].iter().all(|b| *b == 2));
}

/// A peer that stops reading and acknowledging cannot make the writer hold more than the
/// capacity, however much the application tries to write.
#[tokio::test(start_paused = true)]
async fn memory_stays_bounded_when_the_peer_stops() {
    let (events, _failures) = events();
    let writer = std::sync::Arc::new(
        BackedWriter::with_retention(4096, Retention::UntilAcked, events).unwrap(),
    );
    let (transport, _peer) = tokio::io::duplex(1 << 20);
    writer.reconnect(0, transport).await.unwrap();
    let flood = {
        let writer = writer.clone();
        tokio::spawn(async move { writer.write(&vec![7; 1 << 20]).await })
    };
    settle().await;
    assert!(
        !flood.is_finished(),
        "the write cannot complete without acknowledgements"
    );
    let (held, committed) = writer.buffered();
    assert_eq!(held, 4096);
    assert!(
        committed <= 4096,
        "{committed} bytes committed for a 4096-byte capacity"
    );
    writer.close().unwrap();
    assert!(matches!(flood.await.unwrap(), Err(Error::WriterClosed)));
}

/// An acknowledgement beyond what was written is a lie: a typed error, nothing released.
#[tokio::test]
async fn an_acknowledgement_from_the_future_is_rejected() {
    let (events, _failures) = events();
    let writer = BackedWriter::with_retention(64, Retention::UntilAcked, events).unwrap();
    writer.reconnect(0, tokio::io::sink()).await.unwrap();
    writer.write(b"hello").await.unwrap();
    assert!(matches!(
        writer.acknowledge(6),
        Err(Error::FutureSequence {
            requested: 6,
            written: 5
        })
    ));
    assert_eq!(writer.buffered().0, 5);
    // A resume from before the acknowledged point cannot be served and says so.
    writer.acknowledge(3).unwrap();
    assert!(matches!(
        writer.reconnect(1, tokio::io::sink()).await,
        Err(Error::ReplayDataUnavailable {
            requested: 1,
            oldest: 3
        })
    ));
}

/// Below a large capacity, the writer lets out no more than its in-flight window (1 MiB on a
/// path with nothing measured yet), and acknowledgements let more through.
#[tokio::test(start_paused = true)]
async fn a_writer_keeps_no_more_than_its_in_flight_window_unacknowledged() {
    const CHUNK: usize = 64 * 1024;
    const WINDOW: u64 = 1 << 20;
    let (events, _failures) = events();
    let writer = std::sync::Arc::new(
        BackedWriter::with_retention(16 << 20, Retention::UntilAcked, events).unwrap(),
    );
    writer.reconnect(0, tokio::io::sink()).await.unwrap();
    let flood = {
        let writer = writer.clone();
        tokio::spawn(async move {
            for _ in 0..64 {
                writer.write(&[5; CHUNK]).await?;
            }
            Ok::<_, Error>(())
        })
    };
    settle().await;
    assert!(!flood.is_finished(), "4 MiB cannot go out unacknowledged");
    // The window is a threshold: the write that crosses it goes out whole.
    let sent = writer.sequence_num();
    assert!(
        (WINDOW..WINDOW + CHUNK as u64).contains(&sent),
        "{sent} bytes out for a {WINDOW}-byte window"
    );
    writer.acknowledge(WINDOW / 2).unwrap();
    settle().await;
    let more = writer.sequence_num() - sent;
    assert!(
        (WINDOW / 2 - CHUNK as u64..=WINDOW / 2 + CHUNK as u64).contains(&more),
        "an acknowledgement of {} let {more} more bytes out",
        WINDOW / 2
    );
    writer.close().unwrap();
    assert!(matches!(flood.await.unwrap(), Err(Error::WriterClosed)));
}
