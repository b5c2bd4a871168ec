//! Safetensors weights checked against the network a config describes, before anything is
//! allocated from them.
//!
//! [`WeightsFile::open`] reads and checks the header (every tensor's dtype, shape and byte range
//! inside the file, so that a truncated file names the first tensor it cuts) and maps the file.
//! A network is then built twice from the same constructor code: first over a *probe*
//! [`CheckedBackend`](crate::checked_backend::CheckedBackend), which compares every tensor the
//! config asks for with the header (present, same shape, a float dtype) and hands back a zero-stride stand-in instead of reading it, then,
//! once the probe went through and the file's unused tensors and non-finite values are checked,
//! over a loading backend that reads each tensor from the map. A config that implies a network
//! the file does not hold is therefore refused, naming the file and the tensor, before any
//! weight is read or uploaded.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::torch_file::{MappedCheckpoint, ReadError};
use crate::{Error, Result};

/// safetensors' own bound on the JSON header.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The float formats weights may be stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Float {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
}

/// The exponent bits of one float format, repeated over the lanes of a `u64`: the mask, its
/// lowest bit, and each lane's top (sign) bit.
struct Lanes {
    exponent: u64,
    low: u64,
    top: u64,
}

impl Float {
    fn parse(dtype: &str) -> Option<Self> {
        Some(match dtype {
            "F16" => Self::F16,
            "BF16" => Self::Bf16,
            "F32" => Self::F32,
            "F64" => Self::F64,
            _ => return None,
        })
    }

    fn lanes(self) -> Lanes {
        match self {
            Self::F16 => Lanes {
                exponent: 0x7C00_7C00_7C00_7C00,
                low: 0x0400_0400_0400_0400,
                top: 0x8000_8000_8000_8000,
            },
            Self::Bf16 => Lanes {
                exponent: 0x7F80_7F80_7F80_7F80,
                low: 0x0080_0080_0080_0080,
                top: 0x8000_8000_8000_8000,
            },
            Self::F32 => Lanes {
                exponent: 0x7F80_0000_7F80_0000,
                low: 0x0080_0000_0080_0000,
                top: 0x8000_0000_8000_0000,
            },
            Self::F64 => Lanes {
                exponent: 0x7FF0_0000_0000_0000,
                low: 0x0010_0000_0000_0000,
                top: 0x8000_0000_0000_0000,
            },
        }
    }
}

/// Bytes per element of a safetensors dtype; `None` for types sdstream cannot even size.
fn element_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// safetensors' element type of the name [`torch_file`](super::torch_file) gives.
fn safetensors_dtype(name: &str) -> Option<safetensors::Dtype> {
    use safetensors::Dtype;
    Some(match name {
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "F64" => Dtype::F64,
        "U8" => Dtype::U8,
        "I8" => Dtype::I8,
        "I16" => Dtype::I16,
        "I32" => Dtype::I32,
        "I64" => Dtype::I64,
        "BOOL" => Dtype::BOOL,
        _ => return None,
    })
}

/// Flags (by its top bit) every lane of `w` whose exponent bits are all ones, i.e. a NaN or an
/// infinity: adding the exponent's lowest bit to the masked exponent carries into the lane's top
/// bit exactly when the exponent is all ones, and never into the next lane.
fn non_finite_flags(w: u64, lanes: &Lanes) -> u64 {
    ((w & lanes.exponent) + lanes.low) & lanes.top
}

/// How many values of the little-endian `float` data `bytes` are NaN or ±Inf.
pub fn count_non_finite(bytes: &[u8], float: Float) -> usize {
    let lanes = float.lanes();
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
    let mut count = 0;
    // Almost every block is clean: OR the flags of a block and count them only when one is set.
    for block in bytes.chunks(8 * 1024) {
        let words = block.chunks_exact(8);
        let tail = words.remainder();
        let mut any = 0;
        for w in words.clone() {
            any |= non_finite_flags(word(w), &lanes);
        }
        if any != 0 {
            count += words
                .map(|w| non_finite_flags(word(w), &lanes).count_ones() as usize)
                .sum::<usize>();
        }
        if !tail.is_empty() {
            // Whole elements, zero-padded: zero lanes are finite.
            let mut last = [0u8; 8];
            last[..tail.len()].copy_from_slice(tail);
            count += non_finite_flags(u64::from_le_bytes(last), &lanes).count_ones() as usize;
        }
    }
    count
}

