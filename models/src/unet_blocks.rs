//! Building blocks of diffusers' conditional UNet, shared by the UNet and the ControlNet.
//!
//! Weight names are diffusers' own (`resnets.0.norm1.weight`, `attentions.0.transformer_blocks.0
//! .attn1.to_q.weight`, …) so that a block is built from the [`VarBuilder`] prefix of its place in
//! the checkpoint. Numerics follow diffusers/PyTorch in f32: GroupNorm and LayerNorm statistics are
//! accumulated in f64 on the CPU and applied as `x·scale + shift` per channel like PyTorch's CPU
//! kernels; GEGLU uses the exact (erf) GELU; attention uses a scale of 1/√head_dim. The CPU
//! kernels and their portable twins live in [`super::kernels`].

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::attention_bank::BankCall;
use super::kernels::conv::{Conv2d, Padding};
use super::kernels::norm::{GroupNorm, LayerNorm};
use super::kernels::ops::{add_fresh, geglu, scaled_softmax, transposed};
use super::kernels::{attention, cpu_kernels, gemm_bf16, same_values};
use super::try_vec;
use super::weight_table;
use crate::{Error, Result};

/// Activation functions that diffusers' `get_activation` can name in a UNet config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu` (exact, erf-based, as `torch.nn.GELU()`).
    Gelu,
    /// `relu`.
    Relu,
}

impl Activation {
    /// Parses an activation name from a config; `option` names the config field for the error.
    pub fn parse(name: &str, model: &str, option: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "gelu" => Ok(Self::Gelu),
            "relu" => Ok(Self::Relu),
            other => Err(Error::UnsupportedConfig {
                model: model.into(),
                option: option.into(),
                detail: format!("activation {other:?} is not supported (silu, swish, gelu, relu)"),
            }),
        }
    }

    /// Applies the activation to `x`.
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
            Self::Relu => x.relu(),
        }
    }
}

/// Settings every resnet and transformer of a UNet shares, taken from the model config.
#[derive(Debug, Clone, Copy)]
pub struct BlockSettings {
    /// `norm_num_groups`.
    pub groups: usize,
    /// `norm_eps`, used by the resnets' GroupNorms.
    pub eps: f64,
    /// `act_fn`, the resnets' nonlinearity.
    pub act: Activation,
    /// `resnet_time_scale_shift == "scale_shift"`.
    pub scale_shift: bool,
    /// `use_linear_projection`.
    pub linear_projection: bool,
    /// `upcast_attention`.
    pub upcast_attention: bool,
}

/// What one level of the UNet holds besides its resnets: the cross-attention transformers.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpec {
    /// Number of heads (diffusers' `num_attention_heads`, which defaults to `attention_head_dim`).
    pub heads: usize,
    /// Width of the text embeddings the cross-attention reads.
    pub cross_attention_dim: usize,
    /// BasicTransformerBlocks per Transformer2DModel.
    pub layers: usize,
    /// Whether the first attention of each block attends to the text instead of to itself.
    pub only_cross_attention: bool,
}

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

/// A linear layer `y = x·Wᵀ + b` over the last dimension. On the CPU the bias is added in place
/// into the fresh matmul output (one pass, no extra allocation).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`; on the CPU kernels a view of `[in, out]` values (see [`Linear::new`]).
    weight: Tensor,
    bias: Option<Tensor>,
    /// The weight packed for bf16 products, made on the first one (see [`gemm_bf16`]).
    packed_bf16: gemm_bf16::LazyWeight,
}

impl Linear {
    /// A layer of `weight` `[out, in]`. For the CPU kernels the values are laid out `[in, out]`
    /// (one copy, made here, of which `weight` becomes a view): candle's CPU matmul hands
    /// `x·Wᵀ` to the `gemm` crate, which repacks a weight stored `[out, in]` on every call but
    /// reads one stored `[in, out]` in place. At the UNet's inner levels, where few tokens meet
    /// large weights, that repacking was most of the work (64 tokens, 5120 → 1280: 13.1 →
    /// 4.9 ms). A weight already laid out so (a rebuild for a LoRA hands the old view back) is
    /// kept as it is.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let weight = if !cpu_kernels(weight.device()) || weight.t()?.is_contiguous() {
            weight
        } else {
            transposed(&weight)?.t()?
        };
        Ok(Self {
            weight,
            bias,
            packed_bf16: Default::default(),
        })
    }

    /// The weight, `[out, in]` (a strided view on the CPU kernels).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// `prefix.weight` (`[out, in]`) and `prefix.bias` of a linear layer. The weight table records
/// the layer's own view of its weight (see [`Linear::new`] and [`weight_table`]).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let layer = Linear::new(
        vb.get((out_dim, in_dim), "weight")?,
        Some(vb.get(out_dim, "bias")?),
    )?;
    weight_table::record(&format!("{}.weight", vb.prefix()), layer.weight());
    Ok(layer)
}

impl Linear {
    /// `x·Wᵀ`, without the bias.
    pub fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if gemm_bf16::active() && cpu_kernels(x.device()) && x.dtype() == DType::F32 {
            return gemm_bf16::linear(x, &self.weight, &self.packed_bf16);
        }
        let w = self.weight.t()?;
        match *x.dims() {
            [b, n, k] if x.is_contiguous() => {
                x.reshape((b * n, k))?.matmul(&w)?.reshape((b, n, ()))
            }
            [b, n, _] => x.matmul(&w.broadcast_left(b)?)?.reshape((b, n, ())),
            _ => x.matmul(&w),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.product(x)?;
        let dtype = y.dtype();
        match &self.bias {
            // The bf16 product is f32 whatever the bias's type (`to_dtype` to the bias's own
            // type is a clone of the handle).
            Some(bias) => add_fresh(y, &bias.to_dtype(dtype)?, 1),
            None => Ok(y),
        }
    }
}

