//! `StreamDiffusionParams`: Daydream's parameter model, field for field.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::json::{self, Shape};
use super::nested::{CachedAttentionConfig, ControlNetConfig, IPAdapterConfig, ProcessingConfig};
use super::settings::EngineSettings;
use super::weighted::{InterpolationMethod, Prompt, Seed};
use crate::{Error, Result};

/// Daydream's acceleration switch. Accepted for compatibility; every value means "the fastest
/// path available here".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Acceleration {
    /// Plain attention.
    None,
    /// Memory-efficient attention.
    Xformers,
    /// TensorRT engines (Daydream's default).
    #[default]
    Tensorrt,
}

impl fmt::Display for Acceleration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Acceleration::None => "none",
            Acceleration::Xformers => "xformers",
            Acceleration::Tensorrt => "tensorrt",
        })
    }
}

/// The parameters of a stream, as Daydream's `StreamDiffusionParams` defines them: the same JSON
/// body is accepted, means the same, and is rejected for the same reasons (plus the stricter
/// rules of docs/PARAMS.md). Every update is a complete set: omitted fields take the defaults
/// below.
///
/// Unknown fields are an error at every level. Integers are `i64` so that an out-of-range value
/// (a negative step, say) reaches validation and gets its rule's message; after
/// [`validate`](Self::validate) they are in range and may be cast.
///
/// "hot" fields are applied between two frames; "reload" fields need a new base pipeline (see
/// [`classify`](super::classify)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamDiffusionParams {
    /// Base model: a known id (stabilityai/sd-turbo, stabilityai/sdxl-turbo,
    /// prompthero/openjourney-v4, Lykon/dreamshaper-8) or a local diffusers folder. Reload.
    /// Default `"stabilityai/sd-turbo"`.
    pub model_id: String,
    /// Prompt text, or `[[text, weight], …]`; texts non-empty. Hot. Default `"flowers"`.
    pub prompt: Prompt,
    /// How weighted prompts blend. Hot. Default `"slerp"`.
    pub prompt_interpolation_method: InterpolationMethod,
    /// Normalise prompt weights to sum 1. Hot. Default true.
    pub normalize_prompt_weights: bool,
    /// What to steer away from (used when guidance is on). Hot.
    /// Default `"blurry, low quality, flat, 2d"`.
    pub negative_prompt: String,
    /// CFG strength; > 1 turns guidance on. Finite. Hot. Default 1.0.
    pub guidance_scale: f64,
    /// RCFG delta: how much of the stock noise is subtracted. Finite. Hot. Default 0.7.
    pub delta: f64,
    /// Size of the scheduler grid, 1–100. Hot. Default 50.
    pub num_inference_steps: i64,
    /// Grid steps run per frame: 1–4 items, each in 0..num_inference_steps, non-decreasing.
    /// Hot. Default `[12, 20, 32]`.
    pub t_index_list: Vec<i64>,
    /// Output width in pixels: 384–1024, multiple of 64 (64–2048, multiple of 8 with
    /// [`EngineSettings::allow_any_resolution`]). Reload. Default 512.
    pub width: i64,
    /// Output height, same rule as width. Reload. Default 512.
    pub height: i64,
    /// LoRAs to fuse: `{id: weight}`. Reload. Default null.
    pub lora_dict: Option<BTreeMap<String, f64>>,
    /// Fuse the LCM LoRA (ignored for turbo models). Reload. Default true.
    pub use_lcm_lora: bool,
    /// Which LCM LoRA. Reload. Default `"latent-consistency/lcm-lora-sdv1-5"`.
    pub lcm_lora_id: String,
    /// Accepted for compatibility; means "fastest available here". Reload. Default `"tensorrt"`.
    pub acceleration: Acceleration,
    /// Run the safety checker on outputs. Hot. Default true.
    pub use_safety_checker: bool,
    /// Daydream's NSFW threshold (higher lets more through). Finite. Hot. Default 0.5.
    pub safety_checker_threshold: f64,
    /// All t_index_list steps in one batched UNet call. Reload. Default true.
    pub use_denoising_batch: bool,
    /// Re-noise each input latent. Reload. Default true.
    pub do_add_noise: bool,
    /// Pass frames through the processors only, no diffusion. Reload. Default false.
    pub skip_diffusion: bool,
    /// Seed, or `[[seed, weight], …]`; each 0 ≤ seed < 2^53. Hot. Default 789.
    pub seed: Seed,
    /// How weighted seeds' noises blend. Hot. Default `"linear"`.
    pub seed_interpolation_method: InterpolationMethod,
    /// Normalise seed weights to sum 1. Hot. Default true.
    pub normalize_seed_weights: bool,
    /// Skip frames too similar to the last one. Reload. Default false.
    pub enable_similar_image_filter: bool,
    /// Similarity above which frames may be skipped, 0–1. Reload. Default 0.98.
    pub similar_image_filter_threshold: f64,
    /// Most consecutive frames skipped, ≥ 0. Reload. Default 10.
    pub similar_image_filter_max_skip_frame: i64,
    /// ControlNets: no duplicate model_id; each fits the base model's family; SDXL at most 3
    /// enabled. Per-net scale/enabled/preprocessor/params/guidance window are hot; adding,
    /// removing or replacing a net is a ControlNet swap. Default `[]`.
    pub controlnets: Vec<ControlNetConfig>,
    /// IPAdapter (sd15 and sdxl only). enabled/scale/weight_type hot, the rest reload.
    /// Default: disabled.
    pub ip_adapter: IPAdapterConfig,
    /// Style image for the IPAdapter (Daydream fetches it). Hot.
    /// Default Daydream's vortex texture URL.
    pub ip_adapter_style_image_url: String,
    /// Image processors before the pipeline. Hot. Default null.
    pub image_preprocessing: Option<ProcessingConfig>,
    /// Image processors after the pipeline. Hot. Default null.
    pub image_postprocessing: Option<ProcessingConfig>,
    /// Latent processors before the UNet. Hot. Default null.
    pub latent_preprocessing: Option<ProcessingConfig>,
    /// Latent processors after the UNet. Hot. Default null.
    pub latent_postprocessing: Option<ProcessingConfig>,
    /// Daydream's loading overlay during reloads; sdstream has no overlay. Hot. Default true.
    pub show_reloading_frame: bool,
    /// StreamV2V's cached attention. `enabled` reload, `max_frames` / `interval` hot.
    /// Default: disabled.
    pub cached_attention: CachedAttentionConfig,
}