/// One tensor of a safetensors header.
#[derive(Debug)]
struct Entry {
    name: String,
    dtype: String,
    float: Option<Float>,
    shape: Vec<usize>,
    /// Byte range in the data section (after the header).
    start: u64,
    end: u64,
}

impl Entry {
    fn parse(name: String, info: &Value) -> std::result::Result<Self, String> {
        let bad = |what: &str| format!("tensor `{name}`: {what} in the header");
        let dtype = info["dtype"]
            .as_str()
            .ok_or_else(|| bad("no dtype"))?
            .to_string();
        let size = element_size(&dtype)
            .ok_or_else(|| format!("tensor `{name}` has unknown dtype {dtype:?}"))?;
        let shape = info["shape"]
            .as_array()
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| bad("no shape (a list of sizes)"))?;
        let offsets = info["data_offsets"]
            .as_array()
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad("no data_offsets (two byte offsets)"))?;
        let (start, end) = offsets;
        let bytes = shape
            .iter()
            .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| format!("tensor `{name}`: shape {shape:?} overflows"))?;
        if end < start || end - start != bytes {
            return Err(format!(
                "tensor `{name}`: shape {shape:?} of {dtype} takes {bytes} bytes, but the header \
                 gives it bytes {start}..{end}"
            ));
        }
        Ok(Self {
            float: Float::parse(&dtype),
            name,
            dtype,
            shape,
            start,
            end,
        })
    }
}

/// Where a [`WeightsFile`]'s bytes live.
enum Storage {
    /// A safetensors file, memory-mapped.
    Mapped(MmapedSafetensors),
    /// A PyTorch checkpoint, its tensors read where they lie (memory-mapped), by name.
    Pickled(MappedCheckpoint, HashMap<String, usize>),
    /// Shards: each tensor in the part `owner` names.
    Sharded {
        parts: Vec<Storage>,
        owner: HashMap<String, usize>,
    },
}

impl Storage {
    fn part(&self, name: &str) -> candle_core::Result<&Storage> {
        match self {
            Storage::Sharded { parts, owner } => owner
                .get(name)
                .map(|&i| &parts[i])
                .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{name}` in any shard"))),
            single => Ok(single),
        }
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        match self.part(name)? {
            Storage::Mapped(m) => m.load(name, device),
            Storage::Pickled(..) => self.get(name)?.load(device),
            Storage::Sharded { .. } => Err(candle_core::Error::Msg("nested shards".into())),
        }
    }

    fn get(&self, name: &str) -> candle_core::Result<safetensors::tensor::TensorView<'_>> {
        match self.part(name)? {
            Storage::Mapped(m) => m.get(name),
            Storage::Pickled(checkpoint, index) => {
                let tensor = index
                    .get(name)
                    .map(|&i| &checkpoint.tensors[i])
                    .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{name}`")))?;
                let dtype = safetensors_dtype(tensor.dtype).ok_or_else(|| {
                    candle_core::Error::Msg(format!("tensor `{name}`: dtype {}", tensor.dtype))
                })?;
                safetensors::tensor::TensorView::new(
                    dtype,
                    tensor.shape.clone(),
                    checkpoint.bytes(tensor),
                )
                .map_err(|e| candle_core::Error::Msg(format!("tensor `{name}`: {e}")))
            }
            Storage::Sharded { .. } => Err(candle_core::Error::Msg("nested shards".into())),
        }
    }
}

/// Shards behind one index.
const MAX_SHARDS: usize = 1024;
/// Tensors one index names.
const MAX_INDEX_TENSORS: usize = 1 << 20;

/// A weights file whose header has been checked: a safetensors file (memory-mapped) or a
/// PyTorch `.pth` checkpoint (see [`WeightsFile::open`]).
pub struct WeightsFile {
    path: PathBuf,
    /// The tensors in the order of their bytes in the file.
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    /// The header's `__metadata__` (string values only, as safetensors defines it).
    metadata: HashMap<String, String>,
    storage: Storage,
}

