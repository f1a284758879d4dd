//! End to end with a real OpenSSH client and server.
//!
//! `ssh` talks to a private `sshd` through `ProxyCommand=immortal connect --stdio`, whose
//! transport runs through a [`ChaosProxy`] to an `immortal serve` agent that dials the sshd.
//! 64 MiB of random data go each way in one ssh session while the proxy cuts the transport again
//! and again (resets, black holes, an offline spell), each cut triggered by the proxy's byte
//! counters. The SHA-256 of what arrived must equal what was sent, in both directions, and ssh
//! must exit 0.
//!
//! Needs `ssh`, `ssh-keygen` and `/usr/sbin/sshd` (Debian: `openssh-client`,
//! `openssh-server`; `.ci/run` installs them). Without them the tests fail rather than skip.

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use immortal::chaos::{ChaosProxy, ChaosStats};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const MIB: usize = 1 << 20;
/// Data sent in each direction by the main test.
const EACH_WAY: usize = 64 * MIB;
/// A hang fails the test after this long instead of blocking CI.
const OVERALL: Duration = Duration::from_secs(300);
/// Cuts that must land before the transfer ends (of the `SCHEDULE`'s six).
const MIN_CUTS: u64 = 5;
/// Connections through the proxy the main test requires: the first and one after each cut.
const MIN_CONNECTIONS: u64 = MIN_CUTS + 1;
/// Bytes (both directions together) forwarded on a fresh connection before the next cut.
const BETWEEN_CUTS: u64 = 10 * MIB as u64;

const SSHD: &str = "/usr/sbin/sshd";
const INSTALL_HINT: &str = "this test needs a real OpenSSH: install openssh-server and \
     openssh-client (Debian: apt-get install -y openssh-server openssh-client; .ci/run does)";

/// The ssh session of the main test, through immortal, with the transport cut repeatedly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_through_immortal_survives_cuts() {
    match tokio::time::timeout(OVERALL, ssh_through_immortal()).await {
        Ok(()) => {}
        Err(_) => panic!("the OpenSSH end-to-end test did not finish within {OVERALL:?}"),
    }
}

/// The harness alone: ssh straight through the proxy to sshd, no immortal, no cuts. When the
/// main test fails and this one passes, the fault is in immortal, not in the OpenSSH set-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_harness_without_immortal() {
    let work = async {
        let sshd = Sshd::start().await;
        let proxy = ChaosProxy::start(sshd.addr()).await.expect("start proxy");
        let up = random_bytes(MIB);
        let down = sshd.write_download(MIB);
        let run = sshd
            .ssh(proxy.local_addr().port(), None, Arc::new(up.clone()))
            .await;
        run.check(&sshd, &up, &down);
        assert_eq!(proxy.connections(), 1);
    };
    tokio::time::timeout(OVERALL, work)
        .await
        .expect("the OpenSSH harness test did not finish in time");
}

async fn ssh_through_immortal() {
    let started = Instant::now();
    let sshd = Sshd::start().await;
    let immortal = env!("CARGO_BIN_EXE_immortal");

    // The agent, in front of the sshd.
    let token_file = sshd.dir.path().join("token");
    let mut serve = Command::new(immortal);
    serve
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--token-file")
        .arg(&token_file)
        .arg("--heartbeat")
        .arg("1s");
    quiet_env(&mut serve);
    let mut serve = Logged::spawn("serve", serve);
    let listening = serve
        .wait_line(|l| l.contains("listening on"))
        .await
        .unwrap_or_else(|stderr| {
            panic!("serve ended before printing \"listening on\"; its stderr:\n{stderr}")
        });
    let agent = listening_addr(&listening)
        .unwrap_or_else(|| panic!("no address in serve's line {listening:?}"));
    assert!(token_file.exists(), "serve did not write its token file");

    // The proxy between the client and the agent, and the cuts it makes.
    let proxy = Arc::new(ChaosProxy::start(agent).await.expect("start proxy"));
    let cutter = tokio::spawn(cut_repeatedly(Arc::clone(&proxy), started));

    let proxy_command = format!(
        "{} connect --stdio --quiet --heartbeat 1s --server {} --token-file {} %p",
        shell_quote(immortal),
        proxy.local_addr(),
        shell_quote(&token_file.to_string_lossy()),
    );
    let up = random_bytes(EACH_WAY);
    let down = sshd.write_download(EACH_WAY);
    let run = sshd
        .ssh(sshd.port, Some(&proxy_command), Arc::new(up.clone()))
        .await;
    cutter.abort();
    let stats = proxy.stats();
    eprintln!(
        "[test] ssh finished after {:.1?}: {stats:?}",
        started.elapsed()
    );
    if !run.status.success() {
        serve.dump();
    }
    run.check(&sshd, &up, &down);
    assert!(
        stats.cuts >= MIN_CUTS,
        "only {} cuts landed (wanted {MIN_CUTS}): {stats:?}",
        stats.cuts
    );
    assert!(
        stats.accepted >= MIN_CONNECTIONS,
        "only {} connections through the proxy (wanted {MIN_CONNECTIONS}): {stats:?}",
        stats.accepted,
    );
    assert!(
        stats.refused >= OFFLINE_REFUSALS,
        "the client never tried to reconnect while offline: {stats:?}"
    );
    drop(serve);
}

