//! The handshake state machines: new sessions and resumes complete, every handshake message
//! round-trips on the wire, and forged, replayed or out-of-order input is refused with the right
//! error and CLOSE code, never a panic.

use backedpipe::proto::*;
use proptest::prelude::*;

/// Passes a frame over the wire: encode, then decode in one-byte chunks.
fn wire(frame: Frame) -> Frame {
    let bytes = frame.to_vec();
    let mut decoder = FrameDecoder::new();
    let mut out = None;
    for b in &bytes {
        decoder.push(std::slice::from_ref(b));
        if let Some(f) = decoder.next_frame().unwrap() {
            assert!(out.is_none());
            out = Some(f);
        }
    }
    assert_eq!(decoder.finish(), Ok(()));
    let out = out.expect("a whole frame");
    assert_eq!(out, frame);
    out
}

/// A server's table of one session.
struct OneSession {
    id: SessionId,
    secret: Secret,
    last_attempt: u64,
}

impl SessionStore for OneSession {
    fn lookup(&mut self, id: &SessionId) -> SessionLookup {
        if *id == self.id {
            SessionLookup::Found {
                secret: self.secret.clone(),
                last_attempt: self.last_attempt,
            }
        } else {
            SessionLookup::Unknown
        }
    }
}

fn new_session() -> (Established, Established) {
    let (client, hello) = ClientHandshake::new_session();
    let (server, welcome) = ServerHandshake::new()
        .handle_frame(wire(hello), &mut |_: &SessionId| SessionLookup::Unknown)
        .unwrap()
        .into_new_session()
        .unwrap();
    let client = client.handle_frame(wire(welcome)).unwrap();
    (client, server)
}

fn store_for(established: &Established, last_attempt: u64) -> OneSession {
    OneSession {
        id: established.session_id(),
        secret: established.secret().clone(),
        last_attempt,
    }
}

fn assert_refused(failure: HandshakeFailure, error: HandshakeError, code: CloseCode) {
    assert_eq!(failure.error, error);
    match failure.close {
        Some(Frame::Close(ref close)) => assert_eq!(close.code(), code),
        other => panic!("expected a CLOSE with {code}, got {other:?}"),
    }
    // The error formats, and the CLOSE a refusal sends survives the wire.
    assert!(!failure.to_string().is_empty());
    wire(failure.close.unwrap());
}

#[test]
fn new_session_gives_both_sides_the_same_random_id_and_secret() {
    let (client, server) = new_session();
    assert_eq!(client.session_id(), server.session_id());
    assert_eq!(client.secret(), server.secret());
    assert_eq!(
        (client.local_reader_seq(), client.remote_reader_seq()),
        (0, 0)
    );
    assert!(!client.is_resume() && !server.is_resume());
    let (other, _) = new_session();
    assert_ne!(other.session_id(), client.session_id());
    assert_ne!(other.secret(), client.secret());
}

#[test]
fn resume_takes_one_frame_each_way_and_exchanges_both_reader_seqs() {
    let (session, _) = new_session();
    let mut store = store_for(&session, 0);
    let (client, hello) =
        ClientHandshake::resume(session.session_id(), session.secret().clone(), 1, 300);
    let verified = ServerHandshake::new()
        .handle_frame(wire(hello), &mut store)
        .unwrap()
        .into_resume()
        .unwrap();
    assert_eq!(verified.session_id(), session.session_id());
    assert_eq!((verified.attempt(), verified.client_reader_seq()), (1, 300));
    let (server, resumed) = verified.accept(700);
    let client = client.handle_frame(wire(resumed)).unwrap();
    assert!(client.is_resume() && server.is_resume());
    assert_eq!((client.side(), server.side()), (Side::Client, Side::Server));
    assert_eq!(
        (client.local_reader_seq(), client.remote_reader_seq()),
        (300, 700)
    );
    assert_eq!(
        (server.local_reader_seq(), server.remote_reader_seq()),
        (700, 300)
    );
}

/// The client's HELLO for a resume of `session`, and the state waiting for RESUMED.
fn resume_hello(session: &Established, attempt: u64, client_seq: u64) -> (ExpectResumed, Frame) {
    ClientHandshake::resume(
        session.session_id(),
        session.secret().clone(),
        attempt,
        client_seq,
    )
}

/// The server's answer to `hello` with this store, as a failure (panics if it was accepted).
fn refusal(hello: Frame, store: &mut OneSession) -> HandshakeFailure {
    ServerHandshake::new()
        .handle_frame(wire(hello), store)
        .unwrap_err()
}

