//! The ssh carrier: a [`Connector`] whose every transport is a fresh ssh process running
//! `immortal relay` on the remote host, speaking over the process's stdin and stdout.
//!
//! [`SshCommand`] is the ssh to run: `$IMMORTAL_SSH_COMMAND` split into words as a POSIX shell
//! would (like git's `GIT_SSH_COMMAND`; leading `NAME=value` words set environment variables),
//! else `ssh`. [`SshConnector`] runs it as
//!
//! ```text
//! ssh -T -e none -o ClearAllForwardings=yes -o ControlMaster=no -o ControlPath=none \
//!     -o RemoteCommand=none -o RequestTTY=no -o ForwardAgent=no -o ForwardX11=no \
//!     -o PermitLocalCommand=no  [the user's options]  -o ConnectTimeout=15 \
//!     DEST 'immortal relay'
//! ```
//!
//! ssh takes the first value it is given for an option, so the options before the user's are
//! what the carrier needs whatever the configuration says (no port forwards, which belong to
//! the outer ssh; no multiplexing over a master connection that may be as dead as the network;
//! no tty), and the one after is a default the user may override. The process runs with
//! `IMMORTAL_CARRIER=1` in its environment: the block `immortal config-ssh` writes does not
//! apply when it is set, so the carrier does not recurse into its own ProxyCommand, while a
//! `ProxyJump` or `ProxyCommand` of the user's own still applies to it.
//!
//! Each [`connect`](Connector::connect) starts a new carrier and sends one request line
//! ([`socket_proto`](crate::socket_proto)): the first asks for a new stream to the port, later
//! ones resume it by id. The carrier is ended when its transport is dropped, which the session
//! does when its heartbeat finds the path dead (a hung or black-holed carrier) and before
//! every resume: SIGTERM first, on which ssh also stops a ProxyJump or ProxyCommand process it
//! runs (SIGKILL would leave that one running), then SIGKILL a second later. What ssh writes to its stderr is logged at debug level, and its last lines
//! are quoted when the carrier fails.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use backedpipe::{BoxIo, Connector};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;

use super::error::ClientError;
use super::network::network_changes;
use super::stream::GoneSignal;
use crate::socket_proto::{self, ErrorCode, Reply, Request};

/// The environment variable naming the ssh command (default `ssh`).
pub const SSH_COMMAND_ENV: &str = "IMMORTAL_SSH_COMMAND";

/// Set (to `1`) in the environment of every carrier, so that an ssh configuration can tell
/// the carrier from the outer ssh.
pub const CARRIER_ENV: &str = "IMMORTAL_CARRIER";

/// The options that come before the user's (ssh keeps the first value of each).
const CARRIER_OPTIONS: &[&str] = &[
    "-T",
    "-e",
    "none",
    "-o",
    "ClearAllForwardings=yes",
    "-o",
    "ControlMaster=no",
    "-o",
    "ControlPath=none",
    "-o",
    "RemoteCommand=none",
    "-o",
    "RequestTTY=no",
    "-o",
    "ForwardAgent=no",
    "-o",
    "ForwardX11=no",
    "-o",
    "PermitLocalCommand=no",
];

/// Defaults after the user's options.
const CARRIER_DEFAULTS: &[&str] = &["-o", "ConnectTimeout=15"];

/// How many of the last stderr lines of a carrier are kept, to quote when it fails.
const STDERR_LINES: usize = 6;
/// The longest stderr line kept (longer ones are cut).
const STDERR_LINE_LEN: usize = 300;
/// Lines on the carrier's stdout that hold no reply (a start-up file that prints) skipped
/// before giving up; a reply may also end a line that begins with such output.
const MAX_NOISE_LINES: usize = 32;
/// How long a carrier that closed its stdout may take to exit before it is killed.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// How long a carrier has to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(1);

/// Why an ssh command line is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{SSH_COMMAND_ENV}={text:?} is not a command: {reason}")]
pub struct SshCommandError {
    text: String,
    reason: &'static str,
}

