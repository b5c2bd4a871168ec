//! `cv2.resize`, bit for bit, on interleaved row-major images (H×W×C, C in 1..=4).
//!
//! The model-based preprocessors (HED, lineart, OpenPose) resize with OpenCV, so sdstream has to
//! produce the same bytes. What the installed OpenCV (opencv-python-headless 5.0, x86-64, with
//! its bundled Intel IPP) computes, case by case:
//!
//! * **Same size in and out** is a plain copy.
//! * **f32 `INTER_LINEAR`** never reaches OpenCV's own code: the wheel's IPP back end takes it.
//!   It samples at `x = (dx + ½)·(in/out) − ½` computed in double precision, splits that into an
//!   integer `sx` and an f32 fraction `fx` (out-of-range samples are pinned to the first or last
//!   pixel), interpolates each row first and then the columns, each step as
//!   `fma(fx, b − a, a)` in f32 (one fused multiply-add, as IPP's AVX2/AVX-512 code does).
//!   IPP refuses two-channel images and sources one pixel high or wide; those take OpenCV's own
//!   float code: a 2× integer downscale becomes `INTER_AREA`, otherwise the fractions and edge
//!   handling of the u8 path below with f32 weights, rows `a·(1 − fx) + b·fx` first, then
//!   columns, unfused. One deviation is known: for some 3- or 4-channel images only a few pixels
//!   wide (5 and 7 seen), IPP blends a few border columns differently in the last bit (relative
//!   error below 4e-7); everywhere else the results are bit-identical.
//! * **u8 `INTER_LINEAR`** stays in OpenCV (IPP's 8-bit linear is not exact, so it is refused).
//!   A 2× integer downscale in both directions becomes `INTER_AREA` (below). Otherwise the
//!   fraction is computed in f32 from `(dx + ½)·scale − ½` (with `scale = 1/(out/in)`, both in
//!   double), rounded to 11-bit fixed-point weights (`round(w·2048)`, ties to even); the row pass
//!   sums `pixel · weight` exactly in i32, samples left of the first pixel or right of the last
//!   use that pixel with weight 2048, and the column pass combines two row results as
//!   `((b0·(r0 >> 4)) >> 16) + ((b1·(r1 >> 4)) >> 16) + 2) >> 2`. The column weights are *not*
//!   pinned at the top and bottom edge: there both rows are the edge row, weighted by the
//!   unclamped fraction, which can differ by a level from the edge pixel itself.
//! * **`INTER_AREA`, both scale factors ≥ 1** (a downscale): with integer factors in both
//!   directions, each output is the mean of its `kx × ky` block: for u8 2×2 on 1, 3 or 4 channels
//!   `(sum + 2) >> 2`, otherwise `round(sum · (1/(kx·ky)))` in f32 with ties to even; for f32
//!   2×2 on 1 or 4 channels `((a + b) + (c + d)) · 0.25` in vectors of four values, and elsewhere
//!   (other channel counts, the last `width mod 4` values, other factors) the sum is formed four
//!   terms at a time, `sum + (((a + b) + c) + d)`, then multiplied by `1/(kx·ky)`. With
//!   non-integer factors every output is the area-weighted mean of the source pixels its cell
//!   covers: per source pixel an f32 weight (the covered fraction of the cell, computed in double),
//!   row sums accumulated in f32 in source order, then the rows of the cell combined in f32 as
//!   `sum + w·row`; u8 results round to nearest, ties to even.
//! * **`INTER_AREA` upscaling** (either factor < 1) falls back to the linear machinery with "area"
//!   fractions: `sx = floor(dx·scale)`, `fx = (dx + 1) − (sx + 1)·(out/in)`, `fx = 0` if it is
//!   not positive, else its fractional part. u8 uses the fixed-point linear passes above; f32
//!   uses OpenCV's own float passes `a·(1 − fx) + b·fx` (rows first), not IPP (IPP's area is
//!   refused as inexact).
//! * **`INTER_LANCZOS4`** stays in OpenCV (IPP supports only 2- or 3-lobe Lanczos and refuses
//!   it). The 8 weights of a fraction `fx` (f32, computed as for linear) are
//!   `sin(π(x+3−i)/4)·sin(π(x+3−i))/(π²(x+3−i)²/4)` evaluated with one `sin`/`cos` pair in double
//!   and rotated by the 45° table, cast to f32, summed in f32 and multiplied by the f32 reciprocal
//!   of the sum (a sample exactly on a pixel gets `1e30` there before the normalisation). Taps
//!   outside the image repeat the edge pixel (`BORDER_REPLICATE`), in both directions. u8: the
//!   weights become 11-bit integers (`round(w·2048)`, ties to even; they need not sum to 2048),
//!   both passes sum exactly in i32, and the result is `(sum + 2²¹) >> 22` clamped to 0..=255.
//!   f32: the row pass sums the eight products in order; the column pass sums them in vectors of
//!   four columns as `p0 + (p1 + (… + (p6 + p7)))` (unfused multiply and add: the build's
//!   baseline is SSE3) and the last `width mod 4` values left to right.
//! * **`INTER_CUBIC`**: the installed wheel hands this to IPP, whose cubic (B = 0, C = 0.75)
//!   computes its own weights and differs from OpenCV's code in the last bit (f32) or by one
//!   level on a few per cent of pixels (u8). This module implements OpenCV's *own* cubic (what
//!   `cv2.ipp.setUseIPP(False)` or a build without IPP gives): Keys' kernel with `a = −0.75` in f32,
//!   replicated borders; u8 with 11-bit weights, the column pass in f32 for blocks of eight
//!   values (`round(r0·b0' + (r1·b1' + (r2·b2' + r3·b3')))`, `b' = b/2²²`) and in fixed point for
//!   the remaining `width mod 8`; f32 as Lanczos with four taps.
//!
//! OpenCV 4.x (4.5 onwards) has the same resize code and routes the same cases to IPP (the
//! routing lived in `resize.cpp` before it moved to the IPP HAL), so the results agree as long as
//! its IPP computes f32 linear the same way (checked against the installed 5.0 only).
//!
//! Coordinates, weights and orders of operations follow OpenCV's `modules/imgproc/src/resize.cpp`;
//! the code here is written from that description, not copied.

