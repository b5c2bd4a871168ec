//! The threaded Engine on the tiny checkpoint (tests/fixtures/tiny-sd-turbo with
//! tests/fixtures/tiny-taesd, 64×64): outputs identical to calling the pipeline directly, hot
//! updates on the next frame, reloads that fail or swap without stopping the stream, warm-up,
//! and a stress run with concurrent producers and parameter changes.
//!
//! A binary of its own: its tests compare frame intervals and latencies with the typical frame
//! time, and a test running beside them in the same process (the integration binary runs ~230)
//! would take the cores they measure.

mod common;

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::fixture;
use sdstream::params::{ControlNetConfig, Prompt, VaeChoice};
use sdstream::{
    DropPolicy, Engine, EngineOptions, EngineSettings, EngineState, EngineStatus, Frame, FrameId,
    FrameInput, Image, Output, PixelFormat, StreamDiffusion, StreamDiffusionParams, Submission,
};

const SIZE: usize = 64;

fn settings() -> EngineSettings {
    EngineSettings {
        vae: VaeChoice::Custom(fixture("tiny-taesd").display().to_string()),
        allow_any_resolution: true,
        ..EngineSettings::default()
    }
}

fn params() -> StreamDiffusionParams {
    StreamDiffusionParams {
        model_id: fixture("tiny-sd-turbo").display().to_string(),
        prompt: Prompt::Text("a watercolor of a lighthouse".into()),
        width: SIZE as i64,
        height: SIZE as i64,
        ..StreamDiffusionParams::default()
    }
}

/// Roomy queues; an input timeout of a day, so a slow machine never reads as DEGRADED_INPUT.
fn options(policy: DropPolicy, warmup: bool) -> EngineOptions {
    EngineOptions {
        queue_capacity: 64,
        output_capacity: 64,
        drop_policy: policy,
        warmup,
        input_timeout_ms: EngineOptions::MAX_INPUT_TIMEOUT_MS,
        ..EngineOptions::default()
    }
}

/// The eight 64×64 RGB fixture frames.
fn frames() -> Vec<Vec<u8>> {
    (0..8)
        .map(|i| {
            let path = fixture(&format!("frames/{i:03}.png"));
            let img = image::open(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .to_rgb8();
            assert_eq!(img.dimensions(), (SIZE as u32, SIZE as u32));
            img.into_raw()
        })
        .collect()
}

fn frame(data: &[u8]) -> Frame<'_> {
    Frame::packed(data, SIZE, SIZE, PixelFormat::Rgb8).expect("64×64 RGB frame")
}

fn recv(engine: &Engine) -> Output {
    engine
        .recv_timeout(Duration::from_secs(60))
        .expect("recv")
        .expect("an output within 60 s")
}

/// (max, mean) absolute difference in 8-bit levels.
fn diff(a: &Image, b: &Image) -> (u8, f64) {
    assert_eq!((a.width, a.height, a.format), (b.width, b.height, b.format));
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.data.iter().zip(&b.data) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += u64::from(d);
    }
    (max, sum as f64 / a.data.len() as f64)
}

fn assert_counters_add_up(s: &EngineStatus) {
    assert_eq!(
        s.frames_submitted,
        s.frames_processed
            + s.frames_failed
            + s.frames_dropped
            + s.queue_depth as u64
            + s.frames_in_flight,
        "{s:#?}"
    );
}

/// The tests that assert no frame comes much later than the typical one run alone in this
/// binary: they hold this lock for writing, every other test for reading. Beside the stress
/// test's producers on CI's 2 cores a frame once took 164 ms against a median of 48.
static TIMING: RwLock<()> = RwLock::new(());

/// A test that may run beside others (but not beside a timing one).
fn shared() -> RwLockReadGuard<'static, ()> {
    TIMING.read().unwrap_or_else(|e| e.into_inner())
}

/// A timing test: no other test of this binary runs meanwhile.
fn alone() -> RwLockWriteGuard<'static, ()> {
    TIMING.write().unwrap_or_else(|e| e.into_inner())
}

/// Runs `body` on its own thread and fails if it has not finished after `limit` (a deadlock
/// shows as this failure instead of a hung test run).
fn within<T: Send + 'static>(limit: Duration, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let _ = tx.send(body());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => {
            let _ = handle.join();
            value
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("not finished after {limit:?}: deadlock?"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the body sent nothing and did not panic"),
        },
    }
}

