//! ControlNets against diffusers and the reference stream: the net's residuals alone, whole
//! streams with one and two nets (scales, guidance windows, cfg modes, the step-by-step path),
//! mid-stream scale changes and net additions, and the rules around them (disabled nets cost
//! nothing and change nothing, hot changes keep the loaded net, bad nets leave the stream as it
//! was). Goldens: tests/reference/make_controlnet_fixtures.py.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{WorstFrame, abs_err, edited_config, fixture, golden, scratch_dir};
use sdstream::model::bundle::StableDiffusionModels;
use sdstream::model::controlnet::ControlNetModel;
use sdstream::{
    EngineSettings, Frame, FrameInput, PixelFormat, StreamDiffusion, StreamDiffusionParams, Update,
};
use serde_json::{Value, json};

/// Tolerance of the net-level residuals.
const NET_MAX_ABS: f32 = 1e-5;

/// A case of golden/controlnet_streams.json.
fn case(name: &str) -> &'static Value {
    common::golden_case("golden/controlnet_streams.json", name)
}

fn settings(cfg_type: &str) -> EngineSettings {
    common::tiny_settings(cfg_type)
}

/// The networks, loaded once and shared (their ControlNet cache too).
fn models() -> Arc<StableDiffusionModels> {
    common::tiny_models()
}

fn net_path(name: &str) -> String {
    fixture(name).display().to_string()
}

/// A manifest ControlNet entry with its fixture folder name made a path.
fn net_json(net: &Value) -> Value {
    let mut net = net.clone();
    net["model_id"] = json!(net_path(net["model_id"].as_str().unwrap()));
    net
}

fn body_for(case: &Value) -> Value {
    json!({
        "model_id": net_path("tiny-sd-turbo"),
        "prompt": case["prompt"],
        "negative_prompt": case["negative_prompt"],
        "seed": case["seed"],
        "t_index_list": case["t_index_list"],
        "num_inference_steps": case["num_inference_steps"],
        "guidance_scale": case["guidance_scale"],
        "delta": case["delta"],
        "do_add_noise": case["do_add_noise"],
        "use_denoising_batch": case["use_denoising_batch"],
        "width": case["width"],
        "height": case["height"],
        "controlnets": case["controlnets"].as_array().unwrap().iter().map(net_json).collect::<Vec<_>>(),
    })
}

fn params(body: &Value, settings: &EngineSettings) -> StreamDiffusionParams {
    StreamDiffusionParams::from_json_with(&body.to_string(), settings).unwrap()
}