/// Daydream's default IPAdapter style image.
pub const DEFAULT_IP_ADAPTER_STYLE_IMAGE_URL: &str =
    "https://storage.googleapis.com/lp-ai-assets/ipadapter_style_imgs/textures/vortex.jpeg";

/// The nested objects of the body, so that lists are refused where Daydream wants objects.
const BODY_SHAPE: Shape = {
    const PROCESSING: Shape = Shape::Object(&[("processors", Shape::ListOf(&Shape::Object(&[])))]);
    Shape::Object(&[
        ("controlnets", Shape::ListOf(&Shape::Object(&[]))),
        ("ip_adapter", Shape::Object(&[])),
        ("image_preprocessing", PROCESSING),
        ("image_postprocessing", PROCESSING),
        ("latent_preprocessing", PROCESSING),
        ("latent_postprocessing", PROCESSING),
        ("cached_attention", Shape::Object(&[])),
    ])
};

impl Default for StreamDiffusionParams {
    fn default() -> Self {
        StreamDiffusionParams {
            model_id: "stabilityai/sd-turbo".to_owned(),
            prompt: Prompt::default(),
            prompt_interpolation_method: InterpolationMethod::Slerp,
            normalize_prompt_weights: true,
            negative_prompt: "blurry, low quality, flat, 2d".to_owned(),
            guidance_scale: 1.0,
            delta: 0.7,
            num_inference_steps: 50,
            t_index_list: vec![12, 20, 32],
            width: 512,
            height: 512,
            lora_dict: None,
            use_lcm_lora: true,
            lcm_lora_id: "latent-consistency/lcm-lora-sdv1-5".to_owned(),
            acceleration: Acceleration::Tensorrt,
            use_safety_checker: true,
            safety_checker_threshold: 0.5,
            use_denoising_batch: true,
            do_add_noise: true,
            skip_diffusion: false,
            seed: Seed::default(),
            seed_interpolation_method: InterpolationMethod::Linear,
            normalize_seed_weights: true,
            enable_similar_image_filter: false,
            similar_image_filter_threshold: 0.98,
            similar_image_filter_max_skip_frame: 10,
            controlnets: Vec::new(),
            ip_adapter: IPAdapterConfig::disabled(),
            ip_adapter_style_image_url: DEFAULT_IP_ADAPTER_STYLE_IMAGE_URL.to_owned(),
            image_preprocessing: None,
            image_postprocessing: None,
            latent_preprocessing: None,
            latent_postprocessing: None,
            show_reloading_frame: true,
            cached_attention: CachedAttentionConfig::disabled(),
        }
    }
}

impl StreamDiffusionParams {
    /// Parses a Daydream JSON body and validates it with default [`EngineSettings`].
    pub fn from_json(text: &str) -> Result<Self> {
        Self::from_json_with(text, &EngineSettings::default())
    }

    /// Parses a Daydream JSON body and validates it under `settings` (which may relax the
    /// resolution rule and say where local models live).
    pub fn from_json_with(text: &str, settings: &EngineSettings) -> Result<Self> {
        let params = Self::from_json_unvalidated(text)?;
        params.validate(settings)?;
        Ok(params)
    }

    /// Parses without validating: types, enum values and unknown fields are still checked, the
    /// rules of [`validate`](Self::validate) are not. For callers that merge before validating.
    pub fn from_json_unvalidated(text: &str) -> Result<Self> {
        json::parse(text, BODY_SHAPE)
    }

    /// These parameters with `patch` merged in as JSON Merge Patch ([`merge_patch`]: objects
    /// merge, `null` restores a default, anything else replaces), validated under `settings`.
    /// `self` is unchanged either way.
    ///
    /// [`merge_patch`]: super::merge_patch
    pub fn patched(&self, patch: &serde_json::Value, settings: &EngineSettings) -> Result<Self> {
        let mut merged: serde_json::Value =
            serde_json::from_str(&self.to_json()).map_err(|e| Error::Json(e.to_string()))?;
        json::merge_patch(&mut merged, patch);
        Self::from_json_with(&merged.to_string(), settings)
    }

    /// The parameters as JSON, every field present; [`from_json`](Self::from_json) of the
    /// result gives back an equal value.
    pub fn to_json(&self) -> String {
        json::to_string(self)
    }
}
