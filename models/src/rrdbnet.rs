//! Real-ESRGAN's upscaler: the RRDB network of ESRGAN in BasicSR's layout (`RRDBNet`), as
//! `ai-forever/Real-ESRGAN`'s `RealESRGAN_x2.pth` holds it and spandrel loads it.
//!
//! On RGB in [0, 1], for an overall factor s of 1, 2 or 4:
//! 1. s = 1 and s = 2 first fold the image into channels (`pixel_unshuffle` by 4 and by 2), so
//!    the body always works at a quarter of the output size;
//! 2. `conv_first` (3×3) to `num_feat` channels;
//! 3. the body: `num_block` residual-in-residual dense blocks, each three dense blocks (five 3×3
//!    convolutions, each seeing the block input and every earlier output, LeakyReLU 0.2 after
//!    the first four, the result scaled by 0.2 and added to the input), the three scaled by 0.2
//!    and added to the block input; then `conv_body`, added to the features of step 2;
//! 4. twice: nearest ×2 upsampling, a 3×3 convolution, LeakyReLU 0.2 (`conv_up1`, `conv_up2`);
//! 5. `conv_hr` (3×3), LeakyReLU 0.2, `conv_last` (3×3) to RGB.
//!
//! The output is not clamped (the caller clamps to [0, 1], as Daydream does). The factor,
//! widths and depth come from the tensors' shapes ([`Config::from_shapes`]).

use std::collections::HashMap;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::conv::{Conv2d, Padding};
use crate::kernels::ops;
use crate::{Error, Result};

/// LeakyReLU's negative slope throughout.
const SLOPE: f64 = 0.2;
/// The residual scaling of dense blocks and of RRDB blocks.
const RESIDUAL_SCALE: f64 = 0.2;
/// Most RRDB blocks and widest features accepted.
const MAX_BLOCKS: usize = 128;
const MAX_FEATURES: usize = 1024;

/// The network's sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Overall upscaling factor: 1, 2 or 4.
    pub scale: usize,
    /// Image channels in and out.
    pub channels: usize,
    /// Feature channels (64 in Real-ESRGAN).
    pub num_feat: usize,
    /// RRDB blocks in the body (23 in Real-ESRGAN).
    pub num_block: usize,
    /// Channels each dense convolution adds (32 in Real-ESRGAN).
    pub num_grow_ch: usize,
}

impl Default for Config {
    /// `RealESRGAN_x2.pth`.
    fn default() -> Self {
        Self {
            scale: 2,
            channels: 3,
            num_feat: 64,
            num_block: 23,
            num_grow_ch: 32,
        }
    }
}

impl Config {
    /// Reads the sizes from a state dict: `conv_first.weight` `[num_feat, channels·k², 3, 3]`
    /// with k = 4 for ×1, 2 for ×2 and 1 for ×4; `conv_last.weight` `[channels, num_feat, 3, 3]`;
    /// `body.{i}.rdb1.conv1.weight` `[num_grow_ch, num_feat, 3, 3]`.
    pub fn from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<Self> {
        let bad = |detail: String| Error::UnsupportedConfig {
            model: "RRDBNet".into(),
            option: "weights".into(),
            detail,
        };
        let shape = |name: &str| {
            shapes.get(name).filter(|s| s.len() == 4).ok_or_else(|| {
                bad(format!(
                    "no 4-D tensor `{name}`: not an RRDBNet checkpoint in BasicSR's layout \
                     (conv_first, body.N.rdbK.convJ, conv_body, conv_up1/2, conv_hr, conv_last)"
                ))
            })
        };
        let first = shape("conv_first.weight")?;
        let last = shape("conv_last.weight")?;
        let grow = shape("body.0.rdb1.conv1.weight")?;
        let (num_feat, folded, channels) = (first[0], first[1], last[0]);
        if num_feat == 0 || num_feat > MAX_FEATURES || channels == 0 {
            return Err(bad(format!(
                "tensor `conv_first.weight` has shape {first:?}"
            )));
        }
        let scale = match folded / channels {
            _ if !folded.is_multiple_of(channels) => 0,
            16 => 1,
            4 => 2,
            1 => 4,
            _ => 0,
        };
        if scale == 0 {
            return Err(bad(format!(
                "`conv_first.weight` takes {folded} channels for {channels}-channel images: \
                 only ×1 (16×), ×2 (4×) and ×4 (1×) networks exist"
            )));
        }
        let mut num_block = 0;
        while shapes.contains_key(&format!("body.{num_block}.rdb1.conv1.weight")) {
            num_block += 1;
            if num_block > MAX_BLOCKS {
                return Err(bad(format!("more than {MAX_BLOCKS} RRDB blocks")));
            }
        }
        Ok(Self {
            scale,
            channels,
            num_feat,
            num_block,
            num_grow_ch: grow[0],
        })
    }

