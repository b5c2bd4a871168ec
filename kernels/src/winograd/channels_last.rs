//! Channels-last maps, read in place 16 channels at a time, in chunks of tile rows whose
//! products run on the `gemm` crate.

use crate::simd::{self, Isa};
use crate::{SharedMut, for_each_range};

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::blocked::{blocked_fits, convolve_blocked};
use super::transforms::{LANES, MAX_WINDOW, ZERO, input_2d, load, output_2d, store, store_raw};
use super::weights::WinogradWeights;
use super::{Variant, chunk_budget, count};

/// Shape of one Winograd convolution over channels-last maps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelsLastShape {
    pub(crate) batch: usize,
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    /// Input size.
    pub(crate) h: usize,
    pub(crate) w: usize,
    /// Zero rows above and columns left of the input (those below and right follow from the
    /// output size).
    pub(crate) pad_top: usize,
    pub(crate) pad_left: usize,
    pub(crate) h_out: usize,
    pub(crate) w_out: usize,
}

impl ChannelsLastShape {
    /// Checks the operands of a convolution of this shape: `x` `[batch, h, w, C_in]`, `out`
    /// `[batch, h_out, w_out, C_out]`, and the weights' channels.
    pub(super) fn check(&self, x: &[f32], out: &[f32], weights: &WinogradWeights) {
        assert_eq!(
            (weights.c_out, weights.c_in),
            (self.c_out, self.c_in),
            "weights"
        );
        assert_eq!(x.len(), self.batch * self.h * self.w * self.c_in);
        assert_eq!(out.len(), self.batch * self.h_out * self.w_out * self.c_out);
    }

    /// The `C_in` values of pixel `(y, col)` of `image`'s zero-padded input (coordinates
    /// counting the padding): a slice of `x`, or `zeros` outside the input.
    #[inline(always)]
    pub(super) fn pixel<'a>(
        &self,
        x: &'a [f32],
        zeros: &'a [f32],
        image: usize,
        y: usize,
        col: usize,
    ) -> &'a [f32] {
        match (y.checked_sub(self.pad_top), col.checked_sub(self.pad_left)) {
            (Some(y), Some(col)) if y < self.h && col < self.w => {
                &x[((image * self.h + y) * self.w + col) * self.c_in..][..self.c_in]
            }
            _ => zeros,
        }
    }
}

/// Writes the convolution of `x` (`[batch, h, w, C_in]`) by `weights` (made with
/// `channels_last`) into `out` (`[batch, h_out, w_out, C_out]`), then calls `finish(row,
/// values)` on every output row (global row index `image · h_out + y`, its `w_out · C_out`
/// values) while it is in cache: the caller's bias, residual and activation.
pub(crate) fn convolve_channels_last(
    x: &[f32],
    shape: &ChannelsLastShape,
    weights: &WinogradWeights,
    finish: &(dyn Fn(usize, &mut [f32]) + Sync),
    out: &mut [f32],
    threads: usize,
) {
    let isa = simd::isa();
    match (weights.variant, blocked_fits(isa, shape.c_in, shape.c_out)) {
        (Variant::F2, false) => {
            convolve_channels_last_with::<2>(isa, x, shape, weights, finish, out, threads)
        }
        (Variant::F4, false) => {
            convolve_channels_last_with::<4>(isa, x, shape, weights, finish, out, threads)
        }
        (Variant::F2, true) => convolve_blocked::<2>(isa, x, shape, weights, finish, out, threads),
        (Variant::F4, true) => convolve_blocked::<4>(isa, x, shape, weights, finish, out, threads),
    }
}

