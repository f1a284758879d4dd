//! The frame codec: every frame round-trips, arbitrary chunkings of a stream decode to the same
//! frames, and hostile bytes give the decode error that names them (never a panic).

use backedpipe::proto::*;
use bytes::Bytes;
use proptest::prelude::*;

fn sample_frames() -> Vec<Frame> {
    let id = SessionId::from_bytes(*b"0123456789abcdef");
    vec![
        Frame::data(&b"x"[..]),
        Frame::data(vec![0xa5; MAX_FRAME_PAYLOAD as usize]),
        Frame::ack(0),
        Frame::ack(u64::MAX),
        Frame::ping(1),
        Frame::pong(2),
        Frame::close(CloseCode::Normal, ""),
        Frame::close(CloseCode::GoingAway, "server restarting ✓"),
        Frame::close(CloseCode::ProtocolViolation, "r".repeat(MAX_CLOSE_REASON)),
        Frame::fin(),
        Frame::hello_new(),
        Frame::hello_resume(id, 3, 12345, Mac::from_bytes([4; 32])),
        Frame::Welcome {
            session_id: id,
            secret: Secret::from_bytes([9; 32]),
        },
        Frame::Resumed {
            server_reader_seq: 77,
            mac: Mac::from_bytes([5; 32]),
        },
    ]
}

