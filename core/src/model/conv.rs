//! 2-D convolution for the VAE and TAESD, with a CPU kernel built for their shapes.
//!
//! candle's CPU convolution gathers its im2col tiles element by element and scatters the result
//! back; at 512² that bookkeeping costs three times the matrix products. Here, on the CPU:
//!
//! * the input is copied once into zero-padded planes (and, for stride s, split into its s×s
//!   phases, so that every tap of the kernel reads a plain shifted window of one plane);
//! * in such a plane, the window that tap (u, v) reads for a run of consecutive outputs is a
//!   *contiguous* slice, provided the output is computed on the plane's own row width (a few
//!   extra columns per row, discarded afterwards). So each im2col row of a tile is one `memcpy`;
//! * one GEMM per tile ([C_out, C_in·k²] × [C_in·k², N]), tiles spread over threads, and the
//!   crop of the extra columns fused with the bias add;
//! * nearest-neighbour upsampling, when asked for, happens while filling the planes, so the
//!   upsampled map is never materialised; 1×1 convolutions multiply the input in place.
//!
//! bf16 runs in f32 on the CPU (the GEMM has no bf16 kernel); other devices use candle's
//! convolution.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Shape, Tensor, WithDType};
use candle_nn::VarBuilder;

/// Zero padding on each side of the input, in input pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding {
    /// Rows added above.
    pub top: usize,
    /// Rows added below.
    pub bottom: usize,
    /// Columns added on the left.
    pub left: usize,
    /// Columns added on the right.
    pub right: usize,
}

impl Padding {
    /// The same padding on all four sides, as torch's `Conv2d(padding=p)`.
    pub fn uniform(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }

    fn is_uniform(&self) -> bool {
        self.top == self.bottom && self.top == self.left && self.top == self.right
    }
}

/// A 2-D convolution with torch's weight layout: weight [C_out, C_in, k, k], bias [C_out].
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    /// The bias, or zeros when the layer has none (the CPU kernel always adds one).
    bias: Tensor,
    has_bias: bool,
    stride: usize,
    padding: Padding,
}

impl Conv2d {
    /// Reads `weight` (and `bias` when `bias` is set) from `vb`.
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: Padding,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if stride == 0 || kernel == 0 {
            candle_core::bail!(
                "conv at {}: kernel and stride must be positive",
                vb.prefix()
            );
        }
        let weight = vb.get((c_out, c_in, kernel, kernel), "weight")?;
        let bias_tensor = if bias {
            vb.get(c_out, "bias")?
        } else {
            Tensor::zeros(c_out, vb.dtype(), vb.device())?
        };
        // candle's CPU GEMM has no bf16 kernel: keep f32 copies for the CPU path.
        let (weight, bias_tensor) = if vb.dtype() == DType::BF16 && vb.device().is_cpu() {
            (
                weight.to_dtype(DType::F32)?,
                bias_tensor.to_dtype(DType::F32)?,
            )
        } else {
            (weight, bias_tensor)
        };
        Ok(Self {
            weight,
            bias: bias_tensor,
            has_bias: bias,
            stride,
            padding,
        })
    }

    /// Convolves the nearest-neighbour `factor`× upsampling of `xs` (torch's
    /// `F.interpolate(xs, scale_factor=factor, mode="nearest")` followed by this convolution),
    /// without materialising the upsampled map on the CPU.
    pub fn forward_upsampled(&self, xs: &Tensor, factor: usize) -> candle_core::Result<Tensor> {
        if factor == 0 {
            candle_core::bail!("conv: upsampling factor must be positive");
        }
        if xs.device().is_cpu() {
            let dtype = xs.dtype();
            let xs = xs.to_dtype(self.weight.dtype())?.contiguous()?;
            let op = ConvCpu {
                stride: self.stride,
                padding: self.padding,
                upsample: factor,
            };
            return xs
                .apply_op3_no_bwd(&self.weight, &self.bias, &op)?
                .to_dtype(dtype);
        }
        let xs = if factor == 1 {
            xs.clone()
        } else {
            let (_, _, h, w) = xs.dims4()?;
            xs.upsample_nearest2d(h * factor, w * factor)?
        };
        self.forward_generic(&xs)
    }

    /// candle's convolution, for devices without the CPU kernel.
    fn forward_generic(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let p = self.padding;
        let (xs, pad) = if p.is_uniform() {
            (xs.clone(), p.top)
        } else {
            let padded = xs
                .pad_with_zeros(2, p.top, p.bottom)?
                .pad_with_zeros(3, p.left, p.right)?;
            (padded, 0)
        };
        let ys = xs.conv2d(&self.weight, pad, self.stride, 1, 1)?;
        if self.has_bias {
            ys.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
        } else {
            Ok(ys)
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_upsampled(xs, 1)
    }
}

