//! Options every client subcommand takes (where the agent is, how to authenticate, how to
//! reach it), and what the client subcommands share: finding the token, turning client and
//! session errors into exit codes, carrying a stream between a local byte stream and a
//! session with half-close, and the status lines a reconnecting session prints.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backedpipe::session::SessionConfig;
use backedpipe::{PipeConfig, PipeState, Session, SessionOptions};
use clap::Args;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::CliError;
use crate::api::StreamInfo;
use crate::client::{
    ApiClient, Carrier, ClientError, GoneSignal, ServerAddr, StreamConnector, TlsTrust,
};
use crate::token::{Token, TokenError};

/// The environment variable that holds the token's text; `--token-file` beats it, and it
/// beats the default file.
pub const TOKEN_ENV: &str = "IMMORTAL_TOKEN";

/// The heartbeat interval when `--heartbeat` is not given.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// The shortest heartbeat interval accepted: below it, probes would cost more than they save.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

/// The longest heartbeat interval accepted.
const MAX_HEARTBEAT: Duration = Duration::from_secs(60 * 60);

/// Where the agent is and how to talk to it.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The agent, as HOST or HOST:PORT (port 7400 when not given; an IPv6 address in
    /// brackets).
    #[arg(long, env = "IMMORTAL_SERVER", default_value = "127.0.0.1:7400")]
    pub server: String,
    /// File holding the agent's token (default: IMMORTAL_TOKEN if set, else the file
    /// `immortal serve` generates, ~/.config/immortal/token). Given, it beats IMMORTAL_TOKEN.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Use TLS, trusting the CA certificates in this PEM file.
    #[arg(long, value_name = "PATH", conflicts_with = "tls_pin")]
    pub tls_ca: Option<PathBuf>,
    /// Use TLS, trusting exactly the certificate in this PEM file (for a self-signed agent).
    #[arg(long, value_name = "PATH")]
    pub tls_pin: Option<PathBuf>,
}

/// How a stream's connections travel and are watched: for the subcommands that carry streams.
#[derive(Debug, Clone, Args)]
pub struct SessionArgs {
    /// Carry the stream in WebSocket messages instead of a raw HTTP upgrade (for proxies that
    /// only pass WebSocket).
    #[arg(long)]
    pub websocket: bool,
    /// How often an idle connection is probed (e.g. 5s, 500ms; at most 1h); a connection
    /// silent for two probes and a second is replaced. Shorter notices a dead network sooner.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_heartbeat)]
    pub heartbeat: Duration,
}

impl ClientArgs {
    /// The token: the `--token-file` if given, else `IMMORTAL_TOKEN` if set, else the default
    /// file.
    ///
    /// # Errors
    /// [`CliError::Other`] naming what is missing or malformed, and what to do.
    pub fn token(&self) -> Result<Token, CliError> {
        resolve_token(
            std::env::var_os(TOKEN_ENV).as_deref(),
            self.token_file.as_deref(),
            Token::default_path(),
        )
    }

    /// How TLS trusts the agent, as the options say.
    pub fn tls_trust(&self) -> TlsTrust {
        match (&self.tls_ca, &self.tls_pin) {
            (Some(ca), _) => TlsTrust::CaFile(ca.clone()),
            (None, Some(pin)) => TlsTrust::PinnedCert(pin.clone()),
            (None, None) => TlsTrust::None,
        }
    }

    /// A client of the agent, with the token and TLS the options say.
    ///
    /// # Errors
    /// A missing token, a bad `--server`, unreadable TLS files.
    pub fn api_client(&self) -> Result<ApiClient, CliError> {
        let server: ServerAddr = self.server.parse()?;
        let token = self.token()?;
        Ok(ApiClient::new(server, &token, &self.tls_trust())?)
    }
}

impl SessionArgs {
    /// How streams travel: raw upgrade or WebSocket.
    pub fn carrier(&self) -> Carrier {
        if self.websocket {
            Carrier::WebSocket
        } else {
            Carrier::Upgrade
        }
    }

    /// A connector for `stream`, as its creation answered.
    pub fn connector(&self, api: &ApiClient, stream: &StreamInfo) -> StreamConnector {
        StreamConnector::new(api.clone(), stream, self.carrier())
    }

    /// The session settings: the heartbeat the options say, the library's defaults otherwise.
    pub fn session_options(&self) -> SessionOptions {
        session_options(self.heartbeat)
    }
}

