//! Parameter updates: hot changes, ControlNet swaps, reloads, and transitions.
use std::sync::Arc;

use crate::Result;
use crate::model::bundle::ModelRequest;
use crate::model::controlnet::ControlNetModel;
use crate::model::pool::ModelPool;
use crate::params::{HotChange, StreamDiffusionParams, Transition, Update, classify};
use crate::pipeline::accepted::check_supported;
use crate::pipeline::conditioning::{build_state, prompt_embedding, seed_noise, step_tensors};
use crate::pipeline::controlnet::attach_controlnets;
use crate::pipeline::image_prompt::{self};
use crate::pipeline::style_image::StyleImage;
use crate::pipeline::transition::Glide;
use crate::status::epoch_ms;

use super::StreamDiffusion;
use super::load::{load_networks, load_safety_checker};

impl StreamDiffusion {
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
        self.handed(|stream| stream.update_here(params, transition))
    }

    fn update_here(
        &mut self,
        params: StreamDiffusionParams,
        transition: Transition,
    ) -> Result<Update> {
        let _policy = self.kernels.enter();
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

    /// Hands in IP-Adapter's style picture (`Some`), used instead of the one at
    /// `ip_adapter_style_image_url` from the next frame on, or goes back to the URL's (`None`).
    /// The picture is encoded once, here, when the adapter is on (else when it is turned on).
    /// On an error the stream keeps its previous picture.
    pub fn set_style_image(&mut self, picture: Option<StyleImage>) -> Result<()> {
        self.handed(|stream| stream.set_style_image_here(picture))
    }

    fn set_style_image_here(&mut self, picture: Option<StyleImage>) -> Result<()> {
        let _policy = self.kernels.enter();
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
}
