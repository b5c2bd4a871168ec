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

use crate::conv_transpose::ConvTranspose2x;
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
#[derive(Debug, Clone)]
struct UpConvNorm {
    conv: ConvTranspose2x,
    norm: GroupNorm,
}

impl UpConvNorm {
    /// `dtype` is the dtype the generator computes in (its convolutions').
    fn new(c_in: usize, c_out: usize, dtype: DType, vb: VarBuilder) -> Result<Self> {
        let device = vb.device().clone();
        Ok(Self {
            conv: ConvTranspose2x::new(c_in, c_out, 3, 1, 1, true, dtype, vb)?,
            norm: GroupNorm::instance(c_out, INSTANCE_NORM_EPS, dtype, &device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        Ok(self.norm.forward(&y)?.relu()?)
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
