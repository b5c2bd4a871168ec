//! diffusers' `UNet2DConditionModel`, built from the checkpoint's own `unet/config.json`.
//!
//! The forward pass takes one timestep per batch row (the stream batch denoises every row at a
//! different t), computes the sinusoidal timestep features in f32 as diffusers does and casts
//! them to the model dtype before the time MLP, and accepts ControlNet residuals
//! ([`ControlResiduals`]) that are added to the skip connections and to the mid-block output
//! exactly where diffusers adds `down_block_additional_residuals` /
//! `mid_block_additional_residual`.
//!
//! The time embedding, `conv_in`, the down blocks and the mid block form a `UNetEncoder`,
//! which a ControlNet (the same encoder with zero convolutions on its outputs) reuses.
//!
//! On the CPU the blocks use the shared kernels of [`super::kernels`] (tiled GEMM convolutions,
//! f64-accumulated norms, in-place softmax and adds); other devices use candle's portable ops,
//! which `SDSTREAM_PORTABLE_KERNELS=1` also selects on the CPU (tests/unet_portable.rs checks
//! that path).
//! bf16 needs a GPU: candle's CPU matmul has no bf16 kernel.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Deserializer};

use super::kernels::conv::Conv2d;
use super::kernels::norm::GroupNorm;
use super::open_component;
use super::unet_blocks::{
    Activation, AttentionSpec, BlockSettings, DownBlock, LevelShape, MidBlock, SinusoidalTimesteps,
    TimestepEmbedding, UpBlock, conv2d,
};
use crate::{Error, Result};

/// A config value that is either one value for every UNet level or one per level.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerLevel<T> {
    /// The same value at every level.
    One(T),
    /// One value per level, outermost first.
    Each(Vec<T>),
}

impl<T: Clone> PerLevel<T> {
    /// Expands to one value per level; a list of the wrong length is an error naming `option`.
    pub fn resolve(&self, levels: usize, model: &str, option: &str) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); levels]),
            Self::Each(vs) if vs.len() == levels => Ok(vs.clone()),
            Self::Each(vs) => Err(unsupported(
                model,
                option,
                format!("has {} entries but the UNet has {levels} levels", vs.len()),
            )),
        }
    }
}

/// `transformer_layers_per_block`: an int, one int per level, or (asymmetric UNets, not
/// supported) one list per level.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TransformerLayers {
    /// The same count at every level.
    One(usize),
    /// One count per level.
    Each(Vec<usize>),
    /// One count per resnet of every level (asymmetric UNets).
    PerResnet(Vec<Vec<usize>>),
}

