//! The engine's scheduling with stand-in pipelines: ordering, counters, hot updates, reload
//! swaps, supersession, failures, panics, back-pressure, warm-up, shutdown. (Tests on the real
//! networks are in core/tests/engine.rs.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::pipeline::{Pipeline, PipelineFactory};
use super::*;
use crate::params::{Prompt, Transition};
use crate::pipeline::stream_diffusion::{FrameInput, StageTimings};
use crate::{Frame, Image, PixelFormat};

/// Outputs one RGB pixel: [first input byte, width / 64, calls so far (warm-up included)].
/// Prompt "panic" panics, prompt "fail" fails.
struct Fake {
    params: StreamDiffusionParams,
    delay: Duration,
    calls: u8,
    /// The factory's loaded ControlNets: a swap must find its nets there.
    loaded: Arc<Mutex<Vec<String>>>,
    /// Frames wait here while a test holds it closed.
    frame_gate: Arc<Gate>,
    /// Every transition an update came with, in order (shared with the factory).
    transitions: Arc<Mutex<Vec<(String, Transition)>>>,
}

impl Pipeline for Fake {
    fn process(&mut self, input: FrameInput<'_>) -> Result<Image> {
        let frame = input.frame();
        self.frame_gate.pass();
        thread::sleep(self.delay);
        match self.params.prompt.texts().first().copied() {
            Some("panic") => panic!("the fake pipeline was asked to panic"),
            Some("fail") => return Err(Error::State("the fake pipeline was asked to fail".into())),
            _ => {}
        }
        self.calls = self.calls.wrapping_add(1);
        Ok(Image {
            width: 1,
            height: 1,
            format: PixelFormat::Rgb8,
            data: vec![
                frame.data().first().copied().unwrap_or(0),
                (self.params.width / 64) as u8,
                self.calls,
            ],
        })
    }

    fn update(&mut self, params: StreamDiffusionParams, transition: Transition) -> Result<Update> {
        let update = classify(&self.params, &params);
        if let Prompt::Text(text) = &params.prompt {
            self.transitions
                .lock()
                .expect("transitions")
                .push((text.clone(), transition));
        }
        assert!(
            update.is_hot() || update.is_controlnet_swap(),
            "the engine asked for an in-place reload: {update:?}"
        );
        if let Update::ControlNetSwap { added, .. } = &update {
            let loaded = self.loaded.lock().expect("loaded list");
            for net in added {
                assert!(
                    loaded.contains(&net.model_id),
                    "the engine attached {} before loading it",
                    net.model_id
                );
            }
        }
        self.params = params;
        Ok(update)
    }

    fn params(&self) -> &StreamDiffusionParams {
        &self.params
    }

    fn timings(&self) -> StageTimings {
        StageTimings {
            total: self.delay,
            ..StageTimings::default()
        }
    }
}

/// Builds [`Fake`]s after `build_delay`; width 1024 fails to "load", prompt "panic-build"
/// panics. ControlNets "load" in `preload_delay`; ids containing "depth" fail to.
struct FakeFactory {
    build_delay: Duration,
    frame_delay: Duration,
    preload_delay: Duration,
    builds: AtomicUsize,
    preloads: AtomicUsize,
    loaded: Arc<Mutex<Vec<String>>>,
    /// While closed, builds and preloads wait (after counting themselves): tests hold a load
    /// open for as many frames as they like, with no clock involved.
    gate: Gate,
    /// The same for frames, in every pipeline this factory builds.
    frame_gate: Arc<Gate>,
    /// The transitions updates came with, in every pipeline this factory builds.
    transitions: Arc<Mutex<Vec<(String, Transition)>>>,
}

/// A door the factory's loads wait at; open unless a test closes it.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn close(&self) {
        *self.closed.lock().expect("gate") = true;
    }

    fn open(&self) {
        *self.closed.lock().expect("gate") = false;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let mut closed = self.closed.lock().expect("gate");
        while *closed {
            closed = self.opened.wait(closed).expect("gate");
        }
    }
}

impl FakeFactory {
    fn new(build_ms: u64, frame_ms: u64) -> Arc<Self> {
        Self::with_preload(build_ms, frame_ms, 0)
    }

    fn with_preload(build_ms: u64, frame_ms: u64, preload_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            build_delay: Duration::from_millis(build_ms),
            frame_delay: Duration::from_millis(frame_ms),
            preload_delay: Duration::from_millis(preload_ms),
            builds: AtomicUsize::new(0),
            preloads: AtomicUsize::new(0),
            loaded: Arc::new(Mutex::new(Vec::new())),
            gate: Gate::default(),
            frame_gate: Arc::default(),
            transitions: Arc::default(),
        })
    }
}

