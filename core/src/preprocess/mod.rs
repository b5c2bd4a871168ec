//! Image processors: the ControlNet preprocessors that turn an input frame into a control image,
//! and the `image_preprocessing` / `image_postprocessing` chains applied to the frame itself.
//!
//! Every processor maps a `[1, 3, H, W]` f32 image in [0, 1] to a `[1, C, H, W]` f32 image in
//! [0, 1] at the same size (docs/ALGORITHM.md §5): C = 3, but for `temporal_net_tensorrt`'s
//! six channels, and `realesrgan_trt` doubles the size. Names, params and defaults are
//! Daydream's (`streamdiffusion/preprocessing/processors/*.py`); each processor's module
//! documents its own:
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
//! | `standard_lineart` | [`standard_lineart`] | `detect_resolution` (512), `gaussian_sigma` (6.0), `intensity_threshold` (8) |
//! | `hed` | [`hed`] | `safe` (true; no effect, as in Daydream) |
//! | `lineart` | [`lineart`] | `detect_resolution` (512), `coarse` (true), `anime_style` (false) |
//! | `depth_tensorrt`, `depth` | [`depth`] | `detect_resolution` (518; `depth` with DPT: 512), `model_name` (`depth` only: `Intel/dpt-large`, the default, or Depth Anything V2 Small) |
//! | `pose_tensorrt`, `openpose` | [`pose`] | `detect_resolution` (512), `include_hands`/`include_face` (false only), `confidence_threshold` (0.5; no effect) |
//! | `temporal_net_tensorrt` | [`temporal_net`] | `height`/`width` (512), `flow_strength` (1.0), `output_format` ("concat") |
//! | `realesrgan_trt` | [`realesrgan`] | `enable_tensorrt`, `force_rebuild` (no effect) |
//!
//! The model-based processors run networks ([`networks`]: which weights, where they are found,
//! one loaded copy per file, device and dtype for the process) handed to them in
//! [`ProcessorInputs::networks`]; [`standalone::ImageProcessor`] runs one processor on its own.
//! Params are checked by type and by the ranges Daydream documents; keys a processor does not
//! read are ignored, as in Daydream (`engine_path`, `image_resolution` and the like travel
//! along). The MediaPipe processors are refused naming what to use instead.
//!
//! The chains run in [0, 1]. Daydream hands `image_preprocessing` processors the [−1, 1] tensor
//! it encodes next, so there its zero-padded blur pads with mid-grey and sharpen's clamp to
//! [0, 1] drops the dark half; sdstream runs every processor on [0, 1] as their code assumes
//! (Daydream's `image_postprocessing` does too).

pub mod annotator;
pub mod canny;
pub mod cv_draw;
pub mod cv_resize;
pub mod depth;
pub mod feedback;
pub mod filters;
pub mod flow_image;
pub mod hand_face;
pub mod hed;
pub mod latent;
pub mod lineart;
pub mod networks;
pub mod openpose;
pub mod param_reader;
pub mod planes;
pub mod pose;
pub mod realesrgan;
/// The resampling the networks share (models' `resize`).
pub use sdstream_models::resize;
pub mod soft_edge;
pub mod standalone;
pub mod standard_lineart;
pub mod temporal_net;
pub mod upscale;

use std::time::Instant;

use candle_core::Tensor;
use serde_json::{Map, Value};

use self::networks::{Network, NetworkRequest, ProcessorNetworks};
use self::param_reader::ParamReader;
use self::planes::Planes;
use crate::params::catalog::IMAGE_PROCESSORS;
use crate::params::{ProcessingConfig, StreamDiffusionParams};
use crate::{Error, Result};

