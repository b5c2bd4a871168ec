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

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::SystemTime;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use serde_json::{Map, Value, json};

use super::daydream::{ApiError, CreateBody, PIPELINE};
use super::routes::{has_api_token, json_body};
use super::state::{App, StreamEntry};
use crate::webrtc::{ControlHandler, IceCandidate, TransportError};
use sdstream::params::{InterpolationMethod, Transition};
use sdstream::sampling::scheduler::{LcmScheduler, SchedulerConfig, t_index_list_for_timesteps};
use sdstream::{StreamDiffusionParams, UpdateKind};

/// Largest data-channel message taken.
const MAX_CONTROL_BYTES: usize = 64 * 1024;
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

/// Scope parameters that could not be mapped: the message and the keys.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rejection {
    pub(crate) message: String,
    pub(crate) fields: Vec<String>,
}

impl Rejection {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            message: format!("{field}: {}", message.into()),
            fields: vec![field.to_owned()],
        }
    }

    fn api(self) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "STREAMS/INVALID_PARAMS",
            self.message,
        )
    }
}

/// What a Scope parameter set or message asks for, in this server's terms.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ScopeUpdate {
    /// A JSON Merge Patch of [`StreamDiffusionParams`].
    pub(crate) patch: Map<String, Value>,
    /// Pause or resume the input.
    pub(crate) paused: Option<bool>,
    /// How the prompt change glides (a `transition` with `num_steps` > 0 on the channel).
    pub(crate) transition: Transition,
}

/// Where a Scope parameter set comes from: the rules differ slightly (Scope itself fills a
/// `transition` without `num_steps` with 4 in an offer, 0 on the data channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// `initialParameters` of an offer, or `load_params` of a pipeline load.
    Offer,
    /// A data-channel message.
    Channel,
}

/// Every top-level key of [`StreamDiffusionParams`] (taken as they are).
fn params_fields() -> &'static [String] {
    static FIELDS: OnceLock<Vec<String>> = OnceLock::new();
    FIELDS.get_or_init(|| {
        let all: Value =
            serde_json::from_str(&StreamDiffusionParams::default().to_json()).unwrap_or_default();
        all.as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Scope's `[{text, weight}]` as this server's `prompt`: one text alone, several as
/// `[[text, weight], …]` (blended as `prompt_interpolation_method` says).
fn prompt_of(field: &str, v: &Value) -> Result<Value, Rejection> {
    let items = v.as_array().ok_or_else(|| {
        Rejection::new(
            field,
            format!("must be a list of {{text, weight}}, not {}", kind_of(v)),
        )
    })?;
    if items.is_empty() {
        return Err(Rejection::new(field, "must not be empty"));
    }
    let mut pairs = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = format!("{field}[{i}]");
        let map = item
            .as_object()
            .ok_or_else(|| Rejection::new(&path, "must be an object {text, weight}"))?;
        if let Some(extra) = map.keys().find(|k| *k != "text" && *k != "weight") {
            return Err(Rejection::new(&path, format!("unknown key {extra:?}")));
        }
        let text = map
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| Rejection::new(&format!("{path}.text"), "must be a string"))?;
        let weight = match map.get("weight") {
            None | Some(Value::Null) => 1.0,
            Some(w) => w
                .as_f64()
                .filter(|w| *w >= 0.0)
                .ok_or_else(|| Rejection::new(&format!("{path}.weight"), "must be a number ≥ 0"))?,
        };
        pairs.push(json!([text, weight]));
    }
    if pairs.len() == 1 {
        Ok(pairs[0][0].clone())
    } else {
        Ok(Value::Array(pairs))
    }
}

fn interpolation(field: &str, v: &Value) -> Result<Value, Rejection> {
    match v.as_str() {
        Some("linear" | "slerp") => Ok(v.clone()),
        _ => Err(Rejection::new(field, "must be \"linear\" or \"slerp\"")),
    }
}

