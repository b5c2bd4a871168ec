//! Matroska (`.mkv`; WebM is its subset): OBS's default recording format, and what browsers'
//! `MediaRecorder` writes as `video/x-matroska`. The file is read into the same tracks and
//! samples as an MP4 ([`Mp4Input`]), so that decoding, `sdstream run` and the copy of the audio
//! into the output MP4 are the MP4 path's: the H.264 track's sample description is made from
//! its `CodecPrivate` (the same `avcC` record MP4 holds), an AAC track's from its
//! AudioSpecificConfig (`mp4a` with an `esds`), an Opus track's from its `OpusHead` (`Opus`
//! with a `dOps`). Each frame of a block is a sample: its bytes are one run of the file, read
//! only when the sample is.
//!
//! Times: Matroska gives each block a presentation time (in the segment's `TimestampScale`,
//! a millisecond by default) and no decode time. A video track's decode times are its
//! presentation times in increasing order, handed to its blocks in file (decode) order; the
//! difference is each sample's composition offset. An audio track's samples are timed by their
//! frames' own lengths (1,024 samples an AAC frame, an Opus packet's from its TOC byte) at the
//! codec's rate from its first block's time, so the copied audio keeps its exact length.
//!
//! Bounds, as for MP4: the EBML header at most 4 KiB, `Info` and `Tracks` each read whole only
//! up to [`MAX_MOOV_BYTES`](super::limits::MAX_MOOV_BYTES), at most
//! [`MAX_TOP_LEVEL_BOXES`](super::limits::MAX_TOP_LEVEL_BOXES) elements in the segment and in
//! all clusters together, every element inside its parent and the file, the samples of all
//! tracks at most [`MAX_SAMPLES`](super::limits::MAX_SAMPLES) and one a byte of the file, each
//! at most [`MAX_SAMPLE_BYTES`](super::limits::MAX_SAMPLE_BYTES); a block's header is read,
//! not its frames (a laced block's whole, at most that many bytes). A track whose frames are
//! compressed or encrypted (`ContentEncodings`) is not read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use super::demux::{Mp4Input, Sample, SampleEntry, Track, TrackHeader, TrackKind, carried_start};
use super::limits::{MAX_MOOV_BYTES, MAX_SAMPLE_BYTES, MAX_SAMPLES, MAX_TOP_LEVEL_BOXES};
use super::{Result, VideoFileError, avc, mux};

/// The EBML magic: the first element's ID.
pub(crate) const MAGIC: [u8; 4] = [0x1A, 0x45, 0xDF, 0xA3];

const SEGMENT: u32 = 0x1853_8067;
const INFO: u32 = 0x1549_A966;
const TIMESTAMP_SCALE: u32 = 0x2A_D7B1;
const TRACKS: u32 = 0x1654_AE6B;
const TRACK_ENTRY: u32 = 0xAE;
const TRACK_NUMBER: u32 = 0xD7;
const TRACK_TYPE: u32 = 0x83;
const CODEC_ID: u32 = 0x86;
const CODEC_PRIVATE: u32 = 0x63A2;
const DEFAULT_DURATION: u32 = 0x23_E383;
const LANGUAGE: u32 = 0x22_B59C;
const VIDEO: u32 = 0xE0;
const PIXEL_WIDTH: u32 = 0xB0;
const PIXEL_HEIGHT: u32 = 0xBA;
const AUDIO: u32 = 0xE1;
const SAMPLING_FREQUENCY: u32 = 0xB5;
const CHANNELS: u32 = 0x9F;
const CONTENT_ENCODINGS: u32 = 0x6D80;
const CLUSTER: u32 = 0x1F43_B675;
const CLUSTER_TIMESTAMP: u32 = 0xE7;
const SIMPLE_BLOCK: u32 = 0xA3;
const BLOCK_GROUP: u32 = 0xA0;
const BLOCK: u32 = 0xA1;
const REFERENCE_BLOCK: u32 = 0xFB;
/// Elements at the segment's level: where a cluster of unknown size ends.
const SEGMENT_LEVEL: [u32; 8] = [
    0x114D_9B74, // SeekHead
    INFO,
    TRACKS,
    CLUSTER,
    0x1C53_BB6B, // Cues
    0x1254_C367, // Tags
    0x1043_A770, // Chapters
    0x1941_A469, // Attachments
];
/// The EBML header's bound.
const MAX_HEADER_BYTES: u64 = 4096;

/// An element's place: its ID, where its data starts and its size (`None`: unknown, to the
/// end of what holds it).
#[derive(Debug, Clone, Copy)]
struct Element {
    id: u32,
    data: u64,
    size: Option<u64>,
}

fn malformed(what: impl Into<String>) -> VideoFileError {
    VideoFileError::Malformed(what.into())
}

/// An EBML variable-length integer at the start of `bytes`: (its value with the length marker
/// kept, for IDs, or removed, for sizes; its length). `None` when `bytes` is too short or the
/// first byte is 0.
fn vint(bytes: &[u8], keep_marker: bool, max_len: usize) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let len = first.leading_zeros() as usize + 1;
    if len > max_len || bytes.len() < len {
        return None;
    }
    let mut value = if keep_marker {
        u64::from(first)
    } else {
        u64::from(first) & (0xFF >> len)
    };
    for &b in &bytes[1..len] {
        value = (value << 8) | u64::from(b);
    }
    Some((value, len))
}

