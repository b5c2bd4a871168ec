//! The StreamDiffusion state machine: scheduler grid, stream batch, residual CFG, noise.

pub mod blend;
pub mod filter;
pub mod rng;
pub mod scheduler;
pub mod stream;
pub mod stream_diffusion;
