//! The line-drawing generator of ControlNet's `lineart` annotator (`sk_model.pth`, and the
//! coarse `sk_model2.pth`, in `lllyasviel/Annotators`): a CycleGAN-style ResNet generator.
//!
//! In order, on RGB in [0, 1]:
//! 1. reflection pad 3, 7×7 convolution to `ngf` channels, InstanceNorm, ReLU;
//! 2. two 3×3 stride-2 convolutions (padding 1), doubling the channels, each with InstanceNorm
//!    and ReLU;
//! 3. residual blocks `x + IN(conv(pad(ReLU(IN(conv(pad(x)))))))`, reflection pad 1;
//! 4. two 3×3 stride-2 transposed convolutions (padding 1, output padding 1), halving the
//!    channels, each with InstanceNorm and ReLU;
//! 5. reflection pad 3, 7×7 convolution to the output channels, sigmoid.
//!
//! InstanceNorm is torch's default `InstanceNorm2d` (eps 1e-5, no affine parameters, so the
//! checkpoint holds no tensor for it). Tensor names follow the `nn.Sequential` indices of the
//! original (`model0.1`, `model1.0`, `model1.3`, `model2.{i}.conv_block.{1,5}`, `model3.0`,
//! `model3.3`, `model4.1`). The checkpoint has no config: [`Config::from_shapes`] reads the
//! base width, the residual blocks and the channel counts from the shapes.

use std::collections::HashMap;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::conv::{Conv2d, Padding};
use crate::kernels::norm::GroupNorm;
use crate::kernels::ops;
use crate::{Error, Result};

/// torch's `InstanceNorm2d` default eps.
const INSTANCE_NORM_EPS: f64 = 1e-5;
/// Most residual blocks a checkpoint may describe.
const MAX_RESIDUAL_BLOCKS: usize = 64;
/// Widest base width accepted.
const MAX_BASE_WIDTH: usize = 1024;

/// The generator's sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Image channels in.
    pub in_channels: usize,
    /// Channels out (1: a line drawing).
    pub out_channels: usize,
    /// Channels after the first convolution (64 in the annotators' files).
    pub base_width: usize,
    /// Residual blocks at the bottom (3 in the annotators' files).
    pub residual_blocks: usize,
}

impl Default for Config {
    /// `sk_model.pth`'s and `sk_model2.pth`'s generator (`Generator(3, 1, 3)`).
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 1,
            base_width: 64,
            residual_blocks: 3,
        }
    }
}

impl Config {
    /// Reads the sizes from a state dict's shapes (`model0.1.weight` `[base, in, 7, 7]`,
    /// `model4.1.weight` `[out, base, 7, 7]`, `model2.{i}` residual blocks).
    pub fn from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<Self> {
        let bad = |detail: String| Error::UnsupportedConfig {
            model: "lineart generator".into(),
            option: "weights".into(),
            detail,
        };
        let shape = |name: &str| {
            shapes
                .get(name)
                .filter(|s| s.len() == 4)
                .ok_or_else(|| bad(format!("no 4-D tensor `{name}`: not a lineart generator")))
        };
        let first = shape("model0.1.weight")?;
        let last = shape("model4.1.weight")?;
        let (base_width, in_channels, out_channels) = (first[0], first[1], last[0]);
        if base_width == 0 || base_width > MAX_BASE_WIDTH || in_channels == 0 || out_channels == 0 {
            return Err(bad(format!(
                "tensor `model0.1.weight` has shape {first:?} and `model4.1.weight` {last:?}"
            )));
        }
        let mut residual_blocks = 0;
        while shapes.contains_key(&format!("model2.{residual_blocks}.conv_block.1.weight")) {
            residual_blocks += 1;
            if residual_blocks > MAX_RESIDUAL_BLOCKS {
                return Err(bad(format!(
                    "more than {MAX_RESIDUAL_BLOCKS} residual blocks"
                )));
            }
        }
        Ok(Self {
            in_channels,
            out_channels,
            base_width,
            residual_blocks,
        })
    }
}

