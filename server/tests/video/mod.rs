//! What the video-file tests share: the fixtures, FFmpeg as an independent peer, and a
//! seeded random source.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// `tests/fixtures/video/NAME`.
pub fn video(name: &str) -> PathBuf {
    fixtures().join("video").join(name)
}

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh folder for one test's files.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("video-file")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// FFmpeg's `ffmpeg` and `ffprobe` (`$FFMPEG`, `$FFPROBE`, else from PATH), when there: `None`
/// only with `SDSTREAM_SKIP_FFMPEG=1`; a missing FFmpeg otherwise fails the test (CI installs
/// Debian's, .ci/run).
pub fn ffmpeg() -> Option<(String, String)> {
    let ffmpeg = std::env::var("FFMPEG").unwrap_or_else(|_| "ffmpeg".into());
    let ffprobe = std::env::var("FFPROBE").unwrap_or_else(|_| "ffprobe".into());
    let works = |bin: &str| {
        Command::new(bin)
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&ffmpeg) && works(&ffprobe) {
        return Some((ffmpeg, ffprobe));
    }
    if std::env::var("SDSTREAM_SKIP_FFMPEG").is_ok_and(|v| v == "1") {
        eprintln!("SDSTREAM_SKIP_FFMPEG=1: the checks against FFmpeg are skipped");
        return None;
    }
    panic!(
        "no ffmpeg/ffprobe ({ffmpeg}, {ffprobe}): install Debian's (apt-get install ffmpeg), set \
         FFMPEG and FFPROBE, or set SDSTREAM_SKIP_FFMPEG=1 to skip the checks against FFmpeg"
    );
}

/// Runs a program, returning its stdout; panics with its stderr when it fails.
pub fn output_of(program: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// ffprobe's view of a file's first stream of `kind` ("v" or "a"): (frames decoded, duration in
/// seconds as printed, time base, presentation times of every frame).
pub fn probe(ffprobe: &str, file: &Path, kind: &str) -> (u64, String, String, Vec<i64>) {
    let file = file.to_str().expect("utf-8 path");
    let stream = String::from_utf8(output_of(
        ffprobe,
        &[
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            &format!("{kind}:0"),
            "-show_entries",
            "stream=nb_read_frames,duration,time_base",
            "-of",
            "default=noprint_wrappers=1",
            file,
        ],
    ))
    .expect("utf-8");
    let field = |name: &str| {
        stream
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("ffprobe gave no {name}: {stream}"))
            .to_owned()
    };
    let frames = String::from_utf8(output_of(
        ffprobe,
        &[
            "-v",
            "error",
            "-select_streams",
            &format!("{kind}:0"),
            "-show_entries",
            "frame=pts",
            "-of",
            "default=noprint_wrappers=1:nokey=1",
            file,
        ],
    ))
    .expect("utf-8");
    let pts = frames
        .lines()
        .filter_map(|l| l.trim().parse::<i64>().ok())
        .collect();
    (
        field("nb_read_frames").parse().expect("frame count"),
        field("duration"),
        field("time_base"),
        pts,
    )
}

/// One field of every packet of a file's first stream of `kind` ("v" or "a"), by ffprobe, in
/// file order: `pts` (in the stream's time base), `pts_time` (seconds), `size`, …
pub fn packet_field(ffprobe: &str, file: &Path, kind: &str, field: &str) -> Vec<String> {
    let listed = output_of(
        ffprobe,
        &[
            "-v",
            "error",
            "-select_streams",
            &format!("{kind}:0"),
            "-show_entries",
            &format!("packet={field}"),
            "-of",
            "csv=p=0",
            file.to_str().expect("utf-8"),
        ],
    );
    String::from_utf8_lossy(&listed)
        .lines()
        .map(|l| l.trim().trim_end_matches(',').to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[path = "../support/rng.rs"]
mod rng;
pub use rng::Rng;

/// Offsets of the size fields of the boxes in `data` whose types are the ones the reader
/// parses (the places where a changed number matters most).
pub fn box_offsets(data: &[u8]) -> Vec<usize> {
    const KINDS: [&[u8; 4]; 30] = [
        b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd", b"stts", b"ctts", b"stsc", b"stsz",
        b"stco", b"stss", b"elst", b"edts", b"mdhd", b"tkhd", b"hdlr", b"mvhd", b"avcC", b"avc1",
        b"mp4a", b"mdat", b"mvex", b"trex", b"moof", b"mfhd", b"traf", b"tfhd", b"tfdt", b"trun",
    ];
    // Matroska's: the elements of the segment's level (4-byte IDs), a track entry's, a
    // cluster's timestamp and blocks (their ID, then the size that follows).
    const EBML: [&[u8]; 8] = [
        &[0x18, 0x53, 0x80, 0x67],
        &[0x15, 0x49, 0xA9, 0x66],
        &[0x16, 0x54, 0xAE, 0x6B],
        &[0x1F, 0x43, 0xB6, 0x75],
        &[0x63, 0xA2],
        &[0xAE],
        &[0xE7],
        &[0xA3],
    ];
    let mp4 = (4..data.len().saturating_sub(4))
        .filter(|&i| KINDS.iter().any(|k| &data[i..i + 4] == *k))
        .map(|i| i - 4);
    let matroska = data.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]);
    let ebml = (0..data.len().saturating_sub(4))
        .filter(move |&i| matroska && EBML.iter().any(|id| data[i..].starts_with(id)));
    mp4.chain(ebml).collect()
}

/// A mutated copy of `base`: cut short, bits flipped, or a 32-bit field near a box header set to
/// an extreme value.
pub fn mutate(rng: &mut Rng, base: &[u8], boxes: &[usize]) -> Vec<u8> {
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
