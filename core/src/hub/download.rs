//! Downloads of a model's files from the Hugging Face hub (or a mirror at `HF_ENDPOINT`) into the
//! hub's cache, in the layout `huggingface_hub` writes (`blobs/<hash>`, `snapshots/<commit>/<file>`
//! linking to the blob, `refs/main`), so that Python tools and sdstream share one cache.
//!
//! The hub is a peer like any other: a repository is whatever its owner uploaded, and a mirror or
//! a proxy answers what it likes. So, before a byte of a file arrives:
//! - the repository's listing (read whole, at most [`MAX_LISTING_BYTES`]) gives every file's size
//!   and hash, and a file larger than its kind's readers take ([`sdstream_models::max_bytes_of`]:
//!   a config 4 MiB, a tokenizer 64 MiB; a weight file [`MAX_WEIGHT_FILE_BYTES`]) is refused;
//! - the files of one download come from one commit, the listing's, so a repository that changes
//!   meanwhile cannot mix two versions;
//! - the files still to fetch must fit on the cache's disk with [`Limits::free_space_margin`]
//!   to spare (as much again as they take, when that is less);
//! - every name, commit and hash that becomes a path is checked to stay inside the cache.
//!
//! While it arrives: never more bytes than the listing gave; a connection that ends early is
//! resumed where it stopped (a `Range` request); a server sending less than
//! [`Limits::min_bytes_per_window`] in a [`Limits::rate_window`] is given up; an LFS file (the
//! weights) is hashed as it is written and kept only when its SHA-256 is the one the listing
//! names. A file is written under a temporary name and renamed into place when whole, so an
//! interrupted download leaves nothing a later load would take for a file.

use std::io::{Read, Seek, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{Wanted, lacks_weights, missing_in};
use crate::model::weight_names;

/// The hub when `HF_ENDPOINT` is not set.
pub(super) const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Most bytes of a repository's listing (sd-turbo's, with every file's size and hash, takes a
/// few KiB; the largest model repositories some hundreds).
pub const MAX_LISTING_BYTES: u64 = 16 << 20;

/// Most bytes of one weight file (an SDXL UNet in f32 takes 10.3 GB).
pub const MAX_WEIGHT_FILE_BYTES: u64 = 32 << 30;

/// Most bytes of the token file (`$HF_HOME/token`).
const MAX_TOKEN_BYTES: u64 = 4096;

/// How long a download may wait on the network, and how much it must receive.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    /// To open a connection.
    pub connect_timeout: Duration,
    /// For any one read of an answer.
    pub read_timeout: Duration,
    /// A file arriving slower than `min_bytes_per_window` in each window of this length is
    /// given up.
    pub rate_window: Duration,
    /// See `rate_window`.
    pub min_bytes_per_window: u64,
    /// Bytes the cache's disk keeps free after a download (of at most as many bytes as the
    /// download's own: a few configs need not find a GiB free).
    pub free_space_margin: u64,
    /// The bytes free on the disk holding a folder, where the system says.
    pub free_space: fn(&Path) -> Option<u64>,
    /// Times a file whose connection ended early is asked for again, from where it stopped.
    pub resumes: usize,
    /// A progress line at most this often while a file arrives.
    pub progress_every: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            rate_window: Duration::from_secs(60),
            min_bytes_per_window: 1 << 20,
            free_space_margin: 1 << 30,
            free_space: free_bytes,
            resumes: 3,
            progress_every: Duration::from_secs(10),
        }
    }
}

/// The listing `GET /api/models/{id}/revision/main?blobs=true` answers (the fields used).
#[derive(serde::Deserialize)]
struct Listing {
    /// The commit the listing describes.
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    /// The git blob's hash (the cache's name for a file stored in git).
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    /// Present for a file stored in LFS (every weight file).
    lfs: Option<Lfs>,
}

#[derive(serde::Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// A file to fetch, as the listing describes it.
struct Remote {
    name: String,
    size: u64,
    /// Its name under `blobs/`: the SHA-256 for LFS files, the git blob hash otherwise (as
    /// `huggingface_hub` names them).
    blob: String,
    /// Whether `blob` is the SHA-256 its bytes must have (an LFS file).
    hashed: bool,
}

