//! Channels-first maps: the convolution over a map split into its m×m stride-m phases, 16
//! tiles of a tile row at a time in vector lanes.

use crate::gemm_bf16::{self, PackedB};
use crate::simd::{self, Isa};
use crate::{SharedMut, for_each_range};

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::transforms::{LANES, MAX_WINDOW, ZERO, input_2d, load, output_2d, store_raw};
use super::weights::{Transformed, WinogradWeights};
use super::{Variant, chunk_budget, count};

/// Shape of one channels-first Winograd convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) batch: usize,
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    /// Size of each of the m² phase planes of the padded input (at least one more than the
    /// tiles along each side, zeros past the padded input).
    pub(crate) h_plane: usize,
    pub(crate) w_plane: usize,
    /// Output size (the padded input's size minus 2).
    pub(crate) h_out: usize,
    pub(crate) w_out: usize,
}

/// Writes the convolution of `planes` (`[batch][C_in][m² phases][h_plane][w_plane]`, phase
/// `(row % m)·m + col % m` of the zero-padded input, m the weights' variant's tile) by
/// `weights`, plus `bias`, into `out` (`[batch][C_out][h_out][w_out]`), on up to `threads`
/// threads.
pub(crate) fn convolve(
    planes: &[f32],
    shape: &Shape,
    weights: &WinogradWeights,
    bias: &[f32],
    out: &mut [f32],
    threads: usize,
) {
    let isa = simd::isa();
    match weights.variant {
        Variant::F2 => convolve_with::<2>(isa, planes, shape, weights, bias, out, threads),
        Variant::F4 => convolve_with::<4>(isa, planes, shape, weights, bias, out, threads),
    }
}

/// [`convolve`] with the transforms of `isa` (AVX-512 has its own; the others run the portable
/// ones).
fn convolve_with<const M: usize>(
    isa: Isa,
    planes: &[f32],
    shape: &Shape,
    weights: &WinogradWeights,
    bias: &[f32],
    out: &mut [f32],
    threads: usize,
) {
    let s = *shape;
    count(weights);
    let points = weights.variant.points();
    debug_assert_eq!(weights.variant.tile(), M);
    assert_eq!((weights.c_out, weights.c_in), (s.c_out, s.c_in), "weights");
    let (th, tw) = (s.h_out.div_ceil(M), s.w_out.div_ceil(M));
    assert!(
        s.h_plane > th && s.w_plane > tw,
        "phase planes cover every tile's window"
    );
    assert_eq!(
        planes.len(),
        s.batch * s.c_in * M * M * s.h_plane * s.w_plane
    );
    assert_eq!(out.len(), s.batch * s.c_out * s.h_out * s.w_out);
    assert_eq!(bias.len(), s.c_out);
    let tile_rows = s.batch * th;
    if tile_rows == 0 || tw == 0 {
        return;
    }
    let rows_per_chunk = (chunk_budget(points, s.c_in, s.c_out)
        / (points * s.c_in.max(s.c_out) * tw * 4))
        .clamp(1, tile_rows);
    let chunk_tiles = rows_per_chunk * tw;
    let mut transformed = vec![0f32; points * s.c_in * chunk_tiles];
    let mut products = vec![0f32; points * s.c_out * chunk_tiles];
    let out_ptr = SharedMut(out.as_mut_ptr());
    let mut first_row = 0;
    while first_row < tile_rows {
        let rows = rows_per_chunk.min(tile_rows - first_row);
        let tiles = rows * tw;
        let chunk = first_row..first_row + rows;
        transform_input::<M>(
            isa,
            planes,
            &s,
            chunk.clone(),
            chunk_tiles,
            &mut transformed,
            threads,
        );
        multiply(
            &transformed,
            weights,
            &s,
            tiles,
            chunk_tiles,
            &mut products,
            threads,
        );
        // SAFETY: `out` is `[batch][C_out][h_out][w_out]` (asserted above), and the output
        // transform writes the outputs of this chunk's tiles, split by output channel.
        unsafe {
            transform_output::<M>(
                isa,
                &products,
                &s,
                chunk,
                chunk_tiles,
                bias,
                out_ptr,
                threads,
            )
        };
        first_row += rows;
    }
}