/// How the transport is broken, cut after cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Reset both sides.
    Reset,
    /// Forward nothing more, close nothing (a NAT rebinding, a Wi-Fi change).
    BlackHole,
    /// Reset both sides, then refuse new connections until the client has tried
    /// `OFFLINE_REFUSALS` times (offline for a while).
    ResetThenOffline,
}

/// The cuts, in order; the test requires at least `MIN_CUTS` of them to land before the
/// transfer ends.
const SCHEDULE: [Cut; 6] = [
    Cut::Reset,
    Cut::BlackHole,
    Cut::ResetThenOffline,
    Cut::BlackHole,
    Cut::Reset,
    Cut::BlackHole,
];
/// Reconnection attempts refused during the offline cut.
const OFFLINE_REFUSALS: u64 = 3;

/// Breaks the proxy's live connections as `SCHEDULE` says, each cut once `BETWEEN_CUTS` bytes
/// have passed since the client came back after the previous one.
async fn cut_repeatedly(proxy: Arc<ChaosProxy>, started: Instant) {
    let mut from = 0u64;
    for (i, cut) in SCHEDULE.into_iter().enumerate() {
        let threshold = from + BETWEEN_CUTS;
        let before = loop {
            proxy
                .wait_for(|s| s.bytes_total() >= threshold && s.live > 0)
                .await;
            // Taken before the cut: a connection accepted after this is either broken by the
            // cut or a fresh one after it.
            let before = proxy.stats();
            let broken = match cut {
                Cut::Reset => proxy.cut_reset(),
                Cut::BlackHole => proxy.black_hole(),
                Cut::ResetThenOffline => {
                    proxy.set_refuse(true);
                    proxy.cut_reset()
                }
            };
            if broken > 0 {
                break before;
            }
            // The live connection ended just before the cut: wait for the next one.
            proxy.set_refuse(false);
            proxy.wait_for(|s| s.accepted > before.accepted).await;
        };
        let at = proxy.stats();
        eprintln!(
            "[test] {:.1?}: cut {} ({cut:?}) at {} MiB forwarded",
            started.elapsed(),
            i + 1,
            at.bytes_total() / MIB as u64
        );
        if cut == Cut::ResetThenOffline {
            let refused = before.refused + OFFLINE_REFUSALS;
            proxy.wait_for(|s| s.refused >= refused).await;
            proxy.set_refuse(false);
            eprintln!(
                "[test] {:.1?}: back online after {OFFLINE_REFUSALS} refused attempts",
                started.elapsed()
            );
        }
        // Count from when the client is back on a fresh connection.
        let back: ChaosStats = proxy
            .wait_for(|s| s.accepted > before.accepted && s.live > 0)
            .await;
        eprintln!(
            "[test] {:.1?}: reconnected (connection {})",
            started.elapsed(),
            back.accepted
        );
        from = back.bytes_total();
    }
}

/// A private sshd on a loopback port, with its keys and a client key in a temporary directory.
struct Sshd {
    dir: tempfile::TempDir,
    port: u16,
    user: String,
    ssh: PathBuf,
    _child: Logged,
}