/// `cv2.INTER_*` methods that sdstream needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// `cv2.INTER_LINEAR` (bilinear).
    Linear,
    /// `cv2.INTER_AREA` (box average when shrinking).
    Area,
    /// `cv2.INTER_LANCZOS4` (8×8 Lanczos).
    Lanczos4,
    /// `cv2.INTER_CUBIC` (4×4 Keys cubic, OpenCV's own code path; see the module docs).
    Cubic,
}

/// Fractional bits of OpenCV's 8-bit interpolation weights.
const COEF_BITS: u32 = 11;
/// `1 << COEF_BITS`.
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;
/// Values per vector register at the wheel's SSE3 baseline (f32 lanes), which decides where
/// OpenCV's vector loops stop and its scalar tails (with a different summation order) begin.
const F32_LANES: usize = 4;
/// 16-bit lanes of a 128-bit register (the u8 cubic column pass's block size).
const I16_LANES: usize = 8;

/// Image shape and OpenCV's derived scale factors.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    height: usize,
    width: usize,
    channels: usize,
    out_height: usize,
    out_width: usize,
    /// `out_width / width` (OpenCV's `inv_scale_x`).
    inv_scale_x: f64,
    /// `out_height / height`.
    inv_scale_y: f64,
    /// `1 / inv_scale_x` (not `width / out_width`: OpenCV divides twice).
    scale_x: f64,
    /// `1 / inv_scale_y`.
    scale_y: f64,
}

impl Geometry {
    fn new(
        len: usize,
        height: usize,
        width: usize,
        channels: usize,
        out_height: usize,
        out_width: usize,
    ) -> Self {
        assert!(
            (1..=4).contains(&channels),
            "channels must be 1..=4, got {channels}"
        );
        assert!(
            height > 0 && width > 0 && out_height > 0 && out_width > 0,
            "image sizes must be positive"
        );
        assert_eq!(
            len,
            height * width * channels,
            "source length does not match {height}x{width}x{channels}"
        );
        let inv_scale_x = out_width as f64 / width as f64;
        let inv_scale_y = out_height as f64 / height as f64;
        Self {
            height,
            width,
            channels,
            out_height,
            out_width,
            inv_scale_x,
            inv_scale_y,
            scale_x: 1.0 / inv_scale_x,
            scale_y: 1.0 / inv_scale_y,
        }
    }

    fn same_size(&self) -> bool {
        self.height == self.out_height && self.width == self.out_width
    }

    /// OpenCV's integer block size when both factors are integers (`is_area_fast`).
    fn integer_factors(&self) -> Option<(usize, usize)> {
        let ix = round_half_even_f64(self.scale_x);
        let iy = round_half_even_f64(self.scale_y);
        let exact = (self.scale_x - ix as f64).abs() < f64::EPSILON
            && (self.scale_y - iy as f64).abs() < f64::EPSILON;
        (exact && ix > 0 && iy > 0).then_some((ix as usize, iy as usize))
    }

