//! `StreamDiffusion`: the synchronous frame-in/frame-out core API.
//!
//! Latency: with n = len(t_index_list) an input frame's picture leaves the stream n − 1 calls
//! later (the stream batch holds one frame per step); the first n − 1 outputs come from a zero
//! latent buffer. Every call to [`StreamDiffusion::process`] returns one frame.
//!
//! ControlNets (docs/ALGORITHM.md §5): every net in `params.controlnets` is attached (loaded through
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
use crate::model::attention_bank::AttentionBank;
use crate::model::bundle::{ModelRequest, StableDiffusionModels};
use crate::model::controlnet::ControlNetModel;
use crate::model::pool::ModelPool;
use crate::params::{
    EngineSettings, HotChange, StreamDiffusionParams, Transition, Update, classify,
};
use crate::pipeline::conditioning::{
    PromptCache, build_state, latent_shape, prompt_embedding, seed_noise, step_tensors,
};
use crate::pipeline::controlnet::{
    ActiveControlNet, ControlFingerprint, ControlInputs, ControlPreparer, PreparedControls,
    attach_controlnets, control_conditions, control_residuals,
};
use crate::pipeline::filter::{FilterDecision, SimilarImageFilter};
use crate::pipeline::image_prompt::{self, ImagePromptState};
pub(crate) use crate::pipeline::image_prompt::{
    load as load_image_prompt, prefetch as prefetch_style_image, ready as image_prompt_ready,
};
use crate::pipeline::stream::{AddedText, Conditioning, GuidanceParams, StreamState};
use crate::pipeline::style_image::StyleImage;
pub(crate) use crate::pipeline::support::{check_control_ids, check_supported};
use crate::pipeline::transition::{Glide, TransitionProgress};
use crate::preprocess::latent::LatentChain;
use crate::preprocess::networks::{
    Network, NetworkKind, NetworkPool, NetworkRequest, ProcessorNetworks,
};
use crate::preprocess::{self, ProcessorInputs};
use crate::sampling::rng::TorchGenerator;
use crate::status::{Activity, EngineState, EngineStatus, ProcessorTimes, epoch_ms, params_hash};
use crate::{Error, Result};

/// The report types of a frame, kept with the rest of the status report.
pub use crate::status::{SafetyFrame, StageTimings};

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
    /// The networks the model-based processors of `params` run.
    networks: ProcessorNetworks,
    /// The last processed input frame (after `image_preprocessing`), f32 in [0, 1].
    previous_input: Option<Tensor>,
    /// How many input frames were taken as `previous_input` (prepared control images name
    /// the count they follow).
    inputs_taken: u64,
    /// Control images made ahead for the frame being processed.
    prepared: Option<PreparedControls>,
    /// What [`status`](Self::status) reports; kept across reloads.
    report: StreamReport,
    /// Wait for the device at every stage boundary ([`set_stage_sync`](Self::set_stage_sync)).
    stage_sync: bool,
    /// The prompt embedding (and SDXL's pooled one) gliding to a new prompt.
    prompt_glide: Option<Glide>,
    /// The seed noise gliding to a new seed's.
    noise_glide: Option<Glide>,
    /// `latent_preprocessing`, run on the noised input latent.
    latent_pre: LatentChain,
    /// `latent_postprocessing`, run on the x̂₀ that leaves the stream batch.
    latent_post: LatentChain,
    /// The previous frame's x̂₀ after `latent_postprocessing` (Daydream's `prev_latent_result`),
    /// what `latent_feedback` blends with.
    previous_latent: Option<Tensor>,
    /// The safety checker, while `use_safety_checker` is on.
    safety_checker: Option<Arc<Network>>,
    /// Cached attention's bank, while `cached_attention.enabled`.
    attention_bank: Option<AttentionBank>,
    /// IP-Adapter, while `ip_adapter.enabled`.
    image_prompt: Option<ImagePromptState>,
    /// A style picture the host handed in, used instead of `ip_adapter_style_image_url`.
    host_style: Option<StyleImage>,
}

/// The counters behind a stream's status report.
#[derive(Debug)]
struct StreamReport {
    activity: Activity,
    /// Accepted parameter changes (0: the initial parameters).
    params_version: u64,
    params_time: Option<u64>,
    /// Reloads (the stream rebuilt by `update`).
    restart_count: u64,
    last_restart_time: Option<u64>,
}

