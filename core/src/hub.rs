//! Model id → folder on disk: a local folder, a model root, the Hugging Face cache, or a download.
//!
//! One resolution order, used by parameter validation and by every loader alike:
//! 1. `id` itself when it names an existing folder (when it looks like a path and is not one,
//!    nothing else is tried); skipped when [`HubOptions::allow_paths`] is false, and then an id
//!    that is not a hub id ([`is_hub_id`]: `org/name` or `name`) is refused before anything on
//!    disk is looked at, so `model_root/<id>` and the cache folder stay inside their roots;
//! 2. `model_root/<id>` when [`HubOptions::model_root`] is set;
//! 3. the Hugging Face cache snapshot of `id` (`models--{org}--{name}/refs/main` →
//!    `snapshots/<hash>/`, or any snapshot that holds the wanted files when the ref is missing or
//!    incomplete);
//! 4. a download of the wanted files into that cache (`download`: one commit, every file's size
//!    and hash from the hub's listing checked before and while it arrives), unless offline.
//!
//! Steps 1 and 2 are [`local_dir`]: validation accepts an unknown id only when it finds a folder
//! there, and [`resolve`] then loads from that very folder (failing, with what it lacks, rather
//! than looking further), so the two can never judge and read different checkpoints. Steps 3
//! and 4 accept a candidate only when it holds every wanted file. Callers say which files they
//! need with small patterns (see [`Wanted`]): `"unet/config.json"`, `"unet/*.json"`,
//! `"?tokenizer/tokenizer.json"` (optional) and weights such as
//! `"unet/diffusion_pytorch_model.safetensors"`, which accept the `.fp16.safetensors` variant too
//! ([`weights_pattern`] writes the fp16-preferring form). A failure names the id, every place looked
//! at and what was missing there.

use std::path::{Path, PathBuf};

use crate::model::weight_names;
use crate::{Error, Result};

mod download;
#[cfg(test)]
mod stand_in_hub;

/// Where models are looked for, whether an id may be a path, and whether the network may be used.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubOptions {
    /// A folder of models laid out as `<model_root>/<org>/<name>/` (tried before the cache).
    pub model_root: Option<PathBuf>,
    /// The Hugging Face hub cache (the folder holding `models--*`). `None`: the default location.
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network (HF_HUB_OFFLINE=1).
    pub offline: bool,
    /// Whether an id may name a folder on disk (step 1). True by default; false where ids come
    /// from someone else (the HTTP server), so that an id is only ever a hub id looked up under
    /// `model_root`, in the cache or on the hub.
    pub allow_paths: bool,
    /// The hub to download from (`HF_ENDPOINT`: a mirror, or a hub inside a private network).
    /// `None`: huggingface.co.
    pub endpoint: Option<String>,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            model_root: None,
            cache_dir: None,
            offline: false,
            allow_paths: true,
            endpoint: None,
        }
    }
}

impl HubOptions {
    /// Options from the environment: `SDSTREAM_MODEL_ROOT`; the cache from `HF_HUB_CACHE`, else
    /// `HF_HOME/hub`, else `~/.cache/huggingface/hub`; offline when `HF_HUB_OFFLINE` is `1`, `true`,
    /// `yes` or `on`; the hub at `HF_ENDPOINT` when set.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env), with `model_root` (an engine setting) taking the place of
    /// `SDSTREAM_MODEL_ROOT` when given.
    pub fn with_model_root(model_root: Option<&Path>) -> Self {
        let mut opts = Self::from_env();
        if let Some(root) = model_root {
            opts.model_root = Some(root.to_path_buf());
        }
        opts
    }

    /// [`from_env`](Self::from_env) with an explicit variable lookup (for tests and embedding).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let non_empty = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let cache_dir = non_empty("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| non_empty("HF_HOME").map(|home| PathBuf::from(home).join("hub")))
            .or_else(|| {
                non_empty("HOME")
                    .or_else(|| non_empty("USERPROFILE"))
                    .map(|home| {
                        PathBuf::from(home)
                            .join(".cache")
                            .join("huggingface")
                            .join("hub")
                    })
            });
        let offline = non_empty("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Self {
            model_root: non_empty("SDSTREAM_MODEL_ROOT").map(PathBuf::from),
            cache_dir,
            offline,
            allow_paths: true,
            endpoint: non_empty("HF_ENDPOINT").map(|e| e.trim().trim_end_matches('/').to_string()),
        }
    }
}

/// Replaces this host's model folders in a message — the model root and the Hugging Face cache,
/// as configured, made absolute and resolved — with `<model_root>` and `<hf_cache>`, so that a
/// message about a model can go to whoever named it without telling them where the host keeps
/// its files. The messages themselves keep every path ([`resolve`]'s failures list where they
/// looked): run locally, that is what one needs. An engine that serves ids from someone else
/// passes what it reports through the one redactor its settings give
/// ([`EngineSettings::path_redactor`](crate::EngineSettings::path_redactor)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathRedactor {
    /// (folder as text, its label), longest first.
    folders: Vec<(String, &'static str)>,
}

