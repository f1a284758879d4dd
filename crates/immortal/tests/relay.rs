//! `immortal relay` and the per-user agent it starts, without ssh: racing relays end with one
//! agent, and an agent a relay started exits once it has been idle for its configured time.
//!
//! Each test has its own runtime directory (`IMMORTAL_RUNTIME_DIR`), so nothing touches the
//! user's real agent. An agent's exit is waited for on its lock file, which it holds until it
//! has stopped serving (and the kernel releases if it dies).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use immortal::runtime_dir::FileLock;

/// A hang fails the test after this long instead of blocking CI.
const OVERALL: Duration = Duration::from_secs(60);

fn relay(dir: &Path, idle: &str) -> Child {
    relay_under_ssh(dir, idle, None)
}

/// A relay as an ssh login runs it, with `SSH_CONNECTION` set to `ssh_connection` (unset if
/// `None`).
fn relay_under_ssh(dir: &Path, idle: &str, ssh_connection: Option<&str>) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_immortal"));
    command
        .arg("relay")
        .env("IMMORTAL_RUNTIME_DIR", dir)
        .env("IMMORTAL_AGENT_IDLE_EXIT", idle)
        .env("NO_COLOR", "1")
        .env_remove("SSH_CONNECTION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(value) = ssh_connection {
        command.env("SSH_CONNECTION", value);
    }
    command.spawn().expect("spawn immortal relay")
}

/// Sends `request` through a relay, closes its input, and returns the agent's answer.
fn ask(mut child: Child, request: &str) -> String {
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(request.as_bytes()).unwrap();
    drop(stdin);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "relay failed ({status}): {err}");
    out
}

/// Sends `request` through a relay and returns the agent's one-line answer, keeping the relay
/// (and so the connection to the agent) open: a stream's client that is still there.
fn ask_and_stay(mut child: Child, request: &str) -> (Child, String) {
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(request.as_bytes())
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte up to the newline (kept, as `ask` keeps it): nothing else is to come yet.
    while stdout.read(&mut byte).unwrap() == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    child.stdout = Some(stdout);
    (child, String::from_utf8(line).unwrap())
}

fn info(child: Child) -> String {
    ask(child, "immortal/1 info\n")
}

/// The pid in an `ok pid=N,streams=M` answer.
fn pid_of(answer: &str) -> u32 {
    let rest = answer
        .strip_prefix("ok pid=")
        .unwrap_or_else(|| panic!("not an info answer: {answer:?}"));
    rest.split(',').next().unwrap().parse().unwrap()
}

/// Processes running `immortal agent` for `dir`.
fn agents_for(dir: &Path) -> Vec<u32> {
    let wanted = format!("IMMORTAL_RUNTIME_DIR={}", dir.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let (Ok(cmdline), Ok(environ)) = (
            std::fs::read(entry.path().join("cmdline")),
            std::fs::read(entry.path().join("environ")),
        ) else {
            continue;
        };
        let is_agent = cmdline.split(|b| *b == 0).nth(1) == Some(b"agent".as_slice());
        let ours = environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes());
        if is_agent && ours {
            found.push(pid);
        }
    }
    found
}

/// Waits (on another thread, within `OVERALL`) until the agent of `dir` has exited.
fn wait_for_agent_exit(dir: &Path) {
    let lock: PathBuf = dir.join("agent.lock");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(FileLock::acquire(&lock).map(drop));
    });
    match rx.recv_timeout(OVERALL) {
        Ok(Ok(())) => {}
        Ok(Err(err)) => panic!("cannot lock the agent's lock file: {err}"),
        Err(_) => panic!("the agent did not exit within {OVERALL:?}"),
    }
}

