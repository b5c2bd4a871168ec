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
    if previous.dims() != image.dims() {
        return Err(Error::InvalidFrame(format!(
            "feedback: the previous output is {:?} but the image is {:?}",
            previous.dims(),
            image.dims()
        )));
    }
    let k = p.feedback_strength;
    let previous = previous.to_dtype(image.dtype())?;
    Ok(((image * (1.0 - k))? + (previous * k)?)?)
}
