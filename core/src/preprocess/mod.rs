//! Image processors: the ControlNet preprocessors that turn an input frame into a control image,
//! and the `image_preprocessing` / `image_postprocessing` chains applied to the frame itself.
//!
//! Every processor maps a `[1, 3, H, W]` f32 image in [0, 1] to a `[1, 3, H, W]` f32 image in
//! [0, 1] at the same size (docs/ALGORITHM.md §5). Names, params and defaults are Daydream's
//! (`streamdiffusion/preprocessing/processors/*.py`); each processor's module documents its own:
//!
//! | name | module | params (default) |
//! |---|---|---|
//! | `passthrough` | here | none: the image as is |
//! | `external` | here | none: the host's control image for this frame |
//! | `canny` | [`canny`] | `low_threshold` (100), `high_threshold` (200) |
//! | `soft_edge` | [`soft_edge`] | none |
//! | `feedback` | [`feedback`] | `feedback_strength` (0.5) |
//! | `blur` | [`filters`] | `blur_intensity` (2.0), `kernel_size` (15) |
//! | `sharpen` | [`filters`] | `sharpen_intensity` (1.5), `unsharp_radius` (1.0), `edge_enhancement` (0.5), `detail_boost` (0.3), `noise_reduction` (0.1), `multi_scale` (true) |
//! | `upscale` | [`upscale`] | `scale_factor` (2.0), `algorithm` ("bilinear") |
//!
//! Params are checked by type and by the ranges Daydream documents; keys a processor does not
//! read are ignored, as in Daydream. The model-based processors Daydream also has (depth, pose,
//! HED, lineart, mediapipe, TensorRT ones) are rejected by [`validate`] as not supported yet.
//!
//! The chains run in [0, 1]. Daydream hands `image_preprocessing` processors the [−1, 1] tensor
//! it encodes next, so there its zero-padded blur pads with mid-grey and sharpen's clamp to
//! [0, 1] drops the dark half; sdstream runs every processor on [0, 1] as their code assumes
//! (Daydream's `image_postprocessing` does too).

pub mod canny;
pub mod feedback;
pub mod filters;
pub mod param_reader;
pub mod planes;
pub mod resize;
pub mod soft_edge;
pub mod upscale;

use candle_core::Tensor;
use serde_json::{Map, Value};

use self::param_reader::ParamReader;
use self::planes::Planes;
use crate::params::ProcessingConfig;
use crate::params::catalog::IMAGE_PROCESSORS;
use crate::{Error, Result};

/// The image processors sdstream implements (the rest of Daydream's
/// [`IMAGE_PROCESSORS`] are rejected as not supported yet).
pub const SUPPORTED_PROCESSORS: &[&str] = &[
    "blur",
    "canny",
    "external",
    "feedback",
    "passthrough",
    "sharpen",
    "soft_edge",
    "upscale",
];

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

/// A processor with its params read and checked: the one place that maps a name and a params
/// object to what runs, shared by [`validate`] and [`apply`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Processor {
    /// `passthrough`.
    Passthrough,
    /// `external`.
    External,
    /// `canny`.
    Canny(canny::CannyParams),
    /// `soft_edge`.
    SoftEdge,
    /// `feedback`.
    Feedback(feedback::FeedbackParams),
    /// `blur`.
    Blur(filters::BlurParams),
    /// `sharpen`.
    Sharpen(filters::SharpenParams),
    /// `upscale`.
    Upscale(upscale::UpscaleParams),
}

impl Processor {
    /// Reads processor `name` with `params`. `name_field` is the path errors about the name use,
    /// `params_field` the path of the params object (its errors name `<params_field>.<key>`).
    pub fn parse(
        name: &str,
        params: &Map<String, Value>,
        name_field: &str,
        params_field: &str,
    ) -> Result<Self> {
        let r = ParamReader::new(params, params_field);
        Ok(match name {
            "passthrough" => Processor::Passthrough,
            "external" => Processor::External,
            "canny" => Processor::Canny(canny::CannyParams::read(&r)?),
            "soft_edge" => Processor::SoftEdge,
            "feedback" => Processor::Feedback(feedback::FeedbackParams::read(&r)?),
            "blur" => Processor::Blur(filters::BlurParams::read(&r)?),
            "sharpen" => Processor::Sharpen(filters::SharpenParams::read(&r)?),
            "upscale" => Processor::Upscale(upscale::UpscaleParams::read(&r)?),
            other if IMAGE_PROCESSORS.contains(&other) => {
                return Err(Error::param(
                    name_field,
                    format!("image processor {other:?} is not supported yet by sdstream"),
                ));
            }
            other => {
                return Err(Error::param(
                    name_field,
                    format!(
                        "unknown image processor {other:?}; expected one of {IMAGE_PROCESSORS:?}"
                    ),
                ));
            }
        })
    }

