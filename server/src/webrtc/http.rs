//! The WHIP and WHEP HTTP resources (RFC 9725 and the WHEP draft), as an axum [`Router`].
//!
//! | request | answer |
//! |---|---|
//! | `POST /whip/{stream}` (`application/sdp` offer) | `201`, the answer, `Location: …/whip/{stream}/{session}`, `ETag` |
//! | `DELETE /whip/{stream}/{session}` | `200` |
//! | `POST /whep/{stream}`, `DELETE /whep/{stream}/{session}` | the same, for a viewer |
//! | `PATCH` on a session | `405` (`Allow: DELETE`): ICE is not trickled, the answer has every candidate |
//!
//! The token is the query parameter `token` or an `Authorization: Bearer` header; the
//! [`StreamDirectory`] decides what it opens. Errors are JSON envelopes ([`error_response`])
//! with the status of [`TransportError::status`]: 415 for a body that is not `application/sdp`,
//! 400 for an offer that is not usable SDP or a body that ends before it is complete, 404 for an
//! unknown stream or session, 401 for a missing or wrong token, 413 for a body over the limit,
//! 408 for a body that does not arrive within [`BODY_TIMEOUT`], 409 for a second publisher while
//! the first is connected or connecting, 503 for a viewer when every place is taken by a
//! connected viewer.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{OriginalUri, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use super::{MediaHub, SessionAnswer, TransportError};

/// Finds a stream's transport by id and checks the caller's token.
pub trait StreamDirectory: Send + Sync + 'static {
    /// The transport of stream `stream_id`, if `token` opens it: [`TransportError::NotFound`]
    /// for an unknown id, [`TransportError::Unauthorized`] for a missing or wrong token.
    fn find(&self, stream_id: &str, token: Option<&str>) -> Result<Arc<MediaHub>, TransportError>;
}

/// Daydream's error envelope: `{"success": false, "error": message, "code": code, "status":
/// status}`, the body of every HTTP answer that is not a success.
pub fn error_envelope(status: u16, code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "success": false,
        "error": message,
        "code": code,
        "status": status,
    })
}

/// [`error_envelope`] as an `application/json` response, with `WWW-Authenticate: Bearer` on a
/// 401.
pub fn error_response(status: u16, code: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = error_envelope(status.as_u16(), code, message);
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

impl IntoResponse for TransportError {
    fn into_response(self) -> Response {
        error_response(self.status(), self.code(), &self.to_string())
    }
}

#[derive(Clone)]
struct Routes {
    directory: Arc<dyn StreamDirectory>,
    max_body_bytes: usize,
}

#[derive(Clone, Copy)]
enum Role {
    Publisher,
    Viewer,
}

/// The WHIP and WHEP routes (`/whip/…`, `/whep/…`) over `directory`; offers larger than
/// `max_body_bytes` are refused with 413. Nest or merge it into an application's router.
pub fn router(directory: Arc<dyn StreamDirectory>, max_body_bytes: usize) -> Router {
    let routes = Routes {
        directory,
        max_body_bytes,
    };
    Router::new()
        .route("/whip/{stream}", post(whip_offer))
        .route(
            "/whip/{stream}/{session}",
            axum::routing::delete(whip_delete).patch(no_trickle),
        )
        .route("/whep/{stream}", post(whep_offer))
        .route(
            "/whep/{stream}/{session}",
            axum::routing::delete(whep_delete).patch(no_trickle),
        )
        .with_state(routes)
}

/// The token of a request: the query parameter `token`, or an `Authorization: Bearer` header.
/// The one reading of a stream's key on its media URLs (WHIP, WHEP, HLS).
pub fn request_token<'a>(
    query: &'a HashMap<String, String>,
    headers: &'a HeaderMap,
) -> Option<&'a str> {
    if let Some(t) = query.get("token") {
        return Some(t.as_str());
    }
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// How long a request body may take to arrive once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the body of `request`, at most `limit` bytes, within `timeout`. The one reading of
/// request bodies for these routes and the server's API:
/// [`TooLarge`](TransportError::TooLarge) (413) only for a body over the limit, declared by
/// `Content-Length` or streamed; [`IncompleteBody`](TransportError::IncompleteBody) (400) for
/// one that ends early or breaks (shorter than its `Content-Length`, a chunked body cut off);
/// [`BodyTimeout`](TransportError::BodyTimeout) (408) for one that does not arrive in time.
pub async fn read_body(
    request: Request,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, TransportError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(size) = declared
        && size > limit
    {
        return Err(TransportError::TooLarge { size, limit });
    }
    let mut body = request.into_body();
    let collect = async {
        let mut data = Vec::with_capacity(declared.unwrap_or(0));
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.map_err(|e| TransportError::IncompleteBody(e.to_string()))?;
            // Trailers carry no body bytes.
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            let size = data.len() + chunk.len();
            if size > limit {
                return Err(TransportError::TooLarge { size, limit });
            }
            data.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(data))
    };
    tokio::time::timeout(timeout, collect)
        .await
        .map_err(|_| TransportError::BodyTimeout(timeout))?
}

