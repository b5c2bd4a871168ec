//! `temporal_net_tensorrt`: the control image of the TemporalNet2 ControlNets
//! (`daydreamlive/TemporalNet2-*`, 6 conditioning channels), as Daydream's
//! `TemporalNetTensorRTPreprocessor` computes it, on the engine's device:
//! 1. the previous and the current input frame (RGB in [0, 1]) resized to the flow's
//!    `height × width` (bilinear, align_corners false) and mapped to [−1, 1] (torchvision's
//!    optical-flow preset);
//! 2. the optical flow from the previous frame to the current one with RAFT-small
//!    ([`crate::model::raft`], torchvision's `raft_small` C_T_V2 weights), the *first* of its
//!    refinements: Daydream's TensorRT engine is exported from torchvision's model, whose output
//!    is the list of every refinement, and reads the output named `flow`, the list's first
//!    element (one refinement computes exactly that element, so sdstream runs one);
//! 3. times `flow_strength`, drawn with torchvision's `flow_to_image` (the Middlebury colour
//!    wheel; it normalises by the largest vector, so the strength changes nothing but 0, which
//!    gives white), as levels / 255, resized to the frame's size;
//! 4. `concat`: the previous frame's RGB, then the flow's RGB (6 channels); `warped_only`: the
//!    flow's RGB alone.
//!
//! The first frame (no previous one, or one of another size) gives the current frame and black
//! (`concat`) or black (`warped_only`), as Daydream does.
//!
//! Params: `height` and `width` (integers in [256, 1024], multiples of 8; default 512),
//! `flow_strength` (number in [0, 2], default 1), `output_format` (`"concat"`, default, or
//! `"warped_only"`), `engine_path` (Daydream's TensorRT engine: accepted, unused).

use candle_core::{DType, Tensor};

use super::flow_image::flow_tensor_to_rgb8;
use super::param_reader::ParamReader;
use crate::model::raft::Raft;
use crate::{Error, Result};

/// `temporal_net_tensorrt` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TemporalNetParams {
    /// Rows the flow is computed at.
    pub height: usize,
    /// Columns the flow is computed at.
    pub width: usize,
    /// Multiplies the flow before it is drawn.
    pub flow_strength: f64,
    /// The previous frame and the flow (6 channels), or the flow alone (3).
    pub concat: bool,
}

impl TemporalNetParams {
    /// Reads `height`, `width`, `flow_strength`, `output_format` (and checks `engine_path`).
    pub fn read(r: &ParamReader<'_>) -> Result<Self> {
        let side = |key: &str| -> Result<usize> {
            let v = r.integer(key, 512, 256..=1024)?;
            if v % 8 != 0 {
                return Err(r.error(
                    key,
                    format!("{v} is not a multiple of 8, which the flow network needs"),
                ));
            }
            Ok(v as usize)
        };
        r.string("engine_path")?;
        Ok(Self {
            height: side("height")?,
            width: side("width")?,
            flow_strength: r.number("flow_strength", 1.0, 0.0..=2.0)?,
            concat: r.choice("output_format", "concat", &["concat", "warped_only"])? == "concat",
        })
    }

    /// Channels of the control image.
    pub fn channels(&self) -> usize {
        if self.concat { 6 } else { 3 }
    }
}

/// The control image of `image` `[1, 3, H, W]` in [0, 1] after `previous` (the last input
/// frame), `[1, 6 or 3, H, W]` in [0, 1] (f32).
pub fn apply(
    net: &Raft,
    image: &Tensor,
    previous: Option<&Tensor>,
    p: TemporalNetParams,
) -> Result<Tensor> {
    let (_, channels, h, w) = image.dims4()?;
    if channels != 3 {
        return Err(Error::InvalidFrame(format!(
            "temporal_net_tensorrt takes an RGB image, got {channels} channels"
        )));
    }
    let image = image.to_dtype(DType::F32)?;
    let Some(previous) = previous.filter(|prev| prev.dims() == image.dims()) else {
        let black = image.zeros_like()?;
        return Ok(if p.concat {
            Tensor::cat(&[&image, &black], 1)?
        } else {
            black
        });
    };
    let previous = previous.to_dtype(DType::F32)?;
    let for_flow = |t: &Tensor| -> Result<Tensor> {
        let t = if (h, w) == (p.height, p.width) {
            t.clone()
        } else {
            t.upsample_bilinear2d(p.height, p.width, false)?
        };
        Ok(t.affine(2.0, -1.0)?)
    };
    let flows = net.forward(&for_flow(&previous)?, &for_flow(&image)?, 1)?;
    let flow = flows
        .into_iter()
        .next()
        .ok_or_else(|| Error::State("the flow network gave no flow".into()))?;
    let flow = if p.flow_strength == 1.0 {
        flow
    } else {
        (flow * p.flow_strength)?
    };
    let rgb = flow_tensor_to_rgb8(&flow)?;
    let drawn = (Tensor::from_vec(rgb, (1, 3, p.height, p.width), image.device())?
        .to_dtype(DType::F32)?
        / 255.0)?;
    let drawn = super::annotator::to_stream_size(&drawn, h, w)?;
    Ok(if p.concat {
        Tensor::cat(&[&previous, &drawn], 1)?
    } else {
        drawn
    })
}
