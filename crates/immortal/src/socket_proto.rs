//! What a client says to the local agent's Unix socket, through `immortal relay` and an ssh
//! carrier: one request line, one reply line, then (for a stream) the session protocol.
//!
//! ```text
//! client -> agent   immortal/1 new 22\n           create a stream to port 22 on loopback
//! client -> agent   immortal/1 resume <id>\n      carry stream <id> again
//! client -> agent   immortal/1 info\n             who is the agent (for tools and tests)
//! agent -> client   ok <word>\n                   the stream id; for info: pid=<pid>
//! agent -> client   error <code> <message>\n      not-found, dial-failed, full, bad-request
//! ```
//!
//! After `ok` for `new` or `resume`, the client's session sends its HELLO on the same byte
//! stream, and the agent runs the session handshake of that stream, exactly as after an HTTP
//! upgrade to `/v1/streams/{id}/connect`. The socket needs no token: it lives in a directory
//! only its user can enter (see [`crate::runtime_dir`]); each resume is still proved with the
//! session's secret. The agent sends nothing before it has read the request, and the client
//! sends nothing after the request before the reply, so neither side reads beyond a line.

use std::fmt;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The first word of every request.
pub const VERSION: &str = "immortal/1";

/// The longest request or reply line, newline included.
pub const MAX_LINE: usize = 512;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Create a stream to this port on the agent's loopback interface.
    New {
        /// The port.
        port: u16,
    },
    /// Carry the stream with this id again.
    Resume {
        /// The stream's id.
        id: String,
    },
    /// Say who the agent is.
    Info,
}

impl Request {
    /// The request as a line, newline included.
    ///
    /// ```
    /// use immortal::socket_proto::Request;
    ///
    /// let line = Request::New { port: 22 }.to_line();
    /// assert_eq!(line, "immortal/1 new 22\n");
    /// assert_eq!(Request::parse(line.trim_end()).unwrap(), Request::New { port: 22 });
    /// ```
    pub fn to_line(&self) -> String {
        match self {
            Request::New { port } => format!("{VERSION} new {port}\n"),
            Request::Resume { id } => format!("{VERSION} resume {id}\n"),
            Request::Info => format!("{VERSION} info\n"),
        }
    }

    /// Parses a request line (without its newline).
    ///
    /// # Errors
    /// A sentence saying what is wrong, for the `bad-request` reply.
    pub fn parse(line: &str) -> Result<Request, String> {
        let mut words = line.split(' ');
        if words.next() != Some(VERSION) {
            return Err(format!("expected a request starting with {VERSION:?}"));
        }
        let request = match (words.next(), words.next()) {
            (Some("new"), Some(port)) => match port.parse::<u16>() {
                Ok(port) if port != 0 => Request::New { port },
                _ => return Err(format!("{port:?} is not a port")),
            },
            (Some("resume"), Some(id)) if is_stream_id(id) => Request::Resume { id: id.into() },
            (Some("resume"), _) => return Err("a stream id is 32 hex digits".into()),
            (Some("info"), None) => return Ok(Request::Info),
            _ => return Err("expected `new PORT`, `resume ID` or `info`".into()),
        };
        match words.next() {
            None => Ok(request),
            Some(_) => Err("trailing words in the request".into()),
        }
    }
}

/// Whether `id` looks like a stream id (32 lowercase hex digits).
fn is_stream_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why the agent refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No such stream (never created, removed, or expired).
    NotFound,
    /// Nothing accepted the connection to the port.
    DialFailed,
    /// The agent holds its maximum of streams, all in use.
    Full,
    /// The request was not understood.
    BadRequest,
}

