//! One copy of a checkpoint's networks for every stream in the process.
//!
//! A [`ModelPool`] hands out [`StableDiffusionModels`] by [`ModelKey`]: the resolved checkpoint
//! folder (so two spellings of one folder share), the dtype, the device, the autoencoder and
//! where ids are looked up. Every [`Engine`](crate::Engine) and
//! [`StreamDiffusion::new`](crate::StreamDiffusion::new) takes its networks from
//! [`ModelPool::global`], so N streams on one model cost one set of weights plus their own
//! state; ControlNets are shared through the networks' own ControlNet cache
//! ([`StableDiffusionModels::controlnet`]).
//!
//! Loading. The pool's lock is only held for bookkeeping. Each key has a slot whose own lock is
//! held for the whole of a load: a second request for the key waits there and then takes what
//! the first loaded, while loads of other keys go on beside it. A failed load leaves nothing
//! behind; a request that waited for it tries again itself.
//!
//! Release. The pool keeps only weak references: an entry lives exactly as long as some stream
//! (or any other holder of the `Arc`) uses it, and its memory returns when the last stream is
//! dropped. That is what a server deleting streams needs, and it needs no timer or policy
//! setting; a host that wants a model kept warm while no stream runs holds an `Arc` from
//! [`ModelPool::get`] itself. (Reloading a just-released model reads the files again, mostly
//! from the OS page cache.)
//!
//! LoRA changes. A request for a checkpoint some stream holds with other LoRAs (a weight
//! changed, a LoRA added or removed) is rebuilt from those networks' tensors
//! ([`StableDiffusionModels::with_loras`]): only the tensors the LoRAs patch are computed again,
//! the rest are shared, and no weight file is read.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use serde::Serialize;

use crate::Result;
use crate::hub::HubOptions;
use crate::model::bundle::{
    ModelRequest, ResolvedFolders, StableDiffusionModels, canonical, lock_or_wait,
};
use crate::model::kernels::KernelPolicy;
use crate::params::{DTypeChoice, DeviceSpec, EngineSettings, VaeChoice};

/// What decides which networks a load produces: two requests with equal keys share one load.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelKey {
    /// The checkpoint folder, canonical (links and `.` resolved).
    pub dir: PathBuf,
    /// The networks' dtype.
    pub dtype: DTypeChoice,
    /// Where the networks live.
    pub device: DeviceSpec,
    /// The autoencoder.
    pub vae: VaeKey,
    /// Where the default TAESD and the ControlNet ids are looked up: streams whose ids could
    /// resolve to other folders must not share a ControlNet cache.
    pub hub: HubOptions,
    /// The LoRA files fused into the networks (canonical) with their weights' bits, in order.
    pub loras: Vec<(PathBuf, u64)>,
    /// The kernel policy the networks load under: a layer's layout (channels-last, f32 copies
    /// of bf16 weights, packed GEMM operands) is decided at load from it.
    pub kernels: KernelPolicy,
}

/// The autoencoder part of a [`ModelKey`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VaeKey {
    /// The checkpoint's own AutoencoderKL.
    Full,
    /// The family's default TAESD (found through [`ModelKey::hub`]).
    Taesd,
    /// A TAESD from this folder (canonical).
    Custom(PathBuf),
}

impl ModelKey {
    /// The key of `folders` (already resolved) under `settings`.
    fn of(folders: &ResolvedFolders, settings: &EngineSettings) -> Self {
        let vae = match (&settings.vae, &folders.taesd) {
            (VaeChoice::Full, _) => VaeKey::Full,
            (_, Some(dir)) => VaeKey::Custom(canonical(dir)),
            (_, None) => VaeKey::Taesd,
        };
        Self {
            dir: canonical(&folders.dir),
            dtype: settings.dtype,
            device: settings.device,
            vae,
            hub: settings.hub_options(),
            loras: folders
                .loras
                .iter()
                .map(|(path, weight)| (canonical(path), weight.to_bits()))
                .collect(),
            kernels: settings.kernel_policy(),
        }
    }
}

/// A request as the caller spelled it: found again without touching the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Alias {
    model_id: String,
    lcm_lora: Option<String>,
    /// `lora_dict` ids with their weights' bits.
    loras: Vec<(String, u64)>,
    dtype: DTypeChoice,
    device: DeviceSpec,
    vae: VaeChoice,
    hub: HubOptions,
    kernels: KernelPolicy,
}

impl Alias {
    fn new(request: &ModelRequest, settings: &EngineSettings) -> Self {
        Self {
            model_id: request.model_id.clone(),
            lcm_lora: request.lcm_lora.clone(),
            loras: request
                .loras
                .iter()
                .map(|(id, weight)| (id.clone(), weight.to_bits()))
                .collect(),
            dtype: settings.dtype,
            device: settings.device,
            vae: settings.vae.clone(),
            hub: settings.hub_options(),
            kernels: settings.kernel_policy(),
        }
    }
}

