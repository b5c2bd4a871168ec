//! Fragmented MP4: the samples a file's movie fragments (`moof` boxes) add to the tracks its
//! index (`moov`) declares. Cameras, OBS's crash-safe recordings, browsers' `MediaRecorder`,
//! CMAF/DASH packagers and ffmpeg's `-movflags frag_keyframe` write them: the index holds the
//! tracks and often no samples, and each fragment a run of samples per track, so that a
//! recording cut off keeps every fragment written before the cut.
//!
//! Each fragment's samples are appended to their track as if its sample table listed them, so
//! that decoding and the output's copy of the audio see one track: decode times continue from
//! the track's last sample (a fragment's `tfdt` that leaves a gap lengthens the sample before
//! it; one that overlaps shortens it), and the first fragment's decode time of a track with no
//! samples yet is carried in every sample's composition offset, so that presentation times are
//! the file's. A fragment whose samples lie past the end of the file ends the reading there: it
//! and the fragments after it are left out, and [`FragmentsRead::cut`] says so.
//!
//! Bounds, as for the index: each `moof` is read whole only up to
//! [`MAX_MOOV_BYTES`](super::limits::MAX_MOOV_BYTES); every entry count is checked against the
//! bytes of its box, the samples of all tracks together against
//! [`MAX_SAMPLES`](super::limits::MAX_SAMPLES) and the file's size, every sample against
//! [`MAX_SAMPLE_BYTES`](super::limits::MAX_SAMPLE_BYTES) and the file's end, before a sample is
//! kept.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use super::bmff::{Fields, children};
use super::demux::{Sample, Track, carried_start};
use super::limits::{MAX_MOOV_BYTES, MAX_SAMPLE_BYTES, MAX_SAMPLES};
use super::{Result, VideoFileError};

/// A track's defaults for its fragments (`trex` in the index's `mvex`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TrackDefaults {
    pub(crate) track_id: u32,
    /// 1-based sample description index.
    pub(crate) description: u32,
    pub(crate) duration: u32,
    pub(crate) size: u32,
    pub(crate) flags: u32,
}

/// The `trex` boxes of an `mvex`.
pub(crate) fn parse_mvex(mvex: &[u8]) -> Result<Vec<TrackDefaults>> {
    let mut out = Vec::new();
    for child in children(mvex, "mvex") {
        let child = child?;
        if &child.kind != b"trex" {
            continue;
        }
        if out.len() == super::limits::MAX_TRACKS {
            return Err(VideoFileError::TooLarge(format!(
                "mvex has more than {} track defaults (trex)",
                super::limits::MAX_TRACKS
            )));
        }
        let mut f = Fields::new(child.body, "trex");
        f.version_flags()?;
        out.push(TrackDefaults {
            track_id: f.u32()?,
            description: f.u32()?,
            duration: f.u32()?,
            size: f.u32()?,
            flags: f.u32()?,
        });
    }
    Ok(out)
}

/// Where a movie fragment lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FragmentBox {
    /// The byte of the `moof` header.
    pub(crate) pos: u64,
    /// The whole box's size.
    pub(crate) size: u64,
    /// Its header's length (8, or 16 with a 64-bit size).
    pub(crate) header_len: u64,
}

/// What reading the fragments gave.
#[derive(Debug, Default)]
pub(crate) struct FragmentsRead {
    /// Fragments whose samples were added.
    pub(crate) read: usize,
    /// Why the fragments from some point on were left out (a file cut off), if they were.
    pub(crate) cut: Option<String>,
    /// What else a user should know (a start time left out).
    pub(crate) notes: Vec<String>,
}

/// Sample flags: `sample_is_non_sync_sample`.
const NON_SYNC: u32 = 0x0001_0000;

// tfhd flags.
const BASE_DATA_OFFSET: u32 = 0x1;
const DESCRIPTION_INDEX: u32 = 0x2;
const DEFAULT_DURATION: u32 = 0x8;
const DEFAULT_SIZE: u32 = 0x10;
const DEFAULT_FLAGS: u32 = 0x20;
const BASE_IS_MOOF: u32 = 0x2_0000;

