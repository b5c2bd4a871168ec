//! Checkpoints facing an attacker: thousands of mutated copies of the files a model load reads,
//! each loaded as a load does, every tensor read and checked, the network built and run once.
//! None may panic, and none may allocate more than a bound set by its own size (a counting
//! allocator watches this test binary, which holds only these tests).
//!
//! - Weight files (torch.save's zip archives, torch's legacy format, safetensors): bits flipped,
//!   bytes cut, inserted or set to extremes, integers in the format's own fields (zip headers,
//!   the pickle's arguments, the safetensors header's offsets, shapes and length) replaced by
//!   boundary values. A torch archive's pickle is also mutated on its own and the archive
//!   written again around it, so that the pickle machine, not the zip's checksum, meets it.
//! - Configs (`config.json` of the UNet, VAE, TAESD and text encoder): values replaced by
//!   zeros, negatives, huge numbers, fractions, nulls, other types; keys removed; lists grown
//!   or cut. Those that load are run on a small input.
//! - LoRAs: well-formed files whose tensors are reshaped, renamed, dropped or doubled, or whose
//!   alphas are odd, fused into the UNet and text encoder they were made for, then run.
//! - Networks sized by their tensors (the processors' HED, lineart, OpenPose and Real-ESRGAN,
//!   the IP-Adapters): tensors reshaped, dropped, doubled or renumbered; loaded and run.
//! - Shard indexes and tokenizer folders: values replaced, entries sent to other files.
//! - Single files in the original layout (SD 1.x, 2.x, SDXL): tensors renamed, reshaped,
//!   dropped or doubled, and the family's configs mutated; each converted into diffusers'
//!   tensors or refused.
//!
//! `SDSTREAM_WEIGHT_FUZZ_RUNS` sets the cases per set and `SDSTREAM_WEIGHT_FUZZ_SEED` other
//! mutations, for a longer campaign than CI's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use sdstream_models::weights::WeightsFile;

/// Counts the largest single allocation and the peak of live bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc requires.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(live, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        LARGEST.fetch_max(size, Relaxed);
        // SAFETY: as GlobalAlloc::realloc requires.
        let q = unsafe { System.realloc(p, layout, size) };
        if !q.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            let live = LIVE.fetch_add(size, Relaxed) + size;
            PEAK.fetch_max(live, Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The counters are the process's: one test runs at a time, from before it reads its fixtures.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// xorshift64*: the same mutations on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(relative)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sdstream-weight-fuzz-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Copies every file of the fixture folder `source` into `dir`.
fn copy_folder(source: &Path, dir: &Path) {
    for entry in std::fs::read_dir(source).expect("fixture folder") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Integers a field is set to: the edges of every width, and small ones.
const EXTREMES: [u64; 12] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
    0x1_0000_0000,
];

/// One to four mutations of `base`, some at the `fields` (offsets of integers the format reads).
fn mutate(rng: &mut Rng, base: &[u8], fields: &[(usize, usize)]) -> Vec<u8> {
    let mut data = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        if data.is_empty() {
            break;
        }
        match rng.below(7) {
            0 => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(data.len());
                data[i] = [0, 0xff, 0x7f, 0x80][rng.below(4)];
            }
            2 => {
                let cut = rng.below(data.len());
                data.truncate(cut);
            }
            3 => {
                let i = rng.below(data.len());
                let n = 1 + rng.below(16);
                let end = (i + n).min(data.len());
                data.drain(i..end);
            }
            4 => {
                let i = rng.below(data.len());
                let byte = rng.next() as u8;
                for _ in 0..1 + rng.below(8) {
                    data.insert(i, byte);
                }
            }
            _ => {
                // An integer field (or, without any, anywhere) set to an extreme.
                let (at, width) = if fields.is_empty() || rng.below(4) == 0 {
                    (rng.below(data.len()), [1, 2, 4, 8][rng.below(4)])
                } else {
                    fields[rng.below(fields.len())]
                };
                let value = EXTREMES[rng.below(EXTREMES.len())].to_le_bytes();
                for (k, byte) in value.iter().enumerate().take(width) {
                    if let Some(b) = data.get_mut(at + k) {
                        *b = *byte;
                    }
                }
            }
        }
    }
    data
}

/// What a model load does with a weights file: open it, read every tensor, check them.
fn load_all(path: &Path) -> Result<usize, String> {
    let file = WeightsFile::open(path).map_err(|e| e.to_string())?;
    let names: Vec<String> = file.tensors().map(|(n, _)| n.to_string()).collect();
    for name in &names {
        file.load_numeric_f32(name).map_err(|e| e.to_string())?;
    }
    file.check_all_finite().map_err(|e| e.to_string())?;
    Ok(names.len())
}

/// Outcome of a mutated set.
#[derive(Debug, Default)]
struct Tally {
    loaded: usize,
    refused: usize,
    largest: usize,
    peak: usize,
    messages: std::collections::BTreeMap<String, usize>,
}

impl Tally {
    /// Runs one case, records its largest allocation and its peak above the live bytes before
    /// it, and counts it: what it gave where it loaded (`Some(Some(_))`), `Some(None)` where it
    /// was refused, `None` where it panicked.
    fn case<T>(&mut self, load: impl FnOnce() -> Result<T, String>) -> Option<Option<T>> {
        LARGEST.store(0, Relaxed);
        let before = LIVE.load(Relaxed);
        PEAK.store(before, Relaxed);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load));
        self.largest = self.largest.max(LARGEST.load(Relaxed));
        self.peak = self.peak.max(PEAK.load(Relaxed).saturating_sub(before));
        match outcome {
            Ok(Ok(value)) => {
                self.loaded += 1;
                Some(Some(value))
            }
            Ok(Err(message)) => {
                self.refused += 1;
                *self.messages.entry(kind_of(&message)).or_default() += 1;
                Some(None)
            }
            Err(_) => None,
        }
    }

    /// Prints the counts, the allocations and how many refusals of each kind.
    fn report(&self, what: &str) {
        eprintln!(
            "{what}: {} loaded, {} refused; largest allocation {} bytes, peak {} bytes",
            self.loaded, self.refused, self.largest, self.peak
        );
        for (kind, n) in &self.messages {
            eprintln!("  {n:5} × {kind}");
        }
    }
}

