//! `upscale` and the resampling it needs, with torch's `F.interpolate` arithmetic
//! (`align_corners = False`, no antialiasing).
//!
//! Params (Daydream's `UpscalePreprocessor`): `scale_factor` in [1, 4], default 2; `algorithm`
//! one of `bilinear` (default), `bicubic`, `lanczos`, `nearest`. Daydream's tensor path resizes
//! to ⌊size·scale_factor⌋ with that mode (`lanczos` falls back to bicubic there too).
//!
//! sdstream streams at a fixed size: a processor's output must be the stream's size (the
//! ControlNet's control image, the frame that is encoded, the frame handed back). So `upscale`
//! resamples up by the factor and then back to the input size with bilinear (what Daydream's
//! preprocessors do to a result of another size); its visible effect is that of the resampling
//! round trip. A larger output frame is not supported.

use candle_core::{DType, Tensor};

use super::param_reader::ParamReader;
use super::planes::Planes;
use crate::Result;

/// Resampling kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// torch `nearest`: source index ⌊dst·in/out⌋.
    Nearest,
    /// torch `bilinear`.
    Bilinear,
    /// torch `bicubic` (Keys, a = −0.75, border indices clamped).
    Bicubic,
}

/// `upscale` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpscaleParams {
    /// `scale_factor`.
    pub scale_factor: f64,
    /// `algorithm`, as the mode torch runs.
    pub mode: Resample,
}

impl UpscaleParams {
    /// Reads `scale_factor` and `algorithm`.
    pub fn read(r: &ParamReader<'_>) -> Result<Self> {
        let scale_factor = r.number("scale_factor", 2.0, 1.0..=4.0)?;
        let algorithm = r.choice(
            "algorithm",
            "bilinear",
            &["bilinear", "lanczos", "bicubic", "nearest"],
        )?;
        let mode = match algorithm {
            "nearest" => Resample::Nearest,
            "bilinear" => Resample::Bilinear,
            _ => Resample::Bicubic,
        };
        Ok(UpscaleParams { scale_factor, mode })
    }
}

/// Upsamples by the factor with the chosen mode, then back to the input size with bilinear.
pub fn apply(image: &Planes, p: UpscaleParams) -> Planes {
    let (up_h, up_w) = upscaled_size(image.height, image.width, p);
    let up = resize(image, up_h, up_w, p.mode);
    resize(&up, image.height, image.width, Resample::Bilinear)
}

/// [`apply`] as tensor operations on the image's own device (`[1, C, H, W]` in [0, 1], any
/// float dtype): what a GPU runs (unless `SDSTREAM_CUDA_PREPROCESS=0`). The host's arithmetic
/// step for step ([`resize_tensor`]), so the result is [`apply`]'s bit for bit. Returns
/// `[1, C, H, W]` f32.
pub fn apply_tensor(image: &Tensor, p: UpscaleParams) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    let (up_h, up_w) = upscaled_size(h, w, p);
    let up = resize_tensor(&image.to_dtype(DType::F32)?, up_h, up_w, p.mode)?;
    resize_tensor(&up, h, w, Resample::Bilinear)
}

/// ⌊side·scale_factor⌋ per side (at least 1).
fn upscaled_size(height: usize, width: usize, p: UpscaleParams) -> (usize, usize) {
    let scaled = |side: usize| (((side as f64) * p.scale_factor) as usize).max(1);
    (scaled(height), scaled(width))
}

/// [`resize`] as tensor operations on `x`'s device (`[N, C, H, W]` f32): per axis, columns
/// first, each output sums its taps in the host's order, one gather, one product and one sum
/// per tap (no fused multiply-add), so every value is [`resize`]'s bit for bit.
pub fn resize_tensor(
    x: &Tensor,
    height: usize,
    width: usize,
    mode: Resample,
) -> candle_core::Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    let columns = resample_axis(x, 3, &taps(iw, width, mode))?;
    resample_axis(&columns, 2, &taps(ih, height, mode))
}

/// `x` resampled along `dim` (2: rows, 3: columns) with one tap list per output index (every
/// list as long as the first, as [`taps`] makes them).
fn resample_axis(
    x: &Tensor,
    dim: usize,
    taps: &[Vec<(usize, f32)>],
) -> candle_core::Result<Tensor> {
    let outputs = taps.len();
    let per_output = taps.first().map_or(0, Vec::len);
    let mut weight_shape = [1usize; 4];
    weight_shape[dim] = outputs;
    let mut sum: Option<Tensor> = None;
    for k in 0..per_output {
        let index: Vec<u32> = taps.iter().map(|t| t[k].0 as u32).collect();
        let weight: Vec<f32> = taps.iter().map(|t| t[k].1).collect();
        let index = Tensor::from_vec(index, outputs, x.device())?;
        let weight = Tensor::from_vec(weight, weight_shape.as_slice(), x.device())?;
        let term = x.index_select(&index, dim)?.broadcast_mul(&weight)?;
        sum = Some(match sum {
            None => term,
            Some(s) => (s + term)?,
        });
    }
    sum.ok_or_else(|| candle_core::Error::Msg(format!("resampling to {outputs} has no taps")))
}

