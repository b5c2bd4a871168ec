//! CLIP's vision tower, as transformers' `CLIPVisionModel`.
//!
//! The image is cut into `patch_size`² patches by a strided convolution (no bias), a learned
//! class token goes first, learned positions are added, then a LayerNorm (`pre_layrnorm`, as
//! transformers spells it), the same pre-LayerNorm transformer layers as the text tower without a
//! mask, and the pooled output: the class token's final state through `post_layernorm`.
//!
//! The Stable Diffusion safety checker ([`crate::safety_checker`]) runs it; IP-Adapter's
//! image encoder is the same network. Weights are read under transformers 4.x's names
//! (`vision_model.embeddings...` below whatever prefix the caller gives) or 5.x's.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::Deserialize;

use crate::clip::{Activation, EncoderLayer};
use crate::kernels::norm::LayerNorm;
use crate::limits::{Limits, MAX_CHANNELS, MAX_HEADS, MAX_TEXT_LAYERS, MAX_WIDTH};
use crate::resize::{Filter, resize_rgb8};
use crate::{Error, Result};

/// `vision_config` of a transformers CLIP configuration; defaults are `CLIPVisionConfig`'s.
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    /// Width of the residual stream.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// Number of transformer layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Side of the square input the positions are learned for.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Side of a patch; must divide `image_size`.
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// Input channels.
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// MLP activation (`quick_gelu` for OpenAI's CLIP).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Epsilon of every LayerNorm.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_hidden_size() -> usize {
    768
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    32
}
fn default_channels() -> usize {
    3
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

impl VisionConfig {
    /// Checks what the graph depends on and every size against [`crate::limits`].
    pub fn validate(&self) -> Result<()> {
        let l = Limits::new("CLIP vision encoder");
        l.value("hidden_size", self.hidden_size, MAX_CHANNELS)?;
        l.value("intermediate_size", self.intermediate_size, MAX_WIDTH)?;
        l.value("num_hidden_layers", self.num_hidden_layers, MAX_TEXT_LAYERS)?;
        l.value("num_attention_heads", self.num_attention_heads, MAX_HEADS)?;
        l.value("image_size", self.image_size, 4096)?;
        l.value("num_channels", self.num_channels, 4)?;
        l.finite("layer_norm_eps", self.layer_norm_eps, false)?;
        Activation::parse(&self.hidden_act)?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::param(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(Error::param(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        if self.num_hidden_layers == 0 {
            return Err(Error::param("num_hidden_layers", "must be at least 1"));
        }
        Ok(())
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// transformers' `CLIPVisionModel`: pixels in, per-token states and the pooled output out.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: candle_nn::Conv2d,
    /// [tokens, hidden]: the class token's position first.
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    config: VisionConfig,
}

/// What the vision tower returns.
#[derive(Debug, Clone)]
pub struct ClipVisionOutputs {
    /// [B, 1 + grid², hidden]: every token after the last layer (no final LayerNorm).
    pub last_hidden_state: Tensor,
    /// [B, hidden]: the class token's state through `post_layernorm`.
    pub pooled: Tensor,
}

impl ClipVisionModel {
    /// Builds the tower from `config` with weights under `vb`, which is rooted where
    /// `vision_model.` (transformers 5.x) or `vision_model.vision_model.` (4.x) would be
    /// appended: the caller passes its own prefix (`vision_model` in the safety checker).
    pub fn new(config: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let vb = if vb.contains_tensor("vision_model.embeddings.class_embedding") {
            vb.pp("vision_model")
        } else {
            vb
        };
        let dim = config.hidden_size;
        let activation = Activation::parse(&config.hidden_act)?;
        let embeddings = vb.pp("embeddings");
        let class_embedding = embeddings.get(dim, "class_embedding")?;
        let patch_embedding = candle_nn::conv2d_no_bias(
            config.num_channels,
            dim,
            config.patch_size,
            Conv2dConfig {
                stride: config.patch_size,
                ..Default::default()
            },
            embeddings.pp("patch_embedding"),
        )?;
        let tokens = 1 + config.grid() * config.grid();
        let position_embedding = embeddings
            .pp("position_embedding")
            .get((tokens, dim), "weight")?;
        let pre_layrnorm = LayerNorm::new(dim, config.layer_norm_eps, vb.pp("pre_layrnorm"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                EncoderLayer::new(
                    (dim, config.num_attention_heads, config.intermediate_size),
                    config.layer_norm_eps,
                    activation,
                    vb.pp(format!("encoder.layers.{i}")),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let post_layernorm = LayerNorm::new(dim, config.layer_norm_eps, vb.pp("post_layernorm"))?;
        Ok(Self {
            class_embedding,
            patch_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            post_layernorm,
            config: config.clone(),
        })
    }

    /// The configuration the tower was built from.
    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    /// transformers' `hidden_states[layers]`: the tokens `[B, 1 + grid², hidden]` after the
    /// first `layers` encoder layers (0: the embeddings after `pre_layrnorm`).
    pub fn hidden_states_after(&self, pixel_values: &Tensor, layers: usize) -> Result<Tensor> {
        let mut xs = self.embeddings(pixel_values)?;
        for layer in self.layers.iter().take(layers) {
            xs = layer.forward(&xs, None)?;
        }
        Ok(xs)
    }

    /// The tokens entering the first layer: patches and the class token with their positions,
    /// through `pre_layrnorm`.
    fn embeddings(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let size = self.config.image_size;
        let (b, c, h, w) = pixel_values.dims4()?;
        if (c, h, w) != (self.config.num_channels, size, size) {
            return Err(Error::InvalidFrame(format!(
                "the CLIP vision encoder takes [B, {}, {size}, {size}] pixels, got {:?}",
                self.config.num_channels,
                pixel_values.dims()
            )));
        }
        let pixel_values = pixel_values.to_dtype(self.dtype())?;
        // [B, D, g, g] -> [B, g², D]
        let patches = self
            .patch_embedding
            .forward(&pixel_values)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let dim = self.config.hidden_size;
        let class = self
            .class_embedding
            .reshape((1, 1, dim))?
            .repeat((b, 1, 1))?;
        let xs = Tensor::cat(&[class, patches], 1)?.broadcast_add(&self.position_embedding)?;
        Ok(self.pre_layrnorm.forward(&xs)?)
    }

    /// `pixel_values`: [B, C, image_size, image_size], normalised as the image processor does.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutputs> {
        let mut xs = self.embeddings(pixel_values)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, None)?;
        }
        let pooled = self
            .post_layernorm
            .forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(ClipVisionOutputs {
            last_hidden_state: xs,
            pooled,
        })
    }
}

/// OpenAI CLIP's per-channel mean, as transformers' `OPENAI_CLIP_MEAN`.
pub const CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's per-channel deviation, as transformers' `OPENAI_CLIP_STD`.
pub const CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// transformers' CLIP image processor (its PIL backend): shorter side to `size` (the longer one
/// `⌊size · long / short⌋`) with PIL's `filter` (bicubic by default there; Daydream's IP-Adapter
/// asks for Lanczos), centre crop `size`², `/255`, CLIP mean and std.
pub fn clip_input(
    rgb: &[u8],
    width: usize,
    height: usize,
    size: usize,
    filter: Filter,
    device: &Device,
) -> Result<Tensor> {
    if width == 0 || height == 0 || rgb.len() != width * height * 3 {
        return Err(Error::InvalidFrame(format!(
            "expected {width}×{height} packed RGB ({} bytes), got {} bytes",
            width * height * 3,
            rgb.len()
        )));
    }
    let (new_w, new_h) = if width <= height {
        (size, size * height / width)
    } else {
        (size * width / height, size)
    };
    let resized = resize_rgb8(rgb, width, height, new_w, new_h, filter);
    // Centre crop (transformers: top = (h − crop) // 2); sizes at least `size` by construction.
    let (top, left) = ((new_h - size) / 2, (new_w - size) / 2);
    // numpy holds the mean and deviation in the image's dtype (f32).
    let mean = CLIP_MEAN.map(|m| m as f32);
    let std = CLIP_STD.map(|s| s as f32);
    let mut planes = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let px = &resized[((top + y) * new_w + left + x) * 3..][..3];
            for c in 0..3 {
                // Rescaled in f64 and stored as f32, then normalised in f32, as numpy does.
                let unit = (f64::from(px[c]) * (1.0 / 255.0)) as f32;
                planes[c * size * size + y * size + x] = (unit - mean[c]) / std[c];
            }
        }
    }
    Ok(Tensor::from_vec(planes, (1, 3, size, size), device)?)
}
