//! [`ClientError`]: what talking to the agent can fail with, and how an HTTP error response
//! becomes one.

use std::io;
use std::sync::Arc;

use crate::api::{ErrorBody, ErrorCode};

/// Why a request to the agent failed.
///
/// The variants that stand for an answer of the agent ([`Unauthorized`](Self::Unauthorized),
/// [`NotFound`](Self::NotFound), [`DialFailed`](Self::DialFailed),
/// [`TooManyStreams`](Self::TooManyStreams), [`Http`](Self::Http)) carry the agent's own
/// message. The type is cheap to clone, so one failure can be handed to several waiters.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The agent refused the bearer token (HTTP 401). Check `--token-file` or
    /// `IMMORTAL_TOKEN`: the agent may have generated a new token.
    #[error("the agent refused the token: {0}")]
    Unauthorized(String),
    /// No such stream on the agent (HTTP 404): never created, deleted, or expired after
    /// staying disconnected longer than the agent's TTL. Create a new stream.
    #[error("stream unknown or expired: {0}")]
    NotFound(String),
    /// The agent refused an upgrade without the stream's attach key (HTTP 403): only the
    /// client that created a stream can attach to it.
    #[error("the agent refused to attach this client to the stream: {0}")]
    AttachRefused(String),
    /// The agent could not connect to the requested port on its host (HTTP 422): nothing
    /// listens there.
    #[error("the agent could not connect to the target port: {0}")]
    DialFailed(String),
    /// The agent holds its maximum of streams and every one is in use (HTTP 503). Remove one
    /// (`immortal rm`) or raise the agent's `--max-streams`.
    #[error("{0}")]
    TooManyStreams(String),
    /// The agent could not be reached: the name did not resolve, the connection was refused,
    /// or nothing answered in time.
    #[error("cannot reach the agent at {server}: {reason}")]
    Unreachable {
        /// The address tried, as given.
        server: String,
        /// Why it failed.
        reason: String,
    },
    /// The TLS handshake with the agent failed (an untrusted or mismatched certificate, or an
    /// agent that does not speak TLS).
    #[error("TLS with the agent at {server} failed: {reason}")]
    Tls {
        /// The address tried, as given.
        server: String,
        /// What TLS said.
        reason: String,
    },
    /// The TLS settings could not be loaded (a missing or malformed PEM file).
    #[error(transparent)]
    TlsConfig(Arc<backedpipe::TlsError>),
    /// The agent's address is not HOST or HOST:PORT.
    #[error("{0:?} is not an agent address: expected HOST or HOST:PORT, e.g. myhost or 127.0.0.1:7400 (an IPv6 address in brackets)")]
    BadServer(String),
    /// The agent answered with an error this client has no better name for.
    #[error("the agent answered {status}: {message}")]
    Http {
        /// The HTTP status.
        status: u16,
        /// The agent's message, or the start of the body.
        message: String,
    },
    /// The agent's answer is not what the API promises (not JSON, a missing field). The
    /// address may point at something that is not an immortal agent.
    #[error("the agent's answer is not understood: {0}")]
    Protocol(String),
    /// The connection to the agent failed during a request.
    #[error("the connection to the agent failed: {0}")]
    Io(Arc<io::Error>),
    /// The remote host of an ssh carrier has no such command: its shell answered 127
    /// ("command not found"). Nothing later can succeed until it is installed there.
    #[error(
        "{host} has no `{command}` on its PATH ({said}); install it there with `immortal ssh \
         --install {host}`, or name it with --remote-command PATH"
    )]
    RemoteMissing {
        /// The destination given to ssh.
        host: String,
        /// The command tried.
        command: String,
        /// What the remote shell said.
        said: String,
    },
    /// The ssh carrier ended before the agent answered: ssh could not connect or log in, or
    /// `immortal relay` failed on the remote host.
    #[error("the ssh carrier to {host} {ended}: {said}")]
    Carrier {
        /// The destination given to ssh.
        host: String,
        /// How the ssh process ended ("exited with status 255").
        ended: String,
        /// The last lines ssh (or the relay) wrote to its stderr.
        said: String,
    },
}

impl ClientError {
    /// True for answers that mean a stream can never be carried again: it is gone (404), the
    /// agent no longer accepts this client's token (401), or an ssh carrier's remote host has no
    /// `immortal`. A connection that failed for any
    /// other reason is worth retrying.
    pub fn ends_stream(&self) -> bool {
        matches!(
            self,
            ClientError::NotFound(_)
                | ClientError::Unauthorized(_)
                | ClientError::AttachRefused(_)
                | ClientError::RemoteMissing { .. }
        )
    }

    /// The `ClientError` an `io::Error` carries, if a [`StreamConnector`](super::StreamConnector)
    /// made it from one.
    pub fn from_io(err: &io::Error) -> Option<&ClientError> {
        err.get_ref()?.downcast_ref::<ClientError>()
    }

