//! The server's state: its streams, the limit on how many, and their lifecycle (create,
//! delete, the idle sweep, shutdown).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Instant, SystemTime};

use serde_json::{Value, json};
use tokio::sync::watch;

use super::ServerConfig;
use super::bodies::{ApiError, CreateBody, rfc3339};
use super::record::Recorder;
use crate::hls::HlsOutput;
use crate::rtmp::{RtmpDirectory, RtmpIngest, RtmpPush};
use crate::webrtc::{
    FrameObserver, Ingest, MediaHub, PublisherState, StreamDirectory, TransportError,
};
use sdstream::engine::EngineState;
use sdstream::ids::random_hex;
use sdstream::params::merge_patch;
use sdstream::pipeline::cross_stream::{self, MemberLabel};
use sdstream::status::epoch_ms_at;
use sdstream::{DropPolicy, Engine, EngineOptions, StreamDiffusionParams};

/// One stream: its engine, its transport and what Daydream's stream object says about it.
pub(crate) struct StreamEntry {
    pub(crate) id: String,
    pub(crate) key: String,
    pub(crate) name: String,
    pub(crate) pipeline: String,
    /// The older create form's `pipeline_id`, echoed back (`pipeline` otherwise).
    pub(crate) pipeline_id: String,
    pub(crate) created_at: String,
    /// Milliseconds since the epoch (the status's `start_time`).
    pub(crate) start_time: u64,
    pub(crate) created: Instant,
    pub(crate) updated_at: Mutex<String>,
    pub(crate) engine: Arc<Engine>,
    pub(crate) transport: Arc<MediaHub>,
    pub(crate) recorder: Option<Arc<Recorder>>,
    /// The HLS output (its segmenter runs while someone reads it).
    pub(crate) hls: Arc<HlsOutput>,
    /// The push of the output to the create body's `output_rtmp_url`, with that URL.
    pub(crate) push: Option<(String, RtmpPush)>,
    /// The transport's session id of the Scope-style session that owns this stream, if one
    /// does (`POST /api/v1/webrtc/offer`): the stream ends with it.
    pub(crate) duplex: Mutex<Option<String>>,
}

/// A stream's state: the engine's, except that a stream whose publisher has gone is
/// `DEGRADED_INPUT` at once (the engine would only see it after its input timeout). Loading,
/// error and closed engines say so whatever the publisher does.
pub(crate) fn stream_state(engine: EngineState, ingest: &Ingest) -> EngineState {
    match (engine, ingest.publisher) {
        (
            EngineState::Online | EngineState::DegradedInference | EngineState::DegradedInput,
            PublisherState::Gone,
        ) => EngineState::DegradedInput,
        (state, _) => state,
    }
}

/// Since when a stream created at `created` has been idle: no publisher connected or
/// connecting, counted from the latest of its creation, the publisher's going and its last
/// media. `None` while a publisher is connected or connecting.
pub(crate) fn idle_since(created: Instant, ingest: &Ingest) -> Option<Instant> {
    match ingest.publisher {
        PublisherState::Connected | PublisherState::Connecting => None,
        PublisherState::Never | PublisherState::Gone => [ingest.publisher_lost, ingest.last_media]
            .into_iter()
            .flatten()
            .chain([created])
            .max(),
    }
}

impl StreamEntry {
    pub(crate) fn touch(&self) {
        if let Ok(mut t) = self.updated_at.lock() {
            *t = rfc3339(SystemTime::now());
        }
    }
}

/// The server's streams and configuration.
pub struct App {
    config: ServerConfig,
    streams: RwLock<HashMap<String, Arc<StreamEntry>>>,
    /// Streams existing or being created: what the limit counts.
    live: AtomicUsize,
    /// Engines ever started (one per stream created).
    engines_started: AtomicUsize,
    shutting_down: AtomicBool,
    /// Turns true at shutdown: the RTMP listener stops.
    stop: watch::Sender<bool>,
    /// The RTMP ingest listener, once started.
    rtmp: OnceLock<Arc<RtmpIngest>>,
    /// When the server was made (Scope's `/health` reports it).
    pub(crate) started: SystemTime,
    /// The parameters of Scope's last pipeline load (`POST /api/v1/pipeline/load`), the
    /// defaults of later offers.
    pub(crate) scope_load_params: std::sync::Mutex<Option<serde_json::Value>>,
}

