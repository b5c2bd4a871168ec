//! GroupNorm (optionally fused with SiLU) and LayerNorm.
//!
//! The CPU kernels follow PyTorch's CPU kernels: statistics per group (or row) in two passes with
//! f64 accumulators, then one pass writing `x·scale + shift` in f32 with `scale = γ/σ` and
//! `shift = β − scale·μ` per channel, the activation applied on the same value. The portable
//! path composes the same formula from candle ops with f32 statistics.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor, WithDType};
use candle_nn::VarBuilder;

use super::ops::{add_fresh, add_fresh_per_batch};
use super::{
    contiguous_slice, cpu_kernels, cuda_kernels, for_each_row, with_float_type, zeroed_buffer,
};

/// torch's `nn.GroupNorm(num_groups, num_channels, eps, affine=True)` over `[B, C, …]` tensors.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    /// Whether inputs are `[B, …, C]` ([`GroupNorm::into_channels_last`]).
    channels_last: bool,
}

impl GroupNorm {
    /// Reads `weight` and `bias` (`[channels]`) from `vb`.
    pub fn new(
        groups: usize,
        channels: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "GroupNorm at {}: {groups} groups do not divide {channels} channels",
                vb.prefix()
            );
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
            channels_last: false,
        })
    }

    /// The same normalisation over channels-last inputs (`[B, …, C]`, channels innermost), the
    /// layout of the networks that run channels-last convolutions
    /// ([`super::conv::Conv2d::into_channels_last`]).
    pub fn into_channels_last(self) -> Self {
        Self {
            channels_last: true,
            ..self
        }
    }

    /// torch's `nn.InstanceNorm2d(channels, eps)` (no affine parameters, no running
    /// statistics): a GroupNorm with one group per channel, weight 1 and bias 0.
    pub fn instance(
        channels: usize,
        eps: f64,
        dtype: DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: Tensor::ones(channels, dtype, device)?,
            bias: Tensor::zeros(channels, dtype, device)?,
            groups: channels,
            eps,
            channels_last: false,
        })
    }

    /// `GroupNorm(x)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.run(x, false)
    }

    /// `SiLU(GroupNorm(x))` in one pass: the pre-activation of every resnet.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.run(x, true)
    }

    /// `GroupNorm(x + add)`, then SiLU when `silu`, where `add` holds each image's value per
    /// channel (`[B, C]`: a resnet's time embedding) broadcast over its map. Where group_norm.cu's
    /// `_rows` kernels run (channels last on a CUDA device, kernel policy `cuda_group_norm_rows`)
    /// they add it as they read, rounding the sum to the storage type as the separate add does:
    /// the same bits without a pass over the map of its own. Elsewhere `x` (consumed: a fresh
    /// map its caller made, written in place) takes that add first.
    pub fn forward_with_added(
        &self,
        x: Tensor,
        add: &Tensor,
        silu: bool,
    ) -> candle_core::Result<Tensor> {
        let channels = self.weight.dim(0)?;
        let (batch, rank) = (x.dim(0)?, x.rank());
        if add.dims() != [batch, channels] || rank < 3 {
            candle_core::bail!(
                "GroupNorm over {channels} channels: an add of {:?} for an input {:?}",
                add.shape(),
                x.shape()
            );
        }
        if self.rows_take_add(&x, add) {
            let op = GroupNormChannelsLastOp {
                groups: self.groups,
                eps: self.eps,
                silu,
                add: Some(if per_image_row_stride(add.layout()).is_some() {
                    add.clone()
                } else {
                    add.contiguous()?
                }),
            };
            return x
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        let mut per_image = vec![1usize; rank];
        per_image[0] = batch;
        let summed = if self.channels_last {
            per_image[rank - 1] = channels;
            add_fresh_per_batch(x, &add.reshape(per_image)?.contiguous()?, 1)?
        } else {
            per_image[1] = channels;
            let spatial: usize = x.dims()[2..].iter().product();
            add_fresh(x, &add.reshape(per_image)?.contiguous()?, spatial)?
        };
        self.run(&summed, silu)
    }

    /// Whether the `_rows` kernels normalise `x` (channels last) with `add` in their reads.
    fn rows_take_add(&self, x: &Tensor, add: &Tensor) -> bool {
        if !(self.channels_last
            && cuda_kernels(x.device())
            && crate::KernelPolicy::current().cuda_group_norm_rows
            && x.dtype() == self.weight.dtype()
            && add.dtype() == x.dtype()
            && add.device().same_device(x.device()))
        {
            return false;
        }
        // The layout the kernels will read: x's own, or a fresh copy's.
        let layout = if x.is_contiguous() {
            x.layout().clone()
        } else {
            Layout::contiguous(x.shape())
        };
        RowsGeometry::of_layout(&layout, self.groups).is_some()
    }

    fn run(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        if self.channels_last {
            return self.run_channels_last(x, silu);
        }
        let channels = self.weight.dim(0)?;
        if x.rank() < 3 || x.dim(1)? != channels {
            candle_core::bail!(
                "GroupNorm over {channels} channels expects [B, {channels}, …], got {:?}",
                x.shape()
            );
        }
        let own_cuda_kernel = cuda_kernels(x.device()) && x.dtype() == self.weight.dtype();
        if cpu_kernels(x.device()) || own_cuda_kernel {
            let op = GroupNormOp {
                groups: self.groups,
                eps: self.eps,
                silu,
            };
            return x
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        self.portable(x, silu)
    }

    fn run_channels_last(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let channels = self.weight.dim(0)?;
        let rank = x.rank();
        if rank < 3 || x.dim(rank - 1)? != channels {
            candle_core::bail!(
                "GroupNorm over {channels} channels (channels last) expects [B, …, {channels}], \
                 got {:?}",
                x.shape()
            );
        }
        let own_cuda_kernel = cuda_kernels(x.device()) && x.dtype() == self.weight.dtype();
        if cpu_kernels(x.device()) || own_cuda_kernel {
            let op = GroupNormChannelsLastOp {
                groups: self.groups,
                eps: self.eps,
                silu,
                add: None,
            };
            return x
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        // Elsewhere: channels first around the other kernels.
        let to_first: Vec<usize> = [0, rank - 1].into_iter().chain(1..rank - 1).collect();
        let to_last: Vec<usize> = [0].into_iter().chain(2..rank).chain([1]).collect();
        let first = Self {
            channels_last: false,
            ..self.clone()
        };
        first
            .run(&x.permute(to_first)?, silu)?
            .permute(to_last)?
            .contiguous()
    }

    /// The portable twin, whatever the device (for checking a device's own kernel against it).
    #[doc(hidden)]
    pub fn forward_portable(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        self.portable(x, silu)
    }

    /// The same arithmetic from candle ops, in f32 for every dtype but f64.
    fn portable(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let dtype = x.dtype();
        let internal = if dtype == DType::F64 {
            dtype
        } else {
            DType::F32
        };
        let xs = x.reshape((dims[0], self.groups, ()))?.to_dtype(internal)?;
        let n = xs.dim(2)? as f64;
        let mean = (xs.sum_keepdim(2)? / n)?;
        let xs = xs.broadcast_sub(&mean)?;
        let var = (xs.sqr()?.sum_keepdim(2)? / n)?;
        let xs = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut affine_shape = vec![1usize; dims.len()];
        affine_shape[1] = dims[1];
        let weight = self
            .weight
            .to_dtype(internal)?
            .reshape(affine_shape.clone())?;
        let bias = self.bias.to_dtype(internal)?.reshape(affine_shape)?;
        let y = xs
            .reshape(dims)?
            .broadcast_mul(&weight)?
            .broadcast_add(&bias)?;
        let y = if silu { y.silu()? } else { y };
        y.to_dtype(dtype)
    }
}

/// LayerNorm over the last dimension with affine weight and bias (torch's `nn.LayerNorm(dim)`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Reads `weight` and `bias` (`[dim]`) from `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let op = LayerNormOp { eps: self.eps };
        if cpu_kernels(x.device()) || self.own_cuda_kernel(&x) {
            return x.apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32)
    }
}