#[test]
fn engine_outputs_equal_the_pipeline_called_directly() {
    let _timing = shared();
    let frames = frames();
    let mut direct = StreamDiffusion::new(params(), settings()).expect("pipeline");
    let engine =
        Engine::new(params(), settings(), options(DropPolicy::Lossless, false)).expect("engine");
    let ids: Vec<FrameId> = frames
        .iter()
        .map(|f| engine.submit(frame(f)).expect("submit"))
        .collect();
    for (i, f) in frames.iter().enumerate() {
        let expected = direct.process(&frame(f)).expect("direct");
        let out = recv(&engine);
        assert_eq!(out.id, ids[i]);
        assert_eq!((out.image.width, out.image.height), (SIZE, SIZE));
        assert_eq!(diff(&out.image, &expected), (0, 0.0), "frame {i}");
    }
    let status = engine.status();
    assert_eq!(status.frames_processed, 8);
    assert_counters_add_up(&status);
}

/// A frame as native-endian f32 RGB in [0, 1], so that outputs come back unrounded.
fn to_f32(rgb8: &[u8]) -> Vec<u8> {
    rgb8.iter()
        .flat_map(|&v| (f32::from(v) / 255.0).to_ne_bytes())
        .collect()
}

fn frame_f32(data: &[u8]) -> Frame<'_> {
    Frame::packed(data, SIZE, SIZE, PixelFormat::RgbF32).expect("64×64 f32 frame")
}

