//! The models' ControlNet cache: nets loaded once per id, kept for swaps (least recently used
//! out past [`CONTROLNET_CACHE_SIZE`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use candle_core::DType;

use crate::Result;
use crate::model::checked_backend;
use crate::model::controlnet::ControlNetModel;

use super::{StableDiffusionModels, canonical, component_files, lock_or_wait, resolve, timed};

/// The ControlNets of one checkpoint, shared by every stream on it.
///
/// Every net some stream still holds stays findable (a weak reference), so a second stream
/// asking for a net the first uses gets the same copy even after it left the recently-used
/// set; the [`CONTROLNET_CACHE_SIZE`] most recently used are also held strongly, so a net
/// removed from the parameters and added back soon costs nothing.
/// Generic over the net so that its bookkeeping can be tested without loading networks.
#[derive(Debug)]
pub(super) struct NetCache<N = ControlNetModel> {
    /// Least recently used first.
    nets: Vec<CachedNet<N>>,
    /// Loads in progress by id: a second request for the same net waits on its lock and then
    /// finds the net cached, instead of reading the weights again.
    loading: Vec<(String, Arc<Mutex<()>>)>,
}

impl<N> Default for NetCache<N> {
    fn default() -> Self {
        Self {
            nets: Vec::new(),
            loading: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct CachedNet<N> {
    /// The ids it was asked for by (several spellings of one folder share the net).
    ids: Vec<String>,
    /// The folder it was loaded from (canonical where the file system allows).
    dir: PathBuf,
    net: Weak<N>,
    /// `Some` while among the most recently used.
    pinned: Option<Arc<N>>,
    bytes: u64,
}

impl<N> NetCache<N> {
    /// A cache holding the same nets (no load in progress): for networks derived from these.
    pub(super) fn shared_copy(&self) -> Self {
        Self {
            nets: self
                .nets
                .iter()
                .map(|c| CachedNet {
                    ids: c.ids.clone(),
                    dir: c.dir.clone(),
                    net: c.net.clone(),
                    pinned: c.pinned.clone(),
                    bytes: c.bytes,
                })
                .collect(),
            loading: Vec::new(),
        }
    }

    /// The live net known under `id`, marked most recently used.
    fn get(&mut self, id: &str) -> Option<Arc<N>> {
        let pos = self
            .nets
            .iter()
            .position(|n| n.ids.iter().any(|k| k == id))?;
        self.touch(pos)
    }

    /// The live net loaded from `dir`, now also known under `id`, marked most recently used.
    fn get_by_dir(&mut self, dir: &Path, id: &str) -> Option<Arc<N>> {
        let pos = self.nets.iter().position(|n| n.dir == dir)?;
        let net = self.touch(pos)?;
        let entry = self.nets.last_mut().expect("just touched");
        if !entry.ids.iter().any(|k| k == id) {
            entry.ids.push(id.to_string());
        }
        Some(net)
    }

    /// Moves entry `pos` to the most recently used end if its net is alive.
    fn touch(&mut self, pos: usize) -> Option<Arc<N>> {
        let mut entry = self.nets.remove(pos);
        let net = entry.net.upgrade()?;
        entry.pinned = Some(net.clone());
        self.nets.push(entry);
        self.settle();
        Some(net)
    }

    fn insert(&mut self, id: &str, dir: PathBuf, net: Arc<N>, bytes: u64) {
        self.nets.push(CachedNet {
            ids: vec![id.to_string()],
            dir,
            net: Arc::downgrade(&net),
            pinned: Some(net),
            bytes,
        });
        self.settle();
    }

    /// Unpins all but the most recently used nets and forgets those no stream holds.
    fn settle(&mut self) {
        let unpinned = self.nets.len().saturating_sub(CONTROLNET_CACHE_SIZE);
        for entry in &mut self.nets[..unpinned] {
            entry.pinned = None;
        }
        self.nets.retain(|n| n.net.strong_count() > 0);
    }
}

/// How many ControlNets stay cached after they leave the parameters (each holds roughly a
/// third of the UNet's weights).
pub const CONTROLNET_CACHE_SIZE: usize = 8;

impl StableDiffusionModels {
    /// The ControlNet `id` (a local folder or a hub id, resolved like `model_id`), loaded once
    /// and cached: later calls, from any thread and any stream on these networks, return the
    /// same `Arc` without reading weights (two spellings of one folder included). A net that
    /// does not fit this checkpoint's UNet (text width, block widths, latent channels, family)
    /// is an error naming both values, and is not cached.
    ///
    /// The cache keeps the [`CONTROLNET_CACHE_SIZE`] most recently used nets, and every net a
    /// stream still holds, so a net removed from the parameters and added back soon costs
    /// nothing. Concurrent requests for a net not loaded yet wait for one load (a per-id lock);
    /// the cache's own lock is never held while a net loads, so lookups of cached nets never
    /// wait for a load.
    pub fn controlnet(
        &self,
        id: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Arc<ControlNetModel>> {
        if let Some(net) = self.cached_controlnet(id) {
            return Ok(net);
        }
        let slot = {
            let mut cache = self.lock_controlnets();
            match cache.loading.iter().find(|(k, _)| k == id) {
                Some((_, slot)) => slot.clone(),
                None => {
                    let slot = Arc::new(Mutex::new(()));
                    cache.loading.push((id.to_string(), slot.clone()));
                    slot
                }
            }
        };
        let outcome = {
            let _loading = lock_or_wait(&slot, || {
                progress(&format!(
                    "waiting for ControlNet {id}, which another stream is loading"
                ))
            });
            self.load_controlnet(id, progress)
        };
        let mut cache = self.lock_controlnets();
        cache
            .loading
            .retain(|(k, s)| !(k == id && Arc::ptr_eq(s, &slot)));
        outcome
    }

    /// The body of [`controlnet`](Self::controlnet), run under the id's loading lock.
    fn load_controlnet(
        &self,
        id: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Arc<ControlNetModel>> {
        // Loaded by the request this one waited for.
        if let Some(net) = self.cached_controlnet(id) {
            return Ok(net);
        }
        let fp16 = self.dtype == DType::F16;
        let dir = match resolve(id, &self.hub, &component_files(fp16)) {
            Ok(dir) => dir,
            // A net published only as a single file (TemporalNet2's .ckpt).
            Err(not_found) => {
                let base = self.dir.join("unet").join("config.json");
                crate::model::single_file::controlnet_folder(id, &self.hub, &base)?
                    .ok_or(not_found)?
            }
        };
        let canonical = canonical(&dir);
        if let Some(net) = self.lock_controlnets().get_by_dir(&canonical, id) {
            return Ok(net);
        }
        let base = self.unet.config();
        let before = checked_backend::loaded_bytes();
        let net = timed(progress, "controlnet", &dir, || {
            ControlNetModel::load_for(&dir, self.dtype, &self.device, |config| {
                config.check_compatible(base, id)
            })
        })?
        // In the precision of the UNet it steers (bf16 GEMMs on the CPU, see compute_dtype).
        .with_bf16_gemms(self.unet.bf16_gemms());
        let bytes = checked_backend::loaded_bytes() - before;
        // Other streams' threads share the net: its weights, uploaded and converted on this
        // thread's CUDA stream, must be in place before their streams read them.
        self.device.synchronize()?;
        self.controlnet_loads.fetch_add(1, Ordering::Relaxed);
        let net = Arc::new(net);
        self.lock_controlnets()
            .insert(id, canonical, net.clone(), bytes);
        Ok(net)
    }

    /// The ControlNet `id` if it is cached (marking it recently used); never loads.
    pub fn cached_controlnet(&self, id: &str) -> Option<Arc<ControlNetModel>> {
        self.lock_controlnets().get(id)
    }

    /// The ids of the cached ControlNets (the first id each was asked for), least recently
    /// used first.
    pub fn cached_controlnet_ids(&self) -> Vec<String> {
        let mut cache = self.lock_controlnets();
        cache.settle();
        cache.nets.iter().map(|n| n.ids[0].clone()).collect()
    }

    /// How many ControlNets these networks have read from disk so far.
    pub fn controlnet_loads(&self) -> u64 {
        self.controlnet_loads.load(Ordering::Relaxed)
    }

    /// Bytes of the cached ControlNets' tensors.
    pub fn controlnet_bytes(&self) -> u64 {
        let mut cache = self.lock_controlnets();
        cache.settle();
        cache.nets.iter().map(|n| n.bytes).sum()
    }

    pub(super) fn lock_controlnets(&self) -> MutexGuard<'_, NetCache> {
        // A panic while holding the lock cannot leave the cache half-updated (each change is
        // a single push, remove or field store), so a poisoned lock is still usable.
        self.controlnets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::{CONTROLNET_CACHE_SIZE, NetCache};

    fn insert(cache: &mut NetCache<String>, id: &str) -> Arc<String> {
        let net = Arc::new(id.to_string());
        cache.insert(id, PathBuf::from(format!("/nets/{id}")), net.clone(), 1);
        net
    }

    fn ids(cache: &NetCache<String>) -> Vec<String> {
        cache.nets.iter().map(|n| n.ids[0].clone()).collect()
    }

    #[test]
    fn a_net_in_use_stays_shared_after_it_leaves_the_recent_set() {
        let mut cache = NetCache::<String>::default();
        let first = insert(&mut cache, "n0");
        for i in 1..=CONTROLNET_CACHE_SIZE {
            drop(insert(&mut cache, &format!("n{i}")));
        }
        // n0 is no longer among the most recent, but a stream still holds it: the same copy.
        assert!(cache.nets[0].pinned.is_none());
        assert!(Arc::ptr_eq(&cache.get("n0").expect("held"), &first));
        // Touched, it is the most recent again; n1 fell out and, held by nobody, is forgotten.
        assert_eq!(ids(&cache).last().map(String::as_str), Some("n0"));
        assert!(cache.get("n1").is_none());
        assert_eq!(cache.nets.len(), CONTROLNET_CACHE_SIZE);
        // Unpinned and unheld: gone once more nets come.
        drop(first);
        for i in 0..CONTROLNET_CACHE_SIZE {
            drop(insert(&mut cache, &format!("m{i}")));
        }
        assert!(cache.get("n0").is_none());
        assert_eq!(cache.nets.len(), CONTROLNET_CACHE_SIZE);
    }

    #[test]
    fn another_spelling_of_a_folder_finds_the_same_net() {
        let mut cache = NetCache::<String>::default();
        let net = insert(&mut cache, "org/net");
        assert!(
            cache.get("./org/net").is_none(),
            "ids are matched as spelled"
        );
        let by_dir = cache
            .get_by_dir(&PathBuf::from("/nets/org/net"), "./org/net")
            .expect("same folder");
        assert!(Arc::ptr_eq(&by_dir, &net));
        // Known under both spellings from now on, one entry.
        assert!(Arc::ptr_eq(&cache.get("./org/net").expect("alias"), &net));
        assert_eq!(cache.nets.len(), 1);
        assert_eq!(cache.nets[0].ids, ["org/net", "./org/net"]);
    }
}
