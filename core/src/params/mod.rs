//! The StreamDiffusionParams contract (Daydream's model), engine settings, and update
//! classification.
//!
//! * [`StreamDiffusionParams`]: the Daydream JSON body, field for field, with its nested
//!   [`ControlNetConfig`], [`IPAdapterConfig`] and [`ProcessingConfig`]; unknown fields are
//!   rejected at every level. [`StreamDiffusionParams::from_json`] parses and validates,
//!   [`StreamDiffusionParams::to_json`] writes every field back.
//! * [`StreamDiffusionParams::validate`]: the rules, with messages naming the field path, the
//!   bad value and the rule. The C, Python and HTTP surfaces call this one function.
//! * [`EngineSettings`]: what Daydream's model does not hold (cfg_type, device, dtype, vae, …).
//! * [`classify`]: whether going from old to new parameters is hot, a ControlNet swap or a
//!   reload ([`Update`]), with a list of [`HotChange`]s precise enough to recompute only what
//!   changed.
//! * [`catalog`]: the known model and ControlNet ids, families and processor names.
//! * [`Transition`]: how a prompt or seed change may glide over several frames instead of
//!   switching at once.

pub mod catalog;
mod classify;
mod fields;
mod json;
mod nested;
mod settings;
mod transition;
mod validate;
mod weighted;

pub use catalog::ModelFamily;
pub use classify::{ControlNetField, HotChange, IpAdapterField, Update, UpdateKind, classify};
pub use fields::{Acceleration, DEFAULT_IP_ADAPTER_STYLE_IMAGE_URL, StreamDiffusionParams};
pub use json::{json_kind, merge_patch};
pub use nested::{
    CACHED_ATTENTION_MAX_FRAMES, CACHED_ATTENTION_MAX_INTERVAL, CachedAttentionConfig,
    ControlNetConfig, IPAdapterConfig, IpAdapterType, ProcessingConfig, ProcessorConfig,
};
pub use settings::{CfgType, DTypeChoice, DeviceSpec, EngineSettings, VaeChoice};
pub use transition::Transition;
pub use validate::{
    MAX_PROMPT_CHARS, MAX_SEED_EXCLUSIVE, MAX_T_INDEX_LEN, MAX_WEIGHTED_PROMPTS,
    MAX_WEIGHTED_SEEDS, ModelKind, SDXL_MAX_ENABLED_CONTROLNETS,
};
pub use weighted::{InterpolationMethod, Prompt, Seed};
