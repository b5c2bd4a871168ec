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
//! Frames. [`Engine::submit`] copies a [`Submission`] (the frame, and optionally its timestamp
//! and control images) into the bounded input queue and returns its id. When the queue is full,
//! [`DropPolicy::Latest`] drops the oldest waiting frame (live video) and
//! [`DropPolicy::Lossless`] refuses with [`Error::QueueFull`] (or waits for room, see
//! [`Submission::wait_for_room`]). Outputs come back in submission order from [`Engine::poll`]
//! or [`Engine::recv_timeout`], each with the id and timestamp of its input.
//! [`Engine::process`] submits and waits for that frame's own output, which bypasses the poll
//! queue: a blocking call for hosts that want one, safe beside other threads' submits and polls.
//!
//! Failure. A panic inside the pipeline is caught: the pipeline is discarded, the engine goes
//! to [`EngineState::Error`] with `last_error` set, and [`Engine::restart`] (or any
//! [`Engine::update_params`]) builds a new one. No call of this API panics.

mod build_thread;
mod pipeline;
mod state;
mod types;
mod worker;

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::model::pool::ModelPool;
use crate::params::{EngineSettings, StreamDiffusionParams, Transition, Update, classify};
use crate::pipeline::stream_diffusion::{check_control_ids, check_supported};
use crate::{Error, Result};

pub use crate::status::{EngineState, EngineStatus, StageMillis};
use crate::status::{epoch_ms, epoch_us};
use build_thread::same_networks;
use pipeline::{PipelineFactory, StreamDiffusionFactory};
pub(crate) use state::panic_message;
use state::{BuildKind, Claim, Inner, Job, PackedFrame, Shared, closed_error};
pub use types::{DropPolicy, EngineOptions, FrameId, Output, Submission};

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

/// How an [`Engine`] starts: its parameters, and the settings, options and model pool that
/// default unless set. [`load`](Self::load) returns once the pipeline is loaded;
/// [`spawn`](Self::spawn) returns at once.
///
/// ```no_run
/// # use sdstream::{Engine, EngineOptions, EngineSettings, StreamDiffusionParams};
/// # fn main() -> sdstream::Result<()> {
/// let params = StreamDiffusionParams::default();
/// let engine = Engine::builder(params)
///     .settings(EngineSettings::default())
///     .options(EngineOptions { warmup: false, ..EngineOptions::default() })
///     .spawn()?;
/// engine.wait_ready(None)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "an EngineBuilder starts nothing until load or spawn"]
pub struct EngineBuilder {
    params: StreamDiffusionParams,
    settings: EngineSettings,
    options: EngineOptions,
    pool: Option<Arc<ModelPool>>,
}