/// The fields of a resume HELLO.
fn resume_fields(hello: Frame) -> (SessionId, u64, u64, Mac) {
    match hello {
        Frame::Hello(Hello::Resume {
            session_id,
            attempt,
            client_reader_seq,
            proof,
        }) => (session_id, attempt, client_reader_seq, proof),
        other => panic!("not a resume HELLO: {other:?}"),
    }
}

#[test]
fn hello_with_a_wrong_proof_is_refused_with_authentication_failed() {
    let (session, _) = new_session();
    let (_, hello) = resume_hello(&session, 1, 0);
    let (id, attempt, seq, _) = resume_fields(hello);
    let forged = Frame::hello_resume(id, attempt, seq, Mac::from_bytes([0; 32]));
    assert_refused(
        refusal(forged, &mut store_for(&session, 0)),
        HandshakeError::AuthenticationFailed,
        CloseCode::AuthenticationFailed,
    );
}

#[test]
fn hello_from_a_client_with_the_wrong_secret_is_refused() {
    let (session, _) = new_session();
    let (_, hello) =
        ClientHandshake::resume(session.session_id(), Secret::from_bytes([7; 32]), 1, 0);
    assert_refused(
        refusal(hello, &mut store_for(&session, 0)),
        HandshakeError::AuthenticationFailed,
        CloseCode::AuthenticationFailed,
    );
}

#[test]
fn replayed_hello_is_refused_once_its_attempt_was_accepted() {
    let (session, _) = new_session();
    let mut store = store_for(&session, 0);
    // An eavesdropper records a complete, successful resume...
    let (_, captured) = resume_hello(&session, 1, 10);
    let verified = ServerHandshake::new()
        .handle_frame(captured.clone(), &mut store)
        .unwrap()
        .into_resume()
        .unwrap();
    // What the server records on accepting.
    store.last_attempt = verified.attempt();
    // ...and sends the HELLO again on a new connection: its attempt number is spent.
    assert_refused(
        refusal(captured, &mut store),
        HandshakeError::ReplayedResume {
            attempt: 1,
            last_attempt: 1,
        },
        CloseCode::AuthenticationFailed,
    );
    // An older attempt that arrives late is refused the same way; the next one is accepted.
    store.last_attempt = 5;
    let (_, late) = resume_hello(&session, 4, 10);
    assert_refused(
        refusal(late, &mut store),
        HandshakeError::ReplayedResume {
            attempt: 4,
            last_attempt: 5,
        },
        CloseCode::AuthenticationFailed,
    );
    let (_, next) = resume_hello(&session, 6, 10);
    assert!(ServerHandshake::new()
        .handle_frame(next, &mut store)
        .is_ok_and(|outcome| outcome.into_resume().is_some()));
}

#[test]
fn hello_with_an_altered_attempt_or_client_reader_seq_is_refused() {
    // A man in the middle rewrites a captured HELLO: a fresh attempt number to get past the
    // replay check, or another offset. The proof covers both, so neither verifies.
    let (session, _) = new_session();
    let (_, hello) = resume_hello(&session, 1, 100);
    let (id, attempt, seq, proof) = resume_fields(hello);
    for altered in [
        Frame::hello_resume(id, attempt + 1, seq, proof),
        Frame::hello_resume(id, attempt, 0, proof),
    ] {
        assert_refused(
            refusal(altered, &mut store_for(&session, 0)),
            HandshakeError::AuthenticationFailed,
            CloseCode::AuthenticationFailed,
        );
    }
}

#[test]
fn unknown_session_id_is_refused_with_unknown_session() {
    let (session, _) = new_session();
    let stranger = SessionId::from_bytes([0xee; 16]);
    let (_, hello) = ClientHandshake::resume(stranger, Secret::from_bytes([1; 32]), 1, 0);
    assert_refused(
        refusal(hello, &mut store_for(&session, 0)),
        HandshakeError::UnknownSession(stranger),
        CloseCode::UnknownSession,
    );
}

#[test]
fn expired_session_is_refused_with_session_expired_and_the_client_sees_the_code() {
    let id = SessionId::from_bytes([3; 16]);
    let (client, hello) = ClientHandshake::resume(id, Secret::from_bytes([1; 32]), 1, 0);
    let failure = ServerHandshake::new()
        .handle_frame(hello, &mut |_: &SessionId| SessionLookup::Expired)
        .unwrap_err();
    let close = failure.close.clone().unwrap();
    assert_refused(
        failure,
        HandshakeError::SessionExpired(id),
        CloseCode::SessionExpired,
    );
    // The client receives that CLOSE instead of RESUMED: a typed error, nothing to send back.
    let failure = client.handle_frame(wire(close)).unwrap_err();
    assert!(matches!(
        failure.error,
        HandshakeError::ClosedByPeer {
            code: CloseCode::SessionExpired,
            ..
        }
    ));
    assert_eq!(failure.close, None);
}

