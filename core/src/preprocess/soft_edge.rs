//! `soft_edge`: Daydream's real-time HED substitute (its `MultiScaleSobelOperator`), in this
//! order:
//! 1. grey = 0.299·R + 0.587·G + 0.114·B, in float (no 8-bit rounding);
//! 2. at three scales, the gradient magnitude √(gx² + gy²) with Daydream's 3×3 Sobel, its 5×5
//!    kernel (/16) and its 7×7 kernel (/32), the y kernels being the transposes of the x ones;
//! 3. 0.5·m₃ + 0.3·m₅ + 0.2·m₇;
//! 4. the 5×5 binomial blur ([1 4 6 4 1]ᵀ[1 4 6 4 1] / 256);
//! 5. divided by (its maximum over the image + 1e−8);
//! 6. sigmoid(6x − 3), clamped to [0, 1], copied to three channels.
//!
//! Every convolution is torch's `conv2d` with `padding = k // 2`: zeros outside the image (no
//! replication), cross-correlation. Computed in f32 (Daydream runs it in the pipeline's dtype,
//! float16 on GPUs). No params (Daydream declares none).

use candle_core::{DType, Tensor};

use super::planes::{Planes, correlate, correlate_separable, correlate_tensor};

/// Daydream's 5×5 Sobel-like x kernel (before the /16).
const SOBEL5_X: [f32; 25] = [
    -1., -2., 0., 2., 1., //
    -2., -3., 0., 3., 2., //
    -3., -5., 0., 5., 3., //
    -2., -3., 0., 3., 2., //
    -1., -2., 0., 2., 1.,
];

/// Daydream's 7×7 Sobel-like x kernel (before the /32).
const SOBEL7_X: [f32; 49] = [
    -1., -2., -3., 0., 3., 2., 1., //
    -2., -3., -4., 0., 4., 3., 2., //
    -3., -4., -5., 0., 5., 4., 3., //
    -4., -5., -6., 0., 6., 5., 4., //
    -3., -4., -5., 0., 5., 4., 3., //
    -2., -3., -4., 0., 4., 3., 2., //
    -1., -2., -3., 0., 3., 2., 1.,
];

/// The 3×3 Sobel x kernel.
const SOBEL3_X: [f32; 9] = [-1., 0., 1., -2., 0., 2., -1., 0., 1.];

/// (x kernel, size, divisor, weight) of each scale.
const SCALES: [(&[f32], usize, f32, f32); 3] = [
    (&SOBEL3_X, 3, 1.0, 0.5),
    (&SOBEL5_X, 5, 16.0, 0.3),
    (&SOBEL7_X, 7, 32.0, 0.2),
];

/// Soft edges of a `[3, H, W]` image in [0, 1] (a one-channel image is its own grey).
pub fn apply(image: &Planes) -> Planes {
    let (h, w) = (image.height, image.width);
    let n = h * w;
    let gray: Vec<f32> = if image.channels >= 3 {
        let (r, g, b) = (image.plane(0), image.plane(1), image.plane(2));
        (0..n)
            .map(|i| 0.299 * r[i] + 0.587 * g[i] + 0.114 * b[i])
            .collect()
    } else {
        image.plane(0).to_vec()
    };
    let mut combined = vec![0.0f32; n];
    let (mut gx, mut gy) = (vec![0.0f32; n], vec![0.0f32; n]);
    for (kernel_x, size, divisor, weight) in SCALES {
        let kx: Vec<f32> = kernel_x.iter().map(|v| v / divisor).collect();
        let ky = transpose(&kx, size);
        correlate(&gray, h, w, &kx, size, size, &mut gx);
        correlate(&gray, h, w, &ky, size, size, &mut gy);
        for ((c, &a), &b) in combined.iter_mut().zip(&gx).zip(&gy) {
            *c += weight * (a * a + b * b).sqrt();
        }
    }
    let binomial = [1.0 / 16.0, 4.0 / 16.0, 6.0 / 16.0, 4.0 / 16.0, 1.0 / 16.0];
    let mut soft = gx; // reuse the buffer
    correlate_separable(&combined, h, w, &binomial, &binomial, &mut gy, &mut soft);
    let max = soft.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let denominator = max + 1e-8;
    let mut out = Planes::zeros(image.channels.max(1), h, w);
    let (first, rest) = out.data.split_at_mut(n);
    for (o, &s) in first.iter_mut().zip(&soft) {
        let x = s / denominator;
        *o = (1.0 / (1.0 + (3.0 - 6.0 * x).exp())).clamp(0.0, 1.0);
    }
    for plane in rest.chunks_exact_mut(n) {
        plane.copy_from_slice(first);
    }
    out
}

