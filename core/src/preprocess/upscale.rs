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
    let up_h = ((image.height as f64) * p.scale_factor) as usize;
    let up_w = ((image.width as f64) * p.scale_factor) as usize;
    let up = resize(image, up_h.max(1), up_w.max(1), p.mode);
    resize(&up, image.height, image.width, Resample::Bilinear)
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
