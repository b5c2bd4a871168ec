//! What a stream is conditioned on and starts from: prompt embeddings (cached by text, blended
//! by weight), seed noise (blended), the step coefficients and a fresh stream state.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::model::bundle::StableDiffusionModels;
use crate::params::{Prompt, StreamDiffusionParams};
use crate::pipeline::blend::{blend, blend_noise, normalized_weights};
use crate::pipeline::stream_batch::{StepTensors, StreamState};
use crate::sampling::rng::TorchGenerator;
use crate::{Error, Result};

/// A seed as the u64 torch's `manual_seed` sees (validation keeps it in 0..2^53).
pub(super) fn seed_bits(seed: i64) -> u64 {
    seed as u64
}

/// Latent shape (C, h, w) for the stream's size.
pub(super) fn latent_shape(
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
pub(super) fn step_tensors(
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
pub(super) fn build_state(
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
pub(super) fn seed_noise(
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

/// A text's conditioning: its embedding `[1, 77, D]` and, for SDXL, its pooled embedding
/// `[1, P]`.
#[derive(Debug, Clone)]
pub(super) struct TextEmbedding {
    pub(super) embeds: Tensor,
    pub(super) pooled: Option<Tensor>,
}

/// The (blended) prompt embedding; for SDXL the pooled embeddings blend with the same weights.
pub(super) fn prompt_embedding(
    models: &StableDiffusionModels,
    params: &StreamDiffusionParams,
    cache: &mut PromptCache,
) -> Result<TextEmbedding> {
    match &params.prompt {
        Prompt::Text(text) => cache.embed(models, text),
        Prompt::Weighted(items) => {
            let texts = items
                .iter()
                .map(|(text, _)| cache.embed(models, text))
                .collect::<Result<Vec<_>>>()?;
            let raw: Vec<f64> = items.iter().map(|(_, w)| *w).collect();
            let weights = normalized_weights(&raw, params.normalize_prompt_weights, "prompt")?;
            let method = params.prompt_interpolation_method;
            let embeds: Vec<Tensor> = texts.iter().map(|t| t.embeds.clone()).collect();
            let pooled: Option<Vec<Tensor>> = texts.iter().map(|t| t.pooled.clone()).collect();
            Ok(TextEmbedding {
                embeds: blend(&embeds, &weights, method)?,
                pooled: pooled.map(|p| blend(&p, &weights, method)).transpose()?,
            })
        }
    }
}

/// Text embeddings by text, so switching back to a prompt costs nothing.
#[derive(Debug, Default)]
pub(super) struct PromptCache {
    embeds: HashMap<String, TextEmbedding>,
}

impl PromptCache {
    /// Most embeddings kept (each is 77 × D floats).
    const LIMIT: usize = 64;

    pub(super) fn embed(
        &mut self,
        models: &StableDiffusionModels,
        text: &str,
    ) -> Result<TextEmbedding> {
        if let Some(e) = self.embeds.get(text) {
            return Ok(e.clone());
        }
        let e = if models.second.is_some() {
            let sdxl = models.encode_text_sdxl(text)?;
            TextEmbedding {
                embeds: sdxl.embeds,
                pooled: Some(sdxl.pooled),
            }
        } else {
            TextEmbedding {
                embeds: models.encode_text(text)?,
                pooled: None,
            }
        };
        if self.embeds.len() >= Self::LIMIT {
            self.embeds.clear();
        }
        self.embeds.insert(text.to_string(), e.clone());
        Ok(e)
    }
}