fn frame_tensor(i: usize) -> Tensor {
    let img = image::open(fixture(&format!("frames/{i:03}.png")))
        .unwrap()
        .to_rgb8();
    let frame = Frame::packed(img.as_raw(), 64, 64, PixelFormat::Rgb8).unwrap();
    frame.to_tensor(64, 64, &Device::Cpu).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The net alone
// ---------------------------------------------------------------------------------------------

fn check_net(name: &str, prefix: &str) {
    check_net_against(name, prefix, "golden/controlnet_net.safetensors");
}

fn check_net_against(name: &str, prefix: &str, golden_file: &str) {
    let gold = golden(golden_file);
    let net = ControlNetModel::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
    let out = net
        .forward(
            &gold["sample"],
            &gold["timesteps"],
            &gold["encoder_hidden_states"],
            None,
            &gold["controlnet_cond"],
        )
        .unwrap();
    assert_eq!(
        out.down.len(),
        12,
        "{name}: SD2-style nets have 12 down residuals"
    );
    let mut worst = 0f32;
    for (i, got) in out.down.iter().enumerate() {
        let want = &gold[&format!("{prefix}_down_{i:02}")];
        let (max, mean) = abs_err(got, want);
        println!("{name} down {i:02}: max {max:.2e} mean {mean:.2e}");
        worst = worst.max(max);
    }
    let (max, mean) = abs_err(&out.mid, &gold[&format!("{prefix}_mid")]);
    println!("{name} mid: max {max:.2e} mean {mean:.2e}");
    worst = worst.max(max);
    assert!(
        worst <= NET_MAX_ABS,
        "{name}: residual max abs {worst:.3e} > {NET_MAX_ABS:e}"
    );
}

#[test]
fn net_a_residuals_match_diffusers() {
    check_net("tiny-controlnet-a", "a");
}

#[test]
fn net_b_residuals_match_diffusers() {
    check_net("tiny-controlnet-b", "b");
}

/// A TemporalNet2-shaped net: 6 conditioning channels (the previous frame and the flow image).
#[test]
fn six_channel_net_residuals_match_diffusers() {
    let net = ControlNetModel::load(
        &fixture("tiny-controlnet-temporal"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(net.config().conditioning_channels, 6);
    check_net_against(
        "tiny-controlnet-temporal",
        "t",
        "golden/controlnet_temporal_net.safetensors",
    );
    // A 3-channel image is refused, naming both counts.
    let rgb = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let err = net
        .embed_condition(&rgb)
        .expect_err("3 channels")
        .to_string();
    assert!(err.contains('3') && err.contains('6'), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Whole streams
// ---------------------------------------------------------------------------------------------

/// Runs one manifest case frame by frame, applying its updates through `StreamDiffusion::update`,
/// and compares every output with the reference's.
fn check_case(name: &str) {
    let case = case(name);
    let gold = golden(case["file"].as_str().unwrap());
    let settings = settings(case["cfg_type"].as_str().unwrap());
    let mut body = body_for(case);
    let mut stream =
        StreamDiffusion::with_models(models(), params(&body, &settings), settings.clone()).unwrap();
    let (noise_max, _) = abs_err(stream.state().init_noise(), &gold["init_noise"]);
    assert_eq!(noise_max, 0.0, "{name}: init_noise differs from torch's");

    let n_frames = gold["output"].dim(0).unwrap();
    assert!(n_frames >= 6, "{name}: only {n_frames} frames");
    let updates = case["updates"].as_array().cloned().unwrap_or_default();
    let mut worst = WorstFrame::default();
    for i in 0..n_frames {
        for update in updates.iter().filter(|u| u["before_frame"] == i) {
            if let Some(set) = update["set"].as_object() {
                for (index, fields) in set {
                    let index: usize = index.parse().unwrap();
                    for (key, value) in fields.as_object().unwrap() {
                        body["controlnets"][index][key] = value.clone();
                    }
                }
            }
            let adds = update["add"].as_array().cloned().unwrap_or_default();
            for net in &adds {
                body["controlnets"]
                    .as_array_mut()
                    .unwrap()
                    .push(net_json(net));
            }
            let before: Vec<_> = stream.controlnets().to_vec();
            let applied = stream.update(params(&body, &settings)).unwrap();
            if adds.is_empty() {
                assert!(
                    applied.is_hot(),
                    "{name}: expected a hot update, got {applied:?}"
                );
            } else {
                assert!(
                    applied.is_controlnet_swap(),
                    "{name}: expected a ControlNet swap, got {applied:?}"
                );
            }
            // The nets that stay are the same loaded networks.
            for (old, new) in before.iter().zip(stream.controlnets()) {
                assert!(Arc::ptr_eq(old, new), "{name}: a kept net was reloaded");
            }
            assert_eq!(
                stream.controlnets().len(),
                body["controlnets"].as_array().unwrap().len()
            );
        }
        let out = stream.process_tensor(&frame_tensor(i)).unwrap();
        let want = gold["output"].i(i).unwrap().unsqueeze(0).unwrap();
        worst.add(name, i, &out, &want);
    }
    worst.check(name, n_frames);
}

macro_rules! stream_cases {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { check_case(stringify!($name)); })*
    };
}

stream_cases!(
    cn1_self_t3,
    cn2_window_self_t3,
    cn2_window_full_t2,
    cn2_window_initialize_t3,
    cn2_window_none_t3_nobatch_nonoise,
    cn1_scale_update,
    cn_add_net,
);

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

fn base_body(nets: Vec<Value>) -> Value {
    json!({
        "model_id": net_path("tiny-sd-turbo"),
        "prompt": "a photo of a cat",
        "negative_prompt": "blurry",
        "seed": 2,
        "t_index_list": [12, 20, 32],
        "guidance_scale": 1.2,
        "delta": 0.8,
        "width": 64,
        "height": 64,
        "controlnets": nets,
    })
}

fn net(name: &str, scale: f64) -> Value {
    json!({"model_id": net_path(name), "conditioning_scale": scale})
}

fn stream(body: &Value) -> StreamDiffusion {
    let settings = settings("self");
    StreamDiffusion::with_models(models(), params(body, &settings), settings).unwrap()
}

fn run(stream: &mut StreamDiffusion, frames: std::ops::Range<usize>) -> Vec<Tensor> {
    frames
        .map(|i| stream.process_tensor(&frame_tensor(i)).unwrap())
        .collect()
}

fn assert_identical(a: &[Tensor], b: &[Tensor], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let (max, _) = abs_err(x, y);
        assert_eq!(max, 0.0, "{what}: frame {i} differs (max abs {max:e})");
    }
}

#[test]
fn disabled_or_zero_scale_net_gives_the_plain_output() {
    let plain = run(&mut stream(&base_body(vec![])), 0..4);
    let mut disabled = net("tiny-controlnet-a", 0.5);
    disabled["enabled"] = json!(false);
    let off = run(&mut stream(&base_body(vec![disabled])), 0..4);
    assert_identical(&plain, &off, "enabled = false");
    let zero = run(
        &mut stream(&base_body(vec![net("tiny-controlnet-a", 0.0)])),
        0..4,
    );
    assert_identical(&plain, &zero, "conditioning_scale = 0");
    // And an active net does change the picture (else the parity cases test nothing).
    let on = run(
        &mut stream(&base_body(vec![net("tiny-controlnet-a", 0.3)])),
        0..4,
    );
    let (max, mean) = abs_err(&plain[3], &on[3]);
    println!("net effect on frame 3: max {max:.3} mean {mean:.4}");
    assert!(
        mean > 1e-2,
        "the ControlNet barely changes the output (mean {mean})"
    );
}

#[test]
fn hot_changes_keep_the_loaded_net() {
    let mut body = base_body(vec![net("tiny-controlnet-a", 0.3)]);
    let mut s = stream(&body);
    run(&mut s, 0..2);
    let before = s.controlnets()[0].clone();
    for (key, value) in [
        ("conditioning_scale", json!(0.9)),
        ("enabled", json!(false)),
        ("control_guidance_end", json!(0.5)),
        ("enabled", json!(true)),
    ] {
        body["controlnets"][0][key] = value;
        let update = s.update(params(&body, &settings("self"))).unwrap();
        assert!(matches!(update, Update::Hot { .. }), "{key}: {update:?}");
        assert!(
            Arc::ptr_eq(&before, &s.controlnets()[0]),
            "{key}: the net was reloaded"
        );
        run(&mut s, 2..3);
    }
    assert_eq!(s.params().controlnets[0].conditioning_scale, 0.9);
}

#[test]
fn removed_nets_stay_cached() {
    let models = models();
    let a = net_path("tiny-controlnet-a");
    let b = net_path("tiny-controlnet-b");
    let first = models.controlnet(&b, &mut |_| {}).unwrap();
    assert!(Arc::ptr_eq(
        &first,
        &models.controlnet(&b, &mut |_| {}).unwrap()
    ));
    let both = base_body(vec![
        net("tiny-controlnet-a", 0.3),
        net("tiny-controlnet-b", 0.7),
    ]);
    let only_a = base_body(vec![net("tiny-controlnet-a", 0.3)]);
    let mut s = stream(&both);
    assert!(Arc::ptr_eq(&first, &s.controlnets()[1]));
    let removed = s.update(params(&only_a, &settings("self"))).unwrap();
    assert!(removed.is_controlnet_swap(), "{removed:?}");
    assert_eq!(s.controlnets().len(), 1);
    assert!(
        models.cached_controlnet(&b).is_some(),
        "a removed net left the cache"
    );
    let added = s.update(params(&both, &settings("self"))).unwrap();
    assert!(added.is_controlnet_swap(), "{added:?}");
    assert!(
        Arc::ptr_eq(&first, &s.controlnets()[1]),
        "adding a cached net back reloaded it"
    );
    assert!(models.cached_controlnet_ids().contains(&a));
}

/// A copy of net A in a scratch folder with `config.json` edited.
fn edited_net(tag: &str, key: &str, value: Value) -> PathBuf {
    let dir = scratch_dir(tag);
    let src = fixture("tiny-controlnet-a");
    std::fs::write(
        dir.join("config.json"),
        edited_config("tiny-controlnet-a/config.json", key, value),
    )
    .unwrap();
    let weights = "diffusion_pytorch_model.fp16.safetensors";
    std::fs::copy(src.join(weights), dir.join(weights)).unwrap();
    dir
}

#[test]
fn incompatible_net_is_refused_and_the_stream_keeps_running() {
    let body = base_body(vec![net("tiny-controlnet-a", 0.3)]);
    let mut s = stream(&body);
    let mut twin = stream(&body);
    run(&mut s, 0..2);
    run(&mut twin, 0..2);

    let bad = edited_net("cn-xattn", "cross_attention_dim", json!(48));
    let mut bad_body = body.clone();
    bad_body["controlnets"]
        .as_array_mut()
        .unwrap()
        .push(json!({"model_id": bad.display().to_string()}));
    let err = s
        .update(params(&bad_body, &settings("self")))
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(
        err.contains("cross_attention_dim") && err.contains("48") && err.contains("32"),
        "the error names the field and both values: {err}"
    );
    assert!(
        models()
            .cached_controlnet(&bad.display().to_string())
            .is_none()
    );
    assert_eq!(s.params().controlnets.len(), 1);
    assert_identical(
        &run(&mut s, 2..4),
        &run(&mut twin, 2..4),
        "after a refused net",
    );

    // The same net at construction time is refused too.
    let settings = settings("self");
    let err = StreamDiffusion::with_models(models(), params(&bad_body, &settings), settings)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cross_attention_dim"), "{err}");
}

#[test]
fn missing_weights_error_names_the_file() {
    let dir = scratch_dir("cn-noweights");
    std::fs::copy(
        fixture("tiny-controlnet-a/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let body = base_body(vec![json!({"model_id": dir.display().to_string()})]);
    let settings = settings("self");
    let err = StreamDiffusion::with_models(models(), params(&body, &settings), settings)
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(err.contains("diffusion_pytorch_model"), "{err}");
    assert!(err.contains(&dir.display().to_string()), "{err}");

    let err = ControlNetModel::load(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn control_image_for_an_unknown_net_is_an_error_and_changes_nothing() {
    let body = base_body(vec![net("tiny-controlnet-a", 0.3)]);
    let mut s = stream(&body);
    let mut twin = stream(&body);
    run(&mut s, 0..2);
    run(&mut twin, 0..2);
    let img = image::open(fixture("frames/002.png")).unwrap().to_rgb8();
    let frame = Frame::packed(img.as_raw(), 64, 64, PixelFormat::Rgb8).unwrap();
    let err = s
        .process(FrameInput::new(&frame).controls(&[("no/such-net", &frame)]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no/such-net"), "{err}");
    assert_identical(
        &run(&mut s, 2..4),
        &run(&mut twin, 2..4),
        "after a refused control",
    );
    // A control image for a configured net is accepted (it is kept for `external` nets).
    let id = net_path("tiny-controlnet-a");
    s.process(FrameInput::new(&frame).controls(&[(id.as_str(), &frame)]))
        .unwrap();
}
