//! Glides: a prompt embedding or seed noise moving frame by frame from where it is to a new
//! value ([`crate::params::Transition`]). Frame k of n gets the interpolation at t = k/n, so the
//! n-th frame has the new value exactly; linear interpolation is the weighted sum
//! (1 − t)·from + t·to, slerp the spherical one of [`blend::slerp`](super::blend::slerp).

use candle_core::{DType, Tensor};

use crate::Result;
use crate::params::InterpolationMethod;
use crate::pipeline::blend::slerp;

/// The value at `t` in [0, 1] between `from` and `to` (same shape), in their dtype.
pub fn interpolate(
    from: &Tensor,
    to: &Tensor,
    t: f64,
    method: InterpolationMethod,
) -> Result<Tensor> {
    if t <= 0.0 {
        return Ok(from.clone());
    }
    if t >= 1.0 {
        return Ok(to.clone());
    }
    match method {
        InterpolationMethod::Slerp => slerp(from, to, t),
        InterpolationMethod::Linear => {
            let dtype = from.dtype();
            let a = (from.to_dtype(DType::F32)? * (1.0 - t))?;
            let b = (to.to_dtype(DType::F32)? * t)?;
            Ok((a + b)?.to_dtype(dtype)?)
        }
    }
}

/// How far the glides of a stream are: (frames done, frames in all) of the prompt's and the
/// seed's, `None` when that one is not gliding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransitionProgress {
    /// The prompt embedding's glide.
    pub prompt: Option<(u32, u32)>,
    /// The seed noise's glide.
    pub seed: Option<(u32, u32)>,
}

/// One glide in progress over several tensors at once (a prompt's embedding and, for SDXL,
/// its pooled embedding; or a stream's noise).
#[derive(Debug, Clone)]
pub(super) struct Glide {
    from: Vec<Tensor>,
    to: Vec<Tensor>,
    steps: u32,
    done: u32,
    method: InterpolationMethod,
}

impl Glide {
    /// A glide from `from` to `to` (same shapes, pairwise) over `steps` ≥ 1 frames.
    pub(super) fn new(
        from: Vec<Tensor>,
        to: Vec<Tensor>,
        steps: u32,
        method: InterpolationMethod,
    ) -> Self {
        Self {
            from,
            to,
            steps: steps.max(1),
            done: 0,
            method,
        }
    }

    /// The values of the next frame, and whether they are the last (the new values exactly).
    pub(super) fn advance(&mut self) -> Result<(Vec<Tensor>, bool)> {
        self.done = (self.done + 1).min(self.steps);
        let last = self.done == self.steps;
        if last {
            return Ok((self.to.clone(), true));
        }
        let t = f64::from(self.done) / f64::from(self.steps);
        let values = self
            .from
            .iter()
            .zip(&self.to)
            .map(|(a, b)| interpolate(a, b, t, self.method))
            .collect::<Result<Vec<_>>>()?;
        Ok((values, false))
    }

    /// Frames done and frames in all.
    pub(super) fn progress(&self) -> (u32, u32) {
        (self.done, self.steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn vec(x: &Tensor) -> Vec<f32> {
        x.to_vec1().unwrap()
    }

    #[test]
    fn a_glide_steps_k_over_n_and_ends_on_the_target() {
        let mut g = Glide::new(
            vec![t(&[0.0, 4.0])],
            vec![t(&[8.0, 0.0])],
            4,
            InterpolationMethod::Linear,
        );
        let mut seen = Vec::new();
        loop {
            let (values, last) = g.advance().unwrap();
            seen.push(vec(&values[0]));
            if last {
                break;
            }
        }
        assert_eq!(
            seen,
            vec![
                vec![2.0, 3.0],
                vec![4.0, 2.0],
                vec![6.0, 1.0],
                vec![8.0, 0.0]
            ]
        );
        assert_eq!(g.progress(), (4, 4));
        // Slerp between orthogonal unit vectors stays on the circle.
        let mut g = Glide::new(
            vec![t(&[1.0, 0.0])],
            vec![t(&[0.0, 1.0])],
            2,
            InterpolationMethod::Slerp,
        );
        let (mid, last) = g.advance().unwrap();
        assert!(!last);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        for (a, b) in vec(&mid[0]).iter().zip([h, h]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(vec(&g.advance().unwrap().0[0]), vec![0.0, 1.0]);
    }
}
