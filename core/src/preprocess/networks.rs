//! The networks behind the model-based processors: which weights each one needs, where they
//! are found, and one loaded copy per weights file, device and dtype for the whole process.
//!
//! A processor names what it needs as a [`NetworkRequest`]: a kind of network and the files of
//! a model repository (the ones Daydream's processors download, e.g. `ControlNetHED.pth` of
//! `lllyasviel/Annotators`). The repository is resolved like every model id ([`crate::hub`]:
//! the id as a folder when paths are allowed, `model_root/<id>`, the Hugging Face cache, a
//! download), so a folder of weights laid out as `<model_root>/lllyasviel/Annotators/…` serves
//! offline. Each file may also be given as safetensors (`ControlNetHED.safetensors`), which is
//! taken first.
//!
//! [`NetworkPool::global`] keeps weak references, like the diffusion models' pool: a network
//! lives while some stream (or host) holds it, and every stream of the process shares it. A
//! stream gets its networks as [`ProcessorNetworks`] when it is built or takes new parameters;
//! the engine loads them on its builder thread first, so a frame never waits for a load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Instant;

use candle_core::{DType, Device};

use crate::hub::{self, HubOptions};
use crate::model::depth_anything::{self, DepthAnything};
use crate::model::dpt::DptDepth;
use crate::model::hed::{self, Hed};
use crate::model::ip_adapter::{IpAdapter, image_encoder_dir};
use crate::model::kernels::KernelPolicy;
use crate::model::lineart::{self, LineartGenerator};
use crate::model::lineart_anime::{self, LineartAnimeGenerator};
use crate::model::openpose_body::{self, BodyPoseNet};
use crate::model::openpose_cpm::{self, KeypointNet};
use crate::model::raft::{self, Raft};
use crate::model::rrdbnet::{self, RrdbNet};
use crate::model::safety_checker::{self, SafetyChecker};
use crate::model::{open_component, open_component_file, open_weights, weight_names, weights_file};
use crate::{Error, Result};

/// Which network a request loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkKind {
    /// HED edges ([`crate::model::hed`]).
    Hed,
    /// The lineart generator ([`crate::model::lineart`]).
    Lineart,
    /// The anime lineart U-Net ([`crate::model::lineart_anime`]).
    LineartAnime,
    /// The OpenPose body network ([`crate::model::openpose_body`]).
    BodyPose,
    /// OpenPose's hand network ([`crate::model::openpose_cpm`]).
    HandPose,
    /// OpenPose's face network ([`crate::model::openpose_cpm`]).
    FacePose,
    /// Depth Anything ([`crate::model::depth_anything`]), a transformers checkpoint folder.
    DepthAnything,
    /// DPT ([`crate::model::dpt`]), a transformers checkpoint folder with its image processor.
    Dpt,
    /// RAFT optical flow ([`crate::model::raft`]).
    Raft,
    /// Real-ESRGAN's RRDB upscaler ([`crate::model::rrdbnet`]).
    RealEsrgan,
    /// The Stable Diffusion safety checker ([`crate::model::safety_checker`]), a transformers
    /// checkpoint folder.
    SafetyChecker,
    /// An IP-Adapter ([`crate::model::ip_adapter`]): its checkpoint with the image encoder's
    /// folder beside it.
    IpAdapter,
}

impl NetworkKind {
    /// A name for messages.
    pub fn name(self) -> &'static str {
        match self {
            NetworkKind::Hed => "HED",
            NetworkKind::Lineart => "lineart generator",
            NetworkKind::LineartAnime => "anime lineart generator",
            NetworkKind::BodyPose => "OpenPose body",
            NetworkKind::HandPose => "OpenPose hand",
            NetworkKind::FacePose => "OpenPose face",
            NetworkKind::DepthAnything => "Depth Anything",
            NetworkKind::Dpt => "DPT",
            NetworkKind::Raft => "RAFT optical flow",
            NetworkKind::RealEsrgan => "Real-ESRGAN",
            NetworkKind::SafetyChecker => "safety checker",
            NetworkKind::IpAdapter => "IP-Adapter",
        }
    }

    /// Whether the network is a transformers checkpoint folder (`config.json` and
    /// `<stem>.safetensors`) rather than one weights file.
    fn is_folder(self) -> bool {
        matches!(
            self,
            NetworkKind::DepthAnything | NetworkKind::Dpt | NetworkKind::SafetyChecker
        )
    }
}

