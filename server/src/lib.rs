//! sdstream-server: sdstream's engines where video already flows, and Daydream's API over them.
//!
//! The floor above the `sdstream` crate: it drives [`sdstream::Engine`]s and holds no rule of
//! the pipeline's (parameters are validated, classified and merged by `sdstream::params`).
//!
//! * [`webrtc`]: the media hub of a stream (one engine, its publisher, its viewers, the
//!   encoded output RTMP and HLS also read), WHIP ingest and WHEP playback, and the duplex
//!   sessions (one connection both ways, with a control data channel).
//! * [`rtmp`]: RTMP ingest into a stream and RTMP push of its output.
//! * [`hls`]: a stream's output as HLS (MPEG-TS segments and a live playlist).
//! * [`video_file`]: MP4 files in and out (our bounded reader, H.264 through OpenH264, audio
//!   copied through) for `sdstream run`.
//! * [`api`]: Daydream's HTTP API over engines, the Scope-style session and the control page;
//!   its [`api::main`] is the `sdstream` binary (`sdstream serve`, `sdstream run`,
//!   `sdstream replay`).

#![deny(missing_docs)]

pub mod api;
pub mod hls;
pub mod rtmp;
pub mod video_file;
pub mod webrtc;
