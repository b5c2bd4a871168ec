//! Reading an MP4 (ISO BMFF; QuickTime's `.mov` has the same boxes): the top level is walked
//! box by box without reading the media data, the index (`moov`, at most
//! [`MAX_MOOV_BYTES`](super::limits::MAX_MOOV_BYTES)) is read into memory and each track's
//! sample table expanded into one [`Sample`] per sample, every sample checked to lie inside the
//! file; a fragmented file's movie fragments add theirs ([`super::fragments`]). Samples are then
//! read one at a time ([`Mp4Input::read_sample`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::bmff::{self, BoxRef, Fields, children, fourcc};
use super::fragments::{self, FragmentBox, TrackDefaults};
use super::limits::{
    MAX_MOOV_BYTES, MAX_SAMPLE_BYTES, MAX_SAMPLE_ENTRIES, MAX_SAMPLES, MAX_TOP_LEVEL_BOXES,
    MAX_TRACKS,
};
use super::{Result, VideoFileError, mux};

/// One sample (an access unit of video, a packet of audio) of a track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Where its bytes start in the file.
    pub offset: u64,
    /// Its decode time, in the track's timescale (the sum of the durations before it).
    pub dts: u64,
    /// Its size in bytes.
    pub size: u32,
    /// Its duration (`stts`), in the track's timescale.
    pub duration: u32,
    /// Composition time minus decode time (`ctts`; 0 without one).
    pub cts_offset: i32,
    /// Which sample description it uses (0-based).
    pub entry: u16,
    /// A sync sample (`stss`; every sample without one).
    pub sync: bool,
}

impl Sample {
    /// Its composition (presentation) time, in the track's timescale, before the edit list.
    pub fn cts(&self) -> i64 {
        self.dts as i64 + i64::from(self.cts_offset)
    }
}

/// What a track carries, by its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackKind {
    /// `vide`.
    Video,
    /// `soun`.
    Audio,
    /// Anything else (subtitles, timed metadata, hints), by handler type.
    Other([u8; 4]),
}

impl TrackKind {
    fn name(self) -> String {
        match self {
            TrackKind::Video => "video".into(),
            TrackKind::Audio => "audio".into(),
            TrackKind::Other(kind) => format!("a {} track", fourcc(kind)),
        }
    }
}

/// The track header's values an output track keeps (`tkhd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackHeader {
    /// `tkhd` flags (enabled, in movie, in preview).
    pub flags: u32,
    /// The track's duration in the movie's timescale (after its edit list).
    pub duration: u64,
    /// Alternate group (tracks of one group are alternatives of each other).
    pub alternate_group: u16,
    /// Volume (8.8 fixed point; 1.0 for audio).
    pub volume: u16,
    /// The display matrix, as stored (a rotated phone video's rotation).
    pub matrix: [u8; 36],
    /// Width, 16.16 fixed point.
    pub width: u32,
    /// Height, 16.16 fixed point.
    pub height: u32,
}

/// A sample description (an `stsd` entry): its type (`avc1`, `mp4a`, …) and the whole box,
/// header included, as the file has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleEntry {
    /// The entry's type: the codec.
    pub kind: [u8; 4],
    /// The entry box, byte for byte.
    pub raw: Vec<u8>,
}

/// One track of the file.
#[derive(Debug, Clone)]
pub struct Track {
    /// `tkhd` track id.
    pub id: u32,
    /// What it carries.
    pub kind: TrackKind,
    /// Media timescale (`mdhd`): units per second of its times.
    pub timescale: u32,
    /// Media duration (`mdhd`), in the timescale.
    pub media_duration: u64,
    /// ISO 639-2 language, packed as `mdhd` has it.
    pub language: u16,
    /// The track header's values.
    pub header: TrackHeader,
    /// The edit list box (`elst`), byte for byte, if the track has one.
    pub edit_list: Option<Vec<u8>>,
    /// Sample descriptions, in order.
    pub entries: Vec<SampleEntry>,
    /// The samples, in decode order.
    pub samples: Vec<Sample>,
    /// The sample table's boxes that describe samples by number and not by place in the file
    /// (`stts`, `ctts`, `cslg`, `stss`, `sdtp`, `sgpd`, `sbgp`, `stps`, `subs`, `padb`), byte for
    /// byte: a copy of the track with the same samples keeps them as they are.
    pub sample_tables: Vec<Vec<u8>>,
    /// H.264 samples that carry Annex-B start codes instead of length prefixes (Chromium's
    /// Matroska recordings, whose parameter sets are in the stream); false in an MP4.
    pub annex_b: bool,
}

