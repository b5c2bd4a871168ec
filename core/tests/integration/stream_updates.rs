//! Parameter updates on a running stream: every hot field takes effect on the next frame without
//! touching the loaded networks; reloads rebuild the stream; invalid or unsupported updates leave
//! it exactly as it was.

use crate::common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{abs_err, fixture};
use sdstream::model::bundle::StableDiffusionModels;
use sdstream::sampling::rng::TorchGenerator;
use sdstream::{
    EngineSettings, Error, Frame, FrameInput, PixelFormat, StreamDiffusion, StreamDiffusionParams,
    Update,
};
use serde_json::{Value, json};

fn settings() -> EngineSettings {
    common::tiny_settings("self")
}

fn models() -> Arc<StableDiffusionModels> {
    common::tiny_models()
}

fn base_body() -> Value {
    json!({
        "model_id": fixture("tiny-sd-turbo").display().to_string(),
        "prompt": "a photo of a cat",
        "negative_prompt": "blurry",
        "seed": 2,
        "t_index_list": [12, 20, 32],
        "guidance_scale": 1.2,
        "delta": 0.8,
        "width": 64,
        "height": 64,
    })
}

fn params(body: &Value) -> StreamDiffusionParams {
    StreamDiffusionParams::from_json_with(&body.to_string(), &settings()).unwrap()
}

fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

fn stream(body: &Value) -> StreamDiffusion {
    stream_with(body, settings())
}

fn stream_with(body: &Value, settings: EngineSettings) -> StreamDiffusion {
    StreamDiffusion::with_models(models(), params(body), settings).unwrap()
}

fn frame_tensor(i: usize) -> Tensor {
    let img = image::open(fixture(&format!("frames/{i:03}.png")))
        .unwrap()
        .to_rgb8();
    let frame = Frame::packed(img.as_raw(), 64, 64, PixelFormat::Rgb8).unwrap();
    frame.to_tensor(64, 64, &Device::Cpu).unwrap()
}

/// Runs frames 0..3 on a stream and on its twin, applies `change` to the twin, runs frame 3 on
/// both, and returns the update and the two outputs of frame 3.
fn apply_mid_stream(body: &Value, changed: &Value) -> (Update, Tensor, Tensor, StreamDiffusion) {
    apply_mid_stream_with(body, changed, settings())
}

fn apply_mid_stream_with(
    body: &Value,
    changed: &Value,
    settings: EngineSettings,
) -> (Update, Tensor, Tensor, StreamDiffusion) {
    let mut control = stream_with(body, settings.clone());
    let mut updated = stream_with(body, settings);
    for i in 0..3 {
        control.process_tensor(&frame_tensor(i)).unwrap();
        updated.process_tensor(&frame_tensor(i)).unwrap();
    }
    let update = updated.update(params(changed)).unwrap();
    let a = control.process_tensor(&frame_tensor(3)).unwrap();
    let b = updated.process_tensor(&frame_tensor(3)).unwrap();
    (update, a, b, updated)
}

