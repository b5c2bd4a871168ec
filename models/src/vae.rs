//! The KL autoencoder of Stable Diffusion, as diffusers' `AutoencoderKL`.
//!
//! Encoder: `conv_in`, one down block per level (ResNet blocks, then a stride-2 convolution on
//! `(0, 1, 0, 1)`-padded input except at the last level), a mid block (ResNet, single-head
//! self-attention, ResNet), GroupNorm + SiLU, `conv_out` to mean and log-variance, `quant_conv`.
//! Decoder: `post_quant_conv`, `conv_in`, mid block, up blocks of `layers_per_block + 1` ResNet
//! blocks followed by nearest 2× upsampling and a convolution (except at the last level),
//! GroupNorm + SiLU, `conv_out`.
//!
//! Shapes come from the checkpoint's `config.json`; weights use diffusers' names (the pre-0.14
//! attention names `query`/`key`/`value`/`proj_attn` are read too).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use crate::activation::Activation;
use crate::cuda_graph::GraphCache;
use crate::kernels::conv::{Conv2d, Padding};
use crate::kernels::norm::GroupNorm;
use crate::kernels::ops::add_fresh;
use crate::kernels::{cpu_kernels, gemm_bf16};
use crate::limits::{
    Limits, MAX_CHANNELS, MAX_GROUPS, MAX_IO_CHANNELS, MAX_LAYERS_PER_BLOCK, MAX_LEVELS,
};
use crate::{Error, Result};
use crate::{no_unused_tensors, open_component};

/// diffusers' normalisation epsilon inside the VAE (hard-wired there too).
const NORM_EPS: f64 = 1e-6;

/// `config.json` of a diffusers `AutoencoderKL`; defaults are diffusers' constructor defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Image channels in.
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    /// One per level; only `DownEncoderBlock2D` exists for this model.
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    /// One per level; only `UpDecoderBlock2D` exists for this model.
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// Channels per level, finest first.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    /// Activation of the ResNet blocks and of the output heads.
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Channels of the latent space.
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Groups of every GroupNorm.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding and divided by it before decoding.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Latent shift of SD3/Flux VAEs; StreamDiffusion does not use it.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether the checkpoint asks pipelines to run it in f32: SDXL's VAE overflows f16, so an
    /// SDXL checkpoint with this set loads its VAE in f32 when the engine runs in f16
    /// (`StableDiffusionModels`), as diffusers' SDXL pipelines upcast it.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// Whether a 1×1 convolution follows the encoder.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether a 1×1 convolution precedes the decoder.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have self-attention.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_image_channels() -> usize {
    3
}
fn default_down_block_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_block_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl Default for Config {
    fn default() -> Self {
        Self {
            in_channels: default_image_channels(),
            out_channels: default_image_channels(),
            down_block_types: default_down_block_types(),
            up_block_types: default_up_block_types(),
            block_out_channels: default_block_out_channels(),
            layers_per_block: default_layers_per_block(),
            act_fn: default_act_fn(),
            latent_channels: default_latent_channels(),
            norm_num_groups: default_norm_num_groups(),
            scaling_factor: default_scaling_factor(),
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl Config {
    /// Checks what the graph depends on, and every size against [`crate::limits`]; the
    /// error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let l = Limits::new("AutoencoderKL");
        l.count(
            "block_out_channels",
            self.block_out_channels.len(),
            MAX_LEVELS,
        )?;
        l.values("block_out_channels", &self.block_out_channels, MAX_CHANNELS)?;
        l.value(
            "layers_per_block",
            self.layers_per_block,
            MAX_LAYERS_PER_BLOCK,
        )?;
        for (key, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
        ] {
            l.value(key, value, MAX_IO_CHANNELS)?;
        }
        l.value("norm_num_groups", self.norm_num_groups, MAX_GROUPS)?;
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return Err(Error::param("block_out_channels", "must not be empty"));
        }
        for (field, types, want) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != levels {
                return Err(Error::param(
                    field,
                    format!(
                        "has {} entries but block_out_channels has {levels}",
                        types.len()
                    ),
                ));
            }
            if let Some(other) = types.iter().find(|t| t.as_str() != want) {
                return Err(Error::param(
                    field,
                    format!("unsupported block type {other:?} (only {want} is supported)"),
                ));
            }
        }
        Activation::from_config(&self.act_fn, "act_fn")?;
        let groups = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| groups == 0 || !c.is_multiple_of(groups))
        {
            return Err(Error::param(
                "norm_num_groups",
                format!("{groups} groups do not divide {c} channels of block_out_channels"),
            ));
        }
        super::limits::at_least_one(&[
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
        ])?;
        super::limits::positive_factor("scaling_factor", self.scaling_factor)?;
        Ok(())
    }
}

