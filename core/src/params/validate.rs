//! The rules of the parameter contract. One place: the Rust API, the C ABI, Python and HTTP all
//! call [`StreamDiffusionParams::validate`].
//!
//! Daydream's own rules come first, with its wording (t_index_list, duplicate / invalid
//! ControlNets, the SDXL limit, IPAdapter support, model id); docs/PARAMS.md adds ranges Daydream
//! does not check (finite floats, seeds below 2^53, guidance windows, filter settings). Every error
//! is an [`Error::InvalidParam`] whose `field` is the path and whose message names the value and
//! the rule. The first broken rule is reported.

use super::catalog::{
    self, IMAGE_PROCESSORS, INSIGHTFACE_MODEL_NAMES, IP_ADAPTER_IMAGE_ENCODER_PATHS,
    IP_ADAPTER_MODEL_PATHS, IP_ADAPTER_PLUS_MODEL_PATHS, IP_ADAPTER_WEIGHT_TYPES, KNOWN_LORAS,
    KNOWN_MODELS, LATENT_PROCESSORS, ModelFamily, python_list,
};
use super::fields::StreamDiffusionParams;
use super::nested::{ControlNetConfig, IPAdapterConfig, ProcessingConfig};
use super::settings::EngineSettings;
use super::weighted::{Prompt, Seed};
use crate::hub;
use crate::{Error, Result};

/// Seeds must stay below 2^53 so that they survive a round trip through a JSON double
/// (JavaScript, Python's json with floats) unchanged.
pub const MAX_SEED_EXCLUSIVE: i64 = 1 << 53;

/// Most t_index_list entries Daydream allows.
pub const MAX_T_INDEX_LEN: usize = 4;

/// Most enabled ControlNets (with a positive scale) Daydream allows on SDXL.
pub const SDXL_MAX_ENABLED_CONTROLNETS: usize = 3;

/// Most `[text, weight]` pairs in a weighted prompt. Each distinct text costs one CLIP text
/// encoder pass when the prompt changes, so the count bounds the work one update can ask for
/// (and the pipeline's prompt cache, 64 embeddings, holds two such bodies). Blends in practice
/// use two to a handful of prompts.
pub const MAX_WEIGHTED_PROMPTS: usize = 32;

/// Most `[seed, weight]` pairs in a weighted seed: each one is a noise tensor of the latent's
/// size drawn when the seed changes.
pub const MAX_WEIGHTED_SEEDS: usize = 32;

/// Most characters (Unicode scalar values) in one prompt text and in `negative_prompt`.
/// CLIP reads only the first 77 tokens (75 of text between its start and end tokens):
/// roughly 300 to 400 characters of English, and at most 1,426 characters plus the spaces
/// between them even for the 75 longest tokens of its vocabulary, so a longer text adds
/// nothing CLIP sees unless it repeats CLIP's longest tokens. The tokenizer reads the whole
/// text before cutting it, so the length, times [`MAX_WEIGHTED_PROMPTS`], bounds the
/// tokenizing one update can ask for.
pub const MAX_PROMPT_CHARS: usize = 2048;

/// Which base model a parameter set names, as validation resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelKind {
    /// A known id of this family.
    Known(ModelFamily),
    /// An existing local folder, or a single-file checkpoint: its family is read from its
    /// config.json (or its tensors) by the loader, so the family rules (ControlNet lists, SDXL
    /// limit, IPAdapter support) are not checked here.
    LocalFolder(std::path::PathBuf),
    /// One of the settings' `allowed_models`: resolved by the loader like a known id, its family
    /// read from its config.json (so, as for a folder, the family rules are not checked here).
    Allowed,
}

impl ModelKind {
    /// The family, when the id is a known one.
    pub fn family(&self) -> Option<ModelFamily> {
        match self {
            ModelKind::Known(family) => Some(*family),
            ModelKind::LocalFolder(_) | ModelKind::Allowed => None,
        }
    }
}