/// Maps a Scope parameter object onto this server's terms (module docs; docs/STREAMING.md).
/// `current` is the stream's parameters (for `denoising_step_list`, which needs the grid of
/// `num_inference_steps`).
pub(crate) fn translate(
    value: &Value,
    source: Source,
    current: &StreamDiffusionParams,
) -> Result<ScopeUpdate, Rejection> {
    let map = value.as_object().ok_or_else(|| {
        Rejection::new(
            "parameters",
            format!("must be a JSON object, not {}", kind_of(value)),
        )
    })?;
    let mut update = ScopeUpdate::default();
    let mut unsupported = Vec::new();
    let mut steps: Option<&Value> = None;
    let mut seed_from: Option<&str> = None;
    for (key, v) in map {
        // Scope's clients drop null values before sending; a null here means "not given".
        if v.is_null() {
            continue;
        }
        match key.as_str() {
            "prompts" => {
                // A transition's target prompts win over plain prompts.
                if map.get("transition").is_none_or(Value::is_null) {
                    update
                        .patch
                        .insert("prompt".into(), prompt_of("prompts", v)?);
                }
            }
            "transition" => {
                let t = v
                    .as_object()
                    .ok_or_else(|| Rejection::new("transition", "must be an object"))?;
                if let Some(extra) = t.keys().find(|k| {
                    ![
                        "target_prompts",
                        "num_steps",
                        "temporal_interpolation_method",
                    ]
                    .contains(&k.as_str())
                }) {
                    return Err(Rejection::new(
                        "transition",
                        format!("unknown key {extra:?}"),
                    ));
                }
                let target = t
                    .get("target_prompts")
                    .ok_or_else(|| Rejection::new("transition.target_prompts", "is required"))?;
                // Scope fills a missing num_steps with 4 in an offer and 0 on the data channel;
                // an offer has nothing to glide from, so its target prompts apply at once.
                let default_steps = if source == Source::Offer { 4 } else { 0 };
                let num_steps = match t.get("num_steps") {
                    None | Some(Value::Null) => default_steps,
                    Some(n) => n.as_u64().ok_or_else(|| {
                        Rejection::new("transition.num_steps", "must be an integer ≥ 0")
                    })?,
                };
                let method = match t
                    .get("temporal_interpolation_method")
                    .filter(|m| !m.is_null())
                {
                    Some(m) => {
                        interpolation("transition.temporal_interpolation_method", m)?;
                        if m == "slerp" {
                            InterpolationMethod::Slerp
                        } else {
                            InterpolationMethod::Linear
                        }
                    }
                    None => InterpolationMethod::Linear,
                };
                let glide = Transition::new(u32::try_from(num_steps).unwrap_or(u32::MAX), method);
                glide.validate().map_err(|e| Rejection {
                    message: e.to_string(),
                    fields: vec!["transition.num_steps".into()],
                })?;
                if source == Source::Channel {
                    update.transition = glide;
                }
                update.patch.insert(
                    "prompt".into(),
                    prompt_of("transition.target_prompts", target)?,
                );
            }
            "prompt_interpolation_method" => {
                update.patch.insert(key.clone(), interpolation(key, v)?);
            }
            "denoising_step_list" => steps = Some(v),
            "seed" | "base_seed" => {
                if let Some(other) = seed_from {
                    return Err(Rejection {
                        message: format!("give {other} or {key}, not both"),
                        fields: vec![other.to_owned(), key.clone()],
                    });
                }
                seed_from = Some(key);
                let seed = v
                    .as_u64()
                    .ok_or_else(|| Rejection::new(key, "must be an integer ≥ 0"))?;
                update.patch.insert("seed".into(), json!(seed));
            }
            "paused" => {
                update.paused = Some(
                    v.as_bool()
                        .ok_or_else(|| Rejection::new("paused", "must be true or false"))?,
                );
            }
            "input_mode" => match v.as_str() {
                Some("video") => {}
                Some("text") => {
                    return Err(Rejection::new(
                        "input_mode",
                        "\"text\" (generating without input video) is not supported: sdstream \
                         transforms the video the session sends",
                    ));
                }
                _ => {
                    return Err(Rejection::new(
                        "input_mode",
                        "must be \"video\" or \"text\"",
                    ));
                }
            },
            "pipeline_ids" if source == Source::Offer => check_pipeline_ids(v)?,
            "produces_video" if v == &json!(true) => {}
            "produces_audio" if v == &json!(false) => {}
            k if params_fields().iter().any(|f| f == k) => {
                update.patch.insert(key.clone(), v.clone());
            }
            _ => unsupported.push(key.clone()),
        }
    }
    if !unsupported.is_empty() {
        return Err(Rejection {
            message: format!(
                "not supported here: {} (sdstream runs StreamDiffusion: it takes prompts, \
                 transition, prompt_interpolation_method, \
                 denoising_step_list, seed, paused and StreamDiffusionParams fields)",
                unsupported.join(", ")
            ),
            fields: unsupported,
        });
    }
    if let Some(v) = steps {
        let list: Vec<i64> = v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| Rejection::new("denoising_step_list", "must be a list of integers"))?;
        let n = match update.patch.get("num_inference_steps") {
            Some(n) => n.as_u64().map(|n| n as usize).ok_or_else(|| {
                Rejection::new("num_inference_steps", "must be an integer from 1 to 100")
            })?,
            None => current.num_inference_steps as usize,
        };
        let scheduler = LcmScheduler::new(SchedulerConfig::default())
            .map_err(|e| Rejection::new("denoising_step_list", e.to_string()))?;
        let grid = scheduler
            .timesteps(n)
            .map_err(|e| Rejection::new("num_inference_steps", e.to_string()))?;
        let indices = t_index_list_for_timesteps(&grid, 1000, &list).map_err(|e| Rejection {
            message: e.to_string(),
            fields: vec!["denoising_step_list".into()],
        })?;
        update.patch.insert("t_index_list".into(), json!(indices));
    }
    Ok(update)
}

