//! The StreamDiffusion state machine: scheduler grid, stream batch, residual CFG, noise.

pub mod blend;
mod conditioning;
mod controlnet;
pub mod filter;
pub mod stream;
pub mod stream_diffusion;
mod support;
pub mod transition;

pub use controlnet::{ControlPreparer, PreparedControls};