/// A refusal's words without names, paths and numbers, so that like messages group.
fn kind_of(message: &str) -> String {
    message
        .split_whitespace()
        .filter(|w| !w.contains('`') && !w.contains('/') && !w.chars().any(|c| c.is_ascii_digit()))
        .take(8)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes each mutation to `path`, loads it, and counts; a panic keeps the file and names it.
fn run(
    what: &str,
    runs: usize,
    path: &Path,
    mut make: impl FnMut(&mut Rng) -> Vec<u8>,
    seed: u64,
) -> Tally {
    let mut rng = seeded(seed);
    let mut tally = Tally::default();
    for i in 0..runs {
        let data = make(&mut rng);
        std::fs::write(path, &data).expect("write the mutated file");
        if tally.case(|| load_all(path)).is_none() {
            let kept = path.with_extension(format!("panicked-{i}"));
            std::fs::write(&kept, &data).ok();
            panic!(
                "{what}: mutated file {i} panicked the loader (kept at {})",
                kept.display()
            )
        }
    }
    tally.report(&format!("{what}: {runs} mutated files"));
    tally
}

/// `SDSTREAM_WEIGHT_FUZZ_SEED` gives a longer campaign other mutations than CI's.
fn seeded(seed: u64) -> Rng {
    let extra = std::env::var("SDSTREAM_WEIGHT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Rng(seed ^ extra.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn runs(default: usize) -> usize {
    std::env::var("SDSTREAM_WEIGHT_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The entries of a stored zip archive, in order.
fn entries(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut zip = zip::ZipArchive::new(Cursor::new(archive)).expect("fixture archive");
    (0..zip.len())
        .map(|i| {
            let mut f = zip.by_index(i).expect("entry");
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).expect("entry bytes");
            (f.name().expect("entry name").to_string(), bytes)
        })
        .collect()
}

fn write_archive(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        zip.start_file(name, stored).expect("entry");
        zip.write_all(bytes).expect("entry bytes");
    }
    zip.finish().expect("archive").into_inner()
}

/// Offsets of a pickle's integer arguments (BININT, BININT1, BININT2, LONG1, BINUNICODE and
/// SHORT_BINUNICODE lengths, BINPUT/BINGET memo keys), found by opcode byte: some are not
/// opcodes, which only makes the mutation blinder.
fn pickle_fields(pickle: &[u8]) -> Vec<(usize, usize)> {
    let mut fields = Vec::new();
    for (i, &op) in pickle.iter().enumerate() {
        let width = match op {
            b'J' | b'X' | b'r' | b'j' => 4,
            b'K' | b'q' | b'h' | b'\x8c' | b'\x8a' => 1,
            b'M' => 2,
            _ => continue,
        };
        fields.push((i + 1, width));
    }
    fields
}

/// Offsets of a zip's header fields: sizes, offsets, counts and name lengths of its local and
/// central headers and its end records.
fn zip_fields(archive: &[u8]) -> Vec<(usize, usize)> {
    let mut fields = Vec::new();
    for i in 0..archive.len().saturating_sub(4) {
        match &archive[i..i + 4] {
            // Local header: sizes, name and extra lengths.
            b"PK\x03\x04" => fields.extend([
                (i + 14, 4),
                (i + 18, 4),
                (i + 22, 4),
                (i + 26, 2),
                (i + 28, 2),
            ]),
            // Central header: sizes, lengths, local header offset.
            b"PK\x01\x02" => fields.extend([
                (i + 20, 4),
                (i + 24, 4),
                (i + 28, 2),
                (i + 30, 2),
                (i + 32, 2),
                (i + 42, 4),
            ]),
            // End of central directory (and the zip64 one): counts, size, offset.
            b"PK\x05\x06" => fields.extend([(i + 8, 2), (i + 10, 2), (i + 12, 4), (i + 16, 4)]),
            b"PK\x06\x06" => fields.extend([(i + 24, 8), (i + 32, 8), (i + 40, 8), (i + 48, 8)]),
            _ => {}
        }
    }
    fields
}

/// Offsets of the integers in a safetensors header (`data_offsets`, `shape`) and its length.
fn safetensors_fields(file: &[u8]) -> Vec<(usize, usize)> {
    let mut fields = vec![(0, 8)];
    let header_len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header = &file[8..8 + header_len];
    let mut i = 0;
    while i < header.len() {
        if header[i].is_ascii_digit() {
            let start = i;
            while i < header.len() && header[i].is_ascii_digit() {
                i += 1;
            }
            // Digits are written over as text (see `mutate_digits`); width marks the run.
            fields.push((8 + start, i - start));
        }
        i += 1;
    }
    fields
}

/// Replaces one run of digits in a JSON text with a boundary number (or a sign, a fraction or
/// an exponent), keeping the rest.
fn mutate_digits(rng: &mut Rng, data: &[u8], fields: &[(usize, usize)]) -> Vec<u8> {
    let (at, len) = fields[rng.below(fields.len())];
    let replacement: &[u8] = match rng.below(9) {
        0 => b"0",
        1 => b"18446744073709551615",
        2 => b"18446744073709551616",
        3 => b"9223372036854775807",
        4 => b"-1",
        5 => b"4294967296",
        6 => b"1e300",
        7 => b"2.5",
        _ => b"99999999999999999999999999999999",
    };
    let mut out = data[..at].to_vec();
    out.extend_from_slice(replacement);
    out.extend_from_slice(&data[(at + len).min(data.len())..]);
    // The header's length prefix follows the text where it can (a safetensors file).
    if at >= 8 && out.len() >= 8 {
        let old = u64::from_le_bytes(data[..8].try_into().unwrap()) as i64;
        let new = old + replacement.len() as i64 - len as i64;
        if new > 0 && rng.below(4) != 0 {
            out[..8].copy_from_slice(&(new as u64).to_le_bytes());
        }
    }
    out
}

#[test]
fn mutated_torch_archives_never_panic_or_overallocate() {
    let _one = one_at_a_time();
    let base = std::fs::read(fixture(
        "published-root/thibaud/controlnet-sd21-canny-diffusers/diffusion_pytorch_model.bin",
    ))
    .expect("fixture");
    let dir = scratch("zip");
    let path = dir.join("diffusion_pytorch_model.bin");
    let zip = zip_fields(&base);
    let container = run(
        "zip container",
        runs(600),
        &path,
        |rng| mutate(rng, &base, &zip),
        0x7a69_7031,
    );
    let parts = entries(&base);
    let pkl = parts
        .iter()
        .position(|(n, _)| n.ends_with("data.pkl"))
        .expect("data.pkl");
    let fields = pickle_fields(&parts[pkl].1);
    let pickle = run(
        "pickle in a valid archive",
        runs(1500),
        &path,
        |rng| {
            let mut parts = parts.clone();
            parts[pkl].1 = mutate(rng, &parts[pkl].1, &fields);
            // Now and then a storage cut short or grown too.
            if rng.below(4) == 0 {
                let i = rng.below(parts.len());
                if !parts[i].0.ends_with("data.pkl") {
                    let n = parts[i].1.len();
                    parts[i].1.resize(rng.below(2 * n + 8), 0x41);
                }
            }
            write_archive(&parts)
        },
        0x706b_6c31,
    );
    let bound = 4 * base.len() + (1 << 20);
    for (what, t) in [("container", &container), ("pickle", &pickle)] {
        assert!(
            t.largest <= bound,
            "{what}: largest allocation {} > {bound}",
            t.largest
        );
        assert!(
            t.peak <= 4 * bound,
            "{what}: peak {} > {}",
            t.peak,
            4 * bound
        );
        assert!(t.refused > 0, "{what}: no mutation refused");
    }
    assert!(container.loaded + pickle.loaded > 0, "no mutation loaded");
    std::fs::remove_dir_all(&dir).ok();
}

/// Mutates the small fixture `relative` (written as `name`) with `make`, given the offsets of
/// its integer fields (`fields_of`, found once), loads each copy, and holds its largest
/// allocation to 64 times the file plus 1 MiB; some copies must load, some be refused.
fn small_file_cases(
    what: &str,
    (relative, name): (&str, &str),
    seed: u64,
    fields_of: fn(&[u8]) -> Vec<(usize, usize)>,
    mut make: impl FnMut(&mut Rng, &[u8], &[(usize, usize)]) -> Vec<u8>,
) {
    let base = std::fs::read(fixture(relative)).expect("fixture");
    let fields = fields_of(&base);
    let dir = scratch(name);
    let t = run(
        what,
        runs(3000),
        &dir.join(name),
        |rng| make(rng, &base, &fields),
        seed,
    );
    let bound = 64 * base.len() + (1 << 20);
    assert!(
        t.largest <= bound,
        "largest allocation {} > {bound}",
        t.largest
    );
    assert!(t.refused > 0 && t.loaded > 0, "{t:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn mutated_legacy_torch_files_never_panic_or_overallocate() {
    let _one = one_at_a_time();
    small_file_cases(
        "legacy torch file",
        ("torch-legacy/mixed.pth", "mixed.pth"),
        0x6c65_6731,
        pickle_fields,
        mutate,
    );
}

#[test]
fn mutated_safetensors_files_never_panic_or_overallocate() {
    let _one = one_at_a_time();
    small_file_cases(
        "safetensors file",
        ("torch-legacy/mixed.safetensors", "model.safetensors"),
        0x7361_6631,
        safetensors_fields,
        |rng, base, fields| {
            if rng.below(2) == 0 {
                mutate_digits(rng, base, &fields[1..])
            } else {
                mutate(rng, base, &fields[..1])
            }
        },
    );
}

/// Values a config entry is set to.
fn odd_value(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(16) {
        0 => json!(0),
        1 => json!(1),
        2 => json!(2),
        3 => json!(3),
        4 => json!(-1),
        5 => json!(7),
        6 => json!(1_000_000_000u64),
        7 => json!(u64::MAX),
        8 => json!(0.5),
        9 => json!(-0.0),
        10 => json!(1e300),
        11 => serde_json::Value::Null,
        12 => json!(true),
        13 => json!(""),
        14 => json!(
            [
                "gelu",
                "relu",
                "silu",
                "swish",
                "mish",
                "quick_gelu",
                "nearest",
                "x"
            ][rng.below(8)]
        ),
        _ => json!([]),
    }
}

/// Every path to a value in `v` (object keys and array indices).
fn paths(
    v: &serde_json::Value,
    here: &mut Vec<serde_json::Value>,
    out: &mut Vec<Vec<serde_json::Value>>,
) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                here.push(k.clone().into());
                out.push(here.clone());
                paths(child, here, out);
                here.pop();
            }
        }
        serde_json::Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                here.push(i.into());
                out.push(here.clone());
                paths(child, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

/// The value under `step` (an object's key or an array's index) of `v`.
fn child<'a>(v: &'a mut serde_json::Value, step: &serde_json::Value) -> &'a mut serde_json::Value {
    match step {
        serde_json::Value::String(k) => &mut v[k.as_str()],
        _ => &mut v[step.as_u64().expect("index") as usize],
    }
}