/// Resizes every channel to `height × width`, as `F.interpolate(size=(height, width), mode,
/// align_corners=False)` on a float32 tensor.
pub fn resize(image: &Planes, height: usize, width: usize, mode: Resample) -> Planes {
    let rows = taps(image.height, height, mode);
    let cols = taps(image.width, width, mode);
    let (ih, iw) = (image.height, image.width);
    let mut out = Planes::zeros(image.channels, height, width);
    let mut tmp = vec![0.0f32; ih * width];
    for (src, dst) in image
        .data
        .chunks_exact(ih * iw)
        .zip(out.data.chunks_exact_mut(height * width))
    {
        // Columns first, then rows: separable, as torch's kernels.
        for y in 0..ih {
            let row = &src[y * iw..(y + 1) * iw];
            for (x, tap) in cols.iter().enumerate() {
                tmp[y * width + x] = tap.iter().map(|&(i, wgt)| wgt * row[i]).sum();
            }
        }
        for (y, tap) in rows.iter().enumerate() {
            let o = &mut dst[y * width..(y + 1) * width];
            for &(i, wgt) in tap {
                for (v, &t) in o.iter_mut().zip(&tmp[i * width..(i + 1) * width]) {
                    *v += wgt * t;
                }
            }
        }
    }
    out
}

/// For each output index, the (source index, weight) pairs of one axis.
fn taps(input: usize, output: usize, mode: Resample) -> Vec<Vec<(usize, f32)>> {
    let scale = input as f32 / output as f32;
    let last = input - 1;
    (0..output)
        .map(|o| match mode {
            Resample::Nearest => {
                let i = if input == output {
                    o
                } else {
                    ((o as f32 * scale).floor() as usize).min(last)
                };
                vec![(i, 1.0)]
            }
            Resample::Bilinear => {
                let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (src as usize).min(last);
                let i1 = if i0 < last { i0 + 1 } else { i0 };
                let l1 = src - i0 as f32;
                vec![(i0, 1.0 - l1), (i1, l1)]
            }
            Resample::Bicubic => {
                let src = scale * (o as f32 + 0.5) - 0.5;
                let i = src.floor();
                let t = src - i;
                let i = i as isize;
                cubic_weights(t)
                    .iter()
                    .enumerate()
                    .map(|(k, &wgt)| {
                        let idx = (i - 1 + k as isize).clamp(0, last as isize) as usize;
                        (idx, wgt)
                    })
                    .collect()
            }
        })
        .collect()
}

/// Keys' cubic convolution weights (a = −0.75, torch's) for taps at −1, 0, 1, 2 from ⌊src⌋.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Values of a fixed sine hash in [0, 1] (the same sums every run).
    fn noise(channels: usize, height: usize, width: usize) -> Planes {
        let data = (0..channels * height * width)
            .map(super::super::planes::sine_hash)
            .collect();
        Planes {
            channels,
            height,
            width,
            data,
        }
    }

    #[test]
    fn resampling_as_tensor_operations_is_the_hosts_bit_for_bit() {
        let image = noise(3, 23, 37);
        let tensor = image.clone().into_tensor(&Device::Cpu).unwrap();
        let mut compared = 0;
        for mode in [Resample::Nearest, Resample::Bilinear, Resample::Bicubic] {
            // Up, down, one axis each way, to one pixel and to the same size.
            for (h, w) in [(46, 74), (11, 19), (50, 9), (1, 1), (23, 37)] {
                let want = resize(&image, h, w, mode);
                let got = resize_tensor(&tensor, h, w, mode).unwrap();
                let got = Planes::from_tensor(&got).unwrap();
                assert_eq!((got.height, got.width), (h, w));
                assert!(
                    got.data.iter().zip(&want.data).all(|(a, b)| a == b),
                    "{mode:?} to {h}×{w}"
                );
                compared += got.data.len();
            }
        }
        assert!(compared > 10_000, "{compared}");
        for (scale_factor, mode) in [(2.0, Resample::Bilinear), (1.5, Resample::Bicubic)] {
            let p = UpscaleParams { scale_factor, mode };
            let want = apply(&image, p);
            let got = Planes::from_tensor(&apply_tensor(&tensor, p).unwrap()).unwrap();
            assert_eq!(got, want, "upscale {p:?}");
            // A check that can fail: the round trip changed the image.
            assert!(got.data.iter().zip(&image.data).any(|(a, b)| a != b));
        }
    }
}
