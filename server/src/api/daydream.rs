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
use crate::rtmp::RtmpUrl;
use crate::webrtc::{Ingest, PublisherState, TransportStats, error_response};
pub(crate) use sdstream::status::rfc3339;

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
    pub(crate) fn invalid(e: sdstream::Error) -> Self {
        match e {
            sdstream::Error::Json(m) => Self::bad_request(format!("invalid JSON: {m}")),
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

/// A create body, from either form: `{pipeline, params, name?, output_rtmp_url?}` or the
/// older `{pipeline_id, pipeline_params, name?}`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CreateBody {
    pub(crate) pipeline: String,
    pub(crate) pipeline_id: String,
    /// A JSON object (merged over the server's defaults).
    pub(crate) params: Value,
    pub(crate) name: Option<String>,
    /// Where to push the output over RTMP: the URL as given, parsed.
    pub(crate) output_rtmp_url: Option<(String, RtmpUrl)>,
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
        let output_rtmp_url = match string_field(map, "output_rtmp_url")? {
            Some(url) if !url.trim().is_empty() => Some((
                url.trim().to_owned(),
                RtmpUrl::parse(url).map_err(|e| ApiError::field("output_rtmp_url", e))?,
            )),
            _ => None,
        };
        Ok(Self {
            pipeline: PIPELINE.to_owned(),
            pipeline_id,
            params: params_field(map)?,
            name,
            output_rtmp_url,
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

/// The HLS playlist URL of a stream.
pub(crate) fn hls_url(app: &App, s: &StreamEntry) -> String {
    format!(
        "{}/hls/{}/index.m3u8?token={}",
        app.config().public_url,
        s.id,
        s.key
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
    let rtmp_url = app.config().rtmp_url.clone();
    let rtmp_publish_url = rtmp_url.as_ref().map(|u| format!("{u}/{}", s.key));
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
        "hls_url": hls_url(app, s),
        "rtmp_url": rtmp_url,
        "rtmp_publish_url": rtmp_publish_url,
        "output_rtmp_url": s.push.as_ref().map(|(url, _)| url),
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

/// Where a frame's time goes on each path, in milliseconds (mean, median, p95, max of the
/// last 512): `ingest` (the access unit complete → submitted: decode queue, decode, RGB),
/// `queueing` (inside the engine around the pipeline call), `engine` (the pipeline call),
/// `encode` (H.264, once for every output), and `delivery` per output path: `webrtc`
/// (taken from the engine → on the first viewer's track), `hls` (encoded → its segment
/// published), `rtmp_push` (encoded → written to the socket). `transport_added` is the WebRTC
/// path's sum minus the engine (publisher's access unit → viewer's track).
fn latency_json(
    t: &TransportStats,
    ingest: &Ingest,
    hls: &crate::hls::HlsStats,
    push: Option<&crate::rtmp::PushStatus>,
) -> Value {
    json!({
        "ingest": {
            "source": ingest.kind.map(|k| k.as_str()),
            "decode": t.decode,
            "total": t.ingest,
        },
        "queueing": t.engine_queueing,
        "engine": t.pipeline,
        "encode": t.encode,
        "delivery": {
            "webrtc": t.send,
            "hls": hls.delivery,
            "rtmp_push": push.map(|p| &p.delivery),
        },
        "transport_added": t.transport,
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
    let hls = s.hls.stats();
    let push = s.push.as_ref().map(|(_, p)| p.status());
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
        "latency": latency_json(&transport, &ingest, &hls, push.as_ref()),
        "hls": hls,
        "rtmp_push": push,
        "engine": engine,
        "transport": transport,
    });
    json!({"success": true, "error": null, "data": data})
}
