//! Building blocks of diffusers' conditional UNet, shared by the UNet and the ControlNet.
//!
//! Weight names are diffusers' own (`resnets.0.norm1.weight`, `attentions.0.transformer_blocks.0
//! .attn1.to_q.weight`, …) so that a block is built from the [`VarBuilder`] prefix of its place in
//! the checkpoint. Numerics follow diffusers/PyTorch in f32: GroupNorm and LayerNorm statistics are
//! accumulated in f64 on the CPU and applied as `x·scale + shift` per channel like PyTorch's CPU
//! kernels; GEGLU uses the exact (erf) GELU; attention uses a scale of 1/√head_dim.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Module, Shape, Tensor, WithDType};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::{Error, Result};

/// Whether the CPU kernels of this file (fused norms, im2col convolution, in-place adds and
/// softmax) run for tensors on `device`. Other devices use candle's portable ops; setting
/// `SDSTREAM_PORTABLE_KERNELS=1` makes the CPU use them too, which lets that code path be checked
/// against the goldens without a GPU.
pub(crate) fn cpu_kernels(device: &candle_core::Device) -> bool {
    static PORTABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    device.is_cpu()
        && !*PORTABLE.get_or_init(|| {
            std::env::var_os("SDSTREAM_PORTABLE_KERNELS").is_some_and(|v| !v.is_empty() && v != "0")
        })
}

/// Activation functions that diffusers' `get_activation` can name in a UNet config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu` (exact, erf-based, as `torch.nn.GELU()`).
    Gelu,
    /// `relu`.
    Relu,
}

impl Activation {
    /// Parses an activation name from a config; `option` names the config field for the error.
    pub(crate) fn parse(name: &str, model: &str, option: &str) -> Result<Self> {
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

    pub(crate) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
            Self::Relu => x.relu(),
        }
    }
}

/// Settings every resnet and transformer of a UNet shares, taken from the model config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockSettings {
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
pub(crate) struct AttentionSpec {
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
// Normalisation
// ---------------------------------------------------------------------------------------------

/// GroupNorm over `[B, C, …]`, optionally followed by SiLU in the same pass.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub(crate) fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::UnsupportedConfig {
                model: "UNet".into(),
                option: "norm_num_groups".into(),
                detail: format!("{groups} groups do not divide {channels} channels"),
            });
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.run(x, false)
    }

    /// `silu(group_norm(x))`, the pre-activation every resnet uses.
    pub(crate) fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        if x.rank() < 3 {
            candle_core::bail!("GroupNorm expects [B, C, …], got {:?}", x.shape())
        }
        if cpu_kernels(x.device()) {
            let x = x.contiguous()?;
            return x.apply_op3_no_bwd(
                &self.weight,
                &self.bias,
                &GroupNormOp {
                    groups: self.groups,
                    eps: self.eps,
                    silu,
                },
            );
        }
        // GPU path: the same arithmetic from candle primitives, statistics in f32.
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let xs = x.reshape((b, self.groups, ()))?.to_dtype(DType::F32)?;
        let n = xs.dim(2)? as f64;
        let mean = (xs.sum_keepdim(2)? / n)?;
        let xs = xs.broadcast_sub(&mean)?;
        let var = (xs.sqr()?.sum_keepdim(2)? / n)?;
        let xs = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut wshape = vec![1usize; dims.len()];
        wshape[1] = c;
        let w = self.weight.to_dtype(DType::F32)?.reshape(wshape.clone())?;
        let bias = self.bias.to_dtype(DType::F32)?.reshape(wshape)?;
        let y = xs.reshape(dims)?.broadcast_mul(&w)?.broadcast_add(&bias)?;
        let y = if silu { y.silu()? } else { y };
        y.to_dtype(dtype)
    }
}

/// LayerNorm over the last dimension with affine weight and bias.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if cpu_kernels(x.device()) {
            let x = x.contiguous()?;
            return x.apply_op3_no_bwd(&self.weight, &self.bias, &LayerNormOp { eps: self.eps });
        }
        let x = x.contiguous()?;
        candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32)
    }
}