/// The ssh program to run, with its own leading arguments and environment.
///
/// ```
/// use immortal::client::SshCommand;
///
/// let ssh = SshCommand::parse("LC_ALL=C ssh -F '/my config'").unwrap();
/// assert_eq!(ssh.program(), "ssh");
/// assert_eq!(ssh.args(), ["-F", "/my config"]);
/// assert_eq!(ssh.env(), [("LC_ALL".to_string(), "C".to_string())]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshCommand {
    env: Vec<(String, String)>,
    program: String,
    args: Vec<String>,
}

impl Default for SshCommand {
    fn default() -> Self {
        SshCommand {
            env: Vec::new(),
            program: "ssh".into(),
            args: Vec::new(),
        }
    }
}

impl SshCommand {
    /// `$IMMORTAL_SSH_COMMAND` if set and not empty, else plain `ssh`.
    ///
    /// # Errors
    /// [`SshCommandError`] if the variable cannot be split into words or names no program.
    pub fn from_env() -> Result<SshCommand, SshCommandError> {
        match std::env::var(SSH_COMMAND_ENV) {
            Ok(text) if !text.trim().is_empty() => SshCommand::parse(&text),
            _ => Ok(SshCommand::default()),
        }
    }

    /// Splits `text` as a POSIX shell would (quotes and backslashes); leading `NAME=value`
    /// words are environment variables, the next word is the program.
    ///
    /// # Errors
    /// [`SshCommandError`] for unbalanced quotes or no program.
    pub fn parse(text: &str) -> Result<SshCommand, SshCommandError> {
        let error = |reason| SshCommandError {
            text: text.to_owned(),
            reason,
        };
        let mut words = shlex::split(text)
            .ok_or_else(|| error("unbalanced quotes"))?
            .into_iter();
        let mut env = Vec::new();
        for word in words.by_ref() {
            match word.split_once('=') {
                Some((name, value)) if is_env_name(name) => {
                    env.push((name.to_owned(), value.to_owned()));
                }
                _ => {
                    return Ok(SshCommand {
                        env,
                        program: word,
                        args: words.collect(),
                    })
                }
            }
        }
        Err(error("no program in it"))
    }

    /// The program.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// Its leading arguments.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The environment variables it is run with.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// A command that runs it, with its leading arguments and environment.
    pub fn command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'A'..=b'Z' | b'a'..=b'z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Where and how a carrier goes: the ssh command, the user's options for it, the
/// destination, and the command that runs immortal on the remote host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshCarrier {
    ssh: SshCommand,
    options: Vec<String>,
    dest: String,
    remote_commands: Vec<String>,
}

impl SshCarrier {
    /// A carrier to `dest` (anything ssh takes: `host`, `user@host`, an alias of
    /// `~/.ssh/config`), running `remote_command relay` there. With `remote_command` `None`,
    /// `immortal` is tried, then `~/.local/bin/immortal` (where `immortal ssh --install`
    /// puts it, which is often not on the PATH of a non-interactive shell).
    pub fn new(ssh: SshCommand, dest: impl Into<String>, remote_command: Option<String>) -> Self {
        let remote_commands = match remote_command {
            Some(command) => vec![command],
            None => vec!["immortal".into(), "~/.local/bin/immortal".into()],
        };
        SshCarrier {
            ssh,
            options: Vec::new(),
            dest: dest.into(),
            remote_commands,
        }
    }

    /// Adds the user's ssh options (`-p 2222`, `-i key`, `-J bastion`, `-o Name=value`, ...),
    /// passed to every carrier before the destination.
    pub fn options(mut self, options: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.options.extend(options.into_iter().map(Into::into));
        self
    }

    /// The destination.
    pub fn dest(&self) -> &str {
        &self.dest
    }

    /// The arguments of the ssh process (after the program) that runs `remote_command relay`.
    ///
    /// ```
    /// use immortal::client::{SshCarrier, SshCommand};
    ///
    /// let carrier = SshCarrier::new(SshCommand::default(), "me@host", None).options(["-p", "2222"]);
    /// let args = carrier.args("immortal");
    /// assert_eq!(args[0], "-T");
    /// assert_eq!(args[args.len() - 2..], ["me@host", "immortal relay"]);
    /// ```
    pub fn args(&self, remote_command: &str) -> Vec<String> {
        self.command_args(&format!("{remote_command} relay"))
    }