/// A resume of `session` up to the RESUMED the server sends (server reader seq 50).
fn resumed_for(session: &Established, attempt: u64) -> (ExpectResumed, u64, Mac) {
    let (client, hello) = resume_hello(session, attempt, 0);
    let (_, resumed) = ServerHandshake::new()
        .handle_frame(hello, &mut store_for(session, attempt - 1))
        .unwrap()
        .into_resume()
        .unwrap()
        .accept(50);
    let Frame::Resumed {
        server_reader_seq,
        mac,
    } = resumed
    else {
        panic!("not RESUMED: {resumed:?}")
    };
    (client, server_reader_seq, mac)
}

#[test]
fn resumed_with_a_wrong_mac_is_refused_by_the_client() {
    let (session, _) = new_session();
    let (client, server_reader_seq, _) = resumed_for(&session, 1);
    let forged = Frame::Resumed {
        server_reader_seq,
        mac: Mac::from_bytes([0x55; 32]),
    };
    assert_refused(
        client.handle_frame(forged).unwrap_err(),
        HandshakeError::ServerAuthenticationFailed,
        CloseCode::AuthenticationFailed,
    );
}

#[test]
fn resumed_with_an_altered_server_reader_seq_is_refused_by_the_client() {
    let (session, _) = new_session();
    let (client, server_reader_seq, mac) = resumed_for(&session, 1);
    let altered = Frame::Resumed {
        server_reader_seq: server_reader_seq + 1,
        mac,
    };
    assert_refused(
        client.handle_frame(altered).unwrap_err(),
        HandshakeError::ServerAuthenticationFailed,
        CloseCode::AuthenticationFailed,
    );
}

#[test]
fn resumed_captured_from_an_earlier_resume_is_refused_by_the_client() {
    // Someone who recorded the server's RESUMED of attempt 1 answers the client's attempt 2
    // with it (posing as the server): the MAC covers the attempt, so it does not verify.
    let (session, _) = new_session();
    let (_, server_reader_seq, mac) = resumed_for(&session, 1);
    let (client, _) = resume_hello(&session, 2, 0);
    assert_refused(
        client
            .handle_frame(Frame::Resumed {
                server_reader_seq,
                mac,
            })
            .unwrap_err(),
        HandshakeError::ServerAuthenticationFailed,
        CloseCode::AuthenticationFailed,
    );
}

#[test]
fn resume_hello_with_any_client_reader_seq_is_accepted_for_the_caller_to_check() {
    // The handshake does not know the replay buffer; ResumeVerified hands the (authenticated)
    // offset to the caller, which must check it before accepting, or refuse the resume.
    let (session, _) = new_session();
    let (_, hello) = resume_hello(&session, 1, u64::MAX);
    let verified = ServerHandshake::new()
        .handle_frame(hello, &mut store_for(&session, 0))
        .unwrap()
        .into_resume()
        .unwrap();
    assert_eq!(verified.client_reader_seq(), u64::MAX);
    let close = verified.refuse(CloseCode::ReplayUnavailable, "offset beyond what was sent");
    let Frame::Close(close) = wire(close) else {
        panic!()
    };
    assert_eq!(close.code(), CloseCode::ReplayUnavailable);
}

#[test]
fn data_before_authentication_is_a_protocol_violation_on_both_sides() {
    let failure = ServerHandshake::new()
        .handle_frame(Frame::data(&b"sneaky"[..]), &mut |_: &SessionId| {
            SessionLookup::Unknown
        })
        .unwrap_err();
    assert_refused(
        failure,
        HandshakeError::UnexpectedFrame {
            expected: "HELLO",
            got: FrameType::Data,
        },
        CloseCode::ProtocolViolation,
    );
    let (session, _) = new_session();
    let (client, _) = resume_hello(&session, 1, 0);
    assert_refused(
        client.handle_frame(Frame::data(&b"x"[..])).unwrap_err(),
        HandshakeError::UnexpectedFrame {
            expected: "RESUMED",
            got: FrameType::Data,
        },
        CloseCode::ProtocolViolation,
    );
    let (client, _) = ClientHandshake::new_session();
    assert_refused(
        client
            .handle_frame(Frame::Resumed {
                server_reader_seq: 0,
                mac: Mac::from_bytes([0; 32]),
            })
            .unwrap_err(),
        HandshakeError::UnexpectedFrame {
            expected: "WELCOME",
            got: FrameType::Resumed,
        },
        CloseCode::ProtocolViolation,
    );
}

