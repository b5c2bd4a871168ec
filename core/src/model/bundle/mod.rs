//! A loaded Stable Diffusion checkpoint: the networks one stream needs, built from a diffusers
//! folder (model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/) plus TAESD.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::hub::{self, HubOptions, Wanted};
use crate::model::clip::ClipTextModel;
use crate::model::lora::{DIFFUSERS_LORA_FILE, LoraDeltas, LoraFile, LoraTarget};
use crate::model::taesd::AutoencoderTiny;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::AutoencoderKl;
use crate::model::weight_table::WeightTable;
use crate::model::{checked_backend, read_config};
use crate::params::{EngineSettings, ModelFamily, StreamDiffusionParams, VaeChoice};
use crate::pipeline::cross_stream::CrossStreamBatcher;
use crate::sampling::rng::TorchGenerator;
use crate::sampling::scheduler::LcmScheduler;
use crate::{Error, Result};

mod checks;
mod controlnets;
mod text;

use checks::{
    check_latent_channels, check_model_index, check_text_width, check_tokenizer_fits,
    refuse_second_encoder_loras,
};
pub use controlnets::CONTROLNET_CACHE_SIZE;
use controlnets::NetCache;

/// The image autoencoder a stream encodes and decodes with.
#[derive(Debug, Clone)]
pub enum Autoencoder {
    /// The checkpoint's own AutoencoderKL; its posterior is sampled with the stream's generator.
    Kl(Box<AutoencoderKl>),
    /// TAESD: deterministic, an order of magnitude cheaper.
    Tiny(Box<AutoencoderTiny>),
}

impl Autoencoder {
    /// Latent z₀ = s·E(x) for images in [−1, 1]; the KL posterior draws its noise from
    /// `generator`, as the reference's `retrieve_latents(vae.encode(x), generator)`. The latent
    /// has `x`'s dtype even where the VAE computes in another (an upcast SDXL VAE).
    pub fn encode(&self, x: &Tensor, generator: &mut TorchGenerator) -> Result<Tensor> {
        let features = self.encode_features(x)?;
        self.latent_from_features(&features, x.dtype(), generator)
    }

    /// The encoder's network alone, for a batch `[B, 3, H, W]`: TAESD's latent (unscaled), or
    /// the KL posterior's mean and log-variance side by side on the channels. Rows are
    /// independent, so several streams' frames may be encoded in one call
    /// ([`crate::pipeline::cross_stream`]).
    pub fn encode_features(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Autoencoder::Kl(vae) => {
                let (mean, logvar) = vae.encode_moments(&x.to_dtype(vae.dtype())?)?;
                Ok(Tensor::cat(&[&mean, &logvar], 1)?)
            }
            Autoencoder::Tiny(taesd) => taesd.encode(x),
        }
    }

    /// One stream's latent z₀ from its rows of [`encode_features`](Self::encode_features): the
    /// KL posterior sampled with the stream's generator, scaled, in `dtype`.
    pub fn latent_from_features(
        &self,
        features: &Tensor,
        dtype: DType,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        match self {
            Autoencoder::Kl(vae) => {
                let half = features.dim(1)? / 2;
                let mean = features.narrow(1, 0, half)?;
                let logvar = features.narrow(1, half, half)?;
                let noise = generator
                    .randn_tensor(mean.dims(), mean.device())?
                    .to_dtype(mean.dtype())?;
                let z = AutoencoderKl::sample_posterior(&mean, &logvar, &noise)?;
                Ok((z * vae.scaling_factor())?.to_dtype(dtype)?)
            }
            Autoencoder::Tiny(taesd) => Ok((features * taesd.scaling_factor())?),
        }
    }

    /// Image in [−1, 1] from a latent z₀ (the scaling factor is undone here), in the
    /// autoencoder's dtype.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        match self {
            Autoencoder::Kl(vae) => vae.decode(&(z.to_dtype(vae.dtype())? / vae.scaling_factor())?),
            Autoencoder::Tiny(taesd) => taesd.decode(&(z / taesd.scaling_factor())?),
        }
    }

    /// Pixels per latent cell along each axis.
    pub fn spatial_scale_factor(&self) -> usize {
        match self {
            Autoencoder::Kl(vae) => vae.spatial_scale_factor(),
            Autoencoder::Tiny(taesd) => taesd.spatial_scale_factor(),
        }
    }

    /// Latent channels (4 for SD).
    pub fn latent_channels(&self) -> usize {
        match self {
            Autoencoder::Kl(vae) => vae.latent_channels(),
            Autoencoder::Tiny(taesd) => taesd.latent_channels(),
        }
    }
}

