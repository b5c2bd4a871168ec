//! `standard_lineart`: Daydream's `StandardLineartPreprocessor`, a line drawing without a
//! network (its torch port of controlnet_aux's `lineart_standard`), in this order on 8-bit RGB
//! levels as floats:
//! 1. scaled so that the shorter side is `detect_resolution`: sizes `round(side·k)` (rounded
//!    half to even in float32, as `torch.round` does), torch's bicubic interpolation when
//!    enlarging (align_corners false, no clamping) and its area interpolation otherwise; then
//!    padded on the bottom and right by repeating the last row and column, to multiples of 64;
//! 2. blurred per channel with Daydream's Gaussian kernel: `2·⌈3σ⌉ + 1` taps whose positions
//!    are spread evenly over [−1, 1] (so the kernel is nearly flat: σ is measured against
//!    that unit span, not in pixels), normalised to sum 1, applied after a reflection pad;
//! 3. intensity = min over the channels of (blurred − image), clamped to [0, 255];
//! 4. divided by max(16, the lower median of the intensities above `intensity_threshold`) (16
//!    when none is), times 127, clamped to [0, 255] and truncated to 8 bits;
//! 5. the padding removed, the map copied to three channels.
//!
//! Daydream then resizes the result to the stream's size (bilinear on its tensor path, which
//! production runs), as [`super::annotator::to_stream_size`] does.
//!
//! Params: `detect_resolution` (integer in [8, 4096], default 512), `gaussian_sigma` (1–20, default 6),
//! `intensity_threshold` (1–50, default 8).

use super::param_reader::ParamReader;
use super::planes::Planes;
use super::upscale::{Resample, resize};
use crate::Result;

/// `standard_lineart` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StandardLineartParams {
    /// Shorter side the lines are found at.
    pub detect_resolution: usize,
    /// The blur's σ, in units of half the kernel's span.
    pub gaussian_sigma: f64,
    /// Intensities above this set the normalisation.
    pub intensity_threshold: f64,
}

impl StandardLineartParams {
    /// Reads `detect_resolution`, `gaussian_sigma` and `intensity_threshold`.
    pub fn read(r: &ParamReader<'_>) -> Result<Self> {
        Ok(Self {
            detect_resolution: r.integer("detect_resolution", 512, 8..=4096)? as usize,
            gaussian_sigma: r.number("gaussian_sigma", 6.0, 1.0..=20.0)?,
            intensity_threshold: r.number("intensity_threshold", 8.0, 1.0..=50.0)?,
        })
    }
}

/// The line map of a `[3, H, W]` image in [0, 1], as `[3, H', W']` in [0, 1] at the detection
/// size (step 1's size, before the padding).
pub fn apply(image: &Planes, p: StandardLineartParams) -> Planes {
    // 8-bit levels as floats (the frames came from 8-bit pixels; rounding recovers them).
    let mut levels = image.clone();
    for v in &mut levels.data {
        *v = (*v * 255.0).round().clamp(0.0, 255.0);
    }
    let (h, w) = (image.height, image.width);
    let k = p.detect_resolution as f64 / h.min(w) as f64;
    let target = |side: usize| (((side as f64) * k) as f32).round_ties_even() as usize;
    let (th, tw) = (target(h).max(1), target(w).max(1));
    let scaled = if k > 1.0 {
        resize(&levels, th, tw, Resample::Bicubic)
    } else {
        area_resize(&levels, th, tw)
    };
    let (ph, pw) = (th.div_ceil(64) * 64, tw.div_ceil(64) * 64);
    let padded = pad_replicate(&scaled, ph, pw);
    let blurred = blur(&padded, p.gaussian_sigma);
    let n = ph * pw;
    let mut intensity = vec![0.0f32; n];
    for (i, v) in intensity.iter_mut().enumerate() {
        let mut least = f32::INFINITY;
        for c in 0..padded.channels {
            least = least.min(blurred.data[c * n + i] - padded.data[c * n + i]);
        }
        *v = least.clamp(0.0, 255.0);
    }
    let threshold = p.intensity_threshold as f32;
    let mut above: Vec<f32> = intensity
        .iter()
        .copied()
        .filter(|&v| v > threshold)
        .collect();
    let norm = if above.is_empty() {
        16.0
    } else {
        let middle = (above.len() - 1) / 2;
        let (_, median, _) = above.select_nth_unstable_by(middle, f32::total_cmp);
        median.max(16.0)
    };
    let mut out = Planes::zeros(3, th, tw);
    for y in 0..th {
        for x in 0..tw {
            let level = (intensity[y * pw + x] / norm * 127.0)
                .clamp(0.0, 255.0)
                .trunc();
            for c in 0..3 {
                out.data[(c * th + y) * tw + x] = level / 255.0;
            }
        }
    }
    out
}

