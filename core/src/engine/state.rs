//! What hosts, worker and builder share: the state behind the one mutex, queued jobs and
//! build tickets.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::frame::{Frame, Image, PixelFormat};
use crate::params::{EngineSettings, StreamDiffusionParams, Transition};
use crate::pipeline::PreparedControls;
use crate::pipeline::stream_diffusion::FrameInput;
use crate::{Error, Result};

use super::pipeline::{Pipeline, PipelineFactory};
use super::{EngineOptions, FrameId, Output};
use crate::status::{Activity, EngineState, params_hash};

/// A picture copied out of the host's memory (rows packed).
#[derive(Debug, Clone)]
pub(super) struct PackedFrame {
    pub(super) width: usize,
    pub(super) height: usize,
    pub(super) format: PixelFormat,
    pub(super) data: Vec<u8>,
}

impl PackedFrame {
    pub(super) fn copy(frame: &Frame) -> Result<Self> {
        Ok(Self {
            width: frame.width(),
            height: frame.height(),
            format: frame.format(),
            data: copy_packed(frame)?,
        })
    }

    pub(super) fn frame(&self) -> Result<Frame<'_>> {
        Frame::packed(&self.data, self.width, self.height, self.format)
    }
}

/// A submitted frame and its control images (by ControlNet model_id).
#[derive(Debug)]
pub(super) struct Job {
    pub(super) id: FrameId,
    pub(super) timestamp: i64,
    pub(super) input: PackedFrame,
    pub(super) controls: Vec<(String, PackedFrame)>,
    pub(super) submitted: Instant,
}

impl Job {
    /// Runs `pipeline` on this job's frame and control images (with the images its
    /// preprocessors made ahead, if any).
    pub(super) fn process(
        &self,
        pipeline: &mut dyn Pipeline,
        prepared: Option<PreparedControls>,
    ) -> Result<Image> {
        let frame = self.input.frame()?;
        let controls = self
            .controls
            .iter()
            .map(|(id, c)| Ok((id.as_str(), c.frame()?)))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<(&str, &Frame)> = controls.iter().map(|(id, f)| (*id, f)).collect();
        pipeline.process(
            FrameInput::new(&frame)
                .controls(&refs)
                .prepared(prepared)
                .arrived(self.submitted),
        )
    }
}

/// Where a frame awaited by `process` stands.
#[derive(Debug)]
pub(super) enum Claim {
    /// Not processed yet.
    Waiting,
    /// Its output.
    Done(Box<Output>),
    /// It produced none, for this reason.
    Lost(String),
}

/// Work wanted from the builder for parameters of a given version.
#[derive(Debug, Clone)]
pub(super) struct BuildTicket {
    pub(super) version: u64,
    pub(super) params: StreamDiffusionParams,
    pub(super) kind: BuildKind,
}

/// What a [`BuildTicket`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BuildKind {
    /// A new pipeline (a reload), swapped in whole.
    Pipeline,
    /// Only the networks the parameters add — ControlNets and the model-based processors'
    /// networks — loaded into the shared caches; the serving pipeline then takes the
    /// parameters in place between two frames (a ControlNet swap, or a hot change that
    /// switches to a model-based processor).
    Preload,
}

/// A built pipeline waiting to be swapped in.
pub(super) struct Ready {
    pub(super) version: u64,
    pub(super) pipeline: Box<dyn Pipeline>,
    pub(super) warmed: bool,
}

/// Everything hosts, worker and builder share; guarded by one mutex.
pub(super) struct Inner {
    pub(super) closed: bool,
    /// The worker thread itself panicked (outside the pipeline); nothing will run any more.
    pub(super) worker_dead: bool,

    pub(super) queue: VecDeque<Job>,
    pub(super) next_id: FrameId,
    pub(super) in_flight: Option<FrameId>,
    pub(super) outputs: VecDeque<Output>,
    /// Frames a [`process`](super::Engine::process) call waits for, by id: their outputs (or
    /// why there is none) go here instead of into `outputs`.
    pub(super) claims: HashMap<FrameId, Claim>,

    /// The last accepted parameters, their version, JSON, hash and time.
    pub(super) target: StreamDiffusionParams,
    pub(super) target_version: u64,
    /// How the target's prompt or seed change glides when the serving pipeline takes it.
    pub(super) target_transition: Transition,
    pub(super) target_json: serde_json::Value,
    pub(super) target_hash: String,
    pub(super) target_time: Option<u64>,
    /// Versions only grow, so a stale build can never be taken for a new one.
    pub(super) next_version: u64,
    /// Parameters and version of the serving pipeline.
    pub(super) serving: Option<(StreamDiffusionParams, u64)>,
    pub(super) ever_served: bool,