impl PathRedactor {
    /// A redactor of `opts`' model root and cache folder.
    pub fn new(opts: &HubOptions) -> Self {
        let mut folders: Vec<(String, &'static str)> = Vec::new();
        let mut add = |folder: &Path, label: &'static str| {
            let forms = [
                Some(folder.to_path_buf()),
                std::path::absolute(folder).ok(),
                folder.canonicalize().ok(),
            ];
            for form in forms.into_iter().flatten() {
                // `/` or a relative name would rewrite ordinary words; a relative path in a
                // message tells nothing about the host anyway.
                if !form.is_absolute() || form.parent().is_none() {
                    continue;
                }
                let text = form.to_string_lossy();
                let text = text.trim_end_matches(['/', '\\']).to_owned();
                if !folders.iter().any(|(known, _)| *known == text) {
                    folders.push((text, label));
                }
            }
        };
        if let Some(root) = &opts.model_root {
            add(root, "<model_root>");
        }
        if let Some(cache) = &opts.cache_dir {
            add(cache, "<hf_cache>");
        }
        // Longest first: a cache inside the model root is named as the cache.
        folders.sort_by_key(|(text, _)| std::cmp::Reverse(text.len()));
        Self { folders }
    }

    /// `text` with every folder replaced by its label.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (folder, label) in &self.folders {
            if out.contains(folder.as_str()) {
                out = out.replace(folder.as_str(), label);
            }
        }
        out
    }

    /// Whether this redactor changes nothing (the folders are the program's own business).
    pub fn is_empty(&self) -> bool {
        self.folders.is_empty()
    }
}

/// One file (or set of files) a caller needs from a model folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// Exactly this relative path.
    File(String),
    /// Every file matching this pattern (`*` matches within one path segment); at least one.
    Glob(String),
    /// A network's weights in any form diffusers or transformers wrote
    /// ([`weight_names::candidates`]: safetensors or a torch pickle, whole or sharded, full or
    /// fp16), any accepted; `prefer_fp16` orders them when a repository holds several.
    Weights {
        /// Relative path without the `.safetensors` / `.fp16.safetensors` ending.
        stem: String,
        /// Download the fp16 variant when available.
        prefer_fp16: bool,
    },
    /// Like the inner pattern but may be absent.
    Optional(Box<Wanted>),
    /// The first of several alternatives that is there (`a.safetensors|a.pth`): a network
    /// whose weights exist in several formats.
    OneOf(Vec<Wanted>),
}

impl Wanted {
    /// Parses a pattern: a leading `?` makes it optional; `|` separates alternatives, the first
    /// one present being taken; `*` makes it a glob; a name ending in
    /// `.fp16.safetensors` or `.safetensors` is a weights file preferring (or not) the fp16
    /// variant; anything else is an exact file.
    pub fn parse(pattern: &str) -> Self {
        if let Some(rest) = pattern.strip_prefix('?') {
            return Wanted::Optional(Box::new(Self::parse(rest)));
        }
        if pattern.contains('|') {
            return Wanted::OneOf(pattern.split('|').map(Self::parse).collect());
        }
        if pattern.contains('*') {
            return Wanted::Glob(pattern.to_string());
        }
        if let Some(stem) = pattern.strip_suffix(".fp16.safetensors") {
            return Wanted::Weights {
                stem: stem.to_string(),
                prefer_fp16: true,
            };
        }
        if let Some(stem) = pattern.strip_suffix(".safetensors") {
            return Wanted::Weights {
                stem: stem.to_string(),
                prefer_fp16: false,
            };
        }
        Wanted::File(pattern.to_string())
    }

    /// The pattern as a caller would write it.
    fn describe(&self) -> String {
        match self {
            Wanted::File(p) | Wanted::Glob(p) => p.clone(),
            Wanted::Weights { stem, prefer_fp16 } => {
                let names: Vec<String> = weight_names::candidates(stem, *prefer_fp16)
                    .into_iter()
                    .map(|c| c.file)
                    .collect();
                format!("{} (or {})", names[0], names[1..].join(", "))
            }
            Wanted::Optional(inner) => format!("optional {}", inner.describe()),
            Wanted::OneOf(options) => options
                .iter()
                .map(Wanted::describe)
                .collect::<Vec<_>>()
                .join(" or "),
        }
    }

    /// Whether `dir` satisfies this pattern.
    fn satisfied_in(&self, dir: &Path) -> bool {
        match self {
            Wanted::File(p) => dir.join(p).is_file(),
            Wanted::Glob(p) => !local_glob(dir, p).is_empty(),
            Wanted::Weights { stem, prefer_fp16 } => weight_names::candidates(stem, *prefer_fp16)
                .iter()
                .any(|c| dir.join(&c.file).is_file()),
            Wanted::Optional(_) => true,
            Wanted::OneOf(options) => options.iter().any(|w| w.satisfied_in(dir)),
        }
    }