/// Whether the encoder and decoder run channels-last (`[B, H, W, C]`): where the CPU kernels
/// run. There the convolution needs no im2col matrix and upsampling convolutions take 4 taps
/// instead of 9 ([`crate::kernels::conv::Conv2d::into_channels_last`]): at 512×512 the
/// decoder's 128- and 256-channel convolutions take about half the time channels-first does.
/// Maps are converted once on the way in and once on the way out (3 or 4 and 8 channels).
/// Elsewhere where the kernel policy asks for channels-last maps (`SDSTREAM_CHANNELS_LAST`, by
/// default on CUDA devices: cuDNN's NHWC convolutions with no transposes around them).
fn runs_channels_last(vb: &VarBuilder) -> bool {
    cpu_kernels(vb.device())
        || crate::kernels::KernelPolicy::current().channels_last_on(vb.device())
}

/// A convolution of the encoder or decoder, in their layout (TAESD's too: one rule for both
/// autoencoders).
pub(crate) fn map_conv(conv: Conv2d, vb: &VarBuilder) -> candle_core::Result<Conv2d> {
    if runs_channels_last(vb) {
        conv.into_channels_last()
    } else {
        Ok(conv)
    }
}

/// A GroupNorm of the encoder or decoder, in their layout.
fn map_norm(groups: usize, channels: usize, vb: VarBuilder) -> candle_core::Result<GroupNorm> {
    let last = runs_channels_last(&vb);
    let norm = GroupNorm::new(groups, channels, NORM_EPS, vb)?;
    Ok(if last {
        norm.into_channels_last()
    } else {
        norm
    })
}

fn conv3x3(c_in: usize, c_out: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    let conv = Conv2d::new(c_in, c_out, 3, 1, Padding::uniform(1), true, vb.clone())?;
    map_conv(conv, &vb)
}

/// diffusers' `Downsample2D(padding=0)`: pad right and bottom by one, then a stride-2 3×3 conv.
fn downsample_conv(channels: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    let conv = Conv2d::new(
        channels,
        channels,
        3,
        2,
        Padding::bottom_right(1),
        true,
        vb.clone(),
    )?;
    map_conv(conv, &vb)
}

fn conv1x1(c_in: usize, c_out: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    let conv = Conv2d::new(c_in, c_out, 1, 1, Padding::default(), true, vb.clone())?;
    map_conv(conv, &vb)
}

/// `quant_conv` and `post_quant_conv`: outside the encoder and decoder, channels-first.
fn quant_conv1x1(channels: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    Conv2d::new(channels, channels, 1, 1, Padding::default(), true, vb)
}

/// `xs` from channels-first to channels-last when `last`.
fn enter(xs: &Tensor, last: bool) -> candle_core::Result<Tensor> {
    if last {
        xs.permute((0, 2, 3, 1))?.contiguous()
    } else {
        Ok(xs.clone())
    }
}

/// `xs` back to channels-first when `last`.
fn leave(xs: Tensor, last: bool) -> candle_core::Result<Tensor> {
    if last {
        xs.permute((0, 3, 1, 2))?.contiguous()
    } else {
        Ok(xs)
    }
}

/// diffusers' `ResnetBlock2D` without time embedding.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// 1×1 projection of the skip path when the channel count changes.
    conv_shortcut: Option<Conv2d>,
    act: Activation,
}

