//! Daydream Scope's session API over this server's streams: one peer connection that sends
//! the camera and receives the output, a `parameters` data channel for live updates, trickled
//! candidates, the ICE servers to use.
//!
//! | request | answer |
//! |---|---|
//! | `POST /api/v1/webrtc/offer` `{sdp, type: "offer", initialParameters?}` | `{sdp, type: "answer", sessionId}`: a new stream (its id is the session id) whose one connection carries both ways |
//! | `PATCH /api/v1/webrtc/offer/{sessionId}` `{candidates: [{candidate, sdpMid, sdpMLineIndex}]}` | 204; 400 past 64 candidates in a session |
//! | `DELETE /api/v1/webrtc/offer/{sessionId}` | 204: `stream_stopped` on the channel, then the session and its stream end |
//! | `GET /api/v1/webrtc/ice-servers` | `{iceServers: [{urls, username, credential}]}` (the server's `--ice-server` list) |
//! | `POST /api/v1/pipeline/load`, `GET /api/v1/pipeline/status` | the one pipeline, `streamdiffusion`: load parameters become later offers' defaults; always `loaded` (each session loads its model, as its stream's status shows) |
//! | `GET /health` | `{status: "healthy", …}` |
//!
//! Errors are the server's envelope with Scope's `detail` beside (`{success: false, error,
//! code, status, detail}`). The routes need the API's bearer token unless the server runs
//! with `--scope-auth none`.
//!
//! [`translate`] maps Scope's parameters onto [`StreamDiffusionParams`]; what it cannot map is
//! refused, naming the keys, never silently dropped (docs/STREAMING.md has the table). On the data
//! channel each message is a JSON object merged into the session's parameters: applied whole
//! or not at all, answered `{type: "parameters_applied", update, params_version, paused}` or
//! `{type: "parameters_rejected", error_message, fields}`. When the server ends a session it
//! sends `{type: "stream_stopped", reason, error_message?}` first.
//!
//! An offer's SDP is read before its stream (and engine) is made, so that one that cannot be
//! answered costs nothing; a session that does not connect within the transport's connect
//! timeout ends, and its stream with it.
//!
//! The module's parts: [`translate`] (Scope's parameters onto ours, pure), [`session`] (a
//! session's data channel applying them to its stream) and, here, the HTTP routes.

mod session;
mod translate;

use session::Control;
use translate::{Rejection, Source, check_pipeline_ids, translate};

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use sdstream::params::json_kind;
use serde_json::{Map, Value, json};

use super::bodies::{ApiError, CreateBody, PIPELINE, json_body};
use super::state::{App, StreamEntry, has_api_token};
use crate::webrtc::{IceCandidate, TransportError};
use sdstream::StreamDiffusionParams;

/// Most candidates in one PATCH.
const MAX_CANDIDATES: usize = 64;

/// An error of a Scope route: the server's envelope plus Scope's `detail`.
pub(crate) struct ScopeError(ApiError);

impl From<ApiError> for ScopeError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<TransportError> for ScopeError {
    fn from(e: TransportError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self(ApiError::new(status, e.code(), e.to_string()))
    }
}

impl IntoResponse for ScopeError {
    fn into_response(self) -> Response {
        let e = self.0;
        // Scope's clients read `detail`; Daydream's envelope carries the same message.
        let mut body = crate::webrtc::error_envelope(e.status.as_u16(), e.code, &e.message);
        body["detail"] = json!(e.message);
        let mut response = (e.status, axum::Json(body)).into_response();
        if e.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

type Json = axum::Json<Value>;

fn field_string<'a>(map: &'a Map<String, Value>, field: &str) -> Result<&'a str, ApiError> {
    match map.get(field) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(ApiError::field(field, "is required")),
        Some(other) => Err(ApiError::field(
            field,
            format!("must be a string, not {}", json_kind(other)),
        )),
    }
}