impl ErrorCode {
    fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not-found",
            ErrorCode::DialFailed => "dial-failed",
            ErrorCode::Full => "full",
            ErrorCode::BadRequest => "bad-request",
        }
    }

    fn parse(word: &str) -> Option<ErrorCode> {
        Some(match word {
            "not-found" => ErrorCode::NotFound,
            "dial-failed" => ErrorCode::DialFailed,
            "full" => ErrorCode::Full,
            "bad-request" => ErrorCode::BadRequest,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Done: the stream's id (for `new` and `resume`), or what `info` says.
    Ok(String),
    /// Refused.
    Error {
        /// Why, for programs.
        code: ErrorCode,
        /// Why, for people (one line).
        message: String,
    },
}

impl Reply {
    /// The reply as a line, newline included; a message is kept to one line and to
    /// [`MAX_LINE`].
    ///
    /// ```
    /// use immortal::socket_proto::{ErrorCode, Reply};
    ///
    /// let reply = Reply::Error { code: ErrorCode::Full, message: "no room\nat all".into() };
    /// let line = reply.to_line();
    /// assert_eq!(line, "error full no room at all\n");
    /// assert_eq!(
    ///     Reply::parse(line.trim_end()).unwrap(),
    ///     Reply::Error { code: ErrorCode::Full, message: "no room at all".into() },
    /// );
    /// ```
    pub fn to_line(&self) -> String {
        let mut line = match self {
            Reply::Ok(word) => format!("ok {word}"),
            Reply::Error { code, message } => format!("error {code} {message}"),
        };
        line = line.replace(['\n', '\r'], " ");
        if line.len() > MAX_LINE - 1 {
            let mut end = MAX_LINE - 1;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        line.push('\n');
        line
    }

    /// Parses a reply line (without its newline).
    ///
    /// # Errors
    /// A sentence saying what is wrong.
    pub fn parse(line: &str) -> Result<Reply, String> {
        if let Some(word) = line.strip_prefix("ok ") {
            return Ok(Reply::Ok(word.to_owned()));
        }
        if let Some(rest) = line.strip_prefix("error ") {
            let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some(code) = ErrorCode::parse(code) {
                return Ok(Reply::Error {
                    code,
                    message: message.to_owned(),
                });
            }
        }
        Err(format!("not a reply of an immortal agent: {line:?}"))
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes, byte by byte so that nothing after the
/// newline is consumed; returns it without the newline. `Ok(None)` at end of stream before any
/// byte.
///
/// # Errors
/// The read's failure; `InvalidData` for a line too long or not UTF-8; `UnexpectedEof` at end
/// of stream inside a line.
pub async fn read_line(io: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<String>> {
    let mut line = Vec::with_capacity(64);
    loop {
        let mut byte = [0u8; 1];
        if io.read(&mut byte).await? == 0 {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() >= MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line longer than {MAX_LINE} bytes"),
            ));
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a line that is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        let id = "0123456789abcdef0123456789abcdef".to_string();
        for request in [
            Request::New { port: 22 },
            Request::Resume { id: id.clone() },
            Request::Info,
        ] {
            let line = request.to_line();
            assert_eq!(Request::parse(line.trim_end()), Ok(request));
        }
        for bad in [
            "",
            "immortal/2 new 22",
            "immortal/1 new 0",
            "immortal/1 new 70000",
            "immortal/1 new",
            "immortal/1 resume ../../x",
            "immortal/1 resume 0123456789ABCDEF0123456789ABCDEF",
            "immortal/1 info extra",
            "immortal/1 new 22 extra",
            "GET / HTTP/1.1",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn replies_round_trip() {
        for reply in [
            Reply::Ok("abc".into()),
            Reply::Error {
                code: ErrorCode::NotFound,
                message: "gone".into(),
            },
            Reply::Error {
                code: ErrorCode::DialFailed,
                message: String::new(),
            },
        ] {
            let line = reply.to_line();
            assert_eq!(Reply::parse(line.trim_end()), Ok(reply));
        }
        assert!(Reply::parse("SSH-2.0-OpenSSH").is_err());
        assert!(Reply::parse("error nonsense x").is_err());
        let long = Reply::Error {
            code: ErrorCode::Full,
            message: "é".repeat(MAX_LINE),
        };
        assert!(long.to_line().len() <= MAX_LINE);
    }

    #[tokio::test]
    async fn a_line_is_read_without_what_follows() {
        let mut input: &[u8] = b"ok abc\nHELLO";
        assert_eq!(
            read_line(&mut input).await.unwrap().as_deref(),
            Some("ok abc")
        );
        assert_eq!(input, b"HELLO");
        let mut empty: &[u8] = b"";
        assert_eq!(read_line(&mut empty).await.unwrap(), None);
        let mut cut: &[u8] = b"ok a";
        assert_eq!(
            read_line(&mut cut).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let long = vec![b'x'; MAX_LINE + 10];
        let mut long: &[u8] = &long;
        assert_eq!(
            read_line(&mut long).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