/// The value at `path` (from [`paths`]) in `v`.
fn at<'a>(v: &'a mut serde_json::Value, path: &[serde_json::Value]) -> &'a mut serde_json::Value {
    path.iter().fold(v, |v, step| child(v, step))
}

/// One to three changes of a config: a value replaced, a key removed, an array grown or cut.
fn mutate_config(rng: &mut Rng, base: &serde_json::Value) -> serde_json::Value {
    let mut config = base.clone();
    for _ in 0..1 + rng.below(3) {
        let mut all = Vec::new();
        paths(&config, &mut Vec::new(), &mut all);
        let path = &all[rng.below(all.len())];
        let (last, parent_path) = path.split_last().expect("a path");
        let parent = at(&mut config, parent_path);
        match (rng.below(6), last) {
            (0, serde_json::Value::String(k)) => {
                parent.as_object_mut().expect("object").remove(k);
            }
            (1, _) => {
                if let Some(items) = child(parent, last).as_array_mut() {
                    if rng.below(2) == 0 {
                        items.pop();
                    } else if let Some(first) = items.first().cloned() {
                        items.push(first);
                    }
                }
            }
            _ => *child(parent, last) = odd_value(rng),
        }
    }
    config
}

/// A network folder: its weights copied from the fixture, its config mutated.
fn config_cases(
    what: &str,
    fixture_dir: &str,
    runs: usize,
    seed: u64,
    load_and_run: impl Fn(&Path) -> Result<(), String> + std::panic::RefUnwindSafe,
) -> Tally {
    let source = fixture(fixture_dir);
    let dir = scratch(&format!("config-{what}"));
    copy_folder(&source, &dir);
    let base = read_json(&source.join("config.json"));
    let mut rng = seeded(seed);
    let mut tally = Tally::default();
    for i in 0..runs {
        let config = mutate_config(&mut rng, &base);
        let text = serde_json::to_vec_pretty(&config).expect("JSON");
        std::fs::write(dir.join("config.json"), &text).expect("write config");
        if tally.case(|| load_and_run(&dir)).is_none() {
            let kept = dir.with_extension(format!("panicked-{i}.json"));
            std::fs::write(&kept, &text).ok();
            panic!(
                "{what}: mutated config {i} panicked (kept at {})",
                kept.display()
            )
        }
    }
    tally.report(&format!("{what}: {runs} mutated configs"));
    std::fs::remove_dir_all(&dir).ok();
    tally
}

