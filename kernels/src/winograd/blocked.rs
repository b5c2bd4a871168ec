//! Narrow channels-last layers, block by block: a small block of tiles' three steps on one
//! thread, its values in the core's caches.

use crate::simd::Isa;
use crate::{SharedMut, for_each_range};

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::channels_last::ChannelsLastShape;
use super::count;
use super::transforms::{LANES, Lane, MAX_WINDOW, ZERO, input_2d, load, output_2d, store};
use super::weights::WinogradWeights;

/// Widest layer (the larger of C_in and C_out) that [`convolve_blocked`] takes: a block's
/// transformed input and products, `(m+2)²·(C_in + C_out)` values for each of its
/// [`BLOCK_TILES`] tiles, stay near a core's L2 cache (0.9 MiB at 128 channels for F(4×4), 1.3
/// at 256 → 128). Wider layers stream them through [`convolve_channels_last_with`]'s chunks,
/// whose GEMMs are deep enough to hide the traffic (conv_bench, F(4×4), ms, chunked →
/// blocked: 128→128 at 512² 217 → 168, 256→128 at 512² 381 → 309, 256→256 at 256² 170 →
/// 166, but 512→512 at 128² 142 → 284).
const BLOCKED_MAX_CHANNELS: usize = 256;
/// Narrowest layer (the smaller of C_in and C_out) that takes the blocked kernel by default:
/// TAESD's 64 channels gain (conv_bench, 64→64, im2col GEMM → F(4×4) blocked: 512² 96 → 54
/// ms, 256² 24 → 14, 64² 1.6 → 0.9); narrower layers were not measured.
pub(super) const MIN_BLOCKED_CHANNELS: usize = 64;
/// Tiles (of one tile row) a block transforms, multiplies and transforms back together.
const BLOCK_TILES: usize = 24;

/// Values from one point's matrix to the next in a block's buffers of `c` channels: the
/// matrix plus one lane. The transforms write (and read) all (m+2)² points of a tile at once;
/// at `BLOCK_TILES · c` apart (6 KiB at 64 channels) those addresses share two of the L1
/// cache's 64 sets and evict each other, one lane more spreads them over all of them.
const fn point_stride(c: usize) -> usize {
    BLOCK_TILES * c + LANES
}

/// Whether [`convolve_blocked`] takes a channels-last layer of `C_in → C_out` channels: narrow
/// enough, whole vectors of channels on both sides, and a CPU with the vector registers its register
/// blocks are sized for.
pub(super) fn blocked_fits(isa: Isa, c_in: usize, c_out: usize) -> bool {
    isa != Isa::Baseline
        && c_in.max(c_out) <= BLOCKED_MAX_CHANNELS
        && c_in.is_multiple_of(LANES)
        && c_out.is_multiple_of(LANES)
}

/// The channels-last convolution of narrow layers (TAESD's 64 channels, the full VAE's 128)
/// a small block of tiles at a time, each block's three steps on one thread, tile rows split
/// over threads. At 64 channels each point's GEMM is `[tiles, 64] × [64, 64]`, four
/// multiply-adds per value moved, so [`convolve_channels_last_with`]'s passes over chunks of
/// megabytes are paced by memory, not arithmetic (conv_bench: F(4×4) no faster than the im2col
/// GEMM at 64 channels). Here a block's transformed input, its products and each point's
/// weights stay in the core's caches, and the products come from register blocks of 6 tiles ×
/// 64 output channels (24 AVX-512 registers), the shape of the GEMM's own, compiled for the
/// CPU's vector registers. The transforms stay on the crate's baseline: compiled for AVX-512,
/// their windows of 36 lanes became masked, spilling code and the layer took twice as long.
pub(super) fn convolve_blocked<const M: usize>(
    isa: Isa,
    x: &[f32],
    shape: &ChannelsLastShape,
    weights: &WinogradWeights,
    finish: &(dyn Fn(usize, &mut [f32]) + Sync),
    out: &mut [f32],
    threads: usize,
) {
    let s = *shape;
    count(weights);
    let points = weights.variant.points();
    debug_assert_eq!(weights.variant.tile(), M);
    s.check(x, out, weights);
    let th = s.h_out.div_ceil(M);
    let tile_rows = s.batch * th;
    if tile_rows == 0 || s.w_out == 0 || s.c_out == 0 {
        return;
    }
    let conv = Blocked {
        x,
        s,
        weights,
        zeros: vec![0f32; s.c_in],
    };
    let out_ptr = SharedMut(out.as_mut_ptr());
    let work = |tile_rows: std::ops::Range<usize>| {
        let mut scratch = BlockScratch {
            transformed: vec![0f32; points * point_stride(s.c_in)],
            products: vec![0f32; points * point_stride(s.c_out)],
        };
        for r in tile_rows {
            let (image, ty) = (r / th, r % th);
            let out_rows = M.min(s.h_out - M * ty);
            let row_len = s.w_out * s.c_out;
            // SAFETY: output rows M·ty.. of `image` (those inside the map): this tile row's
            // alone, and tile rows are split between threads.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    out_ptr.ptr().add((image * s.h_out + M * ty) * row_len),
                    out_rows * row_len,
                )
            };
            conv.tile_row::<M>(isa, image, ty, dst, &mut scratch);
            for (i, row) in dst.chunks_exact_mut(row_len).enumerate() {
                finish(image * s.h_out + M * ty + i, row);
            }
        }
    };
    for_each_range(tile_rows, threads.min(tile_rows), &work);
}

