//! ControlNet conditioning of the stream (docs/ALGORITHM.md §5): attaching nets from the
//! models' cache, making each frame's control images, and summing the scaled residuals per
//! UNet row within each net's guidance window.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use crate::model::bundle::StableDiffusionModels;
use crate::model::controlnet::ControlNetModel;
use crate::model::unet::{AddedConditioning, ControlResiduals};
use crate::params::StreamDiffusionParams;
use crate::pipeline::cross_stream::{BatchMember, ControlNetCall};
use crate::preprocess::networks::ProcessorNetworks;
use crate::preprocess::{self, Processor, ProcessorInputs, ProcessorTimes};
use crate::{Error, Result};

/// A ControlNet acting on the current frame.
/// The preprocessor name whose control image the host supplies with each frame.
const EXTERNAL_PREPROCESSOR: &str = "external";

pub(super) struct ActiveControlNet {
    net: Arc<ControlNetModel>,
    /// Its control image through the net's conditioning embedding, `[1, ch0, h, w]`.
    embedded: Tensor,
    scale: f64,
    window: GuidanceWindow,
}

/// `control_guidance_start` / `control_guidance_end` of one net.
#[derive(Debug, Clone, Copy)]
struct GuidanceWindow {
    start: f64,
    end: f64,
}

impl GuidanceWindow {
    /// Whether step `i` of `n` gets the net's residuals: diffusers' `controlnet_keep`,
    /// `not (i/n < start or (i+1)/n > end)`.
    fn keeps(self, i: usize, n: usize) -> bool {
        let n = n as f64;
        !((i as f64) / n < self.start || (i as f64 + 1.0) / n > self.end)
    }
}

/// Where a stream's ControlNet calls run: its place in the model's cross-stream batcher (so that
/// they share batches with other streams' calls of the same net), the models it belongs to, and
/// its frame's deadline.
pub(super) type SharedControlNets<'a> = (
    &'a BatchMember,
    &'a Arc<StableDiffusionModels>,
    Option<std::time::Instant>,
);

/// The summed, scaled residuals of the acting nets for one UNet call; `rows[r]` is the step of
/// row r. SDXL nets get the UNet call's added conditioning (`added`), row for row. A net runs
/// only on the rows its window keeps (not at all when it keeps none); the other rows get zero
/// residuals from it. `None` when no net acts on any row. With `shared`, each net's call goes
/// through the cross-stream batcher; its rows come back as they would alone.
#[allow(clippy::too_many_arguments)]
pub(super) fn control_residuals(
    controls: &[ActiveControlNet],
    x: &Tensor,
    t: &Tensor,
    embeds: &Tensor,
    added: Option<&AddedConditioning>,
    rows: &[usize],
    steps: usize,
    shared: Option<SharedControlNets<'_>>,
) -> Result<Option<ControlResiduals>> {
    let forward = |net: &Arc<ControlNetModel>,
                   x: &Tensor,
                   t: &Tensor,
                   embeds: &Tensor,
                   added: Option<&AddedConditioning>,
                   embedded: &Tensor|
     -> Result<ControlResiduals> {
        match shared {
            Some((member, models, deadline)) => {
                let call = ControlNetCall {
                    net: net.clone(),
                    sample: x.clone(),
                    timesteps: t.clone(),
                    text: embeds.clone(),
                    added: added.cloned(),
                    embedded: embedded.clone(),
                };
                member.controlnet(models, call, deadline)
            }
            None => net.forward_embedded(x, t, embeds, added, embedded),
        }
    };
    let mut sum: Option<ControlResiduals> = None;
    for control in controls {
        let kept: Vec<u32> = rows
            .iter()
            .enumerate()
            .filter(|(_, step)| control.window.keeps(**step, steps))
            .map(|(r, _)| r as u32)
            .collect();
        if kept.is_empty() {
            continue;
        }
        let residuals = if kept.len() == rows.len() {
            let r = forward(&control.net, x, t, embeds, added, &control.embedded)?;
            scale_residuals(r, control.scale, None)?
        } else {
            let index = Tensor::new(kept.as_slice(), x.device())?;
            let pick = |v: &Tensor| v.index_select(&index, 0);
            let added = match added {
                Some(a) => Some(AddedConditioning {
                    text_embeds: pick(&a.text_embeds)?,
                    time_ids: pick(&a.time_ids)?,
                }),
                None => None,
            };
            let r = forward(
                &control.net,
                &pick(x)?,
                &pick(t)?,
                &pick(embeds)?,
                added.as_ref(),
                &control.embedded,
            )?;
            scale_residuals(r, control.scale, Some((&index, rows.len())))?
        };
        sum = Some(match sum {
            None => residuals,
            Some(acc) => ControlResiduals {
                down: acc
                    .down
                    .iter()
                    .zip(&residuals.down)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<Vec<_>>>()?,
                mid: (acc.mid + residuals.mid)?,
            },
        });
    }
    Ok(sum)
}

