//! Depth Anything (V1 and V2) as transformers' `DepthAnythingForDepthEstimation` computes it,
//! loaded from a Hugging Face checkpoint such as `depth-anything/Depth-Anything-V2-Small-hf`
//! (`config.json` + `model.safetensors`). Daydream's `depth_tensorrt` runs V2-Small on the frame
//! squashed to 518×518.
//!
//! A DPT: a [`Dinov2Backbone`] gives the tokens of four stages (V2-Small: after blocks 3, 6, 9
//! and 12, layer-normed); the neck turns them into a feature pyramid and fuses it top-down; the
//! head maps the finest level to one channel at the input resolution.
//!
//! * Reassemble (`neck.reassemble_stage.layers.i`): drop the CLS token, lay the tokens out as an
//!   `h×w` map, 1×1 `projection` to `neck_hidden_sizes[i]` channels, then `resize` by
//!   `reassemble_factors[i]`: a transposed convolution with kernel = stride = factor (4, 2), the
//!   identity (1), or a 3×3 convolution with stride 1/factor and padding 1 (0.5: ⌈h/2⌉).
//! * `neck.convs.i`: 3×3 convolutions (no bias) to `fusion_hidden_size` channels.
//! * Fusion (`neck.fusion_stage.layers.j`, coarsest level first): `x = x + unit₁(level)` (the
//!   first layer has no running `x` and starts from the coarsest level itself), `x = unit₂(x)`,
//!   bilinear resize (align_corners = True) to the next finer level's size (the last layer: ×2),
//!   1×1 `projection`. A unit is the pre-activation residual `y + conv₂(relu(conv₁(relu(y))))`.
//! * Head (`head.*`): 3×3 `conv1` halving the channels, bilinear resize (align_corners = True) to
//!   the patch grid × patch size (the input size), 3×3 `conv2` to `head_hidden_size`, ReLU, 1×1
//!   `conv3` to one channel, then ReLU (`relative`) or sigmoid (`metric`), times `max_depth`.
//!
//! The output is transformers' `predicted_depth` `[B, H, W]`: relative inverse depth (near is
//! large) for the released relative models. Inputs are taken as they come (Daydream's TRT path
//! feeds the image without ImageNet normalisation).
//!
//! Unlike candle-transformers' `depth_anything_v2` this follows the modeling code exactly:
//! bilinear (not nearest) upsampling with align_corners, no padding on the 1×1 head convolution,
//! any input size that is a multiple of the patch, and the backbone's exact GELU and eps.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Deserializer};

use super::dinov2::{self, Dinov2Backbone, Extent, config_error};
use crate::kernels::conv::{Conv2d, Padding};

/// `config.json` of a `DepthAnythingForDepthEstimation`; missing keys take transformers'
/// `DepthAnythingConfig` defaults. Training-only keys (`initializer_range`) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// The backbone (`backbone_config`); absent or null gives transformers' default, a ViT-S/14
    /// at 518 with `out_indices` [9, 10, 11, 12] and `reshape_hidden_states` false.
    #[serde(default = "default_backbone", deserialize_with = "backbone_or_default")]
    pub backbone_config: dinov2::Config,
    /// A timm or Hub backbone by name; not supported (must be null).
    #[serde(default)]
    pub backbone: Option<String>,
    /// Whether `backbone` names a timm model; not supported.
    #[serde(default)]
    pub use_timm_backbone: bool,
    /// Patch size of the grid the neck and head lay the tokens out on (the backbone's).
    #[serde(default = "default_patch_size")]
    pub patch_size: Extent,
    /// Channels of the backbone's tokens (the backbone's `hidden_size`).
    #[serde(default = "default_reassemble_hidden_size")]
    pub reassemble_hidden_size: usize,
    /// Resize factor per level: an integer > 1 (transposed convolution), 1, or < 1 (strided
    /// convolution with stride `int(1/factor)`).
    #[serde(default = "default_reassemble_factors")]
    pub reassemble_factors: Vec<f64>,
    /// Channels per level after the reassemble projection.
    #[serde(default = "default_neck_hidden_sizes")]
    pub neck_hidden_sizes: Vec<usize>,
    /// Channels of the fusion stage.
    #[serde(default = "default_fusion_hidden_size")]
    pub fusion_hidden_size: usize,
    /// Which fused level the head reads (Python index; −1 = the finest).
    #[serde(default = "default_head_in_index")]
    pub head_in_index: i64,
    /// Channels of the head's second convolution.
    #[serde(default = "default_head_hidden_size")]
    pub head_hidden_size: usize,
    /// `relative` (final ReLU) or `metric` (final sigmoid).
    #[serde(default = "default_depth_estimation_type")]
    pub depth_estimation_type: String,
    /// Factor on the head's output (transformers applies it for both types; 1 by default).
    #[serde(default = "default_max_depth")]
    pub max_depth: Option<f64>,
}

