//! The UNet's levels: down blocks, the mid block and up blocks, each resnets with optional
//! transformers and a resampler.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::Result;
use crate::try_vec;

use super::{
    AttentionSpec, BlockSettings, Context, Downsample2D, ResnetBlock2D, ResnetTime,
    Transformer2DModel, Upsample2D,
};

/// `CrossAttnDownBlock2D` (with transformers) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

/// Shape of one UNet level, as `get_down_block`/`get_up_block` receive it.
#[derive(Debug, Clone, Copy)]
pub struct LevelShape {
    /// Channels into the level.
    pub in_channels: usize,
    /// Channels out of the level.
    pub out_channels: usize,
    /// Width of the time embedding its resnets add.
    pub temb_channels: usize,
    /// Resnets (and transformers, with attention) in the level.
    pub layers: usize,
}

impl DownBlock {
    /// Its transformers (none in a block without attention).
    pub fn transformers_mut(&mut self) -> &mut [Transformer2DModel] {
        &mut self.attentions
    }

    /// Its resnets, in the order it runs them.
    pub fn resnets_mut(&mut self) -> &mut [ResnetBlock2D] {
        &mut self.resnets
    }

    /// Builds a level from `vb`: its resnets, its transformers when `attention` is given, and its
    /// downsampler unless it is the innermost.
    pub fn new(
        shape: LevelShape,
        attention: Option<&AttentionSpec>,
        downsample_padding: Option<usize>,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = try_vec(shape.layers, "the resnets of a level")?;
        let mut attentions = Vec::new();
        for i in 0..shape.layers {
            let in_ch = if i == 0 {
                shape.in_channels
            } else {
                shape.out_channels
            };
            resnets.push(ResnetBlock2D::new(
                in_ch,
                shape.out_channels,
                shape.temb_channels,
                1.0,
                s,
                vb.pp("resnets").pp(i.to_string()),
            )?);
            if let Some(spec) = attention {
                attentions.push(Transformer2DModel::new(
                    shape.out_channels,
                    spec,
                    s,
                    vb.pp("attentions").pp(i.to_string()),
                )?);
            }
        }
        let downsampler = match downsample_padding {
            Some(padding) => Some(Downsample2D::new(
                shape.out_channels,
                padding,
                s,
                vb.pp("downsamplers").pp("0"),
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and the skip connections it contributes (one per resnet, plus
    /// the downsampled output).
    pub fn forward(
        &self,
        x: &Tensor,
        time: ResnetTime<'_>,
        context: Context<'_, '_>,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, time)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            skips.push(x.clone());
        }
        Ok((x, skips))
    }

    /// How many skip connections this block contributes.
    pub fn skip_count(&self) -> usize {
        self.resnets.len() + usize::from(self.downsampler.is_some())
    }
}

/// `UNetMidBlock2DCrossAttn` (resnet, then transformer + resnet per layer) or `UNetMidBlock2D`
/// without attention (a single resnet).
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// Its transformers (none in a block without attention).
    pub fn transformers_mut(&mut self) -> &mut [Transformer2DModel] {
        &mut self.attentions
    }

    /// Its resnets, in the order it runs them.
    pub fn resnets_mut(&mut self) -> &mut [ResnetBlock2D] {
        &mut self.resnets
    }

    /// Builds the middle block from `vb`: resnet, then transformer and resnet pairs (resnets only
    /// without attention).
    pub fn new(
        channels: usize,
        temb_channels: usize,
        output_scale_factor: f64,
        attention: Option<&AttentionSpec>,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnet = |i: usize| {
            ResnetBlock2D::new(
                channels,
                channels,
                temb_channels,
                output_scale_factor,
                s,
                vb.pp("resnets").pp(i.to_string()),
            )
        };
        let mut resnets = vec![resnet(0)?];
        let mut attentions = Vec::new();
        if let Some(spec) = attention {
            attentions.push(Transformer2DModel::new(
                channels,
                spec,
                s,
                vb.pp("attentions").pp("0"),
            )?);
            resnets.push(resnet(1)?);
        }
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// Runs the middle block on `x` with the time embedding and the context.
    pub fn forward(
        &self,
        x: &Tensor,
        time: ResnetTime<'_>,
        context: Context<'_, '_>,
    ) -> candle_core::Result<Tensor> {
        let mut x = self.resnets[0].forward(x, time)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = attn.forward(&x, context)?;
            x = resnet.forward(&x, time)?;
        }
        Ok(x)
    }
}

/// `CrossAttnUpBlock2D` (with transformers) or `UpBlock2D` (without).
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
    /// Where the maps keep their channels, along which skips are concatenated.
    channel_dim: usize,
}

impl UpBlock {
    /// Its transformers (none in a block without attention).
    pub fn transformers_mut(&mut self) -> &mut [Transformer2DModel] {
        &mut self.attentions
    }

    /// Its resnets, in the order it runs them.
    pub fn resnets_mut(&mut self) -> &mut [ResnetBlock2D] {
        &mut self.resnets
    }

    /// `shape.in_channels` is the channel count of the deepest skip this block consumes
    /// (diffusers' `in_channels`), `prev_channels` that of the block below.
    pub fn new(
        shape: LevelShape,
        prev_channels: usize,
        attention: Option<&AttentionSpec>,
        add_upsample: bool,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut resnets = try_vec(shape.layers, "the resnets of a level")?;
        let mut attentions = Vec::new();
        for i in 0..shape.layers {
            let skip_ch = if i + 1 == shape.layers {
                shape.in_channels
            } else {
                shape.out_channels
            };
            let in_ch = if i == 0 {
                prev_channels
            } else {
                shape.out_channels
            };
            resnets.push(ResnetBlock2D::new(
                in_ch + skip_ch,
                shape.out_channels,
                shape.temb_channels,
                1.0,
                s,
                vb.pp("resnets").pp(i.to_string()),
            )?);
            if let Some(spec) = attention {
                attentions.push(Transformer2DModel::new(
                    shape.out_channels,
                    spec,
                    s,
                    vb.pp("attentions").pp(i.to_string()),
                )?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(
                shape.out_channels,
                s,
                vb.pp("upsamplers").pp("0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
            channel_dim: s.channel_dim(),
        })
    }

    /// How many skip connections this block consumes.
    pub fn skip_count(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the last one backwards, as diffusers pops them.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        time: ResnetTime<'_>,
        context: Context<'_, '_>,
        upsample_size: Option<(usize, usize)>,
    ) -> candle_core::Result<Tensor> {
        if skips.len() != self.resnets.len() {
            candle_core::bail!(
                "up block expects {} skip connections, got {}",
                self.resnets.len(),
                skips.len()
            )
        }
        let mut x = x.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            x = Tensor::cat(&[&x, skip], self.channel_dim)?;
            x = resnet.forward(&x, time)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}