// trun flags.
const DATA_OFFSET: u32 = 0x1;
const FIRST_SAMPLE_FLAGS: u32 = 0x4;
const SAMPLE_DURATION: u32 = 0x100;
const SAMPLE_SIZE: u32 = 0x200;
const SAMPLE_FLAGS: u32 = 0x400;
const SAMPLE_CTS: u32 = 0x800;

/// A track's state across fragments.
#[derive(Debug, Clone, Copy, Default)]
struct TrackState {
    /// The first fragment's decode time, when the track had no samples before it: later
    /// fragments' decode times count from it.
    origin: u64,
    /// What every fragment sample's composition offset carries of it (all of it, unless it is
    /// too large for a 32-bit offset).
    carried: i64,
}

/// One fragment's samples for one track, before they are known to lie inside the file.
struct Pending {
    track: usize,
    /// The fragment's decode time (`tfdt`), if it gives one.
    decode_time: Option<u64>,
    samples: Vec<Sample>,
}

/// Appends the samples of `fragments` (in file order) to `tracks`. `defaults` are the index's
/// `trex` boxes; `samples_before` the samples the index's tables already hold.
pub(crate) fn read(
    file: &mut File,
    file_len: u64,
    fragments: &[FragmentBox],
    defaults: &[TrackDefaults],
    tracks: &mut [Track],
    samples_before: u64,
) -> Result<FragmentsRead> {
    let mut states = vec![TrackState::default(); tracks.len()];
    let mut total = samples_before;
    let mut out = FragmentsRead::default();
    for (number, fragment) in fragments.iter().enumerate() {
        let at = fragment.pos;
        if fragment.pos.saturating_add(fragment.size) > file_len {
            out.cut = Some(format!(
                "fragment {} of {} (moof at byte {at}) runs past the end of the file",
                number + 1,
                fragments.len()
            ));
            break;
        }
        if fragment.size > MAX_MOOV_BYTES {
            return Err(VideoFileError::TooLarge(format!(
                "the fragment header (moof) at byte {at} is {} bytes; at most {MAX_MOOV_BYTES} are \
                 read",
                fragment.size
            )));
        }
        let body_len = (fragment.size - fragment.header_len) as usize;
        let mut body = Vec::new();
        body.try_reserve_exact(body_len).map_err(|_| {
            VideoFileError::TooLarge(format!("cannot allocate {body_len} bytes for moof"))
        })?;
        body.resize(body_len, 0);
        file.seek(SeekFrom::Start(at + fragment.header_len))?;
        file.read_exact(&mut body)?;
        let pending = parse_moof(&body, at, file_len, defaults, tracks, MAX_SAMPLES - total)?;
        // Every sample inside the file before any is kept: a fragment that is not whole (the
        // recording was cut in its media data) ends the reading.
        let outside = pending.iter().find_map(|p| {
            p.samples
                .iter()
                .position(|s| s.offset.saturating_add(u64::from(s.size)) > file_len)
                .map(|k| (p, k))
        });
        if let Some((p, k)) = outside {
            let s = p.samples[k];
            let place = format!(
                "fragment {} of {} (moof at byte {at}): track {}'s sample {} (bytes {} to {}) lies \
                 past the end of the file ({file_len} bytes)",
                number + 1,
                fragments.len(),
                tracks[p.track].id,
                k + 1,
                s.offset,
                s.offset.saturating_add(u64::from(s.size))
            );
            // Only the last fragment can have been cut off; one before it is malformed.
            if number + 1 < fragments.len() {
                return Err(VideoFileError::Malformed(place));
            }
            out.cut = Some(place);
            break;
        }
        for p in pending {
            total += p.samples.len() as u64;
            append(
                &mut tracks[p.track],
                &mut states[p.track],
                p,
                at,
                &mut out.notes,
            )?;
        }
        if total > file_len {
            return Err(VideoFileError::Malformed(format!(
                "{total} samples in a file of {file_len} bytes (each takes at least one)"
            )));
        }
        out.read += 1;
    }
    Ok(out)
}

