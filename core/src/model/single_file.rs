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
use std::sync::{Mutex, PoisonError};

use sdstream_models::single_file::{self as convert, Family, Layout};
use sdstream_models::unet::UNetConfig;
use sdstream_models::weights::WeightsFile;

use crate::hub::{self, HubOptions};
use crate::model::bundle::checkpoint_files;
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

/// The files of a family's repository a conversion copies: a pipeline folder's files
/// ([`checkpoint_files`]) but its weights, SDXL's second tokenizer and encoder among the optional
/// ones.
fn config_files() -> Vec<String> {
    checkpoint_files(true, false)
        .into_iter()
        .filter(|pattern| !pattern.ends_with(".safetensors"))
        .collect()
}

/// The cache folder of `file` converted with `configs` (the config folder's path, or the
/// config itself).
fn converted_folder(file: &Path, configs: &[u8]) -> Result<PathBuf> {
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
    // Each part followed by a byte no UTF-8 text holds, so that parts cannot run together.
    let mut identity = Vec::new();
    for part in [
        file.to_string_lossy().as_bytes(),
        &meta.len().to_le_bytes(),
        &modified.to_le_bytes(),
        configs,
        &CONVERSION.to_le_bytes(),
    ] {
        identity.extend_from_slice(part);
        identity.push(0xff);
    }
    let key = crate::status::fnv1a(&identity);
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
    let weights = WeightsFile::open(file)?;
    let family = Family::detect(weights.tensors().map(|(name, _)| name)).ok_or_else(|| {
        at(
            file,
            "not a whole Stable Diffusion checkpoint: a single file needs a UNet \
            (model.diffusion_model.*), an autoencoder (first_stage_model.*) and text encoders \
            (cond_stage_model.* or conditioner.embedders.*) under the original layout's names"
                .into(),
        )
    })?;
    let repo = family.config_repo();
    let wanted = config_files();
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    let configs = hub::resolve(repo, opts, &wanted).map_err(|e| {
        at(
            file,
            format!(
                "an {} single file takes its configs and tokenizers from {repo}, which is not \
             available: {e}",
                family.name()
            ),
        )
    })?;
    let canonical_configs = crate::model::bundle::canonical(&configs);
    let folder = converted_folder(file, canonical_configs.to_string_lossy().as_bytes())?;
    if folder.join(COMPLETE).is_file() {
        crate::log::progress(&format!(
            "{}: {} single file, converted before in {}",
            file.display(),
            family.name(),
            folder.display()
        ));
        return Ok(folder);
    }
    let layout = Layout::read(&configs, family)?;
    crate::log::progress(&format!(
        "{}: {} single file, converting into {} (configs from {repo})",
        file.display(),
        family.name(),
        folder.display()
    ));
    let record = serde_json::json!({
        "source": file.display().to_string(),
        "family": family.name(),
        "configs": configs.display().to_string(),
        "conversion": CONVERSION,
    });
    write_once(file, &folder, record, |partial| {
        for rel in &wanted {
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
                .map_err(|e| at(file, e.to_string()))?;
            let path = partial
                .join(component.folder())
                .join(component.weights_file());
            save(file, &tensors, &path)?;
            crate::log::progress(&format!(
                "{}: {} tensors of the {}",
                file.display(),
                tensors.len(),
                component.folder()
            ));
        }
        Ok(())
    })
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn at(file: &Path, detail: String) -> Error {
    Error::ModelLoad {
        path: file.to_path_buf(),
        detail,
    }
}

/// Writes `tensors` as a safetensors file at `path` (its folder made).
fn save(file: &Path, tensors: &convert::ComponentTensors, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    candle_core::safetensors::save(tensors, path).map_err(|e| at(file, e.to_string()))
}

/// Makes `folder` by `write` into a sibling folder of its own, completed by `record` (the file
/// that marks a finished conversion) and renamed into place: a reader never sees half a folder.
/// Inside a process conversions take turns, and one that finds the folder made meanwhile (by a
/// stream that asked for the same file first) uses it; across processes the sibling folders are
/// each process's own, and the one renamed second keeps the first one's folder.
fn write_once(
    file: &Path,
    folder: &Path,
    record: serde_json::Value,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    static CONVERTING: Mutex<()> = Mutex::new(());
    let _turn = CONVERTING.lock().unwrap_or_else(PoisonError::into_inner);
    if folder.join(COMPLETE).is_file() {
        return Ok(folder.to_path_buf());
    }
    let partial = folder.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let written = write(&partial).and_then(|()| {
        let done = partial.join(COMPLETE);
        std::fs::write(&done, record.to_string()).map_err(|e| io(&done, e))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    if std::fs::rename(&partial, folder).is_err() {
        // Another load converted the same file meanwhile: keep its folder.
        let _ = std::fs::remove_dir_all(&partial);
        if !folder.join(COMPLETE).is_file() {
            return Err(at(
                file,
                format!("cannot move the converted folder to {}", folder.display()),
            ));
        }
    }
    Ok(folder.to_path_buf())
}

/// The single file a ControlNet id names when it is no diffusers folder: the id as a file
/// (where paths are allowed), or a folder or repository whose only weights are one
/// `.safetensors` or `.ckpt` at its top (`CiaraRowles/TemporalNet2` holds only
/// `temporalnetversion2.ckpt`). `None` when there is none.
fn controlnet_file(id: &str, opts: &HubOptions) -> Result<Option<PathBuf>> {
    if let Some(file) = hub::single_file(id, opts) {
        return Ok(Some(file));
    }
    let Ok(dir) = hub::resolve(id, opts, &["*.safetensors|*.ckpt"]) else {
        return Ok(None);
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| io(&dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.is_file()
                && path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e == "safetensors" || e == "ckpt")
        })
        .collect();
    files.sort();
    match files.as_slice() {
        [] => Ok(None),
        [file] => Ok(Some(file.clone())),
        several => Err(Error::ModelLoad {
            path: dir.clone(),
            detail: format!(
                "ControlNet {id}: no diffusers weights, and {} single files ({}): name one as \
                 the model_id",
                several.len(),
                several
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// The diffusers folder of ControlNet `id` when it is a single file in the original ControlNet
/// layout (`control_model.*`, as ControlNet's own training code saves it): converted once into
/// the cache, its config the base UNet's (`base_config`, the `unet/config.json` of the checkpoint
/// it steers, whose encoder a ControlNet copies) with the control image's channels and embedding
/// widths read from the file. `None` when `id` names no single file.
pub fn controlnet_folder(
    id: &str,
    opts: &HubOptions,
    base_config: &Path,
) -> Result<Option<PathBuf>> {
    let Some(file) = controlnet_file(id, opts)? else {
        return Ok(None);
    };
    let weights = WeightsFile::open(&file)?;
    if !convert::is_controlnet(weights.tensors().map(|(name, _)| name)) {
        return Err(at(
            &file,
            format!(
                "ControlNet {id}: neither a diffusers folder nor a ControlNet in the original \
                 layout (control_model.input_hint_block.*)"
            ),
        ));
    }
    let base_text = sdstream_models::read_bounded(base_config, sdstream_models::MAX_CONFIG_BYTES)?;
    let mut config: serde_json::Value = serde_json::from_slice(&base_text)
        .map_err(|e| at(base_config, format!("not JSON: {e}")))?;
    let unet: UNetConfig = serde_json::from_value(config.clone())
        .map_err(|e| at(base_config, format!("not a UNet config: {e}")))?;
    unet.plan("UNet")
        .map_err(|e| at(base_config, e.to_string()))?;
    let layers_per_block =
        convert::layers_per_block(&unet).map_err(|detail| at(base_config, detail))?;
    let (channels, widths) =
        convert::controlnet_conditioning(&weights).map_err(|e| at(&file, e.to_string()))?;
    let object = config
        .as_object_mut()
        .ok_or_else(|| at(base_config, "not a JSON object".into()))?;
    object.insert("_class_name".into(), "ControlNetModel".into());
    object.insert("conditioning_channels".into(), channels.into());
    object.insert(
        "conditioning_embedding_out_channels".into(),
        serde_json::json!(widths),
    );
    let config_text =
        serde_json::to_vec_pretty(&config).map_err(|e| at(base_config, e.to_string()))?;
    let folder = converted_folder(&file, &config_text)?;
    if folder.join(COMPLETE).is_file() {
        return Ok(Some(folder));
    }
    crate::log::progress(&format!(
        "{}: a ControlNet single file ({channels} control channels), converting into {}",
        file.display(),
        folder.display()
    ));
    let record = serde_json::json!({
        "source": file.display().to_string(),
        "controlnet": id,
        "conversion": CONVERSION,
    });
    write_once(&file, &folder, record, |partial| {
        let tensors = convert::controlnet(&weights, layers_per_block)
            .map_err(|e| at(&file, e.to_string()))?;
        save(
            &file,
            &tensors,
            &partial.join("diffusion_pytorch_model.safetensors"),
        )?;
        let path = partial.join("config.json");
        std::fs::write(&path, &config_text).map_err(|e| io(&path, e))
    })
    .map(Some)
}
