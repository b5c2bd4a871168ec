//! IP-Adapter: style from a reference image (docs/ALGORITHM.md §5f), as h94/IP-Adapter
//! publishes it and Daydream's StreamDiffusion runs it.
//!
//! Three parts:
//! - the image encoder, transformers' `CLIPVisionModelWithProjection` ([`ImageEncoder`]): CLIP's
//!   vision tower ([`ClipVisionModel`]) and a projection without bias, giving one embedding
//!   `[B, P]` per picture (its folder: `config.json`, `model.safetensors` or `pytorch_model.bin`);
//! - the image projection ([`ImageProjection`], diffusers' `ImageProjection`): a linear layer to
//!   `T · D` and a LayerNorm over each of the T tokens of width D (the text's width);
//! - per cross-attention layer of the UNet, keys and values for the image tokens
//!   ([`IpAdapterLayers`], `to_k_ip` and `to_v_ip` without bias, stacked).
//!
//! The checkpoint (`ip-adapter_sd15.bin` and the like) holds `image_proj.{proj,norm}.*` and
//! `ip_adapter.<n>.to_{k,v}_ip.weight`, n = 1, 3, 5, … — the position of each `attn2` in
//! diffusers' `attn_processors` (the `attn1` between them hold no weights). Sizes come from the
//! tensors. The plus (Resampler) and FaceID variants are refused by name.
//!
//! A picture becomes tokens once ([`IpAdapter::encode`]); the UNet's cross-attention layers add
//! `scale_l · softmax(Q·K_ipᵀ/√d)·V_ip` to their text attention before the output projection
//! ([`crate::unet::ImagePrompt`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::clip_vision::{ClipVisionModel, VisionConfig, clip_input};
use crate::kernels::norm::LayerNorm;
use crate::limits::{Limits, MAX_CHANNELS};
use crate::resize::Filter;
use crate::unet_blocks::Linear;
use crate::{Error, Result};
use crate::{open_component_file, open_weights, safety_checker};

/// `config.json` of the image encoder: transformers' `CLIPVisionConfig` with its projection.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageEncoderConfig {
    /// The vision tower.
    #[serde(flatten)]
    pub vision: VisionConfig,
    /// The width of the image embedding.
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
}

fn default_projection_dim() -> usize {
    512
}

impl ImageEncoderConfig {
    /// Checks the tower and the projection's width.
    pub fn validate(&self) -> Result<()> {
        self.vision.validate()?;
        Limits::new("IP-Adapter image encoder").value(
            "projection_dim",
            self.projection_dim,
            MAX_CHANNELS,
        )
    }
}

/// transformers' `CLIPVisionModelWithProjection`: `image_embeds` of a processed picture.
#[derive(Debug, Clone)]
pub struct ImageEncoder {
    vision: ClipVisionModel,
    /// `[hidden, projection]`: the projection's weight, transposed for a matmul.
    projection: Tensor,
}

impl ImageEncoder {
    /// Builds the encoder (`vision_model.*`, `visual_projection.weight`).
    pub fn new(config: &ImageEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let vision = ClipVisionModel::new(&config.vision, vb.clone())?;
        let projection = vb
            .get(
                (config.projection_dim, config.vision.hidden_size),
                "visual_projection.weight",
            )?
            .t()?
            .contiguous()?;
        Ok(Self { vision, projection })
    }

    /// The side of the square the tower takes.
    pub fn input_size(&self) -> usize {
        self.vision.config().image_size
    }

    /// The embedding width.
    pub fn projection_dim(&self) -> usize {
        self.projection.dim(1).unwrap_or(0)
    }

    /// `image_embeds` `[B, P]` of processed pictures `[B, 3, S, S]`.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        let pooled = self.vision.forward(pixels)?.pooled;
        Ok(pooled.matmul(&self.projection)?)
    }
}