/// (max, mean) absolute difference of two f32 images, in [0, 1] units.
fn diff_f32(a: &Image, b: &Image) -> (f32, f32) {
    assert_eq!((a.width, a.height, a.format), (b.width, b.height, b.format));
    let values = |img: &Image| -> Vec<f32> {
        img.data
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let (va, vb) = (values(a), values(b));
    let mut max = 0f32;
    let mut sum = 0f64;
    for (x, y) in va.iter().zip(&vb) {
        let d = (x - y).abs();
        max = max.max(d);
        sum += f64::from(d);
    }
    (max, (sum / va.len() as f64) as f32)
}

#[test]
fn a_hot_update_is_visible_on_the_next_frame() {
    let _timing = shared();
    let frames: Vec<Vec<u8>> = frames().iter().map(|f| to_f32(f)).collect();
    let control = Engine::new(params(), settings(), options(DropPolicy::Lossless, false))
        .expect("control engine");
    let engine =
        Engine::new(params(), settings(), options(DropPolicy::Lossless, false)).expect("engine");
    let mut direct = StreamDiffusion::new(params(), settings()).expect("pipeline");
    let mut step = |i: usize, changed: Option<StreamDiffusionParams>| -> (Output, Output) {
        if let Some(changed) = changed {
            let update = engine.update_params(changed.clone()).expect("hot update");
            assert!(update.is_hot() && !update.is_unchanged(), "{update:?}");
            direct.update(changed).expect("direct update");
        }
        control.submit(frame_f32(&frames[i])).expect("submit");
        engine.submit(frame_f32(&frames[i])).expect("submit");
        let (before, after) = (recv(&control), recv(&engine));
        // Exactly what the pipeline gives with the update applied between the two frames.
        let expected = direct.process(&frame_f32(&frames[i])).expect("direct");
        assert_eq!(diff_f32(&after.image, &expected), (0.0, 0.0), "frame {i}");
        (before, after)
    };
    for i in 0..3 {
        let (before, after) = step(i, None);
        assert_eq!(diff_f32(&before.image, &after.image), (0.0, 0.0));
    }
    // The tiny checkpoint's random CLIP moves pictures little, but the very next frame moves.
    let mut prompt = params();
    prompt.prompt = Prompt::Text("a neon city at night, synthwave".into());
    let (before, after) = step(3, Some(prompt.clone()));
    assert_eq!((before.params_version, after.params_version), (0, 1));
    let (max, mean) = diff_f32(&before.image, &after.image);
    eprintln!("prompt change, next frame vs control: max {max:.2e}, mean {mean:.2e}");
    assert!(
        mean > 1e-5,
        "the next frame did not change: mean {mean:.2e}"
    );
    // A seed change (new noise) moves it more.
    let mut seed = prompt;
    seed.seed = 4242.into();
    let (before, after) = step(4, Some(seed));
    assert_eq!(after.params_version, 2);
    let (max, mean) = diff_f32(&before.image, &after.image);
    eprintln!("+ seed change, next frame vs control: max {max:.2e}, mean {mean:.2e}");
    assert!(mean > 1e-4, "the next frame barely changed: mean {mean:.3}");
}

#[test]
fn a_reload_to_a_missing_model_keeps_the_engine_serving() {
    let _timing = shared();
    let empty = std::env::temp_dir().join(format!("sdstream-empty-model-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("temp dir");
    let frames = frames();
    let engine =
        Engine::new(params(), settings(), options(DropPolicy::Latest, true)).expect("engine");
    let hash = engine.status().last_params_hash;
    let mut missing = params();
    missing.model_id = empty.display().to_string();
    let update = engine
        .update_params(missing)
        .expect("accepted: the folder exists");
    assert!(update.needs_reload());
    let mut served = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.status().reload_failures == 0 {
        assert!(
            Instant::now() < deadline,
            "the reload neither failed nor finished"
        );
        engine.submit(frame(&frames[served % 8])).expect("submit");
        // The serving pipeline's version: 0, or 2 once the failure reverted the update
        // (version 1) to the serving parameters under a new version.
        let version = recv(&engine).params_version;
        assert!(version == 0 || version == 2, "{version}");
        served += 1;
    }
    let status = engine.status();
    assert_eq!(status.state, EngineState::Online);
    let error = status.last_error.clone().unwrap_or_default();
    eprintln!("served {served} frames during the failed reload; last_error: {error}");
    assert!(error.contains(&empty.display().to_string()), "{error}");
    assert!(status.last_error_time.is_some());
    assert_eq!(
        status.last_params_hash, hash,
        "accepted parameters revert to the serving ones"
    );
    assert_eq!(
        (
            status.restart_count,
            status.params_version,
            status.serving_params_version
        ),
        (0, 2, Some(2)),
        "no reload; the version went on, to the serving pipeline's parameters"
    );
    engine.submit(frame(&frames[0])).expect("submit");
    assert_eq!(recv(&engine).image.width, SIZE);
    let _ = std::fs::remove_dir(&empty);
}

/// Median of durations.
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// A copy of the tiny checkpoint in a scratch folder of its own: the model pool shares weights
/// by folder, so loading the copy reads the files again.
fn checkpoint_copy(tag: &str) -> std::path::PathBuf {
    let dir = common::scratch_dir(&format!("engine-{tag}")).join("tiny-sd-turbo");
    common::copy_dir(&fixture("tiny-sd-turbo"), &dir);
    dir
}

fn remove_checkpoint_copy(copy: &std::path::Path) {
    let _ = std::fs::remove_dir_all(copy.parent().expect("scratch folder"));
}

/// Consecutive output intervals are compared with the typical frame time by this factor: the
/// build runs beside the stream on the same cores (2 here, shared with other jobs), so frames
/// during it are slower; a pipeline that stopped serving for the build would exceed it many
/// times over.
const GAP_FACTOR: f64 = 3.0;

#[test]
fn a_reload_swaps_in_without_a_gap() {
    let _timing = alone();
    within(Duration::from_secs(300), || {
        let frames = frames();
        let copy = checkpoint_copy("reload");
        let engine = Engine::new(
            params(),
            settings(),
            EngineOptions {
                queue_capacity: 1,
                ..options(DropPolicy::Latest, true)
            },
        )
        .expect("engine");
        // A feeder keeps the queue full, so output intervals are the worker's frame times.
        let stop = std::sync::atomic::AtomicBool::new(false);
        thread::scope(|scope| {
            scope.spawn(|| {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = engine.submit(frame(&frames[i % 8]));
                    i += 1;
                    thread::sleep(Duration::from_millis(1));
                }
            });
            let mut times: Vec<(Instant, u64, usize)> = Vec::new();
            let collect = |n: usize, times: &mut Vec<(Instant, u64, usize)>| {
                for _ in 0..n {
                    let out = recv(&engine);
                    times.push((Instant::now(), out.params_version, out.image.width));
                }
            };
            collect(15, &mut times);
            // A copy of the checkpoint in another folder: a full load from disk, not the
            // pool's shared weights (another spelling of the same folder would share them).
            let mut bigger = params();
            bigger.model_id = copy.display().to_string();
            bigger.width = 128;
            let requested = Instant::now();
            let update = engine.update_params(bigger).expect("reload");
            assert!(update.needs_reload());
            let swap_deadline = Instant::now() + Duration::from_secs(120);
            while times.last().is_some_and(|t| t.1 == 0) {
                assert!(
                    Instant::now() < swap_deadline,
                    "the reload never swapped in"
                );
                collect(1, &mut times);
            }
            collect(15, &mut times);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);

            let intervals: Vec<(Duration, u64, u64)> = times
                .windows(2)
                .map(|w| (w[1].0 - w[0].0, w[0].1, w[1].1))
                .collect();
            let old: Vec<Duration> = intervals[..10].iter().map(|i| i.0).collect();
            let new: Vec<Duration> = intervals[intervals.len() - 10..]
                .iter()
                .map(|i| i.0)
                .collect();
            let (old_median, new_median) = (median(old), median(new));
            let swap = intervals
                .iter()
                .find(|i| i.1 == 0 && i.2 == 1)
                .map(|i| i.0)
                .expect("a swap interval");
            let during: Vec<Duration> = times
                .windows(2)
                .filter(|w| w[0].0 >= requested && w[1].1 == 0)
                .map(|w| w[1].0 - w[0].0)
                .collect();
            let served_during = during.len();
            let max_during = during.iter().max().copied().unwrap_or_default();
            let build = times
                .iter()
                .find(|t| t.1 == 1)
                .map(|t| t.0 - requested)
                .unwrap_or_default();
            let typical = old_median.max(new_median);
            eprintln!(
                "frame interval: 64² median {old_median:?}, 128² median {new_median:?}; build + \
                 warm-up {build:?} with {served_during} frames served meanwhile (longest \
                 interval {max_during:?}); swap interval {swap:?}"
            );
            assert!(
                swap.as_secs_f64() <= GAP_FACTOR * typical.as_secs_f64(),
                "swap interval {swap:?} > {GAP_FACTOR} × {typical:?}"
            );
            assert!(
                max_during.as_secs_f64() <= GAP_FACTOR * typical.as_secs_f64(),
                "an interval of {max_during:?} during the build > {GAP_FACTOR} × {typical:?}"
            );
            assert!(
                times
                    .iter()
                    .all(|t| t.2 == if t.1 == 0 { SIZE } else { 128 })
            );
        });
        let status = engine.status();
        assert_eq!(
            (status.restart_count, status.serving_params_version),
            (1, Some(1))
        );
        assert!(status.last_error.is_none(), "{:?}", status.last_error);
        drop(engine);
        remove_checkpoint_copy(&copy);
    });
}

#[test]
fn warmup_makes_the_first_output_come_from_the_first_frame() {
    let _timing = shared();
    let frames = frames();
    let n = params().t_index_list.len();
    // The zero-buffer output: the first output of a fresh stream, whatever its input.
    let mut stream = StreamDiffusion::new(params(), settings()).expect("pipeline");
    let zero_buffer = stream.process(&frame(&frames[0])).expect("direct");
    let mut other = StreamDiffusion::new(params(), settings()).expect("pipeline");
    let zero_buffer_too = other.process(&frame(&frames[5])).expect("direct");
    assert_eq!(diff(&zero_buffer, &zero_buffer_too), (0, 0.0));
    // Frame 0 fed n times to a fresh stream: the n-th output is the first that comes from it,
    // and what the engine's n − 1 extra passes should give.
    let mut fresh = StreamDiffusion::new(params(), settings()).expect("pipeline");
    let mut expected = None;
    for _ in 0..n {
        expected = Some(fresh.process(&frame(&frames[0])).expect("direct"));
    }
    let expected = expected.expect("n ≥ 1");

    let cold =
        Engine::new(params(), settings(), options(DropPolicy::Lossless, false)).expect("engine");
    cold.submit(frame(&frames[0])).expect("submit");
    assert_eq!(diff(&recv(&cold).image, &zero_buffer), (0, 0.0));

    let warm =
        Engine::new(params(), settings(), options(DropPolicy::Lossless, true)).expect("engine");
    warm.submit(frame(&frames[0])).expect("submit");
    let first = recv(&warm);
    assert_eq!(
        diff(&first.image, &expected),
        (0, 0.0),
        "n − 1 extra passes"
    );
    let (max, mean) = diff(&first.image, &zero_buffer);
    eprintln!("warm first output vs zero-buffer output: max {max} levels, mean {mean:.3} levels");
    assert!(mean > 0.5, "warm-up changed little: mean {mean:.3} levels");
}

/// `skip_diffusion` under the engine: with warm-up on, every frame (the first included) comes
/// back as it went in, through the processors only (none here), and the engine counts them.
#[test]
fn skip_diffusion_frames_come_back_as_they_went_in() {
    let _timing = shared();
    let frames = frames();
    let skipping = StreamDiffusionParams {
        skip_diffusion: true,
        use_safety_checker: false,
        ..params()
    };
    let engine =
        Engine::new(skipping, settings(), options(DropPolicy::Lossless, true)).expect("engine");
    for (i, f) in frames.iter().enumerate() {
        engine.submit(frame(f)).expect("submit");
        let out = recv(&engine);
        assert_eq!(out.image.data, *f, "frame {i}");
    }
    let status = engine.status();
    assert_eq!(status.frames_processed, frames.len() as u64);
    assert_counters_add_up(&status);
}

#[test]
fn stress_producers_and_parameter_changes() {
    let _timing = shared();
    let (outputs, submitted, status) = within(Duration::from_secs(240), || {
        let frames = frames();
        let empty = std::env::temp_dir().join(format!("sdstream-stress-{}", std::process::id()));
        std::fs::create_dir_all(&empty).expect("temp dir");
        let copy = checkpoint_copy("stress");
        let engine = Engine::new(
            params(),
            settings(),
            EngineOptions {
                queue_capacity: 3,
                output_capacity: 8,
                ..options(DropPolicy::Latest, true)
            },
        )
        .expect("engine");
        let run_for = Duration::from_secs(6);
        let submitted = Mutex::new(Vec::new());
        let outputs = thread::scope(|scope| {
            for p in 0..3 {
                let (engine, submitted, frames) = (&engine, &submitted, &frames);
                scope.spawn(move || {
                    let start = Instant::now();
                    let mut i = p;
                    while start.elapsed() < run_for {
                        let id = engine.submit(frame(&frames[i % 8])).expect("submit");
                        submitted.lock().expect("ids").push(id);
                        i += 3;
                        thread::sleep(Duration::from_millis(3));
                    }
                });
            }
            let (engine, empty, copy) = (&engine, &empty, &copy);
            scope.spawn(move || {
                let start = Instant::now();
                // A fixed-seed LCG: the sequence differs per step but repeats per run.
                let mut state = 0x2545_f491_4f6c_dd1d_u64;
                let mut next = || {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1);
                    (state >> 33) as usize
                };
                while start.elapsed() < run_for {
                    // Changes on top of the last accepted parameters, so hot changes ride
                    // along with pending reloads and some reloads complete.
                    let mut p = engine.params();
                    let base = params().model_id;
                    match next() % 6 {
                        // Reload with the same weights (shared).
                        0 => p.width = if p.width == 128 { 64 } else { 128 },
                        // Reload from disk (a copy of the checkpoint in another folder).
                        1 => {
                            p.model_id = if p.model_id == base {
                                copy.display().to_string()
                            } else {
                                base
                            }
                        }
                        // Reload that fails.
                        2 => p.model_id = empty.display().to_string(),
                        // Invalid.
                        3 => p.guidance_scale = -1.0,
                        // Hot.
                        _ => p.prompt = Prompt::Text(format!("prompt {}", next() % 4)),
                    }
                    let _ = engine.update_params(p);
                    thread::sleep(Duration::from_millis(100 + (next() % 600) as u64));
                }
            });
            let consumer = scope.spawn(move || {
                let mut outs = Vec::new();
                let start = Instant::now();
                while start.elapsed() < run_for + Duration::from_millis(500) {
                    if let Ok(Some(out)) = engine.recv_timeout(Duration::from_millis(100)) {
                        outs.push((out.id, out.params_version));
                    }
                }
                outs
            });
            consumer.join().expect("consumer")
        });
        let mut outputs = outputs;
        // After the storm the engine still fails a bad reload and swaps a good one in.
        let settle = |what: &str, done: &dyn Fn(&EngineStatus) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done(&engine.status()) {
                assert!(
                    Instant::now() < deadline,
                    "after the stress: timed out on {what}"
                );
                thread::sleep(Duration::from_millis(10));
            }
        };
        settle("the builds", &|s| !s.reloading);
        let failures = engine.status().reload_failures;
        let mut bad = engine.params();
        bad.model_id = empty.display().to_string();
        engine.update_params(bad).expect("accepted");
        settle("a failing reload", &|s| s.reload_failures == failures + 1);
        let mut good = engine.params();
        good.width = if good.width == 128 { 64 } else { 128 };
        engine.update_params(good).expect("accepted");
        let version = engine.status().params_version;
        settle("a good reload", &|s| {
            s.serving_params_version == Some(version)
        });
        engine.close();
        while let Some(out) = engine.poll() {
            outputs.push((out.id, out.params_version));
        }
        let status = engine.status();
        let _ = std::fs::remove_dir(&empty);
        drop(engine);
        remove_checkpoint_copy(&copy);
        let submitted = submitted.into_inner().expect("ids");
        (outputs, submitted, status)
    });
    let known: HashSet<FrameId> = submitted.iter().copied().collect();
    eprintln!(
        "stress: {} submitted, {} processed, {} dropped, {} failed, {} outputs collected, {} \
         restarts, {} reload failures, {} builds superseded, {} errors",
        status.frames_submitted,
        status.frames_processed,
        status.frames_dropped,
        status.frames_failed,
        outputs.len(),
        status.restart_count,
        status.reload_failures,
        status.builds_superseded,
        status.error_count
    );
    // Liveness, not speed: how many frames fit in the window depends on the machine's load
    // (about 60 on an idle 2-core machine, under 20 at load average 12).
    assert!(outputs.len() >= 5, "only {} outputs", outputs.len());
    for pair in outputs.windows(2) {
        assert!(
            pair[0].0 < pair[1].0,
            "out of order: {:?} then {:?}",
            pair[0],
            pair[1]
        );
        assert!(
            pair[0].1 <= pair[1].1,
            "parameter versions went back: {pair:?}"
        );
    }
    assert!(outputs.iter().all(|(id, _)| known.contains(id)));
    assert_eq!(status.state, EngineState::Offline);
    assert_counters_add_up(&status);
    assert_eq!(status.frames_submitted, submitted.len() as u64);
    assert_eq!(
        status.frames_processed,
        outputs.len() as u64 + status.outputs_dropped
    );
    assert_eq!(status.frames_failed, 0);
    assert!(
        status.restart_count >= 1,
        "no reload swapped in: {status:#?}"
    );
    assert!(status.reload_failures >= 1, "no reload failed: {status:#?}");
}

