//! The checks a checkpoint passes before its networks load: the pipeline index, the tokenizer,
//! the widths and channels the networks must agree on, and what LoRAs may touch.

use std::path::Path;

use crate::model::clip::ClipTextModel;
use crate::model::lora::{LoraStack, LoraTarget};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::params::json_kind;
use crate::{Error, Result};

use super::{Autoencoder, SecondTextEncoder};

pub(super) fn check_model_index(dir: &Path, full_vae: bool) -> Result<()> {
    let path = dir.join("model_index.json");
    let fail = |detail: String| Error::ModelLoad {
        path: path.clone(),
        detail,
    };
    let bytes = sdstream_models::read_bounded(&path, sdstream_models::MAX_CONFIG_BYTES)?;
    let index: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("not JSON: {e}")))?;
    let Some(index) = index.as_object() else {
        return Err(fail(format!(
            "{} where diffusers' pipeline index is an object (component name → [library, class])",
            json_kind(&index)
        )));
    };
    if !index
        .get("_class_name")
        .is_some_and(serde_json::Value::is_string)
    {
        return Err(fail(
            "no `_class_name` string (the pipeline class diffusers loads the folder as)".into(),
        ));
    }
    let mut needed = vec!["scheduler", "tokenizer", "text_encoder", "unet"];
    if full_vae {
        needed.push("vae");
    }
    for name in needed {
        let entry = index
            .get(name)
            .and_then(|v| v.as_array())
            .filter(|v| v.len() == 2);
        match entry {
            Some(pair) if pair.iter().all(serde_json::Value::is_string) => {}
            Some(pair) if pair.iter().all(serde_json::Value::is_null) => {
                return Err(fail(format!(
                    "`{name}` is [null, null]: the checkpoint declares no {name}, which a stream \
                     needs"
                )));
            }
            _ => {
                return Err(fail(format!(
                    "`{name}` is {} where a [library, class] pair is due",
                    index.get(name).map_or("missing", json_kind)
                )));
            }
        }
    }
    Ok(())
}

/// The tokenizer must not produce more ids than the text encoder has positions, or every
/// prompt would fail to encode.
/// `suffix` is "" for the first pair, "_2" for SDXL's second (`tokenizer_2/`, `text_encoder_2/`).
pub(super) fn check_tokenizer_fits(
    dir: &Path,
    suffix: &str,
    tokenizer: &ClipTokenizer,
    text_encoder: &ClipTextModel,
) -> Result<()> {
    let positions = text_encoder.config().max_position_embeddings;
    if tokenizer.max_length() > positions {
        return Err(Error::ModelLoad {
            path: dir.join(format!("tokenizer{suffix}/tokenizer_config.json")),
            detail: format!(
                "the tokenizer's length ({}, `model_max_length`; 77 when absent) is longer than \
                 the text encoder's {positions} positions (`max_position_embeddings` of \
                 text_encoder{suffix}/config.json)",
                tokenizer.max_length()
            ),
        });
    }
    Ok(())
}

/// The UNet's cross-attention must read embeddings as wide as the text encoder makes them, or
/// every frame would fail.
pub(super) fn check_text_width(
    dir: &Path,
    unet: &UNet2DConditionModel,
    text_encoder: &ClipTextModel,
    second: Option<&SecondTextEncoder>,
) -> Result<()> {
    let hidden = text_encoder.config().hidden_size;
    let (total, whose) = match second {
        None => (
            hidden,
            format!(
                "the text encoder's width (`hidden_size` {hidden} in text_encoder/config.json)"
            ),
        ),
        Some(second) => {
            let other = second.text_encoder.config().hidden_size;
            (
                hidden + other,
                format!(
                    "the two text encoders' widths together ({hidden} + {other}, `hidden_size` in \
                     text_encoder/ and text_encoder_2/config.json)"
                ),
            )
        }
    };
    match unet.text_width() {
        Some(width) if width != total => Err(Error::ModelLoad {
            path: dir.join("unet/config.json"),
            detail: format!("`cross_attention_dim` {width} does not match {whose}"),
        }),
        _ => Ok(()),
    }
}

/// The UNet denoises the autoencoder's latents: its input and output channels must be the
/// latent channels.
pub(super) fn check_latent_channels(
    dir: &Path,
    unet: &UNet2DConditionModel,
    autoencoder: &Autoencoder,
    autoencoder_dir: &Path,
) -> Result<()> {
    let latent = autoencoder.latent_channels();
    let config = unet.config();
    for (key, channels) in [
        ("in_channels", config.in_channels),
        ("out_channels", config.out_channels),
    ] {
        if channels != latent {
            return Err(Error::ModelLoad {
                path: dir.join("unet/config.json"),
                detail: format!(
                    "`{key}` {channels} does not match the {latent} latent channels of the \
                     autoencoder ({})",
                    autoencoder_dir.join("config.json").display()
                ),
            });
        }
    }
    Ok(())
}

/// Runs one loading step, reporting its start and duration.
/// Fails, naming the file, when a LoRA of `stack` patches a second text encoder (an SDXL LoRA)
/// and the checkpoint has none.
pub(super) fn refuse_second_encoder_loras(stack: &LoraStack) -> Result<()> {
    match stack
        .iter()
        .find(|(f, _)| f.patches(LoraTarget::TextEncoder2))
    {
        Some((file, _)) => Err(Error::ModelLoad {
            path: file.path().to_path_buf(),
            detail: "the LoRA patches a second text encoder (an SDXL LoRA); this checkpoint \
                     has none"
                .into(),
        }),
        None => Ok(()),
    }
}
