//! IP-Adapter's style picture: fetched from `ip_adapter_style_image_url` (bounded in size and
//! time), decoded (PNG or JPEG), and kept in a small process-wide cache so that a URL is fetched
//! once — by the engine's builder thread before a change needs it, so that no frame waits for
//! the network.

use std::io::Read;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;

use crate::{Error, Result};

/// Largest style file read (bytes): a picture of this size encodes to 4 tokens like any other.
pub const MAX_STYLE_BYTES: u64 = 20 << 20;
/// Longest a fetch may take, connection included.
pub const STYLE_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest side of a decoded style picture.
pub const MAX_STYLE_SIDE: u32 = 8192;
/// How many fetched pictures the cache keeps (the most recently used).
const CACHE_ENTRIES: usize = 8;

/// A decoded style picture: packed 8-bit RGB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StyleImage {
    /// `width · height · 3` bytes, row-major.
    pub rgb: Arc<Vec<u8>>,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
}

impl StyleImage {
    /// A picture from packed RGB bytes; fails unless `rgb` holds `width · height · 3` bytes.
    pub fn from_rgb(rgb: Vec<u8>, width: usize, height: usize) -> Result<Self> {
        if width == 0 || height == 0 || rgb.len() != width * height * 3 {
            return Err(Error::InvalidFrame(format!(
                "style image: expected {width}×{height} packed RGB ({} bytes), got {} bytes",
                width * height * 3,
                rgb.len()
            )));
        }
        Ok(Self {
            rgb: Arc::new(rgb),
            width,
            height,
        })
    }

    /// A picture from a host frame in any of the engine's pixel formats (copied).
    pub fn from_frame(frame: crate::Frame<'_>) -> Result<Self> {
        let (width, height) = (frame.width(), frame.height());
        Self::from_rgb(frame.to_rgb8(), width, height)
    }

    /// Decodes a PNG or JPEG file's bytes.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        let bad = |detail: String| {
            Error::param("ip_adapter_style_image_url", format!("{what}: {detail}"))
        };
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| bad(e.to_string()))?;
        if reader.format().is_none() {
            return Err(bad("not a PNG or JPEG picture".into()));
        }
        let (w, h) = reader
            .into_dimensions()
            .map_err(|e| bad(format!("cannot read the picture's size: {e}")))?;
        if w > MAX_STYLE_SIDE || h > MAX_STYLE_SIDE {
            return Err(bad(format!(
                "{w}×{h} is larger than {MAX_STYLE_SIDE} pixels a side"
            )));
        }
        let decoded = image::load_from_memory(bytes)
            .map_err(|e| bad(format!("cannot decode the picture: {e}")))?
            .to_rgb8();
        let (width, height) = (decoded.width() as usize, decoded.height() as usize);
        Self::from_rgb(decoded.into_raw(), width, height)
    }
}

/// Where a style picture comes from: `http(s)://` (fetched), `data:image/…;base64,…`, or — when
/// `allow_files` (the engine's `allow_model_paths`) — `file://` and plain paths.
pub fn fetch(url: &str, allow_files: bool) -> Result<StyleImage> {
    let field = "ip_adapter_style_image_url";
    let url = url.trim();
    if url.is_empty() {
        return Err(Error::param(
            field,
            "is empty: give the URL of a PNG or JPEG picture",
        ));
    }
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let bytes = fetch_http(url)?;
        return StyleImage::decode(&bytes, url);
    }
    if let Some(rest) = lower.strip_prefix("data:") {
        let Some(comma) = rest.find(',') else {
            return Err(Error::param(field, "a data: URL without a comma"));
        };
        if !rest[..comma].ends_with(";base64") {
            return Err(Error::param(
                field,
                "data: URLs must be base64 (data:image/png;base64,…)",
            ));
        }
        let payload = &url["data:".len() + comma + 1..];
        if payload.len() as u64 > MAX_STYLE_BYTES * 4 / 3 + 4 {
            return Err(Error::param(
                field,
                format!("the data: URL holds more than {MAX_STYLE_BYTES} bytes"),
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| Error::param(field, format!("bad base64 in the data: URL: {e}")))?;
        return StyleImage::decode(&bytes, "the data: URL");
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if !allow_files {
        return Err(Error::param(
            field,
            format!("{url:?} is not an http(s):// or data: URL (local files are not allowed here)"),
        ));
    }
    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    if meta.len() > MAX_STYLE_BYTES {
        return Err(Error::param(
            field,
            format!("{path} is larger than {MAX_STYLE_BYTES} bytes"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    StyleImage::decode(&bytes, path)
}

fn fetch_http(url: &str) -> Result<Vec<u8>> {
    let field = "ip_adapter_style_image_url";
    let agent = ureq::AgentBuilder::new()
        .timeout(STYLE_FETCH_TIMEOUT)
        .redirects(5)
        .build();
    let response = agent
        .get(url)
        .call()
        .map_err(|e| Error::param(field, format!("fetching {url} failed: {e}")))?;
    if let Some(len) = response
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok())
        && len > MAX_STYLE_BYTES
    {
        return Err(Error::param(
            field,
            format!("{url} is {len} bytes, more than {MAX_STYLE_BYTES}"),
        ));
    }
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(MAX_STYLE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::param(field, format!("reading {url} failed: {e}")))?;
    if bytes.len() as u64 > MAX_STYLE_BYTES {
        return Err(Error::param(
            field,
            format!("{url} is more than {MAX_STYLE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// The process-wide cache of fetched pictures, by URL (most recent last).
static CACHE: Mutex<Vec<(String, StyleImage)>> = Mutex::new(Vec::new());
/// Serialises fetches, so that two streams asking for one URL fetch it once.
static FETCHING: Mutex<()> = Mutex::new(());

/// The picture at `url`, fetched unless the cache has it ([`fetch`]).
pub fn fetch_cached(url: &str, allow_files: bool) -> Result<StyleImage> {
    if let Some(found) = cached(url) {
        return Ok(found);
    }
    let _fetching = FETCHING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(found) = cached(url) {
        return Ok(found);
    }
    let picture = fetch(url, allow_files)?;
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    cache.retain(|(u, _)| u != url);
    if cache.len() >= CACHE_ENTRIES {
        cache.remove(0);
    }
    cache.push((url.to_string(), picture.clone()));
    Ok(picture)
}

/// The cached picture of `url`, if fetched already (no network).
pub fn cached(url: &str) -> Option<StyleImage> {
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    let i = cache.iter().position(|(u, _)| u == url)?;
    let entry = cache.remove(i);
    let picture = entry.1.clone();
    cache.push(entry);
    Some(picture)
}