impl std::fmt::Debug for WeightsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightsFile")
            .field("path", &self.path)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl WeightsFile {
    /// Opens a weights file: the shards a `*.index.json` names
    /// ([`open_sharded`](Self::open_sharded)), a PyTorch checkpoint when its name ends in
    /// `.pth`, `.pt`, `.ckpt` or `.bin` ([`open_pytorch`](Self::open_pytorch)), a safetensors
    /// file otherwise ([`open_safetensors`](Self::open_safetensors)).
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if crate::weight_names::is_index(name) {
            return Self::open_sharded(path);
        }
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("pth" | "pt" | "ckpt" | "bin") => Self::open_pytorch(path),
            _ => Self::open_safetensors(path),
        }
    }

    /// Reads a PyTorch checkpoint (`torch.save`'s zip format, which every torch since 1.6
    /// writes, or torch's legacy format) with [`torch_file`](super::torch_file)'s bounded
    /// reader, which rebuilds the state dict's tensors without running any of the pickle's
    /// code and checks each against its storage, then reads the tensors where they lie in the
    /// file, memory-mapped like a safetensors file ([`torch_file::map_checkpoint`]
    /// (super::torch_file::map_checkpoint)): opening a 3 GB `.bin` holds no copy of it. The
    /// state dict is the top-level dictionary, or the one under `state_dict`, `params_ema` or
    /// `params` (as BasicSR and Real-ESRGAN save theirs), or IP-Adapter's `image_proj` and
    /// `ip_adapter` sections.
    pub fn open_pytorch(path: &Path) -> Result<Self> {
        let fail = |detail: String| Error::ModelLoad {
            path: path.to_path_buf(),
            detail,
        };
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(fail("not a file".into()));
        }
        let checkpoint = super::torch_file::map_checkpoint(path).map_err(|e| match e {
            ReadError::Io(source) => Error::Io {
                path: path.to_path_buf(),
                source,
            },
            ReadError::Invalid(detail) => fail(detail),
        })?;
        let mut entries = Vec::with_capacity(checkpoint.tensors.len());
        for tensor in &checkpoint.tensors {
            let bytes = checkpoint.bytes(tensor).len() as u64;
            let start = checkpoint.file_offset(tensor).unwrap_or(0);
            entries.push(Entry {
                name: tensor.name.clone(),
                dtype: tensor.dtype.to_string(),
                float: Float::parse(tensor.dtype),
                shape: tensor.shape.clone(),
                start,
                end: start + bytes,
            });
        }
        let index = checkpoint
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self::from_parts(
            path,
            entries,
            HashMap::new(),
            Storage::Pickled(checkpoint, index),
        ))
    }

    /// Opens the shards the index `path` names (diffusers' and transformers'
    /// `*.safetensors.index.json` and `*.bin.index.json`: `{"weight_map": {tensor: shard file}}`)
    /// as one file. Each shard is opened and checked like a file of its own, and the index must
    /// match them exactly: every tensor it names in the shard it names, no tensor a shard holds
    /// that the index does not put there, no tensor in two shards. Shard names are plain file
    /// names in the index's folder. Pickle shards are each read whole, like a single `.bin`.
    pub fn open_sharded(path: &Path) -> Result<Self> {
        let fail = |detail: String| Error::ModelLoad {
            path: path.to_path_buf(),
            detail,
        };
        let text = crate::read_bounded(path, crate::MAX_INDEX_BYTES)?;
        let index: Value = serde_json::from_slice(&text)
            .map_err(|e| fail(format!("not a shard index (JSON): {e}")))?;
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| fail("not a shard index: no `weight_map` object".into()))?;
        if map.len() > MAX_INDEX_TENSORS {
            return Err(fail(format!(
                "the index names {} tensors (at most {MAX_INDEX_TENSORS})",
                map.len()
            )));
        }
        let mut shards: std::collections::BTreeMap<&str, usize> = Default::default();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .filter(|s| {
                    !s.is_empty()
                        && s.len() <= 255
                        && !s.starts_with('.')
                        && !s.contains(['/', '\\', '\0'])
                        && !crate::weight_names::is_index(s)
                })
                .ok_or_else(|| {
                    fail(format!(
                        "the index puts tensor `{tensor}` in {shard}, not a weights file name \
                         in the index's folder"
                    ))
                })?;
            *shards.entry(shard).or_default() += 1;
        }
        if shards.len() > MAX_SHARDS {
            return Err(fail(format!(
                "the index names {} shards (at most {MAX_SHARDS})",
                shards.len()
            )));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut entries = Vec::new();
        let mut metadata = HashMap::new();
        let mut parts = Vec::new();
        let mut owner = HashMap::new();
        for (&shard, &named) in &shards {
            let file = Self::open(&dir.join(shard))?;
            for entry in &file.entries {
                if map.get(&entry.name).and_then(Value::as_str) != Some(shard) {
                    return Err(fail(format!(
                        "shard {shard} holds tensor `{}`, which the index does not put there",
                        entry.name
                    )));
                }
            }
            if file.entries.len() != named {
                let absent = map
                    .iter()
                    .find(|(t, s)| s.as_str() == Some(shard) && !file.index.contains_key(*t))
                    .map_or_else(String::new, |(t, _)| t.clone());
                return Err(fail(format!(
                    "the index puts tensor `{absent}` in shard {shard}, which does not hold it \
                     ({named} named there, {} held)",
                    file.entries.len()
                )));
            }
            let Self {
                entries: shard_entries,
                metadata: shard_metadata,
                storage,
                ..
            } = file;
            for entry in &shard_entries {
                owner.insert(entry.name.clone(), parts.len());
            }
            entries.extend(shard_entries);
            for (key, value) in shard_metadata {
                metadata.entry(key).or_insert(value);
            }
            parts.push(storage);
        }
        Ok(Self::from_parts(
            path,
            entries,
            metadata,
            Storage::Sharded { parts, owner },
        ))
    }

    fn from_parts(
        path: &Path,
        entries: Vec<Entry>,
        metadata: HashMap<String, String>,
        storage: Storage,
    ) -> Self {
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Self {
            path: path.to_path_buf(),
            entries,
            index,
            metadata,
            storage,
        }
    }

    /// Reads and checks the header of the safetensors file `path` (8-byte length, JSON object,
    /// every tensor's dtype, shape and byte range inside the file), then maps the file. Errors
    /// name the file and, where one is at fault, the tensor.
    pub fn open_safetensors(path: &Path) -> Result<Self> {
        let fail = |detail: String| Error::ModelLoad {
            path: path.to_path_buf(),
            detail,
        };
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(fail("not a file".into()));
        }
        let len = meta.len();
        if len < 8 {
            return Err(fail(format!(
                "the file has {len} bytes; a safetensors file starts with an 8-byte header length"
            )));
        }
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut word = [0u8; 8];
        file.read_exact(&mut word).map_err(io)?;
        let header_len = u64::from_le_bytes(word);
        if header_len > MAX_HEADER_BYTES || header_len > len - 8 {
            return Err(fail(format!(
                "the header length says {header_len} bytes, but {} bytes follow it (and \
                 safetensors allows at most {MAX_HEADER_BYTES}): not a safetensors file, or \
                 truncated",
                len - 8
            )));
        }
        let mut header = Vec::new();
        header
            .try_reserve_exact(header_len as usize + 8)
            .map_err(|e| fail(format!("cannot allocate the {header_len}-byte header: {e}")))?;
        header.extend_from_slice(&word);
        file.by_ref()
            .take(header_len)
            .read_to_end(&mut header)
            .map_err(io)?;
        let (entries, metadata) = parse_header(&header, len).map_err(fail)?;
        // SAFETY: the file is mapped read-only; sdstream never writes to it, and a host that
        // truncates a checkpoint while it is loaded is outside what any mmap-based loader can
        // defend against.
        let mmap = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| fail(format!("not a valid safetensors file: {e}")))?;
        Ok(Self::from_parts(
            path,
            entries,
            metadata,
            Storage::Mapped(mmap),
        ))
    }

    /// A value of the header's `__metadata__`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// Every tensor's name and shape, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.entries
            .iter()
            .map(|e| (e.name.as_str(), e.shape.as_slice()))
    }

    /// Every float tensor's name and shape, in file order.
    pub fn float_tensors(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.entries
            .iter()
            .filter(|e| e.float.is_some())
            .map(|e| (e.name.as_str(), e.shape.as_slice()))
    }

    /// The float tensor `name` on the CPU in f32 (checked like a network's tensors).
    pub fn load_f32(&self, name: &str) -> Result<Tensor> {
        self.lookup(name, None).map_err(|detail| Error::ModelLoad {
            path: self.path.clone(),
            detail,
        })?;
        Ok(self
            .storage
            .load(name, &Device::Cpu)?
            .to_dtype(DType::F32)?)
    }

    /// The tensor `name`, of any numeric dtype, on the CPU in f32 (for small values such as a
    /// LoRA's alpha, which some files store as an integer).
    pub fn load_numeric_f32(&self, name: &str) -> Result<Tensor> {
        Ok(self
            .storage
            .load(name, &Device::Cpu)?
            .to_dtype(DType::F32)?)
    }

    /// [`check_finite`](Self::check_finite) over every float tensor of the file.
    pub fn check_all_finite(&self) -> Result<()> {
        let names = self
            .entries
            .iter()
            .filter(|e| e.float.is_some())
            .map(|e| e.name.clone())
            .collect();
        self.check_finite(&names)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Elements of the largest float tensor (what a probe's stand-ins are cut from).
    pub(crate) fn largest_float_elements(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.float.is_some())
            .map(|e| e.shape.iter().product::<usize>())
            .max()
            .unwrap_or(0)
    }

    /// Whether the file holds a tensor `name`.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The stored tensor `name` on `device`, in its stored dtype.
    pub(crate) fn load_stored(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        self.storage.load(name, device)
    }

    /// The header entry of `name`, checked to be a float tensor of `shape` (when one is asked
    /// for); the error says what differs: its shape on success.
    pub(crate) fn checked_shape(
        &self,
        name: &str,
        shape: Option<&[usize]>,
    ) -> std::result::Result<&[usize], String> {
        self.lookup(name, shape).map(|e| e.shape.as_slice())
    }

    /// The header entry of `name`, checked to be a float tensor of `shape` (when one is asked
    /// for); the error says what differs.
    fn lookup(&self, name: &str, shape: Option<&[usize]>) -> std::result::Result<&Entry, String> {
        let Some(entry) = self.index.get(name).map(|&i| &self.entries[i]) else {
            return Err(match shape {
                Some(shape) => format!(
                    "tensor `{name}` is missing: the config implies it, with shape {shape:?}"
                ),
                None => format!("tensor `{name}` is missing"),
            });
        };
        if let Some(shape) = shape
            && entry.shape != shape
        {
            return Err(format!(
                "tensor `{name}` has shape {:?} in the file, but the config implies {shape:?}",
                entry.shape
            ));
        }
        if entry.float.is_none() {
            return Err(format!(
                "tensor `{name}` is stored as {}; weights must be F16, BF16, F32 or F64",
                entry.dtype
            ));
        }
        Ok(entry)
    }

    /// Refuses float tensors that no `used` name claims and `tolerated` does not excuse: a file
    /// holding more than the config describes means config and weights do not belong together.
    pub fn check_all_used(
        &self,
        used: &BTreeSet<String>,
        tolerated: fn(&str) -> bool,
    ) -> Result<()> {
        let mut unused = self
            .entries
            .iter()
            .filter(|e| e.float.is_some() && !used.contains(&e.name) && !tolerated(&e.name))
            .map(|e| &e.name)
            .collect::<Vec<_>>();
        unused.sort();
        if let Some(first) = unused.first() {
            return Err(Error::ModelLoad {
                path: self.path.clone(),
                detail: format!(
                    "tensor `{first}` is not part of the network the config describes ({}): \
                     the config and the weights do not belong together",
                    count(unused.len(), "unused tensor")
                ),
            });
        }
        Ok(())
    }

    /// Refuses NaN and ±Inf values in the tensors `names` (scanned in file order, from the
    /// map, before anything is uploaded); the error names the first tensor that has any, its
    /// count and the totals.
    pub fn check_finite(&self, names: &BTreeSet<String>) -> Result<()> {
        let mut first: Option<(&str, usize, usize)> = None;
        let (mut tensors, mut values) = (0, 0);
        for entry in self.entries.iter().filter(|e| names.contains(&e.name)) {
            let Some(float) = entry.float else { continue };
            let view = self
                .storage
                .get(&entry.name)
                .map_err(|e| Error::ModelLoad {
                    path: self.path.clone(),
                    detail: format!("tensor `{}`: {e}", entry.name),
                })?;
            let n = count_non_finite(view.data(), float);
            if n > 0 {
                let elements = entry.shape.iter().product::<usize>();
                first.get_or_insert((&entry.name, n, elements));
                tensors += 1;
                values += n;
            }
        }
        if let Some((name, n, elements)) = first {
            return Err(Error::ModelLoad {
                path: self.path.clone(),
                detail: format!(
                    "tensor `{name}` holds {} (NaN or ±Inf) out of {elements} (in all: {} in {}): \
                     the weights are corrupt",
                    count(n, "non-finite value"),
                    count(values, "value"),
                    count(tensors, "tensor")
                ),
            });
        }
        Ok(())
    }
}