/// The CPU kernel: input [B, C_in, H, W], weight [C_out, C_in, kh, kw], bias [C_out], all
/// contiguous; the input is upsampled by `upsample` (nearest), then padded, then convolved.
struct ConvCpu {
    stride: usize,
    padding: Padding,
    upsample: usize,
}

/// Geometry of one convolution.
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
    /// Output size.
    h_out: usize,
    w_out: usize,
    /// Phase-plane row width: ⌈padded width / stride⌉.
    w_plane: usize,
    /// Elements per plane, with a zero tail so that the last window never reads past it.
    plane_len: usize,
}

/// A raw output pointer shared by threads that write disjoint elements.
#[derive(Clone, Copy)]
struct SharedOut<T>(*mut T);
// SAFETY: the pointer is only used to write elements no other thread writes (see the callers).
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the field).
    fn ptr(&self) -> *mut T {
        self.0
    }
}

impl ConvCpu {
    fn geometry(&self, x: &Shape, w: &Shape) -> candle_core::Result<Geometry> {
        let (batch, c_in, h, wd) = x.dims4()?;
        let (c_out, c_in_w, kh, kw) = w.dims4()?;
        if c_in != c_in_w {
            candle_core::bail!("conv: input has {c_in} channels, the weight expects {c_in_w}");
        }
        let p = self.padding;
        let (s, f) = (self.stride, self.upsample);
        let hp = h * f + p.top + p.bottom;
        let wp = wd * f + p.left + p.right;
        if hp < kh || wp < kw {
            candle_core::bail!(
                "conv: input {h}×{wd} (upsampled ×{f}, padded to {hp}×{wp}) is smaller than the \
                 {kh}×{kw} kernel"
            );
        }
        let (h_plane, w_plane) = (hp.div_ceil(s), wp.div_ceil(s));
        Ok(Geometry {
            batch,
            c_in,
            c_out,
            h,
            w: wd,
            kh,
            kw,
            h_out: (hp - kh) / s + 1,
            w_out: (wp - kw) / s + 1,
            w_plane,
            plane_len: h_plane * w_plane + w_plane + kw,
        })
    }

    fn is_pointwise(&self, g: &Geometry) -> bool {
        g.kh == 1
            && g.kw == 1
            && self.stride == 1
            && self.upsample == 1
            && self.padding == Padding::default()
    }

    fn run<T: WithDType>(
        &self,
        x: &[T],
        weight: &[T],
        bias: &[T],
        g: &Geometry,
    ) -> candle_core::Result<Vec<T>> {
        let out_len = g.batch * g.c_out * g.h_out * g.w_out;
        let mut out = vec![T::zero(); out_len];
        if out_len == 0 || g.c_in == 0 {
            return Ok(out);
        }
        if self.is_pointwise(g) {
            self.pointwise(x, weight, bias, g, &mut out);
        } else {
            let planes = self.pack(x, g);
            self.tiled(&planes, weight, bias, g, &mut out);
        }
        Ok(out)
    }

