//! The pipe's background task: the one place where connections are made, replaced and given up.
//!
//! Every reconnect runs here, one at a time. User requests (`connect`, `force_reconnect`,
//! `accept_reconnection`) and failure events from the reader and writer arrive on channels;
//! requests that arrive while a reconnect runs join it (single flight), and failures of an older
//! generation are ignored. Closing the pipe cancels whatever is in progress, including a
//! reconnector call, and ends the task.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::backoff::Backoff;
use crate::error::{BoxError, Error, Result};
use crate::event::ErrorEvent;
use crate::pipe::{PipeState, Shared};
use crate::reconnector::Reconnector;
use crate::transport::Io;

/// A request from a user handle to the supervisor.
#[derive(Debug)]
pub(crate) enum Request<C> {
    Connect {
        reply: oneshot::Sender<Result<()>>,
    },
    ForceReconnect {
        reply: oneshot::Sender<Result<()>>,
    },
    Accept {
        remote_seq: u64,
        conn: C,
        reply: oneshot::Sender<Result<()>>,
    },
    Detach {
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Internal: reconnect with retries after losing an established connection.
    Resume,
}

/// What a reconnect does once it runs.
enum Plan<C> {
    /// Ask the reconnector; with `retry`, keep going with backoff until success or close.
    Dial { retry: bool },
    /// Attach a connection the peer opened.
    Attach { remote_seq: u64, conn: C },
}

/// The reconnector type of a passive pipe, which has none.
#[derive(Debug)]
pub(crate) struct NoReconnector<C>(PhantomData<fn() -> C>);

impl<C: Io> Reconnector for NoReconnector<C> {
    type Conn = C;

    fn reconnect(&self, _: u64) -> impl Future<Output = Result<(C, u64), BoxError>> + Send {
        std::future::ready(Err("pipe has no reconnector".into()))
    }
}

pub(crate) struct Supervisor<R: Reconnector> {
    shared: Arc<Shared<R::Conn>>,
    reconnector: Option<R>,
    requests: mpsc::UnboundedReceiver<Request<R::Conn>>,
    events: mpsc::UnboundedReceiver<ErrorEvent>,
    /// Requests that arrived during a reconnect and could not join it.
    backlog: VecDeque<Request<R::Conn>>,
    backoff: Backoff,
    max_attempts: Option<u32>,
    /// Set by the first successful connection: from then on, losing it starts retries.
    established: bool,
}

impl<R: Reconnector> Supervisor<R> {
    pub(crate) fn new(
        shared: Arc<Shared<R::Conn>>,
        reconnector: Option<R>,
        requests: mpsc::UnboundedReceiver<Request<R::Conn>>,
        events: mpsc::UnboundedReceiver<ErrorEvent>,
        backoff: Backoff,
        max_attempts: Option<u32>,
    ) -> Self {
        Supervisor {
            shared,
            reconnector,
            requests,
            events,
            backlog: VecDeque::new(),
            backoff,
            max_attempts,
            established: false,
        }
    }

    pub(crate) async fn run(mut self) {
        let closed = self.shared.closed.clone();
        loop {
            if closed.is_cancelled() {
                break;
            }
            if let Some(request) = self.backlog.pop_front() {
                self.on_request(request).await;
                continue;
            }
            tokio::select! {
                biased;
                () = closed.cancelled() => break,
                Some(request) = self.requests.recv() => self.on_request(request).await,
                Some(event) = self.events.recv() => self.on_failure(event),
                else => break,
            }
        }
        tracing::debug!("pipe supervisor stopped");
    }