impl LayerNorm {
    /// Whether layer_norm.cu's kernel takes `x` (contiguous): on a CUDA device under the kernel
    /// policy `cuda_layer_norm`, with the weight's dtype, a row the kernel holds
    /// ([`layer_norm_chunks`]) and every operand starting on 16 bytes. Elsewhere candle's
    /// kernel runs, as it always did.
    fn own_cuda_kernel(&self, x: &Tensor) -> bool {
        cuda_kernels(x.device())
            && crate::KernelPolicy::current().cuda_layer_norm
            && layer_norm_kernel_takes(
                [x.dtype(), self.weight.dtype(), self.bias.dtype()],
                [x.layout(), self.weight.layout(), self.bias.layout()],
            )
            .is_some()
    }
}

/// Whether layer_norm.cu's kernel takes the contiguous input, weight and bias of these dtypes
/// and layouts, and with how many runs a lane ([`layer_norm_chunks`]): one dtype, weight and
/// bias as wide as a row, fewer than 2³¹ values, every operand starting on 16 bytes. The one
/// rule `LayerNorm::own_cuda_kernel` chooses by and the launch checks.
fn layer_norm_kernel_takes(dtypes: [DType; 3], layouts: [&Layout; 3]) -> Option<usize> {
    let dtype = dtypes[0];
    let [x, weight, bias] = layouts;
    let dim = x.dims().last().copied().unwrap_or(0);
    let aligned = |l: &Layout| (l.start_offset() * dtype.size_in_bytes()).is_multiple_of(16);
    let fits = dtypes.iter().all(|&d| d == dtype)
        && weight.shape().elem_count() == dim
        && bias.shape().elem_count() == dim
        && x.shape().elem_count() <= i32::MAX as usize
        && layouts.into_iter().all(aligned);
    if fits {
        layer_norm_chunks(dtype, dim)
    } else {
        None
    }
}

/// The 16-byte runs a lane of layer_norm.cu's kernel holds for rows of `dim` values of `dtype`
/// (its `CHUNKS`, the smallest built power of two whose 32 lanes cover the row), or `None`
/// where it takes no such row: a width that is not a whole number of runs, or wider than
/// 2,048 values (the registers a lane has).
pub fn layer_norm_chunks(dtype: DType, dim: usize) -> Option<usize> {
    let width = match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 8,
        _ => return None,
    };
    let most = if width == 4 { 16 } else { 8 };
    if dim == 0 || !dim.is_multiple_of(width) {
        return None;
    }
    let chunks = (dim / width).div_ceil(32).next_power_of_two();
    (chunks <= most).then_some(chunks)
}

/// How many LayerNorms ran layer_norm.cu's kernel (kernel policy `cuda_layer_norm`; 0 without
/// the `cuda` feature), for tests.
pub fn layer_norm_kernel_calls() -> u64 {
    #[cfg(feature = "cuda")]
    return cuda::LAYER_NORM_CALLS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(feature = "cuda"))]
    0
}

/// Mean and 1/√(var + eps) of a slice, accumulated in f64 in two passes (robust to large means).
fn moments<T: WithDType>(xs: &[T], eps: f64) -> (f32, f32) {
    let n = xs.len() as f64;
    let mean = interleaved_sum(xs, |v| v) / n;
    let var = interleaved_sum(xs, |v| (v - mean) * (v - mean)) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// Σ `f(x)` over `xs` in f64, as eight interleaved partial sums added at the end: one running
/// sum waits on each add's latency (GroupNorm's moments were 2.5% of a bf16 UNet step at 512²,
/// perf). The order differs from a plain running sum by an f64 rounding or two, far below the
/// f32 the moments are rounded to.
#[inline(always)]
fn interleaved_sum<T: WithDType>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
    const PARTS: usize = 8;
    let mut parts = [0f64; PARTS];
    let chunks = xs.chunks_exact(PARTS);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (part, v) in parts.iter_mut().zip(chunk) {
            *part += f(v.to_f64());
        }
    }
    tail.iter()
        .fold(parts.iter().sum(), |sum, v| sum + f(v.to_f64()))
}

/// `xs` as f32 values when `T` is f32 (for the vectorised passes of kernels::simd).
fn as_f32<T: WithDType>(xs: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 (its dtype says so), so the slice's memory holds f32 values.
    (T::DTYPE == DType::F32)
        .then(|| unsafe { std::slice::from_raw_parts(xs.as_ptr().cast(), xs.len()) })
}

/// As [`as_f32`], mutably.
fn as_f32_mut<T: WithDType>(xs: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: as in `as_f32`; the borrow is the slice's own.
    (T::DTYPE == DType::F32)
        .then(|| unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast(), xs.len()) })
}

#[inline]
fn silu(y: f32) -> f32 {
    y / (1.0 + (-y).exp())
}

/// The GroupNorm kernel: input contiguous `[B, C, rest…]`, weight and bias `[C]`.
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    fn run<T: WithDType>(&self, x: &[T], shape: &Shape, weight: &[T], bias: &[T]) -> Vec<T> {
        let dims = shape.dims();
        let spatial: usize = dims[2..].iter().product();
        let per_group = dims[1] / self.groups;
        let group_len = per_group * spatial;
        let mut dst = zeroed_buffer::<T>(x.len());
        // One row of `dst` per (batch, group).
        for_each_row(&mut dst, group_len, |row, out| {
            let src = &x[row * group_len..(row + 1) * group_len];
            let (mean, rstd) = moments(src, self.eps);
            let first_channel = (row % self.groups) * per_group;
            for (c, (xc, yc)) in src.chunks(spatial).zip(out.chunks_mut(spatial)).enumerate() {
                let scale = rstd * weight[first_channel + c].to_f64() as f32;
                let shift = bias[first_channel + c].to_f64() as f32 - scale * mean;
                if let (Some(yc), Some(xc)) = (as_f32_mut(yc), as_f32(xc)) {
                    super::simd::affine_uniform(yc, xc, scale, shift, self.silu);
                } else if self.silu {
                    for (y, v) in yc.iter_mut().zip(xc) {
                        *y = T::from_f64(silu(v.to_f64() as f32 * scale + shift) as f64);
                    }
                } else {
                    for (y, v) in yc.iter_mut().zip(xc) {
                        *y = T::from_f64((v.to_f64() as f32 * scale + shift) as f64);
                    }
                }
            }
        });
        dst
    }
}

