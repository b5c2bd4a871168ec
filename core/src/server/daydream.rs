//! Daydream's shapes: the request bodies the API takes (both create forms, PATCH, the beta
//! prompts route), the stream object, the status envelope and the error envelope.
//!
//! The field lists follow Daydream's public API reference and its official Python SDK
//! (`daydream-sdk` 0.1.0, whose response models require every field of [`stream_json`] but
//! `output_stream_url`, and whose error models require `error`, `code` and `status`).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::state::{App, StreamEntry, stream_state};
use crate::webrtc::{Ingest, PublisherState, TransportStats, error_response};

/// The only pipeline served.
pub(crate) const PIPELINE: &str = "streamdiffusion";
/// The `author` of every stream (one tenant: whoever holds the token).
pub(crate) const AUTHOR: &str = "sdstream";

/// An API error: answered as Daydream's envelope `{success: false, error, code, status}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "REQUEST/BAD_REQUEST", message)
    }

    /// A body field of the wrong type or value (422), naming it.
    pub(crate) fn field(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "STREAMS/INVALID_PARAMS",
            format!("invalid parameter `{field}`: {message}"),
        )
    }

    pub(crate) fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "STREAMS/NOT_FOUND",
            format!("stream {id:?} not found"),
        )
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "AUTH/UNAUTHORIZED",
            "missing or wrong bearer token",
        )
    }

    pub(crate) fn too_many_streams(max: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "STREAMS/LIMIT_REACHED",
            format!(
                "this server runs at most {max} streams at once; delete one or try another server"
            ),
        )
    }

    pub(crate) fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER/SHUTTING_DOWN",
            "the server is shutting down",
        )
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "SERVER/INTERNAL",
            message,
        )
    }

    /// An engine error: a JSON syntax or type error is 400, everything else (a parameter out
    /// of range, a model not served, a preprocessor or feature the engine cannot run) is 422.
    pub(crate) fn invalid(e: crate::Error) -> Self {
        match e {
            crate::Error::Json(m) => Self::bad_request(format!("invalid JSON: {m}")),
            other => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "STREAMS/INVALID_PARAMS",
                other.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(self.status.as_u16(), self.code, &self.message)
    }
}

/// Milliseconds since the epoch.
pub(crate) fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// RFC 3339 UTC with milliseconds (`2025-01-31T12:00:00.000Z`), as Daydream's `created_at`.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// A create body, from either form: `{pipeline, params, name?, output_rtmp_url?}` or the
/// older `{pipeline_id, pipeline_params, name?}`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CreateBody {
    pub(crate) pipeline: String,
    pub(crate) pipeline_id: String,
    /// A JSON object (merged over the server's defaults).
    pub(crate) params: Value,
    pub(crate) name: Option<String>,
}

fn object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))
}

/// An optional string field (`null` counts as absent).
fn string_field<'a>(map: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::field(
            field,
            format!("must be a string, not {}", kind(other)),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `pipeline` (or the older `pipeline_id`) must name the one pipeline served, when given.
fn check_pipeline(map: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(p) = string_field(map, "pipeline")?
        && p != PIPELINE
    {
        return Err(ApiError::field(
            "pipeline",
            format!("{p:?} is not served here; the only pipeline is {PIPELINE:?}"),
        ));
    }
    Ok(())
}

/// The parameters object of a body: `params`, or the older `pipeline_params`; `{}` when
/// neither is given.
fn params_field(map: &Map<String, Value>) -> Result<Value, ApiError> {
    let given: Vec<&str> = ["params", "pipeline_params"]
        .into_iter()
        .filter(|f| !matches!(map.get(*f), None | Some(Value::Null)))
        .collect();
    match given.as_slice() {
        [] => Ok(json!({})),
        [field] => match &map[*field] {
            p @ Value::Object(_) => Ok(p.clone()),
            other => Err(ApiError::field(
                field,
                format!("must be an object, not {}", kind(other)),
            )),
        },
        _ => Err(ApiError::field(
            "params",
            "give `params` or the older `pipeline_params`, not both",
        )),
    }
}

impl CreateBody {
    pub(crate) fn parse(body: &Value) -> Result<Self, ApiError> {
        let map = object(body)?;
        check_pipeline(map)?;
        let pipeline_id = string_field(map, "pipeline_id")?
            .unwrap_or(PIPELINE)
            .to_owned();
        let name = string_field(map, "name")?.map(str::to_owned);
        if name.as_ref().is_some_and(|n| n.chars().count() > 256) {
            return Err(ApiError::field("name", "at most 256 characters"));
        }
        // The output goes out over WHEP only: a client that asks for RTMP would get nothing.
        if string_field(map, "output_rtmp_url")?.is_some_and(|u| !u.trim().is_empty()) {
            return Err(ApiError::field(
                "output_rtmp_url",
                "RTMP output is not supported by this server; play the output over WHEP \
                 (the stream's whep_url)",
            ));
        }
        Ok(Self {
            pipeline: PIPELINE.to_owned(),
            pipeline_id,
            params: params_field(map)?,
            name,
        })
    }
}

/// The parameter patch of a PATCH body (`{pipeline?, params}` or `{pipeline_params}`) or of
/// the beta prompts body (`{pipeline, model_id, params}`, where the top-level `model_id` names
/// the pipeline, not the model, and is ignored).
pub(crate) fn patch_params(body: &Value, beta: bool) -> Result<Value, ApiError> {
    let map = object(body)?;
    if !beta {
        check_pipeline(map)?;
    }
    params_field(map)
}

