//! IP-Adapter's style picture: fetched from `ip_adapter_style_image_url`, decoded (PNG or JPEG),
//! and kept in a small process-wide cache so that a URL is fetched once — by the engine's builder
//! thread before a change needs it, so that no frame waits for the network.
//!
//! The URL comes with a body, usually someone else's, so the fetch is bounded every way:
//! * where it goes: only `http(s)://` to the addresses the settings' [`OutboundPolicy`] lets
//!   through, judged on the address resolved and connected to; redirects are followed here, at
//!   most [`MAX_STYLE_REDIRECTS`], each one checked again the same way, and never to another
//!   scheme or to a URL with a user name or password; no proxy from the environment;
//! * what it tells: every way an http(s) fetch can fail (refused by the policy, no such host,
//!   connection refused, a 404, not a picture) reads the same to the client, [`NOT_FETCHED`],
//!   so that the field cannot map the server's network; why it failed goes to the log;
//! * how much: [`MAX_STYLE_BYTES`] read, within [`STYLE_FETCH_TIMEOUT`] for the whole chain of
//!   redirects, a picture of at most [`MAX_STYLE_PIXELS`] pixels judged from its header before
//!   anything is decoded, a cache of at most [`CACHE_ENTRIES`] pictures and [`CACHE_BYTES`];
//! * whom it holds up: one URL's fetch makes only the streams asking for that same URL wait
//!   (they share it); other URLs are fetched beside it.
//!
//! `data:` URLs and (where the settings allow model paths) local files are the caller's own
//! bytes: their errors say what is wrong with them.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use image::ImageDecoder as _;

use crate::outbound::{self, OutboundPolicy};
use crate::params::EngineSettings;
use crate::{Error, Result};

/// Largest style file read (bytes): a picture of this size encodes to 4 tokens like any other.
pub const MAX_STYLE_BYTES: u64 = 20 << 20;
/// Longest a fetch may take, connection and every redirect included.
pub const STYLE_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Most redirects followed.
pub const MAX_STYLE_REDIRECTS: usize = 5;
/// Largest side of a decoded style picture.
pub const MAX_STYLE_SIDE: u32 = 8192;
/// Most pixels a style picture may have (4096², 16.7 M; its packed RGB is at most 48 MiB). The
/// adapter shrinks it to 224×224, so a larger one buys nothing; checked on the header, before
/// anything is decoded (an 11 KB PNG can claim 8192×8192).
pub const MAX_STYLE_PIXELS: u64 = 1 << 24;
/// Most bytes the decoder may allocate for a picture in its own layout (64 MiB: a 4096² RGBA
/// picture; 16 bits a channel take twice as much, so such pictures must be smaller).
pub const MAX_STYLE_DECODE_BYTES: u64 = 64 << 20;
/// How many fetched pictures the cache keeps (the most recently used).
pub const CACHE_ENTRIES: usize = 8;
/// Most bytes the cache holds: pictures' RGB and their URLs (a `data:` URL can be 27 MB).
pub const CACHE_BYTES: usize = 64 << 20;
/// What the client reads for every failed http(s) fetch, whatever the reason.
pub const NOT_FETCHED: &str = "the style picture could not be fetched (why is in the server's log)";

const FIELD: &str = "ip_adapter_style_image_url";

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

    /// Decodes a PNG or JPEG file's bytes. The size is judged from the header first: a picture
    /// over [`MAX_STYLE_SIDE`] a side, [`MAX_STYLE_PIXELS`] pixels or
    /// [`MAX_STYLE_DECODE_BYTES`] decoded is refused before its pixels are allocated.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        let bad = |detail: String| Error::param(FIELD, format!("{what}: {detail}"));
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| bad(e.to_string()))?;
        if !matches!(
            reader.format(),
            Some(image::ImageFormat::Png | image::ImageFormat::Jpeg)
        ) {
            return Err(bad("not a PNG or JPEG picture".into()));
        }
        // Reads the header only.
        let mut decoder = reader
            .into_decoder()
            .map_err(|e| bad(format!("cannot read the picture's header: {e}")))?;
        let (w, h) = decoder.dimensions();
        if w > MAX_STYLE_SIDE || h > MAX_STYLE_SIDE {
            return Err(bad(format!(
                "{w}×{h} is larger than {MAX_STYLE_SIDE} pixels a side"
            )));
        }
        let pixels = u64::from(w) * u64::from(h);
        if pixels > MAX_STYLE_PIXELS {
            return Err(bad(format!(
                "{w}×{h} is {pixels} pixels, more than {MAX_STYLE_PIXELS} (the picture is \
                 shrunk to 224×224 anyway)"
            )));
        }
        let decoded = decoder.total_bytes();
        if decoded > MAX_STYLE_DECODE_BYTES {
            return Err(bad(format!(
                "{w}×{h} in {:?} decodes to {decoded} bytes, more than {MAX_STYLE_DECODE_BYTES}",
                decoder.color_type()
            )));
        }
        // The decoder holds to the same bounds for whatever it allocates besides.
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_STYLE_SIDE);
        limits.max_image_height = Some(MAX_STYLE_SIDE);
        limits.max_alloc = Some(MAX_STYLE_DECODE_BYTES);
        decoder
            .set_limits(limits)
            .map_err(|e| bad(format!("cannot decode the picture: {e}")))?;
        let decoded = image::DynamicImage::from_decoder(decoder)
            .map_err(|e| bad(format!("cannot decode the picture: {e}")))?
            .into_rgb8();
        let (width, height) = (decoded.width() as usize, decoded.height() as usize);
        Self::from_rgb(decoded.into_raw(), width, height)
    }
}

