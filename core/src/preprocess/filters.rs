//! `blur` and `sharpen`: Daydream's Gaussian blur and multi-step sharpening, per channel, in
//! float. Every convolution is torch's `conv2d` with `padding = k // 2` as Daydream runs it:
//! zeros outside the image, so borders darken under the blur (as in Daydream).

use super::param_reader::ParamReader;
use super::planes::{Planes, correlate, gaussian_taps};
use crate::Result;

/// `blur` settings (Daydream's `BlurPreprocessor`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlurParams {
    /// `blur_intensity`: the Gaussian's standard deviation in pixels, in [0.1, 10], default 2.
    pub sigma: f64,
    /// `kernel_size`: taps per side, in [3, 51], default 15; an even size is raised by one.
    pub kernel_size: usize,
}

impl BlurParams {
    /// Reads `blur_intensity` and `kernel_size`.
    pub fn read(r: &ParamReader<'_>) -> Result<Self> {
        let sigma = r.number("blur_intensity", 2.0, 0.1..=10.0)?;
        let size = r.integer("kernel_size", 15, 3..=51)? as usize;
        Ok(BlurParams {
            sigma,
            kernel_size: size | 1,
        })
    }
}

/// Gaussian blur: each channel correlated with the normalized `kernel_size²` Gaussian.
pub fn blur(image: &Planes, params: BlurParams) -> Planes {
    let mut scratch = Vec::new();
    gaussian_blur(image, params.kernel_size, params.sigma, &mut scratch)
}

/// The normalized `size × size` Gaussian blur of every channel (zero padding), as two 1-D passes.
fn gaussian_blur(image: &Planes, size: usize, sigma: f64, scratch: &mut Vec<f32>) -> Planes {
    let taps = gaussian_taps(size, sigma);
    let (h, w) = (image.height, image.width);
    image.map_planes(|src, dst| {
        super::planes::correlate_separable(src, h, w, &taps, &taps, scratch, dst);
    })
}

/// `sharpen` settings (Daydream's `SharpenPreprocessor`; names, defaults and ranges as its
/// metadata).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharpenParams {
    /// `sharpen_intensity`: unsharp-mask amount, [0.1, 5], default 1.5.
    pub sharpen_intensity: f64,
    /// `unsharp_radius`: the unsharp mask's Gaussian σ, [0.1, 5], default 1.
    pub unsharp_radius: f64,
    /// `edge_enhancement`: weight of the added Sobel magnitude, [0, 2], default 0.5.
    pub edge_enhancement: f64,
    /// `detail_boost`: weight of the added Laplacian, [0, 1], default 0.3.
    pub detail_boost: f64,
    /// `noise_reduction`: blend towards a σ = 0.3 blur first, [0, 0.5], default 0.1.
    pub noise_reduction: f64,
    /// `multi_scale`: unsharp masks at σ·{0.5, 1, 2} (weights 0.3, 0.5, 0.2) instead of one.
    /// Default true.
    pub multi_scale: bool,
}

impl SharpenParams {
    /// Reads the six sharpen params.
    pub fn read(r: &ParamReader<'_>) -> Result<Self> {
        Ok(SharpenParams {
            sharpen_intensity: r.number("sharpen_intensity", 1.5, 0.1..=5.0)?,
            unsharp_radius: r.number("unsharp_radius", 1.0, 0.1..=5.0)?,
            edge_enhancement: r.number("edge_enhancement", 0.5, 0.0..=2.0)?,
            detail_boost: r.number("detail_boost", 0.3, 0.0..=1.0)?,
            noise_reduction: r.number("noise_reduction", 0.1, 0.0..=0.5)?,
            multi_scale: r.boolean("multi_scale", true)?,
        })
    }
}