fn e(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// One UNet call on an 8×8 latent with four text tokens.
fn run_unet(unet: &sdstream_models::unet::UNet2DConditionModel) -> Result<(), String> {
    use candle_core::{DType, Device, Tensor};
    let c = unet.config().in_channels;
    let sample = Tensor::ones((1, c, 8, 8), DType::F32, &Device::Cpu).map_err(e)?;
    let t = Tensor::new(&[500f32], &Device::Cpu).map_err(e)?;
    let width = unet.text_width().unwrap_or(32);
    let text = Tensor::ones((1, 4, width), DType::F32, &Device::Cpu).map_err(e)?;
    unet.forward(sdstream_models::unet::UNetInputs::new(&sample, &t, &text))
        .map_err(e)?;
    Ok(())
}

/// One text encoder call on 77 tokens.
fn run_clip(clip: &sdstream_models::clip::ClipTextModel) -> Result<(), String> {
    use candle_core::{DType, Device, Tensor};
    let ids = Tensor::zeros((1, 77), DType::U32, &Device::Cpu).map_err(e)?;
    clip.forward(&ids).map_err(e)?;
    Ok(())
}

mod configs {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use sdstream_models::unet::UNet2DConditionModel;

    #[test]
    fn mutated_unet_configs_load_and_run_or_are_refused() {
        let _one = one_at_a_time();
        let t = config_cases(
            "unet",
            "tiny-sd-turbo/unet",
            runs(300),
            0x756e_6574,
            |dir| run_unet(&UNet2DConditionModel::load(dir, DType::F32, &Device::Cpu).map_err(e)?),
        );
        assert!(t.refused > 0 && t.loaded > 0, "{t:?}");
    }

    #[test]
    fn mutated_autoencoder_configs_load_and_run_or_are_refused() {
        let _one = one_at_a_time();
        let t = config_cases("vae", "tiny-sd-turbo/vae", runs(300), 0x7661_6531, |dir| {
            let vae = sdstream_models::vae::AutoencoderKl::load(dir, DType::F32, &Device::Cpu)
                .map_err(e)?;
            let c = vae.config().in_channels;
            let x = Tensor::ones((1, c, 16, 16), DType::F32, &Device::Cpu).map_err(e)?;
            let (mean, _) = vae.encode_moments(&x).map_err(e)?;
            vae.decode(&mean).map_err(e)?;
            Ok(())
        });
        assert!(t.refused > 0 && t.loaded > 0, "{t:?}");
        let t = config_cases("taesd", "tiny-taesd", runs(300), 0x7461_6531, |dir| {
            let taesd =
                sdstream_models::taesd::AutoencoderTiny::load(dir, DType::F32, &Device::Cpu)
                    .map_err(e)?;
            let c = taesd.config().in_channels;
            let x = Tensor::ones((1, c, 16, 16), DType::F32, &Device::Cpu).map_err(e)?;
            let z = taesd.encode(&x).map_err(e)?;
            taesd.decode(&z).map_err(e)?;
            Ok(())
        });
        assert!(t.refused > 0 && t.loaded > 0, "{t:?}");
    }

    #[test]
    fn mutated_text_encoder_configs_load_and_run_or_are_refused() {
        let _one = one_at_a_time();
        let t = config_cases(
            "clip",
            "tiny-sd-turbo/text_encoder",
            runs(300),
            0x636c_6970,
            |dir| {
                run_clip(
                    &sdstream_models::clip::ClipTextModel::load(dir, DType::F32, &Device::Cpu)
                        .map_err(e)?,
                )
            },
        );
        assert!(t.refused > 0 && t.loaded > 0, "{t:?}");
    }
}

/// A weights file's float tensors: name, shape, values.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The float tensors of any file `WeightsFile` reads, ordered by name.
fn read_tensors(path: &Path) -> Tensors {
    let file = WeightsFile::open(path).expect("fixture");
    let mut out: Tensors = file
        .float_tensors()
        .map(|(name, shape)| {
            let values = file
                .load_f32(name)
                .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                .expect("values");
            (name.to_string(), shape.to_vec(), values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A safetensors file of `tensors` in f32.
fn write_tensors(tensors: &Tensors) -> Vec<u8> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), view.expect("view"))
        })
        .collect();
    safetensors::tensor::serialize(views, None).expect("serialize")
}