    async fn on_request(&mut self, request: Request<R::Conn>) {
        let request = match request {
            Request::Detach { reply } => {
                let _ = reply.send(self.detach());
                return;
            }
            other => other,
        };
        let state = self.shared.state();
        let refusal = match &state {
            PipeState::Closed => Some(Error::PipeClosed),
            PipeState::Failed(err) => Some(err.clone()),
            PipeState::Connected if matches!(request, Request::Connect { .. }) => {
                Some(Error::PipeAlreadyConnected)
            }
            _ => None,
        };
        let (reply, plan) = match request {
            Request::Connect { reply } | Request::ForceReconnect { reply } => {
                (Some(reply), Plan::Dial { retry: false })
            }
            Request::Accept {
                remote_seq,
                conn,
                reply,
            } => (Some(reply), Plan::Attach { remote_seq, conn }),
            Request::Resume if refusal.is_none() && !matches!(state, PipeState::Connected) => {
                (None, Plan::Dial { retry: true })
            }
            Request::Resume | Request::Detach { .. } => return,
        };
        if let Some(err) = refusal {
            if let Some(reply) = reply {
                let _ = reply.send(Err(err));
            }
            return;
        }
        self.flight(reply.into_iter().collect(), plan).await;
    }

    /// Drops the current connection and returns the read offset at that instant, for a peer
    /// that is about to resume.
    fn detach(&mut self) -> Result<u64> {
        match self.shared.state() {
            PipeState::Closed => return Err(Error::PipeClosed),
            PipeState::Failed(err) => return Err(err),
            _ => {}
        }
        let seq = self.shared.begin_generation()?;
        self.shared.set_state(PipeState::Disconnected);
        Ok(seq)
    }

    fn on_failure(&mut self, event: ErrorEvent) {
        let current = self.shared.generation();
        if event.generation != current || !matches!(self.shared.state(), PipeState::Connected) {
            tracing::trace!(%event, current, "ignoring failure of an old connection");
            return;
        }
        if let Some(err) = Error::from_io(&event.err).filter(|err| err.is_terminal()) {
            // The peer closed the session or broke the protocol: no reconnect can help.
            self.shared.fail(err.clone());
            return;
        }
        tracing::info!(%event, "connection lost");
        self.shared.reader.detach();
        self.shared.writer.detach();
        self.shared.set_state(PipeState::Disconnected);
        if self.reconnector.is_some() {
            self.backlog.push_back(Request::Resume);
        }
    }

