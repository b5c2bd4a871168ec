//! `hed`: Daydream's `HEDPreprocessor`, which calls controlnet_aux's `HEDdetector` with its
//! defaults (detect and image resolution 512; Daydream stores `safe` but does not pass it, so
//! the edges are not quantised), in this order on the frame's 8-bit levels:
//! 1. `resize_image(frame, 512)` ([`Rgb8::resize_image`]);
//! 2. the HED network on the raw levels (0..=255, RGB), five side outputs
//!    ([`crate::model::hed`]);
//! 3. each side output resized to the image with OpenCV's bilinear resize (f32);
//! 4. their mean (float32, summed as numpy does: the first, plus the sum of the rest), then
//!    `1 / (1 + exp(−mean))` in float64, times 255, clipped, truncated to 8 bits;
//! 5. back to the frame's size with PIL's Lanczos (Daydream's wrapper; controlnet_aux's own
//!    final resize is to the same size, a copy).
//!
//! Params: `safe` (boolean, default true) is accepted and, as in Daydream, has no effect.

use candle_core::{DType, Tensor};

use super::annotator::Rgb8;
use super::cv_resize::{self, Interpolation};
use super::param_reader::ParamReader;
use crate::Result;
use crate::model::hed::Hed;

/// controlnet_aux's default detect (and image) resolution, which Daydream does not change.
const DETECT_RESOLUTION: usize = 512;

/// `hed` settings (none changes the result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HedParams;

impl HedParams {
    /// Checks `safe` is a boolean.
    pub fn read(r: &ParamReader<'_>) -> Result<Self> {
        r.boolean("safe", true)?;
        Ok(Self)
    }
}

/// The soft edges of `image` `[1, 3, H, W]` in [0, 1], as `[1, 3, H, W]` in [0, 1].
pub fn apply(net: &Hed, image: &Tensor) -> Result<Tensor> {
    let frame = Rgb8::from_tensor(image)?;
    let detect = frame.resize_image(DETECT_RESOLUTION);
    let (h, w) = (detect.height, detect.width);
    let levels = detect.to_tensor(image.device())?.affine(255.0, 0.0)?;
    let sides = net.forward(&levels)?;
    let mut resized = Vec::with_capacity(sides.len());
    for side in &sides {
        let (_, _, sh, sw) = side.dims4()?;
        let values = side.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        resized.push(cv_resize::resize_f32(
            &values,
            sh,
            sw,
            1,
            h,
            w,
            Interpolation::Linear,
        ));
    }
    let count = resized.len() as f32;
    let edges: Vec<u8> = (0..h * w)
        .map(|i| {
            // numpy's reduction: the first value, then the rest summed from zero.
            let rest = resized[1..].iter().fold(0.0f32, |acc, side| acc + side[i]);
            let mean = (resized[0][i] + rest) / count;
            let edge = 1.0 / (1.0 + (-f64::from(mean)).exp());
            (edge * 255.0).clamp(0.0, 255.0) as u8
        })
        .collect();
    let map = Rgb8::from_gray(&edges, h, w).resize_pil_lanczos(frame.height, frame.width);
    map.to_tensor(image.device())
}
