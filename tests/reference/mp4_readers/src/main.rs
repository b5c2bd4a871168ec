//! The `mp4` and `mp4parse` crates on an MP4 and on mutated copies of it (the mutations of
//! server/tests/video_file_fuzz.rs: cut short, bits flipped, a 32-bit field near a box header set
//! to 0, 1, 2^31, 2^32-1 or random), under a counting allocator.
//!
//! `mp4-readers CLIP N LIBRARY START`: prints what LIBRARY (`mp4` or `mp4parse`) reads from CLIP,
//! then one line per mutated copy from START to N: `R index read|refused|panic largest-allocation
//! peak-live microseconds [panic-message]`. A copy that takes more than 2 s prints `HANG index`
//! and ends the process (a thread cannot be stopped); measure.py restarts after it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Cursor;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Requests above this are refused (reported, and the library sees an allocation failure).
const CAP: usize = 8 << 30;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Relaxed);
        if l.size() > CAP {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let live = LIVE.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(live, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LARGEST.fetch_max(n, Relaxed);
        if n > CAP {
            return std::ptr::null_mut();
        }
        let q = unsafe { System.realloc(p, l, n) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            let live = LIVE.fetch_add(n, Relaxed) + n;
            PEAK.fetch_max(live, Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Every track's samples with the `mp4` crate: (track, decode time, composition offset, size),
/// and the AAC decoder configuration as the crate keeps it.
fn with_mp4(data: &[u8]) -> Result<(Vec<(u32, u64, i32, usize)>, Vec<u8>), String> {
    let mut r = mp4::Mp4Reader::read_header(Cursor::new(data), data.len() as u64)
        .map_err(|e| e.to_string())?;
    let mut ids: Vec<u32> = r.tracks().keys().copied().collect();
    ids.sort();
    let mut samples = Vec::new();
    let mut config = Vec::new();
    for id in ids {
        let track = &r.tracks()[&id];
        if let Some(esds) = track.trak.mdia.minf.stbl.stsd.mp4a.as_ref().and_then(|a| a.esds.as_ref()) {
            let d = &esds.es_desc.dec_config.dec_specific;
            config = vec![d.profile, d.freq_index, d.chan_conf];
        }
        let n = r.sample_count(id).map_err(|e| e.to_string())?;
        for s in 1..=n {
            match r.read_sample(id, s).map_err(|e| e.to_string())? {
                Some(x) => samples.push((id, x.start_time, x.rendering_offset, x.bytes.len())),
                None => break,
            }
        }
    }
    Ok((samples, config))
}

/// Every track's sample table with `mp4parse`: (track, decode time, composition time, size),
/// and the AAC decoder configuration's bytes.
fn with_mp4parse(data: &[u8]) -> Result<(Vec<(usize, i64, i64, u64)>, Vec<u8>), String> {
    use mp4parse::unstable::{CheckedInteger, create_sample_table};
    let ctx = mp4parse::read_mp4(&mut Cursor::new(data)).map_err(|e| format!("{e:?}"))?;
    let mut samples = Vec::new();
    let mut config = Vec::new();
    for t in ctx.tracks.iter() {
        for d in t.stsd.iter().flat_map(|s| s.descriptions.iter()) {
            if let mp4parse::SampleEntry::Audio(a) = d
                && let mp4parse::AudioCodecSpecific::ES_Descriptor(e) = &a.codec_specific
            {
                config = e.decoder_specific_data.to_vec();
            }
        }
        if let Some(table) = create_sample_table(t, CheckedInteger(0)) {
            for i in table.iter() {
                samples.push((t.id, i.start_decode.0, i.start_composition.0, i.end_offset.0 - i.start_offset.0));
            }
        }
    }
    Ok((samples, config))
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn box_offsets(d: &[u8]) -> Vec<usize> {
    const KINDS: [&[u8; 4]; 22] = [
        b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd", b"stts", b"ctts", b"stsc", b"stsz",
        b"stco", b"stss", b"elst", b"edts", b"mdhd", b"tkhd", b"hdlr", b"mvhd", b"avcC", b"avc1",
        b"mp4a", b"mdat",
    ];
    (4..d.len().saturating_sub(4))
        .filter(|&i| KINDS.iter().any(|k| &d[i..i + 4] == *k))
        .map(|i| i - 4)
        .collect()
}

fn mutate(rng: &mut Rng, base: &[u8], boxes: &[usize]) -> Vec<u8> {
    let mut d = base.to_vec();
    match rng.below(4) {
        0 => d.truncate(rng.below(base.len())),
        1 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
        }
        _ => {
            let at = boxes[rng.below(boxes.len())] + 4 * rng.below(7);
            let value: u32 = match rng.below(6) {
                0 => 0,
                1 => u32::MAX,
                2 => 0x8000_0000,
                3 => 1,
                4 => 0x7fff_ffff,
                _ => rng.next() as u32,
            };
            if at + 4 <= d.len() {
                d[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
        }
    }
    d
}

static STARTED: Mutex<Option<(usize, Instant)>> = Mutex::new(None);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, clip, n, library, start] = &args[..] else {
        eprintln!("usage: mp4-readers CLIP N mp4|mp4parse START");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("N");
    let start: usize = start.parse().expect("START");
    let data = std::fs::read(clip).expect("clip");
    let read = |d: &[u8]| -> Result<(), String> {
        if library == "mp4" {
            with_mp4(d).map(|_| ())
        } else {
            with_mp4parse(d).map(|_| ())
        }
    };
    if start == 0 {
        if library == "mp4" {
            let (s, config) = with_mp4(&data).expect("the clip");
            println!("# {} samples, AAC configuration kept as {config:?}; first: {:?}", s.len(), &s[..4.min(s.len())]);
        } else {
            let (s, config) = with_mp4parse(&data).expect("the clip");
            println!("# {} samples, AAC configuration bytes {config:02x?}; first: {:?}", s.len(), &s[..4.min(s.len())]);
        }
    }
    std::thread::spawn(|| {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            if let Some((i, t)) = *STARTED.lock().unwrap()
                && t.elapsed() > Duration::from_secs(2)
            {
                println!("HANG {i}");
                std::process::exit(3);
            }
        }
    });
    std::panic::set_hook(Box::new(|_| {}));
    let boxes = box_offsets(&data);
    let mut rng = Rng(0x5d57_4e41_6d70_3434);
    for i in 0..n {
        let d = mutate(&mut rng, &data, &boxes);
        if i < start {
            continue;
        }
        LARGEST.store(0, Relaxed);
        let base = LIVE.load(Relaxed);
        PEAK.store(base, Relaxed);
        let t = Instant::now();
        *STARTED.lock().unwrap() = Some((i, t));
        let result = std::panic::catch_unwind(|| read(&d));
        *STARTED.lock().unwrap() = None;
        let (largest, peak, us) = (LARGEST.load(Relaxed), PEAK.load(Relaxed) - base, t.elapsed().as_micros());
        match result {
            Ok(Ok(())) => println!("R {i} read {largest} {peak} {us}"),
            Ok(Err(_)) => println!("R {i} refused {largest} {peak} {us}"),
            Err(p) => {
                let m = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let m: String = m.chars().take(60).collect();
                println!("R {i} panic {largest} {peak} {us} {}", m.replace(' ', "_"));
            }
        }
    }
}
