//! Cross-stream batching (sdstream::pipeline::cross_stream): streams on one loaded model run
//! their UNet calls in shared batches, and each stream's outputs equal the same stream run
//! alone, with prompts, t_index_list and ControlNet scales changing mid-run, a stream joining and
//! one leaving while the others run.

use crate::common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use candle_core::Tensor;
use common::{abs_err, fixture, frame_tensor};
use sdstream::model::bundle::StableDiffusionModels;
use sdstream::pipeline::cross_stream::{MemberLabel, SharedNetwork, UNetCall, admission};
use sdstream::{EngineSettings, StreamDiffusion, StreamDiffusionParams};
use serde_json::{Value, json};

/// A fresh load of the tiny checkpoint: its own batcher, so no other test's streams join it.
fn own_models() -> Arc<StableDiffusionModels> {
    let id = fixture("tiny-sd-turbo").display().to_string();
    Arc::new(StableDiffusionModels::load(&id, &common::tiny_settings("self"), &mut |_| {}).unwrap())
}

fn settings(batching: bool, budget_ms: Option<f64>) -> EngineSettings {
    let mut s = common::tiny_settings("self");
    s.cross_stream_batching = batching;
    s.frame_budget_ms = budget_ms;
    s
}

fn body(prompt: &str, seed: i64, t_index_list: Value) -> Value {
    json!({
        "model_id": fixture("tiny-sd-turbo").display().to_string(),
        "prompt": prompt,
        "negative_prompt": "blurry",
        "seed": seed,
        "t_index_list": t_index_list,
        "guidance_scale": 1.2,
        "delta": 0.8,
        "width": 64,
        "height": 64,
    })
}

fn net(scale: f64) -> Value {
    json!([{
        "model_id": fixture("tiny-controlnet-a").display().to_string(),
        "conditioning_scale": scale,
        "preprocessor": "passthrough",
    }])
}

/// One stream's life: its body, the frames it takes, and changes applied before given frames.
#[derive(Clone)]
struct Script {
    body: Value,
    frames: std::ops::Range<usize>,
    changes: Vec<(usize, Value)>,
}

fn run_script(
    models: Arc<StableDiffusionModels>,
    script: &Script,
    settings: EngineSettings,
    mut after_frame: impl FnMut(Option<usize>),
) -> Vec<Tensor> {
    let params =
        StreamDiffusionParams::from_json_with(&script.body.to_string(), &settings).unwrap();
    let mut stream = StreamDiffusion::with_models(models, params, settings.clone()).unwrap();
    // `None`: the stream is made, no frame has run yet.
    after_frame(None);
    let mut outputs = Vec::new();
    for i in script.frames.clone() {
        for (at, change) in &script.changes {
            if *at == i {
                let params =
                    StreamDiffusionParams::from_json_with(&change.to_string(), &settings).unwrap();
                stream.update(params).unwrap();
            }
        }
        outputs.push(stream.process_tensor(&frame_tensor(i)).unwrap());
        after_frame(Some(i));
    }
    outputs
}