/// A convolution with bias and the same padding on every side, as the UNet's layers.
pub fn conv2d(
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let padding = Padding::uniform(padding);
    Ok(Conv2d::new(
        in_ch, out_ch, kernel, stride, padding, true, vb,
    )?)
}

/// A 1×1 convolution loaded as the equivalent linear map over channels, applied to tokens
/// `[B, HW, C]`; the transformers' `proj_in`/`proj_out` when `use_linear_projection` is false.
fn pointwise_as_linear(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb
        .get((out_ch, in_ch, 1, 1), "weight")?
        .reshape((out_ch, in_ch))?;
    let b = vb.get(out_ch, "bias")?;
    let layer = Linear::new(w, Some(b))?;
    // The table keeps the layer's values in the checkpoint's shape (a view, no copy).
    let view = layer.weight().unsqueeze(2)?.unsqueeze(3)?;
    weight_table::record(&format!("{}.weight", vb.prefix()), &view);
    Ok(layer)
}

/// Sinusoidal timestep features, as diffusers' `get_timestep_embedding`, always in f32.
#[derive(Debug, Clone)]
pub struct SinusoidalTimesteps {
    /// `exp(-ln(10000)·i / (half − shift))`, `[1, half]`, f32.
    freqs: Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
}

impl SinusoidalTimesteps {
    /// Precomputes the frequencies of a `dim`-wide embedding (diffusers' `Timesteps`).
    pub fn new(
        dim: usize,
        flip_sin_to_cos: bool,
        freq_shift: f64,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let half = dim / 2;
        // Same f32 steps as diffusers: (−ln 10000 as f32)·i, divided by (half − shift) as f32;
        // exp is correctly rounded here (PyTorch's CPU exp may differ by one ulp).
        let log_period = -(10000f64.ln()) as f32;
        let divisor = (half as f64 - freq_shift) as f32;
        let mut freqs: Vec<f32> = try_vec(half, "the sinusoidal frequencies")?;
        freqs.extend(
            (0..half)
                .map(|i| ((log_period * i as f32) / divisor) as f64)
                .map(|e| e.exp() as f32),
        );
        Ok(Self {
            freqs: Tensor::from_vec(freqs, (1, half), device)?,
            dim,
            flip_sin_to_cos,
        })
    }

    /// `[B]` timesteps (any dtype) → `[B, dim]` f32 features.
    pub fn forward(&self, timesteps: &Tensor) -> candle_core::Result<Tensor> {
        let b = timesteps.dim(0)?;
        let args = timesteps
            .to_device(self.freqs.device())?
            .to_dtype(DType::F32)?
            .reshape((b, 1))?
            .broadcast_mul(&self.freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 1)?
        } else {
            Tensor::cat(&[sin, cos], 1)?
        };
        if self.dim % 2 == 1 {
            emb.pad_with_zeros(1, 0, 1)
        } else {
            Ok(emb)
        }
    }
}

/// diffusers' `TimestepEmbedding`: linear → act → linear (→ optional post activation).
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    /// Builds the two linear layers from `vb` (`linear_1`, `linear_2`).
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        act: Activation,
        post_act: Option<Activation>,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            act,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
            post_act,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.act.apply(&self.linear_1.forward(x)?)?;
        let x = self.linear_2.forward(&x)?;
        match self.post_act {
            Some(act) => act.apply(&x),
            None => Ok(x),
        }
    }
}

/// diffusers' `ResnetBlock2D` (pre-norm, time-conditioned, optional 1×1 shortcut).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    scale_shift: bool,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Builds the block from `vb` (norms, convolutions, the time projection and the shortcut when
    /// the widths differ).
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        temb_ch: usize,
        output_scale_factor: f64,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let proj_out = if s.scale_shift { 2 * out_ch } else { out_ch };
        Ok(Self {
            norm1: GroupNorm::new(s.groups, in_ch, s.eps, vb.pp("norm1"))?,
            conv1: conv2d(in_ch, out_ch, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: linear(temb_ch, proj_out, vb.pp("time_emb_proj"))?,
            norm2: GroupNorm::new(s.groups, out_ch, s.eps, vb.pp("norm2"))?,
            conv2: conv2d(out_ch, out_ch, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: if in_ch != out_ch {
                Some(conv2d(in_ch, out_ch, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            act: s.act,
            scale_shift: s.scale_shift,
            output_scale_factor,
        })
    }

    /// `temb_act` is the time embedding with the resnets' nonlinearity already applied (it is
    /// the same for every resnet, so the UNet computes it once per call).
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.norm_act(&self.norm1, x)?;
        let h = self.conv1.forward(&h)?;
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = if self.scale_shift {
            let ch = t.dim(1)? / 2;
            let (scale, shift) = (t.narrow(1, 0, ch)?, t.narrow(1, ch, ch)?);
            let h = self.norm2.forward(&h)?;
            let h = h.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?;
            self.act.apply(&h)?
        } else {
            let (_, _, hh, ww) = h.dims4()?;
            self.norm_act(&self.norm2, &add_fresh(h, &t, hh * ww)?)?
        };
        let h = self.conv2.forward(&h)?;
        let out = match &self.conv_shortcut {
            Some(conv) => add_fresh(h, &conv.forward(x)?, 1)?,
            None => add_fresh(h, x, 1)?,
        };
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }

    fn norm_act(&self, norm: &GroupNorm, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.act {
            Activation::Silu => norm.forward_silu(x),
            act => act.apply(&norm.forward(x)?),
        }
    }
}

/// diffusers' `Downsample2D` with a convolution (stride 2); padding 0 pads right and bottom.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    /// A stride-2 3×3 convolution; `padding` 0 pads bottom and right by one, as diffusers does.
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let padding = if padding == 0 {
            Padding::bottom_right(1)
        } else {
            Padding::uniform(padding)
        };
        let conv = Conv2d::new(channels, channels, 3, 2, padding, true, vb.pp("conv"))?;
        Ok(Self { conv })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(x)
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest 2× (or to a given size), then 3×3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// A nearest ×2 upsampling followed by a 3×3 convolution.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    /// Upsamples `x` to `size` when given (the skip connection's size), else by two, then
    /// convolves.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        match size {
            // Plain 2×: fused into the convolution's input copy on the CPU.
            None => self.conv.forward_upsampled(x, 2),
            Some(size) if size == (2 * h, 2 * w) => self.conv.forward_upsampled(x, 2),
            Some((th, tw)) => self.conv.forward(&x.upsample_nearest2d(th, tw)?),
        }
    }
}

