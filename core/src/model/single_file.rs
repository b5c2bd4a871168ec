//! Single-file checkpoints (a `model_id` naming a `.safetensors` or `.ckpt` file in the original
//! Stable Diffusion layout) as diffusers folders, which every loader reads.
//!
//! A single file holds the networks but no configs, tokenizer or scheduler: those come from the
//! family's diffusers repository ([`Family::config_repo`], resolved like any model id: a folder
//! under `model_root`, the Hugging Face cache, or the hub, which then serves only the small
//! files), as diffusers' `from_single_file` takes them. The file's tensors are renamed into that
//! repository's layout ([`sdstream_models::single_file`]) and written once, one component at a
//! time, into a folder of the cache ([`cache_root`]) named by the file's identity (path, size,
//! modification time) and the config folder; later loads read that folder directly.

use std::path::{Path, PathBuf};

use sdstream_models::single_file::{self as convert, Family, Layout};
use sdstream_models::weights::WeightsFile;

use crate::hub::{self, HubOptions};
use crate::{Error, Result};

/// Bumped when the conversion changes, so that folders converted before are not reused.
const CONVERSION: u32 = 1;

/// The file a complete conversion writes last: a folder without it is not used.
const COMPLETE: &str = "sdstream-single-file.json";

/// Where converted single files go: `SDSTREAM_CACHE_DIR`, else `$XDG_CACHE_HOME/sdstream`, else
/// `~/.cache/sdstream`, else the system's temporary folder.
pub fn cache_root() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("SDSTREAM_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("sdstream");
    }
    if let Some(home) = var("HOME") {
        return PathBuf::from(home).join(".cache").join("sdstream");
    }
    std::env::temp_dir().join("sdstream")
}

/// The files of a family's repository a conversion copies: everything but weights.
fn config_files(family: Family) -> Vec<&'static str> {
    let mut files = vec![
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "?tokenizer/special_tokens_map.json",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
    ];
    if family == Family::Sdxl {
        files.extend([
            "tokenizer_2/vocab.json",
            "tokenizer_2/merges.txt",
            "tokenizer_2/tokenizer_config.json",
            "?tokenizer_2/special_tokens_map.json",
            "text_encoder_2/config.json",
        ]);
    }
    files
}

/// Reads one JSON config of the config folder.
fn config_value(dir: &Path, rel: &str) -> Result<serde_json::Value> {
    let path = dir.join(rel);
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::ModelLoad {
        path,
        detail: format!("not JSON: {e}"),
    })
}

/// The sizes the file's names depend on, from the family's configs.
fn layout(dir: &Path, family: Family) -> Result<Layout> {
    let unet = config_value(dir, "unet/config.json")?;
    let vae = config_value(dir, "vae/config.json")?;
    let bad = |rel: &str, detail: &str| Error::ModelLoad {
        path: dir.join(rel),
        detail: detail.into(),
    };
    let per_block = &unet["layers_per_block"];
    let unet_layers_per_block = match per_block {
        serde_json::Value::Array(levels) => {
            let first = levels.first().and_then(serde_json::Value::as_u64);
            if first.is_none() || levels.iter().any(|l| l.as_u64() != first) {
                return Err(bad(
                    "unet/config.json",
                    "a single file's UNet needs one layers_per_block for every level",
                ));
            }
            first
        }
        other => other.as_u64(),
    }
    .ok_or_else(|| bad("unet/config.json", "layers_per_block is not a count"))?
        as usize;
    let vae_levels = vae["block_out_channels"]
        .as_array()
        .map(Vec::len)
        .filter(|n| *n > 0)
        .ok_or_else(|| bad("vae/config.json", "block_out_channels is not a list"))?;
    let text_layers = |rel: &str| -> Result<usize> {
        config_value(dir, rel)?["num_hidden_layers"]
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| bad(rel, "num_hidden_layers is not a count"))
    };
    Ok(Layout {
        unet_layers_per_block,
        vae_levels,
        text_layers: text_layers("text_encoder/config.json")?,
        text_2_layers: match family {
            Family::Sdxl => Some(text_layers("text_encoder_2/config.json")?),
            Family::Sd1 | Family::Sd2 => None,
        },
    })
}

