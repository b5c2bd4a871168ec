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

use candle_core::{DType, Tensor};

use super::param_reader::ParamReader;
use super::planes::{Planes, correlate_separable_padded_tensor, map_channels_tensor};
use super::upscale::{Resample, resize, resize_tensor};
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
    let size = DetectionSize::new(image.height, image.width, p);
    let ((th, tw), (ph, pw)) = (size.scaled, size.padded);
    let scaled = if size.enlarges {
        resize(&levels, th, tw, Resample::Bicubic)
    } else {
        area_resize(&levels, th, tw)
    };
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
    let norm = normaliser(&intensity, p.intensity_threshold);
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

/// [`apply`] as tensor operations on the image's own device (`[1, 3, H, W]` in [0, 1], any
/// float dtype): what a GPU runs (unless `SDSTREAM_CUDA_PREPROCESS=0`). Returns
/// `[1, 3, H', W']` f32.
///
/// Every step but the blur is the host's arithmetic on the same values: the bicubic resize
/// through [`resize_tensor`]; the area resize as two products with 0/1 matrices, whose sums of
/// 8-bit levels are exact in f32 in any order while a box holds fewer than 65,793 pixels (a
/// shrink under 256× per side); the median on the host, from one download of the intensity map
/// (candle's device sort takes rows of at most 1,024 values). The blur runs Daydream's kernel
/// as its two 1-D factors (37 + 37 taps at the default σ instead of 37², 121 + 121 at the top),
/// through sdstream's convolution, so its sums differ from the host's in the last bits, and a
/// level that lands on a whole number after the scaling may truncate to the one below (tested
/// on the CPU: at most one level, on a small share of the pixels).
pub fn apply_tensor(image: &Tensor, p: StandardLineartParams) -> candle_core::Result<Tensor> {
    let device = image.device();
    let (_, _, h, w) = image.dims4()?;
    let levels = image
        .to_dtype(DType::F32)?
        .affine(255.0, 0.0)?
        .round()?
        .clamp(0f32, 255f32)?;
    let size = DetectionSize::new(h, w, p);
    let ((th, tw), (ph, pw)) = (size.scaled, size.padded);
    let scaled = if size.enlarges {
        resize_tensor(&levels, th, tw, Resample::Bicubic)?
    } else {
        area_resize_tensor(&levels, th, tw)?
    };
    let padded = gather_2d(
        &scaled,
        &replicate_indices(th, ph),
        &replicate_indices(tw, pw),
    )?;
    let blurred = blur_tensor(&padded, p.gaussian_sigma)?;
    let intensity = (blurred - &padded)?.min_keepdim(1)?.clamp(0f32, 255f32)?;
    let norm = normaliser(
        &intensity.flatten_all()?.to_vec1::<f32>()?,
        p.intensity_threshold,
    );
    let scalar = |v: f32| Tensor::new(v, device);
    intensity
        .narrow(2, 0, th)?
        .narrow(3, 0, tw)?
        .broadcast_div(&scalar(norm)?)?
        .broadcast_mul(&scalar(127.0)?)?
        .clamp(0f32, 255f32)?
        // Non-negative after the clamp: the floor is the truncation.
        .floor()?
        .broadcast_div(&scalar(255.0)?)?
        .repeat((1, 3, 1, 1))
}

/// Step 1's sizes.
struct DetectionSize {
    /// Rows and columns the image is scaled to.
    scaled: (usize, usize),
    /// Those rounded up to multiples of 64.
    padded: (usize, usize),
    /// Whether the scaling enlarges (bicubic) or not (area).
    enlarges: bool,
}

impl DetectionSize {
    fn new(height: usize, width: usize, p: StandardLineartParams) -> Self {
        let k = p.detect_resolution as f64 / height.min(width) as f64;
        let target = |side: usize| ((((side as f64) * k) as f32).round_ties_even() as usize).max(1);
        let (th, tw) = (target(height), target(width));
        DetectionSize {
            scaled: (th, tw),
            padded: (th.div_ceil(64) * 64, tw.div_ceil(64) * 64),
            enlarges: k > 1.0,
        }
    }
}

/// Step 4's divisor: the lower median of the intensities above `threshold`, at least 16 (16
/// when none is above it).
fn normaliser(intensity: &[f32], threshold: f64) -> f32 {
    let threshold = threshold as f32;
    let mut above: Vec<f32> = intensity
        .iter()
        .copied()
        .filter(|&v| v > threshold)
        .collect();
    if above.is_empty() {
        return 16.0;
    }
    let middle = (above.len() - 1) / 2;
    let (_, median, _) = above.select_nth_unstable_by(middle, f32::total_cmp);
    median.max(16.0)
}