impl ResnetBlock {
    fn new(
        c_in: usize,
        c_out: usize,
        cfg: &Config,
        act: Activation,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let groups = cfg.norm_num_groups;
        Ok(Self {
            norm1: map_norm(groups, c_in, vb.pp("norm1"))?,
            conv1: conv3x3(c_in, c_out, vb.pp("conv1"))?,
            norm2: map_norm(groups, c_out, vb.pp("norm2"))?,
            conv2: conv3x3(c_out, c_out, vb.pp("conv2"))?,
            conv_shortcut: if c_in != c_out {
                Some(conv1x1(c_in, c_out, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            act,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.act.after_norm(&self.norm1, xs)?)?;
        let h = self.conv2.forward(&self.act.after_norm(&self.norm2, &h)?)?;
        match &self.conv_shortcut {
            Some(conv) => add_fresh(h, &conv.forward(xs)?, 1),
            None => add_fresh(h, xs, 1),
        }
    }
}

/// diffusers' `Attention` as the VAE mid block uses it: GroupNorm, one head over all channels,
/// output projection, residual connection (rescale factor 1).
///
/// Computed channel-first ([B, C, HW]) so that no transposed copy of the feature map is made.
#[derive(Debug, Clone)]
struct MidAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
    /// Whether maps are `[B, H, W, C]`.
    channels_last: bool,
}

impl MidAttention {
    fn new(channels: usize, cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        let proj = |name: &str| linear_maybe_conv(channels, vb.pp(name));
        Ok(Self {
            group_norm: map_norm(cfg.norm_num_groups, channels, vb.pp("group_norm"))?,
            channels_last: runs_channels_last(&vb),
            to_q: proj(names[0])?,
            to_k: proj(names[1])?,
            to_v: proj(names[2])?,
            to_out: proj(names[3])?,
            scale: (channels as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.channels_last {
            return self.forward_channels_last(xs);
        }
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.group_norm.forward(xs)?.reshape((b, c, h * w))?;
        let q = (channel_first_linear(&self.to_q, &normed)? * self.scale)?;
        let k = channel_first_linear(&self.to_k, &normed)?;
        let v = channel_first_linear(&self.to_v, &normed)?;
        // scores[i, j] = q_i · k_j / √C, softmax over keys j.
        let scores = q.transpose(1, 2)?.matmul(&k)?;
        let dtype = scores.dtype();
        let probs = match dtype {
            DType::F16 | DType::BF16 => {
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?
            }
            _ => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        // out[c, i] = Σ_j v[c, j] · probs[i, j]
        let attended = v.matmul(&probs.transpose(1, 2)?)?;
        let out = channel_first_linear(&self.to_out, &attended)?;
        out.reshape((b, c, h, w))? + xs
    }
}

impl MidAttention {
    /// The same over `[B, H, W, C]`, where the map already is a sequence of tokens.
    fn forward_channels_last(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        let normed = self.group_norm.forward(xs)?.reshape((b, h * w, c))?;
        let q = (self.to_q.forward(&normed)? * self.scale)?;
        let k = self.to_k.forward(&normed)?;
        let v = self.to_v.forward(&normed)?;
        let scores = q.matmul(&k.t()?)?;
        let dtype = scores.dtype();
        let probs = match dtype {
            DType::F16 | DType::BF16 => {
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?
            }
            _ => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        let out = self.to_out.forward(&probs.matmul(&v)?)?;
        add_fresh(out.reshape((b, h, w, c))?, xs, 1)
    }
}

/// A [C, C] linear layer; very old checkpoints stored these as [C, C, 1, 1] convolutions.
fn linear_maybe_conv(channels: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = match vb.get((channels, channels), "weight") {
        Ok(w) => w,
        Err(e) => match vb.get((channels, channels, 1, 1), "weight") {
            Ok(w) => w.reshape((channels, channels))?,
            Err(_) => return Err(e),
        },
    };
    Ok(Linear::new(weight, Some(vb.get(channels, "bias")?)))
}

/// Applies `linear` to every column of `xs`: [B, C_in, N] → [B, C_out, N].
fn channel_first_linear(linear: &Linear, xs: &Tensor) -> candle_core::Result<Tensor> {
    let batch = xs.dim(0)?;
    let w = linear.weight().broadcast_left(batch)?;
    let ys = w.matmul(xs)?;
    match linear.bias() {
        Some(bias) => ys.broadcast_add(&bias.reshape((1, (), 1))?),
        None => Ok(ys),
    }
}

/// diffusers' `UNetMidBlock2D` with one layer: ResNet, (attention), ResNet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<MidAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(
        channels: usize,
        cfg: &Config,
        act: Activation,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock::new(channels, channels, cfg, act, vb.pp("resnets.0"))?,
            attention: if cfg.mid_block_add_attention {
                Some(MidAttention::new(channels, cfg, vb.pp("attentions.0"))?)
            } else {
                None
            },
            resnet1: ResnetBlock::new(channels, channels, cfg, act, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.resnet0.forward(xs)?;
        if let Some(attention) = &self.attention {
            xs = attention.forward(&xs)?;
        }
        self.resnet1.forward(&xs)
    }
}

/// One encoder level: ResNet blocks, then (except at the last level) a stride-2 convolution.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs)?;
        }
        match &self.downsample {
            Some(conv) => conv.forward(&xs),
            None => Ok(xs),
        }
    }
}

/// One decoder level: ResNet blocks, then (except at the last level) nearest 2× + convolution.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs)?;
        }
        match &self.upsample {
            // Nearest 2× then 3×3 conv, fused (the upsampled map is never stored on the CPU).
            Some(conv) => conv.forward_upsampled(&xs, 2),
            None => Ok(xs),
        }
    }
}

/// diffusers' `Encoder` with `double_z = true`.
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    /// Whether the layers run channels-last (input and output stay channels-first).
    channels_last: bool,
}

