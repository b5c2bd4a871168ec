//! The inputs of one [`StreamDiffusion::process`](super::StreamDiffusion::process) or
//! [`process_tensor`](super::StreamDiffusion::process_tensor) call: the frame, and what may come
//! with it, set by name instead of by a family of `process_with_*` methods.

use candle_core::Tensor;

use crate::frame::Frame;
use crate::pipeline::controlnet::PreparedControls;

/// One frame for [`StreamDiffusion::process`](super::StreamDiffusion::process). A `&Frame`
/// converts into one with nothing else set.
#[derive(Debug)]
pub struct FrameInput<'a> {
    pub(super) frame: &'a Frame<'a>,
    pub(super) controls: &'a [(&'a str, &'a Frame<'a>)],
    pub(super) prepared: Option<PreparedControls>,
    pub(super) arrived: Option<std::time::Instant>,
}

impl<'a> FrameInput<'a> {
    /// The input frame alone.
    pub fn new(frame: &'a Frame<'a>) -> Self {
        Self {
            frame,
            controls: &[],
            prepared: None,
            arrived: None,
        }
    }

    /// The input frame.
    pub fn frame(&self) -> &'a Frame<'a> {
        self.frame
    }

    /// Control images for `external` ControlNets: each `(model_id, frame)` is converted like
    /// the input frame (resized to the stream's size) and kept, so a net uses the most recent
    /// image given for its id (before the first one it contributes nothing). An id that names
    /// no configured ControlNet is an error, and then nothing changes.
    pub fn controls(mut self, controls: &'a [(&'a str, &'a Frame<'a>)]) -> Self {
        self.controls = controls;
        self
    }

    /// Control images made ahead by a [`ControlPreparer`](crate::pipeline::controlnet::ControlPreparer)
    /// of this stream (see [`StreamDiffusion::control_preparer`](super::StreamDiffusion::control_preparer)).
    /// They are used only when they still apply: the same preprocessors and settings, and made
    /// after the input this frame follows (a hot change or a frame the similar-image filter
    /// skipped in between makes them stale, and the images are then made here). The outputs
    /// equal those without them.
    pub fn prepared(mut self, prepared: Option<PreparedControls>) -> Self {
        self.prepared = prepared;
        self
    }
}

impl FrameInput<'_> {
    /// When the frame arrived (a host's queue in front of the stream: the `Engine` gives its
    /// submission time), so that its deadline counts from there; by default, the call.
    pub fn arrived(mut self, at: std::time::Instant) -> Self {
        self.arrived = Some(at);
        self
    }
}

impl<'a> From<&'a Frame<'a>> for FrameInput<'a> {
    fn from(frame: &'a Frame<'a>) -> Self {
        Self::new(frame)
    }
}

/// One frame for [`StreamDiffusion::process_tensor`](super::StreamDiffusion::process_tensor):
/// `x` and every control image are `[1, 3, H, W]` in [−1, 1] at the stream's size (as
/// [`Frame::to_tensor`] makes them). A `&Tensor` converts into one with no control images.
#[derive(Debug, Clone, Copy)]
pub struct TensorInput<'a> {
    pub(super) x: &'a Tensor,
    pub(super) controls: &'a [(&'a str, &'a Tensor)],
}

impl<'a> TensorInput<'a> {
    /// The input tensor alone.
    pub fn new(x: &'a Tensor) -> Self {
        Self { x, controls: &[] }
    }

    /// Control images for `external` ControlNets, as [`FrameInput::controls`] takes frames.
    pub fn controls(mut self, controls: &'a [(&'a str, &'a Tensor)]) -> Self {
        self.controls = controls;
        self
    }
}

impl<'a> From<&'a Tensor> for TensorInput<'a> {
    fn from(x: &'a Tensor) -> Self {
        Self::new(x)
    }
}
