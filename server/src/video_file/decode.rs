//! A video track's pictures in presentation order: samples read in decode order, converted to
//! Annex-B, decoded by OpenH264 with each sample's presentation rank as its tag, and handed out
//! by rank. OpenH264's own output order (its guess from picture order counts) does not matter:
//! a picture that comes out early waits (at most [`MAX_REORDER`] of them), one that never
//! comes out is an error naming it.

use std::collections::BTreeMap;

use super::avc::{self, AvcConfig, SpsInfo};
use super::bmff::{self, fourcc};
use super::demux::{Mp4Input, Track, TrackKind};
use super::limits::MAX_REORDER;
use super::{Result, VideoFileError};
use crate::webrtc::h264::{H264Decoder, YuvPicture};

/// What the video track of a file is, once checked to be decodable.
#[derive(Debug, Clone)]
pub struct VideoTrackInfo {
    /// Index of the track in [`Mp4Input::tracks`].
    pub index: usize,
    /// Its `avcC`.
    pub config: AvcConfig,
    /// Its first SPS's values.
    pub sps: SpsInfo,
    /// For each presentation rank, the index of its sample (decode order).
    pub presentation: Vec<usize>,
    /// Its samples carry Annex-B start codes ([`Track::annex_b`]).
    pub annex_b: bool,
}

impl VideoTrackInfo {
    /// Finds the first video track and checks that it is H.264 that OpenH264 decodes.
    pub fn find(input: &Mp4Input) -> Result<Self> {
        let videos: Vec<usize> = (0..input.tracks.len())
            .filter(|&i| input.tracks[i].kind == TrackKind::Video)
            .collect();
        let Some(&first) = videos.first() else {
            return Err(VideoFileError::NoVideoTrack(input.describe_tracks()));
        };
        // The first H.264 video track; else the first video track's codec is the error.
        let index = videos
            .iter()
            .copied()
            .find(|&i| matches!(&input.tracks[i].codec(), b"avc1" | b"avc3"))
            .ok_or_else(|| VideoFileError::NotH264(codec_name(input.tracks[first].codec())))?;
        let track = &input.tracks[index];
        if track.entries.len() > 1 {
            return Err(VideoFileError::UnsupportedH264(format!(
                "a video track with {} sample descriptions (its parameters change mid-file)",
                track.entries.len()
            )));
        }
        if track.samples.is_empty() {
            return Err(VideoFileError::Malformed(
                "the video track has no samples".into(),
            ));
        }
        let entry = &track.entries[0].raw;
        // VisualSampleEntry: 8-byte box header, 78 bytes of fields, then boxes (avcC, pasp…).
        let boxes = entry.get(8 + 78..).ok_or_else(|| {
            VideoFileError::Malformed("the avc1 sample description is cut off".into())
        })?;
        let avcc = bmff::find(boxes, "avc1", b"avcC")?.ok_or_else(|| {
            VideoFileError::Malformed("the avc1 sample description has no avcC".into())
        })?;
        let config = AvcConfig::parse(avcc.body)?;
        let first_sps = config.sps.first().ok_or_else(|| {
            VideoFileError::Malformed("the avcC record holds no sequence parameter set".into())
        })?;
        let sps = avc::parse_sps(first_sps)?;
        sps.check_decodable()?;
        let mut presentation: Vec<usize> = (0..track.samples.len()).collect();
        presentation.sort_by_key(|&i| (track.samples[i].cts(), i));
        Ok(Self {
            index,
            config,
            sps,
            presentation,
            annex_b: track.annex_b,
        })
    }

    /// The track in `input`.
    pub fn track<'a>(&self, input: &'a Mp4Input) -> &'a Track {
        &input.tracks[self.index]
    }
}

/// A codec's name for messages, from its sample entry type.
pub fn codec_name(kind: [u8; 4]) -> String {
    let name = match &kind {
        b"hvc1" | b"hev1" => "HEVC (H.265)",
        b"av01" => "AV1",
        b"vp09" => "VP9",
        b"vp08" => "VP8",
        b"mp4v" => "MPEG-4 Part 2",
        b"jpeg" | b"mjpa" | b"mjpb" => "Motion JPEG",
        b"apch" | b"apcn" | b"apcs" | b"apco" | b"ap4h" | b"ap4x" => "Apple ProRes",
        b"encv" => "encrypted video",
        b"s263" | b"h263" => "H.263",
        _ => "",
    };
    if name.is_empty() {
        fourcc(kind)
    } else {
        format!("{name} ({})", fourcc(kind))
    }
}