pub(super) fn convolve_channels_last_with<const M: usize>(
    isa: Isa,
    x: &[f32],
    shape: &ChannelsLastShape,
    weights: &WinogradWeights,
    finish: &(dyn Fn(usize, &mut [f32]) + Sync),
    out: &mut [f32],
    threads: usize,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let s = *shape;
    count(weights);
    let (a, points) = (M + 2, weights.variant.points());
    debug_assert_eq!(weights.variant.tile(), M);
    s.check(x, out, weights);
    let (th, tw) = (s.h_out.div_ceil(M), s.w_out.div_ceil(M));
    let tile_rows = s.batch * th;
    if tile_rows == 0 || tw == 0 || s.c_out == 0 {
        return;
    }
    // At least one tile row per thread, so that the transforms share out.
    let rows_per_chunk = (chunk_budget(points, s.c_in, s.c_out)
        / (points * s.c_in.max(s.c_out) * tw * 4))
        .max(threads)
        .clamp(1, tile_rows);
    let chunk_tiles = rows_per_chunk * tw;
    let mut transformed = vec![0f32; points * chunk_tiles * s.c_in];
    let mut products = vec![0f32; points * chunk_tiles * s.c_out];
    let zeros = vec![0f32; s.c_in];
    let out_ptr = SharedMut(out.as_mut_ptr());
    let mut first_row = 0;
    while first_row < tile_rows {
        let rows = rows_per_chunk.min(tile_rows - first_row);
        let chunk = first_row..first_row + rows;
        let dst = SharedMut(transformed.as_mut_ptr());
        let input = |local_rows: std::ops::Range<usize>| {
            for local in local_rows {
                let (image, ty) = ((chunk.start + local) / th, (chunk.start + local) % th);
                for tx in 0..tw {
                    // The window's input pixels (zeros outside the map).
                    let d: [[&[f32]; MAX_WINDOW]; MAX_WINDOW] = std::array::from_fn(|row| {
                        std::array::from_fn(|col| {
                            if row < a && col < a {
                                s.pixel(x, &zeros, image, M * ty + row, M * tx + col)
                            } else {
                                &[][..]
                            }
                        })
                    });
                    let tile = local * tw + tx;
                    #[cfg(target_arch = "x86_64")]
                    if isa == Isa::Avx512 {
                        let mut ch = 0;
                        while ch < s.c_in {
                            let point = |i: usize, j: usize| {
                                ((i * a + j) * chunk_tiles + tile) * s.c_in + ch
                            };
                            // SAFETY: the CPU has AVX-512F; channels ch.. (up to C_in) of each
                            // window pixel, and of point (i, j)'s row for this tile in
                            // `transformed`, which is this thread's alone (as below).
                            unsafe {
                                avx512::input_window::<M>(
                                    |row, col| d[row][col][ch..].as_ptr(),
                                    |i, j| dst.ptr().add(point(i, j)),
                                    avx512::first(s.c_in - ch),
                                )
                            };
                            ch += LANES;
                        }
                        continue;
                    }
                    let mut ch = 0;
                    while ch < s.c_in {
                        let n = LANES.min(s.c_in - ch);
                        let window = std::array::from_fn(|row| {
                            std::array::from_fn(|col| {
                                if row < a && col < a {
                                    load(d[row][col], ch, n)
                                } else {
                                    ZERO
                                }
                            })
                        });
                        let v = input_2d::<M>(&window);
                        for (i, row) in v.iter().take(a).enumerate() {
                            for (j, lane) in row.iter().take(a).enumerate() {
                                // SAFETY: point (i, j)'s row for this tile in `transformed`
                                // ([points][chunk_tiles][C_in]), channels ch..ch + n; tile rows
                                // are split between threads, so the row is this thread's alone.
                                unsafe {
                                    store_raw(
                                        dst.ptr()
                                            .add(((i * a + j) * chunk_tiles + tile) * s.c_in + ch),
                                        lane,
                                        n,
                                    );
                                }
                            }
                        }
                        ch += n;
                    }
                }
            }
        };
        for_each_range(rows, threads.min(rows), &input);
        let tiles = rows * tw;
        let products_ptr = SharedMut(products.as_mut_ptr());
        let multiply = |points: std::ops::Range<usize>| {
            for xi in points {
                let lhs = &transformed[xi * chunk_tiles * s.c_in..][..tiles * s.c_in];
                // SAFETY: products[ξ] ([tiles, C_out], row stride C_out) is point ξ's own block;
                // the left operand is transformed[ξ] ([tiles, C_in]), the right U[ξ]
                // ([C_in, C_out]), inside their buffers.
                unsafe {
                    gemm::gemm(
                        tiles,
                        s.c_out,
                        s.c_in,
                        products_ptr.ptr().add(xi * chunk_tiles * s.c_out),
                        1,
                        s.c_out as isize,
                        false,
                        lhs.as_ptr(),
                        1,
                        s.c_in as isize,
                        weights.point(xi).as_ptr(),
                        1,
                        s.c_out as isize,
                        0f32,
                        1f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        };
        for_each_range(points, threads.min(points), &multiply);
        let products = &products;
        let output = |local_rows: std::ops::Range<usize>| {
            for local in local_rows {
                let (image, ty) = ((chunk.start + local) / th, (chunk.start + local) % th);
                let out_rows = M.min(s.h_out - M * ty);
                let row_len = s.w_out * s.c_out;
                // SAFETY: output rows M·ty.. of `image` (those inside the map): this tile
                // row's alone, and tile rows are split between threads.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.ptr().add((image * s.h_out + M * ty) * row_len),
                        out_rows * row_len,
                    )
                };
                for tx in 0..tw {
                    let tile = local * tw + tx;
                    let out_cols = M.min(s.w_out - M * tx);
                    #[cfg(target_arch = "x86_64")]
                    if isa == Isa::Avx512 && s.c_out.is_multiple_of(LANES) {
                        let out_row = dst.as_mut_ptr();
                        for co in (0..s.c_out).step_by(LANES) {
                            let point = |i: usize, j: usize| {
                                ((i * a + j) * chunk_tiles + tile) * s.c_out + co
                            };
                            // SAFETY: the CPU has AVX-512F; 16 channels of each point's
                            // product for this tile, and of each output pixel of the tile
                            // inside the map, which is this thread's alone (as above).
                            unsafe {
                                avx512::output_window::<M>(
                                    |i, j| products[point(i, j)..][..LANES].as_ptr(),
                                    |i, j| {
                                        let at = i * row_len + (M * tx + j) * s.c_out + co;
                                        debug_assert!(at + LANES <= out_rows * row_len);
                                        out_row.add(at)
                                    },
                                    out_rows,
                                    out_cols,
                                )
                            };
                        }
                        continue;
                    }
                    let mut co = 0;
                    while co < s.c_out {
                        let n = LANES.min(s.c_out - co);
                        let m = std::array::from_fn(|i| {
                            std::array::from_fn(|j| {
                                if i < a && j < a {
                                    let at = ((i * a + j) * chunk_tiles + tile) * s.c_out + co;
                                    load(products, at, n)
                                } else {
                                    ZERO
                                }
                            })
                        });
                        let y = output_2d::<M>(&m);
                        for (i, row) in y.iter().take(out_rows).enumerate() {
                            for (j, lane) in row.iter().take(out_cols).enumerate() {
                                let at = i * row_len + (M * tx + j) * s.c_out + co;
                                store(dst, at, lane, n);
                            }
                        }
                        co += n;
                    }
                }
                for (i, row) in dst.chunks_exact_mut(row_len).enumerate() {
                    finish(image * s.h_out + M * ty + i, row);
                }
            }
        };
        for_each_range(rows, threads.min(rows), &output);
        first_row += rows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::winograd::tests::random_values;

    /// The AVX-512 transforms of channels-last maps give the portable ones' values bit for bit:
    /// in the chunked kernel (its products on the `gemm` crate either way), with input
    /// channels in partial lanes and output channels in whole lanes or not (those stay
    /// portable); in the blocked kernel against its AVX2 form (the same sums in the same order
    /// on narrower registers, the transforms portable). Partial tiles at the right and bottom
    /// edges, one-sided padding, a batch, both variants.
    #[test]
    fn avx512_channels_last_transforms_equal_the_portable_ones() {
        if simd::isa() != Isa::Avx512 {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut random = random_values(11);
        // (blocked, batch, c_in, c_out, h, w, pad_top, pad_left, h_out, w_out)
        type Case = (
            bool,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
        );
        let cases: [Case; 6] = [
            (false, 1, 20, 32, 9, 13, 1, 1, 9, 13),
            (false, 2, 7, 16, 6, 10, 0, 0, 5, 9),
            (false, 1, 16, 24, 11, 7, 1, 1, 11, 7),
            (true, 1, 64, 64, 9, 30, 1, 1, 9, 30),
            (true, 2, 16, 48, 7, 61, 0, 0, 6, 60),
            (true, 1, 32, 16, 13, 5, 1, 1, 13, 5),
        ];
        for variant in Variant::ALL {
            for (blocked, batch, c_in, c_out, h, w, pad_top, pad_left, h_out, w_out) in cases {
                let s = ChannelsLastShape {
                    batch,
                    c_in,
                    c_out,
                    h,
                    w,
                    pad_top,
                    pad_left,
                    h_out,
                    w_out,
                };
                let x: Vec<f32> = (0..batch * h * w * c_in).map(|_| random()).collect();
                let weight: Vec<f32> = (0..9 * c_in * c_out).map(|_| random()).collect();
                let weights = WinogradWeights::new(&weight, c_out, c_in, true, variant, false, 2);
                let run = |isa: Isa| {
                    let mut out = vec![f32::NAN; batch * h_out * w_out * c_out];
                    let finish = |_: usize, _: &mut [f32]| {};
                    match (variant, blocked) {
                        (Variant::F2, false) => convolve_channels_last_with::<2>(
                            isa, &x, &s, &weights, &finish, &mut out, 2,
                        ),
                        (Variant::F4, false) => convolve_channels_last_with::<4>(
                            isa, &x, &s, &weights, &finish, &mut out, 2,
                        ),
                        (Variant::F2, true) => {
                            convolve_blocked::<2>(isa, &x, &s, &weights, &finish, &mut out, 2)
                        }
                        (Variant::F4, true) => {
                            convolve_blocked::<4>(isa, &x, &s, &weights, &finish, &mut out, 2)
                        }
                    }
                    out
                };
                let portable = run(if blocked { Isa::Avx2 } else { Isa::Baseline });
                let avx512 = run(Isa::Avx512);
                assert!(
                    portable.iter().all(|v| v.is_finite()),
                    "every output written"
                );
                assert!(
                    portable.iter().any(|v| v.abs() > 0.5),
                    "outputs not trivially small"
                );
                let differ = portable
                    .iter()
                    .zip(&avx512)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(
                    differ, 0,
                    "{variant:?} blocked {blocked} b{batch} {c_in}->{c_out} {h}x{w}: outputs differ"
                );
            }
        }
    }
}