/// The fields of diffusers' `UNet2DConditionModel` config that shape the graph. Missing keys
/// take diffusers' constructor defaults; keys that do not change the graph are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in.
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Channels out (ε or v prediction).
    #[serde(default = "four")]
    pub out_channels: usize,
    /// `sample = 2·sample − 1` before `conv_in`.
    #[serde(default, deserialize_with = "null_is_false")]
    pub center_input_sample: bool,
    /// Order of the sinusoidal features: cos first when true.
    #[serde(default = "yes", deserialize_with = "null_is_false")]
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the timestep features.
    #[serde(default)]
    pub freq_shift: f64,
    /// `CrossAttnDownBlock2D` or `DownBlock2D` per level.
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn`, `UNetMidBlock2D`, or null for none.
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    /// `UpBlock2D` or `CrossAttnUpBlock2D` per level, innermost first.
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    /// Whether the first attention of every transformer block attends to the text.
    #[serde(default = "no_per_level")]
    pub only_cross_attention: PerLevel<bool>,
    /// Channels of every level.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per down level (up levels have one more).
    #[serde(default = "two_per_level")]
    pub layers_per_block: PerLevel<usize>,
    /// Padding of the downsampling convolutions.
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    #[serde(default = "one_f64")]
    pub mid_block_scale_factor: f64,
    /// Nonlinearity of the resnets and the time MLP.
    #[serde(default = "silu")]
    pub act_fn: String,
    /// GroupNorm groups (null, meaning no output norm, is not supported).
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<usize>,
    /// GroupNorm eps of the resnets and the output norm.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Width of the text embeddings, one or per level.
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerLevel<usize>,
    /// Transformer blocks per attention, one or per level.
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: TransformerLayers,
    /// Up-path transformer counts of asymmetric UNets (not supported).
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// Projection of the encoder states (not supported).
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// Kind of encoder projection (not supported).
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Despite its name, the number of attention heads when `num_attention_heads` is absent
    /// (diffusers' historical naming).
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerLevel<usize>,
    /// Number of attention heads; when absent `attention_head_dim` is used instead.
    #[serde(default)]
    pub num_attention_heads: Option<PerLevel<usize>>,
    /// Dual transformers (not supported).
    #[serde(default, deserialize_with = "null_is_false")]
    pub dual_cross_attention: bool,
    /// Linear (true) or 1×1 convolution (false) projections around the transformers.
    #[serde(default, deserialize_with = "null_is_false")]
    pub use_linear_projection: bool,
    /// Class embedding (not supported).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Added conditioning: null, or `text_time` (SDXL: pooled text + size/crop ids).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal features of each SDXL time id.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Class count of a class embedding (not supported).
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Compute attention scores and softmax in f32 when the model runs in f16/bf16.
    #[serde(default, deserialize_with = "null_is_false")]
    pub upcast_attention: bool,
    /// `default` (add the time embedding) or `scale_shift`.
    #[serde(default = "default_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    /// Time embedding width; defaults to 4 × block_out_channels[0].
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Only `positional` is supported.
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    /// Activation applied once to the time embedding before the blocks.
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// Activation after the time MLP's second linear.
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// LCM guidance embedding width; its projection is unused without a `timestep_cond`, as in
    /// StreamDiffusion's UNet calls.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel of `conv_in`.
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    /// Input width of the SDXL added-conditioning MLP.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Only `default` is supported.
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    /// Concatenated class embeddings (not supported).
    #[serde(default, deserialize_with = "null_is_false")]
    pub class_embeddings_concat: bool,
}

fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn positional() -> String {
    "positional".into()
}
fn default_attention_type() -> String {
    "default".into()
}
fn default_time_scale_shift() -> String {
    "default".into()
}
fn default_down_blocks() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_up_blocks() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn no_per_level() -> PerLevel<bool> {
    PerLevel::One(false)
}
fn default_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn two_per_level() -> PerLevel<usize> {
    PerLevel::One(2)
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_attention_dim() -> PerLevel<usize> {
    PerLevel::One(1280)
}
fn default_transformer_layers() -> TransformerLayers {
    TransformerLayers::One(1)
}
fn default_attention_head_dim() -> PerLevel<usize> {
    PerLevel::One(8)
}

/// diffusers passes an explicit `null` to the constructor, where Python treats it as false.
fn null_is_false<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

fn unsupported(model: &str, option: &str, detail: impl Into<String>) -> Error {
    Error::UnsupportedConfig {
        model: model.into(),
        option: option.into(),
        detail: detail.into(),
    }
}

const CROSS_ATTN_DOWN: &str = "CrossAttnDownBlock2D";
const PLAIN_DOWN: &str = "DownBlock2D";
const CROSS_ATTN_UP: &str = "CrossAttnUpBlock2D";
const PLAIN_UP: &str = "UpBlock2D";
const MID_CROSS_ATTN: &str = "UNetMidBlock2DCrossAttn";
const MID_PLAIN: &str = "UNetMidBlock2D";

/// The config resolved to one entry per level (outermost first), checked for what is supported.
#[derive(Debug, Clone)]
pub(crate) struct LevelPlan {
    pub block_out_channels: Vec<usize>,
    pub layers: Vec<usize>,
    /// Attention of each down level (None for `DownBlock2D`).
    pub down_attention: Vec<Option<AttentionSpec>>,
    /// The per-level attention parameters regardless of block type (the up path and the mid
    /// block index them too).
    pub attention: Vec<AttentionSpec>,
    pub settings: BlockSettings,
    pub time_embed_dim: usize,
}

impl UNetConfig {
    /// Checks the options shared by the UNet and the ControlNet (time embedding, down path,
    /// mid block) and resolves the per-level lists. `model` names the network in errors.
    pub(crate) fn plan(&self, model: &str) -> Result<LevelPlan> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(unsupported(model, "block_out_channels", "is empty"));
        }
        if self.down_block_types.len() != n {
            return Err(unsupported(
                model,
                "down_block_types",
                format!(
                    "has {} entries but block_out_channels has {n}",
                    self.down_block_types.len()
                ),
            ));
        }
        let mut down_has_attention = Vec::with_capacity(n);
        for t in &self.down_block_types {
            match t.as_str() {
                CROSS_ATTN_DOWN => down_has_attention.push(true),
                PLAIN_DOWN => down_has_attention.push(false),
                other => {
                    return Err(unsupported(
                        model,
                        "down_block_types",
                        format!(
                            "block type {other:?} is not supported ({CROSS_ATTN_DOWN}, {PLAIN_DOWN})"
                        ),
                    ));
                }
            }
        }
        match self.mid_block_type.as_deref() {
            None | Some(MID_CROSS_ATTN) | Some(MID_PLAIN) => {}
            Some(other) => {
                return Err(unsupported(
                    model,
                    "mid_block_type",
                    format!("{other:?} is not supported ({MID_CROSS_ATTN}, {MID_PLAIN}, null)"),
                ));
            }
        }
        let groups = self.norm_num_groups.ok_or_else(|| {
            unsupported(
                model,
                "norm_num_groups",
                "null (no normalisation) is not supported",
            )
        })?;
        let act = Activation::parse(&self.act_fn, model, "act_fn")?;
        if self.dual_cross_attention {
            return Err(unsupported(
                model,
                "dual_cross_attention",
                "true is not supported",
            ));
        }
        if let Some(t) = &self.class_embed_type {
            return Err(unsupported(
                model,
                "class_embed_type",
                format!("{t:?} is not supported"),
            ));
        }
        if let Some(n) = self.num_class_embeds {
            return Err(unsupported(
                model,
                "num_class_embeds",
                format!("{n} is not supported"),
            ));
        }
        if self.class_embeddings_concat {
            return Err(unsupported(
                model,
                "class_embeddings_concat",
                "true is not supported",
            ));
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                if self.addition_time_embed_dim.is_none() {
                    return Err(unsupported(
                        model,
                        "addition_time_embed_dim",
                        "is required by addition_embed_type \"text_time\"",
                    ));
                }
                if self.projection_class_embeddings_input_dim.is_none() {
                    return Err(unsupported(
                        model,
                        "projection_class_embeddings_input_dim",
                        "is required by addition_embed_type \"text_time\"",
                    ));
                }
            }
            Some(other) => {
                return Err(unsupported(
                    model,
                    "addition_embed_type",
                    format!("{other:?} is not supported (null or \"text_time\")"),
                ));
            }
        }
        if let Some(t) = &self.encoder_hid_dim_type {
            return Err(unsupported(
                model,
                "encoder_hid_dim_type",
                format!("{t:?} is not supported"),
            ));
        }
        if let Some(d) = self.encoder_hid_dim {
            return Err(unsupported(
                model,
                "encoder_hid_dim",
                format!("{d} is not supported"),
            ));
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                model,
                "time_embedding_type",
                format!(
                    "{:?} is not supported (positional)",
                    self.time_embedding_type
                ),
            ));
        }
        let scale_shift = match self.resnet_time_scale_shift.as_str() {
            "default" => false,
            "scale_shift" => true,
            other => {
                return Err(unsupported(
                    model,
                    "resnet_time_scale_shift",
                    format!("{other:?} is not supported (default, scale_shift)"),
                ));
            }
        };
        if self.attention_type != "default" {
            return Err(unsupported(
                model,
                "attention_type",
                format!("{:?} is not supported (default)", self.attention_type),
            ));
        }
        if self
            .reverse_transformer_layers_per_block
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err(unsupported(
                model,
                "reverse_transformer_layers_per_block",
                "asymmetric UNets are not supported",
            ));
        }
        if self.conv_in_kernel.is_multiple_of(2) {
            return Err(unsupported(
                model,
                "conv_in_kernel",
                format!(
                    "{} is even; only odd kernels keep the size",
                    self.conv_in_kernel
                ),
            ));
        }
        if let Some(a) = &self.time_embedding_act_fn {
            Activation::parse(a, model, "time_embedding_act_fn")?;
        }
        if let Some(a) = &self.timestep_post_act {
            Activation::parse(a, model, "timestep_post_act")?;
        }

        let layers = self
            .layers_per_block
            .resolve(n, model, "layers_per_block")?;
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim.
        let heads = match &self.num_attention_heads {
            Some(h) => h.resolve(n, model, "num_attention_heads")?,
            None => self
                .attention_head_dim
                .resolve(n, model, "attention_head_dim")?,
        };
        let cross = self
            .cross_attention_dim
            .resolve(n, model, "cross_attention_dim")?;
        let only_cross = self
            .only_cross_attention
            .resolve(n, model, "only_cross_attention")?;
        let transformer_layers = match &self.transformer_layers_per_block {
            TransformerLayers::One(v) => vec![*v; n],
            TransformerLayers::Each(vs) if vs.len() == n => vs.clone(),
            TransformerLayers::Each(vs) => {
                return Err(unsupported(
                    model,
                    "transformer_layers_per_block",
                    format!("has {} entries but the UNet has {n} levels", vs.len()),
                ));
            }
            TransformerLayers::PerResnet(_) => {
                return Err(unsupported(
                    model,
                    "transformer_layers_per_block",
                    "per-resnet lists (asymmetric UNets) are not supported",
                ));
            }
        };
        for (i, &ch) in self.block_out_channels.iter().enumerate() {
            if !ch.is_multiple_of(groups) {
                return Err(unsupported(
                    model,
                    "norm_num_groups",
                    format!("{groups} groups do not divide block_out_channels[{i}] = {ch}"),
                ));
            }
            if heads[i] == 0 || !ch.is_multiple_of(heads[i]) {
                return Err(unsupported(
                    model,
                    "attention_head_dim",
                    format!(
                        "{} heads do not divide block_out_channels[{i}] = {ch}",
                        heads[i]
                    ),
                ));
            }
        }
        let attention: Vec<AttentionSpec> = (0..n)
            .map(|i| AttentionSpec {
                heads: heads[i],
                cross_attention_dim: cross[i],
                layers: transformer_layers[i],
                only_cross_attention: only_cross[i],
            })
            .collect();
        let down_attention = (0..n)
            .map(|i| down_has_attention[i].then_some(attention[i]))
            .collect();
        Ok(LevelPlan {
            block_out_channels: self.block_out_channels.clone(),
            layers,
            down_attention,
            attention,
            settings: BlockSettings {
                groups,
                eps: self.norm_eps,
                act,
                scale_shift,
                linear_projection: self.use_linear_projection,
                upcast_attention: self.upcast_attention,
            },
            time_embed_dim: self
                .time_embedding_dim
                .unwrap_or(4 * self.block_out_channels[0]),
        })
    }
}

/// SDXL's added conditioning (`addition_embed_type: "text_time"`).
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// Pooled text embeddings, `[B, P]`.
    pub text_embeds: Tensor,
    /// Size and crop ids, `[B, K]` (K = 6 for SDXL: original size, crop corner, target size).
    pub time_ids: Tensor,
}

/// ControlNet outputs to add to the UNet (diffusers' `down_block_additional_residuals` and
/// `mid_block_additional_residual`), already scaled and summed over ControlNets.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    /// `down[i]` is added to the i-th skip connection (conv_in output first), 12 for SD1.5/2.1.
    pub down: Vec<Tensor>,
    /// Added to the mid-block output.
    pub mid: Tensor,
}

/// SDXL's `add_time_proj` + `add_embedding`.
#[derive(Debug, Clone)]
struct TextTimeEmbedding {
    time_proj: SinusoidalTimesteps,
    embedding: TimestepEmbedding,
}

/// The part of the UNet a ControlNet shares: time embedding, `conv_in`, down blocks, mid block.
/// Weight names are relative to the model root (`time_embedding.*`, `down_blocks.*`, …).
#[derive(Debug, Clone)]
pub(crate) struct UNetEncoder {
    time_proj: SinusoidalTimesteps,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TextTimeEmbedding>,
    time_embed_act: Option<Activation>,
    resnet_act: Activation,
    pub(crate) conv_in: Conv2d,
    pub(crate) down_blocks: Vec<DownBlock>,
    pub(crate) mid_block: Option<MidBlock>,
    pub(crate) plan: LevelPlan,
    dtype: DType,
    model: &'static str,
}

impl UNetEncoder {
    /// Builds the shared part from a checked config; `model` names the network in errors.
    pub(crate) fn new(cfg: &UNetConfig, model: &'static str, vb: VarBuilder) -> Result<Self> {
        let plan = cfg.plan(model)?;
        let s = plan.settings;
        let ch0 = plan.block_out_channels[0];
        let temb = plan.time_embed_dim;
        let post_act = cfg
            .timestep_post_act
            .as_deref()
            .map(|a| Activation::parse(a, model, "timestep_post_act"))
            .transpose()?;
        let time_embed_act = cfg
            .time_embedding_act_fn
            .as_deref()
            .map(|a| Activation::parse(a, model, "time_embedding_act_fn"))
            .transpose()?;
        let add_embedding = match (
            cfg.addition_embed_type.as_deref(),
            cfg.addition_time_embed_dim,
            cfg.projection_class_embeddings_input_dim,
        ) {
            (Some("text_time"), Some(dim), Some(input_dim)) => Some(TextTimeEmbedding {
                time_proj: SinusoidalTimesteps::new(
                    dim,
                    cfg.flip_sin_to_cos,
                    cfg.freq_shift,
                    vb.device(),
                )?,
                // diffusers builds it with TimestepEmbedding's default activation, silu.
                embedding: TimestepEmbedding::new(
                    input_dim,
                    temb,
                    Activation::Silu,
                    None,
                    vb.pp("add_embedding"),
                )?,
            }),
            _ => None,
        };
        let n = plan.block_out_channels.len();
        let mut down_blocks = Vec::with_capacity(n);
        let mut in_ch = ch0;
        for i in 0..n {
            let out_ch = plan.block_out_channels[i];
            let is_final = i + 1 == n;
            down_blocks.push(DownBlock::new(
                LevelShape {
                    in_channels: in_ch,
                    out_channels: out_ch,
                    temb_channels: temb,
                    layers: plan.layers[i],
                },
                plan.down_attention[i].as_ref(),
                (!is_final).then_some(cfg.downsample_padding),
                &s,
                vb.pp("down_blocks").pp(i.to_string()),
            )?);
            in_ch = out_ch;
        }
        let mid_block = match cfg.mid_block_type.as_deref() {
            None => None,
            Some(kind) => {
                let mut mid_attention = plan.attention[n - 1];
                // UNetMidBlock2DCrossAttn is never built with only_cross_attention.
                mid_attention.only_cross_attention = false;
                Some(MidBlock::new(
                    plan.block_out_channels[n - 1],
                    temb,
                    cfg.mid_block_scale_factor,
                    (kind == MID_CROSS_ATTN).then_some(&mid_attention),
                    &s,
                    vb.pp("mid_block"),
                )?)
            }
        };
        let padding = (cfg.conv_in_kernel - 1) / 2;
        Ok(Self {
            time_proj: SinusoidalTimesteps::new(
                ch0,
                cfg.flip_sin_to_cos,
                cfg.freq_shift,
                vb.device(),
            )?,
            time_embedding: TimestepEmbedding::new(
                ch0,
                temb,
                s.act,
                post_act,
                vb.pp("time_embedding"),
            )?,
            add_embedding,
            time_embed_act,
            resnet_act: s.act,
            conv_in: conv2d(
                cfg.in_channels,
                ch0,
                cfg.conv_in_kernel,
                1,
                padding,
                vb.pp("conv_in"),
            )?,
            down_blocks,
            mid_block,
            dtype: vb.dtype(),
            plan,
            model,
        })
    }

    /// The model's dtype (that of its weights).
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// The time embedding `emb` of diffusers' forward (after the optional added conditioning
    /// and `time_embedding_act_fn`), `[batch, time_embed_dim]` in the model dtype.
    ///
    /// `timesteps` holds one value per row (`[batch]`), or a single value for every row.
    pub(crate) fn time_embedding(
        &self,
        timesteps: &Tensor,
        batch: usize,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        let t = match timesteps.dims() {
            [] => timesteps.reshape(1)?.broadcast_as(batch)?,
            [1] if batch != 1 => timesteps.broadcast_as(batch)?,
            [b] if *b == batch => timesteps.clone(),
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "{}: timesteps must be [batch = {batch}] (one per row) or a single value, got {other:?}",
                    self.model
                ))
                .into());
            }
        };
        // Features in f32, then cast to the model dtype before the MLP, as diffusers does.
        let features = self.time_proj.forward(&t)?.to_dtype(self.dtype)?;
        let mut emb = self.time_embedding.forward(&features)?;
        match (&self.add_embedding, added) {
            (Some(add), Some(cond)) => {
                let ids = cond.time_ids.flatten_all()?;
                if ids.dim(0)? % batch != 0 || cond.text_embeds.dims().first() != Some(&batch) {
                    return Err(candle_core::Error::Msg(format!(
                        "{}: time_ids {:?} and text_embeds {:?} must have {batch} rows",
                        self.model,
                        cond.time_ids.dims(),
                        cond.text_embeds.dims()
                    ))
                    .into());
                }
                let time_embeds = add.time_proj.forward(&ids)?.reshape((batch, ()))?;
                let add_embeds = Tensor::cat(
                    &[
                        cond.text_embeds.to_dtype(self.dtype)?,
                        time_embeds.to_dtype(self.dtype)?,
                    ],
                    1,
                )?;
                emb = (emb + add.embedding.forward(&add_embeds)?)?;
            }
            (Some(_), None) => {
                return Err(unsupported(
                    self.model,
                    "addition_embed_type",
                    "\"text_time\" needs added conditioning (text_embeds, time_ids); call forward_with_added",
                ));
            }
            (None, _) => {}
        }
        Ok(match self.time_embed_act {
            Some(act) => act.apply(&emb)?,
            None => emb,
        })
    }

    /// The time embedding with the resnets' nonlinearity applied, as every resnet uses it.
    pub(crate) fn resnet_temb(&self, emb: &Tensor) -> Result<Tensor> {
        Ok(self.resnet_act.apply(emb)?)
    }

    /// Runs the down blocks; returns the output and every skip connection, `x` (the conv_in
    /// output) first.
    pub(crate) fn down(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut skips = Vec::with_capacity(self.skip_count());
        skips.push(x.clone());
        let mut x = x.clone();
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&x, temb_act, context)?;
            skips.extend(block_skips);
            x = out;
        }
        Ok((x, skips))
    }

    /// The mid block, or the identity when the config has none.
    pub(crate) fn mid(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<Tensor> {
        match &self.mid_block {
            Some(mid) => Ok(mid.forward(x, temb_act, context)?),
            None => Ok(x.clone()),
        }
    }

    /// Channels of every skip connection in order (conv_in's first): the widths of a
    /// ControlNet's zero convolutions and of its down residuals.
    pub(crate) fn skip_channels(&self) -> Vec<usize> {
        let plan = &self.plan;
        let mut channels = vec![plan.block_out_channels[0]];
        for (i, block) in self.down_blocks.iter().enumerate() {
            channels.extend(std::iter::repeat_n(
                plan.block_out_channels[i],
                block.skip_count(),
            ));
        }
        channels
    }

    /// Number of skip connections (= ControlNet down residuals): conv_in's plus each block's.
    pub(crate) fn skip_count(&self) -> usize {
        1 + self
            .down_blocks
            .iter()
            .map(DownBlock::skip_count)
            .sum::<usize>()
    }
}

/// diffusers' `UNet2DConditionModel` (SD 1.x/2.x and, with added conditioning, SDXL layouts).
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    encoder: UNetEncoder,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the network from its config and weights (diffusers' names). An option the config
    /// sets that is not implemented is an [`Error::UnsupportedConfig`] naming it.
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        const MODEL: &str = "UNet";
        let encoder = UNetEncoder::new(config, MODEL, vb.clone())?;
        let plan = &encoder.plan;
        let s = plan.settings;
        let n = plan.block_out_channels.len();
        if config.up_block_types.len() != n {
            return Err(unsupported(
                MODEL,
                "up_block_types",
                format!(
                    "has {} entries but down_block_types has {n}",
                    config.up_block_types.len()
                ),
            ));
        }
        let rev = |i: usize| n - 1 - i;
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = plan.block_out_channels[n - 1];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let has_attention = match kind.as_str() {
                CROSS_ATTN_UP => true,
                PLAIN_UP => false,
                other => {
                    return Err(unsupported(
                        MODEL,
                        "up_block_types",
                        format!(
                            "block type {other:?} is not supported ({CROSS_ATTN_UP}, {PLAIN_UP})"
                        ),
                    ));
                }
            };
            let prev_ch = out_ch;
            out_ch = plan.block_out_channels[rev(i)];
            let in_ch = plan.block_out_channels[rev((i + 1).min(n - 1))];
            let attention = plan.attention[rev(i)];
            up_blocks.push(UpBlock::new(
                LevelShape {
                    in_channels: in_ch,
                    out_channels: out_ch,
                    temb_channels: plan.time_embed_dim,
                    layers: plan.layers[rev(i)] + 1,
                },
                prev_ch,
                has_attention.then_some(&attention),
                i + 1 != n,
                &s,
                vb.pp("up_blocks").pp(i.to_string()),
            )?);
        }
        let ch0 = plan.block_out_channels[0];
        if config.conv_out_kernel.is_multiple_of(2) {
            return Err(unsupported(
                MODEL,
                "conv_out_kernel",
                format!(
                    "{} is even; only odd kernels keep the size",
                    config.conv_out_kernel
                ),
            ));
        }
        Ok(Self {
            conv_norm_out: GroupNorm::new(s.groups, ch0, s.eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(
                ch0,
                config.out_channels,
                config.conv_out_kernel,
                1,
                (config.conv_out_kernel - 1) / 2,
                vb.pp("conv_out"),
            )?,
            config: config.clone(),
            encoder,
            up_blocks,
        })
    }

    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model[.fp16].safetensors` (the fp16
    /// file is preferred when `dtype` is f16 or bf16). Errors name the file at fault.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        open_component(
            dir,
            "diffusion_pytorch_model",
            dtype,
            device,
            |_: &UNetConfig| Ok(()),
            Self::new,
        )
    }

    /// The config the network was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The dtype of the weights, in which the network computes.
    pub fn dtype(&self) -> DType {
        self.encoder.dtype()
    }

    /// Whether any block attends to the text embeddings.
    fn has_attention(&self) -> bool {
        self.encoder.plan.down_attention.iter().any(Option::is_some)
            || self
                .config
                .up_block_types
                .iter()
                .any(|t| t == CROSS_ATTN_UP)
            || self.config.mid_block_type.as_deref() == Some(MID_CROSS_ATTN)
    }

    /// How many down residuals a [`ControlResiduals`] must hold (12 for SD 1.x/2.x).
    pub fn down_residual_count(&self) -> usize {
        self.encoder.skip_count()
    }

    /// The channel count of each down residual, in order (conv_in's skip first).
    pub fn down_residual_channels(&self) -> Vec<usize> {
        self.encoder.skip_channels()
    }

    /// Predicts the noise (or v) for `sample` `[B, C, h, w]` at `timesteps` `[B]` (one per row,
    /// any dtype; a single value applies to every row) given the text embeddings
    /// `encoder_hidden_states` `[B, 77, D]`, adding ControlNet residuals when given.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        control: Option<&ControlResiduals>,
    ) -> Result<Tensor> {
        self.forward_with_added(sample, timesteps, encoder_hidden_states, None, control)
    }

    /// [`forward`](Self::forward) with SDXL's added conditioning, which a config with
    /// `addition_embed_type: "text_time"` requires.
    pub fn forward_with_added(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning>,
        control: Option<&ControlResiduals>,
    ) -> Result<Tensor> {
        let dtype = self.dtype();
        let (batch, channels, height, width) = sample.dims4()?;
        if channels != self.config.in_channels {
            return Err(shape_error(format!(
                "sample has {channels} channels, the UNet takes {}",
                self.config.in_channels
            )));
        }
        let context_dims = encoder_hidden_states.dims();
        if context_dims.len() != 3 || context_dims[0] != batch {
            return Err(shape_error(format!(
                "encoder_hidden_states must be [batch = {batch}, tokens, dim], got {context_dims:?}"
            )));
        }
        if let Some(spec) = self.encoder.plan.attention.first()
            && self.has_attention()
            && context_dims[2] != spec.cross_attention_dim
        {
            return Err(shape_error(format!(
                "encoder_hidden_states have width {}, the UNet's cross-attention takes {}",
                context_dims[2], spec.cross_attention_dim
            )));
        }
        let context = encoder_hidden_states.to_dtype(dtype)?;
        let sample = sample.to_dtype(dtype)?;

        let emb = self.encoder.time_embedding(timesteps, batch, added)?;
        let temb_act = self.encoder.resnet_temb(&emb)?;

        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample
        };
        let x = self.encoder.conv_in.forward(&sample)?;
        let (x, mut skips) = self.encoder.down(&x, &temb_act, &context)?;
        if let Some(control) = control {
            if control.down.len() != skips.len() {
                return Err(shape_error(format!(
                    "{} ControlNet down residuals given, the UNet has {} skip connections",
                    control.down.len(),
                    skips.len()
                )));
            }
            for (i, (skip, residual)) in skips.iter_mut().zip(&control.down).enumerate() {
                if residual.dims() != skip.dims() {
                    return Err(shape_error(format!(
                        "ControlNet down residual {i} is {:?}, the skip connection is {:?}",
                        residual.dims(),
                        skip.dims()
                    )));
                }
                *skip = (&*skip + residual.to_dtype(dtype)?)?;
            }
        }
        let mut x = self.encoder.mid(&x, &temb_act, &context)?;
        if let Some(control) = control {
            if control.mid.dims() != x.dims() {
                return Err(shape_error(format!(
                    "ControlNet mid residual is {:?}, the mid block output is {:?}",
                    control.mid.dims(),
                    x.dims()
                )));
            }
            x = (x + control.mid.to_dtype(dtype)?)?;
        }

        // Sizes that are not multiples of 2^(levels−1) upsample to the skip's size, as diffusers.
        let factor = 1usize << (self.up_blocks.len().saturating_sub(1));
        let forward_size = height % factor != 0 || width % factor != 0;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let take = block.skip_count();
            if take > skips.len() {
                return Err(shape_error(
                    "up blocks consume more skips than exist".into(),
                ));
            }
            let block_skips = skips.split_off(skips.len() - take);
            let is_final = i + 1 == self.up_blocks.len();
            let size = match skips.last() {
                Some(next) if forward_size && !is_final => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            x = block.forward(&x, &block_skips, &temb_act, &context, size)?;
        }
        let x = match self.encoder.plan.settings.act {
            Activation::Silu => self.conv_norm_out.forward_silu(&x)?,
            act => act.apply(&self.conv_norm_out.forward(&x)?)?,
        };
        Ok(self.conv_out.forward(&x)?)
    }
}

fn shape_error(message: String) -> Error {
    Error::Candle(candle_core::Error::Msg(format!("UNet input: {message}")))
}
