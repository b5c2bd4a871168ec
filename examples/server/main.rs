//! A local server that speaks Daydream's HTTP API over sdstream engines, with WHIP ingest and
//! WHEP playback, so that a Daydream client works against your own machine by changing its
//! base URL.
//!
//! ```text
//! SDSTREAM_API_TOKEN=secret cargo run --release --features webrtc --example server -- \
//!     [--bind 127.0.0.1:8088] [--public-url URL] [--params FILE] [--settings FILE_OR_JSON] \
//!     [--allow-model ID]... [--ice-udp ADDR] [--max-viewers N] [--max-pending-viewers N] \
//!     [--connect-timeout SECONDS] [--bitrate BPS] [--record DIR]
//! cargo run --features webrtc --example server -- replay --record DIR/STREAM_ID [--settings …]
//! ```
//!
//! API (every `/v1` call needs `Authorization: Bearer $SDSTREAM_API_TOKEN`; a token is made up
//! and printed when the variable is unset):
//!
//! * `POST /v1/streams` `{"pipeline": "streamdiffusion", "params": {…}}` → 201, the stream:
//!   `id`, `stream_key`, `whip_url`, `whep_url` (= `output_stream_url`), `params`, `created_at`…
//!   `params` go over the server's `--params` defaults and are validated (422 when invalid).
//! * `GET /v1/streams/{id}`: the stream, its current params and transport counters.
//! * `PATCH /v1/streams/{id}` `{"params": {…}}`: merged into the current params as JSON Merge
//!   Patch (objects merge, `null` restores a default, everything else replaces), validated,
//!   applied hot or by a background reload; the answer says which (`"update"`: `"unchanged"`,
//!   `"hot"`, `"controlnet_swap"` or `"reload"`).
//! * `GET /v1/streams/{id}/status`: the engine's Daydream status.
//! * `DELETE /v1/streams?id=…` (or `/v1/streams/{id}`): ends the sessions and the engine.
//! * `POST {whip_url}` / `POST {whep_url}` with an `application/sdp` offer: WHIP / WHEP; these
//!   URLs carry the stream's own token (`?token=` + `stream_key`), not the API token.
//! * `GET /`: a page with camera → WHIP, WHEP → `<video>`, and a prompt box that PATCHes.
//!
//! Models: the server loads only the ids it is configured to serve: the known base models and
//! ControlNets, and the ids given with `--allow-model` (or `allowed_models` in `--settings`),
//! each a hub id (`org/name` or `name`) found under `model_root`, in the Hugging Face cache or
//! on the hub. A `model_id` that names a folder (`/etc`, `../x`) is refused with 422 and the
//! same message whether or not the folder exists (`EngineSettings::allow_model_paths` is off).
//!
//! Sessions: a second WHIP publisher is refused (409) while the first is connected or
//! connecting; viewer offers that never connect give way to newer ones and are ended after
//! `--connect-timeout` (see `TransportConfig`).
//!
//! Loopback by default; CORS is open (`*`) because the bearer token, not the origin, guards it.
//! `--record DIR` writes every decoded input and engine output (PPM) with their params, and
//! `replay` runs a fresh engine over such a recording and compares (the end-to-end test uses
//! it to show that what the viewers got is the engine's output for what the server decoded).

mod replay;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use sdstream::engine::{FrameId, Output};
use sdstream::ids::random_hex;
use sdstream::params::merge_patch;
use sdstream::webrtc::{
    BODY_TIMEOUT, EncoderSettings, FrameObserver, StreamDirectory, TransportConfig, TransportError,
    WebRtcStream,
};
use sdstream::{DropPolicy, Engine, EngineOptions, EngineSettings, StreamDiffusionParams, Update};

const USAGE: &str = "usage: server [--bind ADDR] [--public-url URL] [--params FILE] \
[--settings FILE_OR_JSON] [--allow-model ID]... [--ice-udp ADDR] [--max-viewers N] \
[--max-pending-viewers N] [--connect-timeout SECONDS] [--bitrate BPS] [--record DIR]\n\
       server replay --record DIR [--settings FILE_OR_JSON]";

/// Largest JSON body of the API.
const MAX_JSON_BYTES: usize = 256 * 1024;
/// Largest SDP offer.
const MAX_SDP_BYTES: usize = 64 * 1024;