/// Digits in a name moved by one or set to 9 (another layer, or one past the last).
fn renumber(rng: &mut Rng, name: &str) -> String {
    let digits: Vec<usize> = name
        .char_indices()
        .filter(|(_, c)| c.is_ascii_digit())
        .map(|(i, _)| i)
        .collect();
    if digits.is_empty() {
        return format!("{name}x");
    }
    let at = digits[rng.below(digits.len())];
    let d = name.as_bytes()[at] - b'0';
    let new = [(d + 1) % 10, d.saturating_sub(1), 9][rng.below(3)];
    format!("{}{}{}", &name[..at], new, &name[at + 1..])
}

/// One to three structural changes that keep the file well formed: a tensor reshaped (its
/// values made again), dropped, doubled under another layer's number, renamed (another
/// layer's number, LoRA's other half, another module's prefix, nonsense), or a scalar (a
/// LoRA's alpha) set to an odd number.
fn mutate_tensors(rng: &mut Rng, base: &Tensors) -> Tensors {
    let mut t = base.clone();
    for _ in 0..1 + rng.below(3) {
        if t.is_empty() {
            break;
        }
        let i = rng.below(t.len());
        match rng.below(6) {
            0 | 1 => {
                let mut shape = t[i].1.clone();
                match rng.below(4) {
                    0 if !shape.is_empty() => {
                        let d = rng.below(shape.len());
                        shape[d] = [0, 1, 2, 3, 5, 7, 64, 1024][rng.below(8)];
                    }
                    1 => shape.push([1, 2, 3][rng.below(3)]),
                    2 => {
                        shape.pop();
                    }
                    _ => shape.reverse(),
                }
                let n: usize = shape.iter().product();
                if n <= 1 << 22 {
                    t[i].1 = shape;
                    t[i].2 = (0..n).map(|k| ((k % 7) as f32 - 3.0) * 0.02).collect();
                }
            }
            2 => {
                t.remove(i);
            }
            3 => {
                let copy = t[i].clone();
                t.push((renumber(rng, &copy.0), copy.1, copy.2));
            }
            4 => {
                let other = t[rng.below(t.len())].0.clone();
                let (prefix, _) = other.split_once('.').unwrap_or((&other, ""));
                let (_, suffix) = t[i].0.split_once('.').unwrap_or(("", "weight"));
                t[i].0 = match rng.below(4) {
                    0 => renumber(rng, &t[i].0),
                    1 => t[i].0.replace("lora_down", "lora_up"),
                    2 => format!("{prefix}.{suffix}"),
                    _ => format!("{}x", t[i].0),
                };
            }
            _ => {
                if let Some(scalar) = t.iter_mut().filter(|x| x.1.is_empty()).nth(i % 8) {
                    scalar.2 = vec![[0.0, -1.0, 1e30, 1e-30, 4096.0][rng.below(5)]];
                }
            }
        }
        // One tensor a name: safetensors' writer panics on two (a file cannot hold them).
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t.dedup_by(|a, b| a.0 == b.0);
    }
    t
}

/// `runs` mutations of `base` ([`mutate_tensors`], from `seed`), each written to `path` as a
/// safetensors file and given to `load`, counted in `tally`; a panic keeps the file and names it.
fn tensor_cases<T>(
    tally: &mut Tally,
    what: &str,
    base: &Tensors,
    path: &Path,
    (runs, seed): (usize, u64),
    load: impl Fn(&Path) -> Result<T, String>,
) {
    let mut rng = seeded(seed);
    for i in 0..runs {
        let mutated = mutate_tensors(&mut rng, base);
        std::fs::write(path, write_tensors(&mutated)).expect("write the mutated file");
        if tally.case(|| load(path)).is_none() {
            let kept = path.with_extension(format!("panicked-{i}.safetensors"));
            std::fs::copy(path, &kept).ok();
            panic!(
                "{what}: mutated copy {i} panicked (kept at {})",
                kept.display()
            );
        }
    }
}

mod loras {
    use super::*;
    use candle_core::{DType, Device};
    use sdstream_models::clip::ClipTextModel;
    use sdstream_models::lora::{LoraDeltas, LoraFile, LoraTarget};
    use sdstream_models::unet::UNet2DConditionModel;
    use std::sync::Arc;

