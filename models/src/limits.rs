//! Upper bounds on the config values that size a network.
//!
//! A `config.json` decides how many blocks are built, how wide every weight is and how large a
//! few host-side tables are (the sinusoidal frequencies, CLIP's causal mask). A value far beyond
//! any real checkpoint is refused here, before any weight is read, with an error naming the key,
//! the value and the limit; the weights file is then checked tensor by tensor against what the
//! config implies (see [`super::weights`]).
//!
//! The limits are several times the largest value of every Stable Diffusion 1.x / 2.x / XL
//! checkpoint and their ControlNets (widest UNet level 1280 channels, 2 resnets per level, up
//! to 10 transformer blocks per level, 20 heads, text widths 768 / 1024 / 2048, 2816-wide SDXL
//! added conditioning, CLIP-L / OpenCLIP-H / bigG with 12 / 23 / 32 layers, 77 positions, 49408
//! tokens, VAE widths up to 512, latent channels 4 (16 in later VAEs)), so a real checkpoint never
//! meets them, while the largest network they allow still has sizes whose products fit easily in
//! 64 bits and host tables of at most a few tens of MiB.

use crate::{Error, Result};

/// Levels of a UNet, VAE or TAESD (entries of `block_out_channels`): 4 in SD1.x/2.x, 3 in SDXL.
pub const MAX_LEVELS: usize = 8;
/// Channels of one level or layer: 1280 at most in SD/SDXL UNets, 512 in their VAEs.
pub const MAX_CHANNELS: usize = 8192;
/// Resnets per level (`layers_per_block`): 2 in SD/SDXL UNets and VAEs, 1 in some ControlNets.
pub const MAX_LAYERS_PER_BLOCK: usize = 16;
/// Transformer blocks per attention (`transformer_layers_per_block`): 10 at SDXL's deepest level.
pub const MAX_TRANSFORMER_LAYERS: usize = 64;
/// Attention heads: 8 (SD1.x), 5–20 (SD2.x, SDXL), 12–20 in CLIP text encoders.
pub const MAX_HEADS: usize = 1024;
/// Widths of embeddings: text (768 / 1024 / 2048), time (1280), SDXL's added conditioning
/// input (2816), CLIP's MLP (3072 / 4096 / 5120).
pub const MAX_WIDTH: usize = 65536;
/// Image and latent channels: 3 and 4 (9 for inpainting UNets, 16 for later VAEs).
pub const MAX_IO_CHANNELS: usize = 256;
/// Convolution kernel sides: 3 everywhere in SD.
pub const MAX_KERNEL: usize = 15;
/// Convolution padding: 1.
pub const MAX_PADDING: usize = 16;
/// GroupNorm groups: 32.
pub const MAX_GROUPS: usize = 1024;
/// CLIP text transformer layers: 12 (CLIP-L), 23 (OpenCLIP-H), 32 (bigG).
pub const MAX_TEXT_LAYERS: usize = 128;
/// CLIP vocabulary: 49408 tokens.
pub const MAX_VOCAB: usize = 1 << 20;
/// CLIP positions: 77 (248 in long-context variants). Sizes the host-side causal mask
/// (positions² values, 64 MiB at this limit).
pub const MAX_POSITIONS: usize = 4096;
/// TAESD residual blocks per level: 1 or 3.
pub const MAX_TINY_BLOCKS: usize = 64;
/// TAESD upsampling factor per level: 2.
pub const MAX_UPSAMPLING: usize = 16;

/// Checks one network's config values against their limits; the first value out of bounds is
/// an [`Error::UnsupportedConfig`] naming the key, the value and the limit.
pub struct Limits {
    model: &'static str,
}

impl Limits {
    /// Limits for the network called `model` in errors (`UNet`, `CLIP text encoder`, …).
    pub fn new(model: &'static str) -> Self {
        Self { model }
    }

    fn error(&self, key: &str, detail: String) -> Error {
        Error::UnsupportedConfig {
            model: self.model.into(),
            option: key.into(),
            detail,
        }
    }

    /// `value` ≤ `max`.
    pub fn value(&self, key: &str, value: usize, max: usize) -> Result<()> {
        if value > max {
            return Err(self.error(
                key,
                format!("{value} is above the limit of {max} (real checkpoints stay far below)"),
            ));
        }
        Ok(())
    }

    /// Every entry ≤ `max`; an entry out of bounds is named `key[i]`.
    pub fn values(&self, key: &str, values: &[usize], max: usize) -> Result<()> {
        for (i, &v) in values.iter().enumerate() {
            self.value(&format!("{key}[{i}]"), v, max)?;
        }
        Ok(())
    }

    /// A list of at most `max` entries.
    pub fn count(&self, key: &str, len: usize, max: usize) -> Result<()> {
        if len > max {
            return Err(self.error(key, format!("has {len} entries, above the limit of {max}")));
        }
        Ok(())
    }

    /// A finite number, and positive when `positive` (else non-negative).
    pub fn finite(&self, key: &str, value: f64, positive: bool) -> Result<()> {
        let ok = value.is_finite() && if positive { value > 0.0 } else { value >= 0.0 };
        if !ok {
            let want = if positive { "positive" } else { "non-negative" };
            return Err(self.error(key, format!("{value} is not a finite {want} number")));
        }
        Ok(())
    }
}

/// Refuses the first of `fields` that is 0, naming it: the sizes and counts a network cannot be
/// built with none of (channels, layers, scaling factors).
pub fn at_least_one(fields: &[(&str, usize)]) -> Result<()> {
    match fields.iter().find(|(_, value)| *value == 0) {
        Some((field, _)) => Err(Error::param(*field, "must be at least 1")),
        None => Ok(()),
    }
}

/// Refuses a `scaling_factor` (or any factor) that is not a finite positive number, naming
/// `field`.
pub fn positive_factor(field: &str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::param(
            field,
            format!("must be a positive number, got {value}"),
        ))
    }
}
