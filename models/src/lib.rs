#![deny(missing_docs)]
//! sdstream's networks and the files they come from: the floor between the kernels and the
//! engine, which knows candle, the kernels and the formats, and nothing of parameters, the hub,
//! pipelines or engines. sdstream re-exports it as `sdstream::model` (with the loading of a
//! whole checkpoint, `model::bundle`, and the process-wide pool, `model::pool`, which are its own).
//!
//! Every network is built from its checkpoint's own `config.json` (one config struct per network,
//! read with [`read_config`] and checked against [`limits`]) and its safetensors weights, mapped
//! and checked tensor by tensor against what the config implies before any is read
//! ([`open_component`], [`weights`]); nothing assumes Stable Diffusion's full-size shapes.

pub mod activation;
pub mod attention_bank;
pub mod checked_backend;
pub mod clip;
pub mod clip_vision;
pub mod controlnet;
pub mod conv_transpose;
pub mod cuda_graph;
pub mod depth_anything;
pub mod dinov2;
pub mod dpt;
pub mod error;
pub mod hed;
pub mod ip_adapter;
/// The kernels crate, where the networks have always found it.
pub use sdstream_kernels as kernels;
pub mod limits;
pub mod lineart;
pub mod lineart_anime;
pub mod lora;
pub mod openpose_body;
pub mod openpose_cpm;
pub mod pickle;
pub mod raft;
pub mod resize;
pub mod rrdbnet;
pub mod safety_checker;
pub mod single_file;
pub mod taesd;
mod tensor_source;
pub mod tokenizer;
pub mod torch_file;
pub mod unet;
pub mod unet_blocks;
mod unet_config;
pub mod vae;
pub mod weight_names;
pub mod weight_table;
pub mod weights;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use checked_backend::{CheckedBackend, Mode};
pub use error::{Error, Result};
use weights::WeightsFile;

/// Reads a diffusers/transformers `config.json` into a network's config struct.
///
/// Unknown keys are ignored (diffusers configs carry many that do not change the graph); missing
/// keys take the struct's serde defaults, which mirror diffusers' constructor defaults. An error
/// names the file and, for a value of the wrong type, its key.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = read_bounded(path, MAX_CONFIG_BYTES)?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| Error::ModelLoad {
        path: path.to_path_buf(),
        detail: format!("bad config: {}", describe_json_error(&e)),
    })
}

/// Most bytes of a JSON config in a checkpoint (`config.json`, `model_index.json`,
/// `scheduler_config.json`, `tokenizer_config.json`, …). Real ones take a few KiB (a safety
/// checker's, with both of CLIP's tower configs inline, among the largest).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Most bytes of a tokenizer's vocabulary files (`tokenizer.json`, `vocab.json`, `merges.txt`):
/// CLIP's `tokenizer.json` takes 1.7 MiB.
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// Most bytes of a shard index (`*.safetensors.index.json`; a diffusers SDXL UNet's is about
/// 200 KB).
pub const MAX_INDEX_BYTES: u64 = 16 << 20;

/// The most bytes a reader of this crate takes from a file named `name` (a path in a
/// checkpoint's folder, `unet/config.json`), by its kind: a shard index, a tokenizer's
/// vocabulary, any other JSON or text file (a config). `None` for everything else, the weight
/// files, which their readers bound by their headers instead. Whoever fetches a checkpoint's
/// files (the hub download) refuses a larger one before a byte of it arrives.
pub fn max_bytes_of(name: &str) -> Option<u64> {
    let file = name.rsplit('/').next().unwrap_or(name);
    if file.ends_with(".index.json") {
        Some(MAX_INDEX_BYTES)
    } else if matches!(file, "tokenizer.json" | "vocab.json" | "merges.txt") {
        Some(MAX_TOKENIZER_BYTES)
    } else if file.ends_with(".json") || file.ends_with(".txt") {
        Some(MAX_CONFIG_BYTES)
    } else {
        None
    }
}

/// The size of `path`, refused before anything is read when it is not a regular file (a FIFO
/// would block the load, a device would never end) or holds more than `limit` bytes: a
/// checkpoint from the hub is an attacker's choice, and a config of some GiB would otherwise be
/// read whole into memory.
pub fn check_bounded(path: &Path, limit: u64) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let fail = |detail: String| Error::ModelLoad {
        path: path.to_path_buf(),
        detail,
    };
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if meta.len() > limit {
        return Err(fail(format!(
            "{} bytes, where a file of its kind holds at most {limit}",
            meta.len()
        )));
    }
    Ok(meta.len())
}