/// A network a processor needs: its kind, the model repository and the weights file in it
/// (the stem of a `.pth` file; `<stem>.safetensors` is preferred when present).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetworkRequest {
    /// What to build.
    pub kind: NetworkKind,
    /// The repository (a hub id), resolved like a model id.
    pub repo: &'static str,
    /// The weights file's name without its extension.
    pub stem: &'static str,
}

impl NetworkRequest {
    /// `ControlNetHED.pth` of `lllyasviel/Annotators`.
    pub const HED: Self = Self {
        kind: NetworkKind::Hed,
        repo: ANNOTATORS,
        stem: "ControlNetHED",
    };
    /// `sk_model.pth` of `lllyasviel/Annotators` (fine lines).
    pub const LINEART_FINE: Self = Self {
        kind: NetworkKind::Lineart,
        repo: ANNOTATORS,
        stem: "sk_model",
    };
    /// `sk_model2.pth` of `lllyasviel/Annotators` (coarse lines).
    pub const LINEART_COARSE: Self = Self {
        kind: NetworkKind::Lineart,
        repo: ANNOTATORS,
        stem: "sk_model2",
    };
    /// `netG.pth` of `lllyasviel/Annotators` (Anime2Sketch's generator, controlnet_aux's
    /// `LineartAnimeDetector`).
    pub const LINEART_ANIME: Self = Self {
        kind: NetworkKind::LineartAnime,
        repo: ANNOTATORS,
        stem: "netG",
    };
    /// `body_pose_model.pth` of `lllyasviel/Annotators` (controlnet_aux's OpenPose body).
    pub const BODY_POSE: Self = Self {
        kind: NetworkKind::BodyPose,
        repo: ANNOTATORS,
        stem: "body_pose_model",
    };
    /// `hand_pose_model.pth` of `lllyasviel/Annotators` (controlnet_aux's OpenPose hands).
    pub const HAND_POSE: Self = Self {
        kind: NetworkKind::HandPose,
        repo: ANNOTATORS,
        stem: "hand_pose_model",
    };
    /// `facenet.pth` of `lllyasviel/Annotators` (controlnet_aux's OpenPose face).
    pub const FACE_POSE: Self = Self {
        kind: NetworkKind::FacePose,
        repo: ANNOTATORS,
        stem: "facenet",
    };
    /// Depth Anything V2 Small in transformers' layout (`config.json`, `model.safetensors`).
    pub const DEPTH_ANYTHING_V2_SMALL: Self = Self {
        kind: NetworkKind::DepthAnything,
        repo: "depth-anything/Depth-Anything-V2-Small-hf",
        stem: "model",
    };
    /// `Intel/dpt-large` in transformers' layout (`config.json`, `preprocessor_config.json`,
    /// `model.safetensors` or `pytorch_model.bin`): Daydream's `depth` network.
    pub const DPT_LARGE: Self = Self {
        kind: NetworkKind::Dpt,
        repo: "Intel/dpt-large",
        stem: "model",
    };
    /// torchvision's `raft_small` weights (`Raft_Small_Weights.C_T_V2`), which are not on the
    /// Hugging Face hub: sdstream looks for them under this id in the model root or the cache,
    /// and says where to download them when they are missing.
    pub const RAFT_SMALL: Self = Self {
        kind: NetworkKind::Raft,
        repo: "torchvision/raft_small",
        stem: "raft_small_C_T_V2-01064c6d",
    };
    /// The Stable Diffusion safety checker (`config.json`, `model.safetensors`), for
    /// pipelines whose folder carries no `safety_checker/` of their own.
    pub const SAFETY_CHECKER: Self = Self {
        kind: NetworkKind::SafetyChecker,
        repo: "CompVis/stable-diffusion-safety-checker",
        stem: "model",
    };
    /// h94's IP-Adapter for SD 1.5 (`models/ip-adapter_sd15`, ViT-H image encoder).
    pub const IP_ADAPTER_SD15: Self = Self {
        kind: NetworkKind::IpAdapter,
        repo: IP_ADAPTER_REPO,
        stem: "models/ip-adapter_sd15",
    };
    /// h94's IP-Adapter for SDXL (`sdxl_models/ip-adapter_sdxl`, ViT-bigG image encoder).
    pub const IP_ADAPTER_SDXL: Self = Self {
        kind: NetworkKind::IpAdapter,
        repo: IP_ADAPTER_REPO,
        stem: "sdxl_models/ip-adapter_sdxl",
    };
    /// h94's IP-Adapter Plus for SD 1.5 (`models/ip-adapter-plus_sd15`, a Resampler over the
    /// ViT-H encoder's hidden states).
    pub const IP_ADAPTER_PLUS_SD15: Self = Self {
        kind: NetworkKind::IpAdapter,
        repo: IP_ADAPTER_REPO,
        stem: "models/ip-adapter-plus_sd15",
    };
    /// h94's IP-Adapter Plus Face for SD 1.5 (`models/ip-adapter-plus-face_sd15`).
    pub const IP_ADAPTER_PLUS_FACE_SD15: Self = Self {
        kind: NetworkKind::IpAdapter,
        repo: IP_ADAPTER_REPO,
        stem: "models/ip-adapter-plus-face_sd15",
    };
    /// h94's IP-Adapter Plus for SDXL on the ViT-H encoder
    /// (`sdxl_models/ip-adapter-plus_sdxl_vit-h`, encoder `models/image_encoder`).
    pub const IP_ADAPTER_PLUS_SDXL: Self = Self {
        kind: NetworkKind::IpAdapter,
        repo: IP_ADAPTER_REPO,
        stem: "sdxl_models/ip-adapter-plus_sdxl_vit-h",
    };
    /// h94's IP-Adapter Plus Face for SDXL on the ViT-H encoder
    /// (`sdxl_models/ip-adapter-plus-face_sdxl_vit-h`).
    pub const IP_ADAPTER_PLUS_FACE_SDXL: Self = Self {
        kind: NetworkKind::IpAdapter,
        repo: IP_ADAPTER_REPO,
        stem: "sdxl_models/ip-adapter-plus-face_sdxl_vit-h",
    };
    /// Every IP-Adapter checkpoint sdstream runs.
    pub const IP_ADAPTERS: [Self; 6] = [
        Self::IP_ADAPTER_SD15,
        Self::IP_ADAPTER_SDXL,
        Self::IP_ADAPTER_PLUS_SD15,
        Self::IP_ADAPTER_PLUS_FACE_SD15,
        Self::IP_ADAPTER_PLUS_SDXL,
        Self::IP_ADAPTER_PLUS_FACE_SDXL,
    ];
    /// `RealESRGAN_x2.pth` of `ai-forever/Real-ESRGAN`.
    pub const REAL_ESRGAN_X2: Self = Self {
        kind: NetworkKind::RealEsrgan,
        repo: "ai-forever/Real-ESRGAN",
        stem: "RealESRGAN_x2",
    };

