//! The transforms, on vectors of [`LANES`] tiles or channels ([`Lane`]): `Bᵀ d B` of an input
//! window, `Aᵀ m A` of a tile's points, `G g Gᵀ` of a 3×3 weight, and the lanes' loads and stores.

use super::Variant;

/// Lanes of the transforms' vectors: one AVX-512 register of f32 (two AVX2 registers).
pub(super) const LANES: usize = 16;
/// One vector of values, aligned to its size: the transforms keep windows of 36 of them on the
/// stack, where at f32's own alignment vector accesses would straddle cache lines.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(super) struct Lane(pub(super) [f32; LANES]);

impl std::ops::Deref for Lane {
    type Target = [f32; LANES];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Lane {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

pub(super) const ZERO: Lane = Lane([0.0; LANES]);
/// The largest window side, m + 2 for m = 4; F(2×2, 3×3) uses the first 4 entries of arrays
/// of this size.
pub(super) const MAX_WINDOW: usize = 6;

#[inline(always)]
fn add(a: Lane, b: Lane) -> Lane {
    Lane(std::array::from_fn(|i| a[i] + b[i]))
}

#[inline(always)]
fn sub(a: Lane, b: Lane) -> Lane {
    Lane(std::array::from_fn(|i| a[i] - b[i]))
}

#[inline(always)]
fn scale(a: Lane, s: f32) -> Lane {
    Lane(std::array::from_fn(|i| a[i] * s))
}

/// `Bᵀ x` for one column (or row) of a window: for m = 2, `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0],
/// [0, −1, 1, 0], [0, 1, 0, −1]]`; for m = 4,
/// `Bᵀ = [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0], [0, 4, −4, −1, 1, 0], [0, −2, −1, 2, 1, 0],
/// [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]]`.
#[inline(always)]
fn input_1d<const M: usize>(x: &[Lane; MAX_WINDOW]) -> [Lane; MAX_WINDOW] {
    let mut y = [ZERO; MAX_WINDOW];
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

/// `Aᵀ x` for one column (or row) of the points: for m = 2, `Aᵀ = [[1, 1, 1, 0], [0, 1, −1,
/// −1]]`; for m = 4, `Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0], [0, 1,
/// −1, 8, −8, 1]]`. Only the first m entries of the result are meaningful.
#[inline(always)]
fn output_1d<const M: usize>(x: &[Lane; MAX_WINDOW]) -> [Lane; MAX_WINDOW] {
    let mut y = [ZERO; MAX_WINDOW];
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

/// `Bᵀ d B` of a window of lanes (`d[row][col]`, the first m + 2 of each side used).
#[inline(always)]
pub(super) fn input_2d<const M: usize>(
    d: &[[Lane; MAX_WINDOW]; MAX_WINDOW],
) -> [[Lane; MAX_WINDOW]; MAX_WINDOW] {
    let a = M + 2;
    let mut t = [[ZERO; MAX_WINDOW]; MAX_WINDOW];
    for c in 0..a {
        let column = std::array::from_fn(|r| d[r][c]);
        let y = input_1d::<M>(&column);
        for r in 0..a {
            t[r][c] = y[r];
        }
    }
    let mut v = [[ZERO; MAX_WINDOW]; MAX_WINDOW];
    for r in 0..a {
        v[r] = input_1d::<M>(&t[r]);
    }
    v
}

/// `Aᵀ m A` of the points of a tile of lanes (`m[row][col]`): `y[i][j]` for i, j < m.
#[inline(always)]
pub(super) fn output_2d<const M: usize>(
    m: &[[Lane; MAX_WINDOW]; MAX_WINDOW],
) -> [[Lane; MAX_WINDOW]; MAX_WINDOW] {
    let a = M + 2;
    let mut t = [[ZERO; MAX_WINDOW]; MAX_WINDOW];
    for c in 0..a {
        let column = std::array::from_fn(|r| m[r][c]);
        let y = output_1d::<M>(&column);
        for i in 0..M {
            t[i][c] = y[i];
        }
    }
    let mut y = [[ZERO; MAX_WINDOW]; MAX_WINDOW];
    for i in 0..M {
        y[i] = output_1d::<M>(&t[i]);
    }
    y
}

/// `G g` for one column (or row) of a 3×3 weight, in f64: for m = 2, `G = [[1, 0, 0], [½, ½,
/// ½], [½, −½, ½], [0, 0, 1]]`; for m = 4, `G = [[¼, 0, 0], [−⅙, −⅙, −⅙], [−⅙, ⅙, −⅙],
/// [1/24, 1/12, ⅙], [1/24, −1/12, ⅙], [0, 0, 1]]`.
#[inline(always)]
pub(super) fn weight_1d(variant: Variant, [g0, g1, g2]: [f64; 3]) -> [f64; MAX_WINDOW] {
    match variant {
        Variant::F2 => [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2, 0.0, 0.0],
        Variant::F4 => [
            0.25 * g0,
            -(g0 + g1 + g2) / 6.0,
            -(g0 - g1 + g2) / 6.0,
            g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
            g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
            g2,
        ],
    }
}

/// Copies `n ≤ LANES` values from `src[at..]` into a lane (the rest zero). A whole lane is a
/// fixed-size copy the compiler keeps in a register; only a part calls `memcpy`.
#[inline(always)]
pub(super) fn load(src: &[f32], at: usize, n: usize) -> Lane {
    if n == LANES {
        return Lane(src[at..at + LANES].try_into().expect("a whole lane"));
    }
    let mut lane = ZERO;
    lane[..n].copy_from_slice(&src[at..at + n]);
    lane
}

/// Copies the first `n ≤ LANES` values of `lane` to `dst[at..]` (a whole lane without `memcpy`).
#[inline(always)]
pub(super) fn store(dst: &mut [f32], at: usize, lane: &Lane, n: usize) {
    if n == LANES {
        dst[at..at + LANES].copy_from_slice(&lane.0);
    } else {
        dst[at..at + n].copy_from_slice(&lane[..n]);
    }
}

/// [`store`] through a raw pointer.
///
/// # Safety
/// `dst` is valid for writes of `n` values that no other thread touches meanwhile.
#[inline(always)]
pub(super) unsafe fn store_raw(dst: *mut f32, lane: &Lane, n: usize) {
    // SAFETY: the caller's.
    unsafe {
        if n == LANES {
            dst.cast::<[f32; LANES]>().write_unaligned(lane.0);
        } else {
            std::ptr::copy_nonoverlapping(lane.as_ptr(), dst, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 1-D transforms are the matrices their documentation gives (checked on unit vectors),
    /// and together they reproduce the 3-tap correlation exactly on small integers (both
    /// variants): `Aᵀ [(G g) ⊙ (Bᵀ d)]` for one row.
    #[test]
    fn transforms_compute_the_correlation() {
        for variant in Variant::ALL {
            let (m, a) = (variant.tile(), variant.window());
            let d: [f64; MAX_WINDOW] = std::array::from_fn(|i| [3., -1., 4., 1., -5., 9.][i]);
            let g = [2.0, -6.0, 5.0];
            let u = weight_1d(variant, g);
            let lanes: [Lane; MAX_WINDOW] = std::array::from_fn(|i| Lane([d[i] as f32; LANES]));
            let v = match variant {
                Variant::F2 => input_1d::<2>(&lanes),
                Variant::F4 => input_1d::<4>(&lanes),
            };
            let prod: [Lane; MAX_WINDOW] = std::array::from_fn(|i| {
                if i < a {
                    Lane([(u[i] * f64::from(v[i][0])) as f32; LANES])
                } else {
                    ZERO
                }
            });
            let y = match variant {
                Variant::F2 => output_1d::<2>(&prod),
                Variant::F4 => output_1d::<4>(&prod),
            };
            for k in 0..m {
                let want = g[0] * d[k] + g[1] * d[k + 1] + g[2] * d[k + 2];
                assert!(
                    (f64::from(y[k][0]) - want).abs() < 1e-4,
                    "{variant:?} output {k}"
                );
            }
        }
    }
}