#[test]
fn racing_relays_leave_one_agent() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("rt");
    // A service for the streams: the kernel accepts its connections.
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    // All started before any asks: each finds no agent and races to start one. Each creates
    // a stream and stays, so the agent holds it (and cannot go idle meanwhile).
    let relays: Vec<Child> = (0..4).map(|_| relay(&dir, "10m")).collect();
    let request = format!("immortal/1 new {port}\n");
    let (relays, mut ids): (Vec<Child>, Vec<String>) = relays
        .into_iter()
        .map(|r| ask_and_stay(r, &request))
        .unzip();
    for id in &ids {
        assert!(
            id.starts_with("ok ") && id.len() == 36,
            "not a stream id: {id:?}"
        );
    }
    ids.dedup();
    assert_eq!(ids.len(), 4, "{ids:?}");
    // One agent holds all four streams.
    let answer = info(relay(&dir, "10m"));
    let pid = pid_of(answer.trim_end());
    assert!(answer.trim_end().ends_with(",streams=4"), "{answer:?}");
    assert_eq!(agents_for(&dir), [pid], "agents running for the directory");
    let killed = Command::new("kill").arg(pid.to_string()).status().unwrap();
    assert!(killed.success());
    // Its lock, released as it stops, is the event to wait on (its entry in /proc may linger
    // for a moment after that, so /proc is not asked again).
    wait_for_agent_exit(&dir);
    assert!(
        !dir.join("agent.sock").exists(),
        "the agent left its socket"
    );
    // The relays end with their agent.
    for mut relay in relays {
        relay.wait().unwrap();
    }
}

/// A stream created through a relay whose client leaves before the session's first handshake
/// can never be attached (its first session was to come on that connection): the agent drops
/// it, and with nothing else held exits once idle, instead of keeping it, and itself, for the
/// day of the stream's time to live.
#[test]
fn a_stream_whose_creator_left_before_its_handshake_is_dropped() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("rt");
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    let answer = ask(relay(&dir, "1s"), &format!("immortal/1 new {port}\n"));
    assert!(answer.starts_with("ok "), "{answer:?}");
    wait_for_agent_exit(&dir);
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
    assert!(
        log.contains("its creator left before the session's first handshake"),
        "agent log:\n{log}"
    );
}

#[test]
fn an_idle_relay_started_agent_exits() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("rt");
    let answer = info(relay(&dir, "1s"));
    assert!(answer.starts_with("ok pid="), "{answer:?}");
    assert!(dir.join("agent.sock").exists());
    wait_for_agent_exit(&dir);
    assert!(
        !dir.join("agent.sock").exists(),
        "the idle agent left its socket behind"
    );
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
    assert!(
        log.contains("no stream for 1s; exiting"),
        "agent log:\n{log}"
    );
}

/// A relay that finds no socket while an agent still holds the directory (one exiting after
/// its idle time: its socket removed, its lock not yet released) tries again, and starts the
/// next agent once the lock is free, instead of failing the connection.
#[test]
fn a_relay_waits_out_an_agent_that_is_exiting() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("rt");
    // The directory as an agent leaves it, with no agent running.
    assert!(info(relay(&dir, "1s")).starts_with("ok pid="));
    wait_for_agent_exit(&dir);
    // An agent that is exiting: the lock held, no socket.
    let exiting = FileLock::acquire(&dir.join("agent.lock")).unwrap();
    let child = relay(&dir, "1s");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(info(child));
    });
    // The relay's first agent found the lock taken and said so in the log.
    let log = dir.join("agent.log");
    let deadline = std::time::Instant::now() + OVERALL;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("an agent already runs")
    {
        assert!(std::time::Instant::now() < deadline, "no refused start");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(exiting);
    let answer = rx.recv_timeout(OVERALL).expect("the relay never answered");
    assert!(answer.starts_with("ok pid="), "{answer:?}");
    wait_for_agent_exit(&dir);
}

/// A `new PORT sshd` request (PORT: the sshd's port as the client reached it) is for the port
/// the sshd listens on here, which the relay reads from `SSH_CONNECTION`: behind a port mapping
/// (Docker's `-p 2222:22`) nothing listens on PORT. Without `SSH_CONNECTION`, PORT it is.
#[test]
fn an_sshd_request_reaches_the_port_the_sshd_listens_on() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("rt");
    // The "sshd": where the carrier's connection really arrived.
    let sshd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sshd_port = sshd.local_addr().unwrap().port();
    // The client's port for it, on which nothing listens here.
    let mapped = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mapped_port = mapped.local_addr().unwrap().port();
    drop(mapped);
    let request = format!("immortal/1 new {mapped_port} sshd\n");
    let ssh_connection = format!("192.0.2.1 50000 127.0.0.1 {sshd_port}");
    let answer = ask(relay_under_ssh(&dir, "1s", Some(&ssh_connection)), &request);
    assert!(answer.starts_with("ok "), "{answer:?}");
    let answer = ask(relay(&dir, "1s"), &request);
    assert!(answer.starts_with("error dial-failed"), "{answer:?}");
    wait_for_agent_exit(&dir);
}