/// The GroupNorm kernel over channels-last input: contiguous `[B, pixels…, C]`, weight and bias
/// `[C]`. Same arithmetic as [`GroupNormOp`] (f64 statistics in two passes, an f32 affine
/// pass); each pass walks the image once for every group at a time, accumulating per channel,
/// so that no group's strided channels are gathered.
struct GroupNormChannelsLastOp {
    groups: usize,
    eps: f64,
    silu: bool,
    /// Each image's value per channel (`[B, C]`) added to the input before it is normalised,
    /// in the `_rows` kernels' reads ([`GroupNorm::forward_with_added`] attaches it only where
    /// they run).
    add: Option<Tensor>,
}

impl GroupNormChannelsLastOp {
    fn run<T: WithDType>(&self, x: &[T], shape: &Shape, weight: &[T], bias: &[T]) -> Vec<T> {
        let dims = shape.dims();
        let channels = dims[dims.len() - 1];
        let image_len: usize = dims[1..].iter().product();
        let pixels = image_len / channels.max(1);
        let per_group = channels / self.groups;
        let count = (pixels * per_group) as f64;
        let mut dst = zeroed_buffer::<T>(x.len());
        if dst.is_empty() {
            return dst;
        }
        // Rows of pixels handed to each thread at a time in the affine pass.
        let rows_per_chunk = (1 << 14) / channels.max(1) + 1;
        for (image, out) in x.chunks(image_len).zip(dst.chunks_mut(image_len)) {
            let group_of = |sums: &[f64]| -> Vec<f64> {
                sums.chunks(per_group)
                    .map(|g| g.iter().sum::<f64>() / count)
                    .collect()
            };
            let sums = per_channel_sums(image, channels, |_, v| v);
            let means = group_of(&sums);
            let channel_means: Vec<f64> = (0..channels).map(|c| means[c / per_group]).collect();
            let squares = per_channel_sums(image, channels, |c, v| {
                let d = v - channel_means[c];
                d * d
            });
            let vars = group_of(&squares);
            let (scale, shift): (Vec<f32>, Vec<f32>) = (0..channels)
                .map(|c| {
                    let g = c / per_group;
                    let (mean, rstd) =
                        (means[g] as f32, (1.0 / (vars[g] + self.eps).sqrt()) as f32);
                    let scale = rstd * weight[c].to_f64() as f32;
                    (scale, bias[c].to_f64() as f32 - scale * mean)
                })
                .unzip();
            for_each_row(out, rows_per_chunk * channels, |chunk, ys| {
                let xs = &image[chunk * rows_per_chunk * channels..][..ys.len()];
                if let (Some(ys), Some(xs)) = (as_f32_mut(ys), as_f32(xs)) {
                    super::simd::affine_per_channel(ys, xs, &scale, &shift, self.silu);
                    return;
                }
                for (y_px, x_px) in ys.chunks_exact_mut(channels).zip(xs.chunks_exact(channels)) {
                    for (((y, v), &a), &b) in y_px.iter_mut().zip(x_px).zip(&scale).zip(&shift) {
                        let z = v.to_f64() as f32 * a + b;
                        *y = T::from_f64(if self.silu { silu(z) } else { z } as f64);
                    }
                }
            });
        }
        dst
    }
}

/// Σ over the pixels of `f(channel, value)` per channel, in f64, split over threads by pixels.
fn per_channel_sums<T: WithDType>(
    image: &[T],
    channels: usize,
    f: impl Fn(usize, f64) -> f64 + Sync,
) -> Vec<f64> {
    let pixels = image.len() / channels;
    let threads = super::thread_count(pixels, image.len());
    let per_thread = pixels.div_ceil(threads);
    let partial = |range: std::ops::Range<usize>| {
        let mut acc = vec![0f64; channels];
        for px in image[range.start * channels..range.end * channels].chunks_exact(channels) {
            for (c, (a, v)) in acc.iter_mut().zip(px).enumerate() {
                *a += f(c, v.to_f64());
            }
        }
        acc
    };
    let parts: Vec<std::sync::Mutex<Vec<f64>>> = (0..threads).map(|_| Default::default()).collect();
    super::pool::run(threads, &|t| {
        let range = (t * per_thread).min(pixels)..((t + 1) * per_thread).min(pixels);
        *parts[t].lock().unwrap_or_else(|e| e.into_inner()) = partial(range);
    });
    let parts = parts
        .into_iter()
        .map(|p| p.into_inner().unwrap_or_else(|e| e.into_inner()));
    let mut total = vec![0f64; channels];
    for part in parts {
        for (t, p) in total.iter_mut().zip(part) {
            *t += p;
        }
    }
    total
}

impl CustomOp3 for GroupNormChannelsLastOp {
    fn name(&self) -> &'static str {
        "sdstream-group-norm-channels-last"
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
        if self.add.is_some() {
            candle_core::bail!(
                "{}: the per-image add runs in CUDA's `_rows` kernels only",
                self.name()
            )
        }
        group_norm_cpu_fwd(self, (s1, l1), (s2, l2), (s3, l3))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        group_norm_cuda_fwd(self, (s1, l1), (s2, l2), (s3, l3))
    }
}

/// Checks the input's channels (where `Op`'s layout keeps them) against the groups, the weight
/// and the bias.
fn check_groups<Op: GroupNormLayout>(
    op: &Op,
    shape: &Shape,
    l2: &Layout,
    l3: &Layout,
) -> candle_core::Result<()> {
    let channels = Op::channels(shape);
    if op.groups() == 0
        || !channels.is_multiple_of(op.groups())
        || l2.shape().elem_count() != channels
        || l3.shape().elem_count() != channels
    {
        candle_core::bail!(
            "{}: {} groups, weight {:?}, bias {:?}, input {shape:?}",
            Op::LAYOUT,
            op.groups(),
            l2.shape(),
            l3.shape()
        )
    }
    Ok(())
}

/// What the two GroupNorm layouts' forwards differ in: where the channels are, and the pass.
trait GroupNormLayout: CustomOp3 {
    /// How the layout is named in a shape error.
    const LAYOUT: &'static str;
    /// Whether the channels are last (`[B, …, C]`), as the CUDA kernel's entry points ask.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    const CHANNELS_LAST: bool;
    fn groups(&self) -> usize;
    /// `(eps, silu)`, for the CUDA kernel.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn eps_silu(&self) -> (f64, bool);
    /// The input's channel count.
    fn channels(shape: &Shape) -> usize;
    /// Each image's value per channel to add to the input first (channels last only).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn per_image_add(&self) -> Option<&Tensor> {
        None
    }
    fn run<T: WithDType>(&self, x: &[T], shape: &Shape, weight: &[T], bias: &[T]) -> Vec<T>;
}

impl GroupNormLayout for GroupNormOp {
    const LAYOUT: &'static str = "GroupNorm";
    const CHANNELS_LAST: bool = false;
    fn groups(&self) -> usize {
        self.groups
    }
    fn eps_silu(&self) -> (f64, bool) {
        (self.eps, self.silu)
    }
    fn channels(shape: &Shape) -> usize {
        shape.dims()[1]
    }
    fn run<T: WithDType>(&self, x: &[T], shape: &Shape, weight: &[T], bias: &[T]) -> Vec<T> {
        GroupNormOp::run(self, x, shape, weight, bias)
    }
}

