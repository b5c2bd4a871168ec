//! The transforms on AVX-512: the portable ones' arithmetic, operation for operation (so the
//! same values, bit for bit), on registers instead of lane arrays, a window column by column
//! (six registers in, six out) as the portable `input_2d` and `output_2d` do. Compiled for the
//! baseline, the portable transforms spent most of their time copying 16-value lanes through
//! the stack and calling `memcpy` for the partial lanes that every tile row narrower than 16
//! tiles has (the UNet's 32² maps have 8 tiles a row): a seventh of a bf16 UNet call at batch
//! 3. Here partial lanes are masked loads and stores, and the channels-first output transform
//! interleaves a tile row's M outputs per tile in registers. (A `#[target_feature]` copy of the
//! portable code was tried first on the blocked kernel and ran twice as slow: the compiler
//! kept whole 6 × 6 windows of lane arrays on the stack.)

use std::arch::x86_64::*;

use super::transforms::{LANES, MAX_WINDOW};

/// The first `n` of 16 lanes.
#[inline(always)]
pub(super) fn first(n: usize) -> __mmask16 {
    if n >= LANES {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn add(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(a, b)
}

#[target_feature(enable = "avx512f")]
#[inline]
fn sub(a: __m512, b: __m512) -> __m512 {
    _mm512_sub_ps(a, b)
}

#[target_feature(enable = "avx512f")]
#[inline]
fn scale(a: __m512, s: f32) -> __m512 {
    _mm512_mul_ps(a, _mm512_set1_ps(s))
}

/// [`super::transforms::input_1d`].
#[target_feature(enable = "avx512f")]
#[inline]
fn input_1d<const M: usize>(x: &[__m512; MAX_WINDOW]) -> [__m512; MAX_WINDOW] {
    let mut y = [_mm512_setzero_ps(); MAX_WINDOW];
    if M == 2 {
        y[0] = sub(x[0], x[2]);
        y[1] = add(x[1], x[2]);
        y[2] = sub(x[2], x[1]);
        y[3] = sub(x[1], x[3]);
    } else {
        let a = sub(x[4], scale(x[2], 4.0));
        let b = sub(x[3], scale(x[1], 4.0));
        let c = sub(x[4], x[2]);
        let e = scale(sub(x[3], x[1]), 2.0);
        y[0] = add(sub(scale(x[0], 4.0), scale(x[2], 5.0)), x[4]);
        y[1] = add(a, b);
        y[2] = sub(a, b);
        y[3] = add(c, e);
        y[4] = sub(c, e);
        y[5] = add(sub(scale(x[1], 4.0), scale(x[3], 5.0)), x[5]);
    }
    y
}

/// [`super::transforms::output_1d`].
#[target_feature(enable = "avx512f")]
#[inline]
fn output_1d<const M: usize>(x: &[__m512; MAX_WINDOW]) -> [__m512; MAX_WINDOW] {
    let mut y = [_mm512_setzero_ps(); MAX_WINDOW];
    if M == 2 {
        y[0] = add(add(x[0], x[1]), x[2]);
        y[1] = sub(sub(x[1], x[2]), x[3]);
    } else {
        let p = add(x[1], x[2]);
        let q = sub(x[1], x[2]);
        let r = add(x[3], x[4]);
        let s = sub(x[3], x[4]);
        y[0] = add(add(x[0], p), r);
        y[1] = add(q, scale(s, 2.0));
        y[2] = add(p, scale(r, 4.0));
        y[3] = add(add(q, scale(s, 8.0)), x[5]);
    }
    y
}

/// `[a0, b0, a1, b1, …, a7, b7]` and `[a8, b8, …, a15, b15]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn interleave(a: __m512, b: __m512) -> (__m512, __m512) {
    let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    (
        _mm512_permutex2var_ps(a, low, b),
        _mm512_permutex2var_ps(a, high, b),
    )
}

/// `Bᵀ d B` (`INPUT`) or `Aᵀ m A` of one window of 16 lanes, value (row, col) loaded from
/// `src(row, col)` (its first `lanes` lanes, the others zero): columns first, then rows, as
/// super::input_2d and super::output_2d. The first m + 2 (`INPUT`) or m entries of each
/// side of the result are meaningful.
///
/// # Safety
/// The CPU has AVX-512F; every `src` pointer is valid for reads of the `lanes` values.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transform_2d<const M: usize, const INPUT: bool>(
    src: impl Fn(usize, usize) -> *const f32,
    lanes: __mmask16,
) -> [[__m512; MAX_WINDOW]; MAX_WINDOW] {
    let a = M + 2;
    let outputs = if INPUT { a } else { M };
    let mut t = [[_mm512_setzero_ps(); MAX_WINDOW]; MAX_WINDOW];
    for c in 0..a {
        let mut column = [_mm512_setzero_ps(); MAX_WINDOW];
        for (r, value) in column.iter_mut().enumerate().take(a) {
            // SAFETY: the caller's (masked-off lanes are not read).
            *value = unsafe { _mm512_maskz_loadu_ps(lanes, src(r, c)) };
        }
        let y = if INPUT {
            input_1d::<M>(&column)
        } else {
            output_1d::<M>(&column)
        };
        for (r, row) in t.iter_mut().enumerate().take(outputs) {
            row[c] = y[r];
        }
    }
    let mut v = [[_mm512_setzero_ps(); MAX_WINDOW]; MAX_WINDOW];
    for (transformed, row) in v.iter_mut().zip(&t).take(outputs) {
        *transformed = if INPUT {
            input_1d::<M>(row)
        } else {
            output_1d::<M>(row)
        };
    }
    v
}

