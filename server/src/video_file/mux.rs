//! Writing an MP4: one H.264 video track from the encoder, and tracks of an input file copied
//! sample for sample (audio). The media data goes to a temporary file beside the output while
//! frames come; [`Mp4Output::finish`] then writes `ftyp`, the index (`moov`) and the media data
//! (`mdat`) into another temporary file and renames it over the output, so that the index comes
//! first ("fast start": a player starts before the whole file has arrived) and a run that fails
//! or is interrupted leaves no half-written output.
//!
//! A copied track keeps its sample descriptions, its sample-numbered tables (times, composition
//! offsets, sync samples, sample groups, …) and its edit list byte for byte, and its samples'
//! bytes; only where the samples lie (`stsz`, `stsc`, `stco`) is written anew. Samples are
//! interleaved by time with the video, about every video frame.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::avc::{self, AvcConfig};
use super::demux::{Sample, Track, TrackHeader};
use super::{Result, VideoFileError};

/// The video track to write.
#[derive(Debug, Clone)]
pub struct VideoTrackSpec {
    /// Units per second of the samples' times.
    pub timescale: u32,
    /// Picture width.
    pub width: u16,
    /// Picture height.
    pub height: u16,
    /// The input video track's header (its flags, display matrix, duration in the movie's
    /// timescale), or `None` to make one.
    pub header: Option<TrackHeader>,
    /// The input video track's edit list box, copied as it is.
    pub edit_list: Option<Vec<u8>>,
    /// Language (`mdhd`), packed ISO 639-2 (`und` when made up).
    pub language: u16,
}

/// One written sample of the video track.
#[derive(Debug, Clone, Copy)]
struct OutSample {
    size: u32,
    duration: u32,
    cts_offset: i64,
    sync: bool,
}

/// A chunk: consecutive samples of one track (and one sample description) in the media data.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    /// Offset in the media data (from the start of the `mdat` payload).
    offset: u64,
    samples: u32,
    entry: u16,
}

#[derive(Debug)]
struct CopiedTrack {
    track: Track,
    next: usize,
    chunks: Vec<Chunk>,
}

/// Which track the current chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Video,
    Copied(usize),
}

/// An MP4 being written. Dropping it unfinished removes its temporary files.
#[derive(Debug)]
pub struct Mp4Output {
    path: PathBuf,
    media_path: PathBuf,
    media: Option<BufWriter<File>>,
    media_len: u64,
    movie_timescale: u32,
    spec: VideoTrackSpec,
    config: Option<AvcConfig>,
    video: Vec<OutSample>,
    video_chunks: Vec<Chunk>,
    video_dts: u64,
    copied: Vec<CopiedTrack>,
    source: Option<File>,
    current: Option<Owner>,
    buf: Vec<u8>,
    finished: bool,
}

/// `name` with `suffix` appended, beside it.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

impl Mp4Output {
    /// Starts writing `path` (written only by [`finish`](Self::finish)). `copied` are tracks of
    /// `source` (an MP4 file) to copy, with `movie_timescale` the source's (their headers' and
    /// edit lists' durations are in it).
    pub fn create(
        path: &Path,
        movie_timescale: u32,
        spec: VideoTrackSpec,
        copied: Vec<Track>,
        source: Option<&Path>,
    ) -> Result<Self> {
        let media_path = sibling(path, ".media.partial");
        let media = File::create(&media_path)?;
        let source = match source {
            Some(p) if !copied.is_empty() => Some(File::open(p)?),
            _ => None,
        };
        Ok(Self {
            path: path.to_owned(),
            media_path,
            media: Some(BufWriter::with_capacity(1 << 20, media)),
            media_len: 0,
            movie_timescale: movie_timescale.max(1),
            spec,
            config: None,
            video: Vec::new(),
            video_chunks: Vec::new(),
            video_dts: 0,
            copied: copied
                .into_iter()
                .map(|track| CopiedTrack {
                    track,
                    next: 0,
                    chunks: Vec::new(),
                })
                .collect(),
            source,
            current: None,
            buf: Vec::new(),
            finished: false,
        })
    }

    fn media(&mut self) -> Result<&mut BufWriter<File>> {
        self.media
            .as_mut()
            .ok_or_else(|| VideoFileError::Encode("the output is already finished".into()))
    }

