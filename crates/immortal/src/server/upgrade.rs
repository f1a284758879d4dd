//! `GET /v1/streams/{id}/connect`: the HTTP upgrade that carries a stream, raw
//! (`Upgrade: immortal-session/1`) or in binary WebSocket messages (`Upgrade: websocket`), and
//! the session handshake that follows on the upgraded bytes.
//!
//! This module owns the upgrade headers and what happens on the upgraded connection until the
//! handshake is done: the first new-session handshake on a stream creates its session (handed
//! to the stream's task), later handshakes resume it, and a second new-session handshake is
//! refused with a CLOSE without touching the live session. It runs in a task of its own per
//! upgrade, bounded by the handshake timeout, so a silent client stalls nobody.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use backedpipe::proto::{CloseCode, Frame, FrameHeader, FrameType, Hello, HEADER_LEN};
use backedpipe::{Accepted, BoxIo};
use bytes::{Buf, Bytes};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::connections::Ticket;
use super::metrics::Metrics;
use super::routes::{ApiFailure, Authorized};
use super::stream::Stream;
use super::{ConnectionTicket, Shared};
use crate::api::{ErrorCode, ATTACH_KEY_HEADER, UPGRADE_PROTOCOL};
use crate::ws_io::WsIo;

/// The largest WebSocket message (and frame) the agent accepts. Clients send at most 64 KiB
/// per message ([`MAX_MESSAGE_LEN`](crate::ws_io::MAX_MESSAGE_LEN)); this bounds what a
/// misbehaving one can make the agent buffer.
const MAX_WS_MESSAGE: usize = 1 << 20;

/// The most bytes the agent buffers for a WebSocket's writes (pongs and close messages
/// included) before it gives up on a peer that does not read: a client's 64 KiB messages fit
/// with room to spare.
const MAX_WS_WRITE_BUFFER: usize = 256 * 1024;

/// The WebSocket write buffer below which messages are only queued (tungstenite's default
/// is 128 KiB; it must stay below [`MAX_WS_WRITE_BUFFER`]).
const WS_WRITE_BUFFER: usize = 64 * 1024;

/// How long sending a refusal (a session CLOSE) may take: a peer that does not read cannot
/// hold the task that refuses it.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// How the client asked to carry the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    /// The session protocol's bytes directly on the connection.
    Raw,
    /// The bytes in binary WebSocket messages.
    WebSocket,
}

/// The handler: checks the stream and the headers, answers 101, and leaves the upgraded
/// connection to a task of its own.
pub(super) async fn connect(
    _auth: Authorized,
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    mut request: Request,
) -> Result<Response, ApiFailure> {
    let stream = shared
        .registry
        .get(&id)
        .ok_or_else(|| ApiFailure::stream_not_found(&id))?;
    let carrier = carrier(request.headers())?;
    let key = request
        .headers()
        .get(ATTACH_KEY_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if !stream.verify_attach_key(key) {
        Metrics::bump(&shared.metrics.refused_handshakes);
        tracing::info!(
            id = stream.id(),
            "refused an upgrade without the stream's attach key"
        );
        return Err(ApiFailure::new(
            ErrorCode::AttachRefused,
            format!(
                "only the client that created the stream can attach to it (the `{ATTACH_KEY_HEADER}` \
                 header must carry the attach key of the create response)"
            ),
        ));
    }
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    match carrier {
        Carrier::Raw => {
            headers.insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
        }
        Carrier::WebSocket => {
            let key = websocket_key(request.headers())?;
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            let accept = derive_accept_key(key.as_bytes());
            let accept = HeaderValue::from_str(&accept)
                .map_err(|_| ApiFailure::new(ErrorCode::Internal, "bad accept key"))?;
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    let timeout = shared.handshake_timeout;
    let shutdown = shared.shutdown.clone();
    let metrics = shared.metrics.clone();
    // The upgraded connection keeps its slot under the connection cap for as long as it lives.
    let ticket = request
        .extensions()
        .get::<ConnectionTicket>()
        .map(|ConnectionTicket(ticket)| ticket.clone());
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(err) => {
                tracing::debug!(id = stream.id(), %err, "upgrade failed");
                return;
            }
        };
        let io: BoxIo = match carrier {
            Carrier::Raw => Box::new(upgraded),
            Carrier::WebSocket => {
                let config = WebSocketConfig::default()
                    .max_message_size(Some(MAX_WS_MESSAGE))
                    .max_frame_size(Some(MAX_WS_MESSAGE))
                    .write_buffer_size(WS_WRITE_BUFFER)
                    .max_write_buffer_size(MAX_WS_WRITE_BUFFER);
                let ws = WebSocketStream::from_raw_socket(upgraded, Role::Server, Some(config));
                Box::new(WsIo::new(ws.await))
            }
        };
        shutdown
            .run_until_cancelled(attach(&stream, io, ticket, timeout, &metrics))
            .await;
    });
    Ok(response)
}

