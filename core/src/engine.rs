//! `Engine`: the StreamDiffusion pipeline on its own threads, with a non-blocking surface for
//! hosts that must never wait on the UNet (a TouchDesigner cook, a WebRTC packet loop).
//!
//! Threads. A *worker* owns the serving pipeline and runs frames in submission order. A
//! *builder* builds pipelines: the first one, reloads, restarts; it also frees retired ones, so
//! dropping gigabytes of weights never stalls the stream. Hosts talk to both through one mutex
//! that is only held for bookkeeping, never during inference or loading.
//!
//! Parameters. [`Engine::update_params`] validates and classifies at once, on the caller's
//! thread, and returns. Hot changes are applied by the worker between two frames (never during
//! one). A reload is built by the builder while the current pipeline keeps serving, warmed up
//! with the latest frame, and swapped in between two frames. A newer update supersedes a build
//! in progress (the stale result is discarded when it finishes; builds are not interrupted). A
//! failed build keeps the previous pipeline and records the error.
//!
//! Frames. [`Engine::submit`] copies the frame into the bounded input queue and returns its id.
//! When the queue is full, [`DropPolicy::Latest`] drops the oldest waiting frame (live video)
//! and [`DropPolicy::Lossless`] refuses with [`Error::QueueFull`] ([`Engine::submit_timeout`]
//! waits for room instead). Outputs come back in submission order from [`Engine::poll`] or
//! [`Engine::recv_timeout`], each with the id and timestamp of its input.
//!
//! Failure. A panic inside the pipeline is caught: the pipeline is discarded, the engine goes
//! to [`EngineState::Error`] with `last_error` set, and [`Engine::restart`] (or any
//! [`Engine::update_params`]) builds a new one. No call of this API panics.

mod pipeline;
mod status;

use std::any::Any;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::frame::{Frame, Image, PixelFormat};
use crate::params::{EngineSettings, HotChange, StreamDiffusionParams, Update, classify};
use crate::pipeline::stream_diffusion::{StageTimings, check_control_ids, check_supported};
use crate::{Error, Result};

use pipeline::{Pipeline, PipelineFactory, StreamDiffusionFactory, warmup_passes};
pub use status::{EngineState, EngineStatus, StageMillis};
use status::{RateMeter, epoch_ms, epoch_us, params_hash};

/// Identifies a submitted frame; ids increase by one per accepted frame, from 0.
pub type FrameId = u64;

/// What `submit` does when the input queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DropPolicy {
    /// Drop the oldest waiting frame to make room (live video: show the freshest frames). Full
    /// output queues drop their oldest output too.
    #[default]
    Latest,
    /// Never drop: `submit` fails with [`Error::QueueFull`] (or `submit_timeout` waits), and
    /// the worker pauses while the output queue is full (offline rendering).
    Lossless,
}

/// How an [`Engine`] queues and primes. JSON keys as the field names; unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineOptions {
    /// Most frames waiting for the worker (the one being processed not counted), ≥ 1.
    /// Default 2: live video wants the freshest frame, not a backlog.
    pub queue_capacity: usize,
    /// Most outputs waiting to be collected, ≥ 1. Default 8.
    pub output_capacity: usize,
    /// Full-queue behaviour. Default `"latest"`.
    pub drop_policy: DropPolicy,
    /// Prime every new stream batch with its first frame (n − 1 extra passes, or a pass with
    /// the latest frame while a reload builds), so no output comes from the zero buffer.
    /// Default true.
    pub warmup: bool,
    /// After this long without a submitted frame the state is `DEGRADED_INPUT`. Default 2000.
    pub input_timeout_ms: u64,
    /// Window of the fps meters, ≥ 1. Default 2000.
    pub fps_window_ms: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 2,
            output_capacity: 8,
            drop_policy: DropPolicy::Latest,
            warmup: true,
            input_timeout_ms: 2000,
            fps_window_ms: 2000,
        }
    }
}

impl EngineOptions {
    /// Parses and validates options from JSON; omitted keys take their defaults.
    pub fn from_json(text: &str) -> Result<Self> {
        let options: Self =
            serde_json::from_str(text).map_err(|e| Error::Json(format!("engine options: {e}")))?;
        options.validate()?;
        Ok(options)
    }

    /// The options as JSON (every key).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("queue_capacity", self.queue_capacity as u64),
            ("output_capacity", self.output_capacity as u64),
            ("fps_window_ms", self.fps_window_ms),
        ] {
            if value < 1 {
                return Err(Error::param(
                    field,
                    format!("{field} must be at least 1; got 0"),
                ));
            }
        }
        Ok(())
    }

    fn fps_window(&self) -> Duration {
        Duration::from_millis(self.fps_window_ms)
    }

    fn input_timeout(&self) -> Duration {
        Duration::from_millis(self.input_timeout_ms)
    }
}

/// A processed frame.
#[derive(Debug, Clone)]
pub struct Output {
    /// Id of the input frame it came from.
    pub id: FrameId,
    /// The input's timestamp: the host's value from
    /// [`submit_with_timestamp`](Engine::submit_with_timestamp), else the submission time in
    /// microseconds since the Unix epoch.
    pub timestamp: i64,
    /// The picture, in the input's pixel format at the stream's width × height.
    pub image: Image,
    /// Stage timings of this frame's pipeline call (warm-up passes not included).
    pub timings: StageTimings,
    /// Version of the parameters it was made with (see [`EngineStatus::params_version`]).
    pub params_version: u64,
    /// From `submit` to the output being ready (queueing, warm-up and processing).
    pub latency: Duration,
}

/// A picture copied out of the host's memory (rows packed).
#[derive(Debug)]
struct PackedFrame {
    width: usize,
    height: usize,
    format: PixelFormat,
    data: Vec<u8>,
}

