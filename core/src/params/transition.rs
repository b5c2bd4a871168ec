//! A transition: how a prompt or seed change reaches the stream. Instead of switching on the
//! next frame, the prompt embedding (and the seed noise) glide from where they are to the new
//! values over `num_steps` frames (Daydream Scope's `transition`, without its target prompts:
//! the target is the new parameter set the transition comes with). What each frame computes is
//! in docs/ALGORITHM.md §8; the glide itself lives in the pipeline.

use serde::{Deserialize, Serialize};

use super::json::{self, Shape};
use super::weighted::InterpolationMethod;
use crate::{Error, Result};

/// How a prompt or seed change glides (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transition {
    /// Frames the change takes: frame k of n is conditioned on the interpolation at k/n, so
    /// the n-th frame is the new value. 0 switches on the next frame, as an update without a
    /// transition does. At most [`Transition::MAX_STEPS`].
    #[serde(default)]
    pub num_steps: u32,
    /// How the frames in between are made: `linear` (a weighted sum) or `slerp` (spherical,
    /// which keeps the norm of the embeddings and of the noise).
    #[serde(default = "linear")]
    pub temporal_interpolation_method: InterpolationMethod,
}

fn linear() -> InterpolationMethod {
    InterpolationMethod::Linear
}

impl Default for Transition {
    fn default() -> Self {
        Self {
            num_steps: 0,
            temporal_interpolation_method: InterpolationMethod::Linear,
        }
    }
}

impl Transition {
    /// The longest transition, in frames (about 33 s at 30 fps).
    pub const MAX_STEPS: u32 = 1000;

    /// A transition over `num_steps` frames.
    pub fn new(num_steps: u32, method: InterpolationMethod) -> Self {
        Self {
            num_steps,
            temporal_interpolation_method: method,
        }
    }

    /// Parses `{"num_steps": N, "temporal_interpolation_method": "linear" | "slerp"}` (both
    /// optional: 0 and linear) and validates it; errors name the field as
    /// `transition.num_steps`.
    pub fn from_json(text: &str) -> Result<Self> {
        let t: Self = json::parse(text, Shape::Object(&[])).map_err(|e| match e {
            Error::InvalidParam { field, message } => {
                Error::param(format!("transition.{field}"), message)
            }
            other => other,
        })?;
        t.validate()?;
        Ok(t)
    }

    /// The one rule: `num_steps` at most [`MAX_STEPS`](Self::MAX_STEPS).
    pub fn validate(&self) -> Result<()> {
        if self.num_steps > Self::MAX_STEPS {
            return Err(Error::param(
                "transition.num_steps",
                format!(
                    "{} frames; at most {} are allowed",
                    self.num_steps,
                    Self::MAX_STEPS
                ),
            ));
        }
        Ok(())
    }

    /// Whether the change is applied on the next frame (no glide).
    pub fn is_instant(&self) -> bool {
        self.num_steps == 0
    }

    /// The transition as JSON.
    pub fn to_json(&self) -> String {
        json::to_string(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_parse_with_defaults_and_refuse_with_the_field() {
        let t =
            Transition::from_json(r#"{"num_steps": 8, "temporal_interpolation_method": "slerp"}"#)
                .unwrap();
        assert_eq!(t, Transition::new(8, InterpolationMethod::Slerp));
        assert_eq!(Transition::from_json("{}").unwrap(), Transition::default());
        assert!(Transition::default().is_instant());
        assert_eq!(Transition::from_json(&t.to_json()).unwrap(), t);
        for (bad, field) in [
            (r#"{"num_steps": -1}"#, "transition.num_steps"),
            (r#"{"num_steps": 1001}"#, "transition.num_steps"),
            (r#"{"num_steps": "8"}"#, "transition.num_steps"),
            (
                r#"{"temporal_interpolation_method": "cubic"}"#,
                "transition.temporal_interpolation_method",
            ),
            (r#"{"target_prompts": []}"#, "transition"),
        ] {
            match Transition::from_json(bad) {
                Err(Error::InvalidParam { field: f, .. }) => {
                    assert!(f.starts_with(field), "{bad}: {f}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(Transition::from_json("[1]"), Err(Error::Json(_))));
    }
}