/// Every network of one checkpoint, on one device in one dtype.
#[derive(Debug)]
pub struct StableDiffusionModels {
    /// The checkpoint folder the networks came from.
    pub dir: PathBuf,
    /// The LoRA files fused into the UNet and text encoder, with their weights, in order.
    pub loras: Vec<(PathBuf, f64)>,
    /// SD1.5, SD2.1 or SDXL, from the UNet's cross-attention width.
    pub family: ModelFamily,
    /// CLIP tokenizer.
    pub tokenizer: ClipTokenizer,
    /// CLIP text encoder.
    pub text_encoder: ClipTextModel,
    /// The denoising UNet.
    pub unet: UNet2DConditionModel,
    /// SDXL's second tokenizer and text encoder (with projection); `None` for SD 1.5/2.1.
    pub second: Option<SecondTextEncoder>,
    /// Image encoder/decoder.
    pub autoencoder: Autoencoder,
    /// Timestep grid and coefficients, from scheduler/scheduler_config.json.
    pub scheduler: LcmScheduler,
    /// Where the tensors live.
    pub device: Device,
    /// The dtype the networks run in.
    pub dtype: DType,
    /// Where ControlNet ids are resolved (the base model's options: model_root, cache, hub).
    hub: HubOptions,
    /// Bytes of the networks' tensors (ControlNets not included).
    weight_bytes: u64,
    /// ControlNets loaded for this checkpoint.
    controlnets: Mutex<NetCache>,
    /// ControlNet loads performed (weights read), for the pool's figures and tests.
    controlnet_loads: AtomicU64,
    /// The text encoder's and the UNet's tensors by name, for a LoRA change
    /// ([`with_loras`](Self::with_loras)).
    text_encoder_weights: WeightTable,
    unet_weights: WeightTable,
    /// The UNet calls of the streams sharing these networks, batched across streams
    /// ([`CrossStreamBatcher`]).
    pub(crate) batcher: Arc<CrossStreamBatcher>,
}

/// SDXL's second tokenizer and text encoder (`tokenizer_2/`, `text_encoder_2/`: OpenCLIP bigG
/// with `text_projection`, whose pooled output is SDXL's `text_embeds`).
#[derive(Debug, Clone)]
pub struct SecondTextEncoder {
    /// `tokenizer_2/` (sdxl-turbo's pads with `!`).
    pub tokenizer: ClipTokenizer,
    /// `text_encoder_2/`, a `CLIPTextModelWithProjection`.
    pub text_encoder: ClipTextModel,
    /// The encoder's tensors by name, for a LoRA change.
    weights: WeightTable,
}

impl SecondTextEncoder {
    fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        lora: Option<Arc<LoraDeltas>>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let tokenizer = timed(progress, "tokenizer 2", dir, || {
            ClipTokenizer::from_dir(&dir.join("tokenizer_2"))
        })?;
        let (text_encoder, weights) = timed(progress, "text encoder 2", dir, || {
            ClipTextModel::load_with_lora(&dir.join("text_encoder_2"), dtype, device, lora)
        })?;
        if !text_encoder.config().with_projection() {
            return Err(Error::ModelLoad {
                path: dir.join("text_encoder_2/config.json"),
                detail: "an SDXL checkpoint's second text encoder must be a \
                         CLIPTextModelWithProjection (its pooled, projected output conditions the \
                         UNet); `architectures` does not name it"
                    .into(),
            });
        }
        check_tokenizer_fits(dir, "_2", &tokenizer, &text_encoder)?;
        Ok(Self {
            tokenizer,
            text_encoder,
            weights,
        })
    }
}