    /// Appends one encoded picture (Annex-B, as the encoder makes it), presented at `pts` (in
    /// the video timescale) for `duration`. Pictures come in presentation order, which is their
    /// decode order (the encoder makes no B-frames); the copied tracks' samples up to the
    /// picture's decode time are written before it.
    pub fn write_video(
        &mut self,
        annex_b: &[u8],
        keyframe: bool,
        pts: i64,
        duration: u32,
    ) -> Result<()> {
        let dts = self.video_dts;
        let time = dts as f64 / f64::from(self.spec.timescale.max(1));
        self.copy_until(Some(time))?;
        // Parameter sets go to avcC; the rest to the sample, each NAL unit length-prefixed.
        let mut sps = Vec::new();
        let mut pps = Vec::new();
        self.buf.clear();
        for unit in avc::annex_b_units(annex_b) {
            match unit[0] & 31 {
                7 => sps.push(unit.to_vec()),
                8 => pps.push(unit.to_vec()),
                9 => {} // access unit delimiter
                _ => {
                    let len = u32::try_from(unit.len()).map_err(|_| {
                        VideoFileError::Encode("an encoded NAL unit over 4 GiB".into())
                    })?;
                    self.buf.extend_from_slice(&len.to_be_bytes());
                    self.buf.extend_from_slice(unit);
                }
            }
        }
        if !sps.is_empty() || !pps.is_empty() {
            let config = AvcConfig::from_parameter_sets(sps, pps)?;
            match &self.config {
                None => self.config = Some(config),
                Some(known) if known.sps == config.sps && known.pps == config.pps => {}
                Some(_) => {
                    return Err(VideoFileError::Encode(
                        "the encoder changed its parameter sets mid-stream".into(),
                    ));
                }
            }
        }
        if self.config.is_none() {
            return Err(VideoFileError::Encode(
                "the first encoded picture carries no parameter sets".into(),
            ));
        }
        let size = u32::try_from(self.buf.len())
            .map_err(|_| VideoFileError::Encode("an encoded picture over 4 GiB".into()))?;
        if self.current != Some(Owner::Video) {
            self.video_chunks.push(Chunk {
                offset: self.media_len,
                samples: 0,
                entry: 0,
            });
            self.current = Some(Owner::Video);
        }
        let buf = std::mem::take(&mut self.buf);
        self.media()?.write_all(&buf)?;
        self.buf = buf;
        self.media_len += u64::from(size);
        if let Some(chunk) = self.video_chunks.last_mut() {
            chunk.samples += 1;
        }
        self.video.push(OutSample {
            size,
            duration,
            cts_offset: pts - dts as i64,
            sync: keyframe,
        });
        self.video_dts += u64::from(duration);
        Ok(())
    }

    /// Copies the copied tracks' samples whose decode time is before `until` seconds (all of
    /// them with `None`), in time order across tracks.
    fn copy_until(&mut self, until: Option<f64>) -> Result<()> {
        loop {
            // The copied track whose next sample is earliest.
            let mut best: Option<(usize, f64)> = None;
            for (k, c) in self.copied.iter().enumerate() {
                if let Some(s) = c.track.samples.get(c.next) {
                    let t = s.dts as f64 / f64::from(c.track.timescale);
                    if best.is_none_or(|(_, bt)| t < bt) {
                        best = Some((k, t));
                    }
                }
            }
            let Some((k, t)) = best else { return Ok(()) };
            if until.is_some_and(|u| t > u) {
                return Ok(());
            }
            let sample: Sample = self.copied[k].track.samples[self.copied[k].next];
            let source = self
                .source
                .as_mut()
                .ok_or_else(|| VideoFileError::Encode("no source file to copy from".into()))?;
            self.buf.clear();
            self.buf.resize(sample.size as usize, 0);
            source.seek(SeekFrom::Start(sample.offset))?;
            source.read_exact(&mut self.buf).map_err(|e| {
                VideoFileError::Truncated(format!(
                    "copying track {}: a sample at byte {}: {e}",
                    self.copied[k].track.id, sample.offset
                ))
            })?;
            let starts_chunk = self.current != Some(Owner::Copied(k))
                || self.copied[k]
                    .chunks
                    .last()
                    .is_none_or(|c| c.entry != sample.entry);
            if starts_chunk {
                let offset = self.media_len;
                self.copied[k].chunks.push(Chunk {
                    offset,
                    samples: 0,
                    entry: sample.entry,
                });
                self.current = Some(Owner::Copied(k));
            }
            let buf = std::mem::take(&mut self.buf);
            self.media()?.write_all(&buf)?;
            self.buf = buf;
            self.media_len += u64::from(sample.size);
            let copied = &mut self.copied[k];
            if let Some(chunk) = copied.chunks.last_mut() {
                chunk.samples += 1;
            }
            copied.next += 1;
        }
    }

