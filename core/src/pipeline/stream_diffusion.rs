//! `StreamDiffusion`: the synchronous frame-in/frame-out core API.
//!
//! Latency: with n = len(t_index_list) an input frame's picture leaves the stream n − 1 calls
//! later (the stream batch holds one frame per step); the first n − 1 outputs come from a zero
//! latent buffer. Every call to [`StreamDiffusion::process`] returns one frame.
//!
//! ControlNets (ALGORITHM.md §5): every net in `params.controlnets` is attached (loaded through
//! the models' cache) and stays attached while it is listed, enabled or not. Each frame, every
//! enabled net with a non-zero `conditioning_scale` gets its control image (the input frame
//! through its preprocessor, or the host's image for `external`), and on every UNet call runs on
//! the same latents, timesteps and text embeddings; its residuals, times the scale, are summed
//! over the nets and added to the UNet. A net acts on the rows whose step i of N satisfies
//! `start ≤ i/N` and `(i+1)/N ≤ end` (diffusers' `controlnet_keep`). Scale, enabled, preprocessor
//! and guidance window are hot; adding or removing a net attaches it from the cache.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::frame::{Frame, Image};
use crate::model::bundle::StableDiffusionModels;
use crate::model::controlnet::ControlNetModel;
use crate::model::unet::ControlResiduals;
use crate::params::{EngineSettings, ModelFamily, Prompt, StreamDiffusionParams, Update, classify};
use crate::pipeline::blend::{blend, blend_noise, normalized_weights};
use crate::pipeline::filter::{FilterDecision, SimilarImageFilter};
use crate::pipeline::rng::TorchGenerator;
use crate::pipeline::stream::{Conditioning, GuidanceParams, StepTensors, StreamState};
use crate::preprocess::{self, ProcessorInputs};
use crate::{Error, Result};

/// Wall-clock time of each stage of the last processed frame.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    /// Frame → tensor conversion and resize.
    pub preprocess: Duration,
    /// VAE/TAESD encode.
    pub encode: Duration,
    /// UNet (all rows of the stream batch, guidance included; ControlNets excluded).
    pub unet: Duration,
    /// ControlNets: control images (preprocessors) and the nets' forward passes.
    pub controlnet: Duration,
    /// VAE/TAESD decode.
    pub decode: Duration,
    /// Tensor → frame conversion.
    pub postprocess: Duration,
    /// The whole call.
    pub total: Duration,
}

/// A running StreamDiffusion stream over one loaded checkpoint.
pub struct StreamDiffusion {
    models: Arc<StableDiffusionModels>,
    params: StreamDiffusionParams,
    settings: EngineSettings,
    generator: TorchGenerator,
    state: StreamState,
    conditioning: Conditioning,
    prompt_cache: PromptCache,
    filter: Option<(SimilarImageFilter, TorchGenerator)>,
    previous_output: Option<Tensor>,
    timings: StageTimings,
    renoise: Option<NoiseSource>,
    /// The nets of `params.controlnets`, in the same order.
    controlnets: Vec<Arc<ControlNetModel>>,
    /// The latest host-supplied control image per ControlNet id, `[1, 3, H, W]` f32 in [0, 1].
    external_controls: HashMap<String, Tensor>,
}

/// The preprocessor name whose control image the host supplies with each frame.
const EXTERNAL_PREPROCESSOR: &str = "external";

/// A source of fresh Gaussian noise of a given shape.
pub type NoiseSource = Box<dyn FnMut(&[usize]) -> Result<Tensor> + Send>;