/// FNV-1a: a hash that stays the same across builds and platforms (the folder name must).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for byte in part.iter().chain(&[0xff]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The cache folder of `file` converted with the configs of `configs`.
fn converted_folder(file: &Path, configs: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(file).map_err(|source| Error::Io {
        path: file.to_path_buf(),
        source,
    })?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let file = crate::model::bundle::canonical(file);
    let configs = crate::model::bundle::canonical(configs);
    let key = fnv1a(&[
        file.to_string_lossy().as_bytes(),
        &meta.len().to_le_bytes(),
        &modified.to_le_bytes(),
        configs.to_string_lossy().as_bytes(),
        &CONVERSION.to_le_bytes(),
    ]);
    let stem: String = file
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    Ok(cache_root()
        .join("single-file")
        .join(format!("{stem}-{key:016x}")))
}

/// The diffusers folder of the single-file checkpoint `file`: converted now, unless an earlier
/// load converted it already. Steps are logged ([`crate::log`]).
pub fn diffusers_folder(file: &Path, opts: &HubOptions) -> Result<PathBuf> {
    let at = |detail: String| Error::ModelLoad {
        path: file.to_path_buf(),
        detail,
    };
    let weights = WeightsFile::open(file)?;
    let family = Family::detect(weights.tensors().map(|(name, _)| name)).ok_or_else(|| {
        at(
            "not a whole Stable Diffusion checkpoint: a single file needs a UNet \
            (model.diffusion_model.*), an autoencoder (first_stage_model.*) and text encoders \
            (cond_stage_model.* or conditioner.embedders.*) under the original layout's names"
                .into(),
        )
    })?;
    let repo = family.config_repo();
    let configs = hub::resolve(repo, opts, &config_files(family)).map_err(|e| {
        at(format!(
            "an {} single file takes its configs and tokenizers from {repo}, which is not \
             available: {e}",
            family.name()
        ))
    })?;
    let folder = converted_folder(file, &configs)?;
    if folder.join(COMPLETE).is_file() {
        crate::log::progress(&format!(
            "{}: {} single file, converted before in {}",
            file.display(),
            family.name(),
            folder.display()
        ));
        return Ok(folder);
    }
    let layout = layout(&configs, family)?;
    crate::log::progress(&format!(
        "{}: {} single file, converting into {} (configs from {repo})",
        file.display(),
        family.name(),
        folder.display()
    ));
    let partial = folder.with_extension(format!("partial-{}", std::process::id()));
    let io = |path: &Path, source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_dir_all(&partial);
    let written = (|| {
        for rel in config_files(family) {
            let rel = rel.trim_start_matches('?');
            let from = configs.join(rel);
            if !from.is_file() {
                continue;
            }
            let to = partial.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
            }
            std::fs::copy(&from, &to).map_err(|e| io(&to, e))?;
        }
        for &component in convert::components(family) {
            let tensors = convert::component(&weights, family, &layout, component)
                .map_err(|e| at(e.to_string()))?;
            let dir = partial.join(component.folder());
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            let path = dir.join(component.weights_file());
            candle_core::safetensors::save(&tensors, &path).map_err(|e| at(e.to_string()))?;
            crate::log::progress(&format!(
                "{}: {} tensors of the {}",
                file.display(),
                tensors.len(),
                component.folder()
            ));
        }
        let record = serde_json::json!({
            "source": file.display().to_string(),
            "family": family.name(),
            "configs": configs.display().to_string(),
            "conversion": CONVERSION,
        });
        let done = partial.join(COMPLETE);
        std::fs::write(&done, record.to_string()).map_err(|e| io(&done, e))?;
        Ok::<_, Error>(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    if let Some(parent) = folder.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    if std::fs::rename(&partial, &folder).is_err() {
        // Another load converted the same file meanwhile: keep its folder.
        let _ = std::fs::remove_dir_all(&partial);
        if !folder.join(COMPLETE).is_file() {
            return Err(at(format!(
                "cannot move the converted folder to {}",
                folder.display()
            )));
        }
    }
    Ok(folder)
}
