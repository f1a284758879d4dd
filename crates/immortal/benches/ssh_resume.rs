//! How long a stream takes to resume after a cut: over the ssh carrier (an ssh login, the
//! relay, the agent's socket, the session's resume) and over a direct TCP connection to the
//! agent (`immortal serve`), side by side on loopback.
//!
//! ```text
//! cargo bench -p immortal --bench ssh_resume                 # 20 rounds
//! cargo bench -p immortal --bench ssh_resume -- --rounds 50 --json
//! ```
//!
//! Needs `ssh`, `ssh-keygen` and `/usr/sbin/sshd` (as the OpenSSH tests do), and starts its
//! own sshd on a loopback port, with keys in a temporary directory. Each round, for each
//! transport in turn (interleaved), it checks the stream with an 8-byte echo, resets the
//! transport's TCP connection at a [`ChaosProxy`], and times from the reset to the next 8-byte
//! echo coming back: noticing the loss, a fresh transport (for the carrier: a new ssh process,
//! its login, `immortal relay`), the resume handshake and the round trip. It also times a bare
//! `ssh host true` for scale. Prints medians and extremes in milliseconds.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use backedpipe::{Session, SessionOptions};
use immortal::chaos::ChaosProxy;
use immortal::client::{
    ApiClient, Carrier, ServerAddr, SshCarrier, SshCommand, SshConnector, StreamConnector,
    TlsTrust, CARRIER_LINGER,
};
use immortal::server::{Agent, AgentConfig};
use immortal::token::Token;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;

const IMMORTAL: &str = env!("CARGO_BIN_EXE_immortal");
const SSHD: &str = "/usr/sbin/sshd";

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut rounds = 20usize;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => rounds = args.next().ok_or("--rounds N")?.parse()?,
            "--json" => json = true,
            // What cargo bench passes to every bench target.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(rounds, json))
}

async fn run(rounds: usize, json: bool) -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let sshd = Sshd::start(dir.path()).await?;
    let echo = echo_service().await?;

    // The carrier: ssh through a proxy to the sshd; the agent dials the echo service.
    let ssh_proxy = ChaosProxy::start(sshd.addr).await?;
    let ssh = SshCommand::parse(&format!(
        "ssh {} -p {}",
        sshd.client_options(),
        ssh_proxy.local_addr().port()
    ))?;
    let carrier = SshCarrier::new(
        ssh,
        format!("{}@127.0.0.1", sshd.user),
        Some(IMMORTAL.into()),
    );
    let options = SessionOptions::default().connect_timeout(Duration::from_secs(30));
    let connector = SshConnector::new(carrier, echo.port());
    let carriers = connector.carriers();
    let over_ssh = Session::connect(connector, options.clone()).await?;

    // The direct transport: an agent in this process, through a proxy.
    let token = Token::generate();
    let agent = Agent::bind(AgentConfig::new("127.0.0.1:0".parse()?, token.clone())).await?;
    let agent_proxy = ChaosProxy::start(agent.local_addr()).await?;
    let _agent = tokio::spawn(agent.run());
    let server: ServerAddr = agent_proxy.local_addr().to_string().parse()?;
    let api = ApiClient::new(server, &token, &TlsTrust::None)?;
    let stream = api.create_stream(echo.port(), None).await?;
    let direct = Session::connect(
        StreamConnector::new(api, &stream, Carrier::Upgrade),
        options,
    )
    .await?;

    let mut ssh_ms = Vec::new();
    let mut tcp_ms = Vec::new();
    let mut login_ms = Vec::new();
    for _ in 0..rounds {
        ssh_ms.push(cut_and_time(&over_ssh, &ssh_proxy).await?);
        tcp_ms.push(cut_and_time(&direct, &agent_proxy).await?);
        login_ms.push(sshd.time_login().await?);
    }
    let (ssh, tcp, login) = (
        summary(&mut ssh_ms),
        summary(&mut tcp_ms),
        summary(&mut login_ms),
    );
    if json {
        println!(
            "{{\"bench\":\"ssh_resume\",\"rounds\":{rounds},\"ssh_resume_ms\":{:.2},\"tcp_resume_ms\":{:.2},\"ssh_login_ms\":{:.2}}}",
            ssh.0, tcp.0, login.0
        );
    } else {
        println!("{rounds} rounds, loopback, milliseconds: median (min .. max)");
        println!(
            "resume over the ssh carrier: {:8.2} ({:.2} .. {:.2})",
            ssh.0, ssh.1, ssh.2
        );
        println!(
            "resume over direct TCP:      {:8.2} ({:.2} .. {:.2})",
            tcp.0, tcp.1, tcp.2
        );
        println!(
            "a bare `ssh host true`:      {:8.2} ({:.2} .. {:.2})",
            login.0, login.1, login.2
        );
    }
    // Closed, and the CLOSE let through the last carrier, so the agent the relay started
    // forgets the stream and exits once idle instead of keeping it for its time to live.
    over_ssh.close().await?;
    drop(over_ssh);
    let _ = tokio::time::timeout(CARRIER_LINGER, carriers.all_ended()).await;
    direct.close().await?;
    Ok(())
}