impl EngineBuilder {
    /// The engine settings (device, dtype, model root, ...); [`EngineSettings::default`]
    /// unless set.
    pub fn settings(mut self, settings: EngineSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The engine's queueing and warm-up options; [`EngineOptions::default`] unless set.
    pub fn options(mut self, options: EngineOptions) -> Self {
        self.options = options;
        self
    }

    /// Takes the networks from `pool` instead of the process-wide [`ModelPool::global`]:
    /// engines share weights only with engines of the same pool.
    pub fn pool(mut self, pool: Arc<ModelPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Starts the engine and waits until its pipeline is loaded (which may take long: weights
    /// are read, or downloaded). Fails with the loading error.
    pub fn load(self) -> Result<Engine> {
        let engine = self.spawn()?;
        engine.wait_ready(None)?;
        Ok(engine)
    }

    /// Starts the engine and returns at once, in state `LOADING`; the pipeline is built on the
    /// builder thread (`status().progress` says how far it got). Frames submitted meanwhile
    /// wait in the queue. Invalid parameters, settings or options fail here.
    pub fn spawn(self) -> Result<Engine> {
        let Self {
            params,
            settings,
            options,
            pool,
        } = self;
        settings.validate()?;
        params.validate(&settings)?;
        // What the pipeline would refuse once loaded (a preprocessor it cannot run, a feature
        // it lacks) is refused here, not left to the load.
        check_supported(&params)?;
        let pool = pool.unwrap_or_else(|| ModelPool::global().clone());
        let factory = Arc::new(StreamDiffusionFactory::new(settings.clone(), pool));
        Engine::spawn_with_factory(params, settings, options, factory)
    }
}

impl Engine {
    /// An engine for `params`, with settings, options and pool to set before it starts
    /// ([`EngineBuilder`]).
    pub fn builder(params: StreamDiffusionParams) -> EngineBuilder {
        EngineBuilder {
            params,
            settings: EngineSettings::default(),
            options: EngineOptions::default(),
            pool: None,
        }
    }

    /// Starts an engine and waits until its pipeline is loaded: the short form of
    /// `Engine::builder(params).settings(settings).options(options).load()`. Use
    /// [`builder`](Self::builder) to return at once ([`EngineBuilder::spawn`]) or to take the
    /// networks from another pool.
    pub fn new(
        params: StreamDiffusionParams,
        settings: EngineSettings,
        options: EngineOptions,
    ) -> Result<Self> {
        Self::builder(params)
            .settings(settings)
            .options(options)
            .load()
    }

    /// [`EngineBuilder::spawn`] with any pipeline factory (tests use stand-ins).
    pub(crate) fn spawn_with_factory(
        params: StreamDiffusionParams,
        settings: EngineSettings,
        options: EngineOptions,
        factory: Arc<dyn PipelineFactory>,
    ) -> Result<Self> {
        options.validate()?;
        let mut inner = Inner::new(params.clone(), &options);
        inner.redactor = settings.path_redactor();
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
        // The engine's threads run under the kernel policy of its settings, else the one
        // current where it starts: loads, frames and the threads they start all see it.
        let policy = shared.settings.kernel_policy();
        for (name, body) in [
            ("sdstream-worker", worker::run_worker as fn(&Shared)),
            ("sdstream-builder", build_thread::run_builder as fn(&Shared)),
        ] {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || policy.scoped(|| body(&shared)))
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

    /// Queues a copy of the submission's frame and control images (the caller's memory is not
    /// kept) and returns the frame's id; never waits for inference. Any size and pixel format:
    /// the pipeline resizes, and the output comes back in the same format. A full queue drops
    /// its oldest frame under [`DropPolicy::Latest`] and fails with [`Error::QueueFull`] under
    /// `Lossless` (or waits, see [`Submission::wait_for_room`]). Fails when the engine is closed
    /// or has no pipeline (state `ERROR`). The output comes from [`poll`](Self::poll) or
    /// [`recv_timeout`](Self::recv_timeout).
    pub fn submit<'a>(&self, submission: impl Into<Submission<'a>>) -> Result<FrameId> {
        self.enqueue(submission.into(), false)
    }

    /// Submits a frame and waits for its own output, which never enters the
    /// [`poll`](Self::poll) queue (so other threads' polls cannot take it, and outputs of
    /// earlier submissions stay there for them). Latency: one pipeline pass, plus the frames
    /// already waiting and, with warm-up on, n − 1 passes on the first frame after creation or
    /// a reload. Fails as [`submit`](Self::submit) does before anything is queued, and with
    /// [`Error::NoOutput`] (saying why) when the frame is dropped (a newer frame took its place
    /// in a full `latest` queue, a flush, close) or fails in the pipeline.
    pub fn process<'a>(&self, submission: impl Into<Submission<'a>>) -> Result<Output> {
        let id = self.enqueue(submission.into(), true)?;
        let shared = &self.shared;
        let mut s = shared.lock();
        loop {
            if let Some(outcome) = s.take_claim(id) {
                return outcome;
            }
            s = shared.wait(&shared.host, s);
        }
    }

    /// Copies and queues a submission; `claim` routes its output to [`process`](Self::process).
    fn enqueue(&self, submission: Submission, claim: bool) -> Result<FrameId> {
        // Copy before taking the lock: the copy is the only per-pixel work on this thread.
        let input = PackedFrame::copy(&submission.frame)?;
        let controls = submission
            .controls
            .iter()
            .map(|(id, c)| Ok((id.to_string(), PackedFrame::copy(c)?)))
            .collect::<Result<Vec<_>>>()?;
        let timestamp = submission.timestamp.unwrap_or_else(epoch_us);
        let deadline = submission.room_timeout.map(|t| Instant::now() + t);
        let shared = &self.shared;
        let capacity = shared.options.queue_capacity;
        let mut s = shared.lock();
        let mut lost_any = false;
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
                    if let Some(oldest) = s.queue.pop_front() {
                        lost_any |= s.lose_claim(
                            oldest.id,
                            "a newer frame took its place in the full input queue (drop policy \
                             latest)",
                        );
                    }
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
        s.activity.frame_in(now);
        if claim {
            s.claims.insert(id, Claim::Waiting);
        }
        s.queue.push_back(Job {
            id,
            timestamp,
            input,
            controls,
            submitted: now,
        });
        drop(s);
        shared.work.notify_one();
        if lost_any {
            shared.host.notify_all();
        }
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
        let n = s.drop_queue("flushed");
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
        self.update_params_with_transition(params, Transition::default())
    }

    /// [`update_params`](Self::update_params) with a [`Transition`]: when the serving pipeline
    /// takes the new parameters in place, a change of the prompt (or of the seed) glides over
    /// `transition.num_steps` frames from where it is to the new value instead of switching
    /// on the next frame. A change that needs a reload ignores the transition (the new
    /// pipeline starts from the new values). A later update replaces the transition of one
    /// not yet taken; one taken mid-glide starts from the glide's current value.
    pub fn update_params_with_transition(
        &self,
        params: StreamDiffusionParams,
        transition: Transition,
    ) -> Result<Update> {
        transition.validate()?;
        params.validate(&self.shared.settings)?;
        check_supported(&params)?;
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
            Some(u) if u.is_controlnet_swap() || u.is_hot() => {
                // Nothing to load when every added net and processor network is loaded already
                // (always so for a hot change that keeps the processors).
                (!self
                    .shared
                    .factory
                    .networks_ready(&params, &u.added_controlnet_ids()))
                .then_some(BuildKind::Preload)
            }
            _ => Some(BuildKind::Pipeline),
        };
        if update.is_unchanged() && (needs_build.is_none() || s.pending_build.is_some()) {
            return Ok(update);
        }
        let version = s.take_version();
        s.set_target(params.clone(), version);
        s.target_transition = transition;
        s.target_time = Some(epoch_ms());
        if let Some(kind) = needs_build {
            let pending_fits = s.pending_build.as_ref().is_some_and(|b| {
                b.kind == kind
                    && match kind {
                        BuildKind::Pipeline => classify(&b.params, &params).is_hot(),
                        BuildKind::Preload => same_networks(&b.params, &params),
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

    /// Hands the stream an IP-Adapter style picture, used instead of the one at
    /// `ip_adapter_style_image_url` from the next frame on (`None`: back to the URL's). It is
    /// kept across reloads; the worker encodes it before its next frame (a failure is reported
    /// in the status' `last_error`, and the previous picture stays).
    pub fn set_style_image(&self, picture: Option<crate::StyleImage>) {
        let mut s = self.shared.lock();
        s.style = (s.style.0 + 1, picture);
        drop(s);
        self.shared.work.notify_all();
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
        let mut status = EngineStatus {
            last_params: s.target_json.clone(),
            last_params_hash: s.target_hash.clone(),
            last_params_update_time: s.target_time,
            restart_count: s.restart_count,
            last_restart_time: s.last_restart_time,
            params_version: s.target_version,
            serving_params_version: s.serving.as_ref().map(|(_, v)| *v),
            reloading: s.pending_build.is_some(),
            progress: s.progress.as_deref().map(|p| s.redactor.redact(p)),
            queue_depth: s.queue.len(),
            queue_capacity: options.queue_capacity,
            output_queue_depth: s.outputs.len(),
            frames_dropped: s.frames_dropped,
            frames_in_flight: u64::from(s.in_flight.is_some()),
            outputs_dropped: s.outputs_dropped,
            reload_failures: s.reload_failures,
            builds_superseded: s.builds_superseded,
            frames_prepared_ahead: s.frames_prepared_ahead,
            ..s.activity.report(now, state)
        };
        status.last_error = status.last_error.map(|e| s.redactor.redact(&e));
        status
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
                s.drop_queue("the engine closed");
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
        // The pipelines still held go now rather than with the last handle to `shared`, so that
        // the large blocks they free are given back with the rest: a host done with its engine
        // gets its memory back (crate::alloc; a no-op under the system allocator).
        {
            let mut s = self.shared.lock();
            s.ready = None;
            s.retired.clear();
        }
        crate::alloc::release_kept();
    }
}

#[cfg(test)]
mod tests;