/// SDXL's conditioning of one text: both encoders' penultimate hidden states side by side,
/// `[1, 77, D₁ + D₂]`, and the second encoder's projected pooled output, `[1, P]`.
#[derive(Debug, Clone)]
pub struct SdxlText {
    /// diffusers' `prompt_embeds`.
    pub embeds: Tensor,
    /// diffusers' `pooled_prompt_embeds` (the UNet's `text_embeds`).
    pub pooled: Tensor,
}

/// What a stream asks for: a checkpoint and the LoRAs fused into it. Built from the parameters
/// (`model_id`, `use_lcm_lora` + `lcm_lora_id`, `lora_dict`), or from a bare model id.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelRequest {
    /// The checkpoint's id (a hub id or, where allowed, a folder).
    pub model_id: String,
    /// The LCM-LoRA, fused at weight 1 when the checkpoint is an SD 1.5 one (turbo models and
    /// other families need none; the family is read from the checkpoint, not the id).
    pub lcm_lora: Option<String>,
    /// Further LoRAs with their weights, fused after the LCM-LoRA in this order.
    pub loras: Vec<(String, f64)>,
}

impl From<&str> for ModelRequest {
    fn from(model_id: &str) -> Self {
        Self {
            model_id: model_id.to_string(),
            ..Self::default()
        }
    }
}

impl From<&String> for ModelRequest {
    fn from(model_id: &String) -> Self {
        Self::from(model_id.as_str())
    }
}

impl From<&StreamDiffusionParams> for ModelRequest {
    fn from(params: &StreamDiffusionParams) -> Self {
        Self {
            model_id: params.model_id.clone(),
            lcm_lora: params.use_lcm_lora.then(|| params.lcm_lora_id.clone()),
            loras: params
                .lora_dict
                .iter()
                .flatten()
                .map(|(id, weight)| (id.clone(), *weight))
                .collect(),
        }
    }
}

/// The folders and files a checkpoint loads from, once its ids are resolved.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedFolders {
    /// The diffusers checkpoint folder.
    pub(crate) dir: PathBuf,
    /// A custom TAESD's folder (`vae` naming one); `None` for the checkpoint's own VAE or the
    /// family's default TAESD.
    pub(crate) taesd: Option<PathBuf>,
    /// LoRA files with their weights, in the order they are fused.
    pub(crate) loras: Vec<(PathBuf, f64)>,
}

/// Files a stream needs from a checkpoint, so a hub download fetches only those
/// (patterns as [`hub::resolve`] reads them; `?` marks optional files): what a script that
/// fetches a model ahead of time asks for.
pub fn checkpoint_files(full_vae: bool, fp16: bool) -> Vec<String> {
    let mut files: Vec<String> = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "?tokenizer/special_tokens_map.json",
        "?tokenizer/tokenizer.json",
        "text_encoder/config.json",
        "unet/config.json",
    ]
    .map(String::from)
    .to_vec();
    files.push(hub::weights_pattern("text_encoder", "model", fp16));
    // SDXL's second encoder; the family is known only once the UNet config is read.
    for file in [
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
        "tokenizer_2/tokenizer_config.json",
        "tokenizer_2/special_tokens_map.json",
        "text_encoder_2/config.json",
    ] {
        files.push(format!("?{file}"));
    }
    files.push(format!(
        "?{}",
        hub::weights_pattern("text_encoder_2", "model", fp16)
    ));
    files.push(hub::weights_pattern(
        "unet",
        "diffusion_pytorch_model",
        fp16,
    ));
    if full_vae {
        files.push("vae/config.json".into());
        files.push(hub::weights_pattern("vae", "diffusion_pytorch_model", fp16));
    }
    files
}