/// The offer from a request: content type first (415), then the body (413, 400, 408), then
/// UTF-8 (400).
async fn read_offer(request: Request, limit: usize) -> Result<String, TransportError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence != "application/sdp" {
        return Err(TransportError::UnsupportedMediaType(content_type));
    }
    let body = read_body(request, limit, BODY_TIMEOUT).await?;
    String::from_utf8(body.to_vec())
        .map_err(|_| TransportError::BadOffer("the offer is not UTF-8 text".into()))
}

async fn offer(
    routes: Routes,
    role: Role,
    stream_id: String,
    uri: OriginalUri,
    query: HashMap<String, String>,
    request: Request,
) -> Result<Response, TransportError> {
    let stream = routes
        .directory
        .find(&stream_id, request_token(&query, request.headers()))?;
    let sdp = read_offer(request, routes.max_body_bytes).await?;
    let SessionAnswer { session_id, sdp } = match role {
        Role::Publisher => stream.publish(&sdp).await?,
        Role::Viewer => stream.play(&sdp).await?,
    };
    let mut location = format!("{}/{session_id}", uri.path().trim_end_matches('/'));
    if let Some(query) = uri.query() {
        location = format!("{location}?{query}");
    }
    let mut response = Response::new(Body::from(sdp));
    *response.status_mut() = StatusCode::CREATED;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/sdp"),
    );
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, value);
    }
    // RFC 9725 §4.3.1: the entity tag of the ICE session (one per session: no restarts).
    if let Ok(value) = HeaderValue::from_str(&format!("\"{session_id}\"")) {
        headers.insert(header::ETAG, value);
    }
    Ok(response)
}

async fn whip_offer(
    State(routes): State<Routes>,
    Path(stream): Path<String>,
    uri: OriginalUri,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Result<Response, TransportError> {
    offer(routes, Role::Publisher, stream, uri, query, request).await
}

async fn whep_offer(
    State(routes): State<Routes>,
    Path(stream): Path<String>,
    uri: OriginalUri,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Result<Response, TransportError> {
    offer(routes, Role::Viewer, stream, uri, query, request).await
}

async fn delete(
    routes: Routes,
    role: Role,
    stream_id: String,
    session_id: String,
    query: HashMap<String, String>,
    headers: HeaderMap,
) -> Result<StatusCode, TransportError> {
    let stream = routes
        .directory
        .find(&stream_id, request_token(&query, &headers))?;
    match role {
        Role::Publisher => stream.unpublish(&session_id).await?,
        Role::Viewer => stream.stop_playing(&session_id).await?,
    }
    Ok(StatusCode::OK)
}

async fn whip_delete(
    State(routes): State<Routes>,
    Path((stream, session)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<StatusCode, TransportError> {
    delete(routes, Role::Publisher, stream, session, query, headers).await
}

async fn whep_delete(
    State(routes): State<Routes>,
    Path((stream, session)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<StatusCode, TransportError> {
    delete(routes, Role::Viewer, stream, session, query, headers).await
}

/// RFC 9725 §4.3: a session that supports neither trickle ICE nor ICE restarts answers every
/// `PATCH` with 405.
async fn no_trickle() -> Response {
    let mut response = error_response(
        405,
        "WEBRTC/TRICKLE_NOT_SUPPORTED",
        "trickle ICE and ICE restarts are not supported: the answer carries every candidate",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("DELETE"));
    response
}
