//! DPT (Dense Prediction Transformer, "MiDaS 3.0") as transformers' `DPTForDepthEstimation`
//! computes it for its ViT checkpoints such as `Intel/dpt-large` (`config.json` +
//! `model.safetensors` or `pytorch_model.bin`), the network behind Daydream's `depth`
//! processor.
//!
//! * Backbone (`dpt.*`): a ViT. Patches of `patch_size` (a strided convolution), a CLS token,
//!   position embeddings (resized bilinearly, align_corners false, when the patch grid differs
//!   from `image_size / patch_size`), then pre-norm layers: `x += dense(attention(LN(x)))`,
//!   `x += dense(gelu(dense(LN(x))))` (`layernorm_before`, `layernorm_after`, eps
//!   `layer_norm_eps`). The neck reads the outputs of the layers in `backbone_out_indices`
//!   (0-based), not layer-normed.
//! * Readout (`neck.reassemble_stage.readout_projects.i`): the CLS token joins every patch
//!   token: `project` concatenates it and maps `[token, CLS]` back to the width with a linear
//!   layer and GELU; `add` adds it; `ignore` drops it.
//! * Neck: Depth Anything's ([`crate::depth_anything`]): reassemble, 3×3 convolutions, top-down
//!   fusion.
//! * Head (`head.head.{0,2,4}`): 3×3 convolution halving the channels, ×2 bilinear
//!   (align_corners true), 3×3 convolution to 32, ReLU, 1×1 convolution to one channel, ReLU.
//!
//! The output is `predicted_depth` `[B, H, W]`: relative inverse depth (near is large). The
//! hybrid variant (`is_hybrid`, a BiT backbone: `Intel/dpt-hybrid-midas`), Hub backbones and the
//! BEiT-style head projection are refused by name.

use candle_core::{DType, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::depth_anything::{Neck, resize_bilinear};
use crate::dinov2::Attention;
use crate::kernels::conv::{Conv2d, Padding};
use crate::limits::{Limits, MAX_CHANNELS};
use crate::{Error, Result};

/// `config.json` of a `DPTForDepthEstimation`; missing keys take transformers' `DPTConfig`
/// defaults. Training-only keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Token width.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Transformer layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// The MLP's inner width.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// The MLP's activation (only `gelu`, the exact one, is supported).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// LayerNorm eps.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// The side the position embeddings were trained at.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Patch side.
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// Image channels.
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    /// Whether the query, key and value projections have biases.
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    /// The hybrid (BiT + ViT) variant: not supported.
    #[serde(default)]
    pub is_hybrid: bool,
    /// Layers whose outputs the neck reads (0-based).
    #[serde(default = "default_out_indices")]
    pub backbone_out_indices: Vec<usize>,
    /// How the CLS token joins the patch tokens: `project`, `add` or `ignore`.
    #[serde(default = "default_readout")]
    pub readout_type: String,
    /// Resize factor per level.
    #[serde(default = "default_reassemble_factors")]
    pub reassemble_factors: Vec<f64>,
    /// Channels per level.
    #[serde(default = "default_neck_hidden_sizes")]
    pub neck_hidden_sizes: Vec<usize>,
    /// The fused width.
    #[serde(default = "default_fusion_hidden_size")]
    pub fusion_hidden_size: usize,
    /// Which fused level the head reads (−1: the finest).
    #[serde(default = "default_head_in_index")]
    pub head_in_index: i64,
    /// BatchNorm in the fusion's residual units: not supported.
    #[serde(default)]
    pub use_batch_norm_in_fusion_residual: bool,
    /// Biases in those units (null: unless BatchNorm).
    #[serde(default)]
    pub use_bias_in_fusion_residual: Option<bool>,
    /// The head's extra projection (BEiT checkpoints): not supported.
    #[serde(default)]
    pub add_projection: bool,
    /// A Hub or timm backbone: not supported.
    #[serde(default)]
    pub backbone_config: Option<serde_json::Value>,
    /// A backbone by name: not supported.
    #[serde(default)]
    pub backbone: Option<String>,
}

