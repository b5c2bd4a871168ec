//! The UNet's `config.json` as diffusers writes it, and the per-level plan the graph is built
//! from (shared by the UNet and the ControlNet, which reuses the UNet's encoder half).

use serde::{Deserialize, Deserializer};

use super::limits::{
    Limits, MAX_CHANNELS, MAX_GROUPS, MAX_HEADS, MAX_IO_CHANNELS, MAX_KERNEL, MAX_LAYERS_PER_BLOCK,
    MAX_LEVELS, MAX_PADDING, MAX_TRANSFORMER_LAYERS, MAX_WIDTH,
};
use super::unet_blocks::{AttentionSpec, BlockSettings, activation};
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

impl PerLevel<usize> {
    /// Checks the value, or every per-level value, against `max`.
    fn check_limit(&self, limits: &Limits, key: &str, max: usize) -> Result<()> {
        match self {
            Self::One(v) => limits.value(key, *v, max),
            Self::Each(vs) => limits.values(key, vs, max),
        }
    }
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

pub(super) fn unsupported(model: &str, option: &str, detail: impl Into<String>) -> Error {
    Error::UnsupportedConfig {
        model: model.into(),
        option: option.into(),
        detail: detail.into(),
    }
}

pub(super) const CROSS_ATTN_DOWN: &str = "CrossAttnDownBlock2D";
pub(super) const PLAIN_DOWN: &str = "DownBlock2D";
pub(super) const CROSS_ATTN_UP: &str = "CrossAttnUpBlock2D";
pub(super) const PLAIN_UP: &str = "UpBlock2D";
pub(super) const MID_CROSS_ATTN: &str = "UNetMidBlock2DCrossAttn";
pub(super) const MID_PLAIN: &str = "UNetMidBlock2D";

/// The config resolved to one entry per level (outermost first), checked for what is supported.
#[derive(Debug, Clone)]
pub struct LevelPlan {
    /// Width of each level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per level.
    pub layers: Vec<usize>,
    /// Attention of each down level (None for `DownBlock2D`).
    pub down_attention: Vec<Option<AttentionSpec>>,
    /// The per-level attention parameters regardless of block type (the up path and the mid
    /// block index them too).
    pub attention: Vec<AttentionSpec>,
    /// Settings every block shares (norms, activation, upcasting).
    pub settings: BlockSettings,
    /// Width of the time embedding.
    pub time_embed_dim: usize,
}

impl UNetConfig {
    /// Checks every value that sizes the network against [`super::limits`] (run by
    /// [`plan`](Self::plan), so before anything is built from the config).
    fn check_limits(&self, model: &'static str) -> Result<()> {
        let l = Limits::new(model);
        l.count(
            "block_out_channels",
            self.block_out_channels.len(),
            MAX_LEVELS,
        )?;
        l.count("down_block_types", self.down_block_types.len(), MAX_LEVELS)?;
        l.count("up_block_types", self.up_block_types.len(), MAX_LEVELS)?;
        l.values("block_out_channels", &self.block_out_channels, MAX_CHANNELS)?;
        self.layers_per_block
            .check_limit(&l, "layers_per_block", MAX_LAYERS_PER_BLOCK)?;
        match &self.transformer_layers_per_block {
            TransformerLayers::One(v) => {
                l.value("transformer_layers_per_block", *v, MAX_TRANSFORMER_LAYERS)?
            }
            TransformerLayers::Each(vs) => {
                l.values("transformer_layers_per_block", vs, MAX_TRANSFORMER_LAYERS)?
            }
            TransformerLayers::PerResnet(vss) => {
                for vs in vss {
                    l.values("transformer_layers_per_block", vs, MAX_TRANSFORMER_LAYERS)?;
                }
            }
        }
        self.attention_head_dim
            .check_limit(&l, "attention_head_dim", MAX_HEADS)?;
        if let Some(heads) = &self.num_attention_heads {
            heads.check_limit(&l, "num_attention_heads", MAX_HEADS)?;
        }
        self.cross_attention_dim
            .check_limit(&l, "cross_attention_dim", MAX_WIDTH)?;
        l.value("in_channels", self.in_channels, MAX_IO_CHANNELS)?;
        l.value("out_channels", self.out_channels, MAX_IO_CHANNELS)?;
        l.value("conv_in_kernel", self.conv_in_kernel, MAX_KERNEL)?;
        l.value("conv_out_kernel", self.conv_out_kernel, MAX_KERNEL)?;
        l.value("downsample_padding", self.downsample_padding, MAX_PADDING)?;
        if let Some(groups) = self.norm_num_groups {
            l.value("norm_num_groups", groups, MAX_GROUPS)?;
        }
        for (key, value) in [
            ("time_embedding_dim", self.time_embedding_dim),
            ("addition_time_embed_dim", self.addition_time_embed_dim),
            (
                "projection_class_embeddings_input_dim",
                self.projection_class_embeddings_input_dim,
            ),
            ("time_cond_proj_dim", self.time_cond_proj_dim),
        ] {
            if let Some(v) = value {
                l.value(key, v, MAX_WIDTH)?;
            }
        }
        l.finite("norm_eps", self.norm_eps, false)?;
        l.finite("freq_shift", self.freq_shift, false)?;
        // The mid block's resnets divide by it.
        l.finite("mid_block_scale_factor", self.mid_block_scale_factor, true)?;
        Ok(())
    }

    /// Checks the options shared by the UNet and the ControlNet (limits, time embedding, down
    /// path, mid block) and resolves the per-level lists. `model` names the network in errors.
    pub fn plan(&self, model: &'static str) -> Result<LevelPlan> {
        self.check_limits(model)?;
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
        let act = activation(&self.act_fn, model, "act_fn")?;
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
            activation(a, model, "time_embedding_act_fn")?;
        }
        if let Some(a) = &self.timestep_post_act {
            activation(a, model, "timestep_post_act")?;
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
                // The kernel policy's, set by the network that loads (see UNetEncoder::new).
                channels_last: false,
            },
            time_embed_dim: self
                .time_embedding_dim
                .unwrap_or(4 * self.block_out_channels[0]),
        })
    }
}