impl PipelineFactory for FakeFactory {
    fn build(
        &self,
        params: &StreamDiffusionParams,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Box<dyn Pipeline>> {
        self.builds.fetch_add(1, Ordering::SeqCst);
        progress("fake load");
        self.gate.pass();
        thread::sleep(self.build_delay);
        if params.width == 1024 {
            return Err(Error::ModelLoad {
                path: "fake/unet.safetensors".into(),
                detail: "no such file".into(),
            });
        }
        if params.prompt.texts().first() == Some(&"panic-build") {
            panic!("the fake factory was asked to panic");
        }
        Ok(Box::new(Fake {
            params: params.clone(),
            delay: self.frame_delay,
            calls: 0,
            loaded: self.loaded.clone(),
            frame_gate: self.frame_gate.clone(),
            transitions: self.transitions.clone(),
        }))
    }

    fn preload_networks(
        &self,
        params: &StreamDiffusionParams,
        progress: &mut dyn FnMut(&str),
    ) -> Result<()> {
        self.preloads.fetch_add(1, Ordering::SeqCst);
        progress("fake ControlNet load");
        self.gate.pass();
        thread::sleep(self.preload_delay);
        let mut loaded = self.loaded.lock().expect("loaded list");
        for net in &params.controlnets {
            if net.model_id.contains("depth") {
                return Err(Error::ModelLoad {
                    path: format!("fake/{}/diffusion_pytorch_model.safetensors", net.model_id)
                        .into(),
                    detail: "no such file".into(),
                });
            }
            if !loaded.contains(&net.model_id) {
                loaded.push(net.model_id.clone());
            }
        }
        Ok(())
    }

    fn networks_ready(&self, _params: &StreamDiffusionParams, ids: &[&str]) -> bool {
        let loaded = self.loaded.lock().expect("loaded list");
        ids.iter().all(|id| loaded.iter().any(|l| l == id))
    }
}

fn params_with(prompt: &str, width: i64) -> StreamDiffusionParams {
    StreamDiffusionParams {
        prompt: Prompt::Text(prompt.into()),
        width,
        ..StreamDiffusionParams::default()
    }
}

fn engine(factory: Arc<FakeFactory>, options: EngineOptions) -> Engine {
    let engine = Engine::spawn_with_factory(
        params_with("flowers", 512),
        EngineSettings::default(),
        options,
        factory,
    )
    .expect("spawn");
    engine
        .wait_ready(Some(Duration::from_secs(10)))
        .expect("ready");
    engine
}

fn pixel(value: u8) -> [u8; 3] {
    [value, 0, 0]
}

fn submit(engine: &Engine, value: u8) -> Result<FrameId> {
    let data = pixel(value);
    let frame = Frame::packed(&data, 1, 1, PixelFormat::Rgb8)?;
    engine.submit(frame)
}

fn recv(engine: &Engine) -> Output {
    engine
        .recv_timeout(Duration::from_secs(10))
        .expect("recv")
        .expect("an output within 10 s")
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

fn assert_counters_add_up(status: &EngineStatus) {
    assert_eq!(
        status.frames_submitted,
        status.frames_processed
            + status.frames_failed
            + status.frames_dropped
            + status.queue_depth as u64
            + status.frames_in_flight,
        "counters: {status:#?}"
    );
}

#[test]
fn outputs_follow_inputs_with_ids_timestamps_and_versions() {
    let engine = engine(
        FakeFactory::new(0, 1),
        EngineOptions {
            queue_capacity: 16,
            warmup: false,
            ..EngineOptions::default()
        },
    );
    let data = pixel(7);
    let frame = Frame::packed(&data, 1, 1, PixelFormat::Rgb8).expect("frame");
    let id = engine
        .submit(Submission::new(frame).timestamp(123_456))
        .expect("submit");
    let out = recv(&engine);
    assert_eq!(
        (out.id, out.timestamp, out.params_version),
        (id, 123_456, 0)
    );
    assert_eq!(out.image.data, vec![7, 8, 1]);
    // A strided frame is copied row by row without its padding.
    let strided = [1u8, 2, 3, 99, 4, 5, 6, 99];
    let frame = Frame::new(&strided, 1, 2, 4, PixelFormat::Rgb8).expect("frame");
    engine.submit(frame).expect("submit");
    assert_eq!(recv(&engine).image.data[0], 1);
    let status = engine.status();
    assert_eq!(status.state, EngineState::Online);
    assert_eq!((status.frames_submitted, status.frames_processed), (2, 2));
    assert!(status.last_output_time.is_some() && status.last_input_time.is_some());
    // Both frames' latencies are counted, each once, and they add up to their sum.
    let latency = &status.frame_latency;
    assert_eq!(latency.count, 2);
    assert_eq!(latency.counts.iter().sum::<u64>(), 2);
    assert_eq!(latency.cumulative().last(), Some(&(f64::INFINITY, 2)));
    assert!(latency.sum_seconds > 0.0 && latency.sum_seconds.is_finite());
    let json: serde_json::Value = serde_json::from_str(&engine.status_json()).expect("status JSON");
    assert_eq!(json["frame_latency"]["count"], 2);
    // The percentiles of the same two frames: the larger is p90 and p99, and p50 is one of them.
    let recent = status.latency_ms;
    assert_eq!(recent.frames, 2);
    let (p50, p99) = (recent.p50.unwrap(), recent.p99.unwrap());
    assert!(
        p50 > 0.0 && p50 <= p99 && recent.p90 == Some(p99),
        "{recent:?}"
    );
    assert!((p99 / 1e3) <= latency.sum_seconds + 1e-12);
    assert_eq!(json["latency_ms"]["frames"], 2);
    assert_eq!(json["state"], "ONLINE");
    assert_eq!(json["last_params"]["prompt"], "flowers");
    assert_eq!(json["last_params_hash"].as_str().map(str::len), Some(16));
}

#[test]
fn hot_update_applies_on_the_next_frame() {
    let engine = engine(
        FakeFactory::new(0, 1),
        EngineOptions {
            warmup: false,
            ..EngineOptions::default()
        },
    );
    submit(&engine, 1).expect("submit");
    assert_eq!(recv(&engine).params_version, 0);
    let update = engine
        .update_params(params_with("a cat", 512))
        .expect("hot update");
    assert!(update.is_hot() && !update.is_unchanged());
    let hash_before = engine.status().last_params_hash;
    submit(&engine, 2).expect("submit");
    let out = recv(&engine);
    assert_eq!(out.params_version, 1, "the next frame runs the new prompt");
    assert_eq!(engine.status().serving_params_version, Some(1));
    // Invalid parameters change nothing.
    let invalid = params_with("a cat", 100);
    assert!(matches!(
        engine.update_params(invalid),
        Err(Error::InvalidParam { .. })
    ));
    assert_eq!(engine.status().last_params_hash, hash_before);
    assert_eq!(engine.status().params_version, 1);
}

#[test]
fn a_transition_reaches_the_pipeline_with_its_update_and_a_later_one_replaces_it() {
    let factory = FakeFactory::new(0, 1);
    let engine = engine(
        factory.clone(),
        EngineOptions {
            warmup: false,
            ..EngineOptions::default()
        },
    );
    submit(&engine, 1).expect("submit");
    recv(&engine);
    let glide = Transition::new(8, crate::params::InterpolationMethod::Slerp);
    engine
        .update_params_with_transition(params_with("a cat", 512), glide)
        .expect("update");
    submit(&engine, 2).expect("submit");
    recv(&engine);
    // Two updates before the next frame: the pipeline takes the last, with its own transition
    // (none: instant).
    factory.frame_gate.close();
    submit(&engine, 3).expect("submit");
    wait_for("the frame to be in flight", || {
        engine.status().frames_in_flight == 1
    });
    engine
        .update_params_with_transition(params_with("a dog", 512), glide)
        .expect("update");
    engine
        .update_params(params_with("a fox", 512))
        .expect("update");
    factory.frame_gate.open();
    recv(&engine);
    submit(&engine, 4).expect("submit");
    recv(&engine);
    let seen = factory.transitions.lock().expect("transitions").clone();
    assert_eq!(
        seen,
        vec![
            ("a cat".to_owned(), glide),
            ("a fox".to_owned(), Transition::default())
        ]
    );
    // A transition out of range is refused and changes nothing.
    let too_long = Transition::new(
        Transition::MAX_STEPS + 1,
        glide.temporal_interpolation_method,
    );
    assert!(matches!(
        engine.update_params_with_transition(params_with("a hen", 512), too_long),
        Err(Error::InvalidParam { field, .. }) if field == "transition.num_steps"
    ));
    assert_eq!(engine.params().prompt, Prompt::Text("a fox".into()));
}

#[test]
fn reload_builds_beside_the_serving_pipeline_and_swaps_between_frames() {
    let factory = FakeFactory::new(0, 5);
    let engine = engine(
        factory.clone(),
        EngineOptions {
            warmup: false,
            ..EngineOptions::default()
        },
    );
    // The build is held open at the gate for as long as the test serves frames.
    factory.gate.close();
    let update = engine
        .update_params(params_with("flowers", 576))
        .expect("reload");
    assert!(update.needs_reload());
    while factory.builds.load(Ordering::SeqCst) < 2 {
        thread::yield_now();
    }
    for _ in 0..20 {
        submit(&engine, 1).expect("submit");
        let out = recv(&engine);
        assert_eq!(
            (out.params_version, out.image.data[1]),
            (0, 8),
            "the old pipeline serves while the new one builds"
        );
        assert!(engine.status().reloading);
    }
    factory.gate.open();
    let mut old = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the reload never swapped in");
        submit(&engine, 1).expect("submit");
        let out = recv(&engine);
        if out.params_version == 0 {
            assert_eq!(out.image.data[1], 8);
            old += 1;
        } else {
            assert_eq!((out.params_version, out.image.data[1]), (1, 9));
            break;
        }
    }
    println!("{old} more frames from the old pipeline after the build finished");
    let status = engine.status();
    assert_counters_add_up(&status);
    assert_eq!(
        (
            status.frames_submitted,
            status.frames_processed,
            status.frames_failed
        ),
        (21 + old, 21 + old, 0),
        "every frame came out, none failed, across the swap"
    );
    assert_eq!((status.restart_count, status.reloading), (1, false));
    assert!(status.last_restart_time.is_some());
    assert_eq!(factory.builds.load(Ordering::SeqCst), 2);
}

#[test]
fn a_newer_update_supersedes_a_build_in_progress() {
    let factory = FakeFactory::new(200, 1);
    let engine = engine(factory.clone(), EngineOptions::default());
    engine
        .update_params(params_with("flowers", 576))
        .expect("reload");
    thread::sleep(Duration::from_millis(50)); // the 576 build is under way
    engine
        .update_params(params_with("flowers", 640))
        .expect("reload");
    engine
        .update_params(params_with("flowers", 704))
        .expect("reload");
    // A hot change on top of the wanted reload rides along instead of rebuilding.
    engine
        .update_params(params_with("roses", 704))
        .expect("hot on top");
    wait_for("the 704 pipeline", || {
        engine.status().serving_params_version == Some(4)
    });
    let status = engine.status();
    assert_eq!(status.last_params["width"], 704);
    assert_eq!(status.last_params["prompt"], "roses");
    // 576 finished stale, 640 never started; initial + 576 + 704 were built.
    assert_eq!(status.builds_superseded, 2);
    assert_eq!(factory.builds.load(Ordering::SeqCst), 3);
    assert_eq!(status.restart_count, 1);
    submit(&engine, 3).expect("submit");
    assert_eq!(recv(&engine).image.data[1], 11);

    // An update the serving pipeline takes in place cancels a wanted reload.
    engine
        .update_params(params_with("roses", 768))
        .expect("reload");
    engine
        .update_params(params_with("tulips", 704))
        .expect("hot");
    wait_for("the cancelled build to finish and the hot change", || {
        let status = engine.status();
        status.builds_superseded == 3 && status.serving_params_version == Some(6)
    });
    let status = engine.status();
    assert!(!status.reloading);
    assert_eq!(status.serving_params_version, Some(6));
    assert_eq!(status.restart_count, 1);
}

fn with_controlnet(mut params: StreamDiffusionParams, id: &str) -> StreamDiffusionParams {
    params
        .controlnets
        .push(crate::params::ControlNetConfig::new(id));
    params
        .validate(&EngineSettings::default())
        .expect("valid parameters");
    params
}

#[test]
fn a_controlnet_swap_loads_on_the_builder_while_frames_flow() {
    // The net's load is held open at the gate: the worker must keep serving meanwhile.
    let factory = FakeFactory::with_preload(0, 10, 0);
    let options = EngineOptions {
        drop_policy: DropPolicy::Lossless,
        queue_capacity: 256,
        output_capacity: 256,
        ..EngineOptions::default()
    };
    let engine = engine(factory.clone(), options);
    let canny = "thibaud/controlnet-sd21-canny-diffusers";
    factory.gate.close();
    let update = engine
        .update_params(with_controlnet(params_with("flowers", 512), canny))
        .expect("accepted");
    assert!(update.is_controlnet_swap(), "{update:?}");
    let swap_version = engine.status().params_version;
    while factory.preloads.load(Ordering::SeqCst) < 1 {
        thread::yield_now();
    }
    let mut ids = Vec::new();
    let mut done = Vec::new();
    for _ in 0..20 {
        ids.push(submit(&engine, 1).expect("submit"));
        done.push(recv(&engine));
    }
    assert!(
        done.iter().all(|o| o.params_version < swap_version),
        "20 frames served by the previous parameters while the net loaded"
    );
    assert!(engine.status().reloading, "the preload is still under way");
    factory.gate.open();
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.last().is_some_and(|o| o.params_version < swap_version) {
        assert!(Instant::now() < deadline, "the swap never came in");
        ids.push(submit(&engine, 1).expect("submit"));
        done.push(recv(&engine));
    }
    let got: Vec<FrameId> = done.iter().map(|o| o.id).collect();
    assert_eq!(got, ids, "every frame comes out, in order");
    let versions: Vec<u64> = done.iter().map(|o| o.params_version).collect();
    assert!(
        versions.windows(2).all(|w| w[0] <= w[1]),
        "versions never go back: {versions:?}"
    );
    let status = engine.status();
    assert_eq!(status.serving_params_version, Some(swap_version));
    assert_eq!((status.restart_count, status.frames_failed), (0, 0));
    assert_eq!(
        factory.builds.load(Ordering::SeqCst),
        1,
        "no pipeline rebuilt"
    );
    assert_eq!(engine.params().controlnets.len(), 1);
}

#[test]
fn a_failed_controlnet_load_keeps_the_stream_and_records_the_error() {
    let factory = FakeFactory::with_preload(0, 1, 20);
    let engine = engine(factory.clone(), EngineOptions::default());
    let serving = engine.status().serving_params_version;
    let hash = engine.status().last_params_hash;
    engine
        .update_params(with_controlnet(
            params_with("flowers", 512),
            "thibaud/controlnet-sd21-depth-diffusers",
        ))
        .expect("accepted; fails while loading");
    wait_for("the failure", || engine.status().reload_failures == 1);
    let status = engine.status();
    let error = status.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("ControlNets") && error.contains("depth"),
        "{error}"
    );
    // The serving parameters are accepted again under a newer version, which the serving
    // pipeline carries: the version never goes back to the one before the failed update.
    let version = status.params_version;
    assert!(
        serving.is_some_and(|s| s + 1 < version),
        "{serving:?} -> {version}"
    );
    assert_eq!(status.serving_params_version, Some(version));
    assert_eq!(status.last_params_hash, hash, "the target went back");
    assert!(engine.params().controlnets.is_empty());
    submit(&engine, 3).expect("still serving");
    assert!(
        engine
            .recv_timeout(Duration::from_secs(5))
            .expect("recv")
            .is_some()
    );
    assert_eq!(factory.builds.load(Ordering::SeqCst), 1);
}