/// Runs `f(row_index, row)` over the rows of `dst`, spread over candle's CPU threads when the
/// work is big enough to pay for them.
fn for_each_row<T: Send>(dst: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    /// Below this many elements per thread, spawning costs more than it saves.
    const MIN_PER_THREAD: usize = 1 << 16;
    if row_len == 0 || dst.is_empty() {
        return;
    }
    let rows = dst.len().div_ceil(row_len);
    let threads = candle_core::utils::get_num_threads()
        .min(rows)
        .min(dst.len() / MIN_PER_THREAD)
        .max(1);
    if threads == 1 {
        for (i, row) in dst.chunks_mut(row_len).enumerate() {
            f(i, row);
        }
        return;
    }
    let per_thread = rows.div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let mut chunks = dst.chunks_mut(per_thread * row_len).enumerate();
        // The calling thread takes the first chunk itself.
        let first = chunks.next();
        for (t, chunk) in chunks {
            scope.spawn(move || {
                for (j, row) in chunk.chunks_mut(row_len).enumerate() {
                    f(t * per_thread + j, row);
                }
            });
        }
        if let Some((_, chunk)) = first {
            for (j, row) in chunk.chunks_mut(row_len).enumerate() {
                f(j, row);
            }
        }
    });
}

/// Mean and 1/√(var + eps) of a slice, accumulated in f64 (two passes, like a Welford result).
fn moments<T: WithDType>(xs: &[T], eps: f64) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = xs
        .iter()
        .map(|v| {
            let d = v.to_f64() - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused norm: operand is not contiguous"),
    }
}

#[inline]
fn silu_f32(y: f32) -> f32 {
    y / (1.0 + (-y).exp())
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        shape: &Shape,
        w: &[T],
        b: &[T],
    ) -> candle_core::Result<CpuStorage> {
        let dims = shape.dims();
        let channels = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let per_group = channels / self.groups;
        let row_len = per_group * spatial;
        let mut dst = vec![T::zero(); x.len()];
        for_each_row(&mut dst, row_len, |row, out| {
            let src = &x[row * row_len..(row + 1) * row_len];
            let (mean, rstd) = moments(src, self.eps);
            let (mean, rstd) = (mean as f32, rstd as f32);
            let first_channel = (row % self.groups) * per_group;
            for c in 0..per_group {
                // PyTorch's CPU GroupNorm: y = x·scale + shift with scale = rstd·γ, shift = β − scale·mean.
                let scale = rstd * w[first_channel + c].to_f64() as f32;
                let shift = b[first_channel + c].to_f64() as f32 - scale * mean;
                let range = c * spatial..(c + 1) * spatial;
                for (o, v) in out[range.clone()].iter_mut().zip(&src[range]) {
                    let y = v.to_f64() as f32 * scale + shift;
                    let y = if self.silu { silu_f32(y) } else { y };
                    *o = T::from_f64(y as f64);
                }
            }
        });
        Ok(T::to_cpu_storage_owned(dst))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "sdstream-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        if !shape.dims()[1].is_multiple_of(self.groups)
            || l2.shape().elem_count() != shape.dims()[1]
        {
            candle_core::bail!(
                "GroupNorm: {} groups, weight {:?}, input {shape:?}",
                self.groups,
                l2.shape()
            )
        }
        let out = match s1.dtype() {
            DType::F32 => self.run::<f32>(
                contiguous_slice(s1, l1)?,
                &shape,
                contiguous_slice(s2, l2)?,
                contiguous_slice(s3, l3)?,
            )?,
            DType::F16 => self.run::<half::f16>(
                contiguous_slice(s1, l1)?,
                &shape,
                contiguous_slice(s2, l2)?,
                contiguous_slice(s3, l3)?,
            )?,
            DType::BF16 => self.run::<half::bf16>(
                contiguous_slice(s1, l1)?,
                &shape,
                contiguous_slice(s2, l2)?,
                contiguous_slice(s3, l3)?,
            )?,
            DType::F64 => self.run::<f64>(
                contiguous_slice(s1, l1)?,
                &shape,
                contiguous_slice(s2, l2)?,
                contiguous_slice(s3, l3)?,
            )?,
            other => candle_core::bail!("GroupNorm: unsupported dtype {other:?}"),
        };
        Ok((out, shape))
    }
}