/// Where style pictures may come from: which addresses an http(s) URL may reach, and whether
/// `file://` URLs and plain paths are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FetchPolicy {
    /// The addresses http(s) fetches may connect to.
    pub outbound: OutboundPolicy,
    /// Whether local files may be read (the engine's `allow_model_paths`).
    pub allow_files: bool,
}

impl FetchPolicy {
    /// The policy of an engine with `settings`: `allow_private_network` and `allow_model_paths`.
    pub fn of(settings: &EngineSettings) -> Self {
        Self {
            outbound: settings.outbound_policy(),
            allow_files: settings.allow_model_paths,
        }
    }
}

/// The picture at `url`: `http(s)://` (fetched under `policy`), `data:image/…;base64,…`, or —
/// when `policy.allow_files` — `file://` and plain paths. A failed http(s) fetch is
/// [`NOT_FETCHED`] on the field whatever the reason, which goes to the log.
pub fn fetch(url: &str, policy: FetchPolicy) -> Result<StyleImage> {
    let url = url.trim();
    if url.is_empty() {
        return Err(Error::param(
            FIELD,
            "is empty: give the URL of a PNG or JPEG picture",
        ));
    }
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return fetch_http(url, policy.outbound).map_err(|failure| {
            log_not_fetched(url, &failure);
            not_fetched()
        });
    }
    if let Some(rest) = lower.strip_prefix("data:") {
        let Some(comma) = rest.find(',') else {
            return Err(Error::param(FIELD, "a data: URL without a comma"));
        };
        if !rest[..comma].ends_with(";base64") {
            return Err(Error::param(
                FIELD,
                "data: URLs must be base64 (data:image/png;base64,…)",
            ));
        }
        let payload = &url["data:".len() + comma + 1..];
        if payload.len() as u64 > MAX_STYLE_BYTES * 4 / 3 + 4 {
            return Err(Error::param(
                FIELD,
                format!("the data: URL holds more than {MAX_STYLE_BYTES} bytes"),
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| Error::param(FIELD, format!("bad base64 in the data: URL: {e}")))?;
        return StyleImage::decode(&bytes, "the data: URL");
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if !policy.allow_files {
        return Err(Error::param(
            FIELD,
            "not an http(s):// or data: URL (local files are not allowed here)",
        ));
    }
    let meta = std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    if meta.len() > MAX_STYLE_BYTES {
        return Err(Error::param(
            FIELD,
            format!("{path} is larger than {MAX_STYLE_BYTES} bytes"),
        ));
    }
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    StyleImage::decode(&bytes, path)
}

/// The one error a client gets for a failed http(s) fetch.
fn not_fetched() -> Error {
    Error::param(FIELD, NOT_FETCHED)
}

/// Why an http(s) fetch failed; for the log only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Not attempted: the policy refused the address, the scheme, a user name, or one more
    /// redirect.
    Refused(String),
    /// Attempted: the name did not resolve, the connection or the answer failed, the answer is
    /// not a picture within the bounds.
    Failed(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(why) => write!(f, "refused: {why}"),
            Failure::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// A URL the fetch may request: http or https, with a host, without a user name or password.
fn check_hop(url: url::Url) -> std::result::Result<url::Url, Failure> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Failure::Refused(format!(
            "{}: URLs are not fetched, only http and https",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Failure::Refused(
            "a URL with a user name or password is not fetched".into(),
        ));
    }
    if url.host().is_none() {
        return Err(Failure::Refused("a URL without a host".into()));
    }
    Ok(url)
}

/// Fetches and decodes the picture at an http(s) `url`, every connection under `policy`.
pub(crate) fn fetch_http(
    url: &str,
    policy: OutboundPolicy,
) -> std::result::Result<StyleImage, Failure> {
    let bytes = fetch_http_bytes(url, policy)?;
    StyleImage::decode(&bytes, "the answer").map_err(|e| {
        Failure::Failed(match e {
            Error::InvalidParam { message, .. } => message,
            other => other.to_string(),
        })
    })
}

fn fetch_http_bytes(url: &str, policy: OutboundPolicy) -> std::result::Result<Vec<u8>, Failure> {
    let deadline = Instant::now() + STYLE_FETCH_TIMEOUT;
    // The resolver is where the policy sees the address a connection is about to use, after
    // every way of writing it has been resolved; redirects are followed below so that each
    // hop's URL is checked too.
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .try_proxy_from_env(false)
        .timeout(STYLE_FETCH_TIMEOUT)
        .resolver(move |netloc: &str| policy.resolve_netloc(netloc))
        .build();
    let parsed = url::Url::parse(url).map_err(|e| Failure::Failed(format!("not a URL: {e}")))?;
    let mut current = check_hop(parsed)?;
    let mut redirects = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::Failed(format!(
                "no picture within {} s",
                STYLE_FETCH_TIMEOUT.as_secs()
            )));
        }
        let response = match agent.get(current.as_str()).timeout(left).call() {
            Ok(response) => response,
            Err(ureq::Error::Status(code, _)) => {
                return Err(Failure::Failed(format!("{current} answered {code}")));
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(match outbound::refusal_in(&t) {
                    Some(refusal) => Failure::Refused(format!("{current}: {refusal}")),
                    // ureq's message names the URL.
                    None => Failure::Failed(t.to_string()),
                });
            }
        };
        let status = response.status();
        if (300..400).contains(&status) {
            redirects += 1;
            if redirects > MAX_STYLE_REDIRECTS {
                return Err(Failure::Refused(format!(
                    "more than {MAX_STYLE_REDIRECTS} redirects"
                )));
            }
            let location = response.header("location").ok_or_else(|| {
                Failure::Failed(format!("{current} answered {status} without a Location"))
            })?;
            let next = current.join(location).map_err(|e| {
                Failure::Refused(format!("a redirect to {location:?}, not a URL: {e}"))
            })?;
            current = check_hop(next).map_err(|failure| match failure {
                Failure::Refused(why) => Failure::Refused(format!("a redirect: {why}")),
                other => other,
            })?;
            continue;
        }
        if let Some(len) = response
            .header("content-length")
            .and_then(|v| v.parse::<u64>().ok())
            && len > MAX_STYLE_BYTES
        {
            return Err(Failure::Failed(format!(
                "{current} is {len} bytes, more than {MAX_STYLE_BYTES}"
            )));
        }
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(MAX_STYLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Failure::Failed(format!("reading {current} failed: {e}")))?;
        if bytes.len() as u64 > MAX_STYLE_BYTES {
            return Err(Failure::Failed(format!(
                "{current} is more than {MAX_STYLE_BYTES} bytes"
            )));
        }
        return Ok(bytes);
    }
}

