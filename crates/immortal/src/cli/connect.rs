//! `immortal connect --stdio`: one stream on stdin/stdout, for ssh's ProxyCommand.
//!
//! stdout carries the stream's bytes and nothing else; status lines and logs go to stderr.
//! stdin is read on a thread of its own, so that the process can exit when the remote service
//! closes even while nothing ever arrives on stdin (a blocking read cannot be cancelled).

use std::io::{self, Read};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use backedpipe::{PipeState, Session};
use clap::Args;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{mpsc, watch};

use super::common::{
    carry, report_status, session_error, termination, Carried, ClientArgs, SessionArgs, Until,
};
use super::status_line::{ClearingWriter, StatusOut};
use super::CliError;
use crate::client::{
    inside_carrier, network_changes, probe_on_network_changes, ApiClient, GoneSignal, SshCarrier,
    SshCommand, SshConnector, CARRIER_LINGER,
};

/// Carry one immortal stream on stdin/stdout (for ssh's ProxyCommand).
///
/// Creates a stream to TARGET_PORT on the agent and copies stdin to it and it to stdout,
/// surviving network loss for as long as the stream lives. With --via-ssh DEST the agent is
/// reached over ssh instead: each connection is a fresh `ssh DEST immortal relay` (no token,
/// no open port; see `immortal ssh`), and TARGET_PORT is normally ssh's %p. Exits 0 when the remote service
/// closes the connection; end of stdin is passed on to the service as a half-close. Status goes
/// to stderr ("connection lost, silent for 12 s, reconnecting (attempt 3)"): on a terminal one
/// line, rewritten in place and erased once the link is back; elsewhere a line per report,
/// ending with "reconnected after 12 s". Exit codes: 3 the agent refused the token, 4 the stream is unknown or expired, 5
/// nothing listens on TARGET_PORT, 6 the agent is full, 7 the agent cannot be reached.
///
/// Examples: ssh -o ProxyCommand='immortal connect --stdio --server %h:7400 %p' myhost
///           ssh -o ProxyCommand='immortal connect --stdio --via-ssh %r@%n --ssh-arg=-p%p --sshd %p' myhost
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Use stdin and stdout as the local end (the only mode; required for clarity).
    #[arg(long, required = true)]
    pub stdio: bool,
    /// Print no status lines.
    #[arg(long, short)]
    pub quiet: bool,
    /// Where the agent is and how to reach it.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Reach the agent through ssh to DEST (as given to ssh: host, user@host or an alias),
    /// starting it there if need be. Options above about the agent's address, token and TLS
    /// do not apply. $IMMORTAL_SSH_COMMAND names the ssh to run (default: ssh).
    #[arg(
        long,
        value_name = "DEST",
        conflicts_with_all = ["websocket", "token_file", "tls_ca", "tls_pin"]
    )]
    pub via_ssh: Option<String>,
    /// With --via-ssh: the immortal command on the remote host (default: `immortal`, then
    /// `~/.local/bin/immortal`).
    #[arg(long, value_name = "PATH", requires = "via_ssh")]
    pub remote_command: Option<String>,
    /// With --via-ssh: TARGET_PORT is the remote sshd's as the carriers reach it (ssh's %p),
    /// and the remote agent dials the port that sshd listens on there instead, when they differ
    /// (a port mapping: Docker's -p 2222:22, Vagrant). `immortal ssh` and `config-ssh` set it.
    #[arg(long, requires = "via_ssh")]
    pub sshd: bool,
    /// With --via-ssh: one word of the options for ssh, before DEST (repeat it:
    /// --ssh-arg=-p --ssh-arg=2222).
    #[arg(
        long = "ssh-arg",
        value_name = "ARG",
        allow_hyphen_values = true,
        requires = "via_ssh"
    )]
    pub ssh_args: Vec<String>,
    /// How the stream's connections travel and are watched.
    #[command(flatten)]
    pub session: SessionArgs,
    /// The TCP port on the agent's host to connect to (22 for its sshd).
    pub target_port: u16,
}

