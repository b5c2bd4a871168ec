//! `blur` and `sharpen`: Daydream's Gaussian blur and multi-step sharpening, per channel, in
//! float. Every convolution is torch's `conv2d` with `padding = k // 2` as Daydream runs it:
//! zeros outside the image, so borders darken under the blur (as in Daydream).

use candle_core::Tensor;

use super::param_reader::ParamReader;
use super::planes::{
    Planes, correlate, correlate_separable_tensor, correlate_tensor, gaussian_taps,
    map_channels_tensor,
};
use crate::Result;

/// Sharpening's edge term: the 3×3 Sobel kernels.
const SOBEL_X: [f32; 9] = [-1., 0., 1., -2., 0., 2., -1., 0., 1.];
const SOBEL_Y: [f32; 9] = [-1., -2., -1., 0., 0., 0., 1., 2., 1.];
/// Sharpening's detail term.
const LAPLACIAN: [f32; 9] = [0., -1., 0., -1., 4., -1., 0., -1., 0.];
/// Multi-scale sharpening's (σ factor, weight) of each unsharp mask.
const SHARPEN_SCALES: [(f64, f64); 3] = [(0.5, 0.3), (1.0, 0.5), (2.0, 0.2)];
/// The σ of the blur that `noise_reduction` blends in.
const NOISE_SIGMA: f64 = 0.3;

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

/// [`blur`] as tensor operations on the image's own device (`[1, C, H, W]` in [0, 1]): what a
/// GPU runs (unless `SDSTREAM_CUDA_PREPROCESS=0`), instead of a download, [`blur`] on the host
/// and an upload. The same two passes in f32; the sums run in another order (tested on the CPU
/// against [`blur`]). Returns `[1, C, H, W]` f32.
pub fn blur_tensor(image: &Tensor, params: BlurParams) -> candle_core::Result<Tensor> {
    map_channels_tensor(image, |x| {
        gaussian_blur_tensor(x, params.kernel_size, params.sigma)
    })
}

