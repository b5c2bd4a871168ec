//! The one error type of sdstream. Every variant carries enough context (which file, which field,
//! which shape) for the message alone to say what was wrong.

use std::path::PathBuf;

/// Result alias used throughout sdstream.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in sdstream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter failed validation. `field` is the path (`controlnets[2].conditioning_scale`).
    #[error("invalid parameter `{field}`: {message}")]
    InvalidParam {
        /// Path of the offending field.
        field: String,
        /// What was wrong: the bad value and the rule.
        message: String,
    },

    /// A JSON body could not be parsed (syntax, wrong type, unknown field).
    #[error("invalid JSON: {0}")]
    Json(String),

    /// A model id or folder could not be resolved to files on disk.
    #[error("model `{id}` not found: {detail}")]
    ModelNotFound {
        /// The id or path that was asked for.
        id: String,
        /// Where we looked and what was missing.
        detail: String,
    },

    /// A model file exists but could not be read or does not hold what it should.
    #[error("cannot load {}: {detail}", path.display())]
    ModelLoad {
        /// The file that failed.
        path: PathBuf,
        /// Why.
        detail: String,
    },

    /// A checkpoint's `config.json` asks for an architecture option sdstream does not implement.
    #[error("unsupported {model} configuration: `{option}`: {detail}")]
    UnsupportedConfig {
        /// Which network (`UNet`, `ControlNet`, …).
        model: String,
        /// The config.json key.
        option: String,
        /// Its value and why it cannot be used.
        detail: String,
    },

    /// A frame handed to the engine does not fit its description.
    #[error("invalid frame: {0}")]
    InvalidFrame(String),

    /// A tensor operation failed inside the networks.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),

    /// An I/O error with the path it concerned.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// The engine's input queue is full and its drop policy is `lossless`: the frame was not
    /// taken; collect outputs and submit again (or wait: `Submission::wait_for_room`).
    #[error(
        "the input queue is full ({capacity} frames waiting); collect outputs and submit again"
    )]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
    },

    /// A frame given to [`Engine::process`](crate::Engine::process) produced no output.
    #[error("frame {id} produced no output: {reason}")]
    NoOutput {
        /// The frame's id.
        id: u64,
        /// Why: dropped (by what), or failed (with the pipeline's error).
        reason: String,
    },

    /// The engine was asked to do something it cannot do in its current state.
    #[error("{0}")]
    State(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidParam`].
    pub fn param(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidParam {
            field: field.into(),
            message: message.into(),
        }
    }
}