struct Args {
    bind: SocketAddr,
    public_url: Option<String>,
    params: Option<PathBuf>,
    settings: Option<String>,
    allow_models: Vec<String>,
    ice_udp: Option<String>,
    max_viewers: usize,
    max_pending_viewers: usize,
    connect_timeout: Duration,
    bitrate: u32,
    record: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut parsed = Args {
        bind: SocketAddr::from(([127, 0, 0, 1], 8088)),
        public_url: None,
        params: None,
        settings: None,
        allow_models: Vec::new(),
        ice_udp: None,
        max_viewers: 32,
        max_pending_viewers: TransportConfig::default().max_pending_viewers,
        connect_timeout: TransportConfig::default().connect_timeout,
        bitrate: EncoderSettings::default().bitrate_bps,
        record: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?
            .clone();
        let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--bind" => {
                parsed.bind = value.parse().map_err(|e| format!("--bind {value}: {e}"))?;
            }
            "--public-url" => parsed.public_url = Some(value.trim_end_matches('/').to_owned()),
            "--params" => parsed.params = Some(value.into()),
            "--settings" => parsed.settings = Some(value),
            "--allow-model" => parsed.allow_models.push(value),
            "--ice-udp" => parsed.ice_udp = Some(value),
            "--max-viewers" => parsed.max_viewers = number(&value)?.clamp(1, 10_000) as usize,
            "--max-pending-viewers" => {
                parsed.max_pending_viewers = number(&value)?.clamp(1, 10_000) as usize;
            }
            "--connect-timeout" => {
                parsed.connect_timeout = Duration::from_secs(number(&value)?.clamp(1, 300));
            }
            "--bitrate" => parsed.bitrate = number(&value)?.clamp(50_000, 50_000_000) as u32,
            "--record" => parsed.record = Some(value.into()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    Ok(parsed)
}

/// A JSON value from a file path or, when it starts with `{`, the text itself.
pub(crate) fn json_arg(value: &str) -> Result<Value, String> {
    let text = if value.trim_start().starts_with('{') {
        value.to_owned()
    } else {
        std::fs::read_to_string(value).map_err(|e| format!("cannot read {value}: {e}"))?
    };
    serde_json::from_str(&text).map_err(|e| format!("{value}: {e}"))
}

pub(crate) fn engine_settings(arg: Option<&str>) -> Result<EngineSettings, String> {
    match arg {
        Some(v) => EngineSettings::from_json(&json_arg(v)?.to_string()).map_err(|e| e.to_string()),
        None => Ok(EngineSettings::default()),
    }
}

/// The settings the server's engines run with: `--settings`, model paths off (API clients name
/// the models), the `--allow-model` ids added to `allowed_models`. Asking for model paths is an
/// error rather than silently overridden.
fn served_settings(arg: Option<&str>, allow_models: &[String]) -> Result<EngineSettings, String> {
    if let Some(v) = arg
        && json_arg(v)?.get("allow_model_paths") == Some(&Value::Bool(true))
    {
        return Err(
            "--settings: allow_model_paths cannot be true in the server (API clients \
                    would name folders on its disk); put models under model_root and list \
                    their ids with --allow-model"
                .into(),
        );
    }
    let mut settings = engine_settings(arg)?;
    settings.allow_model_paths = false;
    for id in allow_models {
        if !settings.is_allowed_model(id) {
            settings.allowed_models.push(id.clone());
        }
    }
    // The added ids are checked like the rest (hub ids only).
    settings
        .validate()
        .map_err(|e| format!("--allow-model: {e}"))?;
    Ok(settings)
}

/// The `--params` defaults must be valid under the served settings: a default that names a
/// model the server does not serve would fail every create.
fn check_default_params(defaults: &Value, settings: &EngineSettings) -> Result<(), String> {
    if !defaults.is_object() {
        return Err("--params must hold a JSON object".into());
    }
    StreamDiffusionParams::from_json_with(&defaults.to_string(), settings)
        .map(|_| ())
        .map_err(|e| format!("--params: {e}"))
}

/// Seconds since the epoch as RFC 3339 UTC (`2025-01-31T12:00:00Z`).
fn rfc3339(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
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
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Constant-time comparison of tokens (no early exit on the first differing byte).
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Writes inputs, outputs and params of one stream for `replay`.
struct Recorder {
    dir: PathBuf,
    outputs: Mutex<std::fs::File>,
}

impl Recorder {
    fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let outputs = std::fs::File::create(dir.join("outputs.jsonl"))?;
        Ok(Self {
            dir,
            outputs: Mutex::new(outputs),
        })
    }

    fn params(&self, version: u64, params: &StreamDiffusionParams) {
        let _ = std::fs::write(
            self.dir.join(format!("params-v{version}.json")),
            params.to_json(),
        );
    }
}

pub(crate) fn write_ppm(
    path: &Path,
    width: usize,
    height: usize,
    rgb: &[u8],
) -> std::io::Result<()> {
    let mut data = format!("P6\n{width} {height}\n255\n").into_bytes();
    data.extend_from_slice(rgb);
    std::fs::write(path, data)
}

impl FrameObserver for Recorder {
    fn on_input(&self, id: FrameId, width: usize, height: usize, rgb: &[u8]) {
        let _ = write_ppm(
            &self.dir.join(format!("in-{id:06}.ppm")),
            width,
            height,
            rgb,
        );
    }

