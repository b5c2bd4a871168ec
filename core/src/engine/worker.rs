//! The worker thread: owns the serving pipeline, runs frames in order, applies hot updates
//! and swaps built pipelines in, always between two frames.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use crate::Result;
use crate::frame::Image;
use crate::model::kernels::KernelPolicy;
use crate::params::{StreamDiffusionParams, Transition, Update, classify};
use crate::pipeline::stream_diffusion::StageTimings;

use super::pipeline::{Pipeline, warmup_passes};
use super::state::{BuildKind, Inner, Job, PackedFrame, Ready, Shared, panic_message};
use super::{DropPolicy, Output};
use crate::pipeline::{ControlPreparer, PreparedControls};
use crate::status::epoch_ms;

/// The serving pipeline, as the worker holds it.
pub(super) struct Live {
    pipeline: Box<dyn Pipeline>,
    version: u64,
    /// Whether its stream batch has been primed (always true with warm-up off).
    warmed: bool,
    /// The control images of the next queued frame, being made on the prepare thread while
    /// this pipeline processes the frame before it.
    lookahead: Option<Lookahead>,
    /// The thread that makes them (started at the first frame that has images to make ahead).
    prepare: Option<PrepareThread>,
    /// The version of the host's style picture this pipeline has (see `Inner::style`).
    style_version: u64,
}

/// A queued frame's control images in the making (see [`start_lookahead`]).
struct Lookahead {
    id: crate::engine::FrameId,
    images: mpsc::Receiver<Result<PreparedControls>>,
}

/// One frame's control images to make ahead, and where they go.
struct PrepareJob {
    preparer: ControlPreparer,
    input: PackedFrame,
    policy: KernelPolicy,
    images: mpsc::SyncSender<Result<PreparedControls>>,
}

/// The thread that makes queued frames' control images ahead (see [`start_lookahead`]), one for
/// a serving pipeline's life, taking the frames one after another. A thread per frame opened
/// the libraries' per-thread state anew every frame (a cuDNN handle and its plans, cuBLASLt's
/// workspace) and closed it as the thread ended, and closing a cuDNN handle waits for the whole
/// device (cuDNN's documentation says `cudnnDestroy` synchronises it): a frame with a network
/// preprocessor then waited, at the join, for every stream's work on the GPU. The thread ends
/// when its pipeline is dropped (the channel closes) and its last frame is made.
struct PrepareThread {
    jobs: mpsc::Sender<PrepareJob>,
}

impl PrepareThread {
    fn start() -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<PrepareJob>();
        std::thread::Builder::new()
            .name("sdstream-prepare".into())
            .spawn(move || {
                for job in queue {
                    let made = job.policy.scoped(|| {
                        catch_unwind(AssertUnwindSafe(|| {
                            job.preparer.prepare(&job.input.frame()?)
                        }))
                        .unwrap_or_else(|panic| {
                            Err(crate::Error::State(format!(
                                "preparing control images panicked: {}",
                                panic_message(panic.as_ref())
                            )))
                        })
                    });
                    // Nobody waits for a stale frame's images (the `latest` policy dropped it).
                    let _ = job.images.send(made);
                }
            })?;
        Ok(Self { jobs })
    }
}

pub(super) enum Action {
    Exit,
    Swap(Ready),
    Apply {
        params: Box<StreamDiffusionParams>,
        version: u64,
        update: Update,
        transition: Transition,
    },
    Frame(Job),
}

