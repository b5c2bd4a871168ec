//! Engine-only settings: what Daydream's model does not hold but an engine needs (device, dtype,
//! the residual-CFG variant, where models live). Changing any of them means a new pipeline.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::json;
use crate::model::kernels::KernelPolicy;
use crate::{Error, Result};

/// Residual classifier-free guidance variant of StreamDiffusion (`cfg_type` in the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CfgType {
    /// No guidance: guidance_scale is treated as 1.
    None,
    /// Full CFG: an unconditional UNet pass per step.
    Full,
    /// Self-negative RCFG: the stock noise stands in for the unconditional pass.
    #[default]
    #[serde(rename = "self")]
    SelfNegative,
    /// Onetime-negative RCFG: one unconditional pass for the first step, stock noise after.
    Initialize,
}

impl CfgType {
    /// The reference's spelling: `none`, `full`, `self`, `initialize`.
    pub fn as_str(self) -> &'static str {
        match self {
            CfgType::None => "none",
            CfgType::Full => "full",
            CfgType::SelfNegative => "self",
            CfgType::Initialize => "initialize",
        }
    }
}

impl fmt::Display for CfgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CfgType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(CfgType::None),
            "full" => Ok(CfgType::Full),
            "self" => Ok(CfgType::SelfNegative),
            "initialize" => Ok(CfgType::Initialize),
            other => Err(Error::param(
                "cfg_type",
                format!(
                    "cfg_type must be one of \"none\", \"full\", \"self\", \"initialize\"; got {other:?}"
                ),
            )),
        }
    }
}

/// Where the networks run. Written `"cpu"`, `"cuda"` (= `"cuda:0"`), `"cuda:N"` or `"metal"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA device `ordinal` (needs the `cuda` feature).
    Cuda(usize),
    /// The Metal device (needs the `metal` feature).
    Metal,
}

impl DeviceSpec {
    /// Opens the device. A backend this build lacks is an error on `device` naming the feature
    /// to build with; a device that does not open gives candle's error.
    pub fn device(&self) -> Result<candle_core::Device> {
        let opened = match self {
            DeviceSpec::Cpu => return Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(ordinal) => candle_core::Device::new_cuda(*ordinal),
            DeviceSpec::Metal => candle_core::Device::new_metal(0),
        };
        let missing = |feature: &str| {
            Error::param(
                "device",
                format!(
                    "device \"{self}\" needs sdstream built with its `{feature}` feature; this \
                     build has none"
                ),
            )
        };
        let device = opened.map_err(|e| match e {
            candle_core::Error::NotCompiledWithCudaSupport => missing("cuda"),
            candle_core::Error::NotCompiledWithMetalSupport => missing("metal"),
            other => other.into(),
        })?;
        crate::model::kernels::prepare_device(&device)?;
        Ok(device)
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
            DeviceSpec::Metal => f.write_str("metal"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::param(
                "device",
                format!("device must be \"cpu\", \"cuda\", \"cuda:N\" or \"metal\"; got {s:?}"),
            )
        };
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "metal" => Ok(DeviceSpec::Metal),
            _ => {
                let ordinal = s.strip_prefix("cuda:").ok_or_else(bad)?;
                // Digits only: `usize::from_str` would also take a leading '+'.
                if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                ordinal.parse().map(DeviceSpec::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse().map_err(|e: Error| message_of(e))
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

/// Floating-point precision of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// 32-bit float; what the reference computes in on the CPU.
    #[default]
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

impl DTypeChoice {
    /// The candle dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            DTypeChoice::F32 => candle_core::DType::F32,
            DTypeChoice::F16 => candle_core::DType::F16,
            DTypeChoice::Bf16 => candle_core::DType::BF16,
        }
    }

    /// The spelling in JSON: `f32`, `f16`, `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            DTypeChoice::F32 => "f32",
            DTypeChoice::F16 => "f16",
            DTypeChoice::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for DTypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DTypeChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(DTypeChoice::F32),
            "f16" => Ok(DTypeChoice::F16),
            "bf16" => Ok(DTypeChoice::Bf16),
            other => Err(Error::param(
                "dtype",
                format!("dtype must be \"f32\", \"f16\" or \"bf16\"; got {other:?}"),
            )),
        }
    }
}

/// Which autoencoder turns latents into pixels and back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum VaeChoice {
    /// The tiny autoencoder for the base model's family (madebyollin/taesd, or taesdxl for SDXL).
    #[default]
    Taesd,
    /// The checkpoint's own AutoencoderKL.
    Full,
    /// A folder or model id holding an AutoencoderTiny.
    Custom(String),
}

impl fmt::Display for VaeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VaeChoice::Taesd => f.write_str("taesd"),
            VaeChoice::Full => f.write_str("full"),
            VaeChoice::Custom(id) => f.write_str(id),
        }
    }
}