impl std::fmt::Debug for StreamDiffusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDiffusion")
            .field("model", &self.models.dir)
            .field("params", &self.params)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl StreamDiffusion {
    /// Validates `params`, loads `params.model_id` (local folder, model_root, HF cache or hub),
    /// and prepares a stream. Loading progress goes to stderr.
    pub fn new(params: StreamDiffusionParams, settings: EngineSettings) -> Result<Self> {
        Self::new_with_progress(params, settings, &mut |line| eprintln!("sdstream: {line}"))
    }

    /// [`new`](Self::new) with loading progress sent to `progress` instead of stderr.
    pub fn new_with_progress(
        params: StreamDiffusionParams,
        settings: EngineSettings,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        settings.validate()?;
        params.validate(&settings)?;
        let models = StableDiffusionModels::load(&params.model_id, &settings, progress)?;
        Self::with_models(Arc::new(models), params, settings)
    }

    /// A stream over already loaded networks (several streams may share them).
    pub fn with_models(
        models: Arc<StableDiffusionModels>,
        params: StreamDiffusionParams,
        settings: EngineSettings,
    ) -> Result<Self> {
        settings.validate()?;
        params.validate(&settings)?;
        check_supported(&params, Some(models.family))?;
        if settings.frame_buffer_size != 1 {
            return Err(Error::param(
                "frame_buffer_size",
                format!(
                    "{} is not supported; only 1 (Daydream's value) is",
                    settings.frame_buffer_size
                ),
            ));
        }
        let scale = models.autoencoder.spatial_scale_factor();
        let (width, height) = (params.width as usize, params.height as usize);
        if width % scale != 0 || height % scale != 0 {
            return Err(Error::param(
                "width",
                format!(
                    "{width}×{height} is not a multiple of the autoencoder's scale factor {scale}"
                ),
            ));
        }
        let mut prompt_cache = PromptCache::default();
        let cond = prompt_embedding(&models, &params, &mut prompt_cache)?;
        let uncond = prompt_cache.embed(&models, &params.negative_prompt)?;
        let (state, generator) = build_state(&models, &params)?;
        let controlnets = attach_controlnets(&models, &params, &[], &mut |line| {
            eprintln!("sdstream: {line}")
        })?;
        let filter = params.enable_similar_image_filter.then(|| {
            (
                SimilarImageFilter::new(
                    params.similar_image_filter_threshold,
                    params.similar_image_filter_max_skip_frame.max(0) as u32,
                ),
                // Its own generator, so filtering never shifts the diffusion's draws.
                TorchGenerator::new(FILTER_SEED),
            )
        });
        Ok(Self {
            models,
            params,
            settings,
            generator,
            state,
            conditioning: Conditioning { cond, uncond },
            prompt_cache,
            filter,
            previous_output: None,
            timings: StageTimings::default(),
            renoise: None,
            controlnets,
            external_controls: HashMap::new(),
        })
    }

    /// The parameters in force.
    pub fn params(&self) -> &StreamDiffusionParams {
        &self.params
    }

    /// The engine settings in force.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// The loaded networks.
    pub fn models(&self) -> &Arc<StableDiffusionModels> {
        &self.models
    }

    /// Stage timings of the last processed frame.
    pub fn timings(&self) -> StageTimings {
        self.timings
    }

    /// Output size (width, height) in pixels.
    pub fn output_size(&self) -> (usize, usize) {
        (self.params.width as usize, self.params.height as usize)
    }

    /// One frame in, one frame out, in the input's pixel format at width × height.
    pub fn process(&mut self, frame: &Frame) -> Result<Image> {
        self.process_with_controls(frame, &[])
    }

    /// [`process`](Self::process) with control images for `external` ControlNets: each
    /// `(model_id, frame)` is converted like the input frame (resized to the stream's size) and
    /// kept, so a net uses the most recent image given for its id (before the first one it
    /// contributes nothing). An id that names no configured ControlNet is an error, and then
    /// nothing changes.
    pub fn process_with_controls(
        &mut self,
        frame: &Frame,
        controls: &[(&str, &Frame)],
    ) -> Result<Image> {
        let start = Instant::now();
        let (width, height) = self.output_size();
        let x = frame.to_tensor(width, height, &self.models.device)?;
        let mut images = Vec::with_capacity(controls.len());
        for (id, control) in controls {
            let t = control.to_tensor(width, height, &self.models.device)?;
            images.push((*id, t));
        }
        let preprocess = start.elapsed();
        let images: Vec<(&str, &Tensor)> = images.iter().map(|(id, t)| (*id, t)).collect();
        let out = self.process_tensor_with_controls(&x, &images)?;
        let post = Instant::now();
        let image = Image::from_tensor(&out, frame.format())?;
        self.timings.preprocess = preprocess;
        self.timings.postprocess = post.elapsed();
        self.timings.total = start.elapsed();
        Ok(image)
    }

    /// The tensor path: `x` is `[1, 3, H, W]` in [−1, 1] at the stream's size; returns the
    /// output `[1, 3, H, W]` in [0, 1] (f32).
    pub fn process_tensor(&mut self, x: &Tensor) -> Result<Tensor> {
        self.process_tensor_with_controls(x, &[])
    }

    /// [`process_with_controls`](Self::process_with_controls) on tensors: `x` and every control
    /// image are `[1, 3, H, W]` in [−1, 1] at the stream's size (as [`Frame::to_tensor`] makes
    /// them).
    pub fn process_tensor_with_controls(
        &mut self,
        x: &Tensor,
        controls: &[(&str, &Tensor)],
    ) -> Result<Tensor> {
        let (width, height) = self.output_size();
        let expected = [1, 3, height, width];
        if x.dims() != expected {
            return Err(Error::InvalidFrame(format!(
                "expected a [1, 3, {height}, {width}] tensor, got {:?}",
                x.dims()
            )));
        }
        // Check every control image before keeping any, so an error changes nothing.
        let mut fresh = Vec::with_capacity(controls.len());
        check_control_ids(&self.params, controls.iter().map(|(id, _)| *id))?;
        for (id, image) in controls {
            if image.dims() != expected {
                return Err(Error::InvalidFrame(format!(
                    "control image for {id:?}: expected a [1, 3, {height}, {width}] tensor, got {:?}",
                    image.dims()
                )));
            }
            fresh.push((id.to_string(), to_unit(image)?));
        }
        self.external_controls.extend(fresh);
        let x = &self.image_preprocessing(x)?;
        if let Some((filter, rng)) = &mut self.filter {
            let u = f64::from(rng.rand(1)[0]);
            if filter.decide(x, u)? == FilterDecision::Skip
                && let Some(previous) = &self.previous_output
            {
                return Ok(previous.clone());
            }
        }
        let tc = Instant::now();
        let conds = self.control_conditions(Some(&to_unit(x)?))?;
        let control_prep = tc.elapsed();
        let x = x.to_dtype(self.models.dtype)?;
        let t0 = Instant::now();
        let z = self.models.autoencoder.encode(&x, &mut self.generator)?;
        let x_new = self.state.add_first_noise(&z)?;
        let encode = t0.elapsed();
        let x0 = self.denoise(&x_new, &conds)?;
        self.timings.controlnet += control_prep;
        let t1 = Instant::now();
        let image = self.models.autoencoder.decode(&x0)?;
        let out = crate::pipeline::stream::to_unit_range(&image.to_dtype(DType::F32)?)?;
        let out = self.image_postprocessing(&out)?;
        self.timings.encode = encode;
        self.timings.decode = t1.elapsed();
        self.previous_output = Some(out.clone());
        Ok(out)
    }

    /// Runs `image_preprocessing` on an input `[1, 3, H, W]` in [−1, 1]: the chain works in
    /// [0, 1] (see [`crate::preprocess`]), `feedback` blends with the previous output. It runs
    /// before the similar-image filter, so the filter compares processed frames (Daydream
    /// preprocesses before the stream sees the frame).
    fn image_preprocessing(&self, x: &Tensor) -> Result<Tensor> {
        let chain = self.params.image_preprocessing.as_ref();
        if !preprocess::chain_is_active(chain) {
            return Ok(x.clone());
        }
        let inputs = ProcessorInputs {
            previous_output: self.previous_output.as_ref(),
            external: None,
        };
        let processed = preprocess::apply_chain(chain, &x.affine(0.5, 0.5)?, &inputs)?;
        Ok(processed.affine(2.0, -1.0)?)
    }

    /// Runs `image_postprocessing` on a decoded output in [0, 1]; what it returns is the
    /// stream's output (and the previous output `feedback` sees next).
    fn image_postprocessing(&self, out: &Tensor) -> Result<Tensor> {
        let inputs = ProcessorInputs {
            previous_output: self.previous_output.as_ref(),
            external: None,
        };
        preprocess::apply_chain(self.params.image_postprocessing.as_ref(), out, &inputs)
    }

    /// Text-to-image: one stream step from a fresh latent drawn from the stream's generator
    /// (the reference draws it from torch's global generator, which no seed controls).
    pub fn txt2img(&mut self) -> Result<Tensor> {
        let (c, h, w) = latent_shape(&self.models, &self.params);
        let latent = self
            .generator
            .randn_tensor(&[1, c, h, w], &self.models.device)?
            .to_dtype(self.models.dtype)?;
        self.txt2img_from(&latent)
    }

    /// Text-to-image from a given starting latent `[1, C, h, w]`, used as is (no a₀/b₀ mixing,
    /// as the reference).
    ///
    /// Only `external` ControlNets act here (the others derive their image from an input frame).
    pub fn txt2img_from(&mut self, latent: &Tensor) -> Result<Tensor> {
        let conds = self.control_conditions(None)?;
        let x0 = self.denoise(latent, &conds)?;
        let image = self.models.autoencoder.decode(&x0)?;
        crate::pipeline::stream::to_unit_range(&image.to_dtype(DType::F32)?)
    }

    /// The ControlNets that act on this frame, each with its embedded control image. `input` is
    /// the frame `[1, 3, H, W]` in [0, 1] (`None` for txt2img: only `external` nets act).
    /// Disabled nets, scale-0 nets and nets whose guidance window covers no step are skipped
    /// without preprocessing.
    fn control_conditions(&self, input: Option<&Tensor>) -> Result<Vec<ActiveControlNet>> {
        let steps = self.params.t_index_list.len();
        let mut active = Vec::new();
        // Nets with the same preprocessor and settings share one control image.
        let mut images: Vec<(&str, &serde_json::Map<String, serde_json::Value>, Tensor)> =
            Vec::new();
        for (config, net) in self.params.controlnets.iter().zip(&self.controlnets) {
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
            let external = self.external_controls.get(&config.model_id);
            let image = if config.preprocessor == EXTERNAL_PREPROCESSOR {
                let Some(external) = external else { continue };
                let source = input.unwrap_or(external);
                let inputs = ProcessorInputs {
                    previous_output: self.previous_output.as_ref(),
                    external: Some(external),
                };
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
                        let inputs = ProcessorInputs {
                            previous_output: self.previous_output.as_ref(),
                            external,
                        };
                        let image = preprocess::apply(
                            &config.preprocessor,
                            &config.preprocessor_params,
                            input,
                            &inputs,
                        )?;
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

    /// Runs the stream batch on a noised latent and returns x̂₀ of the row that leaves it.
    fn denoise(&mut self, x_new: &Tensor, controls: &[ActiveControlNet]) -> Result<Tensor> {
        let t = Instant::now();
        let guidance = GuidanceParams {
            mode: self.settings.cfg_type,
            scale: self.params.guidance_scale,
            delta: self.params.delta,
        };
        let models = &self.models;
        let generator = &mut self.generator;
        let renoise = &mut self.renoise;
        let steps = self.params.t_index_list.len();
        let mut control_time = Duration::ZERO;
        let x0 = self.state.step(
            x_new,
            &self.conditioning,
            guidance,
            |x, t, e, rows| {
                let tc = Instant::now();
                let residuals = control_residuals(controls, x, t, e, rows, steps)?;
                control_time += tc.elapsed();
                models.unet.forward(x, t, e, residuals.as_ref())
            },
            |shape| match renoise.as_mut() {
                Some(source) => source(shape),
                None => Ok(generator.randn_tensor(shape, &models.device)?),
            },
        )?;
        self.timings.unet = t.elapsed().saturating_sub(control_time);
        self.timings.controlnet = control_time;
        Ok(x0)
    }

    /// The ControlNets attached to the stream, aligned with `params().controlnets`.
    pub fn controlnets(&self) -> &[Arc<ControlNetModel>] {
        &self.controlnets
    }

    /// Overrides where the non-batch path (`use_denoising_batch = false` with `do_add_noise`)
    /// draws its fresh noise between steps; by default the stream's own seeded generator. The
    /// reference draws these from torch's global generator, which the stream seed does not
    /// control, so only an injected source can reproduce its numbers.
    pub fn set_renoise_source(&mut self, source: Option<NoiseSource>) {
        self.renoise = source;
    }

    /// Applies a complete new parameter set. Hot changes take effect on the next frame without
    /// touching the weights. A ControlNet swap attaches the new list's nets from the models'
    /// ControlNet cache (loading those not cached yet; an engine pre-loads them with
    /// [`StableDiffusionModels::controlnet`] so that this step reads no weights) together with
    /// the hot changes riding along. A reload rebuilds the stream (reusing the loaded networks
    /// when `model_id` is unchanged). On any error (a missing or incompatible ControlNet
    /// included) the stream keeps its previous state.
    pub fn update(&mut self, params: StreamDiffusionParams) -> Result<Update> {
        params.validate(&self.settings)?;
        check_supported(&params, Some(self.models.family))?;
        let update = classify(&self.params, &params);
        match &update {
            Update::Unchanged => {}
            Update::Hot { .. } | Update::ControlNetSwap { .. } => {
                // Attach first (may load, may fail), then apply the rest; commit both together.
                let controlnets = attach_controlnets(
                    &self.models,
                    &params,
                    &self.current_controlnets(),
                    &mut |line| eprintln!("sdstream: {line}"),
                )?;
                self.apply_hot(params)?;
                self.controlnets = controlnets;
                let ids: Vec<&str> = self
                    .params
                    .controlnets
                    .iter()
                    .map(|c| c.model_id.as_str())
                    .collect();
                self.external_controls
                    .retain(|id, _| ids.contains(&id.as_str()));
            }
            Update::Reload { .. } => {
                let models = if params.model_id == self.params.model_id {
                    self.models.clone()
                } else {
                    Arc::new(StableDiffusionModels::load(
                        &params.model_id,
                        &self.settings,
                        &mut |line| eprintln!("sdstream: {line}"),
                    )?)
                };
                *self = Self::with_models(models, params, self.settings.clone())?;
            }
        }
        Ok(update)
    }

    /// The attached nets by model id.
    fn current_controlnets(&self) -> Vec<(String, Arc<ControlNetModel>)> {
        self.params
            .controlnets
            .iter()
            .map(|c| c.model_id.clone())
            .zip(self.controlnets.iter().cloned())
            .collect()
    }

    /// Recomputes only what the changed hot fields affect; builds everything first and commits
    /// at the end, so a failure leaves the stream as it was.
    fn apply_hot(&mut self, params: StreamDiffusionParams) -> Result<()> {
        let old = std::mem::replace(&mut self.params, params);
        let result = self.apply_hot_inner(&old);
        if result.is_err() {
            self.params = old;
        }
        result
    }

    fn apply_hot_inner(&mut self, old: &StreamDiffusionParams) -> Result<()> {
        let new = &self.params;
        let prompt_changed = old.prompt != new.prompt
            || old.prompt_interpolation_method != new.prompt_interpolation_method
            || old.normalize_prompt_weights != new.normalize_prompt_weights;
        let cond = if prompt_changed {
            Some(prompt_embedding(&self.models, new, &mut self.prompt_cache)?)
        } else {
            None
        };
        let uncond = if old.negative_prompt != new.negative_prompt {
            Some(
                self.prompt_cache
                    .embed(&self.models, &new.negative_prompt)?,
            )
        } else {
            None
        };
        let steps_changed = old.num_inference_steps != new.num_inference_steps
            || old.t_index_list != new.t_index_list;
        let seed_changed = old.seed != new.seed
            || old.seed_interpolation_method != new.seed_interpolation_method
            || old.normalize_seed_weights != new.normalize_seed_weights;
        let mut state = self.state.clone();
        let mut generator = None;
        if steps_changed && old.t_index_list.len() != new.t_index_list.len() {
            // A new batch size: fresh buffers and noise, as a new stream would have.
            let (fresh, g) = build_state(&self.models, new)?;
            state = fresh;
            generator = Some(g);
        } else {
            if steps_changed {
                state.set_steps(step_tensors(&self.models, new)?)?;
            }
            if seed_changed {
                let (noise, g) = seed_noise(&self.models, new, state.init_noise().dims())?;
                state.set_init_noise(noise)?;
                generator = Some(g);
            }
        }
        self.state = state;
        if let Some(g) = generator {
            self.generator = g;
        }
        if let Some(cond) = cond {
            self.conditioning.cond = cond;
        }
        if let Some(uncond) = uncond {
            self.conditioning.uncond = uncond;
        }
        Ok(())
    }

    /// The current stream state (buffers and noise), for diagnostics and tests.
    pub fn state(&self) -> &StreamState {
        &self.state
    }

    /// Replaces the base noise; for tests that feed the reference's own init_noise.
    pub fn set_init_noise(&mut self, noise: Tensor) -> Result<()> {
        self.state.set_init_noise(noise)
    }
}

/// Rejects parameters that ask for features this version does not implement, rather than
/// silently streaming without them, and checks every ControlNet's preprocessor and its
/// parameters with [`preprocess::validate`]. `use_safety_checker` is accepted: no checker runs yet, which
/// the README states. `family` is the loaded model's, when known (LCM-LoRA matters for SD1.5).
pub(crate) fn check_supported(
    params: &StreamDiffusionParams,
    family: Option<ModelFamily>,
) -> Result<()> {
    let not_yet = |field: &str, what: &str| {
        Err(Error::param(
            field,
            format!("{what} is not supported yet by sdstream"),
        ))
    };
    for (i, net) in params.controlnets.iter().enumerate() {
        preprocess::validate(
            &net.preprocessor,
            &net.preprocessor_params,
            &format!("controlnets[{i}].preprocessor"),
        )?;
    }
    if params.ip_adapter.enabled {
        return not_yet("ip_adapter", "IP-Adapter");
    }
    if params.lora_dict.as_ref().is_some_and(|l| !l.is_empty()) {
        return not_yet("lora_dict", "LoRA");
    }
    if params.use_lcm_lora && family == Some(ModelFamily::Sd15) {
        return not_yet(
            "use_lcm_lora",
            "LCM-LoRA (needed by SD1.5 models, not by turbo ones)",
        );
    }
    preprocess::validate_chain(params.image_preprocessing.as_ref(), "image_preprocessing")?;
    preprocess::validate_chain(params.image_postprocessing.as_ref(), "image_postprocessing")?;
    for (field, block) in [
        ("latent_preprocessing", &params.latent_preprocessing),
        ("latent_postprocessing", &params.latent_postprocessing),
    ] {
        if preprocess::chain_is_active(block.as_ref()) {
            return not_yet(field, "Latent processors");
        }
    }
    if params.skip_diffusion {
        return not_yet("skip_diffusion", "skip_diffusion (processors only)");
    }
    Ok(())
}

/// Fails, naming the id, when a control image is given for an id that names none of
/// `params.controlnets` (the stream and the engine's submit share this rule).
pub(crate) fn check_control_ids<'a>(
    params: &StreamDiffusionParams,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let configured = || {
        params
            .controlnets
            .iter()
            .map(|c| c.model_id.as_str())
            .collect::<Vec<_>>()
    };
    for id in ids {
        if !params.controlnets.iter().any(|c| c.model_id == id) {
            return Err(Error::param(
                "controls",
                format!(
                    "control image given for {id:?}, which is not a configured ControlNet \
                     (configured: {:?})",
                    configured()
                ),
            ));
        }
    }
    Ok(())
}

/// A ControlNet acting on the current frame.
struct ActiveControlNet {
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

/// The summed, scaled residuals of the acting nets for one UNet call; `rows[r]` is the step of
/// row r. A net runs only on the rows its window keeps (not at all when it keeps none); the
/// other rows get zero residuals from it. `None` when no net acts on any row.
fn control_residuals(
    controls: &[ActiveControlNet],
    x: &Tensor,
    t: &Tensor,
    embeds: &Tensor,
    rows: &[usize],
    steps: usize,
) -> Result<Option<ControlResiduals>> {
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
            let r = control
                .net
                .forward_embedded(x, t, embeds, &control.embedded)?;
            scale_residuals(r, control.scale, None)?
        } else {
            let index = Tensor::new(kept.as_slice(), x.device())?;
            let pick = |v: &Tensor| v.index_select(&index, 0);
            let r = control.net.forward_embedded(
                &pick(x)?,
                &pick(t)?,
                &pick(embeds)?,
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
fn attach_controlnets(
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
        if channels != 3 {
            return Err(Error::param(
                field("model_id"),
                format!(
                    "ControlNet {id} takes {channels}-channel control images; sdstream's control \
                     images are RGB (3 channels)"
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

/// [−1, 1] → [0, 1] in f32 (control images live in [0, 1]).
fn to_unit(x: &Tensor) -> Result<Tensor> {
    Ok(((x.to_dtype(DType::F32)? + 1.0)? / 2.0)?)
}

/// Seed of the similar-image filter's coin flips (the reference uses Python's unseeded `random`).
const FILTER_SEED: u64 = 0x5d5f_11e7;

/// A seed as the u64 torch's `manual_seed` sees (validation keeps it in 0..2^53).
fn seed_bits(seed: i64) -> u64 {
    seed as u64
}

/// Latent shape (C, h, w) for the stream's size.
fn latent_shape(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
) -> (usize, usize, usize) {
    let scale = models.autoencoder.spatial_scale_factor();
    (
        models.autoencoder.latent_channels(),
        params.height as usize / scale,
        params.width as usize / scale,
    )
}

/// Coefficients of the t_index_list on the grid of num_inference_steps.
fn step_tensors(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
) -> Result<StepTensors> {
    let t_index: Vec<usize> = params.t_index_list.iter().map(|&t| t as usize).collect();
    let c = models
        .scheduler
        .step_coefficients(params.num_inference_steps as usize, &t_index)?;
    let timesteps: Vec<f32> = c.timesteps.iter().map(|&t| t as f32).collect();
    StepTensors::new(
        &timesteps,
        &c.alpha_sqrt,
        &c.beta_sqrt,
        &c.c_skip,
        &c.c_out,
        models.dtype,
        &models.device,
    )
}

/// A fresh stream state (zero buffers, seed noise) and the generator positioned after the
/// noise draw, as the reference's `prepare`.
fn build_state(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
) -> Result<(StreamState, TorchGenerator)> {
    let steps = step_tensors(models, params)?;
    let rows = if params.use_denoising_batch {
        steps.len()
    } else {
        1
    };
    let (c, h, w) = latent_shape(models, params);
    let (noise, generator) = seed_noise(models, params, &[rows, c, h, w])?;
    let state = StreamState::new(
        steps,
        noise,
        params.use_denoising_batch,
        params.do_add_noise,
    )?;
    Ok((state, generator))
}

/// init_noise for the seed (or seed blend) with `shape`, and the stream generator: seeded with
/// the first seed and advanced past its noise, so later draws (the VAE posterior) come in the
/// reference's order.
fn seed_noise(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
    shape: &[usize],
) -> Result<(Tensor, TorchGenerator)> {
    let seeds = params.seed.weighted();
    let mut noises = Vec::with_capacity(seeds.len());
    let mut first = None;
    for (seed, _) in &seeds {
        let mut g = TorchGenerator::new(seed_bits(*seed));
        noises.push(
            g.randn_tensor(shape, &models.device)?
                .to_dtype(models.dtype)?,
        );
        first.get_or_insert(g);
    }
    let generator = first.ok_or_else(|| Error::param("seed", "no seed given"))?;
    if noises.len() == 1 {
        return Ok((noises.remove(0), generator));
    }
    let raw: Vec<f64> = seeds.iter().map(|(_, w)| *w).collect();
    let weights = normalized_weights(&raw, params.normalize_seed_weights, "seed")?;
    let noise = blend_noise(
        &noises,
        &weights,
        params.seed_interpolation_method,
        params.normalize_seed_weights,
    )?;
    Ok((noise, generator))
}

/// The (blended) prompt embedding `[1, 77, D]`.
fn prompt_embedding(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
    cache: &mut PromptCache,
) -> Result<Tensor> {
    match &params.prompt {
        Prompt::Text(text) => cache.embed(models, text),
        Prompt::Weighted(items) => {
            let embeds = items
                .iter()
                .map(|(text, _)| cache.embed(models, text))
                .collect::<Result<Vec<_>>>()?;
            let raw: Vec<f64> = items.iter().map(|(_, w)| *w).collect();
            let weights = normalized_weights(&raw, params.normalize_prompt_weights, "prompt")?;
            blend(&embeds, &weights, params.prompt_interpolation_method)
        }
    }
}

/// CLIP embeddings by text, so switching back to a prompt costs nothing.
#[derive(Debug, Default)]
struct PromptCache {
    embeds: HashMap<String, Tensor>,
}

impl PromptCache {
    /// Most embeddings kept (each is 77 × D floats).
    const LIMIT: usize = 64;

    fn embed(&mut self, models: &StableDiffusionModels, text: &str) -> Result<Tensor> {
        if let Some(e) = self.embeds.get(text) {
            return Ok(e.clone());
        }
        let e = models.encode_text(text)?;
        if self.embeds.len() >= Self::LIMIT {
            self.embeds.clear();
        }
        self.embeds.insert(text.to_string(), e.clone());
        Ok(e)
    }
}