    /// The build wanted (picked up or not), kept until its pipeline is swapped in.
    pub(super) pending_build: Option<BuildTicket>,
    /// The build the builder has not picked up yet.
    pub(super) build_request: Option<BuildTicket>,
    /// A finished build for the worker to swap in.
    pub(super) ready: Option<Ready>,
    /// Pipelines for the builder to drop.
    pub(super) retired: Vec<Box<dyn Pipeline>>,
    /// Counts finished ControlNet preloads, so the worker looks at the target again.
    pub(super) preloads_done: u64,
    /// The last processed frame, to warm reloads up with.
    pub(super) last_frame: Option<Arc<Job>>,
    /// Why the first pipeline could not be built, for `wait_ready`.
    pub(super) initial_error: Option<Error>,
    pub(super) progress: Option<String>,

    /// Frames in and out, failures, errors, fps and timings (shared with the pipeline's report).
    pub(super) activity: Activity,
    pub(super) frames_dropped: u64,
    pub(super) outputs_dropped: u64,
    pub(super) reload_failures: u64,
    pub(super) builds_superseded: u64,
    /// Frames whose control images were made ahead, beside the frame before them.
    pub(super) frames_prepared_ahead: u64,
    /// The host's IP-Adapter style picture and its version (0: none ever set), which the
    /// worker hands to the serving pipeline before its next frame.
    pub(super) style: (u64, Option<crate::StyleImage>),
    pub(super) last_overflow: Option<Instant>,
    pub(super) restart_count: u64,
    pub(super) last_restart_time: Option<u64>,
    /// Hides the host's model folders in what the status and errors report (settings that
    /// serve ids from someone else; empty otherwise).
    pub(super) redactor: crate::hub::PathRedactor,
}

impl Inner {
    pub(super) fn new(params: StreamDiffusionParams, options: &EngineOptions) -> Self {
        let json = params_json(&params);
        Self {
            closed: false,
            worker_dead: false,
            queue: VecDeque::with_capacity(options.queue_capacity),
            next_id: 0,
            in_flight: None,
            outputs: VecDeque::with_capacity(options.output_capacity),
            claims: HashMap::new(),
            target_hash: params_hash(&params.to_json()),
            target_json: json,
            target: params,
            target_version: 0,
            target_transition: Transition::default(),
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
            activity: Activity::new(options.fps_window()),
            frames_dropped: 0,
            outputs_dropped: 0,
            reload_failures: 0,
            builds_superseded: 0,
            frames_prepared_ahead: 0,
            style: (0, None),
            last_overflow: None,
            restart_count: 0,
            last_restart_time: None,
            redactor: crate::hub::PathRedactor::default(),
        }
    }

    pub(super) fn record_error(&mut self, message: String) {
        self.activity.error(message);
    }

    pub(super) fn take_version(&mut self) -> u64 {
        let v = self.next_version;
        self.next_version += 1;
        v
    }

    pub(super) fn set_target(&mut self, params: StreamDiffusionParams, version: u64) {
        self.target_transition = Transition::default();
        self.target_hash = params_hash(&params.to_json());
        self.target_json = params_json(&params);
        self.target = params;
        self.target_version = version;
    }

    /// After a failed update: what is accepted is what serves. The serving parameters are
    /// accepted again under a new version, which the serving pipeline takes as its own (its
    /// parameters are those very ones), so that `params_version` never goes back to an older
    /// number while `serving_params_version` still matches it. Returns the new version (none
    /// when nothing serves, and the failed target stays as it was).
    pub(super) fn revert_target_to_serving(&mut self) -> Option<u64> {
        let (params, _) = self.serving.clone()?;
        let version = self.take_version();
        self.set_target(params.clone(), version);
        self.serving = Some((params, version));
        Some(version)
    }

    pub(super) fn is_wanted(&self, version: u64) -> bool {
        self.pending_build
            .as_ref()
            .is_some_and(|b| b.version == version)
    }

