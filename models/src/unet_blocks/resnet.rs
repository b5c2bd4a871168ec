//! The residual block and the resamplers between resolutions.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::Result;
use crate::kernels::conv::{Conv2d, Epilogue, Padding};
use crate::kernels::norm::GroupNorm;

use super::layers::{Linear, linear};
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
    /// Maps are `[B, H, W, C]` ([`BlockSettings::channels_last`]).
    channels_last: bool,
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
        let conv = |c_in, c_out, k, pad, name: &str| s.conv2d(c_in, c_out, k, 1, pad, vb.pp(name));
        Ok(Self {
            norm1: s.norm(GroupNorm::new(s.groups, in_ch, s.eps, vb.pp("norm1"))?),
            conv1: conv(in_ch, out_ch, 3, 1, "conv1")?,
            time_emb_proj: linear(temb_ch, proj_out, vb.pp("time_emb_proj"))?,
            norm2: s.norm(GroupNorm::new(s.groups, out_ch, s.eps, vb.pp("norm2"))?),
            conv2: conv(out_ch, out_ch, 3, 1, "conv2")?,
            conv_shortcut: if in_ch != out_ch {
                Some(conv(in_ch, out_ch, 1, 0, "conv_shortcut")?)
            } else {
                None
            },
            act: s.act,
            scale_shift: s.scale_shift,
            output_scale_factor,
            channels_last: s.channels_last,
        })
    }

    /// `temb_act` is the time embedding with the resnets' nonlinearity already applied (it is
    /// the same for every resnet, so the UNet computes it once per call).
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.act.after_norm(&self.norm1, x)?;
        let h = self.conv1.forward(&h)?;
        // Each image's embedding `[B, C]` over its map.
        let t = self.time_emb_proj.forward(temb_act)?;
        let h = if self.scale_shift {
            // `[B, C, 1, 1]` over `[B, C, H, W]`, or `[B, 1, 1, C]` over `[B, H, W, C]`.
            let (t, channel_dim) = if self.channels_last {
                (t.unsqueeze(1)?.unsqueeze(1)?, 3)
            } else {
                (t.unsqueeze(2)?.unsqueeze(3)?, 1)
            };
            let ch = t.dim(channel_dim)? / 2;
            let (scale, shift) = (
                t.narrow(channel_dim, 0, ch)?,
                t.narrow(channel_dim, ch, ch)?,
            );
            let h = self.norm2.forward(&h)?;
            let h = h.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?;
            self.act.apply(&h)?
        } else {
            // Added in the GroupNorm's reads where its kernels can (channels last on a CUDA
            // device): no pass over the map of its own.
            self.act.after_norm_added(&self.norm2, h, &t)?
        };
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        // The shortcut as conv2's residual: added in cuDNN's call where the kernel policy fuses
        // the epilogue (`cuda_fused_conv`, channels-last layers), else by the add that follows
        // the convolution.
        let epilogue = Epilogue {
            residual: Some(&shortcut),
            relu: false,
        };
        let out = self.conv2.forward_with(&h, 1, epilogue)?;
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
    pub fn new(channels: usize, padding: usize, s: &BlockSettings, vb: VarBuilder) -> Result<Self> {
        let padding = if padding == 0 {
            Padding::bottom_right(1)
        } else {
            Padding::uniform(padding)
        };
        let vb = vb.pp("conv");
        let conv = Conv2d::new(channels, channels, 3, 2, padding, true, vb.clone())?;
        Ok(Self {
            conv: s.conv(conv, &vb)?,
        })
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
    settings: BlockSettings,
}

impl Upsample2D {
    /// A nearest ×2 upsampling followed by a 3×3 convolution.
    pub fn new(channels: usize, s: &BlockSettings, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: s.conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))?,
            settings: *s,
        })
    }

    /// Upsamples `x` to `size` when given (the skip connection's size), else by two, then
    /// convolves.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> candle_core::Result<Tensor> {
        let (h, w) = self.settings.spatial(x)?;
        match size {
            // Plain 2×: fused into the convolution's input copy on the CPU.
            None => self.conv.forward_upsampled(x, 2),
            Some(size) if size == (2 * h, 2 * w) => self.conv.forward_upsampled(x, 2),
            // Odd sizes (rare): through candle's channels-first upsampling.
            Some((th, tw)) => {
                let s = &self.settings;
                let up = s.enter(&s.leave(x)?.upsample_nearest2d(th, tw)?)?;
                self.conv.forward(&up)
            }
        }
    }
}