    /// Pictures written so far.
    pub fn frames(&self) -> usize {
        self.video.len()
    }

    /// Samples of the copied tracks (all of them are written by [`finish`](Self::finish)).
    pub fn copied_samples(&self) -> usize {
        self.copied.iter().map(|c| c.track.samples.len()).sum()
    }

    /// Copies what is left of the copied tracks, writes the index and the media data into the
    /// output file, and removes the temporary file.
    pub fn finish(mut self) -> Result<()> {
        self.copy_until(None)?;
        let config = self
            .config
            .clone()
            .ok_or_else(|| VideoFileError::Encode("no picture was written".into()))?;
        let mut media = self
            .media
            .take()
            .ok_or_else(|| VideoFileError::Encode("the output is already finished".into()))?;
        media.flush()?;
        drop(media);
        let ftyp = boxed(b"ftyp", &{
            let mut b = Vec::new();
            b.extend_from_slice(b"isom");
            b.extend_from_slice(&0x200u32.to_be_bytes());
            for brand in [b"isom", b"iso2", b"avc1", b"mp41"] {
                b.extend_from_slice(brand);
            }
            b
        });
        let wide = self.media_len > u64::from(u32::MAX) - (64 << 20);
        let mdat_header = if self.media_len + 8 > u64::from(u32::MAX) {
            16
        } else {
            8
        };
        // The index's size does not depend on the offsets in it: build it once to measure.
        let probe = self.moov(&config, 0, wide)?;
        let base = (ftyp.len() + probe.len()) as u64 + mdat_header;
        let moov = self.moov(&config, base, wide)?;
        debug_assert_eq!(moov.len(), probe.len());
        let partial = sibling(&self.path, ".partial");
        {
            let mut out = BufWriter::with_capacity(1 << 20, File::create(&partial)?);
            out.write_all(&ftyp)?;
            out.write_all(&moov)?;
            if mdat_header == 16 {
                out.write_all(&1u32.to_be_bytes())?;
                out.write_all(b"mdat")?;
                out.write_all(&(self.media_len + 16).to_be_bytes())?;
            } else {
                out.write_all(&((self.media_len + 8) as u32).to_be_bytes())?;
                out.write_all(b"mdat")?;
            }
            let mut media = File::open(&self.media_path)?;
            let copied = std::io::copy(&mut media, &mut out)?;
            if copied != self.media_len {
                return Err(VideoFileError::Encode(format!(
                    "the media data's temporary file holds {copied} bytes, {} were written",
                    self.media_len
                )));
            }
            out.flush()?;
            out.get_ref().sync_all()?;
        }
        std::fs::rename(&partial, &self.path)?;
        let _ = std::fs::remove_file(&self.media_path);
        self.finished = true;
        Ok(())
    }