#[test]
fn every_frame_type_round_trips_through_encode_and_decode() {
    let frames = sample_frames();
    for ty in FrameType::ALL {
        assert!(
            frames.iter().any(|f| f.frame_type() == ty),
            "no sample of {ty}"
        );
    }
    for frame in frames {
        let wire = frame.to_vec();
        assert_eq!(wire.len(), frame.encoded_len());
        assert_eq!(wire[0], frame.frame_type() as u8);
        let (decoded, used) = Frame::decode(&wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        assert_eq!(decoded, frame);
        // Every proper prefix is "need more bytes", not an error.
        for cut in [0, 1, 4, 5, wire.len() - 1] {
            if cut < wire.len() {
                assert_eq!(
                    Frame::decode(&wire[..cut]).unwrap(),
                    None,
                    "{frame:?} cut at {cut}"
                );
            }
        }
    }
}

#[test]
fn frame_too_large_is_rejected_from_the_header_before_any_payload() {
    let header = [0x01, 0x00, 0x10, 0x00, 0x01]; // DATA of 1 MiB + 1
    assert_eq!(
        Frame::decode(&header).unwrap_err(),
        DecodeError::FrameTooLarge(MAX_FRAME_PAYLOAD + 1)
    );
    let mut decoder = FrameDecoder::new();
    decoder.push(&header);
    assert_eq!(
        decoder.next_frame().unwrap_err(),
        DecodeError::FrameTooLarge(MAX_FRAME_PAYLOAD + 1)
    );
    assert_eq!(
        DecodeError::FrameTooLarge(0).close_code(),
        CloseCode::FrameTooLarge
    );
    // A maximum-size frame is fine.
    assert!(FrameHeader::parse([0x01, 0x00, 0x10, 0x00, 0x00]).is_ok());
}

#[test]
fn unknown_type_is_rejected_from_its_first_byte() {
    assert_eq!(
        Frame::decode(&[0x00]).unwrap_err(),
        DecodeError::UnknownType(0x00)
    );
    let mut decoder = FrameDecoder::new();
    decoder.push(b"G"); // "GET / HTTP/1.1"
    assert_eq!(
        decoder.next_frame().unwrap_err(),
        DecodeError::UnknownType(b'G')
    );
    // The decoder stays failed.
    decoder.push(&Frame::fin().to_vec());
    assert_eq!(
        decoder.next_frame().unwrap_err(),
        DecodeError::UnknownType(b'G')
    );
    assert!(decoder.is_failed());
}

#[test]
fn bad_fixed_lengths_are_rejected_from_the_header() {
    let cases: &[(u8, u32)] = &[
        (0x01, 0),   // empty DATA
        (0x02, 7),   // ACK
        (0x03, 9),   // PING
        (0x04, 0),   // PONG
        (0x05, 3),   // CLOSE shorter than code + reason length
        (0x05, 261), // CLOSE with a reason over 256 bytes
        (0x06, 1),   // FIN with a payload
        (0x10, 30),  // HELLO neither 6 nor 70
        (0x11, 47),  // WELCOME
        (0x12, 8),   // RESUMED
    ];
    for &(ty, length) in cases {
        let mut header = vec![ty];
        header.extend_from_slice(&length.to_be_bytes());
        let frame_type = FrameType::from_u8(ty).unwrap();
        let want = DecodeError::BadLength { frame_type, length };
        assert_eq!(Frame::decode(&header).unwrap_err(), want);
        assert_eq!(want.close_code(), CloseCode::ProtocolViolation);
        assert!(want.to_string().contains(frame_type.name()));
    }
}

fn hello_payload(magic: &[u8; 4], version: u8, kind: u8, extra: &[u8]) -> Vec<u8> {
    let mut payload = magic.to_vec();
    payload.extend_from_slice(&[version, kind]);
    payload.extend_from_slice(extra);
    let mut wire = vec![0x10];
    wire.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    wire.extend_from_slice(&payload);
    wire
}

#[test]
fn hello_with_wrong_magic_names_the_magic() {
    assert_eq!(
        Frame::decode(&hello_payload(b"SSH-", 1, 0, &[])).unwrap_err(),
        DecodeError::BadMagic(*b"SSH-")
    );
}

#[test]
fn hello_with_unsupported_version_names_the_version() {
    assert_eq!(
        Frame::decode(&hello_payload(b"BKPP", 1, 0, &[])).unwrap_err(),
        DecodeError::UnsupportedVersion(1)
    );
}

#[test]
fn hello_with_unknown_kind_or_a_length_not_matching_its_kind_is_rejected() {
    assert_eq!(
        Frame::decode(&hello_payload(b"BKPP", VERSION, 7, &[])).unwrap_err(),
        DecodeError::UnknownHelloKind(7)
    );
    // A resume HELLO cut to the new-session length, and a new-session HELLO padded to 70 bytes.
    assert_eq!(
        Frame::decode(&hello_payload(b"BKPP", VERSION, 1, &[])).unwrap_err(),
        DecodeError::BadLength {
            frame_type: FrameType::Hello,
            length: 6
        }
    );
    assert_eq!(
        Frame::decode(&hello_payload(b"BKPP", VERSION, 0, &[0; 64])).unwrap_err(),
        DecodeError::BadLength {
            frame_type: FrameType::Hello,
            length: 70
        }
    );
}

fn close_wire(code: u16, reason_len: u16, reason: &[u8]) -> Vec<u8> {
    let mut wire = vec![0x05];
    wire.extend_from_slice(&(4 + reason.len() as u32).to_be_bytes());
    wire.extend_from_slice(&code.to_be_bytes());
    wire.extend_from_slice(&reason_len.to_be_bytes());
    wire.extend_from_slice(reason);
    wire
}

#[test]
fn close_with_bad_utf8_unknown_code_or_inconsistent_reason_length_is_rejected() {
    assert_eq!(
        Frame::decode(&close_wire(0, 2, &[0xc3, 0x28])).unwrap_err(),
        DecodeError::InvalidUtf8
    );
    assert_eq!(
        Frame::decode(&close_wire(0x4242, 0, &[])).unwrap_err(),
        DecodeError::UnknownCloseCode(0x4242)
    );
    assert_eq!(
        Frame::decode(&close_wire(0, 3, b"ab")).unwrap_err(),
        DecodeError::BadLength {
            frame_type: FrameType::Close,
            length: 6
        }
    );
    assert_eq!(
        Frame::decode(&close_wire(0, 300, b"ab")).unwrap_err(),
        DecodeError::CloseReasonTooLong(300)
    );
}

#[test]
fn close_reason_is_truncated_at_a_character_boundary() {
    let close = Close::new(CloseCode::Normal, "ü".repeat(MAX_CLOSE_REASON));
    assert_eq!(close.reason().len(), MAX_CLOSE_REASON);
    let close = Close::new(CloseCode::Normal, format!("a{}", "ü".repeat(200)));
    assert_eq!(close.reason().len(), MAX_CLOSE_REASON - 1);
    let frame = Frame::Close(close);
    assert_eq!(Frame::decode(&frame.to_vec()).unwrap().unwrap().0, frame);
}

#[test]
fn truncated_frame_at_eof_is_transport_loss_not_a_decode_error() {
    let wire = Frame::ack(42).to_vec();
    for cut in 1..wire.len() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&wire[..cut]);
        assert_eq!(decoder.next_frame().unwrap(), None);
        assert_eq!(decoder.buffered(), cut);
        assert_eq!(decoder.finish(), Err(TruncatedFrame { buffered: cut }));
    }
    let mut decoder = FrameDecoder::new();
    decoder.push(&wire);
    assert_eq!(decoder.next_frame().unwrap(), Some(Frame::ack(42)));
    assert_eq!(decoder.next_frame().unwrap(), None);
    assert_eq!(decoder.finish(), Ok(()));
}

