//! Daydream's request bodies and error envelope: what the API reads (both create forms, PATCH,
//! the beta prompts route) and how it refuses, knowing nothing of the app's state.
//!
//! The field lists follow Daydream's public API reference and its official Python SDK
//! (`daydream-sdk` 0.1.0, whose error models require `error`, `code` and `status`).

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use sdstream::params::json_kind;
use serde_json::{Map, Value, json};

use super::MAX_JSON_BYTES;
use crate::rtmp::RtmpUrl;
use crate::webrtc::{BODY_TIMEOUT, error_response, read_body};
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

    /// A new stream that would push the streams of its model and size past their frame
    /// budgets (sdstream::pipeline::cross_stream::admission), with the figures.
    pub(crate) fn no_capacity(reason: impl Into<String>) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "STREAMS/NO_CAPACITY",
            format!("{}; delete a stream, or try another server", reason.into()),
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

/// A create body, from either form: `{pipeline, params, name?, output_rtmp_url?}` or the
/// older `{pipeline_id, pipeline_params, name?}`; either may carry sdstream's
/// `frame_budget_ms`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CreateBody {
    pub(crate) pipeline: String,
    pub(crate) pipeline_id: String,
    /// A JSON object (merged over the server's defaults).
    pub(crate) params: Value,
    pub(crate) name: Option<String>,
    /// Where to push the output over RTMP: the URL as given, parsed.
    pub(crate) output_rtmp_url: Option<(String, RtmpUrl)>,
    /// This stream's frame budget (sdstream's own member), in place of the server's
    /// `frame_budget_ms` setting; checked by the settings' own rule when the stream is made.
    pub(crate) frame_budget_ms: Option<f64>,
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
            format!("must be a string, not {}", json_kind(other)),
        )),
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
                format!("must be an object, not {}", json_kind(other)),
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
        let frame_budget_ms = match map.get("frame_budget_ms") {
            None | Some(Value::Null) => None,
            Some(Value::Number(ms)) => ms.as_f64(),
            Some(other) => {
                return Err(ApiError::field(
                    "frame_budget_ms",
                    format!("must be a number of milliseconds, not {}", json_kind(other)),
                ));
            }
        };
        Ok(Self {
            pipeline: PIPELINE.to_owned(),
            pipeline_id,
            params: params_field(map)?,
            name,
            output_rtmp_url,
            frame_budget_ms,
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

/// The JSON body: 415 unless `application/json`; then the transport's body rules (413 over the
/// limit, 400 cut short, 408 too slow); 400 when not JSON.
pub(crate) async fn json_body(request: Request) -> Result<Value, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if content_type != "application/json" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "REQUEST/UNSUPPORTED_MEDIA_TYPE",
            format!("send JSON as application/json, not {content_type:?}"),
        ));
    }
    let body = read_body(request, MAX_JSON_BYTES, BODY_TIMEOUT)
        .await
        .map_err(|e| {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            ApiError::new(status, e.code(), e.to_string())
        })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}