/// `pipeline_ids` must name the one pipeline served.
fn check_pipeline_ids(v: &Value) -> Result<(), Rejection> {
    let ids = v
        .as_array()
        .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
        .ok_or_else(|| Rejection::new("pipeline_ids", "must be a list of strings"))?;
    match ids.as_slice() {
        [id] if *id == PIPELINE => Ok(()),
        _ => Err(Rejection::new(
            "pipeline_ids",
            format!("{ids:?} is not served here; the only pipeline is [\"{PIPELINE}\"]"),
        )),
    }
}

/// Scope-level state of the server: the last pipeline load's parameters.
#[derive(Default)]
pub(crate) struct ScopeState {
    load_params: Mutex<Option<Value>>,
}

fn scope_state(app: &App) -> &ScopeState {
    &app.scope
}

/// A Scope session's data-channel messages, applied to its stream.
struct Control {
    app: Weak<App>,
    stream: String,
}

impl Control {
    fn apply(&self, app: &App, entry: &StreamEntry, message: &[u8]) -> Result<Value, Rejection> {
        if message.len() > MAX_CONTROL_BYTES {
            return Err(Rejection::new(
                "message",
                format!(
                    "{} bytes; at most {MAX_CONTROL_BYTES} are taken",
                    message.len()
                ),
            ));
        }
        let text = std::str::from_utf8(message)
            .map_err(|_| Rejection::new("message", "is not UTF-8 text"))?;
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Rejection::new("message", format!("is not JSON: {e}")))?;
        let current = entry.engine.params();
        let update = translate(&value, Source::Channel, &current)?;
        let mut kind = UpdateKind::Unchanged;
        if !update.patch.is_empty() {
            let patch = Value::Object(update.patch.clone());
            let params = current
                .patched(&patch, &app.config().settings)
                .map_err(|e| Rejection {
                    message: e.to_string(),
                    fields: update.patch.keys().cloned().collect(),
                })?;
            let applied = entry
                .engine
                .update_params_with_transition(params.clone(), update.transition)
                .map_err(|e| Rejection {
                    message: e.to_string(),
                    fields: update.patch.keys().cloned().collect(),
                })?;
            kind = applied.kind();
            if let Some(r) = &entry.recorder {
                r.params(entry.engine.status().params_version, &params);
            }
            entry.touch();
        }
        if let Some(paused) = update.paused {
            entry.transport.set_paused(paused);
        }
        let version = entry.engine.status().params_version;
        tracing::info!(stream = %entry.id, update = kind.as_str(), version, "Scope parameters applied");
        Ok(json!({
            "type": "parameters_applied",
            "update": kind.as_str(),
            "params_version": version,
            "paused": entry.transport.is_paused(),
        }))
    }
}