#[test]
fn every_hot_field_changes_the_next_frame_without_reloading() {
    let base = base_body();
    let cases: Vec<(&str, Value)> = vec![
        (
            "prompt",
            with(
                base.clone(),
                "prompt",
                json!("a watercolor painting of mountains"),
            ),
        ),
        (
            "prompt blend",
            with(
                base.clone(),
                "prompt",
                json!([["a photo of a cat", 0.5], ["a red car", 0.5]]),
            ),
        ),
        (
            "guidance_scale",
            with(base.clone(), "guidance_scale", json!(1.8)),
        ),
        ("delta", with(base.clone(), "delta", json!(0.3))),
        (
            "t_index_list",
            with(base.clone(), "t_index_list", json!([10, 24, 40])),
        ),
        (
            "t_index_list length",
            with(base.clone(), "t_index_list", json!([16, 32])),
        ),
        (
            "num_inference_steps",
            with(
                with(base.clone(), "num_inference_steps", json!(40)),
                "t_index_list",
                json!([12, 20, 32]),
            ),
        ),
        ("seed", with(base.clone(), "seed", json!(12345))),
        (
            "seed blend",
            with(base.clone(), "seed", json!([[2, 0.5], [12345, 0.5]])),
        ),
    ];
    for (name, changed) in cases {
        let (update, control, updated, stream) = apply_mid_stream(&base, &changed);
        assert!(
            matches!(update, Update::Hot { .. }),
            "{name}: expected a hot update, got {update:?}"
        );
        assert!(
            Arc::ptr_eq(stream.models(), &models()),
            "{name}: the networks were reloaded"
        );
        let (max, mean) = abs_err(&control, &updated);
        println!("{name}: next frame differs by max {max:.3e}, mean {mean:.3e}");
        // Twin streams are bit-identical without the update; the tiny random text encoder moves
        // the picture little, so the bar is 10× the parity error rather than a visual change.
        assert!(
            max > 1e-4,
            "{name}: the next frame did not change (max abs {max:.2e})"
        );
    }
}

#[test]
fn the_negative_prompt_acts_only_where_guidance_runs_an_unconditional_pass() {
    let base = base_body();
    let changed = with(
        base.clone(),
        "negative_prompt",
        json!("cartoon, oversaturated"),
    );
    // RCFG self takes the unconditional estimate from the stock noise: no effect, by design.
    let (update, control, updated, _) = apply_mid_stream(&base, &changed);
    assert!(matches!(update, Update::Hot { .. }), "{update:?}");
    assert_eq!(abs_err(&control, &updated).0, 0.0);
    // Full runs an unconditional pass on every row: the next frame changes.
    let mut full = settings();
    full.cfg_type = "full".parse().unwrap();
    let (update, control, updated, _) = apply_mid_stream_with(&base, &changed, full);
    assert!(matches!(update, Update::Hot { .. }), "{update:?}");
    let (max, _) = abs_err(&control, &updated);
    println!("negative_prompt under cfg full: next frame differs by max {max:.3e}");
    assert!(
        max > 1e-4,
        "cfg full: the negative prompt had no effect ({max:.2e})"
    );
    // Initialize runs it on row 0 only; its estimate reaches the output row through the stock
    // noise, one step per frame: no change on the next frame, a change n − 1 = 2 frames later.
    let mut init = settings();
    init.cfg_type = "initialize".parse().unwrap();
    let mut control = stream_with(&base, init.clone());
    let mut updated = stream_with(&base, init);
    for i in 0..3 {
        control.process_tensor(&frame_tensor(i)).unwrap();
        updated.process_tensor(&frame_tensor(i)).unwrap();
    }
    updated.update(params(&changed)).unwrap();
    let mut diffs = Vec::new();
    for i in 3..6 {
        let a = control.process_tensor(&frame_tensor(i)).unwrap();
        let b = updated.process_tensor(&frame_tensor(i)).unwrap();
        diffs.push(abs_err(&a, &b).0);
    }
    println!("negative_prompt under cfg initialize: frames 3..6 differ by {diffs:?}");
    assert_eq!(
        diffs[0], 0.0,
        "row 0's estimate cannot reach the output row in one frame"
    );
    assert!(
        diffs[2] > 1e-4,
        "cfg initialize: no effect after n − 1 frames ({diffs:?})"
    );
}

#[test]
fn a_new_seed_gives_torch_noise_for_that_seed_and_zero_stock() {
    let base = base_body();
    let (_, _, _, stream) = apply_mid_stream(&base, &with(base.clone(), "seed", json!(777)));
    // After the frame that followed the update the stock noise has moved on, but init_noise is
    // exactly torch.randn([3, 4, 8, 8], generator=manual_seed(777)).
    let want = TorchGenerator::new(777)
        .randn_tensor(&[3, 4, 8, 8], &Device::Cpu)
        .unwrap();
    assert_eq!(abs_err(stream.state().init_noise(), &want).0, 0.0);
}