/// [`apply`] as tensor operations on the image's own device (`[1, C, H, W]` or `[C, H, W]` in
/// [0, 1]): what a GPU runs (unless `SDSTREAM_CUDA_PREPROCESS=0`), instead of a download,
/// [`apply`] on the host and an upload. The same steps in f32, through [`correlate_tensor`] (the
/// blur as one 5×5 kernel), so the sums run in another order: within 1e-5 of [`apply`] (tested
/// on the CPU, where both run), as Daydream's own float16 run is not bit-exact either. Returns
/// `[1, C, H, W]` f32 (C at least 1).
pub fn apply_tensor(image: &Tensor) -> candle_core::Result<Tensor> {
    let image = match image.rank() {
        3 => image.unsqueeze(0)?,
        _ => image.clone(),
    };
    let (_, channels, h, w) = image.dims4()?;
    let x = image.to_dtype(DType::F32)?;
    let gray = if channels >= 3 {
        let plane = |c: usize, weight: f64| x.narrow(1, c, 1)?.affine(weight, 0.0);
        ((plane(0, 0.299)? + plane(1, 0.587)?)? + plane(2, 0.114)?)?
    } else {
        x.narrow(1, 0, 1)?
    }
    .contiguous()?;
    let mut combined: Option<Tensor> = None;
    for (kernel_x, size, divisor, weight) in SCALES {
        let kx: Vec<f32> = kernel_x.iter().map(|v| v / divisor).collect();
        let ky = transpose(&kx, size);
        let gx = correlate_tensor(&gray, &kx, size, size)?;
        let gy = correlate_tensor(&gray, &ky, size, size)?;
        let magnitude = (gx.sqr()? + gy.sqr()?)?
            .sqrt()?
            .affine(f64::from(weight), 0.0)?;
        combined = Some(match combined {
            None => magnitude,
            Some(sum) => (sum + magnitude)?,
        });
    }
    let combined = combined.expect("three scales");
    let binomial = [1.0f32, 4.0, 6.0, 4.0, 1.0];
    let blur: Vec<f32> = (0..25)
        .map(|i| binomial[i / 5] * binomial[i % 5] / 256.0)
        .collect();
    let soft = correlate_tensor(&combined, &blur, 5, 5)?;
    let max = soft.max_all()?.to_dtype(DType::F32)?;
    let scaled = soft.broadcast_div(&(max + 1e-8)?)?;
    // sigmoid(6x − 3) = 1 / (1 + exp(3 − 6x)), clamped to [0, 1].
    let out = (scaled.affine(-6.0, 3.0)?.exp()? + 1.0)?
        .recip()?
        .clamp(0f32, 1f32)?;
    let out = out.reshape((1, 1, h, w))?;
    out.repeat((1, channels.max(1), 1, 1))
}

/// The transpose of a square `size × size` kernel.
fn transpose(k: &[f32], size: usize) -> Vec<f32> {
    (0..size * size)
        .map(|i| k[(i % size) * size + i / size])
        .collect()
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The tensor version (what a GPU runs) against the host's on the CPU, where both run: a
    /// random image, a flat one (the maximum near 0: the 1e-8 matters) and a one-channel one.
    #[test]
    fn tensor_operations_match_the_host_steps() -> candle_core::Result<()> {
        let random = Tensor::rand(0f32, 1.0, (1, 3, 37, 53), &Device::Cpu)?;
        let flat = Tensor::full(0.25f32, (1, 3, 16, 16), &Device::Cpu)?;
        let gray = Tensor::rand(0f32, 1.0, (1, 1, 20, 30), &Device::Cpu)?;
        for (name, image) in [("random", random), ("flat", flat), ("one channel", gray)] {
            let host = apply(&Planes::from_tensor(&image).map_err(candle_core::Error::wrap)?);
            let host = Tensor::from_vec(
                host.data,
                (1, host.channels, host.height, host.width),
                &Device::Cpu,
            )?;
            let tensor = apply_tensor(&image)?;
            assert_eq!(tensor.dims(), host.dims(), "{name}");
            let max = (tensor - &host)?.abs()?.max_all()?.to_scalar::<f32>()?;
            println!("soft edge as tensor operations, {name}: max {max:.2e} from the host's");
            assert!(max <= 1e-5, "{name}: max {max}");
        }
        Ok(())
    }
}