fn default_backbone() -> dinov2::Config {
    dinov2::Config {
        image_size: Extent::Square(518),
        hidden_size: 384,
        num_attention_heads: 6,
        out_indices: Some(vec![9, 10, 11, 12]),
        reshape_hidden_states: false,
        ..dinov2::Config::default()
    }
}
fn backbone_or_default<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<dinov2::Config, D::Error> {
    Ok(Option::<dinov2::Config>::deserialize(d)?.unwrap_or_else(default_backbone))
}
fn default_patch_size() -> Extent {
    Extent::Square(14)
}
fn default_reassemble_hidden_size() -> usize {
    384
}
fn default_reassemble_factors() -> Vec<f64> {
    vec![4.0, 2.0, 1.0, 0.5]
}
fn default_neck_hidden_sizes() -> Vec<usize> {
    vec![48, 96, 192, 384]
}
fn default_fusion_hidden_size() -> usize {
    64
}
fn default_head_in_index() -> i64 {
    -1
}
fn default_head_hidden_size() -> usize {
    32
}
fn default_depth_estimation_type() -> String {
    "relative".into()
}
fn default_max_depth() -> Option<f64> {
    Some(1.0)
}

impl Default for Config {
    /// transformers' `DepthAnythingConfig()` (Depth Anything V1-Small's layout).
    fn default() -> Self {
        Self {
            backbone_config: default_backbone(),
            backbone: None,
            use_timm_backbone: false,
            patch_size: default_patch_size(),
            reassemble_hidden_size: default_reassemble_hidden_size(),
            reassemble_factors: default_reassemble_factors(),
            neck_hidden_sizes: default_neck_hidden_sizes(),
            fusion_hidden_size: default_fusion_hidden_size(),
            head_in_index: default_head_in_index(),
            head_hidden_size: default_head_hidden_size(),
            depth_estimation_type: default_depth_estimation_type(),
            max_depth: default_max_depth(),
        }
    }
}

/// How a reassemble layer resizes its level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ResizeKind {
    /// Transposed convolution, kernel = stride = the factor.
    Up(usize),
    Identity,
    /// 3×3 convolution with this stride and padding 1.
    Down(usize),
}

pub(crate) fn resize_kind(factor: f64) -> Option<ResizeKind> {
    if !(factor.is_finite() && factor > 0.0) {
        None
    } else if factor > 1.0 {
        (factor.fract() == 0.0).then_some(ResizeKind::Up(factor as usize))
    } else if factor == 1.0 {
        Some(ResizeKind::Identity)
    } else {
        // transformers: stride = int(1 / factor).
        Some(ResizeKind::Down((1.0 / factor).floor() as usize))
    }
}

impl Config {
    /// The values of `depth-anything/Depth-Anything-V2-Small-hf`'s config.json: ViT-S/14 (384
    /// wide, 6 heads, 12 blocks) at 518 with `out_indices` [3, 6, 9, 12], neck
    /// [48, 96, 192, 384], fusion 64, head 32, relative depth (24.8 M parameters).
    pub fn v2_small() -> Self {
        Self {
            backbone_config: dinov2::Config {
                out_indices: Some(vec![3, 6, 9, 12]),
                out_features: Some(
                    ["stage3", "stage6", "stage9", "stage12"]
                        .map(String::from)
                        .to_vec(),
                ),
                ..default_backbone()
            },
            ..Self::default()
        }
    }

