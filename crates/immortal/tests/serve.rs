//! `immortal serve` as a process: the token file it generates, what it tells the person who
//! started it, and its failures. Each test reads the agent's stderr line by line and stops it
//! once the line it waits for has appeared; a guard turns a hang into a failure.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use immortal::token::Token;
use predicates::str::contains;

/// The longest a test waits for a line before failing as hung.
const GUARD: Duration = Duration::from_secs(30);

/// A running `immortal serve`, killed when dropped.
struct Serve {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Serve {
    fn start(args: &[&str], token_file: &Path) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_immortal"))
            .arg("serve")
            .args(args)
            .arg("--token-file")
            .arg(token_file)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start immortal serve");
        let stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Serve {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads stderr until a line contains `text`.
    fn wait_for(&mut self, text: &str) {
        loop {
            match self.lines.recv_timeout(GUARD) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(err) => panic!(
                    "no line with {text:?} ({err}); stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn stderr(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_generates_a_private_token_and_says_how_to_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let mut serve = Serve::start(&["--listen", "127.0.0.1:0"], &path);
    serve.wait_for("listening on");
    let stderr = serve.stderr();
    drop(serve);

    assert!(stderr.contains("generated a new token"), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("IMMORTAL_TOKEN=$(cat"), "{stderr}");
    assert!(stderr.contains("--token-file"), "{stderr}");
    assert!(
        !stderr.contains("WITHOUT TLS"),
        "no warning on loopback: {stderr}"
    );
    let token = Token::load(&path).expect("a token in the file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the token file is private");
    }

    // A second start uses the same token and says nothing about it.
    let mut again = Serve::start(&["--listen", "127.0.0.1:0"], &path);
    again.wait_for("listening on");
    let stderr = again.stderr();
    drop(again);
    assert!(!stderr.contains("generated"), "{stderr}");
    assert_eq!(Token::load(&path).unwrap(), token);
}

#[test]
fn serving_beyond_loopback_without_tls_warns_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(&["--listen", "0.0.0.0:0"], &dir.path().join("t"));
    serve.wait_for("WITHOUT TLS");
    serve.wait_for("listening on");
}

#[test]
fn an_address_in_use_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_cmd::Command::new(env!("CARGO_BIN_EXE_immortal"))
        .args(["serve", "--listen", &addr, "--token-file"])
        .arg(dir.path().join("t"))
        .assert()
        .code(1)
        .stderr(contains("address is in use"))
        // The token was generated all the same: this is the only time it is announced.
        .stderr(contains("generated a new token"));
}

#[test]
fn a_heartbeat_too_short_is_refused() {
    assert_cmd::Command::new(env!("CARGO_BIN_EXE_immortal"))
        .args(["serve", "--heartbeat", "1ms"])
        .assert()
        .code(2)
        .stderr(contains("heartbeat"));
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_the_agent_with_success() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(&["--listen", "127.0.0.1:0"], &dir.path().join("t"));
    serve.wait_for("listening on");
    // Ctrl-C is SIGINT.
    let sent = Command::new("kill")
        .args(["-INT", &serve.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    serve.wait_for("interrupted");
    let status = serve.child.wait().unwrap();
    assert!(status.success(), "{status}; stderr:\n{}", serve.stderr());
}
