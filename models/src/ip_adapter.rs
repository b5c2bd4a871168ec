//! IP-Adapter: style from a reference image (docs/ALGORITHM.md §5f), as h94/IP-Adapter
//! publishes it and Daydream's StreamDiffusion runs it.
//!
//! Three parts:
//! - the image encoder, transformers' `CLIPVisionModelWithProjection` ([`ImageEncoder`]): CLIP's
//!   vision tower ([`ClipVisionModel`]) and a projection without bias, giving one embedding
//!   `[B, P]` per picture (its folder: `config.json`, `model.safetensors` or `pytorch_model.bin`);
//! - the image projection ([`ImageProjection`]): for the regular adapters diffusers'
//!   `ImageProjection`, a linear layer to `T · D` and a LayerNorm over each of the T tokens of
//!   width D (the text's width); for the Plus adapters (`ip-adapter-plus_sd15`,
//!   `ip-adapter-plus_sdxl_vit-h`) the Resampler ([`Resampler`], diffusers'
//!   `IPAdapterPlusImageProjection`), which reads the encoder's penultimate hidden states
//!   instead of its embedding;
//! - per cross-attention layer of the UNet, keys and values for the image tokens
//!   ([`IpAdapterLayers`], `to_k_ip` and `to_v_ip` without bias, stacked).
//!
//! The checkpoint (`ip-adapter_sd15.bin` and the like) holds `image_proj.{proj,norm}.*` and
//! `ip_adapter.<n>.to_{k,v}_ip.weight`, n = 1, 3, 5, … — the position of each `attn2` in
//! diffusers' `attn_processors` (the `attn1` between them hold no weights); a Plus checkpoint
//! holds `image_proj.{latents,proj_in,proj_out,norm_out,layers}.*` instead of
//! `image_proj.{proj,norm}.*`. Sizes come from the tensors. The FaceID variants are refused by
//! name.
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

    /// The tower's width (what the penultimate hidden states are wide).
    pub fn hidden_size(&self) -> usize {
        self.vision.config().hidden_size
    }

    /// `image_embeds` `[B, P]` of processed pictures `[B, 3, S, S]`.
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        let pooled = self.vision.forward(pixels)?.pooled;
        Ok(pooled.matmul(&self.projection)?)
    }

    /// `hidden_states[-2]` `[B, 1 + grid², hidden]`: the tokens after all but the last layer,
    /// what the Plus adapters read.
    pub fn penultimate_hidden_states(&self, pixels: &Tensor) -> Result<Tensor> {
        let layers = self.vision.config().num_hidden_layers;
        self.vision
            .hidden_states_after(pixels, layers.saturating_sub(1))
    }
}

/// The sizes of an IP-Adapter checkpoint, read from its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterConfig {
    /// Image tokens per picture (4 for the regular adapters, 16 for Plus).
    pub tokens: usize,
    /// Their width: the UNet's `cross_attention_dim`.
    pub dim: usize,
    /// The width of what the projection reads: the encoder's `projection_dim` (regular), or
    /// its `hidden_size` (Plus).
    pub embed_dim: usize,
    /// The query width of every cross-attention layer, in the checkpoint's order.
    pub widths: Vec<usize>,
    /// The Resampler's sizes for a Plus checkpoint; `None` for a regular one.
    pub resampler: Option<ResamplerConfig>,
}

/// The sizes of a Plus adapter's Resampler, read from its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResamplerConfig {
    /// The width the latent queries work at (`latents` `[1, T, width]`).
    pub width: usize,
    /// Attention and feed-forward blocks.
    pub depth: usize,
    /// Attention heads (64 channels each, as h94 and diffusers build it).
    pub heads: usize,
    /// The feed-forward's inner width.
    pub ff_width: usize,
}

/// Channels per head of the Resampler's attention.
const RESAMPLER_HEAD_DIM: usize = 64;
/// Most Resampler blocks a checkpoint may describe (h94's have 4).
const MAX_RESAMPLER_DEPTH: usize = 64;

