//! Row kernels written so that the compiler vectorises them, compiled once per instruction set
//! and picked at run time (AVX-512, AVX2+FMA, or the baseline), like the GEMM does. The bodies
//! are plain Rust over fixed-width lane arrays; the `#[target_feature]` wrappers only tell the
//! compiler which registers it may use.
//!
//! Two exponentials reduce by ln 2 and sum Taylor's series: SiLU's in f64 lanes, rounded once to
//! f32 (within 1 ulp of the correctly rounded `exp`, as accurate as the scalar `libm` call it
//! replaced); the softmax's in f32 lanes (also within 1 ulp over the range checked below, with
//! more values off by that ulp), three times cheaper, since the attention at 4,096 tokens
//! takes hundreds of millions of them a frame. The golden streams' worst frame went from 1.47e-4
//! to 2.00e-4 of the reference (self_t3_fullvae; bound 2e-3).

/// Lanes per step: one AVX-512 register of f32 (two AVX2 registers).
const LANES: usize = 16;

/// 1.5·2⁵²: adding it rounds an f64 of magnitude < 2⁵¹ to the nearest integer.
const ROUND: f64 = 6_755_399_441_055_744.0;
/// Below this, exp underflows f32's normal range; inputs are clamped here (exp ≈ 1.6e-38,
/// where torch's would give a subnormal or 0: both are nothing next to the row's maximum, 1).
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;
/// 1/k! for k = 2..=8: Taylor's series, whose error on |r| ≤ ln2/2 (below 2.2e-10, relative)
/// is far under an f32 ulp (6e-8).
const INV_FACTORIAL: [f64; 7] = [
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40320.0,
];

/// eˣ for one f32 lane, computed in f64 and rounded once (so it is the correctly rounded value
/// but for rare ties: the chaotic tiny test networks amplify even 1-ulp differences in the
/// attention's probabilities); inlined into the vectorised loops.
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    let x = f64::from(x.clamp(EXP_MIN, EXP_MAX));
    // n = round(x / ln 2), also kept as the low bits of `t`.
    let t = x.mul_add(std::f64::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let r = n.mul_add(-std::f64::consts::LN_2, x);
    let mut p = INV_FACTORIAL[6];
    for &c in INV_FACTORIAL[..6].iter().rev() {
        p = p.mul_add(r, c);
    }
    let er = p.mul_add(r * r, r) + 1.0;
    // 2ⁿ from n's bits (n in −126..=127 after the clamp).
    let n_int = (t.to_bits() as i64).wrapping_sub(ROUND.to_bits() as i64);
    (er * f64::from_bits(((n_int + 1023) as u64) << 52)) as f32
}

/// 1/k! for k = 2..=7 in f32: Taylor's series for the f32 exponential, whose truncation error
/// on |r| ≤ ln2/2 (r⁸/8! ≤ 5.5e-9, relative) is a tenth of an f32 ulp.
const INV_FACTORIAL_F32: [f32; 6] = [
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
];
/// 1.5·2²³: adding it rounds an f32 of magnitude < 2²² to the nearest integer.
const ROUND_F32: f32 = 12_582_912.0;
/// ln 2 split in two: `LN2_HI` has 12 significant bits, so that `n·LN2_HI` is exact for the
/// |n| ≤ 127 used here, and `LN2_HI + LN2_LO` is ln 2 to 2⁻³⁶.
const LN2_HI: f32 = 0.693_115_23;
const LN2_LO: f32 = 3.194_618_3e-5;

/// eˣ for one f32 lane, all in f32: the reduction by ln 2 in two exact-ish steps, Taylor's
/// series to r⁷, then scaling by 2ⁿ; within 2 ulp of the correctly rounded value (checked
/// below), three times cheaper than [`exp_lane`]. The attention's softmax uses it: at 4,096
/// tokens its exponentials were a third of the attention's time.
#[inline(always)]
fn exp_lane_f32(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    // n = round(x / ln 2), also kept as the low bits of `t`.
    let t = x.mul_add(std::f32::consts::LOG2_E, ROUND_F32);
    let n = t - ROUND_F32;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = INV_FACTORIAL_F32[5];
    for &c in INV_FACTORIAL_F32[..5].iter().rev() {
        p = p.mul_add(r, c);
    }
    let er = p.mul_add(r * r, r) + 1.0;
    // 2ⁿ from n's bits (n in −126..=127 after the clamp).
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND_F32.to_bits() as i32);
    er * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// softmax(scale·row) in place, in f32: max, then exp(scale·x − max) with its sum, then ÷ sum.