/// diffusers' `Attention` (to_q/to_k/to_v without bias, to_out.0 with bias), all heads batched
/// into one matmul. Self-attention projects q, k and v with one fused weight.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Self-attention: `[q; k; v]` stacked. Cross-attention: q alone.
    to_q_or_qkv: Linear,
    /// Cross-attention only: `[k; v]` stacked.
    to_kv: Option<Linear>,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
    upcast: bool,
    /// Cross-attention only: the keys and values of the last context.
    kv_memo: KvMemo,
}

/// A cross-attention layer's keys and values of the last context it saw, reused while the
/// context holds the same values: the prompt changes far less often than frames come, and the
/// stream rebuilds its context tensor every frame, so the test is on values, not identity.
/// A clone starts empty (a clone may get other weights, as a LoRA rebuild does).
#[derive(Debug, Default)]
struct KvMemo {
    /// The context and its key/value projection (`[B, M, 2·H·d]`, keys then values).
    last: Mutex<Option<(Tensor, Tensor)>>,
    /// Counts projections actually computed; shared by every layer of one network.
    computed: Arc<AtomicUsize>,
}

impl Clone for KvMemo {
    fn clone(&self) -> Self {
        Self {
            last: Mutex::default(),
            computed: Arc::clone(&self.computed),
        }
    }
}

impl KvMemo {
    /// The key/value projection of `context`, from the memo when it saw the same values.
    ///
    /// On the CPU only. On a GPU the projection is a small GEMM (77 tokens), and a memo there
    /// is unsafe under CUDA graphs ([`crate::cuda_graph`]): the capture would free the eager
    /// pass's memoised tensor inside the graph being captured, and keep one of the graph's own
    /// allocations past it. Frames on an H200 failed with `CUDA_ERROR_INVALID_VALUE` while
    /// graphs were on and this memo kept GPU tensors, and ran with graphs off.
    fn get_or_compute(
        &self,
        context: &Tensor,
        compute: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        if !context.device().is_cpu() {
            let kv = compute()?;
            self.computed.fetch_add(1, Ordering::Relaxed);
            return Ok(kv);
        }
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, kv)) = last.as_ref()
            && same_values(seen, context)
        {
            return Ok(kv.clone());
        }
        let kv = compute()?;
        self.computed.fetch_add(1, Ordering::Relaxed);
        *last = Some((context.clone(), kv.clone()));
        Ok(kv)
    }
}

/// Attention scores above this many bytes are computed in slices of heads to bound memory.
const ATTENTION_SCORE_BUDGET: usize = 256 << 20;
/// On the CPU, score blocks stay under this size (below glibc's largest mmap threshold, so the
/// allocator reuses heap memory instead of faulting in fresh pages for every block).
const ATTENTION_BLOCK_BYTES_CPU: usize = 16 << 20;

