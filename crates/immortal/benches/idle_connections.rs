//! How an agent serves a legitimate client while many idle connections are open to it:
//! `immortal serve` started with an open-file soft limit of 1,024 (what many shells give),
//! N TCP connections to it that send nothing, then `immortal ls` timed, as a person runs it.
//!
//! ```text
//! cargo bench -p immortal --bench idle_connections                          # 2,000 connections, 5 runs of ls
//! cargo bench -p immortal --bench idle_connections -- --connections 5000 --runs 10 --json
//! ```
//!
//! Prints each `ls`'s wall time, their median, the open-file limit the agent runs with (read
//! from `/proc`), and how many "accept failed" lines its log has. This process raises its
//! own soft limit to the hard one to hold the connections; N must stay below that.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const IMMORTAL: &str = env!("CARGO_BIN_EXE_immortal");

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut connections = 2000usize;
    let mut runs = 5usize;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--connections" => connections = args.next().ok_or("--connections N")?.parse()?,
            "--runs" => runs = args.next().ok_or("--runs N")?.parse()?,
            "--json" => json = true,
            // What cargo bench passes to every bench target.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let ours = rlimit::increase_nofile_limit(u64::MAX)?;
    if connections as u64 + 64 > ours {
        return Err(format!(
            "{connections} connections need more than this process's limit of {ours} open files"
        )
        .into());
    }

    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    let agent = Agent::start(&token)?;
    // Linux only; elsewhere unknown.
    let limit = agent.open_file_limit().ok();

    let mut idle = Vec::with_capacity(connections);
    for _ in 0..connections {
        idle.push(TcpStream::connect(agent.addr)?);
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let output = Command::new(IMMORTAL)
            .args(["ls", "--server", &agent.addr.to_string(), "--token-file"])
            .arg(&token)
            .env("NO_COLOR", "1")
            .output()?;
        let took = start.elapsed();
        if !output.status.success() {
            return Err(format!(
                "immortal ls failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        times.push(took);
    }
    drop(idle);
    let accept_failed = agent.stop();

    let ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1e3).collect();
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    if json {
        let each: Vec<String> = ms.iter().map(|t| format!("{t:.1}")).collect();
        println!(
            "{{\"connections\":{connections},\"ls_ms\":[{}],\"ls_median_ms\":{median:.1},\"agent_open_file_limit\":{},\"accept_failed_lines\":{accept_failed}}}",
            each.join(","),
            limit.map_or("null".to_owned(), |l| l.to_string())
        );
    } else {
        let each: Vec<String> = ms.iter().map(|t| format!("{t:.0}")).collect();
        println!("{connections} idle connections open to the agent");
        println!(
            "immortal ls: {} ms (median {median:.0} ms)",
            each.join(", ")
        );
        if let Some(limit) = limit {
            println!("the agent's open-file limit: {limit} (started with a soft limit of 1024)");
        }
        println!("\"accept failed\" lines in its log: {accept_failed}");
    }
    Ok(())
}

/// `immortal serve` on a loopback port of its choosing, started under a soft limit of 1,024
/// open files, its log read on a thread.
struct Agent {
    child: Child,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
}

impl Agent {
    fn start(token: &Path) -> Result<Agent, Error> {
        let mut child = Command::new("sh")
            .args(["-c", "ulimit -Sn 1024 && exec \"$0\" \"$@\""])
            .arg(IMMORTAL)
            .args(["serve", "--listen", "127.0.0.1:0", "--token-file"])
            .arg(token)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .map_err(|_| "immortal serve did not say where it listens")?;
            if let Some(addr) = listening_addr(&line) {
                break addr;
            }
        };
        Ok(Agent {
            child,
            addr,
            lines,
            reader,
        })
    }

    /// The agent's open-file soft limit, from `/proc/PID/limits`.
    fn open_file_limit(&self) -> Result<u64, Error> {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.child.id()))?;
        let line = limits
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .ok_or("no open-file limit in /proc")?;
        let soft = line["Max open files".len()..]
            .split_whitespace()
            .next()
            .ok_or("no soft limit")?;
        Ok(soft.parse()?)
    }

    /// Stops the agent and returns how many "accept failed" lines its log had.
    fn stop(mut self) -> usize {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Every line read before counting them.
        let _ = self.reader.join();
        self.lines
            .try_iter()
            .filter(|line| line.contains("accept failed"))
            .count()
    }
}

/// The address in `immortal serve`'s "listening on http://ADDR" line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let url = rest.split_whitespace().next()?;
    url.rsplit("://").next()?.trim_end_matches('/').parse().ok()
}
