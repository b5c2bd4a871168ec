//! A direct f32 convolution kernel over channels-last maps, for x86 CPUs with AVX2 and FMA but
//! without AVX-512 (AMD Zen 1–3, Intel before Skylake-X, most laptops): the autoencoders' layers
//! in [`super::conv_channels_last`] run on it there.
//!
//! The GEMM path of that module hands the `gemm` crate, per output row and kernel row, an
//! `[W_out, kw·C]` matrix whose rows overlap in the padded input. The crate copies it into its
//! own packed layout on every call (`kw` copies of each input value, `kh` times per output row),
//! and at these shapes (a few hundred rows, 64–512 columns) spends a large part of its time
//! outside the multiply. Here a block of 6 output pixels × 16 output channels stays in 12 AVX2
//! registers while every tap of every kernel row is added into it: each step loads 16 weights
//! (two registers) and broadcasts one input value per pixel straight from the padded input, then
//! issues 12 fused multiply-adds. Nothing is copied but the weights, once per call, into blocks
//! of 16 output channels. The sums run tap by tap in order (kernel row, kernel column, input
//! channel), each an FMA, so the result differs from the GEMM path's only by rounding order.
//!
//! Where the CPU has AVX-512, the `gemm` crate's 512-bit kernels keep the work: this kernel would
//! use half of their width.

#[cfg(test)]
use std::cell::Cell;

/// Output channels per block: two AVX2 registers of 8 lanes.
pub(super) const CHANNELS: usize = 16;
/// Output pixels per block: 6 × 2 accumulators, 2 weight registers and a broadcast fill 15 of the
/// 16 registers.
const PIXELS: usize = 6;

#[cfg(test)]
thread_local! {
    /// Tests on this thread run the kernel wherever the CPU can, AVX-512 or not, so that it is
    /// checked on every machine. Not part of the [`crate::KernelPolicy`]: the policy says whether
    /// the kernel is allowed, and preferring the AVX-512 GEMM where the CPU has it is a measured
    /// speed choice, not one a host should override. Read on the calling thread only (the
    /// channels-last convolution asks [`chosen`] before it splits its work), so unlike the policy
    /// it need not reach the pool's workers.
    static FORCED: Cell<bool> = const { Cell::new(false) };
}

/// Whether this CPU can run the kernel (AVX2 and FMA).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a convolution with `c_out` output channels runs on this kernel: it can run here,
/// the channels fill whole blocks, no AVX-512 GEMM would be faster, and the current
/// [`crate::KernelPolicy`] allows it (`SDSTREAM_NO_DIRECT_CONV` unset or `0`; set, the GEMM
/// path runs: for comparisons).
pub(super) fn chosen(c_out: usize) -> bool {
    if !available() || c_out == 0 || !c_out.is_multiple_of(CHANNELS) {
        return false;
    }
    if !crate::KernelPolicy::current().direct_conv {
        return false;
    }
    #[cfg(test)]
    if FORCED.with(Cell::get) {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    {
        !std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Makes this thread's channels-last convolutions take the direct kernel wherever the CPU can
/// run it (`Some(true)`) or the GEMM path (`Some(false)`) until the guard drops; `None` leaves
/// the choice to the CPU and the process's policy. The GEMM path is the policy's
/// `direct_conv: false`; the direct kernel is the policy's `true` and, on CPUs with AVX-512,
/// [`FORCED`] besides.
#[cfg(test)]
pub(super) fn choose(choice: Option<bool>) -> impl Drop {
    struct Restore {
        forced: bool,
        _policy: crate::PolicyGuard,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.forced));
        }
    }
    let policy = crate::KernelPolicy {
        direct_conv: choice.unwrap_or(crate::KernelPolicy::process().direct_conv),
        ..crate::KernelPolicy::current()
    };
    Restore {
        forced: FORCED.with(|c| c.replace(choice == Some(true))),
        _policy: policy.enter(),
    }
}