impl PackedFrame {
    fn copy(frame: &Frame) -> Result<Self> {
        Ok(Self {
            width: frame.width(),
            height: frame.height(),
            format: frame.format(),
            data: copy_packed(frame)?,
        })
    }

    fn frame(&self) -> Result<Frame<'_>> {
        Frame::packed(&self.data, self.width, self.height, self.format)
    }
}

/// A submitted frame and its control images (by ControlNet model_id).
#[derive(Debug)]
struct Job {
    id: FrameId,
    timestamp: i64,
    input: PackedFrame,
    controls: Vec<(String, PackedFrame)>,
    submitted: Instant,
}

impl Job {
    /// Runs `pipeline` on this job's frame and control images.
    fn process(&self, pipeline: &mut dyn Pipeline) -> Result<Image> {
        let frame = self.input.frame()?;
        let controls = self
            .controls
            .iter()
            .map(|(id, c)| Ok((id.as_str(), c.frame()?)))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<(&str, &Frame)> = controls.iter().map(|(id, f)| (*id, f)).collect();
        pipeline.process(&frame, &refs)
    }
}

/// Work wanted from the builder for parameters of a given version.
#[derive(Debug, Clone)]
struct BuildTicket {
    version: u64,
    params: StreamDiffusionParams,
    kind: BuildKind,
}

/// What a [`BuildTicket`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BuildKind {
    /// A new pipeline (a reload), swapped in whole.
    Pipeline,
    /// Only the ControlNets the parameters add, loaded into the shared cache; the serving
    /// pipeline then takes the parameters in place between two frames (a ControlNet swap).
    ControlNets,
}

/// A built pipeline waiting to be swapped in.
struct Ready {
    version: u64,
    pipeline: Box<dyn Pipeline>,
    warmed: bool,
}

/// Everything hosts, worker and builder share; guarded by one mutex.
struct Inner {
    closed: bool,
    /// The worker thread itself panicked (outside the pipeline); nothing will run any more.
    worker_dead: bool,

    queue: VecDeque<Job>,
    next_id: FrameId,
    in_flight: Option<FrameId>,
    outputs: VecDeque<Output>,

    /// The last accepted parameters, their version, JSON, hash and time.
    target: StreamDiffusionParams,
    target_version: u64,
    target_json: serde_json::Value,
    target_hash: String,
    target_time: Option<u64>,
    /// Versions only grow, so a stale build can never be taken for a new one.
    next_version: u64,
    /// Parameters and version of the serving pipeline.
    serving: Option<(StreamDiffusionParams, u64)>,
    ever_served: bool,

    /// The build wanted (picked up or not), kept until its pipeline is swapped in.
    pending_build: Option<BuildTicket>,
    /// The build the builder has not picked up yet.
    build_request: Option<BuildTicket>,
    /// A finished build for the worker to swap in.
    ready: Option<Ready>,
    /// Pipelines for the builder to drop.
    retired: Vec<Box<dyn Pipeline>>,
    /// Counts finished ControlNet preloads, so the worker looks at the target again.
    preloads_done: u64,
    /// The last processed frame, to warm reloads up with.
    last_frame: Option<Arc<Job>>,
    /// Why the first pipeline could not be built, for `wait_ready`.
    initial_error: Option<Error>,
    progress: Option<String>,

    frames_submitted: u64,
    frames_processed: u64,
    frames_failed: u64,
    frames_dropped: u64,
    outputs_dropped: u64,
    error_count: u64,
    reload_failures: u64,
    builds_superseded: u64,
    input_meter: RateMeter,
    output_meter: RateMeter,
    last_input: Option<Instant>,
    last_input_time: Option<u64>,
    last_output_time: Option<u64>,
    last_failure: Option<Instant>,
    last_overflow: Option<Instant>,
    last_error: Option<String>,
    last_error_time: Option<u64>,
    restart_count: u64,
    last_restart_time: Option<u64>,
    timings: StageTimings,
}

impl Inner {
    fn new(params: StreamDiffusionParams, options: &EngineOptions) -> Self {
        let json = params_json(&params);
        Self {
            closed: false,
            worker_dead: false,
            queue: VecDeque::with_capacity(options.queue_capacity),
            next_id: 0,
            in_flight: None,
            outputs: VecDeque::with_capacity(options.output_capacity),
            target_hash: params_hash(&params.to_json()),
            target_json: json,
            target: params,
            target_version: 0,
            target_time: None,
            next_version: 1,
            serving: None,
            ever_served: false,
            pending_build: None,
            build_request: None,
            ready: None,
            retired: Vec::new(),
            preloads_done: 0,
            last_frame: None,
            initial_error: None,
            progress: None,
            frames_submitted: 0,
            frames_processed: 0,
            frames_failed: 0,
            frames_dropped: 0,
            outputs_dropped: 0,
            error_count: 0,
            reload_failures: 0,
            builds_superseded: 0,
            input_meter: RateMeter::new(options.fps_window()),
            output_meter: RateMeter::new(options.fps_window()),
            last_input: None,
            last_input_time: None,
            last_output_time: None,
            last_failure: None,
            last_overflow: None,
            last_error: None,
            last_error_time: None,
            restart_count: 0,
            last_restart_time: None,
            timings: StageTimings::default(),
        }
    }

    fn record_error(&mut self, message: String) {
        self.error_count += 1;
        self.last_error = Some(message);
        self.last_error_time = Some(epoch_ms());
    }

    fn take_version(&mut self) -> u64 {
        let v = self.next_version;
        self.next_version += 1;
        v
    }

    fn set_target(&mut self, params: StreamDiffusionParams, version: u64) {
        self.target_hash = params_hash(&params.to_json());
        self.target_json = params_json(&params);
        self.target = params;
        self.target_version = version;
    }