struct LayerNormOp {
    eps: f64,
}

impl LayerNormOp {
    fn run<T: WithDType>(&self, x: &[T], dim: usize, w: &[T], b: &[T]) -> CpuStorage {
        let mut dst = vec![T::zero(); x.len()];
        for_each_row(&mut dst, dim, |row, out| {
            let src = &x[row * dim..(row + 1) * dim];
            let (mean, rstd) = moments(src, self.eps);
            let (mean, rstd) = (mean as f32, rstd as f32);
            for ((o, v), (g, be)) in out.iter_mut().zip(src).zip(w.iter().zip(b)) {
                let y = (v.to_f64() as f32 - mean) * rstd * g.to_f64() as f32 + be.to_f64() as f32;
                *o = T::from_f64(y as f64);
            }
        });
        T::to_cpu_storage_owned(dst)
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "sdstream-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let dim = shape.dims().last().copied().unwrap_or(0);
        if dim == 0 || l2.shape().elem_count() != dim {
            candle_core::bail!("LayerNorm: weight {:?} for input {shape:?}", l2.shape())
        }
        let out = match s1.dtype() {
            DType::F32 => self.run::<f32>(
                contiguous_slice(s1, l1)?,
                dim,
                contiguous_slice(s2, l2)?,
                contiguous_slice(s3, l3)?,
            ),
            DType::F16 => self.run::<half::f16>(
                contiguous_slice(s1, l1)?,
                dim,
                contiguous_slice(s2, l2)?,
                contiguous_slice(s3, l3)?,
            ),
            DType::BF16 => self.run::<half::bf16>(
                contiguous_slice(s1, l1)?,
                dim,
                contiguous_slice(s2, l2)?,
                contiguous_slice(s3, l3)?,
            ),
            DType::F64 => self.run::<f64>(
                contiguous_slice(s1, l1)?,
                dim,
                contiguous_slice(s2, l2)?,
                contiguous_slice(s3, l3)?,
            ),
            other => candle_core::bail!("LayerNorm: unsupported dtype {other:?}"),
        };
        Ok((out, shape))
    }
}

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

/// A linear layer `y = x·Wᵀ + b` over the last dimension. On the CPU the bias is added in place
/// into the fresh matmul output (one pass, no extra allocation).
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(
        vb.get((out_dim, in_dim), "weight")?,
        Some(vb.get(out_dim, "bias")?),
    ))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.t()?;
        let y = match *x.dims() {
            [b, n, k] if x.is_contiguous() => {
                x.reshape((b * n, k))?.matmul(&w)?.reshape((b, n, ()))?
            }
            [b, n, _] => x.matmul(&w.broadcast_left(b)?)?.reshape((b, n, ()))?,
            _ => x.matmul(&w)?,
        };
        match &self.bias {
            Some(bias) => add_fresh(y, bias, 1),
            None => Ok(y),
        }
    }
}

/// `fresh + other` with broadcasting, where `other` is either the same shape as `fresh` or
/// shaped to broadcast so that its element `i` covers runs of `inner` consecutive elements of
/// `fresh` (a `[N]` bias over the last dimension: `inner = 1`; a `[B, C, 1, 1]` shift of
/// `[B, C, H, W]`: `inner = H·W`).
///
/// On the CPU the sum is written into `fresh`'s buffer, so `fresh` must be a tensor the caller
/// just produced and shares with nothing (the output of a matmul or convolution).
pub(crate) fn add_fresh(
    fresh: Tensor,
    other: &Tensor,
    inner: usize,
) -> candle_core::Result<Tensor> {
    let same_shape = fresh.dims() == other.dims();
    let n = other.elem_count();
    let in_place = cpu_kernels(fresh.device())
        && fresh.is_contiguous()
        && other.is_contiguous()
        && fresh.dtype() == other.dtype()
        && n > 0
        && (same_shape || (inner > 0 && fresh.elem_count().is_multiple_of(n * inner)));
    if !in_place {
        return fresh.broadcast_add(other);
    }
    let inner = if same_shape { 1 } else { inner };
    fresh.inplace_op2(other, &AddInPlace { n, inner })?;
    Ok(fresh)
}