    /// Whether `INTER_AREA` takes its true area path (no upscaling in either direction).
    fn is_downscale(&self) -> bool {
        self.scale_x >= 1.0 && self.scale_y >= 1.0
    }
}

/// Which of OpenCV's routines handles a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Copy,
    IppLinear,
    AreaBlocks(usize, usize),
    AreaCells,
    Separable(Kernel),
}

/// Separable interpolation kernels of OpenCV's generic resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Linear,
    /// Linear with `INTER_AREA`'s upscaling fractions.
    AreaLinear,
    Cubic,
    Lanczos4,
}

impl Kernel {
    fn taps(self) -> usize {
        match self {
            Kernel::Linear | Kernel::AreaLinear => 2,
            Kernel::Cubic => 4,
            Kernel::Lanczos4 => 8,
        }
    }

    fn is_linear(self) -> bool {
        matches!(self, Kernel::Linear | Kernel::AreaLinear)
    }
}

fn route(geometry: &Geometry, mode: Interpolation, is_u8: bool) -> Route {
    if geometry.same_size() {
        return Route::Copy;
    }
    let area = |g: &Geometry| {
        if g.is_downscale() {
            match g.integer_factors() {
                Some((kx, ky)) => Route::AreaBlocks(kx, ky),
                None => Route::AreaCells,
            }
        } else {
            Route::Separable(Kernel::AreaLinear)
        }
    };
    // IPP refuses two-channel images and sources one pixel high or wide.
    let ipp_takes = geometry.channels != 2 && geometry.width > 1 && geometry.height > 1;
    match mode {
        Interpolation::Linear if !is_u8 && ipp_takes => Route::IppLinear,
        Interpolation::Linear => match geometry.integer_factors() {
            Some((2, 2)) => Route::AreaBlocks(2, 2),
            _ => Route::Separable(Kernel::Linear),
        },
        Interpolation::Area => area(geometry),
        Interpolation::Lanczos4 => Route::Separable(Kernel::Lanczos4),
        Interpolation::Cubic => Route::Separable(Kernel::Cubic),
    }
}

/// `cv2.resize(src, (out_width, out_height), interpolation=mode)` on a u8 H×W×C image.
///
/// Panics if `channels` is not 1..=4, a size is zero, or `src.len() != height·width·channels`.
pub fn resize_u8(
    src: &[u8],
    height: usize,
    width: usize,
    channels: usize,
    out_height: usize,
    out_width: usize,
    mode: Interpolation,
) -> Vec<u8> {
    let g = Geometry::new(src.len(), height, width, channels, out_height, out_width);
    match route(&g, mode, true) {
        Route::Copy => src.to_vec(),
        // Unreachable for u8 (IPP's 8-bit linear is refused); kept total.
        Route::IppLinear | Route::Separable(Kernel::Linear) => {
            separable_u8(src, &g, Kernel::Linear)
        }
        Route::AreaBlocks(kx, ky) => area_blocks_u8(src, &g, kx, ky),
        Route::AreaCells => {
            area_cells(src, &g, |v: f32| round_half_even_f32(v).clamp(0, 255) as u8)
        }
        Route::Separable(kernel) => separable_u8(src, &g, kernel),
    }
}

/// `cv2.resize(src, (out_width, out_height), interpolation=mode)` on an f32 H×W×C image.
///
/// Panics if `channels` is not 1..=4, a size is zero, or `src.len() != height·width·channels`.
pub fn resize_f32(
    src: &[f32],
    height: usize,
    width: usize,
    channels: usize,
    out_height: usize,
    out_width: usize,
    mode: Interpolation,
) -> Vec<f32> {
    let g = Geometry::new(src.len(), height, width, channels, out_height, out_width);
    match route(&g, mode, false) {
        Route::Copy => src.to_vec(),
        Route::IppLinear => ipp_linear_f32(src, &g),
        Route::AreaBlocks(kx, ky) => area_blocks_f32(src, &g, kx, ky),
        Route::AreaCells => area_cells(src, &g, |v: f32| v),
        Route::Separable(kernel) => separable_f32(src, &g, kernel),
    }
}

// ---------------------------------------------------------------------------------------------
// Rounding helpers (OpenCV's cvRound / cvFloor / saturate_cast).

fn round_half_even_f64(v: f64) -> i64 {
    v.round_ties_even() as i64
}