/// [`gaussian_blur`] of `[N, 1, H, W]` maps.
fn gaussian_blur_tensor(x: &Tensor, size: usize, sigma: f64) -> candle_core::Result<Tensor> {
    let taps = gaussian_taps(size, sigma);
    correlate_separable_tensor(x, &taps, &taps)
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
        let smooth = sized_gaussian_blur(&x, NOISE_SIGMA, &mut scratch);
        for (v, s) in x.data.iter_mut().zip(&smooth.data) {
            *v = (1.0 - n) * *v + n * s;
        }
    }
    if p.multi_scale {
        let mut acc = x.clone();
        for (scale, weight) in SHARPEN_SCALES {
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

/// [`sharpen`] as tensor operations on the image's own device (`[1, C, H, W]` in [0, 1]), the
/// same steps in the same order in f32; only the convolutions' sums run in another order
/// (tested on the CPU against [`sharpen`]). Returns `[1, C, H, W]` f32.
pub fn sharpen_tensor(image: &Tensor, p: SharpenParams) -> candle_core::Result<Tensor> {
    let clamp = |t: Tensor| t.clamp(0f32, 1f32);
    // `v·a` with `a` as the host's f32 (affine's factor goes through f64 exactly).
    let times = |t: &Tensor, a: f32| t.affine(f64::from(a), 0.0);
    map_channels_tensor(image, |x| {
        let mut x = x.clone();
        if p.noise_reduction > 0.0 {
            let n = p.noise_reduction as f32;
            let smooth = sized_gaussian_blur_tensor(&x, NOISE_SIGMA)?;
            x = (times(&x, 1.0 - n)? + times(&smooth, n)?)?;
        }
        x = if p.multi_scale {
            let mut acc = x.clone();
            for (scale, weight) in SHARPEN_SCALES {
                let sharp =
                    unsharp_tensor(&x, p.unsharp_radius * scale, p.sharpen_intensity * weight)?;
                acc = (acc + times(&(sharp - &x)?, weight as f32)?)?;
            }
            clamp(acc)?
        } else {
            unsharp_tensor(&x, p.unsharp_radius, p.sharpen_intensity)?
        };
        if p.edge_enhancement > 0.0 {
            let gx = correlate_tensor(&x, &SOBEL_X, 3, 3)?;
            let gy = correlate_tensor(&x, &SOBEL_Y, 3, 3)?;
            let magnitude = (gx.sqr()? + gy.sqr()?)?.sqrt()?;
            x = clamp((&x + times(&magnitude, p.edge_enhancement as f32)?)?)?;
        }
        if p.detail_boost > 0.0 {
            let detail = correlate_tensor(&x, &LAPLACIAN, 3, 3)?;
            x = clamp((&x + times(&detail, p.detail_boost as f32)?)?)?;
        }
        clamp(x)
    })
}

/// Daydream's sharpen sizing of a Gaussian: max(3, ⌊6σ + 1⌋), raised to odd.
fn sharpen_blur_size(sigma: f64) -> usize {
    ((6.0 * sigma + 1.0).floor() as usize).max(3) | 1
}

/// Gaussian blur with Daydream's sharpen sizing ([`sharpen_blur_size`]).
fn sized_gaussian_blur(image: &Planes, sigma: f64, scratch: &mut Vec<f32>) -> Planes {
    gaussian_blur(image, sharpen_blur_size(sigma), sigma, scratch)
}

/// [`sized_gaussian_blur`] of `[N, 1, H, W]` maps.
fn sized_gaussian_blur_tensor(x: &Tensor, sigma: f64) -> candle_core::Result<Tensor> {
    gaussian_blur_tensor(x, sharpen_blur_size(sigma), sigma)
}

/// [`unsharp`] of `[N, 1, H, W]` maps.
fn unsharp_tensor(x: &Tensor, sigma: f64, amount: f64) -> candle_core::Result<Tensor> {
    let blurred = sized_gaussian_blur_tensor(x, sigma)?;
    (x + (x - blurred)?.affine(f64::from(amount as f32), 0.0)?)?.clamp(0f32, 1f32)
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn host(image: &Tensor, f: impl Fn(&Planes) -> Planes) -> Tensor {
        let out = f(&Planes::from_tensor(image).unwrap());
        Tensor::from_vec(
            out.data,
            (1, out.channels, out.height, out.width),
            &Device::Cpu,
        )
        .unwrap()
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The tensor versions of `blur` and `sharpen` (what a GPU runs) against the host's steps,
    /// on the CPU where both run: noise (every term busy), an image smaller than the largest
    /// kernel (51 taps over 23 rows: the zero padding dominates) and one channel; default
    /// params, the extremes of each range and sharpening's single-scale branch.
    #[test]
    fn tensor_operations_match_the_host_steps() {
        // Fixed noise (the fractional part of a sine hash), so that every run checks the same
        // sums.
        let noise = |dims: (usize, usize, usize, usize)| {
            let n = dims.0 * dims.1 * dims.2 * dims.3;
            let values: Vec<f32> = (0..n)
                .map(|i| ((i as f64 * 12.9898).sin() * 43758.5453).rem_euclid(1.0) as f32)
                .collect();
            Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
        };
        let images = [
            ("noise", noise((1, 3, 41, 57))),
            ("small", noise((1, 3, 23, 30))),
            ("one channel", noise((1, 1, 33, 19))),
        ];
        let blurs = [
            BlurParams {
                sigma: 2.0,
                kernel_size: 15,
            },
            BlurParams {
                sigma: 0.1,
                kernel_size: 3,
            },
            BlurParams {
                sigma: 10.0,
                kernel_size: 51,
            },
        ];
        let defaults = SharpenParams {
            sharpen_intensity: 1.5,
            unsharp_radius: 1.0,
            edge_enhancement: 0.5,
            detail_boost: 0.3,
            noise_reduction: 0.1,
            multi_scale: true,
        };
        // (params, bound): each step scales the difference of the sums before it (the unsharp
        // amount, the edge and detail weights over kernels whose taps sum to 8 in magnitude),
        // so the bound follows the params: 1e-5 at Daydream's defaults, 5e-5 at the top of
        // every range (0.013 of an 8-bit level).
        let sharpens = [
            (defaults, 1e-5),
            (
                SharpenParams {
                    multi_scale: false,
                    ..defaults
                },
                1e-5,
            ),
            (
                SharpenParams {
                    sharpen_intensity: 5.0,
                    unsharp_radius: 5.0,
                    edge_enhancement: 2.0,
                    detail_boost: 1.0,
                    noise_reduction: 0.5,
                    multi_scale: true,
                },
                5e-5,
            ),
            (
                SharpenParams {
                    sharpen_intensity: 0.1,
                    unsharp_radius: 0.1,
                    edge_enhancement: 0.0,
                    detail_boost: 0.0,
                    noise_reduction: 0.0,
                    multi_scale: false,
                },
                1e-5,
            ),
        ];
        let mut worst = (0f32, 0f32);
        for (name, image) in &images {
            for p in blurs {
                let got = blur_tensor(image, p).unwrap();
                let max = max_difference(&got, &host(image, |x| blur(x, p)));
                assert!(max <= 1e-6, "blur {p:?} of {name}: max {max}");
                worst.0 = worst.0.max(max);
            }
            for (p, bound) in sharpens {
                let got = sharpen_tensor(image, p).unwrap();
                let max = max_difference(&got, &host(image, |x| sharpen(x, p)));
                assert!(
                    max <= bound,
                    "sharpen {p:?} of {name}: max {max} (≤ {bound})"
                );
                worst.1 = worst.1.max(max / bound);
            }
        }
        println!(
            "as tensor operations: blur within {:.2e} of the host; sharpen at most {:.0}% of \
             its bound",
            worst.0,
            100.0 * worst.1
        );
        // A check that can fail: the sharpened noise is not the noise.
        let noise = &images[0].1;
        assert!(max_difference(&sharpen_tensor(noise, defaults).unwrap(), noise) > 0.1);
    }
}