/// `dst[(j·n + i)·inner + k] += src[i]`.
struct AddInPlace {
    n: usize,
    inner: usize,
}

impl AddInPlace {
    fn run<T: WithDType>(&self, dst: &mut [T], src: &[T]) {
        let (n, inner) = (self.n, self.inner);
        const CHUNK: usize = 1 << 14;
        for_each_row(dst, CHUNK, |chunk_index, out| {
            let start = chunk_index * CHUNK;
            let mut i = (start / inner) % n;
            let mut k = start % inner;
            let mut pos = 0;
            while pos < out.len() {
                let run = (inner - k).min(out.len() - pos);
                let v = src[i];
                for o in &mut out[pos..pos + run] {
                    *o += v;
                }
                pos += run;
                k = 0;
                i = if i + 1 == n { 0 } else { i + 1 };
            }
        });
    }

    fn run_same<T: WithDType>(&self, dst: &mut [T], src: &[T]) {
        const CHUNK: usize = 1 << 14;
        for_each_row(dst, CHUNK, |chunk_index, out| {
            let start = chunk_index * CHUNK;
            let len = out.len();
            for (o, v) in out.iter_mut().zip(&src[start..start + len]) {
                *o += *v;
            }
        });
    }
}

impl candle_core::InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "sdstream-add-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("add-in-place: operands must be contiguous")
        };
        macro_rules! go {
            ($t:ty, $dst:expr, $src:expr) => {{
                let dst = &mut $dst[a0..a1];
                let src = &$src[b0..b1];
                if src.len() == dst.len() && self.inner == 1 {
                    self.run_same::<$t>(dst, src)
                } else {
                    self.run::<$t>(dst, src)
                }
            }};
        }
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => go!(f32, d, s),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => go!(half::f16, d, s),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => go!(half::bf16, d, s),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => go!(f64, d, s),
            _ => candle_core::bail!("add-in-place: unsupported or mismatched dtypes"),
        }
        Ok(())
    }
}

/// A 2-D convolution with bias. On the CPU it runs as im2col + one GEMM per call, with the
/// weights laid out once at load time as `[c_out, c_in·k·k + 1]` (the bias is the last column,
/// multiplied by a row of ones in the im2col matrix); on other devices it is candle's conv2d.
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    /// CPU: `[c_out, K + 1]` weights with the bias folded in.
    folded: Option<Tensor>,
    /// Other devices: candle's convolution.
    conv: Option<candle_nn::Conv2d>,
    kernel: usize,
    stride: usize,
    padding: usize,
}

/// im2col matrices above this many bytes are built one batch row at a time.
const IM2COL_BUDGET: usize = 128 << 20;