/// Daydream's sharpening, step by step (each on every channel, zero-padded):
/// 1. if `noise_reduction` n > 0: x ← (1 − n)·x + n·G₀.₃(x);
/// 2. multi-scale: x ← clamp(x + Σ wᵢ·(U(x, σᵢ, I·wᵢ) − x)) with σᵢ = r·{0.5, 1, 2},
///    wᵢ = {0.3, 0.5, 0.2}; single scale: x ← U(x, r, I); where
///    U(x, σ, a) = clamp(x + a·(x − G_σ(x))) and G_σ is the Gaussian of size
///    max(3, ⌊6σ + 1⌋) made odd;
/// 3. if `edge_enhancement` e > 0: x ← clamp(x + e·√(Sobelₓ(x)² + Sobel_y(x)²));
/// 4. if `detail_boost` d > 0: x ← clamp(x + d·L(x)), L = [[0 −1 0] [−1 4 −1] [0 −1 0]];
///
/// clamps are to [0, 1].
pub fn sharpen(image: &Planes, p: SharpenParams) -> Planes {
    let mut scratch = Vec::new();
    let mut x = image.clone();
    if p.noise_reduction > 0.0 {
        let n = p.noise_reduction as f32;
        let smooth = sized_gaussian_blur(&x, 0.3, &mut scratch);
        for (v, s) in x.data.iter_mut().zip(&smooth.data) {
            *v = (1.0 - n) * *v + n * s;
        }
    }
    if p.multi_scale {
        let mut acc = x.clone();
        for (scale, weight) in [(0.5, 0.3), (1.0, 0.5), (2.0, 0.2)] {
            let sharp = unsharp(
                &x,
                p.unsharp_radius * scale,
                p.sharpen_intensity * weight,
                &mut scratch,
            );
            let weight = weight as f32;
            for ((a, s), v) in acc.data.iter_mut().zip(&sharp.data).zip(&x.data) {
                *a += weight * (s - v);
            }
        }
        acc.clamp_unit();
        x = acc;
    } else {
        x = unsharp(&x, p.unsharp_radius, p.sharpen_intensity, &mut scratch);
    }
    let (h, w) = (x.height, x.width);
    if p.edge_enhancement > 0.0 {
        const SOBEL_X: [f32; 9] = [-1., 0., 1., -2., 0., 2., -1., 0., 1.];
        const SOBEL_Y: [f32; 9] = [-1., -2., -1., 0., 0., 0., 1., 2., 1.];
        let e = p.edge_enhancement as f32;
        let mut gy = vec![0.0; h * w];
        x = x.map_planes(|src, dst| {
            correlate(src, h, w, &SOBEL_X, 3, 3, dst);
            correlate(src, h, w, &SOBEL_Y, 3, 3, &mut gy);
            for ((d, &g), &s) in dst.iter_mut().zip(&gy).zip(src) {
                *d = (s + e * (*d * *d + g * g).sqrt()).clamp(0.0, 1.0);
            }
        });
    }
    if p.detail_boost > 0.0 {
        const LAPLACIAN: [f32; 9] = [0., -1., 0., -1., 4., -1., 0., -1., 0.];
        let d = p.detail_boost as f32;
        x = x.map_planes(|src, dst| {
            correlate(src, h, w, &LAPLACIAN, 3, 3, dst);
            for (o, &s) in dst.iter_mut().zip(src) {
                *o = (s + d * *o).clamp(0.0, 1.0);
            }
        });
    }
    x.clamp_unit();
    x
}

/// Gaussian blur with Daydream's sharpen sizing: max(3, ⌊6σ + 1⌋), raised to odd.
fn sized_gaussian_blur(image: &Planes, sigma: f64, scratch: &mut Vec<f32>) -> Planes {
    let size = ((6.0 * sigma + 1.0).floor() as usize).max(3) | 1;
    gaussian_blur(image, size, sigma, scratch)
}

/// Unsharp mask clamp(x + amount·(x − G_σ(x)), 0, 1).
fn unsharp(image: &Planes, sigma: f64, amount: f64, scratch: &mut Vec<f32>) -> Planes {
    let blurred = sized_gaussian_blur(image, sigma, scratch);
    let a = amount as f32;
    let mut out = blurred;
    for (o, &v) in out.data.iter_mut().zip(&image.data) {
        *o = (v + a * (v - *o)).clamp(0.0, 1.0);
    }
    out
}