#[inline(always)]
fn softmax_row_body(row: &mut [f32], scale: f32) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v * scale);
        }
    }
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in chunks.remainder() {
        max = max.max(v * scale);
    }
    if max == f32::NEG_INFINITY {
        // Every score is −∞ (a fully masked row): torch gives NaN; so does 0/0 here.
        max = 0.0;
    }

    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, v) in sums.iter_mut().zip(chunk.iter_mut()) {
            let e = exp_lane_f32(*v * scale - max);
            *v = e;
            *s += e;
        }
    }
    let mut sum = sums.iter().sum::<f32>();
    for v in chunks.into_remainder() {
        let e = exp_lane_f32(*v * scale - max);
        *v = e;
        sum += e;
    }

    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn softmax_row_avx512(row: &mut [f32], scale: f32) {
    softmax_row_body(row, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_row_avx2(row: &mut [f32], scale: f32) {
    softmax_row_body(row, scale)
}

/// softmax(scale·row) over one row of f32 scores, in place.
pub fn softmax_row(row: &mut [f32], scale: f32) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features the function is compiled for.
        Isa::Avx512 => unsafe { softmax_row_avx512(row, scale) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { softmax_row_avx2(row, scale) },
        _ => softmax_row_body(row, scale),
    }
}

/// SiLU of one lane, `z / (1 + e⁻ᶻ)`: the formula of the scalar kernels, with [`exp_lane`].
#[inline(always)]
fn silu_lane(z: f32) -> f32 {
    z / (1.0 + exp_lane(-z))
}

/// `dst = act(src·scale + shift)` where `scale` and `shift` hold one value per channel and
/// `src` is whole pixels of those channels (channels-last); `act` is SiLU or nothing.
#[inline(always)]
fn affine_per_channel_body(dst: &mut [f32], src: &[f32], scale: &[f32], shift: &[f32], silu: bool) {
    let c = scale.len();
    for (d, x) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
        if silu {
            for (((y, &v), &a), &b) in d.iter_mut().zip(x).zip(scale).zip(shift) {
                *y = silu_lane(v * a + b);
            }
        } else {
            for (((y, &v), &a), &b) in d.iter_mut().zip(x).zip(scale).zip(shift) {
                *y = v * a + b;
            }
        }
    }
}

