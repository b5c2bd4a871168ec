//! The latent processors: `latent_preprocessing` runs on the noised input latent the stream
//! batch takes in, `latent_postprocessing` on the x̂₀ that leaves it (before the decoder).
//!
//! Daydream has one, `latent_feedback` (its `LatentFeedbackPreprocessor`):
//! `clamp((1 − k)·latent + k·previous, −10, 10)` with k = `feedback_strength` (default 0.5),
//! where `previous` is the previous frame's x̂₀ after `latent_postprocessing` (Daydream's
//! `prev_latent_result`). A processor passes its first frame through unchanged (no clamp) and
//! blends from the next one, even when a previous latent already exists: Daydream creates the
//! processor with a first-frame flag that only its own first call clears. In the pre chain this
//! blends a noised latent with a clean one, exactly as Daydream does; in the post chain it is
//! an exponential moving average of the outputs.

use candle_core::Tensor;
use serde_json::{Map, Value};

use super::ProcessorTimes;
use super::param_reader::ParamReader;
use crate::params::ProcessingConfig;
use crate::{Error, Result};

/// Daydream clamps the blend to this range, "a reasonable range for latents".
const LATENT_CLAMP: f64 = 10.0;

/// A parsed latent processor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatentProcessor {
    /// `latent_feedback` with its `feedback_strength`.
    Feedback {
        /// Weight of the previous latent, in [0, 1].
        feedback_strength: f64,
    },
}

impl LatentProcessor {
    /// Parses a processor by name; errors name `name_field` (unknown name) or
    /// `params_field.<key>` (bad parameter).
    pub fn parse(
        name: &str,
        params: &Map<String, Value>,
        name_field: &str,
        params_field: &str,
    ) -> Result<Self> {
        let r = ParamReader::new(params, params_field);
        match name {
            "latent_feedback" => Ok(LatentProcessor::Feedback {
                feedback_strength: r.number("feedback_strength", 0.5, 0.0..=1.0)?,
            }),
            other => Err(Error::param(
                name_field,
                format!("unknown latent processor {other:?} (known: \"latent_feedback\")"),
            )),
        }
    }

    /// Daydream's name of the processor.
    pub fn name(&self) -> &'static str {
        match self {
            LatentProcessor::Feedback { .. } => "latent_feedback",
        }
    }

    /// Runs the processor on `latent`; `previous` is the previous frame's output latent,
    /// `first` whether this is the processor's first frame.
    pub fn apply(&self, latent: &Tensor, previous: Option<&Tensor>, first: bool) -> Result<Tensor> {
        match *self {
            LatentProcessor::Feedback { feedback_strength } => {
                let Some(previous) = previous.filter(|_| !first) else {
                    return Ok(latent.clone());
                };
                if previous.dims() != latent.dims() {
                    return Err(Error::InvalidFrame(format!(
                        "latent_feedback: the previous latent is {:?} and this one {:?}",
                        previous.dims(),
                        latent.dims()
                    )));
                }
                let k = feedback_strength;
                let previous = previous.to_dtype(latent.dtype())?;
                let blend = ((latent * (1.0 - k))? + (previous * k)?)?;
                Ok(blend.clamp(-LATENT_CLAMP, LATENT_CLAMP)?)
            }
        }
    }
}

/// Validates every enabled processor of an active latent chain; errors name
/// `<field>.processors[i]` and `<field>.processors[i].params.<key>`.
pub fn validate_chain(chain: Option<&ProcessingConfig>, field: &str) -> Result<()> {
    parse_chain(chain, field).map(|_| ())
}

/// The enabled processors of an active chain, parsed, in order.
fn parse_chain(chain: Option<&ProcessingConfig>, field: &str) -> Result<Vec<LatentProcessor>> {
    let Some(chain) = chain.filter(|c| c.enabled) else {
        return Ok(Vec::new());
    };
    let mut parsed = Vec::new();
    for (i, p) in chain.processors.iter().enumerate() {
        if p.enabled {
            let name_field = format!("{field}.processors[{i}]");
            parsed.push(LatentProcessor::parse(
                &p.kind,
                &p.params,
                &name_field,
                &format!("{name_field}.params"),
            )?);
        }
    }
    Ok(parsed)
}

/// A latent chain as it runs: its processors, and whether each has seen its first frame.
#[derive(Debug, Clone, Default)]
pub struct LatentChain {
    processors: Vec<(LatentProcessor, bool)>,
}