    /// The arguments of a carrier-like ssh process (same options) that runs `command` on the
    /// remote host instead of the relay: for checks and installs.
    pub fn command_args(&self, command: &str) -> Vec<String> {
        let mut args: Vec<String> = self.ssh.args.clone();
        args.extend(CARRIER_OPTIONS.iter().map(|s| s.to_string()));
        args.extend(self.options.iter().cloned());
        args.extend(CARRIER_DEFAULTS.iter().map(|s| s.to_string()));
        // `--` would end ssh's options, but not every ssh takes it before the destination;
        // a destination starting with `-` is refused when parsing the command line instead.
        args.push(self.dest.clone());
        args.push(command.to_owned());
        args
    }

    /// A process like a carrier (same options and environment) that runs `command` on the
    /// remote host, with stdio left to the caller.
    pub fn remote(&self, command: &str) -> std::process::Command {
        let mut process = std::process::Command::new(&self.ssh.program);
        process
            .args(self.command_args(command))
            .envs(self.ssh.env.iter().map(|(k, v)| (k, v)))
            .env(CARRIER_ENV, "1");
        process
    }

    fn command(&self, remote_command: &str) -> Command {
        let mut command = Command::new(&self.ssh.program);
        command
            .args(self.args(remote_command))
            .envs(self.ssh.env.iter().map(|(k, v)| (k, v)))
            .env(CARRIER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }
}

/// A [`Connector`] over ssh carriers to one port of the remote host. See the [module
/// documentation](crate::client).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use backedpipe::{Session, SessionOptions};
/// use immortal::client::{SshCarrier, SshCommand, SshConnector};
///
/// let carrier = SshCarrier::new(SshCommand::from_env()?, "myhost", None);
/// let connector = SshConnector::new(carrier, 22);
/// let mut gone = connector.gone_signal();
/// let session = Session::connect(connector, SessionOptions::default()).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SshConnector {
    carrier: SshCarrier,
    port: u16,
    /// `port` is the remote sshd's as the carriers reach it (see [`SshConnector::to_sshd`]);
    /// cleared if the remote's immortal does not understand that.
    sshd: AtomicBool,
    /// The stream's id once the agent has created it.
    stream: Mutex<Option<String>>,
    /// Which of the carrier's remote commands worked last.
    remote: AtomicUsize,
    gone: Arc<watch::Sender<Option<ClientError>>>,
    carriers: Carriers,
    /// Grows when the machine gains a network address.
    network: watch::Receiver<u64>,
}

impl SshConnector {
    /// A connector that asks the remote agent for a stream to `port` on the remote host's
    /// loopback interface.
    pub fn new(carrier: SshCarrier, port: u16) -> SshConnector {
        SshConnector {
            carrier,
            port,
            sshd: AtomicBool::new(false),
            stream: Mutex::new(None),
            remote: AtomicUsize::new(0),
            gone: Arc::new(watch::Sender::new(None)),
            carriers: Carriers::default(),
            network: network_changes(),
        }
    }

    /// The same connector, told of network changes by `network` instead of the machine's
    /// watcher (for tests, or a caller with its own notion of "the network changed").
    pub fn with_network_changes(mut self, network: watch::Receiver<u64>) -> Self {
        self.network = network;
        self
    }

    /// The same connector for the remote sshd itself: `port` is the one the carriers reach it
    /// at (ssh's `%p`), and the remote agent dials the port that sshd listens on there, which
    /// the relay reads from `SSH_CONNECTION` (they differ behind a port mapping: Docker's `-p
    /// 2222:22`, Vagrant). A remote immortal too old to know this is asked for `port` itself.
    pub fn to_sshd(self) -> Self {
        self.sshd.store(true, Ordering::Relaxed);
        self
    }

    /// This connector's carriers, to wait for them to finish before the program exits.
    pub fn carriers(&self) -> Carriers {
        self.carriers.clone()
    }

    /// Where this connector reports that the stream is gone for good (the agent forgot it, or
    /// the remote host no longer has `immortal`).
    pub fn gone_signal(&self) -> GoneSignal {
        GoneSignal::new(&self.gone)
    }

