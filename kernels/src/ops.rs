//! Element-wise and row-wise kernels of the transformer and resnet blocks: in-place adds into
//! fresh tensors, GEGLU, scaled softmax; and torch's reflection padding.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, D, DType, InplaceOp1, InplaceOp2, Layout, Shape, Tensor, WithDType,
};

use super::simd::{self, softmax_row};
use super::{
    contiguous_slice, cpu_kernels, cuda_kernels, for_each_row, with_float_type, zeroed_buffer,
};

/// `fresh + other` with broadcasting, where `other` is either the same shape as `fresh` or
/// shaped to broadcast so that its element `i` covers runs of `inner` consecutive elements of
/// `fresh` (a `[N]` bias over the last dimension: `inner = 1`; a `[B, C, 1, 1]` shift of
/// `[B, C, H, W]`: `inner = H·W`).
///
/// With the CPU kernels (and on CUDA, ops.cu) the sum is written into `fresh`'s buffer, so `fresh` must be a tensor
/// the caller just produced and shares with nothing (the output of a matmul or convolution).
pub fn add_fresh(fresh: Tensor, other: &Tensor, inner: usize) -> candle_core::Result<Tensor> {
    let same_shape = fresh.dims() == other.dims();
    let n = other.elem_count();
    let in_place = adds_in_place(&fresh, other)
        && n > 0
        && (same_shape || (inner > 0 && fresh.elem_count().is_multiple_of(n * inner)));
    if !in_place {
        return fresh.broadcast_add(other);
    }
    let inner = if same_shape { 1 } else { inner };
    fresh.inplace_op2(other, &AddInPlace { n, inner, outer: 1 })?;
    Ok(fresh)
}

/// `fresh + other` where `fresh` is `[B, …]` and `other` `[B, …]` holds each image's own
/// values, shaped to broadcast over its image so that, within image `b`, element `i` of
/// `other[b]` covers runs of `inner` consecutive elements of `fresh[b]`: a channels-last map
/// `[B, H, W, C]` plus each image's time embedding `[B, 1, 1, C]` (`inner = 1`), which
/// [`add_fresh`] cannot express once `B > 1` (its pattern repeats one run of values over the
/// whole tensor). The same rules for `fresh` as [`add_fresh`].
pub fn add_fresh_per_batch(
    fresh: Tensor,
    other: &Tensor,
    inner: usize,
) -> candle_core::Result<Tensor> {
    let batch = fresh.dim(0)?;
    if other.dim(0)? != batch {
        candle_core::bail!(
            "add per batch: {:?} has not the batch of {:?}",
            other.shape(),
            fresh.shape()
        );
    }
    if batch == 1 || fresh.dims() == other.dims() {
        return add_fresh(fresh, other, inner);
    }
    let n = other.elem_count() / batch;
    let per_image = fresh.elem_count() / batch;
    let in_place =
        adds_in_place(&fresh, other) && n > 0 && inner > 0 && per_image.is_multiple_of(n * inner);
    if !in_place {
        return fresh.broadcast_add(other);
    }
    fresh.inplace_op2(
        other,
        &AddInPlace {
            n,
            inner,
            outer: batch,
        },
    )?;
    Ok(fresh)
}

/// `x·Wᵀ + bias (+ residual)` with the bias and the residual in cuBLASLt's epilogue of the
/// product (`cublaslt_linear`), where the kernel policy's `cuda_fused_linear` allows it: `x`
/// `[…, K]`, `weight` `[N, K]`, `bias` `[N]`, `residual` the output's shape, one dtype, on a
/// CUDA device with sdstream's kernels on. `None` where it does not run (another device, the
/// switch off, another dtype, or a configuration cuBLASLt refused, warned once for each and
/// left to the separate ops from then on): the caller then runs the product and the adds.
pub fn linear_fused(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use std::cell::RefCell;
        use std::collections::HashSet;
        /// Input dims, weight dims, dtype, residual.
        type Refused = (Vec<usize>, Vec<usize>, candle_core::DType, bool);
        thread_local! {
            /// The configurations cuBLASLt refused.
            static REFUSED: RefCell<HashSet<Refused>> = RefCell::new(HashSet::new());
        }
        let dtype = x.dtype();
        let applies = super::KernelPolicy::current().cuda_fused_linear
            && cuda_kernels(x.device())
            && weight.dtype() == dtype
            && bias.dtype() == dtype
            && residual.is_none_or(|r| r.dtype() == dtype && r.device().same_device(x.device()));
        if !applies {
            return Ok(None);
        }
        let key = (
            x.dims().to_vec(),
            weight.dims().to_vec(),
            dtype,
            residual.is_some(),
        );
        let run = || super::cublaslt_linear::linear_fused(x, weight, bias, residual);
        super::fused::unless_refused(&REFUSED, key, run, |key, e| {
            format!(
                "cuBLASLt refused a fused linear layer ({:?} over {:?}, {:?}, residual {}): \
                 {e}; this configuration runs its bias and residual as separate ops",
                key.1, key.0, key.2, key.3
            )
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, weight, bias, residual);
        Ok(None)
    }
}

