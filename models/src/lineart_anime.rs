//! The anime line-drawing network of ControlNet's `lineart_anime` annotator (`netG.pth` in
//! `lllyasviel/Annotators`, Anime2Sketch's generator): pix2pix's U-Net generator, built from
//! nested skip-connection levels, with InstanceNorm (no affine parameters) and no dropout.
//!
//! Level 0 (outermost) and levels 1..n (the last one innermost), on RGB in [−1, 1]:
//! - level 0: 4×4 stride-2 convolution (padding 1), level 1, ReLU, 4×4 stride-2 transposed
//!   convolution (padding 1) to the output channels, tanh;
//! - a middle level on `x`: `a = LeakyReLU₀.₂(x)`, then `IN(conv(a))`, the next level, ReLU,
//!   `IN(transposed conv(·))`, and the level's output is `[a, that]` along the channels;
//! - the innermost level: `a = LeakyReLU₀.₂(x)`, `conv(a)`, ReLU, `IN(transposed conv(·))`,
//!   output `[a, that]`.
//!
//! The skip connection carries `LeakyReLU(x)`, not `x`: pix2pix's LeakyReLU runs in place on the
//! level's input before the concatenation reads it, and the published network was trained (and
//! controlnet_aux runs it) that way.
//!
//! Tensor names follow the nested `nn.Sequential`s: level 0 is `model.model.{0,3}`, level 1
//! `model.model.1.model.{1,5}`, each deeper level `….3.model.{1,5}` and the innermost `{1,3}`.
//! `netG.pth` was saved from a `DataParallel` wrapper, so its names may carry a `module.`
//! prefix, which controlnet_aux strips and [`Config::from_shapes`] recognises. The checkpoint has
//! no config: the levels' widths come from the shapes (Anime2Sketch's: 8 levels, widths 64, 128,
//! 256 and then 512).

use std::collections::HashMap;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::conv_transpose::ConvTranspose2x;
use crate::kernels::conv::{Conv2d, Padding};
use crate::kernels::norm::GroupNorm;
use crate::{Error, Result};

/// torch's `InstanceNorm2d` default eps.
const INSTANCE_NORM_EPS: f64 = 1e-5;
/// pix2pix's LeakyReLU slope on the way down.
const LEAKY_SLOPE: f64 = 0.2;
/// Most levels a checkpoint may describe (each halves the map: 2¹⁶ pixels wide at the most).
const MAX_LEVELS: usize = 16;
/// Widest level accepted.
const MAX_WIDTH: usize = 4096;
/// The prefix a `DataParallel` wrapper gives every name.
const DATA_PARALLEL_PREFIX: &str = "module";

/// The generator's sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Image channels in.
    pub in_channels: usize,
    /// Channels out (1: a line drawing).
    pub out_channels: usize,
    /// Channels inside each level, outermost first (`netG.pth`: 64, 128, 256, 512 × 5).
    pub widths: Vec<usize>,
    /// Whether the names carry `DataParallel`'s `module.` prefix.
    pub data_parallel: bool,
}

impl Config {
    /// `netG.pth`'s generator (`UnetGenerator(3, 1, 8, 64)`), names without `module.`.
    pub fn anime2sketch() -> Self {
        Self {
            in_channels: 3,
            out_channels: 1,
            widths: vec![64, 128, 256, 512, 512, 512, 512, 512],
            data_parallel: false,
        }
    }

    /// Reads the sizes from a state dict's shapes.
    pub fn from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<Self> {
        let bad = |detail: String| Error::UnsupportedConfig {
            model: "anime lineart generator".into(),
            option: "weights".into(),
            detail,
        };
        let data_parallel = shapes.contains_key("module.model.model.0.weight");
        let root = if data_parallel {
            "module.model.model"
        } else {
            "model.model"
        };
        let kernel4 = |name: &str| -> Result<Option<&Vec<usize>>> {
            match shapes.get(name) {
                None => Ok(None),
                Some(s) if s.len() == 4 && s[2] == 4 && s[3] == 4 && s[0] > 0 && s[1] > 0 => {
                    Ok(Some(s))
                }
                Some(s) => Err(bad(format!(
                    "tensor `{name}` has shape {s:?}; the anime lineart U-Net has 4×4 kernels"
                ))),
            }
        };
        let need = |name: &str| {
            kernel4(name)?.ok_or_else(|| {
                bad(format!(
                    "no tensor `{name}`: not an anime lineart (pix2pix U-Net) generator"
                ))
            })
        };
        let first = need(&format!("{root}.0.weight"))?;
        let last = need(&format!("{root}.3.weight"))?;
        let (in_channels, out_channels) = (first[1], last[1]);
        let mut widths = vec![first[0]];
        let mut prefix = format!("{root}.1.model");
        loop {
            if widths.len() >= MAX_LEVELS {
                return Err(bad(format!("more than {MAX_LEVELS} levels")));
            }
            let outer = *widths.last().expect("one width at least");
            let down = need(&format!("{prefix}.1.weight"))?;
            if down[1] != outer {
                return Err(bad(format!(
                    "tensor `{prefix}.1.weight` has shape {down:?}: {outer} input channels expected"
                )));
            }
            widths.push(down[0]);
            if kernel4(&format!("{prefix}.5.weight"))?.is_some() {
                prefix = format!("{prefix}.3.model");
            } else if kernel4(&format!("{prefix}.3.weight"))?.is_some() {
                break;
            } else {
                return Err(bad(format!(
                    "level `{prefix}` has neither an up-convolution `.5` nor an innermost `.3`"
                )));
            }
        }
        if let Some(&w) = widths.iter().find(|&&w| w > MAX_WIDTH) {
            return Err(bad(format!(
                "a level {w} channels wide (at most {MAX_WIDTH})"
            )));
        }
        Ok(Self {
            in_channels,
            out_channels,
            widths,
            data_parallel,
        })
    }