    /// The stream's id on the remote agent, once created.
    pub fn stream_id(&self) -> Option<String> {
        self.stream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Starts one carrier and has the remote agent create or resume the stream on it.
    ///
    /// # Errors
    /// [`ClientError::RemoteMissing`], [`ClientError::Carrier`], or the agent's refusal
    /// ([`ClientError::NotFound`], [`ClientError::DialFailed`],
    /// [`ClientError::TooManyStreams`]).
    pub async fn open(&self) -> Result<BoxIo, ClientError> {
        let request = match self.stream_id() {
            Some(id) => Request::Resume { id },
            None => Request::New {
                port: self.port,
                sshd: self.sshd.load(Ordering::Relaxed),
            },
        };
        match self.open_with(&request).await {
            Err(ClientError::Protocol(message))
                if matches!(request, Request::New { sshd: true, .. }) =>
            {
                // An immortal on the remote from before `sshd` requests refuses the word: ask
                // for the port itself, as it understands.
                tracing::debug!(%message, "the remote refused an sshd request; asking for the port");
                self.sshd.store(false, Ordering::Relaxed);
                let plain = Request::New {
                    port: self.port,
                    sshd: false,
                };
                self.open_with(&plain).await
            }
            other => other,
        }
    }

    async fn open_with(&self, request: &Request) -> Result<BoxIo, ClientError> {
        let commands = &self.carrier.remote_commands;
        let first = self.remote.load(Ordering::Relaxed);
        let mut missing = None;
        for i in (first..commands.len()).chain(0..first) {
            match self.try_open(&commands[i], request).await {
                Err(err @ ClientError::RemoteMissing { .. }) => missing = Some(err),
                Ok(io) => {
                    self.remote.store(i, Ordering::Relaxed);
                    return Ok(io);
                }
                Err(err) => return Err(err),
            }
        }
        Err(missing.unwrap_or_else(|| ClientError::Protocol("no remote command to run".into())))
    }

    async fn try_open(&self, remote: &str, request: &Request) -> Result<BoxIo, ClientError> {
        let host = self.carrier.dest.clone();
        let mut child = CarrierChild(Some(self.carrier.command(remote).spawn().map_err(
            |err| ClientError::Carrier {
                host: host.clone(),
                ended: format!("could not be started ({})", self.carrier.ssh.program),
                said: err.to_string(),
            },
        )?));
        let (Some(mut stdin), Some(mut stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(ClientError::io(io::Error::other(
                "the carrier's pipes are missing",
            )));
        };
        let said = keep_stderr(stderr, host.clone());
        // Counted from here: a carrier that fails before the reply is ended when `child` is
        // dropped (it has nothing to finish).
        let guard = self.carriers.guard();
        // A carrier that ends at once makes this write fail; its exit status says why.
        let _ = stdin.write_all(request.to_line().as_bytes()).await;
        let mut noise = 0;
        let reply = loop {
            match socket_proto::read_line_tail(&mut stdout, socket_proto::MAX_LINE).await {
                Ok(Some(line)) => match Reply::find_at_end(&line) {
                    Some(reply) => break Some(reply),
                    None if noise < MAX_NOISE_LINES => {
                        noise += 1;
                        let line = String::from_utf8_lossy(&line);
                        tracing::debug!(%host, %line, "the carrier printed something before the reply");
                    }
                    None => {
                        return Err(ClientError::Protocol(format!(
                            "the carrier printed {MAX_NOISE_LINES} lines and no agent's reply; \
                             the last: {:?}",
                            String::from_utf8_lossy(&line)
                        )))
                    }
                },
                Ok(None) | Err(_) => break None,
            }
        };
        match reply {
            Some(Reply::Ok(id)) => {
                let mut stream = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
                if stream.is_none() {
                    tracing::debug!(%host, stream = %id, "stream created");
                    *stream = Some(id);
                }
                Ok(Box::new(CarrierIo {
                    stdin: Some(stdin),
                    stdout: Some(stdout),
                    child: Some(child),
                    guard: Some(guard),
                }))
            }
            Some(Reply::Error { code, message }) => Err(match code {
                ErrorCode::NotFound => ClientError::NotFound(message),
                ErrorCode::DialFailed => ClientError::DialFailed(message),
                ErrorCode::Full => ClientError::TooManyStreams(message),
                ErrorCode::BadRequest => ClientError::Protocol(message),
            }),
            None => {
                drop(stdin);
                let status = exit_status(&mut child).await;
                let said = said.text();
                if status.and_then(|s| s.code()) == Some(127) {
                    return Err(ClientError::RemoteMissing {
                        host,
                        command: remote.to_owned(),
                        said: if said.is_empty() {
                            "command not found".into()
                        } else {
                            said
                        },
                    });
                }
                Err(ClientError::Carrier {
                    host,
                    ended: match status {
                        Some(status) => describe(status),
                        None => "closed its output without an answer".into(),
                    },
                    said: if said.is_empty() {
                        "(nothing on stderr)".into()
                    } else {
                        said
                    },
                })
            }
        }
    }
}

impl SshConnector {
    /// [`open`](Self::open), started afresh when the machine gains a network address while a
    /// resume's carrier has been starting for [`FRESH_CARRIER`] or more (an ssh login on the
    /// old path, which may hang until its `ConnectTimeout`).
    async fn open_or_restart(&self) -> Result<BoxIo, ClientError> {
        let mut network = self.network.clone();
        network.borrow_and_update();
        if self.stream_id().is_none() {
            // The first carrier asks for a new stream, which the agent may have made already.
            return self.open().await;
        }
        loop {
            let started = tokio::time::Instant::now();
            let open = self.open();
            tokio::pin!(open);
            loop {
                tokio::select! {
                    opened = &mut open => return opened,
                    Ok(()) = network.changed() => {
                        // Several addresses come up as a network is joined: a carrier
                        // started moments ago already runs on the new one.
                        if started.elapsed() >= FRESH_CARRIER {
                            break;
                        }
                    }
                    else => return open.await,
                }
            }
            tracing::debug!(host = %self.carrier.dest, "network changed: a new carrier");
        }
    }
}

impl Connector for SshConnector {
    /// Opens a carrier ([`open`](SshConnector::open)). When the machine gains a network
    /// address while a resume's carrier has been starting for a second or more (an ssh login
    /// on the old path, which may hang until its `ConnectTimeout`), that carrier is abandoned
    /// and a new one started at once. The first carrier, which asks the agent for a new
    /// stream, is never abandoned: the agent may have created the stream already.
    async fn connect(&self) -> io::Result<BoxIo> {
        let opened = self.open_or_restart().await;
        opened.map_err(|err| {
            tracing::debug!(host = %self.carrier.dest, %err, "the carrier failed");
            GoneSignal::raise(&self.gone, &err);
            err.into()
        })
    }
}

/// Waits a little for a carrier that closed its output to exit; `None` if it does not.
async fn exit_status(child: &mut Child) -> Option<ExitStatus> {
    match tokio::time::timeout(EXIT_WAIT, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => None,
    }
}

fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(255) => "failed (ssh exited with status 255: it could not connect or log in)".into(),
        Some(code) => format!("exited with status {code}"),
        None => format!("ended: {status}"),
    }
}

