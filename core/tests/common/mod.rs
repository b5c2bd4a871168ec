//! Helpers shared by the integration tests: fixture paths, golden files, error metrics, scratch
//! copies of fixtures.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/<rel>` at the workspace root, or `$SDSTREAM_FIXTURES/<rel>` when that is set
/// (a test binary run on another machine: docs/GPU.md).
pub fn fixture(rel: &str) -> PathBuf {
    match std::env::var_os("SDSTREAM_FIXTURES").filter(|v| !v.is_empty()) {
        Some(root) => PathBuf::from(root).join(rel),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(rel),
    }
}

/// All tensors of a golden safetensors file under tests/fixtures/, as stored (f32 values,
/// int64 ids and timesteps), on the CPU.
pub fn golden(rel: &str) -> HashMap<String, Tensor> {
    let path = fixture(rel);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read golden {}: {e}", path.display()))
}

/// The case called `name` in a golden manifest under tests/fixtures/ (a JSON object whose `cases`
/// list holds objects with a `name`, as tests/reference writes them). Each manifest is read once
/// per test binary.
pub fn golden_case(manifest_rel: &str, name: &str) -> &'static serde_json::Value {
    use std::sync::{Mutex, OnceLock, PoisonError};
    static MANIFESTS: OnceLock<Mutex<HashMap<String, &'static serde_json::Value>>> =
        OnceLock::new();
    let mut manifests = MANIFESTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let manifest = *manifests
        .entry(manifest_rel.to_string())
        .or_insert_with(|| {
            let path = fixture(manifest_rel);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            Box::leak(Box::new(json))
        });
    drop(manifests);
    manifest["cases"]
        .as_array()
        .unwrap_or_else(|| panic!("{manifest_rel} has no \"cases\" list"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name} in {manifest_rel}"))
}

/// (max abs, mean abs) difference of two same-shaped tensors, computed in f32.
pub fn abs_err(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap();
    let max = d.max_all().unwrap().to_scalar::<f32>().unwrap();
    let mean = d.mean_all().unwrap().to_scalar::<f32>().unwrap();
    (max, mean)
}

/// `t` as f32 on the CPU (a device's output, to compare with the CPU's).
pub fn f32_on_cpu(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32)
        .unwrap()
        .to_device(&candle_core::Device::Cpu)
        .unwrap()
}

/// The largest magnitude in `t` (the scale errors are measured against).
pub fn max_magnitude(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The fraction of values of `got` more than `levels`/255 from `want` (same shape and device).
pub fn share_off(got: &Tensor, want: &Tensor, levels: f32) -> f32 {
    let d = (got - want).unwrap().abs().unwrap();
    let off = d.gt(levels / 255.0).unwrap().to_dtype(DType::F32).unwrap();
    off.mean_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Prints the error of `got` against `want` and asserts its max abs is within `tol`.
pub fn check(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let (max, mean) = abs_err(got, want);
    println!("{what}: max {max:.3e} mean {mean:.3e}");
    assert!(max <= tol, "{what}: max abs error {max} > {tol}");
}

/// An empty scratch folder unique to this test process and `tag`.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdstream-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The JSON text of a fixture's config file with `key` set to `value`.
pub fn edited_config(config_rel: &str, key: &str, value: serde_json::Value) -> String {
    let text = std::fs::read_to_string(fixture(config_rel)).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[key] = value;
    json.to_string()
}

/// Settings for the tiny checkpoint: TAESD from `tests/fixtures/tiny-taesd`, 64×64 allowed,
/// the given cfg_type.
pub fn tiny_settings(cfg_type: &str) -> sdstream::EngineSettings {
    sdstream::EngineSettings::from_json(
        &serde_json::json!({
            "cfg_type": cfg_type,
            "vae": fixture("tiny-taesd").display().to_string(),
            "allow_any_resolution": true,
        })
        .to_string(),
    )
    .expect("tiny settings")
}

/// The tiny checkpoint's networks (with TAESD), loaded once per test binary and shared, their
/// ControlNet cache included. (cfg_type does not affect the networks.)
pub fn tiny_models() -> std::sync::Arc<sdstream::model::bundle::StableDiffusionModels> {
    use std::sync::{Arc, OnceLock};
    static MODELS: OnceLock<Arc<sdstream::model::bundle::StableDiffusionModels>> = OnceLock::new();
    MODELS
        .get_or_init(|| {
            let id = fixture("tiny-sd-turbo").display().to_string();
            Arc::new(
                sdstream::model::bundle::StableDiffusionModels::load(
                    &id,
                    &tiny_settings("self"),
                    &mut |_| {},
                )
                .expect("tiny models"),
            )
        })
        .clone()
}

/// Copies the folder `from` into `to` (created), recursively.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("{}: {e}", target.display()));
        }
    }
}

