//! Reads a PyTorch checkpoint in the zip format `torch.save` writes since torch 1.6 into
//! safetensors bytes, bounded before anything is allocated and without running any of its
//! pickle code.
//!
//! The archive holds `<name>/data.pkl`, a pickle of the saved object in which every tensor is
//! a call of `torch._utils._rebuild_tensor_v2` (possibly wrapped by `_rebuild_parameter` or
//! `torch._tensor._rebuild_from_type_v2`) on a *persistent id* `('storage', torch.XStorage,
//! key, location, elements)`, and one entry `<name>/data/<key>` per storage. The pickle is read
//! by the bounded machine of [`pickle`](super::pickle) into inert values; only the calls named
//! above mean anything here (an allow-list), every other global stays an opaque record.
//!
//! Before any tensor byte is allocated, every tensor of the state dict is checked: its storage
//! class gives the element type, the persistent id the element count, and that storage's
//! archive entry must hold exactly that many bytes, uncompressed; the tensor's shape, stride
//! and offset must stay inside the storage (overflow-checked) and view no more elements than
//! it holds; the tensors together may view at most [`MAX_VIEW_FACTOR`] times the file's size
//! (storages shared by many names would otherwise multiply it). Only then is the output — the
//! safetensors file the tensors make, laid out by name — allocated once and filled storage by
//! storage, so the peak is about the output's size.
//!
//! The pickle machine knows nothing of the zip container, and the tensors' description
//! ([`TensorRef`]) nothing of where the storages are ([`Storages`]), so that torch's legacy
//! format (one raw pickle stream, the storages appended) can be read through the same steps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use super::pickle::{self, Id, Pickle, Value};

/// Dictionaries a PyTorch checkpoint may nest its tensors in, one per part of the network
/// (h94/IP-Adapter's `.bin` files: the image projection and the attention layers); their
/// tensors are named `<section>.<name>`, as in the safetensors form of these files.
const NESTED_SECTIONS: [&str; 2] = ["image_proj", "ip_adapter"];
/// Keys a checkpoint may keep its state dict under (BasicSR and Real-ESRGAN save theirs under
/// `params_ema` or `params`).
const STATE_DICT_KEYS: [&str; 3] = ["state_dict", "params_ema", "params"];
/// Entries in the archive (one per storage, plus five of torch's own).
const MAX_ENTRIES: usize = 100_000;
/// Tensors in one state dict.
const MAX_TENSORS: usize = 65_536;
/// Size of `data.pkl`: a state dict's pickle takes about 150 bytes per tensor.
const MAX_PICKLE_BYTES: u64 = 16 << 20;
/// Dimensions of one tensor.
const MAX_RANK: usize = 32;
/// The tensors together may view at most this many times the file's bytes: a storage shared
/// by several names (tied weights) is written out once per name.
const MAX_VIEW_FACTOR: u64 = 4;
/// Wrappers (`_rebuild_parameter`, `_rebuild_from_type_v2`) around one tensor's rebuild call.
const MAX_WRAPPERS: usize = 4;
/// What to do with a file this reader does not take.
const FORMATS: &str = "sdstream reads what torch.save writes (its zip format, and the legacy \
                       format of torch before 1.6) and safetensors files: convert anything else \
                       with safetensors.torch.save_file";

/// Why a checkpoint could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The file itself could not be opened or sized.
    Io(std::io::Error),
    /// The file is not a checkpoint this reader takes, or a tensor in it is malformed: what.
    Invalid(String),
}

impl From<String> for ReadError {
    fn from(detail: String) -> Self {
        Self::Invalid(detail)
    }
}

/// An element type of a tensor storage.
#[derive(Debug, PartialEq, Eq)]
struct Element {
    /// torch's storage class (`torch.FloatStorage`).
    class: &'static str,
    /// safetensors' name of the type.
    dtype: &'static str,
    size: u64,
}

const ELEMENTS: [Element; 10] = [
    Element {
        class: "FloatStorage",
        dtype: "F32",
        size: 4,
    },
    Element {
        class: "HalfStorage",
        dtype: "F16",
        size: 2,
    },
    Element {
        class: "BFloat16Storage",
        dtype: "BF16",
        size: 2,
    },
    Element {
        class: "DoubleStorage",
        dtype: "F64",
        size: 8,
    },
    Element {
        class: "ByteStorage",
        dtype: "U8",
        size: 1,
    },
    Element {
        class: "CharStorage",
        dtype: "I8",
        size: 1,
    },
    Element {
        class: "ShortStorage",
        dtype: "I16",
        size: 2,
    },
    Element {
        class: "IntStorage",
        dtype: "I32",
        size: 4,
    },
    Element {
        class: "LongStorage",
        dtype: "I64",
        size: 8,
    },
    Element {
        class: "BoolStorage",
        dtype: "BOOL",
        size: 1,
    },
];

/// A storage as a tensor's persistent id describes it.
#[derive(Debug)]
pub struct StorageRef {
    key: String,
    element: &'static Element,
    elements: u64,
}

/// One tensor of a state dict: a view of a storage, not yet checked against it.
#[derive(Debug)]
pub struct TensorRef {
    name: String,
    storage: StorageRef,
    /// In elements.
    offset: u64,
    shape: Vec<u64>,
    /// In elements.
    stride: Vec<u64>,
}

/// Where a checkpoint's storages are (the zip archive's entries here).
pub trait Storages {
    /// Where storage `key` is (its position, for reading in file order) and its length in
    /// bytes, or why it cannot be read.
    fn locate(&mut self, key: &str) -> Result<(u64, u64), String>;
    /// Reads storage `key`, whose length [`locate`](Self::locate) gave, into `out`.
    fn read(&mut self, key: &str, out: &mut [u8]) -> Result<(), String>;
    /// Where storage `key`'s bytes start in the file, and the CRC-32 they must have, if the
    /// format records one (for [`map_checkpoint`], which reads them where they lie).
    fn data_start(&mut self, key: &str) -> Result<(u64, Option<u32>), String>;
}

/// Reads the PyTorch checkpoint `path` (either format) and rewrites its state dict as
/// safetensors bytes.
pub fn read_as_safetensors(path: &Path) -> Result<Vec<u8>, ReadError> {
    let (reader, file_len, legacy) = open_checkpoint(File::open(path).map_err(ReadError::Io)?)?;
    if legacy {
        read_legacy(reader, file_len)
    } else {
        read_archive(reader, file_len)
    }
}

/// A checkpoint file's reader at its start, its length, and whether it is in torch's legacy
/// format (by its first bytes) rather than the zip format.
fn open_checkpoint(file: File) -> Result<(BufReader<File>, u64, bool), ReadError> {
    let file_len = file.metadata().map_err(ReadError::Io)?.len();
    let mut reader = BufReader::new(file);
    let mut head = [0u8; 3];
    let legacy = reader.read_exact(&mut head).is_ok() && head == LEGACY_START;
    reader.seek(SeekFrom::Start(0)).map_err(ReadError::Io)?;
    Ok((reader, file_len, legacy))
}

const NO_TENSORS: &str = "no tensors found: expected a state dict at the top level or under \
                          `state_dict`, `params_ema` or `params` (or IP-Adapter's \
                          `image_proj` and `ip_adapter`)";

const NOT_ZIP: &str = "not a readable PyTorch checkpoint (not a zip archive";

/// How a legacy checkpoint starts: `PROTO 2`, then the magic number as a `LONG1`.
const LEGACY_START: [u8; 3] = [0x80, 0x02, 0x8a];
/// torch's magic number for the legacy format, 0x1950a86a20f9469cfc6c, as `LONG1` stores it
/// (length byte, then little-endian).
const LEGACY_MAGIC: [u8; 11] = [
    0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];
/// The legacy format's protocol version (torch has written no other).
const LEGACY_PROTOCOL: i64 = 1001;
/// The legacy format's first three pickles (magic number, protocol version, system
/// information) take about 200 bytes; this much is read beyond the state dict's bound.
const LEGACY_PREAMBLE_BYTES: u64 = 4096;

/// [`read_as_safetensors`] over any reader of a `file_len`-byte archive.
pub fn read_archive<R: Read + Seek>(reader: R, file_len: u64) -> Result<Vec<u8>, ReadError> {
    let (plan, mut archive) = archive_plan(reader, file_len)?;
    Ok(fill(&plan, &mut archive)?)
}

/// A zip checkpoint's tensors, checked against its storages.
fn archive_plan<R: Read + Seek>(
    reader: R,
    file_len: u64,
) -> Result<(Plan, ZipStorages<R>), ReadError> {
    let mut archive = ZipStorages::open(reader, file_len)?;
    let pickle_bytes = archive.read_pickle()?;
    let pickle = pickle::parse(&pickle_bytes)
        .map_err(|e| format!("not a readable PyTorch checkpoint (its data.pkl, {e}); {FORMATS}"))?;
    let tensors = state_dict_tensors(&pickle)?;
    drop(pickle);
    drop(pickle_bytes);
    let plan = plan(tensors, &mut archive, file_len)?;
    Ok((plan, archive))
}

/// One tensor of a [`MappedCheckpoint`].
#[derive(Debug)]
pub struct MappedTensor {
    /// Its name in the state dict.
    pub name: String,
    /// safetensors' name of its element type (`F32`, `F16`, …).
    pub dtype: &'static str,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Where its bytes are: a range of the file, or of the copies of views that are not.
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    /// Bytes `range` of the file, in row-major order as the tensor is.
    File(std::ops::Range<usize>),
    /// A view whose elements are not one run of the file (a transposed or strided view),
    /// copied into [`MappedCheckpoint::copies`]: that copy's index.
    Copy(usize),
}

/// A PyTorch checkpoint (either format) checked as [`read_as_safetensors`] checks it, whose
/// tensors are then read where they lie in the file, memory-mapped: opening it allocates
/// nothing the tensors' size (but the copies of views that are not one run of the file), and
/// a tensor no one asks for is never read. A loader that reads every tensor once into its own
/// copies peaks at those copies, where one that rewrote the file in memory first peaked at
/// the copies plus the file (a `.ckpt` holding a whole pipeline, of which a ControlNet
/// conversion reads one part, takes only that part's pages).
pub struct MappedCheckpoint {
    map: memmap2::Mmap,
    copies: Vec<Vec<u8>>,
    /// The state dict's tensors, in the order of their bytes in the file.
    pub tensors: Vec<MappedTensor>,
}