/// Which carrier the request's `Connection` and `Upgrade` headers ask for.
fn carrier(headers: &HeaderMap) -> Result<Carrier, ApiFailure> {
    let asks_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = headers
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .map(str::trim);
    match protocol {
        Some(protocol) if asks_upgrade && protocol.eq_ignore_ascii_case(UPGRADE_PROTOCOL) => {
            Ok(Carrier::Raw)
        }
        Some(protocol) if asks_upgrade && protocol.eq_ignore_ascii_case("websocket") => {
            Ok(Carrier::WebSocket)
        }
        _ => Err(ApiFailure::new(
            ErrorCode::BadRequest,
            format!(
                "this endpoint carries a stream: send `Connection: Upgrade` with \
                 `Upgrade: {UPGRADE_PROTOCOL}` or `Upgrade: websocket`"
            ),
        )),
    }
}

/// The WebSocket handshake's key, once the version is checked.
fn websocket_key(headers: &HeaderMap) -> Result<&str, ApiFailure> {
    let version = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|value| value.to_str().ok());
    if version.map(str::trim) != Some("13") {
        return Err(ApiFailure::new(
            ErrorCode::BadRequest,
            "a WebSocket upgrade needs `Sec-WebSocket-Version: 13`",
        ));
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .ok_or_else(|| {
            ApiFailure::new(
                ErrorCode::BadRequest,
                "a WebSocket upgrade needs `Sec-WebSocket-Key`",
            )
        })
}

/// Runs the session handshake on an upgraded connection of `stream` (or on a connection to
/// the agent's Unix socket, after its request line).
pub(super) async fn attach(
    stream: &Stream,
    mut io: BoxIo,
    ticket: Option<Arc<Ticket>>,
    timeout: Duration,
    metrics: &Metrics,
) {
    let refused = || Metrics::bump(&metrics.refused_handshakes);
    let (is_new, hello) = match tokio::time::timeout(timeout, read_hello(&mut io)).await {
        Ok(Ok(Hello0::Hello { is_new, bytes })) => (is_new, bytes),
        Ok(Ok(Hello0::NotHello { code, reason })) => {
            refused();
            tracing::debug!(
                id = stream.id(),
                reason,
                "refused a first frame that is no HELLO"
            );
            refuse(io, code, reason).await;
            return;
        }
        Ok(Err(err)) => {
            tracing::debug!(id = stream.id(), %err, "connection lost before its hello");
            return;
        }
        Err(_) => {
            refused();
            tracing::debug!(id = stream.id(), "no hello within the handshake timeout");
            refuse(io, CloseCode::ProtocolViolation, "handshake timed out").await;
            return;
        }
    };
    let io: BoxIo = Box::new(Replay {
        prefix: Bytes::from(hello),
        io,
        _ticket: ticket,
    });
    if !is_new {
        // A resume (or something the handshake will refuse with the right CLOSE).
        match stream.sessions().accept(io).await {
            Ok(Accepted::Resumed(session)) => {
                Metrics::bump(&metrics.resumes);
                tracing::debug!(id = stream.id(), %session, "session resumed");
            }
            Ok(other) => {
                tracing::warn!(id = stream.id(), ?other, "unexpected handshake outcome");
            }
            Err(err) => {
                refused();
                tracing::debug!(id = stream.id(), %err, "resume refused");
            }
        }
        return;
    }
    let Some(claim) = stream.claim_first_session() else {
        refused();
        tracing::info!(
            id = stream.id(),
            "refused a second new session on a stream that has one"
        );
        refuse(
            io,
            CloseCode::ProtocolViolation,
            "this stream already has a session: resume it, or create another stream",
        )
        .await;
        return;
    };
    match stream.sessions().accept(io).await {
        Ok(Accepted::New(session)) => {
            // The stream's task gone (deleted meanwhile): dropping the session closes it.
            let _ = claim.send(session);
        }
        Ok(other) => {
            stream.unclaim(claim);
            tracing::warn!(id = stream.id(), ?other, "unexpected handshake outcome");
        }
        Err(err) => {
            refused();
            stream.unclaim(claim);
            tracing::debug!(id = stream.id(), %err, "new session handshake failed");
        }
    }
}