    /// What the height and width must be multiples of: every level halves the map.
    pub fn size_multiple(&self) -> usize {
        1 << self.widths.len()
    }
}

/// One level below the outermost.
#[derive(Debug, Clone)]
struct Level {
    down: Conv2d,
    /// InstanceNorm after the down convolution (none at the innermost level).
    down_norm: Option<GroupNorm>,
    up: ConvTranspose2x,
    up_norm: GroupNorm,
}

/// The anime line-drawing generator.
#[derive(Debug, Clone)]
pub struct LineartAnimeGenerator {
    down: Conv2d,
    /// Levels 1..n, outermost first.
    levels: Vec<Level>,
    up: ConvTranspose2x,
    size_multiple: usize,
}

impl LineartAnimeGenerator {
    /// Builds the generator from `vb` (tensor names as in `netG.pth`).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        let device = vb.device().clone();
        let vb = if config.data_parallel {
            vb.pp(DATA_PARALLEL_PREFIX)
        } else {
            vb
        };
        let down_conv =
            |c_in, c_out, vb| Conv2d::new(c_in, c_out, 4, 2, Padding::uniform(1), true, vb);
        let widths = &config.widths;
        let mut vb_level = vb.pp("model").pp("model");
        let down = down_conv(config.in_channels, widths[0], vb_level.pp("0"))?;
        let dtype = down.dtype();
        let up = ConvTranspose2x::new(
            2 * widths[0],
            config.out_channels,
            4,
            1,
            0,
            true,
            dtype,
            vb_level.pp("3"),
        )?;
        let norm = |c| GroupNorm::instance(c, INSTANCE_NORM_EPS, dtype, &device);
        let mut levels = Vec::with_capacity(widths.len() - 1);
        for i in 1..widths.len() {
            vb_level = vb_level.pp(if i == 1 { "1" } else { "3" }).pp("model");
            let innermost = i + 1 == widths.len();
            let (outer, inner) = (widths[i - 1], widths[i]);
            let up_in = if innermost { inner } else { 2 * inner };
            let up_name = if innermost { "3" } else { "5" };
            levels.push(Level {
                down: down_conv(outer, inner, vb_level.pp("1"))?,
                down_norm: if innermost { None } else { Some(norm(inner)?) },
                up: ConvTranspose2x::new(up_in, outer, 4, 1, 0, true, dtype, vb_level.pp(up_name))?,
                up_norm: norm(outer)?,
            });
        }
        Ok(Self {
            down,
            levels,
            up,
            size_multiple: config.size_multiple(),
        })
    }

    /// What the input's height and width must be multiples of.
    pub fn size_multiple(&self) -> usize {
        self.size_multiple
    }

    /// The dtype the generator computes in.
    pub fn dtype(&self) -> DType {
        self.down.dtype()
    }

    /// Level `i` (1-based) and everything below it on `x`: `[LeakyReLU(x), up-path]`.
    fn level(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let level = &self.levels[i - 1];
        let skip = candle_nn::ops::leaky_relu(x, LEAKY_SLOPE)?;
        let mut h = level.down.forward(&skip)?;
        if let Some(norm) = &level.down_norm {
            h = self.level(i + 1, &norm.forward(&h)?)?;
        }
        let up = level.up_norm.forward(&level.up.forward(&h.relu()?)?)?;
        Ok(Tensor::cat(&[&skip, &up], 1)?)
    }

    /// The line map `[B, out, H, W]` in [−1, 1] of `x` `[B, in, H, W]` in [−1, 1]; H and W
    /// must be multiples of [`Self::size_multiple`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let m = self.size_multiple;
        if h == 0 || w == 0 || h % m != 0 || w % m != 0 {
            return Err(Error::InvalidFrame(format!(
                "the anime lineart generator takes sides that are multiples of {m}, got {h}×{w}"
            )));
        }
        let x = x.to_dtype(self.dtype())?;
        let h = self.down.forward(&x)?;
        let inner = if self.levels.is_empty() {
            h
        } else {
            self.level(1, &h)?
        };
        Ok(self.up.forward(&inner.relu()?)?.tanh()?)
    }
}