/// The token to send the hub: `HF_TOKEN`, else the file `huggingface_hub` writes at login
/// (`$HF_HOME/token`, beside the cache folder).
pub(super) fn token(var: impl Fn(&str) -> Option<String>, cache: &Path) -> Option<String> {
    if let Some(token) = var("HF_TOKEN").map(|t| t.trim().to_string())
        && !token.is_empty()
    {
        return Some(token);
    }
    let file = cache.parent()?.join("token");
    let bytes = sdstream_models::read_bounded(&file, MAX_TOKEN_BYTES).ok()?;
    let token = String::from_utf8(bytes).ok()?.trim().to_string();
    (!token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())).then_some(token)
}

/// Downloads the `wanted` files of `id` from `endpoint` into `cache` (the hub cache folder) and
/// returns the snapshot folder holding them. `Err` says what went wrong, naming the file.
pub(super) fn download(
    id: &str,
    cache: &Path,
    endpoint: &str,
    token: Option<&str>,
    wanted: &[Wanted],
    limits: &Limits,
) -> std::result::Result<PathBuf, String> {
    let no_proxy = std::env::var("NO_PROXY")
        .or_else(|_| std::env::var("no_proxy"))
        .unwrap_or_default();
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(limits.connect_timeout)
        .timeout_read(limits.read_timeout)
        // HTTPS_PROXY and the like, as other hub clients; not for this machine or a mirror
        // NO_PROXY names (which ureq does not read).
        .try_proxy_from_env(!bypasses_proxy(endpoint, &no_proxy))
        // The token goes to the hub only, never to where it redirects (its file store).
        .redirect_auth_headers(ureq::RedirectAuthHeaders::Never)
        .user_agent(concat!("sdstream/", env!("CARGO_PKG_VERSION")))
        .build();
    let hub = Hub {
        agent,
        endpoint: endpoint.trim_end_matches('/'),
        id,
        token,
    };
    let listing = hub.listing()?;
    let commit = listing
        .sha
        .as_deref()
        .ok_or_else(|| format!("hub: the listing of {id} names no commit"))?;
    if !is_hex(commit, 40) {
        return Err(format!(
            "hub: the listing of {id} names the commit {:?}, not a 40-digit hash",
            shown(commit)
        ));
    }
    let names: Vec<String> = listing
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .collect();
    let mut files = Vec::new();
    let mut absent = Vec::new();
    for w in wanted {
        match w.select_remote(&names) {
            Ok(found) => files.extend(found),
            Err(what) => absent.push(what),
        }
    }
    if !absent.is_empty() {
        let held = if lacks_weights(wanted, |w| w.select_remote(&names).is_ok()) {
            weight_names::weight_like(names.iter().cloned())
        } else {
            Vec::new()
        };
        return Err(format!(
            "hub repository {id} has no {}{}",
            absent.join(", "),
            weight_names::what_is_held(&held)
        ));
    }
    files.sort();
    files.dedup();
    let remotes = files
        .iter()
        .map(|name| remote(id, &listing, name))
        .collect::<std::result::Result<Vec<_>, _>>()?;

    let repo = cache.join(super::cache_folder_name(id));
    // One download of a repository at a time in this process: a second engine starting on the
    // same model waits, then finds the blobs the first fetched.
    let lock = repository_lock(&repo);
    let _held = lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let blobs = repo.join("blobs");
    let snapshot = repo.join("snapshots").join(commit);
    let io =
        |what: &str, path: &Path, e: std::io::Error| format!("hub: {what} {}: {e}", path.display());
    std::fs::create_dir_all(&blobs).map_err(|e| io("cannot make", &blobs, e))?;
    let missing: Vec<&Remote> = remotes.iter().filter(|r| !has_blob(&blobs, r)).collect();
    let needed: u64 = missing.iter().map(|r| r.size).sum();
    let margin = limits.free_space_margin.min(needed);
    if needed > 0
        && let Some(free) = (limits.free_space)(&blobs)
        && needed.saturating_add(margin) > free
    {
        return Err(format!(
            "hub: {id} needs {needed} bytes in {}, which has {free} free (a download leaves \
             {margin} free)",
            cache.display()
        ));
    }
    if !missing.is_empty() {
        crate::log::progress(&format!(
            "downloading {} files of {id} ({needed} bytes) from {} at commit {commit}",
            missing.len(),
            hub.endpoint
        ));
    }
    for r in &missing {
        hub.fetch(commit, r, &blobs, limits)?;
    }
    for r in &remotes {
        link(&snapshot, &r.name, &r.blob)
            .map_err(|e| io("cannot link", &snapshot.join(&r.name), e))?;
    }
    write_ref(&repo, commit).map_err(|e| io("cannot write the ref of", &repo, e))?;
    let missing = missing_in(&snapshot, wanted);
    if missing.is_empty() {
        Ok(snapshot)
    } else {
        Err(format!(
            "hub download into {} is incomplete: lacks {}",
            snapshot.display(),
            missing.join(", ")
        ))
    }
}