    fn on_output(&self, output: &Output) {
        let image = &output.image;
        let rgb = match image.as_frame() {
            Ok(frame) => frame.to_rgb8(),
            Err(_) => return,
        };
        let _ = write_ppm(
            &self.dir.join(format!("out-{:06}.ppm", output.id)),
            image.width,
            image.height,
            &rgb,
        );
        let line = json!({
            "id": output.id,
            "params_version": output.params_version,
            "pipeline_ms": output.timings.total.as_secs_f64() * 1e3,
            "latency_ms": output.latency.as_secs_f64() * 1e3,
        });
        if let Ok(mut file) = self.outputs.lock() {
            let _ = writeln!(file, "{line}");
        }
    }
}

struct StreamEntry {
    id: String,
    key: String,
    name: String,
    pipeline: String,
    created_at: String,
    updated_at: Mutex<String>,
    engine: Arc<Engine>,
    transport: Arc<WebRtcStream>,
    recorder: Option<Arc<Recorder>>,
}

struct App {
    token: String,
    public_url: String,
    default_params: Value,
    settings: EngineSettings,
    transport: TransportConfig,
    record: Option<PathBuf>,
    streams: RwLock<HashMap<String, Arc<StreamEntry>>>,
}

impl App {
    fn stream(&self, id: &str) -> Option<Arc<StreamEntry>> {
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn describe(&self, s: &StreamEntry) -> Value {
        let whip_url = format!("{}/whip/{}?token={}", self.public_url, s.id, s.key);
        let whep_url = format!("{}/whep/{}?token={}", self.public_url, s.id, s.key);
        let params: Value =
            serde_json::from_str(&s.engine.params().to_json()).unwrap_or(Value::Null);
        let updated_at = s.updated_at.lock().map(|t| t.clone()).unwrap_or_default();
        json!({
            "id": s.id,
            "object": "stream",
            "name": s.name,
            "pipeline": s.pipeline,
            "params": params,
            "stream_key": s.key,
            "whip_url": whip_url,
            "whep_url": whep_url,
            "output_stream_url": whep_url,
            "output_playback_id": s.id,
            "created_at": s.created_at,
            "updated_at": updated_at,
            "transport": s.transport.stats(),
        })
    }
}

/// WHIP/WHEP lookups: the stream's own key opens its URLs.
struct Directory(Arc<App>);

impl StreamDirectory for Directory {
    fn find(&self, id: &str, token: Option<&str>) -> Result<Arc<WebRtcStream>, TransportError> {
        let stream = self
            .0
            .stream(id)
            .ok_or_else(|| TransportError::NotFound(format!("stream {id:?}")))?;
        match token {
            Some(t) if same_token(t, &stream.key) => Ok(stream.transport.clone()),
            _ => Err(TransportError::Unauthorized),
        }
    }
}

/// An API error: status and a JSON body `{"success": false, "error": message}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.0,
            axum::Json(json!({"success": false, "error": self.1})),
        )
            .into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("stream {id:?} not found"))
}