pub(super) fn run_worker(shared: &Shared) {
    let mut live: Option<Live> = None;
    let outcome = catch_unwind(AssertUnwindSafe(|| worker_loop(shared, &mut live)));
    if let Err(panic) = outcome {
        let mut s = shared.lock();
        s.worker_dead = true;
        s.serving = None;
        s.in_flight = None;
        s.drop_queue("the engine's worker thread panicked");
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

pub(super) fn worker_loop(shared: &Shared, live: &mut Option<Live>) {
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
                    lookahead: None,
                    prepare: None,
                    style_version: 0,
                });
                examined = None;
                // Outside the lock: the host's calls need not wait for the device.
                let settled = old
                    .as_ref()
                    .and_then(|old| settle_for_retiring(old.pipeline.as_ref()));
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
                    retire(&mut s, old.pipeline, settled);
                    shared.build.notify_one();
                }
                drop(s);
                shared.host.notify_all();
            }
            Action::Apply {
                params,
                version,
                update,
                transition,
            } => {
                let Some(l) = live.as_mut() else { continue };
                let result = catch_unwind(AssertUnwindSafe(|| {
                    l.pipeline.update((*params).clone(), transition)
                }));
                let mut s = shared.lock();
                match result {
                    Ok(Ok(_)) => {
                        l.version = version;
                        if update.resets_stream_batch() && shared.options.warmup {
                            l.warmed = false;
                        }
                        s.serving = Some((*params, version));
                    }
                    Ok(Err(e)) => {
                        s.record_error(format!(
                            "applying parameters version {version} failed, the previous ones stay: {e}"
                        ));
                        if s.target_version == version
                            && let Some(reverted) = s.revert_target_to_serving()
                        {
                            // The pipeline kept the serving parameters: it serves the
                            // reverted version as it is, without applying them again.
                            l.version = reverted;
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
pub(super) fn next_action(
    shared: &Shared,
    live: Option<&Live>,
    examined: &mut Option<(u64, u64)>,
) -> Action {
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
                    // A hot change or a ControlNet swap is taken in place once the networks
                    // it needs are loaded (a preload brings them).
                    let in_place = (update.is_hot() || update.is_controlnet_swap())
                        && shared
                            .factory
                            .networks_ready(&s.target, &update.added_controlnet_ids());
                    if in_place {
                        return Action::Apply {
                            params: Box::new(s.target.clone()),
                            version: s.target_version,
                            update,
                            transition: s.target_transition,
                        };
                    }
                    if s.pending_build.is_none() {
                        // update_params requests a build (or a preload) for any target the
                        // serving pipeline cannot take in place; this only guards that rule.
                        let kind = if update.is_controlnet_swap() || update.is_hot() {
                            BuildKind::Preload
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
                    s.drop_queue("the engine has no pipeline (see last_error)");
                    shared.host.notify_all();
                }
            }
        }
        s = shared.wait(&shared.work, s);
    }
}

pub(super) fn run_frame(shared: &Shared, live: &mut Option<Live>, job: Job) {
    let Some(l) = live.as_mut() else {
        let mut s = shared.lock();
        s.in_flight = None;
        s.frames_dropped += 1;
        s.lose_claim(job.id, "the engine has no pipeline (see last_error)");
        drop(s);
        shared.host.notify_all();
        return;
    };
    let style = {
        let s = shared.lock();
        (s.style.0 != l.style_version).then(|| s.style.clone())
    };
    if let Some((version, picture)) = style {
        l.style_version = version;
        let applied = catch_unwind(AssertUnwindSafe(|| l.pipeline.set_style_image(picture)));
        match applied {
            Ok(Ok(())) => {}
            Ok(Err(e)) => shared
                .lock()
                .record_error(format!("the host's style picture was not taken: {e}")),
            Err(_) => shared.lock().record_error(
                "the host's style picture was not taken: the pipeline panicked".into(),
            ),
        }
    }
    let passes = if l.warmed {
        0
    } else {
        warmup_passes(l.pipeline.params())
    };
    l.warmed = true;
    // This frame's images if they were made ahead (a stale lookahead, for a frame the `latest`
    // policy dropped, is left to finish on its own), then the next frame's, beside this one.
    let prepared = match l.lookahead.take() {
        Some(ahead) if ahead.id == job.id => ahead.images.recv().ok().and_then(Result::ok),
        _ => None,
    };
    if prepared.is_some() {
        shared.lock().frames_prepared_ahead += 1;
    }
    start_lookahead(shared, l, &job);
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<(Image, StageTimings)> {
        for _ in 0..passes {
            job.process(l.pipeline.as_mut(), None)?;
        }
        let image = job.process(l.pipeline.as_mut(), prepared)?;
        Ok((image, l.pipeline.timings()))
    }));
    let version = l.version;
    let mut s = shared.lock();
    s.in_flight = None;
    match result {
        Ok(Ok((image, timings))) => {
            let now = Instant::now();
            let latency = now.saturating_duration_since(job.submitted);
            s.activity.frame_out(now, timings, latency);
            let output = Output {
                id: job.id,
                timestamp: job.timestamp,
                image,
                timings,
                params_version: version,
                latency,
            };
            // A full poll queue only happens under Latest: Lossless never takes a frame
            // without room for its output.
            s.deliver(output, shared.options.output_capacity);
            if shared.options.warmup {
                s.last_frame = Some(Arc::new(job));
            }
        }
        Ok(Err(e)) => {
            s.lose_claim(job.id, &format!("it failed: {e}"));
            s.activity
                .frame_failed(Instant::now(), format!("frame {} failed: {e}", job.id));
        }
        Err(panic) => {
            s.activity.frames_failed += 1;
            s.activity.last_failure = Some(Instant::now());
            let what = format!("processing frame {}", job.id);
            s.lose_claim(
                job.id,
                &format!("the pipeline panicked: {}", panic_message(panic.as_ref())),
            );
            crash(shared, &mut s, live, &what, panic.as_ref());
        }
    }
    drop(s);
    shared.host.notify_all();
}

