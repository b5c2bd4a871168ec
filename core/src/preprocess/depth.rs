//! `depth_tensorrt` and `depth`: a depth map with Depth Anything V2 Small
//! ([`crate::model::depth_anything`], `depth-anything/Depth-Anything-V2-Small-hf`), as Daydream's
//! `DepthAnythingTensorrtPreprocessor` computes it on its tensor path, on the engine's device:
//! 1. the frame (RGB in [0, 1], not normalised: Daydream's exported network has no ImageNet
//!    normalisation in it) squashed to `detect_resolution`² with bilinear interpolation
//!    (align_corners false);
//! 2. the network's relative inverse depth (near is bright);
//! 3. min–max normalised to [0, 1] (a flat map, where Daydream divides by zero, gives zeros);
//! 4. copied to three channels and resized to the frame's size (bilinear, align_corners false).
//!
//! Daydream's `depth` runs a different network (transformers' `Intel/dpt-large` pipeline):
//! sdstream runs Depth Anything for it too, the same way, and refuses a `model_name` naming
//! another model rather than substitute it silently.
//!
//! Params: `detect_resolution` (integer, a multiple of the network's patch size 14; default
//! 518, Daydream's); `engine_path` and `image_resolution` name Daydream's TensorRT engine and
//! output size: accepted, unused (sdstream runs the network itself, and the output has the
//! frame's size); `model_name` (`depth` only) must be the Depth Anything checkpoint if given.

use candle_core::{DType, Tensor};

use super::networks::NetworkRequest;
use super::param_reader::ParamReader;
use crate::model::depth_anything::DepthAnything;
use crate::{Error, Result};

/// The patch size every Depth Anything checkpoint uses: sides must be multiples of it.
const PATCH: i64 = 14;

/// `depth` / `depth_tensorrt` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthParams {
    /// The square side the network sees.
    pub detect_resolution: usize,
}

impl DepthParams {
    /// Reads `detect_resolution` (and checks the unused keys' types; `model_name`, which only
    /// `depth` has, when `named_model` is set).
    pub fn read(r: &ParamReader<'_>, named_model: bool) -> Result<Self> {
        let detect = r.integer("detect_resolution", 518, PATCH..=2016)?;
        if detect % PATCH != 0 {
            return Err(r.error(
                "detect_resolution",
                format!(
                    "{detect} is not a multiple of {PATCH}, Depth Anything's patch size (518, \
                     Daydream's, is 37 × 14)"
                ),
            ));
        }
        r.integer("image_resolution", 512, 64..=4096)?;
        r.string("engine_path")?;
        if named_model
            && let Some(name) = r.string("model_name")?
            && name != NetworkRequest::DEPTH_ANYTHING_V2_SMALL.repo
        {
            return Err(r.error(
                "model_name",
                format!(
                    "{name:?}: sdstream's depth runs {} only (Daydream's default \
                     Intel/dpt-large is not available)",
                    NetworkRequest::DEPTH_ANYTHING_V2_SMALL.repo
                ),
            ));
        }
        Ok(Self {
            detect_resolution: detect as usize,
        })
    }
}

/// The depth map of `image` `[1, 3, H, W]` in [0, 1], as `[1, 3, H, W]` in [0, 1] (f32).
pub fn apply(net: &DepthAnything, image: &Tensor, p: DepthParams) -> Result<Tensor> {
    let (_, channels, h, w) = image.dims4()?;
    if channels != 3 {
        return Err(Error::InvalidFrame(format!(
            "depth takes an RGB image, got {channels} channels"
        )));
    }
    let d = p.detect_resolution;
    let x = image.to_dtype(DType::F32)?;
    let x = if (h, w) == (d, d) {
        x
    } else {
        x.upsample_bilinear2d(d, d, false)?
    };
    let depth = net
        .forward(&x.to_dtype(net.dtype())?)?
        .to_dtype(DType::F32)?;
    let (min, max) = (depth.min_all()?, depth.max_all()?);
    let range = (&max - &min)?;
    let normalised = if range.to_scalar::<f32>()? > 0.0 {
        depth.broadcast_sub(&min)?.broadcast_div(&range)?
    } else {
        depth.zeros_like()?
    };
    let map = normalised.unsqueeze(1)?.repeat((1, 3, 1, 1))?;
    super::annotator::to_stream_size(&map, h, w)
}
