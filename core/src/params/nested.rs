//! The nested objects of the Daydream body: ControlNets, the IPAdapter, processor chains.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One ControlNet: which net, how strongly, and how its control image is made.
///
/// Hot fields (applied between two frames): `conditioning_scale`, `enabled`, `preprocessor`,
/// `preprocessor_params`, `control_guidance_start`, `control_guidance_end`. A different
/// `model_id` or `conditioning_channels` is a different network: a ControlNet swap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlNetConfig {
    /// The ControlNet: a known id for the base model's family, or a local diffusers folder.
    pub model_id: String,
    /// Strength of the residuals added to the UNet (Daydream: typically 0–1). Default 1.0.
    #[serde(default = "one")]
    pub conditioning_scale: f64,
    /// Channels of the control image the net takes (1–6); `None` means the net's own
    /// (3 for every net sdstream accepts). Default `None`.
    #[serde(default)]
    pub conditioning_channels: Option<i64>,
    /// How the control image is made from the input frame. Default `"passthrough"`.
    #[serde(default = "passthrough")]
    pub preprocessor: String,
    /// Parameters of the preprocessor (e.g. canny's `low_threshold`). Default `{}`.
    #[serde(default)]
    pub preprocessor_params: Map<String, Value>,
    /// Whether the net contributes. Disabled nets stay loaded, so enabling one is hot.
    /// Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Fraction of the denoising (0–1) where guidance starts. Default 0.0.
    #[serde(default)]
    pub control_guidance_start: f64,
    /// Fraction of the denoising (0–1) where guidance ends; ≥ start. Default 1.0.
    #[serde(default = "one")]
    pub control_guidance_end: f64,
}

impl ControlNetConfig {
    /// A ControlNet with every other field at its default.
    pub fn new(model_id: impl Into<String>) -> Self {
        ControlNetConfig {
            model_id: model_id.into(),
            conditioning_scale: 1.0,
            conditioning_channels: None,
            preprocessor: passthrough(),
            preprocessor_params: Map::new(),
            enabled: true,
            control_guidance_start: 0.0,
            control_guidance_end: 1.0,
        }
    }
}

/// Which IPAdapter variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpAdapterType {
    /// Style transfer from a reference image.
    #[default]
    Regular,
    /// Face identity (InsightFace embeddings).
    Faceid,
}

impl fmt::Display for IpAdapterType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpAdapterType::Regular => "regular",
            IpAdapterType::Faceid => "faceid",
        })
    }
}

/// IPAdapter settings (style transfer from an image). Accepted and validated for Daydream
/// compatibility; only sd15 and sdxl models support it.
///
/// `enabled`, `scale` and `weight_type` are hot; the other fields select weights: reload.
/// An object written as `{}` is *enabled* (Daydream's class default); the parameter set's own
/// default is a disabled adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IPAdapterConfig {
    /// Variant. Default `"regular"`.
    #[serde(rename = "type")]
    pub kind: IpAdapterType,
    /// Deprecated in Daydream (derived from type and model); accepted values only. Default null.
    pub ipadapter_model_path: Option<String>,
    /// Deprecated in Daydream (derived from type and model); accepted values only. Default null.
    pub image_encoder_path: Option<String>,
    /// InsightFace model for `faceid`. Default `"buffalo_l"`.
    pub insightface_model_name: Option<String>,
    /// Strength (0 off, 1 normal, 2 strong). Default 1.0.
    pub scale: f64,
    /// Per-layer weight distribution. Default `"linear"`.
    pub weight_type: Option<String>,
    /// Whether the adapter is active. Default true inside the object.
    pub enabled: bool,
}

impl Default for IPAdapterConfig {
    fn default() -> Self {
        IPAdapterConfig {
            kind: IpAdapterType::Regular,
            ipadapter_model_path: None,
            image_encoder_path: None,
            insightface_model_name: Some("buffalo_l".to_owned()),
            scale: 1.0,
            weight_type: Some("linear".to_owned()),
            enabled: true,
        }
    }
}

/// Most frames `cached_attention` may bank (Daydream's `CACHED_ATTENTION_MAX_FRAMES`): what the
/// bank holds.
pub const CACHED_ATTENTION_MAX_FRAMES: u32 = crate::model::attention_bank::MAX_BANKED_FRAMES as u32;
/// Longest `cached_attention.interval` (Daydream's bound: a minute at 24 fps).
pub const CACHED_ATTENTION_MAX_INTERVAL: u32 = 1440;

/// `cached_attention`: StreamV2V's feature bank (docs/ALGORITHM.md §5e). `enabled` is a reload,
/// `max_frames` and `interval` are hot. An object written as `{}` is *enabled* (Daydream's
/// class default); the parameter set's own default is a disabled bank (see docs/PARAMS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CachedAttentionConfig {
    /// Whether each self-attention also attends to the banked keys and values. Default true
    /// inside the object.
    pub enabled: bool,
    /// Frames kept in the bank, 1–4. Default 1.
    pub max_frames: u32,
    /// A frame enters the bank every `interval` UNet calls, 1–1440. Default 1.
    pub interval: u32,
}

impl Default for CachedAttentionConfig {
    fn default() -> Self {
        CachedAttentionConfig {
            enabled: true,
            max_frames: 1,
            interval: 1,
        }
    }
}

impl CachedAttentionConfig {
    /// The parameter set's default: a disabled bank.
    pub fn disabled() -> Self {
        CachedAttentionConfig {
            enabled: false,
            ..CachedAttentionConfig::default()
        }
    }
}

impl IPAdapterConfig {
    /// The parameter set's default: every field at its default but `enabled: false`.
    pub fn disabled() -> Self {
        IPAdapterConfig {
            enabled: false,
            ..IPAdapterConfig::default()
        }
    }
}

/// One processor in a chain: `{type, enabled, params}`. Position in the list is its order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorConfig {
    /// Processor name (see [`crate::params::catalog::IMAGE_PROCESSORS`] and
    /// [`crate::params::catalog::LATENT_PROCESSORS`]).
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether it runs. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Its parameters. Default `{}`.
    #[serde(default)]
    pub params: Map<String, Value>,
}

impl ProcessorConfig {
    /// An enabled processor with no parameters.
    pub fn new(kind: impl Into<String>) -> Self {
        ProcessorConfig {
            kind: kind.into(),
            enabled: true,
            params: Map::new(),
        }
    }
}

/// A processor chain (`image_preprocessing`, `image_postprocessing`, latent ones):
/// `{enabled, processors: [{type, enabled, params}]}`. Changes are hot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessingConfig {
    /// Whether the chain runs at all. Default true.
    pub enabled: bool,
    /// The processors, applied in list order. Default `[]`.
    pub processors: Vec<ProcessorConfig>,
}

impl Default for ProcessingConfig {
    fn default() -> Self {
        ProcessingConfig {
            enabled: true,
            processors: Vec::new(),
        }
    }
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

fn passthrough() -> String {
    "passthrough".to_owned()
}