fn invalid(e: sdstream::Error) -> ApiError {
    match e {
        sdstream::Error::Json(m) => ApiError(StatusCode::BAD_REQUEST, format!("invalid JSON: {m}")),
        other => ApiError(StatusCode::UNPROCESSABLE_ENTITY, other.to_string()),
    }
}

/// The JSON body: 415 unless `application/json`; then the transport's body rules (413 over the
/// limit, 400 cut short, 408 too slow); 400 when not JSON.
async fn json_body(request: Request) -> Result<Value, ApiError> {
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
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("send JSON as application/json, not {content_type:?}"),
        ));
    }
    let body = sdstream::webrtc::read_body(request, MAX_JSON_BYTES, BODY_TIMEOUT)
        .await
        .map_err(|e| {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            ApiError(status, e.to_string())
        })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))
}

/// `params` of a create/update body (an object), or `{}` when absent.
fn params_of(body: &Value) -> Result<Value, ApiError> {
    let Value::Object(map) = body else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object".into(),
        ));
    };
    match map.get("params") {
        None | Some(Value::Null) => Ok(json!({})),
        Some(p @ Value::Object(_)) => Ok(p.clone()),
        Some(_) => Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid parameter `params`: must be an object".into(),
        )),
    }
}

async fn create_stream(
    State(app): State<Arc<App>>,
    request: Request,
) -> Result<Response, ApiError> {
    let body = json_body(request).await?;
    let mut params = app.default_params.clone();
    merge_patch(&mut params, &params_of(&body)?);
    let pipeline = body
        .get("pipeline")
        .or_else(|| body.get("pipeline_id"))
        .and_then(Value::as_str)
        .unwrap_or("streamdiffusion")
        .to_owned();
    let params = StreamDiffusionParams::from_json_with(&params.to_string(), &app.settings)
        .map_err(invalid)?;
    let options = EngineOptions {
        drop_policy: DropPolicy::Latest,
        ..EngineOptions::default()
    };
    let engine =
        Arc::new(Engine::spawn(params.clone(), app.settings.clone(), options).map_err(invalid)?);
    let id = format!("str_{}", &random_hex()[..16]);
    let recorder = match &app.record {
        Some(dir) => match Recorder::new(dir.join(&id)) {
            Ok(r) => Some(Arc::new(r)),
            Err(e) => {
                return Err(ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot record under {}: {e}", dir.display()),
                ));
            }
        },
        None => None,
    };
    if let Some(r) = &recorder {
        r.params(engine.status().params_version, &params);
    }
    let observer = recorder.clone().map(|r| r as Arc<dyn FrameObserver>);
    let transport = WebRtcStream::with_observer(engine.clone(), app.transport.clone(), observer)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let now = rfc3339(SystemTime::now());
    let entry = Arc::new(StreamEntry {
        id: id.clone(),
        key: random_hex(),
        name: body
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(&id)
            .to_owned(),
        pipeline,
        created_at: now.clone(),
        updated_at: Mutex::new(now),
        engine,
        transport: Arc::new(transport),
        recorder,
    });
    app.streams
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, entry.clone());
    Ok((StatusCode::CREATED, axum::Json(app.describe(&entry))).into_response())
}

async fn get_stream(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let s = app.stream(&id).ok_or_else(|| not_found(&id))?;
    Ok(axum::Json(app.describe(&s)))
}

async fn get_status(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let s = app.stream(&id).ok_or_else(|| not_found(&id))?;
    let mut status: Value = serde_json::from_str(&s.engine.status_json())
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Value::Object(map) = &mut status {
        map.insert("stream_id".into(), json!(s.id));
        map.insert("transport".into(), json!(s.transport.stats()));
    }
    Ok(axum::Json(status))
}

async fn patch_stream(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<String>,
    request: Request,
) -> Result<axum::Json<Value>, ApiError> {
    let s = app.stream(&id).ok_or_else(|| not_found(&id))?;
    let body = json_body(request).await?;
    let patch = params_of(&body)?;
    let params = s
        .engine
        .params()
        .patched(&patch, &app.settings)
        .map_err(invalid)?;
    let update = s.engine.update_params(params.clone()).map_err(invalid)?;
    let version = s.engine.status().params_version;
    if let Some(r) = &s.recorder {
        r.params(version, &params);
    }
    if let Ok(mut t) = s.updated_at.lock() {
        *t = rfc3339(SystemTime::now());
    }
    let mut answer = app.describe(&s);
    if let Value::Object(map) = &mut answer {
        map.insert("update".into(), json!(update.kind().as_str()));
        map.insert("params_version".into(), json!(version));
        if let Update::Reload { fields } = &update {
            map.insert("reload_fields".into(), json!(fields));
        }
    }
    Ok(axum::Json(answer))
}