    /// Checks every option the graph depends on (the backbone's included); the error names the
    /// key at fault.
    pub fn validate(&self) -> Result<()> {
        if let Some(name) = &self.backbone {
            return Err(config_error(
                "backbone",
                format!("{name:?}: only the Dinov2 `backbone_config` is supported"),
            ));
        }
        if self.use_timm_backbone {
            return Err(config_error(
                "use_timm_backbone",
                "timm backbones are not supported",
            ));
        }
        let b = &self.backbone_config;
        b.validate_under("backbone_config.")?;
        if b.reshape_hidden_states {
            return Err(config_error(
                "backbone_config.reshape_hidden_states",
                "must be false: the neck takes tokens with the CLS token",
            ));
        }
        if self.patch_size.square() != Some(b.patch()) {
            return Err(config_error(
                "patch_size",
                format!(
                    "{:?} differs from the backbone's patch size {}",
                    self.patch_size,
                    b.patch()
                ),
            ));
        }
        if self.reassemble_hidden_size != b.hidden_size {
            return Err(config_error(
                "reassemble_hidden_size",
                format!(
                    "{} differs from the backbone's hidden_size {}",
                    self.reassemble_hidden_size, b.hidden_size
                ),
            ));
        }
        let levels = self.neck_hidden_sizes.len();
        let stages = b.out_stages()?.len();
        if levels == 0 || levels != stages {
            return Err(config_error(
                "neck_hidden_sizes",
                format!("{levels} levels for {stages} backbone output stages"),
            ));
        }
        if self.reassemble_factors.len() != levels {
            return Err(config_error(
                "reassemble_factors",
                format!(
                    "{} factors for {levels} levels",
                    self.reassemble_factors.len()
                ),
            ));
        }
        for &f in &self.reassemble_factors {
            if resize_kind(f).is_none() {
                return Err(config_error(
                    "reassemble_factors",
                    format!("{f}: factors must be integers > 1, 1, or in (0, 1)"),
                ));
            }
        }
        if self.neck_hidden_sizes.contains(&0) {
            return Err(config_error("neck_hidden_sizes", "sizes must be positive"));
        }
        if self.fusion_hidden_size < 2 {
            return Err(config_error(
                "fusion_hidden_size",
                "must be at least 2 (the head halves it)",
            ));
        }
        if self.head_hidden_size == 0 {
            return Err(config_error("head_hidden_size", "must be positive"));
        }
        if self.head_level().is_none() {
            return Err(config_error(
                "head_in_index",
                format!(
                    "{} is not one of the {levels} fused levels",
                    self.head_in_index
                ),
            ));
        }
        if !matches!(self.depth_estimation_type.as_str(), "relative" | "metric") {
            return Err(config_error(
                "depth_estimation_type",
                format!(
                    "{:?} is not \"relative\" or \"metric\"",
                    self.depth_estimation_type
                ),
            ));
        }
        match self.max_depth {
            Some(m) if m.is_finite() => Ok(()),
            other => Err(config_error(
                "max_depth",
                format!("{other:?}: the head's output is multiplied by it"),
            )),
        }
    }

    /// The fused level the head reads, counted from the coarsest (0) as the fusion stage
    /// produces them.
    fn head_level(&self) -> Option<usize> {
        let n = self.neck_hidden_sizes.len() as i64;
        let i = if self.head_in_index < 0 {
            self.head_in_index + n
        } else {
            self.head_in_index
        };
        (0..n).contains(&i).then_some(i as usize)
    }
}