#[test]
fn a_failed_reload_keeps_serving_and_records_the_error() {
    let engine = engine(FakeFactory::new(20, 1), EngineOptions::default());
    let hash = engine.status().last_params_hash;
    engine
        .update_params(params_with("flowers", 1024))
        .expect("accepted; fails while building");
    wait_for("the failure", || engine.status().reload_failures == 1);
    let status = engine.status();
    assert_eq!(status.state, EngineState::Online);
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("fake/unet.safetensors") && error.contains("keeps serving"),
        "{error}"
    );
    assert!(status.last_error_time.is_some());
    assert_eq!(status.last_params_hash, hash, "accepted parameters revert");
    assert_eq!(status.last_params["width"], 512);
    submit(&engine, 5).expect("submit");
    assert_eq!(recv(&engine).image.data[1], 8);
}

#[test]
fn a_failed_first_load_is_an_error_until_new_parameters_load() {
    let factory = FakeFactory::new(0, 1);
    let err = Engine::spawn_with_factory(
        params_with("flowers", 1024),
        EngineSettings::default(),
        EngineOptions::default(),
        factory.clone(),
    )
    .and_then(|e| e.wait_ready(None).map(|()| e));
    assert!(matches!(err, Err(Error::ModelLoad { .. })), "{err:?}");

    let engine = Engine::spawn_with_factory(
        params_with("flowers", 1024),
        EngineSettings::default(),
        EngineOptions::default(),
        factory,
    )
    .expect("spawn");
    wait_for("ERROR", || engine.status().state == EngineState::Error);
    assert!(matches!(submit(&engine, 1), Err(Error::State(_))));
    assert!(engine.recv_timeout(Duration::from_millis(10)).is_err());
    engine
        .update_params(params_with("flowers", 512))
        .expect("update");
    engine
        .wait_ready(Some(Duration::from_secs(10)))
        .expect("loaded");
    submit(&engine, 1).expect("submit");
    assert_eq!(recv(&engine).image.data[1], 8);
    assert_eq!(engine.status().restart_count, 0);
}