    /// Runs one reconnect to its end (or until close) and answers everyone who joined it.
    async fn flight(&mut self, mut waiters: Vec<oneshot::Sender<Result<()>>>, plan: Plan<R::Conn>) {
        let result = {
            let Supervisor {
                shared,
                reconnector,
                requests,
                backlog,
                backoff,
                max_attempts,
                ..
            } = self;
            let work = async {
                match plan {
                    Plan::Dial { retry } => {
                        dial(shared, reconnector.as_ref(), backoff, retry, *max_attempts).await
                    }
                    Plan::Attach { remote_seq, conn } => {
                        let result = match shared.begin_generation() {
                            Ok(_) => shared.attach(conn, remote_seq).await,
                            Err(err) => Err(err),
                        };
                        settle(shared, result)
                    }
                }
            };
            tokio::pin!(work);
            loop {
                tokio::select! {
                    biased;
                    () = shared.closed.cancelled() => break Err(Error::PipeClosed),
                    Some(request) = requests.recv() => match request {
                        Request::ForceReconnect { reply } => waiters.push(reply),
                        Request::Connect { reply } => {
                            let _ = reply.send(Err(Error::ReconnectionInProgress));
                        }
                        other => backlog.push_back(other),
                    },
                    result = &mut work => {
                        // A force_reconnect registered before the reconnect finished joins it,
                        // even if it arrived after `recv` was last polled in this round.
                        while let Ok(request) = requests.try_recv() {
                            match request {
                                Request::ForceReconnect { reply } => waiters.push(reply),
                                other => backlog.push_back(other),
                            }
                        }
                        break result;
                    }
                }
            }
        };
        tracing::debug!(
            ?result,
            generation = self.shared.generation(),
            "reconnect finished"
        );
        match &result {
            Ok(()) => self.established = true,
            Err(err) if !err.is_terminal() && self.established && self.reconnector.is_some() => {
                // A failed forced reconnect must not strand an established pipe.
                self.backlog.push_back(Request::Resume);
            }
            Err(_) => {}
        }
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

/// Asks the reconnector for connections until one attaches, or (without `retry`) once.
async fn dial<R: Reconnector>(
    shared: &Shared<R::Conn>,
    reconnector: Option<&R>,
    backoff: &mut Backoff,
    retry: bool,
    max_attempts: Option<u32>,
) -> Result<()> {
    let Some(reconnector) = reconnector else {
        return Err(Error::reconnect_failed("pipe has no reconnector"));
    };
    backoff.reset();
    loop {
        let result = reconnect_once(shared, reconnector).await;
        let err = match settle(shared, result) {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        if !retry || err.is_terminal() {
            return Err(err);
        }
        let attempts = backoff.attempt() + 1;
        if max_attempts.is_some_and(|max| attempts >= max) {
            shared.fail(err.clone());
            return Err(err);
        }
        let delay = backoff.next_delay();
        // Expected while the network is away (the pipe's status says so): not a warning.
        let cause = std::error::Error::source(&err).map(ToString::to_string);
        tracing::info!(attempt = attempts, ?delay, error = %err, cause, "reconnect failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

/// One reconnector call: detach the old connection (capturing the read offset), dial, attach.
async fn reconnect_once<R: Reconnector>(shared: &Shared<R::Conn>, reconnector: &R) -> Result<()> {
    let reader_seq = shared.begin_generation()?;
    let (conn, remote_seq) = reconnector
        .reconnect(reader_seq)
        .await
        .map_err(Error::reconnect_failed)?;
    shared.attach(conn, remote_seq).await
}

/// Applies the outcome of an attempt to the pipe's state.
fn settle<C: Io>(shared: &Shared<C>, result: Result<()>) -> Result<()> {
    if let Err(err) = &result {
        if err.is_terminal() {
            shared.fail(err.clone());
        } else {
            shared.set_state(PipeState::Disconnected);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::DuplexStream;
    use tokio::sync::mpsc;
    use tokio::time::Instant;

    use crate::{reconnector_fn, BackedPipe, BoxError, PipeConfig};

    /// The first attempt after an established connection is lost goes out at once: the backoff
    /// delays only the attempts that follow a failed one (a resume costs no sleep).
    #[tokio::test(start_paused = true)]
    async fn the_first_retry_after_a_loss_is_immediate() {
        let (dialled, mut calls) = mpsc::unbounded_channel::<(Instant, DuplexStream)>();
        let reconnector = reconnector_fn(move |_reader_seq| {
            let dialled = dialled.clone();
            async move {
                let (ours, theirs) = tokio::io::duplex(64);
                let _ = dialled.send((Instant::now(), theirs));
                Ok::<_, BoxError>((ours, 0))
            }
        });
        // A first delay drawn below a whole second would show in paused time.
        let config = PipeConfig::default()
            .backoff(Duration::from_secs(1), Duration::from_secs(5))
            .backoff_seed(1);
        let pipe = Arc::new(BackedPipe::with_config(reconnector, config).unwrap());
        pipe.connect().await.unwrap();
        let (_, first_peer) = calls.recv().await.unwrap();
        let reading = {
            let pipe = pipe.clone();
            tokio::spawn(async move { pipe.read(&mut [0; 8]).await })
        };
        tokio::task::yield_now().await;
        let lost_at = Instant::now();
        drop(first_peer);
        let (redialled_at, _second_peer) = calls.recv().await.unwrap();
        assert_eq!(
            redialled_at, lost_at,
            "the resume waited for a backoff delay"
        );
        pipe.close().await.unwrap();
        assert_eq!(reading.await.unwrap().unwrap(), 0);
    }
}