impl Track {
    /// The codec: the type of the first sample description.
    pub fn codec(&self) -> [u8; 4] {
        self.entries.first().map_or(*b"    ", |e| e.kind)
    }

    /// The duration of the samples, in the timescale (the last decode time plus its duration).
    pub fn samples_duration(&self) -> u64 {
        self.samples
            .last()
            .map_or(0, |s| s.dts.saturating_add(u64::from(s.duration)))
    }
}

/// An MP4 file open for reading: its index, parsed and checked, and the file for the samples.
#[derive(Debug)]
pub struct Mp4Input {
    file: File,
    /// The file's size in bytes.
    pub file_len: u64,
    /// The `ftyp` box, byte for byte (none in some QuickTime files).
    pub ftyp: Option<Vec<u8>>,
    /// The movie timescale (`mvhd`): the units of the track headers' and edit lists' durations.
    pub movie_timescale: u32,
    /// The movie duration (`mvhd`), in the movie timescale.
    pub movie_duration: u64,
    /// The tracks, in the file's order.
    pub tracks: Vec<Track>,
    /// Movie fragments (`moof`) whose samples the tracks hold: 0 for a file that is not
    /// fragmented.
    pub fragments: usize,
    /// What a user should know about how the file was read: fragments left out of a recording
    /// that was cut off, a start time left out.
    pub notes: Vec<String>,
}

/// Top-level box types an MP4 or QuickTime file starts with.
const TOP_LEVEL: [&[u8; 4]; 12] = [
    b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"styp", b"sidx",
    b"meta", b"pdin",
];

/// What a file that is not an MP4 looks like, from its first bytes.
fn sniff(first: &[u8]) -> String {
    let known: [(&[u8], &str); 8] = [
        (b"\x89PNG", "a PNG picture"),
        (b"\xff\xd8\xff", "a JPEG picture"),
        (b"GIF8", "a GIF picture"),
        (b"RIFF", "a RIFF file (AVI or WAV)"),
        (b"FLV", "an FLV file"),
        (b"OggS", "an Ogg file"),
        (b"ID3", "an MP3 file"),
        (b"\x00\x00\x01\xba", "an MPEG program stream"),
    ];
    for (magic, name) in known {
        if first.starts_with(magic) {
            return format!("it is {name}");
        }
    }
    if first.first() == Some(&0x47) {
        return "it looks like an MPEG transport stream".into();
    }
    if first.is_empty() {
        return "the file is empty".into();
    }
    let shown: Vec<String> = first.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!(
        "it does not start with an MP4 box (its first bytes: {})",
        shown.join(" ")
    )
}