#[test]
fn a_panic_in_the_pipeline_becomes_an_error_state_and_restart_recovers() {
    let engine = engine(FakeFactory::new(0, 1), EngineOptions::default());
    engine
        .update_params(params_with("panic", 512))
        .expect("hot");
    submit(&engine, 1).expect("submit");
    wait_for("ERROR", || engine.status().state == EngineState::Error);
    let status = engine.status();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("asked to panic")),
        "{status:?}"
    );
    assert_eq!(status.frames_failed, 1);
    assert_counters_add_up(&status);
    assert!(submit(&engine, 1).is_err());
    // A plain error in a frame is recorded, the pipeline stays.
    engine
        .update_params(params_with("fail", 512))
        .expect("rebuild");
    engine
        .wait_ready(Some(Duration::from_secs(10)))
        .expect("rebuilt");
    submit(&engine, 1).expect("submit");
    wait_for("the failure", || engine.status().frames_failed == 2);
    assert_eq!(engine.status().state, EngineState::DegradedInference);
    engine
        .update_params(params_with("flowers", 512))
        .expect("hot");
    engine.restart().expect("restart");
    wait_for("the restart", || engine.status().restart_count == 2);
    submit(&engine, 4).expect("submit");
    assert_eq!(recv(&engine).image.data[0], 4);
    // A panicking build is a failed build.
    engine
        .update_params(params_with("panic-build", 576))
        .expect("accepted");
    wait_for("the failure", || engine.status().reload_failures == 1);
    assert!(
        engine
            .status()
            .last_error
            .is_some_and(|e| e.contains("panicked"))
    );
}

