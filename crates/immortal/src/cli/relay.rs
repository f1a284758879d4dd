//! `immortal relay`: what an ssh carrier runs on the remote host. It connects to the user's
//! agent (starting one, detached, if none answers) and copies stdin to the agent's socket and
//! the socket to stdout until either ends.
//!
//! Plain threads and blocking I/O: a relay carries one connection, and a blocking read of
//! stdin cannot be cancelled anyway (the process exits when the socket is done).

use std::fs::OpenOptions;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Args;

use super::CliError;
use crate::runtime_dir::{FileLock, RuntimeDir, RUNTIME_DIR_ENV};
use crate::socket_proto::{self, Request};

/// Relay stdin and stdout to your agent, starting it if need be (run by ssh carriers).
///
/// `immortal ssh` and `immortal connect --via-ssh` run `ssh HOST immortal relay` for each
/// connection of a stream. The relay connects to your agent's Unix socket (see `immortal agent
/// --help` for where it is), or starts the agent detached when none answers, and then copies
/// bytes both ways until either side ends. Racing relays start one agent between them. A
/// request for a stream to "the sshd" (`connect --via-ssh --sshd`) is given the port the sshd
/// that ran this relay listens on, from SSH_CONNECTION.
#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// When this relay starts the agent: how long the agent stays up holding no stream.
    #[arg(
        long,
        env = "IMMORTAL_AGENT_IDLE_EXIT",
        value_name = "DURATION",
        default_value = "10m",
        value_parser = humantime::parse_duration
    )]
    pub agent_idle_exit: Duration,
}

/// The size of each copy.
const CHUNK: usize = 64 * 1024;
/// A log longer than this is moved aside (to `agent.log.old`) when a relay starts an agent.
const MAX_LOG: u64 = 1 << 20;

/// Connects (or starts the agent and connects) and relays until the agent or stdin ends.
pub fn run(args: RelayArgs) -> Result<(), CliError> {
    let dir = RuntimeDir::locate();
    dir.ensure()
        .map_err(|err| CliError::Other(err.to_string()))?;
    let socket = connect_or_start(&dir, args.agent_idle_exit)?;
    relay(socket).map_err(|err| CliError::Other(format!("relaying failed: {err}")))
}

/// How many times a relay starts an agent that finds another one still running (one that is
/// exiting: it has removed its socket and not yet released its lock), and how long it waits
/// before each new try.
const START_TRIES: u32 = 10;
const START_RETRY: Duration = Duration::from_millis(200);

/// The agent's socket, connected; the agent is started first if none answers. Relays that
/// find no agent take turns (a lock file), so only the first starts one and the others find it.
fn connect_or_start(dir: &RuntimeDir, idle_exit: Duration) -> Result<UnixStream, CliError> {
    let mut tries = 0;
    loop {
        if let Ok(socket) = UnixStream::connect(dir.socket()) {
            return Ok(socket);
        }
        let lock_path = dir.start_lock();
        let starting = FileLock::acquire(&lock_path).map_err(|err| {
            CliError::Other(format!("cannot lock {}: {err}", lock_path.display()))
        })?;
        if let Ok(socket) = UnixStream::connect(dir.socket()) {
            return Ok(socket);
        }
        tries += 1;
        match start_agent(dir, idle_exit)? {
            Started::Listening => break,
            Started::AnotherRuns if tries < START_TRIES => {
                drop(starting);
                std::thread::sleep(START_RETRY);
            }
            Started::AnotherRuns => {
                return Err(CliError::Other(format!(
                    "another agent holds {} but does not answer on {}",
                    dir.agent_lock().display(),
                    dir.socket().display()
                )))
            }
        }
    }
    UnixStream::connect(dir.socket()).map_err(|err| {
        CliError::Other(format!(
            "the agent started but its socket {} does not answer: {err}",
            dir.socket().display()
        ))
    })
}

/// What became of an agent a relay started.
enum Started {
    /// It listens.
    Listening,
    /// It found another agent holding the directory, and exited.
    AnotherRuns,
}

