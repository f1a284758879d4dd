//! Measures the time from "the network is back" to "the stream resumed": an agent, an echo
//! service and a client in one process, the client reaching the agent through the cutting
//! proxy. Each round resets the connection and refuses new ones for the outage, then lets them
//! through again and times until the session is connected.
//!
//! `cargo run --release -p immortal --example resume_after_outage -- [ROUNDS] [OUTAGE_S] [BACKOFF_CAP_MS]`
//! (defaults 20, 5, and the client's own cap).

use std::time::{Duration, Instant};

use backedpipe::{PipeConfig, PipeState, Session};
use immortal::chaos::ChaosProxy;
use immortal::cli::common::session_options;
use immortal::client::{ApiClient, Carrier, StreamConnector, TlsTrust};
use immortal::server::{Agent, AgentConfig};
use immortal::token::Token;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let outage = Duration::from_secs(args.next().map(|a| a.parse()).transpose()?.unwrap_or(5));
    let cap: Option<u64> = args.next().map(|a| a.parse()).transpose()?;

    let service = TcpListener::bind("127.0.0.1:0").await?;
    let port = service.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = service.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    let token = Token::generate();
    let agent = Agent::bind(AgentConfig::new("127.0.0.1:0".parse()?, token.clone())).await?;
    let proxy = ChaosProxy::start(agent.local_addr()).await?;
    tokio::spawn(agent.run());
    let api = ApiClient::new(
        proxy.local_addr().to_string().parse()?,
        &token,
        &TlsTrust::None,
    )?;
    let stream = api.create_stream(port, None).await?;
    let connector = StreamConnector::new(api, &stream, Carrier::Upgrade);
    let mut options = session_options(Duration::from_secs(1));
    if let Some(cap) = cap {
        options = options.pipe(
            PipeConfig::default().backoff(Duration::from_millis(100), Duration::from_millis(cap)),
        );
    }
    let session = Session::connect(connector, options).await?;
    let mut status = session.status();
    let mut times = Vec::new();
    for round in 0..rounds {
        proxy.set_refuse(true);
        proxy.cut_reset();
        status
            .wait_for(|state| !matches!(state, PipeState::Connected))
            .await?;
        tokio::time::sleep(outage).await;
        let back = Instant::now();
        proxy.set_refuse(false);
        status
            .wait_for(|state| matches!(state, PipeState::Connected))
            .await?;
        let took = back.elapsed();
        eprintln!(
            "round {round}: resumed {} ms after the network came back",
            took.as_millis()
        );
        times.push(took);
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "rounds {rounds}, outage {} s: network back -> resumed: median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        outage.as_secs(),
        ms(times[times.len() / 2]),
        ms(times[times.len() * 9 / 10]),
        ms(times[times.len() - 1])
    );
    drop(session);
    Ok(())
}