/// Reads a checkpoint's metadata file whole once [`check_bounded`] has passed it, and never
/// more than `limit` bytes of it (should it grow meanwhile).
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let len = check_bounded(path, limit)?;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::with_capacity(len as usize);
    std::fs::File::open(path)
        .map_err(io)?
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(Error::ModelLoad {
            path: path.to_path_buf(),
            detail: format!("grew past {limit} bytes while it was read"),
        });
    }
    Ok(bytes)
}

/// A serde error with the path of the value at fault, when there is one (`layers_per_block: …`).
pub fn describe_json_error<E: std::fmt::Display>(e: &serde_path_to_error::Error<E>) -> String {
    match e.path().to_string().as_str() {
        // "." is the root, "?" a position serde could not name (a syntax error).
        "." | "?" | "" => e.inner().to_string(),
        path => format!("`{path}`: {}", e.inner()),
    }
}

/// An empty `Vec` with room for `len` items, or an error when the host cannot provide it: for
/// sizes a config decides, so that an absurd one fails the load instead of aborting the process.
pub fn try_vec<T>(len: usize, what: &str) -> candle_core::Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|e| {
        candle_core::Error::Msg(format!("cannot allocate {what} ({len} items): {e}"))
    })?;
    Ok(v)
}

/// Picks the weights file of a component folder: the first of
/// [`weight_names::candidates`] there is (safetensors or a torch pickle, whole or sharded, the
/// fp16 variant first when `prefer_fp16`). An index is returned as itself; [`WeightsFile::open`]
/// opens its shards.
pub fn weights_file(dir: &Path, stem: &str, prefer_fp16: bool) -> Result<PathBuf> {
    weight_names::candidates(stem, prefer_fp16)
        .into_iter()
        .map(|c| dir.join(c.file))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            let held = weight_names::held_in(dir);
            Error::ModelLoad {
                path: dir.to_path_buf(),
                detail: format!(
                    "no weights: expected one of {} in this folder{}",
                    weight_names::describe(stem),
                    weight_names::what_is_held(&held)
                ),
            }
        })
}