/// Starts `immortal agent` detached (its own process group, stdio away from the carrier, its
/// log in the directory) and waits until it listens.
fn start_agent(dir: &RuntimeDir, idle_exit: Duration) -> Result<Started, CliError> {
    let failed = |what: &str, err: io::Error| CliError::Other(format!("{what}: {err}"));
    let exe = std::env::current_exe().map_err(|err| failed("cannot find this program", err))?;
    let log_path = dir.log();
    if std::fs::metadata(&log_path).is_ok_and(|m| m.len() > MAX_LOG) {
        let _ = std::fs::rename(&log_path, log_path.with_extension("log.old"));
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|err| failed(&format!("cannot open {}", log_path.display()), err))?;
    let mut child = Command::new(exe)
        .arg("agent")
        .arg("--idle-exit")
        .arg(humantime::format_duration(idle_exit).to_string())
        .env(RUNTIME_DIR_ENV, dir.path())
        // The log is a file: no colour codes in it.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Not in the carrier's process group: signals meant for the carrier's session (a
        // hang-up when it ends) do not reach the agent.
        .process_group(0)
        .spawn()
        .map_err(|err| failed("cannot start the agent", err))?;
    let Some(stdout) = child.stdout.take() else {
        return Err(CliError::Other("the agent's stdout is missing".into()));
    };
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    if read.is_ok() && line.starts_with("listening on ") {
        // Not waited for: the agent outlives this relay.
        return Ok(Started::Listening);
    }
    let status = child.wait();
    if let Ok(status) = &status {
        if status.code() == Some(i32::from(super::agent::ALREADY_RUNNING)) {
            return Ok(Started::AnotherRuns);
        }
    }
    let status = status
        .map(|s| s.to_string())
        .unwrap_or_else(|err| err.to_string());
    Err(CliError::Other(format!(
        "the agent did not start ({status}); see {}",
        log_path.display()
    )))
}

/// The request line as the agent is to get it: `new PORT sshd` (PORT is the sshd's port as the
/// client reached it) asks for the port the sshd listens on here, `sshd_port`, when known, else
/// for PORT, and without the word (an agent from before it refuses it); any other line passes
/// as it is.
fn rewrite_request(line: &[u8], sshd_port: Option<u16>) -> Vec<u8> {
    let request = std::str::from_utf8(line)
        .ok()
        .and_then(|text| text.strip_suffix('\n'))
        .map(Request::parse);
    match request {
        Some(Ok(Request::New { port, sshd: true })) => Request::New {
            port: sshd_port.unwrap_or(port),
            sshd: false,
        }
        .to_line()
        .into_bytes(),
        _ => line.to_vec(),
    }
}

/// The port this host's sshd took the carrier's connection on: the last of `SSH_CONNECTION`'s
/// four words (client address and port, server address and port), which ssh sets for the
/// commands it runs.
fn sshd_port() -> Option<u16> {
    std::env::var("SSH_CONNECTION")
        .ok()?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Copies stdin to the socket (then half-closes it) and the socket to stdout, until the
/// socket ends.
fn relay(socket: UnixStream) -> io::Result<()> {
    let mut to_agent = socket.try_clone()?;
    std::thread::Builder::new()
        .name("immortal-relay-stdin".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            // The request line first: an sshd request gets the port the sshd listens on here.
            let mut line = Vec::new();
            let read = (&mut stdin)
                .take(socket_proto::MAX_LINE as u64)
                .read_until(b'\n', &mut line);
            let first = match read {
                Ok(_) => rewrite_request(&line, sshd_port()),
                Err(_) => line,
            };
            if to_agent.write_all(&first).is_err() {
                return;
            }
            let mut buf = vec![0u8; CHUNK];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if to_agent.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = to_agent.shutdown(std::net::Shutdown::Write);
        })?;
    let mut from_agent = socket;
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from_agent.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        // Each chunk at once: stdout is line-buffered, and these are not lines.
        match stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()) {
            Ok(()) => {}
            // The carrier is gone: nothing to relay to.
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_sshd_request_asks_for_the_port_the_sshd_listens_on_here() {
        assert_eq!(
            rewrite_request(b"immortal/1 new 2222 sshd\n", Some(22)),
            b"immortal/1 new 22\n"
        );
        // Not known (no SSH_CONNECTION): the client's port, without the word.
        assert_eq!(
            rewrite_request(b"immortal/1 new 2222 sshd\n", None),
            b"immortal/1 new 2222\n"
        );
        for line in [
            &b"immortal/1 new 5432\n"[..],
            b"immortal/1 resume 0123456789abcdef0123456789abcdef\n",
            b"immortal/1 new 2222 sshd",
            b"garbage\n",
            b"\xff\n",
        ] {
            assert_eq!(rewrite_request(line, Some(22)), line);
        }
    }
}