impl LatentChain {
    /// The chain of `config` (`field` names it in errors), every processor at its first frame.
    pub fn new(config: Option<&ProcessingConfig>, field: &str) -> Result<Self> {
        Ok(LatentChain {
            processors: parse_chain(config, field)?
                .into_iter()
                .map(|p| (p, true))
                .collect(),
        })
    }

    /// The chain of `config` keeping what `self` has seen: a processor at the same place with
    /// the same kind (only its parameters changed) goes on blending, a new one starts at its
    /// first frame. Daydream updates a processor's parameters in place, and creates new ones.
    pub fn reconfigured(&self, config: Option<&ProcessingConfig>, field: &str) -> Result<Self> {
        let parsed = parse_chain(config, field)?;
        let processors = parsed
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let first = match self.processors.get(i) {
                    Some((old, first))
                        if std::mem::discriminant(old) == std::mem::discriminant(&p) =>
                    {
                        *first
                    }
                    _ => true,
                };
                (p, first)
            })
            .collect();
        Ok(LatentChain { processors })
    }

    /// Whether the chain runs any processor.
    pub fn is_empty(&self) -> bool {
        self.processors.is_empty()
    }

    /// Runs the chain on `latent`, adding each processor's time to `times` under its name.
    pub fn apply(
        &mut self,
        latent: &Tensor,
        previous: Option<&Tensor>,
        times: &mut ProcessorTimes,
    ) -> Result<Tensor> {
        // Compute first, then mark: a failed frame leaves the chain as it was.
        let mut x = latent.clone();
        for (processor, first) in &self.processors {
            let start = std::time::Instant::now();
            x = processor.apply(&x, previous, *first)?;
            times.add(processor.name(), start.elapsed());
        }
        for (_, first) in &mut self.processors {
            *first = false;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ProcessorConfig;
    use candle_core::Device;
    use serde_json::json;

    fn chain(strength: f64) -> ProcessingConfig {
        let mut p = ProcessorConfig::new("latent_feedback");
        p.params.insert("feedback_strength".into(), json!(strength));
        ProcessingConfig {
            enabled: true,
            processors: vec![p],
        }
    }

    #[test]
    fn first_frame_passes_then_blends_and_clamps() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = LatentChain::new(Some(&chain(0.25)), "latent_preprocessing")?;
        let x = Tensor::new(&[[[[4.0f32, -20.0]]]], &dev)?;
        let prev = Tensor::new(&[[[[0.0f32, -20.0]]]], &dev)?;
        let mut times = ProcessorTimes::default();
        let first = c.apply(&x, Some(&prev), &mut times)?;
        assert_eq!(first.flatten_all()?.to_vec1::<f32>()?, vec![4.0, -20.0]);
        let second = c.apply(&x, Some(&prev), &mut times)?;
        assert_eq!(second.flatten_all()?.to_vec1::<f32>()?, vec![3.0, -10.0]);
        // A change of strength keeps the history; a new chain starts over.
        let again = c.reconfigured(Some(&chain(0.5)), "latent_preprocessing")?;
        let mut again2 = again.clone();
        let third = again2.apply(&x, Some(&prev), &mut times)?;
        assert_eq!(third.flatten_all()?.to_vec1::<f32>()?, vec![2.0, -10.0]);
        let mut fresh = LatentChain::new(Some(&chain(0.5)), "latent_preprocessing")?;
        let fourth = fresh.apply(&x, Some(&prev), &mut times)?;
        assert_eq!(fourth.flatten_all()?.to_vec1::<f32>()?, vec![4.0, -20.0]);
        Ok(())
    }

    #[test]
    fn bad_processors_are_named() {
        let mut c = chain(1.5);
        let e = validate_chain(Some(&c), "latent_postprocessing").unwrap_err();
        assert!(
            e.to_string()
                .contains("latent_postprocessing.processors[0].params.feedback_strength"),
            "{e}"
        );
        c.processors[0].kind = "feedback".into();
        let e = validate_chain(Some(&c), "latent_postprocessing").unwrap_err();
        assert!(
            e.to_string()
                .contains("latent_postprocessing.processors[0]"),
            "{e}"
        );
        c.processors[0].enabled = false;
        assert!(validate_chain(Some(&c), "latent_postprocessing").is_ok());
    }
}
