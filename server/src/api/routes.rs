//! The HTTP routes: Daydream's stream API, the WHIP/WHEP resources, health, the page, the
//! OpenAPI document of them all (`openapi.json`, served at `GET /openapi.json`); and the layers
//! around them (bearer token, CORS, request log, error envelope).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::MAX_SDP_BYTES;
use super::bodies::{AUTHOR, ApiError, CreateBody, json_body, patch_params};
use super::state::{App, Directory, has_api_token};
use super::views::{status_json, stream_json};
use crate::webrtc::error_response;
use sdstream::Update;
use sdstream::params::Transition;

type Json = axum::Json<Value>;

async fn create_stream(
    State(app): State<Arc<App>>,
    request: Request,
) -> Result<Response, ApiError> {
    let body = CreateBody::parse(&json_body(request).await?)?;
    let entry = app.create(body)?;
    Ok((StatusCode::CREATED, axum::Json(stream_json(&app, &entry))).into_response())
}

async fn list_streams(
    State(app): State<Arc<App>>,
    Query(query): Query<HashMap<String, String>>,
) -> Json {
    // One tenant: a user_id other than the streams' author owns none of them.
    let data: Vec<Value> = match query.get("user_id") {
        Some(user) if user != AUTHOR => Vec::new(),
        _ => app.streams().iter().map(|s| stream_json(&app, s)).collect(),
    };
    axum::Json(json!({"success": true, "data": data}))
}

async fn get_stream(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json, ApiError> {
    let s = app.stream(&id).ok_or_else(|| ApiError::not_found(&id))?;
    Ok(axum::Json(stream_json(&app, &s)))
}

async fn get_status(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json, ApiError> {
    let s = app.stream(&id).ok_or_else(|| ApiError::not_found(&id))?;
    Ok(axum::Json(status_json(&app, &s)))
}

/// Merges `patch` into stream `id`'s parameters and applies them, a prompt or seed change
/// gliding as `transition` says: (the update, the new params version, the stream).
async fn apply_patch(
    app: &App,
    id: &str,
    patch: &Value,
    transition: Transition,
) -> Result<(Update, u64, Arc<super::state::StreamEntry>), ApiError> {
    let s = app.stream(id).ok_or_else(|| ApiError::not_found(id))?;
    let params = s
        .engine
        .params()
        .patched(patch, &app.config().settings)
        .map_err(ApiError::invalid)?;
    let update = s
        .engine
        .update_params_with_transition(params.clone(), transition)
        .map_err(ApiError::invalid)?;
    let version = s.engine.status().params_version;
    if let Some(r) = &s.recorder {
        r.params(version, &params);
    }
    s.touch();
    tracing::info!(stream = %id, update = update.kind().as_str(), version, "params updated");
    Ok((update, version, s))
}

async fn patch_stream(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Json, ApiError> {
    // An unknown id is 404 whatever the body.
    app.stream(&id).ok_or_else(|| ApiError::not_found(&id))?;
    let body = json_body(request).await?;
    let patch = patch_params(&body, false)?;
    // sdstream's own member beside `params`: how a prompt or seed change glides.
    let transition = match body.get("transition") {
        None | Some(Value::Null) => Transition::default(),
        Some(t) => Transition::from_json(&t.to_string()).map_err(ApiError::invalid)?,
    };
    let (update, version, s) = apply_patch(&app, &id, &patch, transition).await?;
    let mut answer = stream_json(&app, &s);
    if let Value::Object(map) = &mut answer {
        map.insert("update".into(), json!(update.kind().as_str()));
        map.insert("params_version".into(), json!(version));
        if let Update::Reload { fields } = &update {
            map.insert("reload_fields".into(), json!(fields));
        }
    }
    Ok(axum::Json(answer))
}

/// The legacy `POST /beta/streams/{id}/prompts`: the body's `params` applied like a PATCH.
async fn beta_prompts(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Json, ApiError> {
    app.stream(&id).ok_or_else(|| ApiError::not_found(&id))?;
    let patch = patch_params(&json_body(request).await?, true)?;
    let (update, version, _) = apply_patch(&app, &id, &patch, Transition::default()).await?;
    let kind = update.kind().as_str();
    Ok(axum::Json(json!({
        "success": true,
        "message": format!("parameters applied ({kind})"),
        "was_censored": false,
        "warnings": [],
        "update": kind,
        "params_version": version,
    })))
}

fn deleted() -> Json {
    axum::Json(json!({"success": true, "data": {}}))
}

async fn delete_stream_query(
    State(app): State<Arc<App>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json, ApiError> {
    let id = query
        .get("id")
        .ok_or_else(|| ApiError::bad_request("missing query parameter `id`"))?;
    app.remove(id, "deleted by the client").await?;
    Ok(deleted())
}

async fn delete_stream_path(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json, ApiError> {
    app.remove(&id, "deleted by the client").await?;
    Ok(deleted())
}

/// Liveness: the process answers.
async fn healthz() -> Json {
    axum::Json(json!({"status": "ok"}))
}

/// Readiness: 200 while serving, 503 once shutdown has begun. A full server stays ready (its
/// streams' WHIP/WHEP requests must still reach it); creates beyond the limit get 429.
async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.is_shutting_down() {
        return ApiError::shutting_down().into_response();
    }
    axum::Json(json!({
        "status": "ready",
        "streams": app.stream_count(),
        "max_streams": app.config().max_streams,
        "rtmp": app.rtmp().map(|r| r.stats()),
    }))
    .into_response()
}

/// Bearer-token check for the API.
async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if has_api_token(&app, &request) {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// CORS for browser clients: preflights are answered here (before auth), every response gets
/// the allow/expose headers. Open (`*`): the bearer token, not the origin, guards the API.
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
            HeaderValue::from_static("Authorization, Content-Type, If-Match"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    response
}

/// Largest error body of a layer below the handlers (axum's rejections) turned into a message.
const MAX_REJECTION_BYTES: usize = 4096;

/// Every error answer leaves as the JSON envelope: the handlers' already are; what axum answers
/// by itself (405 for a method a route does not take, a rejected path or query) is wrapped here,
/// its text as the message and its headers (`Allow`) kept.
async fn envelope_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_REJECTION_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "ROUTE/METHOD_NOT_ALLOWED",
            format!(
                "method not allowed here; allowed: {}",
                parts
                    .headers
                    .get(header::ALLOW)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
            ),
        ),
        StatusCode::NOT_FOUND => ("ROUTE/NOT_FOUND", "no such route".to_owned()),
        _ if text.is_empty() => (
            "REQUEST/INVALID",
            status.canonical_reason().unwrap_or("error").to_owned(),
        ),
        _ => ("REQUEST/INVALID", text),
    };
    let mut wrapped = error_response(status.as_u16(), code, &message);
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            wrapped.headers_mut().insert(name.clone(), value.clone());
        }
    }
    wrapped
}

/// One log line per request: method, path (without the query, which may hold a stream's
/// key), status and time taken.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    if status >= 500 {
        tracing::warn!(%method, %path, status, ms, "request");
    } else {
        tracing::info!(%method, %path, status, ms, "request");
    }
    response
}