/// The sizes of an IP-Adapter checkpoint, read from its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterConfig {
    /// Image tokens per picture (4 for the regular adapters).
    pub tokens: usize,
    /// Their width: the UNet's `cross_attention_dim`.
    pub dim: usize,
    /// The image embedding's width (the encoder's `projection_dim`).
    pub embed_dim: usize,
    /// The query width of every cross-attention layer, in the checkpoint's order.
    pub widths: Vec<usize>,
}

impl AdapterConfig {
    /// Reads the sizes from the checkpoint's float tensors; the plus and FaceID variants are
    /// refused naming what they are.
    pub fn from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<Self> {
        let unsupported = |detail: String| Error::UnsupportedConfig {
            model: "IP-Adapter".into(),
            option: "checkpoint".into(),
            detail,
        };
        if shapes.contains_key("image_proj.latents") {
            return Err(unsupported(
                "this is an IP-Adapter Plus checkpoint (a Resampler image projection); sdstream \
                 runs the regular adapters (ip-adapter_sd15, ip-adapter_sdxl)"
                    .into(),
            ));
        }
        if shapes.keys().any(|k| k.contains("lora")) {
            return Err(unsupported(
                "this is an IP-Adapter FaceID checkpoint (LoRA layers, InsightFace embeddings); \
                 sdstream runs the regular adapters (ip-adapter_sd15, ip-adapter_sdxl)"
                    .into(),
            ));
        }
        let shape = |name: &str| {
            shapes.get(name).ok_or_else(|| {
                unsupported(format!(
                    "no tensor `{name}`: not an IP-Adapter checkpoint (expected image_proj.* and \
                     ip_adapter.* tensors)"
                ))
            })
        };
        let norm = shape("image_proj.norm.weight")?;
        let proj = shape("image_proj.proj.weight")?;
        let (dim, rows, embed_dim) = match (norm.as_slice(), proj.as_slice()) {
            ([d], [rows, e]) if *d > 0 && rows % d == 0 => (*d, *rows, *e),
            _ => {
                return Err(unsupported(format!(
                    "image_proj.proj.weight {proj:?} and image_proj.norm.weight {norm:?} do not \
                     make tokens of one width"
                )));
            }
        };
        let mut widths = Vec::new();
        loop {
            let key = format!("ip_adapter.{}.to_k_ip.weight", 2 * widths.len() + 1);
            match shapes.get(&key).map(Vec::as_slice) {
                Some(&[width, d]) if d == dim => widths.push(width),
                Some(other) => {
                    return Err(unsupported(format!(
                        "{key} is {other:?}, expected [width, {dim}]"
                    )));
                }
                None => break,
            }
        }
        if widths.is_empty() {
            return Err(unsupported(
                "no ip_adapter.1.to_k_ip.weight: the checkpoint has no attention layers".into(),
            ));
        }
        Ok(Self {
            tokens: rows / dim,
            dim,
            embed_dim,
            widths,
        })
    }
}

/// diffusers' `ImageProjection`: `[B, E]` embeddings → `[B, T, D]` tokens.
#[derive(Debug, Clone)]
pub struct ImageProjection {
    proj: Linear,
    norm: LayerNorm,
    tokens: usize,
    dim: usize,
}

impl ImageProjection {
    /// Builds the projection (`proj.*`, `norm.*` under `vb`) for `config`'s sizes.
    pub fn new(config: &AdapterConfig, vb: VarBuilder) -> Result<Self> {
        let rows = config.tokens * config.dim;
        Ok(Self {
            proj: Linear::new(
                vb.get((rows, config.embed_dim), "proj.weight")?,
                Some(vb.get(rows, "proj.bias")?),
            )?,
            norm: LayerNorm::new(config.dim, 1e-5, vb.pp("norm"))?,
            tokens: config.tokens,
            dim: config.dim,
        })
    }

    /// The tokens of `[B, E]` embeddings.
    pub fn forward(&self, embeds: &Tensor) -> Result<Tensor> {
        let b = embeds.dim(0)?;
        let x = self
            .proj
            .forward(&embeds.unsqueeze(1)?)?
            .reshape((b, self.tokens, self.dim))?;
        Ok(self.norm.forward(&x)?)
    }
}