/// The tensors and `__metadata__` of a safetensors header: `start` holds the 8-byte length
/// and at least that much JSON, `file_len` is the size of the whole file. Checks every
/// tensor's dtype, shape and byte range against the data the file holds (the error names the
/// first tensor a truncation cuts off).
fn parse_header(
    start: &[u8],
    file_len: u64,
) -> std::result::Result<(Vec<Entry>, HashMap<String, String>), String> {
    let word: [u8; 8] = start
        .get(..8)
        .and_then(|w| w.try_into().ok())
        .ok_or("shorter than a safetensors header length")?;
    let header_len = u64::from_le_bytes(word);
    let json_bytes = usize::try_from(header_len)
        .ok()
        .and_then(|n| start.get(8..8 + n))
        .ok_or("the header is cut short")?;
    let json: serde_json::Map<String, Value> = serde_json::from_slice(json_bytes)
        .map_err(|e| format!("the header is not a JSON object: {e}"))?;
    let mut entries = Vec::new();
    let mut metadata = HashMap::new();
    for (name, info) in json {
        if name == "__metadata__" {
            if let Value::Object(map) = info {
                for (key, value) in map {
                    if let Value::String(text) = value {
                        metadata.insert(key, text);
                    }
                }
            }
        } else {
            entries.push(Entry::parse(name, &info)?);
        }
    }
    entries.sort_by_key(|e| (e.start, e.end));
    let data_len = file_len - 8 - header_len;
    let cut: Vec<&Entry> = entries.iter().filter(|e| e.end > data_len).collect();
    if let Some(first) = cut.first() {
        return Err(format!(
            "tensor `{}` ends at byte {} of the data, but the file holds only {data_len} \
             bytes after its header: the file is truncated ({} of {} tensors cut off)",
            first.name,
            first.end,
            cut.len(),
            entries.len()
        ));
    }
    Ok((entries, metadata))
}

