//! Arbitrary frames fed to the server and client handshake states: never panics, every frame a
//! state returns is valid on the wire, and a resume is established only with the right MACs.
//!
//! Input: one role byte (0 server, 1 client new session, 2 client resume; taken modulo 3), then
//! the bytes of the peer's first frame. The server knows one session (whose last accepted resume
//! attempt is 2) and draws "randomness" as fixed 0x42 bytes, so the seed corpus (written by
//! `crates/backedpipe/tests/protocol_fuzz_corpus.rs`, which shares these constants) can carry
//! complete valid handshakes.
#![no_main]

use backedpipe::proto::{
    ClientHandshake, Frame, FrameDecoder, Secret, ServerHandshake, SessionId, SessionLookup,
};
use libfuzzer_sys::fuzz_target;

const SESSION_ID: [u8; 16] = [1; 16];
const SECRET: [u8; 32] = [2; 32];
const SERVER_READER_SEQ: u64 = 5;
const CLIENT_READER_SEQ: u64 = 9;
const ATTEMPT: u64 = 3;
const LAST_ATTEMPT: u64 = 2;
const RANDOM_BYTE: u8 = 0x42;

/// The frame sent must decode back to itself.
fn check_sendable(frame: &Frame) {
    let bytes = frame.to_vec();
    let (again, used) = Frame::decode(&bytes).unwrap().unwrap();
    assert_eq!((&again, used), (frame, bytes.len()));
}

fuzz_target!(|data: &[u8]| {
    let Some((&role, rest)) = data.split_first() else {
        return;
    };
    let mut decoder = FrameDecoder::new();
    decoder.push(rest);
    let Some(first) = decoder.next_frame().ok().flatten() else {
        return;
    };
    let id = SessionId::from_bytes(SESSION_ID);
    let secret = Secret::from_bytes(SECRET);

    match role % 3 {
        0 => {
            let mut store = |asked: &SessionId| {
                if *asked == id {
                    SessionLookup::Found {
                        secret: secret.clone(),
                        last_attempt: LAST_ATTEMPT,
                    }
                } else {
                    SessionLookup::Unknown
                }
            };
            let server = ServerHandshake::with_random(|buf| buf.fill(RANDOM_BYTE));
            match server.handle_frame(first, &mut store) {
                Err(failure) => failure.close.iter().for_each(check_sendable),
                Ok(outcome) => {
                    if let Some(verified) = outcome.into_resume() {
                        assert_eq!(verified.session_id(), id);
                        assert!(verified.attempt() > LAST_ATTEMPT);
                        let (established, resumed) = verified.accept(SERVER_READER_SEQ);
                        check_sendable(&resumed);
                        assert!(established.is_resume());
                    }
                }
            }
        }
        1 => match ClientHandshake::new_session().0.handle_frame(first) {
            Err(failure) => failure.close.iter().for_each(check_sendable),
            Ok(established) => assert!(!established.is_resume()),
        },
        _ => {
            let (client, hello) = ClientHandshake::resume(id, secret, ATTEMPT, CLIENT_READER_SEQ);
            check_sendable(&hello);
            match client.handle_frame(first) {
                Err(failure) => failure.close.iter().for_each(check_sendable),
                Ok(established) => {
                    assert_eq!(established.local_reader_seq(), CLIENT_READER_SEQ);
                    assert_eq!(established.remote_reader_seq(), SERVER_READER_SEQ);
                }
            }
        }
    }
});