/// Multiplies residuals by `scale`; with `scatter = (index, rows)` they were computed for the
/// rows `index` only and are placed there in zero tensors of `rows` rows.
fn scale_residuals(
    r: ControlResiduals,
    scale: f64,
    scatter: Option<(&Tensor, usize)>,
) -> Result<ControlResiduals> {
    let one = |v: Tensor| -> Result<Tensor> {
        let v = (v * scale)?;
        Ok(match scatter {
            None => v,
            Some((index, rows)) => {
                let mut dims = v.dims().to_vec();
                dims[0] = rows;
                Tensor::zeros(dims, v.dtype(), v.device())?.index_add(index, &v, 0)?
            }
        })
    };
    Ok(ControlResiduals {
        down: r.down.into_iter().map(one).collect::<Result<Vec<_>>>()?,
        mid: one(r.mid)?,
    })
}

/// The nets for `params.controlnets`, in order: those in `current` (by model id) are reused,
/// the others come from the models' cache (loaded if need be). Each is checked against the
/// stream: 3-channel control images (or the params' `conditioning_channels`) and a control
/// image embedding that lands at latent size.
pub(super) fn attach_controlnets(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
    current: &[(String, Arc<ControlNetModel>)],
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Arc<ControlNetModel>>> {
    let scale = models.autoencoder.spatial_scale_factor();
    let mut nets = Vec::with_capacity(params.controlnets.len());
    for (i, config) in params.controlnets.iter().enumerate() {
        let id = config.model_id.as_str();
        let net = match current.iter().find(|(k, _)| k == id) {
            Some((_, net)) => net.clone(),
            None => models.controlnet(id, progress)?,
        };
        let field = |leaf: &str| format!("controlnets[{i}].{leaf}");
        let channels = net.config().conditioning_channels;
        if let Some(wanted) = config.conditioning_channels
            && wanted != channels as i64
        {
            return Err(Error::param(
                field("conditioning_channels"),
                format!(
                    "{wanted} given, but ControlNet {id} takes {channels}-channel control images"
                ),
            ));
        }
        let preprocessor = &config.preprocessor;
        let made = Processor::parse(
            preprocessor,
            &config.preprocessor_params,
            &field("preprocessor"),
            &field("preprocessor_params"),
        )?
        .output_channels();
        if channels != made {
            return Err(Error::param(
                field("model_id"),
                format!(
                    "ControlNet {id} takes {channels}-channel control images, but preprocessor \
                     {preprocessor:?} makes {made}-channel ones{}",
                    if channels == 6 {
                        " (6-channel TemporalNet2 nets take \"temporal_net_tensorrt\" with \
                         output_format \"concat\")"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let downscale = net.config().condition_downscale();
        if downscale != scale {
            return Err(Error::param(
                field("model_id"),
                format!(
                    "ControlNet {id} embeds control images at 1/{downscale} of their size, but \
                     the latents are 1/{scale} of the image (conditioning_embedding_out_channels \
                     {:?})",
                    net.config().conditioning_embedding_out_channels
                ),
            ));
        }
        nets.push(net);
    }
    Ok(nets)
}

/// The preprocessors of a parameter set that can run ahead of their frame — those of enabled,
/// acting nets that read only the frame (and the previous input): not `external` (the host's
/// image comes with the frame) nor those reading the previous *output*, which does not exist
/// yet when the next frame is prepared. Equal fingerprints mean prepared images still apply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ControlFingerprint {
    /// The stream's size (width, height).
    size: (usize, usize),
    /// (preprocessor, params) of each preparable net, in order, repeated ones once.
    processors: Vec<(String, serde_json::Map<String, serde_json::Value>)>,
}

impl ControlFingerprint {
    /// The fingerprint of `params`; `None` when nothing can be prepared (no such processor,
    /// or an active `image_preprocessing` chain, which control images are made after).
    pub(crate) fn of(params: &StreamDiffusionParams) -> Option<Self> {
        if preprocess::chain_is_active(params.image_preprocessing.as_ref()) {
            return None;
        }
        let steps = params.t_index_list.len();
        let mut processors: Vec<(String, serde_json::Map<String, serde_json::Value>)> = Vec::new();
        for config in &params.controlnets {
            let window = GuidanceWindow {
                start: config.control_guidance_start,
                end: config.control_guidance_end,
            };
            let acting = config.enabled
                && config.conditioning_scale != 0.0
                && (0..steps).any(|i| window.keeps(i, steps));
            let Ok(processor) = Processor::parse(
                &config.preprocessor,
                &config.preprocessor_params,
                &config.preprocessor,
                &config.preprocessor,
            ) else {
                continue;
            };
            let entry = (
                config.preprocessor.clone(),
                config.preprocessor_params.clone(),
            );
            if acting && processor.runs_ahead() && !processors.contains(&entry) {
                processors.push(entry);
            }
        }
        (!processors.is_empty()).then_some(Self {
            size: (params.width as usize, params.height as usize),
            processors,
        })
    }
}

/// Control images made ahead of their frame ([`ControlPreparer::prepare`]), for
/// [`FrameInput::prepared`](super::stream_diffusion::FrameInput::prepared).
#[derive(Debug)]
pub struct PreparedControls {
    pub(crate) fingerprint: ControlFingerprint,
    /// The count of input frames the stream must have taken for these images to apply.
    pub(crate) follows: u64,
    /// (preprocessor, params, image) of each preparable processor.
    pub(crate) images: Vec<(String, serde_json::Map<String, serde_json::Value>, Tensor)>,
    /// The time each took.
    pub(crate) times: ProcessorTimes,
}

/// What it takes to make a frame's control images on another thread while the stream diffuses
/// the frame before it: the preparable processors, their networks, and the input the frame
/// will follow (what temporal processors compare with). `Send`; cheap to make (the networks
/// are shared).
#[derive(Debug)]
pub struct ControlPreparer {
    pub(crate) fingerprint: ControlFingerprint,
    pub(crate) networks: ProcessorNetworks,
    pub(crate) device: candle_core::Device,
    pub(crate) previous_input: Option<Tensor>,
    /// The count of input frames the stream will have taken when the prepared frame comes.
    pub(crate) follows: u64,
    /// The stream's work when it made this (`previous_input` among it), for the preparing
    /// thread's CUDA stream to wait for: each thread has its own, which nothing orders.
    pub(crate) made: crate::model::kernels::QueuedWork,
}

impl ControlPreparer {
    /// The control images of `frame` (resized to the stream's size as the stream does).
    pub fn prepare(&self, frame: &crate::frame::Frame) -> Result<PreparedControls> {
        self.made.wait_here(&self.device)?;
        let (width, height) = self.fingerprint.size;
        let unit = frame
            .to_tensor(width, height, &self.device)?
            .affine(0.5, 0.5)?;
        let inputs = ProcessorInputs {
            previous_input: self.previous_input.as_ref(),
            networks: Some(&self.networks),
            ..Default::default()
        };
        let mut times = ProcessorTimes::default();
        let mut images = Vec::with_capacity(self.fingerprint.processors.len());
        for (name, params) in &self.fingerprint.processors {
            let start = std::time::Instant::now();
            let image = preprocess::apply(name, params, &unit, &inputs)?;
            times.add(name, start.elapsed());
            images.push((name.clone(), params.clone(), image));
        }
        // The images go to the stream's thread: done before its CUDA stream reads them.
        self.device.synchronize()?;
        Ok(PreparedControls {
            fingerprint: self.fingerprint.clone(),
            follows: self.follows,
            images,
            times,
        })
    }
}

/// What the preprocessors of a frame read besides the frame.
pub(super) struct ControlInputs<'a> {
    /// The latest host-supplied control image per ControlNet id.
    pub external_controls: &'a HashMap<String, Tensor>,
    /// The stream's previous output in [0, 1].
    pub previous_output: Option<&'a Tensor>,
    /// The previous input frame in [0, 1].
    pub previous_input: Option<&'a Tensor>,
    /// The model-based processors' networks.
    pub networks: &'a ProcessorNetworks,
}

/// The ControlNets of `params` (attached as `nets`) that act on this frame, each with its
/// embedded control image; each preprocessor's time is added to `times`. `input` is the frame
/// `[1, 3, H, W]` in [0, 1] (`None` for txt2img: only `external` nets act); `prepared` holds
/// images already made for it (the caller checked they belong to these parameters). Disabled
/// nets, scale-0 nets and nets whose guidance window covers no step are skipped without
/// preprocessing.
pub(super) fn control_conditions(
    params: &StreamDiffusionParams,
    nets: &[Arc<ControlNetModel>],
    frame: &ControlInputs<'_>,
    input: Option<&Tensor>,
    prepared: Option<&PreparedControls>,
    times: &mut ProcessorTimes,
) -> Result<Vec<ActiveControlNet>> {
    let steps = params.t_index_list.len();
    let mut active = Vec::new();
    // Nets with the same preprocessor and settings share one control image.
    let mut images: Vec<(&str, &serde_json::Map<String, serde_json::Value>, Tensor)> = Vec::new();
    if let Some(prepared) = prepared {
        for (name, params, image) in &prepared.images {
            images.push((name, params, image.clone()));
        }
        for (name, spent) in prepared.times.iter() {
            times.add(name, spent);
        }
    }
    for (config, net) in params.controlnets.iter().zip(nets) {
        if !config.enabled || config.conditioning_scale == 0.0 {
            continue;
        }
        let window = GuidanceWindow {
            start: config.control_guidance_start,
            end: config.control_guidance_end,
        };
        if !(0..steps).any(|i| window.keeps(i, steps)) {
            continue;
        }
        let external = frame.external_controls.get(&config.model_id);
        let inputs = ProcessorInputs {
            previous_output: frame.previous_output,
            previous_input: frame.previous_input,
            external,
            networks: Some(frame.networks),
        };
        let image = if config.preprocessor == EXTERNAL_PREPROCESSOR {
            let Some(external) = external else { continue };
            let source = input.unwrap_or(external);
            preprocess::apply(
                &config.preprocessor,
                &config.preprocessor_params,
                source,
                &inputs,
            )?
        } else {
            let Some(input) = input else { continue };
            let cached = images.iter().find(|(name, params, _)| {
                *name == config.preprocessor && **params == config.preprocessor_params
            });
            match cached {
                Some((_, _, image)) => image.clone(),
                None => {
                    let start = std::time::Instant::now();
                    let image = preprocess::apply(
                        &config.preprocessor,
                        &config.preprocessor_params,
                        input,
                        &inputs,
                    )?;
                    times.add(&config.preprocessor, start.elapsed());
                    images.push((
                        &config.preprocessor,
                        &config.preprocessor_params,
                        image.clone(),
                    ));
                    image
                }
            }
        };
        active.push(ActiveControlNet {
            embedded: net.embed_condition(&image)?,
            net: net.clone(),
            scale: config.conditioning_scale,
            window,
        });
    }
    Ok(active)
}
