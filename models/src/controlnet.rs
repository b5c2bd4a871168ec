//! diffusers' `ControlNetModel`, built from the net's own `config.json`.
//!
//! A ControlNet is a copy of the UNet's encoder half (time embedding, `conv_in`, down blocks,
//! mid block: [`UNetEncoder`]) whose input is the noisy latent plus an embedding of the control
//! image (a small strided conv stack, `controlnet_cond_embedding`). Each skip connection and the
//! mid-block output go through a 1×1 "zero" convolution; the results are the residuals the UNet
//! adds to its own skips and mid-block output ([`ControlResiduals`]).
//!
//! The control image embedding does not depend on the latent, the timestep or the text, so a
//! stream computes it once per frame ([`ControlNetModel::embed_condition`]) and reuses it for every
//! UNet call and every batch row ([`ControlNetModel::forward_embedded`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Deserializer};

use super::cuda_graph::GraphCache;
use super::kernels::conv::Conv2d;
use super::kernels::gemm_bf16;
use super::limits::{Limits, MAX_CHANNELS, MAX_IO_CHANNELS, MAX_LEVELS};
use super::unet::{
    AddedConditioning, ControlResiduals, LevelPlan, PerLevel, UNetConfig, UNetEncoder,
};
use super::unet_blocks::{BlockSettings, Context, ResnetTime, TimeProjections};
use super::{no_unused_tensors, open_component};
use crate::{Error, Result};

const MODEL: &str = "ControlNet";

/// The fields of diffusers' `ControlNetModel` config: those it shares with the UNet's encoder
/// half, read into a [`UNetConfig`], and the ControlNet's own.
#[derive(Debug, Clone)]
pub struct Config {
    /// The encoder-shaping fields (block types and widths, attention, time embedding). Keys a
    /// ControlNet's constructor does not take are reset to diffusers' fixed values.
    pub unet: UNetConfig,
    /// Channels of the control image (3 for every released net; 6 exists for some).
    pub conditioning_channels: usize,
    /// Widths of the control-image embedding's conv stack; each step after the first halves the
    /// size, so the stack must downscale by the autoencoder's factor (4 entries: 8×).
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// `rgb`, or `bgr` (the control image's channels are reversed before use).
    pub controlnet_conditioning_channel_order: String,
    /// Average every residual over its spatial dimensions (the "shuffle" nets).
    pub global_pool_conditions: bool,
}

/// The ControlNet-only keys, with diffusers' constructor defaults.
#[derive(Debug, Deserialize)]
struct OwnKeys {
    #[serde(default = "three")]
    conditioning_channels: usize,
    #[serde(default = "default_embedding_channels")]
    conditioning_embedding_out_channels: Option<Vec<usize>>,
    #[serde(default = "rgb")]
    controlnet_conditioning_channel_order: String,
    #[serde(default)]
    global_pool_conditions: Option<bool>,
}

fn three() -> usize {
    3
}
fn default_embedding_channels() -> Option<Vec<usize>> {
    Some(vec![16, 32, 96, 256])
}
fn rgb() -> String {
    "rgb".into()
}

impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let value = serde_json::Value::deserialize(d)?;
        // Through serde_path_to_error so that a value of the wrong type is named by its key.
        let named = |e: serde_path_to_error::Error<serde_json::Error>| {
            D::Error::custom(super::describe_json_error(&e))
        };
        let mut unet: UNetConfig =
            serde_path_to_error::deserialize(value.clone()).map_err(named)?;
        let own: OwnKeys = serde_path_to_error::deserialize(value).map_err(named)?;
        // ControlNetModel's constructor fixes these (a 3×3 conv_in, a 4×ch0 positional time
        // embedding without extra activations, no input centring); config keys for them are
        // ignored by diffusers, so they are here too.
        unet.conv_in_kernel = 3;
        unet.time_embedding_dim = None;
        unet.time_embedding_act_fn = None;
        unet.timestep_post_act = None;
        unet.time_cond_proj_dim = None;
        unet.center_input_sample = false;
        unet.time_embedding_type = "positional".into();
        unet.attention_type = "default".into();
        unet.class_embeddings_concat = false;
        unet.reverse_transformer_layers_per_block = None;
        Ok(Config {
            unet,
            conditioning_channels: own.conditioning_channels,
            conditioning_embedding_out_channels: own
                .conditioning_embedding_out_channels
                .unwrap_or_default(),
            controlnet_conditioning_channel_order: own.controlnet_conditioning_channel_order,
            global_pool_conditions: own.global_pool_conditions.unwrap_or(false),
        })
    }
}