impl Attention {
    /// Builds the attention from `vb` (`to_q`, `to_k`, `to_v`, `to_out.0`); keys and values are
    /// projected from `context_dim` channels (the input's `query_dim` when `None`).
    pub fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        upcast: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        let wq = vb.get((inner, query_dim), "to_q.weight")?;
        let wk = vb.get((inner, kv_dim), "to_k.weight")?;
        let wv = vb.get((inner, kv_dim), "to_v.weight")?;
        let name = |leaf: &str| format!("{}.{leaf}.weight", vb.prefix());
        // The fused projections are copies: the weight table keeps views of them instead of
        // the separate tensors (see model::weight_table).
        let (to_q_or_qkv, to_kv) = if context_dim.is_none() {
            let qkv = Linear::new(Tensor::cat(&[&wq, &wk, &wv], 0)?, None)?;
            weight_table::record_rows(&[name("to_q"), name("to_k"), name("to_v")], qkv.weight())?;
            (qkv, None)
        } else {
            let q = Linear::new(wq, None)?;
            weight_table::record(&name("to_q"), q.weight());
            let kv = Linear::new(Tensor::cat(&[&wk, &wv], 0)?, None)?;
            weight_table::record_rows(&[name("to_k"), name("to_v")], kv.weight())?;
            (q, Some(kv))
        };
        Ok(Self {
            to_q_or_qkv,
            to_kv,
            to_out: linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            upcast,
            kv_memo: KvMemo::default(),
        })
    }

    /// Counts this layer's key/value projections into `counter` (with every other layer of
    /// its network).
    pub fn share_projection_counter(&mut self, counter: &Arc<AtomicUsize>) {
        self.kv_memo.computed = Arc::clone(counter);
    }

    /// `x`: `[B, N, C]`; `context`: `[B, M, D]` for cross-attention (ignored for self-attention).
    /// With `bank`, self-attention also attends to the banked keys and values
    /// ([`crate::attention_bank`]).
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        bank: Option<&RefCell<BankCall<'_>>>,
    ) -> candle_core::Result<Tensor> {
        self.forward_with_image(x, context, bank, None)
    }

    /// [`forward`](Self::forward) with IP-Adapter's decoupled cross-attention: the queries
    /// also attend to the image tokens' keys and values, and that result, times the layer's
    /// scale, is added to the text attention's before the output projection.
    pub fn forward_with_image(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        bank: Option<&RefCell<BankCall<'_>>>,
        image: Option<ImageAttention<'_>>,
    ) -> candle_core::Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (h, d) = (self.heads, self.head_dim);
        let bank = bank.filter(|_| self.to_kv.is_none());
        // Self-attention: q, k and v side by side; cross-attention: q alone, and the context's
        // key/value projection from the memo.
        let queries = self.to_q_or_qkv.forward(x)?;
        let keys_values = match (&self.to_kv, context) {
            (None, _) => None,
            (Some(to_kv), Some(ctx)) => {
                Some(self.kv_memo.get_or_compute(ctx, || to_kv.forward(ctx))?)
            }
            (Some(_), None) => candle_core::bail!("cross-attention called without a context"),
        };
        if attention::runs_for(&queries, d) && bank.is_none() {
            return self.attend_in_place(&queries, keys_values.as_ref(), image);
        }
        // Heads-major layout [·, B, H, tokens, d] so that every (batch, head) pair is one matmul.
        let heads_major = |kv: Tensor, tokens: usize| {
            kv.reshape((b, tokens, 2, h, d))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()
        };
        let (q, k, v, m) = match keys_values {
            None => {
                let qkv = queries
                    .reshape((b, n, 3, h, d))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()?;
                (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?, n)
            }
            Some(kv) => {
                let m = kv.dim(1)?;
                let q = queries
                    .reshape((b, n, h, d))?
                    .transpose(1, 2)?
                    .contiguous()?;
                let kv = heads_major(kv, m)?;
                (q, kv.get(0)?, kv.get(1)?, m)
            }
        };
        let q = q.reshape((b * h, n, d))?;
        let k = k.reshape((b * h, m, d))?;
        let v = v.reshape((b * h, m, d))?;
        let (k, v, m) = match bank {
            Some(bank) => {
                let (k, v) = bank.borrow_mut().extend(&k, &v)?;
                let m = k.dim(1)?;
                (k, v, m)
            }
            None => (k, v, m),
        };
        let mut out = self.attend_blocks(&q, &k, &v, b, n, m)?;
        if let Some(image) = image {
            let t = image.tokens.dim(1)?;
            let kv = heads_major(image.to_kv.forward(image.tokens)?, t)?;
            let k = kv.get(0)?.reshape((b * h, t, d))?;
            let v = kv.get(1)?.reshape((b * h, t, d))?;
            let from_image = self.attend_blocks(&q, &k, &v, b, n, t)?;
            out = (out + (from_image * image.scale)?)?;
        }
        self.to_out.forward(&out)
    }

    /// [`forward_with_image`](Self::forward_with_image) on the CPU kernels without a bank: the
    /// attention reads its heads in place from the projections' `[B, tokens, width]` outputs
    /// (`queries`, and cross-attention's `keys_values`).
    fn attend_in_place(
        &self,
        queries: &Tensor,
        keys_values: Option<&Tensor>,
        image: Option<ImageAttention<'_>>,
    ) -> candle_core::Result<Tensor> {
        let (h, d) = (self.heads, self.head_dim);
        // The queries' attention over the keys at column `keys` of `kv` and the values right
        // after them.
        let attend = |kv: &Tensor, keys: usize| {
            let view = |tensor, offset| attention::TokenMajor { tensor, offset };
            attention::attention_token_major(
                view(queries, 0),
                view(kv, keys),
                view(kv, keys + h * d),
                h,
                d,
                self.scale,
            )
        };
        let mut out = match keys_values {
            // Self-attention: `queries` is q, k and v side by side.
            None => attend(queries, h * d)?,
            Some(kv) => attend(kv, 0)?,
        };
        if let Some(image) = image {
            let from_image = attend(&image.to_kv.forward(image.tokens)?, 0)?;
            out = (out + (from_image * image.scale)?)?;
        }
        self.to_out.forward(&out)
    }

    /// Attention of `q` `[B·H, N, d]` over `k`, `v` `[B·H, M, d]`, heads merged back:
    /// `[B, N, H·d]` (before the output projection).
    fn attend_blocks(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        b: usize,
        n: usize,
        m: usize,
    ) -> candle_core::Result<Tensor> {
        let (h, d) = (self.heads, self.head_dim);
        if attention::runs_for(q, d) {
            return attention::attention(q, k, v, h, self.scale);
        }
        // Scores are computed in blocks of (head, query rows): on the CPU a block fits the
        // allocator's reusable heap (no page faults per call) and stays cache-friendly; on other
        // devices blocks only bound memory.
        let score_dtype = if self.upcast { DType::F32 } else { q.dtype() };
        let budget = if cpu_kernels(q.device()) {
            ATTENTION_BLOCK_BYTES_CPU
        } else {
            ATTENTION_SCORE_BUDGET
        } / score_dtype.size_in_bytes();
        let pairs = b * h;
        let out = if pairs * n * m <= budget {
            self.attend(q, k, v)?
        } else if n * m <= budget {
            let group = budget / (n * m);
            let mut parts = Vec::with_capacity(pairs.div_ceil(group));
            let mut start = 0;
            while start < pairs {
                let len = group.min(pairs - start);
                parts.push(self.attend(
                    &q.narrow(0, start, len)?,
                    &k.narrow(0, start, len)?,
                    &v.narrow(0, start, len)?,
                )?);
                start += len;
            }
            Tensor::cat(&parts, 0)?
        } else {
            let rows = (budget / m).max(1);
            let mut per_pair = Vec::with_capacity(pairs);
            for p in 0..pairs {
                let (qp, kp, vp) = (q.narrow(0, p, 1)?, k.narrow(0, p, 1)?, v.narrow(0, p, 1)?);
                let mut parts = Vec::with_capacity(n.div_ceil(rows));
                let mut start = 0;
                while start < n {
                    let len = rows.min(n - start);
                    parts.push(self.attend(&qp.narrow(1, start, len)?, &kp, &vp)?);
                    start += len;
                }
                per_pair.push(Tensor::cat(&parts, 1)?);
            }
            Tensor::cat(&per_pair, 0)?
        };
        out.reshape((b, h, n, d))?
            .transpose(1, 2)?
            .reshape((b, n, h * d))
    }

    /// softmax(q·kᵀ·scale)·v for `[P, N, d]` × `[P, M, d]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = q.dtype();
        let upcast = self.upcast && dtype != DType::F32 && dtype != DType::F64;
        let (q, k) = if upcast {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q.clone(), k.clone())
        };
        let probs = scaled_softmax(q.matmul(&k.t()?)?, self.scale)?;
        let probs = if upcast {
            probs.to_dtype(dtype)?
        } else {
            probs
        };
        probs.matmul(v)
    }
}