pub(crate) fn conv2d(
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let weight = vb.get((out_ch, in_ch, kernel, kernel), "weight")?;
    let bias = vb.get(out_ch, "bias")?;
    let (folded, conv) = if cpu_kernels(vb.device()) {
        let w = weight.reshape((out_ch, in_ch * kernel * kernel))?;
        (
            Some(Tensor::cat(&[&w, &bias.reshape((out_ch, 1))?], 1)?),
            None,
        )
    } else {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        (None, Some(candle_nn::Conv2d::new(weight, Some(bias), cfg)))
    };
    Ok(Conv2d {
        folded,
        conv,
        kernel,
        stride,
        padding,
    })
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(w) = &self.folded else {
            return match &self.conv {
                Some(conv) => conv.forward(x),
                None => candle_core::bail!("conv2d has no weights"),
            };
        };
        let (b, c, h, wd) = x.dims4()?;
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        if h + 2 * p < k || wd + 2 * p < k {
            candle_core::bail!("conv2d: input {h}x{wd} is smaller than the {k}x{k} kernel")
        }
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
        let rows = c * k * k + 1;
        if w.dim(1)? != rows {
            candle_core::bail!(
                "conv2d: {c} input channels, weights expect {}",
                (w.dim(1)? - 1) / (k * k)
            )
        }
        let op = Im2Col {
            kernel: k,
            stride: s,
            padding: p,
        };
        let x = x.contiguous()?;
        let bytes = b * rows * ho * wo * x.dtype().size_in_bytes();
        let per_row = |x: &Tensor| -> candle_core::Result<Tensor> {
            let n = x.dim(0)?;
            let cols = x.apply_op1_no_bwd(&op)?;
            w.broadcast_left(n)?.matmul(&cols)?.reshape((n, (), ho, wo))
        };
        if b == 1 || bytes <= IM2COL_BUDGET {
            per_row(&x)
        } else {
            let parts = (0..b)
                .map(|i| per_row(&x.narrow(0, i, 1)?))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        }
    }
}

/// `[B, C, H, W]` → `[B, C·k·k + 1, Ho·Wo]`: the patches of a convolution, one row per
/// (channel, ky, kx) in PyTorch's weight order, plus a row of ones for the bias.
struct Im2Col {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    fn run<T: WithDType>(&self, x: &[T], dims: &[usize]) -> (Vec<T>, Shape) {
        let (b, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let rows = c * k * k + 1;
        let row_len = ho * wo;
        let mut dst = vec![T::zero(); b * rows * row_len];
        for_each_row(&mut dst, row_len, |r, out| {
            let (batch, row) = (r / rows, r % rows);
            if row == rows - 1 {
                out.fill(T::one());
                return;
            }
            let (ci, ky, kx) = (row / (k * k), (row / k) % k, row % k);
            let plane = &x[(batch * c + ci) * h * w..(batch * c + ci + 1) * h * w];
            // Output columns whose input column ox·s + kx − p lies inside [0, w).
            let ox_start = (p.saturating_sub(kx)).div_ceil(s);
            let ox_end = ((w + p).saturating_sub(kx)).div_ceil(s).min(wo);
            for oy in 0..ho {
                let iy = (oy * s + ky) as isize - p as isize;
                if iy < 0 || iy >= h as isize || ox_start >= ox_end {
                    continue; // stays zero (padding)
                }
                let src_row = &plane[iy as usize * w..(iy as usize + 1) * w];
                let dst_row = &mut out[oy * wo..(oy + 1) * wo];
                let ix0 = ox_start * s + kx - p;
                if s == 1 {
                    let n = ox_end - ox_start;
                    dst_row[ox_start..ox_end].copy_from_slice(&src_row[ix0..ix0 + n]);
                } else {
                    for (j, d) in dst_row[ox_start..ox_end].iter_mut().enumerate() {
                        *d = src_row[ix0 + j * s];
                    }
                }
            }
        });
        (dst, Shape::from_dims(&[b, rows, row_len]))
    }
}

impl candle_core::CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "sdstream-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims().to_vec();
        if dims.len() != 4 {
            candle_core::bail!("im2col expects [B, C, H, W], got {:?}", l.shape())
        }
        Ok(match s.dtype() {
            DType::F32 => {
                let (v, sh) = self.run::<f32>(contiguous_slice(s, l)?, &dims);
                (f32::to_cpu_storage_owned(v), sh)
            }
            DType::F16 => {
                let (v, sh) = self.run::<half::f16>(contiguous_slice(s, l)?, &dims);
                (half::f16::to_cpu_storage_owned(v), sh)
            }
            DType::BF16 => {
                let (v, sh) = self.run::<half::bf16>(contiguous_slice(s, l)?, &dims);
                (half::bf16::to_cpu_storage_owned(v), sh)
            }
            DType::F64 => {
                let (v, sh) = self.run::<f64>(contiguous_slice(s, l)?, &dims);
                (f64::to_cpu_storage_owned(v), sh)
            }
            other => candle_core::bail!("im2col: unsupported dtype {other:?}"),
        })
    }
}