fn unsupported(option: &str, detail: impl Into<String>) -> Error {
    Error::UnsupportedConfig {
        model: MODEL.into(),
        option: option.into(),
        detail: detail.into(),
    }
}

impl Config {
    /// Checks the ControlNet-only options and limits, then the encoder's (as the UNet's).
    pub fn validate(&self) -> Result<()> {
        let limits = Limits::new(MODEL);
        limits.value(
            "conditioning_channels",
            self.conditioning_channels,
            MAX_IO_CHANNELS,
        )?;
        limits.count(
            "conditioning_embedding_out_channels",
            self.conditioning_embedding_out_channels.len(),
            MAX_LEVELS,
        )?;
        limits.values(
            "conditioning_embedding_out_channels",
            &self.conditioning_embedding_out_channels,
            MAX_CHANNELS,
        )?;
        if self.conditioning_channels == 0 {
            return Err(unsupported("conditioning_channels", "0 channels"));
        }
        if self.conditioning_embedding_out_channels.is_empty() {
            return Err(unsupported(
                "conditioning_embedding_out_channels",
                "is empty or null; the control-image embedding needs at least one width",
            ));
        }
        if self.conditioning_embedding_out_channels.contains(&0) {
            return Err(unsupported(
                "conditioning_embedding_out_channels",
                format!(
                    "{:?} holds a zero width",
                    self.conditioning_embedding_out_channels
                ),
            ));
        }
        match self.controlnet_conditioning_channel_order.as_str() {
            "rgb" | "bgr" => {}
            other => {
                return Err(unsupported(
                    "controlnet_conditioning_channel_order",
                    format!("{other:?} is not supported (rgb, bgr)"),
                ));
            }
        }
        if self.unet.mid_block_type.is_none() {
            return Err(unsupported(
                "mid_block_type",
                "null: a ControlNet always has a mid block (UNetMidBlock2DCrossAttn or UNetMidBlock2D)",
            ));
        }
        self.unet.plan(MODEL).map(|_| ())
    }

    /// Checks, from the configs alone (before any weight is read), that a net with this config
    /// fits a UNet with config `base` and was made for the same base model family: added
    /// conditioning (SDXL), text width, latent channels, block widths and the channels of
    /// every down residual. A mismatch is an error naming both values; `name` identifies the
    /// net in it.
    pub fn check_compatible(&self, base: &UNetConfig, name: &str) -> Result<()> {
        let net = &self.unet;
        let mismatch = |what: &str, ours: String, theirs: String| {
            Err(Error::State(format!(
                "ControlNet {name} does not fit the loaded model: its {what} is {ours}, the \
                 model's UNet has {theirs} ({} net, {} model)",
                family_label(net),
                family_label(base)
            )))
        };
        let sdxl = |c: &UNetConfig| c.addition_embed_type.as_deref() == Some("text_time");
        if sdxl(net) != sdxl(base) {
            let show = |c: &UNetConfig| match &c.addition_embed_type {
                Some(kind) => format!("{kind:?}"),
                None => "null".to_string(),
            };
            return mismatch("addition_embed_type", show(net), show(base));
        }
        let net_plan = net.plan(MODEL)?;
        let base_plan = base.plan("UNet")?;
        let widths = |p: &LevelPlan| -> Vec<usize> {
            p.attention.iter().map(|a| a.cross_attention_dim).collect()
        };
        let (cross_net, cross_base) = (widths(&net_plan), widths(&base_plan));
        if cross_net != cross_base {
            let show = |v: &[usize]| match v.first() {
                Some(d) if v.iter().all(|x| x == d) => d.to_string(),
                _ => format!("{v:?}"),
            };
            return mismatch("cross_attention_dim", show(&cross_net), show(&cross_base));
        }
        if net.in_channels != base.in_channels {
            return mismatch(
                "in_channels",
                net.in_channels.to_string(),
                base.in_channels.to_string(),
            );
        }
        if net.block_out_channels != base.block_out_channels {
            return mismatch(
                "block_out_channels",
                format!("{:?}", net.block_out_channels),
                format!("{:?}", base.block_out_channels),
            );
        }
        let (ours, theirs) = (skip_channels(&net_plan), skip_channels(&base_plan));
        if ours != theirs {
            return mismatch(
                "down residual channels (layers_per_block)",
                format!("{ours:?}"),
                format!("{theirs:?}"),
            );
        }
        Ok(())
    }