    /// After a failed update: what is accepted is what serves.
    fn revert_target_to_serving(&mut self) {
        if let Some((params, version)) = self.serving.clone() {
            self.set_target(params, version);
        }
    }

    fn is_wanted(&self, version: u64) -> bool {
        self.pending_build
            .as_ref()
            .is_some_and(|b| b.version == version)
    }

    /// Asks the builder for a pipeline (or a ControlNet preload); whatever was wanted before
    /// is superseded.
    fn request_build(&mut self, version: u64, params: StreamDiffusionParams, kind: BuildKind) {
        self.cancel_build();
        let ticket = BuildTicket {
            version,
            params,
            kind,
        };
        self.pending_build = Some(ticket.clone());
        self.build_request = Some(ticket);
        self.progress = Some("waiting for the builder".into());
    }

    /// Forgets the wanted build: not picked up, it never starts; finished, it is retired;
    /// in progress, it is discarded when it finishes.
    fn cancel_build(&mut self) {
        if self.pending_build.take().is_some() {
            self.progress = None;
        }
        if self.build_request.take().is_some() {
            self.builds_superseded += 1;
        }
        if let Some(ready) = self.ready.take() {
            self.builds_superseded += 1;
            self.retired.push(ready.pipeline);
        }
    }

    /// Drops every waiting frame; returns how many.
    fn drop_queue(&mut self) -> usize {
        let n = self.queue.len();
        self.queue.clear();
        self.frames_dropped += n as u64;
        n
    }

    fn has_future(&self) -> bool {
        !self.worker_dead && (self.serving.is_some() || self.pending_build.is_some())
    }

    fn state(&mut self, now: Instant, options: &EngineOptions) -> EngineState {
        if self.closed {
            return EngineState::Offline;
        }
        if self.worker_dead {
            return EngineState::Error;
        }
        if self.serving.is_none() {
            return if self.pending_build.is_some() {
                EngineState::Loading
            } else {
                EngineState::Error
            };
        }
        let window = options.fps_window();
        let recent =
            |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) <= window);
        let failing = recent(self.last_failure);
        let input_fps = self.input_meter.rate(now);
        let output_fps = self.output_meter.rate(now);
        let lagging = recent(self.last_overflow) && output_fps < 0.5 * input_fps;
        if failing || lagging {
            EngineState::DegradedInference
        } else if self
            .last_input
            .is_some_and(|t| now.saturating_duration_since(t) > options.input_timeout())
        {
            EngineState::DegradedInput
        } else {
            EngineState::Online
        }
    }

    fn no_pipeline_error(&self) -> Error {
        Error::State(match &self.last_error {
            Some(e) => format!(
                "the engine has no pipeline (last error: {e}); call restart() or update_params()"
            ),
            None => "the engine has no pipeline; call restart() or update_params()".into(),
        })
    }
}

fn params_json(params: &StreamDiffusionParams) -> serde_json::Value {
    serde_json::from_str(&params.to_json()).unwrap_or(serde_json::Value::Null)
}

/// The message a panic carried.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

fn closed_error() -> Error {
    Error::State("the engine is closed".into())
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the worker: a frame, new parameters, a finished build, close.
    work: Condvar,
    /// Wakes the builder: a build request, a retired pipeline, close.
    build: Condvar,
    /// Wakes hosts waiting for an output, room in the queue, or readiness.
    host: Condvar,
    options: EngineOptions,
    settings: EngineSettings,
    factory: Arc<dyn PipelineFactory>,
}

impl Shared {
    /// The state, even if some thread panicked while holding it (no invariant spans a panic:
    /// pipeline calls happen outside the lock).
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, cv: &Condvar, guard: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `deadline`; returns the guard and whether the deadline has passed.
    fn wait_until<'a>(
        &self,
        cv: &Condvar,
        guard: MutexGuard<'a, Inner>,
        deadline: Instant,
    ) -> (MutexGuard<'a, Inner>, bool) {
        let now = Instant::now();
        if now >= deadline {
            return (guard, true);
        }
        let (guard, _) = cv
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(PoisonError::into_inner);
        (guard, Instant::now() >= deadline)
    }
}

