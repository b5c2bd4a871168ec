//! Video files for `sdstream run`: MP4 (ISO BMFF) in and out, H.264 through OpenH264, the audio
//! copied through untouched.
//!
//! * [`demux`]: reads an MP4's index (`moov`) and hands out its samples. Every size, count and
//!   offset is checked against what holds it before anything is allocated: the index at most
//!   [`limits::MAX_MOOV_BYTES`], at most one sample per byte of the file and
//!   [`limits::MAX_SAMPLES`] in all, every sample inside the file, box depth fixed by the walk
//!   (no recursion into unknown boxes). A file that breaks a rule is refused with a
//!   [`VideoFileError`] naming it; no input panics (`server/tests/video_file.rs` mutates files by
//!   the thousand).
//! * `fragments`: the samples a fragmented MP4's movie fragments (`moof`) add to its tracks,
//!   under the same bounds; a recording cut off keeps its whole fragments.
//! * `matroska`: Matroska/WebM files (OBS's recordings, `MediaRecorder`'s `video/x-matroska`)
//!   read into the same tracks and samples, their sample descriptions made from the codecs'
//!   private data (H.264's `avcC`, AAC's AudioSpecificConfig, Opus's `OpusHead`).
//! * [`avc`]: the H.264 side of the container (the `avcC` record, sequence parameter sets,
//!   length-prefixed NAL units ↔ Annex-B) and which profiles OpenH264 decodes.
//! * [`decode`]: a video track's samples, decoded by OpenH264 and put in presentation order by
//!   the container's composition times (B-frames), as RGB.
//! * [`mux`]: writes an MP4: the H.264 video track with the input's per-frame presentation times
//!   and timescale, and the input's other tracks (audio) copied sample for sample, their sample
//!   descriptions, timing tables and edit lists byte for byte; the index before the media data
//!   ("fast start").
//!
//! Why our own reader rather than the `mp4` crate or Mozilla's `mp4parse`: docs/VIDEO_FILES.md
//! ("Why our own MP4 reader") has the measurements.

pub mod avc;
mod bmff;
pub mod decode;
pub mod demux;
mod fragments;
pub mod limits;
mod matroska;
pub mod mux;
pub mod yuv;

pub use decode::VideoDecoder;
pub use demux::{Mp4Input, Sample, Track, TrackKind};
pub use mux::{Mp4Output, VideoTrackSpec};

/// Why a video file cannot be read or written. The messages name what was wrong and, where
/// there is one, what to do; the caller puts the file's path in front.
#[derive(Debug, thiserror::Error)]
pub enum VideoFileError {
    /// Reading or writing failed at the operating system.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file is not an MP4 at all (another format, or garbage).
    #[error("not an MP4 file: {0}")]
    NotMp4(String),
    /// The file ends before what its boxes say it holds.
    #[error("the file is truncated: {0}")]
    Truncated(String),
    /// A box is inconsistent with itself, its parent or the file.
    #[error("malformed MP4: {0}")]
    Malformed(String),
    /// A size or count beyond what this reader takes ([`limits`]).
    #[error("too large: {0}")]
    TooLarge(String),
    /// No video track.
    #[error("no video track (the file holds {0})")]
    NoVideoTrack(String),
    /// The video is not H.264.
    #[error(
        "the video track is {0}, not H.264: sdstream run reads H.264 video; re-encode it first: \
         ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p -c:a copy OUT.mp4"
    )]
    NotH264(String),
    /// H.264 in a profile or format OpenH264 does not decode.
    #[error(
        "{0} is not supported: sdstream run decodes 8-bit 4:2:0 progressive H.264 in the \
         Constrained Baseline, Baseline, Main and High profiles; re-encode it first: \
         ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p -c:a copy OUT.mp4"
    )]
    UnsupportedH264(String),
    /// The H.264 stream itself is damaged (or OpenH264 failed on it).
    #[error("H.264 decoding failed: {0}")]
    Decode(String),
    /// Encoding or writing the output failed.
    #[error("{0}")]
    Encode(String),
}

/// Results of this module.
pub type Result<T> = std::result::Result<T, VideoFileError>;