/// torch's `F.interpolate(x, size=(h, w), mode="bilinear", align_corners=…)`. candle's kernel
/// (CPU, CUDA, Metal) places the source samples as torch does for both settings; the size
/// argument (not a scale factor) is what the modeling code passes, except for the last fusion
/// layer's ×2, where align_corners makes the two the same.
pub(crate) fn resize_bilinear(
    x: &Tensor,
    h: usize,
    w: usize,
    align_corners: bool,
) -> Result<Tensor> {
    let (_, _, h0, w0) = x.dims4()?;
    if (h0, w0) == (h, w) {
        return Ok(x.clone());
    }
    x.contiguous()?.upsample_bilinear2d(h, w, align_corners)
}

/// The transposed convolution of an upsampling reassemble layer (`resize`, weight
/// `[in, out, k, k]`). Its kernel equals its stride, so the output is a mosaic of
/// non-overlapping k×k tiles, each a linear map of one input pixel: one matmul and a reshuffle.
#[derive(Debug)]
struct TileUpsample {
    /// `[in, out·k·k]`.
    weight: Tensor,
    bias: Tensor,
    factor: usize,
}

impl TileUpsample {
    fn new(channels: usize, factor: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((channels, channels, factor, factor), "weight")?;
        Ok(Self {
            weight: weight.reshape((channels, channels * factor * factor))?,
            bias: vb.get(channels, "bias")?.reshape((1, channels, 1, 1))?,
            factor,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c_in, h, w) = x.dims4()?;
        let k = self.factor;
        let c_out = self.bias.dim(1)?;
        let pixels = x.reshape((b, c_in, h * w))?.transpose(1, 2)?;
        let tiles = pixels.broadcast_matmul(&self.weight)?;
        // [b, h, w, out, ky, kx] → [b, out, h, ky, w, kx] = [b, out, h·k, w·k].
        let y = tiles
            .reshape((b, h, w, c_out, k, k))?
            .permute((0, 3, 1, 4, 2, 5))?
            .reshape((b, c_out, h * k, w * k))?;
        y.broadcast_add(&self.bias)
    }
}

#[derive(Debug)]
enum Resize {
    Up(TileUpsample),
    Identity,
    Down(Conv2d),
}

/// `neck.reassemble_stage.layers.i`: projection, then resize.
#[derive(Debug)]
struct ReassembleLayer {
    projection: Conv2d,
    resize: Resize,
}

impl ReassembleLayer {
    fn new(hidden: usize, channels: usize, factor: f64, vb: VarBuilder) -> Result<Self> {
        let projection = Conv2d::new(
            hidden,
            channels,
            1,
            1,
            Padding::uniform(0),
            true,
            vb.pp("projection"),
        )?;
        let resize = match resize_kind(factor) {
            Some(ResizeKind::Up(k)) => Resize::Up(TileUpsample::new(channels, k, vb.pp("resize"))?),
            Some(ResizeKind::Identity) => Resize::Identity,
            Some(ResizeKind::Down(stride)) => Resize::Down(Conv2d::new(
                channels,
                channels,
                3,
                stride,
                Padding::uniform(1),
                true,
                vb.pp("resize"),
            )?),
            None => return Err(config_error("reassemble_factors", format!("{factor}"))),
        };
        Ok(Self { projection, resize })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.projection.forward(x)?;
        match &self.resize {
            Resize::Up(up) => up.forward(&x),
            Resize::Identity => Ok(x),
            Resize::Down(conv) => conv.forward(&x),
        }
    }
}

/// Pre-activation residual unit: `y + conv₂(relu(conv₁(relu(y))))`.
#[derive(Debug)]
struct ResidualUnit {
    convolution1: Conv2d,
    convolution2: Conv2d,
}

impl ResidualUnit {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let conv = |name: &str| {
            Conv2d::new(
                channels,
                channels,
                3,
                1,
                Padding::uniform(1),
                true,
                vb.pp(name),
            )
        };
        Ok(Self {
            convolution1: conv("convolution1")?,
            convolution2: conv("convolution2")?,
        })
    }

    fn forward(&self, y: &Tensor) -> Result<Tensor> {
        let h = self.convolution1.forward(&y.relu()?)?;
        let h = self.convolution2.forward(&h.relu()?)?;
        h + y
    }
}

