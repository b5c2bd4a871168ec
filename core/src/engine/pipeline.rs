//! What the engine's threads drive: a frame-in/frame-out [`Pipeline`] and the
//! [`PipelineFactory`] that builds one for a parameter set. [`StreamDiffusion`] is the real
//! pipeline; the traits let the engine's scheduling be tested with stand-ins.

use std::sync::{Arc, Mutex};

use crate::frame::{Frame, Image};
use crate::model::bundle::StableDiffusionModels;
use crate::model::pool::ModelPool;
use crate::params::{EngineSettings, StreamDiffusionParams, Transition, Update};
use crate::pipeline::ControlPreparer;
use crate::pipeline::stream_diffusion::{
    FrameInput, StageTimings, StreamDiffusion, image_prompt_ready, load_image_prompt,
    load_safety_checker, prefetch_style_image, safety_checker_ready,
};
use crate::preprocess;
use crate::preprocess::networks::{Network, NetworkPool, ProcessorNetworks};
use crate::{Error, Result};

/// A running stream the worker thread owns.
pub(crate) trait Pipeline: Send {
    /// One frame in, one frame out, with the frame's control images by ControlNet model_id and
    /// any made ahead by a preparer of this pipeline (used when they still apply; stand-ins
    /// without preprocessors ignore them).
    fn process(&mut self, input: FrameInput<'_>) -> Result<Image>;
    /// What makes the control images of the frame after `current` on another thread while
    /// this pipeline processes `current`; `None` when nothing can run ahead.
    fn control_preparer(&self, current: &Frame) -> Result<Option<ControlPreparer>> {
        let _ = current;
        Ok(None)
    }
    /// Applies new parameters in place, a prompt or seed change gliding as `transition` says.
    /// The engine calls it only for hot (or unchanged) updates; reloads are built by the
    /// factory instead.
    fn update(&mut self, params: StreamDiffusionParams, transition: Transition) -> Result<Update>;
    /// Hands in (or withdraws) the host's IP-Adapter style picture.
    fn set_style_image(&mut self, _picture: Option<crate::StyleImage>) -> Result<()> {
        Ok(())
    }
    /// The parameters in force.
    fn params(&self) -> &StreamDiffusionParams;
    /// Stage timings of the last `process` call.
    fn timings(&self) -> StageTimings;
    /// Waits until the work this thread queued for the pipeline is done: before it is handed
    /// to another thread to be dropped (what it frees there is freed on that thread's CUDA
    /// stream, which nothing orders with this one's).
    fn settle(&self) -> Result<()> {
        Ok(())
    }
}

impl Pipeline for StreamDiffusion {
    fn process(&mut self, input: FrameInput<'_>) -> Result<Image> {
        StreamDiffusion::process(self, input)
    }

    fn control_preparer(&self, current: &Frame) -> Result<Option<ControlPreparer>> {
        StreamDiffusion::control_preparer(self, current)
    }

    fn update(&mut self, params: StreamDiffusionParams, transition: Transition) -> Result<Update> {
        StreamDiffusion::update_with_transition(self, params, transition)
    }

    fn params(&self) -> &StreamDiffusionParams {
        StreamDiffusion::params(self)
    }

    fn set_style_image(&mut self, picture: Option<crate::StyleImage>) -> Result<()> {
        StreamDiffusion::set_style_image(self, picture)
    }

    fn timings(&self) -> StageTimings {
        StreamDiffusion::timings(self)
    }