    /// Runs the processor on `image` (`[1, C, H, W]` in [0, 1]).
    pub fn run(&self, image: &Tensor, inputs: &ProcessorInputs<'_>) -> Result<Tensor> {
        if image.dims().contains(&0) {
            return Err(Error::InvalidFrame(format!(
                "an image processor got an empty image {:?}",
                image.dims()
            )));
        }
        let on_host = |f: &dyn Fn(&Planes) -> Planes| -> Result<Tensor> {
            f(&Planes::from_tensor(image)?).into_tensor(image.device())
        };
        match *self {
            Processor::Passthrough => Ok(image.clone()),
            Processor::External => external(image, inputs.external),
            Processor::Canny(p) => on_host(&|x| canny::apply(x, p)),
            Processor::SoftEdge => on_host(&soft_edge::apply),
            Processor::Feedback(p) => feedback::apply(image, inputs.previous_output, p),
            Processor::Blur(p) => on_host(&|x| filters::blur(x, p)),
            Processor::Sharpen(p) => on_host(&|x| filters::sharpen(x, p)),
            Processor::Upscale(p) => on_host(&|x| upscale::apply(x, p)),
        }
    }
}

/// `external`: the host's control image for this frame. An error when there is none (the
/// caller decides what "none yet" means) or when its shape differs from the frame's.
fn external(image: &Tensor, supplied: Option<&Tensor>) -> Result<Tensor> {
    let Some(supplied) = supplied else {
        return Err(Error::State(
            "image processor \"external\": no control image was supplied with this frame".into(),
        ));
    };
    if supplied.dims() != image.dims() {
        return Err(Error::InvalidFrame(format!(
            "external control image is {:?}; the frame is {:?}",
            supplied.dims(),
            image.dims()
        )));
    }
    Ok(supplied.clone())
}

/// Applies processor `name` with `params` to `image` (`[1, 3, H, W]` f32 in [0, 1]).
pub fn apply(
    name: &str,
    params: &Map<String, Value>,
    image: &Tensor,
    inputs: &ProcessorInputs<'_>,
) -> Result<Tensor> {
    Processor::parse(name, params, name, &format!("{name}.params"))?.run(image, inputs)
}

/// Checks that processor `name` is implemented and that `params` suit it; `field` is the
/// parameter path used in messages (`controlnets[1].preprocessor`); errors about a param name
/// `<field>.params.<key>`.
pub fn validate(name: &str, params: &Map<String, Value>, field: &str) -> Result<()> {
    Processor::parse(name, params, field, &format!("{field}.params")).map(|_| ())
}

/// Whether a chain would change anything: present, enabled, with an enabled processor.
pub fn chain_is_active(chain: Option<&ProcessingConfig>) -> bool {
    chain.is_some_and(|c| c.enabled && c.processors.iter().any(|p| p.enabled))
}

/// Validates every enabled processor of an active chain; `field` is the chain's path
/// (`image_preprocessing`), errors name `<field>.processors[i]` and `<field>.processors[i].params.<key>`.
pub fn validate_chain(chain: Option<&ProcessingConfig>, field: &str) -> Result<()> {
    let Some(chain) = chain.filter(|c| c.enabled) else {
        return Ok(());
    };
    for (i, p) in chain.processors.iter().enumerate() {
        if p.enabled {
            validate(&p.kind, &p.params, &format!("{field}.processors[{i}]"))?;
        }
    }
    Ok(())
}

/// Applies the enabled processors of an active chain in order (the image unchanged otherwise).
/// In a chain, `external` passes its input through when `inputs` has no external image, as
/// Daydream's `ExternalPreprocessor` returns the tensor it is given (the host's frame is then the
/// externally prepared image).
pub fn apply_chain(
    chain: Option<&ProcessingConfig>,
    image: &Tensor,
    inputs: &ProcessorInputs<'_>,
) -> Result<Tensor> {
    let mut x = image.clone();
    if let Some(chain) = chain.filter(|c| c.enabled) {
        for p in chain.processors.iter().filter(|p| p.enabled) {
            let params_field = format!("{}.params", p.kind);
            let processor = Processor::parse(&p.kind, &p.params, &p.kind, &params_field)?;
            if processor == Processor::External && inputs.external.is_none() {
                continue;
            }
            x = processor.run(&x, inputs)?;
        }
    }
    Ok(x)
}