/// The URL as the log shows it: no user name or password, no query, at most 200 characters.
fn loggable(url: &str) -> String {
    let shown = match url::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.set_query(None);
            parsed.to_string()
        }
        Err(_) => "(not a URL)".into(),
    };
    shown.chars().take(200).collect()
}

fn log_not_fetched(url: &str, failure: &Failure) {
    let url = loggable(url);
    tracing::warn!(%url, %failure, "{FIELD}: the style picture was not fetched");
}

/// Fetched pictures, most recently used last, bounded in count and in bytes.
#[derive(Debug)]
pub(crate) struct StyleCache {
    entries: VecDeque<(String, StyleImage)>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    evicted: u64,
}

impl StyleCache {
    pub(crate) const fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
            evicted: 0,
        }
    }

    fn cost(key: &str, picture: &StyleImage) -> usize {
        key.len() + picture.rgb.len()
    }

    /// The picture kept under `key`, now the most recently used.
    pub(crate) fn get(&mut self, key: &str) -> Option<StyleImage> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        let entry = self.entries.remove(i)?;
        let picture = entry.1.clone();
        self.entries.push_back(entry);
        Some(picture)
    }

    /// Keeps `picture` under `key`, dropping the least recently used until both bounds hold;
    /// one larger than the byte bound on its own is not kept.
    pub(crate) fn insert(&mut self, key: String, picture: StyleImage) {
        if let Some(i) = self.entries.iter().position(|(k, _)| *k == key)
            && let Some((k, old)) = self.entries.remove(i)
        {
            self.bytes -= Self::cost(&k, &old);
        }
        let cost = Self::cost(&key, &picture);
        if cost > self.max_bytes {
            return;
        }
        while !self.entries.is_empty()
            && (self.entries.len() >= self.max_entries || self.bytes + cost > self.max_bytes)
        {
            if let Some((k, old)) = self.entries.pop_front() {
                self.bytes -= Self::cost(&k, &old);
                self.evicted += 1;
            }
        }
        self.bytes += cost;
        self.entries.push_back((key, picture));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted
    }
}