/// Raises the open-file soft limit to the hard limit and returns it; `None`, with a warning,
/// when it cannot be read or raised (or off Unix).
pub(crate) fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::debug!(limit, "open-file limit");
            return Some(limit);
        }
        Err(err) => tracing::warn!(%err, "cannot read or raise the open-file limit"),
    }
    None
}

/// The longest wait between two resume attempts the session itself makes (its backoff starts
/// at 100 ms and doubles, with full jitter): after the network is back, a resume starts within
/// this. Past the first minutes of an outage, the connector adds its own pause
/// ([`SLOW_PACE`](crate::client::SLOW_PACE)), cut short by a network change.
pub const BACKOFF_CAP: Duration = Duration::from_secs(1);

/// Session settings with a heartbeat every `heartbeat` and a path declared dead after two
/// silent intervals and a second, and resume attempts at most [`BACKOFF_CAP`] apart.
/// Acknowledgements keep their default cadence: a closing session acknowledges everything it
/// read before its CLOSE, so the agent, which keeps a finished stream until the client has its
/// last bytes, is never left waiting.
pub fn session_options(heartbeat: Duration) -> SessionOptions {
    SessionOptions::default()
        .timing(SessionConfig {
            heartbeat_interval: heartbeat,
            dead_after: heartbeat * 2 + Duration::from_secs(1),
            ..SessionConfig::default()
        })
        .pipe(PipeConfig::default().backoff(Duration::from_millis(100), BACKOFF_CAP))
        // The connector bounds each attempt itself (at most MAX_ATTEMPT_TIMEOUT) and may
        // pause first.
        .connect_timeout(crate::client::SLOW_PACE + crate::client::MAX_ATTEMPT_TIMEOUT * 2)
}

/// Parses a duration option: a humantime duration (`30s`, `10m`, `24h`) within
/// [`DURATION_BOUNDS`](crate::server::DURATION_BOUNDS), so that no later arithmetic on it can
/// overflow.
pub(crate) fn parse_bounded_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|err| err.to_string())?;
    let (min, max) = crate::server::DURATION_BOUNDS;
    if duration < min || duration > max {
        return Err(format!(
            "{text} is out of range: a duration here is between {} ms and {} days",
            min.as_millis(),
            max.as_secs() / 86_400
        ));
    }
    Ok(duration)
}

/// Parses `--heartbeat` (client and agent alike): a humantime duration of at least
/// [`MIN_HEARTBEAT`] and at most an hour (a path silent for two of them is declared dead).
pub(crate) fn parse_heartbeat(text: &str) -> Result<Duration, String> {
    let duration = parse_bounded_duration(text)?;
    if duration > MAX_HEARTBEAT {
        return Err(format!(
            "a heartbeat longer than {} would leave a dead path unnoticed",
            humantime::format_duration(MAX_HEARTBEAT)
        ));
    }
    if duration < MIN_HEARTBEAT {
        return Err(format!(
            "a heartbeat shorter than {} ms would flood the link",
            MIN_HEARTBEAT.as_millis()
        ));
    }
    Ok(duration)
}

/// The token from, in order: the file given on the command line, the environment's text, the
/// default file.
fn resolve_token(
    env: Option<&std::ffi::OsStr>,
    file: Option<&Path>,
    default_file: Option<PathBuf>,
) -> Result<Token, CliError> {
    if let Some(path) = file {
        return Token::load(path).map_err(|err| client_token_error(err, true));
    }
    if let Some(text) = env {
        let text = text
            .to_str()
            .ok_or_else(|| CliError::Other(format!("{TOKEN_ENV} is not valid text")))?;
        return Token::from_hex(text)
            .map_err(|err| CliError::Other(format!("{TOKEN_ENV} does not hold a token: {err}")));
    }
    let path = default_file.ok_or_else(|| {
        CliError::Other(format!(
            "no token for the agent: this system has no configuration directory; set \
             {TOKEN_ENV} to the agent's token, or pass --token-file"
        ))
    })?;
    Token::load(&path).map_err(|err| client_token_error(err, false))
}

/// A token file's failure as a client sees it: a missing file says where the token comes from
/// (the agent's host), not how to start an agent.
fn client_token_error(err: TokenError, given: bool) -> CliError {
    match err {
        TokenError::Missing { path } if given => {
            CliError::Other(format!("no token file at {}", path.display()))
        }
        TokenError::Missing { path } => CliError::Other(format!(
            "no token for the agent: {} does not exist. The agent generated its token on its \
             own host when it first started (in ~/.config/immortal/token there): copy that file \
             here (mode 600), set {TOKEN_ENV} to its contents, or pass --token-file PATH",
            path.display()
        )),
        other => CliError::Other(other.to_string()),
    }
}