impl std::fmt::Debug for MappedCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedCheckpoint")
            .field("bytes", &self.map.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl MappedCheckpoint {
    /// The tensor's bytes (little-endian, row-major).
    pub fn bytes(&self, tensor: &MappedTensor) -> &[u8] {
        match &tensor.place {
            Place::File(range) => &self.map[range.clone()],
            Place::Copy(i) => &self.copies[*i],
        }
    }

    /// Where the tensor's bytes start in the file (`None` for a copied view).
    pub fn file_offset(&self, tensor: &MappedTensor) -> Option<u64> {
        match &tensor.place {
            Place::File(range) => Some(range.start as u64),
            Place::Copy(_) => None,
        }
    }
}

/// Opens the PyTorch checkpoint `path` (either format) as a [`MappedCheckpoint`]: the pickle
/// read and every tensor checked against its storage as [`read_as_safetensors`] does, each
/// storage's place checked against the file and, in a zip archive, its CRC-32 (read from the
/// map, through the page cache: no copy is held).
pub fn map_checkpoint(path: &Path) -> Result<MappedCheckpoint, ReadError> {
    let file = File::open(path).map_err(ReadError::Io)?;
    // SAFETY: the map is read-only and lives as long as the checkpoint; as with the mapped
    // safetensors files, the file must not be truncated while the process reads it (which
    // the hub cache and a model folder are not).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(ReadError::Io)?;
    let (reader, file_len, legacy) = open_checkpoint(file)?;
    if legacy {
        let (plan, mut storages) = legacy_plan(reader, file_len)?;
        Ok(mapped(plan, &mut storages, map)?)
    } else {
        let (plan, mut storages) = archive_plan(reader, file_len)?;
        Ok(mapped(plan, &mut storages, map)?)
    }
}

/// The checked plan's tensors placed in the mapped file.
fn mapped(
    plan: Plan,
    storages: &mut impl Storages,
    map: memmap2::Mmap,
) -> Result<MappedCheckpoint, String> {
    let mut places: Vec<Option<(usize, Place)>> = vec![None; plan.tensors.len()];
    let mut copies = Vec::new();
    for (key, len, users) in &plan.storages {
        let (start, crc) = storages
            .data_start(key)
            .map_err(|e| format!("storage `{key}`: {e}"))?;
        let end = start.checked_add(*len).filter(|&e| e <= map.len() as u64);
        let Some(end) = end else {
            return Err(format!(
                "storage `{key}` ({len} bytes at byte {start}) runs past the end of the {}-byte \
                 file",
                map.len()
            ));
        };
        let (start, end) = (start as usize, end as usize);
        let data = &map[start..end];
        if let Some(expected) = crc {
            let found = crc32fast::hash(data);
            if found != expected {
                return Err(format!(
                    "storage `{key}`: its bytes' CRC-32 is {found:08x}, the archive records \
                     {expected:08x}: the file is corrupt"
                ));
            }
        }
        for &user in users {
            let (tensor, range) = &plan.tensors[user];
            let size = tensor.storage.element.size as usize;
            let bytes = range.len();
            let place = if is_contiguous(&tensor.shape, &tensor.stride) {
                // Inside the storage: check_view bounded the view by its elements.
                let first = start + tensor.offset as usize * size;
                Place::File(first..first + bytes)
            } else {
                let mut copy = Vec::new();
                copy.try_reserve_exact(bytes).map_err(|e| {
                    format!(
                        "cannot allocate tensor `{}` ({bytes} bytes): {e}",
                        tensor.name
                    )
                })?;
                copy.resize(bytes, 0);
                gather(data, tensor, &mut copy);
                copies.push(copy);
                Place::Copy(copies.len() - 1)
            };
            places[user] = Some((start, place));
        }
    }
    let mut tensors = Vec::with_capacity(plan.tensors.len());
    for ((tensor, _), place) in plan.tensors.into_iter().zip(places) {
        let (at, place) =
            place.ok_or_else(|| format!("tensor `{}` has no storage", tensor.name))?;
        let shape = tensor
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format!("tensor `{}`: shape {:?}", tensor.name, tensor.shape))?;
        tensors.push((
            at,
            MappedTensor {
                name: tensor.name,
                dtype: tensor.storage.element.dtype,
                shape,
                place,
            },
        ));
    }
    // In file order, so that reading every tensor walks the file once.
    tensors.sort_by_key(|(at, t)| match &t.place {
        Place::File(range) => (range.start, t.name.clone()),
        Place::Copy(_) => (*at, t.name.clone()),
    });
    Ok(MappedCheckpoint {
        map,
        copies,
        tensors: tensors.into_iter().map(|(_, t)| t).collect(),
    })
}

/// The tensors of the checkpoint's state dict: the top-level dictionary's, or else those of
/// the first of [`STATE_DICT_KEYS`] that holds tensors, or else those of every
/// [`NESTED_SECTIONS`] dictionary, prefixed with its name. Entries that are not tensors (other
/// values, or calls of anything but torch's rebuild functions) are left out; a tensor entry
/// that is malformed is refused, naming it.
pub fn state_dict_tensors(p: &Pickle) -> Result<Vec<TensorRef>, String> {
    let root = p.root();
    let mut sections = Vec::new();
    if holds_tensors(p, root) {
        sections.push((None, root));
    } else if let Some(dict) = STATE_DICT_KEYS
        .iter()
        .filter_map(|key| p.dict_get(root, key))
        .find(|&dict| holds_tensors(p, dict))
    {
        sections.push((None, dict));
    } else {
        for section in NESTED_SECTIONS {
            if let Some(dict) = p.dict_get(root, section).filter(|&d| holds_tensors(p, d)) {
                sections.push((Some(section), dict));
            }
        }
    }
    if sections.is_empty() {
        return Err(NO_TENSORS.into());
    }
    let mut tensors = Vec::new();
    let mut names = HashSet::new();
    for (section, dict) in sections {
        for &(key, value) in p.dict(dict).unwrap_or_default() {
            let Some(key) = p.str(key) else { continue };
            let name = match section {
                Some(section) => format!("{section}.{key}"),
                None => key.to_string(),
            };
            let Some(tensor) = tensor_ref(p, &name, value)? else {
                continue;
            };
            if tensors.len() == MAX_TENSORS {
                return Err(format!(
                    "more than {MAX_TENSORS} tensors in the state dict (`{name}` is one more)"
                ));
            }
            if !names.insert(name.clone()) {
                return Err(format!("tensor `{name}` appears twice in the state dict"));
            }
            tensors.push(tensor);
        }
    }
    Ok(tensors)
}

/// What one of torch's rebuild functions does.
#[derive(Clone, Copy)]
enum Rebuild {
    /// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, `_rebuild_tensor(...)`.
    Tensor,
    /// `_rebuild_parameter(data, ...)`: `data` is the tensor.
    Parameter,
    /// `_rebuild_from_type_v2(func, type, args, state)`: the tensor is `func(*args)`.
    FromType,
}

/// The allow-list: the globals whose calls make tensors.
fn rebuild(global: (&str, &str)) -> Option<Rebuild> {
    Some(match global {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => Rebuild::Tensor,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Rebuild::Parameter
        }
        ("torch._tensor", "_rebuild_from_type_v2") => Rebuild::FromType,
        _ => return None,
    })
}

/// Whether `id` is a dictionary with at least one tensor among its values.
fn holds_tensors(p: &Pickle, id: Id) -> bool {
    p.dict(id).is_some_and(|items| {
        items.iter().any(|&(_, value)| {
            p.object(value)
                .and_then(|(callable, _)| p.global(callable))
                .and_then(rebuild)
                .is_some()
        })
    })
}

/// The tensor the value `value` rebuilds, `None` when it is no call of a rebuild function.
fn tensor_ref(p: &Pickle, name: &str, value: Id) -> Result<Option<TensorRef>, String> {
    let bad = |what: String| format!("tensor `{name}`: {what}");
    let Some((mut callable, mut args)) = p.object(value) else {
        return Ok(None);
    };
    for wrapped in 0..MAX_WRAPPERS {
        let Some(kind) = p.global(callable).and_then(rebuild) else {
            if wrapped == 0 {
                return Ok(None);
            }
            return Err(bad(format!(
                "rebuilt by {}, not by torch's tensor rebuild functions",
                p.describe(callable)
            )));
        };
        let items = p
            .tuple(args)
            .ok_or_else(|| bad(format!("the rebuild arguments are {}", p.describe(args))))?;
        match kind {
            Rebuild::Tensor => return tensor_view(p, name, items).map(Some).map_err(bad),
            Rebuild::Parameter => {
                let data = *items
                    .first()
                    .ok_or_else(|| bad("a parameter without data".into()))?;
                (callable, args) = p.object(data).ok_or_else(|| {
                    bad(format!("a parameter whose data is {}", p.describe(data)))
                })?;
            }
            Rebuild::FromType => {
                let [func, _, inner, ..] = items else {
                    return Err(bad(
                        "_rebuild_from_type_v2 with fewer than 3 arguments".into()
                    ));
                };
                (callable, args) = (*func, *inner);
            }
        }
    }
    Err(bad(format!(
        "wrapped in more than {MAX_WRAPPERS} rebuild calls"
    )))
}

/// `_rebuild_tensor_v2`'s arguments: storage, offset, size, stride (the rest are autograd's).
fn tensor_view(p: &Pickle, name: &str, args: &[Id]) -> Result<TensorRef, String> {
    let [storage, offset, shape, stride, ..] = args else {
        return Err(format!(
            "{} rebuild arguments (storage, offset, size, stride expected)",
            args.len()
        ));
    };
    let storage = storage_ref(p, *storage)?;
    let offset = count(p, *offset, "storage offset")?;
    let dims = |id: Id, what: &str| -> Result<Vec<u64>, String> {
        let items = p
            .tuple(id)
            .ok_or_else(|| format!("its {what} is {}, not a tuple", p.describe(id)))?;
        if items.len() > MAX_RANK {
            return Err(format!(
                "its {what} has {} dimensions (at most {MAX_RANK})",
                items.len()
            ));
        }
        items.iter().map(|&d| count(p, d, what)).collect()
    };
    let (shape, stride) = (dims(*shape, "size")?, dims(*stride, "stride")?);
    if shape.len() != stride.len() {
        return Err(format!(
            "size {shape:?} and stride {stride:?} differ in length"
        ));
    }
    Ok(TensorRef {
        name: name.to_string(),
        storage,
        offset,
        shape,
        stride,
    })
}

