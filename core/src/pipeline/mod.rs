//! The StreamDiffusion state machine: scheduler grid, stream batch, residual CFG, noise.

mod accepted;
pub mod blend;
mod conditioning;
mod controlnet;
pub mod cross_stream;
pub mod filter;
mod image_prompt;
pub mod stream_batch;
pub mod stream_diffusion;
pub mod style_image;
pub mod transition;

pub use controlnet::{ControlPreparer, PreparedControls};
