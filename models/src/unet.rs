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
//! which `SDSTREAM_PORTABLE_KERNELS=1` also selects on the CPU (core/tests/integration/kernel_variants.rs checks
//! that path).
//! On the CPU candle has no bf16 arithmetic: there `dtype: "bf16"` loads the weights in f32 and
//! turns on [`UNet2DConditionModel::with_bf16_gemms`] (f32 maps, GEMMs on bf16 operands,
//! kernels::gemm_bf16).

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::attention_bank::{AttentionBank, BankCall};
use super::cuda_graph::GraphCache;
use super::ip_adapter::IpAdapterLayers;
use super::kernels::conv::Conv2d;
use super::kernels::gemm_bf16;
use super::kernels::norm::GroupNorm;
use super::lora::LoraDeltas;
use super::open_component_with_lora;
use super::unet_blocks::{
    Activation, Context, DownBlock, ImageContext, LevelShape, MidBlock, ResnetBlock2D, ResnetTime,
    SinusoidalTimesteps, TimeProjections, TimestepEmbedding, UpBlock, activation,
};
use super::weight_table::{WeightTable, rebuild_with_lora};
use crate::{Error, Result};

pub use super::unet_config::LevelPlan;
use super::unet_config::{CROSS_ATTN_UP, MID_CROSS_ATTN, PLAIN_UP, unsupported};
pub use super::unet_config::{PerLevel, TransformerLayers, UNetConfig};

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
pub struct UNetEncoder {
    time_proj: SinusoidalTimesteps,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TextTimeEmbedding>,
    time_embed_act: Option<Activation>,
    resnet_act: Activation,
    /// The input convolution (latents to the first level's width).
    pub conv_in: Conv2d,
    /// The down path's levels, outermost first.
    pub down_blocks: Vec<DownBlock>,
    /// The middle block (`None` for `mid_block_type: null`).
    pub mid_block: Option<MidBlock>,
    /// The config resolved level by level.
    pub plan: LevelPlan,
    dtype: DType,
    model: &'static str,
}