impl Default for StreamReport {
    fn default() -> Self {
        Self {
            activity: Activity::new(Duration::from_secs(2)),
            params_version: 0,
            params_time: None,
            restart_count: 0,
            last_restart_time: None,
        }
    }
}

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
    /// Validates `params`, gets `params.model_id`'s networks from the process-wide
    /// [`ModelPool`] (loading them, from a local folder, model_root, the HF cache or the hub,
    /// unless another stream holds them), and prepares a stream. Loading progress is logged
    /// ([`crate::log`]).
    pub fn new(params: StreamDiffusionParams, settings: EngineSettings) -> Result<Self> {
        Self::new_with_progress(params, settings, &mut crate::log::progress)
    }

    /// [`new`](Self::new) with loading progress sent to `progress` instead of stderr.
    pub fn new_with_progress(
        params: StreamDiffusionParams,
        settings: EngineSettings,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        settings.validate()?;
        params.validate(&settings)?;
        let models = ModelPool::global().get(&params, &settings, progress)?;
        Self::with_models(models, params, settings)
    }

    /// A stream over already loaded networks (several streams may share them).
    pub fn with_models(
        models: Arc<StableDiffusionModels>,
        params: StreamDiffusionParams,
        settings: EngineSettings,
    ) -> Result<Self> {
        Self::with_models_and_style(models, params, settings, None)
    }

    /// [`with_models`](Self::with_models) with a host-supplied IP-Adapter style picture.
    fn with_models_and_style(
        models: Arc<StableDiffusionModels>,
        params: StreamDiffusionParams,
        settings: EngineSettings,
        host_style: Option<StyleImage>,
    ) -> Result<Self> {
        settings.validate()?;
        params.validate(&settings)?;
        check_supported(&params)?;
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
        let time_ids = match models.second {
            Some(_) => Some(models.sdxl_time_ids(height, width)?),
            None => None,
        };
        let image_prompt =
            image_prompt::build(&models, &params, &settings, host_style.as_ref(), None)?;
        let conditioning = Conditioning {
            image: image_prompt.as_ref().map(|s| s.tokens.clone()),
            added: match (&cond.pooled, &uncond.pooled, time_ids) {
                (Some(c), Some(u), Some(time_ids)) => Some(AddedText {
                    cond: c.clone(),
                    uncond: u.clone(),
                    time_ids,
                }),
                _ => None,
            },
            cond: cond.embeds,
            uncond: uncond.embeds,
        };
        let (state, generator) = build_state(&models, &params)?;
        let controlnets = attach_controlnets(&models, &params, &[], &mut crate::log::progress)?;
        let networks = load_networks(&models, &params, &settings)?;
        let safety_checker = load_safety_checker(&models, &params, &settings)?;
        let attention_bank = attention_bank(&params)?;
        let latent_pre =
            LatentChain::new(params.latent_preprocessing.as_ref(), "latent_preprocessing")?;
        let latent_post = LatentChain::new(
            params.latent_postprocessing.as_ref(),
            "latent_postprocessing",
        )?;
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
            conditioning,
            prompt_cache,
            filter,
            previous_output: None,
            timings: StageTimings::default(),
            renoise: None,
            controlnets,
            external_controls: HashMap::new(),
            networks,
            previous_input: None,
            inputs_taken: 0,
            prepared: None,
            report: StreamReport::default(),
            stage_sync: false,
            prompt_glide: None,
            noise_glide: None,
            latent_pre,
            latent_post,
            previous_latent: None,
            safety_checker,
            attention_bank,
            image_prompt,
            host_style,
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

    /// On a GPU the stages only queue work, and the device runs it later: the stage timings then
    /// measure the queueing, and the final download waits for all of it. With `on`, every stage
    /// ends by waiting for the device, so [`timings`](Self::timings) measure each stage's own
    /// work, at the cost of a few host waits per frame (for benchmarks; off by default, no
    /// effect on the CPU). Kept across reloads.
    pub fn set_stage_sync(&mut self, on: bool) {
        self.stage_sync = on;
    }

    /// Waits for the device when [`set_stage_sync`](Self::set_stage_sync) is on.
    fn sync_stage(&self) -> Result<()> {
        if self.stage_sync {
            self.models.device.synchronize()?;
        }
        Ok(())
    }

    /// The stream's size (width, height) in pixels: frames are resized to it.
    pub fn stream_size(&self) -> (usize, usize) {
        (self.params.width as usize, self.params.height as usize)
    }

    /// Output size (width, height) in pixels: the stream's size, times the scale of an
    /// upscaling `image_postprocessing` processor ([`preprocess::output_size`]).
    pub fn output_size(&self) -> (usize, usize) {
        preprocess::output_size(&self.params)
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
        self.process_prepared(frame, controls, None)
    }

    /// What makes the control images of the frame that follows `current` on another thread,
    /// while this stream diffuses `current` ([`ControlPreparer::prepare`], then
    /// [`process_prepared`](Self::process_prepared)); `None` when the parameters have no
    /// preprocessor that can run ahead. Costs one conversion of `current`.
    pub fn control_preparer(&self, current: &Frame) -> Result<Option<ControlPreparer>> {
        let Some(fingerprint) = ControlFingerprint::of(&self.params) else {
            return Ok(None);
        };
        let (width, height) = self.stream_size();
        let previous = to_unit(&current.to_tensor(width, height, &self.models.device)?)?;
        Ok(Some(ControlPreparer {
            fingerprint,
            networks: self.networks.clone(),
            device: self.models.device.clone(),
            previous_input: Some(previous),
            follows: self.inputs_taken + 1,
        }))
    }

    /// [`process_with_controls`](Self::process_with_controls) with control images made ahead
    /// by a [`ControlPreparer`] of this stream. They are used only when they still apply: the
    /// same preprocessors and settings, and made after the input this frame follows (a hot
    /// change or a frame the similar-image filter skipped in between makes them stale, and the
    /// images are then made here). The outputs equal those of `process_with_controls`.
    pub fn process_prepared(
        &mut self,
        frame: &Frame,
        controls: &[(&str, &Frame)],
        prepared: Option<PreparedControls>,
    ) -> Result<Image> {
        let came_in = Instant::now();
        self.report.activity.frame_in(came_in);
        let prepared = prepared.filter(|p| {
            p.follows == self.inputs_taken
                && Some(&p.fingerprint) == ControlFingerprint::of(&self.params).as_ref()
        });
        self.prepared = prepared;
        let result = self.run_frame(frame, controls);
        self.prepared = None;
        let activity = &mut self.report.activity;
        match &result {
            Ok(_) => {
                let now = Instant::now();
                activity.frame_out(now, self.timings, now.saturating_duration_since(came_in));
            }
            Err(e) => activity.frame_failed(Instant::now(), format!("a frame failed: {e}")),
        }
        result
    }

    fn run_frame(&mut self, frame: &Frame, controls: &[(&str, &Frame)]) -> Result<Image> {
        let start = Instant::now();
        let (width, height) = self.stream_size();
        let x = frame.to_tensor(width, height, &self.models.device)?;
        let mut images = Vec::with_capacity(controls.len());
        for (id, control) in controls {
            let t = control.to_tensor(width, height, &self.models.device)?;
            images.push((*id, t));
        }
        self.sync_stage()?;
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

    /// The status report, in the [`Engine`](crate::Engine)'s schema: state `ONLINE`, fps,
    /// frame and error counters, the last error, the last frame's stage timings, the
    /// parameters and how often they changed (a reload counts as a restart). Frames and
    /// errors are those of [`process`](Self::process) / [`process_with_controls`](Self::process_with_controls)
    /// and [`update`](Self::update).
    pub fn status(&self) -> EngineStatus {
        let report = &self.report;
        let params = self.params.to_json();
        EngineStatus {
            last_params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
            last_params_hash: params_hash(&params),
            last_params_update_time: report.params_time,
            restart_count: report.restart_count,
            last_restart_time: report.last_restart_time,
            params_version: report.params_version,
            serving_params_version: Some(report.params_version),
            ..report.activity.report(Instant::now(), EngineState::Online)
        }
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
        let (width, height) = self.stream_size();
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
        self.timings.processors = ProcessorTimes::default();
        let x = &self.image_preprocessing(x)?;
        if let Some((filter, rng)) = &mut self.filter {
            let u = f64::from(rng.rand(1)[0]);
            if filter.decide(x, u)? == FilterDecision::Skip
                && let Some(previous) = &self.previous_output
            {
                // The previous output again, with its verdict (no second check).
                self.timings.safety.checked = false;
                return Ok(if self.timings.safety.flagged {
                    previous.zeros_like()?
                } else {
                    previous.clone()
                });
            }
        }
        self.advance_transition()?;
        let tc = Instant::now();
        let unit_input = to_unit(x)?;
        let frame = ControlInputs {
            external_controls: &self.external_controls,
            previous_output: self.previous_output.as_ref(),
            previous_input: self.previous_input.as_ref(),
            networks: &self.networks,
        };
        let prepared = self.prepared.take();
        let conds = control_conditions(
            &self.params,
            &self.controlnets,
            &frame,
            Some(&unit_input),
            prepared.as_ref(),
            &mut self.timings.processors,
        )?;
        self.sync_stage()?;
        let control_prep = tc.elapsed();
        let x = x.to_dtype(self.models.dtype)?;
        let t0 = Instant::now();
        let z = self.models.autoencoder.encode(&x, &mut self.generator)?;
        let x_new = self.state.add_first_noise(&z)?;
        let x_new = self.latent_pre.apply(
            &x_new,
            self.previous_latent.as_ref(),
            &mut self.timings.processors,
        )?;
        self.sync_stage()?;
        let encode = t0.elapsed();
        let x0 = self.denoise(&x_new, &conds)?;
        let x0 = self.latent_postprocessing(&x0)?;
        self.timings.controlnet += control_prep;
        let t1 = Instant::now();
        let image = self.models.autoencoder.decode(&x0)?;
        let out = crate::pipeline::stream::to_unit_range(&image.to_dtype(DType::F32)?)?;
        let out = self.image_postprocessing(&out)?;
        let shown = self.safety_check(&out)?;
        self.sync_stage()?;
        self.timings.encode = encode;
        self.timings.decode = t1.elapsed();
        // Feedback and the filter's repeats see the generated picture, as Daydream's
        // `prev_image_result` (its checker runs on the way out).
        self.previous_output = Some(out);
        self.previous_input = Some(unit_input);
        self.inputs_taken += 1;
        Ok(shown)
    }

    /// Runs the safety checker (when on) on an output in [0, 1]: black in its place when
    /// flagged; records the verdict and the time.
    fn safety_check(&mut self, out: &Tensor) -> Result<Tensor> {
        let Some(net) = &self.safety_checker else {
            self.timings.safety = SafetyFrame::default();
            return Ok(out.clone());
        };
        let Network::SafetyChecker(checker) = net.as_ref() else {
            return Err(Error::State(
                "the safety checker slot holds another network".into(),
            ));
        };
        let start = Instant::now();
        let verdict = checker.check(out, self.params.safety_checker_threshold)?;
        self.timings
            .processors
            .add(preprocess::SAFETY_CHECKER, start.elapsed());
        self.timings.safety = SafetyFrame {
            checked: true,
            flagged: verdict.flagged,
            max_concept_score: verdict.max_concept_score(),
        };
        if verdict.flagged {
            Ok(out.zeros_like()?)
        } else {
            Ok(out.clone())
        }
    }

    /// Runs `image_preprocessing` on an input `[1, 3, H, W]` in [−1, 1]: the chain works in
    /// [0, 1] (see [`crate::preprocess`]), `feedback` blends with the previous output. It runs
    /// before the similar-image filter, so the filter compares processed frames (Daydream
    /// preprocesses before the stream sees the frame).
    fn image_preprocessing(&mut self, x: &Tensor) -> Result<Tensor> {
        let chain = self.params.image_preprocessing.as_ref();
        if !preprocess::chain_is_active(chain) {
            return Ok(x.clone());
        }
        let mut times = self.timings.processors;
        let processed = preprocess::apply_chain(
            chain,
            &x.affine(0.5, 0.5)?,
            &self.chain_inputs(),
            &mut times,
        );
        self.timings.processors = times;
        Ok(processed?.affine(2.0, -1.0)?)
    }

    /// What the processors of the chains read besides the image.
    fn chain_inputs(&self) -> ProcessorInputs<'_> {
        ProcessorInputs {
            previous_output: self.previous_output.as_ref(),
            previous_input: self.previous_input.as_ref(),
            external: None,
            networks: Some(&self.networks),
        }
    }

    /// Runs `image_postprocessing` on a decoded output in [0, 1]; what it returns is the
    /// stream's output (and the previous output `feedback` sees next).
    fn image_postprocessing(&mut self, out: &Tensor) -> Result<Tensor> {
        let mut times = self.timings.processors;
        let result = preprocess::apply_chain(
            self.params.image_postprocessing.as_ref(),
            out,
            &self.chain_inputs(),
            &mut times,
        );
        self.timings.processors = times;
        result
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
        self.advance_transition()?;
        let frame = ControlInputs {
            external_controls: &self.external_controls,
            previous_output: self.previous_output.as_ref(),
            previous_input: self.previous_input.as_ref(),
            networks: &self.networks,
        };
        let conds = control_conditions(
            &self.params,
            &self.controlnets,
            &frame,
            None,
            None,
            &mut self.timings.processors,
        )?;
        let x0 = self.denoise(latent, &conds)?;
        let x0 = self.latent_postprocessing(&x0)?;
        let image = self.models.autoencoder.decode(&x0)?;
        let out = crate::pipeline::stream::to_unit_range(&image.to_dtype(DType::F32)?)?;
        self.safety_check(&out)
    }

    /// Runs `latent_postprocessing` on x̂₀ and keeps the result as the previous latent (what
    /// Daydream keeps as `prev_latent_result`, after its post hooks).
    fn latent_postprocessing(&mut self, x0: &Tensor) -> Result<Tensor> {
        let x0 = self.latent_post.apply(
            x0,
            self.previous_latent.as_ref(),
            &mut self.timings.processors,
        )?;
        self.previous_latent = Some(x0.clone());
        Ok(x0)
    }

    /// Moves the glides in progress one frame on (a frame the similar-image filter skips does
    /// not count).
    fn advance_transition(&mut self) -> Result<()> {
        if let Some(glide) = &mut self.prompt_glide {
            let (mut values, last) = glide.advance()?;
            if let Some(added) = &mut self.conditioning.added
                && values.len() == 2
            {
                added.cond = values.pop().expect("two values");
            }
            self.conditioning.cond = values.remove(0);
            if last {
                self.prompt_glide = None;
            }
        }
        if let Some(glide) = &mut self.noise_glide {
            let (mut values, last) = glide.advance()?;
            self.state.set_init_noise(values.remove(0))?;
            if last {
                self.noise_glide = None;
            }
        }
        Ok(())
    }

    /// How far the prompt and seed glides in progress are.
    pub fn transition_progress(&self) -> TransitionProgress {
        TransitionProgress {
            prompt: self.prompt_glide.as_ref().map(Glide::progress),
            seed: self.noise_glide.as_ref().map(Glide::progress),
        }
    }

    /// The conditioning the next frame uses (prompt and negative prompt embeddings), for
    /// diagnostics and tests.
    pub fn conditioning(&self) -> &Conditioning {
        &self.conditioning
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
        let mut bank = self.attention_bank.as_mut();
        let image = self.image_prompt.as_ref().map(ImagePromptState::unet_input);
        let steps = self.params.t_index_list.len();
        let sync = |device: &candle_core::Device| -> Result<()> {
            if self.stage_sync {
                device.synchronize()?;
            }
            Ok(())
        };
        let mut control_time = Duration::ZERO;
        let x0 = self.state.step(
            x_new,
            &self.conditioning,
            guidance,
            |x, t, e, added, rows| {
                let tc = Instant::now();
                // ControlNets read the text alone (Daydream's CNAttnProcessor).
                let text = match image {
                    Some(image) => e.narrow(1, 0, e.dim(1)? - image.tokens)?,
                    None => e.clone(),
                };
                let residuals = control_residuals(controls, x, t, &text, added, rows, steps)?;
                if residuals.is_some() {
                    sync(&models.device)?;
                }
                control_time += tc.elapsed();
                models.unet.forward_extended(
                    x,
                    t,
                    e,
                    added,
                    residuals.as_ref(),
                    bank.as_deref_mut(),
                    image,
                )
            },
            |shape| match renoise.as_mut() {
                Some(source) => source(shape),
                None => Ok(generator.randn_tensor(shape, &models.device)?),
            },
        )?;
        sync(&models.device)?;
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
    /// when `model_id` is unchanged, else taking them from the process-wide [`ModelPool`], so
    /// another stream's copy is shared). On any error (a missing or incompatible ControlNet
    /// included) the stream keeps its previous state.
    pub fn update(&mut self, params: StreamDiffusionParams) -> Result<Update> {
        self.update_with_transition(params, Transition::default())
    }

    /// [`update`](Self::update) with a `transition`: a hot change of the prompt (or prompt
    /// weights, interpolation or normalisation) or of the seed then glides over
    /// `transition.num_steps` frames from where it is (mid-way through an earlier glide, that
    /// glide's current value) to the new value, instead of switching on the next frame. Other
    /// changes apply at once; a reload or a new stream batch size starts from the new values.
    pub fn update_with_transition(
        &mut self,
        params: StreamDiffusionParams,
        transition: Transition,
    ) -> Result<Update> {
        transition.validate()?;
        let result = self.apply_update(params, transition);
        let report = &mut self.report;
        match &result {
            Ok(Update::Unchanged) => {}
            Ok(update) => {
                report.params_version += 1;
                report.params_time = Some(epoch_ms());
                if update.needs_reload() {
                    report.restart_count += 1;
                    report.last_restart_time = report.params_time;
                }
            }
            Err(e) => report.activity.error(format!(
                "an update failed, the previous parameters stay: {e}"
            )),
        }
        result
    }

    fn apply_update(
        &mut self,
        params: StreamDiffusionParams,
        transition: Transition,
    ) -> Result<Update> {
        params.validate(&self.settings)?;
        check_supported(&params)?;
        let update = classify(&self.params, &params);
        match &update {
            Update::Unchanged => {}
            Update::Hot { .. } | Update::ControlNetSwap { .. } => {
                // Attach first (may load, may fail), then apply the rest; commit both together.
                let controlnets = attach_controlnets(
                    &self.models,
                    &params,
                    &self.current_controlnets(),
                    &mut crate::log::progress,
                )?;
                let networks = load_networks(&self.models, &params, &self.settings)?;
                let safety_checker = if params.use_safety_checker == self.params.use_safety_checker
                {
                    self.safety_checker.clone()
                } else {
                    load_safety_checker(&self.models, &params, &self.settings)?
                };
                let image_prompt = if params.ip_adapter == self.params.ip_adapter
                    && params.ip_adapter_style_image_url == self.params.ip_adapter_style_image_url
                {
                    self.image_prompt.clone()
                } else {
                    image_prompt::build(
                        &self.models,
                        &params,
                        &self.settings,
                        self.host_style.as_ref(),
                        self.image_prompt.as_ref(),
                    )?
                };
                self.apply_hot(params, update.hot_changes(), transition)?;
                self.conditioning.image = image_prompt.as_ref().map(|s| s.tokens.clone());
                self.image_prompt = image_prompt;
                self.controlnets = controlnets;
                self.networks = networks;
                self.safety_checker = safety_checker;
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
                let models = if ModelRequest::from(&params) == ModelRequest::from(&self.params) {
                    self.models.clone()
                } else {
                    ModelPool::global().get(&params, &self.settings, &mut crate::log::progress)?
                };
                let mut fresh = Self::with_models_and_style(
                    models,
                    params,
                    self.settings.clone(),
                    self.host_style.clone(),
                )?;
                fresh.report = std::mem::take(&mut self.report);
                fresh.stage_sync = self.stage_sync;
                *self = fresh;
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

    /// Takes `params` in place, recomputing only what `changes` (the hot changes [`classify`]
    /// found) touch; everything is built first and committed at the end, so a failure leaves
    /// the stream as it was. Fields read on every frame (guidance, delta, the ControlNets'
    /// scales and windows, the processor chains) need nothing here.
    fn apply_hot(
        &mut self,
        params: StreamDiffusionParams,
        changes: &[HotChange],
        transition: Transition,
    ) -> Result<()> {
        let touched = |wanted: fn(&HotChange) -> bool| changes.iter().any(wanted);
        let cond = if touched(|c| {
            matches!(
                c,
                HotChange::Prompt { .. }
                    | HotChange::PromptInterpolationMethod
                    | HotChange::NormalizePromptWeights
            )
        }) {
            Some(prompt_embedding(
                &self.models,
                &params,
                &mut self.prompt_cache,
            )?)
        } else {
            None
        };
        let uncond = if touched(|c| matches!(c, HotChange::NegativePrompt)) {
            Some(
                self.prompt_cache
                    .embed(&self.models, &params.negative_prompt)?,
            )
        } else {
            None
        };
        let new_batch = touched(|c| matches!(c, HotChange::TIndexList { same_len: false }));
        let new_steps = touched(|c| {
            matches!(
                c,
                HotChange::TIndexList { .. } | HotChange::NumInferenceSteps
            )
        });
        let new_seed = touched(|c| {
            matches!(
                c,
                HotChange::Seed { .. }
                    | HotChange::SeedInterpolationMethod
                    | HotChange::NormalizeSeedWeights
            )
        });
        let glide = !transition.is_instant();
        let method = transition.temporal_interpolation_method;
        let mut noise_glide = None;
        let (state, generator) = if new_batch {
            // A new batch size: fresh buffers and noise, as a new stream would have.
            let (state, generator) = build_state(&self.models, &params)?;
            (Some(state), Some(generator))
        } else if new_steps || new_seed {
            let mut state = self.state.clone();
            if new_steps {
                state.set_steps(step_tensors(&self.models, &params)?)?;
            }
            let mut generator = None;
            if new_seed {
                let (noise, g) = seed_noise(&self.models, &params, state.init_noise().dims())?;
                if glide {
                    // From the noise in use now (mid-glide, the glide's current value).
                    let from = state.init_noise().clone();
                    noise_glide = Some(Glide::new(
                        vec![from],
                        vec![noise],
                        transition.num_steps,
                        method,
                    ));
                } else {
                    state.set_init_noise(noise)?;
                }
                generator = Some(g);
            }
            (Some(state), generator)
        } else {
            (None, None)
        };
        let attention_bank = match (
            &self.attention_bank,
            touched(|c| matches!(c, HotChange::CachedAttention)),
        ) {
            (Some(bank), true) => {
                let mut bank = bank.clone();
                bank.resize(
                    params.cached_attention.max_frames as usize,
                    params.cached_attention.interval as usize,
                )?;
                Some(bank)
            }
            _ => None,
        };
        let latent_pre = if touched(|c| matches!(c, HotChange::LatentPreprocessing)) {
            Some(
                self.latent_pre
                    .reconfigured(params.latent_preprocessing.as_ref(), "latent_preprocessing")?,
            )
        } else {
            None
        };
        let latent_post = if touched(|c| matches!(c, HotChange::LatentPostprocessing)) {
            Some(self.latent_post.reconfigured(
                params.latent_postprocessing.as_ref(),
                "latent_postprocessing",
            )?)
        } else {
            None
        };
        let prompt_glide = match (&cond, glide) {
            (Some(cond), true) => {
                let mut from = vec![self.conditioning.cond.clone()];
                let mut to = vec![cond.embeds.clone()];
                if let (Some(added), Some(pooled)) = (&self.conditioning.added, &cond.pooled) {
                    from.push(added.cond.clone());
                    to.push(pooled.clone());
                }
                Some(Glide::new(from, to, transition.num_steps, method))
            }
            _ => None,
        };
        self.params = params;
        if let Some(bank) = attention_bank {
            self.attention_bank = Some(bank);
        }
        if new_batch && let Some(bank) = &mut self.attention_bank {
            // Another batch shape: the banked rows no longer line up.
            bank.clear();
        }
        if let Some(chain) = latent_pre {
            self.latent_pre = chain;
        }
        if let Some(chain) = latent_post {
            self.latent_post = chain;
        }
        if let Some(state) = state {
            self.state = state;
        }
        if let Some(generator) = generator {
            self.generator = generator;
        }
        if new_batch {
            self.noise_glide = None;
        } else if new_seed {
            // A new seed replaces a seed glide in progress (it glides on from where it was).
            self.noise_glide = noise_glide;
        }
        if let Some(cond) = cond {
            if prompt_glide.is_some() {
                self.prompt_glide = prompt_glide;
            } else {
                self.prompt_glide = None;
                self.conditioning.cond = cond.embeds;
                if let (Some(added), Some(pooled)) = (&mut self.conditioning.added, cond.pooled) {
                    added.cond = pooled;
                }
            }
        }
        if let Some(uncond) = uncond {
            self.conditioning.uncond = uncond.embeds;
            if let (Some(added), Some(pooled)) = (&mut self.conditioning.added, uncond.pooled) {
                added.uncond = pooled;
            }
        }
        Ok(())
    }

    /// The last frame's output latent: x̂₀ after `latent_postprocessing`, `[1, C, h, w]` in the
    /// models' dtype (what the decoder took, and what `latent_feedback` blends with next).
    pub fn last_latent(&self) -> Option<&Tensor> {
        self.previous_latent.as_ref()
    }

    /// Hands in IP-Adapter's style picture (`Some`), used instead of the one at
    /// `ip_adapter_style_image_url` from the next frame on, or goes back to the URL's (`None`).
    /// The picture is encoded once, here, when the adapter is on (else when it is turned on).
    /// On an error the stream keeps its previous picture.
    pub fn set_style_image(&mut self, picture: Option<StyleImage>) -> Result<()> {
        let image_prompt = image_prompt::build(
            &self.models,
            &self.params,
            &self.settings,
            picture.as_ref(),
            self.image_prompt.as_ref(),
        )?;
        self.conditioning.image = image_prompt.as_ref().map(|s| s.tokens.clone());
        self.image_prompt = image_prompt;
        self.host_style = picture;
        Ok(())
    }

    /// IP-Adapter's scale in each cross-attention layer (diffusers' order), while it is on.
    pub fn ip_adapter_scales(&self) -> Option<&[f64]> {
        self.image_prompt.as_ref().map(ImagePromptState::scales)
    }

    /// Cached attention's bank (`cached_attention.enabled`), for diagnostics and tests.
    pub fn attention_bank(&self) -> Option<&AttentionBank> {
        self.attention_bank.as_ref()
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

/// The networks the processors of `params` run, from the process-wide [`NetworkPool`] (loaded
/// there, on the networks' device and in their dtype, when no stream holds them; progress to
/// stderr).
fn load_networks(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
    settings: &EngineSettings,
) -> Result<ProcessorNetworks> {
    ProcessorNetworks::load(
        preprocess::networks_for(params),
        NetworkPool::global(),
        &settings.hub_options(),
        models.dtype,
        &models.device,
        &mut crate::log::progress,
    )
}

/// The safety checker `params` asks for: the pipeline folder's own `safety_checker/` (diffusers'
/// layout, as SD 1.5 repositories ship it), else `CompVis/stable-diffusion-safety-checker`
/// resolved like a model; none when `use_safety_checker` is off. The engine calls it on its
/// builder thread before a hot change turns the checker on, so the frame thread finds it loaded.
pub(crate) fn load_safety_checker(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
    settings: &EngineSettings,
) -> Result<Option<Arc<Network>>> {
    if !params.use_safety_checker {
        return Ok(None);
    }
    let pool = NetworkPool::global();
    let mut progress = crate::log::progress;
    let net = match own_safety_checker(models) {
        Some(own) => pool.get_path(
            NetworkKind::SafetyChecker,
            &own,
            models.dtype,
            &models.device,
            &mut progress,
        )?,
        None => pool
            .get(
                NetworkRequest::SAFETY_CHECKER,
                &settings.hub_options(),
                models.dtype,
                &models.device,
                &mut progress,
            )
            .map_err(|e| match e {
                Error::ModelNotFound { id, detail } => Error::ModelNotFound {
                    id,
                    detail: format!(
                        "{detail}. The safety checker is on (`use_safety_checker`, true by \
                         default as in Daydream) and the model folder has no safety_checker/: \
                         provide these weights, or set use_safety_checker to false"
                    ),
                },
                other => other,
            })?,
    };
    Ok(Some(net))
}

/// Whether the safety checker `params` asks for is loaded already (or none is asked for).
pub(crate) fn safety_checker_ready(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
    settings: &EngineSettings,
) -> bool {
    if !params.use_safety_checker {
        return true;
    }
    let pool = NetworkPool::global();
    match own_safety_checker(models) {
        Some(own) => pool
            .find_path(
                NetworkKind::SafetyChecker,
                &own,
                models.dtype,
                &models.device,
            )
            .is_some(),
        None => pool
            .find(
                NetworkRequest::SAFETY_CHECKER,
                &settings.hub_options(),
                models.dtype,
                &models.device,
            )
            .is_some(),
    }
}

/// The pipeline folder's own `safety_checker/`, when it has one.
fn own_safety_checker(models: &StableDiffusionModels) -> Option<std::path::PathBuf> {
    let own = models.dir.join("safety_checker");
    own.join("config.json").is_file().then_some(own)
}

/// The bank `params.cached_attention` asks for (none when disabled).
fn attention_bank(params: &StreamDiffusionParams) -> Result<Option<AttentionBank>> {
    let c = params.cached_attention;
    if !c.enabled {
        return Ok(None);
    }
    Ok(Some(AttentionBank::new(
        c.max_frames as usize,
        c.interval as usize,
    )?))
}

/// [−1, 1] → [0, 1] in f32 (control images live in [0, 1]).
fn to_unit(x: &Tensor) -> Result<Tensor> {
    Ok(((x.to_dtype(DType::F32)? + 1.0)? / 2.0)?)
}

/// Seed of the similar-image filter's coin flips (the reference uses Python's unseeded `random`).
const FILTER_SEED: u64 = 0x5d5f_11e7;