/// Checks the stream, resets its transport, and returns the milliseconds from the reset to an
/// echo through the resumed stream.
async fn cut_and_time(session: &Session, proxy: &ChaosProxy) -> Result<f64, Error> {
    echo(session).await?;
    let before = proxy.stats();
    // The live transport must be the one cut (a reconnect of the previous round is done).
    proxy.wait_for(|s| s.live > 0).await;
    let started = Instant::now();
    proxy.cut_reset();
    echo(session).await?;
    let elapsed = started.elapsed();
    if proxy.stats().accepted <= before.accepted {
        return Err("the stream answered without a new transport".into());
    }
    Ok(elapsed.as_secs_f64() * 1e3)
}

async fn echo(session: &Session) -> Result<(), Error> {
    let ping = *b"8 bytes!";
    let mut sent = 0;
    while sent < ping.len() {
        sent += session.write(&ping[sent..]).await?;
    }
    let mut got = [0u8; 8];
    let mut read = 0;
    while read < got.len() {
        let n = session.read(&mut got[read..]).await?;
        if n == 0 {
            return Err("the stream ended".into());
        }
        read += n;
    }
    if got != ping {
        return Err("the echo differs".into());
    }
    Ok(())
}

/// Median, min, max.
fn summary(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

async fn echo_service() -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// A private sshd on loopback whose sessions find the agent in its directory.
struct Sshd {
    dir: PathBuf,
    addr: SocketAddr,
    user: String,
    _child: tokio::process::Child,
}

impl Sshd {
    async fn start(dir: &Path) -> Result<Sshd, Error> {
        for key in ["host_key", "id_ed25519"] {
            let status = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key))
                .status()?;
            if !status.success() {
                return Err("ssh-keygen failed".into());
            }
        }
        std::fs::copy(dir.join("id_ed25519.pub"), dir.join("authorized_keys"))?;
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = {
            let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            probe.local_addr()?.port()
        };
        let d = dir.display();
        let config = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\n\
             AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nUsePAM no\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nPrintMotd no\nPrintLastLog no\n\
             SetEnv IMMORTAL_RUNTIME_DIR={d}/rt IMMORTAL_AGENT_IDLE_EXIT=10s NO_COLOR=1\n"
        );
        std::fs::write(dir.join("sshd_config"), config)?;
        let mut child = tokio::process::Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stderr.take().ok_or("no stderr")?).lines();
        loop {
            match lines.next_line().await? {
                Some(line) if line.contains("Server listening") => break,
                Some(_) => {}
                None => return Err("sshd exited before listening".into()),
            }
        }
        // Keep reading its stderr, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let user = String::from_utf8(std::process::Command::new("id").arg("-un").output()?.stdout)?;
        Ok(Sshd {
            dir: dir.to_path_buf(),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            user: user.trim().to_owned(),
            _child: child,
        })
    }

    fn client_options(&self) -> String {
        let d = self.dir.display();
        format!(
            "-F /dev/null -i {d}/id_ed25519 -o UserKnownHostsFile={d}/known_hosts \
             -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=accept-new \
             -o BatchMode=yes -o IdentitiesOnly=yes -o LogLevel=ERROR"
        )
    }

    /// Milliseconds for `ssh host true`, straight to the sshd.
    async fn time_login(&self) -> Result<f64, Error> {
        let started = Instant::now();
        let mut ssh = tokio::process::Command::new("ssh");
        ssh.args(self.client_options().split(' '))
            .args(["-p", &self.addr.port().to_string()])
            .arg(format!("{}@127.0.0.1", self.user))
            .arg("true")
            .stdin(Stdio::null());
        let status = ssh.status().await?;
        if !status.success() {
            return Err(format!("ssh true failed: {status}").into());
        }
        Ok(started.elapsed().as_secs_f64() * 1e3)
    }
}