fn round_half_even_f32(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// `saturate_cast<short>(w * 2048)`.
fn fixed_weight(w: f32) -> i32 {
    round_half_even_f32(w * COEF_SCALE).clamp(i16::MIN as i32, i16::MAX as i32)
}

// ---------------------------------------------------------------------------------------------
// Interpolation weights.

/// Keys' cubic with `a = −0.75`, in OpenCV's f32 operation order.
fn cubic_weights(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let x1 = x + 1.0;
    let w0 = ((A * x1 - 5.0 * A) * x1 + 8.0 * A) * x1 - 4.0 * A;
    let w1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let y = 1.0 - x;
    let w2 = ((A + 2.0) * y - (A + 3.0)) * y * y + 1.0;
    let w3 = 1.0 - w0 - w1 - w2;
    [w0, w1, w2, w3]
}

/// Lanczos with 4 lobes (8 taps) for the fraction `x`, normalised in f32 as OpenCV does.
fn lanczos4_weights(x: f32) -> [f32; 8] {
    use std::f64::consts::PI;
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    // (sin, cos) coefficients giving sin(π(x+3−i)/4) from sin/cos of −π(x+3)/4.
    const ROTATION: [[f64; 2]; 8] = [
        [1.0, 0.0],
        [-S45, -S45],
        [0.0, 1.0],
        [S45, -S45],
        [-1.0, 0.0],
        [S45, S45],
        [0.0, -1.0],
        [-S45, S45],
    ];
    let shifted = x + 3.0;
    let y0 = -(shifted as f64) * PI * 0.25;
    let (s0, c0) = (y0.sin(), y0.cos());
    let mut weights = [0f32; 8];
    let mut sum = 0f32;
    for (i, w) in weights.iter_mut().enumerate() {
        let distance = shifted - i as f32;
        *w = if distance.abs() >= 1e-6 {
            let y = -(distance as f64) * PI * 0.25;
            ((ROTATION[i][0] * s0 + ROTATION[i][1] * c0) / (y * y)) as f32
        } else {
            // The sample sits on this pixel; the normalisation turns this into 1.
            1e30
        };
        sum += *w;
    }
    let inv = 1.0 / sum;
    for w in &mut weights {
        *w *= inv;
    }
    weights
}

/// Per output position along one axis: the source pixel of each tap (edge-replicated) and its
/// f32 weight, as OpenCV's generic resize tabulates them.
struct AxisTaps {
    taps: usize,
    /// `out × taps` source pixel indices, already clamped to the image.
    index: Vec<usize>,
    /// `out × taps` weights.
    weight: Vec<f32>,
}

impl AxisTaps {
    /// `horizontal` pins linear samples outside the image to the edge pixel (weight 1); OpenCV
    /// does that for the row pass only.
    fn new(
        kernel: Kernel,
        in_len: usize,
        out_len: usize,
        scale: f64,
        inv_scale: f64,
        horizontal: bool,
    ) -> Self {
        let taps = kernel.taps();
        let half = taps / 2;
        let mut index = Vec::with_capacity(out_len * taps);
        let mut weight = Vec::with_capacity(out_len * taps);
        for d in 0..out_len {
            let (mut s, mut f) = if kernel == Kernel::AreaLinear {
                let s = (d as f64 * scale).floor() as i64;
                let f = ((d + 1) as f64 - (s + 1) as f64 * inv_scale) as f32;
                (s, if f <= 0.0 { 0.0 } else { f - f.floor() })
            } else {
                let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                let s = f.floor();
                (s as i64, f - s)
            };
            if horizontal && kernel.is_linear() {
                if s < 0 {
                    s = 0;
                    f = 0.0;
                }
                if s >= in_len as i64 - 1 {
                    s = in_len as i64 - 1;
                    f = 0.0;
                }
            }
            match kernel {
                Kernel::Linear | Kernel::AreaLinear => weight.extend_from_slice(&[1.0 - f, f]),
                Kernel::Cubic => weight.extend_from_slice(&cubic_weights(f)),
                Kernel::Lanczos4 => weight.extend_from_slice(&lanczos4_weights(f)),
            }
            for j in 0..taps {
                let p = s - half as i64 + 1 + j as i64;
                index.push(p.clamp(0, in_len as i64 - 1) as usize);
            }
        }
        Self {
            taps,
            index,
            weight,
        }
    }

    fn fixed_weights(&self) -> Vec<i32> {
        self.weight.iter().map(|&w| fixed_weight(w)).collect()
    }

    /// Source rows any output row reads.
    fn used(&self, in_len: usize) -> Vec<bool> {
        let mut used = vec![false; in_len];
        for &i in &self.index {
            used[i] = true;
        }
        used
    }
}

// ---------------------------------------------------------------------------------------------
// OpenCV's generic separable resize (linear, area-upscale, cubic, Lanczos4).

fn separable_u8(src: &[u8], g: &Geometry, kernel: Kernel) -> Vec<u8> {
    let cn = g.channels;
    let xt = AxisTaps::new(kernel, g.width, g.out_width, g.scale_x, g.inv_scale_x, true);
    let yt = AxisTaps::new(
        kernel,
        g.height,
        g.out_height,
        g.scale_y,
        g.inv_scale_y,
        false,
    );
    let xw = xt.fixed_weights();
    let yw = yt.fixed_weights();
    let row_len = g.out_width * cn;
    let in_row = g.width * cn;
    let k = xt.taps;

    // Row pass for every source row that is read: exact i32 sums of pixel × 11-bit weight.
    let used = yt.used(g.height);
    let mut rows = vec![0i32; g.height * row_len];
    for (y, _) in used.iter().enumerate().filter(|(_, u)| **u) {
        let s = &src[y * in_row..(y + 1) * in_row];
        let out = &mut rows[y * row_len..(y + 1) * row_len];
        for dx in 0..g.out_width {
            let idx = &xt.index[dx * k..(dx + 1) * k];
            let w = &xw[dx * k..(dx + 1) * k];
            for c in 0..cn {
                let mut acc = 0i32;
                for j in 0..k {
                    acc = acc.wrapping_add((s[idx[j] * cn + c] as i32).wrapping_mul(w[j]));
                }
                out[dx * cn + c] = acc;
            }
        }
    }

    let mut dst = vec![0u8; g.out_height * row_len];
    let mut row_refs: Vec<&[i32]> = Vec::with_capacity(k);
    for dy in 0..g.out_height {
        row_refs.clear();
        for &y in &yt.index[dy * k..(dy + 1) * k] {
            row_refs.push(&rows[y * row_len..(y + 1) * row_len]);
        }
        let b = &yw[dy * k..(dy + 1) * k];
        let out = &mut dst[dy * row_len..(dy + 1) * row_len];
        match kernel {
            Kernel::Linear | Kernel::AreaLinear => {
                let (r0, r1) = (row_refs[0], row_refs[1]);
                for x in 0..row_len {
                    let v =
                        (((b[0] * (r0[x] >> 4)) >> 16) + ((b[1] * (r1[x] >> 4)) >> 16) + 2) >> 2;
                    out[x] = v.clamp(0, 255) as u8;
                }
            }
            Kernel::Lanczos4 => {
                for x in 0..row_len {
                    let mut acc = 0i32;
                    for j in 0..k {
                        acc = acc.wrapping_add(row_refs[j][x].wrapping_mul(b[j]));
                    }
                    out[x] = fixed_to_u8(acc);
                }
            }
            Kernel::Cubic => {
                // Blocks of eight values go through f32 with the weights scaled by 2^-22.
                let scale = 1.0f32 / (COEF_SCALE * COEF_SCALE);
                let bf = [
                    b[0] as f32 * scale,
                    b[1] as f32 * scale,
                    b[2] as f32 * scale,
                    b[3] as f32 * scale,
                ];
                let vector_end = row_len / I16_LANES * I16_LANES;
                for x in 0..vector_end {
                    let r = |j: usize| row_refs[j][x] as f32 * bf[j];
                    let v = r(0) + (r(1) + (r(2) + r(3)));
                    out[x] = round_half_even_f32(v).clamp(0, 255) as u8;
                }
                for x in vector_end..row_len {
                    let mut acc = 0i32;
                    for j in 0..k {
                        acc = acc.wrapping_add(row_refs[j][x].wrapping_mul(b[j]));
                    }
                    out[x] = fixed_to_u8(acc);
                }
            }
        }
    }
    dst
}

/// OpenCV's `FixedPtCast<int, uchar, 22>`: round the 22-bit fixed-point sum and saturate.
fn fixed_to_u8(acc: i32) -> u8 {
    (acc.wrapping_add(1 << (2 * COEF_BITS - 1)) >> (2 * COEF_BITS)).clamp(0, 255) as u8
}

fn separable_f32(src: &[f32], g: &Geometry, kernel: Kernel) -> Vec<f32> {
    let cn = g.channels;
    let xt = AxisTaps::new(kernel, g.width, g.out_width, g.scale_x, g.inv_scale_x, true);
    let yt = AxisTaps::new(
        kernel,
        g.height,
        g.out_height,
        g.scale_y,
        g.inv_scale_y,
        false,
    );
    let row_len = g.out_width * cn;
    let in_row = g.width * cn;
    let k = xt.taps;

    let used = yt.used(g.height);
    let mut rows = vec![0f32; g.height * row_len];
    for (y, _) in used.iter().enumerate().filter(|(_, u)| **u) {
        let s = &src[y * in_row..(y + 1) * in_row];
        let out = &mut rows[y * row_len..(y + 1) * row_len];
        for dx in 0..g.out_width {
            let idx = &xt.index[dx * k..(dx + 1) * k];
            let w = &xt.weight[dx * k..(dx + 1) * k];
            for c in 0..cn {
                // Products summed in tap order, unfused.
                let mut acc = s[idx[0] * cn + c] * w[0];
                for j in 1..k {
                    acc += s[idx[j] * cn + c] * w[j];
                }
                out[dx * cn + c] = acc;
            }
        }
    }

    let mut dst = vec![0f32; g.out_height * row_len];
    let mut row_refs: Vec<&[f32]> = Vec::with_capacity(k);
    let vector_end = row_len / F32_LANES * F32_LANES;
    for dy in 0..g.out_height {
        row_refs.clear();
        for &y in &yt.index[dy * k..(dy + 1) * k] {
            row_refs.push(&rows[y * row_len..(y + 1) * row_len]);
        }
        let b = &yt.weight[dy * k..(dy + 1) * k];
        let out = &mut dst[dy * row_len..(dy + 1) * row_len];
        if kernel.is_linear() {
            let (r0, r1) = (row_refs[0], row_refs[1]);
            for x in 0..row_len {
                out[x] = r0[x] * b[0] + r1[x] * b[1];
            }
            continue;
        }
        // Vector blocks: the last product first, p0 + (p1 + (… + p_{k−1})).
        for x in 0..vector_end {
            let mut acc = row_refs[k - 1][x] * b[k - 1];
            for j in (0..k - 1).rev() {
                acc += row_refs[j][x] * b[j];
            }
            out[x] = acc;
        }
        // Scalar tail: left to right.
        for x in vector_end..row_len {
            let mut acc = row_refs[0][x] * b[0];
            for j in 1..k {
                acc += row_refs[j][x] * b[j];
            }
            out[x] = acc;
        }
    }
    dst
}

// ---------------------------------------------------------------------------------------------
// IPP's f32 bilinear.

/// One output position of IPP's bilinear along an axis.
#[derive(Debug, Clone, Copy)]
struct IppTap {
    left: usize,
    right: usize,
    fraction: f32,
}

fn ipp_linear_taps(in_len: usize, out_len: usize) -> Vec<IppTap> {
    let scale = in_len as f64 / out_len as f64;
    (0..out_len)
        .map(|d| {
            let x = (d as f64 + 0.5) * scale - 0.5;
            let s = x.floor();
            let fraction = (x - s) as f32;
            let s = s as i64;
            let last = in_len as i64 - 1;
            if s < 0 || s >= last {
                let p = s.clamp(0, last) as usize;
                IppTap {
                    left: p,
                    right: p,
                    fraction: 0.0,
                }
            } else {
                IppTap {
                    left: s as usize,
                    right: s as usize + 1,
                    fraction,
                }
            }
        })
        .collect()
}

fn ipp_linear_f32(src: &[f32], g: &Geometry) -> Vec<f32> {
    let cn = g.channels;
    let xt = ipp_linear_taps(g.width, g.out_width);
    let yt = ipp_linear_taps(g.height, g.out_height);
    let row_len = g.out_width * cn;
    let in_row = g.width * cn;

    let mut used = vec![false; g.height];
    for t in &yt {
        used[t.left] = true;
        used[t.right] = true;
    }
    let mut rows = vec![0f32; g.height * row_len];
    for (y, _) in used.iter().enumerate().filter(|(_, u)| **u) {
        let s = &src[y * in_row..(y + 1) * in_row];
        let out = &mut rows[y * row_len..(y + 1) * row_len];
        for (dx, t) in xt.iter().enumerate() {
            for c in 0..cn {
                let (a, b) = (s[t.left * cn + c], s[t.right * cn + c]);
                out[dx * cn + c] = t.fraction.mul_add(b - a, a);
            }
        }
    }
    let mut dst = vec![0f32; g.out_height * row_len];
    for (dy, t) in yt.iter().enumerate() {
        let r0 = &rows[t.left * row_len..(t.left + 1) * row_len];
        let r1 = &rows[t.right * row_len..(t.right + 1) * row_len];
        let out = &mut dst[dy * row_len..(dy + 1) * row_len];
        for x in 0..row_len {
            out[x] = t.fraction.mul_add(r1[x] - r0[x], r0[x]);
        }
    }
    dst
}

// ---------------------------------------------------------------------------------------------
// INTER_AREA, integer factors.

/// Source element offsets (relative to a block's top-left value) in OpenCV's order: rows of
/// the block, then pixels within a row.
fn block_offsets(g: &Geometry, kx: usize, ky: usize) -> Vec<usize> {
    let in_row = g.width * g.channels;
    (0..ky)
        .flat_map(|sy| (0..kx).map(move |sx| sy * in_row + sx * g.channels))
        .collect()
}

/// For an output row: how many values have a complete block, or `None` for a row whose block
/// starts below the image (OpenCV writes zeros there).
fn complete_width(g: &Geometry, kx: usize, ky: usize, dy: usize) -> Option<usize> {
    let sy0 = dy * ky;
    if sy0 >= g.height {
        return None;
    }
    Some(if sy0 + ky <= g.height {
        (g.width / kx) * g.channels
    } else {
        0
    })
}

/// Mean of the part of a block that lies inside the image (OpenCV's edge case when the output is
/// larger than `in / k`), as `(sum, count)`.
fn partial_block<T: Copy, W: Copy + std::ops::AddAssign>(
    src: &[T],
    g: &Geometry,
    (kx, ky): (usize, usize),
    (dx, dy): (usize, usize),
    zero: W,
    widen: impl Fn(T) -> W,
) -> Option<(W, usize)> {
    let cn = g.channels;
    let in_row = g.width * cn;
    let sx0 = (dx / cn) * kx * cn + dx % cn;
    if sx0 >= in_row {
        return None;
    }
    let sy0 = dy * ky;
    let mut sum = zero;
    let mut count = 0;
    for sy in 0..ky {
        if sy0 + sy >= g.height {
            break;
        }
        for sx in (0..kx * cn).step_by(cn) {
            if sx0 + sx >= in_row {
                break;
            }
            sum += widen(src[(sy0 + sy) * in_row + sx0 + sx]);
            count += 1;
        }
    }
    Some((sum, count))
}

fn area_blocks_u8(src: &[u8], g: &Geometry, kx: usize, ky: usize) -> Vec<u8> {
    let cn = g.channels;
    let row_len = g.out_width * cn;
    let in_row = g.width * cn;
    let offsets = block_offsets(g, kx, ky);
    let scale = 1.0f32 / (kx * ky) as f32;
    let two_by_two = kx == 2 && ky == 2 && matches!(cn, 1 | 3 | 4);
    let mut dst = vec![0u8; g.out_height * row_len];
    for dy in 0..g.out_height {
        let out = &mut dst[dy * row_len..(dy + 1) * row_len];
        let Some(w) = complete_width(g, kx, ky, dy) else {
            continue;
        };
        let base = dy * ky * in_row;
        for (dx, o) in out.iter_mut().enumerate().take(w) {
            let start = base + (dx / cn) * kx * cn + dx % cn;
            let sum: i32 = offsets.iter().map(|&off| src[start + off] as i32).sum();
            *o = if two_by_two {
                ((sum + 2) >> 2) as u8
            } else {
                round_half_even_f32(sum as f32 * scale).clamp(0, 255) as u8
            };
        }
        for (dx, o) in out.iter_mut().enumerate().skip(w) {
            *o = match partial_block(src, g, (kx, ky), (dx, dy), 0i32, i32::from) {
                Some((sum, count)) if count > 0 => {
                    round_half_even_f32(sum as f32 / count as f32).clamp(0, 255) as u8
                }
                _ => 0,
            };
        }
    }
    dst
}

fn area_blocks_f32(src: &[f32], g: &Geometry, kx: usize, ky: usize) -> Vec<f32> {
    let cn = g.channels;
    let row_len = g.out_width * cn;
    let in_row = g.width * cn;
    let offsets = block_offsets(g, kx, ky);
    let scale = 1.0f32 / (kx * ky) as f32;
    let vectorised = kx == 2 && ky == 2 && matches!(cn, 1 | 4);
    let mut dst = vec![0f32; g.out_height * row_len];
    for dy in 0..g.out_height {
        let out = &mut dst[dy * row_len..(dy + 1) * row_len];
        let Some(w) = complete_width(g, kx, ky, dy) else {
            continue;
        };
        let base = dy * ky * in_row;
        let vector_end = if vectorised {
            w / F32_LANES * F32_LANES
        } else {
            0
        };
        for (dx, o) in out.iter_mut().enumerate().take(w) {
            let start = base + (dx / cn) * kx * cn + dx % cn;
            let v = |i: usize| src[start + offsets[i]];
            *o = if dx < vector_end {
                ((v(0) + v(1)) + (v(2) + v(3))) * 0.25
            } else {
                let mut sum = 0f32;
                let mut i = 0;
                while i + 4 <= offsets.len() {
                    sum += ((v(i) + v(i + 1)) + v(i + 2)) + v(i + 3);
                    i += 4;
                }
                while i < offsets.len() {
                    sum += v(i);
                    i += 1;
                }
                sum * scale
            };
        }
        for (dx, o) in out.iter_mut().enumerate().skip(w) {
            *o = match partial_block(src, g, (kx, ky), (dx, dy), 0f32, |v| v) {
                Some((sum, count)) if count > 0 => sum / count as f32,
                _ => 0.0,
            };
        }
    }
    dst
}

// ---------------------------------------------------------------------------------------------
// INTER_AREA, non-integer downscale.

/// One source pixel's share of an output cell.
#[derive(Debug, Clone, Copy)]
struct CellShare {
    dst: usize,
    src: usize,
    weight: f32,
}

/// OpenCV's `computeResizeAreaTab`: the shares, grouped by output cell in order.
fn cell_shares(in_len: usize, out_len: usize, scale: f64) -> Vec<CellShare> {
    let mut shares = Vec::with_capacity(in_len * 2);
    for d in 0..out_len {
        let f1 = d as f64 * scale;
        let f2 = f1 + scale;
        let cell = scale.min(in_len as f64 - f1);
        let mut s2 = f2.floor() as i64;
        let mut s1 = f1.ceil() as i64;
        s2 = s2.min(in_len as i64 - 1);
        s1 = s1.min(s2);
        if s1 as f64 - f1 > 1e-3 {
            shares.push(CellShare {
                dst: d,
                src: (s1 - 1) as usize,
                weight: ((s1 as f64 - f1) / cell) as f32,
            });
        }
        for s in s1..s2 {
            shares.push(CellShare {
                dst: d,
                src: s as usize,
                weight: (1.0 / cell) as f32,
            });
        }
        if f2 - s2 as f64 > 1e-3 {
            shares.push(CellShare {
                dst: d,
                src: s2 as usize,
                weight: ((f2 - s2 as f64).min(1.0).min(cell) / cell) as f32,
            });
        }
    }
    shares
}

fn area_cells<T: Copy + Default + AreaSample>(
    src: &[T],
    g: &Geometry,
    store: impl Fn(f32) -> T,
) -> Vec<T> {
    let cn = g.channels;
    let row_len = g.out_width * cn;
    let in_row = g.width * cn;
    let xs = cell_shares(g.width, g.out_width, g.scale_x);
    let ys = cell_shares(g.height, g.out_height, g.scale_y);
    let mut dst = vec![T::default(); g.out_height * row_len];
    let mut row = vec![0f32; row_len];
    let mut sum = vec![0f32; row_len];
    let mut current = None;
    for share in &ys {
        let s = &src[share.src * in_row..(share.src + 1) * in_row];
        row.fill(0.0);
        for xs in &xs {
            for c in 0..cn {
                row[xs.dst * cn + c] += s[xs.src * cn + c].to_f32() * xs.weight;
            }
        }
        if current != Some(share.dst) {
            if let Some(d) = current {
                for (o, &v) in dst[d * row_len..(d + 1) * row_len].iter_mut().zip(&sum) {
                    *o = store(v);
                }
            }
            for (acc, &v) in sum.iter_mut().zip(&row) {
                *acc = share.weight * v;
            }
            current = Some(share.dst);
        } else {
            for (acc, &v) in sum.iter_mut().zip(&row) {
                *acc += share.weight * v;
            }
        }
    }
    if let Some(d) = current {
        for (o, &v) in dst[d * row_len..(d + 1) * row_len].iter_mut().zip(&sum) {
            *o = store(v);
        }
    }
    dst
}

/// Sample types of the area path (converted to f32 exactly).
trait AreaSample {
    fn to_f32(self) -> f32;
}

impl AreaSample for u8 {
    fn to_f32(self) -> f32 {
        self as f32
    }
}

impl AreaSample for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}