/// An element header (ID, size) at the start of `bytes`: the element, relative to `at`.
fn header(bytes: &[u8], at: u64) -> Option<(Element, usize)> {
    let (id, id_len) = vint(bytes, true, 4)?;
    let (size, size_len) = vint(&bytes[id_len..], false, 8)?;
    let unknown = size == (1u64 << (7 * size_len)) - 1;
    let len = id_len + size_len;
    Some((
        Element {
            id: id as u32,
            data: at + len as u64,
            size: (!unknown).then_some(size),
        },
        len,
    ))
}

/// Reads the element header at `at` from the file (`None` at the end of the file or where no
/// header can start).
fn read_header(file: &mut File, at: u64, end: u64) -> Result<Option<Element>> {
    if at >= end {
        return Ok(None);
    }
    let mut buf = [0u8; 12];
    let want = (end - at).min(12) as usize;
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut buf[..want])?;
    Ok(header(&buf[..want], at).map(|(e, _)| e))
}

/// Reads `len` bytes at `at` (checked against `bound` first).
fn read_bytes(file: &mut File, at: u64, len: u64, bound: u64, what: &str) -> Result<Vec<u8>> {
    if len > bound {
        return Err(VideoFileError::TooLarge(format!(
            "{what} is {len} bytes; at most {bound} are read"
        )));
    }
    let mut out = Vec::new();
    out.try_reserve_exact(len as usize)
        .map_err(|_| VideoFileError::TooLarge(format!("cannot allocate {len} bytes for {what}")))?;
    out.resize(len as usize, 0);
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut out)?;
    Ok(out)
}

/// The children of an element read into memory (`data`), each inside it.
fn children(data: &[u8], parent: &str) -> Result<Vec<(u32, std::ops::Range<usize>)>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let (e, len) = header(&data[pos..], pos as u64).ok_or_else(|| {
            malformed(format!(
                "{parent}: an element header at byte {pos} is cut off or invalid"
            ))
        })?;
        let size = e
            .size
            .ok_or_else(|| malformed(format!("{parent}: an element of unknown size inside it")))?;
        let start = pos + len;
        let end = (start as u64).checked_add(size).filter(|&x| x <= data.len() as u64).ok_or_else(|| {
            malformed(format!(
                "{parent}: element 0x{:X} at byte {pos} claims {size} bytes, more than its parent holds",
                e.id
            ))
        })? as usize;
        out.push((e.id, start..end));
        pos = end;
    }
    Ok(out)
}

/// An unsigned integer element's value (at most 8 bytes).
fn uint(bytes: &[u8], what: &str) -> Result<u64> {
    if bytes.len() > 8 {
        return Err(malformed(format!(
            "{what} is {} bytes, not an integer",
            bytes.len()
        )));
    }
    Ok(bytes.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b)))
}

/// A float element's value (4 or 8 bytes; 0 bytes is 0).
fn float(bytes: &[u8], what: &str) -> Result<f64> {
    match bytes.len() {
        0 => Ok(0.0),
        4 => Ok(f64::from(f32::from_be_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3],
        ]))),
        8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            Ok(f64::from_be_bytes(b))
        }
        n => Err(malformed(format!("{what} is {n} bytes, not a float"))),
    }
}

/// What a track entry says.
#[derive(Debug, Default)]
struct TrackEntry {
    number: u64,
    kind: u64,
    codec: String,
    private: Vec<u8>,
    default_duration: u64,
    language: String,
    width: u64,
    height: u64,
    rate: f64,
    channels: u64,
    encoded: bool,
}

