//! The Stable Diffusion safety checker, as diffusers' `StableDiffusionSafetyChecker` with the
//! CLIP image processor in front of it.
//!
//! The image (as the 8-bit picture a pipeline would hand out) is resized so its shorter side is
//! the vision tower's input size with PIL's bicubic filter, centre-cropped, scaled to [0, 1] and
//! normalised with CLIP's mean and deviation; CLIP's vision tower ([`ClipVisionModel`]) and a
//! linear projection (no bias) give an image embedding, whose cosine with each of 17 concept
//! embeddings and 3 "special care" embeddings is compared with that embedding's threshold (a
//! weight of the checkpoint). In float32, as diffusers computes it on numpy values:
//!
//! - special score j = round₃(cos_j − w_j + a), where a starts at 0 and becomes 0.01 once a
//!   special score is positive (so it also raises the later special scores);
//! - concept score j = round₃(cos_j − w_j + a);
//! - the image is flagged when a concept score is positive.
//!
//! `safety_checker_threshold` (Daydream's knob, default 0.5) moves that last comparison: flagged
//! when a concept score exceeds `threshold − 0.5`, so 0.5 is diffusers' rule exactly, lower is
//! stricter, higher more lenient (in units of cosine). Weights: `CompVis/stable-diffusion-safety-
//! checker`, or the `safety_checker/` folder of a diffusers pipeline; keys as transformers 4.x
//! saved them (`vision_model.vision_model.…`) or 5.x (`vision_model.…`).

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

use crate::clip_vision::{ClipVisionModel, VisionConfig, clip_input};
use crate::resize::Filter;
use crate::{Error, Result};

/// The concept embeddings diffusers' checker holds.
const CONCEPTS: usize = 17;
/// The "special care" embeddings.
const SPECIAL_CONCEPTS: usize = 3;

/// The special-care adjustment diffusers adds once a special concept matches.
const SPECIAL_ADJUSTMENT: f32 = 0.01;

/// `config.json` of the checker: a transformers `CLIPConfig` of which the vision half is used.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Width of the image embedding.
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// The vision tower's configuration.
    #[serde(default)]
    pub vision_config: Option<Value>,
    /// Older checkpoints (CompVis's among them) also carry this, which transformers lets
    /// override `vision_config` key by key.
    #[serde(default)]
    pub vision_config_dict: Option<Value>,
}

fn default_projection_dim() -> usize {
    512
}

impl Config {
    /// The vision configuration: `vision_config` with `vision_config_dict`'s keys over it.
    pub fn vision(&self) -> Result<VisionConfig> {
        let mut merged = match &self.vision_config {
            Some(Value::Object(map)) => map.clone(),
            Some(Value::Null) | None => serde_json::Map::new(),
            Some(other) => {
                return Err(Error::param(
                    "vision_config",
                    format!("expected an object, got {other}"),
                ));
            }
        };
        if let Some(Value::Object(overrides)) = &self.vision_config_dict {
            merged.extend(overrides.clone());
        }
        serde_json::from_value(Value::Object(merged))
            .map_err(|e| Error::param("vision_config", e.to_string()))
    }

    /// Checks the vision configuration and the projection's width.
    pub fn validate(&self) -> Result<()> {
        self.vision()?.validate()?;
        crate::limits::Limits::new("safety checker").value(
            "projection_dim",
            self.projection_dim,
            crate::limits::MAX_CHANNELS,
        )
    }
}

/// What the checker said of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyVerdict {
    /// The 3 special-care scores, rounded to 3 decimals.
    pub special_scores: Vec<f32>,
    /// The 17 concept scores, rounded to 3 decimals.
    pub concept_scores: Vec<f32>,
    /// Whether the image is flagged at the threshold it was checked with.
    pub flagged: bool,
}

impl SafetyVerdict {
    /// The highest concept score (how close the image came to being flagged).
    pub fn max_concept_score(&self) -> f32 {
        self.concept_scores
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }
}

/// diffusers' `StableDiffusionSafetyChecker`.
#[derive(Debug, Clone)]
pub struct SafetyChecker {
    vision: ClipVisionModel,
    /// [hidden, projection]: the projection's weight, transposed for a matmul.
    visual_projection: Tensor,
    /// [17, projection] and [3, projection], each row normalised.
    concept_embeds: Tensor,
    special_care_embeds: Tensor,
    concept_weights: Vec<f32>,
    special_weights: Vec<f32>,
}

/// `round(x, 3)` as numpy computes it on a float32: x·1000 rounded half to even, over 1000.
fn round3(x: f32) -> f32 {
    (x * 1000.0).round_ties_even() / 1000.0
}

/// Rows scaled to unit length (torch's `F.normalize`: divided by max(‖row‖, 1e-12)).
fn normalize_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    Ok(x.broadcast_div(&norm)?)
}