#[test]
fn a_seed_blend_is_the_rescaled_mix_of_torch_noises() {
    let base = base_body();
    let changed = with(base.clone(), "seed", json!([[2, 0.25], [12345, 0.75]]));
    let (_, _, _, stream) = apply_mid_stream(&base, &changed);
    let draw = |seed| {
        TorchGenerator::new(seed)
            .randn_tensor(&[3, 4, 8, 8], &Device::Cpu)
            .unwrap()
    };
    let (a, b) = (draw(2), draw(12345));
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    // Linear blend with normalised weights, rescaled to the mean norm of the two draws.
    let mixed = ((&a * 0.25).unwrap() + (&b * 0.75).unwrap()).unwrap();
    let target = (norm(&a) + norm(&b)) / 2.0;
    let want = (&mixed * f64::from(target / norm(&mixed))).unwrap();
    let (max, _) = abs_err(stream.state().init_noise(), &want);
    assert!(max < 1e-5, "blend differs by {max:.2e}");
}

#[test]
fn a_new_t_index_length_restarts_the_batch_like_a_fresh_stream() {
    let base = base_body();
    let changed = with(base.clone(), "t_index_list", json!([16, 32]));
    let (_, _, updated, stream) = apply_mid_stream(&base, &changed);
    assert_eq!(stream.state().steps().len(), 2);
    // Zeroed buffers, redrawn noise: frame 3 comes out as the first frame of a new stream would
    // (TAESD is deterministic, so nothing else carries history).
    let mut fresh = self::stream(&changed);
    let first = fresh.process_tensor(&frame_tensor(3)).unwrap();
    let (max, _) = abs_err(&first, &updated);
    assert!(max < 1e-6, "differs from a fresh stream by {max:.2e}");
}

#[test]
fn a_reload_field_rebuilds_the_stream_and_keeps_the_networks() {
    let base = base_body();
    let mut s = stream(&base);
    s.process_tensor(&frame_tensor(0)).unwrap();
    let update = s
        .update(params(&with(base.clone(), "width", json!(96))))
        .unwrap();
    match &update {
        Update::Reload { fields } => assert_eq!(fields, &vec!["width"]),
        other => panic!("expected a reload, got {other:?}"),
    }
    assert!(
        Arc::ptr_eq(s.models(), &models()),
        "same model_id must reuse the networks"
    );
    assert_eq!(s.output_size(), (96, 64));
    let out = s
        .process_tensor(
            &Tensor::zeros((1, 3, 64, 96), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
    assert_eq!(out.dims(), [1, 3, 64, 96]);
}

#[test]
fn rejected_updates_leave_the_stream_untouched() {
    let base = base_body();
    let mut control = stream(&base);
    let mut s = stream(&base);
    for i in 0..2 {
        control.process_tensor(&frame_tensor(i)).unwrap();
        s.process_tensor(&frame_tensor(i)).unwrap();
    }
    // Invalid (t_index_list out of range for the step count): a validation error naming the field.
    let mut bad = params(&base);
    bad.t_index_list = vec![12, 20, 60];
    let err = s.update(bad).unwrap_err();
    assert!(err.to_string().contains("t_index_list"), "{err}");
    // A LoRA that cannot be found: the reload fails naming the lora_dict entry.
    let no_lora = std::env::temp_dir()
        .join(format!("sdstream-no-lora-{}", std::process::id()))
        .display()
        .to_string();
    let lora = with(base.clone(), "lora_dict", json!({ &no_lora: 0.5 }));
    let err = s.update(params(&lora)).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidParam { field, .. } if *field == format!("lora_dict.{no_lora}")),
        "{err}"
    );
    // A ControlNet that cannot be found: the swap fails naming it, and nothing changes.
    let missing_net = std::env::temp_dir().join(format!("sdstream-no-net-{}", std::process::id()));
    std::fs::create_dir_all(&missing_net).unwrap();
    let cn = with(
        base.clone(),
        "controlnets",
        json!([{"model_id": missing_net.display().to_string(), "conditioning_scale": 0.5}]),
    );
    let err = s.update(params(&cn)).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    // A checkpoint folder without its networks: the reload fails naming what is missing, and the
    // old stream keeps serving.
    let broken = std::env::temp_dir().join(format!("sdstream-broken-{}", std::process::id()));
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("model_index.json"), "{}").unwrap();
    let mut missing = params(&base);
    missing.model_id = broken.display().to_string();
    let err = s.update(missing).unwrap_err();
    std::fs::remove_dir_all(&broken).ok();
    assert!(err.to_string().contains("unet"), "{err}");
    assert_eq!(s.params(), &params(&base));
    let a = control.process_tensor(&frame_tensor(2)).unwrap();
    let b = s.process_tensor(&frame_tensor(2)).unwrap();
    assert_eq!(
        abs_err(&a, &b).0,
        0.0,
        "a rejected update changed the stream's state"
    );
}

