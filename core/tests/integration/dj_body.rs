//! The DJ visualiser's default body — five sd21 ControlNets fed by pose_tensorrt, soft_edge,
//! canny, depth_tensorrt and passthrough — and the TemporalNet2 ControlNet, streaming on tiny
//! stand-ins (tests/fixtures/model-root: the tiny sd-turbo, ControlNets and processor networks
//! under the real ids) through `StreamDiffusion` and the `Engine`; processors shared by several
//! nets run once a frame, and a switch to a model-based processor loads its network off the
//! frames' path.

use crate::common;

use std::time::{Duration, Instant};

use common::fixture;
use sdstream::{
    Engine, EngineOptions, EngineSettings, Frame, PixelFormat, StreamDiffusion,
    StreamDiffusionParams,
};
use serde_json::{Value, json};

/// The five processors of the body, in its order.
const DJ_PROCESSORS: [&str; 5] = [
    "pose_tensorrt",
    "soft_edge",
    "canny",
    "depth_tensorrt",
    "passthrough",
];

fn settings() -> EngineSettings {
    EngineSettings {
        model_root: Some(fixture("model-root")),
        ..EngineSettings::default()
    }
}

/// The DJ visualiser's create body (MetaDJ Nexus "Dream": the sd-turbo ControlNet set at its
/// scales, 512², t_index_list [12, 20, 24] of 25 steps).
fn dj_body() -> Value {
    let net = |kind: &str, scale: f64, preprocessor: &str, params: Value| {
        json!({
            "model_id": format!("thibaud/controlnet-sd21-{kind}-diffusers"),
            "conditioning_scale": scale,
            "preprocessor": preprocessor,
            "preprocessor_params": params,
            "enabled": true,
        })
    };
    json!({
        "model_id": "stabilityai/sd-turbo",
        "prompt": "cartoon magical dj blue sparkle",
        "negative_prompt": "blurry, low quality, flat, 2d",
        "width": 512,
        "height": 512,
        "num_inference_steps": 25,
        "t_index_list": [12, 20, 24],
        "seed": 789,
        "controlnets": [
            net("openpose", 0.75, "pose_tensorrt", json!({"confidence_threshold": 0.5})),
            net("hed", 0.2, "soft_edge", json!({})),
            net("canny", 0.2, "canny", json!({"low_threshold": 100, "high_threshold": 200})),
            net("depth", 0.75, "depth_tensorrt", json!({})),
            net("color", 0.2, "passthrough", json!({})),
        ],
    })
}

fn params(body: &Value) -> StreamDiffusionParams {
    StreamDiffusionParams::from_json_with(&body.to_string(), &settings())
        .unwrap_or_else(|e| panic!("the body validates: {e}"))
}

/// examples/frames/00i.png (512², RGB).
fn frame_data(i: usize) -> Vec<u8> {
    image::open(fixture(&format!("../../examples/frames/{i:03}.png")))
        .unwrap()
        .to_rgb8()
        .into_raw()
}

fn frame(data: &[u8]) -> Frame<'_> {
    Frame::packed(data, 512, 512, PixelFormat::Rgb8).unwrap()
}

fn mean_levels(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .sum::<f64>()
        / a.len() as f64
}

/// The body's nets and processors as their repositories publish them
/// (tests/fixtures/published-root): each thibaud net a lone fp16 `diffusion_pytorch_model.bin`
/// with a diffusers 0.15 config, the OpenPose body network in torch's legacy format.
fn published_settings() -> EngineSettings {
    EngineSettings {
        model_root: Some(fixture("published-root")),
        ..EngineSettings::default()
    }
}