/// The threaded frame-in/frame-out engine. `Send + Sync`: share it between threads behind an
/// `Arc` (or by reference in scoped threads). Dropping it closes it.
pub struct Engine {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("options", &self.shared.options)
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts an engine and waits until its pipeline is loaded (which may take long: weights
    /// are read, or downloaded). Fails with the loading error. Use [`spawn`](Self::spawn) to
    /// return at once and follow the load through [`status`](Self::status).
    pub fn new(
        params: StreamDiffusionParams,
        settings: EngineSettings,
        options: EngineOptions,
    ) -> Result<Self> {
        let engine = Self::spawn(params, settings, options)?;
        engine.wait_ready(None)?;
        Ok(engine)
    }

    /// Starts an engine and returns at once, in state `LOADING`; the pipeline is built on the
    /// builder thread (`status().progress` says how far it got). Frames submitted meanwhile
    /// wait in the queue. Invalid parameters, settings or options fail here.
    pub fn spawn(
        params: StreamDiffusionParams,
        settings: EngineSettings,
        options: EngineOptions,
    ) -> Result<Self> {
        settings.validate()?;
        params.validate(&settings)?;
        let factory = Arc::new(StreamDiffusionFactory::new(settings.clone()));
        Self::spawn_with_factory(params, settings, options, factory)
    }

    /// [`spawn`](Self::spawn) with any pipeline factory (tests use stand-ins).
    pub(crate) fn spawn_with_factory(
        params: StreamDiffusionParams,
        settings: EngineSettings,
        options: EngineOptions,
        factory: Arc<dyn PipelineFactory>,
    ) -> Result<Self> {
        options.validate()?;
        let mut inner = Inner::new(params.clone(), &options);
        inner.request_build(0, params, BuildKind::Pipeline);
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            work: Condvar::new(),
            build: Condvar::new(),
            host: Condvar::new(),
            options,
            settings,
            factory,
        });
        let engine = Engine {
            shared: shared.clone(),
            threads: Mutex::new(Vec::with_capacity(2)),
        };
        for (name, body) in [
            ("sdstream-worker", run_worker as fn(&Shared)),
            ("sdstream-builder", run_builder as fn(&Shared)),
        ] {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || body(&shared))
                .map_err(|e| Error::State(format!("cannot start the {name} thread: {e}")))?;
            // On an error above, dropping `engine` closes and joins what did start.
            engine.lock_threads().push(handle);
        }
        Ok(engine)
    }

    fn lock_threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until a pipeline serves (`Ok`), or fails: the load failed (its error), the engine
    /// closed, or `timeout` passed (`None`: no limit).
    pub fn wait_ready(&self, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let shared = &self.shared;
        let mut s = shared.lock();
        loop {
            if s.closed {
                return Err(closed_error());
            }
            if s.serving.is_some() {
                return Ok(());
            }
            if !s.has_future() {
                return Err(s
                    .initial_error
                    .take()
                    .unwrap_or_else(|| s.no_pipeline_error()));
            }
            match deadline {
                None => s = shared.wait(&shared.host, s),
                Some(deadline) => {
                    let (guard, timed_out) = shared.wait_until(&shared.host, s, deadline);
                    s = guard;
                    if timed_out && s.serving.is_none() && s.has_future() {
                        return Err(Error::State(format!(
                            "the pipeline is still loading after {:?} ({})",
                            timeout.unwrap_or_default(),
                            s.progress.as_deref().unwrap_or("no progress reported")
                        )));
                    }
                }
            }
        }
    }

    /// Queues a copy of `frame` (the caller's memory is not kept) and returns its id; never
    /// waits for inference. Any size and pixel format: the pipeline resizes, and the output
    /// comes back in the same format. A full queue drops its oldest frame under
    /// [`DropPolicy::Latest`] and fails with [`Error::QueueFull`] under `Lossless`. Fails when
    /// the engine is closed or has no pipeline (state `ERROR`).
    pub fn submit(&self, frame: &Frame) -> Result<FrameId> {
        self.submit_inner(frame, &[], None, None)
    }

    /// [`submit`](Self::submit) with the host's timestamp (any unit), returned in the output.
    pub fn submit_with_timestamp(&self, frame: &Frame, timestamp: i64) -> Result<FrameId> {
        self.submit_inner(frame, &[], Some(timestamp), None)
    }

    /// [`submit`](Self::submit) with control images for `external` ControlNets, each
    /// `(controlnet model_id, image)`, copied like the frame (any size and format: they are
    /// resized to the stream's size). A net uses the most recent image given for it; before the
    /// first, it contributes nothing. An id that names no ControlNet of the current parameters
    /// is an error and nothing is queued. `timestamp` as in
    /// [`submit_with_timestamp`](Self::submit_with_timestamp).
    pub fn submit_with_controls(
        &self,
        frame: &Frame,
        controls: &[(&str, &Frame)],
        timestamp: Option<i64>,
    ) -> Result<FrameId> {
        self.submit_inner(frame, controls, timestamp, None)
    }

    /// [`submit`](Self::submit) that, under [`DropPolicy::Lossless`], waits up to `timeout`
    /// for room instead of failing at once (offline rendering). Same as `submit` under
    /// `Latest`.
    pub fn submit_timeout(
        &self,
        frame: &Frame,
        timestamp: Option<i64>,
        timeout: Duration,
    ) -> Result<FrameId> {
        self.submit_inner(frame, &[], timestamp, Some(Instant::now() + timeout))
    }

    fn submit_inner(
        &self,
        frame: &Frame,
        controls: &[(&str, &Frame)],
        timestamp: Option<i64>,
        deadline: Option<Instant>,
    ) -> Result<FrameId> {
        // Copy before taking the lock: the copy is the only per-pixel work on this thread.
        let input = PackedFrame::copy(frame)?;
        let controls = controls
            .iter()
            .map(|(id, c)| Ok((id.to_string(), PackedFrame::copy(c)?)))
            .collect::<Result<Vec<_>>>()?;
        let timestamp = timestamp.unwrap_or_else(epoch_us);
        let shared = &self.shared;
        let capacity = shared.options.queue_capacity;
        let mut s = shared.lock();
        loop {
            if s.closed {
                return Err(closed_error());
            }
            if !s.has_future() {
                return Err(s.no_pipeline_error());
            }
            check_control_ids(&s.target, controls.iter().map(|(id, _)| id.as_str()))?;
            if s.queue.len() < capacity {
                break;
            }
            match shared.options.drop_policy {
                DropPolicy::Latest => {
                    s.queue.pop_front();
                    s.frames_dropped += 1;
                    s.last_overflow = Some(Instant::now());
                }
                DropPolicy::Lossless => match deadline {
                    Some(deadline) => {
                        let (guard, timed_out) = shared.wait_until(&shared.host, s, deadline);
                        s = guard;
                        if timed_out && s.queue.len() >= capacity && !s.closed {
                            return Err(Error::QueueFull { capacity });
                        }
                    }
                    None => return Err(Error::QueueFull { capacity }),
                },
            }
        }
        let id = s.next_id;
        s.next_id += 1;
        let now = Instant::now();
        s.frames_submitted += 1;
        s.input_meter.record(now);
        s.last_input = Some(now);
        s.last_input_time = Some(epoch_ms());
        s.queue.push_back(Job {
            id,
            timestamp,
            input,
            controls,
            submitted: now,
        });
        drop(s);
        shared.work.notify_one();
        Ok(id)
    }

    /// The oldest processed frame not yet collected, if any; never waits.
    pub fn poll(&self) -> Option<Output> {
        let mut s = self.shared.lock();
        let output = s.outputs.pop_front();
        drop(s);
        if output.is_some() && self.shared.options.drop_policy == DropPolicy::Lossless {
            // The worker may be waiting for room in the output queue.
            self.shared.work.notify_one();
        }
        output
    }

    /// The oldest processed frame, waiting up to `timeout` for one: `Ok(None)` when none came.
    /// Fails when no output can come any more: the engine is closed (and drained), or it has
    /// no pipeline and nothing in flight.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Output>> {
        let deadline = Instant::now() + timeout;
        let shared = &self.shared;
        let mut s = shared.lock();
        loop {
            if let Some(output) = s.outputs.pop_front() {
                drop(s);
                if shared.options.drop_policy == DropPolicy::Lossless {
                    shared.work.notify_one();
                }
                return Ok(Some(output));
            }
            if s.closed {
                return Err(closed_error());
            }
            if !s.has_future() && s.in_flight.is_none() {
                return Err(s.no_pipeline_error());
            }
            let (guard, timed_out) = shared.wait_until(&shared.host, s, deadline);
            s = guard;
            if timed_out && s.outputs.is_empty() {
                return Ok(None);
            }
        }
    }

    /// Drops every frame waiting in the input queue (the one in flight still comes out), so
    /// that after a prompt change no stale backlog is shown; returns how many were dropped.
    pub fn flush(&self) -> usize {
        let mut s = self.shared.lock();
        let n = s.drop_queue();
        drop(s);
        self.shared.host.notify_all();
        n
    }

    /// Applies a complete new parameter set and says what it costs. Validation errors fail at
    /// once and change nothing. Otherwise the parameters are accepted and this returns without
    /// waiting: hot changes take effect on the next frame the worker starts; a ControlNet swap
    /// loads the nets it adds on the builder thread while frames keep flowing, then attaches
    /// them between two frames; a reload is built beside the serving pipeline and swapped in
    /// when ready (`status().serving_params_version` tells when either has happened). While a reload builds, an update
    /// that still needs it keeps it (its hot changes follow right after the swap), and one
    /// that needs another supersedes it. The returned [`Update`] compares with the previously
    /// accepted parameters.
    pub fn update_params(&self, params: StreamDiffusionParams) -> Result<Update> {
        params.validate(&self.shared.settings)?;
        check_supported(&params, None)?;
        let mut s = self.shared.lock();
        if s.closed {
            return Err(closed_error());
        }
        if s.worker_dead {
            return Err(s.no_pipeline_error());
        }
        let update = classify(&s.target, &params);
        let from_serving = s
            .serving
            .as_ref()
            .map(|(serving, _)| classify(serving, &params));
        let needs_build = match &from_serving {
            Some(u) if u.is_controlnet_swap() => {
                // Nothing to load when every added net is cached already (added back).
                let added = added_controlnets(&from_serving);
                (!self.shared.factory.controlnets_ready(&params, &added))
                    .then_some(BuildKind::ControlNets)
            }
            Some(u) if u.is_hot() => None,
            _ => Some(BuildKind::Pipeline),
        };
        if update.is_unchanged() && (needs_build.is_none() || s.pending_build.is_some()) {
            return Ok(update);
        }
        let version = s.take_version();
        s.set_target(params.clone(), version);
        s.target_time = Some(epoch_ms());
        if let Some(kind) = needs_build {
            let pending_fits = s.pending_build.as_ref().is_some_and(|b| {
                b.kind == kind
                    && match kind {
                        BuildKind::Pipeline => classify(&b.params, &params).is_hot(),
                        BuildKind::ControlNets => same_controlnet_ids(&b.params, &params),
                    }
            });
            if !pending_fits {
                s.request_build(version, params, kind);
                self.shared.build.notify_one();
            }
        } else if s.pending_build.is_some() {
            // The serving pipeline takes these in place: the reload is no longer wanted.
            s.cancel_build();
            self.shared.build.notify_one();
        }
        drop(s);
        self.shared.work.notify_one();
        Ok(update)
    }

    /// Builds a fresh pipeline with the current parameters (after a panic, or to retry a load
    /// that failed). The serving pipeline, if any, keeps serving until it is ready.
    pub fn restart(&self) -> Result<()> {
        let mut s = self.shared.lock();
        if s.closed {
            return Err(closed_error());
        }
        if s.worker_dead {
            return Err(Error::State(
                "the engine's worker thread has stopped; create a new engine".into(),
            ));
        }
        let version = s.take_version();
        let params = s.target.clone();
        s.set_target(params.clone(), version);
        s.request_build(version, params, BuildKind::Pipeline);
        drop(s);
        self.shared.build.notify_one();
        self.shared.host.notify_all();
        Ok(())
    }

    /// The last accepted parameters.
    pub fn params(&self) -> StreamDiffusionParams {
        self.shared.lock().target.clone()
    }

    /// The engine settings (fixed for the engine's life).
    pub fn settings(&self) -> &EngineSettings {
        &self.shared.settings
    }

    /// The queueing options (fixed for the engine's life).
    pub fn options(&self) -> &EngineOptions {
        &self.shared.options
    }

    /// The status report.
    pub fn status(&self) -> EngineStatus {
        let now = Instant::now();
        let options = &self.shared.options;
        let mut s = self.shared.lock();
        let state = s.state(now, options);
        EngineStatus {
            state,
            input_fps: s.input_meter.rate(now),
            output_fps: s.output_meter.rate(now),
            last_input_time: s.last_input_time,
            last_output_time: s.last_output_time,
            last_params: s.target_json.clone(),
            last_params_hash: s.target_hash.clone(),
            last_params_update_time: s.target_time,
            last_error: s.last_error.clone(),
            last_error_time: s.last_error_time,
            restart_count: s.restart_count,
            last_restart_time: s.last_restart_time,
            params_version: s.target_version,
            serving_params_version: s.serving.as_ref().map(|(_, v)| *v),
            reloading: s.pending_build.is_some(),
            progress: s.progress.clone(),
            timings: s.timings.into(),
            queue_depth: s.queue.len(),
            queue_capacity: options.queue_capacity,
            output_queue_depth: s.outputs.len(),
            frames_submitted: s.frames_submitted,
            frames_processed: s.frames_processed,
            frames_failed: s.frames_failed,
            frames_dropped: s.frames_dropped,
            frames_in_flight: u64::from(s.in_flight.is_some()),
            outputs_dropped: s.outputs_dropped,
            error_count: s.error_count,
            reload_failures: s.reload_failures,
            builds_superseded: s.builds_superseded,
        }
    }

    /// [`status`](Self::status) as a JSON object.
    pub fn status_json(&self) -> String {
        serde_json::to_string(&self.status())
            .unwrap_or_else(|e| format!("{{\"state\":\"ERROR\",\"last_error\":\"status: {e}\"}}"))
    }

    /// Stops the engine: waiting frames are dropped, the frame in flight finishes (its output
    /// can still be polled), and both threads are joined. A build in progress cannot be
    /// interrupted, so this waits for it. Idempotent; also done on drop.
    pub fn close(&self) {
        {
            let mut s = self.shared.lock();
            if !s.closed {
                s.closed = true;
                s.drop_queue();
            }
        }
        self.shared.work.notify_all();
        self.shared.build.notify_all();
        self.shared.host.notify_all();
        // Held while joining, so a concurrent close() returns only once the threads are gone.
        let mut threads = self.lock_threads();
        for handle in threads.drain(..) {
            // A thread that panicked outside the catch_unwind has already recorded it.
            let _ = handle.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close();
    }
}

