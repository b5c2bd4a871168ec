//! Weighted blending of prompt embeddings and seed noise (docs/ALGORITHM.md §7, Daydream
//! semantics).
//!
//! Prompts: each text is encoded once; weights are normalised to sum 1 when asked; exactly two
//! inputs with `slerp` are interpolated on the sphere with t = the second weight, anything else is
//! the weighted sum. Seeds: the same, plus a rescale of the blend to the mean Frobenius norm of
//! the inputs when several seeds are normalised, because a weighted sum of independent Gaussians
//! shrinks towards zero and the UNet expects unit-variance noise.

use candle_core::{DType, Tensor};

use crate::params::InterpolationMethod;
use crate::{Error, Result};

/// Weights divided by their sum when `normalize` is set.
///
/// A zero or non-finite sum cannot be normalised and is an error naming `field`.
pub fn normalized_weights(weights: &[f64], normalize: bool, field: &str) -> Result<Vec<f64>> {
    if !normalize {
        return Ok(weights.to_vec());
    }
    let sum: f64 = weights.iter().sum();
    if sum == 0.0 || !sum.is_finite() {
        return Err(Error::param(
            field,
            format!(
                "weights sum to {sum}; they must sum to a finite non-zero value to be normalized"
            ),
        ));
    }
    Ok(weights.iter().map(|w| w / sum).collect())
}

/// Spherical interpolation between `a` and `b` (same shape) at `t`, on the flattened tensors.
///
/// `t <= 0` gives `a`, `t >= 1` gives `b`; nearly parallel inputs (θ < 1e-6) fall back to lerp,
/// where the slerp weights lose precision.
pub fn slerp(a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
    if t <= 0.0 {
        return Ok(a.clone());
    }
    if t >= 1.0 {
        return Ok(b.clone());
    }
    let dtype = a.dtype();
    let fa = a.flatten_all()?.to_dtype(DType::F32)?;
    let fb = b.flatten_all()?.to_dtype(DType::F32)?;
    // F.normalize semantics: v / max(‖v‖, 1e-12).
    let na = fa.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt().max(1e-12) as f64;
    let nb = fb.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt().max(1e-12) as f64;
    let dot = (&fa * &fb)?.sum_all()?.to_scalar::<f32>()? as f64 / (na * nb);
    let theta = dot.clamp(-1.0, 1.0).acos();
    let (wa, wb) = if theta.abs() < 1e-6 {
        (1.0 - t, t)
    } else {
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    };
    let out = ((a.to_dtype(DType::F32)? * wa)? + (b.to_dtype(DType::F32)? * wb)?)?;
    Ok(out.to_dtype(dtype)?)
}

/// Blends same-shaped tensors with (already normalised, if wanted) weights.
pub fn blend(inputs: &[Tensor], weights: &[f64], method: InterpolationMethod) -> Result<Tensor> {
    if inputs.is_empty() || inputs.len() != weights.len() {
        return Err(Error::State(format!(
            "blend needs one weight per input, got {} inputs and {} weights",
            inputs.len(),
            weights.len()
        )));
    }
    if method == InterpolationMethod::Slerp && inputs.len() == 2 {
        return slerp(&inputs[0], &inputs[1], weights[1]);
    }
    let mut acc = (&inputs[0] * weights[0])?;
    for (x, w) in inputs.iter().zip(weights).skip(1) {
        acc = (acc + (x * *w)?)?;
    }
    Ok(acc)
}

/// Blends seed noises and, when several normalised seeds are mixed, rescales the result to the
/// mean Frobenius norm of the inputs so the blend keeps the variance the UNet was trained on.
pub fn blend_noise(
    noises: &[Tensor],
    weights: &[f64],
    method: InterpolationMethod,
    normalized: bool,
) -> Result<Tensor> {
    let mixed = blend(noises, weights, method)?;
    if noises.len() < 2 || !normalized {
        return Ok(mixed);
    }
    let norm = |t: &Tensor| -> Result<f64> {
        Ok(t.to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?
            .sqrt() as f64)
    };
    let target = noises.iter().map(norm).sum::<Result<f64>>()? / noises.len() as f64;
    let current = norm(&mixed)?;
    if current == 0.0 {
        return Ok(mixed);
    }
    Ok((mixed * (target / current))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn vec(x: &Tensor) -> Vec<f32> {
        x.to_vec1::<f32>().unwrap()
    }

    #[test]
    fn slerp_of_orthogonal_unit_vectors_stays_on_the_circle() {
        let out = vec(&slerp(&t(&[1.0, 0.0]), &t(&[0.0, 1.0]), 0.5).unwrap());
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!(
            (out[0] - h).abs() < 1e-6 && (out[1] - h).abs() < 1e-6,
            "{out:?}"
        );
        let third = vec(&slerp(&t(&[1.0, 0.0]), &t(&[0.0, 1.0]), 1.0 / 3.0).unwrap());
        let angle = std::f32::consts::FRAC_PI_6;
        assert!((third[0] - angle.cos()).abs() < 1e-6, "{third:?}");
        assert!((third[1] - angle.sin()).abs() < 1e-6, "{third:?}");
    }

    #[test]
    fn slerp_endpoints_and_parallel_inputs() {
        let a = t(&[1.0, 2.0]);
        let b = t(&[2.0, 4.0]);
        assert_eq!(vec(&slerp(&a, &b, 0.0).unwrap()), vec![1.0, 2.0]);
        assert_eq!(vec(&slerp(&a, &b, 1.0).unwrap()), vec![2.0, 4.0]);
        // Parallel: θ = 0, so lerp.
        let mid = vec(&slerp(&a, &b, 0.25).unwrap());
        assert!(
            (mid[0] - 1.25).abs() < 1e-6 && (mid[1] - 2.5).abs() < 1e-6,
            "{mid:?}"
        );
    }

    #[test]
    fn linear_blend_and_three_way_blend_ignore_slerp() {
        let xs = [t(&[1.0, 0.0]), t(&[0.0, 1.0]), t(&[1.0, 1.0])];
        let w = normalized_weights(&[1.0, 1.0, 2.0], true, "prompt").unwrap();
        assert_eq!(w, vec![0.25, 0.25, 0.5]);
        let out = vec(&blend(&xs, &w, InterpolationMethod::Slerp).unwrap());
        assert!((out[0] - 0.75).abs() < 1e-6 && (out[1] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn zero_weights_cannot_be_normalized() {
        let err = normalized_weights(&[0.0, 0.0], true, "seed").unwrap_err();
        assert!(err.to_string().contains("seed"), "{err}");
        assert_eq!(
            normalized_weights(&[0.0, 2.0], false, "seed").unwrap(),
            [0.0, 2.0]
        );
    }

    #[test]
    fn blended_noise_keeps_the_mean_norm() {
        let a = t(&[3.0, 0.0]);
        let b = t(&[0.0, 5.0]);
        let out = blend_noise(&[a, b], &[0.5, 0.5], InterpolationMethod::Linear, true).unwrap();
        let n = vec(&out).iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 4.0).abs() < 1e-5, "norm {n}");
        // Direction is the plain weighted sum's: (1.5, 2.5).
        let v = vec(&out);
        assert!((v[0] / v[1] - 0.6).abs() < 1e-6, "{v:?}");
    }
}