/// The last lines of a carrier's stderr, kept by a task that logs each line as it comes.
#[derive(Debug, Clone, Default)]
struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    fn text(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        lines.iter().cloned().collect::<Vec<_>>().join(" | ")
    }
}

fn keep_stderr(stderr: tokio::process::ChildStderr, host: String) -> StderrTail {
    let tail = StderrTail::default();
    let keep = tail.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            // Bounded: a line longer than the limit is cut, the rest read as the next line.
            let mut limited = (&mut lines).take(STDERR_LINE_LEN as u64);
            match limited.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            if text.is_empty() {
                continue;
            }
            tracing::debug!(%host, "carrier: {text}");
            let mut lines = keep.0.lock().unwrap_or_else(PoisonError::into_inner);
            if lines.len() == STDERR_LINES {
                lines.pop_front();
            }
            lines.push_back(text.to_owned());
        }
    });
    tail
}

/// The carriers of a connector still running: the live one, and closed ones finishing.
///
/// A dropped carrier is not killed at once: its stdin is closed, so that what was written
/// last (a session's CLOSE) still reaches the remote host and the relay there sees the end,
/// and it is given [`CARRIER_LINGER`] to exit by itself before it is killed. A program about
/// to exit waits for [`Carriers::all_ended`] (bounded) so that this can happen.
#[derive(Debug, Clone, Default)]
pub struct Carriers(Arc<watch::Sender<usize>>);