/// The frame's pixel rows, packed.
fn copy_packed(frame: &Frame) -> Result<Vec<u8>> {
    let row = frame.width() * frame.format().bytes_per_pixel();
    let (stride, height, data) = (frame.stride(), frame.height(), frame.data());
    let short = || {
        Error::InvalidFrame(format!(
            "{}x{} {} frame: buffer of {} bytes is shorter than its rows",
            frame.width(),
            height,
            frame.format(),
            data.len()
        ))
    };
    if stride == row {
        return data
            .get(..row * height)
            .map(<[u8]>::to_vec)
            .ok_or_else(short);
    }
    let mut out = Vec::with_capacity(row * height);
    for y in 0..height {
        let start = y * stride;
        out.extend_from_slice(data.get(start..start + row).ok_or_else(short)?);
    }
    Ok(out)
}

/// The serving pipeline, as the worker holds it.
struct Live {
    pipeline: Box<dyn Pipeline>,
    version: u64,
    /// Whether its stream batch has been primed (always true with warm-up off).
    warmed: bool,
}

enum Action {
    Exit,
    Swap(Ready),
    Apply {
        params: Box<StreamDiffusionParams>,
        version: u64,
        update: Update,
    },
    Frame(Job),
}

fn run_worker(shared: &Shared) {
    let mut live: Option<Live> = None;
    let outcome = catch_unwind(AssertUnwindSafe(|| worker_loop(shared, &mut live)));
    if let Err(panic) = outcome {
        let mut s = shared.lock();
        s.worker_dead = true;
        s.serving = None;
        s.in_flight = None;
        s.drop_queue();
        s.record_error(format!(
            "the engine's worker thread panicked: {}",
            panic_message(panic.as_ref())
        ));
        drop(s);
        shared.host.notify_all();
    }
    // Free the pipeline here, outside the lock; a panic while dropping stays on this thread.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(live)));
}