impl Mp4Input {
    /// Opens `path` and reads its index. Errors name what was wrong: not an MP4, truncated,
    /// malformed, fragmented, over a limit.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path)?;
        let file_len = file.metadata()?.len();
        if file_len == 0 {
            return Err(VideoFileError::NotMp4(sniff(&[])));
        }
        let mut magic = [0u8; 4];
        if file_len >= 4 {
            file.read_exact(&mut magic)?;
            if magic == super::matroska::MAGIC {
                return super::matroska::open(file, file_len);
            }
        }
        let mut pos = 0u64;
        let mut ftyp = None;
        let mut moov: Option<Vec<u8>> = None;
        let mut fragment_boxes = Vec::new();
        let mut boxes = 0usize;
        while pos < file_len {
            boxes += 1;
            if boxes > MAX_TOP_LEVEL_BOXES {
                return Err(VideoFileError::TooLarge(format!(
                    "more than {MAX_TOP_LEVEL_BOXES} boxes at the top level"
                )));
            }
            let mut head = [0u8; 16];
            let want = (file_len - pos).min(16) as usize;
            file.seek(SeekFrom::Start(pos))?;
            file.read_exact(&mut head[..want])?;
            let parsed = bmff::header(&head[..want]);
            if boxes == 1 {
                let known = parsed
                    .as_ref()
                    .is_ok_and(|(kind, _, _)| TOP_LEVEL.contains(&kind));
                if !known {
                    return Err(VideoFileError::NotMp4(sniff(&head[..want])));
                }
            }
            let (kind, header_len, size) = match parsed {
                Ok(h) => h,
                Err(_) if moov.is_some() => break, // a few stray bytes after the last box
                Err(_) => {
                    return Err(VideoFileError::Truncated(format!(
                        "it ends inside a box header at byte {pos} before the index (moov)"
                    )));
                }
            };
            let size = size.unwrap_or(file_len - pos);
            if size < header_len as u64 {
                return Err(VideoFileError::Malformed(format!(
                    "the top-level box {} at byte {pos} has size {size}, less than its header",
                    fourcc(kind)
                )));
            }
            let end = pos.checked_add(size).ok_or_else(|| {
                VideoFileError::Malformed(format!(
                    "box {} at byte {pos} has size {size}",
                    fourcc(kind)
                ))
            })?;
            match &kind {
                b"moof" => fragment_boxes.push(FragmentBox {
                    pos,
                    size,
                    header_len: header_len as u64,
                }),
                b"moov" => {
                    if moov.is_some() {
                        return Err(VideoFileError::Malformed("two moov boxes".into()));
                    }
                    if end > file_len {
                        return Err(VideoFileError::Truncated(format!(
                            "the index (moov, {size} bytes at byte {pos}) runs {} bytes past the \
                             end of the file",
                            end - file_len
                        )));
                    }
                    if size > MAX_MOOV_BYTES {
                        return Err(VideoFileError::TooLarge(format!(
                            "the index (moov) is {size} bytes; at most {MAX_MOOV_BYTES} are read"
                        )));
                    }
                    let body_len = (size - header_len as u64) as usize;
                    let mut body = Vec::new();
                    body.try_reserve_exact(body_len).map_err(|_| {
                        VideoFileError::TooLarge(format!(
                            "cannot allocate {body_len} bytes for moov"
                        ))
                    })?;
                    body.resize(body_len, 0);
                    file.seek(SeekFrom::Start(pos + header_len as u64))?;
                    file.read_exact(&mut body)?;
                    moov = Some(body);
                }
                b"ftyp" if ftyp.is_none() && size <= 4096 && end <= file_len => {
                    let mut raw = vec![0u8; size as usize];
                    file.seek(SeekFrom::Start(pos))?;
                    file.read_exact(&mut raw)?;
                    ftyp = Some(raw);
                }
                _ => {}
            }
            if end > file_len && moov.is_none() {
                return Err(VideoFileError::Truncated(format!(
                    "box {} at byte {pos} claims {size} bytes, {} past the end of the file, and \
                     the index (moov) was not found before it (a recording that was cut off \
                     writes its index last)",
                    fourcc(kind),
                    end - file_len
                )));
            }
            pos = end;
        }
        let moov = moov.ok_or_else(|| {
            VideoFileError::Truncated(
                "no index (moov box): the file may be cut off or still being written".into(),
            )
        })?;
        let (mut input, defaults) = Self::from_moov(file, file_len, &moov)?;
        input.ftyp = ftyp;
        if defaults.is_some() || !fragment_boxes.is_empty() {
            input.add_fragments(&fragment_boxes, &defaults.unwrap_or_default())?;
        }
        Ok(input)
    }

    /// Adds the samples of the movie fragments, and describes each track that got some as one
    /// plain track would be: its timing tables made from its samples, its durations from them.
    fn add_fragments(&mut self, boxes: &[FragmentBox], defaults: &[TrackDefaults]) -> Result<()> {
        let before: Vec<usize> = self.tracks.iter().map(|t| t.samples.len()).collect();
        let total = before.iter().map(|&n| n as u64).sum();
        let read = fragments::read(
            &mut self.file,
            self.file_len,
            boxes,
            defaults,
            &mut self.tracks,
            total,
        )?;
        self.fragments = read.read;
        if let Some(cut) = read.cut {
            self.notes.push(format!(
                "the file ends inside a movie fragment; the {} whole fragments before it are read \
                 ({cut})",
                read.read
            ));
        }
        self.notes.extend(read.notes);
        for (track, &n) in self.tracks.iter_mut().zip(&before) {
            if track.samples.len() == n {
                continue;
            }
            // The index's sample-numbered tables described its own samples only. Sample groups
            // (an AAC track's pre-roll) stay: samples past a group table's end belong to none.
            track
                .sample_tables
                .retain(|b| matches!(b.get(4..8), Some(b"sgpd" | b"sbgp")));
            track.sample_tables.extend(timing_tables(&track.samples)?);
            track.media_duration = track.samples_duration();
            let duration =
                mux::rescale(track.media_duration, track.timescale, self.movie_timescale);
            // A fragmented file's index has 0 (or all ones) where the durations will be.
            if track.edit_list.is_none() || matches!(track.header.duration, 0 | u64::MAX) {
                track.header.duration = duration;
            }
        }
        if matches!(self.movie_duration, 0 | u64::MAX) || self.fragments > 0 {
            self.movie_duration = self
                .tracks
                .iter()
                .map(|t| t.header.duration)
                .max()
                .unwrap_or(0);
        }
        Ok(())
    }

    /// An input of these tracks (an MP4's index, or another container's reader's (Matroska)
    /// tracks in MP4's terms).
    pub(super) fn from_parts(
        file: File,
        file_len: u64,
        movie_timescale: u32,
        movie_duration: u64,
        tracks: Vec<Track>,
        notes: Vec<String>,
    ) -> Self {
        Self {
            file,
            file_len,
            ftyp: None,
            movie_timescale,
            movie_duration,
            tracks,
            fragments: 0,
            notes,
        }
    }

    fn from_moov(
        file: File,
        file_len: u64,
        moov: &[u8],
    ) -> Result<(Self, Option<Vec<TrackDefaults>>)> {
        let mut movie_timescale = 0;
        let mut movie_duration = 0;
        let mut tracks = Vec::new();
        let mut total_samples = 0u64;
        let mut defaults = None;
        for child in children(moov, "moov") {
            let child = child?;
            match &child.kind {
                b"mvhd" => {
                    let mut f = Fields::new(child.body, "mvhd");
                    let (version, _) = f.version_flags()?;
                    if version == 1 {
                        f.skip(16)?;
                        movie_timescale = f.u32()?;
                        movie_duration = f.u64()?;
                    } else {
                        f.skip(8)?;
                        movie_timescale = f.u32()?;
                        movie_duration = u64::from(f.u32()?);
                    }
                }
                b"mvex" => defaults = Some(fragments::parse_mvex(child.body)?),
                b"trak" => {
                    if tracks.len() == MAX_TRACKS {
                        return Err(VideoFileError::TooLarge(format!(
                            "more than {MAX_TRACKS} tracks"
                        )));
                    }
                    let track = parse_track(child, file_len, MAX_SAMPLES - total_samples)?;
                    total_samples += track.samples.len() as u64;
                    tracks.push(track);
                }
                _ => {}
            }
        }
        if movie_timescale == 0 {
            return Err(VideoFileError::Malformed(
                "the movie header (mvhd) is missing or has timescale 0".into(),
            ));
        }
        Ok((
            Self::from_parts(
                file,
                file_len,
                movie_timescale,
                movie_duration,
                tracks,
                Vec::new(),
            ),
            defaults,
        ))
    }

    /// What the file holds, for messages: "video (avc1), audio (mp4a)".
    pub fn describe_tracks(&self) -> String {
        if self.tracks.is_empty() {
            return "no tracks".into();
        }
        let parts: Vec<String> = self
            .tracks
            .iter()
            .map(|t| format!("{} ({})", t.kind.name(), fourcc(t.codec())))
            .collect();
        parts.join(", ")
    }

    /// Reads one sample's bytes into `buf` (replacing what it held).
    pub fn read_sample(&mut self, sample: &Sample, buf: &mut Vec<u8>) -> Result<()> {
        // Checked when the index was read; checked again, as the file may have changed since.
        let end = sample.offset.checked_add(u64::from(sample.size));
        if end.is_none_or(|e| e > self.file_len) {
            return Err(VideoFileError::Truncated(format!(
                "a sample at byte {} ({} bytes) lies past the end of the file",
                sample.offset, sample.size
            )));
        }
        buf.clear();
        buf.resize(sample.size as usize, 0);
        self.file.seek(SeekFrom::Start(sample.offset))?;
        self.file.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                VideoFileError::Truncated(format!(
                    "a sample at byte {} ({} bytes) lies past the end of the file (it shrank \
                     while being read)",
                    sample.offset, sample.size
                ))
            } else {
                e.into()
            }
        })
    }
}