async fn offer(State(app): State<Arc<App>>, request: Request) -> Result<Json, ScopeError> {
    let body = json_body(request).await?;
    let map = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let sdp = field_string(map, "sdp")?.to_owned();
    if field_string(map, "type")? != "offer" {
        return Err(ApiError::field("type", "must be \"offer\"").into());
    }
    // Read as the session will read it, before a stream, an engine (and whatever its
    // parameters fetch) is spent on an offer that cannot be answered.
    crate::webrtc::check_offer(&sdp)?;
    let initial = match map.get("initialParameters") {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(other) => {
            return Err(ApiError::field(
                "initialParameters",
                format!("must be an object, not {}", json_kind(other)),
            )
            .into());
        }
    };
    // The last pipeline load's parameters, then the offer's own.
    let mut params = app
        .scope_load_params
        .lock()
        .ok()
        .and_then(|p| p.clone())
        .unwrap_or_else(|| json!({}));
    let defaults = StreamDiffusionParams::from_json_with(
        &app.config().default_params.to_string(),
        &app.config().settings,
    )
    .map_err(ApiError::invalid)?;
    let update = translate(&initial, Source::Offer, &defaults).map_err(|r| {
        let mut e = r.api();
        e.message = format!("initialParameters.{}", e.message);
        e
    })?;
    sdstream::params::merge_patch(&mut params, &Value::Object(update.patch));
    let entry = app.create(CreateBody {
        pipeline: PIPELINE.to_owned(),
        pipeline_id: PIPELINE.to_owned(),
        params,
        name: Some("scope session".to_owned()),
        output_rtmp_url: None,
        frame_budget_ms: None,
    })?;
    if let Some(paused) = update.paused {
        entry.transport.set_paused(paused);
    }
    let control = Arc::new(Control {
        app: Arc::downgrade(&app),
        stream: entry.id.clone(),
    });
    match entry.transport.open_duplex(&sdp, control).await {
        Ok(answer) => {
            if let Ok(mut duplex) = entry.duplex.lock() {
                *duplex = Some(answer.session_id);
            }
            tracing::info!(stream = %entry.id, "Scope session answered");
            Ok(axum::Json(json!({
                "sdp": answer.sdp,
                "type": "answer",
                "sessionId": entry.id,
            })))
        }
        Err(e) => {
            let _ = app
                .remove(&entry.id, "its offer could not be answered")
                .await;
            Err(e.into())
        }
    }
}

/// The Scope session `id`: its stream and the transport's session id.
fn session(app: &App, id: &str) -> Result<(Arc<StreamEntry>, String), ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "SCOPE/SESSION_NOT_FOUND",
            format!("session {id:?} not found"),
        )
    };
    let entry = app.stream(id).ok_or_else(not_found)?;
    let session = entry
        .duplex
        .lock()
        .ok()
        .and_then(|d| d.clone())
        .ok_or_else(not_found)?;
    Ok((entry, session))
}