    /// The file patterns [`hub::resolve`] looks for: for one weights file the safetensors form,
    /// else the `.pth`; for a checkpoint folder its config and weights.
    fn wanted(&self) -> Vec<String> {
        if self.kind == NetworkKind::IpAdapter {
            // h94 publishes `.bin` checkpoints (and safetensors copies of some); the image
            // encoder is a folder of the repository (`image_encoder_dir`).
            let encoder = image_encoder_dir(Path::new(self.stem))
                .to_string_lossy()
                .replace('\\', "/");
            vec![
                format!("{0}.safetensors|{0}.bin", self.stem),
                format!("{encoder}/config.json"),
                format!("{encoder}/model.safetensors|{encoder}/{SAFETY_CHECKER_BIN}"),
            ]
        } else if self.kind == NetworkKind::SafetyChecker {
            // CompVis's checker may come as transformers' older `pytorch_model.bin` only.
            vec![
                "config.json".into(),
                format!("{}.safetensors|{SAFETY_CHECKER_BIN}", self.stem),
            ]
        } else if self.kind == NetworkKind::Dpt {
            // transformers checkpoints of 2022 may hold `pytorch_model.bin` only.
            vec![
                "config.json".into(),
                "preprocessor_config.json".into(),
                format!("{0}.safetensors|pytorch_{0}.bin", self.stem),
            ]
        } else if self.kind.is_folder() {
            vec!["config.json".into(), format!("{}.safetensors", self.stem)]
        } else {
            vec![format!("{0}.safetensors|{0}.pth", self.stem)]
        }
    }