    /// How much the control-image embedding shrinks the image: 2^(widths − 1).
    pub fn condition_downscale(&self) -> usize {
        1 << self
            .conditioning_embedding_out_channels
            .len()
            .saturating_sub(1)
    }

    /// A short name of the base-model family the net was made for: SDXL by its added
    /// conditioning, SD1.x / SD2.x by the text width (768 / 1024), else the width itself.
    pub fn family_label(&self) -> String {
        family_label(&self.unet)
    }
}

/// See [`Config::family_label`]; the same rule for a UNet config.
fn family_label(config: &UNetConfig) -> String {
    if config.addition_embed_type.as_deref() == Some("text_time") {
        return "SDXL".into();
    }
    match first_level(&config.cross_attention_dim) {
        768 => "SD1.x (text width 768)".into(),
        1024 => "SD2.x (text width 1024)".into(),
        d => format!("text width {d}"),
    }
}

/// Channels of every skip connection of an encoder with this plan (conv_in's first, then one
/// per resnet and one per downsampler), as the ControlNet's down residuals.
fn skip_channels(plan: &LevelPlan) -> Vec<usize> {
    let n = plan.block_out_channels.len();
    let mut channels = vec![plan.block_out_channels[0]];
    for (i, &ch) in plan.block_out_channels.iter().enumerate() {
        let per_level = plan.layers[i] + usize::from(i + 1 != n);
        channels.extend(std::iter::repeat_n(ch, per_level));
    }
    channels
}

fn first_level(v: &PerLevel<usize>) -> usize {
    match v {
        PerLevel::One(d) => *d,
        PerLevel::Each(ds) => ds.first().copied().unwrap_or(0),
    }
}

/// diffusers' `ControlNetConditioningEmbedding`: conv → SiLU, then per width step a conv and a
/// strided conv (each → SiLU), then a conv to the UNet's first width.
#[derive(Debug, Clone)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
    /// The layout its maps take between its layers (the UNet blocks').
    settings: BlockSettings,
}

impl ConditioningEmbedding {
    fn new(
        conditioning_channels: usize,
        widths: &[usize],
        out_channels: usize,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv = |c_in, c_out, stride, vb| s.conv2d(c_in, c_out, 3, stride, 1, vb);
        let conv_in = conv(conditioning_channels, widths[0], 1, vb.pp("conv_in"))?;
        let mut blocks = Vec::with_capacity(2 * widths.len().saturating_sub(1));
        for (i, pair) in widths.windows(2).enumerate() {
            let (c_in, c_out) = (pair[0], pair[1]);
            let vb_blocks = vb.pp("blocks");
            blocks.push(conv(c_in, c_in, 1, vb_blocks.pp((2 * i).to_string()))?);
            blocks.push(conv(c_in, c_out, 2, vb_blocks.pp((2 * i + 1).to_string()))?);
        }
        let last = widths[widths.len() - 1];
        let conv_out = conv(last, out_channels, 1, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
            settings: *s,
        })
    }

    /// `[B, C, H, W]` in and out, whatever the layout between its layers.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let s = &self.settings;
        let mut x = self.conv_in.forward(&s.enter(x)?)?.silu()?;
        for block in &self.blocks {
            x = block.forward(&x)?.silu()?;
        }
        s.leave(&self.conv_out.forward(&x)?)
    }
}