/// The per-layer key and value projections of the image tokens.
#[derive(Debug, Clone)]
pub struct IpAdapterLayers {
    /// `[to_k_ip; to_v_ip]` of each cross-attention layer.
    layers: Vec<Linear>,
    widths: Vec<usize>,
}

impl IpAdapterLayers {
    /// Builds the layers (`<2i + 1>.to_{k,v}_ip.weight` under `vb`) for `config`'s sizes.
    pub fn new(config: &AdapterConfig, vb: VarBuilder) -> Result<Self> {
        let layers = config
            .widths
            .iter()
            .enumerate()
            .map(|(i, &width)| {
                let vb = vb.pp((2 * i + 1).to_string());
                let k = vb.get((width, config.dim), "to_k_ip.weight")?;
                let v = vb.get((width, config.dim), "to_v_ip.weight")?;
                Ok(Linear::new(Tensor::cat(&[k, v], 0)?, None)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            widths: config.widths.clone(),
        })
    }

    /// The query width of each layer, in order.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// How many cross-attention layers the adapter has.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether it has none (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The attention layers' key and value projections of the image tokens, in the UNet's attention
    /// order.
    pub fn layers(&self) -> &[Linear] {
        &self.layers
    }
}

/// The projection and the attention layers of one checkpoint.
#[derive(Debug, Clone)]
struct AdapterWeights {
    projection: ImageProjection,
    layers: IpAdapterLayers,
    config: AdapterConfig,
}

/// The image tokens of one picture: `[1, T, D]` for the rows of the prompt and, from zero
/// embeddings, for the rows of the negative prompt.
#[derive(Debug, Clone)]
pub struct ImageTokens {
    /// With the picture.
    pub cond: Tensor,
    /// Without it (diffusers and Daydream: the projection of zero embeddings).
    pub uncond: Tensor,
}

/// A loaded IP-Adapter: the image encoder, the projection and the attention layers.
#[derive(Debug, Clone)]
pub struct IpAdapter {
    encoder: ImageEncoder,
    weights: AdapterWeights,
    path: PathBuf,
    device: Device,
}

impl IpAdapter {
    /// Loads the checkpoint at `weights` (`.safetensors`, or h94's `.bin`, read without running
    /// its pickle code) and the image encoder in the folder `image_encoder` beside it, as h94
    /// lays them out. Every tensor is checked (shapes, unused, NaN/Inf); errors name the file.
    pub fn load(weights: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let encoder_dir = weights
            .parent()
            .map(|p| p.join("image_encoder"))
            .unwrap_or_else(|| PathBuf::from("image_encoder"));
        let encoder_weights = crate::weights_file(
            &encoder_dir,
            "model",
            crate::weight_names::prefers_fp16(dtype),
        )?;
        let encoder = open_component_file(
            &encoder_dir,
            &encoder_weights,
            dtype,
            device,
            safety_checker::tolerated_unused,
            None,
            |config: &ImageEncoderConfig| {
                config.validate().map_err(|e| Error::UnsupportedConfig {
                    model: "IP-Adapter image encoder".into(),
                    option: "config.json".into(),
                    detail: e.to_string(),
                })
            },
            ImageEncoder::new,
        )?
        .0;
        let weights_model = open_weights(
            weights,
            dtype,
            device,
            AdapterConfig::from_shapes,
            |config: &AdapterConfig, vb| {
                Ok(AdapterWeights {
                    projection: ImageProjection::new(config, vb.pp("image_proj"))?,
                    layers: IpAdapterLayers::new(config, vb.pp("ip_adapter"))?,
                    config: config.clone(),
                })
            },
        )?;
        if weights_model.config.embed_dim != encoder.projection_dim() {
            return Err(Error::ModelLoad {
                path: weights.to_path_buf(),
                detail: format!(
                    "the adapter takes {}-wide image embeddings, the encoder in {} makes {}-wide \
                     ones: they belong to different models",
                    weights_model.config.embed_dim,
                    encoder_dir.display(),
                    encoder.projection_dim()
                ),
            });
        }
        Ok(Self {
            encoder,
            weights: weights_model,
            path: weights.to_path_buf(),
            device: device.clone(),
        })
    }