/// What the transformer blocks read besides their input: the text embeddings and, with cached
/// attention, this UNet call's use of the bank.
#[derive(Clone, Copy)]
pub struct Context<'a, 'b> {
    /// The text embeddings the cross-attention reads.
    pub text: &'a Tensor,
    /// This UNet call's use of the attention bank (cached attention), when it is on.
    pub bank: Option<&'a RefCell<BankCall<'b>>>,
    /// IP-Adapter's image tokens and layers, when an adapter is active.
    pub image: Option<&'a ImageContext<'a>>,
}

impl<'a> Context<'a, 'static> {
    /// The text alone (no bank, no image).
    pub fn text(text: &'a Tensor) -> Self {
        Self {
            text,
            bank: None,
            image: None,
        }
    }
}

/// IP-Adapter's part in one UNet call ([`crate::ip_adapter`]).
pub struct ImageContext<'a> {
    /// The image tokens of every batch row, `[B, T, D]`.
    pub tokens: &'a Tensor,
    /// Per cross-attention layer (diffusers' `attn_processors` order): `[to_k_ip; to_v_ip]`.
    pub layers: &'a [Linear],
    /// Per cross-attention layer: the scale of its image attention.
    pub scales: &'a [f64],
}

/// What one cross-attention layer reads of an [`ImageContext`].
#[derive(Clone, Copy)]
pub struct ImageAttention<'a> {
    tokens: &'a Tensor,
    to_kv: &'a Linear,
    scale: f64,
}

/// diffusers' `FeedForward` with GEGLU: `net.0.proj` (→ 2·inner), exact GELU gate, `net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
    /// Width of the projection's output, `2 · 4 · dim` (GEGLU's two halves).
    width: usize,
}

/// Bytes of the feed-forward's widest value, its projection, that the CPU computes at a time.
/// For all 4,096 tokens of a 512² image it is 42 MB (126 MB for a stream batch of three),
/// above glibc's mmap threshold, so every call mapped it afresh and the GEMM faulted it in page
/// by page: most of the UNet's page faults in a steady stream. Cut into row chunks of at most
/// this size it comes from the heap, reused; each row's arithmetic is the same either way.
const FEED_FORWARD_CHUNK_BYTES: usize = 16 << 20;

impl FeedForward {
    /// GEGLU feed-forward of width `dim` (inner width 4·dim).
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: linear(dim, 2 * inner, vb.pp("net").pp("0").pp("proj"))?,
            out: linear(inner, dim, vb.pp("net").pp("2"))?,
            width: 2 * inner,
        })
    }

    fn forward_rows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The projection's bias is added by GEGLU as it reads the product.
        self.out
            .forward(&geglu(&self.proj.product(x)?, self.proj.bias.as_ref())?)
    }

    /// The feed-forward of a contiguous `x` (`[…, dim]`), `chunk_rows` rows at a time (in one
    /// piece when it has no more).
    fn forward_chunked(&self, x: &Tensor, chunk_rows: usize) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let dim = dims.last().copied().unwrap_or(1).max(1);
        let rows = x.elem_count() / dim;
        if rows <= chunk_rows {
            return self.forward_rows(x);
        }
        let flat = x.reshape((rows, dim))?;
        let parts = (0..rows)
            .step_by(chunk_rows)
            .map(|first| self.forward_rows(&flat.narrow(0, first, chunk_rows.min(rows - first))?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.reshape(dims)
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Chunks only keep the projection out of freshly mapped memory, at the price of reading
        // the weights once per chunk: not worth it where large blocks are reused anyway.
        if !cpu_kernels(x.device())
            || !x.is_contiguous()
            || crate::kernels::alloc::reuses_large_blocks()
        {
            return self.forward_rows(x);
        }
        let chunk_rows =
            (FEED_FORWARD_CHUNK_BYTES / (self.width * x.dtype().size_in_bytes())).max(1);
        self.forward_chunked(x, chunk_rows)
    }
}