fn worker_loop(shared: &Shared, live: &mut Option<Live>) {
    // The target version last compared with the live pipeline (classify once per change).
    let mut examined: Option<(u64, u64)> = None;
    loop {
        match next_action(shared, live.as_ref(), &mut examined) {
            Action::Exit => return,
            Action::Swap(ready) => {
                let params = ready.pipeline.params().clone();
                let old = live.replace(Live {
                    pipeline: ready.pipeline,
                    version: ready.version,
                    warmed: ready.warmed || !shared.options.warmup,
                });
                examined = None;
                let mut s = shared.lock();
                if s.ever_served {
                    s.restart_count += 1;
                    s.last_restart_time = Some(epoch_ms());
                }
                s.ever_served = true;
                s.serving = Some((params, ready.version));
                s.pending_build = None;
                s.progress = None;
                if let Some(old) = old {
                    s.retired.push(old.pipeline);
                    shared.build.notify_one();
                }
                drop(s);
                shared.host.notify_all();
            }
            Action::Apply {
                params,
                version,
                update,
            } => {
                let Some(l) = live.as_mut() else { continue };
                let result =
                    catch_unwind(AssertUnwindSafe(|| l.pipeline.update((*params).clone())));
                let mut s = shared.lock();
                match result {
                    Ok(Ok(_)) => {
                        l.version = version;
                        if resets_stream_batch(&update) && shared.options.warmup {
                            l.warmed = false;
                        }
                        s.serving = Some((*params, version));
                    }
                    Ok(Err(e)) => {
                        s.record_error(format!(
                            "applying parameters version {version} failed, the previous ones stay: {e}"
                        ));
                        if s.target_version == version {
                            s.revert_target_to_serving();
                        }
                    }
                    Err(panic) => {
                        crash(shared, &mut s, live, "applying parameters", panic.as_ref());
                    }
                }
            }
            Action::Frame(job) => run_frame(shared, live, job),
        }
    }
}

