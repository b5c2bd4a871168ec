//! What the MP4 reader takes at most. Each bound is far above what a camera or an encoder
//! writes, and low enough that a hostile file cannot make the reader allocate or loop beyond it.

/// The index (`moov`) is read whole: at most 64 MiB (an hour of 60 fps video with its audio
/// indexes in about 8 MiB).
pub const MAX_MOOV_BYTES: u64 = 64 << 20;

/// Samples in all tracks together (4,194,304: about 19 hours of 30 fps video with 48 kHz AAC).
/// A file also cannot hold more samples than bytes. The sample table takes 32 bytes a sample.
pub const MAX_SAMPLES: u64 = 1 << 22;

/// One sample (an encoded picture or audio packet): at most 64 MiB.
pub const MAX_SAMPLE_BYTES: u32 = 64 << 20;

/// Tracks in a file.
pub const MAX_TRACKS: usize = 64;

/// Boxes at the top level of the file: a plain MP4 has four or five, a fragmented one two a
/// fragment (an hour of 30 fps video fragmented frame by frame has about 216,000). Each costs
/// one 16-byte read.
pub const MAX_TOP_LEVEL_BOXES: usize = 1 << 20;

/// Sample descriptions in one track.
pub const MAX_SAMPLE_ENTRIES: u32 = 16;

/// Pictures the decoder may hand out ahead of the one due next (H.264's reorder depth is at
/// most 16).
pub const MAX_REORDER: usize = 32;

/// Parameter sets in an `avcC` record (the format allows 31 SPS and 255 PPS).
pub const MAX_PARAMETER_SETS: usize = 64;