#[test]
fn lossless_refuses_when_full_and_latest_drops_the_oldest() {
    let engine = engine(
        FakeFactory::new(0, 30),
        EngineOptions {
            queue_capacity: 1,
            output_capacity: 1,
            drop_policy: DropPolicy::Lossless,
            warmup: false,
            ..EngineOptions::default()
        },
    );
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..6 {
        match submit(&engine, i) {
            Ok(id) => accepted.push(id),
            Err(Error::QueueFull { capacity: 1 }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused >= 3, "refused {refused}");
    let data = pixel(9);
    let frame = Frame::packed(&data, 1, 1, PixelFormat::Rgb8).expect("frame");
    // Waits while the worker works: nothing is lost.
    let mut collected = Vec::new();
    for _ in 0..3 {
        while let Err(Error::QueueFull { .. }) =
            engine.submit(Submission::new(frame).wait_for_room(Duration::from_millis(100)))
        {
            collected.extend(engine.poll());
        }
        accepted.push(engine.status().frames_submitted - 1);
    }
    while collected.len() < accepted.len() {
        collected.push(recv(&engine));
    }
    let ids: Vec<FrameId> = collected.iter().map(|o| o.id).collect();
    assert_eq!(ids, accepted);
    assert_eq!(engine.status().frames_dropped, 0);

    let engine = self::engine(
        FakeFactory::new(0, 30),
        EngineOptions {
            queue_capacity: 2,
            warmup: false,
            ..EngineOptions::default()
        },
    );
    submit(&engine, 0).expect("submit");
    wait_for("the worker to take frame 0", || {
        engine.status().frames_in_flight == 1
    });
    for i in 1..10 {
        submit(&engine, i).expect("latest never refuses");
    }
    let mut ids = Vec::new();
    while let Ok(Some(out)) = engine.recv_timeout(Duration::from_millis(300)) {
        ids.push(out.id);
    }
    // The frame in flight, then the two newest.
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(&ids[1..], &[8, 9]);
    let status = engine.status();
    assert_eq!(status.frames_dropped, 7);
    assert_counters_add_up(&status);
    assert_eq!(engine.flush(), 0);
}

#[test]
fn warmup_primes_the_stream_batch_once() {
    // t_index_list has 3 steps: 2 extra passes before the first output.
    let engine = engine(FakeFactory::new(0, 1), EngineOptions::default());
    submit(&engine, 1).expect("submit");
    assert_eq!(recv(&engine).image.data[2], 3);
    submit(&engine, 1).expect("submit");
    assert_eq!(recv(&engine).image.data[2], 4);
    // A reload is warmed up by the builder with the latest frame, before it swaps in.
    engine
        .update_params(params_with("flowers", 576))
        .expect("reload");
    wait_for("the swap", || {
        engine.status().serving_params_version == Some(1)
    });
    submit(&engine, 1).expect("submit");
    assert_eq!(recv(&engine).image.data[2], 3);
    // A hot change of the number of steps zeroes the batch: warmed up again (3 extra passes).
    let mut four_steps = params_with("flowers", 576);
    four_steps.t_index_list = vec![0, 12, 20, 32];
    engine.update_params(four_steps).expect("hot");
    submit(&engine, 1).expect("submit");
    assert_eq!(recv(&engine).image.data[2], 7);
}

#[test]
fn close_joins_the_threads_and_refuses_work() {
    let engine = engine(FakeFactory::new(0, 20), EngineOptions::default());
    for i in 0..3 {
        submit(&engine, i).expect("submit");
    }
    engine.close();
    engine.close();
    let status = engine.status();
    assert_eq!(status.state, EngineState::Offline);
    assert_counters_add_up(&status);
    assert_eq!(status.frames_in_flight, 0);
    assert!(engine.lock_threads().is_empty());
    assert!(matches!(submit(&engine, 1), Err(Error::State(_))));
    assert!(engine.update_params(params_with("x", 512)).is_err());
    // Closing while a build is under way waits for it and discards it.
    let factory = FakeFactory::new(0, 1);
    factory.gate.close();
    let engine = engine_loading(factory.clone());
    while factory.builds.load(Ordering::SeqCst) < 1 {
        thread::yield_now();
    }
    assert_eq!(engine.status().state, EngineState::Loading);
    let dropper = thread::spawn(move || drop(engine));
    for _ in 0..100 {
        thread::yield_now();
        assert!(!dropper.is_finished(), "drop returned while the build ran");
    }
    factory.gate.open();
    dropper.join().expect("drop");
    // Dropping joined both threads, the builder after its build: nothing else holds the
    // factory any more.
    assert_eq!(factory.builds.load(Ordering::SeqCst), 1);
    assert_eq!(Arc::strong_count(&factory), 1);
}

fn engine_loading(factory: Arc<FakeFactory>) -> Engine {
    Engine::spawn_with_factory(
        params_with("flowers", 512),
        EngineSettings::default(),
        EngineOptions::default(),
        factory,
    )
    .expect("spawn")
}

#[test]
fn frames_submitted_while_loading_wait_for_the_pipeline() {
    let engine = engine_loading(FakeFactory::new(100, 1));
    assert_eq!(engine.status().state, EngineState::Loading);
    assert!(engine.status().progress.is_some());
    let id = submit(&engine, 3).expect("queued while loading");
    let out = recv(&engine);
    assert_eq!((out.id, out.image.data[0]), (id, 3));
}

#[test]
fn stress_with_concurrent_producers_and_updates() {
    let factory = FakeFactory::new(30, 1);
    let engine = engine(
        factory,
        EngineOptions {
            queue_capacity: 3,
            output_capacity: 4,
            ..EngineOptions::default()
        },
    );
    let run_for = Duration::from_millis(1500);
    let submitted = std::sync::Mutex::new(Vec::new());
    let outputs = thread::scope(|scope| {
        for p in 0..3u8 {
            let (engine, submitted) = (&engine, &submitted);
            scope.spawn(move || {
                let start = Instant::now();
                while start.elapsed() < run_for {
                    let id = submit(engine, p).expect("submit");
                    submitted.lock().expect("ids").push(id);
                    thread::sleep(Duration::from_micros(300));
                }
            });
        }
        let engine = &engine;
        scope.spawn(move || {
            let start = Instant::now();
            let mut i = 0u64;
            while start.elapsed() < run_for {
                i += 1;
                let params = match i % 5 {
                    0 => params_with("flowers", 576 + 64 * (i % 3) as i64),
                    1 => params_with("flowers", 100),  // invalid
                    2 => params_with("flowers", 1024), // fails to build
                    _ => params_with(&format!("prompt {i}"), 512),
                };
                let _ = engine.update_params(params);
                thread::sleep(Duration::from_millis(7));
            }
        });
        let consumer = scope.spawn(move || {
            let mut outs = Vec::new();
            let start = Instant::now();
            while start.elapsed() < run_for + Duration::from_millis(200) {
                if let Ok(Some(out)) = engine.recv_timeout(Duration::from_millis(50)) {
                    outs.push(out);
                }
            }
            outs
        });
        consumer.join().expect("consumer")
    });
    engine.close();
    let mut outputs = outputs;
    while let Some(out) = engine.poll() {
        outputs.push(out);
    }
    let submitted = submitted.into_inner().expect("ids");
    let known: std::collections::HashSet<_> = submitted.iter().copied().collect();
    assert!(outputs.len() > 50, "only {} outputs", outputs.len());
    for pair in outputs.windows(2) {
        assert!(
            pair[0].id < pair[1].id,
            "out of order: {} then {}",
            pair[0].id,
            pair[1].id
        );
    }
    assert!(outputs.iter().all(|o| known.contains(&o.id)));
    let status = engine.status();
    assert_counters_add_up(&status);
    assert_eq!(status.frames_submitted, submitted.len() as u64);
    assert_eq!(
        status.frames_processed,
        outputs.len() as u64 + status.outputs_dropped
    );
}

#[test]
fn options_out_of_range_are_refused_before_anything_is_allocated() {
    for (field, value) in [
        ("queue_capacity", "0"),
        ("queue_capacity", "1000000000"),
        ("output_capacity", "18446744073709551615"),
        ("input_timeout_ms", "18446744073709551615"),
        ("fps_window_ms", "0"),
        ("fps_window_ms", "3600001"),
    ] {
        let err = EngineOptions::from_json(&format!("{{\"{field}\": {value}}}"))
            .expect_err(field)
            .to_string();
        assert!(
            err.contains(field) && err.contains(&format!("got {value}")),
            "{field} = {value}: {err}"
        );
        // The same through spawn: no thread starts, no queue is reserved.
        let options: EngineOptions =
            serde_json::from_str(&format!("{{\"{field}\": {value}}}")).expect(field);
        let err = Engine::spawn_with_factory(
            params_with("a", 64),
            EngineSettings::default(),
            options,
            FakeFactory::new(0, 1),
        )
        .expect_err("spawn with bad options");
        assert!(err.to_string().contains(field), "{err}");
    }
    for (field, least, most) in EngineOptions::OPTION_RANGES {
        for value in [least, most] {
            EngineOptions::from_json(&format!("{{\"{field}\": {value}}}"))
                .unwrap_or_else(|e| panic!("{field} = {value}: {e}"));
        }
    }
}

#[test]
fn process_returns_its_own_frame_and_leaves_other_outputs_to_poll() {
    let engine = engine(FakeFactory::new(0, 1), EngineOptions::default());
    let polled = submit(&engine, 7).expect("submit");
    wait_for("the submitted frame's output", || {
        engine.status().output_queue_depth == 1
    });
    let data = pixel(9);
    let frame = Frame::packed(&data, 1, 1, PixelFormat::Rgb8).expect("frame");
    let out = engine
        .process(Submission::new(frame).timestamp(42))
        .expect("process");
    assert_eq!(
        (out.id, out.timestamp, out.image.data[0]),
        (polled + 1, 42, 9)
    );
    // The earlier output is still there for poll; process's own never entered the queue.
    let first = engine.poll().expect("the submitted frame's output");
    assert_eq!((first.id, first.image.data[0]), (polled, 7));
    assert!(engine.poll().is_none());
    let status = engine.status();
    assert_counters_add_up(&status);
    assert_eq!((status.frames_processed, status.output_queue_depth), (2, 0));
}

#[test]
fn concurrent_process_calls_each_get_their_own_frame() {
    // Lossless, waiting for room: no process call's frame is dropped for a newer one (under
    // `latest` a newer frame may take a waiting frame's place; see the next test).
    let engine = engine(
        FakeFactory::new(0, 1),
        EngineOptions {
            drop_policy: DropPolicy::Lossless,
            ..EngineOptions::default()
        },
    );
    thread::scope(|scope| {
        for value in 0..4u8 {
            let engine = &engine;
            scope.spawn(move || {
                for i in 0..10 {
                    let data = pixel(value);
                    let frame = Frame::packed(&data, 1, 1, PixelFormat::Rgb8).expect("frame");
                    let submission = Submission::new(frame)
                        .timestamp(i)
                        .wait_for_room(Duration::from_secs(30));
                    let out = engine.process(submission).expect("process");
                    assert_eq!((out.image.data[0], out.timestamp), (value, i));
                }
            });
        }
    });
    let status = engine.status();
    assert_counters_add_up(&status);
    assert_eq!(
        (
            status.frames_processed,
            status.frames_dropped,
            status.output_queue_depth
        ),
        (40, 0, 0)
    );
}

#[test]
fn process_says_why_its_frame_was_lost() {
    let factory = FakeFactory::new(0, 0);
    let engine = engine(
        factory.clone(),
        EngineOptions {
            queue_capacity: 1,
            ..EngineOptions::default()
        },
    );
    // The worker holds frame A at the gate; B waits in the queue for a process call; C then
    // takes B's place in the full `latest` queue.
    factory.frame_gate.close();
    submit(&engine, 1).expect("A");
    wait_for("A in flight", || engine.status().frames_in_flight == 1);
    thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            let data = pixel(2);
            let frame = Frame::packed(&data, 1, 1, PixelFormat::Rgb8).expect("frame");
            engine.process(frame)
        });
        wait_for("B queued", || engine.status().queue_depth == 1);
        submit(&engine, 3).expect("C");
        let err = waiter.join().expect("join").expect_err("B was dropped");
        assert!(
            matches!(&err, Error::NoOutput { id: 1, reason } if reason.contains("newer frame")),
            "{err}"
        );
    });
    factory.frame_gate.open();
    // A failing frame: the pipeline's error is the reason.
    engine
        .update_params(params_with("fail", 512))
        .expect("hot update");
    let data = pixel(4);
    let frame = Frame::packed(&data, 1, 1, PixelFormat::Rgb8).expect("frame");
    let err = engine.process(frame).expect_err("the frame fails");
    assert!(
        matches!(&err, Error::NoOutput { reason, .. } if reason.contains("asked to fail")),
        "{err}"
    );
    // Closing drops waiting frames: a process call waiting on one is told so.
    factory.frame_gate.close();
    engine
        .update_params(params_with("flowers", 512))
        .expect("hot update");
    submit(&engine, 5).expect("in flight");
    wait_for("in flight", || engine.status().frames_in_flight == 1);
    thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            let data = pixel(6);
            let frame = Frame::packed(&data, 1, 1, PixelFormat::Rgb8).expect("frame");
            engine.process(frame)
        });
        wait_for("queued", || engine.status().queue_depth == 1);
        scope.spawn(|| engine.close());
        wait_for("closed", || engine.status().state == EngineState::Offline);
        let err = waiter.join().expect("join").expect_err("dropped by close");
        assert!(
            matches!(&err, Error::NoOutput { reason, .. } if reason.contains("closed")),
            "{err}"
        );
        factory.frame_gate.open();
    });
}

