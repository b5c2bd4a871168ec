//! The CPU convolution over channels-last maps (`[B, H, W, C]`), for networks with few channels
//! at large sizes (TAESD: 64 channels at up to 512×512).
//!
//! With channels innermost, the `kw` horizontal taps of one kernel row read `kw·C` consecutive
//! values of the (padded) input for each output pixel, and the next output pixel's window starts
//! `stride·C` values later. So one row of output is `kh` GEMMs, one per kernel row, each reading
//! the padded input in place as an `[W_out, kw·C]` matrix whose rows overlap (row stride
//! `stride·C`): no im2col matrix is ever written, where the channels-first kernel
//! ([`super::conv`]) copies every input value `kh·kw` times into one. The input is copied once,
//! into a zero-padded buffer (nearest upsampling, when asked for, happens in that copy); threads
//! take contiguous runs of output rows, and each row's bias, residual and ReLU are applied while
//! the row is still in cache.

use std::any::Any;
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, WithDType};

use super::conv_direct;
use super::gemm_bf16::{self, PackedB};
use super::padding::Padding;
use super::winograd::{self, WinogradWeights};
use super::{
    SharedMut, contiguous_slice, for_each_range, for_each_row, thread_count, with_float_type,
    zeroed_buffer,
};

thread_local! {
    /// The padded input of this thread's last channels-last convolution, kept for the next:
    /// at TAESD's 512×512 level it is 67 MB, which a fresh allocation would have the operating
    /// system zero page by page on every layer of every frame. Held until the thread ends.
    static SCRATCH: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    /// The same in bf16, for the bf16 products.
    static SCRATCH_BF16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` values from this thread's scratch (contents unspecified), or a new one.
fn take_scratch<T: WithDType>(len: usize) -> Vec<T> {
    let kept = SCRATCH
        .with(|s| s.borrow_mut().take())
        .and_then(|b| b.downcast::<Vec<T>>().ok());
    match kept {
        Some(mut buffer) if buffer.capacity() >= len => {
            buffer.resize(len, T::zero());
            *buffer
        }
        _ => zeroed_buffer(len),
    }
}

/// Gives a buffer back to this thread's scratch.
struct ScratchGuard<T: WithDType>(Option<Vec<T>>);

impl<T: WithDType> Drop for ScratchGuard<T> {
    fn drop(&mut self) {
        if let Some(buffer) = self.0.take() {
            SCRATCH.with(|s| *s.borrow_mut() = Some(Box::new(buffer)));
        }
    }
}

/// The op: input `[B, H, W, C_in]`, weight `[kh, kw, C_in, C_out]` (both contiguous), and, as a
/// third operand, a residual `[B, H_out, W_out, C_out]` added before the ReLU.
pub(super) struct ChannelsLastConvOp {
    pub(super) stride: usize,
    pub(super) padding: Padding,
    pub(super) upsample: usize,
    /// One value per output channel, or none.
    pub(super) bias: Option<Vec<f64>>,
    pub(super) relu: bool,
    /// Multiply in bf16 ([`super::gemm_bf16`]) where it applies: f32 maps whose `C_in` is a
    /// multiple of 32 (the GEMM rows are then whole tile blocks of the bf16 padded input).
    pub(super) bf16: bool,
    /// The weight's Winograd transform, when this convolution runs on [`super::winograd`]
    /// (f32, 3×3, stride 1, no upsampling, enough output tiles; chosen by [`super::conv`]), in
    /// f32 also inside a bf16 scope.
    pub(super) winograd: Option<Arc<WinogradWeights>>,
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    c_in: usize,
    c_out: usize,
    /// Input size before upsampling.
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    h_out: usize,
    w_out: usize,
}

/// The taps of one output phase along one axis: the kernel rows (or columns) that read the
/// same source row, summed, read `taps` consecutive rows of the padded source from `first`.
#[derive(Debug, Clone)]
struct Phase {
    /// Padded source row read by the phase's first (summed) tap, for output index 0 of the
    /// phase (later outputs add `stride` per output).
    first: usize,
    /// Kernel taps (indices into the original kernel) summed into each reduced tap.
    groups: Vec<Vec<usize>>,
}

/// How one axis of the output reads the padded source.
#[derive(Debug, Clone)]
struct AxisPlan {
    /// One per output phase (`index % factor`).
    phases: Vec<Phase>,
    /// Source padding before and after, in source pixels.
    pad_before: usize,
    pad_after: usize,
    /// Whether the padded copy upsamples (the strided fallback) rather than the phases.
    copy_upsamples: bool,
}

impl AxisPlan {
    /// Output index `o` along an axis of `n` source pixels, upsampled ×`f` (nearest), padded
    /// `before`/`after`, convolved with `k` taps at `stride`, reads upsampled index
    /// `o·stride + u − before` through tap u. With `f > 1` and stride 1 the upsampled index
    /// belongs to source pixel ⌊(o + u − before) / f⌋: for output phase `r = o mod f` the taps
    /// fall into consecutive groups reading the same source pixel, and the convolution of the
    /// upsampled map is, per phase, a convolution of the source with the groups' summed weights
    /// (for TAESD's 2× upsampling and 3×3 kernels: 2×2 instead of 3×3 taps per output pixel).
    fn new(
        n: usize,
        n_out: usize,
        f: usize,
        k: usize,
        stride: usize,
        before: usize,
        after: usize,
    ) -> Self {
        if f == 1 || stride != 1 {
            return Self {
                phases: vec![Phase {
                    first: 0,
                    groups: (0..k).map(|u| vec![u]).collect(),
                }],
                pad_before: before,
                pad_after: after,
                copy_upsamples: f > 1,
            };
        }
        let source =
            |r: usize, u: usize| (r as isize + u as isize - before as isize).div_euclid(f as isize);
        let lowest = (0..f.min(n_out)).map(|r| source(r, 0)).min().unwrap_or(0);
        let highest = (0..n_out)
            .map(|o| (o / f) as isize + source(o % f, k - 1))
            .max()
            .unwrap_or(0);
        let pad_before = (-lowest).max(0) as usize;
        let pad_after = (highest - (n as isize - 1)).max(0) as usize;
        let phases = (0..f)
            .map(|r| {
                let d0 = source(r, 0);
                let mut groups: Vec<Vec<usize>> = Vec::new();
                for u in 0..k {
                    let g = (source(r, u) - d0) as usize;
                    if groups.len() <= g {
                        groups.resize(g + 1, Vec::new());
                    }
                    groups[g].push(u);
                }
                Phase {
                    first: (d0 + pad_before as isize) as usize,
                    groups,
                }
            })
            .collect();
        Self {
            phases,
            pad_before,
            pad_after,
            copy_upsamples: false,
        }
    }

    /// Output phases (1 without upsampling through phases).
    fn factor(&self) -> usize {
        self.phases.len()
    }
}

impl ChannelsLastConvOp {
    fn geometry(&self, x: &Shape, weight: &Shape) -> candle_core::Result<Geometry> {
        let (batch, h, w, c_in) = x.dims4()?;
        let (kh, kw, c_in_w, c_out) = weight.dims4()?;
        if c_in != c_in_w {
            candle_core::bail!(
                "conv (channels last): input has {c_in} channels, the weight expects {c_in_w}"
            );
        }
        if self.bias.as_ref().is_some_and(|b| b.len() != c_out) {
            candle_core::bail!("conv (channels last): bias does not have {c_out} values");
        }
        let (p, s, f) = (self.padding, self.stride, self.upsample);
        let h_padded = h * f + p.top + p.bottom;
        let w_padded = w * f + p.left + p.right;
        if h_padded < kh || w_padded < kw {
            candle_core::bail!(
                "conv (channels last): input {h}×{w} (upsampled ×{f}, padded to \
                 {h_padded}×{w_padded}) is smaller than the {kh}×{kw} kernel"
            );
        }
        Ok(Geometry {
            batch,
            c_in,
            c_out,
            h,
            w,
            kh,
            kw,
            h_out: (h_padded - kh) / s + 1,
            w_out: (w_padded - kw) / s + 1,
        })
    }

    fn run<T: WithDType>(
        &self,
        x: &[T],
        weight: &[T],
        residual: Option<&[T]>,
        g: &Geometry,
    ) -> Vec<T> {
        let mut out = zeroed_buffer::<T>(g.batch * g.h_out * g.w_out * g.c_out);
        self.run_into(x, weight, residual, g, &mut out);
        out
    }

    /// The convolution written into `out` (`[B, h_out, w_out, C_out]`, every element
    /// overwritten: the first GEMM of each output pixel does not read what was there).
    fn run_into<T: WithDType>(
        &self,
        x: &[T],
        weight: &[T],
        residual: Option<&[T]>,
        g: &Geometry,
        out: &mut [T],
    ) {
        let (c, co, s, f, p) = (g.c_in, g.c_out, self.stride, self.upsample, self.padding);
        let row_len = g.w_out * co;
        let rows = g.batch * g.h_out;
        assert_eq!(
            out.len(),
            rows * row_len,
            "conv (channels last): output size"
        );
        if out.is_empty() {
            return;
        }
        if let Some(weights) = &self.winograd
            && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        {
            self.run_winograd(x, weights, residual, g, out);
            return;
        }
        let along_h = AxisPlan::new(g.h, g.h_out, f, g.kh, s, p.top, p.bottom);
        let along_w = AxisPlan::new(g.w, g.w_out, f, g.kw, s, p.left, p.right);
        let padded = Padded::new(self, x, g, &along_h, &along_w);
        // Back to this thread's scratch when the output is done (also on unwinding).
        let (h_src, w_src) = (padded.h, padded.w);
        let padded = ScratchGuard(Some(padded.values));
        let padded: &[T] = padded.0.as_deref().unwrap_or(&[]);
        // Per (row phase, column phase): the summed weights [taps_h, taps_w, c, co].
        // Without upsampling through phases every group is one tap: the weights as they are.
        let phase_weights: Vec<Cow<[T]>> = if along_h.factor() * along_w.factor() == 1 {
            vec![Cow::Borrowed(weight)]
        } else {
            along_h
                .phases
                .iter()
                .flat_map(|ph| along_w.phases.iter().map(move |pw| (ph, pw)))
                .map(|(ph, pw)| Cow::Owned(summed_weights(weight, g, &ph.groups, &pw.groups)))
                .collect()
        };
        let (fh, fw) = (along_h.factor(), along_w.factor());
        let bias: Option<Vec<T>> = self
            .bias
            .as_ref()
            .map(|b| b.iter().map(|&v| T::from_f64(v)).collect());
        let out_ptr = SharedMut(out.as_mut_ptr());
        let bf16 = self.bf16
            && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && c.is_multiple_of(32);
        // bf16: the padded input rounded once, and per (phase, kernel row) the summed weights
        // packed ([`PackedB`]); each GEMM then reads its rows of the input in place.
        let mut padded_bf16 = if bf16 {
            SCRATCH_BF16.with(|s| std::mem::take(&mut *s.borrow_mut()))
        } else {
            Vec::new()
        };
        let mut packed_weights = Vec::new();
        if bf16 {
            // SAFETY: T is f32 (checked just above).
            let padded_f32 =
                unsafe { std::slice::from_raw_parts(padded.as_ptr().cast::<f32>(), padded.len()) };
            padded_bf16.resize(padded.len(), 0);
            let chunk = w_src * c;
            for_each_row(&mut padded_bf16, chunk, |i, dst| {
                gemm_bf16::round_slice(&padded_f32[i * chunk..][..dst.len()], dst)
            });
            for (p, weights) in phase_weights.iter().enumerate() {
                let (ph, pw) = (&along_h.phases[p / fw], &along_w.phases[p % fw]);
                let depth = pw.groups.len() * c;
                // SAFETY: T is f32.
                let weights = unsafe {
                    std::slice::from_raw_parts(weights.as_ptr().cast::<f32>(), weights.len())
                };
                let per_row: Vec<PackedB> = (0..ph.groups.len())
                    .map(|a| {
                        let mut packed = PackedB::default();
                        packed.repack_rows(
                            &weights[a * depth * co..][..depth * co],
                            depth,
                            co,
                            co,
                            1,
                        );
                        packed
                    })
                    .collect();
                packed_weights.push(per_row);
            }
        }
        // f32 on an AVX2 CPU without AVX-512: the direct kernel, its weights regrouped per phase.
        let direct: Vec<conv_direct::PackedWeights> = if !bf16
            && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && conv_direct::chosen(co)
        {
            phase_weights
                .iter()
                .enumerate()
                .map(|(p, weights)| {
                    let (ph, pw) = (&along_h.phases[p / fw], &along_w.phases[p % fw]);
                    // SAFETY: T is f32 (checked just above).
                    let weights = unsafe {
                        std::slice::from_raw_parts(weights.as_ptr().cast::<f32>(), weights.len())
                    };
                    conv_direct::PackedWeights::new(
                        weights,
                        ph.groups.len(),
                        pw.groups.len() * c,
                        co,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        let direct = &direct;
        let padded_bf16_ref = &padded_bf16;
        let packed_weights = &packed_weights;
        let work = |range: std::ops::Range<usize>| {
            for row in range {
                let (image, y) = (row / g.h_out, row % g.h_out);
                let phase_h = &along_h.phases[y % fh];
                let source_row = (y / fh) * s + phase_h.first;
                let dst_at = row * row_len;
                for (rx, phase_w) in along_w.phases.iter().enumerate() {
                    let outputs = g.w_out.saturating_sub(rx).div_ceil(fw);
                    if outputs == 0 {
                        continue;
                    }
                    let phase = (y % fh) * fw + rx;
                    if let Some(packed) = direct.get(phase) {
                        let src_at = ((image * h_src + source_row) * w_src + phase_w.first) * c;
                        let geometry = conv_direct::RowGeometry {
                            source_row_stride: w_src * c,
                            source_pixel_stride: s * c,
                            outputs,
                            output_pixel_stride: fw * co,
                        };
                        // SAFETY: `direct` is filled only where the kernel can run and T is
                        // f32. The reads are the GEMM path's below (kernel rows
                        // `source_row..source_row + taps`, each `outputs` windows of `depth`
                        // values `s·c` apart, inside the padded source); the writes the
                        // phase's outputs of this thread's row.
                        unsafe {
                            conv_direct::convolve_row(
                                padded.as_ptr().add(src_at).cast::<f32>(),
                                &geometry,
                                packed,
                                out_ptr.ptr().add(dst_at + rx * co).cast::<f32>(),
                            );
                        }
                        continue;
                    }
                    let weights = &phase_weights[phase];
                    let depth = phase_w.groups.len() * c;
                    // `a` also places the source row and decides accumulation, not only indexes.
                    #[allow(clippy::needless_range_loop)]
                    for a in 0..phase_h.groups.len() {
                        let src_at = ((image * h_src + source_row + a) * w_src + phase_w.first) * c;
                        debug_assert!(
                            (outputs - 1) * s + phase_w.first + phase_w.groups.len() <= w_src
                                && source_row + a < h_src
                        );
                        if bf16 {
                            // SAFETY: as for the f32 GEMM below, over the bf16 copy of the
                            // padded input (same layout); T is f32.
                            unsafe {
                                gemm_bf16::gemm_rows_in_place(
                                    padded_bf16_ref.as_ptr().add(src_at),
                                    s * c,
                                    outputs,
                                    &packed_weights[phase][a],
                                    out_ptr.ptr().add(dst_at + rx * co).cast::<f32>(),
                                    fw * co,
                                    a > 0,
                                );
                            }
                            continue;
                        }
                        // SAFETY: dst is the phase's outputs of out[row] (`outputs` pixels
                        // `fw·co` apart, co values each), written by this thread only (threads
                        // take disjoint runs of rows). lhs reads `outputs` rows of `depth`
                        // values, `s·c` apart, inside padded source row `source_row + a` of
                        // `image` (AxisPlan pads the source so that every output's taps land in
                        // it). rhs is the summed weights of reduced tap row a ([depth, co]).
                        unsafe {
                            gemm::gemm(
                                outputs,
                                co,
                                depth,
                                out_ptr.ptr().add(dst_at + rx * co),
                                1,
                                (fw * co) as isize,
                                a > 0,
                                padded.as_ptr().add(src_at),
                                1,
                                (s * c) as isize,
                                weights.as_ptr().add(a * depth * co),
                                1,
                                co as isize,
                                T::one(),
                                T::one(),
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                    }
                }
                // SAFETY: the row the GEMMs above just wrote, this thread's alone.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out_ptr.ptr().add(dst_at), row_len) };
                self.epilogue(
                    dst,
                    bias.as_deref(),
                    residual.map(|r| &r[dst_at..dst_at + row_len]),
                );
            }
        };
        let threads = thread_count(rows, rows * row_len * g.kw * c);
        for_each_range(rows, threads, &work);
        if bf16 {
            SCRATCH_BF16.with(|s| *s.borrow_mut() = padded_bf16);
        }
    }

    /// The convolution on [`super::winograd`] (`T` is f32; a 3×3 kernel, stride 1, no
    /// upsampling), each output row finished by [`Self::epilogue`].
    fn run_winograd<T: WithDType>(
        &self,
        x: &[T],
        weights: &WinogradWeights,
        residual: Option<&[T]>,
        g: &Geometry,
        out: &mut [T],
    ) {
        assert!(
            (g.kh, g.kw, self.stride, self.upsample) == (3, 3, 1, 1),
            "Winograd: 3×3 kernel, stride 1, no upsampling"
        );
        let shape = winograd::ChannelsLastShape {
            batch: g.batch,
            c_in: g.c_in,
            c_out: g.c_out,
            h: g.h,
            w: g.w,
            pad_top: self.padding.top,
            pad_left: self.padding.left,
            h_out: g.h_out,
            w_out: g.w_out,
        };
        let bias: Option<Vec<f32>> = self
            .bias
            .as_ref()
            .map(|b| b.iter().map(|&v| v as f32).collect());
        let row_len = g.w_out * g.c_out;
        // SAFETY: the caller checked that T is f32, so these slices hold f32 values.
        let (x, residual, out) = unsafe {
            (
                std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()),
                residual.map(|r| std::slice::from_raw_parts(r.as_ptr().cast::<f32>(), r.len())),
                std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<f32>(), out.len()),
            )
        };
        let finish = |row: usize, values: &mut [f32]| {
            self.epilogue(
                values,
                bias.as_deref(),
                residual.map(|r| &r[row * row_len..][..row_len]),
            );
        };
        let threads = super::threads().max(1);
        winograd::convolve_channels_last(x, &shape, weights, &finish, out, threads);
    }

    /// The op over raw f32 maps: `x` `[batch, h, w, C_in]` with `weight` `[kh, kw, C_in,
    /// C_out]`, written into `out` (resized to the output; its earlier values are not read).
    /// Returns the output's `(h_out, w_out, C_out)`.
    pub(super) fn run_f32_into(
        &self,
        x: &[f32],
        (batch, h, w): (usize, usize, usize),
        weight: &[f32],
        weight_shape: &Shape,
        residual: Option<&[f32]>,
        out: &mut Vec<f32>,
    ) -> candle_core::Result<(usize, usize, usize)> {
        let c_in = weight_shape.dims4()?.2;
        if x.len() != batch * h * w * c_in {
            candle_core::bail!(
                "conv (channels last): {} input values for [{batch}, {h}, {w}, {c_in}]",
                x.len()
            );
        }
        let g = self.geometry(&Shape::from((batch, h, w, c_in)), weight_shape)?;
        let len = g.batch * g.h_out * g.w_out * g.c_out;
        if residual.is_some_and(|r| r.len() != len) {
            candle_core::bail!("conv (channels last): residual does not match the output");
        }
        if out.capacity() < len {
            // A reallocation would copy the old values first: start afresh instead.
            *out = zeroed_buffer(len);
        } else {
            out.resize(len, 0.0);
        }
        self.run_into(x, weight, residual, &g, out);
        Ok((g.h_out, g.w_out, g.c_out))
    }

    /// Bias, residual and ReLU over one output row (`[w_out, co]`), in one pass.
    fn epilogue<T: WithDType>(&self, dst: &mut [T], bias: Option<&[T]>, residual: Option<&[T]>) {
        // Written as whole-slice loops with unconditional stores so that they vectorise.
        if let Some(bias) = bias {
            for pixel in dst.chunks_exact_mut(bias.len()) {
                for (v, &b) in pixel.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
        match (residual, self.relu) {
            (Some(residual), true) => {
                for (v, &r) in dst.iter_mut().zip(residual) {
                    *v = relu(*v + r);
                }
            }
            (Some(residual), false) => {
                for (v, &r) in dst.iter_mut().zip(residual) {
                    *v += r;
                }
            }
            (None, true) => {
                for v in dst.iter_mut() {
                    *v = relu(*v);
                }
            }
            (None, false) => {}
        }
    }

    fn forward(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry(l1.shape(), l2.shape())?;
        let out_shape = Shape::from((g.batch, g.h_out, g.w_out, g.c_out));
        if let Some((_, l3)) = residual
            && l3.shape() != &out_shape
        {
            candle_core::bail!(
                "conv (channels last): residual {:?} does not match the output {out_shape:?}",
                l3.shape()
            );
        }
        let name = "sdstream-conv2d-channels-last";
        let out = with_float_type!(
            s1.dtype(),
            name,
            [F32 => f32, F16 => half::f16, F64 => f64],
            |T| {
                let residual = match residual {
                    Some((s3, l3)) => Some(contiguous_slice::<T>(s3, l3, name)?),
                    None => None,
                };
                T::to_cpu_storage_owned(self.run::<T>(
                    contiguous_slice(s1, l1, name)?,
                    contiguous_slice(s2, l2, name)?,
                    residual,
                    &g,
                ))
            }
        );
        Ok((out, out_shape))
    }
}

/// The weights `[kh, kw, c, co]` with the kernel rows of each group in `rows` summed, and the
/// columns of each group in `cols`: `[rows.len(), cols.len(), c, co]`.
fn summed_weights<T: WithDType>(
    weight: &[T],
    g: &Geometry,
    rows: &[Vec<usize>],
    cols: &[Vec<usize>],
) -> Vec<T> {
    let block = g.c_in * g.c_out;
    let mut summed = Vec::with_capacity(rows.len() * cols.len() * block);
    let mut acc = vec![0f64; block];
    for row_group in rows {
        for col_group in cols {
            acc.fill(0.0);
            for &u in row_group {
                for &v in col_group {
                    let tap = &weight[(u * g.kw + v) * block..][..block];
                    for (a, &w) in acc.iter_mut().zip(tap) {
                        *a += w.to_f64();
                    }
                }
            }
            summed.extend(acc.iter().map(|&a| T::from_f64(a)));
        }
    }
    summed
}

/// The input zero-padded (and, on the strided fallback, upsampled) as its axis plans ask:
/// `[B, h, w, C]`, in this thread's scratch buffer.
struct Padded<T> {
    values: Vec<T>,
    h: usize,
    w: usize,
}

impl<T: WithDType> Padded<T> {
    fn new(
        op: &ChannelsLastConvOp,
        x: &[T],
        g: &Geometry,
        along_h: &AxisPlan,
        along_w: &AxisPlan,
    ) -> Self {
        let c = g.c_in;
        // Upsampling in the copy only on the fallback (both axes plan alike).
        let f = if along_h.copy_upsamples {
            op.upsample
        } else {
            1
        };
        let h = g.h * f + along_h.pad_before + along_h.pad_after;
        let w = g.w * f + along_w.pad_before + along_w.pad_after;
        let (top, left) = (along_h.pad_before, along_w.pad_before);
        let row_len = w * c;
        let mut values = take_scratch::<T>(g.batch * h * row_len);
        // Every element is written (the zeros too): the scratch holds an earlier layer's values.
        for_each_row(&mut values, row_len, |index, dst| {
            let (image, r) = (index / h, index % h);
            if r < top || r >= top + g.h * f {
                dst.fill(T::zero());
                return;
            }
            let y = (r - top) / f;
            let src = &x[(image * g.h + y) * g.w * c..][..g.w * c];
            let (before, rest) = dst.split_at_mut(left * c);
            let (inner, after) = rest.split_at_mut(g.w * f * c);
            before.fill(T::zero());
            after.fill(T::zero());
            if f == 1 {
                inner.copy_from_slice(src);
            } else {
                for (pixels, pixel) in inner.chunks_exact_mut(f * c).zip(src.chunks_exact(c)) {
                    for copy in pixels.chunks_exact_mut(c) {
                        copy.copy_from_slice(pixel);
                    }
                }
            }
        });
        Self { values, h, w }
    }
}

/// torch's ReLU: negatives to zero, NaN kept.
#[inline(always)]
fn relu<T: WithDType>(v: T) -> T {
    if v < T::zero() { T::zero() } else { v }
}

impl CustomOp2 for ChannelsLastConvOp {
    fn name(&self) -> &'static str {
        "sdstream-conv2d-channels-last"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(s1, l1, s2, l2, None)
    }
}

impl CustomOp3 for ChannelsLastConvOp {
    fn name(&self) -> &'static str {
        "sdstream-conv2d-channels-last"
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
        self.forward(s1, l1, s2, l2, Some((s3, l3)))
    }
}