fn parse_track(trak: BoxRef<'_>, file_len: u64, samples_left: u64) -> Result<Track> {
    let tkhd = bmff::require(trak.body, "trak", b"tkhd")?;
    let header = parse_tkhd(tkhd.body)?;
    let id = header.1;
    let path = format!("track {id}");
    let edit_list = match bmff::find(trak.body, "trak", b"edts")? {
        Some(edts) => bmff::find(edts.body, "edts", b"elst")?.map(|b| b.raw.to_vec()),
        None => None,
    };
    let mdia = bmff::require(trak.body, "trak", b"mdia")?;
    let mdhd = bmff::require(mdia.body, "mdia", b"mdhd")?;
    let mut f = Fields::new(mdhd.body, "mdhd");
    let (version, _) = f.version_flags()?;
    let (timescale, media_duration) = if version == 1 {
        f.skip(16)?;
        (f.u32()?, f.u64()?)
    } else {
        f.skip(8)?;
        (f.u32()?, u64::from(f.u32()?))
    };
    let language = f.u16()?;
    if timescale == 0 {
        return Err(VideoFileError::Malformed(format!(
            "{path}: mdhd timescale is 0"
        )));
    }
    let hdlr = bmff::require(mdia.body, "mdia", b"hdlr")?;
    let mut f = Fields::new(hdlr.body, "hdlr");
    f.version_flags()?;
    f.skip(4)?;
    let handler = f.fourcc()?;
    let kind = match &handler {
        b"vide" => TrackKind::Video,
        b"soun" => TrackKind::Audio,
        other => TrackKind::Other(*other),
    };
    let minf = bmff::require(mdia.body, "mdia", b"minf")?;
    let stbl = bmff::require(minf.body, "minf", b"stbl")?;
    let table = parse_stbl(stbl.body, &path, file_len, samples_left)?;
    Ok(Track {
        id,
        kind,
        timescale,
        media_duration,
        language,
        header: header.0,
        edit_list,
        entries: table.entries,
        samples: table.samples,
        sample_tables: table.kept,
        annex_b: false,
    })
}