impl From<ClientError> for CliError {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::Unauthorized(message) => CliError::Unauthorized(message),
            ClientError::NotFound(_) => CliError::StreamGone(err.to_string()),
            ClientError::DialFailed(_) => CliError::DialFailed(err.to_string()),
            ClientError::TooManyStreams(_) => CliError::TooManyStreams(err.to_string()),
            ClientError::Unreachable { server, reason } => CliError::Unreachable { server, reason },
            other => CliError::Other(other.to_string()),
        }
    }
}

/// The exit a session's terminal error calls for: what the agent answered if a connection
/// attempt was refused, "stream gone" if the session was forgotten or closed by the agent.
pub(crate) fn session_error(err: &backedpipe::Error) -> CliError {
    if let Some(client) = ClientError::find_in(err) {
        return client.clone().into();
    }
    match err {
        backedpipe::Error::SessionUnknown(_) | backedpipe::Error::SessionExpired(_) => {
            CliError::StreamGone(format!(
                "the stream is unknown or expired on the agent: {err}"
            ))
        }
        backedpipe::Error::ClosedByPeer { .. } => {
            CliError::StreamGone(format!("the agent closed the stream: {err}"))
        }
        _ => CliError::Other(format!("the stream failed: {err}")),
    }
}

/// Bytes carried each way by [`carry`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Carried {
    /// From the local side into the session.
    pub(crate) sent: u64,
    /// From the session to the local side.
    pub(crate) received: u64,
}

/// When [`carry`] is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// When the remote side has ended its direction (`connect`: the service closed).
    RemoteEnds,
    /// When both directions have ended (`forward`: the local connection may half-close).
    BothEnd,
}

/// Why carrying failed.
#[derive(Debug)]
enum PumpError {
    /// The local side failed (a reset socket, a closed stdout).
    Local(io::Error),
    /// The session failed for good.
    Session(backedpipe::Error),
}

/// The size of each copy.
const CHUNK: usize = 64 * 1024;

/// Carries a stream: `input` into the session (then FIN), the session into `output` (then a
/// shutdown of `output`), concurrently, until `until` says; stops early with the reason when
/// the connector raises `gone`.
///
/// # Errors
/// The session's terminal error, the stream being gone, or the local side failing.
pub(crate) async fn carry(
    session: &Session,
    gone: &mut GoneSignal,
    input: impl AsyncRead + Unpin,
    output: impl AsyncWrite + Unpin,
    until: Until,
) -> Result<Carried, CliError> {
    let up = copy_into_session(input, session);
    let down = copy_out_of_session(session, output);
    tokio::pin!(up, down);
    let mut carried = Carried::default();
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            result = &mut up, if !up_done => {
                up_done = true;
                carried.sent = result.map_err(|err| pump_error(err, "reading the local side"))?;
            }
            result = &mut down, if !down_done => {
                down_done = true;
                carried.received =
                    result.map_err(|err| pump_error(err, "writing the local side"))?;
            }
            reason = gone.wait() => return Err(reason.into()),
        }
        if down_done && (up_done || until == Until::RemoteEnds) {
            return Ok(carried);
        }
    }
}

fn pump_error(err: PumpError, doing: &str) -> CliError {
    match err {
        PumpError::Local(err) => CliError::Other(format!("{doing} failed: {err}")),
        PumpError::Session(err) => session_error(&err),
    }
}

/// Copies `input` into the session until end of input, then sends FIN.
async fn copy_into_session(
    mut input: impl AsyncRead + Unpin,
    session: &Session,
) -> Result<u64, PumpError> {
    let mut buf = vec![0; CHUNK];
    let mut total = 0;
    loop {
        let n = input.read(&mut buf).await.map_err(PumpError::Local)?;
        if n == 0 {
            session.shutdown().await.map_err(PumpError::Session)?;
            return Ok(total);
        }
        write_all(session, &buf[..n])
            .await
            .map_err(PumpError::Session)?;
        total += n as u64;
        // A session that is always ready would otherwise keep the other direction and the
        // gone signal, polled in the same task, from running.
        tokio::task::coop::consume_budget().await;
    }
}