impl UNetEncoder {
    /// Builds the shared part from a checked config; `model` names the network in errors.
    pub fn new(cfg: &UNetConfig, model: &'static str, vb: VarBuilder) -> Result<Self> {
        let mut plan = cfg.plan(model)?;
        // The layout is chosen when the network loads: its convolutions lay their weights out
        // for it (docs/GPU.md, "Channels last"; by default channels-last on CUDA devices only).
        plan.settings.channels_last =
            crate::kernels::KernelPolicy::current().channels_last_on(vb.device());
        let s = plan.settings;
        let ch0 = plan.block_out_channels[0];
        let temb = plan.time_embed_dim;
        let post_act = cfg
            .timestep_post_act
            .as_deref()
            .map(|a| activation(a, model, "timestep_post_act"))
            .transpose()?;
        let time_embed_act = cfg
            .time_embedding_act_fn
            .as_deref()
            .map(|a| activation(a, model, "time_embedding_act_fn"))
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
            conv_in: s.conv2d(
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
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The time embedding `emb` of diffusers' forward (after the optional added conditioning
    /// and `time_embedding_act_fn`), `[batch, time_embed_dim]` in the model dtype.
    ///
    /// `timesteps` holds one value per row (`[batch]`), or a single value for every row.
    pub fn time_embedding(
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
                    "\"text_time\" needs added conditioning (text_embeds, time_ids); set UNetInputs::added",
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
    pub fn resnet_temb(&self, emb: &Tensor) -> Result<Tensor> {
        Ok(self.resnet_act.apply(emb)?)
    }

    /// The resnets of the down blocks, then the mid block's, in the order a call runs them
    /// (the first of a network's [`TimeProjections`]).
    pub fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock2D> {
        self.down_blocks
            .iter_mut()
            .flat_map(|b| b.resnets_mut().iter_mut())
            .chain(
                self.mid_block
                    .iter_mut()
                    .flat_map(|b| b.resnets_mut().iter_mut()),
            )
    }

    /// Runs the down blocks; returns the output and every skip connection, `x` (the conv_in
    /// output) first.
    pub fn down(
        &self,
        x: &Tensor,
        time: ResnetTime<'_>,
        context: Context<'_, '_>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut skips = Vec::with_capacity(self.skip_count());
        skips.push(x.clone());
        let mut x = x.clone();
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&x, time, context)?;
            skips.extend(block_skips);
            x = out;
        }
        Ok((x, skips))
    }

    /// The mid block, or the identity when the config has none.
    pub fn mid(
        &self,
        x: &Tensor,
        time: ResnetTime<'_>,
        context: Context<'_, '_>,
    ) -> Result<Tensor> {
        match &self.mid_block {
            Some(mid) => Ok(mid.forward(x, time, context)?),
            None => Ok(x.clone()),
        }
    }

    /// Channels of every skip connection in order (conv_in's first): the widths of a
    /// ControlNet's zero convolutions and of its down residuals.
    pub fn skip_channels(&self) -> Vec<usize> {
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
    pub fn skip_count(&self) -> usize {
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
    /// The query width of every cross-attention layer, in diffusers' `attn_processors` order.
    cross_attention_widths: Vec<usize>,
    /// How many times a cross-attention layer projected a context to keys and values (each
    /// layer keeps the last context's, see unet_blocks::KvMemo).
    kv_projections: Arc<AtomicUsize>,
    /// The forward pass's CUDA graphs (none elsewhere); a clone starts without any.
    graphs: GraphCache,
    /// Whether the CPU's GEMMs run in bf16 during the forward pass (`dtype: "bf16"` on the
    /// CPU, see [`super::kernels::gemm_bf16`]).
    bf16_gemms: bool,
    /// Every resnet's time projection in one product, where the kernel policy fused them when
    /// the network was built (`fused_time_projections`).
    time_projections: Option<TimeProjections>,
}

/// IP-Adapter's inputs to one UNet call ([`crate::ip_adapter`]).
#[derive(Debug, Clone, Copy)]
pub struct ImagePrompt<'a> {
    /// The adapter's per-layer key and value projections.
    pub adapter: &'a IpAdapterLayers,
    /// How many tokens at the end of `encoder_hidden_states` are image tokens.
    pub tokens: usize,
    /// The scale of every cross-attention layer's image attention (diffusers' order).
    pub scales: &'a [f64],
}

/// The inputs of one [`UNet2DConditionModel::forward`] call: the three every call takes, given
/// to [`new`](Self::new), and the optional ones, set by the methods named after them (each
/// takes an `Option`, so a caller passes what it has without branching).
#[derive(Debug)]
pub struct UNetInputs<'a> {
    /// The noisy latents `[B, C, h, w]`.
    pub sample: &'a Tensor,
    /// The timesteps `[B]` (one per row, any dtype; a single value applies to every row).
    pub timesteps: &'a Tensor,
    /// The text embeddings `[B, tokens, D]`, with the image tokens appended when
    /// [`image`](Self::image) is set.
    pub encoder_hidden_states: &'a Tensor,
    /// SDXL's added conditioning, which a config with `addition_embed_type: "text_time"`
    /// requires.
    pub added: Option<&'a AddedConditioning>,
    /// ControlNet residuals, added to the skips and the mid block.
    pub control: Option<&'a ControlResiduals>,
    /// Cached attention: every self-attention layer also attends to the bank's keys and
    /// values, and the bank takes this call's ([`AttentionBank`]).
    pub bank: Option<&'a mut AttentionBank>,
    /// IP-Adapter: the last `image.tokens` tokens of `encoder_hidden_states` are each row's
    /// image tokens (Daydream's layout: appended to the text), and every cross-attention
    /// layer also attends to them ([`crate::ip_adapter`]).
    pub image: Option<ImagePrompt<'a>>,
}

impl<'a> UNetInputs<'a> {
    /// A call with only the required inputs.
    pub fn new(
        sample: &'a Tensor,
        timesteps: &'a Tensor,
        encoder_hidden_states: &'a Tensor,
    ) -> Self {
        Self {
            sample,
            timesteps,
            encoder_hidden_states,
            added: None,
            control: None,
            bank: None,
            image: None,
        }
    }

    /// Sets (or clears) SDXL's added conditioning.
    pub fn added(mut self, added: Option<&'a AddedConditioning>) -> Self {
        self.added = added;
        self
    }

    /// Sets (or clears) the ControlNet residuals.
    pub fn control(mut self, control: Option<&'a ControlResiduals>) -> Self {
        self.control = control;
        self
    }

    /// Sets (or clears) cached attention's bank.
    pub fn bank(mut self, bank: Option<&'a mut AttentionBank>) -> Self {
        self.bank = bank;
        self
    }