    fn settle(&self) -> Result<()> {
        StreamDiffusion::settle(self)
    }
}

/// Builds pipelines on the engine's builder thread (initial load, reloads, restarts).
pub(crate) trait PipelineFactory: Send + Sync {
    /// A new pipeline for `params` (already validated), reporting loading steps to `progress`.
    fn build(
        &self,
        params: &StreamDiffusionParams,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Box<dyn Pipeline>>;

    /// Loads, ahead of a ControlNet swap or a hot change, the ControlNets and processor
    /// networks `params` needs that are not loaded yet, so that the serving pipeline can then
    /// take `params` without reading weights. Stand-ins without networks have nothing to load.
    fn preload_networks(
        &self,
        params: &StreamDiffusionParams,
        progress: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let _ = (params, progress);
        Ok(())
    }

    /// Whether every ControlNet in `ids` (model_ids of `params`) and every network of
    /// `params`' processors is loaded, so that taking `params` in place costs no weight reads.
    fn networks_ready(&self, params: &StreamDiffusionParams, ids: &[&str]) -> bool {
        let _ = (params, ids);
        true
    }
}

/// Builds [`StreamDiffusion`]s over networks from a [`ModelPool`] (the process-wide one unless
/// the engine was given another): pipelines of every engine on the same checkpoint share one
/// copy, and a reload that keeps the checkpoint (a width change, say) reuses the weights the
/// running pipeline holds instead of reading them again.
pub(crate) struct StreamDiffusionFactory {
    settings: EngineSettings,
    pool: Arc<ModelPool>,
    /// The processor networks of the last preload, held until a later preload replaces them
    /// (the pool itself keeps only weak references).
    preloaded: Mutex<Option<Preloaded>>,
}

impl StreamDiffusionFactory {
    pub(crate) fn new(settings: EngineSettings, pool: Arc<ModelPool>) -> Self {
        Self {
            settings,
            pool,
            preloaded: Mutex::new(None),
        }
    }

    /// The networks a pipeline for `params` shares, loading them if no pipeline holds them.
    fn models_for(
        &self,
        params: &StreamDiffusionParams,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Arc<StableDiffusionModels>> {
        self.pool.get(params, &self.settings, progress)
    }
}

impl PipelineFactory for StreamDiffusionFactory {
    fn build(
        &self,
        params: &StreamDiffusionParams,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Box<dyn Pipeline>> {
        let models = self.models_for(params, progress)?;
        let device = models.device.clone();
        progress("preparing the stream");
        let stream = StreamDiffusion::with_models(models, params.clone(), self.settings.clone())?;
        // Built on this thread, run on the engine's worker: what the stream computed here (its
        // prompt's embeddings, its noise) is queued on this thread's CUDA stream, which nothing
        // orders with the worker's.
        device.synchronize()?;
        Ok(Box::new(stream))
    }

    fn preload_networks(
        &self,
        params: &StreamDiffusionParams,
        progress: &mut dyn FnMut(&str),
    ) -> Result<()> {
        let models = self.models_for(params, progress)?;
        for (i, net) in params.controlnets.iter().enumerate() {
            models
                .controlnet(&net.model_id, progress)
                .map_err(|e| Error::param(format!("controlnets[{i}].model_id"), e.to_string()))?;
        }
        // Held by the pool only while some stream holds them: the serving pipeline takes
        // them from there when it applies `params`, so keep them until it has.
        let networks = ProcessorNetworks::load(
            preprocess::networks_for(params),
            NetworkPool::global(),
            &self.settings.hub_options(),
            models.dtype,
            &models.device,
            progress,
        )?;
        let checker = load_safety_checker(&models, params, &self.settings)?;
        let adapter = load_image_prompt(&models, params, &self.settings)?;
        prefetch_style_image(params, &self.settings)?;
        // Loaded on this thread, used by the worker's (see `build`).
        models.device.synchronize()?;
        self.preloaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace((networks, checker, adapter));
        Ok(())
    }

    fn networks_ready(&self, params: &StreamDiffusionParams, ids: &[&str]) -> bool {
        self.pool
            .find(params, &self.settings)
            .is_some_and(|models| {
                ids.iter().all(|id| models.cached_controlnet(id).is_some())
                    && ProcessorNetworks::ready(
                        preprocess::networks_for(params),
                        NetworkPool::global(),
                        &self.settings.hub_options(),
                        models.dtype,
                        &models.device,
                    )
                    && safety_checker_ready(&models, params, &self.settings)
                    && image_prompt_ready(&models, params, &self.settings)
            })
    }
}

/// Networks loaded ahead of a change: the processors', the safety checker, the IP-Adapter.
type Preloaded = (
    ProcessorNetworks,
    Option<Arc<Network>>,
    Option<Arc<Network>>,
);

/// Extra passes that fill the stream batch with a frame, so that the next output comes from
/// that frame instead of the zero buffer: n − 1 for a denoising batch of n steps, none
/// without one (frame_buffer_size is 1) or with `skip_diffusion` (no batch to fill).
pub(crate) fn warmup_passes(params: &StreamDiffusionParams) -> usize {
    if params.use_denoising_batch && !params.skip_diffusion {
        params.t_index_list.len().saturating_sub(1)
    } else {
        0
    }
}