/// Files of a single-network folder (TAESD, a ControlNet): its config and its weights.
pub fn component_files(fp16: bool) -> Vec<String> {
    vec![
        "config.json".into(),
        hub::weights_pattern("", "diffusion_pytorch_model", fp16),
    ]
}

/// The LoRA file `id` names; an id that names none is an error on `field`.
fn lora_file(id: &str, opts: &HubOptions, field: &str) -> Result<PathBuf> {
    resolve_lora(id, opts).map_err(|e| match e {
        Error::ModelNotFound { .. } => Error::param(field, format!("LoRA {id}: {e}")),
        other => other,
    })
}

pub(super) fn resolve(id: &str, opts: &HubOptions, files: &[String]) -> Result<PathBuf> {
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    hub::resolve(id, opts, &files)
}

impl StableDiffusionModels {
    /// Resolves `model_id` (local folder, model_root, HF cache, hub) and loads every network,
    /// reporting each step through `progress`. Every call is a load of its own; streams that
    /// should share one copy get their networks from a [`ModelPool`](crate::model::pool::ModelPool).
    pub fn load(
        request: impl Into<ModelRequest>,
        settings: &EngineSettings,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let folders = Self::resolve(&request.into(), settings)?;
        Self::load_resolved(&folders, settings, progress)
    }

    /// The folders and files `request` and the settings' autoencoder resolve to (local folder,
    /// model_root, HF cache, or a download of the files a stream needs). Reads the UNet's
    /// config (the family decides whether the LCM-LoRA applies), no weights.
    pub(crate) fn resolve(
        request: &ModelRequest,
        settings: &EngineSettings,
    ) -> Result<ResolvedFolders> {
        let fp16 = settings.dtype.dtype() == DType::F16;
        let opts = settings.hub_options();
        let full_vae = settings.vae == VaeChoice::Full;
        let dir = match hub::single_file(&request.model_id, &opts) {
            Some(file) => crate::model::single_file::diffusers_folder(&file, &opts)?,
            None => resolve(&request.model_id, &opts, &checkpoint_files(full_vae, fp16))?,
        };
        // The default TAESD depends on the family, known only once the UNet config is read.
        let taesd = match &settings.vae {
            VaeChoice::Custom(id) => Some(resolve(id, &opts, &component_files(fp16))?),
            VaeChoice::Full | VaeChoice::Taesd => None,
        };
        let mut loras = Vec::new();
        if let Some(lcm) = &request.lcm_lora {
            let config: UNetConfig = read_config(&dir.join("unet/config.json"))?;
            if family_of(&config) == ModelFamily::Sd15 {
                loras.push((lora_file(lcm, &opts, "lcm_lora_id")?, 1.0));
            }
        }
        for (id, weight) in &request.loras {
            loras.push((lora_file(id, &opts, &format!("lora_dict.{id}"))?, *weight));
        }
        Ok(ResolvedFolders { dir, taesd, loras })
    }

    /// Loads every network from already resolved folders.
    pub(crate) fn load_resolved(
        folders: &ResolvedFolders,
        settings: &EngineSettings,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let before = checked_backend::loaded_bytes();
        let mut models = Self::load_dir(folders, settings, settings.hub_options(), progress)?;
        models.weight_bytes = checked_backend::loaded_bytes() - before;
        // The streams that share these networks run on threads of their own, each with its own
        // CUDA stream (candle's per-thread default streams, which nothing orders): the weights,
        // uploaded and converted on this thread's, must be in place before theirs read them.
        models.device.synchronize()?;
        Ok(models)
    }