    /// Where the request is found: the resolved weights file (the checkpoint folder for
    /// transformers checkpoints).
    pub fn resolve(&self, hub_options: &HubOptions) -> Result<PathBuf> {
        let wanted = self.wanted();
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let dir = hub::resolve(self.repo, hub_options, &wanted).map_err(|e| match e {
            Error::ModelNotFound { id, detail } if self.kind == NetworkKind::Raft => {
                Error::ModelNotFound {
                    id,
                    detail: format!(
                        "{detail}. torchvision publishes these weights outside the Hugging Face \
                         hub: download https://download.pytorch.org/models/{}.pth into \
                         <model_root>/{}/ (or the cache folder of that id)",
                        self.stem, self.repo
                    ),
                }
            }
            other => other,
        })?;
        if self.kind.is_folder() {
            return Ok(dir);
        }
        let safetensors = dir.join(format!("{}.safetensors", self.stem));
        let legacy = if self.kind == NetworkKind::IpAdapter {
            "bin"
        } else {
            "pth"
        };
        Ok(if safetensors.is_file() {
            safetensors
        } else {
            dir.join(format!("{}.{legacy}", self.stem))
        })
    }
}

/// The safety checker's weights as transformers 4.x saved them before safetensors.
const SAFETY_CHECKER_BIN: &str = "pytorch_model.bin";

/// Where Daydream's IP-Adapter checkpoints and image encoders come from.
const IP_ADAPTER_REPO: &str = "h94/IP-Adapter";

/// ControlNet's annotator weights, where Daydream's processors (through controlnet_aux) get them.
const ANNOTATORS: &str = "lllyasviel/Annotators";

/// A loaded network.
// Each lives once per process behind an `Arc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Network {
    /// HED edges.
    Hed(Hed),
    /// The lineart generator.
    Lineart(LineartGenerator),
    /// The anime lineart generator.
    LineartAnime(LineartAnimeGenerator),
    /// The OpenPose body network.
    BodyPose(BodyPoseNet),
    /// OpenPose's hand or face network.
    Keypoints(KeypointNet),
    /// Depth Anything.
    DepthAnything(DepthAnything),
    /// DPT with its image processor.
    Dpt(DptDepth),
    /// RAFT optical flow.
    Raft(Raft),
    /// Real-ESRGAN.
    RealEsrgan(RrdbNet),
    /// The safety checker.
    SafetyChecker(SafetyChecker),
    /// An IP-Adapter with its image encoder.
    IpAdapter(IpAdapter),
}

impl Network {
    /// Loads the network `kind` from `path` in `dtype` on `device`: one weights file whose
    /// network's sizes are read from the tensors (each network's `Config::from_shapes`), or for
    /// Depth Anything a checkpoint folder with its `config.json`.
    pub fn load(kind: NetworkKind, path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Ok(match kind {
            NetworkKind::BodyPose => Network::BodyPose(open_weights(
                path,
                dtype,
                device,
                |shapes| Ok(openpose_body::Config::from_tensor_shapes(shapes)?),
                |config, vb| Ok(BodyPoseNet::new(config, vb)?),
            )?),
            NetworkKind::HandPose | NetworkKind::FacePose => Network::Keypoints(open_weights(
                path,
                dtype,
                device,
                openpose_cpm::Config::from_shapes,
                KeypointNet::new,
            )?),
            NetworkKind::DepthAnything => Network::DepthAnything(open_component(
                path,
                "model",
                dtype,
                device,
                depth_anything::tolerated_unused,
                |config: &depth_anything::Config| {
                    config
                        .validate()
                        .map_err(unsupported_config("Depth Anything"))
                },
                |config, vb| Ok(DepthAnything::new(config, vb)?),
            )?),
            NetworkKind::Dpt => Network::Dpt(DptDepth::load(path, dtype, device)?),
            NetworkKind::Raft => Network::Raft(open_weights(
                path,
                dtype,
                device,
                |shapes| Ok(raft::Config::from_tensor_shapes(shapes)?),
                |config, vb| Ok(Raft::new(config, vb)?),
            )?),
            NetworkKind::Hed => Network::Hed(open_weights(
                path,
                dtype,
                device,
                hed::Config::from_shapes,
                Hed::new,
            )?),
            NetworkKind::Lineart => Network::Lineart(open_weights(
                path,
                dtype,
                device,
                lineart::Config::from_shapes,
                LineartGenerator::new,
            )?),
            NetworkKind::LineartAnime => Network::LineartAnime(open_weights(
                path,
                dtype,
                device,
                lineart_anime::Config::from_shapes,
                LineartAnimeGenerator::new,
            )?),
            NetworkKind::SafetyChecker => {
                // `model.safetensors` or transformers' older `pytorch_model.bin` (read without
                // running its pickle code), whole or sharded.
                let weights = weights_file(path, "model", weight_names::prefers_fp16(dtype))?;
                Network::SafetyChecker(
                    open_component_file(
                        path,
                        &weights,
                        dtype,
                        device,
                        safety_checker::tolerated_unused,
                        None,
                        |config: &safety_checker::Config| {
                            config
                                .validate()
                                .map_err(unsupported_config("safety checker"))
                        },
                        SafetyChecker::new,
                    )?
                    .0,
                )
            }
            NetworkKind::IpAdapter => Network::IpAdapter(IpAdapter::load(path, dtype, device)?),
            NetworkKind::RealEsrgan => Network::RealEsrgan(open_weights(
                path,
                dtype,
                device,
                rrdbnet::Config::from_shapes,
                RrdbNet::new,
            )?),
        })
    }
}