#[test]
fn random_generator_failure_maps_to_an_internal_error_close() {
    let err = HandshakeError::Random("no entropy".into());
    assert_eq!(err.close_code(), Some(CloseCode::InternalError));
    let failure = HandshakeFailure::from(err);
    assert!(
        matches!(failure.close, Some(Frame::Close(ref c)) if c.code() == CloseCode::InternalError)
    );
}

#[test]
fn secret_debug_does_not_print_the_key() {
    let (client, _) = new_session();
    let hex: String = client.secret().as_bytes()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let debug = format!("{client:?}");
    assert!(debug.contains("Secret(..)"));
    assert!(!debug.contains(&hex), "{debug}");
    let welcome = Frame::Welcome {
        session_id: client.session_id(),
        secret: client.secret().clone(),
    };
    assert!(!format!("{welcome:?}").contains(&hex));
}

#[test]
fn every_handshake_error_formats_and_maps_to_a_close_code() {
    let errors = [
        HandshakeError::UnexpectedFrame {
            expected: "HELLO",
            got: FrameType::Fin,
        },
        HandshakeError::AuthenticationFailed,
        HandshakeError::ReplayedResume {
            attempt: 1,
            last_attempt: 2,
        },
        HandshakeError::ServerAuthenticationFailed,
        HandshakeError::UnknownSession(SessionId::from_bytes([0; 16])),
        HandshakeError::SessionExpired(SessionId::from_bytes([0; 16])),
        HandshakeError::ClosedByPeer {
            code: CloseCode::GoingAway,
            reason: "bye".into(),
        },
        HandshakeError::Random("x".into()),
    ];
    for e in errors {
        assert!(!e.to_string().is_empty());
        let proto = ProtoError::from(e.clone());
        assert_eq!(proto.close_code(), e.close_code());
        let failure = HandshakeFailure::from(e.clone());
        assert_eq!(failure.close.is_some(), e.close_code().is_some());
    }
}

fn garbage_frame() -> impl Strategy<Value = Frame> {
    // Any byte soup that happens to decode, plus well-formed frames of every type.
    let b32 = any::<[u8; 32]>();
    let id = any::<[u8; 16]>().prop_map(SessionId::from_bytes);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..50).prop_map(Frame::data),
        any::<u64>().prop_map(Frame::ack),
        Just(Frame::fin()),
        Just(Frame::hello_new()),
        (id.clone(), any::<u64>(), any::<u64>(), b32)
            .prop_map(|(id, a, s, m)| { Frame::hello_resume(id, a, s, Mac::from_bytes(m)) }),
        (id, b32).prop_map(|(session_id, s)| Frame::Welcome {
            session_id,
            secret: Secret::from_bytes(s)
        }),
        (any::<u64>(), b32).prop_map(|(s, m)| Frame::Resumed {
            server_reader_seq: s,
            mac: Mac::from_bytes(m)
        }),
        Just(Frame::close(CloseCode::GoingAway, "bye")),
    ]
}

proptest! {
    #[test]
    fn arbitrary_frames_never_panic_either_side_and_never_establish_a_forged_resume(
        frames in prop::collection::vec(garbage_frame(), 1..6),
    ) {
        let id = SessionId::from_bytes([1; 16]);
        let secret = Secret::from_bytes([2; 32]);
        let mut store = OneSession { id, secret: secret.clone(), last_attempt: 0 };

        // Server: without the secret, no HELLO passes the proof check.
        let mut it = frames.clone().into_iter();
        if let Ok(outcome) = ServerHandshake::new().handle_frame(it.next().unwrap(), &mut store) {
            prop_assert!(outcome.into_resume().is_none());
        }

        // Client: new session, and resume (random RESUMED MACs never verify).
        let mut it = frames.clone().into_iter();
        let _ = ClientHandshake::new_session().0.handle_frame(it.next().unwrap());
        let mut it = frames.into_iter();
        let (client, _) = ClientHandshake::resume(id, secret, 1, 9);
        prop_assert!(client.handle_frame(it.next().unwrap()).is_err());
    }

    #[test]
    fn random_bytes_through_the_decoder_into_the_server_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes);
        if let Ok(Some(frame)) = decoder.next_frame() {
            let _ = ServerHandshake::new()
                .handle_frame(frame, &mut |_: &SessionId| SessionLookup::Unknown);
        }
        let _ = decoder.finish();
    }
}