fn parse_track(data: &[u8]) -> Result<TrackEntry> {
    let mut t = TrackEntry {
        channels: 1,
        rate: 8000.0,
        ..TrackEntry::default()
    };
    for (id, range) in children(data, "TrackEntry")? {
        let v = &data[range];
        match id {
            TRACK_NUMBER => t.number = uint(v, "TrackNumber")?,
            TRACK_TYPE => t.kind = uint(v, "TrackType")?,
            CODEC_ID => {
                t.codec = String::from_utf8_lossy(v)
                    .trim_end_matches('\0')
                    .to_string()
            }
            CODEC_PRIVATE => t.private = v.to_vec(),
            DEFAULT_DURATION => t.default_duration = uint(v, "DefaultDuration")?,
            LANGUAGE => {
                t.language = String::from_utf8_lossy(v)
                    .trim_end_matches('\0')
                    .to_string()
            }
            CONTENT_ENCODINGS => t.encoded = true,
            VIDEO => {
                for (id, r) in children(v, "Video")? {
                    match id {
                        PIXEL_WIDTH => t.width = uint(&v[r], "PixelWidth")?,
                        PIXEL_HEIGHT => t.height = uint(&v[r], "PixelHeight")?,
                        _ => {}
                    }
                }
            }
            AUDIO => {
                for (id, r) in children(v, "Audio")? {
                    match id {
                        SAMPLING_FREQUENCY => t.rate = float(&v[r], "SamplingFrequency")?,
                        CHANNELS => t.channels = uint(&v[r], "Channels")?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(t)
}

/// One frame as the blocks give it, before times are assigned.
#[derive(Debug, Clone, Copy)]
struct Frame {
    offset: u64,
    size: u32,
    /// Presentation time in segment ticks.
    time: i64,
    key: bool,
    /// Its first two bytes, for an Opus track (whose packets' lengths are in their TOC byte).
    head: [u8; 2],
}

/// What a track becomes: its kind, sample entry, timescale and how its frames are timed.
enum Plan {
    /// H.264; `entry` is `None` until the parameter sets are read from the first frame (a
    /// track without `CodecPrivate`, whose frames carry Annex-B start codes).
    Video {
        entry: Option<Vec<u8>>,
        width: u16,
        height: u16,
    },
    Aac {
        entry: Vec<u8>,
        rate: u32,
    },
    Opus {
        entry: Vec<u8>,
    },
}

/// Opens the Matroska file whose first bytes were the EBML magic.
pub(crate) fn open(mut file: File, file_len: u64) -> Result<Mp4Input> {
    // The EBML header: its DocType must be Matroska's or WebM's.
    let head = read_header(&mut file, 0, file_len)?
        .ok_or_else(|| VideoFileError::Truncated("the EBML header is cut off".into()))?;
    let head_size = head
        .size
        .ok_or_else(|| malformed("the EBML header has an unknown size"))?;
    let head_bytes = read_bytes(
        &mut file,
        head.data,
        head_size,
        MAX_HEADER_BYTES,
        "the EBML header",
    )?;
    let doc_type = children(&head_bytes, "EBML header")?
        .into_iter()
        .find(|(id, _)| *id == 0x4282)
        .map(|(_, r)| {
            String::from_utf8_lossy(&head_bytes[r])
                .trim_end_matches('\0')
                .to_string()
        })
        .unwrap_or_default();
    if doc_type != "matroska" && doc_type != "webm" {
        return Err(VideoFileError::NotMp4(format!(
            "it is an EBML file of type {doc_type:?}, not Matroska"
        )));
    }
    // The segment.
    let segment_at = head.data + head_size;
    let segment = read_header(&mut file, segment_at, file_len)?
        .filter(|e| e.id == SEGMENT)
        .ok_or_else(|| {
            VideoFileError::Truncated("no Matroska segment after the EBML header".into())
        })?;
    let segment_end = segment
        .size
        .map_or(file_len, |s| segment.data.saturating_add(s).min(file_len));
    let mut scale = 1_000_000u64;
    let mut tracks_data = None;
    let mut clusters = Vec::new();
    let mut elements = 0usize;
    let mut notes = Vec::new();
    let mut at = segment.data;
    while let Some(e) = read_header(&mut file, at, segment_end)? {
        elements += 1;
        if elements > MAX_TOP_LEVEL_BOXES {
            return Err(VideoFileError::TooLarge(format!(
                "more than {MAX_TOP_LEVEL_BOXES} elements in the segment"
            )));
        }
        let end = match e.size {
            Some(size) => e
                .data
                .checked_add(size)
                .ok_or_else(|| malformed("an element's size overflows"))?,
            // Only a cluster may be of unknown size here (a recording written live).
            None if e.id == CLUSTER => {
                unknown_cluster_end(&mut file, e.data, segment_end, &mut elements)?
            }
            None => segment_end,
        };
        match e.id {
            INFO if end <= file_len => {
                let info = read_bytes(&mut file, e.data, end - e.data, MAX_MOOV_BYTES, "Info")?;
                if let Some((_, r)) = children(&info, "Info")?
                    .into_iter()
                    .find(|(id, _)| *id == TIMESTAMP_SCALE)
                {
                    scale = uint(&info[r], "TimestampScale")?;
                }
            }
            TRACKS if end <= file_len => {
                tracks_data = Some(read_bytes(
                    &mut file,
                    e.data,
                    end - e.data,
                    MAX_MOOV_BYTES,
                    "Tracks",
                )?);
            }
            CLUSTER => {
                if end > file_len {
                    note_cut(&mut notes);
                }
                clusters.push((e.data, end.min(file_len)));
            }
            _ => {}
        }
        if end > file_len {
            break;
        }
        at = end;
    }
    if scale == 0 || scale > 1_000_000_000 {
        return Err(malformed(format!("TimestampScale {scale} (1 to 10^9 ns)")));
    }
    let tracks_data = tracks_data.ok_or_else(|| {
        VideoFileError::Truncated("no Tracks element: the file may be cut off".into())
    })?;
    // The tracks this reader takes, by track number.
    let mut entries = Vec::new();
    for (id, r) in children(&tracks_data, "Tracks")? {
        if id == TRACK_ENTRY {
            if entries.len() == super::limits::MAX_TRACKS {
                return Err(VideoFileError::TooLarge(format!(
                    "more than {} tracks",
                    super::limits::MAX_TRACKS
                )));
            }
            entries.push(parse_track(&tracks_data[r])?);
        }
    }
    let mut plans: Vec<(TrackEntry, Option<Plan>)> = Vec::new();
    // Why the first video track that is not read is not (the error when none is read).
    let mut refused_video = None;
    for t in entries {
        let plan = match plan_track(&t, &mut notes) {
            Ok(plan) => plan,
            Err(e) if t.kind == 1 => {
                notes.push(format!("track {} ({}): not read: {e}", t.number, t.codec));
                refused_video.get_or_insert(e);
                None
            }
            Err(e) => return Err(e),
        };
        plans.push((t, plan));
    }
    if !plans
        .iter()
        .any(|(_, p)| matches!(p, Some(Plan::Video { .. })))
        && let Some(e) = refused_video
    {
        return Err(e);
    }
    // Every block's frames, by track.
    let mut blocks = Blocks {
        file: &mut file,
        file_len,
        plans: &plans,
        frames: plans.iter().map(|_| Vec::new()).collect(),
        total: 0,
        elements: &mut elements,
        notes: &mut notes,
    };
    for (start, end) in clusters {
        blocks.cluster(start, end)?;
    }
    let frames = blocks.frames;
    // An H.264 track without CodecPrivate: its parameter sets from its first frame.
    for ((_, plan), frames) in plans.iter_mut().zip(&frames) {
        if let Some(Plan::Video {
            entry: entry @ None,
            width,
            height,
        }) = plan
        {
            let first = frames
                .first()
                .ok_or_else(|| malformed("the video track has no samples"))?;
            let bytes = read_bytes(
                &mut file,
                first.offset,
                u64::from(first.size),
                u64::from(MAX_SAMPLE_BYTES),
                "the first picture",
            )?;
            let (mut sps, mut pps) = (Vec::new(), Vec::new());
            for unit in avc::annex_b_units(&bytes) {
                match unit.first().map(|b| b & 31) {
                    Some(7) => sps.push(unit.to_vec()),
                    Some(8) => pps.push(unit.to_vec()),
                    _ => {}
                }
            }
            if sps.is_empty() || pps.is_empty() {
                return Err(malformed(
                    "the H.264 track has no CodecPrivate and its first picture no parameter \
                     sets",
                ));
            }
            let config = avc::AvcConfig::from_parameter_sets(sps, pps)?;
            *entry = Some(mux::avc1_entry(*width, *height, &config));
        }
    }
    // Tracks.
    let movie_timescale = 1000u32;
    let mut tracks = Vec::new();
    for (k, ((t, plan), frames)) in plans.into_iter().zip(frames).enumerate() {
        let Some(plan) = plan else { continue };
        let track = build_track(
            k as u32 + 1,
            &t,
            plan,
            &frames,
            scale,
            movie_timescale,
            &mut notes,
        )?;
        tracks.push(track);
    }
    let movie_duration = tracks.iter().map(|t| t.header.duration).max().unwrap_or(0);
    Ok(Mp4Input::from_parts(
        file,
        file_len,
        movie_timescale,
        movie_duration,
        tracks,
        notes,
    ))
}

/// Where an element inside a cluster ends, counted against the elements' bound (shared by the
/// segment and its clusters); one of unknown size cannot be placed there.
fn element_end(e: &Element, elements: &mut usize) -> Result<u64> {
    *elements += 1;
    if *elements > MAX_TOP_LEVEL_BOXES {
        return Err(VideoFileError::TooLarge(format!(
            "more than {MAX_TOP_LEVEL_BOXES} elements in the segment and its clusters"
        )));
    }
    let size = e.size.ok_or_else(|| {
        malformed(format!(
            "element 0x{:X} of unknown size inside a cluster",
            e.id
        ))
    })?;
    e.data
        .checked_add(size)
        .ok_or_else(|| malformed("an element's size overflows"))
}

/// The note for a recording cut off in a cluster (once).
fn note_cut(notes: &mut Vec<String>) {
    const CUT: &str = "the file ends inside a cluster (a recording cut off?); the blocks whole \
                       before its end are read";
    if !notes.iter().any(|n| n == CUT) {
        notes.push(CUT.into());
    }
}

/// Where a cluster of unknown size ends: at the next element of the segment's level, or the
/// segment's end.
fn unknown_cluster_end(file: &mut File, data: u64, end: u64, elements: &mut usize) -> Result<u64> {
    let mut at = data;
    while let Some(e) = read_header(file, at, end)? {
        if SEGMENT_LEVEL.contains(&e.id) {
            return Ok(at);
        }
        at = element_end(&e, elements)?;
    }
    Ok(at.min(end))
}

/// How a track entry is read: `None` for tracks left out (with a note, for audio).
fn plan_track(t: &TrackEntry, notes: &mut Vec<String>) -> Result<Option<Plan>> {
    let name = format!("track {} ({})", t.number, t.codec);
    match t.kind {
        1 => {
            if t.codec != "V_MPEG4/ISO/AVC" {
                return Err(VideoFileError::NotH264(format!(
                    "{} ({})",
                    codec_name(&t.codec),
                    t.codec
                )));
            }
            if t.encoded {
                return Err(VideoFileError::UnsupportedH264(
                    "a Matroska video track whose frames are compressed or encrypted (ContentEncodings)".into(),
                ));
            }
            let (width, height) = (
                u16::try_from(t.width).unwrap_or(0),
                u16::try_from(t.height).unwrap_or(0),
            );
            let entry = if t.private.is_empty() {
                None
            } else {
                let config = avc::AvcConfig::parse(&t.private)?;
                Some(mux::avc1_entry(width, height, &config))
            };
            Ok(Some(Plan::Video {
                entry,
                width,
                height,
            }))
        }
        2 if t.encoded => {
            notes.push(format!(
                "{name}: its frames are compressed or encrypted; not copied"
            ));
            Ok(None)
        }
        2 if t.codec == "A_AAC" => {
            if t.private.len() < 2 || t.private.len() > 64 {
                notes.push(format!("{name}: no AudioSpecificConfig; not copied"));
                return Ok(None);
            }
            let rate = aac_rate(&t.private).unwrap_or(t.rate.round() as u32);
            if rate == 0 {
                notes.push(format!("{name}: no sampling rate; not copied"));
                return Ok(None);
            }
            Ok(Some(Plan::Aac {
                entry: mp4a_entry(&t.private, t.channels as u16, rate),
                rate,
            }))
        }
        2 if t.codec == "A_OPUS" => match dops(&t.private) {
            Some(dops) => Ok(Some(Plan::Opus {
                entry: opus_entry(&dops, t.channels as u16),
            })),
            None => {
                notes.push(format!("{name}: no valid OpusHead; not copied"));
                Ok(None)
            }
        },
        2 => {
            notes.push(format!(
                "{name}: only AAC and Opus audio is copied from Matroska"
            ));
            Ok(None)
        }
        _ => Ok(None),
    }
}

fn codec_name(codec: &str) -> &'static str {
    match codec {
        "V_MPEGH/ISO/HEVC" => "HEVC (H.265)",
        "V_AV1" => "AV1",
        "V_VP9" => "VP9",
        "V_VP8" => "VP8",
        "V_MPEG4/ISO/ASP" | "V_MPEG4/ISO/SP" => "MPEG-4 Part 2",
        "V_MJPEG" => "Motion JPEG",
        _ => "another codec",
    }
}

/// The sampling rate an AudioSpecificConfig names.
fn aac_rate(asc: &[u8]) -> Option<u32> {
    const RATES: [u32; 13] = [
        96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
    ];
    let index = ((asc.first()? & 0x07) << 1) | (asc.get(1)? >> 7);
    RATES.get(usize::from(index)).copied()
}

/// An `esds` descriptor: tag, 4-byte length, body.
fn descriptor(tag: u8, body: &[u8]) -> Vec<u8> {
    let n = body.len() as u32;
    let mut out = vec![
        tag,
        0x80 | (n >> 21) as u8 & 0x7F,
        0x80 | (n >> 14) as u8 & 0x7F,
        0x80 | (n >> 7) as u8 & 0x7F,
        n as u8 & 0x7F,
    ];
    out.extend_from_slice(body);
    out
}

/// An AudioSampleEntry's fields (after the box header), for `channels` at `rate`.
fn audio_fields(channels: u16, rate: u32) -> Vec<u8> {
    let mut b = vec![0u8; 6];
    b.extend_from_slice(&1u16.to_be_bytes()); // data_reference_index
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&channels.max(1).to_be_bytes());
    b.extend_from_slice(&16u16.to_be_bytes());
    b.extend_from_slice(&[0; 4]);
    let rate = if rate <= 0xFFFF { rate << 16 } else { 0 };
    b.extend_from_slice(&rate.to_be_bytes());
    b
}

fn mp4a_entry(asc: &[u8], channels: u16, rate: u32) -> Vec<u8> {
    let mut config = vec![0x40, 0x15, 0, 0, 0];
    config.extend_from_slice(&[0; 8]); // max and average bitrate
    config.extend(descriptor(0x05, asc));
    let mut es = vec![0, 0, 0]; // ES_ID, flags
    es.extend(descriptor(0x04, &config));
    es.extend(descriptor(0x06, &[0x02]));
    let mut esds = vec![0, 0, 0, 0];
    esds.extend(descriptor(0x03, &es));
    let mut b = audio_fields(channels, rate);
    b.extend(mux::boxed(b"esds", &esds));
    mux::boxed(b"mp4a", &b)
}

/// An `OpusHead` (little-endian) as a `dOps` box's body (big-endian).
fn dops(head: &[u8]) -> Option<Vec<u8>> {
    if head.len() < 19 || &head[..8] != b"OpusHead" {
        return None;
    }
    let channels = head[9];
    let family = head[18];
    let mut b = vec![0, channels];
    b.extend_from_slice(&u16::from_le_bytes([head[10], head[11]]).to_be_bytes());
    b.extend_from_slice(
        &u32::from_le_bytes([head[12], head[13], head[14], head[15]]).to_be_bytes(),
    );
    b.extend_from_slice(&i16::from_le_bytes([head[16], head[17]]).to_be_bytes());
    b.push(family);
    if family != 0 {
        b.extend_from_slice(head.get(19..21 + usize::from(channels))?);
    }
    Some(b)
}

fn opus_entry(dops: &[u8], channels: u16) -> Vec<u8> {
    let mut b = audio_fields(channels, 48_000);
    b.extend(mux::boxed(b"dOps", dops));
    mux::boxed(b"Opus", &b)
}

/// An Opus packet's length in 48 kHz samples, from its TOC byte (RFC 6716 3.1); `None` for an
/// empty or malformed packet.
fn opus_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = u32::from(toc >> 3);
    let frame = match config {
        0..=11 => [480, 960, 1920, 2880][(config % 4) as usize],
        12..=15 => [480, 960][(config % 2) as usize],
        _ => [120, 240, 480, 960][(config % 4) as usize],
    };
    let count = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3F),
    };
    Some(frame * count).filter(|&n| n > 0 && n <= 5760)
}