async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

/// The OpenAPI 3.1 document of every route here (hand-written; `GET /openapi.json`).
pub(crate) const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn no_route() -> Response {
    error_response(404, "ROUTE/NOT_FOUND", "no such route")
}

async fn method_not_allowed(request: Request) -> Response {
    error_response(
        405,
        "ROUTE/METHOD_NOT_ALLOWED",
        &format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// Every route of the server over `app`.
pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route(
            "/v1/streams",
            post(create_stream)
                .get(list_streams)
                .delete(delete_stream_query),
        )
        .route(
            "/v1/streams/{id}",
            get(get_stream)
                .patch(patch_stream)
                .delete(delete_stream_path),
        )
        .route("/v1/streams/{id}/status", get(get_status))
        .route("/metrics", get(super::metrics::get_metrics))
        .route("/beta/streams/{id}/prompts", post(beta_prompts))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token))
        .with_state(app.clone());
    let open = Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .with_state(app.clone());
    let scope = super::scope::routes(app.clone());
    let hls = super::playback::routes(app.clone());
    let media = crate::webrtc::router(Arc::new(Directory(app)), MAX_SDP_BYTES);
    Router::new()
        .merge(open)
        .merge(api)
        .merge(scope)
        .merge(hls)
        .merge(media)
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        // The handlers read bodies themselves with their own limits.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(envelope_errors))
        .layer(middleware::from_fn(cors))
        .layer(middleware::from_fn(log_request))
}