    /// Copies the (upsampled) input into zero-padded phase planes, laid out
    /// [batch][C_in][phase = (row % s)·s + col % s][plane_len].
    fn pack<T: WithDType>(&self, x: &[T], g: &Geometry) -> Vec<T> {
        let s = self.stride;
        let f = self.upsample;
        let p = self.padding;
        let pair_len = s * s * g.plane_len;
        let pairs = g.batch * g.c_in;
        let mut planes = vec![T::zero(); pairs * pair_len];
        let (hv, wv) = (g.h * f, g.w * f);
        // Fills the phase planes of one (batch, channel) pair.
        let fill = |pair: usize, dst: &mut [T]| {
            let src = &x[pair * g.h * g.w..(pair + 1) * g.h * g.w];
            for vr in 0..hv {
                let src_row = &src[(vr / f) * g.w..(vr / f + 1) * g.w];
                let r = vr + p.top;
                if s == 1 {
                    let start = r * g.w_plane + p.left;
                    if vr % f != 0 {
                        // Repeated row of an upsampling: copy the row just written.
                        dst.copy_within(start - g.w_plane..start - g.w_plane + wv, start);
                    } else if f == 1 {
                        dst[start..start + wv].copy_from_slice(src_row);
                    } else {
                        let row = &mut dst[start..start + wv];
                        for (cells, &v) in row.chunks_exact_mut(f).zip(src_row) {
                            cells.fill(v);
                        }
                    }
                    continue;
                }
                // Stride s: padded column c goes to phase c % s, plane column c / s.
                let (a, i) = (r % s, r / s);
                for b in 0..s {
                    let base = (a * s + b) * g.plane_len + i * g.w_plane;
                    // First plane column whose padded column j·s + b is inside the input.
                    let first = p.left.saturating_sub(b).div_ceil(s);
                    for j in first..g.w_plane {
                        let vc = j * s + b - p.left;
                        if vc >= wv {
                            break;
                        }
                        dst[base + j] = src_row[vc / f];
                    }
                }
            }
        };
        let threads = thread_count(pairs, x.len());
        let pairs_per_thread = pairs.div_ceil(threads);
        std::thread::scope(|scope| {
            let mut chunks = planes.chunks_mut(pairs_per_thread * pair_len).enumerate();
            let first = chunks.next();
            for (t, chunk) in chunks {
                let fill = &fill;
                scope.spawn(move || {
                    for (i, dst) in chunk.chunks_mut(pair_len).enumerate() {
                        fill(t * pairs_per_thread + i, dst);
                    }
                });
            }
            if let Some((_, chunk)) = first {
                for (i, dst) in chunk.chunks_mut(pair_len).enumerate() {
                    fill(i, dst);
                }
            }
        });
        planes
    }

    /// Convolution by tiles of consecutive plane-width outputs: im2col of a tile is one
    /// contiguous copy per (channel, tap), then one GEMM, then crop + bias into `out`.
    fn tiled<T: WithDType>(
        &self,
        planes: &[T],
        weight: &[T],
        bias: &[T],
        g: &Geometry,
        out: &mut [T],
    ) {
        let s = self.stride;
        let k = g.c_in * g.kh * g.kw;
        let n_total = g.h_out * g.w_plane;
        let elem = std::mem::size_of::<T>();
        // About 2 MiB of im2col per tile (larger tiles measured no faster), and at least two
        // tiles per thread when the map is large enough.
        let threads_wanted = candle_core::utils::get_num_threads().max(1);
        let by_cache = ((2 << 20) / (k * elem)).max(64);
        let by_threads = (g.batch * n_total).div_ceil(2 * threads_wanted).max(64);
        let tile = by_cache.min(by_threads).min(n_total);
        let tiles_per_image = n_total.div_ceil(tile);
        let tiles = g.batch * tiles_per_image;
        let threads = thread_count(tiles, g.batch * k * n_total);
        let pair_len = s * s * g.plane_len;
        let out_ptr = SharedOut(out.as_mut_ptr());

        let work = |first: usize, last: usize| {
            let mut col = vec![T::zero(); k * tile];
            let mut acc = vec![T::zero(); g.c_out * tile];
            for t in first..last {
                let (bi, ti) = (t / tiles_per_image, t % tiles_per_image);
                let n0 = ti * tile;
                let nt = tile.min(n_total - n0);
                for ci in 0..g.c_in {
                    let pair = &planes[(bi * g.c_in + ci) * pair_len..][..pair_len];
                    for u in 0..g.kh {
                        for v in 0..g.kw {
                            let phase = (u % s) * s + v % s;
                            let plane = phase * g.plane_len;
                            let offset = plane + (u / s) * g.w_plane + v / s + n0;
                            let row = (ci * g.kh + u) * g.kw + v;
                            col[row * nt..(row + 1) * nt]
                                .copy_from_slice(&pair[offset..offset + nt]);
                        }
                    }
                }
                // SAFETY: `acc` is [c_out, nt] (row stride nt), `weight` [c_out, k] (row stride
                // k), `col` [k, nt] (row stride nt); all three buffers hold at least that many
                // elements.
                unsafe {
                    gemm::gemm(
                        g.c_out,
                        nt,
                        k,
                        acc.as_mut_ptr(),
                        1,
                        nt as isize,
                        false,
                        weight.as_ptr(),
                        1,
                        k as isize,
                        col.as_ptr(),
                        1,
                        nt as isize,
                        T::zero(),
                        T::one(),
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                // Keep the columns that are real outputs, adding the bias.
                let out_image = bi * g.c_out * g.h_out * g.w_out;
                let (y_first, y_last) = (n0 / g.w_plane, (n0 + nt - 1) / g.w_plane);
                for y in y_first..=y_last {
                    let row_start = y * g.w_plane;
                    let x0 = n0.max(row_start) - row_start;
                    let x1 = (n0 + nt).min(row_start + g.w_plane) - row_start;
                    let x1 = x1.min(g.w_out);
                    if x0 >= x1 {
                        continue;
                    }
                    for co in 0..g.c_out {
                        let src = &acc[co * nt + (row_start + x0 - n0)..][..x1 - x0];
                        let dst_at = out_image + (co * g.h_out + y) * g.w_out + x0;
                        let b = bias[co];
                        // SAFETY: output (bi, co, y, x0..x1) belongs to this tile alone: tiles
                        // partition the outputs of each image, and dst_at + (x1 − x0) ≤ out.len().
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(out_ptr.ptr().add(dst_at), x1 - x0)
                        };
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = v + b;
                        }
                    }
                }
            }
        };
        run_split(tiles, threads, &work);
    }