#[test]
fn wrong_input_sizes_are_errors_that_name_the_shape() {
    let mut s = stream(&base_body());
    let err = s
        .process_tensor(
            &Tensor::zeros((1, 3, 32, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("[1, 3, 64, 64]"), "{err}");
    // A frame of any size is resized to the stream's.
    let data = vec![128u8; 100 * 50 * 4];
    let frame = Frame::packed(&data, 100, 50, PixelFormat::Rgba8).unwrap();
    let out = s.process(&frame).unwrap();
    assert_eq!(
        (out.width, out.height, out.format),
        (64, 64, PixelFormat::Rgba8)
    );
}

/// The synchronous stream reports in the Engine's schema: frames, failures, errors, timings,
/// parameter versions and reloads.
#[test]
fn status_counts_frames_errors_updates_and_reloads() {
    let mut s = stream(&base_body());
    let status = s.status();
    assert_eq!(status.state, sdstream::EngineState::Online);
    assert_eq!((status.frames_submitted, status.params_version), (0, 0));
    let rgb = vec![128u8; 64 * 64 * 3];
    let frame = Frame::packed(&rgb, 64, 64, PixelFormat::Rgb8).unwrap();
    for _ in 0..3 {
        s.process(&frame).unwrap();
    }
    // A control image for a ControlNet the stream does not have: the frame fails.
    let err = s
        .process(FrameInput::new(&frame).controls(&[("no/such-net", &frame)]))
        .unwrap_err();
    assert!(err.to_string().contains("no/such-net"), "{err}");
    let status = s.status();
    assert_eq!(
        (
            status.frames_submitted,
            status.frames_processed,
            status.frames_failed,
            status.error_count
        ),
        (4, 3, 1, 1)
    );
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("no/such-net")
    );
    assert!(status.timings.total > 0.0 && status.timings.unet > 0.0);
    assert!(status.last_output_time.is_some());
    // A hot update, an unchanged one, a refused one, then a reload.
    assert!(
        s.update(params(&with(base_body(), "prompt", json!("a dog"))))
            .unwrap()
            .is_hot()
    );
    assert!(s.update(s.params().clone()).unwrap().is_unchanged());
    let mut bad = s.params().clone();
    bad.guidance_scale = f64::NAN;
    assert!(s.update(bad).is_err());
    let reload = params(&with(base_body(), "width", json!(128)));
    assert!(s.update(reload).unwrap().needs_reload());
    let status = s.status();
    assert_eq!(
        (
            status.params_version,
            status.serving_params_version,
            status.restart_count,
            status.error_count
        ),
        (2, Some(2), 1, 2),
        "the counters survive the reload"
    );
    assert_eq!(status.last_params["width"], 128);
    assert_eq!(status.frames_submitted, 4);
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The interpolation docs/ALGORITHM.md §8 states, in f64: (1 − t)·a + t·b, or the spherical
/// sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b with θ the angle between a and b.
fn interpolated(a: &Tensor, b: &Tensor, t: f64, slerp: bool) -> Vec<f64> {
    let (a, b) = (flat(a), flat(b));
    let (wa, wb) = if slerp {
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let dot = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>() / (norm(&a) * norm(&b));
        let theta = dot.clamp(-1.0, 1.0).acos();
        (
            ((1.0 - t) * theta).sin() / theta.sin(),
            (t * theta).sin() / theta.sin(),
        )
    } else {
        (1.0 - t, t)
    };
    a.iter().zip(&b).map(|(x, y)| wa * x + wb * y).collect()
}

fn max_diff(got: &Tensor, want: &[f64]) -> f64 {
    flat(got)
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max)
}

/// Transitions (issue #16 item 5): frame k of n is conditioned on the stated interpolation at
/// k/n between the embedding in force and the new prompt's (linear and slerp), the n-th frame
/// on the new embedding exactly; a change mid-glide starts from where it is; an update without
/// a transition switches at once; a seed glides its noise the same way; a reload or a new batch
/// size drops the glide.
#[test]
fn a_transition_glides_prompt_and_seed_frame_by_frame_and_ends_on_the_target() {
    use sdstream::params::{InterpolationMethod, Transition};
    let base = base_body();
    let mut s = stream(&base);
    for i in 0..2 {
        s.process_tensor(&frame_tensor(i)).unwrap();
    }
    let encode = |text: &str| models().encode_text(text).unwrap();
    let cat = s.conditioning().cond.clone();
    assert_eq!(abs_err(&cat, &encode("a photo of a cat")).0, 0.0);
    let dog = encode("a photo of a dog");
    let linear = Transition::new(4, InterpolationMethod::Linear);
    let update = s
        .update_with_transition(
            params(&with(base.clone(), "prompt", json!("a photo of a dog"))),
            linear,
        )
        .unwrap();
    assert!(update.is_hot());
    // Nothing moves before the next frame.
    assert_eq!(abs_err(&s.conditioning().cond, &cat).0, 0.0);
    assert_eq!(s.transition_progress().prompt, Some((0, 4)));
    let mut worst: f64 = 0.0;
    for k in 1..=3u32 {
        s.process_tensor(&frame_tensor(k as usize % 8)).unwrap();
        let want = interpolated(&cat, &dog, f64::from(k) / 4.0, false);
        worst = worst.max(max_diff(&s.conditioning().cond, &want));
        assert_eq!(s.transition_progress().prompt, Some((k, 4)));
    }
    assert!(worst < 1e-6, "linear glide off by {worst:.2e}");
    s.process_tensor(&frame_tensor(4)).unwrap();
    assert_eq!(
        abs_err(&s.conditioning().cond, &dog).0,
        0.0,
        "ends on the target"
    );
    assert_eq!(s.transition_progress().prompt, None);

    // Slerp over 4 frames to "fox", interrupted after 2 by "owl" over 2 frames: the owl glide
    // starts from the value after frame 2.
    let fox = encode("a photo of a fox");
    let owl = encode("a photo of an owl");
    let slerp4 = Transition::new(4, InterpolationMethod::Slerp);
    s.update_with_transition(
        params(&with(base.clone(), "prompt", json!("a photo of a fox"))),
        slerp4,
    )
    .unwrap();
    let mut worst: f64 = 0.0;
    for k in 1..=2u32 {
        s.process_tensor(&frame_tensor((4 + k as usize) % 8))
            .unwrap();
        let want = interpolated(&dog, &fox, f64::from(k) / 4.0, true);
        worst = worst.max(max_diff(&s.conditioning().cond, &want));
    }
    assert!(worst < 1e-5, "slerp glide off by {worst:.2e}");
    let midway = s.conditioning().cond.clone();
    s.update_with_transition(
        params(&with(base.clone(), "prompt", json!("a photo of an owl"))),
        Transition::new(2, InterpolationMethod::Slerp),
    )
    .unwrap();
    s.process_tensor(&frame_tensor(7)).unwrap();
    let want = interpolated(&midway, &owl, 0.5, true);
    let off = max_diff(&s.conditioning().cond, &want);
    assert!(
        off < 1e-5,
        "a glide mid-glide starts from where it is: off by {off:.2e}"
    );
    // An update without a transition mid-glide switches on the next frame.
    s.update(params(&with(
        base.clone(),
        "prompt",
        json!("a photo of a cat"),
    )))
    .unwrap();
    assert_eq!(s.transition_progress().prompt, None);
    assert_eq!(abs_err(&s.conditioning().cond, &cat).0, 0.0);

    // The seed: the stream's noise glides from seed 2's to seed 777's.
    let draw = |seed| {
        TorchGenerator::new(seed)
            .randn_tensor(&[3, 4, 8, 8], &Device::Cpu)
            .unwrap()
    };
    let (two, seven) = (draw(2), draw(777));
    assert_eq!(abs_err(s.state().init_noise(), &two).0, 0.0);
    let cat_seed = with(base.clone(), "seed", json!(777));
    s.update_with_transition(
        params(&cat_seed),
        Transition::new(2, InterpolationMethod::Slerp),
    )
    .unwrap();
    s.process_tensor(&frame_tensor(0)).unwrap();
    let off = max_diff(
        s.state().init_noise(),
        &interpolated(&two, &seven, 0.5, true),
    );
    assert!(off < 1e-5, "seed glide off by {off:.2e}");
    assert_eq!(s.transition_progress().seed, Some((1, 2)));
    s.process_tensor(&frame_tensor(1)).unwrap();
    assert_eq!(abs_err(s.state().init_noise(), &seven).0, 0.0);
    assert_eq!(s.transition_progress().seed, None);

    // A new batch size mid-glide starts the new stream from the new values.
    s.update_with_transition(
        params(&with(cat_seed.clone(), "prompt", json!("a photo of a dog"))),
        linear,
    )
    .unwrap();
    s.process_tensor(&frame_tensor(2)).unwrap();
    assert!(s.transition_progress().prompt.is_some());
    let resized = with(
        with(cat_seed, "prompt", json!("a photo of a dog")),
        "t_index_list",
        json!([20, 32]),
    );
    s.update_with_transition(params(&resized), linear).unwrap();
    assert!(
        s.transition_progress().prompt.is_some(),
        "the prompt glide goes on"
    );
    assert_eq!(s.transition_progress().seed, None);
    // A reload drops every glide.
    let reloaded = with(resized, "width", json!(128));
    assert!(
        s.update_with_transition(params(&reloaded), linear)
            .unwrap()
            .needs_reload()
    );
    assert_eq!(s.transition_progress(), Default::default());
    // A transition out of range changes nothing.
    let too_long = Transition::new(Transition::MAX_STEPS + 1, InterpolationMethod::Linear);
    assert!(matches!(
        s.update_with_transition(params(&base), too_long),
        Err(Error::InvalidParam { .. })
    ));
}

/// `skip_diffusion`: each frame leaves as it came in, through the image processors only (Daydream's
/// processors-only path): no filter, ControlNet, encode, UNet or decode; `feedback` sees the
/// previous output; text-to-image is refused naming the field; turning it on or off is a reload.
#[test]
fn skip_diffusion_passes_frames_through_the_image_processors() {
    use sdstream::preprocess::{self, ProcessorInputs};
    let plain = with(
        with(base_body(), "skip_diffusion", json!(true)),
        "use_safety_checker",
        json!(false),
    );
    let mut s = stream(&plain);
    for i in 0..3 {
        let x = frame_tensor(i);
        let out = s.process_tensor(&x).unwrap();
        let unit = ((&x + 1.0).unwrap() / 2.0).unwrap();
        assert_eq!(abs_err(&out, &unit).0, 0.0, "frame {i}");
        let t = s.timings();
        assert_eq!((t.encode, t.unet, t.decode), Default::default());
    }
    // Through the frame API the 8-bit pixels come back as they went in.
    let img = image::open(fixture("frames/001.png")).unwrap().to_rgb8();
    let frame = Frame::packed(img.as_raw(), 64, 64, PixelFormat::Rgb8).unwrap();
    let out = s.process(&frame).unwrap();
    assert_eq!(out.data, *img.as_raw());
    let err = s.txt2img().expect_err("no input frame");
    assert!(
        matches!(&err, Error::InvalidParam { field, .. } if field == "skip_diffusion"),
        "{err}"
    );

    // The safety checker (on by default) still sees every output: the tiny pipeline's own
    // passes it, so the frame leaves unchanged.
    let mut checked = stream(&with(base_body(), "skip_diffusion", json!(true)));
    let x = frame_tensor(0);
    let out = checked.process_tensor(&x).unwrap();
    assert_eq!(abs_err(&out, &x.affine(0.5, 0.5).unwrap()).0, 0.0);
    let t = checked.timings();
    assert!(t.safety.checked && !t.safety.flagged, "{:?}", t.safety);
    assert_eq!(t.processors.runs("safety_checker"), 1);

    // A preprocessing chain (feedback, then blur) and a postprocessing one (sharpen), against
    // the processors applied by hand in [0, 1].
    let chained = with(
        with(
            plain.clone(),
            "image_preprocessing",
            json!({"enabled": true, "processors": [
                {"type": "feedback", "params": {"feedback_strength": 0.4}},
                {"type": "blur", "params": {"blur_intensity": 1.5, "kernel_size": 7}}]}),
        ),
        "image_postprocessing",
        json!({"enabled": true, "processors": [{"type": "sharpen"}]}),
    );
    let mut s = stream(&chained);
    let run = |name: &str, p: Value, x: &Tensor, previous: Option<&Tensor>| {
        let p: serde_json::Map<String, Value> = serde_json::from_value(p).unwrap();
        let inputs = ProcessorInputs {
            previous_output: previous,
            ..Default::default()
        };
        preprocess::apply(name, &p, x, &inputs).unwrap()
    };
    let mut previous: Option<Tensor> = None;
    let mut compared = 0;
    for i in 0..3 {
        let x = frame_tensor(i);
        let got = s.process_tensor(&x).unwrap();
        let unit = x.affine(0.5, 0.5).unwrap();
        let fed = run(
            "feedback",
            json!({"feedback_strength": 0.4}),
            &unit,
            previous.as_ref(),
        );
        let blurred = run(
            "blur",
            json!({"blur_intensity": 1.5, "kernel_size": 7}),
            &fed,
            None,
        );
        // The stream hands the chain's result on in [−1, 1] and back, clamped to [0, 1].
        let back = ((blurred.affine(2.0, -1.0).unwrap() + 1.0).unwrap() / 2.0)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let want = run("sharpen", json!({}), &back, None);
        let (max, _) = abs_err(&got, &want);
        assert!(max <= 1e-6, "frame {i}: max {max}");
        // A check that can fail: the processors changed the frame.
        assert!(abs_err(&got, &unit).0 > 0.01, "frame {i}");
        previous = Some(want);
        compared += 1;
    }
    assert_eq!(compared, 3);

    // Turning it on or off rebuilds the stream (a reload), on a diffusing stream and back.
    let mut diffusing = stream(&with(base_body(), "use_safety_checker", json!(false)));
    assert!(diffusing.update(params(&plain)).unwrap().needs_reload());
    let mut skipping = stream(&plain);
    let back_on = with(plain.clone(), "skip_diffusion", json!(false));
    assert!(skipping.update(params(&back_on)).unwrap().needs_reload());
}
