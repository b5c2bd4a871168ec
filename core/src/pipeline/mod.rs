//! The StreamDiffusion state machine: scheduler grid, stream batch, residual CFG, noise.

pub mod rng;
pub mod scheduler;
pub mod blend;
pub mod filter;
pub mod stream;