/// The stream parity bounds on [0, 1] pixels: every frame's max and mean absolute error.
pub const STREAM_MAX_ABS: f32 = 2e-3;
/// See [`STREAM_MAX_ABS`].
pub const STREAM_MEAN_ABS: f32 = 2e-4;

/// The worst frame of a stream case against its golden outputs.
#[derive(Debug, Default)]
pub struct WorstFrame {
    max: f32,
    mean: f32,
    frames: usize,
}

impl WorstFrame {
    /// Compares frame `i` of case `name` with the golden one and prints its error.
    pub fn add(&mut self, name: &str, i: usize, got: &Tensor, want: &Tensor) {
        let (max, mean) = abs_err(got, want);
        println!("{name} frame {i}: max {max:.2e} mean {mean:.2e}");
        self.max = self.max.max(max);
        self.mean = self.mean.max(mean);
        self.frames += 1;
    }

    /// Asserts that `frames` frames were compared and the worst is within the stream bounds.
    pub fn check(&self, name: &str, frames: usize) {
        assert_eq!(self.frames, frames, "{name}: not every frame was compared");
        println!(
            "{name}: worst frame max abs {:.2e}, mean abs {:.2e}",
            self.max, self.mean
        );
        assert!(
            self.max <= STREAM_MAX_ABS && self.mean <= STREAM_MEAN_ABS,
            "{name}: max abs {:.3e} (≤ {STREAM_MAX_ABS:e}), mean abs {:.3e} (≤ {STREAM_MEAN_ABS:e})",
            self.max,
            self.mean
        );
    }
}

/// Fixture frame `i` (tests/fixtures/frames holds 8, taken round) as a stream's 64×64 input
/// tensor `[1, 3, 64, 64]` in [−1, 1] on the CPU.
pub fn frame_tensor(i: usize) -> Tensor {
    let img = image::open(fixture(&format!("frames/{:03}.png", i % 8)))
        .unwrap_or_else(|e| panic!("fixture frame {i}: {e}"))
        .to_rgb8();
    let f = sdstream::Frame::packed(img.as_raw(), 64, 64, sdstream::PixelFormat::Rgb8).unwrap();
    f.to_tensor(64, 64, &Device::Cpu).unwrap()
}

/// The first `count` fixture frames (tests/fixtures/frames, 64×64) as packed RGB8.
pub fn rgb8_frames(count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            image::open(fixture(&format!("frames/{i:03}.png")))
                .unwrap()
                .to_rgb8()
                .into_raw()
        })
        .collect()
}

/// The outputs of a stream over `frames` (64×64 RGB8), one after another.
pub fn stream_outputs(
    params: sdstream::StreamDiffusionParams,
    settings: sdstream::EngineSettings,
    frames: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    let mut stream = sdstream::StreamDiffusion::new(params, settings).expect("the stream starts");
    frames
        .iter()
        .map(|data| {
            let frame = sdstream::Frame::packed(data, 64, 64, sdstream::PixelFormat::Rgb8)
                .expect("a 64×64 frame");
            stream.process(&frame).expect("a frame").data
        })
        .collect()
}

/// The ControlNet residuals a UNet golden holds (`control_down_residual_NN`, in order, and
/// `control_mid_residual`).
pub fn control_residuals_of(
    g: &HashMap<String, Tensor>,
) -> sdstream::model::unet::ControlResiduals {
    let mut down = Vec::new();
    while let Some(t) = g.get(&format!("control_down_residual_{:02}", down.len())) {
        down.push(t.clone());
    }
    sdstream::model::unet::ControlResiduals {
        down,
        mid: g["control_mid_residual"].clone(),
    }
}

/// The two-row SDXL UNet conditioning of an SDXL golden (tests/reference/make_sdxl_fixtures.py):
/// the prompt and negative prompt embeddings as the context, their pooled projections and the
/// time ids as the added conditioning, in the rows' order.
pub fn sdxl_unet_conditioning(
    g: &HashMap<String, Tensor>,
) -> (Tensor, sdstream::model::unet::AddedConditioning) {
    let context = Tensor::cat(&[&g["prompt_embeds"], &g["negative_prompt_embeds"]], 0).unwrap();
    let added = sdstream::model::unet::AddedConditioning {
        text_embeds: Tensor::cat(
            &[
                &g["pooled_prompt_embeds"],
                &g["negative_pooled_prompt_embeds"],
            ],
            0,
        )
        .unwrap(),
        time_ids: g["add_time_ids"].repeat((2, 1)).unwrap(),
    };
    (context, added)
}
