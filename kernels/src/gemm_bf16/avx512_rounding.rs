//! [`super::to_bf16`] on 16 lanes at once, the same integer arithmetic lane by lane, so
//! the packed bits equal the scalar loop's.

use std::arch::x86_64::*;

use super::{K_BLOCK, TILE};

/// The rounded bits of 16 f32 values, each in the low half of its 32-bit lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn rounded(bits: __m512i) -> __m512i {
    let high = _mm512_srli_epi32::<16>(bits);
    let odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
    let quiet_nan = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
    let magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
    let nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7f80_0000));
    _mm512_mask_blend_epi32(nan, rounded, quiet_nan)
}

/// # Safety
/// The CPU has AVX-512F and BW; `dst` is as long as `src`.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn round_into(src: &[f32], dst: &mut [u16]) {
    let whole = src.len() / 16 * 16;
    for at in (0..whole).step_by(16) {
        // SAFETY: 16 values at `at` lie inside both slices (at + 16 ≤ whole).
        unsafe {
            let bits = _mm512_loadu_si512(src.as_ptr().add(at).cast());
            let words = _mm512_cvtepi32_epi16(rounded(bits));
            _mm256_storeu_si256(dst.as_mut_ptr().add(at).cast(), words);
        }
    }
    for (d, &v) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = super::to_bf16(v);
    }
}

/// # Safety
/// The CPU has AVX-512F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn round_pairs_into(
    even: &[f32; TILE],
    odd: &[f32; TILE],
    dst: &mut [u16; K_BLOCK],
) {
    // SAFETY: 16 values each, and 32 for `dst`: whole vectors.
    unsafe {
        let even = rounded(_mm512_loadu_si512(even.as_ptr().cast()));
        let odd = rounded(_mm512_loadu_si512(odd.as_ptr().cast()));
        // Little-endian: the even value in each 32-bit lane's low half, as the pair layout.
        let pairs = _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd));
        _mm512_storeu_si512(dst.as_mut_ptr().cast(), pairs);
    }
}