/// How many linear layers ran with their epilogue in cuBLASLt's call ([`linear_fused`]; 0
/// without the `cuda` feature), for tests.
pub fn linear_fused_calls() -> u64 {
    #[cfg(feature = "cuda")]
    return super::cublaslt_linear::fused_calls();
    #[cfg(not(feature = "cuda"))]
    0
}

/// Whether `other` can be added into `fresh`'s own buffer: sdstream's kernels run on its device,
/// both are contiguous, of one dtype (the shapes are each caller's to check).
fn adds_in_place(fresh: &Tensor, other: &Tensor) -> bool {
    (cpu_kernels(fresh.device()) || cuda_kernels(fresh.device()))
        && fresh.is_contiguous()
        && other.is_contiguous()
        && fresh.dtype() == other.dtype()
}

/// `dst[((o·r + j)·n + i)·inner + k] += src[o·n + i]`: `dst` in `outer` equal slices, slice
/// `o` taking `src`'s `o`-th run of `n` values repeated (`r` times) with each value over
/// `inner` consecutive elements.
struct AddInPlace {
    n: usize,
    inner: usize,
    outer: usize,
}

/// Elements per work item of the in-place add.
const ADD_CHUNK: usize = 1 << 14;

impl AddInPlace {
    fn run<T: WithDType>(&self, dst: &mut [T], src: &[T]) {
        if self.outer > 1 {
            let per_slice = dst.len() / self.outer;
            for (d, s) in dst.chunks_mut(per_slice).zip(src.chunks(self.n)) {
                self.run_slice(d, s);
            }
            return;
        }
        self.run_slice(dst, src);
    }