impl FromStr for VaeChoice {
    type Err = Error;
    /// `"taesd"`, `"full"`, or anything else non-empty as a folder / model id.
    fn from_str(s: &str) -> Result<Self> {
        let choice = VaeChoice::from(s.to_owned());
        match &choice {
            VaeChoice::Custom(id) if id.trim().is_empty() => Err(Error::param(
                "vae",
                "vae must be \"taesd\", \"full\" or a folder / model id of an AutoencoderTiny; got \"\"",
            )),
            _ => Ok(choice),
        }
    }
}

impl From<String> for VaeChoice {
    fn from(s: String) -> Self {
        match s.as_str() {
            "taesd" => VaeChoice::Taesd,
            "full" => VaeChoice::Full,
            _ => VaeChoice::Custom(s),
        }
    }
}

impl From<VaeChoice> for String {
    fn from(v: VaeChoice) -> String {
        v.to_string()
    }
}

/// Settings of the engine that Daydream's parameter model does not hold. JSON keys:
/// `cfg_type`, `frame_buffer_size`, `device`, `dtype`, `vae`, `model_root`,
/// `allow_any_resolution`, `allow_model_paths`, `allowed_models`, `allow_private_network`,
/// `cross_stream_batching`, `frame_budget_ms`; unknown keys are an error. Any change needs a pipeline reload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSettings {
    /// Residual CFG variant. Default `"self"`.
    pub cfg_type: CfgType,
    /// Frames processed per step (the reference's `frame_buffer_size`), ≥ 1. Default 1.
    pub frame_buffer_size: usize,
    /// Where the networks run. Default `"cpu"`.
    pub device: DeviceSpec,
    /// Precision. Default `"f32"`.
    pub dtype: DTypeChoice,
    /// Autoencoder. Default `"taesd"`.
    pub vae: VaeChoice,
    /// Folder of models laid out as `<model_root>/<model_id>`, searched after the id itself as
    /// a folder and before the Hugging Face cache (see [`crate::hub`]). Default none: the
    /// `SDSTREAM_MODEL_ROOT` environment variable, if set.
    pub model_root: Option<PathBuf>,
    /// When true, width and height may be any multiple of 8 from 64 to 2048 instead of
    /// Daydream's 384–1024 in steps of 64 (small checkpoints and tests need it). Default false.
    pub allow_any_resolution: bool,
    /// Whether a model id (`model_id`, a ControlNet's `model_id`, `vae`) may name a folder on
    /// disk. True (the default) for programs that pick their own ids. False where the ids come
    /// from someone else, as in the HTTP server: then validation accepts only the known ids and
    /// `allowed_models`, an id is only ever a hub id (`org/name` or `name`) looked up under
    /// `model_root`, in the Hugging Face cache or on the hub, and a refusal reads the same
    /// whether or not a folder of that name exists.
    pub allow_model_paths: bool,
    /// Model ids served besides the known ones, each a hub id (`org/name` or `name`) looked up
    /// like a known id: under `model_root`, in the Hugging Face cache or on the hub. One list for
    /// every id a body names: `model_id`, ControlNets, `lora_dict` keys and `lcm_lora_id`.
    /// Default none.
    pub allowed_models: Vec<String>,
    /// Whether `ip_adapter_style_image_url` may be fetched from loopback, private and shared
    /// (CGNAT) addresses ([`crate::outbound`]); link-local, metadata and reserved addresses are
    /// refused either way. Default false, in the library as in the server: the URL usually comes
    /// with a body someone else wrote, and a program whose pictures live on its LAN says so once.
    pub allow_private_network: bool,
    /// Whether the stream's UNet calls join those of other streams on the same loaded model in
    /// one batched call ([`crate::pipeline::cross_stream`]). A stream alone runs as without.
    /// Default true.
    pub cross_stream_batching: bool,
    /// The stream's frame budget in milliseconds: how long a frame may take from its arrival to
    /// its output. The cross-stream scheduler never holds a batch past it, and admission keeps
    /// every stream within its own. Default none: the spacing of the stream's input frames.
    pub frame_budget_ms: Option<f64>,
    /// Which kernels the engine's networks load and run with ([`KernelPolicy`]); set from Rust
    /// only (no JSON key). Default none: the policy current on the thread that starts the
    /// engine or stream (the process's, from the `SDSTREAM_*` switches, unless a caller scoped
    /// another). Networks loaded under different policies are not shared.
    #[serde(skip)]
    pub kernels: Option<KernelPolicy>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            cfg_type: CfgType::SelfNegative,
            frame_buffer_size: 1,
            device: DeviceSpec::Cpu,
            dtype: DTypeChoice::F32,
            vae: VaeChoice::Taesd,
            model_root: None,
            allow_any_resolution: false,
            allow_model_paths: true,
            allowed_models: Vec::new(),
            allow_private_network: false,
            cross_stream_batching: true,
            frame_budget_ms: None,
            kernels: None,
        }
    }
}

