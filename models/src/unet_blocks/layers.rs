//! The primitive layers the blocks are made of: linear and convolution layers (1×1 convolutions
//! stored as linears), and the sinusoidal timestep embedding.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::Result;
use crate::kernels::conv::{Conv2d, Padding};
use crate::kernels::ops::{self, add_fresh, transposed};
use crate::kernels::{cpu_kernels, gemm_bf16};
use crate::try_vec;
use crate::weight_table;

use super::Activation;

/// A linear layer `y = x·Wᵀ + b` over the last dimension. On the CPU the bias is added in place
/// into the fresh matmul output (one pass, no extra allocation).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`; on the CPU kernels a view of `[in, out]` values (see [`Linear::new`]).
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
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

impl Linear {
    /// `x·Wᵀ + b + residual` (`residual` the output's shape): on a CUDA device with the kernel
    /// policy's `cuda_fused_linear`, the bias and the residual in the product's epilogue
    /// ([`ops::linear_fused`]); else the product, then the adds.
    pub fn forward_residual(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if let Some(bias) = &self.bias
            && let Some(y) = ops::linear_fused(x, &self.weight, bias, residual)?
        {
            return Ok(y);
        }
        let y = self.product(x)?;
        let dtype = y.dtype();
        let y = match &self.bias {
            // The bf16 product is f32 whatever the bias's type (`to_dtype` to the bias's own
            // type is a clone of the handle).
            Some(bias) => add_fresh(y, &bias.to_dtype(dtype)?, 1)?,
            None => y,
        };
        match residual {
            Some(residual) => add_fresh(y, residual, 1),
            None => Ok(y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_residual(x, None)
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
pub(super) fn pointwise_as_linear(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Linear> {
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
