//! RTMP both ways (feature `rtmp`): ingest from OBS or ffmpeg into a stream
//! ([`RtmpIngest`]), and a stream's output pushed to an RTMP server ([`RtmpPush`]). The
//! protocol (handshake, chunking, AMF commands) is rml_rtmp's; this module holds the sessions'
//! lifecycle, the conversion between FLV video tags and the Annex-B access units the rest of
//! the transport speaks ([`flv`]), and what each path reports.
//!
//! Only H.264 video is taken or sent; audio from a publisher is dropped.

pub mod flv;
mod ingest;
mod push;

pub use ingest::{RtmpConfig, RtmpDirectory, RtmpIngest, RtmpIngestStats};
pub use push::{PushState, PushStatus, RtmpPush, RtmpUrl};
