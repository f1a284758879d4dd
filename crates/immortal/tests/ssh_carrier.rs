//! End to end over ssh carriers, with a real OpenSSH client and a private sshd on loopback,
//! and nothing set up: no agent running, no token, no open port.
//!
//! - `immortal ssh` runs a command on the host and exits with its status; the agent that the
//!   carrier's `immortal relay` started exits by itself once idle.
//! - A remote host without immortal gets one line saying so and how to fix it.
//! - `--install` copies the running binary where carriers find it, and refuses (copying or
//!   installing nothing) a host of another platform or a copy that does not start there.
//! - An ssh session whose ProxyCommand is `immortal connect --via-ssh`, with every carrier going
//!   through a [`ChaosProxy`] that resets, black-holes and refuses them, carries 32 MiB each
//!   way intact and exits 0.
//!
//! The sshd gives its sessions `IMMORTAL_RUNTIME_DIR` (a directory of the test) and a short
//! idle time for the agent, so nothing touches the user's real agent or lingers. Needs `ssh`,
//! `ssh-keygen` and `/usr/sbin/sshd` (`.ci/run` installs them); without them the tests fail.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use immortal::chaos::ChaosProxy;
use immortal::runtime_dir::FileLock;
use tokio::process::Command;

use support::*;

/// Data sent in each direction through the cut carriers.
const EACH_WAY: usize = 32 * MIB;
/// Bytes (both directions together) through a fresh carrier before the next cut.
const BETWEEN_CUTS: u64 = 6 * MIB as u64;
/// Cuts that must land before the transfer ends (of the schedule's six).
const MIN_CUTS: u64 = 5;
/// A hang fails the test after this long instead of blocking CI.
const OVERALL: Duration = Duration::from_secs(300);

const IMMORTAL: &str = env!("CARGO_BIN_EXE_immortal");

/// An sshd whose sessions find the agent in the returned directory (kept until dropped),
/// and whose agents idle out fast.
async fn sshd() -> (Sshd, Runtime) {
    let base = tempfile::tempdir().unwrap();
    let runtime = Runtime {
        path: base.path().join("rt"),
        _base: base,
    };
    let sshd = Sshd::start_with(&format!(
        "SetEnv IMMORTAL_RUNTIME_DIR={} IMMORTAL_AGENT_IDLE_EXIT=2s NO_COLOR=1\n",
        runtime.display()
    ))
    .await;
    (sshd, runtime)
}

/// A runtime directory for the agent, in a temporary directory removed when dropped.
struct Runtime {
    path: std::path::PathBuf,
    _base: tempfile::TempDir,
}

impl std::ops::Deref for Runtime {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

/// `IMMORTAL_SSH_COMMAND` for clients of `sshd`, with `extra` options.
fn ssh_command(sshd: &Sshd, extra: &[&str]) -> String {
    let mut words = vec![sshd.ssh.display().to_string()];
    words.extend(sshd.client_options());
    words.extend(extra.iter().map(|s| s.to_string()));
    shlex::try_join(words.iter().map(String::as_str)).unwrap()
}

/// Waits (within `OVERALL`) until the agent of `runtime` has exited: its lock is free.
async fn wait_for_agent_exit(runtime: &Path) {
    let lock = runtime.join("agent.lock");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(FileLock::acquire(&lock).map(drop));
    });
    let waited = tokio::task::spawn_blocking(move || rx.recv_timeout(OVERALL))
        .await
        .unwrap();
    match waited {
        Ok(Ok(())) => {}
        Ok(Err(err)) => panic!("cannot lock the agent's lock file: {err}"),
        Err(_) => panic!("the agent did not exit within {OVERALL:?}"),
    }
}

fn agent_log(runtime: &Path) -> String {
    std::fs::read_to_string(runtime.join("agent.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immortal_ssh_runs_a_command_with_nothing_set_up() {
    let work = async {
        let (sshd, runtime) = sshd().await;
        assert!(!runtime.join("agent.sock").exists(), "no agent before");
        let output = Command::new(IMMORTAL)
            .arg("ssh")
            .arg("--remote-command")
            .arg(IMMORTAL)
            .args(["-p", &sshd.port.to_string()])
            .arg(format!("{}@127.0.0.1", sshd.user))
            .arg("echo carried over immortal; exit 3")
            .env("IMMORTAL_SSH_COMMAND", ssh_command(&sshd, &[]))
            .env_remove("IMMORTAL_TOKEN")
            .env_remove("IMMORTAL_SERVER")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).as_ref()
            ),
            (Some(3), "carried over immortal\n"),
            "stderr:\n{stderr}\nagent log:\n{}",
            agent_log(&runtime)
        );
        // The relay started an agent, which held the stream and is gone once idle.
        wait_for_agent_exit(&runtime).await;
        let log = agent_log(&runtime);
        assert!(log.contains("stream created"), "agent log:\n{log}");
        assert!(
            log.contains("no stream for 2s; exiting"),
            "agent log:\n{log}"
        );
    };
    tokio::time::timeout(OVERALL, work)
        .await
        .expect("the test did not finish in time");
}