fn default_hidden_size() -> usize {
    768
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_image_size() -> usize {
    384
}
fn default_patch_size() -> usize {
    16
}
fn default_num_channels() -> usize {
    3
}
fn yes() -> bool {
    true
}
fn default_out_indices() -> Vec<usize> {
    vec![2, 5, 8, 11]
}
fn default_readout() -> String {
    "project".into()
}
fn default_reassemble_factors() -> Vec<f64> {
    vec![4.0, 2.0, 1.0, 0.5]
}
fn default_neck_hidden_sizes() -> Vec<usize> {
    vec![96, 192, 384, 768]
}
fn default_fusion_hidden_size() -> usize {
    256
}
fn default_head_in_index() -> i64 {
    -1
}

/// Most transformer layers accepted (dpt-large has 24).
const MAX_LAYERS: usize = 96;
/// The head's second convolution's width (fixed in transformers).
const HEAD_HIDDEN: usize = 32;

impl Config {
    /// `Intel/dpt-large`'s structure: ViT-L/16 at 384 (1024 wide, 24 layers, 16 heads), the
    /// neck reading layers 5, 11, 17 and 23 at 256, 512, 1024 and 1024 channels.
    pub fn dpt_large() -> Self {
        let mut config: Self = serde_json::from_str("{}").expect("the defaults deserialise");
        config.hidden_size = 1024;
        config.num_hidden_layers = 24;
        config.num_attention_heads = 16;
        config.intermediate_size = 4096;
        config.backbone_out_indices = vec![5, 11, 17, 23];
        config.neck_hidden_sizes = vec![256, 512, 1024, 1024];
        config
    }

    /// Checks every size and refuses the variants sdstream does not run, naming the key.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |option: &str, detail: String| Error::UnsupportedConfig {
            model: "DPT".into(),
            option: option.into(),
            detail,
        };
        if self.is_hybrid {
            return Err(unsupported(
                "is_hybrid",
                "the hybrid DPT (a BiT backbone, Intel/dpt-hybrid-midas) is not supported; \
                 Intel/dpt-large is"
                    .into(),
            ));
        }
        if self.backbone_config.as_ref().is_some_and(|v| !v.is_null()) || self.backbone.is_some() {
            return Err(unsupported(
                "backbone_config",
                "DPT with a separate backbone (DINOv2, BEiT, Swin) is not supported".into(),
            ));
        }
        if self.add_projection {
            return Err(unsupported(
                "add_projection",
                "true is not supported".into(),
            ));
        }
        if self.use_batch_norm_in_fusion_residual || self.use_bias_in_fusion_residual == Some(false)
        {
            return Err(unsupported(
                "use_batch_norm_in_fusion_residual",
                "only the fusion units with biases and no BatchNorm are supported".into(),
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(unsupported(
                "hidden_act",
                format!("{:?} (only \"gelu\")", self.hidden_act),
            ));
        }
        if !matches!(self.readout_type.as_str(), "project" | "add" | "ignore") {
            return Err(unsupported(
                "readout_type",
                format!("{:?} (project, add or ignore)", self.readout_type),
            ));
        }
        let limits = Limits::new("DPT");
        limits.value("hidden_size", self.hidden_size, MAX_CHANNELS)?;
        limits.value(
            "intermediate_size",
            self.intermediate_size,
            4 * MAX_CHANNELS,
        )?;
        limits.value("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        limits.value(
            "num_attention_heads",
            self.num_attention_heads,
            self.hidden_size,
        )?;
        limits.value("fusion_hidden_size", self.fusion_hidden_size, MAX_CHANNELS)?;
        limits.value("patch_size", self.patch_size, 64)?;
        limits.value("image_size", self.image_size, 4096)?;
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
        ] {
            if v == 0 {
                return Err(unsupported(key, "must be at least 1".into()));
            }
        }
        if self.image_size < self.patch_size {
            return Err(unsupported(
                "image_size",
                format!(
                    "{} is below patch_size {}",
                    self.image_size, self.patch_size
                ),
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(unsupported(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        let n = self.neck_hidden_sizes.len();
        if n == 0
            || self.reassemble_factors.len() != n
            || self.backbone_out_indices.len() != n
            || self
                .backbone_out_indices
                .iter()
                .any(|&i| i >= self.num_hidden_layers)
            || self
                .neck_hidden_sizes
                .iter()
                .any(|&c| c == 0 || c > MAX_CHANNELS)
            || self.fusion_hidden_size < 2
        {
            return Err(unsupported(
                "neck_hidden_sizes",
                format!(
                    "neck_hidden_sizes {:?}, reassemble_factors {:?} and backbone_out_indices {:?} \
                     must be as many, each index below num_hidden_layers {}",
                    self.neck_hidden_sizes,
                    self.reassemble_factors,
                    self.backbone_out_indices,
                    self.num_hidden_layers
                ),
            ));
        }
        if self.head_level().is_none() {
            return Err(unsupported(
                "head_in_index",
                format!("{} is outside the {n} fused levels", self.head_in_index),
            ));
        }
        Ok(())
    }

    /// The fusion layer whose output the head reads.
    fn head_level(&self) -> Option<usize> {
        let n = self.neck_hidden_sizes.len() as i64;
        let i = if self.head_in_index < 0 {
            n + self.head_in_index
        } else {
            self.head_in_index
        };
        (0..n).contains(&i).then_some(i as usize)
    }
}

/// One pre-norm ViT layer (`dpt.encoder.layer.N`).
#[derive(Debug)]
struct Layer {
    norm_before: LayerNorm,
    attention: Attention,
    norm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
}

impl Layer {
    fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (config.hidden_size, config.layer_norm_eps);
        Ok(Self {
            norm_before: candle_nn::layer_norm(d, eps, vb.pp("layernorm_before"))?,
            attention: Attention::with_sizes(
                d,
                config.num_attention_heads,
                config.qkv_bias,
                vb.pp("attention"),
            )?,
            norm_after: candle_nn::layer_norm(d, eps, vb.pp("layernorm_after"))?,
            intermediate: candle_nn::linear(
                d,
                config.intermediate_size,
                vb.pp("intermediate.dense"),
            )?,
            output: candle_nn::linear(config.intermediate_size, d, vb.pp("output.dense"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (self.attention.forward(&self.norm_before.forward(x)?)? + x)?;
        let mlp = self.output.forward(
            &self
                .intermediate
                .forward(&self.norm_after.forward(&x)?)?
                .gelu_erf()?,
        )?;
        Ok((mlp + x)?)
    }
}

/// How the CLS token joins the patch tokens.
#[derive(Debug)]
enum Readout {
    /// `[token, CLS]` through a linear layer and GELU, per level.
    Project(Vec<Linear>),
    Add,
    Ignore,
}

/// transformers' `DPTForDepthEstimation` (ViT backbone).
#[derive(Debug)]
pub struct Dpt {
    patch_embedding: Conv2d,
    cls_token: Tensor,
    /// `[1, 1 + g0², D]`.
    position_embeddings: Tensor,
    layers: Vec<Layer>,
    readout: Readout,
    neck: Neck,
    head: [Conv2d; 3],
    out_indices: Vec<usize>,
    head_level: usize,
    patch: usize,
    trained_grid: usize,
    dtype: DType,
}

impl Dpt {
    /// Builds the network from `vb` at the checkpoint's root (`dpt.*`, `neck.*`, `head.*`);
    /// validates the config first.
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let d = config.hidden_size;
        let dpt = vb.pp("dpt");
        let embeddings = dpt.pp("embeddings");
        let patch = config.patch_size;
        let patch_embedding = Conv2d::new(
            config.num_channels,
            d,
            patch,
            patch,
            Padding::uniform(0),
            true,
            embeddings.pp("patch_embeddings.projection"),
        )?;
        let trained_grid = config.image_size / patch;
        let tokens = 1 + trained_grid * trained_grid;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::new(config, dpt.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let neck = vb.pp("neck");
        let readout = match config.readout_type.as_str() {
            "project" => Readout::Project(
                (0..config.neck_hidden_sizes.len())
                    .map(|i| {
                        candle_nn::linear(
                            2 * d,
                            d,
                            neck.pp(format!("reassemble_stage.readout_projects.{i}.0")),
                        )
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?,
            ),
            "add" => Readout::Add,
            _ => Readout::Ignore,
        };
        let f = config.fusion_hidden_size;
        let head = vb.pp("head.head");
        let conv = |c_in, c_out, k, name: &str| {
            Conv2d::new(
                c_in,
                c_out,
                k,
                1,
                Padding::uniform(k / 2),
                true,
                head.pp(name),
            )
        };
        Ok(Self {
            patch_embedding,
            cls_token: embeddings.get((1, 1, d), "cls_token")?,
            position_embeddings: embeddings.get((1, tokens, d), "position_embeddings")?,
            layers,
            readout,
            neck: Neck::new(
                d,
                &config.neck_hidden_sizes,
                &config.reassemble_factors,
                f,
                neck,
            )?,
            head: [
                conv(f, f / 2, 3, "0")?,
                conv(f / 2, HEAD_HIDDEN, 3, "2")?,
                conv(HEAD_HIDDEN, 1, 1, "4")?,
            ],
            out_indices: config.backbone_out_indices.clone(),
            head_level: config.head_level().unwrap_or(0),
            patch,
            trained_grid,
            dtype: vb.dtype(),
        })
    }

    /// The dtype the network computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The position embeddings for a `gh × gw` patch grid (the trained ones resized bilinearly
    /// when the grid differs).
    fn positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let g0 = self.trained_grid;
        if (gh, gw) == (g0, g0) {
            return Ok(self.position_embeddings.clone());
        }
        let d = self.position_embeddings.dim(2)?;
        let cls = self.position_embeddings.narrow(1, 0, 1)?;
        let grid = self
            .position_embeddings
            .narrow(1, 1, g0 * g0)?
            .reshape((1, g0, g0, d))?
            .permute((0, 3, 1, 2))?;
        let grid = resize_bilinear(&grid.contiguous()?, gh, gw, false)?
            .permute((0, 2, 3, 1))?
            .reshape((1, gh * gw, d))?;
        Ok(Tensor::cat(&[&cls, &grid], 1)?)
    }

    /// Predicted depth `[B, H, W]` for `pixel_values` `[B, 3, H, W]` (sides multiples of the
    /// patch size), in the weights' dtype.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixel_values.dims4()?;
        let p = self.patch;
        if h == 0 || w == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return Err(Error::InvalidFrame(format!(
                "DPT takes sides that are multiples of its patch size {p}, got {h}×{w}"
            )));
        }
        let (gh, gw) = (h / p, w / p);
        let x = pixel_values.to_dtype(self.dtype)?;
        let patches = self
            .patch_embedding
            .forward(&x)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = patches.dim(2)?;
        let cls = self.cls_token.repeat((b, 1, 1))?;
        let mut tokens =
            Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.positions(gh, gw)?)?;
        let last = self.out_indices.iter().copied().max().unwrap_or(0);
        let mut levels = Vec::with_capacity(self.out_indices.len());
        // Only the layers the neck reads are kept.
        let mut outputs = std::collections::HashMap::with_capacity(self.out_indices.len());
        for (i, layer) in self.layers[..=last].iter().enumerate() {
            tokens = layer.forward(&tokens)?;
            if self.out_indices.contains(&i) {
                outputs.insert(i, tokens.clone());
            }
        }
        for (level, i) in self.out_indices.iter().enumerate() {
            let out = &outputs[i];
            let cls = out.narrow(1, 0, 1)?;
            let grid = out.narrow(1, 1, gh * gw)?;
            let grid = match &self.readout {
                Readout::Project(projects) => {
                    let joined = Tensor::cat(&[&grid, &cls.broadcast_as(grid.shape())?], 2)?;
                    projects[level].forward(&joined)?.gelu_erf()?
                }
                Readout::Add => grid.broadcast_add(&cls)?,
                Readout::Ignore => grid,
            };
            levels.push(
                grid.reshape((b, gh, gw, d))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?,
            );
        }
        let fused = self.neck.forward(levels, self.head_level)?;
        let [conv1, conv2, conv3] = &self.head;
        let (_, _, fh, fw) = fused.dims4()?;
        let x = conv1.forward(&fused)?;
        let x = resize_bilinear(&x, 2 * fh, 2 * fw, true)?;
        let x = conv2.forward(&x)?.relu()?;
        Ok(conv3.forward(&x)?.relu()?.squeeze(1)?)
    }
}

/// The `size` of a `preprocessor_config.json`: a side, `[height, width]`, or
/// `{"height": …, "width": …}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ProcessorSize {
    /// One side for both.
    Side(usize),
    /// `[height, width]`.
    Pair([usize; 2]),
    /// `{"height": …, "width": …}`.
    Map {
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
    },
}

impl ProcessorSize {
    fn height_width(&self) -> (usize, usize) {
        match *self {
            Self::Side(s) => (s, s),
            Self::Pair([h, w]) => (h, w),
            Self::Map { height, width } => (height, width),
        }
    }
}

/// `preprocessor_config.json` of a DPT checkpoint: transformers' `DPTImageProcessor` (the slow,
/// PIL one that transformers 4.x's pipelines pick for these checkpoints); missing keys take its
/// defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ProcessorConfig {
    /// Whether to resize.
    #[serde(default = "yes")]
    pub do_resize: bool,
    /// The size resized to.
    #[serde(default = "default_processor_size")]
    pub size: ProcessorSize,
    /// PIL's resampling filter (1 Lanczos, 2 bilinear, 3 bicubic).
    #[serde(default = "default_resample")]
    pub resample: u8,
    /// Keep the aspect ratio (scale both sides by the factor nearer 1).
    #[serde(default)]
    pub keep_aspect_ratio: bool,
    /// Round the sides to multiples of this.
    #[serde(default = "one")]
    pub ensure_multiple_of: usize,
    /// Whether to rescale the levels.
    #[serde(default = "yes")]
    pub do_rescale: bool,
    /// The rescale factor.
    #[serde(default = "default_rescale_factor")]
    pub rescale_factor: f64,
    /// Whether to normalise.
    #[serde(default = "yes")]
    pub do_normalize: bool,
    /// Per-channel mean.
    #[serde(default = "half")]
    pub image_mean: [f32; 3],
    /// Per-channel deviation.
    #[serde(default = "half")]
    pub image_std: [f32; 3],
    /// Padding to a multiple: not supported.
    #[serde(default)]
    pub do_pad: bool,
}

fn default_processor_size() -> ProcessorSize {
    ProcessorSize::Map {
        height: 384,
        width: 384,
    }
}
fn default_resample() -> u8 {
    3
}
fn one() -> usize {
    1
}
fn default_rescale_factor() -> f64 {
    1.0 / 255.0
}
fn half() -> [f32; 3] {
    [0.5; 3]
}

/// Largest side the processor may resize to.
const MAX_PROCESSOR_SIDE: usize = 4096;

impl Default for ProcessorConfig {
    /// `DPTImageProcessor`'s defaults.
    fn default() -> Self {
        serde_json::from_str("{}").expect("the defaults deserialise")
    }
}

impl ProcessorConfig {
    /// Checks the sizes and refuses what is not supported, naming the key.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |option: &str, detail: String| Error::UnsupportedConfig {
            model: "DPT image processor".into(),
            option: option.into(),
            detail,
        };
        let (h, w) = self.size.height_width();
        if !(1..=MAX_PROCESSOR_SIDE).contains(&h) || !(1..=MAX_PROCESSOR_SIDE).contains(&w) {
            return Err(unsupported("size", format!("{h}×{w}")));
        }
        if !(1..=MAX_PROCESSOR_SIDE).contains(&self.ensure_multiple_of) {
            return Err(unsupported(
                "ensure_multiple_of",
                format!("{}", self.ensure_multiple_of),
            ));
        }
        if self.do_pad {
            return Err(unsupported("do_pad", "true is not supported".into()));
        }
        if self.filter().is_none() {
            return Err(unsupported(
                "resample",
                format!("{} (1 Lanczos, 2 bilinear or 3 bicubic)", self.resample),
            ));
        }
        if !self.rescale_factor.is_finite()
            || self.image_std.iter().any(|&s| !s.is_finite() || s == 0.0)
            || self.image_mean.iter().any(|m| !m.is_finite())
        {
            return Err(unsupported(
                "image_std",
                "the rescale factor, means and deviations must be finite, deviations non-zero"
                    .into(),
            ));
        }
        Ok(())
    }

    fn filter(&self) -> Option<crate::resize::Filter> {
        use crate::resize::Filter;
        match self.resample {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    /// transformers' `get_resize_output_image_size` for an `h × w` input.
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        if !self.do_resize {
            return (h, w);
        }
        let (th, tw) = self.size.height_width();
        let mut scale_h = th as f64 / h as f64;
        let mut scale_w = tw as f64 / w as f64;
        if self.keep_aspect_ratio {
            if (1.0 - scale_w).abs() < (1.0 - scale_h).abs() {
                scale_h = scale_w;
            } else {
                scale_w = scale_h;
            }
        }
        let m = self.ensure_multiple_of as f64;
        // `constrain_to_multiple_of` without bounds: Python's round (ties to even).
        let constrain =
            |v: f64| (((v / m).round_ties_even() * m) as usize).max(self.ensure_multiple_of);
        (constrain(scale_h * h as f64), constrain(scale_w * w as f64))
    }

    /// `pixel_values` `[1, 3, H', W']` (f32) of an 8-bit RGB picture (`width · height · 3`
    /// bytes): PIL's resize, then `f32(level · rescale_factor)` computed in f64, then
    /// `(x − mean) / std` in f32.
    pub fn pixel_values(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        if rgb.len() != width * height * 3 || width == 0 || height == 0 {
            return Err(Error::InvalidFrame(format!(
                "the DPT image processor takes {width}×{height} RGB bytes, got {}",
                rgb.len()
            )));
        }
        let (oh, ow) = self.output_size(height, width);
        let filter = self.filter().unwrap_or(crate::resize::Filter::Bicubic);
        let resized = if (oh, ow) == (height, width) {
            rgb.to_vec()
        } else {
            crate::resize::resize_rgb8(rgb, width, height, ow, oh, filter)
        };
        let plane = oh * ow;
        let mut values = vec![0f32; 3 * plane];
        for (i, px) in resized.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut v = if self.do_rescale {
                    (f64::from(px[c]) * self.rescale_factor) as f32
                } else {
                    f32::from(px[c])
                };
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                values[c * plane + i] = v;
            }
        }
        Ok(Tensor::from_vec(values, (1, 3, oh, ow), device)?)
    }
}

/// A DPT depth checkpoint: the network and its image processor.
#[derive(Debug)]
pub struct DptDepth {
    /// The network.
    pub net: Dpt,
    /// Its `preprocessor_config.json`.
    pub processor: ProcessorConfig,
}

impl DptDepth {
    /// Loads a transformers checkpoint folder (`config.json`, `preprocessor_config.json`,
    /// `model.safetensors` or `pytorch_model.bin`). Every tensor is checked; errors name the file.
    pub fn load(dir: &std::path::Path, dtype: DType, device: &candle_core::Device) -> Result<Self> {
        let processor_path = dir.join("preprocessor_config.json");
        let processor: ProcessorConfig = crate::read_config(&processor_path)?;
        processor.validate().map_err(|e| Error::ModelLoad {
            path: processor_path.clone(),
            detail: e.to_string(),
        })?;
        let weights = crate::weights_file(dir, "model", crate::weight_names::prefers_fp16(dtype))?;
        let net = crate::open_component_file(
            dir,
            &weights,
            dtype,
            device,
            tolerated_unused,
            None,
            Config::validate,
            Dpt::new,
        )?
        .0;
        Ok(Self { net, processor })
    }
}

/// Checkpoint tensors the depth network does not read: the backbone's final LayerNorm
/// (`dpt.layernorm`, applied to the last hidden state only) and the pooler, which
/// `DPTForDepthEstimation` leaves out.
pub fn tolerated_unused(name: &str) -> bool {
    name.starts_with("dpt.layernorm.") || name.starts_with("dpt.pooler.")
}