/// Turns a checkpoint folder's failed config check into an unsupported `config.json` of `model`.
fn unsupported_config<E: std::fmt::Display>(model: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::UnsupportedConfig {
        model: model.into(),
        option: "config.json".into(),
        detail: e.to_string(),
    }
}

/// What a network is shared by: the request as spelled (looked up without touching the disk)
/// or the resolved file, with the dtype, the device and the kernel policy current where it is
/// asked for (a layer's layout is decided when it loads, so networks loaded under another
/// policy are not shared).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PoolKey {
    Request {
        request: NetworkRequest,
        hub: HubOptions,
        dtype: DType,
        device: String,
        kernels: KernelPolicy,
    },
    File {
        kind: NetworkKind,
        path: PathBuf,
        dtype: DType,
        device: String,
        kernels: KernelPolicy,
    },
}

/// One loaded copy of each network per file, dtype and device (weak references: a network
/// goes when its last holder drops it).
#[derive(Debug, Default)]
pub struct NetworkPool {
    entries: Mutex<HashMap<PoolKey, Weak<Network>>>,
    /// Held for a whole load, so that two streams asking for one network load it once (loads
    /// are short: these are small networks); lookups never wait for it.
    loading: Mutex<()>,
    loads: AtomicU64,
}

/// `device`'s identity as a key (`Cpu`, `Cuda { gpu_id: 0 }`, …).
fn device_key(device: &Device) -> String {
    format!("{:?}", device.location())
}

impl NetworkPool {
    /// The pool every stream of the process uses.
    pub fn global() -> &'static NetworkPool {
        static POOL: OnceLock<NetworkPool> = OnceLock::new();
        POOL.get_or_init(NetworkPool::default)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, Weak<Network>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn request_key(
        request: NetworkRequest,
        hub: &HubOptions,
        dtype: DType,
        device: &Device,
    ) -> PoolKey {
        PoolKey::Request {
            request,
            hub: hub.clone(),
            dtype,
            device: device_key(device),
            kernels: KernelPolicy::current(),
        }
    }

    /// The loaded network for `request`, if some holder keeps it (no disk access).
    pub fn find(
        &self,
        request: NetworkRequest,
        hub: &HubOptions,
        dtype: DType,
        device: &Device,
    ) -> Option<Arc<Network>> {
        let key = Self::request_key(request, hub, dtype, device);
        self.lock().get(&key).and_then(Weak::upgrade)
    }

    /// The loaded network `kind` at `path`, if some holder keeps it (no disk access beyond
    /// making the path canonical).
    pub fn find_path(
        &self,
        kind: NetworkKind,
        path: &Path,
        dtype: DType,
        device: &Device,
    ) -> Option<Arc<Network>> {
        let key = PoolKey::File {
            kind,
            path: crate::model::bundle::canonical(path),
            dtype,
            device: device_key(device),
            kernels: KernelPolicy::current(),
        };
        self.lock().get(&key).and_then(Weak::upgrade)
    }