/// The image processors sdstream implements (the rest of Daydream's [`IMAGE_PROCESSORS`], the
/// MediaPipe ones, are refused with what to use instead).
pub const SUPPORTED_PROCESSORS: &[&str] = &[
    "blur",
    "canny",
    "depth",
    "depth_tensorrt",
    "external",
    "feedback",
    "hed",
    "lineart",
    "openpose",
    "passthrough",
    "pose_tensorrt",
    "realesrgan_trt",
    "sharpen",
    "soft_edge",
    "standard_lineart",
    "temporal_net_tensorrt",
    "upscale",
];

/// What a processor may read besides the image it transforms.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessorInputs<'a> {
    /// The stream's previous output `[1, 3, H, W]` in [0, 1] (`feedback`); `None` before the
    /// first output.
    pub previous_output: Option<&'a Tensor>,
    /// The previous input frame `[1, 3, H, W]` in [0, 1] (the temporal processors); `None`
    /// on the first frame.
    pub previous_input: Option<&'a Tensor>,
    /// The control image the host supplied with this frame (`external`), `[1, 3, H, W]` in
    /// [0, 1] at the stream's size.
    pub external: Option<&'a Tensor>,
    /// The networks of the model-based processors (see [`Processor::network`]).
    pub networks: Option<&'a ProcessorNetworks>,
}