/// What reading the clusters' blocks needs and gathers.
struct Blocks<'a> {
    file: &'a mut File,
    file_len: u64,
    plans: &'a [(TrackEntry, Option<Plan>)],
    /// Every read track's frames, by the index of its plan.
    frames: Vec<Vec<Frame>>,
    /// Frames of all tracks.
    total: u64,
    /// Elements of the segment and its clusters.
    elements: &'a mut usize,
    notes: &'a mut Vec<String>,
}

impl Blocks<'_> {
    /// The blocks of the cluster whose children lie in `start..end`.
    fn cluster(&mut self, start: u64, end: u64) -> Result<()> {
        let mut cluster_time = 0i64;
        let mut at = start;
        while let Some(e) = read_header(self.file, at, end)? {
            let next = element_end(&e, self.elements)?;
            let size = next - e.data;
            if next > self.file_len {
                // A recording cut off in this element: what came before it is read.
                note_cut(self.notes);
                break;
            }
            match e.id {
                CLUSTER_TIMESTAMP => {
                    let v = read_bytes(self.file, e.data, size, 8, "a cluster's Timestamp")?;
                    cluster_time = i64::try_from(uint(&v, "Timestamp")?)
                        .map_err(|_| malformed("a cluster's Timestamp past 2^63"))?;
                }
                SIMPLE_BLOCK => self.block(e.data, size, cluster_time, None)?,
                BLOCK_GROUP => {
                    let group = read_bytes(
                        self.file,
                        e.data,
                        size.min(MAX_SAMPLE_BYTES as u64 + 64),
                        MAX_SAMPLE_BYTES as u64 + 64,
                        "a BlockGroup",
                    )?;
                    let parts = children(&group, "BlockGroup")?;
                    let key = !parts.iter().any(|(id, _)| *id == REFERENCE_BLOCK);
                    if let Some((_, r)) = parts.iter().find(|(id, _)| *id == BLOCK) {
                        let data = e.data + r.start as u64;
                        self.block(data, r.len() as u64, cluster_time, Some(key))?;
                    }
                }
                _ => {}
            }
            at = next;
        }
        Ok(())
    }

    /// One block's frames (`key`: a BlockGroup's keyframe flag; a SimpleBlock carries its own).
    fn block(&mut self, data: u64, size: u64, cluster_time: i64, key: Option<bool>) -> Result<()> {
        let mut head = [0u8; 12];
        let want = size.min(12) as usize;
        self.file.seek(SeekFrom::Start(data))?;
        self.file.read_exact(&mut head[..want])?;
        let bad = || malformed(format!("the block at byte {data} is cut off or invalid"));
        let (number, len) = vint(&head[..want], false, 8).ok_or_else(bad)?;
        if want < len + 3 {
            return Err(bad());
        }
        let Some(k) = self
            .plans
            .iter()
            .position(|(t, plan)| t.number == number && plan.is_some())
        else {
            return Ok(()); // a track left out
        };
        let relative = i64::from(i16::from_be_bytes([head[len], head[len + 1]]));
        let flags = head[len + 2];
        let time = cluster_time.checked_add(relative).ok_or_else(bad)?;
        let key = key.unwrap_or(flags & 0x80 != 0);
        let payload = data + len as u64 + 3;
        let payload_len = size - (len as u64 + 3);
        let lacing = (flags >> 1) & 3;
        let mut sizes: Vec<u64> = Vec::new();
        let mut first = payload;
        if lacing == 0 {
            sizes.push(payload_len);
        } else {
            // A laced block is read whole (audio: small) to find its frames' sizes.
            let bytes = read_bytes(
                self.file,
                payload,
                payload_len,
                u64::from(MAX_SAMPLE_BYTES),
                "a laced block",
            )?;
            let count = usize::from(*bytes.first().ok_or_else(bad)?) + 1;
            let mut pos = 1usize;
            match lacing {
                1 => {
                    for _ in 0..count - 1 {
                        let mut n = 0u64;
                        loop {
                            let b = *bytes.get(pos).ok_or_else(bad)?;
                            pos += 1;
                            n += u64::from(b);
                            if b != 255 {
                                break;
                            }
                        }
                        sizes.push(n);
                    }
                }
                3 => {
                    let (mut n, l) = vint(&bytes[pos..], false, 8).ok_or_else(bad)?;
                    pos += l;
                    sizes.push(n);
                    for _ in 1..count - 1 {
                        let (raw, l) = vint(&bytes[pos..], false, 8).ok_or_else(bad)?;
                        pos += l;
                        // A signed difference: the raw value minus half its range.
                        let bias = (1i64 << (7 * l - 1)) - 1;
                        let next = n as i64 + (raw as i64 - bias);
                        n = u64::try_from(next).map_err(|_| bad())?;
                        sizes.push(n);
                    }
                }
                _ => {
                    let each = (payload_len - 1) / count as u64;
                    if each * count as u64 != payload_len - 1 {
                        return Err(bad());
                    }
                    sizes = vec![each; count - 1];
                }
            }
            let used: u64 = sizes.iter().sum::<u64>() + pos as u64;
            let last = payload_len.checked_sub(used).ok_or_else(bad)?;
            sizes.push(last);
            first = payload + pos as u64;
        }
        let opus = matches!(self.plans[k].1, Some(Plan::Opus { .. }));
        let mut offset = first;
        for size in sizes {
            let size = u32::try_from(size)
            .ok()
            .filter(|&s| s <= MAX_SAMPLE_BYTES)
            .ok_or_else(|| {
                VideoFileError::TooLarge(format!(
                    "a frame of {size} bytes at byte {offset}; at most {MAX_SAMPLE_BYTES} are read"
                ))
            })?;
            if offset + u64::from(size) > self.file_len {
                return Err(VideoFileError::Truncated(format!(
                    "a frame at byte {offset} lies past the end of the file"
                )));
            }
            self.total += 1;
            if self.total > MAX_SAMPLES || self.total > self.file_len {
                return Err(VideoFileError::TooLarge(format!(
                    "more than {MAX_SAMPLES} frames, or more than the file's bytes"
                )));
            }
            let mut head = [0u8; 2];
            if opus && size > 0 {
                let n = size.min(2) as usize;
                self.file.seek(SeekFrom::Start(offset))?;
                self.file.read_exact(&mut head[..n])?;
            }
            self.frames[k].push(Frame {
                offset,
                size,
                time,
                key,
                head,
            });
            offset += u64::from(size);
        }
        Ok(())
    }
}