/// torch's `ReflectionPad2d(p)`.
fn reflection_pad(x: &Tensor, p: usize) -> Result<Tensor> {
    ops::reflection_pad(x, p, p, p, p)
        .map_err(|e| Error::InvalidFrame(format!("the lineart generator cannot pad its maps: {e}")))
}

/// A convolution followed by InstanceNorm and (optionally) ReLU.
#[derive(Debug, Clone)]
struct ConvNorm {
    conv: Conv2d,
    norm: GroupNorm,
    relu: bool,
}

impl ConvNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.norm.forward(&self.conv.forward(x)?)?;
        Ok(if self.relu { y.relu()? } else { y })
    }
}

/// torch's `ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)` followed
/// by InstanceNorm and ReLU: doubles the map's size.
///
/// The transposed convolution runs as one ordinary 2×2 convolution, so that it gets the fast
/// kernel: output pixel (2m + a, 2n + b) reads input pixels m, m + 1 and n, n + 1 only — along
/// each axis an even output takes tap 1 at m, an odd one tap 2 at m and tap 0 at m + 1 — so a
/// 2×2 convolution (padded by one below and to the right) with 4·c_out channels, one group per
/// phase (a, b) holding that phase's taps and zeros for the rest, computes every output; the
/// groups are then interleaved into the doubled map. That is 16 products per input pixel and
/// output channel where the transposed convolution has 9 (candle's own is far slower on the
/// CPU, and a zero-stuffed input would cost 36).
#[derive(Debug, Clone)]
struct UpConvNorm {
    conv: Conv2d,
    channels: usize,
    norm: GroupNorm,
}

/// Along one axis, the transposed kernel's tap that input offset `d` (0 or 1) gives to an
/// output of phase `phase` (0: even, 1: odd); `None` where it gives none.
fn tap(phase: usize, d: usize) -> Option<usize> {
    match (phase, d) {
        (0, 0) => Some(1),
        (1, 0) => Some(2),
        (1, 1) => Some(0),
        _ => None,
    }
}