#[test]
fn data_frames_cut_a_large_buffer_into_maximum_size_frames() {
    let n = MAX_FRAME_PAYLOAD as usize;
    let big: Bytes = (0..2 * n + 3).map(|i| i as u8).collect::<Vec<_>>().into();
    let frames: Vec<Frame> = Frame::data_frames(big.clone()).collect();
    let lens: Vec<usize> = frames.iter().map(Frame::payload_len).collect();
    assert_eq!(lens, [n, n, 3]);
    let mut joined = Vec::new();
    for f in frames {
        let Frame::Data(b) = f else { panic!() };
        joined.extend_from_slice(&b);
    }
    assert_eq!(joined, big);
}

#[test]
fn every_decode_error_formats_and_maps_to_a_close_code() {
    let errors = [
        DecodeError::UnknownType(0xff),
        DecodeError::FrameTooLarge(u32::MAX),
        DecodeError::BadLength {
            frame_type: FrameType::Ack,
            length: 1,
        },
        DecodeError::BadMagic(*b"HTTP"),
        DecodeError::UnsupportedVersion(9),
        DecodeError::UnknownHelloKind(3),
        DecodeError::UnknownCloseCode(77),
        DecodeError::CloseReasonTooLong(999),
        DecodeError::InvalidUtf8,
    ];
    for e in errors {
        assert!(!e.to_string().is_empty());
        let _ = CloseCode::from(&e);
    }
    for code in CloseCode::ALL {
        assert_eq!(CloseCode::from_u16(code.to_u16()), Some(code));
        assert!(code.to_string().ends_with(&format!("({})", code.to_u16())));
    }
}

pub fn arb_frame() -> impl Strategy<Value = Frame> {
    let id = any::<[u8; 16]>().prop_map(SessionId::from_bytes);
    let b32 = any::<[u8; 32]>();
    let code = prop::sample::select(CloseCode::ALL.to_vec());
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..2000).prop_map(Frame::data),
        any::<u64>().prop_map(Frame::ack),
        any::<u64>().prop_map(Frame::ping),
        any::<u64>().prop_map(Frame::pong),
        (code, "\\PC{0,100}").prop_map(|(c, r)| Frame::close(c, r)),
        Just(Frame::fin()),
        Just(Frame::hello_new()),
        (id.clone(), any::<u64>(), any::<u64>(), b32).prop_map(|(id, attempt, seq, m)| {
            Frame::hello_resume(id, attempt, seq, Mac::from_bytes(m))
        }),
        (id, b32).prop_map(|(session_id, s)| Frame::Welcome {
            session_id,
            secret: Secret::from_bytes(s)
        }),
        (any::<u64>(), b32).prop_map(|(server_reader_seq, m)| Frame::Resumed {
            server_reader_seq,
            mac: Mac::from_bytes(m)
        }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_frames_round_trip_under_arbitrary_chunking(
        frames in prop::collection::vec(arb_frame(), 0..20),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.push(0);
        points.push(wire.len());
        points.sort_unstable();
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for pair in points.windows(2) {
            decoder.push(&wire[pair[0]..pair[1]]);
            while let Some(f) = decoder.next_frame().unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(decoder.finish(), Ok(()));
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn random_bytes_never_panic_the_decoder_and_decoded_frames_re_encode(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        chunk in 1usize..64,
    ) {
        let mut decoder = FrameDecoder::new();
        for piece in bytes.chunks(chunk) {
            decoder.push(piece);
            loop {
                match decoder.next_frame() {
                    Ok(Some(f)) => {
                        let again = Frame::decode(&f.to_vec()).unwrap().unwrap().0;
                        prop_assert_eq!(again, f);
                    }
                    Ok(None) => break,
                    Err(_) => { prop_assert!(decoder.is_failed()); break; }
                }
            }
        }
        let _ = decoder.finish();
        // The slice decoder agrees with the streaming one on the first frame.
        let mut whole = FrameDecoder::new();
        whole.push(&bytes);
        let streamed = whole.next_frame();
        match Frame::decode(&bytes) {
            Ok(Some((f, _))) => prop_assert_eq!(streamed, Ok(Some(f))),
            Ok(None) => prop_assert_eq!(streamed, Ok(None)),
            Err(e) => prop_assert_eq!(streamed, Err(e)),
        }
    }

    #[test]
    fn random_bytes_after_a_valid_header_prefix_never_panic(
        ty in prop::sample::select(FrameType::ALL.to_vec()),
        payload in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut wire = vec![ty as u8];
        wire.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        wire.extend_from_slice(&payload);
        if let Ok(Some((f, used))) = Frame::decode(&wire) {
            prop_assert_eq!(used, wire.len());
            prop_assert_eq!(f.to_vec(), wire);
        }
    }
}