impl AdapterConfig {
    /// Reads the sizes from the checkpoint's float tensors; the plus and FaceID variants are
    /// refused naming what they are.
    pub fn from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<Self> {
        let unsupported = |detail: String| Error::UnsupportedConfig {
            model: "IP-Adapter".into(),
            option: "checkpoint".into(),
            detail,
        };
        if shapes.keys().any(|k| k.contains("lora")) {
            return Err(unsupported(
                "this is an IP-Adapter FaceID checkpoint (LoRA layers, InsightFace embeddings); \
                 sdstream runs the regular and Plus adapters (ip-adapter_sd15, ip-adapter_sdxl, \
                 ip-adapter-plus_sd15, …)"
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
        let (tokens, dim, embed_dim, resampler) = if shapes.contains_key("image_proj.latents") {
            Self::resampler_sizes(&shape)?
        } else {
            let norm = shape("image_proj.norm.weight")?;
            let proj = shape("image_proj.proj.weight")?;
            match (norm.as_slice(), proj.as_slice()) {
                ([d], [rows, e]) if *d > 0 && rows % d == 0 => (rows / d, *d, *e, None),
                _ => {
                    return Err(unsupported(format!(
                        "image_proj.proj.weight {proj:?} and image_proj.norm.weight {norm:?} do \
                         not make tokens of one width"
                    )));
                }
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
            tokens,
            dim,
            embed_dim,
            widths,
            resampler,
        })
    }

    /// A Plus checkpoint's (tokens, output width, input width, Resampler sizes). The exact
    /// shape of every tensor is checked when the Resampler is built.
    fn resampler_sizes<'a>(
        shape: &dyn Fn(&str) -> Result<&'a Vec<usize>>,
    ) -> Result<(usize, usize, usize, Option<ResamplerConfig>)> {
        let unsupported = |detail: String| Error::UnsupportedConfig {
            model: "IP-Adapter Plus".into(),
            option: "checkpoint".into(),
            detail,
        };
        let (latents, proj_in, proj_out) = (
            shape("image_proj.latents")?,
            shape("image_proj.proj_in.weight")?,
            shape("image_proj.proj_out.weight")?,
        );
        let (tokens, width, embed, out) =
            match (latents.as_slice(), proj_in.as_slice(), proj_out.as_slice()) {
                ([1, t, w], [w2, e], [o, w3])
                    if w == w2 && w == w3 && *t > 0 && *e > 0 && *o > 0 =>
                {
                    (*t, *w, *e, *o)
                }
                _ => {
                    return Err(unsupported(format!(
                        "image_proj.latents {latents:?}, proj_in.weight {proj_in:?} and \
                     proj_out.weight {proj_out:?} do not fit together"
                    )));
                }
            };
        let mut depth = 0;
        while shape(&format!("image_proj.layers.{depth}.0.to_q.weight")).is_ok() {
            depth += 1;
            if depth > MAX_RESAMPLER_DEPTH {
                return Err(unsupported(format!(
                    "more than {MAX_RESAMPLER_DEPTH} Resampler blocks"
                )));
            }
        }
        if depth == 0 {
            return Err(unsupported("a Resampler without blocks".into()));
        }
        let inner = shape("image_proj.layers.0.0.to_q.weight")?[0];
        let ff_width = shape("image_proj.layers.0.1.1.weight")?[0];
        if inner == 0 || inner % RESAMPLER_HEAD_DIM != 0 {
            return Err(unsupported(format!(
                "attention width {inner} is not a whole number of {RESAMPLER_HEAD_DIM}-channel \
                 heads"
            )));
        }
        let config = ResamplerConfig {
            width,
            depth,
            heads: inner / RESAMPLER_HEAD_DIM,
            ff_width,
        };
        Ok((tokens, out, embed, Some(config)))
    }
}

/// The image projection of either family: image embeddings or hidden states in, `[B, T, D]`
/// tokens out.
#[derive(Debug, Clone)]
pub enum ImageProjection {
    /// diffusers' `ImageProjection` (regular adapters): `[B, E]` embeddings in.
    Linear(LinearProjection),
    /// diffusers' `IPAdapterPlusImageProjection` (Plus adapters): `[B, N, E]` hidden states in.
    Resampler(Resampler),
}

impl ImageProjection {
    /// Builds the projection of `config`'s family (weights under `vb`, `image_proj.` in the file).
    pub fn new(config: &AdapterConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match &config.resampler {
            None => Self::Linear(LinearProjection::new(config, vb)?),
            Some(r) => Self::Resampler(Resampler::new(config, r, vb)?),
        })
    }

    /// The tokens of embeddings `[B, E]` (regular) or hidden states `[B, N, E]` (Plus).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Linear(p) => p.forward(x),
            Self::Resampler(r) => r.forward(x),
        }
    }
}