/// Decides the worker's next step, waiting until there is one. Order: close, swap in a ready
/// pipeline, apply accepted hot parameters, then the next frame. Parameters therefore always
/// change between two frames.
fn next_action(shared: &Shared, live: Option<&Live>, examined: &mut Option<(u64, u64)>) -> Action {
    let options = &shared.options;
    let mut s = shared.lock();
    loop {
        if s.closed {
            return Action::Exit;
        }
        if let Some(ready) = s.ready.take() {
            return Action::Swap(ready);
        }
        match live {
            Some(l) => {
                let seen = (s.target_version, s.preloads_done);
                if s.target_version != l.version && *examined != Some(seen) {
                    *examined = Some(seen);
                    let update = classify(l.pipeline.params(), &s.target);
                    let swap_ready = update.is_controlnet_swap()
                        && shared.factory.controlnets_ready(
                            &s.target,
                            &added_controlnets(&Some(update.clone())),
                        );
                    if update.is_hot() || swap_ready {
                        return Action::Apply {
                            params: Box::new(s.target.clone()),
                            version: s.target_version,
                            update,
                        };
                    }
                    if s.pending_build.is_none() {
                        // update_params requests a build (or a preload) for any target the
                        // serving pipeline cannot take in place; this only guards that rule.
                        let kind = if update.is_controlnet_swap() {
                            BuildKind::ControlNets
                        } else {
                            BuildKind::Pipeline
                        };
                        let (version, params) = (s.target_version, s.target.clone());
                        s.request_build(version, params, kind);
                        shared.build.notify_one();
                    }
                }
                let output_room = options.drop_policy == DropPolicy::Latest
                    || s.outputs.len() < options.output_capacity;
                if output_room && let Some(job) = s.queue.pop_front() {
                    s.in_flight = Some(job.id);
                    drop(s);
                    shared.host.notify_all();
                    return Action::Frame(job);
                }
            }
            None => {
                if s.pending_build.is_none() && !s.queue.is_empty() {
                    // No pipeline and none coming: nothing will ever run these frames.
                    s.drop_queue();
                    shared.host.notify_all();
                }
            }
        }
        s = shared.wait(&shared.work, s);
    }
}

/// Whether a hot update left the stream batch at its zero state (a new number of steps).
fn resets_stream_batch(update: &Update) -> bool {
    update
        .hot_changes()
        .iter()
        .any(|c| matches!(c, HotChange::TIndexList { same_len: false }))
}

fn run_frame(shared: &Shared, live: &mut Option<Live>, job: Job) {
    let Some(l) = live.as_mut() else {
        let mut s = shared.lock();
        s.in_flight = None;
        s.frames_dropped += 1;
        return;
    };
    let passes = if l.warmed {
        0
    } else {
        warmup_passes(l.pipeline.params())
    };
    l.warmed = true;
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<(Image, StageTimings)> {
        for _ in 0..passes {
            job.process(l.pipeline.as_mut())?;
        }
        let image = job.process(l.pipeline.as_mut())?;
        Ok((image, l.pipeline.timings()))
    }));
    let version = l.version;
    let mut s = shared.lock();
    s.in_flight = None;
    match result {
        Ok(Ok((image, timings))) => {
            let now = Instant::now();
            s.frames_processed += 1;
            s.output_meter.record(now);
            s.last_output_time = Some(epoch_ms());
            s.timings = timings;
            let output = Output {
                id: job.id,
                timestamp: job.timestamp,
                image,
                timings,
                params_version: version,
                latency: now.saturating_duration_since(job.submitted),
            };
            if s.outputs.len() >= shared.options.output_capacity {
                // Only under Latest: Lossless never takes a frame without room for its output.
                s.outputs.pop_front();
                s.outputs_dropped += 1;
            }
            s.outputs.push_back(output);
            if shared.options.warmup {
                s.last_frame = Some(Arc::new(job));
            }
        }
        Ok(Err(e)) => {
            s.frames_failed += 1;
            s.last_failure = Some(Instant::now());
            s.record_error(format!("frame {} failed: {e}", job.id));
        }
        Err(panic) => {
            s.frames_failed += 1;
            s.last_failure = Some(Instant::now());
            let what = format!("processing frame {}", job.id);
            crash(shared, &mut s, live, &what, panic.as_ref());
        }
    }
    drop(s);
    shared.host.notify_all();
}

/// A panic inside the pipeline: its state cannot be trusted, so it is discarded (the builder
/// drops it) and the engine has no pipeline until a build brings one.
fn crash(
    shared: &Shared,
    s: &mut Inner,
    live: &mut Option<Live>,
    what: &str,
    payload: &(dyn Any + Send),
) {
    s.record_error(format!(
        "the pipeline panicked while {what} and was discarded: {}",
        panic_message(payload)
    ));
    s.serving = None;
    if let Some(dead) = live.take() {
        s.retired.push(dead.pipeline);
        shared.build.notify_one();
    }
    shared.host.notify_all();
}