impl ControlHandler for Control {
    fn on_message(&self, _session_id: &str, message: &[u8]) -> Vec<String> {
        let Some(app) = self.app.upgrade() else {
            return Vec::new();
        };
        let Some(entry) = app.stream(&self.stream) else {
            return Vec::new();
        };
        let reply = match self.apply(&app, &entry, message) {
            Ok(reply) => reply,
            Err(rejection) => {
                tracing::info!(stream = %entry.id, error = %rejection.message, "Scope parameters rejected");
                json!({
                    "type": "parameters_rejected",
                    "error_message": rejection.message,
                    "fields": rejection.fields,
                })
            }
        };
        vec![reply.to_string()]
    }

    fn on_end(&self, _session_id: &str) {
        let Some(app) = self.app.upgrade() else {
            return;
        };
        let stream = self.stream.clone();
        tokio::spawn(async move {
            let _ = app.remove(&stream, "the session's connection ended").await;
        });
    }
}

type Json = axum::Json<Value>;

fn field_string<'a>(map: &'a Map<String, Value>, field: &str) -> Result<&'a str, ApiError> {
    match map.get(field) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(ApiError::field(field, "is required")),
        Some(other) => Err(ApiError::field(
            field,
            format!("must be a string, not {}", kind_of(other)),
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
                format!("must be an object, not {}", kind_of(other)),
            )
            .into());
        }
    };
    // The last pipeline load's parameters, then the offer's own.
    let mut params = scope_state(&app)
        .load_params
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
                format!("must be an object, not {}", kind_of(&other)),
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
    if let Ok(mut stored) = scope_state(&app).load_params.lock() {
        *stored = Some(patch);
    }
    Ok(axum::Json(
        json!({"message": "Pipeline loading initiated successfully"}),
    ))
}