impl StreamDiffusionParams {
    /// Checks every rule of the contract under `settings` (`allow_any_resolution` relaxes the
    /// resolution rule; `model_root` is where model ids are looked up after themselves as
    /// folders, see [`hub::local_dir`]; `allowed_models` are accepted besides the known ids, and
    /// with `allow_model_paths` false nothing else is, whatever is on disk).
    ///
    /// A `model_id` that is an existing local folder has no known family at this point, so the
    /// ControlNet-family list, the SDXL limit and IPAdapter support are skipped for it; the
    /// loader checks compatibility from the folder's config.json.
    pub fn validate(&self, settings: &EngineSettings) -> Result<()> {
        let kind = resolve_model(&self.model_id, settings)?;
        check_prompt(&self.prompt, self.normalize_prompt_weights)?;
        check_text_length("negative_prompt", &self.negative_prompt)?;
        finite("guidance_scale", self.guidance_scale)?;
        finite("delta", self.delta)?;
        check_steps(self.num_inference_steps, &self.t_index_list)?;
        check_resolution("width", self.width, settings.allow_any_resolution)?;
        check_resolution("height", self.height, settings.allow_any_resolution)?;
        if let Some(loras) = &self.lora_dict {
            for (id, weight) in loras {
                if id.trim().is_empty() {
                    return Err(Error::param(
                        "lora_dict",
                        "lora_dict keys must be non-empty LoRA ids; got \"\"",
                    ));
                }
                finite(&format!("lora_dict.{id}"), *weight)?;
                check_lora_id("lora_dict", id, settings)?;
            }
        }
        if self.use_lcm_lora {
            check_lora_id("lcm_lora_id", &self.lcm_lora_id, settings)?;
        }
        finite("safety_checker_threshold", self.safety_checker_threshold)?;
        check_seed(&self.seed, self.normalize_seed_weights)?;
        unit_interval(
            "similar_image_filter_threshold",
            self.similar_image_filter_threshold,
        )?;
        if self.similar_image_filter_max_skip_frame < 0 {
            return Err(Error::param(
                "similar_image_filter_max_skip_frame",
                format!(
                    "similar_image_filter_max_skip_frame must be >= 0; got {}",
                    self.similar_image_filter_max_skip_frame
                ),
            ));
        }
        check_processing(
            "image_preprocessing",
            &self.image_preprocessing,
            IMAGE_PROCESSORS,
        )?;
        check_processing(
            "image_postprocessing",
            &self.image_postprocessing,
            IMAGE_PROCESSORS,
        )?;
        check_processing(
            "latent_preprocessing",
            &self.latent_preprocessing,
            LATENT_PROCESSORS,
        )?;
        check_processing(
            "latent_postprocessing",
            &self.latent_postprocessing,
            LATENT_PROCESSORS,
        )?;
        check_ip_adapter(&self.ip_adapter, &self.model_id, kind.family())?;
        check_cached_attention(&self.cached_attention)?;
        check_controlnets(&self.controlnets, &self.model_id, &kind, settings)?;
        Ok(())
    }

    /// Resolves `model_id` the way validation does: a known id with its family, an allowed one,
    /// or (with `allow_model_paths`) an existing local folder ([`hub::local_dir`]: `<id>` as a
    /// path, then `model_root/<id>`).
    pub fn model_kind(&self, settings: &EngineSettings) -> Result<ModelKind> {
        resolve_model(&self.model_id, settings)
    }
}

/// The kind of network a model id in a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdKind {
    /// `model_id`.
    Base,
    /// A ControlNet's `model_id`.
    ControlNet,
    /// A `lora_dict` key or `lcm_lora_id`.
    Lora,
}

/// How a model id in a body is served.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Served {
    /// A known id of its kind.
    Known,
    /// One of the settings' `allowed_models`.
    Allowed,
    /// With model paths on: an existing folder (base models and ControlNets, whose family is
    /// read from it).
    LocalFolder(std::path::PathBuf),
    /// With model paths on: a LoRA, resolved when the pipeline loads (a folder, the model
    /// root, the cache, or the hub).
    AtLoad,
}