impl Sshd {
    async fn start() -> Sshd {
        let ssh = find_in_path("ssh").unwrap_or_else(|| panic!("no `ssh` in PATH: {INSTALL_HINT}"));
        let keygen = find_in_path("ssh-keygen")
            .unwrap_or_else(|| panic!("no `ssh-keygen` in PATH: {INSTALL_HINT}"));
        assert!(Path::new(SSHD).is_file(), "no {SSHD}: {INSTALL_HINT}");

        let dir = tempfile::tempdir().expect("temporary directory");
        for key in ["host_key", "id_ed25519"] {
            let out = std::process::Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "immortal-test", "-f"])
                .arg(dir.path().join(key))
                .output()
                .expect("run ssh-keygen");
            assert!(out.status.success(), "ssh-keygen failed: {out:?}");
        }
        std::fs::copy(
            dir.path().join("id_ed25519.pub"),
            dir.path().join("authorized_keys"),
        )
        .expect("write authorized_keys");

        // sshd insists on its privilege-separation directory when run as root.
        if !Path::new("/run/sshd").exists() {
            let _ = std::fs::create_dir_all("/run/sshd");
        }

        let config_path = dir.path().join("sshd_config");
        // A port found free may be taken before sshd binds it: then try another.
        let mut attempts = 0;
        let (port, child) = loop {
            let port = free_port();
            std::fs::write(&config_path, sshd_config(dir.path(), port)).expect("write sshd_config");
            let mut cmd = Command::new(SSHD);
            cmd.arg("-D").arg("-e").arg("-f").arg(&config_path);
            let mut child = Logged::spawn("sshd", cmd);
            match child.wait_line(|l| l.contains("Server listening")).await {
                Ok(_) => break (port, child),
                Err(stderr) if attempts < 3 && stderr.contains("Bind to port") => attempts += 1,
                Err(stderr) => {
                    panic!("sshd ended before printing \"Server listening\"; its stderr:\n{stderr}")
                }
            }
        };
        Sshd {
            dir,
            port,
            user: current_user(),
            ssh,
            _child: child,
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Writes `len` random bytes to the file the remote command sends back; returns them.
    fn write_download(&self, len: usize) -> Vec<u8> {
        let data = random_bytes(len);
        std::fs::write(self.dir.path().join("down.bin"), &data).expect("write down.bin");
        data
    }

    /// Runs one ssh session to `127.0.0.1:port` (through `proxy_command` if given) whose remote
    /// command stores its stdin in `up.bin` and sends `down.bin` to its stdout, both at once.
    /// Feeds `up` to its stdin and hashes its stdout.
    async fn ssh(&self, port: u16, proxy_command: Option<&str>, up: Arc<Vec<u8>>) -> SshRun {
        let d = self.dir.path();
        let remote = format!(
            "cat {} & cat > {}; wait",
            shell_quote(&d.join("down.bin").to_string_lossy()),
            shell_quote(&d.join("up.bin").to_string_lossy()),
        );
        let mut cmd = Command::new(&self.ssh);
        cmd.arg("-F")
            .arg("/dev/null")
            .arg("-T")
            .arg("-i")
            .arg(d.join("id_ed25519"))
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                d.join("known_hosts").display()
            ))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", "StrictHostKeyChecking=accept-new"])
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "IdentitiesOnly=yes"])
            .args(["-o", "LogLevel=ERROR"]);
        if let Some(pc) = proxy_command {
            cmd.arg("-o").arg(format!("ProxyCommand={pc}"));
        }
        cmd.arg("-p")
            .arg(port.to_string())
            .arg(format!("{}@127.0.0.1", self.user))
            .arg(remote);
        quiet_env(&mut cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn ssh");
        let mut stdin = child.stdin.take().expect("ssh stdin");
        let mut stdout = child.stdout.take().expect("ssh stdout");
        let stderr = child.stderr.take().expect("ssh stderr");
        let stderr_lines = collect_lines("ssh", stderr);

        let feed = async move {
            let result = stdin.write_all(&up).await;
            drop(stdin);
            result
        };
        let drain = async move {
            let mut hash = Sha256::new();
            let mut len = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = stdout.read(&mut buf).await.expect("read ssh stdout");
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                len += n as u64;
            }
            (hash.finalize().to_vec(), len)
        };
        let (fed, (down_hash, down_len)) = tokio::join!(feed, drain);
        let status = child.wait().await.expect("wait for ssh");
        let stderr = stderr_lines.lock().map(|l| l.clone()).unwrap_or_default();
        SshRun {
            status,
            fed: fed.err().map(|e| e.to_string()),
            down_hash,
            down_len,
            stderr,
        }
    }
}