/// `n thing` or `n things`.
fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checked_backend::{CheckedBackend, Mode};
    use candle_nn::VarBuilder;
    use std::sync::Arc;

    fn encode(values: &[f32], float: Float) -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| match float {
                Float::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                Float::Bf16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                Float::F32 => v.to_le_bytes().to_vec(),
                Float::F64 => f64::from(v).to_le_bytes().to_vec(),
            })
            .collect()
    }

    #[test]
    fn counts_nan_and_inf_in_every_format_and_nothing_else() {
        // Finite extremes (largest, smallest normal and subnormal, ±0) next to non-finite ones,
        // at every lane position and across a block boundary.
        let mut values = vec![0.0f32; 3 * 1024 + 3];
        values[0] = f32::NAN;
        values[1] = f32::INFINITY;
        values[5] = -0.0;
        values[6] = f32::NEG_INFINITY;
        values[7] = 65504.0;
        values[1023] = f32::NAN;
        values[1024] = -f32::NAN;
        values[2000] = 6.1e-5;
        values[2001] = 6.0e-8;
        values[3 * 1024 + 2] = f32::INFINITY;
        for float in [Float::F16, Float::Bf16, Float::F32, Float::F64] {
            assert_eq!(
                count_non_finite(&encode(&values, float), float),
                6,
                "{float:?}"
            );
        }
        // f32 values that only f16 cannot hold stay finite in the wider formats.
        let wide = [1e30f32, -3.0e38, 3.0e38, f32::MIN_POSITIVE];
        for float in [Float::Bf16, Float::F32, Float::F64] {
            assert_eq!(
                count_non_finite(&encode(&wide, float), float),
                0,
                "{float:?}"
            );
        }
        assert_eq!(count_non_finite(&encode(&wide, Float::F16), Float::F16), 3);
        assert_eq!(count_non_finite(&[], Float::F32), 0);
    }

    /// What the checks cost on an SD1.5-sized UNet (the default `UNetConfig`, f16, 1.7 GB):
    /// prints the header check, the probe build, the NaN/Inf scan (ms and ms per GB, first pass
    /// and best repeat) and the real load. Ignored: it writes, and deletes, a 1.7 GB file in the
    /// temp folder. `cargo test -p sdstream --lib weights_checks_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn weights_checks_cost_on_an_sd15_sized_unet() {
        use crate::unet::{UNet2DConditionModel, UNetConfig};
        use std::time::Instant;

        let config: UNetConfig = serde_json::from_str("{}").expect("default config");
        let dir =
            std::env::temp_dir().join(format!("sdstream-weights-cost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("diffusion_pytorch_model.fp16.safetensors");
        {
            let varmap = candle_nn::VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F16, &Device::Cpu);
            drop(UNet2DConditionModel::new(&config, vb).expect("SD1.5 UNet"));
            varmap.save(&path).expect("save");
        }
        let gb = std::fs::metadata(&path).expect("size").len() as f64 / 1e9;
        // Warm the page cache, as a load right after a download or a previous load finds it.
        let mut reader = std::fs::File::open(&path).expect("open");
        std::io::copy(&mut reader, &mut std::io::sink()).expect("read");
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;

        let t = Instant::now();
        let file = Arc::new(WeightsFile::open(&path).expect("header"));
        let open_ms = ms(t);
        let t = Instant::now();
        let (vb, used) =
            CheckedBackend::var_builder(file.clone(), Mode::Probe, DType::F16, &Device::Cpu, None);
        drop(UNet2DConditionModel::new(&config, vb).expect("probe"));
        let probe_ms = ms(t);
        let used = std::mem::take(&mut *used.lock().unwrap());
        file.check_all_used(&used, |_| false)
            .expect("every tensor used");
        let mut scans = Vec::new();
        for _ in 0..4 {
            let t = Instant::now();
            file.check_finite(&used).expect("finite");
            scans.push(ms(t));
        }
        let best = scans[1..].iter().copied().fold(f64::INFINITY, f64::min);
        let t = Instant::now();
        let (vb, _) =
            CheckedBackend::var_builder(file.clone(), Mode::Load, DType::F16, &Device::Cpu, None);
        drop(UNet2DConditionModel::new(&config, vb).expect("load"));
        let load_ms = ms(t);
        println!(
            "SD1.5-sized UNet, f16, {gb:.2} GB, {} tensors: header {open_ms:.1} ms, probe \
             {probe_ms:.0} ms, NaN/Inf scan {:.0} ms first ({:.0} ms/GB), {best:.0} ms best \
             repeat ({:.0} ms/GB), load {load_ms:.0} ms",
            used.len(),
            scans[0],
            scans[0] / gb,
            best / gb
        );
        drop(file);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