#[test]
fn the_dj_body_streams_with_every_net_in_its_published_layout() {
    let settings = published_settings();
    let body = dj_body();
    let published = StreamDiffusionParams::from_json_with(&body.to_string(), &settings)
        .unwrap_or_else(|e| panic!("the body validates: {e}"));
    // The same nets (the same fp16 values) from a folder in today's diffusers layout.
    let mut modern_body = body.clone();
    let modern = fixture("tiny-controlnet-a").display().to_string();
    let nets = modern_body["controlnets"].as_array_mut().unwrap();
    // Five nets may not share an id: five copies of the folder.
    let copies: Vec<String> = (0..nets.len())
        .map(|i| {
            let dir = common::scratch_dir(&format!("dj-modern-net-{i}"));
            common::copy_dir(std::path::Path::new(&modern), &dir);
            dir.display().to_string()
        })
        .collect();
    for (net, copy) in nets.iter_mut().zip(&copies) {
        net["model_id"] = json!(copy);
    }
    let modern = StreamDiffusionParams::from_json_with(&modern_body.to_string(), &settings)
        .unwrap_or_else(|e| panic!("the modern body validates: {e}"));
    let frames: Vec<Vec<u8>> = (0..2).map(frame_data).collect();
    let mut want = StreamDiffusion::new(modern, settings.clone()).expect("the modern nets load");
    let options = EngineOptions {
        warmup: false,
        ..EngineOptions::default()
    };
    let engine = Engine::new(published, settings, options).expect("the published nets load");
    for (i, data) in frames.iter().enumerate() {
        let want = want.process(&frame(data)).expect("a frame").data;
        let got = engine.process(frame(data)).expect("a frame comes back");
        assert!(got.image.data == want, "frame {i}: published = modern");
        for p in DJ_PROCESSORS {
            assert_eq!(got.timings.processors.runs(p), 1, "frame {i}: {p} ran");
        }
    }
    let status = engine.status();
    assert_eq!(status.reload_failures, 0);
    engine.close();
}

#[test]
fn the_dj_body_streams_through_the_stream_and_the_engine() {
    let params = params(&dj_body());
    let frames: Vec<Vec<u8>> = (0..4).map(frame_data).collect();

    let mut stream = StreamDiffusion::new(params.clone(), settings()).expect("the stream starts");
    assert_eq!(stream.controlnets().len(), 5);
    let mut want = Vec::new();
    for (i, data) in frames.iter().enumerate() {
        let start = Instant::now();
        want.push(stream.process(&frame(data)).expect("a frame").data);
        let t = stream.timings();
        let line: Vec<String> = DJ_PROCESSORS
            .iter()
            .map(|p| {
                let ms = t.processors.get(p).unwrap_or_default().as_secs_f64() * 1e3;
                format!("{p} {ms:.1} ms")
            })
            .collect();
        println!(
            "frame {i}: {:.2} s ({})",
            start.elapsed().as_secs_f64(),
            line.join(", ")
        );
        for p in DJ_PROCESSORS {
            assert_eq!(t.processors.runs(p), 1, "frame {i}: {p} runs once");
        }
    }
    let status = stream.status();
    for p in DJ_PROCESSORS {
        assert!(
            status.processor_ms.get(p).is_some_and(|ms| *ms > 0.0),
            "{p} in the status: {:?}",
            status.processor_ms
        );
    }
    // The five processors and the safety checker (on by default; the tiny pipeline carries one).
    assert!(status.processor_ms.contains_key("safety_checker"));
    assert_eq!(status.processor_ms.len(), 6, "{:?}", status.processor_ms);

    // The engine computes the same frames, byte for byte, and reports the same processors.
    let options = EngineOptions {
        warmup: false,
        ..EngineOptions::default()
    };
    let engine = Engine::new(params.clone(), settings(), options).expect("the engine starts");
    for (i, (data, want)) in frames.iter().zip(&want).enumerate() {
        let got = engine.process(frame(data)).expect("a frame comes back");
        assert!(
            &got.image.data == want,
            "frame {i}: Engine = StreamDiffusion"
        );
    }
    let status = engine.status();
    assert_eq!(
        status.processor_ms.keys().collect::<Vec<_>>(),
        {
            let mut names = DJ_PROCESSORS.to_vec();
            names.push("safety_checker");
            names.sort_unstable();
            names
        }
        .iter()
        .collect::<Vec<_>>()
    );

    // The nets act: the same stream with every scale at 0 gives other pictures.
    let mut off = dj_body();
    for net in off["controlnets"].as_array_mut().unwrap() {
        net["conditioning_scale"] = json!(0.0);
    }
    let mut plain = StreamDiffusion::new(self::params(&off), settings()).unwrap();
    let mut plain_out = Vec::new();
    for data in &frames {
        plain_out = plain.process(&frame(data)).unwrap().data;
    }
    assert!(
        plain
            .timings()
            .processors
            .iter()
            .all(|(name, _)| name == "safety_checker"),
        "scale-0 nets run no processor"
    );
    let moved = mean_levels(&plain_out, want.last().unwrap());
    println!("the five nets move the last picture by {moved:.2} levels (mean)");
    assert!(moved > 0.5, "the ControlNets change the output: {moved}");
}

