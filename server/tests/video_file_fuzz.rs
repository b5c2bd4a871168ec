//! The MP4 reader facing an attacker: thousands of mutated copies of the fixture clip (cut
//! short, bits flipped, box sizes and entry counts set to extreme values), each opened, its video
//! track checked and every sample read and converted as `sdstream run` would. None may panic,
//! none may allocate more than its bound (a counting allocator watches this test binary, which
//! holds only this test), none may take long. A smaller set goes on through OpenH264.

mod video;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use sdstream_server::video_file::avc;
use sdstream_server::video_file::decode::VideoTrackInfo;
use sdstream_server::video_file::{Mp4Input, VideoDecoder};
use video::{Rng, box_offsets, mutate, scratch, video};

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

/// What `sdstream run` does with a file before decoding: open it, find the video, read every
/// sample and convert it to Annex-B.
fn read_all(path: &std::path::Path) -> Result<usize, String> {
    let mut input = Mp4Input::open(path).map_err(|e| e.to_string())?;
    let info = VideoTrackInfo::find(&input).map_err(|e| e.to_string())?;
    let track = info.track(&input).clone();
    let mut buf = Vec::new();
    let mut annex_b = Vec::new();
    for sample in &track.samples {
        input
            .read_sample(sample, &mut buf)
            .map_err(|e| e.to_string())?;
        annex_b.clear();
        avc::sample_to_annex_b(&buf, info.config.length_size, &mut annex_b)
            .map_err(|e| e.to_string())?;
    }
    let others: Vec<_> = input
        .tracks
        .iter()
        .flat_map(|t| t.samples.clone())
        .collect();
    for sample in &others {
        input
            .read_sample(sample, &mut buf)
            .map_err(|e| e.to_string())?;
    }
    Ok(track.samples.len())
}

#[test]
fn mutated_files_never_panic_overallocate_or_hang() {
    // SDSTREAM_VIDEO_FUZZ_FILE mutates another file (docs/VIDEO_FILES.md runs examples/clip.mp4,
    // as tests/reference/mp4_readers measures the other readers on); by default the fixture clip,
    // its fragmented copy (movie fragments: their own boxes and rules) and its Matroska copy.
    let files = match std::env::var_os("SDSTREAM_VIDEO_FUZZ_FILE") {
        Some(file) => vec![std::path::PathBuf::from(file)],
        None => vec![
            video("bframes.mp4"),
            video("frag-cmaf.mp4"),
            video("bframes.mkv"),
        ],
    };
    // SDSTREAM_VIDEO_FUZZ_RUNS for a longer run (per file).
    let runs: usize = std::env::var("SDSTREAM_VIDEO_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    for file in files {
        fuzz(&file, runs);
    }
}

fn fuzz(file: &std::path::Path, runs: usize) {
    let base = std::fs::read(file).expect("clip");
    let boxes = box_offsets(&base);
    let dir = scratch("fuzz");
    let path = dir.join("mutated.mp4");
    let mut rng = Rng(0x5d57_4e41_6d70_3434);
    let (mut read, mut refused) = (0, 0);
    let mut largest = 0usize;
    let mut peak = 0usize;
    let mut slowest = Duration::ZERO;
    let mut messages = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..runs {
        let data = mutate(&mut rng, &base, &boxes);
        std::fs::write(&path, &data).expect("write");
        LARGEST.store(0, Relaxed);
        let before = LIVE.load(Relaxed);
        PEAK.store(before, Relaxed);
        let start = Instant::now();
        let result = std::panic::catch_unwind(|| read_all(&path));
        slowest = slowest.max(start.elapsed());
        largest = largest.max(LARGEST.load(Relaxed));
        peak = peak.max(PEAK.load(Relaxed).saturating_sub(before));
        match result {
            Ok(Ok(_)) => read += 1,
            Ok(Err(e)) => {
                refused += 1;
                let head = e.split([':', '(']).next().unwrap_or("");
                let kind = head
                    .split_whitespace()
                    .take(4)
                    .collect::<Vec<_>>()
                    .join(" ");
                *messages.entry(kind).or_default() += 1;
            }
            Err(_) => panic!(
                "mutated file {i} of {} panicked the reader (kept at {})",
                file.display(),
                path.display()
            ),
        }
    }
    eprintln!(
        "{}: {runs} mutated files: {read} read, {refused} refused; largest allocation {largest} \
         bytes, peak {peak} bytes above the start, slowest {slowest:?}",
        file.display()
    );
    for (kind, n) in &messages {
        eprintln!("  {n:5} × {kind}");
    }
    // Bounds: a sample table of at most 32 bytes a byte of the file (twice that while
    // fragments grow it), the index, a sample.
    let bound = 64 * base.len() + 2 * base.len() + (1 << 16);
    assert!(largest <= bound, "largest allocation {largest} > {bound}");
    assert!(peak <= 4 * bound, "peak {peak} > {}", 4 * bound);
    assert!(slowest < Duration::from_secs(2), "slowest {slowest:?}");
    assert!(read > 0 && refused > 0);
}

#[test]
fn mutated_samples_through_openh264_end_in_pictures_or_errors() {
    let base = std::fs::read(video("bframes.mp4")).expect("clip");
    // Mutate only the media data (the pictures), so that the files open and OpenH264 gets
    // damaged streams.
    let mdat = base.windows(4).position(|w| w == b"mdat").expect("mdat") + 4;
    let moov = base.windows(4).position(|w| w == b"moov").expect("moov") - 4;
    let dir = scratch("fuzz-decode");
    let path = dir.join("mutated.mp4");
    let mut rng = Rng(0x0420_4f70_656e_4832);
    let (mut whole, mut failed) = (0, 0);
    for _ in 0..150 {
        let mut data = base.clone();
        for _ in 0..1 + rng.below(6) {
            let i = mdat + rng.below(moov - mdat);
            data[i] ^= 1 << rng.below(8);
        }
        std::fs::write(&path, &data).expect("write");
        let outcome = std::panic::catch_unwind(|| -> Result<usize, String> {
            let mut input = Mp4Input::open(&path).map_err(|e| e.to_string())?;
            let info = VideoTrackInfo::find(&input).map_err(|e| e.to_string())?;
            let mut decoder = VideoDecoder::new(info).map_err(|e| e.to_string())?;
            let mut n = 0;
            while let Some((_, picture)) = decoder.next(&mut input).map_err(|e| e.to_string())? {
                assert_eq!((picture.width, picture.height), (96, 64));
                n += 1;
            }
            Ok(n)
        });
        match outcome {
            Ok(Ok(n)) => {
                assert_eq!(n, 16);
                whole += 1;
            }
            Ok(Err(_)) => failed += 1,
            Err(_) => panic!("a damaged stream panicked the decoder path"),
        }
    }
    eprintln!("150 damaged streams: {whole} decoded whole, {failed} refused with an error");
}