/// One narrow channels-last convolution's operands, as [`convolve_blocked`] reads them.
struct Blocked<'a> {
    x: &'a [f32],
    s: ChannelsLastShape,
    weights: &'a WinogradWeights,
    /// One pixel of zeros: the window's values outside the map.
    zeros: Vec<f32>,
}

/// A thread's buffers for one block: its transformed input `[ξ][tile][C_in]` and products
/// `[ξ][tile][C_out]`, points [`point_stride`] apart.
struct BlockScratch {
    transformed: Vec<f32>,
    products: Vec<f32>,
}

impl Blocked<'_> {
    /// Tile row `ty` of `image` into `dst` (its output rows inside the map), block by block.
    fn tile_row<const M: usize>(
        &self,
        isa: Isa,
        image: usize,
        ty: usize,
        dst: &mut [f32],
        scratch: &mut BlockScratch,
    ) {
        let s = &self.s;
        let tw = s.w_out.div_ceil(M);
        let out_rows = M.min(s.h_out - M * ty);
        let row_len = s.w_out * s.c_out;
        for first in (0..tw).step_by(BLOCK_TILES) {
            let block = first..tw.min(first + BLOCK_TILES);
            for (t, tx) in block.clone().enumerate() {
                self.transform_window::<M>(isa, image, ty, tx, t, &mut scratch.transformed);
            }
            // Tiles past the block's end hold an earlier block's values (or zeros): they are
            // multiplied along and never read back.
            block_products(
                isa,
                &scratch.transformed,
                self.weights,
                &mut scratch.products,
            );
            let a = M + 2;
            for (t, tx) in block.enumerate() {
                let out_cols = M.min(s.w_out - M * tx);
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512 {
                    let (products, out_row) = (scratch.products.as_ptr(), dst.as_mut_ptr());
                    for co in (0..s.c_out).step_by(LANES) {
                        let point = |i: usize, j: usize| {
                            // SAFETY: 16 channels of block tile t's product at point (i, j),
                            // inside the thread's scratch (C_out is whole lanes).
                            unsafe {
                                products.add((i * a + j) * point_stride(s.c_out) + t * s.c_out + co)
                            }
                        };
                        let pixel = |i: usize, j: usize| {
                            // SAFETY: 16 channels of output pixel (i, M·tx + j) of this tile
                            // row, inside `dst` for i < out_rows and M·tx + j < w_out.
                            unsafe { out_row.add(i * row_len + (M * tx + j) * s.c_out + co) }
                        };
                        // SAFETY: the CPU has AVX-512F; the pointers as above, and `dst` is
                        // this thread's alone. Whole tiles pass constant bounds, as below.
                        unsafe {
                            if out_rows == M && out_cols == M {
                                avx512::output_window::<M>(point, pixel, M, M)
                            } else {
                                avx512::output_window::<M>(point, pixel, out_rows, out_cols)
                            }
                        };
                    }
                    continue;
                }
                for co in (0..s.c_out).step_by(LANES) {
                    let m = std::array::from_fn(|i| {
                        std::array::from_fn(|j| {
                            if i < a && j < a {
                                let at = (i * a + j) * point_stride(s.c_out) + t * s.c_out + co;
                                load(&scratch.products, at, LANES)
                            } else {
                                ZERO
                            }
                        })
                    });
                    let y = output_2d::<M>(&m);
                    // Whole tiles (all but the right and bottom edges) store with constant
                    // bounds, which the compiler unrolls: 52.6–52.9 ms against 54.4–54.8 for
                    // 64→64 at 512² with the edges' bounds everywhere (conv_bench, alternated).
                    if out_rows == M && out_cols == M {
                        for (i, row) in y.iter().take(M).enumerate() {
                            for (j, lane) in row.iter().take(M).enumerate() {
                                let at = i * row_len + (M * tx + j) * s.c_out + co;
                                store(dst, at, lane, LANES);
                            }
                        }
                    } else {
                        for (i, row) in y.iter().take(out_rows).enumerate() {
                            for (j, lane) in row.iter().take(out_cols).enumerate() {
                                let at = i * row_len + (M * tx + j) * s.c_out + co;
                                store(dst, at, lane, LANES);
                            }
                        }
                    }
                }
            }
        }
    }

    /// `Bᵀ d B` of the window of tile `(ty, tx)` of `image`, into block tile `t` of
    /// `transformed` (`[ξ][tile][C_in]`).
    #[inline(always)]
    fn transform_window<const M: usize>(
        &self,
        isa: Isa,
        image: usize,
        ty: usize,
        tx: usize,
        t: usize,
        transformed: &mut [f32],
    ) {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        let (s, x, a) = (&self.s, self.x, M + 2);
        // The window's top-left pixel, and whether the whole window lies inside the map (most
        // do: then each of its values is a fixed offset from there).
        let (y0, x0) = (M * ty, M * tx);
        let inside = y0 >= s.pad_top
            && x0 >= s.pad_left
            && y0 + a <= s.pad_top + s.h
            && x0 + a <= s.pad_left + s.w;
        let corner = if inside {
            ((image * s.h + y0 - s.pad_top) * s.w + x0 - s.pad_left) * s.c_in
        } else {
            0
        };
        let pixel_stride = s.w * s.c_in;
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            let dst = transformed.as_mut_ptr();
            for ch in (0..s.c_in).step_by(LANES) {
                let point = |i: usize, j: usize| {
                    // SAFETY: 16 channels of block tile t at point (i, j), inside the thread's
                    // scratch (C_in is whole lanes).
                    unsafe { dst.add((i * a + j) * point_stride(s.c_in) + t * s.c_in + ch) }
                };
                // SAFETY (both): the CPU has AVX-512F; 16 channels of each window pixel, inside
                // `x` (or the zero pixel), and of each point, as above.
                if inside {
                    unsafe {
                        avx512::input_window::<M>(
                            |row, col| {
                                x[corner + row * pixel_stride + col * s.c_in + ch..][..LANES]
                                    .as_ptr()
                            },
                            point,
                            u16::MAX,
                        )
                    };
                } else {
                    unsafe {
                        avx512::input_window::<M>(
                            |row, col| {
                                s.pixel(x, &self.zeros, image, y0 + row, x0 + col)[ch..][..LANES]
                                    .as_ptr()
                            },
                            point,
                            u16::MAX,
                        )
                    };
                }
            }
            return;
        }
        for ch in (0..s.c_in).step_by(LANES) {
            let mut window = [[ZERO; MAX_WINDOW]; MAX_WINDOW];
            if inside {
                for (row, lanes) in window.iter_mut().take(a).enumerate() {
                    let at = corner + row * pixel_stride + ch;
                    for (col, lane) in lanes.iter_mut().take(a).enumerate() {
                        *lane = load(x, at + col * s.c_in, LANES);
                    }
                }
            } else {
                for (row, lanes) in window.iter_mut().take(a).enumerate() {
                    for (col, lane) in lanes.iter_mut().take(a).enumerate() {
                        let pixel = s.pixel(x, &self.zeros, image, y0 + row, x0 + col);
                        *lane = load(pixel, ch, LANES);
                    }
                }
            }
            let v = input_2d::<M>(&window);
            for (i, row) in v.iter().take(a).enumerate() {
                for (j, lane) in row.iter().take(a).enumerate() {
                    let at = (i * a + j) * point_stride(s.c_in) + t * s.c_in + ch;
                    store(transformed, at, lane, LANES);
                }
            }
        }
    }
}

