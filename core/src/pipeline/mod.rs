//! The StreamDiffusion state machine: scheduler grid, stream batch, residual CFG, noise.

pub mod blend;
mod conditioning;
mod controlnet;
pub mod filter;
mod image_prompt;
pub mod stream;
pub mod stream_diffusion;
pub mod style_image;
mod support;
pub mod transition;

pub use controlnet::{ControlPreparer, PreparedControls};