/// The report types the processors fill (the time each took), kept with the rest of the
/// status report.
pub use crate::status::{ProcessorTimes, SAFETY_CHECKER};

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
    /// `standard_lineart`.
    StandardLineart(standard_lineart::StandardLineartParams),
    /// `realesrgan_trt`.
    RealEsrgan(realesrgan::RealEsrganParams),
    /// `hed`.
    Hed(hed::HedParams),
    /// `lineart`.
    Lineart(lineart::LineartParams),
    /// `depth` and `depth_tensorrt`.
    Depth(depth::DepthParams),
    /// `openpose` and `pose_tensorrt`.
    Pose(pose::PoseParams),
    /// `temporal_net_tensorrt`.
    TemporalNet(temporal_net::TemporalNetParams),
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
            "standard_lineart" => {
                Processor::StandardLineart(standard_lineart::StandardLineartParams::read(&r)?)
            }
            "realesrgan_trt" => Processor::RealEsrgan(realesrgan::RealEsrganParams::read(&r)?),
            "hed" => Processor::Hed(hed::HedParams::read(&r)?),
            "lineart" => Processor::Lineart(lineart::LineartParams::read(&r)?),
            "depth" => Processor::Depth(depth::DepthParams::read(&r, true)?),
            "depth_tensorrt" => Processor::Depth(depth::DepthParams::read(&r, false)?),
            "openpose" => Processor::Pose(pose::PoseParams::read(&r, false)?),
            "pose_tensorrt" => Processor::Pose(pose::PoseParams::read(&r, true)?),
            "temporal_net_tensorrt" => {
                Processor::TemporalNet(temporal_net::TemporalNetParams::read(&r)?)
            }
            "mediapipe_pose" => {
                return Err(Error::param(
                    name_field,
                    "image processor \"mediapipe_pose\" is not available in sdstream: it runs \
                     Google's MediaPipe BlazePose and hand models, which sdstream does not \
                     carry; use \"openpose\" (the OpenPose body network, drawn as the OpenPose \
                     skeleton that pose ControlNets were trained on) instead",
                ));
            }
            "mediapipe_segmentation" => {
                return Err(Error::param(
                    name_field,
                    "image processor \"mediapipe_segmentation\" is not available in sdstream: \
                     it runs MediaPipe's selfie-segmentation model, which sdstream does not \
                     carry, and no other processor segments people; make the mask in the host \
                     and hand it in with the \"external\" processor",
                ));
            }
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

    /// The networks the processor runs (none for a pixel processor).
    pub fn networks(&self) -> Vec<NetworkRequest> {
        let one = match self {
            Processor::Passthrough
            | Processor::External
            | Processor::Canny(_)
            | Processor::SoftEdge
            | Processor::Feedback(_)
            | Processor::Blur(_)
            | Processor::Sharpen(_)
            | Processor::Upscale(_)
            | Processor::StandardLineart(_) => None,
            Processor::RealEsrgan(_) => Some(NetworkRequest::REAL_ESRGAN_X2),
            Processor::Hed(_) => Some(NetworkRequest::HED),
            Processor::Lineart(p) => Some(p.network()),
            Processor::Depth(p) => Some(p.network()),
            Processor::Pose(p) => return p.networks(),
            Processor::TemporalNet(_) => Some(NetworkRequest::RAFT_SMALL),
        };
        one.into_iter().collect()
    }

    /// Whether the processor's image depends only on its frame (and the previous input), so
    /// that it can be made ahead of the frame's diffusion: not `external` (the host's image) nor
    /// `feedback` (the previous output).
    pub fn runs_ahead(&self) -> bool {
        !matches!(self, Processor::External | Processor::Feedback(_))
    }

    /// How many times larger than its input the processor's image is (1 but for upscalers).
    pub fn output_scale(&self) -> usize {
        match self {
            Processor::RealEsrgan(_) => realesrgan::SCALE,
            _ => 1,
        }
    }

    /// Channels of the image the processor makes (3: RGB; 6 for `temporal_net_tensorrt`'s
    /// `concat`).
    pub fn output_channels(&self) -> usize {
        match self {
            Processor::TemporalNet(p) => p.channels(),
            _ => 3,
        }
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
        let on_device = crate::model::kernels::preprocess_on_device(image.device());
        match *self {
            Processor::Passthrough => Ok(image.clone()),
            Processor::External => external(image, inputs.external),
            // On a CUDA device (unless SDSTREAM_CUDA_PREPROCESS=0): the same detector where the
            // frame is (kernels' canny.cu, bit for bit the host's), as f32 planes like the
            // host's.
            Processor::Canny(p) if on_device => {
                Ok(
                    crate::model::kernels::canny::canny(image, p.low_threshold, p.high_threshold)?
                        .to_dtype(candle_core::DType::F32)?,
                )
            }
            Processor::Canny(p) => on_host(&|x| canny::apply(x, p)),
            // On a CUDA device (unless SDSTREAM_CUDA_PREPROCESS=0) the float processors run their
            // steps as tensor operations where the frame is.
            Processor::SoftEdge if on_device => Ok(soft_edge::apply_tensor(image)?),
            Processor::SoftEdge => on_host(&soft_edge::apply),
            Processor::Feedback(p) => feedback::apply(image, inputs.previous_output, p),
            Processor::Blur(p) if on_device => Ok(filters::blur_tensor(image, p)?),
            Processor::Blur(p) => on_host(&|x| filters::blur(x, p)),
            Processor::Sharpen(p) if on_device => Ok(filters::sharpen_tensor(image, p)?),
            Processor::Sharpen(p) => on_host(&|x| filters::sharpen(x, p)),
            Processor::Upscale(p) if on_device => Ok(upscale::apply_tensor(image, p)?),
            Processor::Upscale(p) => on_host(&|x| upscale::apply(x, p)),
            Processor::StandardLineart(p) => {
                let (_, _, h, w) = image.dims4()?;
                // The tensor steps on the CPU as well: about 3× faster there than the host's
                // loops (the blur as two 1-D passes through the CPU convolution; 32 against
                // 100 ms at 512² on 2 cores) and as close to Daydream's torch code or closer
                // (processors tests).
                let lines = if on_device || image.device().is_cpu() {
                    standard_lineart::apply_tensor(image, p)?
                } else {
                    on_host(&|x| standard_lineart::apply(x, p))?
                };
                annotator::to_stream_size(&lines, h, w)
            }
            Processor::RealEsrgan(_) => match network(inputs, NetworkRequest::REAL_ESRGAN_X2)? {
                Network::RealEsrgan(net) => realesrgan::apply(net, image),
                _ => Err(wrong_network("realesrgan_trt")),
            },
            Processor::Hed(_) => match network(inputs, NetworkRequest::HED)? {
                Network::Hed(net) => hed::apply(net, image),
                _ => Err(wrong_network("hed")),
            },
            Processor::Lineart(p) => match network(inputs, p.network())? {
                Network::Lineart(net) => lineart::apply(net, image, p),
                Network::LineartAnime(net) => lineart::apply_anime(net, image, p),
                _ => Err(wrong_network("lineart")),
            },
            Processor::Depth(p) => match network(inputs, p.network())? {
                Network::DepthAnything(net) => depth::apply(net, image, p),
                Network::Dpt(net) => depth::apply_dpt(net, image, p),
                _ => Err(wrong_network("depth")),
            },
            Processor::Pose(p) => match network(inputs, NetworkRequest::BODY_POSE)? {
                Network::BodyPose(net) => {
                    let hand_face = if p.hands_and_face {
                        match (
                            network(inputs, NetworkRequest::HAND_POSE)?,
                            network(inputs, NetworkRequest::FACE_POSE)?,
                        ) {
                            (Network::Keypoints(hand), Network::Keypoints(face)) => {
                                Some((hand, face))
                            }
                            _ => return Err(wrong_network("openpose")),
                        }
                    } else {
                        None
                    };
                    pose::apply(net, hand_face, image, p)
                }
                _ => Err(wrong_network("openpose")),
            },
            Processor::TemporalNet(p) => match network(inputs, NetworkRequest::RAFT_SMALL)? {
                Network::Raft(net) => temporal_net::apply(net, image, inputs.previous_input, p),
                _ => Err(wrong_network("temporal_net_tensorrt")),
            },
        }
    }
}