/// Starts making the control images of the next queued frame (if any, and if the pipeline has
/// preprocessors that can run ahead) on a helper thread, so that they overlap `current`'s
/// diffusion; the worker takes them when that frame's turn comes. Nothing here can fail the
/// current frame: a preparer that cannot be made, or images that fail, leave the frame to make
/// its images itself.
fn start_lookahead(shared: &Shared, live: &mut Live, current: &Job) {
    let next = {
        let s = shared.lock();
        s.queue.front().map(|job| (job.id, job.input.clone()))
    };
    let Some((id, input)) = next else {
        return;
    };
    let preparer = catch_unwind(AssertUnwindSafe(|| {
        current
            .input
            .frame()
            .and_then(|frame| live.pipeline.control_preparer(&frame))
    }));
    let Ok(Ok(Some(preparer))) = preparer else {
        return;
    };
    if live.prepare.is_none() {
        live.prepare = PrepareThread::start().ok();
    }
    let Some(thread) = &live.prepare else {
        return;
    };
    let (images, made) = mpsc::sync_channel(1);
    let job = PrepareJob {
        preparer,
        input,
        policy: KernelPolicy::current(),
        images,
    };
    if thread.jobs.send(job).is_ok() {
        live.lookahead = Some(Lookahead { id, images: made });
    } else {
        // The thread is gone (it catches every panic, so this is not expected): the next
        // frame starts another.
        live.prepare = None;
    }
}

/// Waits until the work this thread queued for `pipeline` (a hot update's prompt, a frame
/// that failed half-way) is done, before it goes to the builder thread to be dropped: its
/// buffers are freed on the builder's CUDA stream, which nothing orders with this one's, and
/// the builder's next allocation could take them while this thread's kernels still write
/// them. What went wrong, if the device would not wait (the pipeline is retired all the same).
fn settle_for_retiring(pipeline: &dyn Pipeline) -> Option<String> {
    let settled = catch_unwind(AssertUnwindSafe(|| pipeline.settle())).unwrap_or_else(|_| {
        Err(crate::Error::State(
            "waiting for the device panicked".into(),
        ))
    });
    settled
        .err()
        .map(|e| format!("waiting for the retired pipeline's work failed: {e}"))
}

/// Hands `pipeline`, settled ([`settle_for_retiring`]), to the builder thread to drop.
fn retire(s: &mut Inner, pipeline: Box<dyn Pipeline>, settled: Option<String>) {
    if let Some(failure) = settled {
        s.record_error(failure);
    }
    s.retired.push(pipeline);
}

/// A panic inside the pipeline: its state cannot be trusted, so it is discarded (the builder
/// drops it) and the engine has no pipeline until a build brings one.
pub(super) fn crash(
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
        let settled = settle_for_retiring(dead.pipeline.as_ref());
        retire(s, dead.pipeline, settled);
        shared.build.notify_one();
    }
    shared.host.notify_all();
}