/// A 1×1 convolution loaded as the equivalent linear map over channels, applied to tokens
/// `[B, HW, C]`; the transformers' `proj_in`/`proj_out` when `use_linear_projection` is false.
fn pointwise_as_linear(in_ch: usize, out_ch: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb
        .get((out_ch, in_ch, 1, 1), "weight")?
        .reshape((out_ch, in_ch))?;
    let b = vb.get(out_ch, "bias")?;
    Ok(Linear::new(w, Some(b)))
}

/// Sinusoidal timestep features, as diffusers' `get_timestep_embedding`, always in f32.
#[derive(Debug, Clone)]
pub(crate) struct SinusoidalTimesteps {
    /// `exp(-ln(10000)·i / (half − shift))`, `[1, half]`, f32.
    freqs: Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
}

impl SinusoidalTimesteps {
    pub(crate) fn new(
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
        let freqs: Vec<f32> = (0..half)
            .map(|i| ((log_period * i as f32) / divisor) as f64)
            .map(|e| e.exp() as f32)
            .collect();
        Ok(Self {
            freqs: Tensor::from_vec(freqs, (1, half), device)?,
            dim,
            flip_sin_to_cos,
        })
    }

    /// `[B]` timesteps (any dtype) → `[B, dim]` f32 features.
    pub(crate) fn forward(&self, timesteps: &Tensor) -> candle_core::Result<Tensor> {
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
pub(crate) struct TimestepEmbedding {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    pub(crate) fn new(
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
pub(crate) struct ResnetBlock2D {
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
    pub(crate) fn new(
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
    pub(crate) fn forward(&self, x: &Tensor, temb_act: &Tensor) -> candle_core::Result<Tensor> {
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
pub(crate) struct Downsample2D {
    conv: Conv2d,
    pad_end: bool,
}

impl Downsample2D {
    pub(crate) fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 2, padding, vb.pp("conv"))?,
            pad_end: padding == 0,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.pad_end {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest 2× (or to a given size), then 3×3 conv.
#[derive(Debug, Clone)]
pub(crate) struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub(crate) fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        size: Option<(usize, usize)>,
    ) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}

/// diffusers' `Attention` (to_q/to_k/to_v without bias, to_out.0 with bias), all heads batched
/// into one matmul. Self-attention projects q, k and v with one fused weight.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    /// Self-attention: `[q; k; v]` stacked. Cross-attention: q alone.
    to_q_or_qkv: Linear,
    /// Cross-attention only: `[k; v]` stacked.
    to_kv: Option<Linear>,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
    upcast: bool,
}

/// Attention scores above this many bytes are computed in slices of heads to bound memory.
const ATTENTION_SCORE_BUDGET: usize = 256 << 20;
/// On the CPU, score blocks stay under this size (below glibc's largest mmap threshold, so the
/// allocator reuses heap memory instead of faulting in fresh pages for every block).
const ATTENTION_BLOCK_BYTES_CPU: usize = 16 << 20;

/// Row-wise softmax of `scale·x` over the last dimension, in place, computed in f32.
struct ScaledSoftmax {
    scale: f64,
}

impl ScaledSoftmax {
    fn run<T: WithDType>(&self, data: &mut [T], width: usize) {
        let scale = self.scale as f32;
        for_each_row(data, width, |_, row| {
            // As PyTorch's CPU attention: x = scale·s (f32), then exp(x − max) / Σ.
            let max = row
                .iter()
                .map(|v| v.to_f64() as f32 * scale)
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in row.iter_mut() {
                let e = (v.to_f64() as f32 * scale - max).exp();
                sum += e;
                *v = T::from_f64(e as f64);
            }
            for v in row.iter_mut() {
                *v = T::from_f64((v.to_f64() as f32 / sum) as f64);
            }
        });
    }
}

impl candle_core::InplaceOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "sdstream-scaled-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("softmax: scores must be contiguous")
        };
        let width = l.shape().dims().last().copied().unwrap_or(1).max(1);
        match s {
            CpuStorage::F32(d) => self.run::<f32>(&mut d[a..b], width),
            CpuStorage::F16(d) => self.run::<half::f16>(&mut d[a..b], width),
            CpuStorage::BF16(d) => self.run::<half::bf16>(&mut d[a..b], width),
            CpuStorage::F64(d) => self.run::<f64>(&mut d[a..b], width),
            _ => candle_core::bail!("softmax: unsupported dtype"),
        }
        Ok(())
    }
}

impl Attention {
    pub(crate) fn new(
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
        let (to_q_or_qkv, to_kv) = if context_dim.is_none() {
            (Linear::new(Tensor::cat(&[&wq, &wk, &wv], 0)?, None), None)
        } else {
            (
                Linear::new(wq, None),
                Some(Linear::new(Tensor::cat(&[&wk, &wv], 0)?, None)),
            )
        };
        Ok(Self {
            to_q_or_qkv,
            to_kv,
            to_out: linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            upcast,
        })
    }

    /// `x`: `[B, N, C]`; `context`: `[B, M, D]` for cross-attention (ignored for self-attention).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (h, d) = (self.heads, self.head_dim);
        // Heads-major layout [·, B, H, tokens, d] so that every (batch, head) pair is one matmul.
        let (q, k, v, m) = match (&self.to_kv, context) {
            (None, _) => {
                let qkv = self.to_q_or_qkv.forward(x)?;
                let qkv = qkv
                    .reshape((b, n, 3, h, d))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()?;
                (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?, n)
            }
            (Some(to_kv), Some(ctx)) => {
                let m = ctx.dim(1)?;
                let q = self.to_q_or_qkv.forward(x)?;
                let q = q.reshape((b, n, h, d))?.transpose(1, 2)?.contiguous()?;
                let kv = to_kv.forward(ctx)?;
                let kv = kv
                    .reshape((b, m, 2, h, d))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()?;
                (q, kv.get(0)?, kv.get(1)?, m)
            }
            (Some(_), None) => candle_core::bail!("cross-attention called without a context"),
        };
        let q = q.reshape((b * h, n, d))?;
        let k = k.reshape((b * h, m, d))?;
        let v = v.reshape((b * h, m, d))?;

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
            self.attend(&q, &k, &v)?
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
        let out = out
            .reshape((b, h, n, d))?
            .transpose(1, 2)?
            .reshape((b, n, h * d))?;
        self.to_out.forward(&out)
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
        let scores = q.matmul(&k.t()?)?;
        let probs = if cpu_kernels(scores.device()) && scores.is_contiguous() {
            // In place on the fresh scores.
            scores.inplace_op1(&ScaledSoftmax { scale: self.scale })?;
            scores
        } else {
            candle_nn::ops::softmax_last_dim(&(scores * self.scale)?)?
        };
        let probs = if upcast {
            probs.to_dtype(dtype)?
        } else {
            probs
        };
        probs.matmul(v)
    }
}

/// diffusers' `FeedForward` with GEGLU: `net.0.proj` (→ 2·inner), exact GELU gate, `net.2`.
#[derive(Debug, Clone)]
pub(crate) struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    pub(crate) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: linear(dim, 2 * inner, vb.pp("net").pp("0").pp("proj"))?,
            out: linear(inner, dim, vb.pp("net").pp("2"))?,
            inner,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let hg = self.proj.forward(x)?;
        let gated = if cpu_kernels(hg.device()) && hg.is_contiguous() {
            hg.apply_op1_no_bwd(&Geglu)?
        } else {
            let hidden = hg.narrow(D::Minus1, 0, self.inner)?;
            let gate = hg.narrow(D::Minus1, self.inner, self.inner)?;
            (hidden * gate.gelu_erf()?)?
        };
        self.out.forward(&gated)
    }
}

