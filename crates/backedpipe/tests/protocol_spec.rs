//! docs/PROTOCOL.md cannot drift from the code: every hex example in it decodes to exactly one
//! frame that re-encodes to the same bytes, every frame type has an example, and the MACs of the
//! handshake examples are the ones the code computes from the documented inputs.

use std::collections::BTreeMap;

use backedpipe::proto::*;

/// The `hex name=...` blocks of docs/PROTOCOL.md, by name, as bytes.
fn examples() -> BTreeMap<String, Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md");
    let text = std::fs::read_to_string(path).expect("docs/PROTOCOL.md is readable");
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some((name, hex)) = current.as_mut() {
            if line.trim_start().starts_with("```") {
                let bytes = decode_hex(hex).unwrap_or_else(|e| panic!("example {name}: {e}"));
                let name = name.clone();
                assert!(
                    out.insert(name.clone(), bytes).is_none(),
                    "duplicate {name}"
                );
                current = None;
            } else {
                hex.push_str(line.split('#').next().unwrap());
            }
        } else if let Some(rest) = line.trim_start().strip_prefix("```hex") {
            let name = rest
                .trim()
                .strip_prefix("name=")
                .unwrap_or_else(|| panic!("hex block without a name: {line:?}"));
            current = Some((name.to_owned(), String::new()));
        }
    }
    assert!(current.is_none(), "unterminated hex block");
    out
}

fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    digits
        .chunks(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
            u8::from_str_radix(s, 16).map_err(|e| format!("{s:?}: {e}"))
        })
        .collect()
}

fn decode_whole(name: &str, bytes: &[u8]) -> Frame {
    let (frame, used) = Frame::decode(bytes)
        .unwrap_or_else(|e| panic!("example {name} does not decode: {e}"))
        .unwrap_or_else(|| panic!("example {name} is truncated"));
    assert_eq!(used, bytes.len(), "example {name} has trailing bytes");
    frame
}

#[test]
fn every_protocol_md_example_decodes_and_re_encodes_to_the_same_bytes() {
    let examples = examples();
    assert!(!examples.is_empty());
    for (name, bytes) in &examples {
        let frame = decode_whole(name, bytes);
        assert_eq!(
            &frame.to_vec(),
            bytes,
            "example {name} re-encodes differently"
        );
        // The streaming decoder agrees, byte by byte.
        let mut decoder = FrameDecoder::new();
        let mut got = None;
        for b in bytes {
            decoder.push(std::slice::from_ref(b));
            if let Some(f) = decoder.next_frame().unwrap() {
                got = Some(f);
            }
        }
        assert_eq!(got.as_ref(), Some(&frame), "example {name}");
    }
}

#[test]
fn protocol_md_has_an_example_of_every_frame_type_and_both_hellos() {
    let examples = examples();
    let frames: Vec<Frame> = examples.iter().map(|(n, b)| decode_whole(n, b)).collect();
    for ty in FrameType::ALL {
        assert!(
            frames.iter().any(|f| f.frame_type() == ty),
            "docs/PROTOCOL.md has no example of {ty}"
        );
    }
    assert!(frames.contains(&Frame::hello_new()));
    assert!(frames
        .iter()
        .any(|f| matches!(f, Frame::Hello(Hello::Resume { .. }))));
}

#[test]
fn protocol_md_documents_every_close_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md");
    let text = std::fs::read_to_string(path).unwrap();
    for code in CloseCode::ALL {
        // "authentication failed (3)" -> "| 3 | authentication failed |"
        let display = code.to_string();
        let name = display.rsplit_once(" (").unwrap().0;
        let name = name.strip_suffix(" close").unwrap_or(name); // "normal close" -> "normal"
        let row = format!("| {} | {} |", code.to_u16(), name);
        assert!(text.contains(&row), "no row {row:?} in docs/PROTOCOL.md");
    }
}

#[test]
fn protocol_md_handshake_macs_are_the_ones_the_code_computes() {
    let examples = examples();
    let frame = |name: &str| decode_whole(name, &examples[name]);
    let Frame::Welcome { session_id, secret } = frame("welcome") else {
        panic!("welcome example is not WELCOME")
    };
    let Frame::Hello(Hello::Resume {
        session_id: resume_id,
        attempt,
        client_reader_seq,
        proof,
    }) = frame("hello-resume")
    else {
        panic!("hello-resume example is not a resume HELLO")
    };
    assert_eq!(resume_id, session_id);
    assert_eq!(
        proof,
        client_proof(&secret, &session_id, attempt, client_reader_seq)
    );
    let Frame::Resumed {
        server_reader_seq,
        mac,
    } = frame("resumed")
    else {
        panic!("resumed example is not RESUMED")
    };
    assert_eq!(
        mac,
        server_proof(
            &secret,
            &session_id,
            attempt,
            client_reader_seq,
            server_reader_seq
        )
    );

    // And the state machines, fed the documented frames, accept them.
    let (client, hello) =
        ClientHandshake::resume(session_id, secret.clone(), attempt, client_reader_seq);
    assert_eq!(hello, frame("hello-resume"));
    let mut store = |_: &SessionId| SessionLookup::Found {
        secret: secret.clone(),
        last_attempt: attempt - 1,
    };
    let verified = ServerHandshake::new()
        .handle_frame(hello, &mut store)
        .unwrap()
        .into_resume()
        .unwrap();
    let (_, resumed) = verified.accept(server_reader_seq);
    assert_eq!(resumed, frame("resumed"));
    client.handle_frame(resumed).unwrap();
}