    /// The network for `request`, loaded unless some holder keeps it; loading steps go to
    /// `progress`.
    pub fn get(
        &self,
        request: NetworkRequest,
        hub: &HubOptions,
        dtype: DType,
        device: &Device,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Arc<Network>> {
        if let Some(net) = self.find(request, hub, dtype, device) {
            return Ok(net);
        }
        let _loading = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(net) = self.find(request, hub, dtype, device) {
            return Ok(net);
        }
        let path = request.resolve(hub)?;
        let net = self.load_file(request.kind, &path, dtype, device, progress)?;
        self.lock().insert(
            Self::request_key(request, hub, dtype, device),
            Arc::downgrade(&net),
        );
        Ok(net)
    }

    /// The network `kind` at `path` (a weights file, or a checkpoint folder for the folder
    /// kinds), loaded unless some holder keeps it.
    pub fn get_path(
        &self,
        kind: NetworkKind,
        path: &Path,
        dtype: DType,
        device: &Device,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Arc<Network>> {
        let _loading = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        self.load_file(kind, path, dtype, device, progress)
    }

    /// Loads (or finds) the network at `path`; the caller holds `loading`.
    fn load_file(
        &self,
        kind: NetworkKind,
        path: &Path,
        dtype: DType,
        device: &Device,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Arc<Network>> {
        let file_key = PoolKey::File {
            kind,
            path: crate::model::bundle::canonical(path),
            dtype,
            device: device_key(device),
            kernels: KernelPolicy::current(),
        };
        let found = self.lock().get(&file_key).and_then(Weak::upgrade);
        let net = match found {
            Some(net) => net,
            None => {
                let start = Instant::now();
                progress(&format!(
                    "loading the {} network from {}",
                    kind.name(),
                    path.display()
                ));
                let net = Arc::new(Network::load(kind, path, dtype, device)?);
                // Shared with other threads, each on its own CUDA stream: the weights must be
                // in place before theirs read them.
                device.synchronize()?;
                progress(&format!(
                    "loaded the {} network in {:.2} s",
                    kind.name(),
                    start.elapsed().as_secs_f64()
                ));
                self.loads.fetch_add(1, Ordering::Relaxed);
                net
            }
        };
        let mut entries = self.lock();
        entries.retain(|_, weak| weak.strong_count() > 0);
        entries.insert(file_key, Arc::downgrade(&net));
        Ok(net)
    }

    /// How many networks this pool has read from disk so far.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }
}

/// The loaded networks a stream's processors use, by request.
#[derive(Debug, Clone, Default)]
pub struct ProcessorNetworks {
    networks: HashMap<NetworkRequest, Arc<Network>>,
}

impl ProcessorNetworks {
    /// Gets every request of `requests` from `pool` (loading what no one holds).
    pub fn load(
        requests: impl IntoIterator<Item = NetworkRequest>,
        pool: &NetworkPool,
        hub: &HubOptions,
        dtype: DType,
        device: &Device,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let mut networks = HashMap::new();
        for request in requests {
            if networks.contains_key(&request) {
                continue;
            }
            let net = pool.get(request, hub, dtype, device, progress)?;
            networks.insert(request, net);
        }
        Ok(Self { networks })
    }

    /// Networks a host built itself (benchmarks, hosts with their own loading), by request.
    pub fn from_networks(
        networks: impl IntoIterator<Item = (NetworkRequest, Arc<Network>)>,
    ) -> Self {
        Self {
            networks: networks.into_iter().collect(),
        }
    }

    /// Whether every request of `requests` is loaded in `pool` (no disk access).
    pub fn ready(
        requests: impl IntoIterator<Item = NetworkRequest>,
        pool: &NetworkPool,
        hub: &HubOptions,
        dtype: DType,
        device: &Device,
    ) -> bool {
        requests
            .into_iter()
            .all(|r| pool.find(r, hub, dtype, device).is_some())
    }

    /// The network for `request`; an error naming it when it was not loaded for this stream.
    pub fn get(&self, request: NetworkRequest) -> Result<&Network> {
        self.networks.get(&request).map(Arc::as_ref).ok_or_else(|| {
            Error::State(format!(
                "the {} network ({} of {}) is not loaded for this stream",
                request.kind.name(),
                request.stem,
                request.repo
            ))
        })
    }
}