    /// The remote files to fetch for this pattern, given the repository's file list; `Err` with
    /// the pattern's description when a required one is not there.
    fn select_remote(&self, listing: &[String]) -> std::result::Result<Vec<String>, String> {
        match self {
            Wanted::File(p) => {
                if listing.iter().any(|f| f == p) {
                    Ok(vec![p.clone()])
                } else {
                    Err(p.clone())
                }
            }
            Wanted::Glob(p) => {
                let found: Vec<String> = listing
                    .iter()
                    .filter(|f| glob_match(p, f))
                    .cloned()
                    .collect();
                if found.is_empty() {
                    Err(p.clone())
                } else {
                    Ok(found)
                }
            }
            // The first form the repository holds, as a folder would be read; an index with
            // the shards listed beside it.
            Wanted::Weights { stem, prefer_fp16 } => weight_names::candidates(stem, *prefer_fp16)
                .into_iter()
                .find_map(|c| {
                    if !listing.contains(&c.file) {
                        return None;
                    }
                    let mut files = vec![c.file];
                    if let Some(shards) = c.shards {
                        let found: Vec<String> = listing
                            .iter()
                            .filter(|f| glob_match(&shards, f))
                            .cloned()
                            .collect();
                        if found.is_empty() {
                            return None;
                        }
                        files.extend(found);
                    }
                    Some(files)
                })
                .ok_or_else(|| self.describe()),
            Wanted::Optional(inner) => Ok(inner.select_remote(listing).unwrap_or_default()),
            Wanted::OneOf(options) => options
                .iter()
                .find_map(|w| w.select_remote(listing).ok())
                .ok_or_else(|| self.describe()),
        }
    }
}

/// Whether a network's weights (a [`Wanted::Weights`], alone or among alternatives) are among
/// the `wanted` patterns that `found` says are not there.
fn lacks_weights(wanted: &[Wanted], found: impl Fn(&Wanted) -> bool) -> bool {
    fn names_weights(w: &Wanted) -> bool {
        match w {
            Wanted::Weights { .. } => true,
            Wanted::OneOf(options) => options.iter().any(names_weights),
            _ => false,
        }
    }
    wanted.iter().any(|w| names_weights(w) && !found(w))
}

/// The weights pattern of a component: `"{component}/{stem}.safetensors"`, or the
/// `.fp16.safetensors` form when f16 weights are preferred (either file satisfies both forms).
pub fn weights_pattern(component: &str, stem: &str, prefer_fp16: bool) -> String {
    let variant = if prefer_fp16 { ".fp16" } else { "" };
    if component.is_empty() {
        format!("{stem}{variant}.safetensors")
    } else {
        format!("{component}/{stem}{variant}.safetensors")
    }
}

/// `*` matches any run of characters except `/`; everything else matches itself.
fn glob_match(pattern: &str, path: &str) -> bool {
    fn inner(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => {
                // Try every split point within the current segment.
                let mut i = 0;
                loop {
                    if inner(rest, &s[i..]) {
                        return true;
                    }
                    if i == s.len() || s[i] == b'/' {
                        return false;
                    }
                    i += 1;
                }
            }
            Some((&c, rest)) => s.first() == Some(&c) && inner(rest, &s[1..]),
        }
    }
    inner(pattern.as_bytes(), path.as_bytes())
}

/// Files under `dir` whose relative path matches `pattern` (searched in the pattern's folder).
fn local_glob(dir: &Path, pattern: &str) -> Vec<PathBuf> {
    let (folder, _) = pattern.rsplit_once('/').unwrap_or(("", pattern));
    let Ok(entries) = std::fs::read_dir(dir.join(folder)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rel = if folder.is_empty() {
                name
            } else {
                format!("{folder}/{name}")
            };
            (glob_match(pattern, &rel) && e.path().is_file()).then(|| e.path())
        })
        .collect()
}

/// The wanted patterns that `dir` lacks (empty when the folder is complete).
fn missing_in(dir: &Path, wanted: &[Wanted]) -> Vec<String> {
    wanted
        .iter()
        .filter(|w| !w.satisfied_in(dir))
        .map(Wanted::describe)
        .collect()
}

/// Whether `id` is meant as a filesystem path rather than a hub id (`org/name` or `name`).
fn looks_like_path(id: &str) -> bool {
    id.starts_with('/')
        || id.starts_with('.')
        || id.starts_with('~')
        || id.contains('\\')
        || id.contains(':')
        || id.matches('/').count() > 1
}

/// Longest part of a hub id (the hub's own limit on a user or repository name).
const MAX_HUB_ID_PART: usize = 96;