#[test]
fn status_has_every_daydream_field() {
    let _timing = shared();
    let engine = Engine::builder(params())
        .settings(settings())
        .spawn()
        .expect("spawn");
    let loading: serde_json::Value =
        serde_json::from_str(&engine.status_json()).expect("status JSON");
    assert!(matches!(
        loading["state"].as_str(),
        Some("LOADING" | "ONLINE")
    ));
    engine
        .wait_ready(Some(Duration::from_secs(60)))
        .expect("ready");
    let frames = frames();
    engine.submit(frame(&frames[0])).expect("submit");
    let out = recv(&engine);
    assert!(out.timings.total > Duration::ZERO && out.timings.unet > Duration::ZERO);
    let status: serde_json::Value =
        serde_json::from_str(&engine.status_json()).expect("status JSON");
    for key in [
        "state",
        "input_fps",
        "output_fps",
        "last_input_time",
        "last_output_time",
        "last_params",
        "last_params_hash",
        "last_params_update_time",
        "last_error",
        "last_error_time",
        "restart_count",
        "last_restart_time",
    ] {
        assert!(status.get(key).is_some(), "no {key} in {status}");
    }
    assert_eq!(status["state"], "ONLINE");
    assert_eq!(status["last_params"]["width"], SIZE);
    assert!(
        status["last_output_time"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000)
    );
    assert!(status["timings"]["unet"].as_f64().is_some_and(|t| t > 0.0));
    engine.close();
    assert_eq!(engine.status().state, EngineState::Offline);
}