impl SafetyChecker {
    /// Builds the checker from `config` with the weights of `vb` (the file's top level).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let vision_config = config.vision()?;
        let vision = ClipVisionModel::new(&vision_config, vb.pp("vision_model"))?;
        let p = config.projection_dim;
        let visual_projection = vb
            .get((p, vision_config.hidden_size), "visual_projection.weight")?
            .t()?
            .contiguous()?;
        // diffusers' checker has 17 concepts and 3 special-care ones, whatever the config.
        let embeds = |name: &str, rows: usize| -> Result<Tensor> {
            let t = vb.get((rows, p), name)?.to_dtype(DType::F32)?;
            normalize_rows(&t.to_device(&Device::Cpu)?)
        };
        let weights = |name: &str, rows: usize| -> Result<Vec<f32>> {
            let t = vb.get(rows, name)?.to_dtype(DType::F32)?;
            Ok(t.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
        };
        let concept_embeds = embeds("concept_embeds", CONCEPTS)?;
        let special_care_embeds = embeds("special_care_embeds", SPECIAL_CONCEPTS)?;
        let concept_weights = weights("concept_embeds_weights", CONCEPTS)?;
        let special_weights = weights("special_care_embeds_weights", SPECIAL_CONCEPTS)?;
        Ok(Self {
            vision,
            visual_projection,
            concept_embeds,
            special_care_embeds,
            concept_weights,
            special_weights,
        })
    }

    /// The side of the square the vision tower takes.
    pub fn input_size(&self) -> usize {
        self.vision.config().image_size
    }

    /// The CLIP image processor's output for an 8-bit RGB picture (`rgb`: `width · height · 3`
    /// bytes): `[1, 3, S, S]` f32 on `device`, S = [`input_size`](Self::input_size).
    pub fn clip_input(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
        device: &Device,
    ) -> Result<Tensor> {
        clip_input(
            rgb,
            width,
            height,
            self.input_size(),
            Filter::Bicubic,
            device,
        )
    }

    /// The image embedding `[1, projection]` (f32) of a processed input.
    pub fn image_embeds(&self, clip_input: &Tensor) -> Result<Tensor> {
        let pooled = self.vision.forward(clip_input)?.pooled;
        Ok(pooled
            .matmul(&self.visual_projection)?
            .to_dtype(DType::F32)?)
    }

    /// The cosines of an image embedding with the special-care and the concept embeddings.
    pub fn cosines(&self, image_embeds: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        let e = normalize_rows(&image_embeds.to_device(&Device::Cpu)?)?;
        let special = e.matmul(&self.special_care_embeds.t()?)?.squeeze(0)?;
        let concept = e.matmul(&self.concept_embeds.t()?)?.squeeze(0)?;
        Ok((special.to_vec1()?, concept.to_vec1()?))
    }

    /// The verdict from the cosines, at `threshold` (Daydream's `safety_checker_threshold`).
    pub fn verdict(
        &self,
        special_cos: &[f32],
        concept_cos: &[f32],
        threshold: f64,
    ) -> SafetyVerdict {
        let mut adjustment = 0.0f32;
        let mut special_scores = Vec::with_capacity(special_cos.len());
        for (&cos, &w) in special_cos.iter().zip(&self.special_weights) {
            let score = round3(cos - w + adjustment);
            if score > 0.0 {
                adjustment = SPECIAL_ADJUSTMENT;
            }
            special_scores.push(score);
        }
        let concept_scores: Vec<f32> = concept_cos
            .iter()
            .zip(&self.concept_weights)
            .map(|(&cos, &w)| round3(cos - w + adjustment))
            .collect();
        let bar = (threshold - 0.5) as f32;
        let flagged = concept_scores.iter().any(|&s| s > bar);
        SafetyVerdict {
            special_scores,
            concept_scores,
            flagged,
        }
    }

    /// Checks an image `[1, 3, H, W]` in [0, 1] (any float dtype, any device) as the pipeline
    /// hands it out: quantised to 8 bits, processed, embedded, judged at `threshold`.
    pub fn check(&self, image: &Tensor, threshold: f64) -> Result<SafetyVerdict> {
        let (_, c, h, w) = image.dims4()?;
        if c != 3 {
            return Err(Error::InvalidFrame(format!(
                "the safety checker takes RGB images, got {c} channels"
            )));
        }
        let rgb = to_rgb8(image)?;
        let device = self.visual_projection.device().clone();
        let input = clip_input(&rgb, w, h, self.input_size(), Filter::Bicubic, &device)?;
        let (special, concept) = self.cosines(&self.image_embeds(&input)?)?;
        Ok(self.verdict(&special, &concept, threshold))
    }
}

/// `[1, 3, H, W]` in [0, 1] → packed RGB bytes, as diffusers' `numpy_to_pil`:
/// `(x · 255).round()` (half to even) after clamping to [0, 1].
fn to_rgb8(image: &Tensor) -> Result<Vec<u8>> {
    let hwc = image
        .squeeze(0)?
        .permute((1, 2, 0))?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(hwc
        .into_iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
        .collect())
}

/// For sdstream's weight loading: checkpoint tensors the checker does not read. transformers
/// 4.x saved the `position_ids` buffer (positions are implicit here).
pub fn tolerated_unused(name: &str) -> bool {
    name.ends_with("embeddings.position_ids")
}
