//! The engine's public value types: queueing options, submissions and outputs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frame::{Frame, Image};
use crate::pipeline::stream_diffusion::StageTimings;
use crate::{Error, Result};

/// Identifies a submitted frame; ids increase by one per accepted frame, from 0.
pub type FrameId = u64;

/// What `submit` does when the input queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DropPolicy {
    /// Drop the oldest waiting frame to make room (live video: show the freshest frames). Full
    /// output queues drop their oldest output too.
    #[default]
    Latest,
    /// Never drop: `submit` fails with [`Error::QueueFull`] (or waits, see
    /// [`Submission::wait_for_room`]), and
    /// the worker pauses while the output queue is full (offline rendering).
    Lossless,
}

/// How an [`Engine`] queues and primes. JSON keys as the field names; unknown keys are an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineOptions {
    /// Most frames waiting for the worker (the one being processed not counted), 1 to 1024.
    /// Default 2: live video wants the freshest frame, not a backlog.
    pub queue_capacity: usize,
    /// Most outputs waiting to be collected, 1 to 1024. Default 8.
    pub output_capacity: usize,
    /// Full-queue behaviour. Default `"latest"`.
    pub drop_policy: DropPolicy,
    /// Prime every new stream batch with its first frame (n − 1 extra passes, or a pass with
    /// the latest frame while a reload builds), so no output comes from the zero buffer.
    /// Default true.
    pub warmup: bool,
    /// After this long without a submitted frame the state is `DEGRADED_INPUT` (at most a day).
    /// Default 2000.
    pub input_timeout_ms: u64,
    /// Window of the fps meters, 1 ms to an hour. Default 2000.
    pub fps_window_ms: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 2,
            output_capacity: 8,
            drop_policy: DropPolicy::Latest,
            warmup: true,
            input_timeout_ms: 2000,
            fps_window_ms: 2000,
        }
    }
}

impl EngineOptions {
    /// Parses and validates options from JSON; omitted keys take their defaults. A text that
    /// is not a JSON object of options is an [`Error::Json`] whose message names the option
    /// that does not fit (`engine options: queue_capacity: invalid value: integer `-1`,
    /// expected usize`); a value out of range is an [`Error::InvalidParam`] (see
    /// [`validate`](Self::validate)).
    pub fn from_json(text: &str) -> Result<Self> {
        let fail = |message: String| Error::Json(format!("engine options: {message}"));
        let tree: serde_json::Value =
            serde_json::from_str(text).map_err(|e| fail(e.to_string()))?;
        // serde's derived structs also take a list of the fields in order; options are an object.
        if !tree.is_object() {
            return Err(fail("expected a JSON object of options".to_string()));
        }
        let options: Self = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            match path.as_str() {
                // An unknown option: serde's message names it.
                "." => fail(e.into_inner().to_string()),
                _ => fail(format!("{path}: {}", e.into_inner())),
            }
        })?;
        options.validate()?;
        Ok(options)
    }

    /// The options as JSON (every key).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks the ranges.
    /// Checks the ranges: each option between its least and its most (see
    /// [`OPTION_RANGES`](Self::OPTION_RANGES)). The bounds keep memory and timers sane: a
    /// queue of 10⁹ frames or a timeout of `u64::MAX` ms is refused here, not attempted.
    pub fn validate(&self) -> Result<()> {
        let values = [
            self.queue_capacity as u64,
            self.output_capacity as u64,
            self.input_timeout_ms,
            self.fps_window_ms,
        ];
        for ((field, least, most), value) in Self::OPTION_RANGES.into_iter().zip(values) {
            if !(least..=most).contains(&value) {
                return Err(Error::param(
                    field,
                    format!("{field} must be between {least} and {most}; got {value}"),
                ));
            }
        }
        Ok(())
    }

    /// The longest input timeout: a day.
    pub const MAX_INPUT_TIMEOUT_MS: u64 = 86_400_000;

    /// `(option, least, most)` for each numeric option: at most 1024 frames waiting on either
    /// side, an input timeout up to a day, an fps window up to an hour.
    pub const OPTION_RANGES: [(&'static str, u64, u64); 4] = [
        ("queue_capacity", 1, 1024),
        ("output_capacity", 1, 1024),
        ("input_timeout_ms", 0, Self::MAX_INPUT_TIMEOUT_MS),
        ("fps_window_ms", 1, 3_600_000),
    ];

    pub(super) fn fps_window(&self) -> Duration {
        Duration::from_millis(self.fps_window_ms)
    }

    pub(super) fn input_timeout(&self) -> Duration {
        Duration::from_millis(self.input_timeout_ms)
    }
}