    /// The checkpoint this adapter was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its sizes.
    pub fn config(&self) -> &AdapterConfig {
        &self.weights.config
    }

    /// Its attention layers.
    pub fn layers(&self) -> &IpAdapterLayers {
        &self.weights.layers
    }

    /// The image encoder.
    pub fn encoder(&self) -> &ImageEncoder {
        &self.encoder
    }

    /// The image projection.
    pub fn projection(&self) -> &ImageProjection {
        &self.weights.projection
    }

    /// The image processor's output for an 8-bit RGB picture (`width · height · 3` bytes):
    /// transformers' CLIP image processor with Lanczos resampling, as Daydream's IPAdapter
    /// builds it. `[1, 3, S, S]` f32.
    pub fn clip_input(&self, rgb: &[u8], width: usize, height: usize) -> Result<Tensor> {
        clip_input(
            rgb,
            width,
            height,
            self.encoder.input_size(),
            Filter::Lanczos,
            &self.device,
        )
    }

    /// The tokens of a picture and of no picture ([`ImageTokens`]), f32.
    pub fn encode(&self, rgb: &[u8], width: usize, height: usize) -> Result<ImageTokens> {
        let pixels = self.clip_input(rgb, width, height)?;
        let embeds = self.encoder.image_embeds(&pixels)?;
        let both = Tensor::cat(&[&embeds, &embeds.zeros_like()?], 0)?;
        let tokens = self
            .weights
            .projection
            .forward(&both)?
            .to_dtype(DType::F32)?;
        Ok(ImageTokens {
            cond: tokens.narrow(0, 0, 1)?,
            uncond: tokens.narrow(0, 1, 1)?,
        })
    }
}

/// The scale of each of `layers` cross-attention layers for an adapter at `scale` with
/// Daydream's `weight_type` (its IP-Adapter's per-layer weights, docs/ALGORITHM.md §5f): the
/// ease curves over the layer index i of n, `scale · (0.05 + 0.95 · f(i))`; the two "precise"
/// types keep only the style layers (index 3 of 11, 4 and 5 of 16) and zero the rest; every
/// other type (`linear` among them) is `scale` everywhere.
pub fn layer_scales(layers: usize, scale: f64, weight_type: Option<&str>) -> Vec<f64> {
    let n = layers as f64;
    let mid = n / 2.0;
    let ramp = |f: &dyn Fn(f64) -> f64| -> Vec<f64> {
        (0..layers)
            .map(|i| scale * (0.05 + 0.95 * f(i as f64)))
            .collect()
    };
    let kind = weight_type.map(|t| t.trim().to_ascii_lowercase());
    match kind.as_deref() {
        Some("ease in" | "ease-in" | "ease_in") => ramp(&|i| 1.0 - i / n.max(1.0)),
        Some("ease out" | "ease-out" | "ease_out") => ramp(&|i| i / n.max(1.0)),
        Some("ease in-out" | "ease-in-out" | "ease_in_out") => {
            ramp(&|i| 1.0 - (i - mid).abs() / mid.max(1.0))
        }
        Some("reverse in-out" | "reverse-in-out" | "reverse_in_out") => {
            ramp(&|i| (i - mid).abs() / mid.max(1.0))
        }
        Some("style transfer precise" | "composition precise") => {
            let kept: &[usize] = match layers {
                11 => &[3],
                16 => &[4, 5],
                _ => &[],
            };
            (0..layers)
                .map(|i| if kept.contains(&i) { scale } else { 0.0 })
                .collect()
        }
        _ => vec![scale; layers],
    }
}