/// diffusers' `ImageProjection`: `[B, E]` embeddings → `[B, T, D]` tokens.
#[derive(Debug, Clone)]
pub struct LinearProjection {
    proj: Linear,
    norm: LayerNorm,
    tokens: usize,
    dim: usize,
}

impl LinearProjection {
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

/// One block of the Resampler: latent queries attend to [hidden states, themselves], then a
/// feed-forward, each added to the latents.
#[derive(Debug, Clone)]
struct ResamplerBlock {
    /// LayerNorms of the hidden states and of the latents before the attention.
    norm_states: LayerNorm,
    norm_latents: LayerNorm,
    to_q: Linear,
    /// `to_kv`: keys then values.
    to_kv: Linear,
    to_out: Linear,
    ff_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    heads: usize,
}

impl ResamplerBlock {
    fn forward(&self, states: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let (b, t, _) = latents.dims3()?;
        let x = self.norm_states.forward(states)?;
        let l = self.norm_latents.forward(latents)?;
        let q = self.to_q.forward(&l)?;
        let kv = self.to_kv.forward(&Tensor::cat(&[&x, &l], 1)?)?;
        let inner = q.dim(2)?;
        let n = kv.dim(1)?;
        let h = self.heads;
        let d = inner / h;
        let split = |x: &Tensor, len: usize| -> Result<Tensor> {
            Ok(x.reshape((b, len, h, d))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split(&q, t)?;
        let k = split(&kv.narrow(2, 0, inner)?, n)?;
        let v = split(&kv.narrow(2, inner, inner)?, n)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let attended = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, inner))?;
        let latents = (self.to_out.forward(&attended)? + latents)?;
        let ff = self.ff_out.forward(
            &self
                .ff_in
                .forward(&self.ff_norm.forward(&latents)?)?
                .gelu_erf()?,
        )?;
        Ok((ff + latents)?)
    }
}

/// diffusers' `IPAdapterPlusImageProjection` (h94's `Resampler`): `T` learned latent queries
/// read the encoder's penultimate hidden states `[B, N, E]` through `depth` attention blocks;
/// `[B, T, D]` tokens out.
#[derive(Debug, Clone)]
pub struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    blocks: Vec<ResamplerBlock>,
    proj_out: Linear,
    norm_out: LayerNorm,
}

