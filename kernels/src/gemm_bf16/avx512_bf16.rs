//! The AVX512-BF16 block: `VDPBF16PS` adds to each of 16 f32 lanes the two products of a
//! pair of bf16 values, exactly the pair layout of a packed B row (16 columns × a pair of
//! consecutive `k`); A's pair for one row of C is broadcast to every lane. Eight rows of C
//! × two 16-column strips stay in 16 of the 32 vector registers through a pass over `k`.
//! Each instruction rounds after each product (the odd one first), with denormals read
//! and written as zero, so its sums differ from the portable block's in the last bits.

use std::arch::x86_64::*;

use super::{BLOCK_LEN, K_BLOCK, Operands, PANEL, TILE};

/// Rows of C per register block.
const ROWS: usize = 8;
/// K blocks ahead whose rows of A are prefetched.
const AHEAD: usize = 4;

/// [`super::panel`] on AVX512-BF16.
///
/// # Safety
/// As [`super::panel`]; the CPU has AVX-512F and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn panel(ops: &Operands, c: *mut f32, ldc: usize, accumulate: bool) {
    for r0 in (0..PANEL).step_by(ROWS) {
        let a = if r0 < TILE { ops.a0 } else { ops.a1 };
        let mut sums = [[_mm512_setzero_ps(); 2]; ROWS];
        if accumulate {
            for (i, row) in sums.iter_mut().enumerate() {
                for (h, v) in row.iter_mut().enumerate() {
                    // SAFETY: 32 rows of 32 values at stride ldc (the caller's promise).
                    *v = unsafe { _mm512_loadu_ps(c.add((r0 + i) * ldc + h * TILE)) };
                }
            }
        }
        for q in 0..ops.blocks {
            if q + AHEAD < ops.blocks {
                for i in 0..ROWS {
                    let row =
                        a.wrapping_add(((r0 + i) % TILE) * ops.a_row + (q + AHEAD) * ops.a_step);
                    _mm_prefetch::<_MM_HINT_T0>(row.cast());
                }
            }
            for pair in 0..TILE {
                // SAFETY: the operands hold `blocks` tile blocks past each pointer: a B
                // block is 16 rows of 32 values (one 64-byte vector each); A's rows are
                // `a_row` apart, k blocks `a_step` apart, 32 values each.
                unsafe {
                    let at = q * BLOCK_LEN + pair * K_BLOCK;
                    let b = [
                        _mm512_loadu_si512(ops.b0.add(at).cast()),
                        _mm512_loadu_si512(ops.b1.add(at).cast()),
                    ];
                    let b: [__m512bh; 2] = [
                        std::mem::transmute::<__m512i, __m512bh>(b[0]),
                        std::mem::transmute::<__m512i, __m512bh>(b[1]),
                    ];
                    for (i, row) in sums.iter_mut().enumerate() {
                        let word = a
                            .add(((r0 + i) % TILE) * ops.a_row + q * ops.a_step + 2 * pair)
                            .cast::<i32>()
                            .read_unaligned();
                        let a = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(word));
                        row[0] = _mm512_dpbf16_ps(row[0], a, b[0]);
                        row[1] = _mm512_dpbf16_ps(row[1], a, b[1]);
                    }
                }
            }
        }
        for (i, row) in sums.iter().enumerate() {
            for (h, &v) in row.iter().enumerate() {
                // SAFETY: as for the loads above.
                unsafe { _mm512_storeu_ps(c.add((r0 + i) * ldc + h * TILE), v) };
            }
        }
    }
}