/// `Bᵀ d B` of every window in tile rows `chunk` (global tile row `r` is image `r / th`, row
/// `r % th`), into `transformed` `[points][C_in][stride]`, tile `(r − chunk.start)·tw + tx`.
fn transform_input<const M: usize>(
    isa: Isa,
    planes: &[f32],
    s: &Shape,
    chunk: std::ops::Range<usize>,
    stride: usize,
    transformed: &mut [f32],
    threads: usize,
) {
    // Only x86-64 has a kernel of its own.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let a = M + 2;
    let (th, tw) = (s.h_out.div_ceil(M), s.w_out.div_ceil(M));
    let plane_len = s.h_plane * s.w_plane;
    let point_len = s.c_in * stride;
    let dst = SharedMut(transformed.as_mut_ptr());
    let work = |channels: std::ops::Range<usize>| {
        for ci in channels {
            for (local, r) in chunk.clone().enumerate() {
                let (image, ty) = (r / th, r % th);
                let phases =
                    &planes[(image * s.c_in + ci) * M * M * plane_len..][..M * M * plane_len];
                // Window value (row, col) of tile tx: phase (row % m, col % m), plane row
                // ty + row / m, column tx + col / m.
                let rows: [[&[f32]; MAX_WINDOW]; MAX_WINDOW] = std::array::from_fn(|row| {
                    std::array::from_fn(|col| {
                        if row >= a || col >= a {
                            return &[][..];
                        }
                        let phase = &phases[((row % M) * M + col % M) * plane_len..][..plane_len];
                        &phase[(ty + row / M) * s.w_plane + col / M..][..tw]
                    })
                });
                let at = ci * stride + local * tw;
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512 {
                    // SAFETY: the CPU has AVX-512F; point (i, j)'s row of channel ci, tiles
                    // at..at + tw, lies inside `transformed` ([points][C_in][stride], at + tw ≤
                    // stride), and channel ci is this thread's alone.
                    unsafe { avx512::input_tile_row::<M>(&rows, tw, dst.ptr().add(at), point_len) };
                    continue;
                }
                let mut tx = 0;
                while tx < tw {
                    let n = LANES.min(tw - tx);
                    let d = std::array::from_fn(|row| {
                        std::array::from_fn(|col| {
                            if row < a && col < a {
                                load(rows[row][col], tx, n)
                            } else {
                                ZERO
                            }
                        })
                    });
                    let v = input_2d::<M>(&d);
                    for (i, row) in v.iter().take(a).enumerate() {
                        for (j, lane) in row.iter().take(a).enumerate() {
                            // SAFETY: point (i, j)'s row of channel ci, tiles at + tx..+ n:
                            // inside `transformed` ([points][C_in][stride], at + tw ≤ stride),
                            // and channel ci is this thread's alone.
                            unsafe {
                                store_raw(
                                    dst.ptr().add((i * a + j) * point_len + at + tx),
                                    lane,
                                    n,
                                );
                            }
                        }
                    }
                    tx += n;
                }
            }
        }
    };
    for_each_range(s.c_in, threads.min(s.c_in), &work);
}

