//! The agent's HTTP API, shared by the server and the client: paths, the upgrade protocol name,
//! and the JSON bodies. `docs/API.md` documents it for people; this module is the contract in
//! code, so both sides agree by construction.

use serde::{Deserialize, Serialize};

/// Where the management API lives.
pub const STREAMS_PATH: &str = "/v1/streams";

/// The value of the `Upgrade:` header that asks for a raw session-protocol stream on
/// `/v1/streams/{id}/connect`. (`Upgrade: websocket` asks for the same stream carried in
/// binary WebSocket messages.)
pub const UPGRADE_PROTOCOL: &str = "immortal-session/1";

/// The header by which an upgrade to `/v1/streams/{id}/connect` proves that it comes from the
/// client that created the stream: its value is the [`StreamInfo::attach_key`] of the create
/// response. One bearer token is full access to the agent; the attach key keeps another holder
/// of the token from taking over a stream that its creator is about to attach.
pub const ATTACH_KEY_HEADER: &str = "immortal-attach-key";

/// The largest request body the agent reads: its JSON bodies are a few dozen bytes.
pub const MAX_REQUEST_BODY: usize = 4096;

/// The path of one stream.
pub fn stream_path(id: &str) -> String {
    format!("{STREAMS_PATH}/{id}")
}

/// The path a client upgrades to carry a stream.
pub fn connect_path(id: &str) -> String {
    format!("{STREAMS_PATH}/{id}/connect")
}

/// `POST /v1/streams`: asks the agent to dial a local TCP port and expose it as a stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateStream {
    /// The TCP port on the agent's loopback interface to connect to.
    pub port: u16,
    /// A name for people; the agent picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One stream, as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamInfo {
    /// The stream's id: 32 hex digits, unguessable.
    pub id: String,
    /// A human-friendly name.
    pub name: String,
    /// The local TCP port the stream is connected to.
    pub port: u16,
    /// When the stream was created (RFC 3339, UTC).
    pub created_at: String,
    /// When a client last attached (RFC 3339), if ever.
    pub last_connected_at: Option<String>,
    /// When a client last went away (RFC 3339), if ever.
    pub last_disconnected_at: Option<String>,
    /// Whether a client is attached now.
    pub connected: bool,
    /// Bytes carried from the client to the local service.
    pub bytes_to_service: u64,
    /// Bytes carried from the local service to the client.
    pub bytes_from_service: u64,
    /// The secret that every upgrade to this stream must present in the
    /// [`ATTACH_KEY_HEADER`] header (32 hex digits). Only the answer to the create request
    /// carries it, so only the creator can attach; listings leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_key: Option<String>,
}

/// `GET /v1/streams`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamList {
    /// Every stream, oldest first.
    pub streams: Vec<StreamInfo>,
}

/// The body of every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ApiError,
}

/// An error the API reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// A stable machine-readable code.
    pub code: ErrorCode,
    /// One sentence for a person.
    pub message: String,
}

/// The stable error codes of the API, with the HTTP status each comes with.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// 401: the bearer token is missing or wrong.
    Unauthorized,
    /// 400: the request is malformed (bad JSON, bad port, missing upgrade header).
    BadRequest,
    /// 404: no stream with this id (never created, deleted, or expired).
    StreamNotFound,
    /// 409: the stream already has a session and this is not a valid resume of it.
    Conflict,
    /// 422: the agent could not connect to the requested local port.
    DialFailed,
    /// 503: the agent holds its maximum of streams and every one is connected.
    TooManyStreams,
    /// 500: anything else.
    Internal,
    /// 404: no such endpoint (a path the API does not have).
    NotFound,
    /// 405: the endpoint exists but does not take this method.
    MethodNotAllowed,
    /// 403: an upgrade without the stream's attach key (only its creator may attach).
    AttachRefused,
    /// 413: the request body is larger than [`MAX_REQUEST_BODY`].
    PayloadTooLarge,
    /// 408: the request (head and body) did not arrive within the agent's time limit.
    RequestTimeout,
}

impl ErrorCode {
    /// The HTTP status that goes with the code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::BadRequest => 400,
            ErrorCode::StreamNotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::DialFailed => 422,
            ErrorCode::TooManyStreams => 503,
            ErrorCode::Internal => 500,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::AttachRefused => 403,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RequestTimeout => 408,
        }
    }
}