impl UpConvNorm {
    /// `dtype` is the dtype the generator computes in (its convolutions').
    fn new(c_in: usize, c_out: usize, dtype: DType, vb: VarBuilder) -> Result<Self> {
        let weight = vb
            .get((c_in, c_out, 3, 3), "weight")?
            .to_dtype(DType::F32)?;
        // [c_in, c_out, 3, 3] → per phase, per tap, a [c_out, c_in] block.
        let w: Vec<f32> = weight.flatten_all()?.to_vec1()?;
        let mut phased = vec![0f32; 4 * c_out * c_in * 4];
        for (a, b) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let group = a * 2 + b;
            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let (Some(ky), Some(kx)) = (tap(a, dy), tap(b, dx)) else {
                    continue;
                };
                for co in 0..c_out {
                    for ci in 0..c_in {
                        let from = ((ci * c_out + co) * 3 + ky) * 3 + kx;
                        let to = (((group * c_out + co) * c_in + ci) * 2 + dy) * 2 + dx;
                        phased[to] = w[from];
                    }
                }
            }
        }
        let device = vb.device();
        let phased = Tensor::from_vec(phased, (4 * c_out, c_in, 2, 2), device)?.to_dtype(dtype)?;
        let bias = vb.get(c_out, "bias")?.to_dtype(dtype)?;
        let bias = Tensor::cat(&[&bias, &bias, &bias, &bias], 0)?;
        let padding = Padding {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        Ok(Self {
            conv: Conv2d::from_tensors(phased, Some(bias), 1, padding)?,
            channels: c_out,
            norm: GroupNorm::instance(c_out, INSTANCE_NORM_EPS, dtype, device)?,
        })
    }

    /// The transposed convolution alone: `[B, c_in, H, W]` → `[B, c_out, 2H, 2W]`.
    fn upsample(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let c = self.channels;
        Ok(self
            .conv
            .forward(x)?
            .reshape((b, 2, 2, c, h, w))?
            .permute((0, 3, 4, 1, 5, 2))?
            .reshape((b, c, 2 * h, 2 * w))?)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.upsample(x)?;
        Ok(self.norm.forward(&y)?.relu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_phased_convolution_equals_torchs_transposed_one() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 7, 6), &device).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 4, 3, 3), &device).unwrap();
        let b = Tensor::randn(0f32, 1.0, 4, &device).unwrap();
        let tensors = std::collections::HashMap::from([
            ("weight".to_string(), w.clone()),
            ("bias".to_string(), b.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let up = UpConvNorm::new(5, 4, DType::F32, vb).unwrap();
        let got = up.upsample(&x).unwrap();
        let want = x
            .conv_transpose2d(&w, 1, 1, 2, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(got.dims(), &[2, 4, 14, 12]);
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
    }
}

/// The line-drawing generator.
#[derive(Debug, Clone)]
pub struct LineartGenerator {
    stem: ConvNorm,
    down: [ConvNorm; 2],
    residual: Vec<[ConvNorm; 2]>,
    up: [UpConvNorm; 2],
    head: Conv2d,
}

impl LineartGenerator {
    /// Builds the generator from `vb` (tensor names as in `sk_model.pth`).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        let device = vb.device().clone();
        // Norms in the convolutions' dtype (f32 for bf16 weights on the CPU).
        let conv_norm = |c_in: usize,
                         c_out: usize,
                         k: usize,
                         stride: usize,
                         pad: usize,
                         relu,
                         vb: VarBuilder|
         -> Result<ConvNorm> {
            let conv = Conv2d::new(c_in, c_out, k, stride, Padding::uniform(pad), true, vb)?;
            let norm = GroupNorm::instance(c_out, INSTANCE_NORM_EPS, conv.dtype(), &device)?;
            Ok(ConvNorm { conv, norm, relu })
        };
        let w = config.base_width;
        let stem = conv_norm(config.in_channels, w, 7, 1, 0, true, vb.pp("model0.1"))?;
        let down = [
            conv_norm(w, 2 * w, 3, 2, 1, true, vb.pp("model1.0"))?,
            conv_norm(2 * w, 4 * w, 3, 2, 1, true, vb.pp("model1.3"))?,
        ];
        let residual = (0..config.residual_blocks)
            .map(|i| {
                let block = vb.pp("model2").pp(i).pp("conv_block");
                Ok([
                    conv_norm(4 * w, 4 * w, 3, 1, 0, true, block.pp("1"))?,
                    conv_norm(4 * w, 4 * w, 3, 1, 0, false, block.pp("5"))?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let dtype = stem.conv.dtype();
        let up = [
            UpConvNorm::new(4 * w, 2 * w, dtype, vb.pp("model3.0"))?,
            UpConvNorm::new(2 * w, w, dtype, vb.pp("model3.3"))?,
        ];
        let head = Conv2d::new(
            w,
            config.out_channels,
            7,
            1,
            Padding::default(),
            true,
            vb.pp("model4.1"),
        )?;
        Ok(Self {
            stem,
            down,
            residual,
            up,
            head,
        })
    }

    /// The line map `[B, out, H', W']` of `x` `[B, in, H, W]` in [0, 1], where H' is H rounded
    /// up to a multiple of 4 by the stride-2 layers' arithmetic (equal to H for multiples of 4,
    /// as the annotator's 64-multiple inputs are).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.head.dtype())?;
        let mut h = self.stem.forward(&reflection_pad(&x, 3)?)?;
        for layer in &self.down {
            h = layer.forward(&h)?;
        }
        for [first, second] in &self.residual {
            let inner = first.forward(&reflection_pad(&h, 1)?)?;
            h = (&h + second.forward(&reflection_pad(&inner, 1)?)?)?;
        }
        for layer in &self.up {
            h = layer.forward(&h)?;
        }
        Ok(candle_nn::ops::sigmoid(
            &self.head.forward(&reflection_pad(&h, 3)?)?,
        )?)
    }
}