/// diffusers' `BasicTransformerBlock` (layer_norm type): self-attn, cross-attn, GEGLU MLP.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
    /// This block's cross-attention in diffusers' `attn_processors` order (down, up, mid
    /// blocks), which IP-Adapter checkpoints number their layers by; set by the UNet.
    pub cross_attention_slot: usize,
    /// The width of its queries (what IP-Adapter's key and value projections output).
    pub width: usize,
}

impl BasicTransformerBlock {
    /// Counts the key/value projections of this block's attention layers into `counter`.
    pub fn share_projection_counter(&mut self, counter: &Arc<AtomicUsize>) {
        self.attn1.share_projection_counter(counter);
        self.attn2.share_projection_counter(counter);
    }

    /// Builds self-attention, cross-attention and the feed-forward from `vb`.
    pub fn new(dim: usize, spec: &AttentionSpec, upcast: bool, vb: VarBuilder) -> Result<Self> {
        let head_dim = dim / spec.heads;
        let attn1_context = spec
            .only_cross_attention
            .then_some(spec.cross_attention_dim);
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(
                dim,
                attn1_context,
                spec.heads,
                head_dim,
                upcast,
                vb.pp("attn1"),
            )?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(
                dim,
                Some(spec.cross_attention_dim),
                spec.heads,
                head_dim,
                upcast,
                vb.pp("attn2"),
            )?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            only_cross_attention: spec.only_cross_attention,
            cross_attention_slot: 0,
            width: dim,
        })
    }

    /// Self-attention (extended by the bank when on), cross-attention, then the feed-forward, each
    /// pre-norm with its residual.
    pub fn forward(&self, x: &Tensor, context: Context<'_, '_>) -> candle_core::Result<Tensor> {
        // The bank extends self-attention only (an `only_cross_attention` attn1 reads the text).
        let (ctx1, bank) = if self.only_cross_attention {
            (Some(context.text), None)
        } else {
            (None, context.bank)
        };
        let x = add_fresh(
            self.attn1.forward(&self.norm1.forward(x)?, ctx1, bank)?,
            x,
            1,
        )?;
        // A layer at scale 0 adds nothing: skipped, as the adapter's absence.
        let image = context.image.and_then(|image| {
            let slot = self.cross_attention_slot;
            let scale = *image.scales.get(slot)?;
            (scale != 0.0).then(|| ImageAttention {
                tokens: image.tokens,
                to_kv: &image.layers[slot],
                scale,
            })
        });
        let x = add_fresh(
            self.attn2.forward_with_image(
                &self.norm2.forward(&x)?,
                Some(context.text),
                None,
                image,
            )?,
            &x,
            1,
        )?;
        add_fresh(self.ff.forward(&self.norm3.forward(&x)?)?, &x, 1)
    }
}

/// diffusers' `Transformer2DModel` over continuous input: GroupNorm (eps 1e-6), proj_in,
/// transformer blocks on `[B, HW, C]` tokens, proj_out, residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl Transformer2DModel {
    /// Builds the norm, the input and output projections and the transformer blocks from `vb`.
    pub fn new(
        channels: usize,
        spec: &AttentionSpec,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        if spec.heads == 0 || !channels.is_multiple_of(spec.heads) {
            return Err(Error::UnsupportedConfig {
                model: "UNet".into(),
                option: "attention_head_dim".into(),
                detail: format!("{} heads do not divide {channels} channels", spec.heads),
            });
        }
        // inner_dim = heads · (channels / heads) = channels.
        let inner = channels;
        let (proj_in, proj_out) = if s.linear_projection {
            (
                linear(channels, inner, vb.pp("proj_in"))?,
                linear(inner, channels, vb.pp("proj_out"))?,
            )
        } else {
            (
                pointwise_as_linear(channels, inner, vb.pp("proj_in"))?,
                pointwise_as_linear(inner, channels, vb.pp("proj_out"))?,
            )
        };
        let blocks = (0..spec.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    inner,
                    spec,
                    s.upcast_attention,
                    vb.pp("transformer_blocks").pp(i.to_string()),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(s.groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// Its transformer blocks, in order.
    pub fn blocks_mut(&mut self) -> impl Iterator<Item = &mut BasicTransformerBlock> {
        self.blocks.iter_mut()
    }

    /// Normalises and projects `x` to tokens, runs the transformer blocks and projects back, adding
    /// the input.
    pub fn forward(&self, x: &Tensor, context: Context<'_, '_>) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .permute((0, 2, 3, 1))?
            .reshape((b, h * w, c))?;
        let mut t = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let t = self.proj_out.forward(&t)?;
        t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))? + x
    }
}

/// `CrossAttnDownBlock2D` (with transformers) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

/// Shape of one UNet level, as `get_down_block`/`get_up_block` receive it.
#[derive(Debug, Clone, Copy)]
pub struct LevelShape {
    /// Channels into the level.
    pub in_channels: usize,
    /// Channels out of the level.
    pub out_channels: usize,
    /// Width of the time embedding its resnets add.
    pub temb_channels: usize,
    /// Resnets (and transformers, with attention) in the level.
    pub layers: usize,
}

