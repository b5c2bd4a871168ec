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
//! With `anime_style`, Daydream's processor takes controlnet_aux's `LineartAnimeDetector`
//! instead ([`apply_anime`]): after the same two resizes,
//! 1. OpenCV's cubic resize to the next multiples of 256 (a copy when the sides are already);
//! 2. the U-Net ([`crate::model::lineart_anime`]) on `level / 127.5 − 1`;
//! 3. `127.5·line + 127.5`, OpenCV's cubic resize back to the detection size, clipped and
//!    truncated to 8 bits, inverted as above, and resized to the frame's size.
//!
//! Params: `detect_resolution` (integer, default 512), `coarse` (boolean, default true, as
//! Daydream's constructor sets it; the anime generator has one size only and ignores it),
//! `anime_style` (boolean, default false), `image_resolution` (accepted; the output is the
//! frame's size).

use candle_core::{DType, Tensor};

use super::annotator::{Rgb8, to_stream_size};
use super::cv_resize::{self, Interpolation};
use super::networks::NetworkRequest;
use super::param_reader::ParamReader;
use crate::model::lineart::LineartGenerator;
use crate::model::lineart_anime::LineartAnimeGenerator;
use crate::{Error, Result};

/// `lineart` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineartParams {
    /// The square side the lines are found at.
    pub detect_resolution: usize,
    /// The coarse generator instead of the fine one.
    pub coarse: bool,
    /// The anime generator (`netG.pth`) instead of either.
    pub anime_style: bool,
}

impl LineartParams {
    /// Reads `detect_resolution`, `coarse` and `anime_style`.
    pub fn read(r: &ParamReader<'_>) -> Result<Self> {
        r.integer("image_resolution", 512, 64..=4096)?;
        Ok(Self {
            detect_resolution: r.integer("detect_resolution", 512, 64..=4096)? as usize,
            coarse: r.boolean("coarse", true)?,
            anime_style: r.boolean("anime_style", false)?,
        })
    }

    /// The generator these settings run.
    pub fn network(&self) -> NetworkRequest {
        if self.anime_style {
            NetworkRequest::LINEART_ANIME
        } else if self.coarse {
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

/// The anime line drawing of `image` `[1, 3, H, W]` in [0, 1], as `[1, 3, H, W]` in [0, 1]
/// (controlnet_aux's `LineartAnimeDetector` as Daydream calls it; see the module docs).
pub fn apply_anime(
    net: &LineartAnimeGenerator,
    image: &Tensor,
    p: LineartParams,
) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    let d = p.detect_resolution;
    let detect = Rgb8::from_tensor(image)?
        .resize_pil_lanczos(d, d)
        .resize_image(d);
    let (dh, dw) = (detect.height, detect.width);
    // controlnet_aux rounds up to multiples of 256 whatever the network's depth; a checkpoint
    // with more levels needs more.
    let multiple = 256usize.max(net.size_multiple());
    let (nh, nw) = (
        dh.div_ceil(multiple) * multiple,
        dw.div_ceil(multiple) * multiple,
    );
    let fed = detect.resize_cv(nh, nw, Interpolation::Cubic);
    // `level / 127.5 − 1` on the host: torch divides, where a tensor's scalar division
    // multiplies by the reciprocal.
    let levels: Vec<f32> = fed.data.iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
    let input = Tensor::from_vec(levels, (nh, nw, 3), image.device())?
        .permute((2, 0, 1))?
        .unsqueeze(0)?;
    let line = net.forward(&input)?;
    let (_, channels, lh, lw) = line.dims4()?;
    if channels == 0 {
        return Err(Error::State(
            "the anime lineart generator makes maps with no channel".into(),
        ));
    }
    // controlnet_aux takes the first channel.
    let values = line
        .narrow(1, 0, 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let scaled: Vec<f32> = values.iter().map(|&v| v * 127.5 + 127.5).collect();
    let resized = cv_resize::resize_f32(&scaled, lh, lw, 1, dh, dw, Interpolation::Cubic);
    let inverted: Vec<u8> = resized
        .iter()
        .map(|&v| 255 - v.clamp(0.0, 255.0) as u8)
        .collect();
    let map = Rgb8::from_gray(&inverted, dh, dw).to_tensor(image.device())?;
    to_stream_size(&map, h, w)
}