/// `neck.fusion_stage.layers.j`.
#[derive(Debug)]
struct FusionLayer {
    projection: Conv2d,
    residual_layer1: ResidualUnit,
    residual_layer2: ResidualUnit,
}

impl FusionLayer {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            projection: Conv2d::new(
                channels,
                channels,
                1,
                1,
                Padding::uniform(0),
                true,
                vb.pp("projection"),
            )?,
            // The first layer has no level to add and never uses this unit; the checkpoint has
            // it all the same.
            residual_layer1: ResidualUnit::new(channels, vb.pp("residual_layer1"))?,
            residual_layer2: ResidualUnit::new(channels, vb.pp("residual_layer2"))?,
        })
    }

    /// Adds `level` (if any) to the running map `x`, refines, resizes to `size` (×2 if none)
    /// and projects.
    fn forward(
        &self,
        x: &Tensor,
        level: Option<&Tensor>,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let x = match level {
            None => x.clone(),
            Some(level) => {
                // Only an unusual factor list makes the sizes differ; transformers then
                // resizes the level (align_corners = False).
                let (_, _, h, w) = x.dims4()?;
                let level = if level.dims() == x.dims() {
                    level.clone()
                } else {
                    resize_bilinear(level, h, w, false)?
                };
                (x + self.residual_layer1.forward(&level)?)?
            }
        };
        let x = self.residual_layer2.forward(&x)?;
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.projection.forward(&resize_bilinear(&x, th, tw, true)?)
    }
}

/// `head.*`: the depth map from the fused features.
#[derive(Debug)]
struct Head {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    metric: bool,
    max_depth: f64,
}

impl Head {
    fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        let f = config.fusion_hidden_size;
        let conv = |c_in, c_out, k, pad, name: &str| {
            Conv2d::new(c_in, c_out, k, 1, Padding::uniform(pad), true, vb.pp(name))
        };
        Ok(Self {
            conv1: conv(f, f / 2, 3, 1, "conv1")?,
            conv2: conv(f / 2, config.head_hidden_size, 3, 1, "conv2")?,
            conv3: conv(config.head_hidden_size, 1, 1, 0, "conv3")?,
            metric: config.depth_estimation_type == "metric",
            max_depth: config.max_depth.unwrap_or(1.0),
        })
    }

    /// `[B, F, h', w']` → `[B, height, width]`.
    fn forward(&self, x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let x = self.conv1.forward(x)?;
        let x = resize_bilinear(&x, height, width, true)?;
        let x = self.conv2.forward(&x)?.relu()?;
        let x = self.conv3.forward(&x)?;
        let x = if self.metric {
            candle_nn::ops::sigmoid(&x)?
        } else {
            x.relu()?
        };
        let x = if self.max_depth == 1.0 {
            x
        } else {
            (x * self.max_depth)?
        };
        x.squeeze(1)
    }
}

/// The DPT neck (`neck.*`) that Depth Anything and DPT share: per level a reassemble layer and
/// a 3×3 convolution, then the top-down fusion.
#[derive(Debug)]
pub(crate) struct Neck {
    reassemble: Vec<ReassembleLayer>,
    convs: Vec<Conv2d>,
    fusion: Vec<FusionLayer>,
}