    /// One slice: `dst[(j·n + i)·inner + k] += src[i]`.
    fn run_slice<T: WithDType>(&self, dst: &mut [T], src: &[T]) {
        let (n, inner) = (self.n, self.inner);
        if src.len() == dst.len() && inner == 1 {
            for_each_row(dst, ADD_CHUNK, |chunk_index, out| {
                let start = chunk_index * ADD_CHUNK;
                let len = out.len();
                for (o, v) in out.iter_mut().zip(&src[start..start + len]) {
                    *o += *v;
                }
            });
            return;
        }
        if inner == 1 {
            // A bias over the last dimension: whole rows of `n` at a time, so that the loop is
            // a vectorised row add (one value at a time it took a bounds check and a wrap test
            // per element).
            let rows_per_chunk = (ADD_CHUNK / n).max(1);
            for_each_row(dst, rows_per_chunk * n, |_, out| {
                for row in out.chunks_mut(n) {
                    for (o, v) in row.iter_mut().zip(src) {
                        *o += *v;
                    }
                }
            });
            return;
        }
        for_each_row(dst, ADD_CHUNK, |chunk_index, out| {
            let start = chunk_index * ADD_CHUNK;
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
}

impl InplaceOp2 for AddInPlace {
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
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => self.run(&mut d[a0..a1], &s[b0..b1]),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => self.run(&mut d[a0..a1], &s[b0..b1]),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => self.run(&mut d[a0..a1], &s[b0..b1]),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => self.run(&mut d[a0..a1], &s[b0..b1]),
            _ => candle_core::bail!("add-in-place: unsupported or mismatched dtypes"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        cuda::add_in_place(self, s1, l1, s2, l2)
    }
}

/// The launch of an element-wise kernel (a grid that strides over what its blocks do not cover).
#[cfg(feature = "cuda")]
pub(crate) use cuda::grid_stride;

/// ops.cu's in-place add on a CUDA device.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.ptx"));
    const MODULE: &str = "sdstream_ops";
    const THREADS: u32 = 256;
    /// Enough blocks to fill a large GPU; the kernel strides over the rest.
    const MAX_BLOCKS: usize = 4096;

    /// The launch of an element-wise kernel over `total` values: blocks of [`THREADS`], at
    /// most [`MAX_BLOCKS`] of them, the kernel striding over the rest.
    pub(crate) fn grid_stride(total: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                total.div_ceil(THREADS as usize).min(MAX_BLOCKS) as u32,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn add_in_place(
        op: &super::AddInPlace,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => run::<f32>(op, s1, l1, s2, l2, "f32"),
            (DType::F16, DType::F16) => run::<half::f16>(op, s1, l1, s2, l2, "f16"),
            (DType::BF16, DType::BF16) => run::<half::bf16>(op, s1, l1, s2, l2, "bf16"),
            _ => candle_core::bail!("add-in-place: unsupported or mismatched dtypes"),
        }
    }

    fn run<T: CudaDType + DeviceRepr>(
        op: &super::AddInPlace,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        suffix: &str,
    ) -> candle_core::Result<()> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("add-in-place: operands must be contiguous")
        };
        let total = a1 - a0;
        if total == 0 {
            return Ok(());
        }
        let dev = s1.device().clone();
        let src = s2.as_cuda_slice::<T>()?.slice(b0..b1);
        let dst = s1.as_cuda_slice_mut::<T>()?;
        let mut dst = dst.slice_mut(a0..a1);
        let per_slice = total / op.outer.max(1);
        // 16 bytes at a time where a vector's values share their source index and the
        // operands start 16-byte aligned (ops.cu's add_in_place_vec; the same bits).
        let width = 16 / std::mem::size_of::<T>();
        let stream = dev.cuda_stream();
        let aligned = {
            let (d, _dst_guard) = dst.device_ptr(&stream);
            let (s, _src_guard) = src.device_ptr(&stream);
            d % 16 == 0 && s % 16 == 0
        };
        if op.inner == 1
            && aligned
            && crate::KernelPolicy::current().cuda_vector_adds
            && total <= i32::MAX as usize
            && [total, op.n, per_slice]
                .iter()
                .all(|v| v.is_multiple_of(width))
        {
            let func =
                dev.get_or_load_custom_func(&format!("add_in_place_vec_{suffix}"), MODULE, PTX)?;
            let mut builder = func.builder();
            let (total_v, n_v, per_slice_v) = (
                (total / width) as u32,
                (op.n / width) as u32,
                (per_slice / width) as u32,
            );
            builder.arg(&mut dst);
            builder.arg(&src);
            builder.arg(&total_v);
            builder.arg(&n_v);
            builder.arg(&per_slice_v);
            // SAFETY: the arguments match the kernel's parameters; both operands start 16-byte
            // aligned (checked above) and it reads src below outer · n and writes dst below
            // total, in vectors of `width` values that divide both.
            unsafe { builder.launch(grid_stride(total / width)) }.w()?;
            return Ok(());
        }
        let func = dev.get_or_load_custom_func(&format!("add_in_place_{suffix}"), MODULE, PTX)?;
        let mut builder = func.builder();
        let (total_arg, n, inner) = (total as i64, op.n as i64, op.inner as i64);
        let per_slice = per_slice as i64;
        builder.arg(&mut dst);
        builder.arg(&src);
        builder.arg(&total_arg);
        builder.arg(&n);
        builder.arg(&inner);
        builder.arg(&per_slice);
        let cfg = grid_stride(total);
        // SAFETY: the arguments match the kernel's parameters; it reads src below outer · n
        // (the caller checked that n · inner divides each of the outer slices of dst) and
        // writes dst below total.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }

    /// Phase interleaves run ([`super::phase_interleave_calls`]).
    pub(super) static PHASE_INTERLEAVES: std::sync::atomic::AtomicU64 =
        std::sync::atomic::AtomicU64::new(0);

    /// ops.cu's phase interleave: `z` `[images, h + 1, w + 1, 4·c]` (and `bias` `[c]`) →
    /// `[images, 2h, 2w, c]`.
    pub(super) fn phase_interleave(
        z: (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
        geometry: [usize; 4],
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        match z.0.dtype() {
            DType::F32 => run_phase_interleave::<f32>(z, bias, geometry, "f32"),
            DType::F16 => run_phase_interleave::<half::f16>(z, bias, geometry, "f16"),
            DType::BF16 => run_phase_interleave::<half::bf16>(z, bias, geometry, "bf16"),
            other => candle_core::bail!("sdstream-phase-interleave: no CUDA kernel for {other:?}"),
        }
    }

    fn run_phase_interleave<T: CudaDType + DeviceRepr>(
        (zs, zl): (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
        [images, h, w, c]: [usize; 4],
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        let name = "sdstream-phase-interleave";
        let width = 16 / std::mem::size_of::<T>();
        let Some((z0, z1)) = zl.contiguous_offsets() else {
            candle_core::bail!("{name}: the input must be contiguous")
        };
        let total = images * 4 * h * w * c;
        if !c.is_multiple_of(width) || (z1 - z0).max(total) > i32::MAX as usize {
            candle_core::bail!("{name}: {c} channels of {suffix} over {:?}", zl.shape())
        }
        let dev = zs.device().clone();
        let stream = dev.cuda_stream();
        let z = zs.as_cuda_slice::<T>()?.slice(z0..z1);
        let bias_view = match bias {
            Some((bs, bl)) => match bl.contiguous_offsets() {
                Some((b0, b1)) if b1 - b0 == c => Some(bs.as_cuda_slice::<T>()?.slice(b0..b1)),
                _ => candle_core::bail!("{name}: bias {:?} for {c} channels", bl.shape()),
            },
            None => None,
        };
        let aligned = {
            let (z_ptr, _z_guard) = z.device_ptr(&stream);
            let b_ptr = bias_view.as_ref().map(|b| b.device_ptr(&stream).0);
            z_ptr % 16 == 0 && b_ptr.is_none_or(|p| p % 16 == 0)
        };
        if !aligned {
            candle_core::bail!("{name}: an operand does not start on 16 bytes")
        }
        // SAFETY: the launch below writes every value of the output.
        let dst = unsafe { dev.alloc::<T>(total)? };
        let shape = candle_core::Shape::from((images, 2 * h, 2 * w, c));
        if total > 0 {
            let kernel = if bias_view.is_some() {
                format!("phase_interleave_bias_{suffix}")
            } else {
                format!("phase_interleave_{suffix}")
            };
            let func = dev.get_or_load_custom_func(&kernel, MODULE, PTX)?;
            let (images_arg, h_arg, w_arg, vecs) =
                (images as u32, h as u32, w as u32, (c / width) as u32);
            let mut builder = func.builder();
            builder.arg(&z);
            // Without a bias the kernel never reads its bias pointer: z stands in for it.
            builder.arg(bias_view.as_ref().unwrap_or(&z));
            builder.arg(&dst);
            builder.arg(&images_arg);
            builder.arg(&h_arg);
            builder.arg(&w_arg);
            builder.arg(&vecs);
            // SAFETY: the arguments match the kernel's parameters; z holds images · (h + 1) ·
            // (w + 1) · 4c values (its shape, checked by the caller) and dst images · 4hwc, both
            // below 2³¹, in whole 16-byte vectors from 16-byte aligned starts (checked above;
            // dst is a fresh allocation), and the bias c values.
            unsafe { builder.launch(grid_stride(total / width)) }.w()?;
        }
        PHASE_INTERLEAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape))
    }

    /// ops.cu's GEGLU: `x` `[…, 2·inner]` (contiguous) and its `[2·inner]` bias → `[…, inner]`.
    pub(super) fn geglu(
        x: (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        match x.0.dtype() {
            DType::F32 => run_geglu::<f32>(x, bias, "f32"),
            DType::F16 => run_geglu::<half::f16>(x, bias, "f16"),
            DType::BF16 => run_geglu::<half::bf16>(x, bias, "bf16"),
            other => candle_core::bail!("sdstream-geglu: no CUDA kernel for {other:?}"),
        }
    }

    fn run_geglu<T: CudaDType + DeviceRepr>(
        (xs, xl): (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, candle_core::Shape)> {
        let Some((x0, x1)) = xl.contiguous_offsets() else {
            candle_core::bail!("sdstream-geglu: the input must be contiguous")
        };
        let mut dims = xl.shape().dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width == 0 || width % 2 != 0 {
            candle_core::bail!("sdstream-geglu: input {:?} has no two halves", xl.shape())
        }
        let inner = width / 2;
        let rows = (x1 - x0) / width;
        *dims.last_mut().expect("width came from the last dimension") = inner;
        let shape = candle_core::Shape::from(dims);
        let dev = xs.device().clone();
        // SAFETY: the launch below writes every one of the rows · inner values.
        let dst = unsafe { dev.alloc::<T>(rows * inner)? };
        if rows == 0 {
            return Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape));
        }
        let x = xs.as_cuda_slice::<T>()?.slice(x0..x1);
        let bias_view = match bias {
            Some((bs, bl)) => match bl.contiguous_offsets() {
                Some((b0, b1)) if b1 - b0 == width => Some(bs.as_cuda_slice::<T>()?.slice(b0..b1)),
                _ => candle_core::bail!(
                    "sdstream-geglu: bias {:?} for input {:?}",
                    bl.shape(),
                    xl.shape()
                ),
            },
            None => None,
        };
        let name = if bias_view.is_some() {
            format!("geglu_bias_{suffix}")
        } else {
            format!("geglu_{suffix}")
        };
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let (rows_arg, inner_arg) = (rows as i64, inner as i64);
        let mut builder = func.builder();
        builder.arg(&x);
        // Without a bias the kernel never reads its bias pointer: x stands in for it.
        builder.arg(bias_view.as_ref().unwrap_or(&x));
        builder.arg(&dst);
        builder.arg(&rows_arg);
        builder.arg(&inner_arg);
        let total = rows * inner;
        let cfg = grid_stride(total);
        // SAFETY: the arguments match the kernel's parameters; it reads x below rows · width,
        // the bias below width, and writes dst below rows · inner.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape))
    }
}

/// diffusers' GEGLU of a projection's output before its bias: `[…, 2n]` plus `bias` (`[2n]`,
/// if any) → `[…, n]`, first half × exact GELU(second half). The CPU kernel adds the bias as
/// it reads each value, which spares the projection a pass of its own over its (widest in the
/// UNet) output.
pub fn geglu(hg: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    if cpu_kernels(hg.device())
        && hg.is_contiguous()
        && (bias.is_none() || hg.dtype() == DType::F32)
    {
        let bias = match bias {
            Some(bias) => Some(bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        return hg.apply_op1_no_bwd(&Geglu { bias });
    }
    let width = hg.dim(D::Minus1)?;
    let on_device = cuda_kernels(hg.device())
        && hg.is_contiguous()
        && width.is_multiple_of(2)
        && matches!(hg.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && bias.is_none_or(|b| {
            b.dtype() == hg.dtype() && b.is_contiguous() && b.elem_count() == width
        });
    if on_device {
        return match bias {
            Some(bias) => hg.apply_op2_no_bwd(bias, &GegluOnDevice),
            None => hg.apply_op1_no_bwd(&GegluOnDevice),
        };
    }
    if let Some(bias) = bias {
        return geglu(&hg.broadcast_add(bias)?, None);
    }
    let inner = hg.dim(D::Minus1)? / 2;
    let hidden = hg.narrow(D::Minus1, 0, inner)?;
    let gate = hg.narrow(D::Minus1, inner, inner)?;
    hidden * gate.gelu_erf()?
}

/// The four phases of an upsample-then-convolve put in their places (ops.cu's
/// `phase_interleave_*` on a CUDA device): `z` `[B, H + 1, W + 1, 4·C]`, the 2×2 convolution of
/// a map with [`super::conv::phase_filters`], gives `[B, 2H, 2W, C]`, phase (a, b) of output
/// pixel (2i + a, 2j + b) being `z[…, i + a, j + b, (2a + b)·C + c]`, plus `bias` (`[C]`) when
/// given, rounded once more as the separate bias add rounds it. On a CUDA device `C` must be a
/// whole number of 16-byte vectors and both operands start on 16 bytes; the CPU runs the same
/// definition one value at a time (for tests).
pub fn phase_interleave(z: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let z = z.contiguous()?;
    match bias {
        Some(bias) => z.apply_op2_no_bwd(&bias.contiguous()?, &PhaseInterleave),
        None => z.apply_op1_no_bwd(&PhaseInterleave),
    }
}

/// How many phase interleaves ran on a CUDA device, for tests (0 without the `cuda` feature).
pub fn phase_interleave_calls() -> u64 {
    #[cfg(feature = "cuda")]
    return cuda::PHASE_INTERLEAVES.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(feature = "cuda"))]
    0
}

/// See [`phase_interleave`].
struct PhaseInterleave;

impl PhaseInterleave {
    const NAME: &'static str = "sdstream-phase-interleave";

    /// `(images, h, w, channels)` of the output's input map from `z`'s dims, or an error
    /// naming what does not fit.
    fn geometry(z: &Shape, bias: Option<&Shape>) -> candle_core::Result<[usize; 4]> {
        let (images, h1, w1, c4) = z.dims4()?;
        if h1 < 2 || w1 < 2 || c4 == 0 || !c4.is_multiple_of(4) {
            candle_core::bail!("{}: {z:?} is not [B, H + 1, W + 1, 4·C]", Self::NAME)
        }
        let channels = c4 / 4;
        if let Some(bias) = bias
            && bias.elem_count() != channels
        {
            candle_core::bail!("{}: bias {bias:?} for {channels} channels", Self::NAME)
        }
        Ok([images, h1 - 1, w1 - 1, channels])
    }

    fn run<T: WithDType>(z: &[T], bias: Option<&[T]>, [images, h, w, c]: [usize; 4]) -> Vec<T> {
        let mut out = zeroed_buffer::<T>(images * 4 * h * w * c);
        for_each_row(&mut out, 2 * w * c, |row, dst| {
            let (image, y) = (row / (2 * h), row % (2 * h));
            let a = y % 2;
            for x in 0..2 * w {
                let b = x % 2;
                let pixel = (image * (h + 1) + y / 2 + a) * (w + 1) + x / 2 + b;
                let src = &z[(pixel * 4 + 2 * a + b) * c..][..c];
                let dst = &mut dst[x * c..(x + 1) * c];
                match bias {
                    // The sum in f32, rounded once to T, as the device and the bias add do.
                    Some(bias) => {
                        for ((o, v), add) in dst.iter_mut().zip(src).zip(bias) {
                            let sum = v.to_f64() as f32 + add.to_f64() as f32;
                            *o = T::from_f64(f64::from(sum));
                        }
                    }
                    None => dst.copy_from_slice(src),
                }
            }
        });
        out
    }

    fn cpu(
        z: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let geometry = Self::geometry(z.1.shape(), bias.map(|b| b.1.shape()))?;
        let [images, h, w, c] = geometry;
        let out = with_float_type!(z.0.dtype(), Self::NAME, |T| {
            let bias = match bias {
                Some((s, l)) => Some(contiguous_slice::<T>(s, l, Self::NAME)?),
                None => None,
            };
            T::to_cpu_storage_owned(Self::run::<T>(
                contiguous_slice(z.0, z.1, Self::NAME)?,
                bias,
                geometry,
            ))
        });
        Ok((out, Shape::from((images, 2 * h, 2 * w, c))))
    }
}

impl CustomOp1 for PhaseInterleave {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::cpu((s1, l1), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let geometry = Self::geometry(l1.shape(), None)?;
        cuda::phase_interleave((s1, l1), None, geometry)
    }
}

impl candle_core::CustomOp2 for PhaseInterleave {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::cpu((s1, l1), Some((s2, l2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let geometry = Self::geometry(l1.shape(), Some(l2.shape()))?;
        cuda::phase_interleave((s1, l1), Some((s2, l2)), geometry)
    }
}

/// GEGLU in one pass on a CUDA device (ops.cu's `geglu_*`): the bias, if any, added as each
/// value is read, f32 arithmetic rounded once. Its portable twin is the unfused path of
/// [`geglu`] (a broadcast add, a narrow, candle's erf GELU and a product).
struct GegluOnDevice;

impl GegluOnDevice {
    const NAME: &'static str = "sdstream-geglu";
}

impl CustomOp1 for GegluOnDevice {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: a CUDA kernel only", Self::NAME)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::geglu((s1, l1), None)
    }
}

impl candle_core::CustomOp2 for GegluOnDevice {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: a CUDA kernel only", Self::NAME)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::geglu((s1, l1), Some((s2, l2)))
    }
}

/// The GEGLU kernel, one pass; `bias` (f32 only) is added to each value as it is read.
struct Geglu {
    bias: Option<Vec<f32>>,
}

impl Geglu {
    /// f32: the vectorised row kernel ([`simd::geglu_row`]).
    fn run_f32(&self, x: &[f32], width: usize) -> Vec<f32> {
        let half = width / 2;
        let mut dst = zeroed_buffer::<f32>(x.len() / 2);
        let biases = match &self.bias {
            Some(bias) => bias.split_at(half),
            None => (&[][..], &[][..]),
        };
        for_each_row(&mut dst, half, |row, out| {
            let (hidden, gate) = x[row * width..(row + 1) * width].split_at(half);
            simd::geglu_row(out, hidden, gate, biases);
        });
        dst
    }

    /// The half types, without a bias, in f32 arithmetic.
    fn run<T: WithDType>(x: &[T], width: usize) -> Vec<T> {
        let half = width / 2;
        let mut dst = zeroed_buffer::<T>(x.len() / 2);
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

impl CustomOp1 for Geglu {
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
        let name = self.name();
        let storage = match (s, &self.bias) {
            (CpuStorage::F32(_), bias) => {
                if let Some(bias) = bias
                    && bias.len() != width
                {
                    candle_core::bail!("GEGLU: {} bias values for width {width}", bias.len())
                }
                CpuStorage::F32(self.run_f32(contiguous_slice(s, l, name)?, width))
            }
            (_, Some(_)) => candle_core::bail!("GEGLU: a bias with {:?} values", s.dtype()),
            (_, None) => with_float_type!(s.dtype(), name, |T| T::to_cpu_storage_owned(
                Self::run::<T>(contiguous_slice(s, l, name)?, width)
            )),
        };
        Ok((storage, Shape::from_dims(&dims)))
    }
}

/// Row-wise softmax of `scale·scores` over the last dimension, computed in f32 as PyTorch's CPU
/// attention does. With the CPU kernels it runs in place, so `scores` must be a fresh tensor
/// shared with nothing (the output of a matmul).
pub fn scaled_softmax(scores: Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if cpu_kernels(scores.device()) && scores.is_contiguous() {
        scores.inplace_op1(&ScaledSoftmax { scale })?;
        return Ok(scores);
    }
    candle_nn::ops::softmax_last_dim(&(scores * scale)?)
}

/// The in-place softmax kernel: vectorised for f32 (kernels::simd), the scalar loop below for
/// the half types (held in f32 arithmetic all the same).
struct ScaledSoftmax {
    scale: f64,
}

impl ScaledSoftmax {
    fn run<T: WithDType>(&self, data: &mut [T], width: usize) {
        let scale = self.scale as f32;
        for_each_row(data, width, |_, row| {
            // x = scale·s (f32), then exp(x − max) / Σ.
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

impl InplaceOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "sdstream-scaled-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("softmax: scores must be contiguous")
        };
        let width = l.shape().dims().last().copied().unwrap_or(1).max(1);
        match s {
            CpuStorage::F32(d) => {
                let scale = self.scale as f32;
                for_each_row(&mut d[a..b], width, |_, row| softmax_row(row, scale));
            }
            CpuStorage::F16(d) => self.run(&mut d[a..b], width),
            CpuStorage::BF16(d) => self.run(&mut d[a..b], width),
            CpuStorage::F64(d) => self.run(&mut d[a..b], width),
            _ => candle_core::bail!("softmax: unsupported dtype"),
        }
        Ok(())
    }
}

/// torch's reflection padding of the last two dimensions (`F.pad(x, (left, right, top,
/// bottom), mode="reflect")`): index −i reads i and index n − 1 + i reads n − 1 − i, for pads
/// smaller than the side, as torch requires. Built from index selections, so it runs on every
/// device.
pub fn reflection_pad(
    x: &Tensor,
    top: usize,
    bottom: usize,
    left: usize,
    right: usize,
) -> candle_core::Result<Tensor> {
    let rank = x.rank();
    if rank < 2 {
        candle_core::bail!(
            "reflection padding needs at least 2 dimensions, got {:?}",
            x.dims()
        );
    }
    let mut x = x.clone();
    for (dim, before, after) in [(rank - 2, top, bottom), (rank - 1, left, right)] {
        if before == 0 && after == 0 {
            continue;
        }
        let n = x.dim(dim)?;
        if before >= n || after >= n {
            candle_core::bail!(
                "reflection padding by {before}/{after} needs sides larger than that, got {:?}",
                x.dims()
            );
        }
        let last = n as isize - 1;
        let index: Vec<u32> = (0..n + before + after)
            .map(|i| {
                let i = i as isize - before as isize;
                let mirrored = if i < 0 {
                    -i
                } else if i > last {
                    2 * last - i
                } else {
                    i
                };
                mirrored as u32
            })
            .collect();
        let index = Tensor::new(index.as_slice(), x.device())?;
        x = x.index_select(&index, dim)?;
    }
    Ok(x)
}

/// The transpose of a 2-D CPU tensor `[rows, cols]`, made contiguous: `[cols, rows]`. Copied in
/// 32×32 blocks over candle's CPU threads; candle's own strided copy walks the source one index
/// at a time, which took most of a model's load once the linear layers kept their weights
/// transposed (unet_blocks::Linear).
pub fn transposed(t: &Tensor) -> candle_core::Result<Tensor> {
    /// Side of the square blocks, in values: a block of either layout stays in L1.
    const BLOCK: usize = 32;
    let (rows, cols) = t.dims2()?;
    let t = t.contiguous()?;
    if !t.device().is_cpu() {
        return t.t()?.contiguous();
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("transpose: a CPU tensor's storage is not on the CPU");
    };
    with_float_type!(t.dtype(), "transpose", |T| {
        let src = contiguous_slice::<T>(cpu, layout, "transpose")?;
        let mut dst = vec![<T as WithDType>::from_f64(0.0); rows * cols];
        if !dst.is_empty() {
            // Each task writes BLOCK rows of the result (columns c0.. of the source).
            for_each_row(&mut dst, BLOCK * rows, |block, out| {
                let c0 = block * BLOCK;
                let width = out.len() / rows;
                for r0 in (0..rows).step_by(BLOCK) {
                    for dc in 0..width {
                        let column = &mut out[dc * rows..][..rows];
                        for r in r0..(r0 + BLOCK).min(rows) {
                            column[r] = src[r * cols + c0 + dc];
                        }
                    }
                }
            });
        }
        Tensor::from_vec(dst, (cols, rows), t.device())
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::KernelPolicy;

    /// The in-place adds against candle's broadcast add, on the CPU kernels and the portable
    /// path: a bias over the last dimension, a per-channel shift of channels-first maps, the
    /// same-shape residual, and each image's values over its own channels-last map (three
    /// images, so that the per-image runs differ from one repeated run).
    #[test]
    fn in_place_adds_match_broadcast_adds() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let fresh = || Tensor::randn(0f32, 1.0, (3, 5, 7, 8), &dev);
        for portable in [false, true] {
            let policy = KernelPolicy {
                portable,
                ..KernelPolicy::process()
            };
            policy.scoped(|| -> candle_core::Result<()> {
                let per_image = Tensor::randn(0f32, 1.0, (3, 1, 1, 8), &dev)?;
                let x = fresh()?;
                let want = x.broadcast_add(&per_image)?;
                let got = add_fresh_per_batch(x.copy()?, &per_image, 1)?;
                assert_eq!(
                    (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?,
                    0.0,
                    "per image, channels last (portable {portable})"
                );

                let shift = Tensor::randn(0f32, 1.0, (3, 5, 1, 1), &dev)?;
                let x = fresh()?;
                let want = x.broadcast_add(&shift)?;
                for got in [
                    add_fresh(x.copy()?, &shift, 7 * 8)?,
                    add_fresh_per_batch(x.copy()?, &shift, 7 * 8)?,
                ] {
                    assert_eq!((got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
                }

                let bias = Tensor::randn(0f32, 1.0, 8, &dev)?;
                let x = fresh()?;
                let want = x.broadcast_add(&bias)?;
                let got = add_fresh(x.copy()?, &bias, 1)?;
                assert_eq!((got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);

                let residual = fresh()?;
                let x = fresh()?;
                let want = (&x + &residual)?;
                let got = add_fresh_per_batch(x.copy()?, &residual, 1)?;
                assert_eq!((got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
                Ok(())
            })?;
        }
        // A batch that does not match is refused, naming both shapes.
        let err = add_fresh_per_batch(fresh()?, &Tensor::zeros((2, 1, 1, 8), DType::F32, &dev)?, 1)
            .expect_err("two images' values for three");
        assert!(err.to_string().contains("[2, 1, 1, 8]"), "{err}");
        Ok(())
    }
}