/// How long a best-effort clean-up request may take on the way out.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a carrier may take to connect, log in and reach the agent: an ssh login over a
/// slow link takes seconds (ssh's own ConnectTimeout bounds the TCP part).
const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs until the remote service closes the stream.
pub async fn run(args: ConnectArgs) -> Result<(), CliError> {
    if let Some(dest) = args.via_ssh.clone() {
        return run_via_ssh(args, dest).await;
    }
    let api = args.client.api_client()?;
    // Before the stream exists, so that a failure here leaves nothing behind on the agent.
    let stdin = StdinReader::spawn().map_err(|err| CliError::Other(format!("stdin: {err}")))?;
    let stream = api.create_stream(args.target_port, None).await?;
    tracing::debug!(stream = %stream.id, port = stream.port, "stream created");
    let connector = args.session.connector(&api, &stream);
    let mut gone = connector.gone_signal();
    let session = match Session::connect(connector, args.session.session_options()).await {
        Ok(session) => session,
        Err(err) => {
            let err = gone
                .get()
                .map(CliError::from)
                .unwrap_or_else(|| session_error(&err));
            delete_quietly(&api, &stream.id).await;
            return Err(err);
        }
    };
    let carried = carry_stdio(session, &mut gone, stdin, args.quiet).await;
    match carried {
        Ok(carried) => {
            tracing::debug!(
                sent = carried.sent,
                received = carried.received,
                "stream ended"
            );
            Ok(())
        }
        Err(err) => {
            if !matches!(err, CliError::StreamGone(_) | CliError::Unauthorized(_)) {
                delete_quietly(&api, &stream.id).await;
            }
            // ssh ends its ProxyCommand with SIGHUP when the session is over: a normal end.
            if matches!(err, CliError::Stopped("SIGHUP")) {
                return Ok(());
            }
            Err(err)
        }
    }
}

/// `connect --via-ssh`: the stream's transports are ssh carriers to `dest`.
async fn run_via_ssh(args: ConnectArgs, dest: String) -> Result<(), CliError> {
    if inside_carrier() {
        return Err(CliError::Other(format!(
            "`immortal connect --via-ssh` was started by an immortal carrier's own ssh: a \
             ProxyCommand in your ssh configuration runs immortal for {dest} unconditionally. \
             Let `immortal config-ssh {dest}` write that block (it does not apply to \
             carriers), or remove it"
        )));
    }
    if dest.starts_with('-') {
        return Err(CliError::Other(format!(
            "{dest:?} is not an ssh destination"
        )));
    }
    let ssh = SshCommand::from_env().map_err(|err| CliError::Other(err.to_string()))?;
    let carrier = SshCarrier::new(ssh, dest, args.remote_command.clone()).options(args.ssh_args);
    let stdin = StdinReader::spawn().map_err(|err| CliError::Other(format!("stdin: {err}")))?;
    let mut connector = SshConnector::new(carrier, args.target_port);
    if args.sshd {
        connector = connector.to_sshd();
    }
    let mut gone = connector.gone_signal();
    let carriers = connector.carriers();
    let options = args
        .session
        .session_options()
        .connect_timeout(SSH_CONNECT_TIMEOUT);
    let session = Session::connect(connector, options).await.map_err(|err| {
        gone.get()
            .map(CliError::from)
            .unwrap_or_else(|| session_error(&err))
    })?;
    let carried = carry_stdio(session, &mut gone, stdin, args.quiet).await;
    // The CLOSE is on its way through the last carrier: let it get there, so the agent
    // forgets the stream now rather than after its time to live.
    let _ = tokio::time::timeout(CARRIER_LINGER, carriers.all_ended()).await;
    match carried {
        Ok(_) => Ok(()),
        // ssh ends its ProxyCommand with SIGHUP when the session is over: a normal end.
        Err(CliError::Stopped("SIGHUP")) => Ok(()),
        Err(err) => Err(err),
    }
}

