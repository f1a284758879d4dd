//! A session-mode pair over loopback TCP: the client is a [`Session`] dialling through a
//! [`TcpConnector`] with the library's default reconnect policy, the server takes every
//! connection through a [`SessionListener`], as a real server does (a handshake task per
//! transport).
//!
//! The rig keeps a duplicate of the server's end of the current connection and can shut it down
//! in both directions from outside ([`Cutter::cut`]), so both ends see the connection end at
//! once, as after a reset. The client then resumes with the authenticated handshake.

use std::sync::{Arc, Mutex};

use backedpipe::session::Incoming;
use backedpipe::session::SessionConfig;
use backedpipe::{
    BoxError, BoxIo, PipeConfig, PipeState, Session, SessionListener, SessionOptions,
    SessionServer, TcpConnector,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::rig::{Cutter, StdClone};

/// Two connected session ends and the means to cut their connection.
pub struct SessionRig {
    /// The client end (it reconnects).
    pub client: Session,
    /// The server end (resumed by the client's new connections).
    pub server: Arc<Session>,
    /// Cuts the current connection.
    pub cutter: Cutter,
    /// The accept loop.
    pub accept_task: tokio::task::JoinHandle<()>,
}

impl SessionRig {
    /// A connected pair whose pipes hold at most `capacity` unacknowledged bytes.
    pub async fn new(capacity: usize) -> Result<SessionRig, BoxError> {
        Self::with_ack_every(capacity, None).await
    }

    /// As [`new`](Self::new), acknowledging every `ack_every` delivered bytes instead of the
    /// library's default.
    pub async fn with_ack_every(
        capacity: usize,
        ack_every: Option<u64>,
    ) -> Result<SessionRig, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut timing = SessionConfig::default();
        if let Some(bytes) = ack_every {
            timing.ack_every = bytes;
        }
        let options = SessionOptions::default()
            .pipe(PipeConfig::default().buffer_capacity(capacity))
            .timing(timing);
        let server = SessionServer::new(options.clone());
        let current = Arc::default();
        let (new_tx, new_rx) = oneshot::channel();
        let accept_task = tokio::spawn(accept_loop(listener, server, Arc::clone(&current), new_tx));
        let client = Session::connect(TcpConnector::new(addr), options).await?;
        let server = new_rx.await?;
        let mut status = server.status();
        status
            .wait_for(|s| matches!(s, PipeState::Connected))
            .await?;
        Ok(SessionRig {
            client,
            server: Arc::new(server),
            cutter: Cutter::new(current),
            accept_task,
        })
    }

    /// Closes both ends and stops the accept loop.
    pub async fn close(self) -> Result<(), BoxError> {
        self.client.close().await?;
        self.server.close().await?;
        self.accept_task.abort();
        Ok(())
    }
}

/// TCP connections as [`TcpListener`]'s own [`Incoming`] gives them, keeping a duplicate of
/// the latest one for the [`Cutter`].
struct TwinIncoming {
    listener: TcpListener,
    current: Arc<Mutex<Option<std::net::TcpStream>>>,
}

impl Incoming for TwinIncoming {
    async fn next(&mut self) -> Option<std::io::Result<BoxIo>> {
        Some(self.listener.accept().await.and_then(|(conn, _)| {
            conn.set_nodelay(true)?;
            if let Ok(twin) = conn.as_ref_std_clone() {
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(twin);
            }
            Ok(Box::new(conn) as BoxIo)
        }))
    }
}

async fn accept_loop(
    listener: TcpListener,
    server: SessionServer,
    current: Arc<Mutex<Option<std::net::TcpStream>>>,
    new: oneshot::Sender<Session>,
) {
    let mut new = Some(new);
    let mut listener = match SessionListener::new(TwinIncoming { listener, current }, server) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("bpbench: session listener failed: {err}");
            return;
        }
    };
    while let Ok(session) = listener.accept().await {
        if let Some(tx) = new.take() {
            let _ = tx.send(session);
        }
    }
}