/// One key's place in the pool.
#[derive(Debug)]
struct Slot {
    key: ModelKey,
    /// Held for the whole of a load of this key.
    loading: Mutex<()>,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    models: Weak<StableDiffusionModels>,
    /// The spellings this entry was asked for by, for lookups that must not read the disk.
    aliases: Vec<Alias>,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, SlotState> {
        // Every change under this lock is a single store or push: a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The networks if they are loaded and some stream holds them, now also known by `alias`.
    fn live(&self, alias: &Alias) -> Option<Arc<StableDiffusionModels>> {
        let mut state = self.state();
        let models = state.models.upgrade()?;
        if !state.aliases.contains(alias) {
            state.aliases.push(alias.clone());
        }
        Some(models)
    }
}

/// Counters of a pool since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Checkpoints loaded (weights read).
    pub loads: u64,
    /// Requests served with networks already loaded.
    pub reuses: u64,
    /// Requests that waited for another request's load of the same key (and then shared it,
    /// or, if it failed, loaded themselves).
    pub waits: u64,
    /// Checkpoints rebuilt from a loaded one of the same checkpoint with other LoRAs (or other
    /// LoRA weights), without reading the weights again.
    pub lora_rebuilds: u64,
}

/// One loaded checkpoint, as [`ModelPool::entries`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolEntry {
    /// The checkpoint folder.
    pub model_dir: PathBuf,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// `cpu`, `cuda:N` or `metal`.
    pub device: String,
    /// `full`, `taesd` or the custom TAESD's folder.
    pub vae: String,
    /// Holders of the networks: each stream's pipeline holds one (a pipeline being built
    /// beside a serving one for a reload holds another).
    pub holders: usize,
    /// Bytes of the networks' tensors (see [`StableDiffusionModels::weight_bytes`]).
    pub weight_bytes: u64,
    /// ControlNets cached for this checkpoint.
    pub controlnets: usize,
    /// Bytes of their tensors.
    pub controlnet_bytes: u64,
}

impl PoolEntry {
    /// Weights and ControlNets together.
    pub fn total_bytes(&self) -> u64 {
        self.weight_bytes + self.controlnet_bytes
    }
}

/// Loaded checkpoints by [`ModelKey`], shared by the streams that use them. See the module
/// documentation for the loading and release rules.
#[derive(Debug, Default)]
pub struct ModelPool {
    slots: Mutex<Vec<Arc<Slot>>>,
    loads: AtomicU64,
    reuses: AtomicU64,
    waits: AtomicU64,
    lora_rebuilds: AtomicU64,
}

