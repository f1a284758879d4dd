//! A pair of raw-mode pipes over loopback TCP: the client side dials through a [`Reconnector`],
//! the server side is passive and attached by an accept loop. Sequence numbers are exchanged as
//! two big-endian `u64`s (client's reader offset first), as a Go-compatible raw deployment does.
//!
//! The rig can tear down the client's current TCP connection from outside the pipe
//! ([`Cutter::cut`]): it keeps a duplicate of the socket and shuts it down in both directions, so
//! both ends see the connection end at once, as they would after a reset.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use backedpipe::{BackedPipe, BoxError, PipeConfig, Reconnector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Dials the rig's listener and exchanges sequence numbers.
struct Dialer {
    addr: SocketAddr,
    current: Arc<Mutex<Option<std::net::TcpStream>>>,
}

impl Reconnector for Dialer {
    type Conn = TcpStream;

    async fn reconnect(&self, reader_seq: u64) -> Result<(TcpStream, u64), BoxError> {
        let mut conn = TcpStream::connect(self.addr).await?;
        conn.set_nodelay(true)?;
        conn.write_u64(reader_seq).await?;
        let remote = conn.read_u64().await?;
        let twin = conn.as_ref_std_clone()?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(twin);
        Ok((conn, remote))
    }
}

/// A duplicate handle of a tokio socket, to shut it down from outside.
pub trait StdClone {
    /// A `std` handle on the same socket.
    fn as_ref_std_clone(&self) -> std::io::Result<std::net::TcpStream>;
}

impl StdClone for TcpStream {
    fn as_ref_std_clone(&self) -> std::io::Result<std::net::TcpStream> {
        let fd = std::os::fd::AsFd::as_fd(self).try_clone_to_owned()?;
        Ok(std::net::TcpStream::from(fd))
    }
}

/// Two connected raw-mode pipes and the means to cut their connection.
pub struct Rig {
    pub client: BackedPipe<TcpStream>,
    pub server: Arc<BackedPipe<TcpStream>>,
    pub cutter: Cutter,
    pub accept_task: tokio::task::JoinHandle<()>,
}

/// Cuts the client's current connection.
pub struct Cutter {
    current: Arc<Mutex<Option<std::net::TcpStream>>>,
}

impl Cutter {
    /// A cutter for the connection stored in `current`.
    pub fn new(current: Arc<Mutex<Option<std::net::TcpStream>>>) -> Cutter {
        Cutter { current }
    }

    /// Shuts the current connection down in both directions.
    pub fn cut(&self) {
        if let Some(conn) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Rig {
    pub async fn new(capacity: usize) -> Result<Rig, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = PipeConfig::default().buffer_capacity(capacity).backoff(
            std::time::Duration::from_millis(1),
            std::time::Duration::from_millis(50),
        );
        let server = Arc::new(BackedPipe::passive(config.clone())?);
        let accept_task = tokio::spawn(accept_loop(listener, server.clone()));
        let current = Arc::default();
        let client = BackedPipe::with_config(
            Dialer {
                addr,
                current: Arc::clone(&current),
            },
            config,
        )?;
        let mut status = server.status();
        client.connect().await?;
        status
            .wait_for(|s| matches!(s, backedpipe::PipeState::Connected))
            .await?;
        Ok(Rig {
            client,
            server,
            cutter: Cutter { current },
            accept_task,
        })
    }
}

async fn accept_loop(listener: TcpListener, server: Arc<BackedPipe<TcpStream>>) {
    // One connection at a time, inline: the rig's only client never dials twice at once.
    while let Ok((mut conn, _)) = listener.accept().await {
        let _ = conn.set_nodelay(true);
        let Ok(client_seq) = conn.read_u64().await else {
            continue;
        };
        // Drop the old connection first and send the offset taken at that instant.
        let Ok(server_seq) = server.detach().await else {
            break;
        };
        if conn.write_u64(server_seq).await.is_err() {
            continue;
        }
        // The request is queued now; its answer is not awaited, since a replay may need the
        // client to read first.
        drop(server.accept_reconnection(client_seq, conn));
    }
}
