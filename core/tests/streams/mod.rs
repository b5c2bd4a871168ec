//! The golden stream cases (tests/fixtures/golden/streams.json) run on any device and dtype:
//! core/tests/integration/stream.rs (CPU, f32, the CPU kernels), integration/kernel_variants.rs (CPU, the portable
//! kernels GPUs run, f32 against the goldens, f16 and bf16 against f32) and tests/cuda.rs (a CUDA
//! device, when there is one) share this harness.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, IndexOp, Tensor};
use sdstream::model::bundle::StableDiffusionModels;
use sdstream::model::kernels::{self, KernelPolicy, Winograd};
use sdstream::{EngineSettings, Frame, PixelFormat, StreamDiffusion, StreamDiffusionParams};
use serde_json::{Value, json};

use crate::common::{WorstFrame, abs_err, fixture, golden};

/// Every parity case of golden/streams.json (`self_t3_n30` is not one: core/tests/integration/stream.rs).
pub const CASES: &[&str] = &[
    "self_t3",
    "none_t2",
    "self_t1",
    "full_t2",
    "initialize_t4",
    "self_t3_nonoise",
    "self_t3_fullvae",
    "none_t4_fullvae_nonoise",
    "self_t3_nobatch",
    "initialize_t2_nobatch",
    "none_t3_nobatch_nonoise",
    "self_t3_prompt2_seed2",
    "self_t3_update_prompt",
    "txt2img_self_t3",
];

/// The ControlNet cases of golden/controlnet_streams.json that change nothing while they run
/// (core/tests/integration/controlnet.rs runs all of them, updates included, on the CPU).
pub const CONTROLNET_CASES: &[&str] = &[
    "cn1_self_t3",
    "cn2_window_self_t3",
    "cn2_window_full_t2",
    "cn2_window_initialize_t3",
    "cn2_window_none_t3_nobatch_nonoise",
];

/// Where and in what precision a case runs: `device` and `dtype` as EngineSettings spell them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub device: &'static str,
    pub dtype: &'static str,
}

impl Target {
    /// The CPU in f32: what the goldens were made in.
    pub const CPU_F32: Target = Target {
        device: "cpu",
        dtype: "f32",
    };
}

/// A case of golden/streams.json, or of golden/controlnet_streams.json for names starting `cn`.
pub fn case(name: &str) -> &'static Value {
    let manifest = if name.starts_with("cn") {
        "golden/controlnet_streams.json"
    } else {
        "golden/streams.json"
    };
    crate::common::golden_case(manifest, name)
}

pub fn settings_for(case: &Value, target: Target) -> EngineSettings {
    let vae = match case["vae"].as_str().unwrap() {
        "full" => "full".to_string(),
        _ => fixture("tiny-taesd").display().to_string(),
    };
    EngineSettings::from_json(
        &json!({
            "cfg_type": case["cfg_type"],
            "vae": vae,
            "allow_any_resolution": true,
            "device": target.device,
            "dtype": target.dtype,
        })
        .to_string(),
    )
    .unwrap()
}

pub fn params_for(case: &Value, target: Target) -> StreamDiffusionParams {
    let mut body = json!({
        "model_id": fixture("tiny-sd-turbo").display().to_string(),
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
    });
    if let Some(nets) = case["controlnets"].as_array() {
        let nets: Vec<Value> = nets
            .iter()
            .map(|net| {
                let mut net = net.clone();
                let folder = net["model_id"].as_str().unwrap();
                net["model_id"] = json!(fixture(folder).display().to_string());
                net
            })
            .collect();
        body["controlnets"] = json!(nets);
    }
    StreamDiffusionParams::from_json_with(&body.to_string(), &settings_for(case, target)).unwrap()
}

/// Networks loaded once per autoencoder kind, target and kernel policy (current on this
/// thread), shared by the cases.
pub fn models(case: &Value, target: Target) -> Arc<StableDiffusionModels> {
    type Cache = Mutex<HashMap<(bool, Target, KernelPolicy), Arc<StableDiffusionModels>>>;
    static MODELS: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let full = case["vae"] == "full";
    let mut cache = MODELS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    cache
        .entry((full, target, KernelPolicy::current()))
        .or_insert_with(|| {
            let settings = settings_for(case, target);
            let id = fixture("tiny-sd-turbo").display().to_string();
            Arc::new(StableDiffusionModels::load(&id, &settings, &mut |_| {}).unwrap())
        })
        .clone()
}

fn read_frame(rel: &str) -> (Vec<u8>, usize, usize) {
    let img = image::open(fixture(rel)).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    (img.into_raw(), w as usize, h as usize)
}