impl ModelPool {
    /// An empty pool of its own (tests, or a host that wants separate accounting); streams
    /// share weights only within one pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide pool every [`Engine`](crate::Engine) and
    /// [`StreamDiffusion::new`](crate::StreamDiffusion::new) uses.
    pub fn global() -> &'static Arc<ModelPool> {
        static GLOBAL: OnceLock<Arc<ModelPool>> = OnceLock::new();
        GLOBAL.get_or_init(|| Arc::new(ModelPool::new()))
    }

    /// The networks of `request` (a model id, or a stream's parameters: the id with the LoRAs
    /// to fuse) under `settings` (dtype, device, vae, where ids are looked up): the loaded ones when some stream holds them, else loaded now (resolving the id
    /// first, which may download), reporting steps to `progress`. A request for a key another
    /// request is loading waits for that load instead of reading the weights again.
    pub fn get(
        &self,
        request: impl Into<ModelRequest>,
        settings: &EngineSettings,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Arc<StableDiffusionModels>> {
        let request = request.into();
        let alias = Alias::new(&request, settings);
        if let Some(models) = self.find_alias(&alias) {
            self.reuses.fetch_add(1, Ordering::Relaxed);
            return Ok(models);
        }
        let folders = StableDiffusionModels::resolve(&request, settings)?;
        let slot = self.slot(ModelKey::of(&folders, settings));
        if let Some(models) = slot.live(&alias) {
            self.reuses.fetch_add(1, Ordering::Relaxed);
            return Ok(models);
        }
        let _loading = lock_or_wait(&slot.loading, || {
            self.waits.fetch_add(1, Ordering::Relaxed);
            progress(&format!(
                "waiting for {}, which another stream is loading",
                folders.dir.display()
            ));
        });
        if let Some(models) = slot.live(&alias) {
            self.reuses.fetch_add(1, Ordering::Relaxed);
            return Ok(models);
        }
        // The same checkpoint loaded with other LoRAs (a LoRA weight changed, one added or
        // removed): rebuild from its tensors instead of reading the weights again. Either way
        // under the key's kernel policy, which decides the layers' layouts.
        let _policy = slot.key.kernels.enter();
        let models = match self.lora_sibling(&slot.key) {
            Some(sibling) => {
                let models = Arc::new(sibling.with_loras(&folders, progress)?);
                self.lora_rebuilds.fetch_add(1, Ordering::Relaxed);
                models
            }
            None => {
                let models = Arc::new(StableDiffusionModels::load_resolved(
                    &folders, settings, progress,
                )?);
                self.loads.fetch_add(1, Ordering::Relaxed);
                models
            }
        };
        let mut state = slot.state();
        state.models = Arc::downgrade(&models);
        if !state.aliases.contains(&alias) {
            state.aliases.push(alias);
        }
        Ok(models)
    }

    /// The loaded networks some earlier [`get`](Self::get) with this request (the model id as
    /// spelled, the LoRA fields as given: pass a stream's parameters to find its networks) and
    /// these settings returned, if a stream still holds them; never reads the disk or loads.
    pub fn find(
        &self,
        request: impl Into<ModelRequest>,
        settings: &EngineSettings,
    ) -> Option<Arc<StableDiffusionModels>> {
        self.find_alias(&Alias::new(&request.into(), settings))
    }

    fn find_alias(&self, alias: &Alias) -> Option<Arc<StableDiffusionModels>> {
        let slots = self.lock_slots();
        slots.iter().find_map(|slot| {
            let state = slot.state();
            state
                .aliases
                .contains(alias)
                .then(|| state.models.upgrade())
                .flatten()
        })
    }

    /// Loaded networks of `key`'s checkpoint, dtype, device, autoencoder and lookup options
    /// with other LoRAs, if some stream holds them: those with the fewest LoRAs (each rebuild
    /// unfuses in f32 from weights rounded to the dtype; fewer deltas, less rounding).
    fn lora_sibling(&self, key: &ModelKey) -> Option<Arc<StableDiffusionModels>> {
        let same_base = |other: &ModelKey| {
            other.dir == key.dir
                && other.dtype == key.dtype
                && other.device == key.device
                && other.vae == key.vae
                && other.hub == key.hub
                && other.loras != key.loras
        };
        let slots = self.lock_slots();
        slots
            .iter()
            .filter(|slot| same_base(&slot.key))
            .filter_map(|slot| Some((slot.key.loras.len(), slot.state().models.upgrade()?)))
            .min_by_key(|(loras, _)| *loras)
            .map(|(_, models)| models)
    }

    /// The slot of `key`, made if there is none; forgets slots nobody uses any more.
    fn slot(&self, key: ModelKey) -> Arc<Slot> {
        let mut slots = self.lock_slots();
        Self::prune(&mut slots);
        if let Some(slot) = slots.iter().find(|s| s.key == key) {
            return slot.clone();
        }
        let slot = Arc::new(Slot {
            key,
            loading: Mutex::new(()),
            state: Mutex::new(SlotState::default()),
        });
        slots.push(slot.clone());
        slot
    }

    /// Drops the slots whose networks are gone and that no request is using (one that is
    /// loading or waiting holds the slot's `Arc`).
    fn prune(slots: &mut Vec<Arc<Slot>>) {
        slots.retain(|slot| Arc::strong_count(slot) > 1 || slot.state().models.strong_count() > 0);
    }

    fn lock_slots(&self) -> MutexGuard<'_, Vec<Arc<Slot>>> {
        // Pushes and retains only: a poisoned lock still holds a consistent list.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The checkpoints loaded now (some stream holds them), with their holders and sizes.
    pub fn entries(&self) -> Vec<PoolEntry> {
        let mut slots = self.lock_slots();
        Self::prune(&mut slots);
        slots
            .iter()
            .filter_map(|slot| {
                let models = slot.state().models.upgrade()?;
                let key = &slot.key;
                Some(PoolEntry {
                    model_dir: key.dir.clone(),
                    dtype: key.dtype.to_string(),
                    device: key.device.to_string(),
                    vae: match &key.vae {
                        VaeKey::Full => "full".into(),
                        VaeKey::Taesd => "taesd".into(),
                        VaeKey::Custom(dir) => dir.display().to_string(),
                    },
                    // Less the `Arc` upgraded just above.
                    holders: Arc::strong_count(&models) - 1,
                    weight_bytes: models.weight_bytes(),
                    controlnets: models.cached_controlnet_ids().len(),
                    controlnet_bytes: models.controlnet_bytes(),
                })
            })
            .collect()
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            loads: self.loads.load(Ordering::Relaxed),
            reuses: self.reuses.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            lora_rebuilds: self.lora_rebuilds.load(Ordering::Relaxed),
        }
    }

    /// Bytes of every loaded checkpoint and its ControlNets.
    pub fn total_bytes(&self) -> u64 {
        self.entries().iter().map(PoolEntry::total_bytes).sum()
    }
}