/// Whether `id` has the shape of a hub model id: `name` or `org/name`, each part 1 to 96 ASCII
/// letters, digits, `-`, `_` or `.`, not starting with `.`. Such an id joined to a folder stays
/// inside it: no `..`, no absolute path, no drive letter, no backslash, no `~`.
pub fn is_hub_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|part| {
            !part.is_empty()
                && part.len() <= MAX_HUB_ID_PART
                && !part.starts_with('.')
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
}

/// The local folder `id` names, if any: `id` itself when it is an existing folder (only when
/// [`HubOptions::allow_paths`]), else `model_root/<id>` (steps 1–2 of the resolution order; with
/// paths off, only for a hub id). Validation accepts an unknown id only when this finds a folder,
/// and [`resolve`] loads from the folder this returns.
pub fn local_dir(id: &str, opts: &HubOptions) -> Option<PathBuf> {
    if id.is_empty() {
        return None;
    }
    if opts.allow_paths {
        let as_path = Path::new(id);
        if as_path.is_dir() {
            return Some(as_path.to_path_buf());
        }
    } else if !is_hub_id(id) {
        return None;
    }
    let under_root = opts.model_root.as_ref()?.join(id);
    under_root.is_dir().then_some(under_root)
}

/// The single-file checkpoint `id` names, when it is a file on disk and paths are allowed
/// ([`HubOptions::allow_paths`]): a `.safetensors`, or a PyTorch `.ckpt`, `.pt` or `.pth`, in the
/// original Stable Diffusion layout ([`crate::model::single_file`]).
pub fn single_file(id: &str, opts: &HubOptions) -> Option<PathBuf> {
    if !opts.allow_paths {
        return None;
    }
    let path = Path::new(id);
    let extension = path.extension()?.to_str()?.to_ascii_lowercase();
    (matches!(extension.as_str(), "safetensors" | "ckpt" | "pt" | "pth") && path.is_file())
        .then(|| path.to_path_buf())
}

/// The cache folder of a hub model id: `models--{org}--{name}`.
pub fn cache_folder_name(id: &str) -> String {
    format!("models--{}", id.replace('/', "--"))
}

/// Resolves `id` to a folder holding every `wanted` pattern (see [`Wanted::parse`]), looking at a
/// local folder, the model root, the Hugging Face cache and finally the hub (unless offline).
pub fn resolve(id: &str, opts: &HubOptions, wanted: &[&str]) -> Result<PathBuf> {
    let wanted: Vec<Wanted> = wanted.iter().map(|p| Wanted::parse(p)).collect();
    resolve_wanted(id, opts, &wanted)
}

/// [`resolve`] with parsed patterns.
pub fn resolve_wanted(id: &str, opts: &HubOptions, wanted: &[Wanted]) -> Result<PathBuf> {
    let not_found = |detail: String| Error::ModelNotFound {
        id: id.to_string(),
        detail,
    };
    let mut looked: Vec<String> = Vec::new();

    // Checked before anything on disk is looked at, so the answer says nothing about the disk.
    if !opts.allow_paths && !is_hub_id(id) {
        return Err(not_found(
            "not a hub id of the form org/name or name (model paths are not allowed here)".into(),
        ));
    }

    // 1–2. A local folder: the id as a path, then under the model root.
    if let Some(dir) = local_dir(id, opts) {
        let missing = missing_in(&dir, wanted);
        if missing.is_empty() {
            return Ok(dir);
        }
        let held = if lacks_weights(wanted, |w| w.satisfied_in(&dir)) {
            weight_names::held_in(&dir)
        } else {
            Vec::new()
        };
        return Err(not_found(format!(
            "local folder {} lacks {}{}",
            dir.display(),
            missing.join(", "),
            weight_names::what_is_held(&held)
        )));
    }
    let local = Path::new(id);
    if looks_like_path(id) || id.is_empty() {
        return Err(not_found(format!(
            "{} is not a folder (and not a hub id of the form org/name)",
            local.display()
        )));
    }
    if opts.allow_paths {
        looked.push(format!("local folder {}: not a folder", local.display()));
    }
    if let Some(root) = &opts.model_root {
        looked.push(format!(
            "model root {}: not a folder",
            root.join(id).display()
        ));
    }

    // 3. The Hugging Face cache.
    let cache_dir = opts.cache_dir.clone();
    if let Some(cache) = &cache_dir {
        match find_in_cache(cache, id, wanted) {
            Ok(dir) => return Ok(dir),
            Err(why) => looked.push(why),
        }
    } else {
        looked.push("Hugging Face cache: no location (set HF_HUB_CACHE or HF_HOME)".into());
    }

    // 4. The hub.
    if opts.offline {
        looked.push("offline (HF_HUB_OFFLINE): no download attempted".into());
        return Err(not_found(format!(
            "wanted {}; looked at: {}",
            describe_all(wanted),
            looked.join("; ")
        )));
    }
    let Some(cache) = cache_dir else {
        return Err(not_found(format!(
            "wanted {}; looked at: {}; cannot download without a cache folder",
            describe_all(wanted),
            looked.join("; ")
        )));
    };
    let endpoint = opts
        .endpoint
        .as_deref()
        .unwrap_or(download::DEFAULT_ENDPOINT);
    let token = download::token(|name| std::env::var(name).ok(), &cache);
    let limits = download::Limits::default();
    download::download(id, &cache, endpoint, token.as_deref(), wanted, &limits).map_err(|why| {
        looked.push(why);
        not_found(format!(
            "wanted {}; looked at: {}",
            describe_all(wanted),
            looked.join("; ")
        ))
    })
}