/// `dst = act(src·scale + shift)` with one scale and shift for the whole slice (channels-first).
#[inline(always)]
fn affine_uniform_body(dst: &mut [f32], src: &[f32], scale: f32, shift: f32, silu: bool) {
    if silu {
        for (y, &v) in dst.iter_mut().zip(src) {
            *y = silu_lane(v * scale + shift);
        }
    } else {
        for (y, &v) in dst.iter_mut().zip(src) {
            *y = v * scale + shift;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn affine_per_channel_avx512(
    dst: &mut [f32],
    src: &[f32],
    scale: &[f32],
    shift: &[f32],
    silu: bool,
) {
    affine_per_channel_body(dst, src, scale, shift, silu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn affine_per_channel_avx2(dst: &mut [f32], src: &[f32], scale: &[f32], shift: &[f32], silu: bool) {
    affine_per_channel_body(dst, src, scale, shift, silu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn affine_uniform_avx512(dst: &mut [f32], src: &[f32], scale: f32, shift: f32, silu: bool) {
    affine_uniform_body(dst, src, scale, shift, silu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn affine_uniform_avx2(dst: &mut [f32], src: &[f32], scale: f32, shift: f32, silu: bool) {
    affine_uniform_body(dst, src, scale, shift, silu)
}

/// Coefficients, constant term first, of the Chebyshev fit of `erfc` in Press et al.,
/// *Numerical Recipes* §6.2: `erfc(z) ≈ t·exp(−z² + Σ cᵢ·tⁱ)`, `t = 1/(1 + z/2)`, z ≥ 0,
/// with a relative error under 1.2e-7 everywhere, which lets `1 + erf` keep that relative
/// accuracy for negative arguments too (where `1 + erf(u)` is `erfc(−u)`, not a cancellation).
const ERFC_FIT: [f32; 10] = [
    -1.265_512_2,
    1.000_023_7,
    0.374_091_96,
    0.096_784_18,
    -0.186_288_06,
    0.278_868_07,
    -1.135_204,
    1.488_515_9,
    -0.822_152_23,
    0.170_872_77,
];

/// `1 + erf(u)` for one lane, in f32: `2 − erfc(u)` for u ≥ 0, `erfc(−u)` below.
#[inline(always)]
fn one_plus_erf_lane(u: f32) -> f32 {
    let z = u.abs();
    let t = 1.0 / z.mul_add(0.5, 1.0);
    let mut p = ERFC_FIT[9];
    for &c in ERFC_FIT[..9].iter().rev() {
        p = p.mul_add(t, c);
    }
    let erfc = t * exp_lane_f32(p - z * z);
    if u >= 0.0 { 2.0 - erfc } else { erfc }
}

/// Exact (erf) GELU of one lane, `x·½·(1 + erf(x/√2))`, as PyTorch's formula.
#[inline(always)]
fn gelu_lane(x: f32) -> f32 {
    x * 0.5 * one_plus_erf_lane(x * std::f32::consts::FRAC_1_SQRT_2)
}

/// GEGLU over one row: `dst[j] = (hidden[j] + hb[j])·gelu(gate[j] + gb[j])`, the biases
/// being empty when the projection has none.
#[inline(always)]
fn geglu_row_body(dst: &mut [f32], hidden: &[f32], gate: &[f32], biases: (&[f32], &[f32])) {
    let (hidden_bias, gate_bias) = biases;
    if hidden_bias.is_empty() {
        for ((d, &h), &g) in dst.iter_mut().zip(hidden).zip(gate) {
            *d = h * gelu_lane(g);
        }
    } else {
        let hidden = hidden.iter().zip(hidden_bias).map(|(&h, &b)| h + b);
        let gate = gate.iter().zip(gate_bias).map(|(&g, &b)| g + b);
        for ((d, h), g) in dst.iter_mut().zip(hidden).zip(gate) {
            *d = h * gelu_lane(g);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn geglu_row_avx512(dst: &mut [f32], hidden: &[f32], gate: &[f32], biases: (&[f32], &[f32])) {
    geglu_row_body(dst, hidden, gate, biases)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn geglu_row_avx2(dst: &mut [f32], hidden: &[f32], gate: &[f32], biases: (&[f32], &[f32])) {
    geglu_row_body(dst, hidden, gate, biases)
}

/// diffusers' GEGLU over one row of f32 values, biases folded in: `dst[j] = (hidden[j] +
/// hb[j])·gelu(gate[j] + gb[j])` with the exact GELU (the biases empty when there are none).
/// `1 + erf` comes from the fit in [`ERFC_FIT`] (relative error a few 1e-7, checked below),
/// vectorised, where the scalar `erf` it replaces took most of the pass.
pub fn geglu_row(dst: &mut [f32], hidden: &[f32], gate: &[f32], biases: (&[f32], &[f32])) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features the function is compiled for.
        Isa::Avx512 => unsafe { geglu_row_avx512(dst, hidden, gate, biases) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { geglu_row_avx2(dst, hidden, gate, biases) },
        _ => geglu_row_body(dst, hidden, gate, biases),
    }
}

/// The instruction set the row kernels run with on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Baseline,
}

pub fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") {
            return Isa::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Baseline
}

/// GroupNorm's affine pass over channels-last pixels: `dst = act(src·scale + shift)` per
/// channel (`scale.len()` channels, `src` whole pixels), SiLU when `silu`.
pub fn affine_per_channel(dst: &mut [f32], src: &[f32], scale: &[f32], shift: &[f32], silu: bool) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features the function is compiled for.
        Isa::Avx512 => unsafe { affine_per_channel_avx512(dst, src, scale, shift, silu) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { affine_per_channel_avx2(dst, src, scale, shift, silu) },
        _ => affine_per_channel_body(dst, src, scale, shift, silu),
    }
}

/// GroupNorm's affine pass over one channel's plane: `dst = act(src·scale + shift)`.
pub fn affine_uniform(dst: &mut [f32], src: &[f32], scale: f32, shift: f32, silu: bool) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features the function is compiled for.
        Isa::Avx512 => unsafe { affine_uniform_avx512(dst, src, scale, shift, silu) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { affine_uniform_avx2(dst, src, scale, shift, silu) },
        _ => affine_uniform_body(dst, src, scale, shift, silu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ulps between two positive normal floats.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_one_ulp_of_the_correctly_rounded_value() {
        let mut worst = 0;
        let mut count = 0;
        // 12 million evenly spaced points over the clamped range.
        let n = 12_000_000;
        for i in 0..=n {
            let x = EXP_MIN + (EXP_MAX - EXP_MIN) * (i as f32 / n as f32);
            let exact = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp_lane(x), exact));
            count += 1;
        }
        assert!(count > 10_000_000, "only {count} values checked");
        assert!(worst <= 1, "worst error {worst} ulp");
        assert_eq!(exp_lane(0.0), 1.0);
        assert!(exp_lane(-1.0e4) > 0.0 && exp_lane(-1.0e4) < 2.0e-38);
    }

    #[test]
    fn f32_exp_is_within_two_ulp_of_the_correctly_rounded_value() {
        let mut worst = 0;
        let n = 12_000_000;
        for i in 0..=n {
            let x = EXP_MIN + (EXP_MAX - EXP_MIN) * (i as f32 / n as f32);
            let exact = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp_lane_f32(x), exact));
        }
        println!("f32 exp: worst {worst} ulp");
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp_lane_f32(0.0), 1.0);
        assert!(exp_lane_f32(-1.0e4) > 0.0 && exp_lane_f32(-1.0e4) < 2.0e-38);
    }

    /// ulps between two floats of any sign (distance along the ordered bit patterns).
    fn signed_ulps(a: f32, b: f32) -> u32 {
        let ordered = |v: f32| {
            let bits = v.to_bits() as i64;
            if bits & 0x8000_0000 != 0 {
                -(bits & 0x7fff_ffff)
            } else {
                bits
            }
        };
        (ordered(a) - ordered(b)).unsigned_abs() as u32
    }

    /// The vectorised affine + SiLU passes give the scalar formula's values within 2 ulp (the
    /// exponential's 1, then a division), and exactly without SiLU.
    #[test]
    fn affine_passes_match_the_scalar_formula() {
        let channels = 24;
        let src: Vec<f32> = (0..channels * 37)
            .map(|i| (i * 7919 % 2000) as f32 / 40.0 - 25.0)
            .collect();
        let scale: Vec<f32> = (0..channels).map(|c| 0.5 + c as f32 / 10.0).collect();
        let shift: Vec<f32> = (0..channels).map(|c| c as f32 / 7.0 - 1.0).collect();
        let scalar_silu = |z: f32| z / (1.0 + ((-z) as f64).exp() as f32);
        let mut dst = vec![0f32; src.len()];
        for silu in [false, true] {
            let tolerance = if silu { 2 } else { 0 };
            affine_per_channel(&mut dst, &src, &scale, &shift, silu);
            for (i, (&got, &v)) in dst.iter().zip(&src).enumerate() {
                let z = v * scale[i % channels] + shift[i % channels];
                let want = if silu { scalar_silu(z) } else { z };
                assert!(
                    signed_ulps(got, want) <= tolerance,
                    "silu {silu}: {got} vs {want}"
                );
            }
            affine_uniform(&mut dst, &src, 1.5, -0.25, silu);
            for (&got, &v) in dst.iter().zip(&src) {
                let z = v * 1.5 - 0.25;
                let want = if silu { scalar_silu(z) } else { z };
                assert!(
                    signed_ulps(got, want) <= tolerance,
                    "uniform silu {silu}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn softmax_rows_match_the_f64_formula_at_every_width() {
        for width in [1usize, 7, 16, 17, 77, 4096] {
            let mut row: Vec<f32> = (0..width)
                .map(|i| {
                    ((i * 7919 % 1000) as f32 / 50.0 - 10.0) * if i % 3 == 0 { 3.0 } else { 1.0 }
                })
                .collect();
            let scale = 0.125f32;
            let max = row
                .iter()
                .map(|&v| (v * scale) as f64)
                .fold(f64::MIN, f64::max);
            let exps: Vec<f64> = row
                .iter()
                .map(|&v| ((v * scale) as f64 - max).exp())
                .collect();
            let sum: f64 = exps.iter().sum();
            softmax_row(&mut row, scale);
            let worst = row
                .iter()
                .zip(&exps)
                .map(|(&got, &e)| ((got as f64 - e / sum) / (e / sum).max(1e-30)).abs())
                .fold(0f64, f64::max);
            assert!(worst < 2e-6, "width {width}: relative error {worst}");
            let total: f32 = row.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "width {width}: sums to {total}");
        }
    }

    /// GELU through the erfc fit against the f64 formula on the same f32 inputs, over the
    /// gates' range and beyond (−12..12): within 4e-7 relative where x ≥ −1; in the negative
    /// tail the f32 argument itself limits any f32 evaluation (erfc's relative sensitivity to
    /// its argument grows as z², z = |x|/√2), so the bound there grows as x². The formula it
    /// replaces, 1 + erf in f32, loses its relative accuracy there to cancellation (1.4e-6 at
    /// x = −3 and 2.7e-4 at x = −4, against 4.8e-7 and 9.6e-7 here).
    /// GEGLU's row kernel applies it with the biases.
    #[test]
    fn gelu_lane_matches_the_f64_formula() {
        let n = 2_000_000;
        let mut worst_near = 0f64;
        let mut worst_tail_ratio = 0f64;
        for i in 0..=n {
            let x = -12.0 + 24.0 * (i as f32 / n as f32);
            let exact = {
                let x = x as f64;
                // 1 + erf(u) = erfc(−u), without cancellation for negative u.
                x * 0.5 * candle_core::cpu::erf::erfc_f64(-x / std::f64::consts::SQRT_2)
            };
            let got = gelu_lane(x) as f64;
            let err = if exact == 0.0 {
                got.abs()
            } else {
                ((got - exact) / exact).abs()
            };
            if x >= -1.0 {
                worst_near = worst_near.max(err);
            } else {
                let bound = 4e-7 + 3e-7 * (x as f64).powi(2);
                worst_tail_ratio = worst_tail_ratio.max(err / bound);
            }
        }
        assert!(
            worst_near < 4e-7,
            "worst relative error {worst_near:e} for x ≥ −1"
        );
        assert!(
            worst_tail_ratio <= 1.0,
            "tail error {worst_tail_ratio} times its bound"
        );
        assert_eq!(gelu_lane(0.0), 0.0);
        assert_eq!(gelu_lane(20.0), 20.0);
        assert!(gelu_lane(-20.0) <= 0.0 && gelu_lane(-20.0) > -1e-30);
        assert!(gelu_lane(f32::NAN).is_nan());

        let width = 37;
        let hidden: Vec<f32> = (0..width).map(|i| i as f32 / 5.0 - 3.0).collect();
        let gate: Vec<f32> = (0..width).map(|i| 2.5 - i as f32 / 7.0).collect();
        let hb: Vec<f32> = (0..width).map(|i| i as f32 / 100.0).collect();
        let gb: Vec<f32> = (0..width).map(|i| -(i as f32) / 50.0).collect();
        let mut dst = vec![0f32; width];
        geglu_row(&mut dst, &hidden, &gate, (&[], &[]));
        for j in 0..width {
            assert_eq!(dst[j], hidden[j] * gelu_lane(gate[j]), "column {j}");
        }
        geglu_row(&mut dst, &hidden, &gate, (&hb, &gb));
        for j in 0..width {
            let want = (hidden[j] + hb[j]) * gelu_lane(gate[j] + gb[j]);
            assert_eq!(dst[j], want, "column {j} with biases");
        }
    }
}
