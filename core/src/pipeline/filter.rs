//! Stochastic similar-image filter (docs/ALGORITHM.md §6): skips frames that barely differ from the
//! last processed one, with a probability that grows with their similarity, but never more than
//! `max_skip_frame` frames in a row.

use candle_core::{DType, Tensor};

use crate::Result;

/// What the filter decided for one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FilterDecision {
    /// Run the diffusion on this frame.
    Process,
    /// Return the previous output instead.
    Skip,
}

/// State of the similar-image filter across frames.
#[derive(Debug, Clone)]
pub struct SimilarImageFilter {
    threshold: f64,
    max_skip_frame: u32,
    skip_count: u32,
    previous: Option<Tensor>,
}

impl SimilarImageFilter {
    /// A filter with the given similarity threshold (0–1) and maximum run of skipped frames.
    pub fn new(threshold: f64, max_skip_frame: u32) -> Self {
        Self {
            threshold,
            max_skip_frame,
            skip_count: 0,
            previous: None,
        }
    }

    /// Probability of skipping a frame whose cosine similarity to the last processed frame is `cos`.
    pub fn skip_probability(&self, cos: f64) -> f64 {
        if self.threshold >= 1.0 {
            0.0
        } else {
            (1.0 - (1.0 - cos) / (1.0 - self.threshold)).max(0.0)
        }
    }

    /// Decides for `frame` (the preprocessed input tensor) given a uniform draw `u` in [0, 1).
    /// A processed frame becomes the new reference; the very first frame is always processed.
    pub fn decide(&mut self, frame: &Tensor, u: f64) -> Result<FilterDecision> {
        let Some(previous) = &self.previous else {
            self.previous = Some(frame.clone());
            return Ok(FilterDecision::Process);
        };
        let cos = cosine_similarity(previous, frame)?;
        if self.skip_probability(cos) < u {
            self.previous = Some(frame.clone());
            return Ok(FilterDecision::Process);
        }
        if self.skip_count > self.max_skip_frame {
            self.skip_count = 0;
            self.previous = Some(frame.clone());
            return Ok(FilterDecision::Process);
        }
        self.skip_count += 1;
        Ok(FilterDecision::Skip)
    }
}

/// torch.nn.CosineSimilarity(dim=0, eps=1e-6) of two flattened tensors.
pub fn cosine_similarity(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.flatten_all()?.to_dtype(DType::F32)?;
    let b = b.flatten_all()?.to_dtype(DType::F32)?;
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f32>()? as f64;
    let na = a.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
    let nb = b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
    Ok(dot / (na * nb).max(1e-6))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn skip_probability_follows_the_formula() {
        let f = SimilarImageFilter::new(0.98, 10);
        assert_eq!(f.skip_probability(1.0), 1.0);
        assert!((f.skip_probability(0.99) - 0.5).abs() < 1e-9);
        assert_eq!(f.skip_probability(0.5), 0.0);
        assert_eq!(SimilarImageFilter::new(1.0, 10).skip_probability(1.0), 0.0);
    }

    #[test]
    fn identical_frames_skip_at_most_max_skip_plus_one_times_in_a_row() {
        let mut f = SimilarImageFilter::new(0.9, 2);
        let frame = t(&[0.1, 0.2, 0.3]);
        let decisions: Vec<_> = (0..7).map(|_| f.decide(&frame, 0.5).unwrap()).collect();
        use FilterDecision::*;
        // First frame always runs; then skips until the count passes max_skip_frame (2).
        assert_eq!(decisions, [Process, Skip, Skip, Skip, Process, Skip, Skip]);
    }

    #[test]
    fn different_frames_are_processed() {
        let mut f = SimilarImageFilter::new(0.98, 10);
        assert_eq!(
            f.decide(&t(&[1.0, 0.0]), 0.5).unwrap(),
            FilterDecision::Process
        );
        assert_eq!(
            f.decide(&t(&[0.0, 1.0]), 0.5).unwrap(),
            FilterDecision::Process
        );
        let cos = cosine_similarity(&t(&[1.0, 1.0]), &t(&[2.0, 2.0])).unwrap();
        assert!((cos - 1.0).abs() < 1e-6);
    }
}