/// `[…, 2n]` → `[…, n]`: first half × exact GELU(second half), in one pass (diffusers' GEGLU).
struct Geglu;

impl Geglu {
    fn run<T: WithDType>(x: &[T], width: usize) -> Vec<T> {
        let half = width / 2;
        let mut dst = vec![T::zero(); x.len() / 2];
        for_each_row(&mut dst, half, |row, out| {
            let src = &x[row * width..(row + 1) * width];
            let (hidden, gate) = src.split_at(half);
            for ((o, h), g) in out.iter_mut().zip(hidden).zip(gate) {
                // f32 arithmetic as PyTorch's CPU GELU: x·0.5·(1 + erf(x·√½)), then × hidden.
                let g = g.to_f64() as f32;
                let gelu = g
                    * 0.5
                    * (1.0 + candle_core::cpu::erf::erf_f32(g * std::f32::consts::FRAC_1_SQRT_2));
                *o = T::from_f64((h.to_f64() as f32 * gelu) as f64);
            }
        });
        dst
    }
}

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "sdstream-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut dims = l.shape().dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width == 0 || !width.is_multiple_of(2) {
            candle_core::bail!("GEGLU: last dimension {width} is not even")
        }
        if let Some(last) = dims.last_mut() {
            *last = width / 2;
        }
        let storage = match s.dtype() {
            DType::F32 => {
                f32::to_cpu_storage_owned(Self::run::<f32>(contiguous_slice(s, l)?, width))
            }
            DType::F16 => half::f16::to_cpu_storage_owned(Self::run::<half::f16>(
                contiguous_slice(s, l)?,
                width,
            )),
            DType::BF16 => half::bf16::to_cpu_storage_owned(Self::run::<half::bf16>(
                contiguous_slice(s, l)?,
                width,
            )),
            DType::F64 => {
                f64::to_cpu_storage_owned(Self::run::<f64>(contiguous_slice(s, l)?, width))
            }
            other => candle_core::bail!("GEGLU: unsupported dtype {other:?}"),
        };
        Ok((storage, Shape::from_dims(&dims)))
    }
}