#[test]
fn options_of_the_wrong_type_are_refused_naming_the_option() {
    for (field, value) in [
        ("queue_capacity", "-1"),
        ("queue_capacity", "18446744073709551616"),
        ("output_capacity", "1e20"),
        ("output_capacity", "\"8\""),
        ("input_timeout_ms", "2.5"),
        ("fps_window_ms", "null"),
        ("drop_policy", "\"sometimes\""),
        ("warmup", "1"),
    ] {
        let err = EngineOptions::from_json(&format!("{{\"{field}\": {value}}}")).expect_err(field);
        assert!(
            matches!(&err, Error::Json(m) if m.starts_with(&format!("engine options: {field}: "))),
            "{field} = {value}: {err:?}"
        );
    }
    for text in [
        "{\"queue_capacity\": 2} x",
        "[2, 8]",
        "{\"queue_capacity\": 2",
    ] {
        let err = EngineOptions::from_json(text).expect_err(text);
        assert!(
            matches!(&err, Error::Json(m) if m.starts_with("engine options: ")),
            "{err:?}"
        );
    }
}

#[test]
fn spawn_refuses_what_the_pipeline_cannot_run_before_loading_anything() {
    let base = serde_json::json!({"model_id": "stabilityai/sd-turbo", "width": 512, "height": 512});
    let with = |patch: serde_json::Value| {
        StreamDiffusionParams::from_json(&base.to_string())
            .and_then(|p| p.patched(&patch, &EngineSettings::default()))
            .expect("valid parameters")
    };
    for (patch, field) in [
        (
            serde_json::json!({"controlnets": [{
                "model_id": "thibaud/controlnet-sd21-depth-diffusers",
                "preprocessor": "mediapipe_segmentation"}]}),
            "controlnets[0].preprocessor",
        ),
        (
            serde_json::json!({"image_preprocessing": {"enabled": true,
                "processors": [{"type": "mediapipe_pose"}]}}),
            "image_preprocessing.processors[0]",
        ),
    ] {
        let err = Engine::builder(with(patch.clone()))
            .spawn()
            .map(|_| ())
            .expect_err(&patch.to_string());
        assert!(
            matches!(&err, Error::InvalidParam { field: f, .. } if f == field),
            "{patch}: {err}"
        );
    }
    // The same check guards updates (no engine needs loading to see that).
    let factory = FakeFactory::new(0, 0);
    let engine = engine(factory, EngineOptions::default());
    let err = engine
        .update_params(with(
            serde_json::json!({"image_preprocessing": {"enabled": true,
            "processors": [{"type": "mediapipe_pose"}]}}),
        ))
        .expect_err("mediapipe_pose");
    assert!(
        matches!(&err, Error::InvalidParam { field, .. }
            if field == "image_preprocessing.processors[0]"),
        "{err}"
    );
}