/// The one rule every model id a body names goes through (`model_id`, ControlNets,
/// `lora_dict` keys, `lcm_lora_id`): a known id of its kind or one of `allowed_models`; only
/// where the settings allow model paths (the program names its own models) also a local folder,
/// or for a LoRA whatever the loader finds. `None`: not served; the caller words the refusal.
fn served(id: &str, kind: IdKind, settings: &EngineSettings) -> Option<Served> {
    let known = match kind {
        IdKind::Base => ModelFamily::of_model(id).is_some(),
        IdKind::ControlNet => catalog::controlnet_family(id).is_some(),
        IdKind::Lora => KNOWN_LORAS.contains(&id),
    };
    if known {
        return Some(Served::Known);
    }
    if settings.is_allowed_model(id) {
        return Some(Served::Allowed);
    }
    if !settings.allow_model_paths {
        return None;
    }
    match kind {
        IdKind::Lora => Some(Served::AtLoad),
        IdKind::Base | IdKind::ControlNet => {
            let opts = settings.hub_options();
            hub::local_dir(id, &opts)
                .or_else(|| hub::single_file(id, &opts))
                .map(Served::LocalFolder)
        }
    }
}

fn resolve_model(model_id: &str, settings: &EngineSettings) -> Result<ModelKind> {
    match served(model_id, IdKind::Base, settings) {
        Some(Served::LocalFolder(dir)) => return Ok(ModelKind::LocalFolder(dir)),
        Some(_) => {
            return Ok(ModelFamily::of_model(model_id).map_or(ModelKind::Allowed, ModelKind::Known));
        }
        None => {}
    }
    let served = || {
        python_list(
            KNOWN_MODELS
                .iter()
                .map(|(id, _)| *id)
                .chain(settings.allowed_models.iter().map(String::as_str)),
        )
    };
    if !settings.allow_model_paths {
        // Neither the id nor anything on disk goes into the message: it reads the same for an
        // existing folder and a missing one.
        return Err(Error::param(
            "model_id",
            format!(
                "Invalid model_id: not a model served here (expected one of {}; folders on disk \
                 are not accepted)",
                served()
            ),
        ));
    }
    Err(Error::param(
        "model_id",
        format!(
            "Invalid model_id: {model_id} (expected one of {}, an existing local folder or a single-file checkpoint)",
            served()
        ),
    ))
}

/// A LoRA id (`lora_dict` key, `lcm_lora_id`) by the rule of [`served`]: with model paths off,
/// only the known LCM-LoRAs and `allowed_models` (what is on disk is never named back, and an
/// id that is not a hub id is not echoed).
fn check_lora_id(field: &str, id: &str, settings: &EngineSettings) -> Result<()> {
    if served(id, IdKind::Lora, settings).is_some() {
        return Ok(());
    }
    if !hub::is_hub_id(id) {
        return Err(Error::param(
            field,
            format!(
                "{field}: LoRA ids must be hub ids, org/name or name (paths are not accepted \
                 here)"
            ),
        ));
    }
    let ids = python_list(
        KNOWN_LORAS
            .iter()
            .copied()
            .chain(settings.allowed_models.iter().map(String::as_str)),
    );
    Err(Error::param(
        field,
        format!("{field}: {id:?} is not a LoRA served here (expected one of {ids})"),
    ))
}

fn finite(field: &str, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Error::param(
            field,
            format!("{field} must be a finite number; got {value}"),
        ))
    }
}

fn unit_interval(field: &str, value: f64) -> Result<()> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::param(
            field,
            format!("{field} must be between 0 and 1; got {value}"),
        ))
    }
}

fn one_of(field: &str, value: &str, allowed: &[&str], what: &str) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(Error::param(
            field,
            format!(
                "{field}: unknown {what} '{value}'; expected one of {}",
                python_list(allowed.iter().copied())
            ),
        ))
    }
}

/// Refuses a text longer than [`MAX_PROMPT_CHARS`]. The byte length bounds the character count
/// from above, so the count is taken only for texts that may be too long.
fn check_text_length(field: &str, text: &str) -> Result<()> {
    if text.len() <= MAX_PROMPT_CHARS {
        return Ok(());
    }
    let chars = text.chars().count();
    if chars <= MAX_PROMPT_CHARS {
        return Ok(());
    }
    Err(Error::param(
        field,
        format!(
            "{field} is {chars} characters long; at most {MAX_PROMPT_CHARS} are allowed \
             (CLIP reads only the first 77 tokens)"
        ),
    ))
}