/// Copies the session into `output` until the peer's FIN, then shuts `output` down. Each
/// chunk is flushed at once: interactive data must not wait in a buffer.
async fn copy_out_of_session(
    session: &Session,
    mut output: impl AsyncWrite + Unpin,
) -> Result<u64, PumpError> {
    let mut buf = vec![0; CHUNK];
    let mut total = 0;
    loop {
        let n = session.read(&mut buf).await.map_err(PumpError::Session)?;
        if n == 0 {
            output.shutdown().await.map_err(PumpError::Local)?;
            return Ok(total);
        }
        output
            .write_all(&buf[..n])
            .await
            .map_err(PumpError::Local)?;
        output.flush().await.map_err(PumpError::Local)?;
        total += n as u64;
        tokio::task::coop::consume_budget().await;
    }
}

/// Writes all of `buf` to the session.
pub(crate) async fn write_all(session: &Session, mut buf: &[u8]) -> backedpipe::Result<()> {
    while !buf.is_empty() {
        let n = session.write(buf).await?;
        if n == 0 {
            return Err(backedpipe::Error::PipeClosed);
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// The longest a reconnecting session stays silent on stderr.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// One report of [`report_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Status {
    /// The connection is lost ("connection lost, silent for 12 s, reconnecting (attempt 3)").
    Lost(String),
    /// It is back ("reconnected after 12 s").
    Back(String),
}

impl Status {
    /// What the report says.
    pub(crate) fn text(&self) -> &str {
        match self {
            Status::Lost(text) | Status::Back(text) => text,
        }
    }
}

/// Reports a session's connection losses and recoveries through `say`, until the session
/// ends: a line when the connection is lost, then one every [`STATUS_EVERY`] while it stays
/// lost ("connection lost, silent for 12 s, reconnecting (attempt 3)"), each followed by
/// `hint` (how to quit, say), and one when it is back ("reconnected after 12 s"). Nothing
/// while the session is healthy.
pub(crate) async fn report_status(
    mut status: watch::Receiver<PipeState>,
    hint: &str,
    say: impl Fn(Status),
) {
    let mut offline: Option<Offline> = None;
    loop {
        let next_line = offline.as_ref().map(|o| o.last_line + STATUS_EVERY);
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                let state = status.borrow_and_update().clone();
                match state {
                    PipeState::Connected => {
                        if let Some(o) = offline.take() {
                            say(Status::Back(format!(
                                "reconnected after {}",
                                seconds(o.since.elapsed())
                            )));
                        }
                    }
                    PipeState::Disconnected | PipeState::Reconnecting => {
                        let now = Instant::now();
                        let o = offline.get_or_insert_with(|| {
                            say(Status::Lost(format!("connection lost, reconnecting{hint}")));
                            Offline { since: now, last_line: now, attempts: 0 }
                        });
                        if matches!(state, PipeState::Reconnecting) {
                            o.attempts += 1;
                        }
                    }
                    _ if state.is_final() => return,
                    _ => {}
                }
            }
            () = sleep_until(next_line) => {
                if let Some(o) = offline.as_mut() {
                    o.last_line = Instant::now();
                    say(Status::Lost(format!(
                        "connection lost, silent for {}, reconnecting (attempt {}){hint}",
                        seconds(o.since.elapsed()),
                        o.attempts.max(1),
                    )));
                }
            }
        }
    }
}

/// A session without a connection, as [`report_status`] tracks it.
struct Offline {
    since: Instant,
    last_line: Instant,
    attempts: u32,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the process is asked to stop (Ctrl-C; on Unix also SIGTERM, and SIGHUP,
/// which ssh sends its ProxyCommand when it exits), with the signal's name.
pub(crate) async fn termination() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let hangup = signal(SignalKind::hangup());
        let terminate = signal(SignalKind::terminate());
        if let (Ok(mut hangup), Ok(mut terminate)) = (hangup, terminate) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = hangup.recv() => "SIGHUP",
                _ = terminate.recv() => "SIGTERM",
            };
        }
    }
    match tokio::signal::ctrl_c().await {
        Ok(()) => "SIGINT",
        Err(_) => std::future::pending().await,
    }
}

