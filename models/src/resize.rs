//! Resampling with PIL's semantics: Lanczos (the frames' resize to the stream's size) and
//! bicubic (the CLIP image processor's, before the safety checker).
//!
//! PIL resizes in two separable passes, horizontal first, each producing u8: per output position it
//! takes the input pixels whose centres lie within `3 · max(1, in/out)` of the output centre (the
//! filter widens when downsampling, which is its antialiasing), weights them with
//! sinc(x)·sinc(x/3) evaluated at `(i − centre + 0.5) / max(1, in/out)`, normalises the weights to
//! sum 1, converts them to fixed point with 22 fractional bits (rounded away from zero), and rounds
//! the weighted sum by adding half before the shift, clamping to 0..=255.

/// Fractional bits of PIL's fixed-point weights (32 − 8 − 2).
const PRECISION_BITS: u32 = 22;
/// Half the support of the Lanczos-3 kernel.
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// A PIL resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.LANCZOS`: sinc(x)·sinc(x/3) on [−3, 3).
    Lanczos,
    /// `Image.BICUBIC`: Keys' cubic with a = −0.5 on (−2, 2).
    Bicubic,
    /// `Image.BILINEAR`: the triangle 1 − |x| on (−1, 1).
    Bilinear,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => LANCZOS_SUPPORT,
            Filter::Bicubic => 2.0,
            Filter::Bilinear => 1.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => lanczos(x),
            Filter::Bicubic => bicubic(x),
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
        }
    }
}

/// PIL's `bicubic_filter` (a = −0.5).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Normalised weights of one output position: the first input index and the weights from there.
struct Taps {
    first: usize,
    weights: Vec<f64>,
}

/// PIL's `precompute_coeffs` for the whole input range.
fn lanczos_taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    taps(in_size, out_size, Filter::Lanczos)
}

/// PIL's `precompute_coeffs` for `filter`.
fn taps(in_size: usize, out_size: usize, filter: Filter) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let inv = 1.0 / filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero; negative starts are clamped to 0 anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
            let mut weights: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) * inv))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                for w in &mut weights {
                    *w /= total;
                }
            }
            Taps {
                first: xmin,
                weights,
            }
        })
        .collect()
}

/// Weights as PIL's 8-bit path uses them: fixed point, rounded half away from zero.
fn fixed_point(taps: &[Taps]) -> Vec<(usize, Vec<i64>)> {
    let one = (1i64 << PRECISION_BITS) as f64;
    taps.iter()
        .map(|t| {
            let k = t
                .weights
                .iter()
                .map(|&w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i64
                    } else {
                        (0.5 + w * one) as i64
                    }
                })
                .collect();
            (t.first, k)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes packed RGB u8 (`src_w · src_h · 3` bytes) to `dst_w × dst_h` with Lanczos-3, bit-for-bit
/// as PIL's `Image.resize((dst_w, dst_h), Image.LANCZOS)` on an RGB image.
///
/// Sizes must be non-zero and `src.len()` must be `src_w · src_h · 3`.
pub fn resize_rgb8_lanczos(
    src: &[u8],
    src_w: usize,
    src_h: usize,
    dst_w: usize,
    dst_h: usize,
) -> Vec<u8> {
    resize_rgb8(src, src_w, src_h, dst_w, dst_h, Filter::Lanczos)
}

/// Resizes packed RGB u8 to `dst_w × dst_h` with `filter`, bit-for-bit as PIL's
/// `Image.resize((dst_w, dst_h), filter)` on an RGB image (no `reducing_gap`).
///
/// Sizes must be non-zero and `src.len()` must be `src_w · src_h · 3`.
pub fn resize_rgb8(
    src: &[u8],
    src_w: usize,
    src_h: usize,
    dst_w: usize,
    dst_h: usize,
    filter: Filter,
) -> Vec<u8> {
    debug_assert_eq!(src.len(), src_w * src_h * 3);
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width does not change, as PIL does).
    let (mid, mid_w) = if dst_w != src_w {
        let taps = fixed_point(&taps(src_w, dst_w, filter));
        let mut out = vec![0u8; dst_w * src_h * 3];
        for y in 0..src_h {
            let row = &src[y * src_w * 3..(y + 1) * src_w * 3];
            for (xx, (first, k)) in taps.iter().enumerate() {
                let mut acc = [half; 3];
                for (i, &w) in k.iter().enumerate() {
                    let px = &row[(first + i) * 3..(first + i) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += px[c] as i64 * w;
                    }
                }
                let o = (y * dst_w + xx) * 3;
                for c in 0..3 {
                    out[o + c] = clip8(acc[c]);
                }
            }
        }
        (out, dst_w)
    } else {
        (src.to_vec(), src_w)
    };
    if dst_h == src_h {
        return mid;
    }
    // Vertical pass on the u8 intermediate.
    let taps = fixed_point(&taps(src_h, dst_h, filter));
    let row_len = mid_w * 3;
    let mut out = vec![0u8; dst_h * row_len];
    let mut acc = vec![0i64; row_len];
    for (yy, (first, k)) in taps.iter().enumerate() {
        acc.fill(half);
        for (i, &w) in k.iter().enumerate() {
            let row = &mid[(first + i) * row_len..(first + i + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i64 * w;
            }
        }
        for (o, &a) in out[yy * row_len..(yy + 1) * row_len].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Resizes packed RGB f32 with the same Lanczos-3 weights, in f64 accumulation without rounding
/// (PIL's float-image path), horizontal pass first.
pub fn resize_rgb_f32_lanczos(
    src: &[f32],
    src_w: usize,
    src_h: usize,
    dst_w: usize,
    dst_h: usize,
) -> Vec<f32> {
    debug_assert_eq!(src.len(), src_w * src_h * 3);
    let (mid, mid_w) = if dst_w != src_w {
        let taps = lanczos_taps(src_w, dst_w);
        let mut out = vec![0f32; dst_w * src_h * 3];
        for y in 0..src_h {
            let row = &src[y * src_w * 3..(y + 1) * src_w * 3];
            for (xx, t) in taps.iter().enumerate() {
                for c in 0..3 {
                    let acc: f64 = t
                        .weights
                        .iter()
                        .enumerate()
                        .map(|(i, &w)| row[(t.first + i) * 3 + c] as f64 * w)
                        .sum();
                    out[(y * dst_w + xx) * 3 + c] = acc as f32;
                }
            }
        }
        (out, dst_w)
    } else {
        (src.to_vec(), src_w)
    };
    if dst_h == src_h {
        return mid;
    }
    let taps = lanczos_taps(src_h, dst_h);
    let row_len = mid_w * 3;
    let mut out = vec![0f32; dst_h * row_len];
    for (yy, t) in taps.iter().enumerate() {
        for x in 0..row_len {
            let acc: f64 = t
                .weights
                .iter()
                .enumerate()
                .map(|(i, &w)| mid[(t.first + i) * row_len + x] as f64 * w)
                .sum();
            out[yy * row_len + x] = acc as f32;
        }
    }
    out
}