impl DownBlock {
    /// Its transformers (none in a block without attention).
    pub fn transformers_mut(&mut self) -> &mut [Transformer2DModel] {
        &mut self.attentions
    }

    /// Builds a level from `vb`: its resnets, its transformers when `attention` is given, and its
    /// downsampler unless it is the innermost.
    pub fn new(
        shape: LevelShape,
        attention: Option<&AttentionSpec>,
        downsample_padding: Option<usize>,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = try_vec(shape.layers, "the resnets of a level")?;
        let mut attentions = Vec::new();
        for i in 0..shape.layers {
            let in_ch = if i == 0 {
                shape.in_channels
            } else {
                shape.out_channels
            };
            resnets.push(ResnetBlock2D::new(
                in_ch,
                shape.out_channels,
                shape.temb_channels,
                1.0,
                s,
                vb.pp("resnets").pp(i.to_string()),
            )?);
            if let Some(spec) = attention {
                attentions.push(Transformer2DModel::new(
                    shape.out_channels,
                    spec,
                    s,
                    vb.pp("attentions").pp(i.to_string()),
                )?);
            }
        }
        let downsampler = match downsample_padding {
            Some(padding) => Some(Downsample2D::new(
                shape.out_channels,
                padding,
                vb.pp("downsamplers").pp("0"),
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and the skip connections it contributes (one per resnet, plus
    /// the downsampled output).
    pub fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        context: Context<'_, '_>,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            skips.push(x.clone());
        }
        Ok((x, skips))
    }

    /// How many skip connections this block contributes.
    pub fn skip_count(&self) -> usize {
        self.resnets.len() + usize::from(self.downsampler.is_some())
    }
}

/// `UNetMidBlock2DCrossAttn` (resnet, then transformer + resnet per layer) or `UNetMidBlock2D`
/// without attention (a single resnet).
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// Its transformers (none in a block without attention).
    pub fn transformers_mut(&mut self) -> &mut [Transformer2DModel] {
        &mut self.attentions
    }

    /// Builds the middle block from `vb`: resnet, then transformer and resnet pairs (resnets only
    /// without attention).
    pub fn new(
        channels: usize,
        temb_channels: usize,
        output_scale_factor: f64,
        attention: Option<&AttentionSpec>,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnet = |i: usize| {
            ResnetBlock2D::new(
                channels,
                channels,
                temb_channels,
                output_scale_factor,
                s,
                vb.pp("resnets").pp(i.to_string()),
            )
        };
        let mut resnets = vec![resnet(0)?];
        let mut attentions = Vec::new();
        if let Some(spec) = attention {
            attentions.push(Transformer2DModel::new(
                channels,
                spec,
                s,
                vb.pp("attentions").pp("0"),
            )?);
            resnets.push(resnet(1)?);
        }
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// Runs the middle block on `x` with the time embedding and the context.
    pub fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        context: Context<'_, '_>,
    ) -> candle_core::Result<Tensor> {
        let mut x = self.resnets[0].forward(x, temb_act)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = attn.forward(&x, context)?;
            x = resnet.forward(&x, temb_act)?;
        }
        Ok(x)
    }
}

/// `CrossAttnUpBlock2D` (with transformers) or `UpBlock2D` (without).
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// Its transformers (none in a block without attention).
    pub fn transformers_mut(&mut self) -> &mut [Transformer2DModel] {
        &mut self.attentions
    }