/// Refuses a weighted list longer than `max`, before any of its items is looked at.
fn check_item_count(field: &str, what: &str, count: usize, max: usize) -> Result<()> {
    if count <= max {
        Ok(())
    } else {
        Err(Error::param(
            field,
            format!("{field} has {count} {what}; at most {max} are allowed"),
        ))
    }
}

fn check_prompt(prompt: &Prompt, normalize: bool) -> Result<()> {
    match prompt {
        Prompt::Text(text) => {
            check_text_length("prompt", text)?;
            if text.trim().is_empty() {
                return Err(Error::param(
                    "prompt",
                    format!("prompt text must not be empty; got {text:?}"),
                ));
            }
        }
        Prompt::Weighted(items) => {
            if items.is_empty() {
                return Err(Error::param(
                    "prompt",
                    "prompt must be a string or a non-empty list of [text, weight] pairs; got []",
                ));
            }
            check_item_count(
                "prompt",
                "[text, weight] pairs",
                items.len(),
                MAX_WEIGHTED_PROMPTS,
            )?;
            for (i, (text, weight)) in items.iter().enumerate() {
                check_text_length(&format!("prompt[{i}][0]"), text)?;
                if text.trim().is_empty() {
                    return Err(Error::param(
                        format!("prompt[{i}][0]"),
                        format!("prompt[{i}] text must not be empty; got {text:?}"),
                    ));
                }
                finite(&format!("prompt[{i}][1]"), *weight)?;
            }
            let weights: Vec<f64> = items.iter().map(|(_, w)| *w).collect();
            check_weight_sum("prompt", "normalize_prompt_weights", &weights, normalize)?;
        }
    }
    Ok(())
}

fn check_weight_sum(field: &str, flag: &str, weights: &[f64], normalize: bool) -> Result<()> {
    let sum: f64 = weights.iter().sum();
    if normalize && (sum == 0.0 || !sum.is_finite()) {
        return Err(Error::param(
            field,
            format!(
                "{field} weights sum to {sum}; with {flag} true they must sum to a finite non-zero value"
            ),
        ));
    }
    Ok(())
}

fn check_seed_value(field: &str, seed: i64) -> Result<()> {
    if (0..MAX_SEED_EXCLUSIVE).contains(&seed) {
        Ok(())
    } else {
        Err(Error::param(
            field,
            format!("{field} must satisfy 0 <= seed < 2^53 ({MAX_SEED_EXCLUSIVE}); got {seed}"),
        ))
    }
}

fn check_seed(seed: &Seed, normalize: bool) -> Result<()> {
    match seed {
        Seed::Single(value) => check_seed_value("seed", *value),
        Seed::Weighted(items) => {
            if items.is_empty() {
                return Err(Error::param(
                    "seed",
                    "seed must be an integer or a non-empty list of [seed, weight] pairs; got []",
                ));
            }
            check_item_count(
                "seed",
                "[seed, weight] pairs",
                items.len(),
                MAX_WEIGHTED_SEEDS,
            )?;
            for (i, (value, weight)) in items.iter().enumerate() {
                check_seed_value(&format!("seed[{i}][0]"), *value)?;
                finite(&format!("seed[{i}][1]"), *weight)?;
            }
            let weights: Vec<f64> = items.iter().map(|(_, w)| *w).collect();
            check_weight_sum("seed", "normalize_seed_weights", &weights, normalize)
        }
    }
}