/// diffusers' `ControlNetModel`: SD 1.x/2.x layouts, and SDXL's (`addition_embed_type:
/// "text_time"`), which take the same added conditioning as the UNet they steer.
#[derive(Debug, Clone)]
pub struct ControlNetModel {
    config: Config,
    encoder: UNetEncoder,
    cond_embedding: ConditioningEmbedding,
    /// `controlnet_down_blocks`: one 1×1 conv per skip connection.
    down_zero_convs: Vec<Conv2d>,
    /// `controlnet_mid_block`.
    mid_zero_conv: Conv2d,
    /// Whether the CPU's GEMMs run in bf16 ([`with_bf16_gemms`](Self::with_bf16_gemms)).
    bf16_gemms: bool,
    /// The forward pass's CUDA graphs (none elsewhere); a clone starts without any.
    graphs: GraphCache,
    /// The residuals' shapes for each sample shape, as the eager pass made them: a replayed
    /// graph returns the residuals packed in one tensor, cut apart by these.
    residual_shapes: ResidualShapes,
    /// Every resnet's time projection in one product, where the kernel policy fused them when
    /// the network was built (`fused_time_projections`, as the UNet's).
    time_projections: Option<TimeProjections>,
}

/// Residual shapes by sample shape (see [`ControlNetModel::forward_embedded`]).
#[derive(Debug, Default)]
struct ResidualShapes(Mutex<HashMap<Vec<usize>, Vec<Vec<usize>>>>);

impl Clone for ResidualShapes {
    fn clone(&self) -> Self {
        Self(Mutex::new(self.lock().clone()))
    }
}