/// An sshd whose sessions have a home of their own (a directory of the test, so
/// `~/.local/bin` is too), with a fake command first on their PATH if asked.
struct RemoteHome {
    sshd: Sshd,
    home: tempfile::TempDir,
    base: tempfile::TempDir,
}

impl RemoteHome {
    /// `fake`: a command's name and the shell script it runs.
    async fn start(fake: Option<(&str, &str)>) -> RemoteHome {
        let home = tempfile::tempdir().unwrap();
        let base = tempfile::tempdir().unwrap();
        let bin = base.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        if let Some((name, script)) = fake {
            let path = bin.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        let sshd = Sshd::start_with(&format!(
            "SetEnv HOME={} PATH={}:/usr/local/bin:/usr/bin:/bin IMMORTAL_RUNTIME_DIR={} \
             IMMORTAL_AGENT_IDLE_EXIT=2s NO_COLOR=1\n",
            home.path().display(),
            bin.display(),
            base.path().join("rt").display()
        ))
        .await;
        RemoteHome { sshd, home, base }
    }

    /// Where the remote agent runs.
    fn runtime(&self) -> std::path::PathBuf {
        self.base.path().join("rt")
    }

    /// `immortal ssh [--install] HOST COMMAND`.
    async fn ssh(&self, install: bool, command: &str) -> std::process::Output {
        let mut ssh = Command::new(IMMORTAL);
        ssh.arg("ssh");
        if install {
            ssh.arg("--install");
        }
        ssh.args(["-p", &self.sshd.port.to_string()])
            .arg(format!("{}@127.0.0.1", self.sshd.user))
            .arg(command)
            .env("IMMORTAL_SSH_COMMAND", ssh_command(&self.sshd, &[]))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_copies_the_binary_and_the_carrier_finds_it_there() {
    let work = async {
        let remote = RemoteHome::start(None).await;
        let home = remote.home.path();
        // No `immortal` on the remote PATH: without --install, one line says so.
        let before = remote.ssh(false, "echo from $HOME").await;
        let stderr = String::from_utf8_lossy(&before.stderr);
        assert_eq!(before.status.code(), Some(255), "{stderr}");
        assert!(stderr.contains("has no `"), "{stderr}");
        let installed = remote.ssh(true, "echo from $HOME").await;
        let stderr = String::from_utf8_lossy(&installed.stderr);
        assert!(
            stderr.contains("installed immortal"),
            "no word of the install:\n{stderr}"
        );
        assert_eq!(
            String::from_utf8_lossy(&installed.stdout),
            format!("from {}\n", home.display()),
            "{stderr}"
        );
        assert!(installed.status.success(), "{stderr}");
        let copy = std::fs::read(home.join(".local/bin/immortal")).unwrap();
        assert!(
            copy == std::fs::read(IMMORTAL).unwrap(),
            "the installed binary differs from the running one"
        );
        // From now on the carrier finds it in ~/.local/bin by itself.
        let after = remote.ssh(false, "echo from $HOME").await;
        assert!(
            after.status.success(),
            "{}",
            String::from_utf8_lossy(&after.stderr)
        );
        wait_for_agent_exit(&remote.runtime()).await;
    };
    tokio::time::timeout(OVERALL, work)
        .await
        .expect("the test did not finish in time");
}

/// The line of a failed `immortal ssh --install` that says why.
fn install_refusal(output: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    stderr
        .lines()
        .find(|l| l.contains("--install:"))
        .unwrap_or_else(|| panic!("no refusal:\n{stderr}"))
        .to_owned()
}

/// `--install` refuses a host whose `uname -sm` names another platform, and copies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_refuses_a_host_of_another_platform() {
    let work = async {
        // Whatever this machine is, the fake remote is something else.
        let other = if cfg!(target_os = "freebsd") {
            "Linux aarch64"
        } else {
            "FreeBSD amd64"
        };
        let remote = RemoteHome::start(Some(("uname", &format!("echo {other}")))).await;
        let output = remote.ssh(true, "true").await;
        let line = install_refusal(&output);
        assert!(
            line.contains("runs freebsd/x86_64") || line.contains("runs linux/aarch64"),
            "{line}"
        );
        assert!(line.contains("nothing was copied"), "{line}");
        assert!(
            !remote.home.path().join(".local").exists(),
            "something was copied to the remote"
        );
    };
    tokio::time::timeout(OVERALL, work)
        .await
        .expect("the test did not finish in time");
}

/// `--install` removes a copy that does not start on the host and installs nothing (here
/// the host's `chmod` does nothing, so the copy cannot be executed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_removes_a_copy_that_does_not_start() {
    let work = async {
        let remote = RemoteHome::start(Some(("chmod", "exit 0"))).await;
        let output = remote.ssh(true, "true").await;
        let line = install_refusal(&output);
        assert!(line.contains("does not start"), "{line}");
        assert!(line.contains("nothing was installed"), "{line}");
        let bin = remote.home.path().join(".local/bin");
        let left: Vec<_> = std::fs::read_dir(&bin).unwrap().collect();
        assert!(left.is_empty(), "left in {}: {left:?}", bin.display());
    };
    tokio::time::timeout(OVERALL, work)
        .await
        .expect("the test did not finish in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_immortal_is_named_with_the_fix() {
    let work = async {
        let (sshd, _runtime) = sshd().await;
        let output = Command::new(IMMORTAL)
            .args(["ssh", "--remote-command", "/nonexistent/immortal"])
            .args(["-p", &sshd.port.to_string()])
            .arg(format!("{}@127.0.0.1", sshd.user))
            .arg("true")
            .env("IMMORTAL_SSH_COMMAND", ssh_command(&sshd, &[]))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(255), "stderr:\n{stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("has no `/nonexistent/immortal`"))
            .unwrap_or_else(|| panic!("no line about the missing binary:\n{stderr}"));
        assert!(line.contains("immortal ssh --install"), "{line}");
    };
    tokio::time::timeout(OVERALL, work)
        .await
        .expect("the test did not finish in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_over_cut_carriers_carries_32_mib_each_way() {
    let work = async {
        let started = Instant::now();
        let (sshd, runtime) = sshd().await;
        // Every carrier goes through the proxy; the session's own ssh does not (it talks to
        // the ProxyCommand), and the agent dials the sshd directly on loopback.
        let proxy = Arc::new(ChaosProxy::start(sshd.addr()).await.expect("start proxy"));
        let carrier_ssh = ssh_command(&sshd, &["-p", &proxy.local_addr().port().to_string()]);
        let proxy_command = format!(
            "{} connect --stdio --heartbeat 1s --via-ssh {}@127.0.0.1 --remote-command {} %p",
            shlex::try_quote(IMMORTAL).unwrap(),
            sshd.user,
            shlex::try_quote(IMMORTAL).unwrap(),
        );
        let cutter = tokio::spawn(cut_repeatedly(Arc::clone(&proxy), started, BETWEEN_CUTS));
        let up = random_bytes(EACH_WAY);
        let down = sshd.write_download(EACH_WAY);
        let run = sshd
            .ssh_env(
                sshd.port,
                Some(&proxy_command),
                &[("IMMORTAL_SSH_COMMAND", carrier_ssh)],
                Arc::new(up.clone()),
            )
            .await;
        cutter.abort();
        let stats = proxy.stats();
        eprintln!(
            "[test] ssh finished after {:.1?}: {stats:?}",
            started.elapsed()
        );
        if !run.status.success() {
            eprintln!("[test] agent log:\n{}", agent_log(&runtime));
        }
        run.check(&sshd, &up, &down);
        assert!(
            stats.cuts >= MIN_CUTS,
            "only {} cuts landed (wanted {MIN_CUTS}): {stats:?}",
            stats.cuts
        );
        assert!(
            stats.accepted > MIN_CUTS,
            "a fresh carrier after each cut: {stats:?}"
        );
        assert!(stats.black_holes > 0 && stats.resets > 0, "{stats:?}");
        drop(proxy);
        wait_for_agent_exit(&runtime).await;
    };
    tokio::time::timeout(OVERALL, work)
        .await
        .expect("the test did not finish in time");
}