/// What the client sent first on an upgraded connection.
#[derive(Debug)]
enum Hello0 {
    /// A whole HELLO frame: whether it asks for a new session, and every byte read (the frame,
    /// and anything the client sent after it).
    Hello { is_new: bool, bytes: Vec<u8> },
    /// Something else, refused at its header: the CLOSE to send.
    NotHello {
        code: CloseCode,
        reason: &'static str,
    },
}

/// Reads the client's first frame, which must be a HELLO. Its header is checked as soon as it
/// is in: a frame of another type, or a length no HELLO has, is refused there, before any of
/// its payload is read, so at most a HELLO's worth of bytes is ever buffered here.
async fn read_hello(io: &mut BoxIo) -> io::Result<Hello0> {
    let mut buf = Vec::with_capacity(64);
    let mut wanted = HEADER_LEN;
    loop {
        while buf.len() < wanted {
            // Never more than the frame: the buffer cannot grow past a HELLO.
            let mut limited = (&mut *io).take((wanted - buf.len()) as u64);
            if limited.read_buf(&mut buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        if wanted == HEADER_LEN {
            let mut header = [0u8; HEADER_LEN];
            header.copy_from_slice(&buf[..HEADER_LEN]);
            match FrameHeader::parse(header) {
                Ok(header) if header.frame_type == FrameType::Hello => {
                    wanted = HEADER_LEN + header.length as usize;
                    continue;
                }
                Ok(_) => {
                    return Ok(Hello0::NotHello {
                        code: CloseCode::ProtocolViolation,
                        reason: "the first frame must be a HELLO",
                    })
                }
                Err(err) => {
                    return Ok(Hello0::NotHello {
                        code: err.close_code(),
                        reason: "the first frame's header is not a HELLO's",
                    })
                }
            }
        }
        let is_new = matches!(
            Frame::decode(&buf),
            Ok(Some((Frame::Hello(Hello::NewSession), _)))
        );
        // A malformed HELLO goes to the handshake, which refuses it with the right CLOSE.
        return Ok(Hello0::Hello { is_new, bytes: buf });
    }
}

/// Sends CLOSE and ends the connection, within [`REFUSAL_TIMEOUT`] (a peer that does not
/// read gets nothing more).
async fn refuse(mut io: BoxIo, code: CloseCode, reason: &str) {
    let close = Frame::close(code, reason).to_vec();
    let send = async {
        io.write_all(&close).await?;
        io.shutdown().await
    };
    if tokio::time::timeout(REFUSAL_TIMEOUT, send).await.is_err() {
        tracing::debug!("the refused peer does not read; dropping it");
    }
}

/// A transport whose first bytes were already read: they are read again first. It holds the
/// connection's slot under the connection cap until it is dropped.
struct Replay {
    prefix: Bytes,
    io: BoxIo,
    _ticket: Option<Arc<Ticket>>,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn the_upgrade_headers_choose_the_carrier() {
        let raw = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "Immortal-Session/1"),
        ]);
        assert_eq!(carrier(&raw).unwrap(), Carrier::Raw);
        let ws = headers(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert_eq!(carrier(&ws).unwrap(), Carrier::WebSocket);
        for bad in [
            headers(&[("upgrade", "websocket")]),
            headers(&[("connection", "upgrade")]),
            headers(&[("connection", "upgrade"), ("upgrade", "h2c")]),
            headers(&[]),
        ] {
            assert_eq!(carrier(&bad).unwrap_err().code(), ErrorCode::BadRequest);
        }
    }

    #[test]
    fn a_websocket_upgrade_needs_version_13_and_a_key() {
        let good = headers(&[
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert_eq!(websocket_key(&good).unwrap(), "dGhlIHNhbXBsZSBub25jZQ==");
        let old = headers(&[("sec-websocket-version", "8"), ("sec-websocket-key", "x")]);
        assert!(websocket_key(&old).is_err());
        let keyless = headers(&[("sec-websocket-version", "13")]);
        assert!(websocket_key(&keyless).is_err());
    }

    #[tokio::test]
    async fn the_hello_is_read_again_by_the_handshake() {
        let (mut client, server) = tokio::io::duplex(1024);
        let hello = Frame::hello_new().to_vec();
        client.write_all(&hello).await.unwrap();
        client.write_all(b"more").await.unwrap();
        let mut io: BoxIo = Box::new(server);
        let Hello0::Hello {
            is_new,
            bytes: peeked,
        } = read_hello(&mut io).await.unwrap()
        else {
            panic!("a HELLO not seen");
        };
        assert!(is_new);
        assert_eq!(peeked, hello, "nothing past the HELLO is read");
        let mut replay = Replay {
            prefix: Bytes::from(peeked),
            io,
            _ticket: None,
        };
        let mut again = vec![0u8; hello.len() + 4];
        replay.read_exact(&mut again).await.unwrap();
        assert_eq!(&again[..hello.len()], &hello[..]);
        assert_eq!(&again[hello.len()..], b"more");
    }

    #[tokio::test]
    async fn a_first_frame_that_is_no_hello_is_refused_at_its_header() {
        // Not a frame at all.
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut io: BoxIo = Box::new(server);
        assert!(matches!(
            read_hello(&mut io).await.unwrap(),
            Hello0::NotHello { .. }
        ));
        // A DATA frame announcing 1 MiB: refused on its 5 header bytes, none of the payload
        // awaited (the duplex holds only the header; waiting for more would hang the test).
        let (mut client, server) = tokio::io::duplex(1024);
        client
            .write_all(&[0x01, 0x00, 0x10, 0x00, 0x00])
            .await
            .unwrap();
        let mut io: BoxIo = Box::new(server);
        assert!(matches!(
            read_hello(&mut io).await.unwrap(),
            Hello0::NotHello {
                code: CloseCode::ProtocolViolation,
                ..
            }
        ));
        // A PING before the handshake (a peer flooding pings and never reading).
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(&Frame::ping(7).to_vec()).await.unwrap();
        let mut io: BoxIo = Box::new(server);
        assert!(matches!(
            read_hello(&mut io).await.unwrap(),
            Hello0::NotHello { .. }
        ));
        drop(client);
        let mut io: BoxIo = Box::new(tokio::io::empty());
        assert!(
            read_hello(&mut io).await.is_err(),
            "end of stream before a hello"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_to_a_peer_that_does_not_read_gives_up_in_time() {
        // A pipe with a 1-byte buffer that nobody reads: the CLOSE can never be sent.
        let (_client, server) = tokio::io::duplex(1);
        let started = tokio::time::Instant::now();
        refuse(Box::new(server), CloseCode::ProtocolViolation, "no").await;
        assert_eq!(started.elapsed(), REFUSAL_TIMEOUT);
    }
}