fn run_builder(shared: &Shared) {
    loop {
        let (ticket, retired) = {
            let mut s = shared.lock();
            loop {
                if !s.retired.is_empty() {
                    break (None, std::mem::take(&mut s.retired));
                }
                if s.closed {
                    return;
                }
                if let Some(ticket) = s.build_request.take() {
                    s.progress = Some("building".into());
                    break (Some(ticket), Vec::new());
                }
                s = shared.wait(&shared.build, s);
            }
        };
        for pipeline in retired {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(pipeline)));
        }
        if let Some(ticket) = ticket {
            match ticket.kind {
                BuildKind::Pipeline => {
                    let outcome = build(shared, &ticket);
                    finish_build(shared, ticket, outcome);
                }
                BuildKind::ControlNets => {
                    let outcome = preload(shared, &ticket);
                    finish_preload(shared, ticket, outcome);
                }
            }
        }
    }
}

/// Builds the ticket's pipeline and, with warm-up on, primes it with the latest frame so it
/// comes in without zero-buffer outputs.
fn build(shared: &Shared, ticket: &BuildTicket) -> Result<Ready> {
    let version = ticket.version;
    let mut progress = |line: &str| {
        let mut s = shared.lock();
        if s.is_wanted(version) {
            s.progress = Some(line.to_owned());
        }
    };
    let built = catch_unwind(AssertUnwindSafe(|| {
        shared.factory.build(&ticket.params, &mut progress)
    }));
    let mut pipeline = match built {
        Ok(result) => result?,
        Err(panic) => {
            return Err(Error::State(format!(
                "building the pipeline panicked: {}",
                panic_message(panic.as_ref())
            )));
        }
    };
    let mut warmed = false;
    if shared.options.warmup {
        let frame = {
            let s = shared.lock();
            s.is_wanted(version).then(|| s.last_frame.clone()).flatten()
        };
        if let Some(job) = frame {
            progress("warming up with the latest frame");
            let passes = warmup_passes(pipeline.params());
            let primed = catch_unwind(AssertUnwindSafe(|| -> Result<()> {
                for _ in 0..passes {
                    job.process(pipeline.as_mut())?;
                }
                Ok(())
            }));
            match primed {
                Ok(Ok(())) => warmed = true,
                Ok(Err(e)) => {
                    return Err(Error::State(format!(
                        "the new pipeline failed its warm-up: {e}"
                    )));
                }
                Err(panic) => {
                    return Err(Error::State(format!(
                        "the new pipeline panicked during its warm-up: {}",
                        panic_message(panic.as_ref())
                    )));
                }
            }
        }
    }
    Ok(Ready {
        version,
        pipeline,
        warmed,
    })
}

/// Loads the ControlNets the ticket's parameters add into the shared cache.
fn preload(shared: &Shared, ticket: &BuildTicket) -> Result<()> {
    let version = ticket.version;
    let mut progress = |line: &str| {
        let mut s = shared.lock();
        if s.is_wanted(version) {
            s.progress = Some(line.to_owned());
        }
    };
    catch_unwind(AssertUnwindSafe(|| {
        shared
            .factory
            .preload_controlnets(&ticket.params, &mut progress)
    }))
    .unwrap_or_else(|panic| {
        Err(Error::State(format!(
            "loading ControlNets panicked: {}",
            panic_message(panic.as_ref())
        )))
    })
}

/// Hands a finished preload to the worker, which attaches the nets between two frames; a
/// failed one leaves the serving parameters in force.
fn finish_preload(shared: &Shared, ticket: BuildTicket, outcome: Result<()>) {
    let mut s = shared.lock();
    if s.closed || !s.is_wanted(ticket.version) {
        if !s.closed {
            s.builds_superseded += 1;
        }
        return;
    }
    s.pending_build = None;
    s.progress = None;
    match outcome {
        Ok(()) => s.preloads_done += 1,
        Err(e) => {
            s.reload_failures += 1;
            s.record_error(format!(
                "loading the ControlNets of parameters version {} failed, the stream keeps its \
                 previous ControlNets: {e}",
                ticket.version
            ));
            s.revert_target_to_serving();
        }
    }
    drop(s);
    shared.work.notify_one();
    shared.host.notify_all();
}

/// The model_ids a ControlNet swap adds.
fn added_controlnets(update: &Option<Update>) -> Vec<String> {
    match update {
        Some(Update::ControlNetSwap { added, .. }) => {
            added.iter().map(|c| c.model_id.clone()).collect()
        }
        _ => Vec::new(),
    }
}

/// Whether two parameter sets name the same ControlNets (in any order).
fn same_controlnet_ids(a: &StreamDiffusionParams, b: &StreamDiffusionParams) -> bool {
    fn ids(p: &StreamDiffusionParams) -> Vec<&str> {
        let mut v: Vec<&str> = p.controlnets.iter().map(|c| c.model_id.as_str()).collect();
        v.sort_unstable();
        v
    }
    ids(a) == ids(b)
}

fn finish_build(shared: &Shared, ticket: BuildTicket, outcome: Result<Ready>) {
    let mut s = shared.lock();
    if s.closed || !s.is_wanted(ticket.version) {
        if !s.closed {
            s.builds_superseded += 1;
        }
        drop(s);
        if let Ok(ready) = outcome {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(ready.pipeline)));
        }
        return;
    }
    match outcome {
        Ok(ready) => {
            s.progress = Some("ready; swapping in".into());
            s.ready = Some(ready);
            drop(s);
            shared.work.notify_one();
        }
        Err(e) => {
            s.pending_build = None;
            s.progress = None;
            let what = format!(
                "building the pipeline for model `{}` (parameters version {}) failed",
                ticket.params.model_id, ticket.version
            );
            if s.serving.is_some() {
                s.reload_failures += 1;
                s.record_error(format!("{what}, the previous pipeline keeps serving: {e}"));
                s.revert_target_to_serving();
            } else {
                s.record_error(format!("{what}: {e}"));
                s.initial_error = Some(e);
            }
            drop(s);
            shared.work.notify_one();
            shared.host.notify_all();
        }
    }
}

#[cfg(test)]
mod tests;
