//! `feedback`: Daydream's `FeedbackPreprocessor`, the blend
//! (1 − k)·input + k·previous output, with k = `feedback_strength` in [0, 1] (default 0.5).
//!
//! Without a previous output (the first frame) it returns the input. Daydream blends in the
//! range its chain works in ([−1, 1] in `image_preprocessing`, [0, 1] for ControlNets); the blend
//! is affine, so blending in [0, 1] gives the same picture.

use candle_core::Tensor;

use super::param_reader::ParamReader;
use crate::{Error, Result};

/// `feedback` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeedbackParams {
    /// `feedback_strength`: weight of the previous output.
    pub feedback_strength: f64,
}

impl FeedbackParams {
    /// Reads `feedback_strength`.
    pub fn read(r: &ParamReader<'_>) -> Result<Self> {
        Ok(FeedbackParams {
            feedback_strength: r.number("feedback_strength", 0.5, 0.0..=1.0)?,
        })
    }
}

/// (1 − k)·image + k·previous, or `image` when there is no previous output.
pub fn apply(image: &Tensor, previous: Option<&Tensor>, p: FeedbackParams) -> Result<Tensor> {
    let Some(previous) = previous else {
        return Ok(image.clone());
    };
    let (&[1, c, h, w], &[1, pc, ..]) = (image.dims(), previous.dims()) else {
        return Err(Error::InvalidFrame(format!(
            "feedback: the image is {:?} and the previous output {:?}; expected [1, C, H, W]",
            image.dims(),
            previous.dims()
        )));
    };
    if c != pc {
        return Err(Error::InvalidFrame(format!(
            "feedback: the previous output has {pc} channels, the image {c}"
        )));
    }
    let k = p.feedback_strength;
    let previous = previous.to_dtype(image.dtype())?;
    // An upscaling postprocessor makes outputs larger than the frames: blend at the frame's
    // size (torch's bilinear resize).
    let previous = if previous.dims() == image.dims() {
        previous
    } else if crate::model::kernels::preprocess_on_device(image.device()) {
        // Where the frame is, with the host's arithmetic step for step (bit for bit).
        let previous = previous.to_dtype(candle_core::DType::F32)?;
        super::upscale::resize_tensor(&previous, h, w, super::upscale::Resample::Bilinear)?
            .to_dtype(image.dtype())?
    } else {
        let planes = super::planes::Planes::from_tensor(&previous)?;
        super::upscale::resize(&planes, h, w, super::upscale::Resample::Bilinear)
            .into_tensor(image.device())?
            .to_dtype(image.dtype())?
    };
    Ok(((image * (1.0 - k))? + (previous * k)?)?)
}