impl Resampler {
    /// Builds the Resampler (`latents`, `proj_in.*`, `layers.<i>.{0,1}.*`, `proj_out.*`,
    /// `norm_out.*` under `vb`).
    pub fn new(config: &AdapterConfig, sizes: &ResamplerConfig, vb: VarBuilder) -> Result<Self> {
        let (w, e, out) = (sizes.width, config.embed_dim, config.dim);
        let inner = sizes.heads * RESAMPLER_HEAD_DIM;
        let plain = |vb: VarBuilder, rows: usize, cols: usize| -> Result<Linear> {
            Ok(Linear::new(vb.get((rows, cols), "weight")?, None)?)
        };
        let blocks = (0..sizes.depth)
            .map(|i| {
                let attn = vb.pp(format!("layers.{i}.0"));
                let ff = vb.pp(format!("layers.{i}.1"));
                Ok(ResamplerBlock {
                    norm_states: LayerNorm::new(w, 1e-5, attn.pp("norm1"))?,
                    norm_latents: LayerNorm::new(w, 1e-5, attn.pp("norm2"))?,
                    to_q: plain(attn.pp("to_q"), inner, w)?,
                    to_kv: plain(attn.pp("to_kv"), 2 * inner, w)?,
                    to_out: plain(attn.pp("to_out"), w, inner)?,
                    ff_norm: LayerNorm::new(w, 1e-5, ff.pp("0"))?,
                    ff_in: plain(ff.pp("1"), sizes.ff_width, w)?,
                    ff_out: plain(ff.pp("3"), w, sizes.ff_width)?,
                    heads: sizes.heads,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            latents: vb.get((1, config.tokens, w), "latents")?,
            proj_in: Linear::new(
                vb.get((w, e), "proj_in.weight")?,
                Some(vb.get(w, "proj_in.bias")?),
            )?,
            blocks,
            proj_out: Linear::new(
                vb.get((out, w), "proj_out.weight")?,
                Some(vb.get(out, "proj_out.bias")?),
            )?,
            norm_out: LayerNorm::new(out, 1e-5, vb.pp("norm_out"))?,
        })
    }

    /// The tokens `[B, T, D]` of hidden states `[B, N, E]`.
    pub fn forward(&self, states: &Tensor) -> Result<Tensor> {
        let b = states.dim(0)?;
        let x = self.proj_in.forward(states)?;
        let mut latents = self.latents.repeat((b, 1, 1))?;
        for block in &self.blocks {
            latents = block.forward(&x, &latents)?;
        }
        Ok(self.norm_out.forward(&self.proj_out.forward(&latents)?)?)
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
    /// Without it (diffusers and Daydream: the projection of zero embeddings; for a Plus adapter
    /// the projection of the hidden states of a picture of zeros).
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

/// Where h94/IP-Adapter keeps the image encoder of the checkpoint at `weights` (a file, or a
/// path in the repository such as `sdxl_models/ip-adapter_sdxl`): the folder `image_encoder`
/// beside it, except for the SDXL checkpoints made for the ViT-H encoder (`…_vit-h`), which
/// use the SD 1.5 folder's (`models/image_encoder`, a sibling of `sdxl_models`).
pub fn image_encoder_dir(weights: &Path) -> PathBuf {
    let folder = weights.parent().unwrap_or(Path::new(""));
    let vit_h = weights
        .file_stem()
        .and_then(|s| s.to_str())
        .is_some_and(|s| s.ends_with("_vit-h"));
    if vit_h {
        folder
            .parent()
            .unwrap_or(Path::new(""))
            .join("models")
            .join("image_encoder")
    } else {
        folder.join("image_encoder")
    }
}

impl IpAdapter {
    /// Loads the checkpoint at `weights` (`.safetensors`, or h94's `.bin`, read without running
    /// its pickle code) and its image encoder where h94 lays it out ([`image_encoder_dir`]).
    /// Every tensor is checked (shapes, unused, NaN/Inf); errors name the file.
    pub fn load(weights: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let encoder_dir = image_encoder_dir(weights);
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
        let (encoder_width, what) = if weights_model.config.resampler.is_some() {
            (encoder.hidden_size(), "hidden states")
        } else {
            (encoder.projection_dim(), "image embeddings")
        };
        if weights_model.config.embed_dim != encoder_width {
            return Err(Error::ModelLoad {
                path: weights.to_path_buf(),
                detail: format!(
                    "the adapter takes {}-wide {what}, the encoder in {} makes {encoder_width}-wide \
                     ones: they belong to different models",
                    weights_model.config.embed_dim,
                    encoder_dir.display(),
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
        let both = if self.weights.config.resampler.is_some() {
            // Plus: the penultimate hidden states of the picture and of zero pixels.
            let pixels = Tensor::cat(&[&pixels, &pixels.zeros_like()?], 0)?;
            self.encoder.penultimate_hidden_states(&pixels)?
        } else {
            let embeds = self.encoder.image_embeds(&pixels)?;
            Tensor::cat(&[&embeds, &embeds.zeros_like()?], 0)?
        };
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