/// The lock of the repository folder `repo` (made on first use, kept for the process: one per
/// repository downloaded).
fn repository_lock(repo: &Path) -> std::sync::Arc<std::sync::Mutex<()>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    locks.entry(repo.to_path_buf()).or_default().clone()
}

/// What the listing says of `name`, checked: a name that stays inside a folder, a hash that is
/// one, a size within what its kind's readers take.
fn remote(id: &str, listing: &Listing, name: &str) -> std::result::Result<Remote, String> {
    let fail = |why: String| Err(format!("hub repository {id}: {}: {why}", shown(name)));
    let Some(sibling) = listing.siblings.iter().find(|s| s.rfilename == name) else {
        return fail("not in the listing".into());
    };
    if !is_relative_inside(name) {
        return fail("not a relative path inside the repository".into());
    }
    let (size, blob, hashed) = match &sibling.lfs {
        Some(lfs) => {
            let hash = lfs.sha256.to_ascii_lowercase();
            if !is_hex(&hash, 64) {
                return fail(format!("the LFS hash {:?} is not a SHA-256", shown(&hash)));
            }
            (lfs.size, hash, true)
        }
        None => {
            let Some(blob) = sibling.blob_id.as_deref().map(str::to_ascii_lowercase) else {
                return fail("the listing gives no blob hash (blobId)".into());
            };
            if !is_hex(&blob, 40) {
                return fail(format!(
                    "the blob hash {:?} is not a git hash",
                    shown(&blob)
                ));
            }
            let Some(size) = sibling.size else {
                return fail("the listing gives no size".into());
            };
            (size, blob, false)
        }
    };
    let limit = sdstream_models::max_bytes_of(name).unwrap_or(MAX_WEIGHT_FILE_BYTES);
    if size > limit {
        return fail(format!(
            "{size} bytes, where a file of its kind holds at most {limit}; not downloaded"
        ));
    }
    Ok(Remote {
        name: name.to_string(),
        size,
        blob,
        hashed,
    })
}

/// Whether `blobs` holds `r`'s blob whole (an earlier download, or another snapshot's).
fn has_blob(blobs: &Path, r: &Remote) -> bool {
    std::fs::metadata(blobs.join(&r.blob)).is_ok_and(|m| m.is_file() && m.len() == r.size)
}

struct Hub<'a> {
    agent: ureq::Agent,
    endpoint: &'a str,
    id: &'a str,
    token: Option<&'a str>,
}