fn parse_tkhd(body: &[u8]) -> Result<(TrackHeader, u32)> {
    let mut f = Fields::new(body, "tkhd");
    let (version, flags) = f.version_flags()?;
    let (id, duration) = if version == 1 {
        f.skip(16)?;
        let id = f.u32()?;
        f.skip(4)?;
        (id, f.u64()?)
    } else {
        f.skip(8)?;
        let id = f.u32()?;
        f.skip(4)?;
        (id, u64::from(f.u32()?))
    };
    f.skip(8)?; // reserved
    f.skip(2)?; // layer
    let alternate_group = f.u16()?;
    let volume = f.u16()?;
    f.skip(2)?;
    let mut matrix = [0u8; 36];
    matrix.copy_from_slice(f.bytes(36)?);
    let width = f.u32()?;
    let height = f.u32()?;
    Ok((
        TrackHeader {
            flags,
            duration,
            alternate_group,
            volume,
            matrix,
            width,
            height,
        },
        id,
    ))
}

/// How a sample size table gives the sizes.
#[derive(Debug, Clone, Copy)]
enum Sizes {
    /// `stsz` with one size for every sample.
    Constant(u32),
    /// `stsz` with a table of 32-bit sizes.
    Table,
    /// `stz2` with a table of 4-, 8- or 16-bit sizes.
    Compact(u8),
}

