//! The residual block and the resamplers between resolutions.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::Result;
use crate::kernels::conv::{Conv2d, Padding};
use crate::kernels::norm::GroupNorm;
use crate::kernels::ops::add_fresh;

use super::layers::{Linear, conv2d, linear};
use super::{Activation, BlockSettings};

/// diffusers' `ResnetBlock2D` (pre-norm, time-conditioned, optional 1×1 shortcut).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    scale_shift: bool,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Builds the block from `vb` (norms, convolutions, the time projection and the shortcut when
    /// the widths differ).
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        temb_ch: usize,
        output_scale_factor: f64,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let proj_out = if s.scale_shift { 2 * out_ch } else { out_ch };
        Ok(Self {
            norm1: GroupNorm::new(s.groups, in_ch, s.eps, vb.pp("norm1"))?,
            conv1: conv2d(in_ch, out_ch, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: linear(temb_ch, proj_out, vb.pp("time_emb_proj"))?,
            norm2: GroupNorm::new(s.groups, out_ch, s.eps, vb.pp("norm2"))?,
            conv2: conv2d(out_ch, out_ch, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: if in_ch != out_ch {
                Some(conv2d(in_ch, out_ch, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            act: s.act,
            scale_shift: s.scale_shift,
            output_scale_factor,
        })
    }

    /// `temb_act` is the time embedding with the resnets' nonlinearity already applied (it is
    /// the same for every resnet, so the UNet computes it once per call).
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.act.after_norm(&self.norm1, x)?;
        let h = self.conv1.forward(&h)?;
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = if self.scale_shift {
            let ch = t.dim(1)? / 2;
            let (scale, shift) = (t.narrow(1, 0, ch)?, t.narrow(1, ch, ch)?);
            let h = self.norm2.forward(&h)?;
            let h = h.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?;
            self.act.apply(&h)?
        } else {
            let (_, _, hh, ww) = h.dims4()?;
            self.act
                .after_norm(&self.norm2, &add_fresh(h, &t, hh * ww)?)?
        };
        let h = self.conv2.forward(&h)?;
        let out = match &self.conv_shortcut {
            Some(conv) => add_fresh(h, &conv.forward(x)?, 1)?,
            None => add_fresh(h, x, 1)?,
        };
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Downsample2D` with a convolution (stride 2); padding 0 pads right and bottom.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    /// A stride-2 3×3 convolution; `padding` 0 pads bottom and right by one, as diffusers does.
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let padding = if padding == 0 {
            Padding::bottom_right(1)
        } else {
            Padding::uniform(padding)
        };
        let conv = Conv2d::new(channels, channels, 3, 2, padding, true, vb.pp("conv"))?;
        Ok(Self { conv })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(x)
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest 2× (or to a given size), then 3×3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// A nearest ×2 upsampling followed by a 3×3 convolution.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    /// Upsamples `x` to `size` when given (the skip connection's size), else by two, then
    /// convolves.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        match size {
            // Plain 2×: fused into the convolution's input copy on the CPU.
            None => self.conv.forward_upsampled(x, 2),
            Some(size) if size == (2 * h, 2 * w) => self.conv.forward_upsampled(x, 2),
            Some((th, tw)) => self.conv.forward(&x.upsample_nearest2d(th, tw)?),
        }
    }
}