    /// Asks the builder for a pipeline (or a ControlNet preload); whatever was wanted before
    /// is superseded.
    pub(super) fn request_build(
        &mut self,
        version: u64,
        params: StreamDiffusionParams,
        kind: BuildKind,
    ) {
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
    pub(super) fn cancel_build(&mut self) {
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

    /// Drops every waiting frame, telling `process` callers `why`; returns how many.
    pub(super) fn drop_queue(&mut self, why: &str) -> usize {
        let n = self.queue.len();
        for job in std::mem::take(&mut self.queue) {
            self.lose_claim(job.id, why);
        }
        self.frames_dropped += n as u64;
        n
    }

    /// Where frame `id` is claimed by a `process` call, records that it produced no output
    /// because of `why`; returns whether it was claimed (its waiter must be woken).
    pub(super) fn lose_claim(&mut self, id: FrameId, why: &str) -> bool {
        match self.claims.get_mut(&id) {
            Some(claim @ Claim::Waiting) => {
                *claim = Claim::Lost(why.to_owned());
                true
            }
            _ => false,
        }
    }

    /// Delivers a processed frame: to its `process` caller when claimed, else to the poll
    /// queue (dropping the oldest output when that is full, which only `latest` allows).
    pub(super) fn deliver(&mut self, output: Output, output_capacity: usize) {
        if let Some(claim @ Claim::Waiting) = self.claims.get_mut(&output.id) {
            *claim = Claim::Done(Box::new(output));
            return;
        }
        if self.outputs.len() >= output_capacity {
            self.outputs.pop_front();
            self.outputs_dropped += 1;
        }
        self.outputs.push_back(output);
    }

    /// The outcome of claimed frame `id` once there is one (the claim is then released):
    /// its output, or why it produced none.
    pub(super) fn take_claim(&mut self, id: FrameId) -> Option<Result<Output>> {
        let pending = match self.claims.get(&id) {
            // A dead worker never finishes the frame.
            Some(Claim::Waiting) => !self.worker_dead,
            Some(_) => false,
            None => return Some(Err(Error::State(format!("frame {id} is not awaited")))),
        };
        if pending {
            return None;
        }
        Some(match self.claims.remove(&id) {
            Some(Claim::Done(output)) => Ok(*output),
            Some(Claim::Lost(why)) => Err(Error::NoOutput { id, reason: why }),
            _ => Err(Error::NoOutput {
                id,
                reason: "the engine's worker thread stopped".into(),
            }),
        })
    }

    pub(super) fn has_future(&self) -> bool {
        !self.worker_dead && (self.serving.is_some() || self.pending_build.is_some())
    }

    pub(super) fn state(&mut self, now: Instant, options: &EngineOptions) -> EngineState {
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
        let failing = recent(self.activity.last_failure);
        let input_fps = self.activity.input_meter.rate(now);
        let output_fps = self.activity.output_meter.rate(now);
        let lagging = recent(self.last_overflow) && output_fps < 0.5 * input_fps;
        if failing || lagging {
            EngineState::DegradedInference
        } else if self
            .activity
            .last_input
            .is_some_and(|t| now.saturating_duration_since(t) > options.input_timeout())
        {
            EngineState::DegradedInput
        } else {
            EngineState::Online
        }
    }

    pub(super) fn no_pipeline_error(&self) -> Error {
        Error::State(match &self.activity.last_error {
            Some(e) => format!(
                "the engine has no pipeline (last error: {}); call restart() or update_params()",
                self.redactor.redact(e)
            ),
            None => "the engine has no pipeline; call restart() or update_params()".into(),
        })
    }
}

pub(super) fn params_json(params: &StreamDiffusionParams) -> serde_json::Value {
    serde_json::from_str(&params.to_json()).unwrap_or(serde_json::Value::Null)
}

/// The message a panic carried.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

pub(super) fn closed_error() -> Error {
    Error::State("the engine is closed".into())
}

pub(super) struct Shared {
    pub(super) inner: Mutex<Inner>,
    /// Wakes the worker: a frame, new parameters, a finished build, close.
    pub(super) work: Condvar,
    /// Wakes the builder: a build request, a retired pipeline, close.
    pub(super) build: Condvar,
    /// Wakes hosts waiting for an output, room in the queue, or readiness.
    pub(super) host: Condvar,
    pub(super) options: EngineOptions,
    pub(super) settings: EngineSettings,
    pub(super) factory: Arc<dyn PipelineFactory>,
}

impl Shared {
    /// The state, even if some thread panicked while holding it (no invariant spans a panic:
    /// pipeline calls happen outside the lock).
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn wait<'a>(
        &self,
        cv: &Condvar,
        guard: MutexGuard<'a, Inner>,
    ) -> MutexGuard<'a, Inner> {
        cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `deadline`; returns the guard and whether the deadline has passed.
    pub(super) fn wait_until<'a>(
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

/// The frame's pixel rows, packed. The buffer is reserved fallibly: a host's frame within the
/// size bounds can still be more than this process can allocate, which must be an error, not an
/// abort.
pub(super) fn copy_packed(frame: &Frame) -> Result<Vec<u8>> {
    let row = frame.width() * frame.format().bytes_per_pixel();
    let (stride, height, data) = (frame.stride(), frame.height(), frame.data());
    let mut out = Vec::new();
    out.try_reserve_exact(row * height).map_err(|e| {
        Error::InvalidFrame(format!(
            "cannot allocate {} bytes for a copy of the {}x{height} {} frame: {e}",
            row * height,
            frame.width(),
            frame.format()
        ))
    })?;
    // Frame::new checked that `data` holds every row.
    for y in 0..height {
        out.extend_from_slice(&data[y * stride..y * stride + row]);
    }
    Ok(out)
}