/// `products[ξ][tile] = transformed[ξ][tile] · U[ξ]` (`[C_in] × [C_in, C_out]`) for every
/// point ξ and the block's [`BLOCK_TILES`] tiles, on the CPU's widest vectors.
fn block_products(isa: Isa, transformed: &[f32], weights: &WinogradWeights, products: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features the function is compiled for.
        Isa::Avx512 => unsafe { block_products_avx512(transformed, weights, products) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { block_products_avx2(transformed, weights, products) },
        _ => block_products_body::<6, 1>(transformed, weights, products),
    }
}

/// AVX-512: 6 tiles × 4 lanes of output channels, 24 of the 32 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn block_products_avx512(transformed: &[f32], weights: &WinogradWeights, products: &mut [f32]) {
    block_products_body::<6, 4>(transformed, weights, products)
}

/// AVX2, where a lane is two registers: 6 tiles × 1 lane, 12 of the 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_products_avx2(transformed: &[f32], weights: &WinogradWeights, products: &mut [f32]) {
    block_products_body::<6, 1>(transformed, weights, products)
}

/// [`block_products`] with register blocks of `R` tiles × `L` lanes of output channels.
#[inline(always)]
fn block_products_body<const R: usize, const L: usize>(
    transformed: &[f32],
    weights: &WinogradWeights,
    products: &mut [f32],
) {
    const { assert!(BLOCK_TILES.is_multiple_of(R)) };
    let (c_in, c_out) = (weights.c_in, weights.c_out);
    for xi in 0..weights.variant.points() {
        let u = weights.point(xi);
        let v = &transformed[xi * point_stride(c_in)..][..BLOCK_TILES * c_in];
        let p = &mut products[xi * point_stride(c_out)..][..BLOCK_TILES * c_out];
        for t in (0..BLOCK_TILES).step_by(R) {
            let mut co = 0;
            while co + L * LANES <= c_out {
                register_block::<R, L>(u, v, p, t, co, c_in, c_out);
                co += L * LANES;
            }
            while co < c_out {
                register_block::<R, 1>(u, v, p, t, co, c_in, c_out);
                co += LANES;
            }
        }
    }
}