fn check_steps(num_inference_steps: i64, t_index_list: &[i64]) -> Result<()> {
    if !(1..=100).contains(&num_inference_steps) {
        return Err(Error::param(
            "num_inference_steps",
            format!("num_inference_steps must be between 1 and 100; got {num_inference_steps}"),
        ));
    }
    if t_index_list.is_empty() || t_index_list.len() > MAX_T_INDEX_LEN {
        return Err(Error::param(
            "t_index_list",
            format!(
                "t_index_list must have between 1 and {MAX_T_INDEX_LEN} elements; got {}",
                t_index_list.len()
            ),
        ));
    }
    // Daydream allows value == num_inference_steps; docs/PARAMS.md does not, because the grid has
    // num_inference_steps entries and that index would fall off its end.
    for (i, &value) in t_index_list.iter().enumerate() {
        if !(0..num_inference_steps).contains(&value) {
            return Err(Error::param(
                format!("t_index_list[{i}]"),
                format!(
                    "Each t_index_list value must be between 0 and num_inference_steps \
                     ({num_inference_steps}). Found {value} at index {i}."
                ),
            ));
        }
    }
    for i in 1..t_index_list.len() {
        let (prev, curr) = (t_index_list[i - 1], t_index_list[i]);
        if curr < prev {
            return Err(Error::param(
                format!("t_index_list[{i}]"),
                format!("t_index_list must be in non-decreasing order. {curr} < {prev}"),
            ));
        }
    }
    Ok(())
}

fn check_resolution(field: &str, value: i64, allow_any: bool) -> Result<()> {
    let (min, max, step) = if allow_any {
        (64, 2048, 8)
    } else {
        (384, 1024, 64)
    };
    if (min..=max).contains(&value) && value % step == 0 {
        Ok(())
    } else {
        Err(Error::param(
            field,
            format!(
                "{field} must be between {min} and {max} and a multiple of {step}; got {value}"
            ),
        ))
    }
}

fn check_processing(
    field: &str,
    config: &Option<ProcessingConfig>,
    allowed: &[&str],
) -> Result<()> {
    let Some(config) = config else {
        return Ok(());
    };
    for (i, processor) in config.processors.iter().enumerate() {
        one_of(
            &format!("{field}.processors[{i}].type"),
            &processor.kind,
            allowed,
            "processor",
        )?;
    }
    Ok(())
}

/// `cached_attention`: Daydream's ranges (1–4 frames, an interval of 1–1440 frames).
fn check_cached_attention(c: &super::CachedAttentionConfig) -> Result<()> {
    use super::nested::{CACHED_ATTENTION_MAX_FRAMES, CACHED_ATTENTION_MAX_INTERVAL};
    for (field, value, max) in [
        (
            "cached_attention.max_frames",
            c.max_frames,
            CACHED_ATTENTION_MAX_FRAMES,
        ),
        (
            "cached_attention.interval",
            c.interval,
            CACHED_ATTENTION_MAX_INTERVAL,
        ),
    ] {
        if !(1..=max).contains(&value) {
            return Err(Error::param(
                field,
                format!("{value} is out of range [1, {max}]"),
            ));
        }
    }
    Ok(())
}

fn check_ip_adapter(
    ip: &IPAdapterConfig,
    model_id: &str,
    family: Option<ModelFamily>,
) -> Result<()> {
    finite("ip_adapter.scale", ip.scale)?;
    let literals = [
        (
            "ip_adapter.ipadapter_model_path",
            &ip.ipadapter_model_path,
            IP_ADAPTER_MODEL_PATHS,
            "IPAdapter model path",
        ),
        (
            "ip_adapter.image_encoder_path",
            &ip.image_encoder_path,
            IP_ADAPTER_IMAGE_ENCODER_PATHS,
            "image encoder path",
        ),
        (
            "ip_adapter.insightface_model_name",
            &ip.insightface_model_name,
            INSIGHTFACE_MODEL_NAMES,
            "InsightFace model",
        ),
        (
            "ip_adapter.weight_type",
            &ip.weight_type,
            IP_ADAPTER_WEIGHT_TYPES,
            "weight type",
        ),
    ];
    for (field, value, allowed, what) in literals {
        if let Some(value) = value {
            // sdstream's additions (the Plus checkpoints) pass; anything else is judged, and
            // refused in Daydream's words, against Daydream's values.
            if field == "ip_adapter.ipadapter_model_path"
                && IP_ADAPTER_PLUS_MODEL_PATHS.contains(&value.as_str())
            {
                continue;
            }
            one_of(field, value, allowed, what)?;
        }
    }
    if let Some(family) = family
        && ip.enabled
        && !family.supports_ip_adapter()
    {
        return Err(Error::param(
            "ip_adapter.enabled",
            format!(
                "IPAdapter is not supported for {model_id} ({family} model; only sd15 and sdxl \
                 models support it, so ip_adapter.enabled must be false)"
            ),
        ));
    }
    Ok(())
}