/// `Bᵀ d B` of one window of 16 lanes (the first `lanes` of them read and written): value
/// (row, col) at `src(row, col)`, point (i, j) to `dst(i, j)`.
///
/// # Safety
/// The CPU has AVX-512F; every `src` pointer is valid for reads and every `dst` pointer
/// for writes of the `lanes` values, which no other thread touches meanwhile.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn input_window<const M: usize>(
    src: impl Fn(usize, usize) -> *const f32,
    dst: impl Fn(usize, usize) -> *mut f32,
    lanes: __mmask16,
) {
    let a = M + 2;
    // SAFETY: the caller's.
    let v = unsafe { transform_2d::<M, true>(src, lanes) };
    for (i, row) in v.iter().enumerate().take(a) {
        for (j, &value) in row.iter().enumerate().take(a) {
            // SAFETY: the caller's.
            unsafe { _mm512_mask_storeu_ps(dst(i, j), lanes, value) };
        }
    }
}

/// `Aᵀ m A` of one tile's points, 16 lanes (channels) of them: point (i, j) at `src(i, j)`,
/// output (i, j) for i < `rows`, j < `columns` to `dst(i, j)`.
///
/// # Safety
/// The CPU has AVX-512F; every `src` pointer is valid for reads and every `dst` pointer
/// for writes of 16 values, which no other thread touches meanwhile.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn output_window<const M: usize>(
    src: impl Fn(usize, usize) -> *const f32,
    dst: impl Fn(usize, usize) -> *mut f32,
    rows: usize,
    columns: usize,
) {
    // SAFETY: the caller's.
    let y = unsafe { transform_2d::<M, false>(src, u16::MAX) };
    for (i, row) in y.iter().enumerate().take(rows.min(M)) {
        for (j, &value) in row.iter().enumerate().take(columns.min(M)) {
            // SAFETY: the caller's.
            unsafe { _mm512_storeu_ps(dst(i, j), value) };
        }
    }
}

/// `Bᵀ d B` of one tile row's windows (super::transform_input's inner loop): window value
/// (row, col) of tile tx is `rows[row][col][tx]`; point (i, j) of tile tx goes to
/// `dst[(i·a + j)·point_len + tx]`.
///
/// # Safety
/// The CPU has AVX-512F; `rows` hold `tw` values each (those past m + 2 are not read);
/// `dst` is valid for those writes, which no other thread touches meanwhile.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn input_tile_row<const M: usize>(
    rows: &[[&[f32]; MAX_WINDOW]; MAX_WINDOW],
    tw: usize,
    dst: *mut f32,
    point_len: usize,
) {
    let a = M + 2;
    let mut tx = 0;
    while tx < tw {
        // SAFETY: lanes tx.. up to tw of rows of tw values (masked-off lanes are neither
        // read nor written); the writes are the caller's.
        unsafe {
            input_window::<M>(
                |r, c| rows[r][c][tx..].as_ptr(),
                |i, j| dst.add((i * a + j) * point_len + tx),
                first(tw - tx),
            )
        };
        tx += LANES;
    }
}

/// `Aᵀ m A` of one tile row's points plus `bias` (super::transform_output's inner loop):
/// point (i, j) of tile tx is `products[(i·a + j)·point_len + tx]`; output row i < `rows`
/// of the tile row starts at `out[i·w_out]`, where tile tx's outputs are columns
/// `M·tx .. M·tx + M` (those below `w_out`).
///
/// # Safety
/// The CPU has AVX-512F; `products` is valid for those reads (`tw` tiles of each point);
/// `out` for writes of `rows` rows of `w_out` values, which no other thread touches.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn output_tile_row<const M: usize>(
    products: *const f32,
    point_len: usize,
    tw: usize,
    bias: f32,
    out: *mut f32,
    rows: usize,
    w_out: usize,
) {
    let a = M + 2;
    let bias = _mm512_set1_ps(bias);
    let mut tx = 0;
    while tx < tw {
        // SAFETY: lanes tx.. up to tw of each point's tiles, the caller's (masked-off lanes
        // are not read).
        let tile = unsafe {
            transform_2d::<M, false>(
                |i, j| products.add((i * a + j) * point_len + tx),
                first(tw - tx),
            )
        };
        for (i, y) in tile.iter().enumerate().take(rows.min(M)) {
            // Tile tx + l's output j is column M·(tx + l) + j: the M lanes interleaved.
            let parts = if M == 2 {
                let (low, high) = interleave(add(y[0], bias), add(y[1], bias));
                [low, high, low, high]
            } else {
                let (p_low, p_high) = interleave(add(y[0], bias), add(y[2], bias));
                let (q_low, q_high) = interleave(add(y[1], bias), add(y[3], bias));
                let (first_quarter, second) = interleave(p_low, q_low);
                let (third, fourth) = interleave(p_high, q_high);
                [first_quarter, second, third, fourth]
            };
            for (k, &part) in parts.iter().enumerate().take(M) {
                let column = M * tx + LANES * k;
                if column >= w_out {
                    break;
                }
                // SAFETY: columns column.. below w_out of row i, the caller's.
                unsafe {
                    _mm512_mask_storeu_ps(out.add(i * w_out + column), first(w_out - column), part)
                };
            }
        }
        tx += LANES;
    }
}