/// Runs case `name` on `target` and returns every frame's output, `[1, 3, H, W]` f32 in [0, 1]
/// on the CPU. The seeded noise is checked to be the reference's bit for bit (after rounding to
/// the target's dtype).
pub fn run_case(name: &str, target: Target) -> Vec<Tensor> {
    let case = case(name);
    let gold = golden(case["file"].as_str().unwrap());
    let models = models(case, target);
    let device = models.device.clone();
    let dtype = models.dtype;
    let mut stream =
        StreamDiffusion::with_models(models, params_for(case, target), settings_for(case, target))
            .unwrap();

    // The seeded noise is the reference's, bit for bit (rounded once to the stream's dtype).
    let want_noise = gold["init_noise"].to_dtype(dtype).unwrap();
    let got_noise = stream.state().init_noise().to_device(&Device::Cpu).unwrap();
    let (noise_max, _) = abs_err(&got_noise, &want_noise);
    assert_eq!(noise_max, 0.0, "{name}: init_noise differs from torch's");

    // The step-by-step path re-noises from torch's global generator: feed its recorded draws.
    if let Some(step_noise) = gold.get("step_noise") {
        let draws: Vec<Tensor> = (0..step_noise.dim(0).unwrap())
            .flat_map(|f| {
                let per_frame = step_noise.i(f).unwrap();
                (0..per_frame.dim(0).unwrap())
                    .map(|k| per_frame.i(k).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut draws = draws.into_iter();
        let device = device.clone();
        stream.set_renoise_source(Some(Box::new(move |shape| {
            let t = draws
                .next()
                .expect("more re-noise draws than the reference made");
            assert_eq!(t.dims(), shape);
            Ok(t.to_device(&device)?)
        })));
    }

    let frames: Vec<&str> = case["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let n_frames = gold["output"].dim(0).unwrap();
    let updates = case["updates"].as_array().cloned().unwrap_or_default();
    assert!(
        updates.iter().all(|u| u.get("prompt").is_some()),
        "{name}: only prompt updates are run here"
    );
    let txt2img = case["mode"] == "txt2img";
    assert!(
        n_frames >= 6,
        "{name}: the golden holds only {n_frames} frames"
    );
    assert!(
        txt2img || frames.len() >= n_frames,
        "{name}: fewer input frames than outputs"
    );
    let mut outputs = Vec::with_capacity(n_frames);
    for i in 0..n_frames {
        for update in updates.iter().filter(|u| u["before_frame"] == i) {
            let mut body: Value = serde_json::from_str(&stream.params().to_json()).unwrap();
            body["prompt"] = update["prompt"].clone();
            let new = StreamDiffusionParams::from_json_with(
                &body.to_string(),
                &settings_for(case, target),
            )
            .unwrap();
            let applied = stream.update(new).unwrap();
            assert!(
                applied.is_hot(),
                "{name}: a prompt change must be hot, got {applied:?}"
            );
        }
        let out = if txt2img {
            let latent = gold["x_t_latent"]
                .i(i)
                .and_then(|l| l.to_device(&device))
                .and_then(|l| l.to_dtype(dtype))
                .unwrap();
            stream.txt2img_from(&latent).unwrap()
        } else {
            let (data, w, h) = read_frame(frames.get(i).expect("checked above"));
            let frame = Frame::packed(&data, w, h, PixelFormat::Rgb8).unwrap();
            let x = frame.to_tensor(w, h, &device).unwrap();
            stream.process_tensor(&x).unwrap()
        };
        assert_eq!(out.dtype(), DType::F32, "{name}: outputs are f32");
        outputs.push(out.to_device(&Device::Cpu).unwrap());
    }
    outputs
}

/// Runs case `name` on `target` and checks every frame against the reference's within the
/// stream parity bounds (common::STREAM_MAX_ABS and STREAM_MEAN_ABS); prints each frame's error.
/// Returns the outputs.
pub fn check_case_against_golden(name: &str, target: Target) -> Vec<Tensor> {
    let gold = golden(case(name)["file"].as_str().unwrap());
    let outputs = run_case(name, target);
    let mut worst = WorstFrame::default();
    for (i, out) in outputs.iter().enumerate() {
        let want = gold["output"].i(i).unwrap().unsqueeze(0).unwrap();
        worst.add(name, i, out, &want);
    }
    worst.check(name, outputs.len());
    outputs
}

/// The difference of two runs of a case in 8-bit levels (pixel × 255): the worst frame's max
/// and the worst frame's mean absolute difference.
#[derive(Debug, Default, Clone, Copy)]
pub struct Levels {
    pub max: f32,
    pub mean: f32,
}

impl Levels {
    /// Prints `what`'s figures beside their bounds, `max` and `mean` levels; an error naming
    /// them when either is over.
    pub fn within(self, what: &str, max: f32, mean: f32) -> Result<(), String> {
        println!(
            "{what}: max {:.2} levels (≤ {max}), mean {:.3} levels (≤ {mean})",
            self.max, self.mean
        );
        if self.max <= max && self.mean <= mean {
            Ok(())
        } else {
            Err(format!(
                "{what}: max {:.2} levels (≤ {max}), mean {:.3} (≤ {mean})",
                self.max, self.mean
            ))
        }
    }

    /// [`Levels::within`], failing the test when over.
    pub fn assert_within(self, what: &str, max: f32, mean: f32) {
        if let Err(over) = self.within(what, max, mean) {
            panic!("{over}");
        }
    }

    pub fn between(a: &[Tensor], b: &[Tensor]) -> Levels {
        assert_eq!(a.len(), b.len(), "frame counts differ");
        let mut levels = Levels::default();
        for (x, y) in a.iter().zip(b) {
            let (max, mean) = abs_err(x, y);
            levels.max = levels.max.max(max * 255.0);
            levels.mean = levels.mean.max(mean * 255.0);
        }
        levels
    }

    /// Runs case `name` on `target` and measures it against `reference` (that case's outputs
    /// in f32), printing the figures after `label`.
    pub fn of_case(name: &str, target: Target, reference: &[Tensor], label: &str) -> Levels {
        let levels = Levels::between(&run_case(name, target), reference);
        println!(
            "{label} {} vs f32, {name}: max {:.2} levels, mean {:.3} levels",
            target.dtype, levels.max, levels.mean
        );
        levels
    }

    /// The larger of each figure.
    pub fn worst(self, other: Levels) -> Levels {
        Levels {
            max: self.max.max(other.max),
            mean: self.mean.max(other.mean),
        }
    }
}

/// The CPU in bf16 (f32 maps, GEMMs on bf16 operands; see kernels::gemm_bf16).
pub const CPU_BF16: Target = Target {
    device: "cpu",
    dtype: "bf16",
};

/// Every golden stream case (ControlNet streams included) in bf16 on the CPU against f32:
/// the worst frame of any case, and of the TAESD cases alone. Checks that every case's output
/// moved (the bf16 products ran) and that the ControlNets loaded took the UNet's precision.
pub fn cpu_bf16_against_f32() -> (Levels, Levels) {
    let mut worst = Levels::default();
    let mut worst_taesd = Levels::default();
    for name in CASES.iter().chain(CONTROLNET_CASES) {
        let reference = run_case(name, Target::CPU_F32);
        let levels = Levels::of_case(name, CPU_BF16, &reference, "cpu");
        assert!(
            levels.max > 0.0,
            "{name}: bf16 output equals f32's bit for bit"
        );
        worst = worst.worst(levels);
        if case(name)["vae"] != "full" {
            worst_taesd = worst_taesd.worst(levels);
        }
    }
    let models = models(case("cn1_self_t3"), CPU_BF16);
    let nets = models.cached_controlnet_ids();
    assert!(!nets.is_empty());
    for id in nets {
        let net = models.cached_controlnet(&id).unwrap();
        assert!(net.bf16_gemms(), "{id} runs its GEMMs in f32");
    }
    assert!(models.unet.bf16_gemms());
    (worst, worst_taesd)
}

/// Every golden stream case (ControlNet streams included) with every f32 3×3 stride-1
/// convolution on Winograd's kernel in `variant` (scoped on this thread), against the
/// reference's outputs within the bounds of core/tests/integration/stream.rs (each case's worst
/// frame is printed); checks that the kernel ran in every case.
pub fn check_cases_on_winograd(variant: Winograd) {
    let policy = KernelPolicy {
        winograd: variant,
        ..KernelPolicy::process()
    };
    let _policy = policy.enter();
    for name in CASES.iter().chain(CONTROLNET_CASES) {
        let before = kernels::winograd_convolutions_on_this_thread();
        check_case_against_golden(name, Target::CPU_F32);
        let ran = kernels::winograd_convolutions_on_this_thread() - before;
        println!("{name}: {ran} convolutions on Winograd's kernel ({variant:?})");
        // Measured 486 (txt2img: no encoder) to 1,818 (ControlNets, step by step) a case.
        assert!(
            ran >= 400,
            "{name}: only {ran} convolutions took Winograd's kernel"
        );
    }
}
