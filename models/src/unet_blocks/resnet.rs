//! The residual block and the resamplers between resolutions.

use std::cell::Cell;
use std::ops::Range;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::conv::{Conv2d, Epilogue, Padding};
use crate::kernels::norm::GroupNorm;
use crate::{Result, weight_table};

use super::layers::{Linear, linear};
use super::{Activation, BlockSettings};

/// The time embedding a network's call hands its resnets: after the resnets' nonlinearity
/// (`[B, time_embed_dim]`, the same for every resnet), and, where the network fused its
/// resnets' projections ([`TimeProjections`]), every resnet's projection of it.
#[derive(Debug, Clone, Copy)]
pub struct ResnetTime<'a> {
    act: &'a Tensor,
    projected: Option<&'a Tensor>,
}

impl<'a> ResnetTime<'a> {
    /// The embedding, and [`TimeProjections::project`]'s output for it where the network has
    /// fused projections (else each resnet projects the embedding itself).
    pub fn new(act: &'a Tensor, projected: Option<&'a Tensor>) -> Self {
        Self { act, projected }
    }
}

thread_local! {
    /// Resnet calls on this thread that took their columns of a network's
    /// [`TimeProjections`] (for tests).
    static TIME_COLUMNS_TAKEN: Cell<usize> = const { Cell::new(0) };
}

/// How many resnet calls on this thread took their time embedding as columns of their
/// network's fused projections ([`TimeProjections`]): what tells a test the fused path ran
/// (per thread, so that tests running side by side do not count each other's calls).
pub fn time_columns_taken() -> usize {
    TIME_COLUMNS_TAKEN.with(Cell::get)
}

/// Every resnet's `time_emb_proj` of a network as one linear layer: their weights concatenated
/// by rows (in the order the network runs its resnets) and their biases likewise, so that a
/// call projects the time embedding for all of them in one product (kernel policy
/// `fused_time_projections`, read when the network is built). All of them read the same
/// embedding: on a GPU, where 22 products of one row each (sd-turbo's UNet) cost a launch and
/// a bias add apiece, one product of the same weights costs one. Each resnet's own layer
/// becomes a view of its rows (no second copy of the weights; the CPU kernels, which lay a
/// weight out `[in, out]`, copy theirs) and takes its columns of the product: `[B, C]` rows
/// that lie `Σ C` apart, which the GroupNorm kernel that adds them reads in place.
#[derive(Debug, Clone)]
pub struct TimeProjections {
    all: Linear,
}

impl TimeProjections {
    /// Fuses the projections of `resnets` (in the order the network runs them) where the
    /// current kernel policy asks for it; `None` where it does not, or for a network without
    /// resnets. Records the rows of the fused weight in the weight table in place of the
    /// separate weights (see [`weight_table::record_rows`]).
    pub fn fuse_if_asked<'r>(
        resnets: impl IntoIterator<Item = &'r mut ResnetBlock2D>,
    ) -> Result<Option<Self>> {
        if !crate::kernels::KernelPolicy::current().fused_time_projections {
            return Ok(None);
        }
        let mut resnets: Vec<&mut ResnetBlock2D> = resnets.into_iter().collect();
        if resnets.is_empty() {
            return Ok(None);
        }
        let weights: Vec<&Tensor> = resnets.iter().map(|r| r.time_emb_proj.weight()).collect();
        let biases = resnets
            .iter()
            .map(|r| {
                r.time_emb_proj.bias.clone().ok_or_else(|| {
                    crate::Error::State(format!("{} has no bias", r.time_emb_proj_name))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // On the CPU kernels a weight is a view of `[in, out]` values: the concatenation reads
        // it as `[out, in]`, as every device does.
        let weight = Tensor::cat(&weights, 0)?;
        let bias = Tensor::cat(&biases, 0)?;
        let names: Vec<String> = resnets
            .iter()
            .map(|r| r.time_emb_proj_name.clone())
            .collect();
        let all = Linear::new(weight, Some(bias))?;
        let mut start = 0;
        for resnet in &mut resnets {
            let width = resnet.time_emb_proj.weight().dim(0)?;
            resnet.time_emb_proj = Linear::new(
                all.weight().narrow(0, start, width)?,
                all.bias
                    .as_ref()
                    .map(|b| b.narrow(0, start, width))
                    .transpose()?,
            )?;
            resnet.time_columns = Some(start..start + width);
            start += width;
        }
        weight_table::record_rows(&names, all.weight())?;
        Ok(Some(Self { all }))
    }

    /// Every resnet's projection of `temb_act` (`[B, time_embed_dim]`): `[B, Σ C]`; `None`
    /// for a network without fused projections.
    pub fn project(this: Option<&Self>, temb_act: &Tensor) -> candle_core::Result<Option<Tensor>> {
        this.map(|p| p.all.forward(temb_act)).transpose()
    }
}

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
    /// `time_emb_proj`'s weight's name in the checkpoint.
    time_emb_proj_name: String,
    /// Its columns of the network's [`TimeProjections`], where it fused them.
    time_columns: Option<Range<usize>>,
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
            time_emb_proj_name: format!("{}.weight", vb.pp("time_emb_proj").prefix()),
            time_columns: None,
        })
    }

    /// `time` holds the time embedding with the resnets' nonlinearity already applied (it is
    /// the same for every resnet, so the network computes it once per call), and where the
    /// network fused its resnets' projections, this one's among them.
    pub fn forward(&self, x: &Tensor, time: ResnetTime<'_>) -> candle_core::Result<Tensor> {
        let h = self.act.after_norm(&self.norm1, x)?;
        let h = self.conv1.forward(&h)?;
        // Each image's embedding `[B, C]` over its map.
        let t = match (time.projected, &self.time_columns) {
            (Some(all), Some(columns)) => {
                TIME_COLUMNS_TAKEN.with(|n| n.set(n.get() + 1));
                all.narrow(1, columns.start, columns.len())?
            }
            _ => self.time_emb_proj.forward(time.act)?,
        };
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
