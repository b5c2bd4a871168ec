//! RTMP both ways: ingest from OBS or ffmpeg into a stream
//! ([`RtmpIngest`]), and a stream's output pushed to an RTMP server ([`RtmpPush`]).
//!
//! The protocol is this module's own past the handshake, so that every byte a peer sends is
//! read under limits fixed before it is decoded: the chunk stream ([`chunk`]), AMF0 command
//! values ([`amf0`]) and the two sessions' message exchange ([`session`]) are sans-IO and
//! bounded in message size, buffered bytes, chunk streams, nesting depth and value count. The
//! handshake (three fixed-size packets) is rml_rtmp's. Around them: the sessions' lifecycle over
//! sockets with timeouts, the conversion between FLV video tags and the Annex-B access units the
//! rest of the transport speaks ([`flv`]), and what each path reports.
//!
//! Only H.264 video is taken or sent; audio from a publisher is dropped.

pub mod amf0;
pub mod chunk;
pub mod flv;
mod handshake;
mod ingest;
mod push;
pub mod session;

pub use ingest::{RtmpConfig, RtmpDirectory, RtmpIngest, RtmpIngestStats};
pub use push::{PushState, PushStatus, RtmpPush, RtmpUrl};
