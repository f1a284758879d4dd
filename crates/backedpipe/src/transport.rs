//! What session mode runs over: any byte stream ([`Io`]), and how a client opens a fresh one
//! ([`Connector`]). TCP and Unix-socket connectors live here; TLS wraps any of them
//! ([`TlsConnector`](crate::TlsConnector)).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream session mode can run over: TCP, a Unix socket, TLS, an HTTP upgrade, an
/// in-memory duplex, ...
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`], so that sessions over different transports have one type.
pub type BoxIo = Box<dyn Io>;

/// Opens a fresh transport to the server, for a session's first connection and every resume.
///
/// The session bounds each call with its
/// [`connect_timeout`](crate::SessionOptions::connect_timeout) (3 s), then runs its handshake
/// over what this returns within the
/// [`handshake_timeout`](crate::SessionOptions::handshake_timeout) (10 s): a resume whose HELLO
/// is never answered is abandoned after that, not after the connect timeout. An implementation
/// needs no timeout of its own.
///
/// A failure is retried with backoff, unless the `io::Error` wraps one of this crate's terminal
/// errors (`io::Error::other(Error::SessionExpired(id))`, say, when an outer protocol such as an
/// HTTP upgrade says the session is gone): the session then fails with that error.
///
/// ```
/// use backedpipe::{BoxIo, Connector};
///
/// struct Loopback;
///
/// impl Connector for Loopback {
///     async fn connect(&self) -> std::io::Result<BoxIo> {
///         let (ours, _theirs) = tokio::io::duplex(1024);
///         Ok(Box::new(ours))
///     }
/// }
/// ```
pub trait Connector: Send + Sync + 'static {
    /// Opens one transport.
    fn connect(&self) -> impl Future<Output = io::Result<BoxIo>> + Send;
}

/// Dials a TCP address, with `TCP_NODELAY` set (the session protocol writes whole frames and
/// acknowledges promptly; Nagle would only delay it).
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// use backedpipe::{Connector, TcpConnector};
///
/// let transport = TcpConnector::new("127.0.0.1:7400".parse().unwrap()).connect().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TcpConnector {
    addr: SocketAddr,
}

impl TcpConnector {
    /// A connector for `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        TcpConnector { addr }
    }
}

impl Connector for TcpConnector {
    async fn connect(&self) -> io::Result<BoxIo> {
        let stream = tokio::net::TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(Box::new(stream))
    }
}

/// Dials a Unix-domain socket.
#[cfg(unix)]
#[derive(Debug, Clone)]
pub struct UnixConnector {
    path: PathBuf,
}

#[cfg(unix)]
impl UnixConnector {
    /// A connector for the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        UnixConnector { path: path.into() }
    }
}

#[cfg(unix)]
impl Connector for UnixConnector {
    async fn connect(&self) -> io::Result<BoxIo> {
        Ok(Box::new(tokio::net::UnixStream::connect(&self.path).await?))
    }
}

/// A [`Connector`] made from a closure; see [`connector_fn`].
#[derive(Debug, Clone)]
pub struct FnConnector<F>(F);

/// Makes a [`Connector`] from a closure returning a future of a transport.
///
/// ```
/// use backedpipe::{connector_fn, BoxIo};
///
/// let connector = connector_fn(|| async {
///     let (ours, _theirs) = tokio::io::duplex(1024);
///     Ok::<BoxIo, std::io::Error>(Box::new(ours))
/// });
/// # let _ = connector;
/// ```
pub fn connector_fn<F, Fut>(f: F) -> FnConnector<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<BoxIo>> + Send,
{
    FnConnector(f)
}

impl<F, Fut> Connector for FnConnector<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<BoxIo>> + Send,
{
    fn connect(&self) -> impl Future<Output = io::Result<BoxIo>> + Send {
        (self.0)()
    }
}
