//! What the end-to-end tests with a real OpenSSH share: a private sshd on loopback
//! ([`Sshd`]), ssh sessions that move data both ways and check it ([`SshRun`]), child
//! processes whose stderr is kept ([`Logged`]), and a schedule of cuts for a [`ChaosProxy`].
//!
//! Needs `ssh`, `ssh-keygen` and `/usr/sbin/sshd` (Debian: `openssh-client`,
//! `openssh-server`; `.ci/run` installs them). Without them the tests fail rather than skip.

// Each test file uses part of this.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use immortal::chaos::{ChaosProxy, ChaosStats};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub const MIB: usize = 1 << 20;

pub const SSHD: &str = "/usr/sbin/sshd";
pub const INSTALL_HINT: &str = "this test needs a real OpenSSH: install openssh-server and \
     openssh-client (Debian: apt-get install -y openssh-server openssh-client; .ci/run does)";

/// How the transport is broken, cut after cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
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
pub const SCHEDULE: [Cut; 6] = [
    Cut::Reset,
    Cut::BlackHole,
    Cut::ResetThenOffline,
    Cut::BlackHole,
    Cut::Reset,
    Cut::BlackHole,
];
/// Reconnection attempts refused during the offline cut.
pub const OFFLINE_REFUSALS: u64 = 3;

/// Breaks the proxy's live connections as `SCHEDULE` says, each cut once `between` bytes
/// have passed since the client came back after the previous one.
pub async fn cut_repeatedly(proxy: Arc<ChaosProxy>, started: Instant, between: u64) {
    let mut from = 0u64;
    for (i, cut) in SCHEDULE.into_iter().enumerate() {
        let threshold = from + between;
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
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub user: String,
    pub ssh: PathBuf,
    _child: Logged,
}

impl Sshd {
    pub async fn start() -> Sshd {
        Sshd::start_with("").await
    }

    /// A private sshd with `extra` appended to its configuration.
    pub async fn start_with(extra: &str) -> Sshd {
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
            let config = sshd_config(dir.path(), port) + extra;
            std::fs::write(&config_path, config).expect("write sshd_config");
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

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Writes `len` random bytes to the file the remote command sends back; returns them.
    pub fn write_download(&self, len: usize) -> Vec<u8> {
        let data = random_bytes(len);
        std::fs::write(self.dir.path().join("down.bin"), &data).expect("write down.bin");
        data
    }

    /// Runs one ssh session to `127.0.0.1:port` (through `proxy_command` if given) whose remote
    /// command stores its stdin in `up.bin` and sends `down.bin` to its stdout, both at once.
    /// Feeds `up` to its stdin and hashes its stdout.
    pub async fn ssh(&self, port: u16, proxy_command: Option<&str>, up: Arc<Vec<u8>>) -> SshRun {
        self.ssh_env(port, proxy_command, &[], up).await
    }

    /// The options every client of this sshd needs: no configuration file, the test's key and
    /// known-hosts file, no questions, errors only.
    pub fn client_options(&self) -> Vec<String> {
        let d = self.dir.path();
        let mut options = vec![
            "-F".to_string(),
            "/dev/null".into(),
            "-i".into(),
            d.join("id_ed25519").display().to_string(),
            "-o".into(),
            format!("UserKnownHostsFile={}", d.join("known_hosts").display()),
        ];
        for option in [
            "GlobalKnownHostsFile=/dev/null",
            "StrictHostKeyChecking=accept-new",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "LogLevel=ERROR",
        ] {
            options.push("-o".into());
            options.push(option.into());
        }
        options
    }

    /// As [`Sshd::ssh`], with `env` added to ssh's environment (which its ProxyCommand
    /// inherits).
    pub async fn ssh_env(
        &self,
        port: u16,
        proxy_command: Option<&str>,
        env: &[(&str, String)],
        up: Arc<Vec<u8>>,
    ) -> SshRun {
        let d = self.dir.path();
        let remote = format!(
            "cat {} & cat > {}; wait",
            shell_quote(&d.join("down.bin").to_string_lossy()),
            shell_quote(&d.join("up.bin").to_string_lossy()),
        );
        let mut cmd = Command::new(&self.ssh);
        cmd.args(self.client_options()).arg("-T");
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
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
pub fn sshd_config(dir: &Path, port: u16) -> String {
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
pub struct SshRun {
    pub status: ExitStatus,
    /// Why feeding its stdin failed, if it did.
    pub fed: Option<String>,
    pub down_hash: Vec<u8>,
    pub down_len: u64,
    pub stderr: Vec<String>,
}

impl SshRun {
    /// Asserts ssh succeeded and both directions arrived intact.
    pub fn check(&self, sshd: &Sshd, up: &[u8], down: &[u8]) {
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
pub struct Logged {
    name: &'static str,
    _child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    all: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    pub fn spawn(name: &'static str, mut cmd: Command) -> Logged {
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
    pub async fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> Result<String, String> {
        while let Some(line) = self.lines.recv().await {
            let line = strip_ansi(&line);
            if pred(&line) {
                return Ok(line);
            }
        }
        Err(self.all.lock().map(|l| l.join("\n")).unwrap_or_default())
    }

    pub fn dump(&self) {
        eprintln!(
            "[test] {} stderr so far:\n{}",
            self.name,
            self.all.lock().map(|l| l.join("\n")).unwrap_or_default()
        );
    }
}

/// Echoes and keeps the lines of a child's stderr.
pub fn collect_lines(
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
pub fn quiet_env(cmd: &mut Command) {
    cmd.env("NO_COLOR", "1")
        .env_remove("IMMORTAL_TOKEN")
        .env_remove("IMMORTAL_SERVER");
}

/// The address in a line like `... listening on http://127.0.0.1:7400`.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let addr = rest.split_whitespace().next()?;
    let addr = addr.rsplit("://").next()?.trim_end_matches('/');
    addr.parse().ok()
}

pub fn strip_ansi(line: &str) -> String {
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

pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    getrandom::fill(&mut data).expect("random bytes");
    data
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The user the test runs as (sshd logs in as this user with the test's key).
pub fn current_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .expect("run `id -un`");
    assert!(out.status.success(), "`id -un` failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Quotes a string for sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