    /// The `ClientError` somewhere in the chain of `err`'s sources (a session's error wraps
    /// the connector's `io::Error`, which wraps this).
    pub fn find_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientError> {
        let mut current = Some(err);
        while let Some(err) = current {
            if let Some(found) = err.downcast_ref::<ClientError>() {
                return Some(found);
            }
            // An `io::Error`'s `source()` skips the error it wraps, so step into it here.
            let io = err
                .downcast_ref::<io::Error>()
                .or_else(|| err.downcast_ref::<Arc<io::Error>>().map(|arc| &**arc));
            current = match io {
                Some(io) => io
                    .get_ref()
                    .map(|inner| inner as &(dyn std::error::Error + 'static)),
                None => err.source(),
            };
        }
        None
    }

    pub(crate) fn io(err: io::Error) -> Self {
        ClientError::Io(Arc::new(err))
    }

    /// The error an error response stands for: the JSON body's code when there is one,
    /// otherwise the status alone, except that a 401, 403 or 404 without the agent's error body
    /// is only [`ClientError::Http`]: those three end a stream for good
    /// ([`ends_stream`](Self::ends_stream)), and a proxy's or a captive portal's error page in
    /// the path must not.
    pub(crate) fn from_response(status: u16, body: &[u8]) -> Self {
        let parsed = serde_json::from_slice::<ErrorBody>(body).ok();
        let message = match &parsed {
            Some(body) => body.error.message.clone(),
            None => body_excerpt(body, status),
        };
        let code = parsed.map(|body| body.error.code);
        match (code, status) {
            (Some(ErrorCode::Unauthorized), _) => ClientError::Unauthorized(message),
            (Some(ErrorCode::StreamNotFound), _) => ClientError::NotFound(message),
            (Some(ErrorCode::DialFailed), _) | (None, 422) => ClientError::DialFailed(message),
            (Some(ErrorCode::AttachRefused), _) => ClientError::AttachRefused(message),
            (Some(ErrorCode::TooManyStreams), _) | (None, 503) => {
                ClientError::TooManyStreams(message)
            }
            _ => ClientError::Http { status, message },
        }
    }
}

impl From<ClientError> for io::Error {
    /// Wraps the error so that [`ClientError::from_io`] finds it again.
    fn from(err: ClientError) -> Self {
        let kind = match &err {
            ClientError::NotFound(_) => io::ErrorKind::NotFound,
            ClientError::Unauthorized(_) => io::ErrorKind::PermissionDenied,
            ClientError::Unreachable { .. } => io::ErrorKind::ConnectionRefused,
            ClientError::Io(inner) => inner.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, err)
    }
}

/// The longest excerpt of a non-JSON error body quoted in a message.
const EXCERPT_LEN: usize = 200;

/// A short, printable excerpt of an error body that is not the API's JSON.
fn body_excerpt(body: &[u8], status: u16) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return format!("HTTP status {status}");
    }
    let mut excerpt: String = text
        .chars()
        .take(EXCERPT_LEN)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > EXCERPT_LEN {
        excerpt.push_str("...");
    }
    excerpt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_map_to_variants_by_code() {
        let body = |code: &str| {
            format!(r#"{{"error":{{"code":"{code}","message":"said the agent"}}}}"#).into_bytes()
        };
        assert!(matches!(
            ClientError::from_response(401, &body("unauthorized")),
            ClientError::Unauthorized(m) if m == "said the agent"
        ));
        assert!(matches!(
            ClientError::from_response(404, &body("stream_not_found")),
            ClientError::NotFound(_)
        ));
        assert!(matches!(
            ClientError::from_response(422, &body("dial_failed")),
            ClientError::DialFailed(_)
        ));
        assert!(matches!(
            ClientError::from_response(503, &body("too_many_streams")),
            ClientError::TooManyStreams(_)
        ));
        assert!(matches!(
            ClientError::from_response(409, &body("conflict")),
            ClientError::Http { status: 409, .. }
        ));
    }

    #[test]
    fn bodies_that_are_not_json_map_by_status() {
        // Not the agent's refusal (a proxy's page, say): nothing that ends a stream.
        for status in [401, 403, 404] {
            let err = ClientError::from_response(status, b"<html>nope</html>");
            assert!(
                matches!(&err, ClientError::Http { status: s, message } if *s == status && message == "<html>nope</html>"),
                "{err:?}"
            );
            assert!(!err.ends_stream());
        }
        assert!(matches!(
            ClientError::from_response(422, b"<html>nope</html>"),
            ClientError::DialFailed(m) if m == "<html>nope</html>"
        ));
        assert!(matches!(
            ClientError::from_response(502, b""),
            ClientError::Http { status: 502, message } if message == "HTTP status 502"
        ));
        let long = vec![b'x'; 1000];
        match ClientError::from_response(500, &long) {
            ClientError::Http { message, .. } => assert_eq!(message.len(), EXCERPT_LEN + 3),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wrapped_in_io_and_session_errors_it_is_found_again() {
        let io: io::Error = ClientError::NotFound("gone".into()).into();
        assert!(matches!(
            ClientError::from_io(&io),
            Some(ClientError::NotFound(_))
        ));
        let outer = io::Error::other(io);
        assert!(matches!(
            ClientError::find_in(&outer),
            Some(ClientError::NotFound(_))
        ));
        assert!(ClientError::NotFound(String::new()).ends_stream());
        assert!(!ClientError::DialFailed(String::new()).ends_stream());
    }
}
