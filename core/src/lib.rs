//! sdstream: a real-time StreamDiffusion engine on candle.
//!
//! Frames go in, frames come out; the arithmetic is that of the reference StreamDiffusion
//! (PyPI `streamdiffusion==0.1.1` on diffusers), so that a seed here means the same picture there.
//!
//! * [`params`]: the Daydream-compatible [`StreamDiffusionParams`] contract, engine-only
//!   [`EngineSettings`], and [`classify`], which says whether a change is hot or needs a reload.
//! * [`model`]: loading diffusers checkpoints and the networks (CLIP, UNet, VAE, TAESD).
//! * [`pipeline`]: the StreamDiffusion state machine (scheduler grid, stream batch, RCFG, noise).
//! * [`preprocess`]: ControlNet preprocessors and image pre/postprocessing, the networks of the
//!   model-based ones, and [`ImageProcessor`], one processor on its own (frame in, control
//!   image out).
//! * [`engine`]: [`Engine`], the pipeline on its own threads: non-blocking submit/poll, hot
//!   updates between frames, background reloads, Daydream's status report.
//! * [`outbound`]: which addresses connections made for a client (the style picture's fetch,
//!   the RTMP push) may reach.
//!
//! The transports and Daydream's HTTP API over engines (WebRTC, RTMP, HLS, the `sdstream`
//! binary) are the crate `sdstream-server`, a floor above this one. Below: the networks and
//! their files are the crate `sdstream-models` (re-exported as [`model`], with the checkpoint
//! loading and the pool that are this crate's), the kernels `sdstream-kernels` (as
//! [`model::kernels`]; the allocator as [`alloc`]).

#![deny(missing_docs)]

pub use sdstream_kernels::alloc;
pub mod engine;
pub use sdstream_models::error;
pub mod frame;
pub mod hub;
pub mod ids;
pub mod log;
pub mod model;
pub mod outbound;
pub mod params;
pub mod pipeline;
pub mod preprocess;
pub mod sampling;
pub mod status;

pub use engine::{
    DropPolicy, Engine, EngineBuilder, EngineOptions, EngineState, EngineStatus, FrameId, Output,
    StageMillis, Submission,
};
pub use error::{Error, Result};
pub use frame::{Frame, Image, PixelFormat};
pub use params::{EngineSettings, StreamDiffusionParams, Update, UpdateKind, classify};
pub use pipeline::stream_diffusion::{
    FrameInput, SafetyFrame, StageTimings, StreamDiffusion, TensorInput,
};
pub use pipeline::style_image::StyleImage;
pub use preprocess::standalone::{ControlImage, ImageProcessor};