impl Carriers {
    /// Resolves once no carrier runs.
    pub async fn all_ended(&self) {
        let mut count = self.0.subscribe();
        let _ = count.wait_for(|&n| n == 0).await;
    }

    /// How many carriers run.
    pub fn running(&self) -> usize {
        *self.0.borrow()
    }

    fn guard(&self) -> CarrierGuard {
        self.0.send_modify(|n| *n += 1);
        CarrierGuard(Arc::clone(&self.0))
    }
}

/// Counts one carrier in [`Carriers`] until dropped.
#[derive(Debug)]
struct CarrierGuard(Arc<watch::Sender<usize>>);

impl Drop for CarrierGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A carrier started less than this long before a network change is kept: it was started on
/// the new network (joining one brings several address events).
const FRESH_CARRIER: Duration = Duration::from_secs(1);

/// How long a dropped carrier may take to exit by itself before it is killed.
pub const CARRIER_LINGER: Duration = Duration::from_secs(3);

/// A carrier's process, ended when dropped unless it has exited (see [`terminate`]).
#[derive(Debug)]
struct CarrierChild(Option<Child>);

impl std::ops::Deref for CarrierChild {
    type Target = Child;

    fn deref(&self) -> &Child {
        self.0.as_ref().expect("taken only when dropped")
    }
}

impl std::ops::DerefMut for CarrierChild {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("taken only when dropped")
    }
}

impl Drop for CarrierChild {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        if child.id().is_none() {
            // Exited and reaped: its process id may already be another's.
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move { terminate(&mut child).await })),
            Err(_) => drop(child.start_kill()),
        }
    }
}

/// Ends a carrier that will not exit by itself: SIGTERM, on which ssh also stops the
/// ProxyJump or ProxyCommand process it runs (SIGKILL would leave that one running, an orphan,
/// until its connection gives up), then SIGKILL if the carrier is still there [`TERM_GRACE`]
/// later.
async fn terminate(child: &mut Child) {
    let pid = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(i32::try_from(id).ok()?));
    if let Some(pid) = pid {
        if rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok()
            && tokio::time::timeout(TERM_GRACE, child.wait()).await.is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

/// A carrier's stdio as one byte stream. Dropping it closes stdin and leaves the process
/// [`CARRIER_LINGER`] to exit before ending it (see [`Carriers`]).
struct CarrierIo {
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    child: Option<CarrierChild>,
    guard: Option<CarrierGuard>,
}

impl Drop for CarrierIo {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let (Some(mut child), stdout, guard) =
            (self.child.take(), self.stdout.take(), self.guard.take())
        else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Ended by `CarrierChild` as best it can without a runtime.
            return;
        };
        runtime.spawn(async move {
            // Whatever still comes out is read and dropped, so the process never blocks on it.
            let drain = async {
                if let Some(mut stdout) = stdout {
                    let _ = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await;
                }
                child.wait().await
            };
            if tokio::time::timeout(CARRIER_LINGER, drain).await.is_err() {
                terminate(&mut child).await;
            }
            drop(guard);
        });
    }
}

fn closed() -> io::Error {
    io::ErrorKind::BrokenPipe.into()
}