/// A `moof`'s track fragments: their samples with their places in the file and their times
/// relative to the fragment's start.
fn parse_moof(
    moof: &[u8],
    moof_pos: u64,
    file_len: u64,
    defaults: &[TrackDefaults],
    tracks: &[Track],
    samples_left: u64,
) -> Result<Vec<Pending>> {
    let mut pending: Vec<Pending> = Vec::new();
    let mut in_fragment = 0u64;
    // Where the previous track fragment's data ended (the next one's base, ISO/IEC 14496-12
    // 8.8.7.1, when it names none).
    let mut previous_end: Option<u64> = None;
    for traf in children(moof, "moof") {
        let traf = traf?;
        if &traf.kind != b"traf" {
            continue;
        }
        let what = format!("the fragment at byte {moof_pos}");
        let bad = |m: String| VideoFileError::Malformed(format!("{what}: {m}"));
        let mut tfhd = None;
        let mut tfdt = None;
        let mut truns = Vec::new();
        for child in children(traf.body, "traf") {
            let child = child?;
            match &child.kind {
                b"tfhd" => tfhd = Some(child.body),
                b"tfdt" => {
                    let mut f = Fields::new(child.body, "tfdt");
                    let (version, _) = f.version_flags()?;
                    tfdt = Some(if version == 1 {
                        f.u64()?
                    } else {
                        u64::from(f.u32()?)
                    });
                }
                b"trun" => truns.push(child.body),
                _ => {}
            }
        }
        let tfhd =
            tfhd.ok_or_else(|| bad("a track fragment (traf) has no header (tfhd)".into()))?;
        let mut f = Fields::new(tfhd, "tfhd");
        let (_, flags) = f.version_flags()?;
        let track_id = f.u32()?;
        let track = tracks
            .iter()
            .position(|t| t.id == track_id)
            .ok_or_else(|| {
                bad(format!(
                    "a track fragment names track {track_id}, which the index (moov) does not have"
                ))
            })?;
        let trex = defaults
            .iter()
            .find(|d| d.track_id == track_id)
            .copied()
            .unwrap_or_default();
        let base = if flags & BASE_DATA_OFFSET != 0 {
            f.u64()?
        } else if flags & BASE_IS_MOOF != 0 {
            moof_pos
        } else {
            previous_end.unwrap_or(moof_pos)
        };
        let description = f.u32_if(flags & DESCRIPTION_INDEX != 0, trex.description)?;
        let default_duration = f.u32_if(flags & DEFAULT_DURATION != 0, trex.duration)?;
        let default_size = f.u32_if(flags & DEFAULT_SIZE != 0, trex.size)?;
        let default_flags = f.u32_if(flags & DEFAULT_FLAGS != 0, trex.flags)?;
        let entries = tracks[track].entries.len();
        let mut samples = Vec::new();
        let mut next = base;
        for trun in truns {
            let mut f = Fields::new(trun, "trun");
            let (_, run_flags) = f.version_flags()?;
            let count = f.u32()?;
            let data_offset = if run_flags & DATA_OFFSET != 0 {
                Some(f.u32()? as i32)
            } else {
                None
            };
            let first_flags = if run_flags & FIRST_SAMPLE_FLAGS != 0 {
                Some(f.u32()?)
            } else {
                None
            };
            let fields = [SAMPLE_DURATION, SAMPLE_SIZE, SAMPLE_FLAGS, SAMPLE_CTS]
                .iter()
                .filter(|&&bit| run_flags & bit != 0)
                .count();
            // The count against the bytes its entries take, and against what may still come.
            let room = if fields == 0 {
                u64::MAX
            } else {
                (f.remaining() / (4 * fields)) as u64
            };
            if u64::from(count) > room {
                return Err(bad(format!(
                    "trun claims {count} samples of {} bytes but holds room for {room}",
                    4 * fields
                )));
            }
            in_fragment += u64::from(count);
            if in_fragment > samples_left {
                return Err(VideoFileError::TooLarge(format!(
                    "{what} brings the samples past {MAX_SAMPLES} in all tracks"
                )));
            }
            if in_fragment > file_len {
                return Err(bad(format!(
                    "{in_fragment} samples in a file of {file_len} bytes (each takes at least \
                     one)"
                )));
            }
            if description == 0 || description as usize > entries {
                return Err(bad(format!(
                    "track {track_id}'s fragment names sample description {description} of \
                     {entries}"
                )));
            }
            if let Some(offset) = data_offset {
                let start = i128::from(base) + i128::from(offset);
                next = u64::try_from(start).map_err(|_| {
                    bad(format!(
                        "track {track_id}'s run starts at byte {start}, before the file"
                    ))
                })?;
            }
            samples.try_reserve_exact(count as usize).map_err(|_| {
                VideoFileError::TooLarge(format!("cannot allocate the table of {count} samples"))
            })?;
            for k in 0..count {
                let duration = f.u32_if(run_flags & SAMPLE_DURATION != 0, default_duration)?;
                let size = f.u32_if(run_flags & SAMPLE_SIZE != 0, default_size)?;
                let sample_flags = f.u32_if(run_flags & SAMPLE_FLAGS != 0, default_flags)?;
                // The first sample's flags override the others' for it alone.
                let sample_flags = match (k, first_flags) {
                    (0, Some(first)) => first,
                    _ => sample_flags,
                };
                let cts_offset = if run_flags & SAMPLE_CTS != 0 {
                    // Version 0's unsigned offsets read as signed (as `ctts`'s), version 1's
                    // are signed.
                    f.u32()? as i32
                } else {
                    0
                };
                if size > MAX_SAMPLE_BYTES {
                    return Err(VideoFileError::TooLarge(format!(
                        "{what}: track {track_id}'s sample {} is {size} bytes; at most \
                         {MAX_SAMPLE_BYTES} are read",
                        k + 1
                    )));
                }
                samples.push(Sample {
                    offset: next,
                    dts: 0,
                    size,
                    duration,
                    cts_offset,
                    entry: (description - 1) as u16,
                    sync: sample_flags & NON_SYNC == 0,
                });
                next = next.checked_add(u64::from(size)).ok_or_else(|| {
                    bad(format!(
                        "track {track_id}'s sample offsets overflow 64 bits"
                    ))
                })?;
            }
        }
        previous_end = Some(next);
        pending.push(Pending {
            track,
            decode_time: tfdt,
            samples,
        });
    }
    Ok(pending)
}

