//! `realesrgan_trt`: Daydream's `RealESRGANProcessor`, an image postprocessor that upscales the
//! stream's output ×2 with Real-ESRGAN (`RealESRGAN_x2.pth` of `ai-forever/Real-ESRGAN`, the
//! RRDB network of [`crate::model::rrdbnet`]) and clamps the result to [0, 1].
//!
//! The output is twice the input's size, so it belongs in `image_postprocessing` only: the
//! stream's output frames are then twice the stream's size ([`super::output_size`]).
//! Daydream runs the network through TensorRT when it can and through spandrel's PyTorch model
//! otherwise, with the same weights; sdstream runs it on the engine's device and dtype.
//!
//! Params: `enable_tensorrt` and `force_rebuild` (booleans, default true and false) choose and
//! rebuild Daydream's TensorRT engine; they are accepted and have no effect here, since the
//! network computes the same picture either way.

use candle_core::Tensor;

use super::param_reader::ParamReader;
use crate::model::rrdbnet::RrdbNet;
use crate::{Error, Result};

/// How many times larger the picture comes out.
pub const SCALE: usize = 2;

/// `realesrgan_trt` settings (none changes the result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealEsrganParams;

impl RealEsrganParams {
    /// Checks `enable_tensorrt` and `force_rebuild` are booleans.
    pub fn read(r: &ParamReader<'_>) -> Result<Self> {
        r.boolean("enable_tensorrt", true)?;
        r.boolean("force_rebuild", false)?;
        Ok(Self)
    }
}

/// Upscales `image` `[1, 3, H, W]` in [0, 1] to `[1, 3, 2H, 2W]` in [0, 1] (f32).
pub fn apply(net: &RrdbNet, image: &Tensor) -> Result<Tensor> {
    if net.config().scale != SCALE {
        return Err(Error::State(format!(
            "realesrgan_trt upscales ×{SCALE}, but its weights are a ×{} network",
            net.config().scale
        )));
    }
    Ok(net
        .forward(image)?
        .to_dtype(candle_core::DType::F32)?
        .clamp(0.0, 1.0)?)
}