async fn add_candidates(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<StatusCode, ScopeError> {
    let (entry, session) = session(&app, &id)?;
    let body = json_body(request).await?;
    let list = body
        .get("candidates")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::field("candidates", "must be a list of candidates"))?;
    if list.len() > MAX_CANDIDATES {
        return Err(ApiError::field(
            "candidates",
            format!(
                "{} candidates; at most {MAX_CANDIDATES} at once",
                list.len()
            ),
        )
        .into());
    }
    let candidates = list
        .iter()
        .enumerate()
        .map(|(i, c)| {
            serde_json::from_value::<IceCandidate>(c.clone())
                .map_err(|e| ApiError::field(&format!("candidates[{i}]"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    entry
        .transport
        .add_remote_candidates(&session, &candidates)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn end_session(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ScopeError> {
    // Idempotent, as Scope's: an unknown or ended session is already gone.
    let Some(entry) = app.stream(&id) else {
        return Ok(StatusCode::NO_CONTENT);
    };
    if entry.duplex.lock().map(|d| d.is_none()).unwrap_or(true) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "SCOPE/SESSION_NOT_FOUND",
            format!(
                "stream {id:?} was not made by a Scope offer; delete it with DELETE /v1/streams/{id}"
            ),
        )
        .into());
    }
    let _ = app.remove(&id, "deleted by the client").await;
    Ok(StatusCode::NO_CONTENT)
}

async fn ice_servers(State(app): State<Arc<App>>) -> Json {
    axum::Json(json!({"iceServers": app.config().transport.ice_servers}))
}

async fn health(State(app): State<Arc<App>>) -> Json {
    let started = app
        .started
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    axum::Json(json!({
        "status": "healthy",
        "timestamp": sdstream::status::rfc3339(SystemTime::now()),
        "server_start_time": started,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// `POST /api/v1/pipeline/load`: `{pipeline_ids: ["streamdiffusion"], load_params?}` or
/// `{pipelines: [{pipeline_id: "streamdiffusion", load_params?}]}`. The load parameters are
/// checked like an offer's and become the next offers' defaults.
async fn load_pipeline(State(app): State<Arc<App>>, request: Request) -> Result<Json, ScopeError> {
    let body = json_body(request).await?;
    let map = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let (ids, load_params) = match (map.get("pipeline_ids"), map.get("pipelines")) {
        (Some(ids), None) => (ids.clone(), map.get("load_params").cloned()),
        (None, Some(Value::Array(list))) if list.len() == 1 => (
            json!([list[0].get("pipeline_id").cloned().unwrap_or(Value::Null)]),
            list[0].get("load_params").cloned(),
        ),
        _ => {
            return Err(ApiError::field(
                "pipeline_ids",
                "give pipeline_ids [\"streamdiffusion\"] or one entry in pipelines",
            )
            .into());
        }
    };
    check_pipeline_ids(&ids).map_err(Rejection::api)?;
    let load_params = match load_params {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v,
        Some(other) => {
            return Err(ApiError::field(
                "load_params",
                format!("must be an object, not {}", json_kind(&other)),
            )
            .into());
        }
    };
    let defaults = StreamDiffusionParams::from_json_with(
        &app.config().default_params.to_string(),
        &app.config().settings,
    )
    .map_err(ApiError::invalid)?;
    let update = translate(&load_params, Source::Offer, &defaults).map_err(|r| {
        let mut e = r.api();
        e.message = format!("load_params.{}", e.message);
        e
    })?;
    let patch = Value::Object(update.patch);
    // Checked in full now, so that a bad load fails here rather than at every offer.
    defaults
        .patched(&patch, &app.config().settings)
        .map_err(ApiError::invalid)?;
    if let Ok(mut stored) = app.scope_load_params.lock() {
        *stored = Some(patch);
    }
    Ok(axum::Json(
        json!({"message": "Pipeline loading initiated successfully"}),
    ))
}

async fn pipeline_status(State(app): State<Arc<App>>) -> Json {
    let load_params = app.scope_load_params.lock().ok().and_then(|p| p.clone());
    axum::Json(json!({
        "status": "loaded",
        "pipeline_id": PIPELINE,
        "load_params": load_params,
        "loaded_lora_adapters": null,
        "error": null,
        "loading_stage": null,
        "produces_video": true,
        "produces_audio": false,
    }))
}

/// The API token on the Scope routes, refused in their error shape.
async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if has_api_token(&app, &request) {
        next.run(request).await
    } else {
        ScopeError(ApiError::unauthorized()).into_response()
    }
}

/// The Scope-style routes over `app`.
pub(crate) fn routes(app: Arc<App>) -> Router {
    let sessions = Router::new()
        .route("/api/v1/webrtc/offer", post(offer))
        .route(
            "/api/v1/webrtc/offer/{id}",
            patch(add_candidates).delete(end_session),
        )
        .route("/api/v1/webrtc/ice-servers", get(ice_servers))
        .route("/api/v1/pipeline/load", post(load_pipeline))
        .route("/api/v1/pipeline/status", get(pipeline_status));
    let sessions = if app.config().scope_requires_token {
        sessions.route_layer(middleware::from_fn_with_state(app.clone(), require_token))
    } else {
        sessions
    };
    Router::new()
        .merge(sessions)
        .route("/health", get(health))
        .with_state(app)
}