    fn moov(&self, config: &AvcConfig, base: u64, wide: bool) -> Result<Vec<u8>> {
        let mut tracks = Vec::new();
        let mut movie_duration = 0u64;
        // The video track.
        let media_duration: u64 = self.video.iter().map(|s| u64::from(s.duration)).sum();
        let header = match &self.spec.header {
            Some(h) => TrackHeader {
                width: u32::from(self.spec.width) << 16,
                height: u32::from(self.spec.height) << 16,
                ..h.clone()
            },
            None => TrackHeader {
                flags: 3,
                duration: rescale(media_duration, self.spec.timescale, self.movie_timescale),
                alternate_group: 0,
                volume: 0,
                matrix: IDENTITY,
                width: u32::from(self.spec.width) << 16,
                height: u32::from(self.spec.height) << 16,
            },
        };
        movie_duration = movie_duration.max(header.duration);
        let video_stbl = {
            let mut stbl = Vec::new();
            let mut stsd = full(0, 0);
            stsd.extend_from_slice(&1u32.to_be_bytes());
            stsd.extend(avc1_entry(self.spec.width, self.spec.height, config));
            stbl.extend(boxed(b"stsd", &stsd));
            stbl.extend(stts(self.video.iter().map(|s| s.duration)));
            if self.video.iter().any(|s| s.cts_offset != 0) {
                stbl.extend(ctts(self.video.iter().map(|s| s.cts_offset))?);
            }
            stbl.extend(stss(self.video.iter().map(|s| s.sync)).unwrap_or_default());
            stbl.extend(stsz(self.video.iter().map(|s| s.size)));
            stbl.extend(layout(&self.video_chunks, base, wide));
            stbl
        };
        tracks.push(trak(
            1,
            &header,
            self.spec.edit_list.as_deref(),
            b"vide",
            self.spec.timescale,
            media_duration,
            self.spec.language,
            &video_stbl,
        ));
        for (k, c) in self.copied.iter().enumerate() {
            let t = &c.track;
            movie_duration = movie_duration.max(t.header.duration);
            let mut stbl = Vec::new();
            let mut stsd = full(0, 0);
            stsd.extend_from_slice(&(t.entries.len() as u32).to_be_bytes());
            for entry in &t.entries {
                stsd.extend_from_slice(&entry.raw);
            }
            stbl.extend(boxed(b"stsd", &stsd));
            for table in &t.sample_tables {
                stbl.extend_from_slice(table);
            }
            stbl.extend(stsz(t.samples.iter().map(|s| s.size)));
            stbl.extend(layout(&c.chunks, base, wide));
            let handler = match t.kind {
                super::TrackKind::Video => *b"vide",
                super::TrackKind::Audio => *b"soun",
                super::TrackKind::Other(h) => h,
            };
            tracks.push(trak(
                k as u32 + 2,
                &t.header,
                t.edit_list.as_deref(),
                &handler,
                t.timescale,
                t.samples_duration(),
                t.language,
                &stbl,
            ));
        }
        let mut moov = mvhd(
            self.movie_timescale,
            movie_duration,
            tracks.len() as u32 + 1,
        );
        for t in tracks {
            moov.extend(t);
        }
        Ok(boxed(b"moov", &moov))
    }
}

impl Drop for Mp4Output {
    fn drop(&mut self) {
        if !self.finished {
            self.media = None;
            let _ = std::fs::remove_file(&self.media_path);
            let _ = std::fs::remove_file(sibling(&self.path, ".partial"));
        }
    }
}

/// The identity display matrix, as `tkhd` stores it.
pub(super) const IDENTITY: [u8; 36] = [
    0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
    0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, //
    0, 0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0,
];

/// `value` in `from` units as `to` units, rounded.
pub fn rescale(value: u64, from: u32, to: u32) -> u64 {
    ((u128::from(value) * u128::from(to) + u128::from(from) / 2) / u128::from(from.max(1))) as u64
}

/// A box of `kind` around `body` (a 64-bit size where it needs one).
pub(super) fn boxed(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    if body.len() + 8 > u32::MAX as usize {
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(&(body.len() as u64 + 16).to_be_bytes());
    } else {
        out.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
        out.extend_from_slice(kind);
    }
    out.extend_from_slice(body);
    out
}

fn full(version: u8, flags: u32) -> Vec<u8> {
    let mut out = flags.to_be_bytes().to_vec();
    out[0] = version;
    out
}

fn mvhd(timescale: u32, duration: u64, next_track: u32) -> Vec<u8> {
    let long = duration > u64::from(u32::MAX);
    let mut b = full(u8::from(long), 0);
    if long {
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&timescale.to_be_bytes());
        b.extend_from_slice(&duration.to_be_bytes());
    } else {
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&timescale.to_be_bytes());
        b.extend_from_slice(&(duration as u32).to_be_bytes());
    }
    b.extend_from_slice(&0x0001_0000u32.to_be_bytes()); // rate 1.0
    b.extend_from_slice(&0x0100u16.to_be_bytes()); // volume 1.0
    b.extend_from_slice(&[0; 10]);
    b.extend_from_slice(&IDENTITY);
    b.extend_from_slice(&[0; 24]);
    b.extend_from_slice(&next_track.to_be_bytes());
    boxed(b"mvhd", &b)
}