/// A non-negative integer of the pickle.
fn count(p: &Pickle, id: Id, what: &str) -> Result<u64, String> {
    p.int(id)
        .and_then(|i| u64::try_from(i).ok())
        .ok_or_else(|| format!("its {what} holds {}, not a count", p.describe(id)))
}

/// `('storage', torch.XStorage, key, location, elements)`.
fn storage_ref(p: &Pickle, id: Id) -> Result<StorageRef, String> {
    let bad = || {
        format!(
            "its storage is {}, not a storage's persistent id",
            p.describe(id)
        )
    };
    let pid = p.persistent_id(id).ok_or_else(bad)?;
    storage_of(p, pid).map_err(|e| e.unwrap_or_else(bad))
}

/// The storage the persistent id `pid` names: `('storage', torch.XStorage, key, location,
/// elements)`, with a sixth item, `None`, in the legacy format. `Err(None)` when `pid` is no
/// storage's persistent id.
fn storage_of(p: &Pickle, pid: Id) -> Result<StorageRef, Option<String>> {
    let items = p.tuple(pid).ok_or(None)?;
    let [tag, class, key, _location, elements, rest @ ..] = items else {
        return Err(None);
    };
    if p.str(*tag) != Some("storage") {
        return Err(None);
    }
    if let Some(&view) = rest.first()
        && !matches!(p.value(view), Value::None)
    {
        return Err(Some(format!(
            "its storage is a view of another storage ({}), which torch has not written \
             since 0.4 and sdstream does not read; re-save the file with torch.save",
            p.describe(view)
        )));
    }
    let element = p
        .global(*class)
        .and_then(|(module, name)| {
            ELEMENTS
                .iter()
                .find(|e| matches!(module, "torch" | "torch.cuda") && e.class == name)
        })
        .ok_or_else(|| {
            Some(format!(
                "its storage type is {}; sdstream reads torch's Float, Half, BFloat16, \
                 Double, Byte, Char, Short, Int, Long and Bool storages",
                p.describe(*class)
            ))
        })?;
    let key = p
        .str(*key)
        .filter(|k| {
            !k.is_empty()
                && k.len() <= 64
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .ok_or_else(|| Some(format!("its storage key is {}", p.describe(*key))))?;
    Ok(StorageRef {
        key: key.to_string(),
        element,
        elements: count(p, *elements, "storage size").map_err(Some)?,
    })
}

/// The checked tensors and the output's layout.
#[derive(Debug)]
struct Plan {
    /// The tensors in output order, each with its byte range in the output.
    tensors: Vec<(TensorRef, std::ops::Range<usize>)>,
    /// The safetensors header (its 8-byte length included).
    header: Vec<u8>,
    /// Each storage's key and length, in file order, with the tensors (indices into
    /// `tensors`) that view it.
    storages: Vec<(String, u64, Vec<usize>)>,
    total: usize,
}

/// Checks every tensor against its storage and the storages against the archive, and lays
/// the output out; allocates nothing the file's contents size.
fn plan(
    tensors: Vec<TensorRef>,
    storages: &mut impl Storages,
    file_len: u64,
) -> Result<Plan, String> {
    // Every tensor's view of one storage must agree on what the storage is.
    let mut by_key: BTreeMap<&str, (&TensorRef, Vec<usize>)> = BTreeMap::new();
    for (i, tensor) in tensors.iter().enumerate() {
        let (first, users) = by_key
            .entry(&tensor.storage.key)
            .or_insert((tensor, Vec::new()));
        let (a, b) = (&first.storage, &tensor.storage);
        if a.element != b.element || a.elements != b.elements {
            return Err(format!(
                "tensors `{}` and `{}` share storage `{}` but see it as {} {} and {} {} \
                 elements",
                first.name,
                tensor.name,
                a.key,
                a.elements,
                a.element.dtype,
                b.elements,
                b.element.dtype
            ));
        }
        users.push(i);
    }
    let mut located = Vec::new();
    let mut stored = 0u64;
    for (key, (first, users)) in &by_key {
        let s = &first.storage;
        let bytes = s.elements.checked_mul(s.element.size);
        let (position, len) = storages
            .locate(key)
            .map_err(|e| format!("storage `{key}` of tensor `{}`: {e}", first.name))?;
        if bytes != Some(len) {
            return Err(format!(
                "storage `{key}` of tensor `{}` declares {} {} elements ({}), but its archive \
                 entry holds {len} bytes",
                first.name,
                s.elements,
                s.element.dtype,
                bytes.map_or("more than 2^64 bytes".into(), |b| format!("{b} bytes"))
            ));
        }
        stored += len;
        located.push((position, key.to_string(), len, users.clone()));
    }
    if stored > file_len {
        return Err(format!(
            "the storages add up to {stored} bytes, more than the file's {file_len}: the \
             archive's entries overlap"
        ));
    }
    located.sort();
    let mut viewed = 0u64;
    for tensor in &tensors {
        viewed = viewed.saturating_add(check_view(tensor)?);
    }
    if viewed > MAX_VIEW_FACTOR.saturating_mul(file_len) {
        return Err(format!(
            "the tensors view {viewed} bytes in all, more than {MAX_VIEW_FACTOR} times the \
             file's {file_len}: storages shared by too many tensors"
        ));
    }

    // safetensors' layout: widest elements first (so every tensor is aligned), then by name.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&tensors[a], &tensors[b]);
        (b.storage.element.size, &a.name).cmp(&(a.storage.element.size, &b.name))
    });
    let mut header = serde_json::Map::new();
    let mut ranges = vec![0..0; tensors.len()];
    let mut end = 0usize;
    for &i in &order {
        let t = &tensors[i];
        // Within `viewed`, which fits in memory's bounds checked above.
        let bytes = (elements(&t.shape).unwrap_or(0) * t.storage.element.size) as usize;
        ranges[i] = end..end + bytes;
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.storage.element.dtype,
                "shape": t.shape,
                "data_offsets": [end, end + bytes],
            }),
        );
        end += bytes;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    // Padded with spaces to 8 bytes, as safetensors writes it, so the data stays aligned.
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut head = (json.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&json);
    let data_start = head.len();
    let total = data_start + end;
    let mut slot_of = vec![0; tensors.len()];
    for (slot, &i) in order.iter().enumerate() {
        slot_of[i] = slot;
    }
    let mut tensors: Vec<Option<TensorRef>> = tensors.into_iter().map(Some).collect();
    let mut planned = Vec::with_capacity(tensors.len());
    for &i in &order {
        let range = ranges[i].start + data_start..ranges[i].end + data_start;
        let tensor = tensors[i].take().ok_or("a tensor laid out twice")?;
        planned.push((tensor, range));
    }
    let storages = located
        .into_iter()
        .map(|(_, key, len, users)| (key, len, users.iter().map(|&u| slot_of[u]).collect()))
        .collect();
    Ok(Plan {
        tensors: planned,
        header: head,
        storages,
        total,
    })
}

/// The product of `shape`, `None` on overflow.
fn elements(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
}

/// Checks that `tensor` stays inside its storage and views no more elements than it holds;
/// returns its size in bytes.
fn check_view(t: &TensorRef) -> Result<u64, String> {
    let s = &t.storage;
    let describe = || {
        format!(
            "tensor `{}`: shape {:?} (stride {:?}, offset {})",
            t.name, t.shape, t.stride, t.offset
        )
    };
    let holds = || {
        format!(
            "its storage `{}` holds {} {} elements ({} bytes)",
            s.key,
            s.elements,
            s.element.dtype,
            s.elements.saturating_mul(s.element.size)
        )
    };
    let Some(n) = elements(&t.shape) else {
        return Err(format!(
            "{} has more than 2^64 elements; {}",
            describe(),
            holds()
        ));
    };
    if n == 0 {
        if t.offset > s.elements {
            return Err(format!("{} starts past the end: {}", describe(), holds()));
        }
        return Ok(0);
    }
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |at, (&d, &s)| {
            at.checked_add((d - 1).checked_mul(s)?)
        });
    match last {
        Some(last) if last < s.elements => {}
        Some(last) => {
            return Err(format!(
                "{} reaches element {last}, but {}",
                describe(),
                holds()
            ));
        }
        None => {
            return Err(format!(
                "{} reaches past element 2^64, but {}",
                describe(),
                holds()
            ));
        }
    }
    if n > s.elements {
        return Err(format!(
            "{} views {n} elements (overlapping strides), more than {}",
            describe(),
            holds()
        ));
    }
    Ok(n * s.element.size)
}

#[cfg(test)]
thread_local! {
    /// Bytes [`fill`] allocated on this thread: tests check that refused files allocate none.
    static FILLED_BYTES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Allocates the output and reads every storage into the tensors that view it.
fn fill(plan: &Plan, storages: &mut impl Storages) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    out.try_reserve_exact(plan.total).map_err(|e| {
        format!(
            "cannot allocate the {} bytes of the tensors: {e}",
            plan.total
        )
    })?;
    #[cfg(test)]
    FILLED_BYTES.with(|n| n.set(n.get() + plan.total as u64));
    out.extend_from_slice(&plan.header);
    out.resize(plan.total, 0);
    let mut scratch = Vec::new();
    for (key, len, users) in &plan.storages {
        // The common case, one tensor viewing all of its storage in order, is read in place.
        if let [only] = users[..] {
            let (tensor, range) = &plan.tensors[only];
            if tensor.offset == 0
                && range.len() as u64 == *len
                && is_contiguous(&tensor.shape, &tensor.stride)
            {
                storages
                    .read(key, &mut out[range.clone()])
                    .map_err(|e| format!("storage `{key}` of tensor `{}`: {e}", tensor.name))?;
                continue;
            }
        }
        scratch.clear();
        scratch
            .try_reserve_exact(*len as usize)
            .map_err(|e| format!("cannot allocate storage `{key}` ({len} bytes): {e}"))?;
        scratch.resize(*len as usize, 0);
        storages
            .read(key, &mut scratch)
            .map_err(|e| format!("storage `{key}`: {e}"))?;
        for &user in users {
            let (tensor, range) = &plan.tensors[user];
            gather(&scratch, tensor, &mut out[range.clone()]);
        }
    }
    Ok(out)
}