    /// These networks with the LoRAs of `folders` fused instead of this load's, rebuilt from
    /// the tensors in memory without reading the checkpoint's files: only the tensors some LoRA
    /// of either set patches are computed again (in f32: this load's deltas taken away, the
    /// new ones added), every other tensor is shared with these networks, and so are the
    /// tokenizers, the autoencoder and the cached ControlNets. The caller (the model pool)
    /// makes sure `folders` names this checkpoint with this autoencoder. A LoRA that does not
    /// fit is refused as at a load, and these networks are left as they are.
    pub(crate) fn with_loras(
        &self,
        folders: &ResolvedFolders,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let old = open_loras(&self.loras, progress)?;
        let new = open_loras(&folders.loras, progress)?;
        let deltas = |target| (LoraDeltas::new(target, &old), LoraDeltas::new(target, &new));
        let device = &self.device;
        let (text_encoder, text_encoder_weights) = match deltas(LoraTarget::TextEncoder) {
            (None, None) => (self.text_encoder.clone(), self.text_encoder_weights.clone()),
            (old, new) => timed(progress, "text encoder (LoRA change)", &self.dir, || {
                self.text_encoder
                    .rebuild_with_lora(&self.text_encoder_weights, old, new, device)
            })?,
        };
        let (unet, unet_weights) = match deltas(LoraTarget::Unet) {
            (None, None) => (self.unet.clone(), self.unet_weights.clone()),
            (old, new) => timed(progress, "unet (LoRA change)", &self.dir, || {
                self.unet
                    .rebuild_with_lora(&self.unet_weights, old, new, device)
            })?,
        };
        let second = match &self.second {
            Some(second) => Some(match deltas(LoraTarget::TextEncoder2) {
                (None, None) => second.clone(),
                (old, new) => {
                    let (text_encoder, weights) =
                        timed(progress, "text encoder 2 (LoRA change)", &self.dir, || {
                            second
                                .text_encoder
                                .rebuild_with_lora(&second.weights, old, new, device)
                        })?;
                    SecondTextEncoder {
                        tokenizer: second.tokenizer.clone(),
                        text_encoder,
                        weights,
                    }
                }
            }),
            None => {
                refuse_second_encoder_loras(&new)?;
                None
            }
        };
        let controlnets = self.lock_controlnets().shared_copy();
        // As a load: the rebuilt weights are in place before other threads read them.
        self.device.synchronize()?;
        Ok(Self {
            dir: self.dir.clone(),
            loras: folders.loras.clone(),
            family: self.family,
            tokenizer: self.tokenizer.clone(),
            text_encoder,
            unet,
            second,
            autoencoder: self.autoencoder.clone(),
            scheduler: self.scheduler.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
            hub: self.hub.clone(),
            weight_bytes: self.weight_bytes,
            controlnets: Mutex::new(controlnets),
            controlnet_loads: AtomicU64::new(0),
            text_encoder_weights,
            unet_weights,
            batcher: CrossStreamBatcher::new(&self.device),
        })
    }