fn check_controlnet_fields(
    i: usize,
    net: &ControlNetConfig,
    settings: &EngineSettings,
) -> Result<()> {
    let path = |leaf: &str| format!("controlnets[{i}].{leaf}");
    let id = net.model_id.as_str();
    if served(id, IdKind::ControlNet, settings).is_none() {
        let field = path("model_id");
        let known = || {
            let mut ids: Vec<&str> = catalog::all_controlnets().collect();
            ids.extend(settings.allowed_models.iter().map(String::as_str));
            python_list(ids)
        };
        let message = if settings.allow_model_paths {
            format!(
                "{field}: unknown ControlNet '{id}'; expected one of {}, an existing local folder or a \
                 single file",
                known()
            )
        } else {
            // As for model_id: the same words whatever the id names on disk.
            format!(
                "{field}: not a ControlNet served here; expected one of {} (folders on disk are \
                 not accepted)",
                known()
            )
        };
        return Err(Error::param(field, message));
    }
    finite(&path("conditioning_scale"), net.conditioning_scale)?;
    if let Some(channels) = net.conditioning_channels
        && !(1..=6).contains(&channels)
    {
        let field = path("conditioning_channels");
        return Err(Error::param(
            &field,
            format!("{field} must be between 1 and 6 (or null); got {channels}"),
        ));
    }
    one_of(
        &path("preprocessor"),
        &net.preprocessor,
        IMAGE_PROCESSORS,
        "preprocessor",
    )?;
    unit_interval(&path("control_guidance_start"), net.control_guidance_start)?;
    unit_interval(&path("control_guidance_end"), net.control_guidance_end)?;
    if net.control_guidance_start > net.control_guidance_end {
        let field = path("control_guidance_end");
        return Err(Error::param(
            &field,
            format!(
                "controlnets[{i}]: control_guidance_start ({}) must be <= control_guidance_end ({})",
                net.control_guidance_start, net.control_guidance_end
            ),
        ));
    }
    Ok(())
}

fn check_controlnets(
    nets: &[ControlNetConfig],
    model_id: &str,
    kind: &ModelKind,
    settings: &EngineSettings,
) -> Result<()> {
    for (i, net) in nets.iter().enumerate() {
        check_controlnet_fields(i, net, settings)?;
    }
    for (i, net) in nets.iter().enumerate() {
        if nets[..i]
            .iter()
            .any(|earlier| earlier.model_id == net.model_id)
        {
            return Err(Error::param(
                format!("controlnets[{i}].model_id"),
                format!("Duplicate controlnet model_id: {}", net.model_id),
            ));
        }
    }
    // A local-folder base model has no family yet; the loader checks its nets from config.json.
    let Some(family) = kind.family() else {
        return Ok(());
    };
    // Local-folder ControlNets have no family yet either; known ids must match the base model.
    let invalid: Vec<(usize, &str)> = nets
        .iter()
        .enumerate()
        .filter(|(_, net)| catalog::controlnet_family(&net.model_id).is_some_and(|f| f != family))
        .map(|(i, net)| (i, net.model_id.as_str()))
        .collect();
    if let Some(&(first, _)) = invalid.first() {
        return Err(Error::param(
            format!("controlnets[{first}].model_id"),
            format!(
                "Invalid ControlNets for model {model_id}: {} ({family} models accept {})",
                python_list(invalid.iter().map(|(_, id)| *id)),
                python_list(family.controlnets().iter().copied())
            ),
        ));
    }
    if family == ModelFamily::Sdxl {
        // Daydream counts a net as enabled only when it also has a positive scale.
        let enabled = nets
            .iter()
            .filter(|net| net.enabled && net.conditioning_scale > 0.0)
            .count();
        if enabled > SDXL_MAX_ENABLED_CONTROLNETS {
            return Err(Error::param(
                "controlnets",
                format!(
                    "SDXL models support a maximum of {SDXL_MAX_ENABLED_CONTROLNETS} enabled \
                     ControlNets, found {enabled}."
                ),
            ));
        }
    }
    Ok(())
}
