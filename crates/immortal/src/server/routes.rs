//! The management API (`docs/API.md`): routes, bearer-token authentication, JSON bodies and
//! the error responses.
//!
//! Every route but `/healthz` requires `Authorization: Bearer <token>`, checked before anything
//! else is looked at (the body is not even read), so a request without the token changes
//! nothing. A body is read up to [`MAX_REQUEST_BODY`] bytes, each chunk copied out of the
//! connection's buffers as it arrives, so a body sent one byte per packet costs no more than
//! its length. Errors are [`ErrorBody`] JSON with the status of their [`ErrorCode`].

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::registry::{CreateError, RemovalReason};
use super::stream::MAX_NAME_LEN;
use super::{upgrade, ConnectionTicket, Shared};
use crate::api::{
    ApiError, CreateStream, ErrorBody, ErrorCode, StreamInfo, StreamList, MAX_REQUEST_BODY,
};

/// The agent's routes.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/streams", post(create).get(list))
        .route("/v1/streams/{id}", get(get_one).delete(delete_one))
        .route("/v1/streams/{id}/connect", get(upgrade::connect))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(shared)
}

/// An error response: a code (which sets the status) and one sentence.
#[derive(Debug)]
pub(crate) struct ApiFailure {
    code: ErrorCode,
    message: String,
}

impl ApiFailure {
    /// A failure with `code`'s status.
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> ApiFailure {
        ApiFailure {
            code,
            message: message.into(),
        }
    }

    /// The failure's code.
    #[cfg(test)]
    pub(crate) fn code(&self) -> ErrorCode {
        self.code
    }