/// The WHIP and WHEP URLs of a stream.
pub(crate) fn urls(app: &App, s: &StreamEntry) -> (String, String) {
    let base = &app.config().public_url;
    (
        format!("{base}/whip/{}?token={}", s.id, s.key),
        format!("{base}/whep/{}?token={}", s.id, s.key),
    )
}

/// The host of the public URL (`gateway_host`).
pub(crate) fn gateway_host(app: &App) -> String {
    let url = &app.config().public_url;
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// Daydream's stream object.
pub(crate) fn stream_json(app: &App, s: &StreamEntry) -> Value {
    let (whip_url, whep_url) = urls(app, s);
    let params = App::params_json(s);
    let updated_at = s.updated_at.lock().map(|t| t.clone()).unwrap_or_default();
    json!({
        "id": s.id,
        "object": "stream",
        "name": s.name,
        "author": AUTHOR,
        "pipeline": s.pipeline,
        "params": params,
        "pipeline_id": s.pipeline_id,
        "pipeline_params": params,
        "stream_key": s.key,
        "created_at": s.created_at,
        "updated_at": updated_at,
        "output_playback_id": s.id,
        "from_playground": false,
        "gateway_host": gateway_host(app),
        "is_smoke_test": false,
        "whip_url": whip_url,
        "output_stream_url": whep_url,
        "whep_url": whep_url,
    })
}

/// Connection quality from loss and jitter (the gateway's `conn_quality`).
fn conn_quality(loss_pct: f64, jitter_ms: f64) -> &'static str {
    if loss_pct < 2.0 && jitter_ms < 30.0 {
        "good"
    } else if loss_pct < 10.0 && jitter_ms < 100.0 {
        "fair"
    } else {
        "poor"
    }
}

/// The gateway's ingest metrics: the publisher connection's bytes and its video track's
/// packets, loss and jitter. `rtt` is `null`: the publisher's receiver reports are not read.
fn ingest_metrics(s: &StreamEntry, t: &TransportStats, ingest: &Ingest) -> Value {
    let received = t.media_packets_received;
    let lost = t.media_packets_lost;
    let loss_pct = if received + lost > 0 {
        lost as f64 * 100.0 / (received + lost) as f64
    } else {
        0.0
    };
    let mut warnings = Vec::new();
    if ingest.publisher == PublisherState::Gone {
        warnings.push("the publisher has gone");
    }
    let track_stats: Vec<Value> = if received > 0 {
        vec![json!({
            "type": "video",
            "jitter": t.media_jitter_ms,
            "packets_lost": lost,
            "packets_received": received,
            "packet_loss_pct": loss_pct,
            "rtt": null,
            "warnings": warnings,
        })]
    } else {
        Vec::new()
    };
    json!({
        "stats": {
            "peer_conn_stats": {
                "ID": s.id,
                "BytesReceived": t.media_bytes_received,
                "BytesSent": t.media_bytes_sent,
            },
            "track_stats": track_stats,
            "conn_quality": conn_quality(loss_pct, t.media_jitter_ms),
        }
    })
}

/// `GET /v1/streams/{id}/status`: `{success, error, data}`, `data` in both vocabularies
/// clients read: the runner's (`input_status.fps`, `inference_status.fps`) and the API
/// reference's (`inference_status.input_fps`, `output_fps`, `last_input_time`), with the
/// gateway's `whep_url` and ingest metrics; times in milliseconds since the epoch. sdstream's
/// own report is under `engine` (the engine's status: `params_version`, queues, timings) and
/// `transport` (the WebRTC counters).
pub(crate) fn status_json(app: &App, s: &StreamEntry) -> Value {
    let engine = s.engine.status();
    let transport = s.transport.stats();
    let ingest = s.transport.ingest();
    let state = stream_state(engine.state, &ingest);
    let (_, whep_url) = urls(app, s);
    let restart_logs: Vec<String> = Vec::new();
    let inference = json!({
        "pipeline": s.pipeline,
        "stream_id": s.id,
        "start_time": s.start_time,
        "fps": engine.output_fps,
        "input_fps": engine.input_fps,
        "output_fps": engine.output_fps,
        "last_input_time": engine.last_input_time,
        "last_output_time": engine.last_output_time,
        "last_error": engine.last_error,
        "last_error_time": engine.last_error_time,
        "last_params": engine.last_params,
        "last_params_hash": engine.last_params_hash,
        "last_params_update_time": engine.last_params_update_time,
        "restart_count": engine.restart_count,
        "last_restart_time": engine.last_restart_time,
        "last_restart_logs": restart_logs,
    });
    let data = json!({
        "type": "status",
        "stream_id": s.id,
        "request_id": s.id,
        "pipeline": s.pipeline,
        "pipeline_id": s.pipeline_id,
        "state": state.as_str(),
        "start_time": s.start_time,
        "input_status": {
            "fps": engine.input_fps,
            "last_input_time": engine.last_input_time,
        },
        "inference_status": inference,
        "gateway_status": {
            "whep_url": whep_url,
            "error": null,
            "ingest_metrics": ingest_metrics(s, &transport, &ingest),
        },
        "orchestrator_info": {
            "address": app.config().instance.as_deref().unwrap_or(""),
            "url": app.config().public_url,
        },
        "engine": engine,
        "transport": transport,
    });
    json!({"success": true, "error": null, "data": data})
}
