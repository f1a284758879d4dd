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
        /// The port is the remote sshd's as the client reached it (ssh's `%p`): the relay
        /// puts in the port that sshd listens on, from `SSH_CONNECTION`, which differs behind
        /// a port mapping (Docker's `-p 2222:22`, Vagrant). Sent as a last word, `sshd`.
        sshd: bool,
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
    /// let line = Request::New { port: 22, sshd: false }.to_line();
    /// assert_eq!(line, "immortal/1 new 22\n");
    /// assert_eq!(Request::parse(line.trim_end()).unwrap(), Request::New { port: 22, sshd: false });
    /// let line = Request::New { port: 2222, sshd: true }.to_line();
    /// assert_eq!(line, "immortal/1 new 2222 sshd\n");
    /// ```
    pub fn to_line(&self) -> String {
        match self {
            Request::New { port, sshd: false } => format!("{VERSION} new {port}\n"),
            Request::New { port, sshd: true } => format!("{VERSION} new {port} sshd\n"),
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
                Ok(port) if port != 0 => {
                    let mut rest = words.clone();
                    let sshd = rest.next() == Some("sshd");
                    if sshd {
                        words = rest;
                    }
                    Request::New { port, sshd }
                }
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

impl Reply {
    /// The reply at the end of `line`, which may begin with other output: what a login
    /// shell's start-up files print before the relay runs (a terminal title's escape
    /// sequence with no newline, say, which ends in a letter). An `ok` must carry a stream id
    /// or `pid=<pid>`, and an `error` a known code. `None` when the line holds no reply.
    ///
    /// ```
    /// use immortal::socket_proto::Reply;
    ///
    /// let line = b"\x1b]0;title\x07ok 0123456789abcdef0123456789abcdef";
    /// assert_eq!(
    ///     Reply::find_at_end(line),
    ///     Some(Reply::Ok("0123456789abcdef0123456789abcdef".into())),
    /// );
    /// assert_eq!(Reply::find_at_end(b"look at this"), None);
    /// ```
    pub fn find_at_end(line: &[u8]) -> Option<Reply> {
        let line = String::from_utf8_lossy(line);
        if let Some(at) = line.rfind("ok ") {
            let word = &line[at + 3..];
            let pid = word
                .strip_prefix("pid=")
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
            if is_stream_id(word) || pid {
                return Some(Reply::Ok(word.to_owned()));
            }
        }
        line.rmatch_indices("error ")
            .find_map(|(at, _)| match Reply::parse(&line[at..]) {
                Ok(error @ Reply::Error { .. }) => Some(error),
                _ => None,
            })
    }
}

/// Reads one line, keeping at most its last `keep` bytes, byte by byte so that nothing after
/// the newline is consumed; returns it without the newline. `Ok(None)` at end of stream
/// before any byte.
///
/// # Errors
/// The read's failure; `UnexpectedEof` at end of stream inside a line.
pub async fn read_line_tail(
    io: &mut (impl AsyncRead + Unpin),
    keep: usize,
) -> io::Result<Option<Vec<u8>>> {
    read_raw_line(io, keep, Overlong::KeepTail).await
}

/// Reads one line of at most [`MAX_LINE`] bytes, byte by byte so that nothing after the
/// newline is consumed; returns it without the newline. `Ok(None)` at end of stream before any
/// byte.
///
/// # Errors
/// The read's failure; `InvalidData` for a line too long or not UTF-8; `UnexpectedEof` at end
/// of stream inside a line.
pub async fn read_line(io: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<String>> {
    let Some(line) = read_raw_line(io, MAX_LINE - 1, Overlong::Refuse).await? else {
        return Ok(None);
    };
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a line that is not UTF-8"))
}

/// What [`read_raw_line`] does with a line longer than it holds.
#[derive(Clone, Copy)]
enum Overlong {
    /// Keep its last bytes.
    KeepTail,
    /// Fail with `InvalidData`.
    Refuse,
}

/// A line's bytes without the newline, at most `max` of them (see [`Overlong`]).
async fn read_raw_line(
    io: &mut (impl AsyncRead + Unpin),
    max: usize,
    overlong: Overlong,
) -> io::Result<Option<Vec<u8>>> {
    let mut line = std::collections::VecDeque::with_capacity(64);
    loop {
        let mut byte = [0u8; 1];
        if io.read(&mut byte).await? == 0 {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return Ok(Some(line.into()));
        }
        if line.len() == max {
            match overlong {
                Overlong::KeepTail => drop(line.pop_front()),
                Overlong::Refuse => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a line longer than {MAX_LINE} bytes"),
                    ))
                }
            }
        }
        line.push_back(byte[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_found_at_the_end_of_what_a_login_printed_before_it() {
        let id = "0123456789abcdef0123456789abcdef";
        let ok = Some(Reply::Ok(id.into()));
        for line in [
            format!("ok {id}"),
            format!("\x1b]0;user@host\x07ok {id}"),
            format!("{}ok {id}", "x ".repeat(400)),
            format!("Welcome! ok {id}"),
            format!("\x1b[0mok {id}"),
        ] {
            assert_eq!(Reply::find_at_end(line.as_bytes()), ok, "{line:?}");
        }
        let mut invalid_utf8 = b"\xff\xfe ".to_vec();
        invalid_utf8.extend_from_slice(format!("ok {id}").as_bytes());
        assert_eq!(Reply::find_at_end(&invalid_utf8), ok);
        assert_eq!(
            Reply::find_at_end(b"\x1b[0merror not-found no such stream"),
            Some(Reply::Error {
                code: ErrorCode::NotFound,
                message: "no such stream".into()
            })
        );
        assert_eq!(
            Reply::find_at_end(b"ok pid=42"),
            Some(Reply::Ok("pid=42".into()))
        );
        for noise in [
            "look at this".to_string(),
            "Last login ok 5".into(),
            format!("ok {id} and more"),
            "terror free".into(),
            "error free login".into(),
            String::new(),
        ] {
            assert_eq!(Reply::find_at_end(noise.as_bytes()), None, "{noise:?}");
        }
    }

    #[tokio::test]
    async fn a_line_tail_keeps_the_end_of_a_long_line_and_nothing_after_it() {
        let mut input: &[u8] = b"0123456789abcdef\nrest";
        assert_eq!(
            read_line_tail(&mut input, 4).await.unwrap(),
            Some(b"cdef".to_vec())
        );
        assert_eq!(input, b"rest");
        assert!(read_line_tail(&mut input, 4).await.is_err(), "no newline");
        let mut empty: &[u8] = b"";
        assert_eq!(read_line_tail(&mut empty, 4).await.unwrap(), None);
    }

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        let id = "0123456789abcdef0123456789abcdef".to_string();
        for request in [
            Request::New {
                port: 22,
                sshd: false,
            },
            Request::New {
                port: 2222,
                sshd: true,
            },
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
            "immortal/1 new 22 sshd extra",
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
        // MAX_LINE counts the newline.
        let mut longest = vec![b'x'; MAX_LINE - 1];
        longest.push(b'\n');
        assert_eq!(
            read_line(&mut &longest[..]).await.unwrap().map(|l| l.len()),
            Some(MAX_LINE - 1)
        );
        let mut over = vec![b'x'; MAX_LINE];
        over.push(b'\n');
        assert!(read_line(&mut &over[..]).await.is_err());
    }
}