fn describe_all(wanted: &[Wanted]) -> String {
    wanted
        .iter()
        .map(Wanted::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cache snapshot holding every wanted file: `refs/main`'s first, then any other. `Err` says
/// what was found instead.
fn find_in_cache(
    cache: &Path,
    id: &str,
    wanted: &[Wanted],
) -> std::result::Result<PathBuf, String> {
    let repo = cache.join(cache_folder_name(id));
    if !repo.is_dir() {
        return Err(format!(
            "Hugging Face cache {}: not downloaded",
            repo.display()
        ));
    }
    let snapshots = repo.join("snapshots");
    let ref_main = repo.join("refs").join("main");
    let mut notes = Vec::new();
    let main_hash = std::fs::read_to_string(&ref_main)
        .ok()
        .map(|h| h.trim().to_string());
    if let Some(hash) = &main_hash {
        let dir = snapshots.join(hash);
        if dir.is_dir() {
            let missing = missing_in(&dir, wanted);
            if missing.is_empty() {
                return Ok(dir);
            }
            notes.push(format!(
                "snapshot {} (refs/main) lacks {}",
                dir.display(),
                missing.join(", ")
            ));
        } else {
            notes.push(format!(
                "refs/main names {hash} but {} is missing",
                dir.display()
            ));
        }
    } else {
        notes.push(format!("{} is missing", ref_main.display()));
    }
    let mut others: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .filter(|p| main_hash.as_deref() != p.file_name().and_then(|n| n.to_str()))
                .collect()
        })
        .unwrap_or_default();
    // Deterministic choice among several candidate snapshots.
    others.sort();
    for dir in &others {
        let missing = missing_in(dir, wanted);
        if missing.is_empty() {
            return Ok(dir.clone());
        }
        notes.push(format!(
            "snapshot {} lacks {}",
            dir.display(),
            missing.join(", ")
        ));
    }
    if others.is_empty() && main_hash.is_none() {
        notes.push(format!("no snapshot in {}", snapshots.display()));
    }
    Err(format!(
        "Hugging Face cache {}: {}",
        repo.display(),
        notes.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unique temp folder removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("sdstream-hub-{tag}-{}-{n}", std::process::id()));
            std::fs::remove_dir_all(&dir).ok();
            std::fs::create_dir_all(&dir).expect("temp dir");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, b"{}").expect("write");
    }

    fn model_files(dir: &Path, fp16: bool) {
        touch(&dir.join("model_index.json"));
        touch(&dir.join("unet/config.json"));
        let weights = if fp16 {
            "unet/diffusion_pytorch_model.fp16.safetensors"
        } else {
            "unet/diffusion_pytorch_model.safetensors"
        };
        touch(&dir.join(weights));
    }

    const WANTED: &[&str] = &[
        "model_index.json",
        "unet/*.json",
        "unet/diffusion_pytorch_model.safetensors",
        "?tokenizer/tokenizer.json",
    ];

    fn offline(cache: &Path) -> HubOptions {
        HubOptions {
            model_root: None,
            cache_dir: Some(cache.to_path_buf()),
            offline: true,
            allow_paths: true,
            endpoint: None,
        }
    }

    #[test]
    fn resolves_cache_snapshot_through_refs_main() {
        let cache = TempDir::new("refs");
        let repo = cache.0.join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).expect("refs");
        std::fs::write(repo.join("refs/main"), "abc123\n").expect("ref");
        let snap = repo.join("snapshots/abc123");
        model_files(&snap, true);
        // An older, incomplete snapshot sorts first but is not chosen.
        touch(&repo.join("snapshots/000old/model_index.json"));
        let dir = resolve("org/tiny", &offline(&cache.0), WANTED).expect("resolved");
        assert_eq!(dir, snap);
        // The fp16-preferring pattern is satisfied by the fp32 file and the other way round.
        let fp16 = weights_pattern("unet", "diffusion_pytorch_model", true);
        assert_eq!(fp16, "unet/diffusion_pytorch_model.fp16.safetensors");
        assert_eq!(
            resolve("org/tiny", &offline(&cache.0), &[&fp16]).expect("fp16"),
            snap
        );
    }

    #[test]
    fn resolves_a_complete_snapshot_without_refs() {
        let cache = TempDir::new("norefs");
        let repo = cache.0.join("models--org--tiny");
        touch(&repo.join("snapshots/aaa/model_index.json"));
        model_files(&repo.join("snapshots/bbb"), false);
        let dir = resolve("org/tiny", &offline(&cache.0), WANTED).expect("resolved");
        assert_eq!(dir, repo.join("snapshots/bbb"));
    }

    #[test]
    fn missing_snapshot_error_names_the_paths() {
        let cache = TempDir::new("missing");
        let repo = cache.0.join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).expect("refs");
        std::fs::write(repo.join("refs/main"), "deadbeef").expect("ref");
        let err = resolve("org/tiny", &offline(&cache.0), WANTED).expect_err("no snapshot");
        let msg = err.to_string();
        assert!(
            matches!(err, Error::ModelNotFound { ref id, .. } if id == "org/tiny"),
            "{msg}"
        );
        let snapshot = repo.join("snapshots/deadbeef");
        assert!(msg.contains(&snapshot.display().to_string()), "{msg}");
        assert!(msg.contains("local folder org/tiny"), "{msg}");
        assert!(
            msg.contains("unet/config.json") || msg.contains("unet/*.json"),
            "{msg}"
        );
        assert!(msg.contains("offline"), "{msg}");

        // A snapshot that lacks a file: the error names the file and the snapshot.
        touch(&snapshot.join("model_index.json"));
        let msg = resolve("org/tiny", &offline(&cache.0), WANTED)
            .expect_err("incomplete")
            .to_string();
        assert!(msg.contains("lacks unet/*.json"), "{msg}");
        assert!(
            msg.contains("diffusion_pytorch_model.safetensors (or"),
            "{msg}"
        );
        let looked = msg.split("looked at:").nth(1).unwrap_or_default();
        assert!(
            !looked.contains("tokenizer.json"),
            "optional files are not reported missing: {msg}"
        );
    }

    #[test]
    fn offline_makes_no_network_attempt() {
        let cache = TempDir::new("offline");
        // An id that does not exist anywhere; with offline set, resolve must fail fast and say so
        // without a hub error in the message.
        let msg = resolve("nobody/nothing", &offline(&cache.0), WANTED)
            .expect_err("offline")
            .to_string();
        assert!(
            msg.contains("offline (HF_HUB_OFFLINE): no download attempted"),
            "{msg}"
        );
        assert!(msg.contains("not downloaded"), "{msg}");
        assert!(!msg.contains("hub:"), "{msg}");
        assert!(
            !cache.0.join(cache_folder_name("nobody/nothing")).exists(),
            "nothing written"
        );
    }

    #[test]
    fn local_folder_and_model_root_come_first() {
        let cache = TempDir::new("local-cache");
        let repo = cache.0.join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).expect("refs");
        std::fs::write(repo.join("refs/main"), "c1").expect("ref");
        model_files(&repo.join("snapshots/c1"), false);

        let local = TempDir::new("local");
        model_files(&local.0, false);
        let id = local.0.display().to_string();
        assert_eq!(
            resolve(&id, &offline(&cache.0), WANTED).expect("local"),
            local.0
        );
        // A local folder that lacks files is an error naming them, not a fall-through.
        std::fs::remove_file(local.0.join("unet/config.json")).expect("rm");
        let msg = resolve(&id, &offline(&cache.0), WANTED)
            .expect_err("incomplete")
            .to_string();
        assert!(msg.contains("lacks unet/*.json"), "{msg}");
        let msg = resolve("./no/such/folder", &offline(&cache.0), WANTED)
            .expect_err("path")
            .to_string();
        assert!(msg.contains("is not a folder"), "{msg}");

        let root = TempDir::new("root");
        model_files(&root.0.join("org/tiny"), true);
        let opts = HubOptions {
            model_root: Some(root.0.clone()),
            ..offline(&cache.0)
        };
        assert_eq!(
            resolve("org/tiny", &opts, WANTED).expect("root"),
            root.0.join("org/tiny")
        );
        assert_eq!(local_dir("org/tiny", &opts), Some(root.0.join("org/tiny")));
        // An incomplete model-root copy is an error naming what it lacks, not a fall-through
        // to the cache: validation judged that folder, so loading must read that folder.
        std::fs::remove_file(root.0.join("org/tiny/model_index.json")).expect("rm");
        let msg = resolve("org/tiny", &opts, WANTED)
            .expect_err("incomplete model-root copy")
            .to_string();
        assert!(msg.contains("lacks model_index.json"), "{msg}");
        // Without the model-root copy the cache serves the id.
        std::fs::remove_dir_all(root.0.join("org/tiny")).expect("rm");
        assert_eq!(local_dir("org/tiny", &opts), None);
        assert_eq!(
            resolve("org/tiny", &opts, WANTED).expect("cache"),
            repo.join("snapshots/c1")
        );
    }

    #[test]
    fn hub_id_shape() {
        use crate::params::catalog;
        let known = catalog::KNOWN_MODELS
            .iter()
            .map(|(id, _)| *id)
            .chain(catalog::all_controlnets())
            .chain(["madebyollin/taesd", "madebyollin/taesdxl", "tiny-sd-turbo"]);
        for id in known {
            assert!(is_hub_id(id), "{id}");
        }
        let long = "a".repeat(MAX_HUB_ID_PART + 1);
        for id in [
            "",
            "/",
            "/etc",
            "/etc/passwd",
            "..",
            ".",
            "../../..",
            "org/../../x",
            "org/..",
            "org/./name",
            "./name",
            ".hidden",
            "org/.hidden",
            "org/name/",
            "/org/name",
            "org//name",
            "a/b/c",
            "org\\name",
            "C:/models",
            "C:name",
            "~/models",
            "org/na me",
            "org/name\0",
            "org/n\u{e9}",
            long.as_str(),
        ] {
            assert!(!is_hub_id(id), "{id:?}");
        }
    }

    #[test]
    fn without_paths_only_hub_ids_resolve_inside_the_root() {
        let cache = TempDir::new("nopaths-cache");
        let root = TempDir::new("nopaths-root");
        model_files(&root.0.join("org/tiny"), false);
        model_files(&root.0.join("tiny"), false);
        // A complete model outside the root, reachable by an absolute path and by `..`.
        let outside = TempDir::new("nopaths-outside");
        model_files(&outside.0, false);
        let outside_name = outside
            .0
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name");
        let opts = HubOptions {
            model_root: Some(root.0.clone()),
            allow_paths: false,
            ..offline(&cache.0)
        };
        assert_eq!(
            resolve("org/tiny", &opts, WANTED).expect("org/name under the root"),
            root.0.join("org/tiny")
        );
        assert_eq!(
            resolve("tiny", &opts, WANTED).expect("name under the root"),
            root.0.join("tiny")
        );
        let absolute = outside.0.display().to_string();
        let dotdot = format!("../{outside_name}");
        let missing = format!("{absolute}-missing");
        let refused = [
            absolute.as_str(),
            dotdot.as_str(),
            missing.as_str(),
            "/etc",
            "../../..",
            "org/../../x",
            "org/../tiny",
            "./tiny",
            "",
        ];
        // The same answer for every refused id, whether or not it names an existing folder.
        let mut details = Vec::new();
        for id in refused {
            assert_eq!(local_dir(id, &opts), None, "{id:?}");
            match resolve(id, &opts, WANTED) {
                Err(Error::ModelNotFound { detail, .. }) => details.push(detail),
                other => panic!("{id:?}: expected ModelNotFound, got {other:?}"),
            }
        }
        assert!(details.iter().all(|d| d == &details[0]), "{details:?}");
        assert!(
            details[0].contains("model paths are not allowed"),
            "{details:?}"
        );
        assert!(!details[0].contains(&root.0.display().to_string()));
        // With paths allowed, the same absolute and `..` ids do reach the outside folder: the
        // option is what keeps them out.
        let with_paths = HubOptions {
            allow_paths: true,
            ..opts.clone()
        };
        assert_eq!(
            resolve(&absolute, &with_paths, WANTED).expect("path"),
            outside.0
        );
        assert!(local_dir(&dotdot, &with_paths).is_some());
    }

    #[test]
    fn options_from_environment_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let o = HubOptions::from_vars(vars(&[
            ("HF_HUB_CACHE", "/c"),
            ("HF_HOME", "/h"),
            ("HOME", "/u"),
        ]));
        assert_eq!(o.cache_dir, Some(PathBuf::from("/c")));
        assert!(!o.offline);
        let o = HubOptions::from_vars(vars(&[
            ("HF_HOME", "/h"),
            ("HOME", "/u"),
            ("HF_HUB_OFFLINE", "1"),
        ]));
        assert_eq!(o.cache_dir, Some(PathBuf::from("/h/hub")));
        assert!(o.offline);
        let o = HubOptions::from_vars(vars(&[
            ("HOME", "/u"),
            ("HF_HUB_OFFLINE", "0"),
            ("SDSTREAM_MODEL_ROOT", "/m"),
        ]));
        assert_eq!(
            o.cache_dir,
            Some(PathBuf::from("/u/.cache/huggingface/hub"))
        );
        assert_eq!(o.model_root, Some(PathBuf::from("/m")));
        assert!(!o.offline);
    }

    #[test]
    fn patterns_parse_and_match() {
        assert!(glob_match("unet/*.json", "unet/config.json"));
        assert!(!glob_match("unet/*.json", "unet/sub/config.json"));
        assert!(!glob_match("unet/*.json", "vae/config.json"));
        assert!(glob_match("*", "model_index.json"));
        assert_eq!(
            Wanted::parse("?a/b.json"),
            Wanted::Optional(Box::new(Wanted::File("a/b.json".into())))
        );
        let listing: Vec<String> = [
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pick = |p: &str| Wanted::parse(p).select_remote(&listing);
        assert_eq!(
            pick("unet/diffusion_pytorch_model.fp16.safetensors"),
            Ok(vec![
                "unet/diffusion_pytorch_model.fp16.safetensors".to_string()
            ])
        );
        assert_eq!(
            pick("unet/diffusion_pytorch_model.safetensors"),
            Ok(vec!["unet/diffusion_pytorch_model.safetensors".to_string()])
        );
        assert_eq!(
            pick("unet/*.json"),
            Ok(vec!["unet/config.json".to_string()])
        );
        assert_eq!(pick("?vae/config.json"), Ok(vec![]));
        assert_eq!(pick("vae/config.json"), Err("vae/config.json".to_string()));
        // Alternatives: the first one listed that the repository has.
        assert_eq!(
            pick("unet/model.pth|unet/config.json|unet/*.json"),
            Ok(vec!["unet/config.json".to_string()])
        );
        let err = pick("a.safetensors|a.pth").unwrap_err();
        assert!(
            err.starts_with("a.safetensors (or a.safetensors.index.json, a.bin, ")
                && err.ends_with(" or a.pth"),
            "{err}"
        );
    }

    #[test]
    fn a_folder_holding_weights_in_no_form_read_says_what_it_holds() {
        // CiaraRowles/TemporalNet2 publishes one single-file checkpoint and no diffusers weights.
        let root = TempDir::new("single-file");
        let dir = root.0.join("CiaraRowles/TemporalNet2");
        touch(&dir.join("config.json"));
        touch(&dir.join("temporalnetversion2.ckpt"));
        touch(&dir.join("README.md"));
        let opts = HubOptions {
            model_root: Some(root.0.clone()),
            ..offline(&root.0)
        };
        let wanted = ["config.json", "diffusion_pytorch_model.safetensors"];
        let msg = resolve("CiaraRowles/TemporalNet2", &opts, &wanted)
            .expect_err("no diffusers weights")
            .to_string();
        assert!(
            msg.contains("lacks diffusion_pytorch_model.safetensors (or")
                && msg.contains("it holds temporalnetversion2.ckpt")
                && msg.contains("from_single_file"),
            "{msg}"
        );
        // A folder that lacks only its config says nothing about its weights.
        std::fs::remove_file(dir.join("config.json")).unwrap();
        touch(&dir.join("diffusion_pytorch_model.bin"));
        let msg = resolve("CiaraRowles/TemporalNet2", &opts, &wanted)
            .expect_err("no config")
            .to_string();
        assert!(
            msg.contains("lacks config.json") && !msg.contains("it holds"),
            "{msg}"
        );
    }

    #[test]
    fn weights_are_fetched_in_the_form_the_repository_holds() {
        let pick = |listing: &[&str], pattern: &str| {
            let listing: Vec<String> = listing.iter().map(|s| s.to_string()).collect();
            Wanted::parse(pattern).select_remote(&listing)
        };
        let strings = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
        // thibaud/controlnet-sd21-*-diffusers: a lone .bin.
        let thibaud = ["config.json", "diffusion_pytorch_model.bin", "README.md"];
        for pattern in [
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
        ] {
            assert_eq!(
                pick(&thibaud, pattern),
                Ok(strings(&["diffusion_pytorch_model.bin"]))
            );
        }
        // A sharded UNet: the index and every shard listed beside it.
        let sharded = [
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors.index.json",
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
        ];
        assert_eq!(
            pick(&sharded, "unet/diffusion_pytorch_model.safetensors"),
            Ok(strings(&[
                "unet/diffusion_pytorch_model.safetensors.index.json",
                "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
            ]))
        );
        // f16 takes the single fp16 file over the full-precision shards.
        assert_eq!(
            pick(&sharded, "unet/diffusion_pytorch_model.fp16.safetensors"),
            Ok(strings(&["unet/diffusion_pytorch_model.fp16.safetensors"]))
        );
        // An index whose shards are not listed is no form at all.
        assert!(pick(&sharded[1..2], "unet/diffusion_pytorch_model.safetensors").is_err());
        // transformers' older text encoders: pytorch_model.bin beside model.fp16.safetensors;
        // full precision takes the .bin (a complete file), f16 the fp16 one.
        let encoder = [
            "text_encoder/pytorch_model.bin",
            "text_encoder/model.fp16.safetensors",
        ];
        assert_eq!(
            pick(&encoder, "text_encoder/model.safetensors"),
            Ok(strings(&["text_encoder/pytorch_model.bin"]))
        );
        assert_eq!(
            pick(&encoder, "text_encoder/model.fp16.safetensors"),
            Ok(strings(&["text_encoder/model.fp16.safetensors"]))
        );
    }

    #[test]
    fn alternatives_are_satisfied_by_any_local_file() {
        let dir = std::env::temp_dir().join(format!("sdstream-oneof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wanted = Wanted::parse("net.safetensors|net.pth");
        assert!(!wanted.satisfied_in(&dir));
        std::fs::write(dir.join("net.pth"), b"x").unwrap();
        assert!(wanted.satisfied_in(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
