//! Where model files come from and how networks are built from them.
//!
//! Every network is built from its checkpoint's own `config.json` (one config struct per network,
//! read with [`read_config`]) and its weights are memory-mapped from safetensors with
//! [`load_weights`]; nothing assumes Stable Diffusion's full-size shapes.

pub mod bundle;
pub mod clip;
pub mod controlnet;
pub mod kernels;
pub mod taesd;
pub mod tokenizer;
pub mod unet;
pub(crate) mod unet_blocks;
mod unet_config;
pub mod vae;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads a diffusers/transformers `config.json` into a network's config struct.
///
/// Unknown keys are ignored (diffusers configs carry many that do not change the graph); missing
/// keys take the struct's serde defaults, which mirror diffusers' constructor defaults.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::ModelLoad {
        path: path.to_path_buf(),
        detail: format!("bad config: {e}"),
    })
}

/// Picks the weights file of a component folder: `{stem}.safetensors`, or the
/// `{stem}.fp16.safetensors` variant when that is all there is or when `prefer_fp16` is set.
///
/// `stem` is `diffusion_pytorch_model` for diffusers networks and `model` for transformers ones.
pub fn weights_file(dir: &Path, stem: &str, prefer_fp16: bool) -> Result<PathBuf> {
    let full = dir.join(format!("{stem}.safetensors"));
    let half = dir.join(format!("{stem}.fp16.safetensors"));
    let order = if prefer_fp16 {
        [&half, &full]
    } else {
        [&full, &half]
    };
    order
        .into_iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| Error::ModelLoad {
            path: dir.to_path_buf(),
            detail: format!(
                "no weights: expected {stem}.safetensors or {stem}.fp16.safetensors in this folder"
            ),
        })
}

/// Memory-maps safetensors files into a [`VarBuilder`] that converts every tensor to `dtype` on
/// `device` as it is fetched.
///
/// The header of each file is checked up front so that a missing or truncated file is reported
/// with its path rather than as an opaque tensor error later.
pub fn load_weights(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    for file in files {
        check_safetensors(file)?;
    }
    // SAFETY: the files are mapped read-only; sdstream never writes to them, and a host that
    // truncates a checkpoint while it is loaded is outside what any mmap-based loader can defend.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|e| {
        Error::ModelLoad {
            path: files.first().cloned().unwrap_or_default(),
            detail: e.to_string(),
        }
    })
}

/// Validates a safetensors file up front (8-byte length, JSON header, every tensor's byte range
/// inside the file), so that a truncated or corrupt file is reported with its path.
fn check_safetensors(path: &Path) -> Result<()> {
    if !path.is_file() {
        return Err(Error::ModelLoad {
            path: path.to_path_buf(),
            detail: "file not found".into(),
        });
    }
    // SAFETY: read-only map of a file sdstream only reads.
    unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map(|_| ())
        .map_err(|e| Error::ModelLoad {
            path: path.to_path_buf(),
            detail: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        })
}

/// Opens one network folder the way every loader does: reads and checks `dir/config.json`,
/// picks the weights file (`{stem}.safetensors`, or the fp16 variant when `dtype` is f16/bf16
/// or that is all there is), maps it and builds the network.
///
/// `validate` checks the config before any weight is touched. Errors name the file at fault:
/// config.json for a bad or unsupported configuration (including an
/// [`Error::UnsupportedConfig`] raised while building), the weights file for anything else.
pub fn open_component<C, M>(
    dir: &Path,
    stem: &str,
    dtype: DType,
    device: &Device,
    validate: impl FnOnce(&C) -> Result<()>,
    build: impl FnOnce(&C, VarBuilder<'static>) -> Result<M>,
) -> Result<M>
where
    C: DeserializeOwned,
{
    let config_path = dir.join("config.json");
    let config: C = read_config(&config_path)?;
    validate(&config).map_err(|e| in_file(&config_path, e))?;
    let file = weights_file(dir, stem, matches!(dtype, DType::F16 | DType::BF16))?;
    let vb = load_weights(std::slice::from_ref(&file), dtype, device)?;
    build(&config, vb).map_err(|e| match e {
        Error::UnsupportedConfig { .. } => in_file(&config_path, e),
        other => in_file(&file, other),
    })
}

/// Wraps an error as a [`Error::ModelLoad`] of `path`, unless it already names a file.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::ModelLoad { .. } | Error::Io { .. } => e,
        other => Error::ModelLoad {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}