#[test]
fn a_processor_shared_by_nets_runs_once_and_other_settings_run_again() {
    let mut body = dj_body();
    let nets = body["controlnets"].as_array_mut().unwrap();
    // Net 2 (canny's) takes depth as well, with the same settings: one depth map.
    nets[2]["preprocessor"] = json!("depth_tensorrt");
    nets[2]["preprocessor_params"] = json!({});
    nets[0]["enabled"] = json!(false);
    let mut stream = StreamDiffusion::new(params(&body), settings()).unwrap();
    let data = frame_data(1);
    stream.process(&frame(&data)).unwrap();
    let t = stream.timings().processors;
    assert_eq!(t.runs("depth_tensorrt"), 1);
    assert_eq!(
        t.runs("pose_tensorrt"),
        0,
        "a disabled net runs no processor"
    );
    // Other settings make another map.
    let mut body = body.clone();
    body["controlnets"][2]["preprocessor_params"] = json!({"detect_resolution": 140});
    stream.update(params(&body)).expect("a hot change");
    stream.process(&frame(&data)).unwrap();
    assert_eq!(stream.timings().processors.runs("depth_tensorrt"), 2);
}

#[test]
fn a_switch_to_a_model_processor_loads_its_network_beside_the_serving_stream() {
    let mut body = dj_body();
    body["controlnets"] = json!([body["controlnets"][2].clone()]);
    let engine = Engine::new(
        params(&body),
        settings(),
        EngineOptions {
            warmup: false,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let data = frame_data(2);
    engine.process(frame(&data)).unwrap();
    // canny → hed: a hot change whose HED network is loaded on the builder thread first.
    body["controlnets"][0]["preprocessor"] = json!("hed");
    body["controlnets"][0]["preprocessor_params"] = json!({});
    let update = engine.update_params(params(&body)).expect("accepted");
    assert!(update.is_hot(), "{update:?}");
    let version = engine.status().params_version;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        engine.process(frame(&data)).expect("frames keep flowing");
        if engine.status().serving_params_version == Some(version) {
            // The switch happens between two frames: the frame after it runs hed.
            engine
                .process(frame(&data))
                .expect("a frame after the switch");
            let status = engine.status();
            assert!(
                status.processor_ms.contains_key("hed"),
                "{:?}",
                status.processor_ms
            );
            assert_eq!(status.reload_failures, 0);
            assert_eq!(status.restart_count, 0, "no reload");
            break;
        }
        assert!(Instant::now() < deadline, "the switch never happened");
    }
    // A processor whose weights are missing fails the update and keeps the serving one.
    let empty = common::scratch_dir("dj-no-weights");
    let lost_settings = EngineSettings {
        model_root: Some(empty),
        allow_any_resolution: true,
        vae: sdstream::params::VaeChoice::Custom(fixture("tiny-taesd").display().to_string()),
        ..settings()
    };
    let lost_params = StreamDiffusionParams::from_json_with(
        &json!({"model_id": fixture("tiny-sd-turbo"), "width": 64, "height": 64,
                "controlnets": [{"model_id": fixture("tiny-controlnet-b"),
                                 "preprocessor": "lineart"}]})
        .to_string(),
        &lost_settings,
    )
    .unwrap();
    let err = StreamDiffusion::new(lost_params, lost_settings)
        .expect_err("no lineart weights")
        .to_string();
    assert!(
        err.contains("lllyasviel/Annotators") && err.contains("sk_model2"),
        "{err}"
    );
}

#[test]
fn temporalnet2_streams_with_the_flow_between_frames() {
    let mut body = dj_body();
    body["controlnets"] = json!([{
        "model_id": "daydreamlive/TemporalNet2-stable-diffusion-2-1",
        "conditioning_scale": 0.5,
        "preprocessor": "temporal_net_tensorrt",
        "preprocessor_params": {"flow_strength": 0.4, "height": 256, "width": 256},
        "conditioning_channels": 6,
    }]);
    let mut stream = StreamDiffusion::new(params(&body), settings()).unwrap();
    assert_eq!(stream.controlnets()[0].config().conditioning_channels, 6);
    let frames: Vec<Vec<u8>> = (0..3).map(frame_data).collect();
    let outs: Vec<Vec<u8>> = frames
        .iter()
        .map(|d| stream.process(&frame(d)).unwrap().data)
        .collect();
    assert_eq!(stream.timings().processors.runs("temporal_net_tensorrt"), 1);
    // Without the net the pictures differ (it conditions every frame, the first on black flow).
    body["controlnets"][0]["conditioning_scale"] = json!(0.0);
    let mut plain = StreamDiffusion::new(params(&body), settings()).unwrap();
    let plain_last = frames
        .iter()
        .map(|d| plain.process(&frame(d)).unwrap().data)
        .last()
        .unwrap();
    let moved = mean_levels(&plain_last, outs.last().unwrap());
    println!("TemporalNet2 at 0.5 moves the third picture by {moved:.2} levels (mean)");
    assert!(moved > 0.1, "{moved}");
    // A 6-channel net with a 3-channel preprocessor is refused, naming both.
    body["controlnets"][0]["preprocessor"] = json!("canny");
    body["controlnets"][0]["conditioning_scale"] = json!(0.5);
    let err = StreamDiffusion::new(params(&body), settings())
        .expect_err("channels differ")
        .to_string();
    assert!(
        err.contains("6-channel") && err.contains("3-channel") && err.contains("temporal_net"),
        "{err}"
    );
}

#[test]
fn the_engine_makes_the_next_frames_control_images_beside_the_current_one() {
    // The DJ body with TemporalNet2 as a sixth net: every preprocessor but passthrough works,
    // and the temporal one needs the right previous frame.
    let mut body = dj_body();
    body["controlnets"].as_array_mut().unwrap().push(json!({
        "model_id": "daydreamlive/TemporalNet2-stable-diffusion-2-1",
        "conditioning_scale": 0.5,
        "preprocessor": "temporal_net_tensorrt",
        "preprocessor_params": {"height": 256, "width": 256},
    }));
    let params = params(&body);
    let frames: Vec<Vec<u8>> = (0..3).map(frame_data).collect();
    let mut stream = StreamDiffusion::new(params.clone(), settings()).unwrap();
    let want: Vec<Vec<u8>> = frames
        .iter()
        .map(|d| stream.process(&frame(d)).unwrap().data)
        .collect();

    // Every frame queued at once: while frame k diffuses, frame k + 1's images are made.
    let engine = Engine::new(
        params,
        settings(),
        EngineOptions {
            warmup: false,
            queue_capacity: 8,
            drop_policy: sdstream::DropPolicy::Lossless,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    for data in &frames {
        engine
            .submit(sdstream::Submission::new(frame(data)))
            .unwrap();
    }
    for (i, want) in want.iter().enumerate() {
        let got = engine
            .recv_timeout(Duration::from_secs(600))
            .unwrap()
            .expect("an output");
        assert!(
            &got.image.data == want,
            "frame {i}: made-ahead control images give the same output"
        );
    }
    let status = engine.status();
    println!(
        "frames prepared ahead: {} of {}",
        status.frames_prepared_ahead,
        frames.len()
    );
    assert!(
        status.frames_prepared_ahead >= 1,
        "the queued frames' images were made ahead: {}",
        status.frames_prepared_ahead
    );
    assert_eq!(status.frames_failed, 0);
}
