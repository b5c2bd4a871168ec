//! The portable block's piece in AVX2 intrinsics: the compiler's own vectorisation of
//! [`super::rows_times_strip`] shuffles the pairs apart and spills a sum (about 50 GFLOP/s
//! on 2 Zen 3 cores where this reaches more; examples/gemm_bench).

use std::arch::x86_64::*;

use super::{BLOCK_LEN, K_BLOCK, PORTABLE_ROWS, Sums, TILE};

/// [`super::rows_times_strip`], the same sums bit for bit: every pair of products is two
/// multiplies and an add, then added to the row's sum, in `k` order; nothing fused.
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn rows_times_strip(
    rows: &[&[u16]; PORTABLE_ROWS],
    a_step: usize,
    b: &[u16],
    blocks: usize,
) -> Sums {
    // A pair (first value in the low half) widens to two f32 values: the first shifted up,
    // the second with the low half cleared.
    let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
    let mut sums = [[_mm256_setzero_ps(); 2]; PORTABLE_ROWS];
    let b = &b[..blocks * BLOCK_LEN];
    for r in rows {
        assert!(r.len() >= blocks.saturating_sub(1) * a_step + K_BLOCK);
    }
    for q in 0..blocks {
        for pair in 0..TILE {
            let b_at = q * BLOCK_LEN + pair * K_BLOCK;
            // SAFETY: b_at + 32 ≤ blocks × BLOCK_LEN = b.len(): two loads of 16 values.
            let (w0, w1) = unsafe {
                let at = b.as_ptr().add(b_at).cast::<__m256i>();
                (_mm256_loadu_si256(at), _mm256_loadu_si256(at.add(1)))
            };
            let b_even = [
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w0)),
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w1)),
            ];
            let b_odd = [
                _mm256_castsi256_ps(_mm256_and_si256(w0, high)),
                _mm256_castsi256_ps(_mm256_and_si256(w1, high)),
            ];
            for (row_sums, row) in sums.iter_mut().zip(rows) {
                // SAFETY: q·a_step + 2·pair + 2 ≤ (blocks − 1)·a_step + 32 ≤ row.len()
                // (asserted above).
                let word = unsafe {
                    row.as_ptr()
                        .add(q * a_step + 2 * pair)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let a = _mm256_set1_epi32(word);
                let a_even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(a));
                let a_odd = _mm256_castsi256_ps(_mm256_and_si256(a, high));
                for h in 0..2 {
                    let pair_sum = _mm256_add_ps(
                        _mm256_mul_ps(a_even, b_even[h]),
                        _mm256_mul_ps(a_odd, b_odd[h]),
                    );
                    row_sums[h] = _mm256_add_ps(row_sums[h], pair_sum);
                }
            }
        }
    }
    let mut out = [[0f32; TILE]; PORTABLE_ROWS];
    for (row_out, row_sums) in out.iter_mut().zip(&sums) {
        for (h, &v) in row_sums.iter().enumerate() {
            // SAFETY: 8 values from lane h·8 of a 16-value row.
            unsafe { _mm256_storeu_ps(row_out[h * 8..].as_mut_ptr(), v) };
        }
    }
    out
}
