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
//! Daydream's `depth` runs transformers' depth-estimation pipeline with `model_name`
//! (`Intel/dpt-large` by default), and so does sdstream's ([`apply_dpt`], [`crate::model::dpt`]):
//! 1. the frame squashed to `detect_resolution`² (512) with bilinear interpolation
//!    (align_corners false), to 8-bit levels (sdstream rounds where Daydream truncates);
//! 2. the checkpoint's `DPTImageProcessor` (PIL's resize to 384², `/255`, mean and deviation
//!    0.5) and the network's `predicted_depth`;
//! 3. the pipeline's post-processing: bicubic (align_corners false) back to
//!    `detect_resolution`², min–max to [0, 1] in f32, `255·x` truncated to 8 bits;
//! 4. Daydream's min–max of those levels to [0, 1] (a flat map gives zeros), three channels,
//!    resized to the frame's size (bilinear).
//!
//! `model_name` may also name Depth Anything V2 Small, which `depth` then runs as
//! `depth_tensorrt` does (default detect side 518).
//!
//! Params: `detect_resolution` (integer; Depth Anything: a multiple of its patch size 14, default
//! 518, Daydream's; DPT: 64 to 2048, default 512, Daydream's); `engine_path` and
//! `image_resolution` name Daydream's TensorRT engine and output size: accepted, unused
//! (sdstream runs the network itself, and the output has the frame's size); `model_name`
//! (`depth` only): `Intel/dpt-large` (default) or `depth-anything/Depth-Anything-V2-Small-hf`.

use candle_core::{DType, Tensor};

use super::annotator::{Rgb8, to_stream_size};
use super::networks::NetworkRequest;
use super::param_reader::ParamReader;
use super::upscale::{Resample, resize_tensor};
use crate::model::depth_anything::DepthAnything;
use crate::model::dpt::DptDepth;
use crate::{Error, Result};

/// The patch size every Depth Anything checkpoint uses: sides must be multiples of it.
const PATCH: i64 = 14;

/// The network a depth processor runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepthModel {
    /// Depth Anything V2 Small (`depth_tensorrt`, or `depth` naming it).
    DepthAnything,
    /// `Intel/dpt-large` through transformers' pipeline (`depth`'s default).
    Dpt,
}

/// `depth` / `depth_tensorrt` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepthParams {
    /// The square side the frame is squashed to.
    pub detect_resolution: usize,
    /// The network.
    pub model: DepthModel,
}

impl DepthParams {
    /// Reads `detect_resolution` (and checks the unused keys' types; `model_name`, which only
    /// `depth` has, when `named_model` is set).
    pub fn read(r: &ParamReader<'_>, named_model: bool) -> Result<Self> {
        r.integer("image_resolution", 512, 64..=4096)?;
        r.string("engine_path")?;
        let model = if named_model {
            let dpt = NetworkRequest::DPT_LARGE.repo;
            let anything = NetworkRequest::DEPTH_ANYTHING_V2_SMALL.repo;
            match r.string("model_name")? {
                None => DepthModel::Dpt,
                Some(name) if name == dpt => DepthModel::Dpt,
                Some(name) if name == anything => DepthModel::DepthAnything,
                Some(name) => {
                    return Err(r.error(
                        "model_name",
                        format!("{name:?}: sdstream's depth runs {dpt} or {anything}"),
                    ));
                }
            }
        } else {
            DepthModel::DepthAnything
        };
        if model == DepthModel::Dpt {
            return Ok(Self {
                detect_resolution: r.integer("detect_resolution", 512, 64..=2048)? as usize,
                model,
            });
        }
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
        Ok(Self {
            detect_resolution: detect as usize,
            model,
        })
    }

    /// The network these settings run.
    pub fn network(&self) -> NetworkRequest {
        match self.model {
            DepthModel::DepthAnything => NetworkRequest::DEPTH_ANYTHING_V2_SMALL,
            DepthModel::Dpt => NetworkRequest::DPT_LARGE,
        }
    }
}

/// An RGB `image` `[1, 3, H, W]` squashed to `d × d` (bilinear, align_corners false), f32.
fn squashed(image: &Tensor, d: usize) -> Result<Tensor> {
    let (_, channels, h, w) = image.dims4()?;
    if channels != 3 {
        return Err(Error::InvalidFrame(format!(
            "depth takes an RGB image, got {channels} channels"
        )));
    }
    let x = image.to_dtype(DType::F32)?;
    Ok(if (h, w) == (d, d) {
        x
    } else {
        x.upsample_bilinear2d(d, d, false)?
    })
}

/// `depth` with DPT (module docs): the depth map of `image` `[1, 3, H, W]` in [0, 1], as
/// `[1, 3, H, W]` in [0, 1] (f32).
pub fn apply_dpt(net: &DptDepth, image: &Tensor, p: DepthParams) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    let d = p.detect_resolution;
    let levels = Rgb8::from_tensor(&squashed(image, d)?)?;
    let pixels = net
        .processor
        .pixel_values(&levels.data, d, d, image.device())?;
    let predicted = net
        .net
        .forward(&pixels.to_dtype(net.net.dtype())?)?
        .to_dtype(DType::F32)?;
    // The pipeline's post-processing: bicubic to the picture's size, min–max, 8 bits.
    let depth = resize_tensor(&predicted.unsqueeze(1)?, d, d, Resample::Bicubic)?;
    let values = depth.flatten_all()?.to_vec1::<f32>()?;
    let (min, max) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = max - min;
    let eight_bit: Vec<u8> = values
        .iter()
        // numpy's float → uint8 cast truncates; a flat map (0/0) gives 0 on x86.
        .map(|&v| {
            let unit = (v - min) / range;
            if unit.is_nan() {
                0
            } else {
                (unit * 255.0) as u8
            }
        })
        .collect();
    // Daydream's min–max of the levels.
    let (lo, hi) = eight_bit
        .iter()
        .fold((u8::MAX, u8::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let map: Vec<f32> = if hi > lo {
        let span = f32::from(hi - lo);
        eight_bit
            .iter()
            .map(|&v| (f32::from(v) - f32::from(lo)) / span)
            .collect()
    } else {
        vec![0.0; eight_bit.len()]
    };
    let plane = Tensor::from_vec(map, (1, 1, d, d), image.device())?;
    to_stream_size(&plane.repeat((1, 3, 1, 1))?, h, w)
}

/// The depth map of `image` `[1, 3, H, W]` in [0, 1], as `[1, 3, H, W]` in [0, 1] (f32).
pub fn apply(net: &DepthAnything, image: &Tensor, p: DepthParams) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    let d = p.detect_resolution;
    let x = squashed(image, d)?;
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