#[test]
fn lora_ids_are_hub_ids_where_model_paths_are_off() {
    let settings = EngineSettings {
        allow_model_paths: false,
        ..EngineSettings::default()
    };
    let base = serde_json::json!({"model_id": "Lykon/dreamshaper-8", "width": 512, "height": 512});
    for (patch, field) in [
        (
            serde_json::json!({"lora_dict": {"../../etc": 1.0}}),
            "lora_dict",
        ),
        (
            serde_json::json!({"lora_dict": {"/models/x.safetensors": 1.0}}),
            "lora_dict",
        ),
        (
            serde_json::json!({"lcm_lora_id": "/models/lcm"}),
            "lcm_lora_id",
        ),
    ] {
        let err = StreamDiffusionParams::from_json(&base.to_string())
            .and_then(|p| p.patched(&patch, &settings))
            .expect_err(&patch.to_string());
        assert!(
            matches!(&err, Error::InvalidParam { field: f, .. } if f == field),
            "{patch}: {err}"
        );
        assert!(
            !err.to_string().contains("etc") && !err.to_string().contains("/models"),
            "{err}"
        );
    }
    // A hub id that is not served is refused too, by name; the allowed ones and the known
    // LCM-LoRAs pass validation (they are resolved when the pipeline loads); an LCM-LoRA id is
    // not checked while use_lcm_lora is off.
    let err = StreamDiffusionParams::from_json(&base.to_string())
        .and_then(|p| {
            p.patched(
                &serde_json::json!({"lora_dict": {"org/style-lora": 0.8}}),
                &settings,
            )
        })
        .expect_err("not allowed");
    assert!(
        matches!(&err, Error::InvalidParam { field, message } if field == "lora_dict"
            && message.contains("\"org/style-lora\" is not a LoRA served here")),
        "{err}"
    );
    let settings = EngineSettings {
        allowed_models: vec!["org/style-lora".into()],
        ..settings
    };
    for patch in [
        serde_json::json!({"lora_dict": {"org/style-lora": 0.8}}),
        serde_json::json!({"lcm_lora_id": "latent-consistency/lcm-lora-sdxl"}),
        serde_json::json!({"use_lcm_lora": false, "lcm_lora_id": "/models/lcm"}),
    ] {
        StreamDiffusionParams::from_json(&base.to_string())
            .and_then(|p| p.patched(&patch, &settings))
            .unwrap_or_else(|e| panic!("{patch}: {e}"));
    }
}

