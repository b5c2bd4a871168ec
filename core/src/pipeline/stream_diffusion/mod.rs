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

use candle_core::Tensor;

use crate::Result;
use crate::model::attention_bank::AttentionBank;
use crate::model::bundle::StableDiffusionModels;
use crate::model::controlnet::ControlNetModel;
use crate::model::kernels::{KernelPolicy, ThreadHandoff};
use crate::params::{EngineSettings, StreamDiffusionParams};
pub(crate) use crate::pipeline::accepted::{check_control_ids, check_supported};
use crate::pipeline::conditioning::PromptCache;
use crate::pipeline::controlnet::PreparedControls;
use crate::pipeline::cross_stream::BatchMember;
use crate::pipeline::filter::SimilarImageFilter;
use crate::pipeline::image_prompt::ImagePromptState;
pub(crate) use crate::pipeline::image_prompt::{
    load as load_image_prompt, prefetch as prefetch_style_image, ready as image_prompt_ready,
};
use crate::pipeline::stream_batch::{Conditioning, StreamState};
use crate::pipeline::style_image::StyleImage;
use crate::pipeline::transition::{Glide, TransitionProgress};
use crate::preprocess::latent::LatentChain;
use crate::preprocess::networks::{Network, ProcessorNetworks};
use crate::preprocess::{self};
use crate::sampling::rng::TorchGenerator;
use crate::status::{Activity, EngineState, EngineStatus, params_hash};

mod frame;
mod input;
mod load;
mod update;

pub use input::{FrameInput, TensorInput};
pub(crate) use load::{load_safety_checker, safety_checker_ready};

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
    /// The kernel policy every call runs under: the settings', else the one current where the
    /// stream was made (its networks loaded under it).
    kernels: KernelPolicy,
    /// Its place among the streams that batch their UNet calls on these networks; `None` when
    /// `cross_stream_batching` is off.
    batch: Option<BatchMember>,
    /// The spacing of its input frames, the frame budget when the settings set none.
    pacing: FramePacing,
    /// When the frame in progress came in to [`process`](Self::process).
    arrival: Option<Instant>,
    /// When the frame in progress is due (its arrival plus the budget), for the scheduler.
    deadline: Option<Instant>,
    /// What the last call left queued on the device and on which thread: a host may call from
    /// several threads (Python's pool, a C host's), and each thread queues on its own CUDA
    /// stream.
    handoff: ThreadHandoff,
}

/// An exponential average of the spacing of a stream's input frames.
#[derive(Debug, Default, Clone, Copy)]
struct FramePacing {
    last_arrival: Option<Instant>,
    interval: Option<Duration>,
}

impl FramePacing {
    /// A frame arrived `now`; a gap of more than 2 s (a pause) restarts the average.
    fn arrived(&mut self, now: Instant) {
        if let Some(last) = self.last_arrival {
            let gap = now.saturating_duration_since(last);
            self.interval = match self.interval {
                _ if gap > Duration::from_secs(2) => None,
                Some(i) => Some(i.mul_f64(0.8) + gap.mul_f64(0.2)),
                None => Some(gap),
            };
        }
        self.last_arrival = Some(now);
    }
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

    /// The status report, in the [`Engine`](crate::Engine)'s schema: state `ONLINE`, fps,
    /// frame and error counters, the last error, the last frame's stage timings, the
    /// parameters and how often they changed (a reload counts as a restart). Frames and
    /// errors are those of [`process`](Self::process) and [`update`](Self::update).
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

    /// The last frame's output latent: x̂₀ after `latent_postprocessing`, `[1, C, h, w]` in the
    /// models' dtype (what the decoder took, and what `latent_feedback` blends with next).
    pub fn last_latent(&self) -> Option<&Tensor> {
        self.previous_latent.as_ref()
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

impl StreamDiffusion {
    /// Waits until the work this thread queued for the stream is done (before another thread
    /// drops it: what it frees there is freed on that thread's CUDA stream).
    pub(crate) fn settle(&self) -> Result<()> {
        Ok(self.models.device.synchronize()?)
    }

    /// Runs `call`, one of this stream's calls from whichever host thread makes it: its work
    /// after the last call's, where another thread made that ([`ThreadHandoff`]), and what it
    /// leaves queued marked for the next, also when it fails.
    fn handed<R>(&mut self, call: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        let device = self.models.device.clone();
        self.handoff.enter(&device)?;
        let result = call(self);
        let marked = self.handoff.leave(&device);
        let value = result?;
        marked?;
        Ok(value)
    }
}