/// The loaded network `request` from `inputs`; an error naming it when the caller has none.
fn network<'a>(inputs: &ProcessorInputs<'a>, request: NetworkRequest) -> Result<&'a Network> {
    match inputs.networks {
        Some(networks) => networks.get(request),
        None => Err(Error::State(format!(
            "the {} network is not loaded: model-based processors run inside a stream, an \
             engine or a standalone processor, which load it",
            request.kind.name()
        ))),
    }
}

/// The error for a network of the wrong kind under a request (a bug, not an input).
fn wrong_network(processor: &str) -> Error {
    Error::State(format!("{processor}: its network has the wrong kind"))
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

/// Checks that processor `name` is implemented and that `params` suit it, as a ControlNet's
/// preprocessor (an upscaler is refused: a control image has the frame's size); `field` is
/// the parameter path used in messages (`controlnets[1].preprocessor`); errors about a param
/// name `<field>.params.<key>`.
pub fn validate(name: &str, params: &Map<String, Value>, field: &str) -> Result<()> {
    let processor = Processor::parse(name, params, field, &format!("{field}.params"))?;
    refuse_upscaler(&processor, name, field)
}

/// An error for an upscaler where the image must keep its size.
fn refuse_upscaler(processor: &Processor, name: &str, field: &str) -> Result<()> {
    if processor.output_scale() != 1 {
        return Err(Error::param(
            field,
            format!(
                "{name:?} makes an image {}× larger; only image_postprocessing may change the \
                 size (the stream's output then grows with it)",
                processor.output_scale()
            ),
        ));
    }
    Ok(())
}

/// Whether a chain would change anything: present, enabled, with an enabled processor.
pub fn chain_is_active(chain: Option<&ProcessingConfig>) -> bool {
    chain.is_some_and(|c| c.enabled && c.processors.iter().any(|p| p.enabled))
}

/// Validates every enabled processor of an active chain; `field` is the chain's path
/// (`image_preprocessing`), errors name `<field>.processors[i]` and
/// `<field>.processors[i].params.<key>`. Upscalers are allowed only where `may_upscale`
/// (`image_postprocessing`).
pub fn validate_chain(
    chain: Option<&ProcessingConfig>,
    field: &str,
    may_upscale: bool,
) -> Result<()> {
    let Some(chain) = chain.filter(|c| c.enabled) else {
        return Ok(());
    };
    for (i, p) in chain.processors.iter().enumerate() {
        if p.enabled {
            let name_field = format!("{field}.processors[{i}]");
            let processor = Processor::parse(
                &p.kind,
                &p.params,
                &name_field,
                &format!("{name_field}.params"),
            )?;
            if !may_upscale {
                refuse_upscaler(&processor, &p.kind, &name_field)?;
            }
            let channels = processor.output_channels();
            if channels != 3 {
                return Err(Error::param(
                    name_field,
                    format!(
                        "{:?} makes {channels}-channel images, which only a ControlNet takes, \
                         not a frame",
                        p.kind
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Applies the enabled processors of an active chain in order (the image unchanged otherwise),
/// adding each one's time to `times`. In a chain, `external` passes its input through when
/// `inputs` has no external image, as Daydream's `ExternalPreprocessor` returns the tensor it is
/// given (the host's frame is then the externally prepared image).
pub fn apply_chain(
    chain: Option<&ProcessingConfig>,
    image: &Tensor,
    inputs: &ProcessorInputs<'_>,
    times: &mut ProcessorTimes,
) -> Result<Tensor> {
    let mut x = image.clone();
    if let Some(chain) = chain.filter(|c| c.enabled) {
        for p in chain.processors.iter().filter(|p| p.enabled) {
            let params_field = format!("{}.params", p.kind);
            let processor = Processor::parse(&p.kind, &p.params, &p.kind, &params_field)?;
            if processor == Processor::External && inputs.external.is_none() {
                continue;
            }
            let start = Instant::now();
            x = processor.run(&x, inputs)?;
            times.add(&p.kind, start.elapsed());
        }
    }
    Ok(x)
}

/// The processors `params` runs: the enabled ControlNets' preprocessors (whatever their scale)
/// and the enabled processors of enabled chains, parsed (they are validated already; one that
/// does not parse is left out, and fails where it runs). Enabling one later is a hot change
/// whose networks the engine loads before it applies the change.
fn processors_of(params: &StreamDiffusionParams) -> Vec<Processor> {
    let nets = params
        .controlnets
        .iter()
        .filter(|c| c.enabled)
        .map(|c| (c.preprocessor.as_str(), &c.preprocessor_params));
    let chains = [&params.image_preprocessing, &params.image_postprocessing]
        .into_iter()
        .flatten()
        .filter(|chain| chain.enabled)
        .flat_map(|chain| {
            chain
                .processors
                .iter()
                .filter(|p| p.enabled)
                .map(|p| (p.kind.as_str(), &p.params))
        });
    nets.chain(chains)
        .filter_map(|(name, p)| Processor::parse(name, p, name, name).ok())
        .collect()
}

/// The size (width, height) of the frames a stream with `params` puts out: its size, times
/// the scale of every upscaler in an active `image_postprocessing` chain.
pub fn output_size(params: &StreamDiffusionParams) -> (usize, usize) {
    let mut scale = 1;
    if let Some(chain) = params.image_postprocessing.as_ref().filter(|c| c.enabled) {
        for p in chain.processors.iter().filter(|p| p.enabled) {
            if let Ok(processor) = Processor::parse(&p.kind, &p.params, &p.kind, &p.kind) {
                scale *= processor.output_scale();
            }
        }
    }
    (
        params.width as usize * scale,
        params.height as usize * scale,
    )
}

/// The networks the processors of `params` run, each once.
pub fn networks_for(params: &StreamDiffusionParams) -> Vec<NetworkRequest> {
    let mut requests: Vec<NetworkRequest> = Vec::new();
    for request in processors_of(params).iter().flat_map(Processor::networks) {
        if !requests.contains(&request) {
            requests.push(request);
        }
    }
    requests
}