#[allow(clippy::too_many_arguments)]
fn trak(
    id: u32,
    header: &TrackHeader,
    edit_list: Option<&[u8]>,
    handler: &[u8; 4],
    timescale: u32,
    media_duration: u64,
    language: u16,
    stbl: &[u8],
) -> Vec<u8> {
    let mut trak = Vec::new();
    // tkhd
    let long = header.duration > u64::from(u32::MAX);
    let mut tkhd = full(u8::from(long), header.flags);
    if long {
        tkhd.extend_from_slice(&[0; 16]);
        tkhd.extend_from_slice(&id.to_be_bytes());
        tkhd.extend_from_slice(&[0; 4]);
        tkhd.extend_from_slice(&header.duration.to_be_bytes());
    } else {
        tkhd.extend_from_slice(&[0; 8]);
        tkhd.extend_from_slice(&id.to_be_bytes());
        tkhd.extend_from_slice(&[0; 4]);
        tkhd.extend_from_slice(&(header.duration as u32).to_be_bytes());
    }
    tkhd.extend_from_slice(&[0; 8]);
    tkhd.extend_from_slice(&[0; 2]); // layer
    tkhd.extend_from_slice(&header.alternate_group.to_be_bytes());
    tkhd.extend_from_slice(&header.volume.to_be_bytes());
    tkhd.extend_from_slice(&[0; 2]);
    tkhd.extend_from_slice(&header.matrix);
    tkhd.extend_from_slice(&header.width.to_be_bytes());
    tkhd.extend_from_slice(&header.height.to_be_bytes());
    trak.extend(boxed(b"tkhd", &tkhd));
    if let Some(elst) = edit_list {
        trak.extend(boxed(b"edts", elst));
    }
    // mdia
    let mut mdia = Vec::new();
    let long = media_duration > u64::from(u32::MAX);
    let mut mdhd = full(u8::from(long), 0);
    if long {
        mdhd.extend_from_slice(&[0; 16]);
        mdhd.extend_from_slice(&timescale.to_be_bytes());
        mdhd.extend_from_slice(&media_duration.to_be_bytes());
    } else {
        mdhd.extend_from_slice(&[0; 8]);
        mdhd.extend_from_slice(&timescale.to_be_bytes());
        mdhd.extend_from_slice(&(media_duration as u32).to_be_bytes());
    }
    mdhd.extend_from_slice(&language.to_be_bytes());
    mdhd.extend_from_slice(&[0; 2]);
    mdia.extend(boxed(b"mdhd", &mdhd));
    let mut hdlr = full(0, 0);
    hdlr.extend_from_slice(&[0; 4]);
    hdlr.extend_from_slice(handler);
    hdlr.extend_from_slice(&[0; 12]);
    let name: &[u8] = match handler {
        b"vide" => b"VideoHandler\0",
        b"soun" => b"SoundHandler\0",
        _ => b"\0",
    };
    hdlr.extend_from_slice(name);
    mdia.extend(boxed(b"hdlr", &hdlr));
    let mut minf = Vec::new();
    match handler {
        b"vide" => {
            let mut vmhd = full(0, 1);
            vmhd.extend_from_slice(&[0; 8]);
            minf.extend(boxed(b"vmhd", &vmhd));
        }
        b"soun" => {
            let mut smhd = full(0, 0);
            smhd.extend_from_slice(&[0; 4]);
            minf.extend(boxed(b"smhd", &smhd));
        }
        _ => minf.extend(boxed(b"nmhd", &full(0, 0))),
    }
    let mut dref = full(0, 0);
    dref.extend_from_slice(&1u32.to_be_bytes());
    dref.extend(boxed(b"url ", &full(0, 1)));
    minf.extend(boxed(b"dinf", &boxed(b"dref", &dref)));
    minf.extend(boxed(b"stbl", stbl));
    mdia.extend(boxed(b"minf", &minf));
    trak.extend(boxed(b"mdia", &mdia));
    boxed(b"trak", &trak)
}

/// An `avc1` sample description of `width` x `height` holding `config`.
pub(super) fn avc1_entry(width: u16, height: u16, config: &AvcConfig) -> Vec<u8> {
    let mut b = vec![0u8; 6];
    b.extend_from_slice(&1u16.to_be_bytes()); // data_reference_index
    b.extend_from_slice(&[0; 16]);
    b.extend_from_slice(&width.to_be_bytes());
    b.extend_from_slice(&height.to_be_bytes());
    b.extend_from_slice(&0x0048_0000u32.to_be_bytes());
    b.extend_from_slice(&0x0048_0000u32.to_be_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&1u16.to_be_bytes()); // frame_count
    let mut name = [0u8; 32];
    let text = b"sdstream OpenH264";
    name[0] = text.len() as u8;
    name[1..=text.len()].copy_from_slice(text);
    b.extend_from_slice(&name);
    b.extend_from_slice(&0x0018u16.to_be_bytes());
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend(boxed(b"avcC", &config.to_bytes()));
    boxed(b"avc1", &b)
}

