//! Image processors: the ControlNet preprocessors that turn an input frame into a control image,
//! and the `image_preprocessing` / `image_postprocessing` chains applied to the frame itself.
//!
//! Every processor maps a `[1, 3, H, W]` f32 image in [0, 1] to a `[1, 3, H, W]` f32 image in
//! [0, 1] at the same size (ALGORITHM.md §5).

use candle_core::Tensor;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// What a processor may read besides the image it transforms.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessorInputs<'a> {
    /// The stream's previous output `[1, 3, H, W]` in [0, 1] (`feedback`); `None` before the
    /// first output.
    pub previous_output: Option<&'a Tensor>,
    /// The control image the host supplied with this frame (`external`), `[1, 3, H, W]` in
    /// [0, 1] at the stream's size.
    pub external: Option<&'a Tensor>,
}

/// Applies processor `name` with `params` to `image` (`[1, 3, H, W]` f32 in [0, 1]).
pub fn apply(
    name: &str,
    params: &Map<String, Value>,
    image: &Tensor,
    inputs: &ProcessorInputs<'_>,
) -> Result<Tensor> {
    let _ = (params, inputs);
    match name {
        "passthrough" => Ok(image.clone()),
        other => Err(Error::State(format!(
            "image processor {other:?} is not implemented"
        ))),
    }
}

/// Checks that processor `name` is implemented and that `params` suit it; `field` is the
/// parameter path used in messages (`controlnets[1].preprocessor`).
pub fn validate(name: &str, params: &Map<String, Value>, field: &str) -> Result<()> {
    let _ = params;
    match name {
        "passthrough" => Ok(()),
        other => Err(Error::param(
            field,
            format!("image processor {other:?} is not supported yet by sdstream"),
        )),
    }
}