    /// 1×1 convolution without padding or stride: GEMM straight from the input into the output.
    fn pointwise<T: WithDType>(
        &self,
        x: &[T],
        weight: &[T],
        bias: &[T],
        g: &Geometry,
        out: &mut [T],
    ) {
        let hw = g.h * g.w;
        let threads_wanted = candle_core::utils::get_num_threads().max(1);
        let tile = hw.div_ceil(2 * threads_wanted).clamp(256, 16384).min(hw);
        let tiles_per_image = hw.div_ceil(tile);
        let tiles = g.batch * tiles_per_image;
        let threads = thread_count(tiles, g.batch * g.c_in * hw);
        let out_ptr = SharedOut(out.as_mut_ptr());
        let work = |first: usize, last: usize| {
            for t in first..last {
                let (bi, ti) = (t / tiles_per_image, t % tiles_per_image);
                let n0 = ti * tile;
                let nt = tile.min(hw - n0);
                let src = &x[bi * g.c_in * hw + n0..];
                let dst_at = bi * g.c_out * hw + n0;
                // SAFETY: this tile writes out[bi, :, n0..n0+nt] only (row stride hw), disjoint
                // from every other tile; the input slice covers [c_in, hw] with row stride hw.
                unsafe {
                    gemm::gemm(
                        g.c_out,
                        nt,
                        g.c_in,
                        out_ptr.ptr().add(dst_at),
                        1,
                        hw as isize,
                        false,
                        weight.as_ptr(),
                        1,
                        g.c_in as isize,
                        src.as_ptr(),
                        1,
                        hw as isize,
                        T::zero(),
                        T::one(),
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    for (co, &b) in bias.iter().enumerate() {
                        let dst =
                            std::slice::from_raw_parts_mut(out_ptr.ptr().add(dst_at + co * hw), nt);
                        for d in dst {
                            *d += b;
                        }
                    }
                }
            }
        };
        run_split(tiles, threads, &work);
    }
}

/// Threads worth starting for `items` work items over `volume` elements.
fn thread_count(items: usize, volume: usize) -> usize {
    candle_core::utils::get_num_threads()
        .clamp(1, items.max(1))
        .min(volume.div_ceil(1 << 15).max(1))
}

/// Runs `work(first, last)` over `0..items` split into `threads` contiguous ranges.
fn run_split(items: usize, threads: usize, work: &(dyn Fn(usize, usize) + Sync)) {
    if threads <= 1 {
        work(0, items);
        return;
    }
    let per_thread = items.div_ceil(threads);
    std::thread::scope(|scope| {
        for t in 1..threads {
            let (first, last) = (t * per_thread, ((t + 1) * per_thread).min(items));
            if first < last {
                scope.spawn(move || work(first, last));
            }
        }
        work(0, per_thread.min(items));
    });
}

impl CustomOp3 for ConvCpu {
    fn name(&self) -> &'static str {
        "conv2d-planes"
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
        fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
            match l.contiguous_offsets() {
                Some((start, end)) => Ok(&T::cpu_storage_as_slice(s)?[start..end]),
                None => candle_core::bail!("conv: operand not contiguous"),
            }
        }
        let g = self.geometry(l1.shape(), l2.shape())?;
        if l3.shape().elem_count() != g.c_out {
            candle_core::bail!(
                "conv: bias has {} values for {} channels",
                l3.shape().elem_count(),
                g.c_out
            );
        }
        fn go<T: WithDType>(
            op: &ConvCpu,
            g: &Geometry,
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            (s3, l3): (&CpuStorage, &Layout),
        ) -> candle_core::Result<CpuStorage> {
            let out = op.run(
                slice::<T>(s1, l1)?,
                slice::<T>(s2, l2)?,
                slice::<T>(s3, l3)?,
                g,
            )?;
            Ok(T::to_cpu_storage_owned(out))
        }
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let out = match s1.dtype() {
            DType::F32 => go::<f32>(self, &g, args.0, args.1, args.2)?,
            DType::F64 => go::<f64>(self, &g, args.0, args.1, args.2)?,
            DType::F16 => go::<half::f16>(self, &g, args.0, args.1, args.2)?,
            other => candle_core::bail!("conv: unsupported dtype {other:?} on the CPU"),
        };
        let shape = Shape::from((g.batch, g.c_out, g.h_out, g.w_out));
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn conv(weight: &Tensor, bias: &Tensor, stride: usize, padding: Padding) -> Conv2d {
        Conv2d {
            weight: weight.clone(),
            bias: bias.clone(),
            has_bias: true,
            stride,
            padding,
        }
    }