/// The process-wide cache, by policy and URL.
static CACHE: Mutex<StyleCache> = Mutex::new(StyleCache::new(CACHE_ENTRIES, CACHE_BYTES));

/// A fetch in progress: the streams asking for the same URL wait for its outcome.
#[derive(Default)]
struct Flight {
    outcome: Mutex<Option<std::result::Result<StyleImage, String>>>,
    done: Condvar,
}

/// Fetches in progress, by cache key.
static FLIGHTS: Mutex<Vec<(String, Arc<Flight>)>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A picture fetched under one policy is not one another policy may have: the key holds both.
fn cache_key(url: &str, policy: FetchPolicy) -> String {
    format!("{policy:?} {url}")
}

/// Ends a flight however its fetch ends (a panic included): the waiters get the outcome (or an
/// error) and the flight leaves the list.
struct Leading {
    key: String,
    flight: Arc<Flight>,
}

impl Leading {
    fn finish(&self, outcome: std::result::Result<StyleImage, String>) {
        lock(&self.flight.outcome).get_or_insert(outcome);
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        self.finish(Err("the fetch of the style picture stopped".into()));
        lock(&FLIGHTS).retain(|(k, _)| *k != self.key);
        self.flight.done.notify_all();
    }
}

/// The picture at `url`, fetched unless the cache has it ([`fetch`]). Callers asking for the
/// same URL at once share one fetch; other URLs do not wait for it.
pub fn fetch_cached(url: &str, policy: FetchPolicy) -> Result<StyleImage> {
    let key = cache_key(url, policy);
    if let Some(found) = lock(&CACHE).get(&key) {
        return Ok(found);
    }
    let role = {
        let mut flights = lock(&FLIGHTS);
        // Looked at again with the flights held: a fetch that ended meanwhile cached its
        // picture before leaving the list.
        if let Some(found) = lock(&CACHE).get(&key) {
            return Ok(found);
        }
        match flights.iter().find(|(k, _)| *k == key) {
            Some((_, flight)) => Role::Waiting(flight.clone()),
            None => {
                let flight = Arc::new(Flight::default());
                flights.push((key.clone(), flight.clone()));
                Role::Leading(Leading { key, flight })
            }
        }
    };
    match role {
        Role::Leading(leading) => {
            let outcome = fetch(url, policy);
            if let Ok(picture) = &outcome {
                lock(&CACHE).insert(leading.key.clone(), picture.clone());
            }
            leading.finish(match &outcome {
                Ok(picture) => Ok(picture.clone()),
                Err(Error::InvalidParam { message, .. }) => Err(message.clone()),
                Err(other) => Err(other.to_string()),
            });
            outcome
        }
        Role::Waiting(flight) => {
            let mut outcome = lock(&flight.outcome);
            loop {
                match outcome.as_ref() {
                    Some(Ok(picture)) => return Ok(picture.clone()),
                    Some(Err(message)) => return Err(Error::param(FIELD, message.clone())),
                    None => {
                        outcome = flight
                            .done
                            .wait(outcome)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
            }
        }
    }
}

/// Whether a caller fetches a URL itself or waits for the fetch already under way.
enum Role {
    Leading(Leading),
    Waiting(Arc<Flight>),
}

/// The cached picture of `url` under `policy`, if fetched already (no network).
pub fn cached(url: &str, policy: FetchPolicy) -> Option<StyleImage> {
    lock(&CACHE).get(&cache_key(url, policy))
}

#[cfg(test)]
mod tests;