/// Opens one network folder the way every loader does: reads and checks `dir/config.json`,
/// picks the weights file (`{stem}.safetensors`, or the fp16 variant when `dtype` is f16/bf16
/// or that is all there is), checks it against the config and builds the network.
///
/// In order, each step before any weight is read:
/// 1. `validate` checks the config (limits and supported options);
/// 2. the weights header is checked ([`WeightsFile::open`]: dtypes, shapes, byte ranges within
///    the file);
/// 3. `build` runs over a probe that compares every tensor the config implies with the header
///    and reads none;
/// 4. float tensors the network does not use (and `tolerated` does not excuse) are refused, and
///    the used ones are scanned for NaN/Inf.
///
/// Then `build` runs again over the real weights. Errors name the file at fault: config.json for
/// a bad or unsupported configuration (including an [`Error::UnsupportedConfig`] raised while
/// building), the weights file (and the tensor) for anything else.
pub fn open_component<C, M>(
    dir: &Path,
    stem: &str,
    dtype: DType,
    device: &Device,
    tolerated: fn(&str) -> bool,
    validate: impl FnOnce(&C) -> Result<()>,
    build: impl Fn(&C, VarBuilder<'static>) -> Result<M>,
) -> Result<M>
where
    C: DeserializeOwned,
{
    open_component_with_lora(dir, stem, dtype, device, tolerated, None, validate, build)
        .map(|(model, _)| model)
}

/// [`open_component`] with LoRA deltas fused into the tensors they target: the probe also
/// checks every delta against its tensor's shape, and that every layer of the LoRA found its
/// tensor (a LoRA for another network is an error naming its first stray layer). Also returns
/// the tensors the network was built from ([`weight_table`]), for a later LoRA change.
#[allow(clippy::too_many_arguments)]
pub fn open_component_with_lora<C, M>(
    dir: &Path,
    stem: &str,
    dtype: DType,
    device: &Device,
    tolerated: fn(&str) -> bool,
    lora: Option<Arc<lora::LoraDeltas>>,
    validate: impl FnOnce(&C) -> Result<()>,
    build: impl Fn(&C, VarBuilder<'static>) -> Result<M>,
) -> Result<(M, weight_table::WeightTable)>
where
    C: DeserializeOwned,
{
    let weights = weights_file(dir, stem, weight_names::prefers_fp16(dtype))?;
    open_component_file(
        dir, &weights, dtype, device, tolerated, lora, validate, build,
    )
}

/// [`open_component_with_lora`] with the weights file chosen by the caller (a safetensors file
/// or a PyTorch checkpoint, [`WeightsFile::open`]) beside `dir/config.json`.
#[allow(clippy::too_many_arguments)]
pub fn open_component_file<C, M>(
    dir: &Path,
    weights: &Path,
    dtype: DType,
    device: &Device,
    tolerated: fn(&str) -> bool,
    lora: Option<Arc<lora::LoraDeltas>>,
    validate: impl FnOnce(&C) -> Result<()>,
    build: impl Fn(&C, VarBuilder<'static>) -> Result<M>,
) -> Result<(M, weight_table::WeightTable)>
where
    C: DeserializeOwned,
{
    let config_path = dir.join("config.json");
    let config: C = read_config(&config_path)?;
    validate(&config).map_err(|e| in_file(&config_path, e))?;
    let file = Arc::new(WeightsFile::open(weights)?);
    build_checked(
        &file,
        &config_path,
        &config,
        dtype,
        device,
        tolerated,
        lora,
        build,
    )
}

/// Opens one weights file of a network that has no config file — a safetensors file, or a
/// PyTorch checkpoint (`.pth`, `.pt`, `.ckpt`; read without running its pickle code) — with the
/// checks of [`open_component`]: `config` reads the network's sizes from the tensors' names
/// and shapes (float tensors only), the probe build compares every tensor the sizes imply with
/// the file, unused and non-finite tensors are refused, then the network is built over the
/// real weights. Errors name the file.
pub fn open_weights<C, M>(
    path: &Path,
    dtype: DType,
    device: &Device,
    config: impl FnOnce(&HashMap<String, Vec<usize>>) -> Result<C>,
    build: impl Fn(&C, VarBuilder<'static>) -> Result<M>,
) -> Result<M> {
    let file = Arc::new(WeightsFile::open(path)?);
    let shapes: HashMap<String, Vec<usize>> = file
        .float_tensors()
        .map(|(name, shape)| (name.to_string(), shape.to_vec()))
        .collect();
    let config = config(&shapes).map_err(|e| in_file(path, e))?;
    build_checked(
        &file,
        path,
        &config,
        dtype,
        device,
        no_unused_tensors,
        None,
        build,
    )
    .map(|(model, _)| model)
}

/// The shared tail of the loaders: the probe build over `file` (errors about the config name
/// `config_path`), the unused-tensor, LoRA-target and NaN/Inf checks, then the real build,
/// recording the tensors it uses.
#[allow(clippy::too_many_arguments)]
fn build_checked<C, M>(
    file: &Arc<WeightsFile>,
    config_path: &Path,
    config: &C,
    dtype: DType,
    device: &Device,
    tolerated: fn(&str) -> bool,
    lora: Option<Arc<lora::LoraDeltas>>,
    build: impl Fn(&C, VarBuilder<'static>) -> Result<M>,
) -> Result<(M, weight_table::WeightTable)> {
    let build_from = |mode| {
        let (vb, used) =
            CheckedBackend::var_builder(file.clone(), mode, dtype, device, lora.clone());
        let model = build(config, vb).map_err(|e| match e {
            Error::UnsupportedConfig { .. } => in_file(config_path, e),
            // The backend's own messages (missing tensor, wrong shape, …) read best bare.
            Error::Candle(candle_core::Error::Msg(detail)) => Error::ModelLoad {
                path: file.path().to_path_buf(),
                detail,
            },
            other => in_file(file.path(), other),
        })?;
        let used = std::mem::take(&mut *used.lock().unwrap_or_else(PoisonError::into_inner));
        Ok::<_, Error>((model, used))
    };
    let (probe, used) = build_from(Mode::Probe)?;
    drop(probe);
    file.check_all_used(&used, tolerated)?;
    file.check_finite(&used)?;
    if let Some(lora) = &lora {
        lora.check_all_targeted(&used)?;
    }
    weight_table::recording(|| Ok(build_from(Mode::Load)?.0))
}

/// For [`open_component`]: no unused tensor is tolerated.
pub fn no_unused_tensors(_: &str) -> bool {
    false
}

/// Wraps an error as a [`Error::ModelLoad`] of `path`, unless it already names a file.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::ModelLoad { .. } | Error::Io { .. } => e,
        // A network's own message (a tensor that does not fit, a key at fault) reads best bare.
        Error::Candle(candle_core::Error::Msg(detail)) => Error::ModelLoad {
            path: path.to_path_buf(),
            detail,
        },
        other => Error::ModelLoad {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn try_vec_refuses_what_the_host_cannot_hold() {
        // 288 PB of 288-byte items: more than any address space, an abort with Vec::with_capacity.
        let err = super::try_vec::<[u8; 288]>(1_000_000_000_000_000, "resnets")
            .expect_err("cannot be reserved")
            .to_string();
        assert!(
            err.contains("resnets") && err.contains("1000000000000000"),
            "{err}"
        );
        assert!(super::try_vec::<u32>(16, "ids").expect("small").capacity() >= 16);
    }
}
