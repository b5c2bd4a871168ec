//! Building a stream: its networks from the model pool, its conditioning and its state.
use std::collections::HashMap;
use std::sync::Arc;

use crate::model::attention_bank::AttentionBank;
use crate::model::bundle::StableDiffusionModels;
use crate::model::kernels::ThreadHandoff;
use crate::model::pool::ModelPool;
use crate::params::{EngineSettings, StreamDiffusionParams};
use crate::pipeline::accepted::check_supported;
use crate::pipeline::conditioning::{PromptCache, build_state, prompt_embedding};
use crate::pipeline::controlnet::attach_controlnets;
use crate::pipeline::cross_stream::MemberLabel;
use crate::pipeline::filter::SimilarImageFilter;
use crate::pipeline::image_prompt::{self};
use crate::pipeline::stream_batch::{AddedText, Conditioning};
use crate::pipeline::style_image::StyleImage;
use crate::preprocess::latent::LatentChain;
use crate::preprocess::networks::{
    Network, NetworkKind, NetworkPool, NetworkRequest, ProcessorNetworks,
};
use crate::preprocess::{self};
use crate::sampling::rng::TorchGenerator;
use crate::{Error, Result};

use super::{FramePacing, StageTimings, StreamDiffusion, StreamReport};

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
    pub(super) fn with_models_and_style(
        models: Arc<StableDiffusionModels>,
        params: StreamDiffusionParams,
        settings: EngineSettings,
        host_style: Option<StyleImage>,
    ) -> Result<Self> {
        // The stream runs, and its networks loaded, under one kernel policy.
        let kernels = settings.kernel_policy();
        let _policy = kernels.enter();
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
        // A stream that skips the diffusion makes no network calls to share.
        let batch = (settings.cross_stream_batching && !params.skip_diffusion).then(|| {
            models.batcher.join(MemberLabel {
                model_id: params.model_id.clone(),
                size: (params.width as usize, params.height as usize),
            })
        });
        let mut stream = Self {
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
            kernels,
            batch,
            pacing: FramePacing::default(),
            arrival: None,
            deadline: None,
            handoff: ThreadHandoff::default(),
        };
        // The prompt's embedding, the noise and the rest were queued on this thread: a first
        // call from another waits for them.
        let device = stream.models.device.clone();
        stream.handoff.leave(&device)?;
        Ok(stream)
    }
}

/// The networks the processors of `params` run, from the process-wide [`NetworkPool`] (loaded
/// there, on the networks' device and in their dtype, when no stream holds them; progress to
/// stderr).
pub(super) fn load_networks(
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
pub(super) fn attention_bank(params: &StreamDiffusionParams) -> Result<Option<AttentionBank>> {
    let c = params.cached_attention;
    if !c.enabled {
        return Ok(None);
    }
    Ok(Some(AttentionBank::new(
        c.max_frames as usize,
        c.interval as usize,
    )?))
}

/// Seed of the similar-image filter's coin flips (the reference uses Python's unseeded `random`).
pub(super) const FILTER_SEED: u64 = 0x5d5f_11e7;