async fn remove_stream(app: &App, id: &str) -> Result<axum::Json<Value>, ApiError> {
    let s = app
        .streams
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(id)
        .ok_or_else(|| not_found(id))?;
    s.transport.close().await;
    let engine = s.engine.clone();
    // Closing joins the engine's threads (and waits for a build in progress).
    let _ = tokio::task::spawn_blocking(move || engine.close()).await;
    Ok(axum::Json(json!({"success": true, "id": id})))
}

async fn delete_stream_query(
    State(app): State<Arc<App>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<axum::Json<Value>, ApiError> {
    let id = query
        .get("id")
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "missing ?id=".into()))?;
    remove_stream(&app, id).await
}

async fn delete_stream_path(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<Value>, ApiError> {
    remove_stream(&app, &id).await
}

/// Bearer-token check for the `/v1` API.
async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(token) if same_token(token, &app.token) => next.run(request).await,
        _ => ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response(),
    }
}

/// CORS for browser clients: preflights are answered here (before auth), every response gets
/// the allow/expose headers.
async fn cors(request: Request, next: Next) -> Response {
    let preflight = request.method() == Method::OPTIONS;
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location, ETag"),
    );
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PATCH, DELETE, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    response
}

async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

async fn fallback() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"success": false, "error": "no such route"})),
    )
        .into_response()
}

fn app_router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route(
            "/v1/streams",
            axum::routing::post(create_stream).delete(delete_stream_query),
        )
        .route(
            "/v1/streams/{id}",
            get(get_stream)
                .patch(patch_stream)
                .delete(delete_stream_path),
        )
        .route("/v1/streams/{id}/status", get(get_status))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token))
        .with_state(app.clone());
    let media = sdstream::webrtc::router(Arc::new(Directory(app.clone())), MAX_SDP_BYTES);
    Router::new()
        .route("/", get(index))
        .merge(api)
        .merge(media)
        .fallback(fallback)
        // The handlers read bodies themselves with their own limits.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(cors))
}

async fn serve(args: Args) -> Result<(), String> {
    let token = match std::env::var("SDSTREAM_API_TOKEN") {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        _ => {
            let t = random_hex();
            eprintln!("SDSTREAM_API_TOKEN is not set; this run's API token: {t}");
            t
        }
    };
    let settings = served_settings(args.settings.as_deref(), &args.allow_models)?;
    let default_params = match &args.params {
        Some(p) => json_arg(&p.display().to_string())?,
        None => json!({}),
    };
    check_default_params(&default_params, &settings)?;
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.bind))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let ice_udp = args.ice_udp.clone().unwrap_or_else(|| {
        if local.ip().is_loopback() {
            format!("{}:0", local.ip())
        } else {
            "0.0.0.0:0".into()
        }
    });
    let transport = TransportConfig {
        udp_addrs: vec![ice_udp],
        max_viewers: args.max_viewers,
        max_pending_viewers: args.max_pending_viewers,
        connect_timeout: args.connect_timeout,
        encoder: EncoderSettings {
            bitrate_bps: args.bitrate,
            ..EncoderSettings::default()
        },
        max_sdp_bytes: MAX_SDP_BYTES,
        ..TransportConfig::default()
    };
    let public_url = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));
    let app = Arc::new(App {
        token,
        public_url: public_url.clone(),
        default_params,
        settings,
        transport,
        record: args.record.clone(),
        streams: RwLock::new(HashMap::new()),
    });
    println!("listening on {public_url}");
    let _ = std::io::stdout().flush();
    // Runs until the process is stopped: recordings are written frame by frame, so nothing is
    // lost by a kill.
    axum::serve(listener, app_router(app))
        .await
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some("replay") {
        replay::run(&args[1..])
    } else {
        parse_args(&args).and_then(|args| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .worker_threads(4)
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))?;
            runtime.block_on(serve(args))
        })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