/// A processed frame.
#[derive(Debug, Clone)]
pub struct Output {
    /// Id of the input frame it came from.
    pub id: FrameId,
    /// The input's timestamp: the host's value from
    /// [`Submission::timestamp`], else the submission time in
    /// microseconds since the Unix epoch.
    pub timestamp: i64,
    /// The picture, in the input's pixel format at the stream's width × height.
    pub image: Image,
    /// Stage timings of this frame's pipeline call (warm-up passes not included).
    pub timings: StageTimings,
    /// Version of the parameters it was made with (see [`EngineStatus::params_version`]).
    pub params_version: u64,
    /// From `submit` to the output being ready (queueing, warm-up and processing).
    pub latency: Duration,
}

/// One frame for [`Engine::submit`](super::Engine::submit) or
/// [`Engine::process`](super::Engine::process): the picture and, optionally, the host's
/// timestamp, control images for `external` ControlNets, and how long to wait for room in a
/// full `lossless` queue. A plain [`Frame`] converts into one, so `engine.submit(&frame)` works.
///
/// ```
/// # use sdstream::{Frame, PixelFormat, engine::Submission};
/// # let (rgb, depth) = (vec![0u8; 64 * 64 * 3], vec![0u8; 64 * 64 * 3]);
/// let frame = Frame::packed(&rgb, 64, 64, PixelFormat::Rgb8).unwrap();
/// let depth = Frame::packed(&depth, 64, 64, PixelFormat::Rgb8).unwrap();
/// let submission = Submission::new(frame)
///     .timestamp(1_000)
///     .control("my/depth-controlnet", depth)
///     .wait_for_room(std::time::Duration::from_millis(100));
/// # let _ = submission;
/// ```
#[derive(Debug, Clone)]
pub struct Submission<'a> {
    pub(super) frame: Frame<'a>,
    pub(super) timestamp: Option<i64>,
    pub(super) controls: Vec<(&'a str, Frame<'a>)>,
    pub(super) room_timeout: Option<Duration>,
}

impl<'a> Submission<'a> {
    /// A frame with no timestamp (the submission time is used), no control images, and no
    /// waiting for room.
    pub fn new(frame: Frame<'a>) -> Self {
        Self {
            frame,
            timestamp: None,
            controls: Vec::new(),
            room_timeout: None,
        }
    }

    /// The host's timestamp (any unit), returned in the frame's [`Output`]; without one
    /// (`None`) the output carries the submission time in microseconds since the Unix epoch.
    pub fn timestamp(mut self, timestamp: impl Into<Option<i64>>) -> Self {
        self.timestamp = timestamp.into();
        self
    }

    /// A control image for the ControlNet `model_id` (whose preprocessor is `external`), copied
    /// like the frame; any size and format (it is resized to the stream's size). A net uses
    /// the most recent image given for it; before the first it contributes nothing. An id that
    /// names no ControlNet of the current parameters makes the submission fail, and nothing is
    /// queued.
    pub fn control(mut self, model_id: &'a str, image: Frame<'a>) -> Self {
        self.controls.push((model_id, image));
        self
    }

    /// [`control`](Self::control) for each `(model_id, image)`.
    pub fn controls(mut self, images: impl IntoIterator<Item = (&'a str, Frame<'a>)>) -> Self {
        self.controls.extend(images);
        self
    }

    /// Under [`DropPolicy::Lossless`], wait up to `timeout` for room in a full input queue
    /// instead of failing at once with [`Error::QueueFull`](crate::Error::QueueFull). No effect
    /// under `Latest`, which never waits.
    pub fn wait_for_room(mut self, timeout: Duration) -> Self {
        self.room_timeout = Some(timeout);
        self
    }

    /// The frame.
    pub fn frame(&self) -> &Frame<'a> {
        &self.frame
    }
}

impl<'a> From<Frame<'a>> for Submission<'a> {
    fn from(frame: Frame<'a>) -> Self {
        Self::new(frame)
    }
}

impl<'a> From<&Frame<'a>> for Submission<'a> {
    fn from(frame: &Frame<'a>) -> Self {
        Self::new(*frame)
    }
}