impl GroupNormLayout for GroupNormChannelsLastOp {
    const LAYOUT: &'static str = "GroupNorm (channels last)";
    const CHANNELS_LAST: bool = true;
    fn groups(&self) -> usize {
        self.groups
    }
    fn eps_silu(&self) -> (f64, bool) {
        (self.eps, self.silu)
    }
    fn channels(shape: &Shape) -> usize {
        shape.dims()[shape.rank() - 1]
    }
    fn per_image_add(&self) -> Option<&Tensor> {
        self.add.as_ref()
    }
    fn run<T: WithDType>(&self, x: &[T], shape: &Shape, weight: &[T], bias: &[T]) -> Vec<T> {
        GroupNormChannelsLastOp::run(self, x, shape, weight, bias)
    }
}

/// The CPU forward of either layout: the input, weight and bias checked against the groups,
/// then the layout's pass in the input's float type.
fn group_norm_cpu_fwd<Op: GroupNormLayout>(
    op: &Op,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let shape = l1.shape();
    check_groups(op, shape, l2, l3)?;
    let name = op.name();
    let out = with_float_type!(s1.dtype(), name, |T| T::to_cpu_storage_owned(op.run::<T>(
        contiguous_slice(s1, l1, name)?,
        shape,
        contiguous_slice(s2, l2, name)?,
        contiguous_slice(s3, l3, name)?,
    )));
    Ok((out, shape.clone()))
}

/// The CUDA forward of either layout: the input checked against the groups, then the kernel's
/// entry points for the layout.
#[cfg(feature = "cuda")]
fn group_norm_cuda_fwd<Op: GroupNormLayout>(
    op: &Op,
    (s1, l1): (&candle_core::CudaStorage, &Layout),
    (s2, l2): (&candle_core::CudaStorage, &Layout),
    (s3, l3): (&candle_core::CudaStorage, &Layout),
) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    check_groups(op, l1.shape(), l2, l3)?;
    let (eps, silu) = op.eps_silu();
    let norm = cuda::Norm {
        groups: op.groups(),
        eps,
        silu,
        channels_last: Op::CHANNELS_LAST,
    };
    let add = op.per_image_add().map(Tensor::storage_and_layout);
    let add = match &add {
        Some((storage, layout)) => match &**storage {
            candle_core::Storage::Cuda(storage) => Some((storage, *layout)),
            _ => candle_core::bail!("{}: the per-image add is not on the device", op.name()),
        },
        None => None,
    };
    cuda::forward(&norm, (s1, l1), (s2, l2), (s3, l3), add)
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
        group_norm_cpu_fwd(self, (s1, l1), (s2, l2), (s3, l3))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        group_norm_cuda_fwd(self, (s1, l1), (s2, l2), (s3, l3))
    }
}

/// How many GroupNorms ran group_norm.cu's `_rows` kernels (kernel policy
/// `cuda_group_norm_rows`; 0 without the `cuda` feature), for tests.
pub fn group_norm_rows_calls() -> u64 {
    #[cfg(feature = "cuda")]
    return cuda::ROWS_CALLS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(feature = "cuda"))]
    0
}

/// The distance between the rows of a per-image add `[images, C]` as group_norm.cu's `_rows`
/// kernels read it in place: rows that are runs of C values, at least C apart (a resnet's
/// columns of the product of every resnet's time projection lie `Σ C` apart). `None` where
/// they are not (broadcast or transposed rows): such an add is copied first.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn per_image_row_stride(layout: &Layout) -> Option<usize> {
    let &[images, channels] = layout.dims() else {
        return None;
    };
    match *layout.stride() {
        [_, inner] if inner != 1 && channels > 1 => None,
        _ if images == 1 => Some(channels),
        [row, _] if row >= channels => Some(row),
        _ => None,
    }
}

/// How group_norm.cu's `_rows` kernels cut a channels-last GroupNorm over `images` ×
/// `pixels` × `channels` values (kernel policy `cuda_group_norm_rows`): each thread reads a run
/// of `width` channels (2 where a group's channel count is even and the input starts on an even
/// value, for paired loads; else 1), a block has `channels / width` such lanes times `rows`
/// rows of pixels, and each image's pixels are cut in `chunks` chunks of `chunk_pixels`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RowsGeometry {
    width: usize,
    lanes: usize,
    rows: usize,
    chunks: usize,
    chunk_pixels: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl RowsGeometry {
    /// Threads a block aims for.
    const THREADS: usize = 512;
    /// Threads a block may have (group_norm.cu's `kRowsMaxThreads`, its shared statistics).
    const MAX_THREADS: usize = 1024;
    /// Groups an image may have (group_norm.cu's `kRowsMaxGroups`: `apply` keeps each group's
    /// mean and 1/σ in shared memory). The networks have 32.
    const MAX_GROUPS: usize = 128;
    /// Blocks worth launching in all (a couple per multiprocessor of a large GPU).
    const TARGET_BLOCKS: usize = 256;
    /// Pixels each thread reads at least, so that a block's merge is worth its reads.
    const MIN_PIXELS_PER_THREAD: usize = 4;

    /// The geometry of a contiguous channels-last input `[images, …, channels]` laid out as
    /// `layout` (paired loads need its first value at an even offset), or `None` as [`Self::new`].
    fn of_layout(layout: &Layout, groups: usize) -> Option<Self> {
        let dims = layout.dims();
        let (&images, &channels) = (dims.first()?, dims.last()?);
        let pixels: usize = dims.get(1..dims.len() - 1)?.iter().product();
        let first_even = layout.start_offset().is_multiple_of(2);
        Self::new(images, pixels, channels, groups, first_even)
    }

    /// The geometry, or `None` where the kernels do not apply: more lanes than a block has
    /// threads, more groups than `apply` keeps, or values past 32-bit indices.
    fn new(
        images: usize,
        pixels: usize,
        channels: usize,
        groups: usize,
        first_even: bool,
    ) -> Option<Self> {
        if images == 0
            || pixels == 0
            || groups == 0
            || groups > Self::MAX_GROUPS
            || !channels.is_multiple_of(groups)
        {
            return None;
        }
        if images
            .checked_mul(pixels)
            .and_then(|v| v.checked_mul(channels))
            .is_none_or(|v| v > i32::MAX as usize)
            || images > u16::MAX as usize
        {
            return None;
        }
        let width = if (channels / groups).is_multiple_of(2) && first_even {
            2
        } else {
            1
        };
        let lanes = channels / width;
        if lanes > Self::MAX_THREADS {
            return None;
        }
        let rows = (Self::THREADS / lanes).max(1);
        let chunks = Self::TARGET_BLOCKS
            .div_ceil(images)
            .min(pixels.div_ceil(rows * Self::MIN_PIXELS_PER_THREAD))
            .max(1);
        let chunk_pixels = pixels.div_ceil(chunks);
        Some(Self {
            width,
            lanes,
            rows,
            chunks: pixels.div_ceil(chunk_pixels),
            chunk_pixels,
        })
    }
}