async fn pipeline_status(State(app): State<Arc<App>>) -> Json {
    let load_params = scope_state(&app)
        .load_params
        .lock()
        .ok()
        .and_then(|p| p.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> StreamDiffusionParams {
        StreamDiffusionParams::default()
    }

    fn ok(v: Value, source: Source) -> ScopeUpdate {
        translate(&v, source, &params()).unwrap_or_else(|r| panic!("{v}: {}", r.message))
    }

    fn refused(v: Value, source: Source) -> Rejection {
        translate(&v, source, &params()).expect_err(&v.to_string())
    }

    #[test]
    fn scope_parameters_map_onto_streamdiffusion_params() {
        let u = ok(
            json!({"prompts": [{"text": "a fox", "weight": 1.0}]}),
            Source::Channel,
        );
        assert_eq!(Value::Object(u.patch), json!({"prompt": "a fox"}));
        let u = ok(
            json!({
                "prompts": [{"text": "a fox", "weight": 3}, {"text": "a cat"}],
                "prompt_interpolation_method": "linear",
                "seed": 7,
                "paused": true,
                "negative_prompt": "blurry",
                "input_mode": "video",
                "produces_video": true,
                "produces_audio": false,
                "noise_scale": null,
            }),
            Source::Channel,
        );
        assert_eq!(
            Value::Object(u.patch),
            json!({
                "prompt": [["a fox", 3.0], ["a cat", 1.0]],
                "prompt_interpolation_method": "linear",
                "seed": 7,
                "negative_prompt": "blurry",
            })
        );
        assert_eq!(u.paused, Some(true));
        // Timesteps to grid indices, on the stream's own num_inference_steps (50) or the
        // message's.
        let u = ok(
            json!({"denoising_step_list": [1000, 750, 500, 250]}),
            Source::Channel,
        );
        assert_eq!(u.patch["t_index_list"], json!([0, 12, 25, 37]));
        let u = ok(
            json!({"denoising_step_list": [700, 500], "num_inference_steps": 4}),
            Source::Channel,
        );
        assert_eq!(u.patch["t_index_list"], json!([1, 2]));
        // A transition with num_steps 0 switches to its targets (over `prompts`).
        let u = ok(
            json!({"prompts": [{"text": "old"}],
                   "transition": {"target_prompts": [{"text": "new"}], "num_steps": 0}}),
            Source::Channel,
        );
        assert_eq!(u.patch["prompt"], json!("new"));
        // On the channel a transition without num_steps is instant, as Scope reads it.
        let u = ok(
            json!({"transition": {"target_prompts": [{"text": "x"}]}}),
            Source::Channel,
        );
        assert_eq!(u.patch["prompt"], json!("x"));
        assert!(u.transition.is_instant());
        // With num_steps the channel's prompt change glides.
        let u = ok(
            json!({"transition": {"target_prompts": [{"text": "y"}], "num_steps": 8,
                                  "temporal_interpolation_method": "slerp"}}),
            Source::Channel,
        );
        assert_eq!(u.patch["prompt"], json!("y"));
        assert_eq!(u.transition, Transition::new(8, InterpolationMethod::Slerp));
        // An offer has nothing to glide from: its target prompts apply at once (Scope's
        // default of 4 steps is accepted and has no effect).
        let u = ok(
            json!({"transition": {"target_prompts": [{"text": "z"}]}}),
            Source::Offer,
        );
        assert_eq!(u.patch["prompt"], json!("z"));
        assert!(u.transition.is_instant());
        // base_seed (Scope's load parameter) is the seed too; pipeline_ids in an offer.
        let u = ok(
            json!({"base_seed": 42, "pipeline_ids": ["streamdiffusion"]}),
            Source::Offer,
        );
        assert_eq!(Value::Object(u.patch), json!({"seed": 42}));
    }

    #[test]
    fn what_cannot_be_mapped_is_refused_naming_the_keys() {
        let r = refused(
            json!({"prompts": [{"text": "x"}], "noise_scale": 0.7, "kv_cache_attention_bias": 0.3}),
            Source::Channel,
        );
        assert_eq!(r.fields, vec!["kv_cache_attention_bias", "noise_scale"]);
        assert!(r.message.contains("not supported here"), "{}", r.message);
        for (v, field, says) in [
            (json!([1, 2]), "parameters", "JSON object"),
            (json!({"prompts": []}), "prompts", "empty"),
            (json!({"prompts": "a fox"}), "prompts", "list"),
            (
                json!({"prompts": [{"text": "a", "weight": -1}]}),
                "prompts[0].weight",
                "≥ 0",
            ),
            (
                json!({"prompts": [{"txt": "a"}]}),
                "prompts[0]",
                "unknown key",
            ),
            (
                json!({"transition": {"target_prompts": [{"text": "x"}], "num_steps": 5000}}),
                "transition.num_steps",
                "at most 1000",
            ),
            (
                json!({"transition": {"target_prompts": [{"text": "x"}], "num_steps": 0,
                       "temporal_interpolation_method": "cubic"}}),
                "transition.temporal_interpolation_method",
                "linear",
            ),
            (json!({"input_mode": "text"}), "input_mode", "not supported"),
            (json!({"paused": "yes"}), "paused", "true or false"),
            (json!({"seed": -3}), "seed", "integer"),
            (
                json!({"denoising_step_list": [1200]}),
                "denoising_step_list",
                "timestep",
            ),
            (
                json!({"denoising_step_list": "700"}),
                "denoising_step_list",
                "integers",
            ),
            (
                json!({"pipeline_ids": ["longlive"]}),
                "pipeline_ids",
                "not served",
            ),
        ] {
            let source = if field == "pipeline_ids" {
                Source::Offer
            } else {
                Source::Channel
            };
            let r = refused(v.clone(), source);
            assert_eq!(r.fields, vec![field.to_owned()], "{v}");
            assert!(r.message.contains(says), "{v}: {}", r.message);
        }
        let r = refused(json!({"seed": 1, "base_seed": 2}), Source::Channel);
        assert_eq!(r.fields.len(), 2);
        // pipeline_ids is an offer's; on the channel it is not a parameter.
        let r = refused(
            json!({"pipeline_ids": ["streamdiffusion"]}),
            Source::Channel,
        );
        assert_eq!(r.fields, vec!["pipeline_ids"]);
    }
}