impl Hub<'_> {
    fn get(&self, url: &str) -> ureq::Request {
        let request = self.agent.get(url);
        match self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    /// An answer, or what was wrong with it in words; `missing` says what a 404 means here.
    fn call(
        &self,
        request: ureq::Request,
        what: &str,
        missing: &str,
    ) -> std::result::Result<ureq::Response, String> {
        match request.call() {
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(code @ (401 | 403), _)) => {
                let token = if self.token.is_some() {
                    "the token sent (HF_TOKEN or the token file) has no access to it"
                } else {
                    "set HF_TOKEN to a token with access"
                };
                Err(format!(
                    "hub: {what}: the server answered {code}: a gated or private repository; {token}"
                ))
            }
            Err(ureq::Error::Status(404, _)) => {
                Err(format!("hub: {what}: the server answered 404: {missing}"))
            }
            Err(ureq::Error::Status(code, _)) => {
                Err(format!("hub: {what}: the server answered {code}"))
            }
            Err(ureq::Error::Transport(t)) => Err(format!("hub: {what}: {t}")),
        }
    }

    fn listing(&self) -> std::result::Result<Listing, String> {
        let id = self.id;
        let url = format!("{}/api/models/{id}/revision/main?blobs=true", self.endpoint);
        let what = format!("listing the files of {id}");
        let response = self.call(self.get(&url), &what, "no such repository")?;
        let mut body = Vec::new();
        response
            .into_reader()
            .take(MAX_LISTING_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|e| format!("hub: {what}: {e}"))?;
        if body.len() as u64 > MAX_LISTING_BYTES {
            return Err(format!(
                "hub: {what}: the listing is more than {MAX_LISTING_BYTES} bytes"
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("hub: {what}: not a listing: {e}"))
    }

    /// `r`'s bytes into `blobs/<blob>`, checked as they arrive.
    fn fetch(
        &self,
        commit: &str,
        r: &Remote,
        blobs: &Path,
        limits: &Limits,
    ) -> std::result::Result<(), String> {
        let what = format!("{} of {}", r.name, self.id);
        let mut url = url::Url::parse(self.endpoint)
            .map_err(|e| format!("hub: the endpoint {:?} is not a URL: {e}", self.endpoint))?;
        url.path_segments_mut()
            .map_err(|()| format!("hub: the endpoint {:?} cannot take a path", self.endpoint))?
            .pop_if_empty()
            .extend(self.id.split('/'))
            .push("resolve")
            .push(commit)
            .extend(r.name.split('/'));
        let partial = Partial::create(blobs, &r.blob).map_err(|e| format!("hub: {what}: {e}"))?;
        let mut file = &partial.file;
        let mut hasher = r.hashed.then(Sha256::new);
        let started = Instant::now();
        let mut got = 0u64;
        let mut last_progress = started;
        let mut buf = vec![0u8; 1 << 18];
        let mut ended_early = 0;
        // Once, then again from where it stopped while a connection ends early.
        loop {
            let mut request = self.get(url.as_str());
            if got > 0 {
                request = request.set("Range", &format!("bytes={got}-"));
            }
            let response = self.call(
                request,
                &format!("downloading {what}"),
                "not at the commit the listing names",
            )?;
            match response.status() {
                200 if got > 0 => {
                    // The server ignored the range: the whole file again, from its start.
                    file.set_len(0)
                        .and_then(|()| file.rewind())
                        .map_err(|e| format!("hub: {what}: {e}"))?;
                    got = 0;
                    hasher = r.hashed.then(Sha256::new);
                }
                200 => {}
                206 if got > 0 => {
                    let range = response.header("content-range").unwrap_or("");
                    if !range.starts_with(&format!("bytes {got}-")) {
                        return Err(format!(
                            "hub: {what}: asked for the bytes from {got}, the server sent {:?}",
                            shown(range)
                        ));
                    }
                }
                status => {
                    return Err(format!(
                        "hub: downloading {what}: the server answered {status}"
                    ));
                }
            }
            if let Some(length) = response
                .header("content-length")
                .and_then(|v| v.trim().parse::<u64>().ok())
                && got.saturating_add(length) > r.size
            {
                return Err(format!(
                    "hub: {what}: the server announces {} bytes, where the listing gives {}",
                    got.saturating_add(length),
                    r.size
                ));
            }
            let mut reader = response.into_reader();
            let mut window_start = Instant::now();
            let mut window_bytes = 0u64;
            let ended = loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break None,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => break Some(e.to_string()),
                };
                if got + n as u64 > r.size {
                    return Err(format!(
                        "hub: {what}: the server sent more than the {} bytes the listing gives",
                        r.size
                    ));
                }
                file.write_all(&buf[..n])
                    .map_err(|e| format!("hub: {what}: writing {}: {e}", partial.path.display()))?;
                if let Some(h) = hasher.as_mut() {
                    h.update(&buf[..n]);
                }
                got += n as u64;
                window_bytes += n as u64;
                let now = Instant::now();
                if now.duration_since(window_start) >= limits.rate_window {
                    if window_bytes < limits.min_bytes_per_window {
                        return Err(format!(
                            "hub: {what}: stalled: {window_bytes} bytes in {:.1} s, where a \
                             download needs {} (at {got} of {} bytes)",
                            now.duration_since(window_start).as_secs_f64(),
                            limits.min_bytes_per_window,
                            r.size
                        ));
                    }
                    window_start = now;
                    window_bytes = 0;
                }
                if now.duration_since(last_progress) >= limits.progress_every {
                    last_progress = now;
                    let seconds = now.duration_since(started).as_secs_f64().max(1e-3);
                    crate::log::progress(&format!(
                        "downloading {what}: {got} of {} bytes ({:.0} %, {:.1} MB/s)",
                        r.size,
                        100.0 * got as f64 / r.size.max(1) as f64,
                        got as f64 / seconds / 1e6
                    ));
                }
                if got == r.size {
                    break None;
                }
            };
            if got == r.size {
                break;
            }
            ended_early += 1;
            if ended_early > limits.resumes {
                return Err(format!(
                    "hub: {what}: {got} of {} bytes arrived before the connection ended ({}), \
                     {} times",
                    r.size,
                    ended.as_deref().unwrap_or("closed"),
                    ended_early
                ));
            }
        }
        if let Some(h) = hasher {
            let actual: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            if actual != r.blob {
                return Err(format!(
                    "hub: {what}: its bytes hash to SHA-256 {actual}, where the listing gives \
                     {}; not kept",
                    r.blob
                ));
            }
        }
        partial
            .keep(&blobs.join(&r.blob))
            .map_err(|e| format!("hub: {what}: {e}"))?;
        crate::log::progress(&format!(
            "downloaded {what} ({} bytes) in {:.1} s",
            r.size,
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }
}

/// A blob being written under a name of its own (this process and attempt), removed unless
/// kept: two processes fetching one blob each write their own and the last rename wins, with
/// the same bytes.
struct Partial {
    path: PathBuf,
    file: std::fs::File,
    kept: bool,
}

impl Partial {
    fn create(blobs: &Path, blob: &str) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = blobs.join(format!("{blob}.{}.{n}.incomplete", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Self {
            path,
            file,
            kept: false,
        })
    }

    fn keep(mut self, to: &Path) -> std::io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.path, to)?;
        self.kept = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `snapshot/<name>` pointing at `blobs/<blob>`: a relative link, as `huggingface_hub` makes
/// (a copy where links cannot be made).
fn link(snapshot: &Path, name: &str, blob: &str) -> std::io::Result<()> {
    let place = snapshot.join(name);
    if let Some(parent) = place.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // From snapshots/<commit>/<name>'s folder up to the repository's folder.
    let depth = Path::new(name).components().count() + 1;
    let target: PathBuf = std::iter::repeat_n(Component::ParentDir.as_os_str(), depth)
        .collect::<PathBuf>()
        .join("blobs")
        .join(blob);
    match std::fs::symlink_metadata(&place) {
        Ok(_) => std::fs::remove_file(&place)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&target, &place)
    }
    #[cfg(not(unix))]
    {
        let from = place.parent().unwrap_or(snapshot).join(&target);
        std::fs::copy(from, &place).map(|_| ())
    }
}

