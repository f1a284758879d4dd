//! How a pipe obtains a new connection: the [`Reconnector`] trait.

use std::future::Future;

use crate::error::BoxError;
use crate::transport::Io;

/// Establishes connections for a [`BackedPipe`](crate::BackedPipe).
///
/// An implementation
/// 1. connects to the remote side,
/// 2. sends it `reader_seq`, the number of bytes this side has read (so the remote replays its
///    data from there),
/// 3. returns the connection and the remote reader's sequence number (how many of our bytes it
///    has read, so our writer replays from there).
///
/// The pipe calls it on [`connect`](crate::BackedPipe::connect), on
/// [`force_reconnect`](crate::BackedPipe::force_reconnect) and after every failure, one call at a
/// time. Closing the pipe drops the returned future, so an implementation needs no cancellation
/// of its own.
///
/// ```
/// use backedpipe::{BoxError, Reconnector};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// use tokio::net::TcpStream;
///
/// struct Dialer(std::net::SocketAddr);
///
/// impl Reconnector for Dialer {
///     type Conn = TcpStream;
///
///     async fn reconnect(&self, reader_seq: u64) -> Result<(TcpStream, u64), BoxError> {
///         let mut conn = TcpStream::connect(self.0).await?;
///         conn.write_u64(reader_seq).await?;
///         let remote_reader_seq = conn.read_u64().await?;
///         Ok((conn, remote_reader_seq))
///     }
/// }
/// ```
pub trait Reconnector: Send + Sync + 'static {
    /// The connection type produced.
    type Conn: Io;

    /// Connects, exchanges sequence numbers, and returns the connection with the remote
    /// reader's sequence number.
    fn reconnect(
        &self,
        reader_seq: u64,
    ) -> impl Future<Output = Result<(Self::Conn, u64), BoxError>> + Send;
}

/// A [`Reconnector`] made from a closure; see [`reconnector_fn`].
#[derive(Debug, Clone)]
pub struct FnReconnector<F>(F);

/// Makes a [`Reconnector`] from a closure taking the local reader's sequence number.
///
/// ```
/// use backedpipe::{reconnector_fn, BoxError};
///
/// let reconnector = reconnector_fn(|_reader_seq| async {
///     let (ours, _theirs) = tokio::io::duplex(1024);
///     Ok::<_, BoxError>((ours, 0))
/// });
/// # let _ = reconnector;
/// ```
pub fn reconnector_fn<F, Fut, C>(f: F) -> FnReconnector<F>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(C, u64), BoxError>> + Send,
    C: Io,
{
    FnReconnector(f)
}

impl<F, Fut, C> Reconnector for FnReconnector<F>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(C, u64), BoxError>> + Send,
    C: Io,
{
    type Conn = C;

    fn reconnect(
        &self,
        reader_seq: u64,
    ) -> impl Future<Output = Result<(C, u64), BoxError>> + Send {
        (self.0)(reader_seq)
    }
}