impl EngineSettings {
    /// [`frame_budget_ms`](Self::frame_budget_ms) as a duration.
    pub fn frame_budget(&self) -> Option<std::time::Duration> {
        self.frame_budget_ms
            .map(|ms| std::time::Duration::from_secs_f64(ms / 1e3))
    }

    /// The kernel policy these settings run under: [`kernels`](Self::kernels), else the one
    /// current on this thread.
    pub fn kernel_policy(&self) -> KernelPolicy {
        self.kernels.unwrap_or_else(KernelPolicy::current)
    }

    /// Where model ids are looked for under these settings: `model_root` (or
    /// `SDSTREAM_MODEL_ROOT`), the Hugging Face cache, and whether downloads are allowed. The
    /// one place validation and the loaders get it from.
    pub fn hub_options(&self) -> crate::hub::HubOptions {
        crate::hub::HubOptions {
            allow_paths: self.allow_model_paths,
            ..crate::hub::HubOptions::with_model_root(self.model_root.as_deref())
        }
    }

    /// Whether `id` is one of [`allowed_models`](Self::allowed_models).
    pub fn is_allowed_model(&self, id: &str) -> bool {
        self.allowed_models.iter().any(|allowed| allowed == id)
    }

    /// Which addresses outbound fetches for these settings' bodies may reach
    /// ([`allow_private_network`](Self::allow_private_network)).
    pub fn outbound_policy(&self) -> crate::outbound::OutboundPolicy {
        crate::outbound::OutboundPolicy::new(self.allow_private_network)
    }

    /// What hides this host's model folders from messages meant for whoever sent the ids: with
    /// [`allow_model_paths`](Self::allow_model_paths) off, the model root and the Hugging Face
    /// cache become `<model_root>` and `<hf_cache>` (see [`crate::hub::PathRedactor`]); with it
    /// on, the program picked its own ids and messages keep every path.
    pub fn path_redactor(&self) -> crate::hub::PathRedactor {
        if self.allow_model_paths {
            crate::hub::PathRedactor::default()
        } else {
            crate::hub::PathRedactor::new(&self.hub_options())
        }
    }

    /// Parses and validates settings from JSON; omitted keys take their defaults.
    pub fn from_json(text: &str) -> Result<Self> {
        let settings: EngineSettings = json::parse(text, json::Shape::Object(&[]))?;
        settings.validate()?;
        Ok(settings)
    }

    /// The settings as JSON (every key).
    pub fn to_json(&self) -> String {
        json::to_string(self)
    }

    /// Checks the rules serde cannot: ranges and non-empty strings.
    pub fn validate(&self) -> Result<()> {
        if self.frame_buffer_size < 1 {
            return Err(Error::param(
                "frame_buffer_size",
                format!(
                    "frame_buffer_size must be at least 1; got {}",
                    self.frame_buffer_size
                ),
            ));
        }
        if let Some(ms) = self.frame_budget_ms
            && !(ms.is_finite() && (1.0..=60_000.0).contains(&ms))
        {
            return Err(Error::param(
                "frame_budget_ms",
                format!("frame_budget_ms must be from 1 to 60000 milliseconds, or null; got {ms}"),
            ));
        }
        if let VaeChoice::Custom(id) = &self.vae
            && id.trim().is_empty()
        {
            return Err(Error::param(
                "vae",
                "vae must be \"taesd\", \"full\" or a folder / model id of an AutoencoderTiny; got \"\"",
            ));
        }
        if let Some(root) = &self.model_root
            && root.as_os_str().is_empty()
        {
            return Err(Error::param(
                "model_root",
                "model_root must be a folder path or null; got \"\"",
            ));
        }
        for (i, id) in self.allowed_models.iter().enumerate() {
            if !crate::hub::is_hub_id(id) {
                return Err(Error::param(
                    format!("allowed_models[{i}]"),
                    format!(
                        "allowed_models[{i}] must be a hub id, org/name or name (letters, digits, \
                         '-', '_', '.'), found under model_root, in the cache or on the hub; \
                         got {id:?}"
                    ),
                ));
            }
        }
        if let VaeChoice::Custom(id) = &self.vae
            && !self.allow_model_paths
            && !crate::hub::is_hub_id(id)
        {
            return Err(Error::param(
                "vae",
                format!(
                    "with allow_model_paths false, vae must be \"taesd\", \"full\" or a hub id \
                     (org/name or name) found under model_root, in the cache or on the hub; \
                     got {id:?}"
                ),
            ));
        }
        Ok(())
    }
}

/// The message of an [`Error::InvalidParam`] alone (serde adds the path itself).
fn message_of(e: Error) -> String {
    match e {
        Error::InvalidParam { message, .. } => message,
        other => other.to_string(),
    }
}