/// Whether `stride` is the row-major stride of `shape` (dimensions of size 1 aside).
fn is_contiguous(shape: &[u64], stride: &[u64]) -> bool {
    let mut expected = 1u64;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Copies the elements `tensor` views in `storage` into `out`, in row-major order (bounds
/// checked by [`check_view`]).
fn gather(storage: &[u8], tensor: &TensorRef, out: &mut [u8]) {
    let size = tensor.storage.element.size as usize;
    let (shape, stride) = (&tensor.shape, &tensor.stride);
    let start = tensor.offset as usize * size;
    if out.is_empty() {
        return;
    }
    if is_contiguous(shape, stride) {
        out.copy_from_slice(&storage[start..start + out.len()]);
        return;
    }
    // An odometer over the indices, `at` the element the current index views.
    let rank = shape.len();
    let mut index = vec![0u64; rank];
    let mut at = tensor.offset;
    for chunk in out.chunks_exact_mut(size) {
        let from = at as usize * size;
        chunk.copy_from_slice(&storage[from..from + size]);
        for dim in (0..rank).rev() {
            index[dim] += 1;
            // Wrapping: one stride past the view's end can pass 2^64 for a size-1 dimension's
            // arbitrary stride; it is taken back before it is used.
            at = at.wrapping_add(stride[dim]);
            if index[dim] < shape[dim] {
                break;
            }
            at = at.wrapping_sub(stride[dim].wrapping_mul(shape[dim]));
            index[dim] = 0;
        }
    }
}

/// Reads a checkpoint in torch's legacy format (what `torch.save` wrote before 1.6, and still
/// writes with `_use_new_zipfile_serialization=False`): five pickles in a row — the magic
/// number, the protocol version (1001), the system information, the saved object and the
/// sorted list of its storage keys — then each storage in that order as an 8-byte element
/// count and its raw bytes. The object's pickle is bounded like a zip archive's `data.pkl`;
/// every storage's place is found by walking the counts, each checked against the file's end,
/// before any tensor byte is read.
pub fn read_legacy<R: Read + Seek>(reader: R, file_len: u64) -> Result<Vec<u8>, ReadError> {
    let (plan, mut storages) = legacy_plan(reader, file_len)?;
    Ok(fill(&plan, &mut storages)?)
}

/// A legacy checkpoint's tensors, checked against its storages.
fn legacy_plan<R: Read + Seek>(
    mut reader: R,
    file_len: u64,
) -> Result<(Plan, LegacyStorages<R>), ReadError> {
    let head_len = file_len.min(MAX_PICKLE_BYTES + LEGACY_PREAMBLE_BYTES);
    let capped = head_len < file_len;
    let mut head = Vec::new();
    head.try_reserve_exact(head_len as usize).map_err(|e| {
        format!("cannot allocate {head_len} bytes for the checkpoint's pickles: {e}")
    })?;
    reader
        .by_ref()
        .take(head_len)
        .read_to_end(&mut head)
        .map_err(ReadError::Io)?;
    let mut at = 0;
    let magic = legacy_pickle(&head, &mut at, capped, "magic number")?;
    if !matches!(magic.value(magic.root()), Value::BigInt { bytes: 10 })
        || !head[..at]
            .windows(LEGACY_MAGIC.len())
            .any(|w| w == LEGACY_MAGIC)
    {
        return Err(format!(
            "not a readable PyTorch checkpoint: it starts like torch's legacy format, but its \
             first pickle is {}, not torch's magic number; {FORMATS}",
            magic.describe(magic.root())
        )
        .into());
    }
    let version = legacy_pickle(&head, &mut at, capped, "protocol version")?;
    if version.int(version.root()) != Some(LEGACY_PROTOCOL) {
        return Err(format!(
            "a legacy PyTorch checkpoint of protocol version {}; torch wrote only \
             {LEGACY_PROTOCOL}",
            version.describe(version.root())
        )
        .into());
    }
    let info = legacy_pickle(&head, &mut at, capped, "system information")?;
    let little_endian = info
        .dict_get(info.root(), "little_endian")
        .map(|id| info.value(id));
    if !matches!(little_endian, Some(Value::Bool(true))) {
        return Err(String::from(
            "the legacy checkpoint does not say it was written on a little-endian machine \
             (its system information); sdstream reads little-endian checkpoints",
        )
        .into());
    }
    let object = legacy_pickle(&head, &mut at, capped, "saved object")?;
    let list = legacy_pickle(&head, &mut at, capped, "list of storages")?;
    let keys: Vec<&str> = match list.value(list.root()) {
        Value::List(items) if items.len() <= MAX_ENTRIES => items
            .iter()
            .map(|&id| {
                list.str(id)
                    .ok_or_else(|| format!("its list of storages holds {}", list.describe(id)))
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(format!(
                "the legacy checkpoint's list of storages is {}, not a list of at most \
                 {MAX_ENTRIES} keys",
                list.describe(list.root())
            )
            .into());
        }
    };
    // Every storage's element size, from the persistent ids that name it.
    let mut element_size = HashMap::new();
    for pid in object.persistent_ids() {
        if let Ok(storage) = storage_of(&object, pid) {
            element_size.insert(storage.key, storage.element.size);
        }
    }
    let mut located = HashMap::new();
    let mut position = at as u64;
    for key in keys {
        let size = *element_size.get(key).ok_or_else(|| {
            format!("the legacy checkpoint lists storage `{key}`, but no tensor names its type")
        })?;
        let left = file_len.saturating_sub(position);
        if left < 8 {
            return Err(format!(
                "storage `{key}`: the file ends {left} bytes after the previous storage, \
                 before this one's 8-byte length: truncated"
            )
            .into());
        }
        reader
            .seek(SeekFrom::Start(position))
            .map_err(ReadError::Io)?;
        let mut word = [0u8; 8];
        reader.read_exact(&mut word).map_err(ReadError::Io)?;
        let elements = u64::from_le_bytes(word);
        let len = elements
            .checked_mul(size)
            .filter(|&len| len <= left - 8)
            .ok_or_else(|| {
                format!(
                    "storage `{key}` declares {elements} elements of {size} bytes, but only {} \
                     bytes follow: truncated or corrupt",
                    left - 8
                )
            })?;
        if located
            .insert(key.to_string(), (position + 8, len))
            .is_some()
        {
            return Err(format!("the legacy checkpoint lists storage `{key}` twice").into());
        }
        position += 8 + len;
    }
    if position != file_len {
        return Err(format!(
            "{} bytes follow the legacy checkpoint's last storage: not a file torch.save wrote",
            file_len - position
        )
        .into());
    }
    let tensors = state_dict_tensors(&object)?;
    drop((object, list, head));
    let mut storages = LegacyStorages { reader, located };
    let plan = plan(tensors, &mut storages, file_len)?;
    Ok((plan, storages))
}

/// The next of a legacy checkpoint's pickles, from `head[*at..]`; `capped` when `head` is not
/// the whole file.
fn legacy_pickle(head: &[u8], at: &mut usize, capped: bool, what: &str) -> Result<Pickle, String> {
    let p = pickle::parse(&head[*at..]).map_err(|e| {
        if capped && e.ran_out {
            format!(
                "the legacy checkpoint's {what} does not end within its first {} bytes (a \
                 state dict's pickle takes at most {MAX_PICKLE_BYTES})",
                head.len()
            )
        } else {
            format!(
                "not a readable PyTorch checkpoint (the legacy format's {what}, {e}); {FORMATS}"
            )
        }
    })?;
    *at += p.consumed();
    Ok(p)
}

/// The storages of a legacy checkpoint, where [`read_legacy`] found them.
struct LegacyStorages<R> {
    reader: R,
    /// Each storage's first byte and length.
    located: HashMap<String, (u64, u64)>,
}

impl<R: Read + Seek> Storages for LegacyStorages<R> {
    fn locate(&mut self, key: &str) -> Result<(u64, u64), String> {
        self.located
            .get(key)
            .copied()
            .ok_or_else(|| "the checkpoint's list of storages does not name it".into())
    }

    fn read(&mut self, key: &str, out: &mut [u8]) -> Result<(), String> {
        let (position, _) = self.locate(key)?;
        self.reader
            .seek(SeekFrom::Start(position))
            .and_then(|_| self.reader.read_exact(out))
            .map_err(|e| e.to_string())
    }

    fn data_start(&mut self, key: &str) -> Result<(u64, Option<u32>), String> {
        // The legacy format records no checksum.
        Ok((self.locate(key)?.0, None))
    }
}

/// torch's zip archive: `<name>/data.pkl` and the storages `<name>/data/<key>`.
struct ZipStorages<R: Read + Seek> {
    zip: zip::ZipArchive<R>,
    /// `<name>/`, the folder of `data.pkl`.
    prefix: String,
    pickle: usize,
    file_len: u64,
}

impl<R: Read + Seek> ZipStorages<R> {
    fn open(reader: R, file_len: u64) -> Result<Self, String> {
        let zip =
            zip::ZipArchive::new(reader).map_err(|e| format!("{NOT_ZIP}: {e}); {FORMATS}"))?;
        if zip.len() > MAX_ENTRIES {
            return Err(format!(
                "not a readable PyTorch checkpoint: its archive has {} entries (at most \
                 {MAX_ENTRIES})",
                zip.len()
            ));
        }
        let mut records = Vec::new();
        for (i, name) in zip.file_names().enumerate() {
            let name =
                name.map_err(|e| format!("not a readable PyTorch checkpoint (entry {i}: {e})"))?;
            if name == "data.pkl" || name.ends_with("/data.pkl") {
                records.push((i, name.to_string()));
            }
        }
        let (pickle, name) = match &records[..] {
            [one] => one.clone(),
            [] => {
                return Err(format!(
                    "not a readable PyTorch checkpoint: the zip archive holds no data.pkl; \
                     {FORMATS}"
                ));
            }
            _ => {
                return Err(format!(
                    "not a readable PyTorch checkpoint: the zip archive holds {} data.pkl \
                     records ({}, ...); torch.save writes one",
                    records.len(),
                    records[0].1
                ));
            }
        };
        let prefix = name[..name.len() - "data.pkl".len()].to_string();
        let mut archive = Self {
            zip,
            prefix,
            pickle,
            file_len,
        };
        archive.check_byteorder()?;
        Ok(archive)
    }

    /// torch writes `byteorder` (`little` or `big`) since 1.10; older files are little-endian.
    fn check_byteorder(&mut self) -> Result<(), String> {
        let name = format!("{}byteorder", self.prefix);
        let Some(index) = self.zip.index_for_name_raw(name.as_bytes()) else {
            return Ok(());
        };
        let mut order = Vec::new();
        self.zip
            .by_index(index)
            .and_then(|f| Ok(f.take(16).read_to_end(&mut order)?))
            .map_err(|e| format!("not a readable PyTorch checkpoint ({name}: {e})"))?;
        if order != b"little" {
            return Err(format!(
                "the checkpoint's byteorder is {:?}; sdstream reads little-endian checkpoints",
                String::from_utf8_lossy(&order)
            ));
        }
        Ok(())
    }

    /// `data.pkl`, read whole (bounded by [`MAX_PICKLE_BYTES`]).
    fn read_pickle(&mut self) -> Result<Vec<u8>, String> {
        let bad = |e: String| format!("not a readable PyTorch checkpoint (its data.pkl: {e})");
        let file = self
            .zip
            .by_index(self.pickle)
            .map_err(|e| bad(e.to_string()))?;
        let len = stored_len(&file, self.file_len).map_err(bad)?;
        if len > MAX_PICKLE_BYTES {
            return Err(bad(format!(
                "{len} bytes, more than the {MAX_PICKLE_BYTES} a state dict's pickle takes"
            )));
        }
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(len as usize)
            .map_err(|e| bad(e.to_string()))?;
        // One byte more than declared: a longer entry is corrupt; reading to the end checks
        // the entry's CRC.
        file.take(len + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(e.to_string()))?;
        if bytes.len() as u64 != len {
            return Err(bad(format!(
                "{} bytes where the archive declares {len}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    fn storage_index(&self, key: &str) -> Option<usize> {
        let name = format!("{}data/{key}", self.prefix);
        self.zip.index_for_name_raw(name.as_bytes())
    }
}

/// The length of a stored (uncompressed, unencrypted) entry that fits in the file.
fn stored_len<R: Read>(file: &zip::read::ZipFile<'_, R>, file_len: u64) -> Result<u64, String> {
    if file.compression() != zip::CompressionMethod::Stored || file.encrypted() {
        return Err(format!(
            "the entry is compressed ({}) or encrypted; torch.save stores its entries as they are",
            file.compression()
        ));
    }
    let len = file.size();
    if len != file.compressed_size() || len > file_len {
        return Err(format!(
            "the archive declares {len} bytes for an entry of a {file_len}-byte file"
        ));
    }
    Ok(len)
}

impl<R: Read + Seek> Storages for ZipStorages<R> {
    fn locate(&mut self, key: &str) -> Result<(u64, u64), String> {
        let index = self
            .storage_index(key)
            .ok_or_else(|| format!("the archive has no entry {}data/{key}", self.prefix))?;
        let file = self.zip.by_index(index).map_err(|e| e.to_string())?;
        let len = stored_len(&file, self.file_len)?;
        Ok((index as u64, len))
    }

    fn read(&mut self, key: &str, out: &mut [u8]) -> Result<(), String> {
        let index = self.storage_index(key).ok_or("no longer in the archive")?;
        let mut file = self.zip.by_index(index).map_err(|e| e.to_string())?;
        file.read_exact(out).map_err(|e| e.to_string())?;
        // Reading on to the end checks the entry's CRC (and that nothing follows).
        let mut rest = [0u8; 1];
        if file.read(&mut rest).map_err(|e| e.to_string())? != 0 {
            return Err("the entry holds more bytes than its header declares".into());
        }
        Ok(())
    }

    fn data_start(&mut self, key: &str) -> Result<(u64, Option<u32>), String> {
        let index = self.storage_index(key).ok_or("no longer in the archive")?;
        let file = self.zip.by_index(index).map_err(|e| e.to_string())?;
        stored_len(&file, self.file_len)?;
        let start = file
            .data_start()
            .ok_or("the archive does not say where the entry's data starts")?;
        Ok((start, Some(file.crc32())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::{Cursor, Write};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

    /// A pickle written opcode by opcode.
    #[derive(Clone)]
    struct P(Vec<u8>);

    impl P {
        fn new() -> Self {
            P(vec![0x80, 2])
        }

        fn raw(mut self, bytes: &[u8]) -> Self {
            self.0.extend_from_slice(bytes);
            self
        }

        fn str(self, s: &str) -> Self {
            let len = (s.len() as u32).to_le_bytes();
            self.raw(b"X").raw(&len).raw(s.as_bytes())
        }

        fn int(self, i: i64) -> Self {
            match i32::try_from(i) {
                Ok(i) => self.raw(b"J").raw(&i.to_le_bytes()),
                Err(_) => self.raw(&[0x8a, 8]).raw(&i.to_le_bytes()),
            }
        }

        fn global(self, module: &str, name: &str) -> Self {
            self.raw(format!("c{module}\n{name}\n").as_bytes())
        }

        fn ints(self, values: &[i64]) -> Self {
            values
                .iter()
                .fold(self.raw(b"("), |p, &v| p.int(v))
                .raw(b"t")
        }

        /// `(storage, offset, shape, stride, False, OrderedDict())`, the arguments of
        /// `_rebuild_tensor_v2`.
        fn view_args(
            self,
            class: &str,
            key: &str,
            elements: i64,
            offset: i64,
            shape: &[i64],
            stride: &[i64],
        ) -> Self {
            self.raw(b"((")
                .str("storage")
                .global("torch", class)
                .str(key)
                .str("cpu")
                .int(elements)
                .raw(b"tQ")
                .int(offset)
                .ints(shape)
                .ints(stride)
                .raw(&[0x89])
                .global("collections", "OrderedDict")
                .raw(b")Rt")
        }

        /// Pushes `_rebuild_tensor_v2(...)` of a view of storage `key`.
        fn tensor(
            self,
            class: &str,
            key: &str,
            elements: i64,
            offset: i64,
            shape: &[i64],
            stride: &[i64],
        ) -> Self {
            self.global("torch._utils", "_rebuild_tensor_v2")
                .view_args(class, key, elements, offset, shape, stride)
                .raw(b"R")
        }
    }

    /// `OrderedDict` with the items `items` pushes (key, value, key, value, ...).
    fn state_dict(items: impl FnOnce(P) -> P) -> Vec<u8> {
        let p = P::new().global("collections", "OrderedDict").raw(b")R(");
        items(p).raw(b"u.").0
    }

    /// torch.save's archive around `pickle` and the storages `storages`.
    fn archive(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        let mut add = |name: &str, bytes: &[u8]| {
            zip.start_file(format!("archive/{name}"), stored).unwrap();
            zip.write_all(bytes).unwrap();
        };
        add("data.pkl", pickle);
        add("byteorder", b"little");
        for (key, bytes) in storages {
            add(&format!("data/{key}"), bytes);
        }
        add("version", b"3\n");
        zip.finish().unwrap().into_inner()
    }

    fn f32s(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// The archive's reading in memory, checked against its mapped reading ([`agree`]).
    fn read(file: &[u8]) -> Result<Vec<u8>, ReadError> {
        let result = read_archive(Cursor::new(file), file.len() as u64);
        agree(file, &result);
        result
    }

    /// `file`'s mapped reading ([`map_checkpoint`], from a temporary file), as [`Tensors`];
    /// also how many bytes it copied.
    fn mapped(file: &[u8]) -> Result<(Tensors, usize), ReadError> {
        static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "sdstream-torch-file-{}-{n}.bin",
            std::process::id()
        ));
        std::fs::write(&path, file).unwrap();
        let result = map_checkpoint(&path).map(|c| {
            let tensors = c
                .tensors
                .iter()
                .map(|t| {
                    let bytes = c.bytes(t).to_vec();
                    (
                        t.name.clone(),
                        (t.dtype.to_string(), t.shape.clone(), bytes),
                    )
                })
                .collect();
            (tensors, c.copies.iter().map(Vec::len).sum())
        });
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Both readings of `file` agree: the same tensors, or both refuse it.
    fn agree(file: &[u8], read: &Result<Vec<u8>, ReadError>) {
        match (read, mapped(file)) {
            (Ok(bytes), Ok((got, _))) => assert_eq!(got, tensors(bytes)),
            (Err(_), Err(_)) => {}
            (Ok(_), Err(e)) => panic!("the mapped reading refused what was read: {e:?}"),
            (Err(e), Ok(_)) => panic!("the mapped reading read what was refused ({e:?})"),
        }
    }

    /// Name → (dtype, shape, bytes) of safetensors bytes.
    type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

    fn tensors(safetensors: &[u8]) -> Tensors {
        let st = safetensors::SafeTensors::deserialize(safetensors).expect("valid safetensors");
        st.tensors()
            .into_iter()
            .map(|(name, view)| {
                let dtype = view.dtype().to_string();
                (name, (dtype, view.shape().to_vec(), view.data().to_vec()))
            })
            .collect()
    }

    fn refused(file: &[u8]) -> String {
        match read(file) {
            Err(ReadError::Invalid(detail)) => detail,
            Err(ReadError::Io(e)) => panic!("an I/O error: {e}"),
            Ok(bytes) => panic!("read {} tensors", tensors(&bytes).len()),
        }
    }

    fn filled() -> u64 {
        FILLED_BYTES.with(std::cell::Cell::get)
    }

    /// What candle's reader gave, looked up as `WeightsFile::open_pytorch` used to.
    fn candle_tensors(path: &Path) -> Tensors {
        use safetensors::View;
        let convert = |found: Vec<(String, candle_core::Tensor)>, prefix: &str| -> Tensors {
            found
                .into_iter()
                .map(|(name, t)| {
                    let dtype = View::dtype(&t).to_string();
                    let value = (dtype, t.dims().to_vec(), t.data().to_vec());
                    (format!("{prefix}{name}"), value)
                })
                .collect()
        };
        for key in [None, Some("state_dict"), Some("params_ema"), Some("params")] {
            if let Ok(found) = candle_core::pickle::read_all_with_key(path, key)
                && !found.is_empty()
            {
                return convert(found, "");
            }
        }
        let mut all = Tensors::new();
        for section in NESTED_SECTIONS {
            if let Ok(found) = candle_core::pickle::read_all_with_key(path, Some(section)) {
                all.extend(convert(found, &format!("{section}.")));
            }
        }
        all
    }

    #[test]
    fn every_fixture_checkpoint_reads_to_the_tensors_candles_reader_gave() {
        let fixtures = [
            "model-root/ai-forever/Real-ESRGAN/RealESRGAN_x2.pth",
            "model-root/lllyasviel/Annotators/ControlNetHED.pth",
            "model-root/lllyasviel/Annotators/sk_model.pth",
            "model-root/lllyasviel/Annotators/sk_model2.pth",
            "model-root/h94/IP-Adapter/models/ip-adapter_sd15.bin",
            "model-root/h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.bin",
            "safety-checker-bin/pytorch_model.bin",
        ];
        for fixture in fixtures {
            let path = Path::new(FIXTURES).join(fixture);
            let ours = tensors(&read_as_safetensors(&path).expect(fixture));
            let theirs = candle_tensors(&path);
            assert!(!theirs.is_empty(), "{fixture}");
            assert_eq!(
                ours.keys().collect::<Vec<_>>(),
                theirs.keys().collect::<Vec<_>>(),
                "{fixture}"
            );
            for (name, (dtype, shape, bytes)) in &theirs {
                let (our_dtype, our_shape, our_bytes) = &ours[name];
                assert_eq!((our_dtype, our_shape), (dtype, shape), "{fixture} {name}");
                assert!(our_bytes == bytes, "{fixture} {name}: bytes differ");
            }
            let bytes: usize = ours.values().map(|t| t.2.len()).sum();
            println!(
                "{fixture}: {} tensors, {bytes} bytes, as candle's",
                ours.len()
            );
        }
    }

    /// Every PyTorch checkpoint under tests/fixtures (both formats, the published layouts'
    /// `.bin`/`.pth`/`.ckpt` files, the single files, the shards).
    fn fixture_checkpoints() -> Vec<std::path::PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let is_dir = std::fs::metadata(&path).is_ok_and(|m| m.is_dir());
                let name = path.to_string_lossy().into_owned();
                if is_dir && !name.ends_with("/frame") {
                    walk(&path, out);
                } else if [".bin", ".pth", ".ckpt", ".pt"]
                    .iter()
                    .any(|e| name.ends_with(e))
                {
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(Path::new(FIXTURES), &mut out);
        out.sort();
        out
    }

    #[test]
    fn mapped_checkpoints_read_what_the_rewriting_reads_without_copying() {
        let files = fixture_checkpoints();
        assert!(files.len() >= 20, "{} checkpoints", files.len());
        let (mut total, mut copied_views) = (0usize, 0usize);
        for path in &files {
            let shown = path.strip_prefix(FIXTURES).unwrap_or(path).display();
            let rewritten = tensors(&read_as_safetensors(path).expect("reads"));
            let bytes = std::fs::read(path).unwrap();
            let (mapped, copied) = mapped(&bytes).expect("maps");
            assert_eq!(mapped, rewritten, "{shown}");
            // Only views that are not one run of the file are copied: the legacy fixture's
            // transposed tensor (5×6 f32); every other tensor is read where it lies.
            let expected = if shown.to_string().ends_with("torch-legacy/mixed.pth") {
                copied_views += 1;
                5 * 6 * 4
            } else {
                0
            };
            assert_eq!(copied, expected, "{shown}");
            total += mapped.len();
        }
        println!(
            "{} checkpoints, {total} tensors: the same as rewritten, {copied_views} view copied",
            files.len()
        );
        assert_eq!(copied_views, 1);
    }

    #[test]
    fn a_mapped_storage_whose_crc_differs_is_refused() {
        let two = f32s(&[1.0, 2.0]);
        let pickle = state_dict(|p| p.str("w").tensor("FloatStorage", "0", 2, 0, &[2], &[1]));
        let mut file = archive(&pickle, &[("0", &two)]);
        assert_eq!(mapped(&file).expect("maps").0.len(), 1);
        let at = file.windows(8).position(|b| b == &two[..]).unwrap();
        file[at] ^= 1;
        match mapped(&file) {
            Err(ReadError::Invalid(e)) => {
                assert!(e.contains("CRC-32") && e.contains("storage `0`"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn views_of_shared_storages_read_element_for_element() {
        let storage: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let halves: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let longs: Vec<u8> = [7i64, -9].iter().flat_map(|v| v.to_le_bytes()).collect();
        let pickle = state_dict(|p| {
            p.str("all")
                .tensor("FloatStorage", "0", 12, 0, &[3, 4], &[4, 1])
                .str("part")
                .tensor("FloatStorage", "0", 12, 2, &[2], &[1])
                .str("transposed")
                .tensor("FloatStorage", "0", 12, 0, &[4, 3], &[1, 4])
                .str("strided")
                .tensor("FloatStorage", "0", 12, 1, &[2, 2], &[6, 2])
                .str("empty")
                .tensor("FloatStorage", "0", 12, 0, &[0, 5], &[5, 1])
                .str("scalar")
                .tensor("FloatStorage", "0", 12, 5, &[], &[])
                // _rebuild_parameter(_rebuild_tensor_v2(...), True, OrderedDict())
                .str("param")
                .global("torch._utils", "_rebuild_parameter")
                .raw(b"(")
                .tensor("HalfStorage", "1", 2, 0, &[2], &[1])
                .raw(&[0x88])
                .global("collections", "OrderedDict")
                .raw(b")Rt")
                .raw(b"R")
                // _rebuild_from_type_v2(_rebuild_tensor_v2, Parameter, (args), {})
                .str("typed")
                .global("torch._tensor", "_rebuild_from_type_v2")
                .raw(b"(")
                .global("torch._utils", "_rebuild_tensor_v2")
                .global("torch.nn.parameter", "Parameter")
                .view_args("LongStorage", "2", 2, 0, &[2], &[1])
                .raw(b"}t")
                .raw(b"R")
                // A value that is no tensor is left out.
                .str("epoch")
                .int(3)
        });
        let file = archive(
            &pickle,
            &[("0", &f32s(&storage)), ("1", &halves), ("2", &longs)],
        );
        let got = tensors(&read(&file).unwrap());
        let f32_of = |name: &str| -> (Vec<usize>, Vec<f32>) {
            let (dtype, shape, bytes) = &got[name];
            assert_eq!(dtype, "F32", "{name}");
            let values = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (shape.clone(), values)
        };
        assert_eq!(f32_of("all"), (vec![3, 4], storage.clone()));
        assert_eq!(f32_of("part"), (vec![2], vec![2.0, 3.0]));
        let transposed: Vec<f32> = (0..4)
            .flat_map(|i| (0..3).map(move |j| (i + 4 * j) as f32))
            .collect();
        assert_eq!(f32_of("transposed"), (vec![4, 3], transposed));
        assert_eq!(f32_of("strided"), (vec![2, 2], vec![1.0, 3.0, 7.0, 9.0]));
        assert_eq!(f32_of("empty"), (vec![0, 5], vec![]));
        assert_eq!(f32_of("scalar"), (vec![], vec![5.0]));
        assert_eq!(got["param"], ("F16".into(), vec![2], halves));
        assert_eq!(got["typed"], ("I64".into(), vec![2], longs));
        assert_eq!(got.len(), 8, "{:?}", got.keys());
    }

    #[test]
    fn protocol_4_opcodes_read_like_protocol_2() {
        // FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL, BINGET of a memoized storage id.
        let short = |p: P, s: &str| p.raw(&[0x8c, s.len() as u8]).raw(s.as_bytes());
        let sg = |p: P, m: &str, n: &str| short(short(p, m), n).raw(&[0x93, 0x94]);
        let mut p = P::new().raw(&[0x95]).raw(&0u64.to_le_bytes());
        p = sg(p, "collections", "OrderedDict")
            .raw(b")R")
            .raw(&[0x94])
            .raw(b"(");
        p = short(p, "w");
        p = sg(p, "torch._utils", "_rebuild_tensor_v2");
        p = short(p.raw(b"(("), "storage");
        p = sg(p, "torch", "FloatStorage");
        p = short(short(p, "0"), "cpu")
            .int(3)
            .raw(b"t")
            .raw(&[0x94])
            .raw(b"Q");
        p = p
            .int(0)
            .ints(&[3])
            .ints(&[1])
            .raw(&[0x89])
            .raw(b"N")
            .raw(b"tR");
        let pickle = p.raw(b"u.").0;
        let file = archive(&pickle, &[("0", &f32s(&[1.0, 2.0, 3.0]))]);
        let got = tensors(&read(&file).unwrap());
        assert_eq!(got["w"], ("F32".into(), vec![3], f32s(&[1.0, 2.0, 3.0])));
    }

    #[test]
    fn a_shape_beyond_its_storage_is_refused_naming_both_before_any_allocation() {
        // The finding: 2^18 × 2^18 floats (256 GiB) over a 4-element storage.
        let side = 1 << 18;
        let four = f32s(&[1.0, 2.0, 3.0, 4.0]);
        let pickle = state_dict(|p| {
            p.str("w")
                .tensor("FloatStorage", "0", 4, 0, &[side, side], &[side, 1])
        });
        let file = archive(&pickle, &[("0", &four)]);
        println!("huge shape: a {}-byte file", file.len());
        assert!(file.len() < 1024);
        let before = filled();
        let err = refused(&file);
        assert!(
            err.contains("tensor `w`: shape [262144, 262144]")
                && err.contains("reaches element 68719476735")
                && err.contains("storage `0` holds 4 F32 elements (16 bytes)"),
            "{err}"
        );
        // Through the weights loader, as a network's file: refused naming the file.
        let path = std::env::temp_dir().join(format!("sdstream-huge-{}.pth", std::process::id()));
        std::fs::write(&path, &file).unwrap();
        let err = super::super::weights::WeightsFile::open(&path)
            .expect_err("refused")
            .to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("tensor `w`: shape"),
            "{err}"
        );

        // The storage itself declares 2^36 elements, over a 16-byte entry.
        let pickle = state_dict(|p| {
            p.str("w")
                .tensor("FloatStorage", "0", 1 << 36, 0, &[side, side], &[side, 1])
        });
        let err = refused(&archive(&pickle, &[("0", &four)]));
        assert!(
            err.contains(
                "storage `0` of tensor `w` declares 68719476736 F32 elements \
                          (274877906944 bytes), but its archive entry holds 16 bytes"
            ),
            "{err}"
        );

        // Stride 0 repeats the 4 elements: inside the storage, but 2^36 of them.
        let pickle = state_dict(|p| {
            p.str("w")
                .tensor("FloatStorage", "0", 4, 0, &[side, side], &[0, 0])
        });
        let err = refused(&archive(&pickle, &[("0", &four)]));
        assert!(err.contains("views 68719476736 elements"), "{err}");

        // Sizes whose product or extent overflows 64 bits.
        let cases: [(&[i64], &[i64], i64, &str); 3] = [
            (&[1 << 62, 8], &[8, 1], 0, "more than 2^64 elements"),
            (
                &[3, 1],
                &[i64::MAX, 1],
                i64::MAX,
                "reaches past element 2^64",
            ),
            (&[2], &[-1], 0, "stride holds the int -1, not a count"),
        ];
        for (shape, stride, offset, what) in cases {
            let pickle = state_dict(|p| {
                p.str("w")
                    .tensor("FloatStorage", "0", 4, offset, shape, stride)
            });
            let err = refused(&archive(&pickle, &[("0", &four)]));
            assert!(err.contains("tensor `w`") && err.contains(what), "{err}");
        }
        assert_eq!(filled(), before, "nothing allocated for refused files");
    }

    #[test]
    fn storages_shared_by_too_many_names_are_refused_before_allocation() {
        // 2,000 names for one 4 KiB storage: 8 MB from a file of about 30 KB.
        let storage = f32s(&[0.5; 1024]);
        let pickle = state_dict(|mut p| {
            p = p
                .str("w0")
                .tensor("FloatStorage", "0", 1024, 0, &[1024], &[1])
                .raw(b"r")
                .raw(&7777u32.to_le_bytes());
            for i in 1..2000 {
                p = p
                    .str(&format!("w{i}"))
                    .raw(b"j")
                    .raw(&7777u32.to_le_bytes());
            }
            p
        });
        let file = archive(&pickle, &[("0", &storage)]);
        let before = filled();
        let err = refused(&file);
        assert!(
            err.contains("the tensors view 8192000 bytes in all, more than 4 times"),
            "{err}"
        );
        assert_eq!(filled(), before);
        println!(
            "2,000 views of one storage: {} bytes refused: {err}",
            file.len()
        );
    }

    #[test]
    fn more_tensors_than_the_bound_are_refused() {
        // One zero-element tensor under 65,537 names (memo fetches of the same call).
        let pickle = state_dict(|mut p| {
            p = p
                .str("t0")
                .tensor("FloatStorage", "0", 0, 0, &[0], &[1])
                .raw(b"r")
                .raw(&7777u32.to_le_bytes());
            for i in 1..=MAX_TENSORS {
                p = p
                    .str(&format!("t{i}"))
                    .raw(b"j")
                    .raw(&7777u32.to_le_bytes());
            }
            p
        });
        let err = refused(&archive(&pickle, &[("0", &[])]));
        assert!(
            err.contains("more than 65536 tensors in the state dict (`t65536` is one more)"),
            "{err}"
        );
    }

    #[test]
    fn nesting_100000_deep_is_refused_on_a_small_stack() {
        let n = 100_000;
        let head = [0x80u8, 2];
        // [[[...]]] through APPEND, ((((...: MARKs, and (((),),): TUPLE1, each ~200 KB or less.
        let cases: [(&str, Vec<u8>, usize); 3] = [
            (
                "lists",
                [&head[..], &vec![b']'; n], &vec![b'a'; n - 1], b"."].concat(),
                n + 2 + 99,
            ),
            (
                "marks",
                [&head[..], &vec![b'('; n], b")", &vec![b't'; n], b"."].concat(),
                2 + 100,
            ),
            (
                "tuples",
                [&head[..], b")", &vec![0x85; n], b"."].concat(),
                3 + 99,
            ),
        ];
        // No recursion: 256 KiB of stack is enough for the reader, however deep the input.
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                for (what, pickle, offset) in cases {
                    let err = pickle::parse(&pickle).unwrap_err();
                    assert_eq!(err.offset, offset, "{what}: {err}");
                    assert!(err.what.contains("deeper than 100 levels"), "{what}: {err}");
                    let detail = refused(&archive(&pickle, &[]));
                    assert!(
                        detail.contains("deeper than 100 levels"),
                        "{what}: {detail}"
                    );
                    println!("{what}: {} bytes refused: {detail}", pickle.len());
                }
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
    }

    /// Pushes a list that holds the previous level twice, `levels` times over: unpickled by
    /// copying, 2^levels lists.
    fn memo_bomb(p: P, levels: u32) -> P {
        let key = |p: P, op: u8, k: u32| p.raw(&[op]).raw(&(1000 + k).to_le_bytes());
        let mut p = key(p.raw(b"]"), b'r', 0);
        for level in 0..levels {
            p = key(key(p.raw(b"]("), b'j', level), b'j', level);
            p = key(p.raw(b"e"), b'r', level + 1);
        }
        p
    }

    #[test]
    fn a_memo_bomb_costs_one_value_per_level() {
        let levels = 40;
        let bomb = memo_bomb(P::new(), levels).raw(b".").0;
        let pickle = pickle::parse(&bomb).unwrap();
        // PROTO, EMPTY_LIST + LONG_BINPUT, six opcodes a level, STOP; one list a level.
        assert_eq!(pickle.ops(), 1 + 2 + 6 * u64::from(levels) + 1);
        assert_eq!(pickle.nodes(), 1 + levels as usize);
        assert_eq!(pickle.depth(pickle.root()), levels + 1);
        println!(
            "memo bomb, {levels} levels ({} bytes, 2^{levels} lists unpickled by copying): {} \
             opcodes, {} values",
            bomb.len(),
            pickle.ops(),
            pickle.nodes()
        );

        // Beside a tensor in a state dict, it is read past and left out.
        let pickle = state_dict(|p| {
            memo_bomb(p.str("bomb"), levels)
                .str("w")
                .tensor("FloatStorage", "0", 2, 0, &[2], &[1])
        });
        let got = tensors(&read(&archive(&pickle, &[("0", &f32s(&[1.0, 2.0]))])).unwrap());
        assert_eq!(got.keys().collect::<Vec<_>>(), ["w"]);
        assert_eq!(got["w"].2, f32s(&[1.0, 2.0]));

        // Deeper than the nesting bound, it is refused.
        let deep = memo_bomb(P::new(), 200).raw(b".").0;
        let err = pickle::parse(&deep).unwrap_err();
        assert!(err.what.contains("deeper than 100 levels"), "{err}");
    }

    #[test]
    fn pickled_code_is_recorded_never_run() {
        let marker =
            std::env::temp_dir().join(format!("sdstream-pickle-ran-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let shell = format!("touch {}", marker.display());
        let python = format!("open({:?}, 'w')", marker.display().to_string());
        let pickle = state_dict(|p| {
            p.str("system")
                .global("os", "system")
                .str(&shell)
                .raw(&[0x85])
                .raw(b"R")
                .str("eval")
                .global("builtins", "eval")
                .str(&python)
                .raw(&[0x85])
                .raw(b"R")
                .str("stack_global")
                .raw(&[0x8c, 5])
                .raw(b"posix")
                .raw(&[0x8c, 6])
                .raw(b"system")
                .raw(&[0x93])
                .str(&shell)
                .raw(&[0x85])
                .raw(b"R")
                .str("w")
                .tensor("FloatStorage", "0", 1, 0, &[1], &[1])
        });
        let got = tensors(&read(&archive(&pickle, &[("0", &f32s(&[1.0]))])).unwrap());
        assert_eq!(got.keys().collect::<Vec<_>>(), ["w"]);

        // The whole pickle a call of os.system: nothing to read.
        let root = P::new()
            .global("os", "system")
            .str(&shell)
            .raw(&[0x85])
            .raw(b"R.");
        let err = refused(&archive(&root.0, &[]));
        assert!(err.contains("no tensors found"), "{err}");

        // A parameter whose data is a call of eval is refused, naming it.
        let pickle = state_dict(|p| {
            p.str("w")
                .global("torch._utils", "_rebuild_parameter")
                .raw(b"(")
                .global("builtins", "eval")
                .str(&python)
                .raw(&[0x85])
                .raw(b"R")
                .raw(&[0x88])
                .raw(b"Nt")
                .raw(b"R")
        });
        let err = refused(&archive(&pickle, &[]));
        assert!(
            err.contains("tensor `w`: rebuilt by the global builtins.eval"),
            "{err}"
        );
        assert!(!marker.exists(), "pickled code ran");
    }

    #[test]
    fn malformed_archives_and_tensors_are_refused_naming_what_is_wrong() {
        let w = |class: &str, elements: i64| {
            state_dict(|p| p.str("w").tensor(class, "0", elements, 0, &[2], &[1]))
        };
        let two = f32s(&[1.0, 2.0]);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "garbage",
                b"not a zip archive at all".to_vec(),
                "not a zip archive",
            ),
            (
                "no storage",
                archive(&w("FloatStorage", 2), &[]),
                "storage `0` of tensor `w`: the archive has no entry archive/data/0",
            ),
            (
                "short storage",
                archive(&w("FloatStorage", 2), &[("0", &two[..4])]),
                "declares 2 F32 elements (8 bytes), but its archive entry holds 4 bytes",
            ),
            (
                "unknown storage type",
                archive(&w("ComplexFloatStorage", 1), &[("0", &two)]),
                "tensor `w`: its storage type is the global torch.ComplexFloatStorage",
            ),
            (
                "twice",
                archive(
                    &state_dict(|p| {
                        p.str("w")
                            .tensor("FloatStorage", "0", 2, 0, &[2], &[1])
                            .str("w")
                            .tensor("FloatStorage", "0", 2, 0, &[2], &[1])
                    }),
                    &[("0", &two)],
                ),
                "tensor `w` appears twice",
            ),
            (
                "two views of a storage",
                archive(
                    &state_dict(|p| {
                        p.str("a")
                            .tensor("FloatStorage", "0", 2, 0, &[2], &[1])
                            .str("b")
                            .tensor("HalfStorage", "0", 4, 0, &[2], &[1])
                    }),
                    &[("0", &two)],
                ),
                "tensors `a` and `b` share storage `0`",
            ),
            (
                "no data.pkl",
                {
                    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
                    zip.start_file("archive/version", zip::write::SimpleFileOptions::default())
                        .unwrap();
                    zip.finish().unwrap().into_inner()
                },
                "holds no data.pkl",
            ),
            (
                "cut pickle",
                archive(&w("FloatStorage", 2)[..40], &[]),
                "its data.pkl, at byte",
            ),
        ];
        for (what, file, expected) in cases {
            let err = refused(&file);
            assert!(err.contains(expected), "{what}: {err}");
        }

        // Big-endian checkpoints.
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("a/data.pkl", stored).unwrap();
        zip.write_all(&w("FloatStorage", 2)).unwrap();
        zip.start_file("a/byteorder", stored).unwrap();
        zip.write_all(b"big").unwrap();
        let err = refused(&zip.finish().unwrap().into_inner());
        assert!(err.contains("byteorder is \"big\""), "{err}");

        // A storage byte changed after writing: its CRC no longer matches.
        let mut file = archive(&w("FloatStorage", 2), &[("0", &two)]);
        let at = file.windows(8).position(|b| b == &two[..]).unwrap();
        file[at] ^= 1;
        let err = refused(&file);
        assert!(err.to_lowercase().contains("checksum"), "{err}");
    }

    fn legacy(file: &[u8]) -> Result<Vec<u8>, ReadError> {
        let result = read_legacy(Cursor::new(file), file.len() as u64);
        // What starts like a legacy file is read as one by both (map_checkpoint sniffs).
        if file.starts_with(&LEGACY_START) {
            agree(file, &result);
        }
        result
    }

    fn legacy_refused(file: &[u8]) -> String {
        match legacy(file) {
            Err(ReadError::Invalid(detail)) => detail,
            Err(ReadError::Io(e)) => format!("I/O: {e}"),
            Ok(bytes) => panic!("read {} tensors", tensors(&bytes).len()),
        }
    }

    #[test]
    fn the_legacy_format_reads_like_its_safetensors_twin() {
        // torch.save(_use_new_zipfile_serialization=False) of f32, f16, bf16 and i64 tensors,
        // a transposed view, two slices of one storage, a scalar and an empty tensor, under
        // `state_dict` beside an int (tests/reference/make_published_layouts.py).
        let dir = Path::new(FIXTURES).join("torch-legacy");
        let got = tensors(&read_as_safetensors(&dir.join("mixed.pth")).expect("reads"));
        let want = tensors(&std::fs::read(dir.join("mixed.safetensors")).unwrap());
        assert_eq!(got.len(), 9);
        assert_eq!(got, want);
        assert_eq!(got["transposed"].1, [5, 6]);
        assert_eq!(got["bf16.weight"].0, "BF16");
        assert_eq!(got["steps"].2[16..24], (1i64 << 40).to_le_bytes());
    }

    #[test]
    fn a_damaged_legacy_file_is_refused_by_what_is_wrong() {
        let file = std::fs::read(Path::new(FIXTURES).join("torch-legacy/mixed.pth")).unwrap();
        let cases: [(&str, Vec<u8>); 6] = [
            // The magic number's first byte changed.
            ("not torch's magic number", {
                let mut f = file.clone();
                f[4] ^= 0xff;
                f
            }),
            // Cut inside the object's pickle.
            ("saved object", file[..300].to_vec()),
            // Cut inside the storages: the last one (the empty tensor's) loses its count.
            (
                "before this one's 8-byte length: truncated",
                file[..file.len() - 1].to_vec(),
            ),
            // A storage's count claims more than the file holds.
            ("truncated or corrupt", {
                let mut f = file.clone();
                let end = f.len();
                f[end - 1] = 1;
                f
            }),
            // Bytes after the last storage.
            ("1 bytes follow", [&file[..], &[0]].concat()),
            // Big-endian system information: `little_endian` True → False.
            ("little-endian", {
                let at = file
                    .windows(13)
                    .position(|w| w == b"little_endian")
                    .unwrap();
                let mut f = file.clone();
                // BINPUT n, then NEWTRUE (0x88).
                assert_eq!(f[at + 15], 0x88);
                f[at + 15] = 0x89;
                f
            }),
        ];
        for (what, bytes) in cases {
            let err = legacy_refused(&bytes);
            assert!(err.contains(what), "{what}: {err}");
        }
        // Every cut, and every byte flipped, is refused or read, never a panic or a large
        // allocation (the storages are tiny, so a claim beyond the file is refused first).
        for len in 0..file.len() {
            let _ = legacy(&file[..len]);
        }
        for at in 0..file.len() {
            let mut f = file.clone();
            f[at] ^= 0x5a;
            let _ = legacy(&f);
        }
    }

    #[test]
    fn corrupting_a_fixture_anywhere_never_panics() {
        let path = Path::new(FIXTURES).join("model-root/lllyasviel/Annotators/sk_model2.pth");
        let file = std::fs::read(&path).unwrap();
        // Every prefix a cut at 1,009-byte steps leaves.
        for len in (0..file.len()).step_by(1009) {
            assert!(read(&file[..len]).is_err(), "cut at {len}");
        }
        // Every byte of its pickle set to four values, each read through the state dict.
        let mut zip = zip::ZipArchive::new(Cursor::new(&file)).unwrap();
        let mut pkl = Vec::new();
        zip.by_name("sk_model2/data.pkl")
            .unwrap()
            .read_to_end(&mut pkl)
            .unwrap();
        let (mut parsed, mut tensors_found) = (0, 0);
        for at in 0..pkl.len() {
            for value in [0x00, 0xFF, b'(', b'h'] {
                let mut bad = pkl.clone();
                bad[at] = value;
                if let Ok(p) = pickle::parse(&bad) {
                    parsed += 1;
                    if let Ok(t) = state_dict_tensors(&p) {
                        tensors_found += t.len();
                    }
                }
            }
        }
        println!(
            "{} corrupted pickles: {parsed} parsed, {tensors_found} tensors described",
            pkl.len() * 4
        );
        assert!(parsed > 0);
    }

    /// Peak resident memory since the last reset, and a reset (Linux; 0 elsewhere).
    fn peak_kib(reset: bool) -> u64 {
        if reset {
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
                .unwrap_or(0)
        };
        field("VmHWM:")
    }

    /// What reading the hostile files of issue #41 costs: time and peak memory above the
    /// process's resident size before each read (and each file written to
    /// `$SDSTREAM_HOSTILE_DIR` when set, to measure other readers on them). Ignored: it
    /// prints figures. `cargo test -p sdstream --lib hostile_checkpoints_cost -- --ignored
    /// --nocapture --test-threads 1`
    #[test]
    #[ignore]
    fn hostile_checkpoints_cost() {
        let side = 1 << 18;
        let four = f32s(&[1.0, 2.0, 3.0, 4.0]);
        let huge = state_dict(|p| {
            p.str("w")
                .tensor("FloatStorage", "0", 4, 0, &[side, side], &[side, 1])
        });
        let n = 100_000;
        let deep = [&[0x80u8, 2][..], &vec![b']'; n], &vec![b'a'; n - 1], b"."].concat();
        let bomb = |levels| {
            state_dict(|p| {
                memo_bomb(p.str("bomb"), levels).str("w").tensor(
                    "FloatStorage",
                    "0",
                    4,
                    0,
                    &[4],
                    &[1],
                )
            })
        };
        let files = [
            ("huge_shape", archive(&huge, &[("0", &four)])),
            ("deep_100000", archive(&deep, &[])),
            ("memo_bomb_20", archive(&bomb(20), &[("0", &four)])),
            ("memo_bomb_22", archive(&bomb(22), &[("0", &four)])),
            ("memo_bomb_24", archive(&bomb(24), &[("0", &four)])),
            ("memo_bomb_40", archive(&bomb(40), &[("0", &four)])),
        ];
        let dir = std::env::var_os("SDSTREAM_HOSTILE_DIR").map(std::path::PathBuf::from);
        for (name, file) in &files {
            if let Some(dir) = &dir {
                std::fs::write(dir.join(format!("{name}.pth")), file).unwrap();
            }
            let base = peak_kib(true);
            let t = std::time::Instant::now();
            let result = read(file);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let peak = peak_kib(false).saturating_sub(base);
            let outcome = match result {
                Ok(bytes) => format!("read {} tensors", tensors(&bytes).len()),
                Err(ReadError::Invalid(e)) => format!("refused: {e}"),
                Err(ReadError::Io(e)) => format!("I/O error: {e}"),
            };
            println!(
                "{name}: {} bytes, {ms:.2} ms, peak +{peak} KiB; {outcome}",
                file.len()
            );
        }
    }
}