/// A place among `max_streams`, given back when dropped unless the stream was installed.
struct Place<'a> {
    live: &'a AtomicUsize,
    kept: bool,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.live.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl App {
    pub(crate) fn new(config: ServerConfig) -> Self {
        Self {
            config,
            streams: RwLock::new(HashMap::new()),
            live: AtomicUsize::new(0),
            engines_started: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            stop: watch::channel(false).0,
            rtmp: OnceLock::new(),
            started: SystemTime::now(),
            scope_load_params: Default::default(),
        }
    }

    /// The RTMP ingest listener, if one was started.
    pub fn rtmp(&self) -> Option<&Arc<RtmpIngest>> {
        self.rtmp.get()
    }

    /// Starts the RTMP ingest on `listener` (once; it stops at shutdown).
    pub(crate) fn start_rtmp(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
    ) -> Arc<RtmpIngest> {
        let ingest = self
            .rtmp
            .get_or_init(|| {
                RtmpIngest::new(
                    self.config.rtmp.clone(),
                    Arc::new(Directory(self.clone())) as Arc<dyn RtmpDirectory>,
                )
            })
            .clone();
        let stop = self.stop.subscribe();
        tokio::spawn(ingest.clone().serve(listener, stop));
        ingest
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Streams running now.
    pub fn stream_count(&self) -> usize {
        self.read().len()
    }

    /// Engines started since the server was made (one per stream created).
    pub fn engines_started(&self) -> usize {
        self.engines_started.load(Ordering::Acquire)
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.stop.send_replace(true);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<StreamEntry>>> {
        self.streams.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<StreamEntry>>> {
        self.streams.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn stream(&self, id: &str) -> Option<Arc<StreamEntry>> {
        self.read().get(id).cloned()
    }

    /// Stream `id` if `token` is its key: what opens its media URLs (WHIP, WHEP, HLS).
    pub(crate) fn stream_with_key(
        &self,
        id: &str,
        token: Option<&str>,
    ) -> Result<Arc<StreamEntry>, TransportError> {
        let stream = self
            .stream(id)
            .ok_or_else(|| TransportError::NotFound(format!("stream {id:?}")))?;
        match token {
            Some(t) if same_token(t, &stream.key) => Ok(stream),
            _ => Err(TransportError::Unauthorized),
        }
    }

    /// Every stream, oldest first.
    pub(crate) fn streams(&self) -> Vec<Arc<StreamEntry>> {
        let mut all: Vec<_> = self.read().values().cloned().collect();
        all.sort_by_key(|s| s.created);
        all
    }

    /// Takes a place among `max_streams`, or 429.
    fn take_place(&self) -> Result<Place<'_>, ApiError> {
        let max = self.config.max_streams;
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| Place {
                live: &self.live,
                kept: false,
            })
            .map_err(|_| ApiError::too_many_streams(max))
    }

    fn new_id(&self) -> String {
        let hex = &random_hex()[..16];
        match &self.config.instance {
            Some(instance) => format!("str_{instance}_{hex}"),
            None => format!("str_{hex}"),
        }
    }

    /// Creates a stream: parameters validated and checked against what the engine can run
    /// (422 naming the field), a place taken (429), the engine started (it loads in the
    /// background) and its transport.
    pub(crate) fn create(&self, body: CreateBody) -> Result<Arc<StreamEntry>, ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::shutting_down());
        }
        // The server's settings, with the stream's own frame budget when its body sets one
        // (held to the settings' rule for it).
        let settings = match body.frame_budget_ms {
            Some(ms) => {
                let mut settings = self.config.settings.clone();
                settings.frame_budget_ms = Some(ms);
                settings.validate().map_err(ApiError::invalid)?;
                settings
            }
            None => self.config.settings.clone(),
        };
        let mut params = self.config.default_params.clone();
        merge_patch(&mut params, &body.params);
        let params = StreamDiffusionParams::from_json_with(&params.to_string(), &settings)
            .map_err(ApiError::invalid)?;
        // Refused when the streams of its model and size would miss their budgets with it
        // (predicted from their measured batches; admitted while nothing is measured).
        let admission = cross_stream::admission(
            &MemberLabel {
                model_id: params.model_id.clone(),
                size: (params.width as usize, params.height as usize),
            },
            settings.frame_budget(),
        );
        if let Some(reason) = admission.refusal {
            tracing::info!(model = %params.model_id, %reason, "stream refused");
            return Err(ApiError::no_capacity(reason));
        }
        let mut place = self.take_place()?;
        let options = EngineOptions {
            drop_policy: DropPolicy::Latest,
            input_timeout_ms: self.config.input_timeout.as_millis().min(86_400_000) as u64,
            ..EngineOptions::default()
        };
        // Validation, the features the pipeline runs and the preprocessors are all checked
        // here, before anything loads.
        let engine = Arc::new(
            Engine::builder(params.clone())
                .settings(settings)
                .options(options)
                .spawn()
                .map_err(ApiError::invalid)?,
        );
        self.engines_started.fetch_add(1, Ordering::AcqRel);
        let id = self.new_id();
        let recorder = match &self.config.record {
            Some(dir) => match Recorder::new(dir.join(&id)) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    engine.close();
                    return Err(ApiError::internal(format!(
                        "cannot record under {}: {e}",
                        dir.display()
                    )));
                }
            },
            None => None,
        };
        if let Some(r) = &recorder {
            r.params(engine.status().params_version, &params);
        }
        let observer = recorder.clone().map(|r| r as Arc<dyn FrameObserver>);
        let transport = match MediaHub::with_observer(
            engine.clone(),
            self.config.transport.clone(),
            observer,
        ) {
            Ok(t) => t,
            Err(e) => {
                engine.close();
                return Err(ApiError::internal(e.to_string()));
            }
        };
        let transport = Arc::new(transport);
        let hls = HlsOutput::new(transport.clone(), self.config.hls.clone());
        let push = body.output_rtmp_url.map(|(text, url)| {
            tracing::info!(stream = %id, url = %url.redacted(), "RTMP push started");
            let policy = self.config.settings.outbound_policy();
            (text, RtmpPush::start(transport.clone(), url, policy))
        });
        let now = SystemTime::now();
        let entry = Arc::new(StreamEntry {
            id: id.clone(),
            key: random_hex(),
            name: body.name.unwrap_or_else(|| id.clone()),
            pipeline: body.pipeline,
            pipeline_id: body.pipeline_id,
            created_at: rfc3339(now),
            start_time: epoch_ms_at(now),
            created: Instant::now(),
            updated_at: Mutex::new(rfc3339(now)),
            engine,
            transport,
            recorder,
            hls,
            push,
            duplex: Mutex::new(None),
        });
        self.write().insert(id.clone(), entry.clone());
        place.kept = true;
        tracing::info!(stream = %id, model = %params.model_id, "stream created");
        Ok(entry)
    }

    /// Deletes stream `id`: its sessions end, its engine closes. `reason` goes to the log.
    pub(crate) async fn remove(&self, id: &str, reason: &str) -> Result<(), ApiError> {
        let entry = self
            .write()
            .remove(id)
            .ok_or_else(|| ApiError::not_found(id))?;
        Self::close(entry, reason).await;
        self.live.fetch_sub(1, Ordering::AcqRel);
        tracing::info!(stream = %id, reason, "stream deleted");
        Ok(())
    }

    /// Ends a stream: a Scope-style session is told why first (`stream_stopped`, with the
    /// engine's error when it failed), then every session ends and the engine closes.
    async fn close(entry: Arc<StreamEntry>, reason: &str) {
        let duplex = entry.duplex.lock().ok().and_then(|mut d| d.take());
        if let Some(session) = duplex {
            let status = entry.engine.status();
            let error = match status.state {
                sdstream::EngineState::Error => status.last_error.clone(),
                _ => None,
            };
            let mut notice = json!({"type": "stream_stopped", "reason": reason});
            if let Some(error) = error {
                notice["error_message"] = json!(error);
            }
            let _ = entry
                .transport
                .end_duplex(&session, Some(&notice.to_string()))
                .await;
        }
        if let Some((_, push)) = &entry.push {
            push.stop();
        }
        entry.transport.close().await;
        let engine = entry.engine.clone();
        // Closing joins the engine's threads (and waits for a build in progress).
        let _ = tokio::task::spawn_blocking(move || engine.close()).await;
    }

    /// Deletes the streams idle for longer than `idle_timeout` at `now`; returns their ids.
    pub(crate) async fn sweep(&self, now: Instant) -> Vec<String> {
        let Some(limit) = self.config.idle_timeout else {
            return Vec::new();
        };
        let idle: Vec<String> = self
            .streams()
            .into_iter()
            .filter(|s| {
                idle_since(s.created, &s.transport.ingest())
                    .is_some_and(|since| now.saturating_duration_since(since) > limit)
            })
            .map(|s| s.id.clone())
            .collect();
        for id in &idle {
            // Deleted meanwhile by a client: nothing to do.
            let _ = self.remove(id, "idle").await;
        }
        idle
    }

    /// Closes every stream (shutdown).
    pub(crate) async fn close_all(&self) {
        let all: Vec<(String, Arc<StreamEntry>)> = self.write().drain().collect();
        for (id, entry) in all {
            Self::close(entry, "the server is shutting down").await;
            self.live.fetch_sub(1, Ordering::AcqRel);
            tracing::info!(stream = %id, reason = "shutdown", "stream deleted");
        }
    }

    /// The stream's parameters as JSON.
    pub(crate) fn params_json(entry: &StreamEntry) -> Value {
        serde_json::from_str(&entry.engine.params().to_json()).unwrap_or(Value::Null)
    }
}

/// Constant-time comparison of tokens (no early exit on the first differing byte).
pub(crate) fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// WHIP/WHEP lookups: the stream's own key opens its URLs; RTMP publishes with it.
pub(crate) struct Directory(pub(crate) Arc<App>);

impl RtmpDirectory for Directory {
    fn stream_for_key(&self, stream_key: &str) -> Option<(String, Arc<MediaHub>)> {
        // Every key is compared (in constant time), so the time taken tells nothing.
        let mut found = None;
        for stream in self.0.streams() {
            if same_token(stream_key, &stream.key) {
                found = Some((stream.id.clone(), stream.transport.clone()));
            }
        }
        found
    }
}

impl StreamDirectory for Directory {
    fn find(&self, id: &str, token: Option<&str>) -> Result<Arc<MediaHub>, TransportError> {
        Ok(self.0.stream_with_key(id, token)?.transport.clone())
    }
}

/// Whether `request` carries the API's bearer token: the one check of every route that needs it.
pub(crate) fn has_api_token(app: &App, request: &axum::extract::Request) -> bool {
    request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .is_some_and(|(_, token)| same_token(token.trim(), &app.config().token))
}