impl AsyncRead for CarrierIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.stdout.as_mut() {
            Some(stdout) => Pin::new(stdout).poll_read(cx, buf),
            None => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for CarrierIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.stdin.as_mut() {
            Some(stdin) => Pin::new(stdin).poll_write(cx, buf),
            None => Poll::Ready(Err(closed())),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.stdin.as_mut() {
            Some(stdin) => Pin::new(stdin).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(closed())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stdin.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stdin.as_mut() {
            Some(stdin) => Pin::new(stdin).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stdin.as_mut() {
            Some(stdin) => Pin::new(stdin).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Whether this process runs inside a carrier (its ssh, or a ProxyCommand that ssh started).
pub fn inside_carrier() -> bool {
    std::env::var_os(CARRIER_ENV).is_some_and(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO made at `path`, whose lines fake carriers write to announce what they do.
    /// Opened for reading and writing, so it never reports end-of-file between carriers.
    fn fifo_lines(
        path: &std::path::Path,
    ) -> tokio::io::Lines<BufReader<tokio::net::unix::pipe::Receiver>> {
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(made.success());
        let receiver = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(path)
            .unwrap();
        BufReader::new(receiver).lines()
    }

    /// A resume's carrier that has been starting for a while when the network changes (here
    /// an "ssh" that, after a first carrier that creates the stream, announces each start on
    /// a FIFO and hangs, as a login into a dead path does) is abandoned and a new one started
    /// at once, not after ssh's connect timeout.
    #[tokio::test]
    async fn a_network_change_while_a_carrier_starts_starts_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("started");
        let first = dir.path().join("first-done");
        let mut started = fifo_lines(&fifo);
        let script = format!(
            "if [ -e '{first}' ]; then echo started > '{fifo}'; else touch '{first}'; \
             echo 'ok 0123456789abcdef0123456789abcdef'; fi; exec sleep 1000",
            first = first.display(),
            fifo = fifo.display()
        );
        let ssh = SshCommand::parse(&format!("sh -c \"{script}\" carrier")).unwrap();
        let (network_tx, network) = watch::channel(0u64);
        let connector = Arc::new(
            SshConnector::new(SshCarrier::new(ssh, "host", None), 22).with_network_changes(network),
        );
        let carriers = connector.carriers();
        // The first carrier creates the stream.
        // (Kept until the end: a dropped carrier lingers, and would leave the count later.)
        let _live = connector.connect().await.unwrap();
        assert!(connector.stream_id().is_some());
        let resuming = Arc::clone(&connector);
        let attempt = tokio::spawn(async move { resuming.connect().await.map(drop) });
        assert_eq!(
            started.next_line().await.unwrap().as_deref(),
            Some("started")
        );
        // The carrier is past its first second (on the runtime's clock) when the change comes.
        tokio::time::pause();
        tokio::time::advance(FRESH_CARRIER).await;
        tokio::time::resume();
        let running = carriers.running();
        network_tx.send_modify(|n| *n += 1);
        // (Without the change this carrier would hang on: no second start would come.)
        let second = tokio::time::timeout(Duration::from_secs(20), started.next_line()).await;
        assert!(
            matches!(second, Ok(Ok(Some(ref line))) if line == "started"),
            "no new carrier: {second:?}"
        );
        // The abandoned carrier was counted out when the new one was counted in.
        assert_eq!(carriers.running(), running);
        attempt.abort();
    }

    /// The stream id a connector (for the sshd if `sshd`) gets from a carrier that runs
    /// `script` in place of ssh, on port 22.
    async fn stream_created_by(script: &str, sshd: bool) -> String {
        let ssh = SshCommand::parse(&format!("sh -c \"{script}\" carrier")).unwrap();
        let mut connector = SshConnector::new(SshCarrier::new(ssh, "host", None), 22);
        if sshd {
            connector = connector.to_sshd();
        }
        let _io = tokio::time::timeout(Duration::from_secs(20), connector.connect())
            .await
            .expect("no answer")
            .unwrap();
        connector.stream_id().expect("no stream created")
    }

    /// What a login's start-up files print before the relay runs (a long line, bytes that are
    /// not UTF-8, a terminal title with no newline) is skipped, and the reply found after it.
    #[tokio::test]
    async fn output_of_a_login_before_the_reply_is_skipped() {
        let id = "0123456789abcdef0123456789abcdef";
        let script = format!(
            "head -c 600 /dev/zero | tr '\\\\0' x; echo; printf '\\\\377\\\\376\\\\n'; \
             printf '\\\\033]0;title\\\\007'; echo 'ok {id}'; exec sleep 1000"
        );
        assert_eq!(stream_created_by(&script, false).await, id);
    }

    /// An immortal on the remote from before `sshd` requests refuses the word (bad request):
    /// the stream is asked for again with the port alone.
    #[tokio::test]
    async fn an_old_remote_that_refuses_an_sshd_request_is_asked_for_the_port() {
        let id = "0123456789abcdef0123456789abcdef";
        let dir = tempfile::tempdir().unwrap();
        // Answers the plain request only after it has refused an sshd one.
        let script = format!(
            "read line; case $line in *sshd*) touch {asked}; echo 'error bad-request trailing \
             words'; exit 0;; *' new 22') [ -e {asked} ] && echo 'ok {id}'; exec sleep 1000;; esac",
            asked = dir.path().join("asked").display()
        );
        assert_eq!(stream_created_by(&script, true).await, id);
    }

    /// A carrier abandoned while it starts (here an "ssh" that announces itself on a FIFO
    /// and hangs, as a login into a dead path does) is sent SIGTERM, on which a real ssh
    /// also stops its ProxyJump process; SIGKILL would leave that one running.
    #[tokio::test]
    async fn an_abandoned_carrier_is_sent_sigterm_first() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("said");
        let mut said = fifo_lines(&fifo);
        let script = format!(
            "trap 'kill $!; echo terminated > {fifo}; exit 0' TERM; echo started > {fifo}; \
             sleep 1000 & wait",
            fifo = fifo.display()
        );
        let ssh = SshCommand::parse(&format!("sh -c \"{script}\" carrier")).unwrap();
        let connector = SshConnector::new(SshCarrier::new(ssh, "host", None), 22);
        let attempt = tokio::spawn(async move { connector.connect().await.map(drop) });
        assert_eq!(said.next_line().await.unwrap().as_deref(), Some("started"));
        attempt.abort();
        let ended = tokio::time::timeout(Duration::from_secs(20), said.next_line()).await;
        assert!(
            matches!(ended, Ok(Ok(Some(ref line))) if line == "terminated"),
            "the carrier got no SIGTERM: {ended:?}"
        );
    }

    #[test]
    fn ssh_commands_split_like_a_shell() {
        assert_eq!(SshCommand::parse("ssh").unwrap(), SshCommand::default());
        let ssh = SshCommand::parse(r#"A=1 B_2="x y" /usr/bin/ssh -o "ProxyJump b" -v"#).unwrap();
        assert_eq!(
            ssh.env(),
            [("A".into(), "1".into()), ("B_2".into(), "x y".into())]
        );
        assert_eq!(ssh.program(), "/usr/bin/ssh");
        assert_eq!(ssh.args(), ["-o", "ProxyJump b", "-v"]);
        // `=` in a later word is an argument, not a variable.
        let ssh = SshCommand::parse("ssh -o A=b").unwrap();
        assert_eq!(ssh.args(), ["-o", "A=b"]);
        assert!(SshCommand::parse("ssh 'unbalanced").is_err());
        assert!(SshCommand::parse("A=1").is_err());
    }

    #[test]
    fn the_carriers_own_options_come_first_and_its_defaults_after_the_users() {
        let ssh = SshCommand::parse("ssh -F cfg").unwrap();
        let carrier = SshCarrier::new(ssh, "h", Some("/opt/immortal".into())).options([
            "-o",
            "ConnectTimeout=3",
            "-J",
            "jump",
        ]);
        let args = carrier.args("/opt/immortal");
        let position = |arg: &str| args.iter().position(|a| a == arg).unwrap();
        assert_eq!(&args[..2], ["-F", "cfg"]);
        assert!(position("ClearAllForwardings=yes") < position("ConnectTimeout=3"));
        assert!(position("ConnectTimeout=3") < position("ConnectTimeout=15"));
        assert!(position("jump") < position("h"));
        assert_eq!(args.last().unwrap(), "/opt/immortal relay");
        assert_eq!(carrier.remote_commands, ["/opt/immortal"]);
        let default = SshCarrier::new(SshCommand::default(), "h", None);
        assert_eq!(
            default.remote_commands,
            ["immortal", "~/.local/bin/immortal"]
        );
    }
}
