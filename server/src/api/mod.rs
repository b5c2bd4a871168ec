//! A server that speaks Daydream's HTTP API over sdstream engines, with WHIP ingest and WHEP
//! playback, so that a Daydream client works against your own machine by changing its base URL
//! (the `sdstream` binary runs it: `sdstream serve --help`).
//!
//! API (every `/v1` and `/beta` call needs `Authorization: Bearer <token>`):
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/streams` `{pipeline, params, name?, output_rtmp_url?}` or the older `{pipeline_id, pipeline_params, name?}` | 201, the stream |
//! | `GET /v1/streams[?user_id=]` | `{success, data: [stream, …]}` |
//! | `GET /v1/streams/{id}` | the stream |
//! | `PATCH /v1/streams/{id}` `{pipeline?, params}` | the stream; `params` merged into the current ones |
//! | `DELETE /v1/streams/{id}`, `DELETE /v1/streams?id=` | `{success: true, data: {}}` |
//! | `GET /v1/streams/{id}/status` | `{success, error, data: {state, input_status, inference_status, gateway_status, …}}` |
//! | `POST /beta/streams/{id}/prompts` `{pipeline, model_id, params}` | `{success, message, was_censored, warnings}` |
//! | `POST {whip_url}`, `POST {whep_url}` (`application/sdp`) | WHIP / WHEP (RFC 9725), the stream's own key as token |
//! | `GET {hls_url}` (`/hls/{id}/index.m3u8?token=`), its segments | HLS: a live playlist of MPEG-TS segments |
//! | `rtmp://host:1935/live/{stream_key}` | RTMP ingest (a separate TCP listener, [`Server::start_rtmp`]) |
//! | `POST /api/v1/webrtc/offer`, `PATCH`/`DELETE /api/v1/webrtc/offer/{id}`, `GET /api/v1/webrtc/ice-servers`, `POST /api/v1/pipeline/load`, `GET /api/v1/pipeline/status`, `GET /health` | Daydream Scope's session API (module `scope`; docs/STREAMING.md) |
//! | `GET /metrics` | Prometheus' text format: each stream's state, fps, frame counters, stage times and latency histogram; memory and the model pool (module `metrics`) |
//! | `GET /healthz`, `GET /readyz` | liveness, readiness (no token) |
//! | `GET /` | a camera → WHIP, WHEP → `<video>` page |
//! | `GET /openapi.json` | the OpenAPI 3.1 document of every route here (`openapi.json`, written by hand; no token) |
//!
//! The stream object carries every field Daydream's SDK requires (`id`, `stream_key`,
//! `created_at`, `output_playback_id`, `name`, `author`, `from_playground`, `gateway_host`,
//! `is_smoke_test`, `whip_url`, `pipeline`, `params`) and `output_stream_url`, plus the older
//! form's `pipeline_id` and `pipeline_params`, and sdstream's `whep_url`, `hls_url`, `rtmp_url`,
//! `rtmp_publish_url` and `output_rtmp_url`. A PATCH answer also
//! says what the change cost (`update`: `unchanged`, `hot`, `controlnet_swap` or `reload`) and
//! the new `params_version`.
//!
//! Every error, on every route, is Daydream's envelope `{success: false, error, code, status}`
//! ([`crate::webrtc::error_response`]): 400 for a body that is not JSON or is cut short, 401 for
//! a missing or wrong token, 404 for an unknown stream or route, 405 for a method a route does
//! not take, 408 for a body too slow, 409 for a second publisher, 413 for a body over the limit,
//! 415 for a wrong content type, 422 for parameters the engine refuses (naming the field; a
//! preprocessor or feature it cannot run is refused here, at creation), 429 when the server
//! already runs `max_streams` streams, 503 for a viewer with no room, while shutting down, or for
//! a connection beyond the connection cap. Connections themselves are bounded (a request head's
//! time, a kept-alive connection's idleness, a stalled answer, how many at once: [`HttpConfig`]).
//!
//! Parameters go over the server's defaults (`--params`) and are validated with the server's
//! [`EngineSettings`]: model paths off, only the known models and `--allow-model` ids served.
//! The rules themselves (merging a partial body: [`sdstream::params::merge_patch`] /
//! [`sdstream::StreamDiffusionParams::patched`]; what a change costs: [`sdstream::UpdateKind`]; ids and
//! keys: [`sdstream::ids::random_hex`]) live in the library; this module only translates.
//!
//! Liveness: a stream whose publisher has gone (its session ended, or its connection failed,
//! closed or lost contact) reports `DEGRADED_INPUT` at once, as does one that got no frame for
//! `input_timeout`; a stream with no publisher connected and no media for `idle_timeout` (from
//! its creation, or from the publisher's last sign of life) is deleted.
//!
//! Logs go through `tracing` (requests, streams, sessions); the binary's subscriber reads its
//! filter from `SDSTREAM_LOG` or `RUST_LOG` (default `sdstream=info,warn`; `sdstream::log`).

#[cfg(test)]
mod admission_tests;
mod args;
mod bodies;
mod cli;
mod connections;
#[cfg(test)]
mod limits_tests;
mod metrics;
#[cfg(test)]
mod openapi_tests;
mod playback;
mod record;
mod replay;
mod routes;
mod run;
mod scope;
mod state;
#[cfg(test)]
mod tests;
mod views;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::hls::HlsConfig;
use crate::rtmp::RtmpConfig;
use crate::webrtc::TransportConfig;
use sdstream::EngineSettings;