/// A minimal sshd configuration: loopback only, keys and state in `dir`, public-key login only,
/// nothing from the system's configuration.
fn sshd_config(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "ListenAddress 127.0.0.1\n\
         Port {port}\n\
         HostKey {d}/host_key\n\
         AuthorizedKeysFile {d}/authorized_keys\n\
         PidFile {d}/sshd.pid\n\
         UsePAM no\n\
         StrictModes no\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\n\
         AllowTcpForwarding no\n\
         X11Forwarding no\n\
         PrintMotd no\n\
         PrintLastLog no\n\
         LogLevel INFO\n"
    )
}

/// What one ssh session did.
struct SshRun {
    status: ExitStatus,
    /// Why feeding its stdin failed, if it did.
    fed: Option<String>,
    down_hash: Vec<u8>,
    down_len: u64,
    stderr: Vec<String>,
}

impl SshRun {
    /// Asserts ssh succeeded and both directions arrived intact.
    fn check(&self, sshd: &Sshd, up: &[u8], down: &[u8]) {
        assert!(
            self.status.success() && self.fed.is_none(),
            "ssh failed: {} (stdin: {:?}); its stderr:\n{}",
            self.status,
            self.fed,
            self.stderr.join("\n")
        );
        assert_eq!(
            (self.down_len, hex::encode(&self.down_hash)),
            (down.len() as u64, hex::encode(Sha256::digest(down))),
            "the download through ssh differs from what was sent (length, SHA-256)"
        );
        let got = std::fs::read(sshd.dir.path().join("up.bin")).expect("read up.bin");
        // Equal bytes have equal hashes; hash only to describe a difference.
        if got != up {
            assert_eq!(
                (got.len(), hex::encode(Sha256::digest(&got))),
                (up.len(), hex::encode(Sha256::digest(up))),
                "the upload through ssh differs from what was sent (length, SHA-256)"
            );
        }
    }
}

/// A child process whose stderr is echoed (prefixed) and kept, and can be waited on line by
/// line. Killed when dropped.
struct Logged {
    name: &'static str,
    _child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    all: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    fn spawn(name: &'static str, mut cmd: Command) -> Logged {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let all = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::unbounded_channel();
        let keep = Arc::clone(&all);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("[{name}] {line}");
                if let Ok(mut all) = keep.lock() {
                    all.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        Logged {
            name,
            _child: child,
            lines,
            all,
        }
    }

    /// Waits for a stderr line matching `pred` and returns it (escape sequences removed);
    /// fails with the whole stderr if the process closes it (exits) first.
    async fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> Result<String, String> {
        while let Some(line) = self.lines.recv().await {
            let line = strip_ansi(&line);
            if pred(&line) {
                return Ok(line);
            }
        }
        Err(self.all.lock().map(|l| l.join("\n")).unwrap_or_default())
    }

    fn dump(&self) {
        eprintln!(
            "[test] {} stderr so far:\n{}",
            self.name,
            self.all.lock().map(|l| l.join("\n")).unwrap_or_default()
        );
    }
}

/// Echoes and keeps the lines of a child's stderr.
fn collect_lines(
    name: &'static str,
    stderr: tokio::process::ChildStderr,
) -> Arc<Mutex<Vec<String>>> {
    let all = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&all);
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            eprintln!("[{name}] {line}");
            if let Ok(mut all) = keep.lock() {
                all.push(line);
            }
        }
    });
    all
}

/// Children log plainly and take their settings from their arguments only.
fn quiet_env(cmd: &mut Command) {
    cmd.env("NO_COLOR", "1")
        .env_remove("IMMORTAL_TOKEN")
        .env_remove("IMMORTAL_SERVER");
}

/// The address in a line like `... listening on http://127.0.0.1:7400`.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let addr = rest.split_whitespace().next()?;
    let addr = addr.rsplit("://").next()?.trim_end_matches('/');
    addr.parse().ok()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    getrandom::fill(&mut data).expect("random bytes");
    data
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The user the test runs as (sshd logs in as this user with the test's key).
fn current_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .expect("run `id -un`");
    assert!(out.status.success(), "`id -un` failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Quotes a string for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