/// Run-length `(count, value)` pairs.
fn runs<T: PartialEq + Copy>(values: impl Iterator<Item = T>) -> Vec<(u32, T)> {
    let mut out: Vec<(u32, T)> = Vec::new();
    for v in values {
        match out.last_mut() {
            Some((n, last)) if *last == v => *n += 1,
            _ => out.push((1, v)),
        }
    }
    out
}

/// `stts` for samples of these durations.
pub(super) fn stts(durations: impl Iterator<Item = u32>) -> Vec<u8> {
    let runs = runs(durations);
    let mut b = full(0, 0);
    b.extend_from_slice(&(runs.len() as u32).to_be_bytes());
    for (n, d) in runs {
        b.extend_from_slice(&n.to_be_bytes());
        b.extend_from_slice(&d.to_be_bytes());
    }
    boxed(b"stts", &b)
}

/// `ctts` for samples of these composition offsets (version 1 where one is negative).
pub(super) fn ctts(offsets: impl Iterator<Item = i64>) -> Result<Vec<u8>> {
    let runs = runs(offsets);
    let negative = runs.iter().any(|(_, o)| *o < 0);
    let mut b = full(u8::from(negative), 0);
    b.extend_from_slice(&(runs.len() as u32).to_be_bytes());
    for (n, o) in runs {
        let o = i32::try_from(o).map_err(|_| {
            VideoFileError::Encode(format!("a composition offset of {o} does not fit 32 bits"))
        })?;
        b.extend_from_slice(&n.to_be_bytes());
        b.extend_from_slice(&o.to_be_bytes());
    }
    Ok(boxed(b"ctts", &b))
}

/// `stss` naming the sync samples; `None` when every sample is one (no `stss` says that).
pub(super) fn stss(sync: impl Iterator<Item = bool>) -> Option<Vec<u8>> {
    let sync: Vec<bool> = sync.collect();
    if sync.iter().all(|&s| s) {
        return None;
    }
    let numbers: Vec<u32> = (1u32..)
        .zip(&sync)
        .filter_map(|(n, &s)| s.then_some(n))
        .collect();
    let mut b = full(0, 0);
    b.extend_from_slice(&(numbers.len() as u32).to_be_bytes());
    for n in numbers {
        b.extend_from_slice(&n.to_be_bytes());
    }
    Some(boxed(b"stss", &b))
}

fn stsz(sizes: impl Iterator<Item = u32>) -> Vec<u8> {
    let sizes: Vec<u32> = sizes.collect();
    let mut b = full(0, 0);
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&(sizes.len() as u32).to_be_bytes());
    for s in sizes {
        b.extend_from_slice(&s.to_be_bytes());
    }
    boxed(b"stsz", &b)
}

/// `stsc` and `stco`/`co64` for chunks at `base` + their offsets.
fn layout(chunks: &[Chunk], base: u64, wide: bool) -> Vec<u8> {
    let mut stsc = full(0, 0);
    let mut entries: Vec<(u32, u32, u32)> = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let entry = u32::from(c.entry) + 1;
        if entries
            .last()
            .is_none_or(|&(_, n, e)| n != c.samples || e != entry)
        {
            entries.push((i as u32 + 1, c.samples, entry));
        }
    }
    stsc.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (first, n, e) in entries {
        stsc.extend_from_slice(&first.to_be_bytes());
        stsc.extend_from_slice(&n.to_be_bytes());
        stsc.extend_from_slice(&e.to_be_bytes());
    }
    let mut out = boxed(b"stsc", &stsc);
    let mut co = full(0, 0);
    co.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
    for c in chunks {
        if wide {
            co.extend_from_slice(&(base + c.offset).to_be_bytes());
        } else {
            co.extend_from_slice(&((base + c.offset) as u32).to_be_bytes());
        }
    }
    out.extend(boxed(if wide { b"co64" } else { b"stco" }, &co));
    out
}