pub use cli::main;
pub use connections::HttpConfig;
pub use routes::router;
pub use state::App;

/// Largest JSON body of the API.
pub const MAX_JSON_BYTES: usize = 256 * 1024;
/// Largest SDP offer.
pub const MAX_SDP_BYTES: usize = 64 * 1024;

/// What a [`Server`] serves and how.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The API's bearer token.
    pub token: String,
    /// The URL clients reach this server at (no trailing `/`): the base of `whip_url` and the
    /// WHEP URL, and `gateway_host`.
    pub public_url: String,
    /// This server's name among several (`[a-z0-9-]`, at most 63): stream ids start with
    /// `str_<instance>_`, so that a proxy can route a stream's requests to the server that owns
    /// it (docs/DEPLOY.md). `None`: ids are `str_<hex>`.
    pub instance: Option<String>,
    /// The parameters a create body goes over (a JSON object).
    pub default_params: Value,
    /// The engines' settings (model paths off).
    pub settings: EngineSettings,
    /// The WebRTC transport's configuration.
    pub transport: TransportConfig,
    /// How HTTP connections are bounded: header, idle and write timeouts, the connection cap.
    pub http: HttpConfig,
    /// Where to record every stream's inputs, outputs and params (for `sdstream replay`).
    pub record: Option<PathBuf>,
    /// Most streams at once; a create beyond is refused with 429.
    pub max_streams: usize,
    /// No frame for this long: `DEGRADED_INPUT`.
    pub input_timeout: Duration,
    /// No publisher and no media for this long: the stream is deleted (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// The RTMP ingest's settings (its listener is started with [`Server::start_rtmp`]).
    pub rtmp: RtmpConfig,
    /// The RTMP ingest URL clients publish to, without the stream key
    /// (`rtmp://host:1935/live`): streams report `rtmp_url` and `rtmp_publish_url` from it.
    /// `None`: no RTMP ingest.
    pub rtmp_url: Option<String>,
    /// How HLS output is cut and kept.
    pub hls: HlsConfig,
    /// Whether the Scope-style routes (`/api/v1/…`) need the API's bearer token, as the
    /// Daydream routes do. Daydream Scope's own server has no authentication; turn this off
    /// only where the port is not reachable by others.
    pub scope_requires_token: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            token: String::new(),
            public_url: "http://127.0.0.1:8088".into(),
            instance: None,
            default_params: Value::Object(Default::default()),
            settings: cli::served_settings(None, &[]).unwrap_or_default(),
            transport: TransportConfig::default(),
            http: HttpConfig::default(),
            record: None,
            max_streams: 8,
            input_timeout: Duration::from_secs(3),
            idle_timeout: Some(Duration::from_secs(120)),
            rtmp: RtmpConfig::default(),
            rtmp_url: None,
            hls: HlsConfig::default(),
            scope_requires_token: true,
        }
    }
}

/// The server: its streams and its HTTP routes.
#[derive(Clone)]
pub struct Server {
    app: Arc<App>,
}

impl Server {
    /// A server with no streams yet. Fails when the default parameters are not valid under
    /// the settings (a default that names a model the server does not serve would fail every
    /// create), or the instance name is not `[a-z0-9-]{1,63}`.
    pub fn new(config: ServerConfig) -> Result<Self, String> {
        cli::check_default_params(&config.default_params, &config.settings)?;
        if let Some(instance) = &config.instance
            && !cli::is_instance_name(instance)
        {
            return Err(format!(
                "instance {instance:?}: use 1 to 63 lowercase letters, digits and '-'"
            ));
        }
        Ok(Self {
            app: Arc::new(App::new(config)),
        })
    }

    /// The shared state (streams and configuration).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// The HTTP routes.
    pub fn router(&self) -> axum::Router {
        router(self.app.clone())
    }

    /// Starts taking RTMP publishes on `listener` (stopped by shutdown); the URL clients use
    /// is the configuration's `rtmp_url`.
    pub fn start_rtmp(
        &self,
        listener: tokio::net::TcpListener,
    ) -> std::sync::Arc<crate::rtmp::RtmpIngest> {
        self.app.start_rtmp(listener)
    }

    /// Serves on `listener` until `shutdown` completes, deleting idle streams meanwhile; then
    /// stops taking connections, lets the requests in flight finish (idle connections close at
    /// once), and closes every stream's sessions and engine. Connections are bounded as
    /// [`HttpConfig`] says (module `connections`).
    pub async fn run(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_reaper, mut reaper_stopped) = tokio::sync::watch::channel(false);
        let reaper = self.app.config().idle_timeout.map(|idle| {
            let app = self.app.clone();
            // Often enough that a stream outlives its timeout by at most a quarter of it.
            let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(tick);
                loop {
                    tokio::select! {
                        _ = interval.tick() => {}
                        _ = reaper_stopped.wait_for(|stop| *stop) => break,
                    }
                    // Not cancelled midway: a stream it has taken out is closed (and logged).
                    app.sweep(Instant::now()).await;
                }
            })
        });
        let app = self.app.clone();
        connections::serve(
            listener,
            self.router(),
            self.app.config().http.clone(),
            async move {
                shutdown.await;
                app.begin_shutdown();
                tracing::info!("shutting down: no new requests; closing the streams");
            },
        )
        .await;
        stop_reaper.send_replace(true);
        if let Some(reaper) = reaper {
            let _ = reaper.await;
        }
        self.app.close_all().await;
        Ok(())
    }
}
