//! torch's `ConvTranspose2d` with stride 2 where the output is exactly twice the input
//! (`kernel − 2·padding + output_padding = 2`): the lineart generator's 3×3 up-convolutions
//! (padding 1, output padding 1) and the anime lineart U-Net's 4×4 ones (padding 1).
//!
//! It runs as four ordinary convolutions, one per output phase, so that it takes the fast
//! convolution kernels (candle's own transposed convolution is far slower on the CPU, and a
//! zero-stuffed input would multiply zeros three times in four). Along one axis, output
//! `o = 2m + a` (phase `a` ∈ {0, 1}) receives tap `k` from input `i = m + d` where
//! `d = (a + padding − k) / 2` is a whole number; the phase's taps therefore read a few
//! consecutive inputs around `m`, which is an ordinary correlation with the taps rearranged,
//! zero-padded by the offsets' reach. The four phase maps are then interleaved. Each input
//! pixel costs `kernel²` products per channel pair, as in the transposed convolution itself.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::conv::{Conv2d, Padding};
use crate::{Error, Result};

/// The taps of one axis's phase, as `(tap, offset)` pairs, and the offsets' range.
#[derive(Debug, Clone)]
struct PhaseTaps {
    taps: Vec<(usize, isize)>,
    lowest: isize,
    highest: isize,
}

impl PhaseTaps {
    fn new(phase: usize, kernel: usize, padding: usize) -> Option<Self> {
        let taps: Vec<(usize, isize)> = (0..kernel)
            .filter_map(|k| {
                let twice = phase as isize + padding as isize - k as isize;
                (twice % 2 == 0).then_some((k, twice / 2))
            })
            .collect();
        let lowest = taps.iter().map(|&(_, d)| d).min()?;
        let highest = taps.iter().map(|&(_, d)| d).max()?;
        // The correlation reads offsets lowest..=highest from zero padding on both sides, so
        // the range must contain the output's own position.
        (lowest <= 0 && highest >= 0).then_some(Self {
            taps,
            lowest,
            highest,
        })
    }

    fn window(&self) -> usize {
        (self.highest - self.lowest + 1) as usize
    }
}

/// A stride-2 transposed convolution that doubles the map's size (see the module docs).
#[derive(Debug, Clone)]
pub struct ConvTranspose2x {
    /// Phases `(a, b)` in the order `(0, 0), (0, 1), (1, 0), (1, 1)`.
    phases: [Conv2d; 4],
    channels: usize,
}

impl ConvTranspose2x {
    /// Reads torch's `weight` `[c_in, c_out, kernel, kernel]` and `bias` `[c_out]` (when `bias`
    /// is set) from `vb`; the convolutions compute in `dtype`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        padding: usize,
        output_padding: usize,
        bias: bool,
        dtype: DType,
        vb: VarBuilder,
    ) -> Result<Self> {
        let unsupported = |detail: String| Error::UnsupportedConfig {
            model: "transposed convolution".into(),
            option: vb.prefix(),
            detail,
        };
        if kernel + output_padding != 2 + 2 * padding {
            return Err(unsupported(format!(
                "kernel {kernel}, padding {padding}, output padding {output_padding}: only \
                 stride-2 transposed convolutions that double the size are supported"
            )));
        }
        let axis = |phase| {
            PhaseTaps::new(phase, kernel, padding).ok_or_else(|| {
                unsupported(format!(
                    "kernel {kernel} with padding {padding} leaves phase {phase} without taps \
                     around its own position"
                ))
            })
        };
        let axes = [axis(0)?, axis(1)?];
        let weight = vb
            .get((c_in, c_out, kernel, kernel), "weight")?
            .to_dtype(DType::F32)?;
        let w: Vec<f32> = weight.flatten_all()?.to_vec1()?;
        let bias = if bias {
            Some(vb.get(c_out, "bias")?.to_dtype(dtype)?)
        } else {
            None
        };
        let device = vb.device();
        let phase = |a: usize, b: usize| -> Result<Conv2d> {
            let (rows, cols) = (&axes[a], &axes[b]);
            let (wh, ww) = (rows.window(), cols.window());
            let mut taps = vec![0f32; c_out * c_in * wh * ww];
            for &(ky, dy) in &rows.taps {
                for &(kx, dx) in &cols.taps {
                    let (jy, jx) = ((dy - rows.lowest) as usize, (dx - cols.lowest) as usize);
                    for co in 0..c_out {
                        for ci in 0..c_in {
                            let from = ((ci * c_out + co) * kernel + ky) * kernel + kx;
                            let to = ((co * c_in + ci) * wh + jy) * ww + jx;
                            taps[to] = w[from];
                        }
                    }
                }
            }
            let taps = Tensor::from_vec(taps, (c_out, c_in, wh, ww), device)?.to_dtype(dtype)?;
            let padding = Padding {
                top: (-rows.lowest) as usize,
                bottom: rows.highest as usize,
                left: (-cols.lowest) as usize,
                right: cols.highest as usize,
            };
            Ok(Conv2d::from_tensors(taps, bias.clone(), 1, padding)?)
        };
        Ok(Self {
            phases: [phase(0, 0)?, phase(0, 1)?, phase(1, 0)?, phase(1, 1)?],
            channels: c_out,
        })
    }

    /// The dtype the convolutions compute in.
    pub fn dtype(&self) -> DType {
        self.phases[0].dtype()
    }

    /// `[B, c_in, H, W]` → `[B, c_out, 2H, 2W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let c = self.channels;
        let phases = self
            .phases
            .iter()
            .map(|conv| conv.forward(x))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // [B, (a, b), C, H, W] → [B, C, H, a, W, b]: row 2m + a, column 2n + b.
        Ok(Tensor::stack(&phases, 1)?
            .reshape((b, 2, 2, c, h, w))?
            .permute((0, 3, 4, 1, 5, 2))?
            .reshape((b, c, 2 * h, 2 * w))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Both shapes the annotators use, against candle's transposed convolution.
    #[test]
    fn the_phase_convolutions_equal_the_transposed_one() {
        let device = Device::Cpu;
        for (kernel, padding, output_padding) in [(3, 1, 1), (4, 1, 0), (2, 0, 0)] {
            let x = Tensor::randn(0f32, 1.0, (2, 5, 7, 6), &device).unwrap();
            let w = Tensor::randn(0f32, 1.0, (5, 4, kernel, kernel), &device).unwrap();
            let b = Tensor::randn(0f32, 1.0, 4, &device).unwrap();
            let tensors = std::collections::HashMap::from([
                ("weight".to_string(), w.clone()),
                ("bias".to_string(), b.clone()),
            ]);
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
            let up =
                ConvTranspose2x::new(5, 4, kernel, padding, output_padding, true, DType::F32, vb)
                    .unwrap();
            let got = up.forward(&x).unwrap();
            let want = x
                .conv_transpose2d(&w, padding, output_padding, 2, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(got.dims(), &[2, 4, 14, 12], "kernel {kernel}");
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-4, "kernel {kernel}: {diff}");
        }
    }

    #[test]
    fn shapes_that_do_not_double_are_refused() {
        let device = Device::Cpu;
        let tensors = std::collections::HashMap::from([(
            "weight".to_string(),
            Tensor::zeros((2, 2, 3, 3), DType::F32, &device).unwrap(),
        )]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let err = ConvTranspose2x::new(2, 2, 3, 1, 0, false, DType::F32, vb).unwrap_err();
        assert!(err.to_string().contains("double"), "{err}");
    }
}
