//! `lineart`: Daydream's `LineartPreprocessor`, which calls controlnet_aux's `LineartDetector`,
//! in this order on the frame's 8-bit levels:
//! 1. PIL's Lanczos resize to `detect_resolution`² (the frame is squashed to a square);
//! 2. `resize_image(image, detect_resolution)` ([`Rgb8::resize_image`]: a copy for multiples of
//!    64);
//! 3. the generator ([`crate::model::lineart`]) on the levels / 255, the coarse `sk_model2` when
//!    `coarse` is set, else the fine `sk_model`;
//! 4. `255·line` clipped and truncated to 8 bits (OpenCV's final resize is to the same size),
//!    inverted (`255 − map`: white lines on black);
//! 5. Daydream's tensor path resizes it to the frame's size (bilinear, align_corners false).
//!
//! Params: `detect_resolution` (integer, default 512), `coarse` (boolean, default true, as
//! Daydream's constructor sets it), `anime_style` (boolean, default false; the anime generator
//! is not supported yet, and `true` is refused), `image_resolution` (accepted; the output is
//! the frame's size).

use candle_core::{DType, Tensor};

use super::annotator::{Rgb8, to_stream_size};
use super::networks::NetworkRequest;
use super::param_reader::ParamReader;
use crate::model::lineart::LineartGenerator;
use crate::{Error, Result};

/// `lineart` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineartParams {
    /// The square side the lines are found at.
    pub detect_resolution: usize,
    /// The coarse generator instead of the fine one.
    pub coarse: bool,
}

impl LineartParams {
    /// Reads `detect_resolution`, `coarse` and `anime_style` (refused when true).
    pub fn read(r: &ParamReader<'_>) -> Result<Self> {
        if r.boolean("anime_style", false)? {
            return Err(r.error(
                "anime_style",
                "the anime lineart generator (controlnet_aux's LineartAnimeDetector, netG.pth) \
                 is not supported yet by sdstream; use anime_style false or standard_lineart"
                    .into(),
            ));
        }
        r.integer("image_resolution", 512, 64..=4096)?;
        Ok(Self {
            detect_resolution: r.integer("detect_resolution", 512, 64..=4096)? as usize,
            coarse: r.boolean("coarse", true)?,
        })
    }

    /// The generator these settings run.
    pub fn network(&self) -> NetworkRequest {
        if self.coarse {
            NetworkRequest::LINEART_COARSE
        } else {
            NetworkRequest::LINEART_FINE
        }
    }
}

/// The line drawing of `image` `[1, 3, H, W]` in [0, 1], as `[1, 3, H, W]` in [0, 1].
pub fn apply(net: &LineartGenerator, image: &Tensor, p: LineartParams) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    let d = p.detect_resolution;
    let detect = Rgb8::from_tensor(image)?
        .resize_pil_lanczos(d, d)
        .resize_image(d);
    let line = net.forward(&detect.to_tensor(image.device())?)?;
    let (_, channels, lh, lw) = line.dims4()?;
    if channels != 1 {
        return Err(Error::State(format!(
            "the lineart generator makes {channels}-channel maps; lineart needs one"
        )));
    }
    let values = line.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let inverted: Vec<u8> = values
        .iter()
        .map(|&v| 255 - (v * 255.0).clamp(0.0, 255.0) as u8)
        .collect();
    let map = Rgb8::from_gray(&inverted, lh, lw).to_tensor(image.device())?;
    to_stream_size(&map, h, w)
}