/// The scripts run alone (each on `alone`'s models, `settings(false)`), then together on
/// `together`'s models, one thread each, in lockstep: every call waits for the other streams'
/// (each network's calls all run in shared batches), and the hosts send each frame at the same
/// moment. Asserts that every stream's frames equal its frames alone, to the bit.
fn alone_then_in_lockstep(
    scripts: &[Script],
    alone: Arc<StableDiffusionModels>,
    together: &Arc<StableDiffusionModels>,
    settings: impl Fn(bool) -> EngineSettings + Sync,
) {
    let alone: Vec<Vec<Tensor>> = scripts
        .iter()
        .map(|s| run_script(alone.clone(), s, settings(false), |_| {}))
        .collect();
    together
        .batcher()
        .set_lockstep_for_tests(Some(scripts.len()));
    let barrier = std::sync::Barrier::new(scripts.len());
    let batched: Vec<Vec<Tensor>> = std::thread::scope(|scope| {
        let handles: Vec<_> = scripts
            .iter()
            .map(|s| {
                let models = together.clone();
                let settings = settings(true);
                let barrier = &barrier;
                scope.spawn(move || {
                    run_script(models, s, settings, |_| {
                        barrier.wait();
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Every shared batch of a network ran on one thread: the first stream's, which stays for
    // the whole run.
    for network in SharedNetwork::ALL {
        let threads = together.batcher().shared_batch_threads_for_tests(network);
        let shared = together.batcher().counts_of(network).shared_calls;
        assert!(
            threads <= 1 && (shared == 0) == (threads == 0),
            "{network:?}: {shared} shared calls ran on {threads} threads"
        );
    }
    for (k, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a.len(), scripts[k].frames.len(), "stream {k}");
        assert_eq!(a.len(), b.len(), "stream {k}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(abs_err(x, y).0, 0.0, "stream {k}, frame {i}");
        }
    }
}

fn scripts() -> Vec<Script> {
    let a = body("a photo of a cat", 2, json!([12, 20, 32]));
    let mut a_later = a.clone();
    a_later["prompt"] = json!("a watercolor fox");
    let b = body("a red car", 7, json!([16, 30]));
    let mut b_later = b.clone();
    b_later["t_index_list"] = json!([10, 24]);
    let mut c = body("a lighthouse at dusk", 5, json!([12, 20, 32]));
    c["controlnets"] = net(0.5);
    let mut c_later = c.clone();
    c_later["controlnets"] = net(0.9);
    let d = body("a bowl of fruit", 11, json!([20, 32]));
    let mut d_later = d.clone();
    d_later["t_index_list"] = json!([12, 20, 32]);
    vec![
        Script {
            body: a,
            frames: 0..7,
            changes: vec![(3, a_later)],
        },
        // Leaves after frame 4 while the others run on.
        Script {
            body: b,
            frames: 0..5,
            changes: vec![(2, b_later)],
        },
        Script {
            body: c,
            frames: 0..7,
            changes: vec![(3, c_later)],
        },
        // Joins at frame 2; goes from 2 steps to 3 (rows per call) at frame 4.
        Script {
            body: d,
            frames: 2..7,
            changes: vec![(4, d_later)],
        },
    ]
}

#[test]
fn batched_streams_equal_each_stream_alone() {
    scripts_batched_equal_each_alone(false);
}

/// The same streams, joining and leaving as before, with every batch of several streams run by
/// the batcher's own thread (as on a GPU with `SDSTREAM_CUDA_BATCH_EVENTS`): the same pixels,
/// and one thread ran every shared batch.
#[test]
fn batched_streams_on_the_batchers_own_thread_equal_each_stream_alone() {
    scripts_batched_equal_each_alone(true);
}

fn scripts_batched_equal_each_alone(runner_thread: bool) {
    // Alone: each stream on its own, batching off.
    let alone_models = own_models();
    let alone: Vec<Vec<Tensor>> = scripts()
        .iter()
        .map(|s| run_script(alone_models.clone(), s, settings(false, None), |_| {}))
        .collect();

    // Together: one thread per stream on one shared model, with a generous budget so the
    // scheduler holds each batch for the streams that are due.
    let models = own_models();
    // Batch wherever calls meet, whatever this machine's costs say (they decide how much is
    // batched, not what a batch computes).
    models.batcher().set_batching_pays_for_tests(Some(true));
    models
        .batcher()
        .set_runner_thread_for_tests(Some(runner_thread));
    // The joining stream starts once the first has made two frames.
    let (joined_tx, joined_rx) = mpsc::channel::<()>();
    let mut joined_tx = Some(joined_tx);
    let mut joined_rx = Some(joined_rx);
    let mut handles = Vec::new();
    for (k, script) in scripts().into_iter().enumerate() {
        let models = models.clone();
        let signal = if k == 0 { joined_tx.take() } else { None };
        let gate = if script.frames.start > 0 {
            joined_rx.take()
        } else {
            None
        };
        handles.push(std::thread::spawn(move || {
            if let Some(gate) = gate {
                gate.recv().unwrap();
            }
            run_script(models, &script, settings(true, Some(5_000.0)), |i| {
                if i == Some(1)
                    && let Some(signal) = &signal
                {
                    signal.send(()).unwrap();
                }
            })
        }));
    }
    let together: Vec<Vec<Tensor>> = handles.into_iter().map(|h| h.join().unwrap()).collect();

    let counts = models.batcher().counts();
    println!("batches: {counts:?}");
    let mut worst = 0f32;
    for (k, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.len(), b.len(), "stream {k}: frame count");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let (max, _) = abs_err(x, y);
            worst = worst.max(max);
            assert!(
                max <= 1e-5,
                "stream {k}, frame {i}: batched differs from alone by {max:e}"
            );
        }
    }
    println!("largest difference, batched against alone: {worst:e}");
    // 24 frames in all, one UNet call each.
    assert_eq!(counts.calls, 24, "{counts:?}");
    assert!(
        counts.shared_calls >= 8,
        "few calls were batched: {counts:?}"
    );
    assert!(
        counts.widest >= 3,
        "no batch held three streams: {counts:?}"
    );
    assert!(counts.batches < counts.calls, "{counts:?}");
    // A shared batch runs on the thread of its longest-standing stream. These streams do not
    // move in lockstep, so a batch may hold any two or more of them, and each of the three there
    // from the start may be the longest-standing in some batch; the stream that joined last,
    // whichever it is, never is, so its thread runs none. (The lockstep tests, where every batch holds every
    // stream, assert a single thread.)
    let runners = models
        .batcher()
        .shared_batch_threads_for_tests(SharedNetwork::UNet);
    if runner_thread {
        // The batcher's thread ran them all; the streams' threads ran only their calls while
        // alone.
        assert_eq!(runners, 1, "{runners} threads ran shared UNet batches");
        for network in [SharedNetwork::UNet, SharedNetwork::Decode] {
            assert!(
                models
                    .batcher()
                    .shared_batches_ran_on_runner_threads_for_tests(network),
                "{network:?}: a stream's thread ran a shared batch"
            );
        }
    } else {
        assert!(
            (1..=3).contains(&runners),
            "{runners} threads ran shared UNet batches"
        );
    }
    // Every frame encoded and decoded once, through the same batcher; the decodes of a shared
    // UNet batch wait for each other.
    let encode = models.batcher().counts_of(SharedNetwork::Encode);
    let decode = models.batcher().counts_of(SharedNetwork::Decode);
    println!("encode: {encode:?}\ndecode: {decode:?}");
    assert_eq!((encode.calls, decode.calls), (24, 24));
    assert!(
        decode.shared_calls >= 4,
        "no decodes were batched: {decode:?}"
    );
}

/// Two streams of five frames each, their own prompt and seed, two steps.
fn two_streams_of_five_frames() -> Vec<Script> {
    [("a harbour", 3), ("a forest path", 9)]
        .into_iter()
        .map(|(prompt, seed)| Script {
            body: body(prompt, seed, json!([16, 32])),
            frames: 0..5,
            changes: vec![],
        })
        .collect()
}

/// Asserts that both streams' 5 calls of `network` ran in 5 batches of both, and returns its
/// counters.
fn every_call_shared(
    models: &StableDiffusionModels,
    network: SharedNetwork,
) -> sdstream::pipeline::cross_stream::BatchCounts {
    let counts = models.batcher().counts_of(network);
    assert_eq!(
        (counts.calls, counts.batches, counts.shared_calls),
        (10, 5, 10),
        "{network:?}: {counts:?}"
    );
    counts
}

#[test]
fn streams_with_the_full_vae_batched_equal_each_alone() {
    // The KL autoencoder: frames encoded in one batch, each stream's posterior sampled with its
    // own generator.
    let mut full = common::tiny_settings("self");
    full.vae = "full".parse().unwrap();
    let with = |batching: bool| {
        let mut s = full.clone();
        s.cross_stream_batching = batching;
        s.frame_budget_ms = Some(5_000.0);
        s
    };
    let load = || {
        let id = fixture("tiny-sd-turbo").display().to_string();
        Arc::new(StableDiffusionModels::load(&id, &full, &mut |_| {}).unwrap())
    };
    let scripts = two_streams_of_five_frames();
    let models = load();
    alone_then_in_lockstep(&scripts, load(), &models, with);
    for network in [
        SharedNetwork::UNet,
        SharedNetwork::Encode,
        SharedNetwork::Decode,
    ] {
        every_call_shared(&models, network);
    }
}

/// Two streams in lockstep with the batcher's own thread running their batches: each frame
/// equals the stream alone to the bit, and that thread ran every batch (5 frames: 5 UNet, 5
/// encoder and 5 decoder batches of both streams' calls), the streams' threads none.
#[test]
fn the_batchers_own_thread_runs_every_batch_of_streams_in_lockstep() {
    let scripts = two_streams_of_five_frames();
    let models = own_models();
    models.batcher().set_runner_thread_for_tests(Some(true));
    models.batcher().trace(4);
    alone_then_in_lockstep(&scripts, own_models(), &models, |batching| {
        settings(batching, Some(5_000.0))
    });
    // The last four batches as they ran: the last frame's UNet batch (2 rows a stream) then
    // its decode batch, each of both streams' calls, one after the other.
    let trace = models.batcher().take_trace();
    let shape: Vec<(SharedNetwork, usize, usize)> =
        trace.iter().map(|b| (b.network, b.calls, b.rows)).collect();
    assert_eq!(
        shape[2..],
        [(SharedNetwork::UNet, 2, 4), (SharedNetwork::Decode, 2, 2)]
    );
    for (b, next) in trace.iter().zip(&trace[1..]) {
        assert!(b.first_call <= b.last_call && b.last_call <= b.started);
        assert!(b.started <= b.ended && b.ended <= next.started);
    }
    assert!(models.batcher().take_trace().is_empty());
    for network in [
        SharedNetwork::UNet,
        SharedNetwork::Encode,
        SharedNetwork::Decode,
    ] {
        let counts = every_call_shared(&models, network);
        // Each ran alone, so each was timed, and the times add up.
        assert_eq!(counts.timed, 5, "{network:?}: {counts:?}");
        assert!(!counts.device_time.is_zero(), "{network:?}: {counts:?}");
    }
    assert_eq!(models.batcher().runner_thread_batches_for_tests(), 15);
    assert!(
        models
            .batcher()
            .shared_batches_ran_on_runner_threads_for_tests(SharedNetwork::UNet)
    );
}

/// Two streams on one model, both steered by the same two ControlNets (the model's cache hands
/// them the same nets) with their own prompts, seeds, control images, scales and guidance
/// windows: each net's calls run in shared batches, and each stream's frames equal the same
/// stream run alone, to the bit (the CPU's kernels compute each row on its own). One stream's
/// window keeps one of its two steps, so its calls of that net carry fewer rows than the
/// other's; its scales change mid-run.
#[test]
fn controlnet_calls_batched_across_streams_equal_each_alone() {
    let nets = |scale_a: f64, scale_b: f64, end_b: f64| {
        json!([
            {
                "model_id": fixture("tiny-controlnet-a").display().to_string(),
                "conditioning_scale": scale_a,
                "preprocessor": "passthrough",
            },
            {
                "model_id": fixture("tiny-controlnet-b").display().to_string(),
                "conditioning_scale": scale_b,
                "preprocessor": "passthrough",
                "control_guidance_end": end_b,
            },
        ])
    };
    let totals = || sdstream::pipeline::cross_stream::process_totals()[1].1;
    let process_before = totals();
    let mut first = body("a lighthouse at dusk", 5, json!([16, 32]));
    first["controlnets"] = nets(0.5, 0.8, 1.0);
    let mut first_later = first.clone();
    first_later["controlnets"] = nets(0.9, 0.3, 1.0);
    let mut second = body("a bowl of fruit", 11, json!([16, 32]));
    second["controlnets"] = nets(0.7, 1.1, 0.5);
    let scripts = [
        Script {
            body: first,
            frames: 0..5,
            changes: vec![(2, first_later)],
        },
        // Its frames are the first stream's two later: another control image each time.
        Script {
            body: second,
            frames: 2..7,
            changes: vec![],
        },
    ];
    let models = own_models();
    alone_then_in_lockstep(&scripts, own_models(), &models, |batching| {
        settings(batching, batching.then_some(5_000.0))
    });
    // 10 frames, two nets each: 20 calls, all in pairs (one batch per net and frame).
    let controlnet = models.batcher().counts_of(SharedNetwork::ControlNet);
    let unet = models.batcher().counts_of(SharedNetwork::UNet);
    println!("ControlNet: {controlnet:?}\nUNet: {unet:?}");
    assert_eq!(
        (
            controlnet.calls,
            controlnet.batches,
            controlnet.shared_calls
        ),
        (20, 10, 20),
        "{controlnet:?}"
    );
    // Rows: net a takes both steps of both streams (4 a frame); net b both of the first
    // stream's and the kept step of the second's (3 a frame).
    assert_eq!(controlnet.rows, 5 * (4 + 3), "{controlnet:?}");
    // The process's counters (what /metrics reports) took them in too (other tests' streams
    // may add theirs meanwhile).
    let process = totals();
    assert_eq!(
        sdstream::pipeline::cross_stream::process_totals()[1].0,
        SharedNetwork::ControlNet
    );
    assert!(process.calls >= process_before.calls + 20, "{process:?}");
    assert!(process.shared_calls >= process_before.shared_calls + 20);
    assert!(process.batches >= process_before.batches + 10);
    assert_eq!((unet.calls, unet.shared_calls), (10, 10), "{unet:?}");
    // A check that can fail: the nets change the frames (scale 0 would leave them as without).
    let mut plain = scripts[0].clone();
    plain.body["controlnets"] = json!([]);
    plain.changes.clear();
    let without = run_script(own_models(), &plain, settings(false, None), |_| {});
    let with = run_script(own_models(), &scripts[0], settings(false, None), |_| {});
    assert!(abs_err(&without[0], &with[0]).0 > 1e-3);
}

#[test]
fn a_stream_alone_runs_one_call_per_frame_on_its_own_thread() {
    let models = own_models();
    let script = &scripts()[0];
    let batched = run_script(models.clone(), script, settings(true, Some(50.0)), |_| {});
    let plain = run_script(models.clone(), script, settings(false, None), |_| {});
    for (i, (x, y)) in batched.iter().zip(&plain).enumerate() {
        assert_eq!(abs_err(x, y).0, 0.0, "frame {i}");
    }
    let counts = models.batcher().counts();
    assert_eq!(
        (counts.calls, counts.batches, counts.shared_calls),
        (7, 7, 0)
    );
}

/// A stream that shares its networks decodes its text-to-image frames through the batcher
/// too (an img2img stream's decode batch after a shared UNet batch expects them there), with
/// the same pixels as a stream on its own.
#[test]
fn text_to_image_decodes_through_the_batcher() {
    let models = own_models();
    let body = body("a quiet harbour", 9, json!([20, 32]));
    let txt2img = |batching: bool| {
        let settings = settings(batching, None);
        let params = StreamDiffusionParams::from_json_with(&body.to_string(), &settings).unwrap();
        let mut stream = StreamDiffusion::with_models(models.clone(), params, settings).unwrap();
        (0..2)
            .map(|_| stream.txt2img().unwrap())
            .collect::<Vec<Tensor>>()
    };
    let plain = txt2img(false);
    assert_eq!(models.batcher().counts_of(SharedNetwork::Decode).calls, 0);
    let batched = txt2img(true);
    for (i, (x, y)) in batched.iter().zip(&plain).enumerate() {
        assert_eq!(abs_err(x, y).0, 0.0, "frame {i}");
    }
    let decode = models.batcher().counts_of(SharedNetwork::Decode);
    assert_eq!((decode.calls, decode.batches), (2, 2));
    // A check that can fail: the two frames differ (the stream's noise moves on).
    assert!(abs_err(&batched[0], &batched[1]).0 > 0.0);
}

/// Zeros of `dims` on the CPU (the shapes admission's tests seed their costs with).
fn zeros(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap()
}

/// The shape of a UNet call of 3 rows the admission tests' streams make.
fn three_row_unet_call() -> UNetCall {
    UNetCall {
        sample: zeros(&[3, 4, 8, 8]),
        timesteps: zeros(&[3]),
        text: zeros(&[3, 77, 32]),
        added: None,
        control: None,
    }
}

#[test]
fn admission_refuses_a_stream_past_the_budget_and_admits_it_when_one_leaves() {
    let models = own_models();
    let batcher = models.batcher();
    let label = MemberLabel {
        model_id: "admission-test/model".into(),
        size: (64, 64),
    };
    // Nothing measured: admitted.
    assert!(admission(&label, Some(Duration::from_millis(100))).admitted());
    // Three streams of 3 rows, each with 4 ms of other work and a 40 ms budget, and a measured
    // UNet cost of 8 ms + 1 ms per row.
    let shape = three_row_unet_call();
    let policy = sdstream::model::kernels::KernelPolicy::current();
    batcher.record_cost(shape.clone(), policy, 3, Duration::from_millis(11));
    batcher.record_cost(shape.clone(), policy, 12, Duration::from_millis(20));
    let members: Vec<_> = (0..3)
        .map(|_| {
            let m = batcher.join(label.clone());
            m.seed_for_tests(
                &shape,
                policy,
                Duration::from_millis(40),
                Duration::from_millis(4),
            );
            m
        })
        .collect();
    // Four streams: 12 rows → 20 ms, plus 4 × 4 ms = 36 ms ≤ 40 ms.
    let three = admission(&label, None);
    assert_eq!(three.streams, 3);
    assert_eq!(three.predicted_round, Some(Duration::from_millis(36)));
    assert!(three.admitted(), "{three:?}");
    let fourth = batcher.join(label.clone());
    fourth.seed_for_tests(
        &shape,
        policy,
        Duration::from_millis(40),
        Duration::from_millis(4),
    );
    // Five: 15 rows → 23 ms, plus 20 ms = 43 ms > 40 ms: refused, with the figures.
    let four = admission(&label, None);
    assert_eq!(four.predicted_round, Some(Duration::from_millis(43)));
    let reason = four.refusal.clone().expect("refused");
    assert!(
        reason.contains("43.0 ms") && reason.contains("40.0 ms"),
        "{reason}"
    );
    assert!(reason.contains("with 4 running"), "{reason}");
    // One leaves: four again, admitted.
    let mut members = members;
    drop(members.pop());
    let after = admission(&label, None);
    assert_eq!(after.streams, 3);
    assert_eq!(after.predicted_round, Some(Duration::from_millis(36)));
    assert!(after.admitted(), "{after:?}");
    drop(fourth);
    assert_eq!(admission(&label, None).streams, 2);
}

/// With ControlNet calls batched across streams, admission counts each net's batch once (by
/// its measured cost) and takes each stream's ControlNet time out of its other work; where a
/// net's batch cost is not measured yet, each stream's ControlNet time counts as before.
#[test]
fn admission_counts_a_shared_controlnet_batch_once() {
    use candle_core::{DType, Device};
    use sdstream::model::controlnet::ControlNetModel;
    use sdstream::pipeline::cross_stream::ControlNetCall;
    let models = own_models();
    let batcher = models.batcher();
    let label = MemberLabel {
        model_id: "admission-test/controlnet".into(),
        size: (64, 64),
    };
    let shape = three_row_unet_call();
    let net = |name: &str| {
        let net = ControlNetModel::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        ControlNetCall {
            net: Arc::new(net),
            sample: zeros(&[3, 4, 8, 8]),
            timesteps: zeros(&[3]),
            text: zeros(&[3, 77, 32]),
            added: None,
            embedded: zeros(&[1, 32, 8, 8]),
        }
    };
    let (net_a, net_b) = (net("tiny-controlnet-a"), net("tiny-controlnet-b"));
    let policy = sdstream::model::kernels::KernelPolicy::current();
    // UNet: 8 ms + 1 ms a row; net a: 6 ms + 1 ms a row.
    batcher.record_cost(shape.clone(), policy, 3, Duration::from_millis(11));
    batcher.record_cost(shape.clone(), policy, 12, Duration::from_millis(20));
    batcher.record_cost(net_a.clone(), policy, 3, Duration::from_millis(9));
    batcher.record_cost(net_a.clone(), policy, 12, Duration::from_millis(18));
    // Streams of 3 rows with a 55 ms budget, 10 ms of other work each, 6 ms of it in net a.
    let join = || {
        let m = batcher.join(label.clone());
        m.seed_for_tests(
            &shape,
            policy,
            Duration::from_millis(55),
            Duration::from_millis(10),
        );
        m.seed_controlnet_for_tests(&net_a, policy, Duration::from_millis(6));
        m
    };
    let members: Vec<_> = (0..3).map(|_| join()).collect();
    // Four streams: UNet 12 rows → 20 ms, net a 12 rows → 18 ms, 4 × (10 − 6) ms = 16 ms: 54
    // ms ≤ 55 ms (each stream's ControlNet time counted on its own would make 60 ms).
    let three = admission(&label, None);
    assert_eq!(three.predicted_round, Some(Duration::from_millis(54)));
    assert!(three.admitted(), "{three:?}");
    let fourth = join();
    // Five: UNet 15 rows → 23 ms, net a 15 rows → 21 ms, 5 × 4 ms = 20 ms: 64 ms, refused.
    let four = admission(&label, None);
    assert_eq!(four.predicted_round, Some(Duration::from_millis(64)));
    let reason = four.refusal.expect("refused");
    assert!(
        reason.contains("ControlNet batches: 21.0 ms") && reason.contains("64.0 ms"),
        "{reason}"
    );
    // A net whose batches are not measured yet: every stream's ControlNet time counts, 23 ms +
    // 5 × 10 ms.
    members[0].seed_controlnet_for_tests(&net_b, policy, Duration::from_millis(6));
    let unmeasured = admission(&label, None);
    assert_eq!(unmeasured.predicted_round, Some(Duration::from_millis(73)));
    assert!(!unmeasured.refusal.unwrap().contains("ControlNet"));
    drop(fourth);
}

/// On one GPU, streams of other models and sizes share its time: admission adds their round (one
/// frame of each, no new stream among them) to the round of the group the stream joins, holds
/// the sum to every budget on the device, and names them in a refusal; one of theirs that leaves
/// frees its share. On a CPU the groups stay apart (their costs are timed side by side on the
/// cores); a test's device group stands in for the GPU here.
#[test]
fn admission_counts_the_streams_of_other_models_on_the_device() {
    let (models_a, models_b) = (own_models(), own_models());
    let (a, b) = (models_a.batcher(), models_b.batcher());
    let label_a = MemberLabel {
        model_id: "admission-test/device-a".into(),
        size: (64, 64),
    };
    let label_b = MemberLabel {
        model_id: "admission-test/device-b".into(),
        size: (64, 64),
    };
    let shape = three_row_unet_call();
    let policy = sdstream::model::kernels::KernelPolicy::current();
    // Both models: 8 ms + 1 ms a row.
    for batcher in [a, b] {
        batcher.record_cost(shape.clone(), policy, 3, Duration::from_millis(11));
        batcher.record_cost(shape.clone(), policy, 12, Duration::from_millis(20));
    }
    let join = |batcher: &Arc<sdstream::pipeline::cross_stream::CrossStreamBatcher>,
                label: &MemberLabel,
                budget_ms: u64,
                other_ms: u64| {
        let m = batcher.join(label.clone());
        m.seed_for_tests(
            &shape,
            policy,
            Duration::from_millis(budget_ms),
            Duration::from_millis(other_ms),
        );
        m
    };
    // Model a: two streams of 3 rows, 50 ms budgets, 4 ms of other work each. Model b: one of 3
    // rows, a 60 ms budget, 5 ms of other work.
    let _a_streams = [join(a, &label_a, 50, 4), join(a, &label_a, 50, 4)];
    let _b_first = join(b, &label_b, 60, 5);
    // Apart (a CPU): a third stream of a: 9 rows → 17 ms + 3 × 4 ms = 29 ms; b not counted.
    let apart = admission(&label_a, None);
    assert_eq!(apart.predicted_round, Some(Duration::from_millis(29)));
    assert_eq!(
        (apart.other_streams, apart.other_round),
        (0, Duration::ZERO)
    );
    assert!(apart.admitted(), "{apart:?}");
    // One device: b's round on top (3 rows → 11 ms + 5 ms = 16 ms): 45 ms ≤ 50 ms.
    const GROUP: u64 = 0x5d5_0044;
    a.set_device_group_for_tests(Some(GROUP));
    b.set_device_group_for_tests(Some(GROUP));
    let together = admission(&label_a, None);
    assert_eq!(together.predicted_round, Some(Duration::from_millis(29)));
    assert_eq!(together.other_streams, 1);
    assert_eq!(together.other_round, Duration::from_millis(16));
    assert_eq!(together.tightest_budget, Some(Duration::from_millis(50)));
    assert!(together.admitted(), "{together:?}");
    // A second stream of b with a 40 ms budget: b's round 6 rows → 14 ms + 10 ms = 24 ms, so
    // 29 + 24 = 53 ms against b's 40 ms: refused, with the figures.
    let b_second = join(b, &label_b, 40, 5);
    let refused = admission(&label_a, None);
    assert_eq!(refused.other_round, Duration::from_millis(24));
    assert_eq!(refused.tightest_budget, Some(Duration::from_millis(40)));
    let reason = refused.refusal.clone().expect("refused");
    assert!(
        reason.contains("53.0 ms")
            && reason.contains("40.0 ms")
            && reason.contains("2 streams of other models or sizes on the device: 24.0 ms"),
        "{reason}"
    );
    // Model b's own admission sees model a's two streams (6 rows → 14 ms + 8 ms = 22 ms) beside
    // its own round with a third (9 rows → 17 ms + 15 ms = 32 ms): 54 ms > 40 ms.
    let for_b = admission(&label_b, None);
    assert_eq!(for_b.predicted_round, Some(Duration::from_millis(32)));
    assert_eq!(
        (for_b.other_streams, for_b.other_round),
        (2, Duration::from_millis(22))
    );
    assert!(!for_b.admitted());
    // b's second stream leaves: 45 ms against 50 ms again.
    drop(b_second);
    let after = admission(&label_a, None);
    assert_eq!(after.other_round, Duration::from_millis(16));
    assert!(after.admitted(), "{after:?}");
    a.set_device_group_for_tests(None);
    b.set_device_group_for_tests(None);
    assert_eq!(admission(&label_a, None).other_streams, 0);
}