/// `refs/main` naming `commit`, replaced whole.
fn write_ref(repo: &Path, commit: &str) -> std::io::Result<()> {
    let refs = repo.join("refs");
    std::fs::create_dir_all(&refs)?;
    let partial = refs.join(format!("main.{}.incomplete", std::process::id()));
    std::fs::write(&partial, commit)?;
    std::fs::rename(&partial, refs.join("main"))
}

/// Whether `name` (a file of the listing) is a relative path that stays inside the folder it
/// is joined to: plain parts only, no `..`, no root, no drive, no backslash.
fn is_relative_inside(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 1024
        && !name.contains('\\')
        && !name.contains('\0')
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Whether `endpoint`'s host is this machine or one `no_proxy` (the `NO_PROXY` list: host names
/// or domains, `*` for all) names, so that its connections go direct.
fn bypasses_proxy(endpoint: &str, no_proxy: &str) -> bool {
    let Some(host) = url::Url::parse(endpoint).ok().and_then(|u| {
        u.host_str()
            .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
    }) else {
        return false;
    };
    if host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    {
        return true;
    }
    no_proxy.split(',').map(str::trim).any(|entry| {
        let domain = entry.trim_start_matches('.').to_ascii_lowercase();
        entry == "*"
            || (!domain.is_empty() && (host == domain || host.ends_with(&format!(".{domain}"))))
    })
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A peer's text as a message shows it: at most 80 characters.
fn shown(text: &str) -> String {
    text.chars().take(80).collect()
}

/// Bytes the disk holding `dir` has free for this user, where the system says.
#[cfg(unix)]
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `path` is a NUL-terminated string and `stat` a place for the answer, both alive
    // through the call; statvfs writes nothing else.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::statvfs(path.as_ptr(), &mut stat) } == 0;
    ok.then(|| (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
#[path = "download_tests.rs"]
mod tests;