    /// The plane kernel agrees with candle's convolution across strides, paddings, kernel
    /// sizes, upsampling and odd sizes.
    #[test]
    fn matches_candle_convolution() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let cases = [
            // (c_in, c_out, k, h, w, stride, padding, upsample)
            (3, 5, 3, 7, 9, 1, Padding::uniform(1), 1),
            (
                4,
                6,
                3,
                8,
                6,
                2,
                Padding {
                    top: 0,
                    bottom: 1,
                    left: 0,
                    right: 1,
                },
                1,
            ),
            (4, 6, 3, 9, 7, 2, Padding::uniform(1), 1),
            (5, 3, 1, 6, 5, 1, Padding::default(), 1),
            (2, 4, 3, 5, 6, 1, Padding::uniform(1), 2),
            (3, 2, 5, 11, 10, 1, Padding::uniform(2), 1),
            (6, 7, 3, 40, 33, 1, Padding::uniform(1), 1),
            // Large enough to be split across threads.
            (
                8,
                6,
                3,
                64,
                50,
                2,
                Padding {
                    top: 0,
                    bottom: 1,
                    left: 0,
                    right: 1,
                },
                1,
            ),
            (8, 8, 3, 48, 64, 1, Padding::uniform(1), 2),
            (16, 8, 1, 64, 64, 1, Padding::default(), 1),
        ];
        for (c_in, c_out, k, h, w, stride, padding, up) in cases {
            let x = Tensor::randn(0f32, 1.0, (2, c_in, h, w), &dev)?;
            let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 0.3, c_out, &dev)?;
            let layer = conv(&weight, &bias, stride, padding);
            let got = layer.forward_upsampled(&x, up)?;
            let xu = if up == 1 {
                x.clone()
            } else {
                x.upsample_nearest2d(h * up, w * up)?
            };
            let want = layer.forward_generic(&xu)?;
            assert_eq!(got.dims(), want.dims());
            let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err < 1e-4,
                "case {c_in}->{c_out} k{k} {h}x{w} s{stride} {padding:?} up{up}: {err}"
            );
        }
        Ok(())
    }
}