    #[test]
    fn mutated_loras_fuse_or_are_refused() {
        let _one = one_at_a_time();
        let unet_dir = fixture("tiny-sd15/unet");
        let clip_dir = fixture("tiny-sd15/text_encoder");
        let dir = scratch("lora");
        let path = dir.join("lora.safetensors");
        let mut tally = Tally::default();
        for (k, base) in [
            "lora/kohya-b/b.safetensors",
            "lora/peft-a/pytorch_lora_weights.safetensors",
        ]
        .iter()
        .enumerate()
        {
            let base = read_tensors(&fixture(base));
            let cases = (runs(150), 0x6c6f_7261 + k as u64);
            tensor_cases(&mut tally, "LoRA", &base, &path, cases, |path| {
                let file = Arc::new(LoraFile::open(path).map_err(e)?);
                let stack = [(file, 0.8)];
                if let Some(deltas) = LoraDeltas::new(LoraTarget::Unet, &stack) {
                    let (unet, _) = UNet2DConditionModel::load_with_lora(
                        &unet_dir,
                        DType::F32,
                        &Device::Cpu,
                        Some(deltas),
                    )
                    .map_err(e)?;
                    run_unet(&unet)?;
                }
                if let Some(deltas) = LoraDeltas::new(LoraTarget::TextEncoder, &stack) {
                    let (clip, _) = ClipTextModel::load_with_lora(
                        &clip_dir,
                        DType::F32,
                        &Device::Cpu,
                        Some(deltas),
                    )
                    .map_err(e)?;
                    run_clip(&clip)?;
                }
                Ok(())
            });
        }
        tally.report("LoRAs");
        assert!(tally.refused > 0 && tally.loaded > 0, "{tally:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

mod tokenizers_files {
    use super::*;
    use sdstream_models::tokenizer::ClipTokenizer;

    /// The paths of `v` outside the vocabulary and merges (a hundred thousand entries a mutation
    /// would almost always land in), and a few of those entries.
    fn tokenizer_paths(rng: &mut Rng, v: &serde_json::Value) -> Vec<Vec<serde_json::Value>> {
        let mut outside = v.clone();
        // An earlier change may have made `model` something else than an object.
        let (vocab, merges) = match outside.get_mut("model").and_then(|m| m.as_object_mut()) {
            Some(model) => (
                model.remove("vocab").unwrap_or_default(),
                model.remove("merges").unwrap_or_default(),
            ),
            None => Default::default(),
        };
        let mut all = Vec::new();
        paths(&outside, &mut Vec::new(), &mut all);
        let model: serde_json::Value = "model".into();
        if let Some(words) = vocab.as_object() {
            all.push(vec![model.clone(), "vocab".into()]);
            for _ in 0..4 {
                let (word, _) = words.iter().nth(rng.below(words.len())).expect("a word");
                all.push(vec![model.clone(), "vocab".into(), word.clone().into()]);
            }
        }
        if let Some(pairs) = merges.as_array() {
            all.push(vec![model.clone(), "merges".into()]);
            for _ in 0..4 {
                all.push(vec![
                    model.clone(),
                    "merges".into(),
                    rng.below(pairs.len()).into(),
                ]);
            }
        }
        all
    }

    /// One to three changes to `base` at paths `tokenizer_paths` picks.
    fn mutate_tokenizer(rng: &mut Rng, base: &serde_json::Value) -> serde_json::Value {
        let mut json = base.clone();
        for _ in 0..1 + rng.below(3) {
            let all = tokenizer_paths(rng, &json);
            let path = &all[rng.below(all.len())];
            *at(&mut json, path) = match rng.below(5) {
                // A pattern that backtracks, where a regex is.
                0 => serde_json::json!({"Regex": "(a+)+$|(\\p{L}*)*x"}),
                1 => serde_json::json!("<|endoftext|>"),
                _ => odd_value(rng),
            };
        }
        json
    }

    #[test]
    fn mutated_tokenizer_files_load_and_encode_or_are_refused() {
        let _one = one_at_a_time();
        let source = fixture("tiny-sd-turbo/tokenizer");
        let dir = scratch("tokenizer");
        copy_folder(&source, &dir);
        let tokenizer = read_json(&source.join("tokenizer.json"));
        let small = ["tokenizer_config.json", "special_tokens_map.json"]
            .map(|name| (name, read_json(&source.join(name))));
        let prompts = [
            "a photo of a cat, highly detailed",
            "",
            "ÀÉÎõü 東京 🙂 \u{0}\u{202e} <|endoftext|> <|startoftext|>",
            &"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!".repeat(20),
        ];
        let mut rng = seeded(0x746f_6b31);
        let mut tally = Tally::default();
        for i in 0..runs(80) {
            // The big file in one case of two, then one of the small ones; the others as they
            // came.
            let (name, text) = if rng.below(2) == 0 {
                let json = mutate_tokenizer(&mut rng, &tokenizer);
                ("tokenizer.json", serde_json::to_vec(&json).expect("JSON"))
            } else {
                let (name, base) = &small[rng.below(small.len())];
                let json = mutate_config(&mut rng, base);
                (*name, serde_json::to_vec(&json).expect("JSON"))
            };
            std::fs::write(dir.join(name), &text).expect("write");
            let outcome = tally.case(|| -> Result<usize, String> {
                let t = ClipTokenizer::from_dir(&dir).map_err(|e| e.to_string())?;
                let mut ids = 0;
                for prompt in prompts {
                    ids += t.encode(prompt).map_err(|e| e.to_string())?.len();
                }
                Ok(ids)
            });
            match outcome {
                Some(Some(ids)) => assert!(ids > 0, "four prompts gave no ids"),
                Some(None) => {}
                None => {
                    let kept = dir.with_extension(format!("panicked-{i}-{name}"));
                    std::fs::write(&kept, &text).ok();
                    panic!(
                        "mutated {name} {i} panicked the tokenizer (kept at {})",
                        kept.display()
                    );
                }
            }
            // The next case starts from the fixture's files again.
            std::fs::copy(source.join(name), dir.join(name)).expect("restore");
        }
        tally.report("tokenizers");
        assert!(tally.refused > 0 && tally.loaded > 0, "{tally:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// A shard index's mutations: its values replaced (among them other shards' names, paths out of
/// the folder, itself), entries removed, its lists and maps grown or cut; the shards stay.
#[test]
fn mutated_shard_indexes_load_or_are_refused() {
    let _one = one_at_a_time();
    let mut tally = Tally::default();
    for (k, (folder, index)) in [
        (
            "tiny-sdxl-sharded/unet",
            "diffusion_pytorch_model.safetensors.index.json",
        ),
        (
            "tiny-sdxl-sharded/text_encoder",
            "pytorch_model.bin.index.json",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let source = fixture(folder);
        let dir = scratch(&format!("index-{k}"));
        copy_folder(&source, &dir);
        let base = read_json(&source.join(index));
        let shards: Vec<String> = std::fs::read_dir(&source)
            .expect("fixture folder")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        let mut rng = seeded(0x696e_6478 + k as u64);
        for i in 0..runs(150) {
            let mut json = mutate_config(&mut rng, &base);
            // Now and then an entry sent to another file: a shard, the index, the config, a
            // path out of the folder, one that is not there.
            if let Some(map) = json.get_mut("weight_map").and_then(|m| m.as_object_mut())
                && !map.is_empty()
                && rng.below(2) == 0
            {
                let key = map.keys().nth(rng.below(map.len())).expect("a key").clone();
                let targets = [
                    shards[rng.below(shards.len())].as_str(),
                    index,
                    "config.json",
                    "../config.json",
                    "/etc/hostname",
                    "missing.safetensors",
                    "",
                ];
                map[&key] = targets[rng.below(targets.len())].into();
            }
            let text = serde_json::to_vec(&json).expect("JSON");
            let path = dir.join(index);
            std::fs::write(&path, &text).expect("write");
            if tally.case(|| load_all(&path)).is_none() {
                let kept = dir.with_extension(format!("panicked-{i}.json"));
                std::fs::write(&kept, &text).ok();
                panic!(
                    "mutated index {k}/{i} panicked (kept at {})",
                    kept.display()
                );
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    tally.report("shard indexes");
    // The largest shard is read whole when it is a pickle (3.2 MB).
    assert!(
        tally.largest <= 4 * 3_191_141 + (1 << 20),
        "largest allocation {}",
        tally.largest
    );
    assert!(tally.refused > 0 && tally.loaded > 0, "{tally:?}");
}

/// The processors' networks and the IP-Adapters, whose sizes come from their tensors' shapes
/// (there is no config):
/// well-formed files whose tensors are reshaped, dropped, doubled under another layer's number
/// or renamed, loaded as a processor loads them, then run on a small picture.
mod shape_configured {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use sdstream_models::{hed, lineart, lineart_anime, openpose_body, openpose_cpm, rrdbnet};

    type Run = fn(&Path) -> Result<(), String>;

    fn picture(side: usize) -> Result<Tensor, String> {
        Tensor::ones((1, 3, side, side), DType::F32, &Device::Cpu).map_err(e)
    }

    /// A network sized by its tensors, loaded from `p` as the processors load theirs.
    fn open<C, M>(
        p: &Path,
        config: impl FnOnce(
            &std::collections::HashMap<String, Vec<usize>>,
        ) -> sdstream_models::Result<C>,
        build: impl Fn(&C, candle_nn::VarBuilder<'static>) -> sdstream_models::Result<M>,
    ) -> Result<M, String> {
        sdstream_models::open_weights(p, DType::F32, &Device::Cpu, config, build).map_err(e)
    }

    /// An IP-Adapter at `p` with the image encoder beside it, run on a small picture.
    fn ip_adapter(p: &Path) -> Result<(), String> {
        let adapter =
            sdstream_models::ip_adapter::IpAdapter::load(p, DType::F32, &Device::Cpu).map_err(e)?;
        let rgb = vec![128u8; 32 * 32 * 3];
        adapter.encode(&rgb, 32, 32).map_err(e)?;
        Ok(())
    }

    const NETWORKS: [(&str, Run); 8] = [
        ("h94/IP-Adapter/models/ip-adapter_sd15.bin", ip_adapter),
        ("h94/IP-Adapter/models/ip-adapter-plus_sd15.bin", ip_adapter),
        ("lllyasviel/Annotators/ControlNetHED.pth", |p| {
            let net = open(p, hed::Config::from_shapes, hed::Hed::new)?;
            net.forward(&picture(32)?).map_err(e)?;
            Ok(())
        }),
        ("lllyasviel/Annotators/sk_model.pth", |p| {
            let net = open(
                p,
                lineart::Config::from_shapes,
                lineart::LineartGenerator::new,
            )?;
            net.forward(&picture(32)?).map_err(e)?;
            Ok(())
        }),
        ("lllyasviel/Annotators/netG.pth", |p| {
            let net = open(
                p,
                lineart_anime::Config::from_shapes,
                lineart_anime::LineartAnimeGenerator::new,
            )?;
            net.forward(&picture(256)?).map_err(e)?;
            Ok(())
        }),
        ("lllyasviel/Annotators/body_pose_model.safetensors", |p| {
            let net = open(
                p,
                |s| Ok(openpose_body::Config::from_tensor_shapes(s)?),
                |c, vb| Ok(openpose_body::BodyPoseNet::new(c, vb)?),
            )?;
            net.forward(&picture(32)?).map_err(e)?;
            Ok(())
        }),
        ("lllyasviel/Annotators/hand_pose_model.pth", |p| {
            let net = open(
                p,
                openpose_cpm::Config::from_shapes,
                openpose_cpm::KeypointNet::new,
            )?;
            net.forward(&picture(32)?).map_err(e)?;
            Ok(())
        }),
        ("ai-forever/Real-ESRGAN/RealESRGAN_x2.pth", |p| {
            let net = open(p, rrdbnet::Config::from_shapes, rrdbnet::RrdbNet::new)?;
            net.forward(&picture(16)?).map_err(e)?;
            Ok(())
        }),
    ];

    #[test]
    fn processor_networks_with_mutated_shapes_load_and_run_or_are_refused() {
        let _one = one_at_a_time();
        let dir = scratch("shapes");
        let path = dir.join("weights.safetensors");
        // The IP-Adapters' image encoder, where h94 lays it out: beside the weights.
        let encoder = fixture("model-root/h94/IP-Adapter/models/image_encoder");
        std::fs::create_dir_all(dir.join("image_encoder")).expect("encoder folder");
        for name in ["config.json", "model.safetensors"] {
            std::fs::copy(encoder.join(name), dir.join("image_encoder").join(name)).expect("copy");
        }
        let mut tally = Tally::default();
        for (k, (file, run)) in NETWORKS.iter().enumerate() {
            let base = read_tensors(&fixture(&format!("model-root/{file}")));
            // The fixture itself, written again, loads and runs: the mutations are what fail.
            std::fs::write(&path, write_tensors(&base)).expect("write");
            run(&path).unwrap_or_else(|err| panic!("{file} unmutated: {err}"));
            let cases = (runs(60), 0x7368_6170 + k as u64);
            tensor_cases(&mut tally, file, &base, &path, cases, run);
        }
        tally.report("processor networks");
        assert!(tally.refused > 0 && tally.loaded > 0, "{tally:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

mod single_files {
    use super::*;
    use sdstream_models::single_file::{self, Family, Layout};

    /// The stand-ins of tests/fixtures/single-file: file, family, the family's config folder.
    const FILES: [(&str, Family, &str); 3] = [
        (
            "sd15.safetensors",
            Family::Sd1,
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ),
        ("sd21.ckpt", Family::Sd2, "stabilityai/stable-diffusion-2-1"),
        (
            "sdxl.safetensors",
            Family::Sdxl,
            "stabilityai/stable-diffusion-xl-base-1.0",
        ),
    ];

    fn config_folder(repo: &str) -> PathBuf {
        fixture("single-file/model-root").join(repo)
    }

    /// What a conversion does with a file: its family from the names, the layout from the
    /// configs in `configs`, every component renamed (and reshaped) into diffusers' tensors.
    /// The count of tensors converted.
    fn convert(path: &Path, configs: &Path) -> Result<usize, String> {
        let file = WeightsFile::open(path).map_err(e)?;
        let family =
            Family::detect(file.tensors().map(|(name, _)| name)).ok_or("not a whole checkpoint")?;
        let layout = Layout::read(configs, family).map_err(e)?;
        single_file::census(file.tensors().map(|(name, _)| name), family, &layout).map_err(e)?;
        let mut converted = 0;
        for &component in single_file::components(family) {
            converted += single_file::component(&file, family, &layout, component)
                .map_err(e)?
                .len();
        }
        Ok(converted)
    }

    /// Single files in the original layout with their tensors renamed (another block's number,
    /// another component's prefix), reshaped, dropped or doubled: converted or refused.
    #[test]
    fn mutated_single_files_convert_or_are_refused() {
        let _one = one_at_a_time();
        let dir = scratch("single-file");
        let path = dir.join("mutated.safetensors");
        let mut tally = Tally::default();
        for (k, (name, family, repo)) in FILES.iter().enumerate() {
            let base = read_tensors(&fixture("single-file").join(name));
            let configs = config_folder(repo);
            // The stand-in itself, written again, is its family's and converts whole: the
            // mutations are what fail.
            std::fs::write(&path, write_tensors(&base)).expect("write");
            let names = WeightsFile::open(&path).expect("the stand-in");
            let detected = Family::detect(names.tensors().map(|(name, _)| name));
            assert_eq!(detected, Some(*family), "{name}");
            convert(&path, &configs).unwrap_or_else(|err| panic!("{name} unmutated: {err}"));
            let cases = (runs(40), 0x0005_f11e + k as u64);
            tensor_cases(&mut tally, name, &base, &path, cases, |path| {
                convert(path, &configs)
            });
        }
        tally.report("single files");
        assert!(tally.refused > 0 && tally.loaded > 0, "{tally:?}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The family's configs (where the layout's sizes come from) mutated, each file converted
    /// with them.
    #[test]
    fn single_files_convert_or_are_refused_under_mutated_configs() {
        let _one = one_at_a_time();
        let mut tally = Tally::default();
        for (k, (name, _, repo)) in FILES.iter().enumerate() {
            let source = config_folder(repo);
            let dir = scratch(&format!("single-file-configs-{k}"));
            let folders = ["unet", "vae", "text_encoder", "text_encoder_2"];
            let folders: Vec<&str> = folders
                .into_iter()
                .filter(|f| source.join(f).join("config.json").is_file())
                .collect();
            for folder in &folders {
                std::fs::create_dir_all(dir.join(folder)).expect("folder");
            }
            let bases: Vec<serde_json::Value> = folders
                .iter()
                .map(|f| read_json(&source.join(f).join("config.json")))
                .collect();
            let file = fixture("single-file").join(name);
            let mut rng = seeded(0x00c0_f165 + k as u64);
            for i in 0..runs(60) {
                let which = rng.below(folders.len());
                for (j, (folder, base)) in folders.iter().zip(&bases).enumerate() {
                    let config = if j == which {
                        mutate_config(&mut rng, base)
                    } else {
                        base.clone()
                    };
                    let text = serde_json::to_vec_pretty(&config).expect("JSON");
                    std::fs::write(dir.join(folder).join("config.json"), text).expect("write");
                }
                if tally.case(|| convert(&file, &dir)).is_none() {
                    panic!(
                        "{name} under mutated configs {i} panicked the conversion (kept in {})",
                        dir.display()
                    );
                }
            }
            std::fs::remove_dir_all(&dir).ok();
        }
        tally.report("single files under mutated configs");
        assert!(tally.refused > 0 && tally.loaded > 0, "{tally:?}");
    }
}