/// torch's `F.interpolate(mode="area")` (adaptive average pooling): output pixel (i, j)
/// averages input rows ⌊i·H/h⌋ .. ⌈(i+1)·H/h⌉ and the columns likewise.
fn area_resize(image: &Planes, height: usize, width: usize) -> Planes {
    let (ih, iw) = (image.height, image.width);
    let mut out = Planes::zeros(image.channels, height, width);
    for c in 0..image.channels {
        let src = image.plane(c);
        for y in 0..height {
            let (y0, y1) = area_span(y, height, ih);
            for x in 0..width {
                let (x0, x1) = area_span(x, width, iw);
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

/// The input indices `start..end` output `o` of `out` averages over an axis of `input`.
fn area_span(o: usize, out: usize, input: usize) -> (usize, usize) {
    (o * input / out, ((o + 1) * input).div_ceil(out))
}

/// [`area_resize`] as tensor operations: the box sums as products with 0/1 matrices (rows, then
/// columns), divided by each box's size.
fn area_resize_tensor(x: &Tensor, height: usize, width: usize) -> candle_core::Result<Tensor> {
    let device = x.device();
    let (_, channels, ih, iw) = x.dims4()?;
    let spans = |out: usize, input: usize| -> Vec<(usize, usize)> {
        (0..out).map(|o| area_span(o, out, input)).collect()
    };
    let (row_spans, column_spans) = (spans(height, ih), spans(width, iw));
    // `[out, input]`: 1 where output `o`'s box holds input `i`.
    let boxes = |spans: &[(usize, usize)], input: usize| -> candle_core::Result<Tensor> {
        let mut m = vec![0f32; spans.len() * input];
        for (row, &(start, end)) in m.chunks_exact_mut(input).zip(spans) {
            row[start..end].fill(1.0);
        }
        Tensor::from_vec(m, (spans.len(), input), device)
    };
    let rows = boxes(&row_spans, ih)?;
    let columns = boxes(&column_spans, iw)?.t()?.contiguous()?;
    let sums = rows
        .broadcast_matmul(&x.squeeze(0)?.contiguous()?)?
        .broadcast_matmul(&columns)?;
    let counts: Vec<f32> = row_spans
        .iter()
        .flat_map(|&(y0, y1)| {
            column_spans
                .iter()
                .map(move |&(x0, x1)| ((y1 - y0) * (x1 - x0)) as f32)
        })
        .collect();
    let counts = Tensor::from_vec(counts, (height, width), device)?;
    sums.broadcast_div(&counts)?
        .reshape((1, channels, height, width))
}

/// `x` (`[N, C, H, W]`) with rows `rows` and columns `columns` of it, in those orders.
fn gather_2d(x: &Tensor, rows: &[u32], columns: &[u32]) -> candle_core::Result<Tensor> {
    let index = |v: &[u32]| Tensor::from_slice(v, v.len(), x.device());
    x.index_select(&index(rows)?, 2)?
        .index_select(&index(columns)?, 3)
}

/// Indices `0..padded` that repeat the last of `0..len`.
fn replicate_indices(len: usize, padded: usize) -> Vec<u32> {
    (0..padded).map(|i| i.min(len - 1) as u32).collect()
}

/// Indices of `−r..len + r` reflected into `0..len` (torch's reflect: −i reads i, len − 1 + i
/// reads len − 1 − i; clamped for a pad wider than the map, which torch refuses).
fn reflect_indices(len: usize, r: usize) -> Vec<u32> {
    let last = len as isize - 1;
    (-(r as isize)..(len + r) as isize)
        .map(|i| {
            let m = if i < 0 {
                -i
            } else if i > last {
                2 * last - i
            } else {
                i
            };
            m.clamp(0, last) as u32
        })
        .collect()
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

/// The blur's taps per side: `2·⌈3σ⌉ + 1`.
fn blur_size(sigma: f64) -> usize {
    2 * ((3.0 * sigma) as f32).ceil() as usize + 1
}

/// The per-channel blur of step 2: reflection pad by `size / 2`, then the kernel.
fn blur(image: &Planes, sigma: f64) -> Planes {
    let size = blur_size(sigma);
    let k = kernel(size, sigma);
    let r = size / 2;
    let (h, w) = (image.height, image.width);
    let (ph, pw) = (h + 2 * r, w + 2 * r);
    let (rows, columns) = (reflect_indices(h, r), reflect_indices(w, r));
    let mut padded = vec![0.0f32; ph * pw];
    image.map_planes(|src, dst| {
        for (y, &sy) in rows.iter().enumerate() {
            for (x, &sx) in columns.iter().enumerate() {
                padded[y * pw + x] = src[sy as usize * w + sx as usize];
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

/// [`blur`] as tensor operations on `x`'s device (`[1, C, H, W]` f32): the reflection pad as
/// gathers, then Daydream's kernel as its two 1-D factors (the kernel is `g(x)·g(y)` over its
/// sum, which is `(Σg)²`), each normalised in f64.
fn blur_tensor(x: &Tensor, sigma: f64) -> candle_core::Result<Tensor> {
    let size = blur_size(sigma);
    let r = size / 2;
    let (_, _, h, w) = x.dims4()?;
    let padded = gather_2d(x, &reflect_indices(h, r), &reflect_indices(w, r))?;
    let two_sigma_sq = 2.0 * sigma * sigma;
    let raw: Vec<f64> = linspace_unit(size)
        .iter()
        .map(|&p| (-(p as f64 * p as f64) / two_sigma_sq).exp())
        .collect();
    let sum: f64 = raw.iter().sum();
    let taps: Vec<f32> = raw.iter().map(|v| (v / sum) as f32).collect();
    map_channels_tensor(&padded, |p| {
        correlate_separable_padded_tensor(p, &taps, &taps, (0, 0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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

    /// 8-bit levels of a fixed sine hash (the same sums every run), with a dark diagonal band
    /// so that the map has lines, as `[1, 3, H, W]` in [0, 1].
    fn frame(height: usize, width: usize) -> Planes {
        let mut data = Vec::with_capacity(3 * height * width);
        for c in 0..3 {
            for y in 0..height {
                for x in 0..width {
                    let hash = super::super::planes::sine_hash((c * height + y) * width + x);
                    let band = (x as isize - y as isize).unsigned_abs() % 17 < 3;
                    let level = if band {
                        20.0 + 30.0 * hash
                    } else {
                        120.0 + 120.0 * hash
                    };
                    data.push(level.round() / 255.0);
                }
            }
        }
        Planes {
            channels: 3,
            height,
            width,
            data,
        }
    }

    #[test]
    fn resizes_and_pads_as_tensor_operations_are_the_hosts_bit_for_bit() {
        let image = frame(45, 70);
        let mut levels = image.clone();
        for v in &mut levels.data {
            *v = (*v * 255.0).round();
        }
        let tensor = levels.clone().into_tensor(&Device::Cpu).unwrap();
        for (h, w) in [(45, 70), (20, 31), (7, 11), (1, 1)] {
            let got = Planes::from_tensor(&area_resize_tensor(&tensor, h, w).unwrap()).unwrap();
            assert_eq!(got, area_resize(&levels, h, w), "area to {h}×{w}");
        }
        let padded = gather_2d(
            &tensor,
            &replicate_indices(45, 64),
            &replicate_indices(70, 128),
        )
        .unwrap();
        assert_eq!(
            Planes::from_tensor(&padded).unwrap(),
            pad_replicate(&levels, 64, 128)
        );
        // A pad wider than half the map reflects and clamps as the host's.
        assert_eq!(reflect_indices(3, 2), vec![2, 1, 0, 1, 2, 1, 0]);
        assert_eq!(reflect_indices(2, 3), vec![1, 1, 1, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn line_maps_as_tensor_operations_are_within_a_level_of_the_hosts() {
        let defaults = StandardLineartParams {
            detect_resolution: 64,
            gaussian_sigma: 6.0,
            intensity_threshold: 8.0,
        };
        let cases = [
            // Shrinks (area), enlarges (bicubic), the widest kernel, a high threshold.
            ("area", frame(72, 96), defaults),
            (
                "bicubic",
                frame(40, 52),
                StandardLineartParams {
                    detect_resolution: 56,
                    ..defaults
                },
            ),
            (
                "σ 20",
                frame(64, 64),
                StandardLineartParams {
                    gaussian_sigma: 20.0,
                    ..defaults
                },
            ),
            (
                "σ 1, threshold 50",
                frame(50, 81),
                StandardLineartParams {
                    gaussian_sigma: 1.0,
                    intensity_threshold: 50.0,
                    ..defaults
                },
            ),
        ];
        let (mut values, mut off) = (0usize, 0usize);
        for (name, image, p) in cases {
            let want = apply(&image, p);
            let tensor = image.clone().into_tensor(&Device::Cpu).unwrap();
            let got = Planes::from_tensor(&apply_tensor(&tensor, p).unwrap()).unwrap();
            assert_eq!(
                (got.channels, got.height, got.width),
                (want.channels, want.height, want.width),
                "{name}"
            );
            let lit = want.data.iter().filter(|&&v| v > 0.0).count();
            assert!(lit * 20 > want.data.len(), "{name}: only {lit} lit values");
            for (a, b) in got.data.iter().zip(&want.data) {
                let levels = ((a - b) * 255.0).abs();
                assert!(levels <= 1.0 + 1e-4, "{name}: {a} against {b}");
                off += usize::from(levels > 0.5);
            }
            values += want.data.len();
        }
        println!("standard_lineart as tensor operations: {off} of {values} values a level off");
        assert!(off * 100 < values, "{off} of {values} values a level off");
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