/// torch's `F.interpolate(mode="area")` (adaptive average pooling): output pixel (i, j)
/// averages input rows ⌊i·H/h⌋ .. ⌈(i+1)·H/h⌉ and the columns likewise.
fn area_resize(image: &Planes, height: usize, width: usize) -> Planes {
    let (ih, iw) = (image.height, image.width);
    let span = |o: usize, out: usize, input: usize| {
        let start = o * input / out;
        let end = ((o + 1) * input).div_ceil(out);
        (start, end)
    };
    let mut out = Planes::zeros(image.channels, height, width);
    for c in 0..image.channels {
        let src = image.plane(c);
        for y in 0..height {
            let (y0, y1) = span(y, height, ih);
            for x in 0..width {
                let (x0, x1) = span(x, width, iw);
                let mut sum = 0.0f32;
                for row in src[y0 * iw..y1 * iw].chunks_exact(iw) {
                    for &v in &row[x0..x1] {
                        sum += v;
                    }
                }
                out.data[(c * height + y) * width + x] = sum / ((y1 - y0) * (x1 - x0)) as f32;
            }
        }
    }
    out
}

/// Pads on the bottom and right to `height × width` by repeating the last row and column.
fn pad_replicate(image: &Planes, height: usize, width: usize) -> Planes {
    let (ih, iw) = (image.height, image.width);
    let mut out = Planes::zeros(image.channels, height, width);
    for c in 0..image.channels {
        let src = image.plane(c);
        for y in 0..height {
            let row = &src[y.min(ih - 1) * iw..][..iw];
            let dst = &mut out.data[(c * height + y) * width..][..width];
            dst[..iw].copy_from_slice(row);
            dst[iw..].fill(row[iw - 1]);
        }
    }
    out
}

/// Daydream's kernel: `size` positions `linspace(−1, 1)` per axis, weight
/// `exp(−(x² + y²) / (2σ²))`, normalised to sum 1; row-major `size × size`.
fn kernel(size: usize, sigma: f64) -> Vec<f32> {
    let positions = linspace_unit(size);
    let two_sigma_sq = (2.0 * sigma * sigma) as f32;
    let mut k = Vec::with_capacity(size * size);
    for &y in &positions {
        for &x in &positions {
            let d = (x * x + y * y).sqrt();
            k.push((-(d * d) / two_sigma_sq).exp());
        }
    }
    let sum: f32 = k.iter().sum();
    k.iter().map(|v| v / sum).collect()
}

/// torch's `linspace(−1, 1, n)` in float32: the first half stepped from −1, the second half
/// stepped back from 1.
fn linspace_unit(n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![-1.0];
    }
    let step = 2.0f32 / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                -1.0 + step * i as f32
            } else {
                1.0 - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// The per-channel blur of step 2: reflection pad by `size / 2`, then the kernel.
fn blur(image: &Planes, sigma: f64) -> Planes {
    let size = 2 * ((3.0 * sigma) as f32).ceil() as usize + 1;
    let k = kernel(size, sigma);
    let r = size / 2;
    let (h, w) = (image.height, image.width);
    // torch's reflect: index −i reads i, index n − 1 + i reads n − 1 − i.
    let reflect = |i: isize, n: usize| -> usize {
        let last = n as isize - 1;
        let m = if i < 0 {
            -i
        } else if i > last {
            2 * last - i
        } else {
            i
        };
        m.clamp(0, last) as usize
    };
    let (ph, pw) = (h + 2 * r, w + 2 * r);
    let mut padded = vec![0.0f32; ph * pw];
    image.map_planes(|src, dst| {
        for y in 0..ph {
            let sy = reflect(y as isize - r as isize, h);
            for x in 0..pw {
                padded[y * pw + x] = src[sy * w + reflect(x as isize - r as isize, w)];
            }
        }
        for y in 0..h {
            let out = &mut dst[y * w..(y + 1) * w];
            for (ky, krow) in k.chunks_exact(size).enumerate() {
                let row = &padded[(y + ky) * pw..(y + ky + 1) * pw];
                for (kx, &kv) in krow.iter().enumerate() {
                    for (o, &v) in out.iter_mut().zip(&row[kx..kx + w]) {
                        *o += kv * v;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_at_both_ends_and_the_middle() {
        let v = linspace_unit(37);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[36], 1.0);
        assert_eq!(v[18], 0.0);
        assert_eq!(linspace_unit(2), vec![-1.0, 1.0]);
    }

    #[test]
    fn kernel_sums_to_one_and_is_nearly_flat_for_large_sigma() {
        let k = kernel(37, 6.0);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let (lo, hi) = k
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        // exp(−2/72) at the corners against 1 in the middle.
        assert!(lo / hi > 0.97, "{lo} {hi}");
    }

    #[test]
    fn area_resize_averages_boxes() {
        let image = Planes {
            channels: 1,
            height: 2,
            width: 4,
            data: vec![0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0],
        };
        let out = area_resize(&image, 1, 2);
        assert_eq!(out.data, vec![1.5, 5.5]);
    }
}