/// Tiles `t..t + R`, output channels `co..co + L·16`: `R·L` lanes of sums held in registers
/// over the `C_in` terms, each one broadcast input value times one lane of weights.
#[inline(always)]
fn register_block<const R: usize, const L: usize>(
    u: &[f32],
    v: &[f32],
    p: &mut [f32],
    t: usize,
    co: usize,
    c_in: usize,
    c_out: usize,
) {
    let mut acc = [[ZERO; L]; R];
    for ci in 0..c_in {
        let w: [Lane; L] = std::array::from_fn(|l| {
            let at = ci * c_out + co + l * LANES;
            Lane(u[at..at + LANES].try_into().expect("one lane"))
        });
        for (r, sums) in acc.iter_mut().enumerate() {
            let x = v[(t + r) * c_in + ci];
            for (sum, lane) in sums.iter_mut().zip(&w) {
                for (s, &w) in sum.iter_mut().zip(lane.iter()) {
                    *s = x.mul_add(w, *s);
                }
            }
        }
    }
    for (r, sums) in acc.iter().enumerate() {
        for (l, sum) in sums.iter().enumerate() {
            let at = (t + r) * c_out + co + l * LANES;
            p[at..at + LANES].copy_from_slice(&sum.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd;
    use crate::winograd::Variant;
    use crate::winograd::channels_last::convolve_channels_last_with;
    use crate::winograd::tests::random_values;

    /// The blocked kernel, with each instruction set this CPU has (and the portable body), gives
    /// the chunked kernel's values: the same arithmetic but the order of the channel sums.
    /// Shapes with several blocks to a tile row, a partial last block, partial tiles at the
    /// right and bottom edges, one-sided padding, a batch, and output channels in more than one
    /// register block.
    #[test]
    fn blocked_kernel_matches_the_chunked_one() {
        let mut isas = vec![Isa::Baseline];
        if simd::isa() == Isa::Avx512 {
            isas.extend([Isa::Avx512, Isa::Avx2]);
        } else if simd::isa() == Isa::Avx2 {
            isas.push(Isa::Avx2);
        }
        // (batch, c_in, c_out, h, w, pad_top, pad_left, h_out, w_out)
        let cases = [
            (1, 64, 64, 9, 110, 1, 1, 9, 110),
            (2, 16, 80, 7, 61, 0, 0, 6, 60),
            (1, 48, 16, 13, 5, 1, 1, 13, 5),
        ];
        let mut random = random_values(1);
        for variant in Variant::ALL {
            for (batch, c_in, c_out, h, w, pad_top, pad_left, h_out, w_out) in cases {
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
                let run = |isa: Option<Isa>| {
                    let mut out = vec![0f32; batch * h_out * w_out * c_out];
                    let finish = |_: usize, row: &mut [f32]| row.iter_mut().for_each(|v| *v += 1.0);
                    match (variant, isa) {
                        (Variant::F2, None) => convolve_channels_last_with::<2>(
                            Isa::Baseline,
                            &x,
                            &s,
                            &weights,
                            &finish,
                            &mut out,
                            2,
                        ),
                        (Variant::F4, None) => convolve_channels_last_with::<4>(
                            Isa::Baseline,
                            &x,
                            &s,
                            &weights,
                            &finish,
                            &mut out,
                            2,
                        ),
                        (Variant::F2, Some(isa)) => {
                            convolve_blocked::<2>(isa, &x, &s, &weights, &finish, &mut out, 2)
                        }
                        (Variant::F4, Some(isa)) => {
                            convolve_blocked::<4>(isa, &x, &s, &weights, &finish, &mut out, 2)
                        }
                    }
                    out
                };
                let want = run(None);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(scale > 1.0, "the outputs are not trivially small");
                for &isa in &isas {
                    let got = run(Some(isa));
                    let err = got
                        .iter()
                        .zip(&want)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        err <= 1e-5 * scale,
                        "{variant:?} {isa:?} b{batch} {c_in}->{c_out} {h}x{w}: {err} of {scale}"
                    );
                }
            }
        }
    }
}