/// GroupNorm's own CUDA kernel (group_norm.cu, compiled to PTX by build.rs): two launches, the
/// groups' statistics spread over several blocks each, then the normalisation with the optional
/// SiLU in one pass. Off with `SDSTREAM_CUDA_KERNELS=0`, which leaves the portable twin.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
    const MODULE: &str = "sdstream_group_norm";
    /// GroupNorms run by the `_rows` kernels ([`super::group_norm_rows_calls`]).
    pub(super) static ROWS_CALLS: std::sync::atomic::AtomicU64 =
        std::sync::atomic::AtomicU64::new(0);
    /// Threads per block.
    const THREADS: u32 = 512;
    /// Blocks worth launching in all (a few per multiprocessor of a large GPU).
    const TARGET_BLOCKS: usize = 512;
    /// Values below which a chunk is not split further.
    const MIN_CHUNK: usize = 8192;

    /// One GroupNorm: its groups, epsilon, whether SiLU follows, and where the channels are
    /// (`[B, C, spatial…]`, or `[B, spatial…, C]` when `channels_last`).
    pub(super) struct Norm {
        pub groups: usize,
        pub eps: f64,
        pub silu: bool,
        pub channels_last: bool,
    }

    /// The operands of one GroupNorm: input, weight, bias, and each image's value per channel
    /// to add to the input first (the `_rows` kernels only).
    type Operands<'a> = (
        (&'a CudaStorage, &'a Layout),
        (&'a CudaStorage, &'a Layout),
        (&'a CudaStorage, &'a Layout),
        Option<(&'a CudaStorage, &'a Layout)>,
    );

    pub(super) fn forward(
        op: &Norm,
        x: (&CudaStorage, &Layout),
        weight: (&CudaStorage, &Layout),
        bias: (&CudaStorage, &Layout),
        add: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let operands = (x, weight, bias, add);
        match x.0.dtype() {
            DType::F32 => run::<f32>(op, operands, "f32"),
            DType::F16 => run::<half::f16>(op, operands, "f16"),
            DType::BF16 => run::<half::bf16>(op, operands, "bf16"),
            other => candle_core::bail!("sdstream-group-norm: no CUDA kernel for {other:?}"),
        }
    }

    /// The contiguous elements of an operand.
    fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let slice = s.as_cuda_slice::<T>()?;
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(slice.slice(a..b)),
            None => candle_core::bail!("sdstream-group-norm: {what} is not contiguous"),
        }
    }

    /// The per-image add, `images` × `channels`, as the `_rows` kernels read it: from its
    /// first value to its last, with the distance between its rows
    /// ([`super::per_image_row_stride`]).
    fn per_image_view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        (images, channels): (usize, usize),
    ) -> candle_core::Result<(CudaView<'a, T>, usize)> {
        if l.dims() != [images, channels] || images == 0 || channels == 0 {
            candle_core::bail!(
                "sdstream-group-norm: a per-image add {:?} for {images} × {channels}",
                l.dims()
            )
        }
        let Some(stride) = super::per_image_row_stride(l) else {
            candle_core::bail!(
                "sdstream-group-norm: a per-image add {:?} with strides {:?}: its rows must be \
                 runs of values",
                l.dims(),
                l.stride()
            )
        };
        let slice = s.as_cuda_slice::<T>()?;
        let start = l.start_offset();
        let end = start + (images - 1) * stride + channels;
        if end > slice.len() || stride > i32::MAX as usize {
            candle_core::bail!(
                "sdstream-group-norm: a per-image add {:?} past its storage",
                l.dims()
            );
        }
        Ok((slice.slice(start..end), stride))
    }

    fn run<T: CudaDType + DeviceRepr>(
        op: &Norm,
        ((xs, xl), (ws, wl), (bs, bl), add): Operands<'_>,
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let x = view::<T>(xs, xl, "input")?;
        let weight = view::<T>(ws, wl, "weight")?;
        let bias = view::<T>(bs, bl, "bias")?;
        let dims = xl.shape().dims();
        let (batch, channels, spatial) = if op.channels_last {
            let rank = dims.len();
            (dims[0], dims[rank - 1], dims[1..rank - 1].iter().product())
        } else {
            (dims[0], dims[1], dims[2..].iter().product::<usize>())
        };
        let add = match add {
            Some((storage, layout)) => {
                Some(per_image_view::<T>(storage, layout, (batch, channels))?)
            }
            None => None,
        };
        let layout = if op.channels_last { "nhwc_" } else { "" };
        let per_group = channels / op.groups;
        let group_len = per_group * spatial;
        let groups_total = batch * op.groups;
        let elements = xl.shape().elem_count();
        let dev = xs.device();
        // SAFETY: every element is written by the `apply` launch below before anything reads it.
        let dst = unsafe { dev.alloc::<T>(elements)? };
        if elements == 0 {
            return Ok((
                CudaStorage::wrap_cuda_slice(dst, dev.clone()),
                xl.shape().clone(),
            ));
        }
        if op.channels_last
            && crate::KernelPolicy::current().cuda_group_norm_rows
            && let Some(geometry) = super::RowsGeometry::of_layout(xl, op.groups)
        {
            let operands = (&x, add.as_ref(), &weight, &bias, dst);
            return run_rows(op, dev, operands, xl, batch, geometry, suffix);
        }
        if add.is_some() {
            candle_core::bail!(
                "sdstream-group-norm: the per-image add runs in the `_rows` kernels only"
            )
        }
        let chunks = TARGET_BLOCKS
            .div_ceil(groups_total)
            .min(group_len.div_ceil(MIN_CHUNK))
            .max(1);
        let partial = dev.alloc_zeros::<f32>(3 * groups_total * chunks)?;
        let cfg = LaunchConfig {
            grid_dim: (groups_total as u32, chunks as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (group_len, chunks, groups, per_group, spatial) = (
            group_len as i64,
            chunks as i32,
            op.groups as i32,
            per_group as i32,
            spatial as i64,
        );
        let (eps, silu) = (op.eps as f32, i32::from(op.silu));
        let stats = dev.get_or_load_custom_func(
            &format!("group_norm_stats_{layout}{suffix}"),
            MODULE,
            PTX,
        )?;
        let mut builder = stats.builder();
        builder.arg(&x);
        builder.arg(&partial);
        builder.arg(&group_len);
        builder.arg(&chunks);
        if op.channels_last {
            builder.arg(&groups);
            builder.arg(&per_group);
        }
        // SAFETY: the arguments match the kernel's parameters one for one; every index the
        // kernel forms stays below groups_total · group_len (x) and 3 · groups_total · chunks.
        unsafe { builder.launch(cfg) }.w()?;
        let apply = dev.get_or_load_custom_func(
            &format!("group_norm_apply_{layout}{suffix}"),
            MODULE,
            PTX,
        )?;
        let mut builder = apply.builder();
        builder.arg(&x);
        builder.arg(&dst);
        builder.arg(&weight);
        builder.arg(&bias);
        builder.arg(&partial);
        builder.arg(&group_len);
        builder.arg(&chunks);
        builder.arg(&groups);
        builder.arg(&per_group);
        builder.arg(&spatial);
        builder.arg(&eps);
        builder.arg(&silu);
        // SAFETY: as above; channel indices stay below groups · per_group = channels.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev.clone()),
            xl.shape().clone(),
        ))
    }

    /// The `_rows` kernels (stats, then apply, which merges each group's chunks itself) over
    /// channels-last `x` `[images, pixels, channels]`, into `dst`.
    fn run_rows<T: CudaDType + DeviceRepr>(
        op: &Norm,
        dev: &CudaDevice,
        (x, add, weight, bias, dst): RowsOperands<'_, T>,
        xl: &Layout,
        images: usize,
        geometry: super::RowsGeometry,
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = xl.shape().dims();
        let channels = dims[dims.len() - 1];
        let pixels = xl.shape().elem_count() / (images * channels);
        let groups_total = images * op.groups;
        // SAFETY: `stats` writes every (image, group, chunk) entry before `apply` reads them.
        let partial = unsafe { dev.alloc::<f32>(3 * groups_total * geometry.chunks)? };
        let blocks = LaunchConfig {
            grid_dim: (geometry.chunks as u32, images as u32, 1),
            block_dim: (geometry.lanes as u32, geometry.rows as u32, 1),
            shared_mem_bytes: 0,
        };
        // The chunks an image has are the grid's width: `apply` reads them from gridDim.
        let (pixels, channels, groups, chunk_pixels) = (
            pixels as i32,
            channels as i32,
            op.groups as i32,
            geometry.chunk_pixels as i32,
        );
        let width = geometry.width;
        // `_add`: the input plus each image's value per channel; the plain kernels never read
        // their `per_image` pointer, for which x stands in.
        let tag = if add.is_some() { "_add" } else { "" };
        let (per_image, per_image_stride) = match add {
            Some((view, stride)) => (view, *stride as i32),
            None => (x, channels),
        };
        let stats = dev.get_or_load_custom_func(
            &format!("group_norm_rows_stats{tag}_v{width}_{suffix}"),
            MODULE,
            PTX,
        )?;
        let mut builder = stats.builder();
        builder.arg(x);
        builder.arg(per_image);
        builder.arg(&per_image_stride);
        builder.arg(&partial);
        builder.arg(&pixels);
        builder.arg(&channels);
        builder.arg(&groups);
        builder.arg(&chunk_pixels);
        // SAFETY: the arguments match the kernel's parameters one for one; the geometry keeps
        // every index below 2³¹ and within x (images · pixels · channels values, read in runs
        // of `width` from an offset the geometry checked to be a multiple of it) and partial.
        unsafe { builder.launch(blocks) }.w()?;
        let apply = dev.get_or_load_custom_func(
            &format!("group_norm_rows_apply{tag}_v{width}_{suffix}"),
            MODULE,
            PTX,
        )?;
        let mut builder = apply.builder();
        let (silu, eps) = (i32::from(op.silu), op.eps as f32);
        builder.arg(x);
        builder.arg(per_image);
        builder.arg(&per_image_stride);
        builder.arg(&dst);
        builder.arg(weight);
        builder.arg(bias);
        builder.arg(&partial);
        builder.arg(&pixels);
        builder.arg(&channels);
        builder.arg(&groups);
        builder.arg(&chunk_pixels);
        builder.arg(&eps);
        builder.arg(&silu);
        // SAFETY: as the stats launch, on the same grid, so it reads partial's chunks as stats
        // wrote them; dst has as many values as x and starts aligned (a fresh allocation);
        // channel indices stay below `channels`, group indices below the geometry's
        // MAX_GROUPS, the kernel's shared statistics.
        unsafe { builder.launch(blocks) }.w()?;
        ROWS_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev.clone()),
            xl.shape().clone(),
        ))
    }

    /// The `_rows` kernels' input, per-image add (`[images, C]`, if any), weight and bias, and
    /// the output they fill.
    type RowsOperands<'a, T> = (
        &'a CudaView<'a, T>,
        Option<&'a (CudaView<'a, T>, usize)>,
        &'a CudaView<'a, T>,
        &'a CudaView<'a, T>,
        CudaSlice<T>,
    );

    const LAYER_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/layer_norm.ptx"));
    const LAYER_NORM_MODULE: &str = "sdstream_layer_norm";
    /// LayerNorms run by layer_norm.cu's kernel ([`super::layer_norm_kernel_calls`]).
    pub(super) static LAYER_NORM_CALLS: std::sync::atomic::AtomicU64 =
        std::sync::atomic::AtomicU64::new(0);
    /// Rows a block of layer_norm.cu's kernel takes (its `WARPS`: a warp a row).
    const LAYER_NORM_ROWS_PER_BLOCK: usize = 4;

    /// LayerNorm of contiguous `x` `[…, dim]` over its last dimension through layer_norm.cu's
    /// kernel, which the caller chose for it (`LayerNorm::own_cuda_kernel`); the checks here
    /// only turn a wrong choice into an error instead of a wrong read.
    pub(super) fn layer_norm(
        eps: f64,
        x: (&CudaStorage, &Layout),
        weight: (&CudaStorage, &Layout),
        bias: (&CudaStorage, &Layout),
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match x.0.dtype() {
            DType::F32 => layer_norm_of::<f32>(eps, x, weight, bias, "f32"),
            DType::F16 => layer_norm_of::<half::f16>(eps, x, weight, bias, "f16"),
            DType::BF16 => layer_norm_of::<half::bf16>(eps, x, weight, bias, "bf16"),
            other => candle_core::bail!("sdstream-layer-norm: no CUDA kernel for {other:?}"),
        }
    }

    fn layer_norm_of<T: CudaDType + DeviceRepr>(
        eps: f64,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        (bs, bl): (&CudaStorage, &Layout),
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let name = "sdstream-layer-norm";
        let dim = xl.shape().dims().last().copied().unwrap_or(0);
        let elements = xl.shape().elem_count();
        let dtypes = [xs.dtype(), ws.dtype(), bs.dtype()];
        let Some(chunks) = super::layer_norm_kernel_takes(dtypes, [xl, wl, bl]) else {
            candle_core::bail!(
                "{name}: no kernel for input {:?} {:?} at {}, weight {:?} at {}, bias {:?} at {}",
                xl.shape(),
                xs.dtype(),
                xl.start_offset(),
                wl.shape(),
                wl.start_offset(),
                bl.shape(),
                bl.start_offset()
            )
        };
        let x = view::<T>(xs, xl, "input")?;
        let weight = view::<T>(ws, wl, "weight")?;
        let bias = view::<T>(bs, bl, "bias")?;
        let dev = xs.device();
        // SAFETY: the launch below writes every value of every row.
        let dst = unsafe { dev.alloc::<T>(elements)? };
        let rows = elements / dim;
        if rows > 0 {
            let func = dev.get_or_load_custom_func(
                &format!("layer_norm_c{chunks}_{suffix}"),
                LAYER_NORM_MODULE,
                LAYER_NORM_PTX,
            )?;
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(LAYER_NORM_ROWS_PER_BLOCK) as u32, 1, 1),
                block_dim: (32 * LAYER_NORM_ROWS_PER_BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (rows_arg, dim_arg, eps) = (rows as i32, dim as i32, eps as f32);
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&dst);
            builder.arg(&weight);
            builder.arg(&bias);
            builder.arg(&rows_arg);
            builder.arg(&dim_arg);
            builder.arg(&eps);
            // SAFETY: the arguments match the kernel's parameters one for one; dim is a whole
            // number of 16-byte runs and at most 32 · chunks of them (layer_norm_chunks), every
            // operand starts on 16 bytes (checked above; dst is a fresh allocation), and every
            // index stays below rows · dim < 2³¹.
            unsafe { builder.launch(cfg) }.w()?;
        }
        LAYER_NORM_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev.clone()),
            xl.shape().clone(),
        ))
    }
}