/// One phase's weights (`[taps_h, depth, C_out]`, `depth = taps_w · C_in`) regrouped into blocks
/// of [`CHANNELS`] output channels, `[C_out / 16][taps_h][depth][16]`, starting on a cache line.
pub(super) struct PackedWeights {
    values: Vec<f32>,
    /// Index of the first value (the allocation's first 64-byte boundary).
    start: usize,
    taps_h: usize,
    depth: usize,
    blocks: usize,
}

impl PackedWeights {
    pub(super) fn new(weights: &[f32], taps_h: usize, depth: usize, c_out: usize) -> Self {
        assert!(
            c_out.is_multiple_of(CHANNELS),
            "whole blocks of output channels"
        );
        assert_eq!(weights.len(), taps_h * depth * c_out, "phase weights");
        let blocks = c_out / CHANNELS;
        let len = weights.len();
        let mut values = vec![0f32; len + CHANNELS];
        let start = values.as_ptr().align_offset(64).min(CHANNELS);
        let packed = &mut values[start..start + len];
        for (block, dst) in packed
            .chunks_exact_mut(taps_h * depth * CHANNELS)
            .enumerate()
        {
            for (row, dst) in dst.chunks_exact_mut(CHANNELS).enumerate() {
                dst.copy_from_slice(&weights[row * c_out + block * CHANNELS..][..CHANNELS]);
            }
        }
        Self {
            values,
            start,
            taps_h,
            depth,
            blocks,
        }
    }

    fn block(&self, block: usize) -> &[f32] {
        let len = self.taps_h * self.depth * CHANNELS;
        &self.values[self.start + block * len..][..len]
    }
}

/// Where one output row's phase reads and writes.
pub(super) struct RowGeometry {
    /// Padded input values between kernel rows (one padded row: `w_padded · C_in`).
    pub(super) source_row_stride: usize,
    /// Padded input values between consecutive output pixels (`stride · C_in`).
    pub(super) source_pixel_stride: usize,
    /// Output pixels of this row (and phase).
    pub(super) outputs: usize,
    /// Output values between consecutive output pixels (`phases · C_out`).
    pub(super) output_pixel_stride: usize,
}