    /// `shape.in_channels` is the channel count of the deepest skip this block consumes
    /// (diffusers' `in_channels`), `prev_channels` that of the block below.
    pub fn new(
        shape: LevelShape,
        prev_channels: usize,
        attention: Option<&AttentionSpec>,
        add_upsample: bool,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = try_vec(shape.layers, "the resnets of a level")?;
        let mut attentions = Vec::new();
        for i in 0..shape.layers {
            let skip_ch = if i + 1 == shape.layers {
                shape.in_channels
            } else {
                shape.out_channels
            };
            let in_ch = if i == 0 {
                prev_channels
            } else {
                shape.out_channels
            };
            resnets.push(ResnetBlock2D::new(
                in_ch + skip_ch,
                shape.out_channels,
                shape.temb_channels,
                1.0,
                s,
                vb.pp("resnets").pp(i.to_string()),
            )?);
            if let Some(spec) = attention {
                attentions.push(Transformer2DModel::new(
                    shape.out_channels,
                    spec,
                    s,
                    vb.pp("attentions").pp(i.to_string()),
                )?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(
                shape.out_channels,
                vb.pp("upsamplers").pp("0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// How many skip connections this block consumes.
    pub fn skip_count(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the last one backwards, as diffusers pops them.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb_act: &Tensor,
        context: Context<'_, '_>,
        upsample_size: Option<(usize, usize)>,
    ) -> candle_core::Result<Tensor> {
        if skips.len() != self.resnets.len() {
            candle_core::bail!(
                "up block expects {} skip connections, got {}",
                self.resnets.len(),
                skips.len()
            )
        }
        let mut x = x.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            x = Tensor::cat(&[&x, skip], 1)?;
            x = resnet.forward(&x, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, IndexOp, Storage};

    use super::*;

    /// The feed-forward in row chunks (what large maps take on the CPU, to keep the projection
    /// out of freshly mapped memory) gives what it gives in one piece: a batch of two, 37 rows
    /// each, in chunks of 7 rows (the last one shorter, and chunks across the batch's images).
    #[test]
    fn feed_forward_in_row_chunks_matches_one_piece() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (dim, inner) = (8, 32);
        let tensors: HashMap<String, Tensor> = [
            ("net.0.proj.weight", vec![2 * inner, dim]),
            ("net.0.proj.bias", vec![2 * inner]),
            ("net.2.weight", vec![dim, inner]),
            ("net.2.bias", vec![dim]),
        ]
        .into_iter()
        .map(|(name, shape)| Ok((name.to_string(), Tensor::randn(0f32, 0.5, shape, &dev)?)))
        .collect::<candle_core::Result<_>>()?;
        let (ff, _table) = recorded(&tensors, |vb| FeedForward::new(dim, vb));
        let x = Tensor::randn(0f32, 1.0, (2, 37, dim), &dev)?;
        let whole = ff.forward_rows(&x)?;
        let chunked = ff.forward_chunked(&x, 7)?;
        assert_eq!(chunked.dims(), &[2, 37, dim]);
        let max_abs = |t: &Tensor| t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>();
        let scale = max_abs(&whole)?;
        let err = max_abs(&(&chunked - &whole)?)?;
        assert!(scale > 0.1, "the outputs are not trivially small: {scale}");
        assert!(err <= 1e-6 * scale, "{err} of {scale}");
        Ok(())
    }

    /// Where a CPU f32 tensor's values start in memory.
    fn first_value(t: &Tensor) -> *const f32 {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(candle_core::CpuStorage::F32(values)) = &*storage else {
            panic!("a CPU f32 tensor");
        };
        values[layout.start_offset()..].as_ptr()
    }

    /// Builds with `tensors` recorded as the weights backend records what it hands out.
    fn recorded<M>(
        tensors: &HashMap<String, Tensor>,
        build: impl FnOnce(VarBuilder) -> Result<M>,
    ) -> (M, weight_table::WeightTable) {
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        weight_table::recording(|| {
            for (name, t) in tensors {
                weight_table::record(name, t);
            }
            build(vb)
        })
        .unwrap()
    }

    /// On the CPU a linear layer's values are laid out `[in, out]` (what the `gemm` crate reads
    /// without repacking), its output is `x·Wᵀ + b` as before, and the weight table records the
    /// layer's own storage (a view), not the checkpoint's tensor it let go of.
    #[test]
    fn linear_weights_lie_in_out_and_the_table_shares_them() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        let tensors = HashMap::from([
            ("l.weight".to_string(), w.clone()),
            ("l.bias".to_string(), b.clone()),
        ]);
        let (layer, table) = recorded(&tensors, |vb| linear(5, 6, vb.pp("l")));
        assert!(
            layer.weight().t().unwrap().is_contiguous(),
            "values laid out [in, out]"
        );
        assert!(same_values(&layer.weight().contiguous().unwrap(), &w));
        let recorded = table.get("l.weight").unwrap();
        assert_eq!(
            first_value(recorded),
            first_value(layer.weight()),
            "the table shares the layer's values"
        );
        assert_eq!(recorded.dims(), &[6, 5]);
        // The output is the same as with the checkpoint's layout, within rounding.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let want = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let err = (layer.forward(&x).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-5);
        // A layer built again from its own view (a rebuild for a LoRA) makes no copy.
        let again = Linear::new(layer.weight().clone(), None).unwrap();
        assert_eq!(first_value(again.weight()), first_value(layer.weight()));
    }

    /// The fused projections of self-attention (q, k, v) and cross-attention (k, v): the table
    /// records each checkpoint tensor as its rows of the layer's own values.
    #[test]
    fn fused_projections_are_recorded_as_views_of_the_layer() {
        let dev = Device::Cpu;
        let (dim, context) = (8, 4);
        for context_dim in [None, Some(context)] {
            let kv_dim = context_dim.unwrap_or(dim);
            let mut tensors = HashMap::new();
            for (leaf, width) in [("to_q", dim), ("to_k", kv_dim), ("to_v", kv_dim)] {
                tensors.insert(
                    format!("a.{leaf}.weight"),
                    Tensor::randn(0f32, 1.0, (dim, width), &dev).unwrap(),
                );
            }
            tensors.insert(
                "a.to_out.0.weight".into(),
                Tensor::randn(0f32, 1.0, (dim, dim), &dev).unwrap(),
            );
            tensors.insert(
                "a.to_out.0.bias".into(),
                Tensor::randn(0f32, 1.0, dim, &dev).unwrap(),
            );
            let (attention, table) = recorded(&tensors, |vb| {
                Attention::new(dim, context_dim, 2, 4, false, vb.pp("a"))
            });
            let fused = match &attention.to_kv {
                Some(kv) => kv.weight(),
                None => attention.to_q_or_qkv.weight(),
            };
            for (i, leaf) in ["to_k", "to_v"].iter().enumerate() {
                let name = format!("a.{leaf}.weight");
                let recorded = table.get(&name).unwrap();
                let rows = if context_dim.is_some() {
                    i * dim
                } else {
                    (i + 1) * dim
                };
                assert_eq!(
                    first_value(recorded),
                    first_value(&fused.i(rows..).unwrap()),
                    "{name}"
                );
                assert!(
                    same_values(&recorded.contiguous().unwrap(), &tensors[&name]),
                    "{name}"
                );
            }
            let q = table.get("a.to_q.weight").unwrap();
            assert_eq!(first_value(q), first_value(attention.to_q_or_qkv.weight()));
        }
    }
}