impl ResidualShapes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<usize>, Vec<Vec<usize>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ControlNetModel {
    /// Builds the network from its config and weights (diffusers' names).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let mut encoder = UNetEncoder::new(&config.unet, MODEL, vb.clone())?;
        let time_projections = TimeProjections::fuse_if_asked(encoder.resnets_mut())?;
        let s = encoder.plan.settings;
        let ch0 = encoder.plan.block_out_channels[0];
        let cond_embedding = ConditioningEmbedding::new(
            config.conditioning_channels,
            &config.conditioning_embedding_out_channels,
            ch0,
            &s,
            vb.pp("controlnet_cond_embedding"),
        )?;
        let zero_conv = |ch, vb| s.conv2d(ch, ch, 1, 1, 0, vb);
        let down_zero_convs = encoder
            .skip_channels()
            .into_iter()
            .enumerate()
            .map(|(i, ch)| zero_conv(ch, vb.pp("controlnet_down_blocks").pp(i.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let mid_ch = encoder.plan.block_out_channels[encoder.plan.block_out_channels.len() - 1];
        let mid_zero_conv = zero_conv(mid_ch, vb.pp("controlnet_mid_block"))?;
        Ok(Self {
            config: config.clone(),
            encoder,
            cond_embedding,
            down_zero_convs,
            mid_zero_conv,
            bf16_gemms: false,
            graphs: GraphCache::default(),
            residual_shapes: ResidualShapes::default(),
            time_projections,
        })
    }

    /// The same net with its CPU GEMMs in bf16 (`on`) or f32, as the UNet it steers
    /// ([`super::unet::UNet2DConditionModel::with_bf16_gemms`]). Other devices ignore it.
    pub fn with_bf16_gemms(mut self, on: bool) -> Self {
        self.bf16_gemms = on;
        self
    }

    /// Whether the CPU GEMMs run in bf16 ([`with_bf16_gemms`](Self::with_bf16_gemms)).
    pub fn bf16_gemms(&self) -> bool {
        self.bf16_gemms
    }

    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model[.fp16].safetensors` (the fp16
    /// file is preferred when `dtype` is f16 or bf16). Errors name the file at fault.
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

    /// [`load`](Self::load) with an extra check of the config (such as
    /// [`Config::check_compatible`]) before any weight is read.
    pub fn load_for(
        dir: &Path,
        dtype: DType,
        device: &Device,
        check: impl FnOnce(&Config) -> Result<()>,
    ) -> Result<Self> {
        open_component(
            dir,
            "diffusion_pytorch_model",
            dtype,
            device,
            no_unused_tensors,
            |config: &Config| {
                config.validate()?;
                check(config)
            },
            Self::new,
        )
    }

    /// The config the network was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the network projects the time embedding for all its resnets in one product
    /// (the kernel policy's `fused_time_projections` when it was built).
    pub fn fuses_time_projections(&self) -> bool {
        self.time_projections.is_some()
    }

    /// The dtype of the weights, in which the network computes.
    pub fn dtype(&self) -> DType {
        self.encoder.dtype()
    }

    /// Whether the network keeps its maps channels-last between its layers (as
    /// [`UNet2DConditionModel::maps_channels_last`](super::unet::UNet2DConditionModel::maps_channels_last)).
    pub fn maps_channels_last(&self) -> bool {
        self.encoder.plan.settings.channels_last
    }

    /// Number of down residuals the net produces (12 for SD 1.x/2.x).
    pub fn down_residual_count(&self) -> usize {
        self.down_zero_convs.len()
    }

    /// Embeds a control image `[B, C, H, W]` (B = 1 to share it across every row, as a stream
    /// does) in [0, 1] into the UNet's first width at latent size, `[B, ch0, H/f, W/f]`.
    pub fn embed_condition(&self, controlnet_cond: &Tensor) -> Result<Tensor> {
        let _bf16 = gemm_bf16::scope(self.bf16_gemms);
        let (_, channels, _, _) = controlnet_cond.dims4()?;
        if channels != self.config.conditioning_channels {
            return Err(input_error(format!(
                "control image has {channels} channels, the net takes {}",
                self.config.conditioning_channels
            )));
        }
        let cond = controlnet_cond.to_dtype(self.dtype())?;
        let cond = if self.config.controlnet_conditioning_channel_order == "bgr" {
            let reversed: Vec<u32> = (0..channels as u32).rev().collect();
            let index = Tensor::new(reversed.as_slice(), cond.device())?;
            cond.index_select(&index, 1)?
        } else {
            cond
        };
        Ok(self.cond_embedding.forward(&cond)?)
    }

    /// The residuals for `sample` `[B, C, h, w]` at `timesteps` (`[B]`, or one for all rows)
    /// with text embeddings `[B, 77, D]` and a control image `[B or 1, C, H, W]` in [0, 1]
    /// (H = h·f, W = w·f with f = [`Config::condition_downscale`]). Unscaled: multiply by the
    /// conditioning scale before adding them to the UNet. An SDXL net also needs `added`, the
    /// added conditioning its UNet gets (`[B, P]` pooled text, `[B, 6]` time ids); others take
    /// `None`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning>,
        controlnet_cond: &Tensor,
    ) -> Result<ControlResiduals> {
        let embedded = self.embed_condition(controlnet_cond)?;
        self.forward_embedded(sample, timesteps, encoder_hidden_states, added, &embedded)
    }

    /// [`forward`](Self::forward) with the control image already embedded by
    /// [`embed_condition`](Self::embed_condition) (`[B or 1, ch0, h, w]`).
    pub fn forward_embedded(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning>,
        cond_embedding: &Tensor,
    ) -> Result<ControlResiduals> {
        let _bf16 = gemm_bf16::scope(self.bf16_gemms);
        let (batch, channels, height, width) = sample.dims4()?;
        if channels != self.config.unet.in_channels {
            return Err(input_error(format!(
                "sample has {channels} channels, the net takes {}",
                self.config.unet.in_channels
            )));
        }
        let context_dims = encoder_hidden_states.dims();
        if context_dims.len() != 3 || context_dims[0] != batch {
            return Err(input_error(format!(
                "encoder_hidden_states must be [batch = {batch}, tokens, dim], got {context_dims:?}"
            )));
        }
        let (cb, _, ch, cw) = cond_embedding.dims4()?;
        if (cb != 1 && cb != batch) || (ch, cw) != (height, width) {
            let f = self.config.condition_downscale();
            return Err(input_error(format!(
                "the control image embeds to {:?}, the latent is {:?} (the control image must be \
                 {f}× the latent size, with 1 or {batch} rows)",
                cond_embedding.dims(),
                sample.dims()
            )));
        }
        // On a CUDA device the pass below is captured as a CUDA graph at its first call for each
        // input signature and replayed after (super::cuda_graph), every argument an input of
        // the graph. A graph has one output: the residuals travel packed, flattened one after
        // another, and are cut apart by the shapes the eager pass recorded.
        if !self.graphs.captures(sample.device()) {
            return self.residuals(
                sample,
                timesteps,
                encoder_hidden_states,
                added,
                cond_embedding,
            );
        }
        let mut inputs = vec![sample, timesteps, encoder_hidden_states, cond_embedding];
        if let Some(added) = added {
            inputs.extend([&added.text_embeds, &added.time_ids]);
        }
        let has_added = added.is_some();
        let packed = self.graphs.run(&inputs, |xs| {
            let added = has_added.then(|| AddedConditioning {
                text_embeds: xs[4].clone(),
                time_ids: xs[5].clone(),
            });
            let residuals = self.residuals(xs[0], xs[1], xs[2], added.as_ref(), xs[3])?;
            let all: Vec<&Tensor> = residuals.down.iter().chain([&residuals.mid]).collect();
            self.residual_shapes.lock().insert(
                sample.dims().to_vec(),
                all.iter().map(|t| t.dims().to_vec()).collect(),
            );
            let flat = all
                .iter()
                .map(|t| t.flatten_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&flat, 0)?)
        })?;
        let shapes = self
            .residual_shapes
            .lock()
            .get(sample.dims())
            .cloned()
            .ok_or_else(|| input_error("no residual shapes recorded for this sample".into()))?;
        let mut start = 0;
        let mut parts = Vec::with_capacity(shapes.len());
        for shape in shapes {
            let len = shape.iter().product::<usize>();
            parts.push(packed.narrow(0, start, len)?.reshape(shape)?);
            start += len;
        }
        let mid = parts.pop().expect("the mid residual was packed last");
        Ok(ControlResiduals { down: parts, mid })
    }

    /// The pass of [`forward_embedded`](Self::forward_embedded) on checked inputs, op by op.
    fn residuals(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning>,
        cond_embedding: &Tensor,
    ) -> Result<ControlResiduals> {
        let dtype = self.dtype();
        let batch = sample.dim(0)?;
        let s = self.encoder.plan.settings;
        let context = encoder_hidden_states.to_dtype(dtype)?;
        let emb = self.encoder.time_embedding(timesteps, batch, added)?;
        let temb_act = self.encoder.resnet_temb(&emb)?;
        let projected = TimeProjections::project(self.time_projections.as_ref(), &temb_act)?;
        let time = ResnetTime::new(&temb_act, projected.as_ref());
        let x = self
            .encoder
            .conv_in
            .forward(&s.enter(&sample.to_dtype(dtype)?)?)?
            .broadcast_add(&s.enter(&cond_embedding.to_dtype(dtype)?)?)?;
        let (x, skips) = self.encoder.down(&x, time, Context::text(&context))?;
        let x = self.encoder.mid(&x, time, Context::text(&context))?;
        // Each residual leaves the blocks' layout: [B, C, h, w], as the UNet takes them.
        let pool = |r: Tensor| -> Result<Tensor> {
            let r = s.leave(&r)?;
            if self.config.global_pool_conditions {
                // diffusers averages and lets the UNet broadcast; broadcast here instead.
                let dims = r.dims().to_vec();
                Ok(r.mean_keepdim(3)?
                    .mean_keepdim(2)?
                    .broadcast_as(dims)?
                    .contiguous()?)
            } else {
                Ok(r)
            }
        };
        let down = skips
            .iter()
            .zip(&self.down_zero_convs)
            .map(|(skip, conv)| pool(conv.forward(skip)?))
            .collect::<Result<Vec<_>>>()?;
        let mid = pool(self.mid_zero_conv.forward(&x)?)?;
        Ok(ControlResiduals { down, mid })
    }
}

fn input_error(message: String) -> Error {
    Error::Candle(candle_core::Error::Msg(format!(
        "ControlNet input: {message}"
    )))
}