    /// Loads from an already resolved checkpoint folder.
    fn load_dir(
        folders: &ResolvedFolders,
        settings: &EngineSettings,
        opts: HubOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let dir = folders.dir.as_path();
        let taesd_dir = folders.taesd.clone();
        let stack = open_loras(&folders.loras, progress)?;
        let device = settings.device.device()?;
        let (dtype, bf16_gemms) = compute_dtype(settings.dtype.dtype(), &device);
        if bf16_gemms && !crate::model::kernels::gemm_bf16::Kernel::best().has_bf16_arithmetic() {
            // Honoured (the pictures are bf16's everywhere), but the user chose it for speed.
            progress(
                "dtype bf16: this CPU has neither AMX tiles nor AVX512-BF16, so the bf16 GEMMs run \
                 on its f32 vector units, a frame taking about 1.5x f32's time; use dtype f32 for \
                 speed",
            );
        }
        let fp16 = dtype == DType::F16;
        check_model_index(dir, settings.vae == VaeChoice::Full)?;
        let scheduler = LcmScheduler::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        let tokenizer = timed(progress, "tokenizer", dir, || {
            ClipTokenizer::from_dir(&dir.join("tokenizer"))
        })?;
        let (text_encoder, text_encoder_weights) = timed(progress, "text encoder", dir, || {
            ClipTextModel::load_with_lora(
                &dir.join("text_encoder"),
                dtype,
                &device,
                LoraDeltas::new(LoraTarget::TextEncoder, &stack),
            )
        })?;
        check_tokenizer_fits(dir, "", &tokenizer, &text_encoder)?;
        let (unet, unet_weights) = timed(progress, "unet", dir, || {
            UNet2DConditionModel::load_with_lora(
                &dir.join("unet"),
                dtype,
                &device,
                LoraDeltas::new(LoraTarget::Unet, &stack),
            )
        })?;
        let unet = unet.with_bf16_gemms(bf16_gemms);
        let family = family_of(unet.config());
        let second = if family == ModelFamily::Sdxl {
            let lora = LoraDeltas::new(LoraTarget::TextEncoder2, &stack);
            Some(SecondTextEncoder::load(
                dir, dtype, &device, lora, progress,
            )?)
        } else {
            refuse_second_encoder_loras(&stack)?;
            None
        };
        check_text_width(dir, &unet, &text_encoder, second.as_ref())?;
        let (autoencoder, vae_dir) = if settings.vae == VaeChoice::Full {
            let vae_dir = dir.join("vae");
            let vae_dtype = vae_dtype(family, &vae_dir, dtype)?;
            let vae = timed(progress, "vae", dir, || {
                AutoencoderKl::load(&vae_dir, vae_dtype, &device)
            })?
            .with_bf16_gemms(bf16_gemms);
            (Autoencoder::Kl(Box::new(vae)), vae_dir)
        } else {
            let taesd_dir = match taesd_dir {
                Some(d) => d,
                None => resolve(family.taesd_id(), &opts, &component_files(fp16))?,
            };
            let taesd = timed(progress, "taesd", &taesd_dir, || {
                AutoencoderTiny::load(&taesd_dir, dtype, &device)
            })?
            .with_bf16_gemms(bf16_gemms);
            (Autoencoder::Tiny(Box::new(taesd)), taesd_dir)
        };
        check_latent_channels(dir, &unet, &autoencoder, &vae_dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            loras: folders.loras.clone(),
            family,
            tokenizer,
            text_encoder,
            unet,
            second,
            autoencoder,
            scheduler,
            batcher: CrossStreamBatcher::new(&device),
            device,
            dtype,
            hub: opts,
            weight_bytes: 0,
            controlnets: Mutex::new(NetCache::default()),
            controlnet_loads: AtomicU64::new(0),
            text_encoder_weights,
            unet_weights,
        })
    }

    /// The scheduler that batches the UNet calls of the streams on these networks.
    pub fn batcher(&self) -> &Arc<CrossStreamBatcher> {
        &self.batcher
    }

    /// Bytes of the networks' tensors in their dtype (tokenizer, scheduler and ControlNets
    /// not included): what one copy of the checkpoint costs.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
}

/// The family of a checkpoint from its UNet config: SDXL adds `text_time` conditioning, SD2.x
/// introduced linear projections in its transformers, everything else is SD1.x. Structure, not
/// widths, so that scaled-down test checkpoints classify like the models they imitate.
fn family_of(unet: &UNetConfig) -> ModelFamily {
    if unet.addition_embed_type.as_deref() == Some("text_time") {
        ModelFamily::Sdxl
    } else if unet.use_linear_projection {
        ModelFamily::Sd21
    } else {
        ModelFamily::Sd15
    }
}