/// Decodes a checked video track (see [`VideoTrackInfo::find`]) picture by picture, in
/// presentation order.
pub struct VideoDecoder {
    info: VideoTrackInfo,
    decoder: H264Decoder,
    /// Presentation rank of each sample (decode order).
    rank: Vec<u32>,
    next_sample: usize,
    next_out: usize,
    waiting: BTreeMap<u64, YuvPicture>,
    sample: Vec<u8>,
    annex_b: Vec<u8>,
}

impl std::fmt::Debug for VideoDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoDecoder")
            .field("next_sample", &self.next_sample)
            .field("next_out", &self.next_out)
            .finish_non_exhaustive()
    }
}

impl VideoDecoder {
    /// A decoder for `info`'s track.
    pub fn new(info: VideoTrackInfo) -> Result<Self> {
        let mut rank = vec![0u32; info.presentation.len()];
        for (r, &i) in info.presentation.iter().enumerate() {
            rank[i] = r as u32;
        }
        Ok(Self {
            info,
            decoder: H264Decoder::new().map_err(|e| VideoFileError::Decode(e.to_string()))?,
            rank,
            next_sample: 0,
            next_out: 0,
            waiting: BTreeMap::new(),
            sample: Vec::new(),
            annex_b: Vec::new(),
        })
    }

    /// What the track is.
    pub fn info(&self) -> &VideoTrackInfo {
        &self.info
    }

    /// Pictures in the track.
    pub fn len(&self) -> usize {
        self.rank.len()
    }

    /// Whether the track has no pictures (never: [`VideoTrackInfo::find`] refuses it).
    pub fn is_empty(&self) -> bool {
        self.rank.is_empty()
    }

    fn keep(&mut self, tag: u64, picture: YuvPicture) -> Result<()> {
        if tag < self.next_out as u64
            || tag >= self.rank.len() as u64
            || self.waiting.contains_key(&tag)
        {
            return Err(VideoFileError::Decode(format!(
                "the decoder handed out picture {tag} twice or out of range"
            )));
        }
        self.waiting.insert(tag, picture);
        if self.waiting.len() > MAX_REORDER {
            return Err(VideoFileError::Decode(format!(
                "picture {} (in presentation order) was not decoded while {} later ones were",
                self.next_out + 1,
                self.waiting.len()
            )));
        }
        Ok(())
    }

    /// The next picture in presentation order with its rank (0-based), reading from `input`;
    /// `None` after the last.
    pub fn next(&mut self, input: &mut Mp4Input) -> Result<Option<(usize, YuvPicture)>> {
        loop {
            if let Some(picture) = self.waiting.remove(&(self.next_out as u64)) {
                self.next_out += 1;
                return Ok(Some((self.next_out - 1, picture)));
            }
            if self.next_sample < self.rank.len() {
                let i = self.next_sample;
                let sample = self.info.track(input).samples[i];
                input.read_sample(&sample, &mut self.sample)?;
                self.annex_b.clear();
                if i == 0 {
                    self.annex_b
                        .extend_from_slice(&self.info.config.annex_b_parameter_sets());
                }
                if self.info.annex_b {
                    self.annex_b.extend_from_slice(&self.sample);
                } else {
                    avc::sample_to_annex_b(
                        &self.sample,
                        self.info.config.length_size,
                        &mut self.annex_b,
                    )
                    .map_err(|e| at_sample(e, i, self.rank.len()))?;
                }
                let decoded = self
                    .decoder
                    .decode_tagged(&self.annex_b, u64::from(self.rank[i]))
                    .map_err(|e| {
                        at_sample(VideoFileError::Decode(e.to_string()), i, self.rank.len())
                    })?;
                self.next_sample += 1;
                if let Some((tag, picture)) = decoded {
                    self.keep(tag, picture)?;
                }
            } else {
                let flushed = self
                    .decoder
                    .flush_tagged()
                    .map_err(|e| VideoFileError::Decode(e.to_string()))?;
                match flushed {
                    Some((tag, picture)) => self.keep(tag, picture)?,
                    None if self.next_out < self.rank.len() => {
                        return Err(VideoFileError::Decode(format!(
                            "picture {} of {} (in presentation order) never came out of the \
                             decoder",
                            self.next_out + 1,
                            self.rank.len()
                        )));
                    }
                    None => return Ok(None),
                }
            }
        }
    }
}

fn at_sample(error: VideoFileError, index: usize, count: usize) -> VideoFileError {
    match error {
        VideoFileError::Decode(what) => {
            VideoFileError::Decode(format!("sample {} of {count}: {what}", index + 1))
        }
        other => other,
    }
}
