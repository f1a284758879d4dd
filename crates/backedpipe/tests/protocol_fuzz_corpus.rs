//! The committed seed corpus of the fuzz targets (fuzz/corpus/<target>/seed-*) matches what the
//! code encodes today. Regenerate it with
//! `BACKEDPIPE_WRITE_FUZZ_CORPUS=1 cargo test -p backedpipe --test protocol_fuzz_corpus`.

use std::path::PathBuf;

use backedpipe::proto::*;

// Shared with fuzz/fuzz_targets/handshake.rs.
const SESSION_ID: [u8; 16] = [1; 16];
const SECRET: [u8; 32] = [2; 32];
const SERVER_READER_SEQ: u64 = 5;
const CLIENT_READER_SEQ: u64 = 9;
const ATTEMPT: u64 = 3;
const LAST_ATTEMPT: u64 = 2;

fn bytes(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        f.encode(&mut out);
    }
    out
}

fn with_role(role: u8, frames: &[Frame]) -> Vec<u8> {
    let mut out = vec![role];
    out.extend(bytes(frames));
    out
}

fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let id = SessionId::from_bytes(SESSION_ID);
    let secret = Secret::from_bytes(SECRET);
    let proof = client_proof(&secret, &id, ATTEMPT, CLIENT_READER_SEQ);
    let hello_resume = Frame::hello_resume(id, ATTEMPT, CLIENT_READER_SEQ, proof);
    let resumed = Frame::Resumed {
        server_reader_seq: SERVER_READER_SEQ,
        mac: server_proof(&secret, &id, ATTEMPT, CLIENT_READER_SEQ, SERVER_READER_SEQ),
    };
    let welcome = Frame::Welcome {
        session_id: id,
        secret: secret.clone(),
    };
    let session = vec![
        Frame::data(&b"hello"[..]),
        Frame::ack(5),
        Frame::ping(1),
        Frame::pong(1),
        Frame::fin(),
        Frame::close(CloseCode::Normal, "done"),
    ];
    let handshake = vec![
        Frame::hello_new(),
        hello_resume.clone(),
        welcome.clone(),
        resumed.clone(),
    ];
    let mut truncated = bytes(&[Frame::ack(1)]);
    truncated.extend_from_slice(&bytes(&[Frame::data(&b"cut short"[..])])[..8]);
    vec![
        ("decode_frame", "seed-session-frames", bytes(&session)),
        ("decode_frame", "seed-handshake-frames", bytes(&handshake)),
        ("decode_frame", "seed-truncated", truncated),
        (
            "decode_frame",
            "seed-close-reason",
            bytes(&[Frame::close(CloseCode::GoingAway, "ü".repeat(128))]),
        ),
        (
            "handshake",
            "seed-server-new",
            with_role(0, &[Frame::hello_new()]),
        ),
        (
            "handshake",
            "seed-server-resume",
            with_role(0, &[hello_resume]),
        ),
        (
            "handshake",
            "seed-server-unknown",
            with_role(
                0,
                &[Frame::hello_resume(
                    SessionId::from_bytes([9; 16]),
                    1,
                    0,
                    Mac::from_bytes([0; 32]),
                )],
            ),
        ),
        ("handshake", "seed-client-new", with_role(1, &[welcome])),
        ("handshake", "seed-client-resume", with_role(2, &[resumed])),
        (
            "handshake",
            "seed-client-refused",
            with_role(2, &[Frame::close(CloseCode::UnknownSession, "gone")]),
        ),
    ]
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

#[test]
fn committed_fuzz_seed_corpus_matches_the_encoder() {
    let write = std::env::var_os("BACKEDPIPE_WRITE_FUZZ_CORPUS").is_some();
    for (target, name, data) in seeds() {
        let path = corpus_dir(target).join(name);
        if write {
            std::fs::create_dir_all(corpus_dir(target)).unwrap();
            std::fs::write(&path, &data).unwrap();
        }
        let committed = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (regenerate, see the file docs)", path.display()));
        assert_eq!(committed, data, "{} is stale", path.display());
    }
}

#[test]
fn seed_handshakes_complete_with_the_fuzz_targets_session() {
    // The resume seeds carry MACs the fuzz target's session (these constants) accepts.
    let id = SessionId::from_bytes(SESSION_ID);
    let secret = Secret::from_bytes(SECRET);
    let mut store = |_: &SessionId| SessionLookup::Found {
        secret: secret.clone(),
        last_attempt: LAST_ATTEMPT,
    };
    let (client, hello) = ClientHandshake::resume(id, secret.clone(), ATTEMPT, CLIENT_READER_SEQ);
    let verified = ServerHandshake::new()
        .handle_frame(hello, &mut store)
        .unwrap()
        .into_resume()
        .unwrap();
    let (_, resumed) = verified.accept(SERVER_READER_SEQ);
    client.handle_frame(resumed).unwrap();
}