/// `ticks` of the segment (`scale` ns each) in units of `timescale` a second, rounded.
fn to_units(ticks: i64, scale: u64, timescale: u32) -> i64 {
    let ns = i128::from(ticks) * i128::from(scale);
    let units = (ns * i128::from(timescale) + 500_000_000 * ns.signum()) / 1_000_000_000;
    units.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

fn build_track(
    id: u32,
    t: &TrackEntry,
    plan: Plan,
    frames: &[Frame],
    scale: u64,
    movie_timescale: u32,
    notes: &mut Vec<String>,
) -> Result<Track> {
    let language = pack_language(&t.language);
    let annex_b = t.kind == 1 && t.private.is_empty();
    let (kind, entry, timescale, samples, width, height) = match plan {
        Plan::Video {
            entry,
            width,
            height,
        } => {
            let entry = entry.ok_or_else(|| malformed("the video track has no samples"))?;
            // A microsecond timescale keeps the ticks of any TimestampScale of 1 µs or more.
            let timescale = 1_000_000u32;
            let times: Vec<i64> = frames
                .iter()
                .map(|f| to_units(f.time, scale, timescale))
                .collect();
            let mut sorted = times.clone();
            sorted.sort_unstable();
            let base = sorted.first().copied().unwrap_or(0);
            let default = to_units(t.default_duration as i64, 1, timescale);
            let start = carried_start(base, id, timescale, notes);
            let mut samples = Vec::with_capacity(frames.len());
            for (i, f) in frames.iter().enumerate() {
                let dts = sorted[i] - base;
                let duration = match sorted.get(i + 1) {
                    Some(next) => next - sorted[i],
                    None if default > 0 => default,
                    None => samples.last().map_or(0, |s: &Sample| i64::from(s.duration)),
                };
                let offset = times[i] - base - dts;
                samples.push(Sample {
                    offset: f.offset,
                    dts: dts as u64,
                    size: f.size,
                    duration: u32::try_from(duration)
                        .map_err(|_| malformed("a frame's duration past 32 bits"))?,
                    cts_offset: i32::try_from(offset + start)
                        .map_err(|_| malformed("a frame's time past 32 bits"))?,
                    entry: 0,
                    sync: f.key,
                });
            }
            (TrackKind::Video, entry, timescale, samples, width, height)
        }
        Plan::Aac { entry, rate } => {
            let samples = audio_samples(frames, |_| Some(1024), scale, rate, id, notes)?;
            (TrackKind::Audio, entry, rate, samples, 0, 0)
        }
        Plan::Opus { entry } => {
            let samples =
                audio_samples(frames, |f| opus_samples(&f.head), scale, 48_000, id, notes)?;
            (TrackKind::Audio, entry, 48_000, samples, 0, 0)
        }
    };
    let mut track = Track {
        id,
        kind,
        timescale,
        media_duration: 0,
        language,
        header: TrackHeader {
            flags: 3,
            duration: 0,
            alternate_group: 0,
            volume: if kind == TrackKind::Audio { 0x0100 } else { 0 },
            matrix: mux::IDENTITY,
            width: u32::from(width) << 16,
            height: u32::from(height) << 16,
        },
        edit_list: None,
        entries: vec![SampleEntry {
            kind: [entry[4], entry[5], entry[6], entry[7]],
            raw: entry,
        }],
        samples,
        sample_tables: Vec::new(),
        annex_b,
    };
    track.sample_tables = super::demux::timing_tables(&track.samples)?;
    track.media_duration = track.samples_duration();
    track.header.duration = mux::rescale(track.media_duration, timescale, movie_timescale);
    Ok(track)
}

/// ISO 639-2 `und` unless the track names a three-letter language.
fn pack_language(language: &str) -> u16 {
    let b = language.as_bytes();
    if b.len() == 3 && b.iter().all(|c| c.is_ascii_lowercase()) {
        (u16::from(b[0] - 0x60) << 10) | (u16::from(b[1] - 0x60) << 5) | u16::from(b[2] - 0x60)
    } else {
        0x55C4
    }
}

/// An audio track's samples: each frame's length from `length` (in `rate` units; where it
/// gives none, the time to the next frame), decode times running on from the first frame's
/// time, which the composition offsets carry.
fn audio_samples(
    frames: &[Frame],
    length: impl Fn(&Frame) -> Option<u32>,
    scale: u64,
    rate: u32,
    id: u32,
    notes: &mut Vec<String>,
) -> Result<Vec<Sample>> {
    let Some(first) = frames.first() else {
        return Ok(Vec::new());
    };
    let start = carried_start(to_units(first.time, scale, rate), id, rate, notes);
    let start =
        i32::try_from(start).map_err(|_| malformed("an audio track's start past 32 bits"))?;
    let mut samples: Vec<Sample> = Vec::with_capacity(frames.len());
    let mut dts = 0u64;
    for (i, f) in frames.iter().enumerate() {
        let duration = match length(f) {
            Some(n) => n,
            None => {
                let next = frames
                    .get(i + 1)
                    .map(|n| to_units(n.time - f.time, scale, rate));
                let fallback = samples.last().map_or(0, |s| s.duration);
                next.and_then(|d| u32::try_from(d).ok()).unwrap_or(fallback)
            }
        };
        samples.push(Sample {
            offset: f.offset,
            dts,
            size: f.size,
            duration,
            cts_offset: start,
            entry: 0,
            sync: true,
        });
        dts = dts
            .checked_add(u64::from(duration))
            .ok_or_else(|| malformed("decode times overflow 64 bits"))?;
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An element: its ID's bytes, a 8-byte size, its data.
    fn element(id: &[u8], data: &[u8]) -> Vec<u8> {
        let mut out = id.to_vec();
        out.push(0x01);
        out.extend_from_slice(&(data.len() as u64).to_be_bytes()[1..]);
        out.extend_from_slice(data);
        out
    }

    fn uint_element(id: &[u8], value: u64) -> Vec<u8> {
        element(id, &value.to_be_bytes())
    }

    /// An Opus packet of one 20 ms frame (TOC config 1: SILK narrowband 20 ms; code 0: one
    /// frame), `n` bytes.
    fn opus_packet(n: usize, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; n];
        p[0] = 1 << 3;
        p
    }

    /// A Matroska file of one Opus track whose cluster holds `blocks` (SimpleBlock bodies
    /// after the track number, timecode and flags, which are added).
    fn opus_file(blocks: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut head = b"OpusHead".to_vec();
        head.extend_from_slice(&[1, 2, 0x38, 0x01, 0x80, 0xBB, 0, 0, 0, 0, 0]);
        let mut track = uint_element(&[0xD7], 1);
        track.extend(uint_element(&[0x83], 2));
        track.extend(element(&[0x86], b"A_OPUS"));
        track.extend(element(&[0x63, 0xA2], &head));
        let tracks = element(&[0x16, 0x54, 0xAE, 0x6B], &element(&[0xAE], &track));
        let info = element(
            &[0x15, 0x49, 0xA9, 0x66],
            &uint_element(&[0x2A, 0xD7, 0xB1], 1_000_000),
        );
        let mut cluster = uint_element(&[0xE7], 0);
        for (i, (flags, body)) in blocks.iter().enumerate() {
            let mut block = vec![0x81]; // track 1
            block.extend_from_slice(&((i as i16) * 20).to_be_bytes());
            block.push(*flags);
            block.extend_from_slice(body);
            cluster.extend(element(&[0xA3], &block));
        }
        let mut segment = info;
        segment.extend(tracks);
        segment.extend(element(&[0x1F, 0x43, 0xB6, 0x75], &cluster));
        let mut file = element(&MAGIC, &element(&[0x42, 0x82], b"matroska"));
        file.extend(element(&[0x18, 0x53, 0x80, 0x67], &segment));
        file
    }

    fn open_bytes(name: &str, data: &[u8]) -> Result<Mp4Input> {
        let path = std::env::temp_dir().join(format!("sdstream-mkv-{}-{name}", std::process::id()));
        std::fs::write(&path, data).expect("write");
        let result = Mp4Input::open(&path);
        let _ = std::fs::remove_file(&path);
        result
    }

    #[test]
    fn an_opus_packets_length_comes_from_its_toc() {
        // RFC 6716 3.1: config (5 bits), stereo, code (2 bits: 1, 2, 2 or N frames).
        assert_eq!(opus_samples(&[1 << 3]), Some(960)); // SILK NB 20 ms
        assert_eq!(opus_samples(&[(1 << 3) | 1]), Some(1920)); // two frames
        assert_eq!(opus_samples(&[(1 << 3) | 3, 3]), Some(2880)); // three frames
        assert_eq!(opus_samples(&[31 << 3]), Some(960)); // CELT FB 20 ms
        assert_eq!(opus_samples(&[16 << 3]), Some(120)); // CELT NB 2.5 ms
        assert_eq!(opus_samples(&[13 << 3]), Some(960)); // Hybrid FB 20 ms
        assert_eq!(opus_samples(&[(3 << 3) | 3, 3]), None); // 180 ms: past the 120 ms limit
        assert_eq!(opus_samples(&[(1 << 3) | 3, 0]), None); // no frames
        assert_eq!(opus_samples(&[]), None);
    }

    #[test]
    fn laced_blocks_give_each_frame_its_bytes_and_length() {
        let (a, b, c) = (opus_packet(300, 1), opus_packet(40, 2), opus_packet(7, 3));
        let frames = [a.clone(), b.clone(), c.clone()];
        // Xiph lacing: 3 frames, the first two sizes as runs of 255 (300 = 255 + 45).
        let mut xiph = vec![2, 255, 45, 40];
        xiph.extend(frames.concat());
        // EBML lacing: the first size as a vint, then the difference (40 - 300 = -260) as a
        // signed 2-byte vint (bias 8191).
        let mut ebml = vec![2, 0x41, 0x2C];
        let diff = (-260i64 + 8191) as u16 | 0x4000;
        ebml.extend_from_slice(&diff.to_be_bytes());
        ebml.extend(frames.concat());
        // Fixed-size lacing: two frames of 40 bytes.
        let mut fixed = vec![1];
        fixed.extend(b.repeat(2));
        let file = opus_file(&[
            (0x80 | 0x02, xiph),
            (0x80 | 0x06, ebml),
            (0x80 | 0x04, fixed),
            (0x80, a.clone()),
        ]);
        let mut input = open_bytes("laced.mkv", &file).expect("opens");
        let track = input.tracks[0].clone();
        assert_eq!(track.codec(), *b"Opus");
        assert_eq!(track.timescale, 48_000);
        let sizes: Vec<u32> = track.samples.iter().map(|s| s.size).collect();
        assert_eq!(sizes, [300, 40, 7, 300, 40, 7, 40, 40, 300]);
        // 20 ms of 48 kHz each, in order, from the first block's time.
        assert!(track.samples.iter().all(|s| s.duration == 960));
        assert_eq!(track.samples[8].dts, 8 * 960);
        let mut buf = Vec::new();
        let want = [&a, &b, &c, &a, &b, &c, &b, &b, &a];
        for (s, want) in track.samples.iter().zip(want) {
            input.read_sample(s, &mut buf).expect("sample");
            assert_eq!(&buf, want);
        }
        // The dOps box carries the OpusHead's values big-endian: 2 channels, pre-skip 312.
        let raw = &track.entries[0].raw;
        let dops = raw.windows(4).position(|w| w == b"dOps").expect("dOps") + 4;
        assert_eq!(&raw[dops..dops + 4], &[0, 2, 0x01, 0x38]);
        // Laces that claim more than the block holds are refused by name.
        let mut bad = vec![2, 255, 255, 255, 255];
        bad.extend(opus_packet(10, 4));
        let err = open_bytes("bad.mkv", &opus_file(&[(0x82, bad)])).expect_err("bad lacing");
        assert!(err.to_string().contains("cut off or invalid"), "{err}");
    }
}
