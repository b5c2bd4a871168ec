//! HLS playback routes: `GET /hls/{stream}/index.m3u8` (the live playlist) and
//! `GET /hls/{stream}/{n}.ts` (its segments), opened by the stream's key (`?token=` or
//! `Authorization: Bearer`) as its WHEP URL is. The segments the playlist lists carry the
//! token, so a player that fetches them relative to the playlist needs nothing else.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::state::App;
use crate::webrtc::{TransportError, error_response, request_token};

/// How long a playlist request waits for the first segment beyond three segment lengths.
const FIRST_SEGMENT_GRACE: Duration = Duration::from_secs(5);

async fn playlist(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, TransportError> {
    let entry = app.stream_with_key(&id, request_token(&query, &headers))?;
    let key = entry.key.clone();
    let wait = app.config().hls.segment_target * 3 + FIRST_SEGMENT_GRACE;
    let Some(text) = entry
        .hls
        .playlist(wait, |n| format!("{n}.ts?token={key}"))
        .await
    else {
        let mut response = error_response(
            503,
            "HLS/NO_OUTPUT",
            "the stream has made no output yet (no publisher, or its engine is still \
             loading); retry in a moment",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(response);
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/vnd.apple.mpegurl"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        text,
    )
        .into_response())
}

async fn segment(
    State(app): State<Arc<App>>,
    Path((id, file)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, TransportError> {
    let entry = app.stream_with_key(&id, request_token(&query, &headers))?;
    let seq = file
        .strip_suffix(".ts")
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| TransportError::NotFound(format!("HLS file {file:?}")))?;
    let data = entry.hls.segment(seq).ok_or_else(|| {
        TransportError::NotFound(format!(
            "HLS segment {seq} (segments are kept for a few seconds; reload the playlist)"
        ))
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, "video/mp2t"),
            (header::CACHE_CONTROL, "max-age=60"),
        ],
        data,
    )
        .into_response())
}

/// The HLS routes over `app`.
pub(crate) fn routes(app: Arc<App>) -> Router {
    Router::new()
        .route("/hls/{stream}/index.m3u8", get(playlist))
        .route("/hls/{stream}/{file}", get(segment))
        .with_state(app)
}