/// Checks `model_index.json`, diffusers' index of a pipeline folder: a JSON object naming the
/// pipeline class (`_class_name`, which diffusers needs to load the folder) and every component
/// as a `[library, class]` pair. The components a stream reads must be declared, not
/// `[null, null]`; the networks' own config.json files decide everything else.
/// The dtype the networks hold their maps in for the `requested` one on `device`, and whether
/// the GEMMs of the UNet, its ControlNets and the autoencoder multiply in bf16. On the CPU, bf16 means f32 maps whose GEMMs round their
/// operands to bf16 and sum in f32 (kernels::gemm_bf16: AMX where the CPU has it), since
/// candle's CPU ops have no bf16 arithmetic of their own; elsewhere the dtype is the dtype.
pub(crate) fn compute_dtype(requested: DType, device: &Device) -> (DType, bool) {
    if requested == DType::BF16 && device.is_cpu() {
        (DType::F32, true)
    } else {
        (requested, false)
    }
}

/// The dtype the checkpoint's VAE computes in: f32 for an SDXL VAE whose config sets
/// `force_upcast` when the engine runs in f16 (SDXL's VAE overflows f16's range; diffusers' SDXL
/// pipelines upcast it the same way, and bf16 has f32's range), else the engine's dtype.
fn vae_dtype(family: ModelFamily, vae_dir: &Path, dtype: DType) -> Result<DType> {
    if family != ModelFamily::Sdxl || dtype != DType::F16 {
        return Ok(dtype);
    }
    let config: crate::model::vae::Config = read_config(&vae_dir.join("config.json"))?;
    Ok(if config.force_upcast {
        DType::F32
    } else {
        dtype
    })
}

/// Opens the LoRA files of `loras`, reporting each to `progress`.
fn open_loras(
    loras: &[(PathBuf, f64)],
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<(Arc<LoraFile>, f64)>> {
    loras
        .iter()
        .map(|(path, weight)| {
            let file = timed(progress, "lora", path, || LoraFile::open(path))?;
            Ok((Arc::new(file), *weight))
        })
        .collect()
}

pub(super) fn timed<T>(
    progress: &mut dyn FnMut(&str),
    what: &str,
    dir: &Path,
    step: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let start = Instant::now();
    progress(&format!("loading {what} from {}", dir.display()));
    let value = step()?;
    progress(&format!(
        "loaded {what} in {:.2} s",
        start.elapsed().as_secs_f64()
    ));
    Ok(value)
}

/// `path` with links and `.` resolved, so that two spellings of one folder compare equal; the
/// path as given when the file system cannot say.
pub(crate) fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Locks `slot`, first telling `waiting` when another thread holds it (a load in progress that
/// this caller is about to wait for). A poisoned lock guards nothing but the wait itself.
pub(crate) fn lock_or_wait<'a>(slot: &'a Mutex<()>, waiting: impl FnOnce()) -> MutexGuard<'a, ()> {
    match slot.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            waiting();
            slot.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }
}

/// The LoRA file `id` names: a `.safetensors` file (where paths are allowed), or a folder or hub
/// repository (resolved like a model: local folder, model_root, HF cache, hub) holding
/// `pytorch_lora_weights.safetensors` or exactly one other `.safetensors` file.
pub fn resolve_lora(id: &str, opts: &HubOptions) -> Result<PathBuf> {
    if opts.allow_paths {
        let as_file = Path::new(id);
        if as_file.is_file() {
            return Ok(as_file.to_path_buf());
        }
    }
    let dir = hub::resolve_wanted(id, opts, &[Wanted::Glob("*.safetensors".into())])?;
    let preferred = dir.join(DIFFUSERS_LORA_FILE);
    if preferred.is_file() {
        return Ok(preferred);
    }
    let read = std::fs::read_dir(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    let mut files: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    match files.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::ModelLoad {
            path: dir,
            detail: format!(
                "no LoRA here: expected {DIFFUSERS_LORA_FILE} or one .safetensors file"
            ),
        }),
        many => Err(Error::ModelLoad {
            path: dir.clone(),
            detail: format!(
                "{} .safetensors files and no {DIFFUSERS_LORA_FILE}: name the file itself ({})",
                many.len(),
                many.iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}