#[test]
fn params_version_never_goes_back_when_updates_fail() {
    let engine = engine(FakeFactory::with_preload(0, 1, 0), EngineOptions::default());
    let mut seen = vec![engine.status().params_version];
    let depth = with_controlnet(
        params_with("trees", 512),
        "thibaud/controlnet-sd21-depth-diffusers",
    );
    // A failed reload, a hot change, a failed preload, a hot change, a failed reload.
    let steps = [
        (params_with("flowers", 1024), true),
        (params_with("trees", 512), false),
        (depth, true),
        (params_with("rivers", 512), false),
        (params_with("rivers", 1024), true),
    ];
    for (params, fails) in steps {
        let failures = engine.status().reload_failures;
        engine.update_params(params).expect("accepted");
        seen.push(engine.status().params_version);
        wait_for("the update to settle", || {
            let s = engine.status();
            seen.push(s.params_version);
            !s.reloading && s.serving_params_version == Some(s.params_version)
        });
        assert_eq!(engine.status().reload_failures, failures + u64::from(fails));
    }
    seen.dedup();
    println!("params_version as seen: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    // Five accepted updates and three reverts: eight versions after the first.
    assert_eq!(seen.last(), Some(&8), "{seen:?}");
    let status = engine.status();
    assert_eq!(status.last_params["prompt"], "rivers");
    assert_eq!(status.last_params["width"], 512);
    submit(&engine, 4).expect("still serving");
    assert_eq!(recv(&engine).params_version, 8);
}

/// Fails every build with an error naming a file under the settings' model root.
struct FailingFactory(std::path::PathBuf);

impl PipelineFactory for FailingFactory {
    fn build(
        &self,
        _params: &StreamDiffusionParams,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Box<dyn Pipeline>> {
        progress(&format!("reading {}", self.0.display()));
        Err(Error::ModelLoad {
            path: self.0.clone(),
            detail: "no such file".into(),
        })
    }

    fn preload_networks(
        &self,
        _params: &StreamDiffusionParams,
        _progress: &mut dyn FnMut(&str),
    ) -> Result<()> {
        Ok(())
    }

    fn networks_ready(&self, _params: &StreamDiffusionParams, _ids: &[&str]) -> bool {
        true
    }
}

#[test]
fn an_engine_serving_ids_from_others_reports_no_model_folder() {
    let root = std::env::temp_dir().join("sdstream-private-models");
    let file = root.join("org/model/unet/diffusion_pytorch_model.safetensors");
    let run = |allow_model_paths: bool| {
        let settings = EngineSettings {
            allow_model_paths,
            model_root: Some(root.clone()),
            ..EngineSettings::default()
        };
        let engine = Engine::spawn_with_factory(
            params_with("flowers", 512),
            settings,
            EngineOptions::default(),
            Arc::new(FailingFactory(file.clone())),
        )
        .expect("spawn");
        wait_for("ERROR", || engine.status().state == EngineState::Error);
        let last_error = engine.status().last_error.unwrap_or_default();
        let refused = submit(&engine, 1).expect_err("no pipeline").to_string();
        (last_error, refused)
    };
    let root_text = root.display().to_string();
    let (last_error, refused) = run(false);
    for text in [&last_error, &refused] {
        assert!(!text.contains(&root_text), "{text}");
        assert!(
            text.contains("<model_root>/org/model/unet/diffusion_pytorch_model.safetensors"),
            "{text}"
        );
    }
    // A program that names its own models keeps the whole path.
    let (last_error, _) = run(true);
    assert!(
        last_error.contains(&file.display().to_string()),
        "{last_error}"
    );
}