/// The LayerNorm kernel: input contiguous `[…, D]`, weight and bias `[D]`.
struct LayerNormOp {
    eps: f64,
}

impl LayerNormOp {
    fn run<T: WithDType>(&self, x: &[T], dim: usize, weight: &[T], bias: &[T]) -> Vec<T> {
        let mut dst = zeroed_buffer::<T>(x.len());
        for_each_row(&mut dst, dim, |row, out| {
            let src = &x[row * dim..(row + 1) * dim];
            let (mean, rstd) = moments(src, self.eps);
            for ((y, v), (g, b)) in out.iter_mut().zip(src).zip(weight.iter().zip(bias)) {
                let normed = (v.to_f64() as f32 - mean) * rstd;
                *y = T::from_f64((normed * g.to_f64() as f32 + b.to_f64() as f32) as f64);
            }
        });
        dst
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
        let shape = l1.shape();
        let dim = shape.dims().last().copied().unwrap_or(0);
        if dim == 0 || l2.shape().elem_count() != dim || l3.shape().elem_count() != dim {
            candle_core::bail!(
                "LayerNorm: weight {:?}, bias {:?} for input {shape:?}",
                l2.shape(),
                l3.shape()
            )
        }
        let name = self.name();
        let out = with_float_type!(s1.dtype(), name, |T| T::to_cpu_storage_owned(
            self.run::<T>(
                contiguous_slice(s1, l1, name)?,
                dim,
                contiguous_slice(s2, l2, name)?,
                contiguous_slice(s3, l3, name)?,
            )
        ));
        Ok((out, shape.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::layer_norm(self.eps, (s1, l1), (s2, l2), (s3, l3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// layer_norm.cu's kernel holds the networks' rows (the transformers' 320 to 1,280 values,
    /// the text encoders' 768 and 1,024) in the fewest runs a lane, and takes no row it cannot.
    #[test]
    fn layer_norm_chunks_cover_the_networks_rows() {
        let cases = [
            (DType::F16, 320, Some(2)),
            (DType::F16, 640, Some(4)),
            (DType::F16, 1280, Some(8)),
            (DType::BF16, 768, Some(4)),
            (DType::F16, 2048, Some(8)),
            (DType::F16, 8, Some(1)),
            (DType::F32, 320, Some(4)),
            (DType::F32, 1280, Some(16)),
            (DType::F32, 2048, Some(16)),
            // Past the registers, not a whole run, empty, and a dtype it has no entry for.
            (DType::F16, 2056, None),
            (DType::F32, 2052, None),
            (DType::F16, 324, None),
            (DType::F32, 6, None),
            (DType::F16, 0, None),
            (DType::F64, 320, None),
        ];
        for (dtype, dim, want) in cases {
            assert_eq!(layer_norm_chunks(dtype, dim), want, "{dtype:?} {dim}");
            if let Some(chunks) = want {
                let width = 16 / dtype.size_in_bytes();
                // The lanes cover the row, and half as many runs a lane would not.
                assert!(32 * chunks * width >= dim, "{dtype:?} {dim}");
                assert!(
                    chunks == 1 || 32 * (chunks / 2) * width < dim,
                    "{dtype:?} {dim}"
                );
            }
        }
    }

    /// layer_norm.cu's kernel takes rows whose operands share a dtype and start on 16 bytes,
    /// with a weight and bias as wide as the row, and nothing else.
    #[test]
    fn layer_norm_kernel_takes_only_what_it_can_read() {
        let f16 = [DType::F16; 3];
        let x = Layout::contiguous((77, 320));
        let row = Layout::contiguous(320);
        assert_eq!(layer_norm_kernel_takes(f16, [&x, &row, &row]), Some(2));
        // An input starting 8 values (16 bytes) in, and 4 values (8 bytes) in.
        let x8 = Layout::contiguous_with_offset((77, 320), 8);
        let x4 = Layout::contiguous_with_offset((77, 320), 4);
        assert_eq!(layer_norm_kernel_takes(f16, [&x8, &row, &row]), Some(2));
        assert_eq!(layer_norm_kernel_takes(f16, [&x4, &row, &row]), None);
        // A weight of another dtype, a bias of another width, a row it does not hold.
        let mixed = [DType::F16, DType::F32, DType::F16];
        assert_eq!(layer_norm_kernel_takes(mixed, [&x, &row, &row]), None);
        let narrow = Layout::contiguous(312);
        assert_eq!(layer_norm_kernel_takes(f16, [&x, &row, &narrow]), None);
        let wide = Layout::contiguous((3, 4096));
        let wide_row = Layout::contiguous(4096);
        assert_eq!(
            layer_norm_kernel_takes(f16, [&wide, &wide_row, &wide_row]),
            None
        );
    }

    /// The per-image adds the `_rows` kernels read in place, and those copied first.
    #[test]
    fn per_image_adds_are_read_in_place_where_their_rows_are_runs() {
        let dev = Device::Cpu;
        let stride = |t: &Tensor| per_image_row_stride(t.layout());
        let wide = Tensor::zeros((2, 20), DType::F32, &dev).unwrap();
        assert_eq!(
            stride(&Tensor::zeros((2, 8), DType::F32, &dev).unwrap()),
            Some(8)
        );
        // A resnet's columns of a product for several: rows 20 apart.
        assert_eq!(stride(&wide.narrow(1, 3, 8).unwrap()), Some(20));
        assert_eq!(
            stride(&wide.narrow(0, 1, 1).unwrap().narrow(1, 3, 8).unwrap()),
            Some(8)
        );
        // One value per row: its inner stride does not matter.
        let column = Tensor::zeros((1, 2), DType::F32, &dev)
            .unwrap()
            .t()
            .unwrap();
        assert_eq!(column.stride(), [1, 2]);
        assert_eq!(stride(&column), Some(1));
        // Broadcast rows, transposed rows, and not `[images, C]`: copied first.
        let row = Tensor::zeros((1, 8), DType::F32, &dev).unwrap();
        assert_eq!(stride(&row.broadcast_as((2, 8)).unwrap()), None);
        assert_eq!(
            stride(
                &Tensor::zeros((8, 2), DType::F32, &dev)
                    .unwrap()
                    .t()
                    .unwrap()
            ),
            None
        );
        assert_eq!(
            stride(&Tensor::zeros((2, 2, 8), DType::F32, &dev).unwrap()),
            None
        );
    }

    /// The `_rows` kernels' cut of the UNet's, the VAE's and the tiny checkpoints' GroupNorms:
    /// whole blocks of lanes, chunks that cover every pixel once, paired loads only where a
    /// group's channels pair up and the input starts even, and no launch where a block could not
    /// hold the lanes or an index would pass 2³¹.
    #[test]
    fn group_norm_rows_geometry_covers_every_value_once() {
        // (images, pixels, channels, groups, first even) → (width, lanes, rows)
        let cases = [
            ((1, 64 * 64, 320, 32, true), (2, 160, 3)),
            ((8, 64 * 64, 320, 32, true), (2, 160, 3)),
            ((1, 8 * 8, 1280, 32, true), (2, 640, 1)),
            ((1, 512 * 512, 128, 32, true), (2, 64, 8)),
            ((2, 30, 96, 32, true), (1, 96, 5)),
            ((1, 64 * 64, 320, 32, false), (1, 320, 1)),
            ((3, 17, 24, 4, true), (2, 12, 42)),
        ];
        for ((images, pixels, channels, groups, even), (width, lanes, rows)) in cases {
            let g = RowsGeometry::new(images, pixels, channels, groups, even)
                .unwrap_or_else(|| panic!("{images}×{pixels}×{channels}: no geometry"));
            assert_eq!((g.width, g.lanes, g.rows), (width, lanes, rows), "{g:?}");
            assert_eq!(g.lanes * g.width, channels);
            assert!(g.lanes * g.rows <= RowsGeometry::MAX_THREADS, "{g:?}");
            // `apply` merges the groups' chunks with the block's whole warps: 8 at least.
            assert!(g.lanes * g.rows / 32 >= 8, "{g:?}");
            // Every pixel in exactly one chunk: the last chunk is not empty.
            assert!(g.chunks * g.chunk_pixels >= pixels, "{g:?}");
            assert!((g.chunks - 1) * g.chunk_pixels < pixels, "{g:?}");
            // Blocks in all near the target, never past it by more than one image's worth.
            assert!(
                g.chunks * images <= RowsGeometry::TARGET_BLOCKS + images,
                "{g:?}"
            );
        }
        // 1,280 channels a group of 1 (odd): 1,280 lanes of one channel, more than a block has.
        assert_eq!(RowsGeometry::new(1, 64, 1280, 1280, true), None);
        // From a channels-last layout: its dims, and paired loads only from an even offset.
        let at = |offset| {
            RowsGeometry::of_layout(
                &Layout::contiguous_with_offset((2, 64, 64, 320), offset),
                32,
            )
        };
        assert_eq!(at(0), RowsGeometry::new(2, 64 * 64, 320, 32, true));
        assert_eq!(at(0).map(|g| g.width), Some(2));
        assert_eq!(at(3), RowsGeometry::new(2, 64 * 64, 320, 32, false));
        assert_eq!(at(3).map(|g| g.width), Some(1));
        assert_eq!(RowsGeometry::of_layout(&Layout::contiguous(320), 32), None);
        assert_eq!(RowsGeometry::new(1, 64, 2560, 32, true), None);
        // 2³¹ values and more: the kernels index in 32 bits.
        assert_eq!(RowsGeometry::new(2, 1 << 24, 64, 32, true), None);
        assert!(RowsGeometry::new(1, (1 << 24) - 1, 64, 32, true).is_some());
        // More groups than `apply` keeps statistics for.
        assert!(RowsGeometry::new(1, 64, 256, 128, true).is_some());
        assert_eq!(RowsGeometry::new(1, 64, 258, 129, true), None);
        // Channels the groups do not divide, and empty inputs.
        assert_eq!(RowsGeometry::new(1, 64, 100, 32, true), None);
        assert_eq!(RowsGeometry::new(1, 0, 64, 32, true), None);
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The fused kernel agrees with the portable formulation, with and without SiLU, on input
    /// with a large mean (where one-pass statistics would lose digits).
    #[test]
    fn group_norm_kernel_matches_portable_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = ((Tensor::randn(0f32, 1.0, (2, 8, 5, 7), &dev)? * 3.0)? + 100.0)?;
        let norm = GroupNorm {
            weight: Tensor::randn(1f32, 0.2, 8, &dev)?,
            bias: Tensor::randn(0f32, 0.2, 8, &dev)?,
            groups: 4,
            eps: 1e-6,
            channels_last: false,
        };
        let err = max_abs_diff(&norm.forward(&x)?, &norm.portable(&x, false)?)?;
        assert!(err < 2e-5, "group norm max abs error {err}");
        let err = max_abs_diff(&norm.forward_silu(&x)?, &norm.portable(&x, true)?)?;
        assert!(err < 2e-5, "group norm + silu max abs error {err}");
        Ok(())
    }

    /// The channels-last kernel gives what the channels-first one does, with and without SiLU,
    /// on a large mean and on images big enough to split over threads; a wrong channel count is
    /// named.
    #[test]
    fn group_norm_channels_last_matches_channels_first() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (b, c, h, w, groups) in [(2, 8, 5, 7, 4), (1, 64, 96, 80, 32), (2, 6, 3, 4, 6)] {
            let x = ((Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)? * 3.0)? + 100.0)?;
            let first = GroupNorm {
                weight: Tensor::randn(1f32, 0.2, c, &dev)?,
                bias: Tensor::randn(0f32, 0.2, c, &dev)?,
                groups,
                eps: 1e-6,
                channels_last: false,
            };
            let last = first.clone().into_channels_last();
            let x_last = x.permute((0, 2, 3, 1))?.contiguous()?;
            for silu in [false, true] {
                let want = first.run(&x, silu)?;
                let got = last.run(&x_last, silu)?.permute((0, 3, 1, 2))?;
                let err = max_abs_diff(&got, &want)?;
                assert!(err < 1e-5, "b{b} c{c} {h}x{w} g{groups} silu {silu}: {err}");
            }
        }
        let last = GroupNorm {
            weight: Tensor::ones(8, DType::F32, &dev)?,
            bias: Tensor::zeros(8, DType::F32, &dev)?,
            groups: 4,
            eps: 1e-6,
            channels_last: true,
        };
        let err = last
            .forward(&Tensor::zeros((1, 8, 4, 4), DType::F32, &dev)?)
            .unwrap_err()
            .to_string();
        assert!(err.contains("channels last"), "{err}");
        Ok(())
    }

    /// The LayerNorm kernel agrees with candle-nn's, on rows long enough to be threaded.
    #[test]
    fn layer_norm_kernel_matches_candle() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = ((Tensor::randn(0f32, 1.0, (2, 300, 320), &dev)? * 2.0)? + 1.5)?;
        let norm = LayerNorm {
            weight: Tensor::randn(1f32, 0.2, 320, &dev)?,
            bias: Tensor::randn(0f32, 0.2, 320, &dev)?,
            eps: 1e-5,
        };
        let want = candle_nn::ops::layer_norm(&x, &norm.weight, &norm.bias, 1e-5)?;
        let err = max_abs_diff(&norm.forward(&x)?, &want)?;
        assert!(err < 1e-5, "layer norm max abs error {err}");
        Ok(())
    }
}
