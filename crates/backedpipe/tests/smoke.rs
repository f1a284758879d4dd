mod common;
use backedpipe::BackedPipe;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn smoke_round_trip_and_reconnect() {
    let (rc, mut dialled) = MockReconnector::new();
    let pipe = std::sync::Arc::new(BackedPipe::new(rc.clone()).unwrap());
    pipe.connect().await.unwrap();
    let mut d1 = dialled.recv().await.unwrap();
    pipe.write(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    d1.peer.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    d1.peer.write_all(b"world").await.unwrap();
    assert_eq!(pipe.read(&mut buf).await.unwrap(), 5);
    assert_eq!(&buf, b"world");
    rc.otherwise(Some(2));
    d1.killer.kill();
    let p2 = pipe.clone();
    let w = tokio::spawn(async move { p2.write(b"!!").await });
    let mut d2 = dialled.recv().await.unwrap();
    assert_eq!(d2.reader_seq, 5);
    w.await.unwrap().unwrap();
    let mut buf = [0u8; 5];
    d2.peer.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"llo!!");
    pipe.close().await.unwrap();
    assert_eq!(rc.calls(), 2);
}
