//! Arbitrary frames fed to the server and client handshake states: never panics, every frame a
//! state returns is valid on the wire, and a resume is established only with the right MACs.
//!
//! Input: one role byte (0 server, 1 client new session, 2 client resume; taken modulo 3), then
//! frame bytes. The server knows one session and draws "randomness" as fixed 0x42 bytes, so the
//! seed corpus (written by `crates/backedpipe/tests/protocol_fuzz_corpus.rs`, which shares these
//! constants) can carry complete valid handshakes.
#![no_main]

use backedpipe::proto::{
    ClientHandshake, Frame, FrameDecoder, Secret, ServerHandshake, SessionId, SessionLookup,
};
use libfuzzer_sys::fuzz_target;

const SESSION_ID: [u8; 16] = [1; 16];
const SECRET: [u8; 32] = [2; 32];
const SERVER_READER_SEQ: u64 = 5;
const CLIENT_READER_SEQ: u64 = 9;
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
    let mut frames = std::iter::from_fn(|| decoder.next_frame().ok().flatten());
    let Some(first) = frames.next() else { return };
    let id = SessionId::from_bytes(SESSION_ID);
    let secret = Secret::from_bytes(SECRET);

    match role % 3 {
        0 => {
            let mut store = |asked: &SessionId| {
                if *asked == id {
                    SessionLookup::Found {
                        secret: secret.clone(),
                        server_reader_seq: SERVER_READER_SEQ,
                    }
                } else {
                    SessionLookup::Unknown
                }
            };
            let server = ServerHandshake::with_random(|buf| buf.fill(RANDOM_BYTE));
            match server.handle_frame(first, &mut store) {
                Err(failure) => failure.close.iter().for_each(check_sendable),
                Ok(outcome) => {
                    if let Some((next, challenge)) = outcome.into_challenge() {
                        check_sendable(&challenge);
                        let Some(proof) = frames.next() else { return };
                        match next.handle_frame(proof) {
                            Err(failure) => failure.close.iter().for_each(check_sendable),
                            Ok(verified) => {
                                assert_eq!(verified.session_id(), id);
                                let (established, resumed) = verified.accept();
                                check_sendable(&resumed);
                                assert!(established.is_resume());
                            }
                        }
                    }
                }
            }
        }
        1 => match ClientHandshake::new_session().0.handle_frame(first) {
            Err(failure) => failure.close.iter().for_each(check_sendable),
            Ok(established) => assert!(!established.is_resume()),
        },
        _ => {
            let (client, _) = ClientHandshake::resume(id, secret, CLIENT_READER_SEQ);
            match client.handle_frame(first) {
                Err(failure) => failure.close.iter().for_each(check_sendable),
                Ok((next, proof)) => {
                    check_sendable(&proof);
                    let Some(resumed) = frames.next() else { return };
                    match next.handle_frame(resumed) {
                        Err(failure) => failure.close.iter().for_each(check_sendable),
                        Ok(established) => {
                            assert_eq!(established.local_reader_seq(), CLIENT_READER_SEQ)
                        }
                    }
                }
            }
        }
    }
});