impl Encoder {
    fn new(cfg: &Config, act: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        let channels = &cfg.block_out_channels;
        let levels = channels.len();
        let conv_in = conv3x3(cfg.in_channels, channels[0], vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(levels);
        let mut c_prev = channels[0];
        for (i, &c_out) in channels.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c_in = if j == 0 { c_prev } else { c_out };
                    ResnetBlock::new(c_in, c_out, cfg, act, vb.pp(format!("resnets.{j}")))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let downsample = if i + 1 < levels {
                Some(downsample_conv(c_out, vb.pp("downsamplers.0.conv"))?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            c_prev = c_out;
        }
        let c_last = channels[levels - 1];
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(c_last, cfg, act, vb.pp("mid_block"))?,
            conv_norm_out: map_norm(cfg.norm_num_groups, c_last, vb.pp("conv_norm_out"))?,
            channels_last: runs_channels_last(&vb),
            conv_out: conv3x3(c_last, 2 * cfg.latent_channels, vb.pp("conv_out"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(&enter(xs, self.channels_last)?)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.mid_block.forward(&xs)?;
        let ys = self
            .conv_out
            .forward(&self.act.after_norm(&self.conv_norm_out, &xs)?)?;
        leave(ys, self.channels_last)
    }
}

/// diffusers' `Decoder` with group normalisation.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    /// Whether the layers run channels-last (input and output stay channels-first).
    channels_last: bool,
}

impl Decoder {
    fn new(cfg: &Config, act: Activation, vb: VarBuilder) -> candle_core::Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let levels = reversed.len();
        let conv_in = conv3x3(cfg.latent_channels, reversed[0], vb.pp("conv_in"))?;
        let mid_block = MidBlock::new(reversed[0], cfg, act, vb.pp("mid_block"))?;
        let mut up_blocks = Vec::with_capacity(levels);
        let mut c_prev = reversed[0];
        for (i, &c_out) in reversed.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let c_in = if j == 0 { c_prev } else { c_out };
                    ResnetBlock::new(c_in, c_out, cfg, act, vb.pp(format!("resnets.{j}")))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsample = if i + 1 < levels {
                Some(conv3x3(c_out, c_out, vb.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            c_prev = c_out;
        }
        let c_first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: map_norm(cfg.norm_num_groups, c_first, vb.pp("conv_norm_out"))?,
            channels_last: runs_channels_last(&vb),
            conv_out: conv3x3(c_first, cfg.out_channels, vb.pp("conv_out"))?,
            act,
        })
    }

    fn forward(&self, zs: &Tensor) -> candle_core::Result<Tensor> {
        let zs = enter(zs, self.channels_last)?;
        let mut xs = self.mid_block.forward(&self.conv_in.forward(&zs)?)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        let ys = self
            .conv_out
            .forward(&self.act.after_norm(&self.conv_norm_out, &xs)?)?;
        leave(ys, self.channels_last)
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    config: Config,
    dtype: DType,
    /// Whether the CPU's GEMMs run in bf16 ([`with_bf16_gemms`](Self::with_bf16_gemms)).
    bf16_gemms: bool,
    /// CUDA graphs of the encoder (to the moments) and the decoder (none elsewhere); a clone
    /// starts without any.
    encoder_graphs: GraphCache,
    decoder_graphs: GraphCache,
}

impl AutoencoderKl {
    /// Builds the network from `config` with weights from `vb` (rooted at the file's top level).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let act = Activation::from_config(&config.act_fn, "act_fn")?;
        let latent = config.latent_channels;
        Ok(Self {
            encoder: Encoder::new(config, act, vb.pp("encoder"))?,
            quant_conv: if config.use_quant_conv {
                Some(quant_conv1x1(2 * latent, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(quant_conv1x1(latent, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            decoder: Decoder::new(config, act, vb.pp("decoder"))?,
            config: config.clone(),
            dtype: vb.dtype(),
            bf16_gemms: false,
            encoder_graphs: GraphCache::default(),
            decoder_graphs: GraphCache::default(),
        })
    }

    /// Loads a diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors`, or
    /// the `.fp16.safetensors` variant, preferred when `dtype` is half precision).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        open_component(
            dir,
            "diffusion_pytorch_model",
            dtype,
            device,
            no_unused_tensors,
            Config::validate,
            Self::new,
        )
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dtype of the weights, in which the network computes.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The factor latents are multiplied by after encoding (`config.scaling_factor`).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// How many pixels one latent cell spans per side: 2^(levels − 1), 8 for SD.
    pub fn spatial_scale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Channels of the latent space.
    pub fn latent_channels(&self) -> usize {
        self.config.latent_channels
    }

    /// The posterior's moments for images `x` ([B, in_channels, H, W] in [−1, 1]; H and W
    /// multiples of [`spatial_scale_factor`](Self::spatial_scale_factor)): `(mean, logvar)`,
    /// each [B, latent_channels, H/f, W/f], logvar clamped to [−30, 20] as diffusers'
    /// `DiagonalGaussianDistribution` does. Both are views into one tensor.
    /// On a CUDA device the encoder runs as a CUDA graph after its first call
    /// ([`super::cuda_graph`]); the posterior's noise is added outside it
    /// ([`sample_posterior`](Self::sample_posterior)), drawn where the engine draws it.
    pub fn encode_moments(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let moments = gemm_bf16::scoped(self.bf16_gemms, || {
            self.encoder_graphs.run(&[x], |xs| {
                let moments = self.encoder.forward(xs[0])?;
                Ok(match &self.quant_conv {
                    Some(conv) => conv.forward(&moments)?,
                    None => moments,
                })
            })
        })?;
        let latent = self.config.latent_channels;
        let mean = moments.narrow(1, 0, latent)?;
        let logvar = moments.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// A posterior sample, `mean + exp(½·logvar)·noise`: diffusers' `latent_dist.sample()` with
    /// the standard-normal `noise` drawn by the caller (from the engine's torch-compatible
    /// generator, so that draws are consumed in the reference's order).
    pub fn sample_posterior(mean: &Tensor, logvar: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let std = (logvar * 0.5)?.exp()?;
        Ok((mean + std.mul(noise)?)?)
    }

    /// Decodes latents `z` ([B, latent_channels, h, w], already divided by the scaling factor)
    /// into images [B, out_channels, h·f, w·f], nominally in [−1, 1] (not clamped).
    /// On a CUDA device it runs as a CUDA graph after its first call ([`super::cuda_graph`]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        gemm_bf16::scoped(self.bf16_gemms, || {
            self.decoder_graphs.run(&[z], |zs| {
                let z = match &self.post_quant_conv {
                    Some(conv) => conv.forward(zs[0])?,
                    None => zs[0].clone(),
                };
                Ok(self.decoder.forward(&z)?)
            })
        })
    }

    /// The same network with its CPU GEMMs in bf16 (`on`) or f32: bf16 operands, f32 sums,
    /// f32 maps in between ([`super::kernels::gemm_bf16`]); `dtype: "bf16"` on the CPU. Other
    /// devices ignore it.
    pub fn with_bf16_gemms(mut self, on: bool) -> Self {
        self.bf16_gemms = on;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(cfg: &Config) -> String {
        cfg.validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn unsupported_options_are_named() {
        let cfg = Config {
            down_block_types: vec!["AttnDownEncoderBlock2D".into()],
            ..Config::default()
        };
        assert!(field_of(&cfg).contains("down_block_types"));
        let cfg = Config {
            act_fn: "tanh".into(),
            ..Config::default()
        };
        assert!(field_of(&cfg).contains("act_fn"));
        let cfg = Config {
            norm_num_groups: 24,
            ..Config::default()
        };
        assert!(field_of(&cfg).contains("norm_num_groups"));
        assert!(Config::default().validate().is_ok());
    }
}