/// Writes `row.outputs` pixels × all output channels of one output row (phase): output pixel
/// `p`, channel `o` = Σ over kernel rows `a`, depth `d` of
/// `source[a · source_row_stride + p · source_pixel_stride + d] · weight[a][d][o]`.
///
/// # Safety
/// [`available`] is true; `source` is valid for reads of every value that formula names
/// (`(taps_h − 1) · source_row_stride + (outputs − 1) · source_pixel_stride + depth` values);
/// `output` is valid for writes of `(outputs − 1) · output_pixel_stride + C_out` values, which
/// no other thread touches meanwhile.
pub(super) unsafe fn convolve_row(
    source: *const f32,
    row: &RowGeometry,
    weights: &PackedWeights,
    output: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as the caller promised.
    unsafe {
        avx2::convolve_row(source, row, weights, output)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (source, row, weights, output);
        unreachable!("the direct convolution is chosen only on x86_64 with AVX2");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{CHANNELS, PIXELS, PackedWeights, RowGeometry};

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn convolve_row(
        source: *const f32,
        row: &RowGeometry,
        weights: &PackedWeights,
        output: *mut f32,
    ) {
        for block in 0..weights.blocks {
            let panel = weights.block(block).as_ptr();
            let mut pixel = 0;
            // SAFETY (every call below): pixels `pixel..pixel + P` are below `outputs`, so the
            // reads and writes stay inside what the caller vouched for.
            unsafe {
                let output = output.add(block * CHANNELS);
                while pixel + PIXELS <= row.outputs {
                    tile::<PIXELS>(source, row, weights, panel, pixel, output);
                    pixel += PIXELS;
                }
                match row.outputs - pixel {
                    0 => {}
                    1 => tile::<1>(source, row, weights, panel, pixel, output),
                    2 => tile::<2>(source, row, weights, panel, pixel, output),
                    3 => tile::<3>(source, row, weights, panel, pixel, output),
                    4 => tile::<4>(source, row, weights, panel, pixel, output),
                    _ => tile::<5>(source, row, weights, panel, pixel, output),
                }
            }
        }
    }

    /// Output pixels `first..first + P`, channels of one block (`panel`, `[taps_h][depth][16]`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const P: usize>(
        source: *const f32,
        row: &RowGeometry,
        weights: &PackedWeights,
        panel: *const f32,
        first: usize,
        output: *mut f32,
    ) {
        let mut sums = [[_mm256_setzero_ps(); 2]; P];
        let depth = weights.depth;
        // SAFETY: reads inside the caller's source rows and this block's panel, writes inside
        // the caller's output pixels (see `convolve_row`).
        unsafe {
            for a in 0..weights.taps_h {
                let x = source.add(a * row.source_row_stride + first * row.source_pixel_stride);
                let w = panel.add(a * depth * CHANNELS);
                for d in 0..depth {
                    let low = _mm256_loadu_ps(w.add(d * CHANNELS));
                    let high = _mm256_loadu_ps(w.add(d * CHANNELS + 8));
                    for (p, sum) in sums.iter_mut().enumerate() {
                        let v = _mm256_broadcast_ss(&*x.add(p * row.source_pixel_stride + d));
                        sum[0] = _mm256_fmadd_ps(v, low, sum[0]);
                        sum[1] = _mm256_fmadd_ps(v, high, sum[1]);
                    }
                }
            }
            for (p, sum) in sums.iter().enumerate() {
                let at = output.add((first + p) * row.output_pixel_stride);
                _mm256_storeu_ps(at, sum[0]);
                _mm256_storeu_ps(at.add(8), sum[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel against the formula in f64, for every pixel remainder of its 6-pixel block,
    /// several blocks of output channels, strides and kernel rows, with the output's other
    /// values (between phases) left as they were.
    #[test]
    fn rows_match_the_formula() {
        if !available() {
            println!("no AVX2 and FMA here: nothing to check");
            return;
        }
        let mut seed = 1u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        // (taps_h, depth, c_out, stride in values, outputs, output pixel stride in blocks of c_out)
        for (taps_h, depth, c_out, stride, outputs, phases) in [
            (3, 27, 32, 3, 13, 1),
            (2, 40, 16, 8, 7, 2),
            (1, 5, 48, 5, 1, 1),
            (3, 64, 16, 128, 11, 1),
            (2, 33, 32, 33, 6, 2),
        ] {
            let row_stride = (outputs + 2) * stride + depth;
            let source: Vec<f32> = (0..taps_h * row_stride).map(|_| next()).collect();
            let weights: Vec<f32> = (0..taps_h * depth * c_out).map(|_| next()).collect();
            let packed = PackedWeights::new(&weights, taps_h, depth, c_out);
            let geometry = RowGeometry {
                source_row_stride: row_stride,
                source_pixel_stride: stride,
                outputs,
                output_pixel_stride: phases * c_out,
            };
            let mut output = vec![7f32; outputs * phases * c_out];
            // SAFETY: AVX2 and FMA are here; the source holds taps_h rows of `row_stride` values,
            // more than the last window reads; the output every pixel's channels.
            unsafe { convolve_row(source.as_ptr(), &geometry, &packed, output.as_mut_ptr()) };
            let mut worst = 0f64;
            for p in 0..outputs {
                for o in 0..c_out {
                    let mut want = 0f64;
                    for a in 0..taps_h {
                        for d in 0..depth {
                            want += source[a * row_stride + p * stride + d] as f64
                                * weights[(a * depth + d) * c_out + o] as f64;
                        }
                    }
                    let got = output[p * phases * c_out + o] as f64;
                    worst = worst.max((got - want).abs());
                    for phase in 1..phases {
                        assert_eq!(output[(p * phases + phase) * c_out + o], 7.0, "overwrote");
                    }
                }
            }
            println!(
                "taps {taps_h} depth {depth} c_out {c_out} outputs {outputs}: max {worst:.2e}"
            );
            assert!(
                worst < 1e-5,
                "taps {taps_h} depth {depth} c_out {c_out}: {worst}"
            );
        }
    }
}