    /// `pixel_unshuffle` factor applied before `conv_first`.
    fn fold(&self) -> usize {
        4 / self.scale
    }
}

fn conv3(c_in: usize, c_out: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    Conv2d::new(c_in, c_out, 3, 1, Padding::uniform(1), true, vb)
}

fn lrelu(x: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::leaky_relu(x, SLOPE)
}

/// Five densely connected 3×3 convolutions.
#[derive(Debug, Clone)]
struct DenseBlock {
    convs: Vec<Conv2d>,
}

impl DenseBlock {
    fn new(feat: usize, grow: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let convs = (0..5)
            .map(|i| {
                let c_out = if i == 4 { feat } else { grow };
                conv3(feat + i * grow, c_out, vb.pp(format!("conv{}", i + 1)))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { convs })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut seen = vec![x.clone()];
        for conv in &self.convs[..4] {
            let input = Tensor::cat(&seen, 1)?;
            seen.push(lrelu(&conv.forward(&input)?)?);
        }
        let last = self.convs[4].forward(&Tensor::cat(&seen, 1)?)?;
        (last * RESIDUAL_SCALE)? + x
    }
}

/// Three dense blocks with a scaled residual around them.
#[derive(Debug, Clone)]
struct Rrdb {
    dense: [DenseBlock; 3],
}

impl Rrdb {
    fn new(feat: usize, grow: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            dense: [
                DenseBlock::new(feat, grow, vb.pp("rdb1"))?,
                DenseBlock::new(feat, grow, vb.pp("rdb2"))?,
                DenseBlock::new(feat, grow, vb.pp("rdb3"))?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for block in &self.dense {
            h = block.forward(&h)?;
        }
        (h * RESIDUAL_SCALE)? + x
    }
}

/// The RRDB upscaler.
#[derive(Debug, Clone)]
pub struct RrdbNet {
    config: Config,
    conv_first: Conv2d,
    body: Vec<Rrdb>,
    conv_body: Conv2d,
    conv_up1: Conv2d,
    conv_up2: Conv2d,
    conv_hr: Conv2d,
    conv_last: Conv2d,
}

impl RrdbNet {
    /// Builds the network from `vb` (tensor names as in BasicSR's state dicts).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        let (feat, grow) = (config.num_feat, config.num_grow_ch);
        let fold = config.fold();
        let body = (0..config.num_block)
            .map(|i| Rrdb::new(feat, grow, vb.pp("body").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            conv_first: conv3(config.channels * fold * fold, feat, vb.pp("conv_first"))?,
            body,
            conv_body: conv3(feat, feat, vb.pp("conv_body"))?,
            conv_up1: conv3(feat, feat, vb.pp("conv_up1"))?,
            conv_up2: conv3(feat, feat, vb.pp("conv_up2"))?,
            conv_hr: conv3(feat, feat, vb.pp("conv_hr"))?,
            conv_last: conv3(feat, config.channels, vb.pp("conv_last"))?,
        })
    }

    /// The sizes the network was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Upscales `x` `[B, C, H, W]` in [0, 1] to `[B, C, s·H, s·W]` (unclamped). Sides that are
    /// not multiples of the unshuffle factor (4 for ×1, 2 for ×2) are first reflection-padded
    /// on the bottom and right, and the result cropped back, as spandrel does.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fold = self.config.fold();
        let (_, _, h, w) = x.dims4()?;
        let pad = |side: usize| (fold - side % fold) % fold;
        let x = x.to_dtype(self.conv_first.dtype())?;
        let x = ops::reflection_pad(&x, 0, pad(h), 0, pad(w))?;
        let folded = pixel_unshuffle(&x, fold)?;
        let feat = self.conv_first.forward(&folded)?;
        let mut body = feat.clone();
        for block in &self.body {
            body = block.forward(&body)?;
        }
        let feat = (feat + self.conv_body.forward(&body)?)?;
        let feat = lrelu(&self.conv_up1.forward_upsampled(&feat, 2)?)?;
        let feat = lrelu(&self.conv_up2.forward_upsampled(&feat, 2)?)?;
        Ok(self
            .conv_last
            .forward(&lrelu(&self.conv_hr.forward(&feat)?)?)?)
    }
}

/// torch's `F.pixel_unshuffle(x, r)`: `[B, C, H, W]` → `[B, C·r², H/r, W/r]`, output channel
/// `c·r² + i·r + j` holding the pixels at row offset i and column offset j.
fn pixel_unshuffle(x: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    if r == 1 {
        return Ok(x.clone());
    }
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / r, r, w / r, r))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * r * r, h / r, w / r))
}