/// The GEMMs `products[ξ] = U[ξ] · transformed[ξ]` (`[C_out, C_in] × [C_in, tiles]`), split
/// over threads by point; in bf16 (each point's transformed input rounded and packed on the
/// thread that multiplies it) when the weights are.
fn multiply(
    transformed: &[f32],
    weights: &WinogradWeights,
    s: &Shape,
    tiles: usize,
    stride: usize,
    products: &mut [f32],
    threads: usize,
) {
    let points = weights.variant.points();
    let dst = SharedMut(products.as_mut_ptr());
    let work = |points: std::ops::Range<usize>| {
        let mut packed_rhs = PackedB::default();
        for xi in points {
            let rhs = &transformed[xi * s.c_in * stride..][..s.c_in * stride];
            if let Transformed::Bf16(packed) = &weights.transformed {
                packed_rhs.repack_rows(rhs, s.c_in, tiles, stride, 1);
                // SAFETY: products[ξ][0..C_out][0..tiles] (row stride `stride`) is point ξ's
                // own block, which no other thread touches; A is U[ξ] ([C_out, C_in]) and B
                // the rows just packed ([C_in, tiles]).
                unsafe {
                    gemm_bf16::gemm_into(
                        &packed[xi],
                        &packed_rhs,
                        dst.ptr().add(xi * s.c_out * stride),
                        stride,
                        1,
                    );
                }
                continue;
            }
            let lhs = weights.point(xi);
            // SAFETY: the GEMM writes products[ξ][0..C_out][0..tiles] (row stride `stride`),
            // point ξ's own block, which no other thread touches; lhs is [C_out, C_in] (row
            // stride C_in) and rhs [C_in, tiles] (row stride `stride`), inside their slices.
            unsafe {
                gemm::gemm(
                    s.c_out,
                    tiles,
                    s.c_in,
                    dst.ptr().add(xi * s.c_out * stride),
                    1,
                    stride as isize,
                    false,
                    lhs.as_ptr(),
                    1,
                    s.c_in as isize,
                    rhs.as_ptr(),
                    1,
                    stride as isize,
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
    for_each_range(points, threads.min(points), &work);
}

/// `Aᵀ m A` of every tile of `chunk` plus the bias, into the output map.
///
/// # Safety
/// `out` points to `[batch][C_out][h_out][w_out]` values that no other thread touches meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn transform_output<const M: usize>(
    isa: Isa,
    products: &[f32],
    s: &Shape,
    chunk: std::ops::Range<usize>,
    stride: usize,
    bias: &[f32],
    out: SharedMut<f32>,
    threads: usize,
) {
    // Only x86-64 has a kernel of its own.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let a = M + 2;
    let (th, tw) = (s.h_out.div_ceil(M), s.w_out.div_ceil(M));
    let point_len = s.c_out * stride;
    let work = |channels: std::ops::Range<usize>| {
        // One tile row's M output rows, M values a tile (the last tile's may pass w_out).
        let mut y = vec![0f32; M * M * tw];
        for co in channels {
            for (local, r) in chunk.clone().enumerate() {
                let (image, ty) = (r / th, r % th);
                let at = co * stride + local * tw;
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512 {
                    let rows = M.min(s.h_out - M * ty);
                    // SAFETY: the CPU has AVX-512F; products[ξ][co][at..at + tw] lie inside
                    // `products` ([points][C_out][stride]); output rows M·ty.. (`rows` of them,
                    // inside the map) of channel co of `image` are this thread's alone.
                    unsafe {
                        avx512::output_tile_row::<M>(
                            products.as_ptr().add(at),
                            point_len,
                            tw,
                            bias[co],
                            out.ptr()
                                .add(((image * s.c_out + co) * s.h_out + M * ty) * s.w_out),
                            rows,
                            s.w_out,
                        )
                    };
                    continue;
                }
                let mut tx = 0;
                while tx < tw {
                    let n = LANES.min(tw - tx);
                    let m = std::array::from_fn(|i| {
                        std::array::from_fn(|j| {
                            if i < a && j < a {
                                load(products, (i * a + j) * point_len + at + tx, n)
                            } else {
                                ZERO
                            }
                        })
                    });
                    let tile = output_2d::<M>(&m);
                    for (i, rows) in tile.iter().take(M).enumerate() {
                        let dst = &mut y[i * M * tw..][..M * tw];
                        for (j, lane) in rows.iter().take(M).enumerate() {
                            for (l, &v) in lane[..n].iter().enumerate() {
                                dst[(tx + l) * M + j] = v + bias[co];
                            }
                        }
                    }
                    tx += n;
                }
                for i in 0..M {
                    let row = M * ty + i;
                    if row < s.h_out {
                        // SAFETY: output row `row` of channel co of `image`: inside the map,
                        // and channel co is this thread's alone.
                        unsafe {
                            let dst = out
                                .ptr()
                                .add(((image * s.c_out + co) * s.h_out + row) * s.w_out);
                            std::ptr::copy_nonoverlapping(y[i * M * tw..].as_ptr(), dst, s.w_out);
                        }
                    }
                }
            }
        }
    };
    for_each_range(s.c_out, threads.min(s.c_out), &work);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::winograd::tests::random_values;

    /// The AVX-512 transforms of channels-first maps give the portable ones' values bit for bit
    /// (the same operations in the same order): tile rows of 3, 8, 16 and 20 tiles (partial
    /// lanes, one lane and more), partial tiles at the right and bottom edges, a batch, both
    /// variants, and more outputs than a lane's interleaved columns.
    #[test]
    fn avx512_transforms_equal_the_portable_ones() {
        if simd::isa() != Isa::Avx512 {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut random = random_values(7);
        // (batch, c_in, c_out, h_out, w_out)
        let cases: [(usize, usize, usize, usize, usize); 4] = [
            (1, 5, 7, 9, 10),
            (2, 3, 4, 14, 31),
            (1, 4, 6, 7, 64),
            (2, 2, 3, 5, 78),
        ];
        let mut tiles_a_row = std::collections::BTreeSet::new();
        for variant in Variant::ALL {
            let m = variant.tile();
            for (batch, c_in, c_out, h_out, w_out) in cases {
                let (th, tw) = (h_out.div_ceil(m), w_out.div_ceil(m));
                tiles_a_row.insert(tw);
                let s = Shape {
                    batch,
                    c_in,
                    c_out,
                    h_plane: th + 1,
                    w_plane: tw + 1,
                    h_out,
                    w_out,
                };
                let planes: Vec<f32> = (0..batch * c_in * m * m * s.h_plane * s.w_plane)
                    .map(|_| random())
                    .collect();
                let weight: Vec<f32> = (0..9 * c_in * c_out).map(|_| random()).collect();
                let bias: Vec<f32> = (0..c_out).map(|_| random()).collect();
                let weights = WinogradWeights::new(&weight, c_out, c_in, false, variant, false, 2);
                let run = |isa: Isa| {
                    let mut out = vec![f32::NAN; batch * c_out * h_out * w_out];
                    match variant {
                        Variant::F2 => {
                            convolve_with::<2>(isa, &planes, &s, &weights, &bias, &mut out, 2)
                        }
                        Variant::F4 => {
                            convolve_with::<4>(isa, &planes, &s, &weights, &bias, &mut out, 2)
                        }
                    }
                    out
                };
                let (portable, avx512) = (run(Isa::Baseline), run(Isa::Avx512));
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
                    "{variant:?} b{batch} {c_in}->{c_out} {h_out}x{w_out}: outputs differ"
                );
            }
        }
        assert!(
            [3, 8, 16, 20].iter().all(|tw| tiles_a_row.contains(tw)),
            "{tiles_a_row:?}"
        );
    }
}