impl Neck {
    /// `hidden`: the tokens' width; `sizes` and `factors`: each level's channels and resize;
    /// `fusion`: the fused width.
    pub(crate) fn new(
        hidden: usize,
        sizes: &[usize],
        factors: &[f64],
        fusion: usize,
        neck: VarBuilder,
    ) -> Result<Self> {
        let reassemble = sizes
            .iter()
            .zip(factors)
            .enumerate()
            .map(|(i, (&channels, &factor))| {
                ReassembleLayer::new(
                    hidden,
                    channels,
                    factor,
                    neck.pp(format!("reassemble_stage.layers.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let convs = sizes
            .iter()
            .enumerate()
            .map(|(i, &channels)| {
                Conv2d::new(
                    channels,
                    fusion,
                    3,
                    1,
                    Padding::uniform(1),
                    false,
                    neck.pp(format!("convs.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let fusion = (0..sizes.len())
            .map(|j| FusionLayer::new(fusion, neck.pp(format!("fusion_stage.layers.{j}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            reassemble,
            convs,
            fusion,
        })
    }

    /// The fused map after `levels` (finest first, each `[B, hidden, h, w]`, the tokens laid
    /// out) went through their reassemble layers and convolutions, fused top-down through the
    /// first `head_level + 1` fusion layers.
    pub(crate) fn forward(&self, levels: Vec<Tensor>, head_level: usize) -> Result<Tensor> {
        let mut levels = levels
            .iter()
            .zip(&self.reassemble)
            .zip(&self.convs)
            .map(|((map, reassemble), conv)| conv.forward(&reassemble.forward(map)?))
            .collect::<Result<Vec<_>>>()?;
        // Coarsest level first; each fused map is resized to the next level's size.
        levels.reverse();
        let mut fused: Option<Tensor> = None;
        for (j, layer) in self.fusion.iter().enumerate().take(head_level + 1) {
            let size = match levels.get(j + 1) {
                Some(next) => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                None => None,
            };
            fused = Some(match &fused {
                None => layer.forward(&levels[j], None, size)?,
                Some(x) => layer.forward(x, Some(&levels[j]), size)?,
            });
        }
        fused.ok_or_else(|| candle_core::Error::Msg("no fusion layer".into()))
    }
}

/// transformers' `DepthAnythingForDepthEstimation`.
#[derive(Debug)]
pub struct DepthAnything {
    backbone: Dinov2Backbone,
    neck: Neck,
    head: Head,
    head_level: usize,
    patch: usize,
    /// The weights' dtype, which inputs are cast to.
    dtype: candle_core::DType,
}

impl DepthAnything {
    /// Builds the network from `vb` at the checkpoint's root (`backbone.*`, `neck.*`,
    /// `head.*`); validates the config first.
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let backbone = Dinov2Backbone::new(&config.backbone_config, vb.pp("backbone"))?;
        let neck = Neck::new(
            config.reassemble_hidden_size,
            &config.neck_hidden_sizes,
            &config.reassemble_factors,
            config.fusion_hidden_size,
            vb.pp("neck"),
        )?;
        Ok(Self {
            backbone,
            neck,
            head: Head::new(config, vb.pp("head"))?,
            head_level: config.head_level().unwrap_or(0),
            patch: config.backbone_config.patch(),
            dtype: vb.dtype(),
        })
    }

    /// The backbone (its feature maps are the neck's input).
    pub fn backbone(&self) -> &Dinov2Backbone {
        &self.backbone
    }

    /// The dtype the network computes in (its weights').
    pub fn dtype(&self) -> candle_core::DType {
        self.dtype
    }

    /// Predicted depth `[B, H, W]` for `pixel_values` `[B, 3, H, W]` (H and W positive
    /// multiples of the patch size, 14), in the weights' dtype.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, _, height, width) = pixel_values.dims4()?;
        let (gh, gw) = (height / self.patch, width / self.patch);
        let stages = self.backbone.forward(pixel_values)?;
        let levels = stages
            .iter()
            .map(|tokens| {
                let (b, _, d) = tokens.dims3()?;
                tokens
                    .narrow(1, 1, gh * gw)?
                    .reshape((b, gh, gw, d))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()
            })
            .collect::<Result<Vec<_>>>()?;
        let fused = self.neck.forward(levels, self.head_level)?;
        self.head.forward(&fused, gh * self.patch, gw * self.patch)
    }
}

/// For sdstream's weight loading: checkpoint tensors the network does not read. Only
/// `backbone.embeddings.mask_token` (DINOv2's masked-image pretraining token).
pub fn tolerated_unused(name: &str) -> bool {
    name == "backbone.embeddings.mask_token"
}