/// diffusers' `BasicTransformerBlock` (layer_norm type): self-attn, cross-attn, GEGLU MLP.
#[derive(Debug, Clone)]
pub(crate) struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub(crate) fn new(
        dim: usize,
        spec: &AttentionSpec,
        upcast: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
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
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let ctx1 = self.only_cross_attention.then_some(context);
        let x = add_fresh(self.attn1.forward(&self.norm1.forward(x)?, ctx1)?, x, 1)?;
        let x = add_fresh(
            self.attn2
                .forward(&self.norm2.forward(&x)?, Some(context))?,
            &x,
            1,
        )?;
        add_fresh(self.ff.forward(&self.norm3.forward(&x)?)?, &x, 1)
    }
}

/// diffusers' `Transformer2DModel` over continuous input: GroupNorm (eps 1e-6), proj_in,
/// transformer blocks on `[B, HW, C]` tokens, proj_out, residual.
#[derive(Debug, Clone)]
pub(crate) struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl Transformer2DModel {
    pub(crate) fn new(
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

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
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
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

/// Shape of one UNet level, as `get_down_block`/`get_up_block` receive it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LevelShape {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: usize,
    pub layers: usize,
}

impl DownBlock {
    pub(crate) fn new(
        shape: LevelShape,
        attention: Option<&AttentionSpec>,
        downsample_padding: Option<usize>,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(shape.layers);
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
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
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
    pub(crate) fn skip_count(&self) -> usize {
        self.resnets.len() + usize::from(self.downsampler.is_some())
    }
}

/// `UNetMidBlock2DCrossAttn` (resnet, then transformer + resnet per layer) or `UNetMidBlock2D`
/// without attention (a single resnet).
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub(crate) fn new(
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

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
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
pub(crate) struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `shape.in_channels` is the channel count of the deepest skip this block consumes
    /// (diffusers' `in_channels`), `prev_channels` that of the block below.
    pub(crate) fn new(
        shape: LevelShape,
        prev_channels: usize,
        attention: Option<&AttentionSpec>,
        add_upsample: bool,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(shape.layers);
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
    pub(crate) fn skip_count(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the last one backwards, as diffusers pops them.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb_act: &Tensor,
        context: &Tensor,
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
