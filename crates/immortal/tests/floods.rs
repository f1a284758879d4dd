//! Floods of what a peer controls, measured by the process's resident memory (Linux
//! `/proc/self/status`): the agent runs in this process, the flooding clients too (they keep
//! nothing). Each test holds [`ONE_AT_A_TIME`], since RSS is the whole process's.

#![cfg(target_os = "linux")]

use std::net::SocketAddr;
use std::time::Duration;

use backedpipe::proto::Frame;
use immortal::api::{StreamInfo, ATTACH_KEY_HEADER, UPGRADE_PROTOCOL};
use immortal::server::{Agent, AgentConfig};
use immortal::token::Token;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The process's resident set, in bytes.
fn rss() -> u64 {
    status_kib("VmRSS:") * 1024
}

/// The process's peak resident set since [`reset_peak`], in bytes.
fn peak_rss() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Starts a new peak: the kernel resets VmHWM to the current RSS.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn agent(configure: impl FnOnce(&mut AgentConfig)) -> (SocketAddr, Token) {
    let token = Token::generate();
    let mut config = AgentConfig::new("127.0.0.1:0".parse().unwrap(), token.clone());
    configure(&mut config);
    let agent = Agent::bind(config).await.unwrap();
    let addr = agent.local_addr();
    tokio::spawn(agent.run());
    (addr, token)
}

/// 200 authenticated `POST /v1/streams` whose bodies arrive one byte per packet: before, each
/// body byte cost about 4.2 KiB of memory (120 KB of body: +480 MiB) and nothing bounded how
/// long a body could take. Now a body is copied out as it arrives and capped at 4 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_sent_a_byte_at_a_time_cost_no_more_than_their_length() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (addr, token) = agent(|c| c.handshake_timeout = Duration::from_secs(120)).await;
    const CONNECTIONS: usize = 200;
    const BODY: usize = 600;
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        conns.push(tcp);
    }
    let head = format!(
        "POST /v1/streams HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 4000\r\n\r\n",
        token.to_hex()
    );
    for tcp in &mut conns {
        tcp.write_all(head.as_bytes()).await.unwrap();
    }
    reset_peak();
    let before = rss();
    // One byte to each connection in turn: each byte its own packet.
    for _ in 0..BODY {
        for tcp in &mut conns {
            tcp.write_all(b" ").await.unwrap();
        }
        tokio::task::yield_now().await;
    }
    // Then the rest of each body at once, and each answer (400: spaces are no JSON): once
    // every connection is answered, the agent has read every byte, and the peak RSS since the
    // flood began says what it cost.
    let rest = vec![b' '; 4000 - BODY];
    for tcp in &mut conns {
        tcp.write_all(&rest).await.unwrap();
        let mut answer = [0u8; 12];
        tcp.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 400");
    }
    let grown = peak_rss().saturating_sub(before);
    println!(
        "{CONNECTIONS} bodies, the first {BODY} bytes of each sent a byte at a time: peak RSS \
         grew {} KiB",
        grown >> 10
    );
    // 120 KB of body: bounded, it is a few MiB of socket and task bookkeeping at most.
    assert!(grown < 48 << 20, "RSS grew {} MiB", grown >> 20);
}

/// A session peer that sends PINGs and never reads: the agent's memory must not grow with
/// what it is sent (the session answers each PING with a PONG; those must not pile up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_peer_that_pings_and_never_reads_does_not_grow_the_agent() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (addr, token) = agent(|_| {}).await;
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = service.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = service.accept().await {
            held.push(tcp);
        }
    });
    let stream = create(addr, &token, port).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/streams/{}/connect HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         {ATTACH_KEY_HEADER}: {}\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE_PROTOCOL}\r\n\r\n",
        stream.id,
        token.to_hex(),
        stream.attach_key.as_deref().unwrap()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    tcp.write_all(&Frame::hello_new().to_vec()).await.unwrap();
    // The WELCOME, then never another read.
    let mut welcome = Vec::new();
    while Frame::decode(&welcome).unwrap().is_none() {
        welcome.push(tcp.read_u8().await.unwrap());
    }
    reset_peak();
    let before = rss();
    const FLOOD: usize = 48 << 20;
    let batch: Vec<u8> = (0..4096).flat_map(|n| Frame::ping(n).to_vec()).collect();
    let mut sent = 0;
    while sent < FLOOD {
        // Bounded, the agent stops reading once its answers wait (the writes here then stall:
        // a stall of seconds ends the flood; it is not what is asserted).
        match tokio::time::timeout(Duration::from_secs(3), tcp.write_all(&batch)).await {
            Ok(Ok(())) => sent += batch.len(),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let grown = peak_rss().saturating_sub(before);
    println!(
        "PING flood: {} MiB of PINGs sent, peak RSS grew {} KiB",
        sent >> 20,
        grown >> 10
    );
    assert!(grown < 16 << 20, "RSS grew {} MiB", grown >> 20);
}

async fn create(addr: SocketAddr, token: &Token, port: u16) -> StreamInfo {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let body = format!("{{\"port\": {port}}}");
    let request = format!(
        "POST /v1/streams HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        token.to_hex(),
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let json = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    serde_json::from_str(json).unwrap()
}