/// The base parameters with the fixture ControlNet `tiny-controlnet-a` at `scale`.
fn with_controlnet(scale: f64) -> StreamDiffusionParams {
    let mut p = params();
    let mut net =
        sdstream::params::ControlNetConfig::new(fixture("tiny-controlnet-a").display().to_string());
    net.conditioning_scale = scale;
    p.controlnets.push(net);
    p
}

#[test]
fn a_controlnet_added_and_rescaled_while_streaming_costs_no_frame() {
    let _timing = alone();
    within(Duration::from_secs(300), || {
        let frames = frames();
        // The pacing: 1.5 × a warm frame's processing time.
        let mut direct = StreamDiffusion::new(params(), settings()).expect("pipeline");
        let mut times = Vec::new();
        for f in &frames {
            let t = Instant::now();
            direct.process(&frame(f)).expect("direct");
            times.push(t.elapsed());
        }
        let interval = median(times).mul_f64(1.5);

        let engine = Engine::new(params(), settings(), options(DropPolicy::Lossless, false))
            .expect("engine");
        let (n, add_at, rescale_at) = (24, 8, 16);
        let mut ids = Vec::new();
        let mut versions = (0, 0);
        let mut received = Vec::new();
        let mut start = Instant::now();
        for i in 0..n {
            if i == add_at || i == rescale_at {
                // An update acts on the frames processed after it. When tests running beside
                // this one slow the engine below the pacing, frames still queued would take it
                // too: wait for the earlier frames' outputs, so that "the next frame" is frame
                // `i` on any machine, and resume the pacing from now.
                while received.len() < i {
                    let out = recv(&engine);
                    received.push((Instant::now(), out));
                }
                start = Instant::now() - interval.mul_f64(i as f64);
            }
            if i == add_at {
                let update = engine
                    .update_params(with_controlnet(0.5))
                    .expect("add a ControlNet");
                assert!(update.is_controlnet_swap(), "{update:?}");
                versions.0 = engine.status().params_version;
            }
            if i == rescale_at {
                let update = engine.update_params(with_controlnet(0.9)).expect("rescale");
                assert!(update.is_hot(), "{update:?}");
                versions.1 = engine.status().params_version;
            }
            ids.push(engine.submit(frame(&frames[i % 8])).expect("submit"));
            // Sleep to the next tick, collecting what is ready meanwhile.
            let tick = start + interval.mul_f64((i + 1) as f64);
            while Instant::now() < tick {
                if let Some(out) = engine.poll() {
                    received.push((Instant::now(), out));
                } else {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
        while received.len() < n {
            let out = recv(&engine);
            received.push((Instant::now(), out));
        }
        let got: Vec<FrameId> = received.iter().map(|(_, o)| o.id).collect();
        assert_eq!(
            got, ids,
            "every frame comes out once, in order (none dropped)"
        );

        // Where each update took effect, from the outputs' parameter versions.
        let first_with = |version: u64| {
            received
                .iter()
                .position(|(_, o)| o.params_version >= version)
                .expect("the update took effect")
        };
        let (acting, rescaled) = (first_with(versions.0), first_with(versions.1));
        println!(
            "interval {interval:?}; ControlNet attached from frame {acting} (added before {add_at}), \
             rescale from frame {rescaled} (changed before {rescale_at})"
        );
        assert!(
            (add_at..=add_at + 3).contains(&acting),
            "the ControlNet acted from frame {acting}, added before frame {add_at}"
        );
        assert_eq!(
            rescaled, rescale_at,
            "a scale change is hot: the next frame"
        );

        // Latency: no frame later than one interval beyond the typical one.
        let latencies: Vec<Duration> = received.iter().map(|(_, o)| o.latency).collect();
        let typical = median(latencies.clone());
        let worst = latencies.iter().max().copied().unwrap_or_default();
        println!("latency: median {typical:?}, worst {worst:?}");
        assert!(
            worst <= typical.mul_f64(GAP_FACTOR / 1.5) + interval,
            "a frame took {worst:?} (median {typical:?}, interval {interval:?})"
        );

        // And the pictures are the pipeline's with the same updates before the same frames.
        let mut direct = StreamDiffusion::new(params(), settings()).expect("pipeline");
        for (i, (_, out)) in received.iter().enumerate() {
            if i == acting {
                direct.update(with_controlnet(0.5)).expect("direct add");
            }
            if i == rescaled {
                direct.update(with_controlnet(0.9)).expect("direct rescale");
            }
            let expected = direct.process(&frame(&frames[i % 8])).expect("direct");
            assert_eq!(diff(&out.image, &expected), (0, 0.0), "frame {i}");
        }
        // The net changes the picture (frame `acting` onwards differs from no ControlNet).
        let mut plain = StreamDiffusion::new(params(), settings()).expect("pipeline");
        let plain_out: Vec<Image> = (0..n)
            .map(|i| plain.process(&frame(&frames[i % 8])).expect("plain"))
            .collect();
        let (max, mean) = diff(&received[n - 1].1.image, &plain_out[n - 1]);
        println!("last frame vs no ControlNet: max {max}, mean {mean:.2} levels");
        assert!(mean > 0.5, "the ControlNet had no visible effect ({mean})");
        let status = engine.status();
        assert_eq!(status.reload_failures, 0);
        assert_counters_add_up(&status);
    });
}

/// `params()` with the tiny fixture ControlNet fed by the host's control images.
fn params_with_external_net() -> (StreamDiffusionParams, String) {
    let id = fixture("tiny-controlnet-a").display().to_string();
    let mut net = ControlNetConfig::new(id.clone());
    net.preprocessor = "external".into();
    let mut p = params();
    p.controlnets = vec![net];
    (p, id)
}

/// A 48×40 RGBA8 control image (another size and format than the frames: it is resized like
/// them) with a pattern of its own.
fn control_image(phase: u32) -> Vec<u8> {
    let (w, h) = (48u32, 40u32);
    (0..h)
        .flat_map(|y| {
            (0..w).flat_map(move |x| {
                let v = (((x * 7 + y * 3 + phase * 29) % 64) * 4) as u8;
                [v, 255 - v, ((x * y + phase) % 256) as u8, 0]
            })
        })
        .collect()
}

fn control_frame(data: &[u8]) -> Frame<'_> {
    Frame::packed(data, 48, 40, PixelFormat::Rgba8).expect("48×40 RGBA control image")
}

#[test]
fn external_control_images_through_the_engine_equal_the_pipeline() {
    let _timing = shared();
    let (params, id) = params_with_external_net();
    let frames: Vec<Vec<u8>> = frames().iter().map(|f| to_f32(f)).collect();
    let controls = [control_image(0), control_image(1)];
    let mut direct = StreamDiffusion::new(params.clone(), settings()).expect("pipeline");
    let mut plain = StreamDiffusion::new(self::params(), settings()).expect("plain pipeline");
    let engine =
        Engine::new(params, settings(), options(DropPolicy::Lossless, false)).expect("engine");

    // An id naming no configured ControlNet: an error naming it, nothing queued.
    let err = engine
        .submit(
            Submission::new(frame_f32(&frames[0]))
                .control("no/such-net", control_frame(&controls[0])),
        )
        .expect_err("unknown ControlNet id");
    assert!(err.to_string().contains("no/such-net"), "{err}");
    assert_eq!(engine.status().frames_submitted, 0);

    // Frame 0 before any control image (the net contributes nothing), frames 1–2 with one,
    // frame 3 without (the most recent one is kept), frame 4 with another.
    let given: [Option<&Vec<u8>>; 5] = [
        None,
        Some(&controls[0]),
        Some(&controls[0]),
        None,
        Some(&controls[1]),
    ];
    for (i, control) in given.iter().enumerate() {
        let input = frame_f32(&frames[i]);
        let list: Vec<(&str, Frame)> = control
            .iter()
            .map(|c| (id.as_str(), control_frame(c)))
            .collect();
        let list: Vec<(&str, &Frame)> = list.iter().map(|(id, f)| (*id, f)).collect();
        let frame_id = engine
            .submit(
                Submission::new(input)
                    .controls(list.iter().map(|(id, f)| (*id, **f)))
                    .timestamp(1000 + i as i64),
            )
            .expect("submit with controls");
        let expected = direct
            .process(FrameInput::new(&input).controls(&list))
            .expect("direct process_with_controls");
        let without_net = plain.process(&input).expect("plain process");
        let out = recv(&engine);
        assert_eq!((out.id, out.timestamp), (frame_id, 1000 + i as i64));
        assert_eq!(diff_f32(&out.image, &expected), (0.0, 0.0), "frame {i}");
        let (max, mean) = diff_f32(&out.image, &without_net);
        eprintln!("frame {i}: engine with external net vs no net: max {max:.2e}, mean {mean:.2e}");
        if i == 0 {
            assert_eq!((max, mean), (0.0, 0.0), "frame 0 has no control image yet");
        } else {
            assert!(mean > 1e-4, "frame {i}: the control image changed nothing");
        }
    }
    let status = engine.status();
    assert_eq!((status.frames_processed, status.frames_failed), (5, 0));
    assert_counters_add_up(&status);
}