struct SampleTable {
    entries: Vec<SampleEntry>,
    samples: Vec<Sample>,
    kept: Vec<Vec<u8>>,
}

/// Reads `count` (u32, u32) pairs.
fn pairs(f: &mut Fields<'_>, count: usize) -> Result<Vec<(u32, u32)>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push((f.u32()?, f.u32()?));
    }
    Ok(out)
}

fn parse_stbl(stbl: &[u8], path: &str, file_len: u64, samples_left: u64) -> Result<SampleTable> {
    let bad = |what: String| VideoFileError::Malformed(format!("{path}: {what}"));
    let mut entries = Vec::new();
    let mut stts = None;
    let mut ctts = None;
    let mut stsc = None;
    let mut sizes: Option<(Sizes, u32, BoxRef<'_>)> = None;
    let mut chunk_offsets: Option<(BoxRef<'_>, bool)> = None;
    let mut stss = None;
    let mut kept = Vec::new();
    for child in children(stbl, "stbl") {
        let child = child?;
        match &child.kind {
            b"stsd" => {
                let mut f = Fields::new(child.body, "stsd");
                f.version_flags()?;
                let count = f.u32()?;
                if count == 0 || count > MAX_SAMPLE_ENTRIES {
                    return Err(bad(format!(
                        "stsd has {count} sample descriptions (1 to {MAX_SAMPLE_ENTRIES} are read)"
                    )));
                }
                for entry in children(f.rest(), "stsd").take(count as usize) {
                    let entry = entry?;
                    entries.push(SampleEntry {
                        kind: entry.kind,
                        raw: entry.raw.to_vec(),
                    });
                }
                if entries.len() != count as usize {
                    return Err(bad(format!(
                        "stsd announces {count} sample descriptions and holds {}",
                        entries.len()
                    )));
                }
            }
            b"stts" => {
                let mut f = Fields::new(child.body, "stts");
                f.version_flags()?;
                let n = f.count(8)?;
                stts = Some(pairs(&mut f, n)?);
                kept.push(child.raw.to_vec());
            }
            b"ctts" => {
                let mut f = Fields::new(child.body, "ctts");
                f.version_flags()?;
                let n = f.count(8)?;
                ctts = Some(pairs(&mut f, n)?);
                kept.push(child.raw.to_vec());
            }
            b"stsc" => {
                let mut f = Fields::new(child.body, "stsc");
                f.version_flags()?;
                let n = f.count(12)?;
                let mut runs = Vec::with_capacity(n);
                for _ in 0..n {
                    runs.push((f.u32()?, f.u32()?, f.u32()?));
                }
                stsc = Some(runs);
            }
            b"stsz" => {
                let mut f = Fields::new(child.body, "stsz");
                f.version_flags()?;
                let size = f.u32()?;
                let count = f.u32()?;
                let sizes_kind = if size == 0 {
                    Sizes::Table
                } else {
                    Sizes::Constant(size)
                };
                sizes = Some((sizes_kind, count, child));
            }
            b"stz2" => {
                let mut f = Fields::new(child.body, "stz2");
                f.version_flags()?;
                f.skip(3)?;
                let field = f.u8()?;
                let count = f.u32()?;
                if !matches!(field, 4 | 8 | 16) {
                    return Err(bad(format!("stz2 field size {field} (4, 8 or 16)")));
                }
                sizes = Some((Sizes::Compact(field), count, child));
            }
            b"stco" => chunk_offsets = Some((child, false)),
            b"co64" => chunk_offsets = Some((child, true)),
            b"stss" => {
                let mut f = Fields::new(child.body, "stss");
                f.version_flags()?;
                let n = f.count(4)?;
                let mut numbers = Vec::with_capacity(n);
                for _ in 0..n {
                    numbers.push(f.u32()?);
                }
                stss = Some(numbers);
                kept.push(child.raw.to_vec());
            }
            b"cslg" | b"sdtp" | b"sgpd" | b"sbgp" | b"stps" | b"subs" | b"padb" => {
                kept.push(child.raw.to_vec());
            }
            _ => {}
        }
    }
    if entries.is_empty() {
        return Err(bad(
            "the sample table has no sample description (stsd)".into()
        ));
    }
    let (size_kind, count, size_box) =
        sizes.ok_or_else(|| bad("the sample table has no sample sizes (stsz)".into()))?;
    let n = u64::from(count);
    if n > samples_left {
        return Err(VideoFileError::TooLarge(format!(
            "{path} has {n} samples; at most {MAX_SAMPLES} in all tracks are read"
        )));
    }
    if n > file_len {
        return Err(bad(format!(
            "{n} samples in a file of {file_len} bytes (each takes at least one)"
        )));
    }
    let n = n as usize;
    let mut samples = Vec::new();
    samples.try_reserve_exact(n).map_err(|_| {
        VideoFileError::TooLarge(format!("cannot allocate the table of {n} samples"))
    })?;
    // Sizes.
    let mut f = Fields::new(size_box.body, "stsz");
    f.skip(12)?;
    match size_kind {
        Sizes::Compact(field) => {
            let bits = (n as u64) * u64::from(field);
            let need = bits.div_ceil(8) as usize;
            let packed = f.bytes(need)?;
            for i in 0..n {
                let size = match field {
                    4 => {
                        let byte = packed[i / 2];
                        u32::from(if i % 2 == 0 { byte >> 4 } else { byte & 15 })
                    }
                    8 => u32::from(packed[i]),
                    _ => u32::from(u16::from_be_bytes([packed[2 * i], packed[2 * i + 1]])),
                };
                samples.push(blank(size));
            }
        }
        Sizes::Table => {
            if f.remaining() / 4 < n {
                return Err(bad(format!(
                    "stsz claims {n} sample sizes but holds room for {}",
                    f.remaining() / 4
                )));
            }
            for _ in 0..n {
                samples.push(blank(f.u32()?));
            }
        }
        Sizes::Constant(size) => samples.resize(n, blank(size)),
    }
    if let Some((i, s)) = samples
        .iter()
        .enumerate()
        .find(|(_, s)| s.size > MAX_SAMPLE_BYTES)
    {
        return Err(VideoFileError::TooLarge(format!(
            "{path}: sample {} is {} bytes; at most {MAX_SAMPLE_BYTES} are read",
            i + 1,
            s.size
        )));
    }
    // Times.
    let stts = stts.ok_or_else(|| bad("the sample table has no decode times (stts)".into()))?;
    let mut i = 0usize;
    let mut dts = 0u64;
    'stts: for (count, delta) in stts {
        for _ in 0..count {
            if i == n {
                break 'stts;
            }
            samples[i].dts = dts;
            samples[i].duration = delta;
            dts = dts
                .checked_add(u64::from(delta))
                .ok_or_else(|| bad("decode times overflow 64 bits".into()))?;
            i += 1;
        }
    }
    if i < n {
        return Err(bad(format!("stts gives times to {i} of {n} samples")));
    }
    if let Some(ctts) = ctts {
        let mut i = 0usize;
        'ctts: for (count, offset) in ctts {
            for _ in 0..count {
                if i == n {
                    break 'ctts;
                }
                // Version 0's unsigned offsets read as signed, as every player does.
                samples[i].cts_offset = offset as i32;
                i += 1;
            }
        }
        if i < n {
            return Err(bad(format!(
                "ctts gives composition offsets to {i} of {n} samples"
            )));
        }
    }
    match stss {
        None => samples.iter_mut().for_each(|s| s.sync = true),
        Some(numbers) => {
            for number in numbers {
                let index = (number as usize).wrapping_sub(1);
                match samples.get_mut(index) {
                    Some(s) => s.sync = true,
                    None => {
                        return Err(bad(format!("stss names sample {number} of {n}")));
                    }
                }
            }
        }
    }
    // Places: chunks (stco/co64) filled in order by the sample-to-chunk runs (stsc).
    let (offsets_box, wide) =
        chunk_offsets.ok_or_else(|| bad("the sample table has no chunk offsets (stco)".into()))?;
    let mut f = Fields::new(offsets_box.body, if wide { "co64" } else { "stco" });
    f.version_flags()?;
    let chunks = f.count(if wide { 8 } else { 4 })?;
    let mut chunk_offset = Vec::with_capacity(chunks);
    for _ in 0..chunks {
        chunk_offset.push(if wide { f.u64()? } else { u64::from(f.u32()?) });
    }
    let runs =
        stsc.ok_or_else(|| bad("the sample table has no sample-to-chunk table (stsc)".into()))?;
    let mut i = 0usize;
    for (r, &(first_chunk, per_chunk, entry)) in runs.iter().enumerate() {
        let next_first = runs
            .get(r + 1)
            .map_or(chunks as u64 + 1, |next| u64::from(next.0));
        let first_chunk = u64::from(first_chunk);
        if first_chunk == 0 || next_first < first_chunk || first_chunk > chunks as u64 {
            return Err(bad(format!(
                "stsc run {} starts at chunk {first_chunk} (of {chunks}; runs must rise from 1)",
                r + 1
            )));
        }
        if entry == 0 || entry as usize > entries.len() {
            return Err(bad(format!(
                "stsc names sample description {entry} of {}",
                entries.len()
            )));
        }
        let entry = (entry - 1) as u16;
        for chunk in first_chunk..next_first.min(chunks as u64 + 1) {
            let mut at = chunk_offset[(chunk - 1) as usize];
            for _ in 0..per_chunk {
                if i == n {
                    break;
                }
                let s = &mut samples[i];
                s.offset = at;
                s.entry = entry;
                at = at
                    .checked_add(u64::from(s.size))
                    .ok_or_else(|| bad("sample offsets overflow 64 bits".into()))?;
                i += 1;
            }
            if i == n {
                break;
            }
        }
        if i == n {
            break;
        }
    }
    if i < n {
        return Err(bad(format!(
            "the chunk tables (stsc, stco) place {i} of {n} samples"
        )));
    }
    // Every sample inside the file, before any is read.
    for (k, s) in samples.iter().enumerate() {
        let end = s.offset.saturating_add(u64::from(s.size));
        if end > file_len {
            return Err(VideoFileError::Truncated(format!(
                "{path}: sample {} of {n} (bytes {} to {end}) lies past the end of the file \
                 ({file_len} bytes)",
                k + 1,
                s.offset
            )));
        }
    }
    Ok(SampleTable {
        entries,
        samples,
        kept,
    })
}

