//! HLS output: a stream's encoded output as a live playlist of short MPEG-TS
//! segments that any HLS player (ffmpeg, VLC, Safari, hls.js) plays.
//!
//! [`HlsOutput`] runs per stream and only while someone reads it: the first playlist request
//! subscribes to the stream's encoded output (one encode shared with the WebRTC viewers),
//! segments are cut at keyframes about every `segment_target` (1 s by default; the encoder is
//! asked for the keyframe), the newest are kept in memory, and after `idle_stop` without a
//! request the segmenter unsubscribes. Latency is the segment length plus the player's own
//! buffer (players start about three segments from the live edge). Partial segments (LL-HLS
//! `EXT-X-PART`) are not made. Serving the playlist and segments over HTTP is the server's
//! (`GET /hls/{stream}/index.m3u8`).

mod output;
pub mod ts;

pub use output::{HlsConfig, HlsOutput, HlsStats};