/// Appends one track fragment's samples to its track, placing them in decode time.
fn append(
    track: &mut Track,
    state: &mut TrackState,
    p: Pending,
    moof_pos: u64,
    notes: &mut Vec<String>,
) -> Result<()> {
    let id = track.id;
    let bad = |m: String| {
        VideoFileError::Malformed(format!("the fragment at byte {moof_pos}: track {id}: {m}"))
    };
    if p.samples.is_empty() {
        return Ok(());
    }
    let mut dts = track.samples_duration();
    if let Some(time) = p.decode_time {
        match track.samples.last_mut() {
            // The track's first samples: its start is carried in the composition offsets.
            None => {
                state.origin = time;
                let start = i64::try_from(time).unwrap_or(i64::MAX);
                state.carried = carried_start(start, id, track.timescale, notes);
            }
            Some(last) => {
                let time = time.checked_sub(state.origin).ok_or_else(|| {
                    bad(format!(
                        "the fragment's decode time {time} is before the track's first ({})",
                        state.origin
                    ))
                })?;
                if time < last.dts {
                    return Err(bad(format!(
                        "the fragment's decode time {time} is before the previous sample's ({})",
                        last.dts
                    )));
                }
                // A gap lengthens the sample before it, an overlap shortens it (to nothing
                // where the fragment starts at its time: ffmpeg's fragment-a-frame audio has
                // such pairs, which FFmpeg also reads as two packets at one time).
                last.duration = u32::try_from(time - last.dts).map_err(|_| {
                    bad(format!(
                        "a gap of {} units before the fragment does not fit a sample's duration",
                        time - last.dts
                    ))
                })?;
                dts = time;
            }
        }
    }
    let carried = state.carried;
    for mut s in p.samples {
        s.dts = dts;
        let offset = i64::from(s.cts_offset) + carried;
        s.cts_offset = i32::try_from(offset).map_err(|_| {
            bad(format!(
                "its start ({carried} units) and a composition offset of {} do not fit 32 bits",
                s.cts_offset
            ))
        })?;
        dts = dts
            .checked_add(u64::from(s.duration))
            .ok_or_else(|| bad("decode times overflow 64 bits".into()))?;
        track.samples.push(s);
    }
    Ok(())
}