    /// 404 for an id the agent does not hold.
    pub(crate) fn stream_not_found(id: &str) -> ApiFailure {
        ApiFailure::new(
            ErrorCode::StreamNotFound,
            format!("no stream {id:?} (never created, deleted, or expired)"),
        )
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let unauthorized = self.code == ErrorCode::Unauthorized;
        let body = ErrorBody {
            error: ApiError {
                code: self.code,
                message: self.message,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if matches!(
            self.code,
            ErrorCode::PayloadTooLarge | ErrorCode::RequestTimeout
        ) {
            // The rest of the request is not read: the connection cannot carry another.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Proof that the request carried the agent's token. Handlers take it first, so nothing else
/// about a request is examined before it is authenticated.
#[derive(Debug)]
pub(crate) struct Authorized(());

impl FromRequestParts<Arc<Shared>> for Authorized {
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &Arc<Shared>,
    ) -> Result<Authorized, ApiFailure> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token);
        match presented {
            Some(token) if shared.token.verify(token) => {
                if let Some(ConnectionTicket(ticket)) = parts.extensions.get() {
                    ticket.authenticate();
                }
                Ok(Authorized(()))
            }
            Some(_) => Err(ApiFailure::new(
                ErrorCode::Unauthorized,
                "the bearer token is wrong",
            )),
            None => Err(ApiFailure::new(
                ErrorCode::Unauthorized,
                "send the agent's token as `Authorization: Bearer <token>`",
            )),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The answer when a request did not arrive whole within the time limit.
pub(super) fn request_timeout() -> Response {
    ApiFailure::new(
        ErrorCode::RequestTimeout,
        "the request did not arrive whole within the agent's handshake timeout",
    )
    .into_response()
}

/// A request body of at most [`MAX_REQUEST_BODY`] bytes, copied out chunk by chunk as it
/// arrives (a chunk may share a large buffer of the connection; keeping chunks would keep the
/// buffers).
#[derive(Debug)]
pub(crate) struct SmallBody(Vec<u8>);

impl<S: Send + Sync> FromRequest<S> for SmallBody {
    type Rejection = ApiFailure;

    async fn from_request(request: Request, _state: &S) -> Result<SmallBody, ApiFailure> {
        read_small_body(request.into_body()).await.map(SmallBody)
    }
}

/// Reads `body`, refusing it as soon as it is known to exceed [`MAX_REQUEST_BODY`].
pub(crate) async fn read_small_body(body: Body) -> Result<Vec<u8>, ApiFailure> {
    use http_body_util::BodyExt;
    let too_large = || {
        ApiFailure::new(
            ErrorCode::PayloadTooLarge,
            format!("a request body is at most {MAX_REQUEST_BODY} bytes"),
        )
    };
    let mut body = body;
    if axum::body::HttpBody::size_hint(&body).lower() > MAX_REQUEST_BODY as u64 {
        return Err(too_large());
    }
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| {
            ApiFailure::new(
                ErrorCode::BadRequest,
                format!("reading the request body failed: {err}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_REQUEST_BODY {
                return Err(too_large());
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// `POST /v1/streams`.
async fn create(
    _auth: Authorized,
    State(shared): State<Arc<Shared>>,
    SmallBody(body): SmallBody,
) -> Result<(StatusCode, Json<StreamInfo>), ApiFailure> {
    let request: CreateStream = serde_json::from_slice(&body).map_err(|err| {
        ApiFailure::new(
            ErrorCode::BadRequest,
            format!("expected {{\"port\": <1-65535>, \"name\": <optional string>}}: {err}"),
        )
    })?;
    if request.port == 0 {
        return Err(ApiFailure::new(
            ErrorCode::BadRequest,
            "port 0 is not a port to connect to",
        ));
    }
    if let Some(name) = &request.name {
        if name.is_empty()
            || name.chars().count() > MAX_NAME_LEN
            || name.chars().any(char::is_control)
        {
            return Err(ApiFailure::new(
                ErrorCode::BadRequest,
                format!(
                    "a name is 1 to {MAX_NAME_LEN} characters, none of them control characters"
                ),
            ));
        }
    }
    match shared.registry.create(request.port, request.name).await {
        Ok(info) => Ok((StatusCode::CREATED, Json(info))),
        Err(err @ CreateError::Full(_)) => {
            tracing::warn!("{err}");
            Err(ApiFailure::new(ErrorCode::TooManyStreams, err.to_string()))
        }
        Err(err @ CreateError::Dial { .. }) => {
            Err(ApiFailure::new(ErrorCode::DialFailed, err.to_string()))
        }
    }
}

/// `GET /healthz`: 200 "ok" while the agent serves. No token: it says nothing but that the
/// agent is up, for load balancers and supervisors.
async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /metrics`: the Prometheus text exposition format.
async fn metrics(_auth: Authorized, State(shared): State<Arc<Shared>>) -> Response {
    let (streams, connected) = shared.registry.counts();
    let text = shared.metrics.render(streams, connected);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// `GET /v1/streams`.
async fn list(_auth: Authorized, State(shared): State<Arc<Shared>>) -> Json<StreamList> {
    Json(StreamList {
        streams: shared.registry.list(),
    })
}

/// `GET /v1/streams/{id}`.
async fn get_one(
    _auth: Authorized,
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<StreamInfo>, ApiFailure> {
    shared
        .registry
        .get(&id)
        .map(|stream| Json(stream.info()))
        .ok_or_else(|| ApiFailure::stream_not_found(&id))
}

/// `DELETE /v1/streams/{id}`.
async fn delete_one(
    _auth: Authorized,
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFailure> {
    if shared.registry.remove(&id, RemovalReason::Deleted) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiFailure::stream_not_found(&id))
    }
}

/// Any path the API does not have (authenticated first, like every route, so the API's shape
/// is not revealed to strangers).
async fn no_route(_auth: Authorized) -> ApiFailure {
    ApiFailure::new(ErrorCode::NotFound, "no such endpoint; see docs/API.md")
}

/// A known path with a method it does not take.
async fn wrong_method(_auth: Authorized) -> ApiFailure {
    ApiFailure::new(
        ErrorCode::MethodNotAllowed,
        "this endpoint does not take that method; see docs/API.md",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn every_failure_has_its_codes_status_and_the_json_shape() {
        let response = ApiFailure::new(ErrorCode::TooManyStreams, "full").into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let response = ApiFailure::new(ErrorCode::Unauthorized, "no").into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers().get(header::WWW_AUTHENTICATE).unwrap(),
            "Bearer"
        );
    }
}
