//! The HED edge network ControlNet's annotators use (`ControlNetHED_Apache2`, lllyasviel's
//! Apache-2.0 re-training of holistically-nested edge detection, `ControlNetHED.pth` in
//! `lllyasviel/Annotators`).
//!
//! The input is raw RGB in 0..=255 (not normalised); a learned per-channel offset `norm`
//! `[1, 3, 1, 1]` is subtracted. Five blocks follow, each a few 3×3 convolutions with ReLU (the
//! blocks after the first start with a 2×2 max-pool), and each block's features go through a
//! 1×1 projection to one channel: the five side outputs, at 1, 1/2, … 1/16 of the input size
//! (pooling floors odd sizes). The caller resizes and fuses them (sdstream's `preprocess::hed`).
//!
//! The checkpoint has no config: the widths and the convolutions per block are read from the
//! tensors' shapes ([`Config::from_shapes`]), so the real file (64, 128, 256, 512, 512 wide;
//! 2, 2, 3, 3, 3 convolutions) and narrower stand-ins load alike.

use std::collections::HashMap;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::conv::{Conv2d, Padding};
use crate::{Error, Result};

/// Most blocks and convolutions per block a checkpoint may describe.
const MAX_BLOCKS: usize = 8;
const MAX_CONVS: usize = 8;
/// Widest block accepted.
const MAX_WIDTH: usize = 4096;

/// Widths and depths of the blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Output channels of each block's convolutions.
    pub widths: Vec<usize>,
    /// 3×3 convolutions in each block.
    pub convs: Vec<usize>,
}

impl Default for Config {
    /// `ControlNetHED.pth`'s network.
    fn default() -> Self {
        Self {
            widths: vec![64, 128, 256, 512, 512],
            convs: vec![2, 2, 3, 3, 3],
        }
    }
}

impl Config {
    /// Reads the blocks from a state dict's shapes: `block{k}.convs.{i}.weight` for k = 1, 2, …
    /// and i = 0, 1, …, each `[width, previous width, 3, 3]`, a `projection.weight`
    /// `[1, width, 1, 1]` per block, and `norm` `[1, 3, 1, 1]`. Anything else is left to the
    /// loader's unused-tensor check.
    pub fn from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<Self> {
        let bad = |detail: String| Error::UnsupportedConfig {
            model: "HED".into(),
            option: "weights".into(),
            detail,
        };
        let mut config = Config {
            widths: Vec::new(),
            convs: Vec::new(),
        };
        for block in 1..=MAX_BLOCKS + 1 {
            let first = format!("block{block}.convs.0.weight");
            let Some(shape) = shapes.get(&first) else {
                break;
            };
            if block > MAX_BLOCKS {
                return Err(bad(format!("more than {MAX_BLOCKS} blocks")));
            }
            let width = shape.first().copied().unwrap_or(0);
            if width == 0 || width > MAX_WIDTH {
                return Err(bad(format!("tensor `{first}` has shape {shape:?}")));
            }
            let mut convs = 0;
            while shapes.contains_key(&format!("block{block}.convs.{convs}.weight")) {
                convs += 1;
                if convs > MAX_CONVS {
                    return Err(bad(format!(
                        "block {block} has more than {MAX_CONVS} convolutions"
                    )));
                }
            }
            config.widths.push(width);
            config.convs.push(convs);
        }
        if config.widths.is_empty() {
            return Err(bad(
                "no tensor `block1.convs.0.weight`: not a ControlNetHED checkpoint".into(),
            ));
        }
        Ok(config)
    }
}

/// One block: optional max-pool, 3×3 convolutions with ReLU, and the 1×1 side projection.
#[derive(Debug, Clone)]
struct Block {
    pool: bool,
    convs: Vec<Conv2d>,
    projection: Conv2d,
}

impl Block {
    fn new(c_in: usize, width: usize, convs: usize, pool: bool, vb: VarBuilder) -> Result<Self> {
        let layers = (0..convs)
            .map(|i| {
                let c = if i == 0 { c_in } else { width };
                Conv2d::new(
                    c,
                    width,
                    3,
                    1,
                    Padding::uniform(1),
                    true,
                    vb.pp("convs").pp(i),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let projection = Conv2d::new(
            width,
            1,
            1,
            1,
            Padding::default(),
            true,
            vb.pp("projection"),
        )?;
        Ok(Self {
            pool,
            convs: layers,
            projection,
        })
    }

    /// The block's features and its side output.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = if self.pool {
            x.max_pool2d(2)?
        } else {
            x.clone()
        };
        for conv in &self.convs {
            h = conv.forward(&h)?.relu()?;
        }
        let side = self.projection.forward(&h)?;
        Ok((h, side))
    }
}

/// The HED network.
#[derive(Debug, Clone)]
pub struct Hed {
    norm: Tensor,
    blocks: Vec<Block>,
}

impl Hed {
    /// Builds the network from `vb` (tensor names as in `ControlNetHED.pth`).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        if config.widths.len() != config.convs.len() || config.widths.is_empty() {
            return Err(Error::UnsupportedConfig {
                model: "HED".into(),
                option: "blocks".into(),
                detail: "one width and one convolution count per block".into(),
            });
        }
        let norm = vb.get((1, 3, 1, 1), "norm")?;
        let mut blocks = Vec::with_capacity(config.widths.len());
        let mut c_in = 3;
        for (k, (&width, &convs)) in config.widths.iter().zip(&config.convs).enumerate() {
            blocks.push(Block::new(
                c_in,
                width,
                convs,
                k > 0,
                vb.pp(format!("block{}", k + 1)),
            )?);
            c_in = width;
        }
        Ok(Self { norm, blocks })
    }

    /// The side outputs `[B, 1, H/2^k, W/2^k]` (k = 0, 1, …) of `x` `[B, 3, H, W]`, raw RGB
    /// in 0..=255, in the network's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = x.to_dtype(self.norm.dtype())?.broadcast_sub(&self.norm)?;
        let mut sides = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (next, side) = block.forward(&h)?;
            sides.push(side);
            h = next;
        }
        Ok(sides)
    }
}
