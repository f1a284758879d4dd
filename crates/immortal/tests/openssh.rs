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

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use immortal::chaos::ChaosProxy;
use tokio::process::Command;

use support::*;

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
    let cutter = tokio::spawn(cut_repeatedly(Arc::clone(&proxy), started, BETWEEN_CUTS));

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