/// Carries `session` on stdin/stdout until the remote service ends it, the stream is gone or
/// a signal stops the process, with its status on stderr unless `quiet`, and probing its path
/// whenever the machine's network changes; then closes the session.
///
/// Closing tells the agent this side is done (CLOSE); it forgets the stream once both sides
/// are. After a clean end the agent first acknowledges what we sent; after a failure (the
/// stream is gone) or a signal (ssh hangs up its ProxyCommand once it is done) there is nobody
/// to wait for, and dropping the session sends CLOSE at once.
async fn carry_stdio(
    session: Session,
    gone: &mut GoneSignal,
    stdin: StdinReader,
    quiet: bool,
) -> Result<Carried, CliError> {
    let status_out = Arc::new(StatusOut::stderr());
    let reporter = (!quiet).then(|| {
        tokio::spawn(report_status_on_stderr(
            session.status(),
            Arc::clone(&status_out),
        ))
    });
    let stdout = ClearingWriter::new(tokio::io::stdout(), status_out);
    let carried = tokio::select! {
        result = carry(&session, gone, stdin, stdout, Until::RemoteEnds) => result,
        signal = termination() => Err(CliError::Stopped(signal)),
        never = probe_on_network_changes(&session, network_changes()) => match never {},
    };
    if let Some(reporter) = reporter {
        reporter.abort();
        // Once it is gone, a status line it left is ended (see `StatusOut`), before anything
        // else is printed.
        let _ = reporter.await;
    }
    match carried {
        Ok(_) => drop(session.close().await),
        Err(_) => drop(session),
    }
    carried
}

/// How a person quits a session whose link is down: ssh's escape sequence (ssh runs this
/// command as its ProxyCommand), or Ctrl-C for anything else.
const QUIT_HINT: &str = "; to quit, type Enter ~ . (ssh) or Ctrl-C";

/// Reports the session's status on stderr (see [`StatusOut`]) until the session ends.
async fn report_status_on_stderr(status: watch::Receiver<PipeState>, out: Arc<StatusOut>) {
    report_status(status, QUIT_HINT, move |status| out.show(status)).await;
}

/// Deletes the stream if the agent can be asked within [`CLEANUP_TIMEOUT`]; a failure is only
/// logged (the agent's TTL removes the stream anyway).
async fn delete_quietly(api: &ApiClient, id: &str) {
    match tokio::time::timeout(CLEANUP_TIMEOUT, api.delete(id)).await {
        Ok(Ok(())) => tracing::debug!(stream = %id, "stream deleted"),
        Ok(Err(err)) => tracing::debug!(stream = %id, %err, "could not delete the stream"),
        Err(_) => tracing::debug!(stream = %id, "deleting the stream timed out"),
    }
}

/// The size of each read from stdin.
const STDIN_CHUNK: usize = 64 * 1024;

/// Stdin as an [`AsyncRead`], fed by a thread that does the blocking reads. The thread is
/// never joined: it ends at end of input, or with the process.
struct StdinReader {
    chunks: mpsc::Receiver<io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl StdinReader {
    fn spawn() -> io::Result<StdinReader> {
        let (tx, chunks) = mpsc::channel(4);
        std::thread::Builder::new()
            .name("immortal-stdin".into())
            .spawn(move || read_stdin(&tx))?;
        Ok(StdinReader {
            chunks,
            current: Vec::new(),
            pos: 0,
        })
    }
}

/// The stdin thread: reads until end of input (then drops `tx`, which the reader sees as end
/// of input) or until nobody listens.
fn read_stdin(tx: &mpsc::Sender<io::Result<Vec<u8>>>) {
    let mut stdin = io::stdin().lock();
    loop {
        let mut buf = vec![0; STDIN_CHUNK];
        let message = match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                Ok(buf)
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => Err(err),
        };
        let failed = message.is_err();
        if tx.blocking_send(message).is_err() || failed {
            return;
        }
    }
}

impl AsyncRead for StdinReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos == self.current.len() {
            match ready!(self.chunks.poll_recv(cx)) {
                Some(Ok(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Some(Err(err)) => return Poll::Ready(Err(err)),
                None => return Poll::Ready(Ok(())),
            }
        }
        let this = &mut *self;
        let n = buf.remaining().min(this.current.len() - this.pos);
        buf.put_slice(&this.current[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}