/// The start of a track whose first sample is presented at `start` (in its timescale), as every
/// sample's composition offset carries it (fragmented MP4 and Matroska tracks, whose decode
/// times are made to run from 0): all of it, unless it is past half of a 32-bit offset's
/// range, so that the offsets themselves keep the other half; then 0, with a note.
pub(super) fn carried_start(
    start: i64,
    track: u32,
    timescale: u32,
    notes: &mut Vec<String>,
) -> i64 {
    const MAX: i64 = (i32::MAX / 2) as i64;
    if (0..=MAX).contains(&start) {
        return start;
    }
    notes.push(format!(
        "track {track} starts at {start} units ({:.3} s), too far for a composition offset: its \
         samples start at 0",
        start as f64 / f64::from(timescale.max(1))
    ));
    0
}

/// A track's timing tables (`stts`, and `ctts` and `stss` where they say something), made
/// from its samples.
pub(super) fn timing_tables(samples: &[Sample]) -> Result<Vec<Vec<u8>>> {
    let mut tables = vec![mux::stts(samples.iter().map(|s| s.duration))];
    if samples.iter().any(|s| s.cts_offset != 0) {
        tables.push(mux::ctts(samples.iter().map(|s| i64::from(s.cts_offset)))?);
    }
    tables.extend(mux::stss(samples.iter().map(|s| s.sync)));
    Ok(tables)
}

fn blank(size: u32) -> Sample {
    Sample {
        offset: 0,
        dts: 0,
        size,
        duration: 0,
        cts_offset: 0,
        entry: 0,
        sync: false,
    }
}
