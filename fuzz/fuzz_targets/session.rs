//! A server-side session connection driven by arbitrary peer bytes and arbitrary application
//! and clock events: never panics, and its memory stays within its stated bounds whatever
//! arrives (the replay buffer within its capacity, received bytes within the receive limit
//! plus one read, a few control frames queued at most).
//!
//! Input: a sequence of commands, each one byte of operation and one byte of length `n`:
//! 0 feed the next `n` bytes as received from the peer; 1 the application reads up to `n`
//! bytes; 2 it writes `n` bytes; 3 time passes (`n` * 50 ms) and timers fire; 4 the transport
//! takes the first `n` bytes of what is offered; 5 the transport is lost and a new path starts
//! at the offset in the next 8 bytes; 6 shut down; 7 close.
#![no_main]

use std::time::{Duration, Instant};

use backedpipe::proto::{CloseCode, FrameDecoder, SessionId, Side};
use backedpipe::session::Connection;
use backedpipe::{PipeConfig, SessionOptions};
use libfuzzer_sys::fuzz_target;

const CAPACITY: usize = 64 * 1024;
const RECEIVE_LIMIT: usize = 32 * 1024;
/// One read past the receive limit.
const READ_CHUNK: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::now();
    let options = SessionOptions::default()
        .pipe(PipeConfig::default().buffer_capacity(CAPACITY))
        .receive_limit(RECEIVE_LIMIT);
    let id = SessionId::from_bytes([1; 16]);
    let mut conn = Connection::new(Side::Server, id, &options, now).unwrap();
    conn.start_path(now, FrameDecoder::new(), 0).unwrap();
    let mut input = data;
    let mut buf = [0u8; 256];
    while let [op, n, rest @ ..] = input {
        let n = usize::from(*n);
        input = rest;
        match op % 8 {
            0 => {
                let take = n.min(input.len());
                conn.handle_input(now, &input[..take]);
                input = &input[take..];
            }
            1 => {
                let _ = conn.read(now, &mut buf[..n]);
            }
            2 => {
                let _ = conn.write(now, &buf[..n]);
            }
            3 => {
                now += Duration::from_millis(50 * n as u64);
                conn.handle_timeout(now);
            }
            4 => {
                if let Some(transmit) = conn.poll_transmit(now) {
                    let len = transmit.len().min(n);
                    conn.on_transmitted(now, len);
                }
            }
            5 => {
                let Some((offset, rest)) = input.split_first_chunk::<8>() else {
                    return;
                };
                input = rest;
                conn.handle_transport_lost(now);
                let _ = conn.start_path(now, FrameDecoder::new(), u64::from_be_bytes(*offset));
            }
            6 => {
                let _ = conn.shutdown();
            }
            _ => conn.close(now, CloseCode::Normal, "fuzz"),
        }
        let (held, committed) = conn.buffered();
        assert!(held <= CAPACITY && committed <= CAPACITY);
        let (received, memory) = conn.received_buffered();
        assert!(received <= RECEIVE_LIMIT + READ_CHUNK);
        assert!(memory <= RECEIVE_LIMIT + READ_CHUNK);
        assert!(conn.peer_acked() <= conn.written());
        while conn.poll_event().is_some() {}
    }
});