    /// Sets (or clears) IP-Adapter's image prompt.
    pub fn image(mut self, image: Option<ImagePrompt<'a>>) -> Self {
        self.image = image;
        self
    }
}

impl UNet2DConditionModel {
    /// Builds the network from its config and weights (diffusers' names). An option the config
    /// sets that is not implemented is an [`Error::UnsupportedConfig`] naming it.
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        const MODEL: &str = "UNet";
        let mut encoder = UNetEncoder::new(config, MODEL, vb.clone())?;
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
        // Number the cross-attention layers as diffusers lists its attention processors
        // (module order: down blocks, up blocks, then the mid block).
        let mut cross_attention_widths = Vec::new();
        let kv_projections = Arc::new(AtomicUsize::new(0));
        {
            let transformers = encoder
                .down_blocks
                .iter_mut()
                .flat_map(|b| b.transformers_mut().iter_mut())
                .chain(
                    up_blocks
                        .iter_mut()
                        .flat_map(|b| b.transformers_mut().iter_mut()),
                )
                .chain(
                    encoder
                        .mid_block
                        .iter_mut()
                        .flat_map(|b| b.transformers_mut().iter_mut()),
                );
            for transformer in transformers {
                for block in transformer.blocks_mut() {
                    block.share_projection_counter(&kv_projections);
                    block.cross_attention_slot = cross_attention_widths.len();
                    cross_attention_widths.push(block.width);
                }
            }
        }
        // Down, mid, then up: the order a call runs its resnets in.
        let time_projections = TimeProjections::fuse_if_asked(
            encoder.resnets_mut().chain(
                up_blocks
                    .iter_mut()
                    .flat_map(|b| b.resnets_mut().iter_mut()),
            ),
        )?;
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
            conv_norm_out: s.norm(GroupNorm::new(
                s.groups,
                ch0,
                s.eps,
                vb.pp("conv_norm_out"),
            )?),
            conv_out: s.conv2d(
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
            cross_attention_widths,
            kv_projections,
            graphs: GraphCache::default(),
            bf16_gemms: false,
            time_projections,
        })
    }

    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model[.fp16].safetensors` (the fp16
    /// file is preferred when `dtype` is f16 or bf16). Errors name the file at fault.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_lora(dir, dtype, device, None).map(|(model, _)| model)
    }

    /// [`load`](Self::load) with LoRA deltas fused into the weights they patch; also returns
    /// the tensors it was built from, for [`rebuild_with_lora`](Self::rebuild_with_lora).
    pub fn load_with_lora(
        dir: &Path,
        dtype: DType,
        device: &Device,
        lora: Option<Arc<LoraDeltas>>,
    ) -> Result<(Self, WeightTable)> {
        open_component_with_lora(
            dir,
            "diffusion_pytorch_model",
            dtype,
            device,
            unused_lcm_guidance_embedding,
            lora,
            |config: &UNetConfig| config.plan("UNet").map(|_| ()),
            Self::new,
        )
    }

    /// The same network with the LoRA deltas `new` fused instead of `old`, built from `table`
    /// (what [`load_with_lora`](Self::load_with_lora) returned with it) without reading its
    /// files: tensors neither set patches are shared with this network.
    pub fn rebuild_with_lora(
        &self,
        table: &WeightTable,
        old: Option<Arc<LoraDeltas>>,
        new: Option<Arc<LoraDeltas>>,
        device: &Device,
    ) -> Result<(Self, WeightTable)> {
        let (model, table) = rebuild_with_lora(
            &self.config,
            table,
            self.dtype(),
            device,
            old,
            new,
            Self::new,
        )?;
        Ok((model.with_bf16_gemms(self.bf16_gemms), table))
    }

    /// The same network with its CPU GEMMs in bf16 (`on`) or f32: bf16 operands, f32 sums,
    /// f32 maps in between ([`super::kernels::gemm_bf16`]); `dtype: "bf16"` on the CPU. Other
    /// devices ignore it.
    pub fn with_bf16_gemms(mut self, on: bool) -> Self {
        self.bf16_gemms = on;
        self
    }

    /// Whether the CPU GEMMs run in bf16 ([`with_bf16_gemms`](Self::with_bf16_gemms)).
    pub fn bf16_gemms(&self) -> bool {
        self.bf16_gemms
    }

    /// How many key/value projections of a text context the cross-attention layers have
    /// computed so far: one per layer per prompt while the prompt holds (frames with the same
    /// context reuse them); shared with clones of this network.
    pub fn cross_attention_projections(&self) -> usize {
        self.kv_projections.load(Ordering::Relaxed)
    }

    /// Whether the network projects the time embedding for all its resnets in one product
    /// (the kernel policy's `fused_time_projections` when it was built).
    pub fn fuses_time_projections(&self) -> bool {
        self.time_projections.is_some()
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

    /// The width of the text embeddings the cross-attention reads, when any block attends to
    /// the text.
    pub fn text_width(&self) -> Option<usize> {
        self.encoder
            .plan
            .attention
            .first()
            .filter(|_| self.has_attention())
            .map(|spec| spec.cross_attention_dim)
    }

    /// The query width of every cross-attention layer, in diffusers' `attn_processors` order
    /// (down blocks, up blocks, mid block): the layers IP-Adapter checkpoints number.
    pub fn cross_attention_widths(&self) -> &[usize] {
        &self.cross_attention_widths
    }

    /// Whether the network keeps its maps channels-last between its layers (chosen by the
    /// kernel policy when it loaded; its inputs and outputs are `[B, C, H, W]` either way).
    pub fn maps_channels_last(&self) -> bool {
        self.encoder.plan.settings.channels_last
    }

    /// How many down residuals a [`ControlResiduals`] must hold (12 for SD 1.x/2.x).
    pub fn down_residual_count(&self) -> usize {
        self.encoder.skip_count()
    }

    /// The channel count of each down residual, in order (conv_in's skip first).
    pub fn down_residual_channels(&self) -> Vec<usize> {
        self.encoder.skip_channels()
    }

    /// Predicts the noise (or v) for one call's [`UNetInputs`]: `sample` `[B, C, h, w]` at
    /// `timesteps` `[B]` given the text embeddings, with whichever of SDXL's added
    /// conditioning, ControlNet residuals, cached attention's bank and IP-Adapter's image
    /// prompt the call carries.
    ///
    /// On a CUDA device a call with neither a bank nor an image prompt is captured as a CUDA
    /// graph at its first call for each input signature and replayed after
    /// ([`super::cuda_graph`]): every tensor is an input of the graph, copied into it per call.
    /// A bank changes every call and an image prompt carries per-layer scales, so those calls
    /// run eagerly.
    pub fn forward(&self, inputs: UNetInputs<'_>) -> Result<Tensor> {
        let UNetInputs {
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            control,
            bank,
            image,
        } = inputs;
        if bank.is_none() && image.is_none() {
            return self.forward_graphed(sample, timesteps, encoder_hidden_states, added, control);
        }
        let (text, image_tokens) = match image {
            Some(image) => {
                let all = encoder_hidden_states.dim(1)?;
                if image.tokens == 0 || image.tokens >= all {
                    return Err(shape_error(format!(
                        "{} image tokens given in encoder_hidden_states of {all} tokens",
                        image.tokens
                    )));
                }
                let widths = image.adapter.widths();
                if widths != self.cross_attention_widths {
                    return Err(shape_error(format!(
                        "the IP-Adapter's layers have widths {widths:?}, the UNet's \
                         cross-attention layers {:?}",
                        self.cross_attention_widths
                    )));
                }
                if image.scales.len() != widths.len() {
                    return Err(shape_error(format!(
                        "{} IP-Adapter scales given for {} layers",
                        image.scales.len(),
                        widths.len()
                    )));
                }
                let text = encoder_hidden_states.narrow(1, 0, all - image.tokens)?;
                let tokens = encoder_hidden_states
                    .narrow(1, all - image.tokens, image.tokens)?
                    .to_dtype(self.dtype())?;
                (text, Some((tokens, image)))
            }
            None => (encoder_hidden_states.clone(), None),
        };
        let image_context = image_tokens.as_ref().map(|(tokens, image)| ImageContext {
            tokens,
            layers: image.adapter.layers(),
            scales: image.scales,
        });
        match bank {
            Some(bank) => {
                let call = bank.begin();
                let out = self.forward_eager(
                    sample,
                    timesteps,
                    &text,
                    added,
                    control,
                    Some(&call),
                    image_context.as_ref(),
                )?;
                let fresh = call.into_inner().into_fresh();
                bank.commit(fresh)?;
                Ok(out)
            }
            None => self.forward_eager(
                sample,
                timesteps,
                &text,
                added,
                control,
                None,
                image_context.as_ref(),
            ),
        }
    }

    /// The pass without a bank or an image prompt, through the CUDA graph cache.
    fn forward_graphed(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning>,
        control: Option<&ControlResiduals>,
    ) -> Result<Tensor> {
        let mut inputs = vec![sample, timesteps, encoder_hidden_states];
        if let Some(added) = added {
            inputs.extend([&added.text_embeds, &added.time_ids]);
        }
        if let Some(control) = control {
            inputs.extend(control.down.iter());
            inputs.push(&control.mid);
        }
        let has_added = added.is_some();
        let down_count = control.map(|c| c.down.len());
        self.graphs.run(&inputs, |xs| {
            let added = has_added.then(|| AddedConditioning {
                text_embeds: xs[3].clone(),
                time_ids: xs[4].clone(),
            });
            let first = if has_added { 5 } else { 3 };
            let control = down_count.map(|n| ControlResiduals {
                down: xs[first..first + n].iter().map(|t| (*t).clone()).collect(),
                mid: xs[first + n].clone(),
            });
            self.forward_eager(
                xs[0],
                xs[1],
                xs[2],
                added.as_ref(),
                control.as_ref(),
                None,
                None,
            )
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_eager(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning>,
        control: Option<&ControlResiduals>,
        bank: Option<&RefCell<BankCall<'_>>>,
        image: Option<&ImageContext<'_>>,
    ) -> Result<Tensor> {
        let _bf16 = gemm_bf16::scope(self.bf16_gemms);
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
        if let Some(width) = self.text_width()
            && context_dims[2] != width
        {
            return Err(shape_error(format!(
                "encoder_hidden_states have width {}, the UNet's cross-attention takes {width}",
                context_dims[2]
            )));
        }
        let context = encoder_hidden_states.to_dtype(dtype)?;
        let sample = sample.to_dtype(dtype)?;

        let emb = self.encoder.time_embedding(timesteps, batch, added)?;
        let temb_act = self.encoder.resnet_temb(&emb)?;
        let projected = TimeProjections::project(self.time_projections.as_ref(), &temb_act)?;
        let time = ResnetTime::new(&temb_act, projected.as_ref());

        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample
        };
        let s = self.encoder.plan.settings;
        let x = self.encoder.conv_in.forward(&s.enter(&sample)?)?;
        let context = Context {
            text: &context,
            bank,
            image,
        };
        let (x, mut skips) = self.encoder.down(&x, time, context)?;
        if let Some(control) = control {
            if control.down.len() != skips.len() {
                return Err(shape_error(format!(
                    "{} ControlNet down residuals given, the UNet has {} skip connections",
                    control.down.len(),
                    skips.len()
                )));
            }
            for (i, (skip, residual)) in skips.iter_mut().zip(&control.down).enumerate() {
                let expected = s.leave_shape(skip)?;
                if residual.dims() != expected {
                    return Err(shape_error(format!(
                        "ControlNet down residual {i} is {:?}, the skip connection is {:?}",
                        residual.dims(),
                        expected
                    )));
                }
                *skip = (&*skip + s.enter(&residual.to_dtype(dtype)?)?)?;
            }
        }
        let mut x = self.encoder.mid(&x, time, context)?;
        if let Some(control) = control {
            let expected = s.leave_shape(&x)?;
            if control.mid.dims() != expected {
                return Err(shape_error(format!(
                    "ControlNet mid residual is {:?}, the mid block output is {:?}",
                    control.mid.dims(),
                    expected
                )));
            }
            x = (x + s.enter(&control.mid.to_dtype(dtype)?)?)?;
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
                Some(next) if forward_size && !is_final => Some(s.spatial(next)?),
                _ => None,
            };
            x = block.forward(&x, &block_skips, time, context, size)?;
        }
        let x = self
            .encoder
            .plan
            .settings
            .act
            .after_norm(&self.conv_norm_out, &x)?;
        Ok(s.leave(&self.conv_out.forward(&x)?)?)
    }
}

/// LCM-distilled UNets (`time_cond_proj_dim`) carry a guidance embedding that is read only with a
/// `timestep_cond`, which StreamDiffusion's UNet calls never pass (see [`UNetConfig`]).
fn unused_lcm_guidance_embedding(name: &str) -> bool {
    name.starts_with("time_embedding.cond_proj.")
}

fn shape_error(message: String) -> Error {
    Error::Candle(candle_core::Error::Msg(format!("UNet input: {message}")))
}