/// A duration for people: tenths below ten seconds, whole seconds above.
pub(crate) fn seconds(duration: Duration) -> String {
    let secs = duration.as_secs_f64();
    if secs < 10.0 {
        format!("{secs:.1} s")
    } else {
        format!("{} s", duration.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn an_explicit_file_beats_the_environment_which_beats_the_default_file() {
        let token = Token::generate();
        let hex = token.to_hex();
        let other = Token::generate().to_hex();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, &hex).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let env = std::ffi::OsStr::new(&other);
        // Once the environment won even over an explicit --token-file.
        let given = resolve_token(Some(env), Some(&file), None);
        assert_eq!(given.unwrap().to_hex(), hex);
        let from_env = resolve_token(Some(env), None, Some(file.clone()));
        assert_eq!(from_env.unwrap().to_hex(), other);
        let from_default = resolve_token(None, None, Some(file));
        assert_eq!(from_default.unwrap().to_hex(), hex);
        let bad = resolve_token(Some(std::ffi::OsStr::new("xyz")), None, None);
        assert!(matches!(bad, Err(CliError::Other(m)) if m.contains(TOKEN_ENV)));
        let missing = resolve_token(Some(env), Some(Path::new("missing-file")), None);
        assert!(matches!(missing, Err(CliError::Other(m)) if m.contains("missing-file")));
        let nowhere = resolve_token(None, None, None);
        assert!(matches!(nowhere, Err(CliError::Other(m)) if m.contains("--token-file")));
        // A client with no token is told where the token comes from, not to run an agent.
        let absent = resolve_token(None, None, Some(dir.path().join("absent")));
        let Err(CliError::Other(message)) = absent else {
            panic!("{absent:?}")
        };
        assert!(!message.contains("immortal serve"), "{message}");
        assert!(message.contains("copy that file"), "{message}");
    }

    #[test]
    fn heartbeats_parse_and_set_the_dead_path_bound() {
        assert_eq!(parse_heartbeat("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_heartbeat("10ms").is_err());
        assert!(parse_heartbeat("2h").is_err());
        // Once accepted, then a worker thread panicked on the first session.
        let huge = parse_heartbeat("200000000000y").unwrap_err();
        assert!(
            huge.contains("out of range") || huge.contains("overflow"),
            "{huge}"
        );
        assert!(parse_bounded_duration("400days").is_err());
        assert_eq!(
            parse_bounded_duration("24h"),
            Ok(Duration::from_secs(86400))
        );
        assert!(parse_heartbeat("soon").is_err());
        let options = session_options(Duration::from_secs(2));
        let text = format!("{options:?}");
        assert!(text.contains("dead_after: 5s"), "{text}");
    }

    #[test]
    fn client_errors_get_their_exit_codes() {
        use std::process::ExitCode;
        let code = |err: ClientError| CliError::from(err).exit_code();
        assert_eq!(
            code(ClientError::Unauthorized("x".into())),
            ExitCode::from(3)
        );
        assert_eq!(code(ClientError::NotFound("x".into())), ExitCode::from(4));
        assert_eq!(code(ClientError::DialFailed("x".into())), ExitCode::from(5));
        assert_eq!(
            code(ClientError::TooManyStreams("x".into())),
            ExitCode::from(6)
        );
        let unreachable = ClientError::Unreachable {
            server: "s".into(),
            reason: "r".into(),
        };
        assert_eq!(code(unreachable), ExitCode::from(7));
    }

    #[test]
    fn a_gone_stream_found_inside_a_session_error_exits_4() {
        let io: io::Error = ClientError::NotFound("no such stream".into()).into();
        let err = backedpipe::Error::Io(Arc::new(io));
        assert!(matches!(session_error(&err), CliError::StreamGone(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn status_lines_are_spaced_and_say_how_long() {
        let (tx, rx) = watch::channel(PipeState::Connected);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reporter = tokio::spawn(report_status(rx, "; Ctrl-C quits", move |status| {
            sink.lock().unwrap().push(status);
        }));
        let step = |state: PipeState| {
            tx.send_replace(state);
        };
        tokio::task::yield_now().await;
        step(PipeState::Disconnected);
        tokio::task::yield_now().await;
        // Attempts at 0.5 s, 1.5 s, ...: never at the same instant as a status line, whose
        // order against them would be a coin toss.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..12 {
            step(PipeState::Reconnecting);
            tokio::task::yield_now().await;
            step(PipeState::Disconnected);
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        step(PipeState::Connected);
        tokio::task::yield_now().await;
        step(PipeState::Closed);
        reporter.await.unwrap();
        let statuses = lines.lock().unwrap().clone();
        let lines: Vec<&str> = statuses.iter().map(Status::text).collect();
        assert_eq!(
            lines,
            [
                "connection lost, reconnecting; Ctrl-C quits",
                "connection lost, silent for 5.0 s, reconnecting (attempt 5); Ctrl-C quits",
                "connection lost, silent for 10 s, reconnecting (attempt 10); Ctrl-C quits",
                "reconnected after 12 s",
            ]
        );
        assert!(statuses[..3].iter().all(|s| matches!(s, Status::Lost(_))));
        assert!(matches!(statuses[3], Status::Back(_)));
    }
}
