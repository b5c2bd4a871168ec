//! RAFT optical flow (Teed & Deng, "Recurrent All-Pairs Field Transforms", 2020) as torchvision
//! builds `raft_small`, the network behind Daydream's `temporal_net_tensorrt` preprocessor
//! (weights `Raft_Small_Weights.C_T_V2`; docs/PREPROCESSORS.md).
//!
//! The tensor names are those of torchvision's state dict (`feature_encoder.convnormrelu.0.weight`,
//! `update_block.recurrent_block.convgru1.convz.weight`, …). The parts, in the order they run:
//!
//! * **Feature encoder**, applied to both images: a 7×7 stride-2 stem, three stages of two
//!   bottleneck residual blocks (strides 1, 2, 2), a 1×1 projection. Every convolution but the
//!   projection is followed by instance norm (no affine parameters) and ReLU. Output at 1/8 of the
//!   input size.
//! * **Context encoder**, applied to the first image only: the same layout without any norm. Its
//!   output is split into the GRU's initial hidden state (`tanh`) and the context (`ReLU`).
//! * **Correlation pyramid**: the dot product of every feature vector of image 1 with every one of
//!   image 2, divided by √channels, then average-pooled 2×2 over image 2's axes three times
//!   (4 levels).
//! * **Lookup**: around each pixel's current match in image 2, a (2r+1)² window of the pyramid at
//!   every level (radius 3), bilinearly sampled with zeros outside (torch's `grid_sample`,
//!   `align_corners=True`).
//! * **Update block**, repeated `num_flow_updates` times: a motion encoder (correlation and current
//!   flow through small convolutions), one convolutional GRU, a flow head giving the flow change.
//! * **Upsampling** of each iteration's 1/8-size flow: raft_small has no mask predictor, so it is
//!   bilinear ×8 with `align_corners=True`, the values multiplied by 8.
//!
//! The convolutions run in the [`VarBuilder`]'s dtype. The correlation pyramid, the lookup, the
//! pixel coordinates and the returned flows are f32 whatever that dtype is: the correlation
//! sums a whole feature vector per entry and the coordinates accumulate twelve updates, both of
//! which half precision would round visibly.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::conv::{Conv2d, Padding};

/// Instance norm's variance epsilon (torch's `InstanceNorm2d` default).
const INSTANCE_NORM_EPS: f64 = 1e-5;

/// Strides of the encoders' three stages (the stem has stride 2): 8× downsampling in all.
const STAGE_STRIDES: [usize; 3] = [1, 2, 2];

/// Downsampling of both encoders, fixed by the architecture.
const DOWNSAMPLING: usize = 8;

/// The widths of a RAFT in torchvision's `raft_small` layout. [`Default`] gives raft_small's own
/// values; [`Config::from_tensor_shapes`] reads them from a state dict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Feature encoder widths: stem, stages 1–3, output projection (`(32, 32, 64, 96, 128)`).
    /// The first stage keeps the stem's width (its first block has an identity shortcut).
    pub feature_encoder_layers: [usize; 5],
    /// Context encoder widths, same meaning (`(32, 32, 64, 96, 160)`); the last one is the hidden
    /// state plus the context channels.
    pub context_encoder_layers: [usize; 5],
    /// Levels of the correlation pyramid (4). State dicts do not record it.
    pub corr_levels: usize,
    /// Lookup radius: each level contributes a (2r+1)² window (3, so 7×7).
    pub corr_radius: usize,
    /// Output channels of the motion encoder's 1×1 convolution of the correlation features (96).
    pub motion_corr_channels: usize,
    /// Output channels of the motion encoder's two flow convolutions, 7×7 then 3×3 (`(64, 32)`).
    pub motion_flow_channels: [usize; 2],
    /// Channels of the motion features, the current flow's 2 included (82).
    pub motion_out_channels: usize,
    /// Channels of the GRU's hidden state (96).
    pub hidden_state_size: usize,
    /// Kernel size of the GRU's convolutions, square and odd (3).
    pub gru_kernel_size: usize,
    /// Hidden channels of the flow head (128).
    pub flow_head_hidden_size: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            feature_encoder_layers: [32, 32, 64, 96, 128],
            context_encoder_layers: [32, 32, 64, 96, 160],
            corr_levels: 4,
            corr_radius: 3,
            motion_corr_channels: 96,
            motion_flow_channels: [64, 32],
            motion_out_channels: 82,
            hidden_state_size: 96,
            gru_kernel_size: 3,
            flow_head_hidden_size: 128,
        }
    }
}

/// Shape of a tensor named in a state dict; the error names it.
fn shape_of<'a>(
    shapes: &'a HashMap<String, Vec<usize>>,
    name: &str,
) -> candle_core::Result<&'a [usize]> {
    match shapes.get(name) {
        Some(shape) => Ok(shape),
        None => candle_core::bail!("RAFT: tensor `{name}` is missing"),
    }
}

/// Axis `axis` of the 4-d convolution weight `name`.
fn conv_dim(
    shapes: &HashMap<String, Vec<usize>>,
    name: &str,
    axis: usize,
) -> candle_core::Result<usize> {
    let shape = shape_of(shapes, name)?;
    if shape.len() != 4 {
        candle_core::bail!(
            "RAFT: tensor `{name}` has shape {shape:?}, expected a 4-d convolution weight"
        );
    }
    Ok(shape[axis])
}

impl Config {
    /// Channels of the lookup's output: a (2r+1)² window per pyramid level.
    pub fn corr_channels(&self) -> usize {
        let side = 2 * self.corr_radius + 1;
        self.corr_levels * side * side
    }

    /// Channels of the context the GRU reads besides the motion features: what the context
    /// encoder outputs beyond the hidden state.
    pub fn context_channels(&self) -> usize {
        self.context_encoder_layers[4].saturating_sub(self.hidden_state_size)
    }

    /// Reads the widths from a state dict's tensor shapes (name → dims), then checks that every
    /// tensor the network needs is there with the shape these widths imply and that nothing else
    /// is. The correlation pyramid's depth is not stored in a state dict: it is taken to be
    /// raft_small's 4 levels, and the radius is derived from the motion encoder's input channels
    /// (4·(2r+1)²). Errors name the offending tensor.
    pub fn from_tensor_shapes(shapes: &HashMap<String, Vec<usize>>) -> candle_core::Result<Config> {
        let encoder = |prefix: &str| -> candle_core::Result<[usize; 5]> {
            Ok([
                conv_dim(shapes, &format!("{prefix}.convnormrelu.0.weight"), 0)?,
                conv_dim(
                    shapes,
                    &format!("{prefix}.layer1.0.convnormrelu3.0.weight"),
                    0,
                )?,
                conv_dim(
                    shapes,
                    &format!("{prefix}.layer2.0.convnormrelu3.0.weight"),
                    0,
                )?,
                conv_dim(
                    shapes,
                    &format!("{prefix}.layer3.0.convnormrelu3.0.weight"),
                    0,
                )?,
                conv_dim(shapes, &format!("{prefix}.conv.weight"), 0)?,
            ])
        };
        let motion = "update_block.motion_encoder";
        let corr_name = format!("{motion}.convcorr1.0.weight");
        let corr_levels = Config::default().corr_levels;
        let corr_channels = conv_dim(shapes, &corr_name, 1)?;
        let corr_radius = window_radius(corr_channels, corr_levels).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "RAFT: tensor `{corr_name}` takes {corr_channels} input channels, which is not \
                 {corr_levels} pyramid levels of an odd square window"
            ))
        })?;
        let gru_name = "update_block.recurrent_block.convgru1.convz.weight";
        let config = Config {
            feature_encoder_layers: encoder("feature_encoder")?,
            context_encoder_layers: encoder("context_encoder")?,
            corr_levels,
            corr_radius,
            motion_corr_channels: conv_dim(shapes, &corr_name, 0)?,
            motion_flow_channels: [
                conv_dim(shapes, &format!("{motion}.convflow1.0.weight"), 0)?,
                conv_dim(shapes, &format!("{motion}.convflow2.0.weight"), 0)?,
            ],
            // The motion encoder appends the 2 flow channels to its last convolution's output.
            motion_out_channels: conv_dim(shapes, &format!("{motion}.conv.0.weight"), 0)? + 2,
            hidden_state_size: conv_dim(shapes, gru_name, 0)?,
            gru_kernel_size: conv_dim(shapes, gru_name, 2)?,
            flow_head_hidden_size: conv_dim(shapes, "update_block.flow_head.conv1.weight", 0)?,
        };
        config.validate().map_err(|e| {
            candle_core::Error::Msg(format!(
                "RAFT: the widths read from the state dict's convolution weights do not fit \
                 raft_small's layout: {e}"
            ))
        })?;

        let expected = config.tensor_shapes();
        for (name, shape) in &expected {
            let found = shape_of(shapes, name)?;
            if found != shape.as_slice() {
                candle_core::bail!(
                    "RAFT: tensor `{name}` has shape {found:?}, but the widths read from the state \
                     dict need {shape:?}"
                );
            }
        }
        let known: HashSet<&str> = expected.iter().map(|(name, _)| name.as_str()).collect();
        let mut unknown: Vec<&String> = shapes
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .collect();
        unknown.sort();
        if let Some(first) = unknown.first() {
            candle_core::bail!(
                "RAFT: tensor `{first}` is not part of raft_small's layout ({} unexpected tensors; \
                 raft_large's mask predictor, batch norm or second GRU are not supported)",
                unknown.len()
            );
        }
        Ok(config)
    }

    /// Checks what the layout depends on; the error names the field.
    pub fn validate(&self) -> candle_core::Result<()> {
        for (field, layers) in [
            ("feature_encoder_layers", &self.feature_encoder_layers),
            ("context_encoder_layers", &self.context_encoder_layers),
        ] {
            if layers[0] == 0 || layers[4] == 0 {
                candle_core::bail!("RAFT config: {field} {layers:?} has a zero width");
            }
            // A bottleneck block's inner width is a quarter of its output width.
            if layers[1..4].iter().any(|&c| c < 4) {
                candle_core::bail!(
                    "RAFT config: {field} {layers:?}: stage widths must be at least 4"
                );
            }
            if layers[0] != layers[1] {
                candle_core::bail!(
                    "RAFT config: {field} {layers:?}: stage 1 must keep the stem's width (its first \
                     block has stride 1 and an identity shortcut)"
                );
            }
        }
        if self.context_encoder_layers[4] <= self.hidden_state_size {
            candle_core::bail!(
                "RAFT config: the context encoder's {} output channels leave no context beside the \
                 hidden state's {}",
                self.context_encoder_layers[4],
                self.hidden_state_size
            );
        }
        if self.corr_levels == 0 || self.corr_levels > 8 {
            candle_core::bail!(
                "RAFT config: corr_levels {} is not in 1..=8",
                self.corr_levels
            );
        }
        if self.motion_out_channels <= 2 {
            candle_core::bail!(
                "RAFT config: motion_out_channels {} must exceed the 2 flow channels",
                self.motion_out_channels
            );
        }
        if self.gru_kernel_size.is_multiple_of(2) {
            candle_core::bail!(
                "RAFT config: gru_kernel_size {} must be odd",
                self.gru_kernel_size
            );
        }
        for (field, value) in [
            ("motion_corr_channels", self.motion_corr_channels),
            ("motion_flow_channels[0]", self.motion_flow_channels[0]),
            ("motion_flow_channels[1]", self.motion_flow_channels[1]),
            ("hidden_state_size", self.hidden_state_size),
            ("flow_head_hidden_size", self.flow_head_hidden_size),
        ] {
            if value == 0 {
                candle_core::bail!("RAFT config: {field} must be at least 1");
            }
        }
        Ok(())
    }

    /// Every tensor of a torchvision state dict with these widths, as (name, shape), in the
    /// order torchvision lists them.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes = Vec::new();
        let mut conv = |name: String, c_out: usize, c_in: usize, kernel: usize| {
            shapes.push((format!("{name}.weight"), vec![c_out, c_in, kernel, kernel]));
            shapes.push((format!("{name}.bias"), vec![c_out]));
        };
        for (prefix, layers) in [
            ("feature_encoder", self.feature_encoder_layers),
            ("context_encoder", self.context_encoder_layers),
        ] {
            conv(format!("{prefix}.convnormrelu.0"), layers[0], 3, 7);
            let mut c_in = layers[0];
            for (stage, (&c_out, stride)) in layers[1..4].iter().zip(STAGE_STRIDES).enumerate() {
                for block in 0..2 {
                    let name = format!("{prefix}.layer{}.{block}", stage + 1);
                    let (block_in, block_stride) = if block == 0 {
                        (c_in, stride)
                    } else {
                        (c_out, 1)
                    };
                    let mid = c_out / 4;
                    conv(format!("{name}.convnormrelu1.0"), mid, block_in, 1);
                    conv(format!("{name}.convnormrelu2.0"), mid, mid, 3);
                    conv(format!("{name}.convnormrelu3.0"), c_out, mid, 1);
                    if block_stride != 1 {
                        conv(format!("{name}.downsample.0"), c_out, block_in, 1);
                    }
                }
                c_in = c_out;
            }
            conv(format!("{prefix}.conv"), layers[4], layers[3], 1);
        }
        let motion = "update_block.motion_encoder";
        let [flow0, flow1] = self.motion_flow_channels;
        conv(
            format!("{motion}.convcorr1.0"),
            self.motion_corr_channels,
            self.corr_channels(),
            1,
        );
        conv(format!("{motion}.convflow1.0"), flow0, 2, 7);
        conv(format!("{motion}.convflow2.0"), flow1, flow0, 3);
        conv(
            format!("{motion}.conv.0"),
            self.motion_out_channels - 2,
            self.motion_corr_channels + flow1,
            3,
        );
        let gru_in = self.hidden_state_size + self.motion_out_channels + self.context_channels();
        for gate in ["convz", "convr", "convq"] {
            conv(
                format!("update_block.recurrent_block.convgru1.{gate}"),
                self.hidden_state_size,
                gru_in,
                self.gru_kernel_size,
            );
        }
        conv(
            "update_block.flow_head.conv1".into(),
            self.flow_head_hidden_size,
            self.hidden_state_size,
            3,
        );
        conv(
            "update_block.flow_head.conv2".into(),
            2,
            self.flow_head_hidden_size,
            3,
        );
        shapes
    }
}

/// The radius r with `channels == levels·(2r+1)²`, r ≥ 1.
fn window_radius(channels: usize, levels: usize) -> Option<usize> {
    if levels == 0 || !channels.is_multiple_of(levels) {
        return None;
    }
    let per_level = channels / levels;
    let side = (1..=per_level).find(|s| s * s >= per_level)?;
    (side * side == per_level && side % 2 == 1 && side >= 3).then_some((side - 1) / 2)
}

/// Instance norm without affine parameters: each channel of each image normalised over its
/// pixels with the biased variance. Computed in f32 (the statistics of a 256×256 map in half
/// precision lose digits) and returned in the input's dtype.
fn instance_norm(xs: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = xs.dtype();
    let (b, c, h, w) = xs.dims4()?;
    let xs = xs.to_dtype(DType::F32)?.reshape((b, c, h * w))?;
    let centered = xs.broadcast_sub(&xs.mean_keepdim(2)?)?;
    let std = (centered.sqr()?.mean_keepdim(2)? + INSTANCE_NORM_EPS)?.sqrt()?;
    centered
        .broadcast_div(&std)?
        .reshape((b, c, h, w))?
        .to_dtype(dtype)
}

/// torchvision's `Conv2dNormActivation` as RAFT uses it: a convolution with bias and padding
/// (k−1)/2, optionally instance norm, optionally ReLU.
#[derive(Debug, Clone)]
struct ConvUnit {
    conv: Conv2d,
    instance_norm: bool,
    relu: bool,
}

impl ConvUnit {
    #[allow(clippy::too_many_arguments)]
    fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        instance_norm: bool,
        relu: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let padding = Padding::uniform((kernel - 1) / 2);
        Ok(Self {
            conv: Conv2d::new(c_in, c_out, kernel, stride, padding, true, vb)?,
            instance_norm,
            relu,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut ys = self.conv.forward(xs)?;
        if self.instance_norm {
            ys = instance_norm(&ys)?;
        }
        if self.relu {
            ys = ys.relu()?;
        }
        Ok(ys)
    }
}

/// torchvision's `BottleneckBlock`: 1×1 down to a quarter of the width, 3×3 (carrying the
/// stride), 1×1 back up, each with norm and ReLU; the shortcut is the identity, or a strided 1×1
/// convolution with norm (no ReLU) when the block downsamples; ReLU after the sum.
#[derive(Debug, Clone)]
struct BottleneckBlock {
    convs: [ConvUnit; 3],
    downsample: Option<ConvUnit>,
}

impl BottleneckBlock {
    fn new(
        c_in: usize,
        c_out: usize,
        stride: usize,
        norm: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let mid = c_out / 4;
        let convs = [
            ConvUnit::new(c_in, mid, 1, 1, norm, true, vb.pp("convnormrelu1.0"))?,
            ConvUnit::new(mid, mid, 3, stride, norm, true, vb.pp("convnormrelu2.0"))?,
            ConvUnit::new(mid, c_out, 1, 1, norm, true, vb.pp("convnormrelu3.0"))?,
        ];
        let downsample = if stride == 1 {
            None
        } else {
            Some(ConvUnit::new(
                c_in,
                c_out,
                1,
                stride,
                norm,
                false,
                vb.pp("downsample.0"),
            )?)
        };
        Ok(Self { convs, downsample })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut ys = xs.clone();
        for conv in &self.convs {
            ys = conv.forward(&ys)?;
        }
        let shortcut = match &self.downsample {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        (shortcut + ys)?.relu()
    }
}

/// torchvision's `FeatureEncoder` with bottleneck blocks: the feature encoder (instance norm)
/// or the context encoder (no norm).
#[derive(Debug, Clone)]
struct Encoder {
    stem: ConvUnit,
    blocks: Vec<BottleneckBlock>,
    projection: ConvUnit,
}

impl Encoder {
    fn new(layers: &[usize; 5], norm: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let stem = ConvUnit::new(3, layers[0], 7, 2, norm, true, vb.pp("convnormrelu.0"))?;
        let mut blocks = Vec::with_capacity(6);
        let mut c_in = layers[0];
        for (stage, (&c_out, stride)) in layers[1..4].iter().zip(STAGE_STRIDES).enumerate() {
            let vb = vb.pp(format!("layer{}", stage + 1));
            blocks.push(BottleneckBlock::new(c_in, c_out, stride, norm, vb.pp("0"))?);
            blocks.push(BottleneckBlock::new(c_out, c_out, 1, norm, vb.pp("1"))?);
            c_in = c_out;
        }
        let projection = ConvUnit::new(layers[3], layers[4], 1, 1, false, false, vb.pp("conv"))?;
        Ok(Self {
            stem,
            blocks,
            projection,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut ys = self.stem.forward(xs)?;
        for block in &self.blocks {
            ys = block.forward(&ys)?;
        }
        self.projection.forward(&ys)
    }
}

/// torchvision's `MotionEncoder` with raft_small's single correlation convolution: the
/// correlation features (1×1) and the current flow (7×7, 3×3) encoded separately, concatenated,
/// mixed by a 3×3 convolution, and the raw flow appended. All convolutions with ReLU.
#[derive(Debug, Clone)]
struct MotionEncoder {
    corr: ConvUnit,
    flow: [ConvUnit; 2],
    mix: ConvUnit,
}

impl MotionEncoder {
    fn new(config: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let [flow0, flow1] = config.motion_flow_channels;
        let corr_out = config.motion_corr_channels;
        Ok(Self {
            corr: ConvUnit::new(
                config.corr_channels(),
                corr_out,
                1,
                1,
                false,
                true,
                vb.pp("convcorr1.0"),
            )?,
            flow: [
                ConvUnit::new(2, flow0, 7, 1, false, true, vb.pp("convflow1.0"))?,
                ConvUnit::new(flow0, flow1, 3, 1, false, true, vb.pp("convflow2.0"))?,
            ],
            mix: ConvUnit::new(
                corr_out + flow1,
                config.motion_out_channels - 2,
                3,
                1,
                false,
                true,
                vb.pp("conv.0"),
            )?,
        })
    }

    fn forward(&self, flow: &Tensor, corr: &Tensor) -> candle_core::Result<Tensor> {
        let corr = self.corr.forward(corr)?;
        let flow_features = self.flow[1].forward(&self.flow[0].forward(flow)?)?;
        let mixed = self
            .mix
            .forward(&Tensor::cat(&[&corr, &flow_features], 1)?)?;
        Tensor::cat(&[&mixed, flow], 1)
    }
}

/// torchvision's `ConvGRU`: update gate z and reset gate r from [h, x]; candidate
/// q = tanh(conv([r·h, x])); new state (1−z)·h + z·q.
#[derive(Debug, Clone)]
struct ConvGru {
    convz: Conv2d,
    convr: Conv2d,
    convq: Conv2d,
}

impl ConvGru {
    fn new(
        input: usize,
        hidden: usize,
        kernel: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let conv = |name: &str| {
            let padding = Padding::uniform(kernel / 2);
            Conv2d::new(
                hidden + input,
                hidden,
                kernel,
                1,
                padding,
                true,
                vb.pp(name),
            )
        };
        Ok(Self {
            convz: conv("convz")?,
            convr: conv("convr")?,
            convq: conv("convq")?,
        })
    }

    fn forward(&self, h: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        let hx = Tensor::cat(&[h, x], 1)?;
        let z = candle_nn::ops::sigmoid(&self.convz.forward(&hx)?)?;
        let r = candle_nn::ops::sigmoid(&self.convr.forward(&hx)?)?;
        let rh = (r * h)?;
        let q = self.convq.forward(&Tensor::cat(&[&rh, x], 1)?)?.tanh()?;
        (z.affine(-1.0, 1.0)? * h)? + (z * q)?
    }
}

/// torchvision's `UpdateBlock` for raft_small: motion encoder, one GRU over
/// [context, motion features], flow head conv3×3 → ReLU → conv3×3 to the 2-channel flow change.
#[derive(Debug, Clone)]
struct UpdateBlock {
    motion_encoder: MotionEncoder,
    gru: ConvGru,
    flow_head: [Conv2d; 2],
}

impl UpdateBlock {
    fn new(config: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let hidden = config.hidden_state_size;
        let gru_input = config.motion_out_channels + config.context_channels();
        let head = vb.pp("flow_head");
        let head_hidden = config.flow_head_hidden_size;
        Ok(Self {
            motion_encoder: MotionEncoder::new(config, vb.pp("motion_encoder"))?,
            gru: ConvGru::new(
                gru_input,
                hidden,
                config.gru_kernel_size,
                vb.pp("recurrent_block").pp("convgru1"),
            )?,
            flow_head: [
                Conv2d::new(
                    hidden,
                    head_hidden,
                    3,
                    1,
                    Padding::uniform(1),
                    true,
                    head.pp("conv1"),
                )?,
                Conv2d::new(
                    head_hidden,
                    2,
                    3,
                    1,
                    Padding::uniform(1),
                    true,
                    head.pp("conv2"),
                )?,
            ],
        })
    }

    /// The new hidden state and the flow change.
    fn forward(
        &self,
        hidden: &Tensor,
        context: &Tensor,
        corr: &Tensor,
        flow: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let motion = self.motion_encoder.forward(flow, corr)?;
        let x = Tensor::cat(&[context, &motion], 1)?;
        let hidden = self.gru.forward(hidden, &x)?;
        let delta = self.flow_head[1].forward(&self.flow_head[0].forward(&hidden)?.relu()?)?;
        Ok((hidden, delta))
    }
}

/// The correlation pyramid of one image pair, in f32. Level l holds, for each of the N = B·h·w
/// pixels of image 1, its correlation with image 2 pooled l times: a row of `h_l·w_l` values.
struct CorrPyramid {
    /// `([N, h_l·w_l], h_l, w_l)` per level.
    levels: Vec<(Tensor, usize, usize)>,
    radius: usize,
}

impl CorrPyramid {
    fn new(
        fmap1: &Tensor,
        fmap2: &Tensor,
        num_levels: usize,
        radius: usize,
    ) -> candle_core::Result<Self> {
        let (b, c, h, w) = fmap1.dims4()?;
        let n = b * h * w;
        // Indices into a level are computed in f32, exact below 2^24.
        if h * w > 1 << 24 {
            candle_core::bail!(
                "RAFT: a {h}×{w} feature map is too large for the correlation lookup"
            );
        }
        let f1 = fmap1
            .to_dtype(DType::F32)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let f2 = fmap2
            .to_dtype(DType::F32)?
            .reshape((b, c, h * w))?
            .contiguous()?;
        let corr = (f1.matmul(&f2)? / (c as f64).sqrt())?;
        let mut volume = corr.reshape((n, 1, h, w))?;
        let mut levels = vec![(volume.reshape((n, h * w))?, h, w)];
        for _ in 1..num_levels {
            volume = volume.avg_pool2d(2)?;
            let (_, _, hl, wl) = volume.dims4()?;
            levels.push((volume.reshape((n, hl * wl))?, hl, wl));
        }
        Ok(Self { levels, radius })
    }

    /// The correlation features `[B, levels·(2r+1)², h, w]` around `coords` (`[B, 2, h, w]`,
    /// x then y, in level-0 pixels).
    ///
    /// Every window point is the centre plus an integer offset, so all points of one pixel's
    /// window share the centre's fractional part: the (2r+2)² integer positions around it are
    /// gathered once, positions outside the level set to zero, and the (2r+1)² bilinear samples
    /// formed from four shifted sub-windows with the shared weights. Within a level the channel
    /// index is `ix·(2r+1) + iy` (x offset major), as torchvision's window grid orders them.
    fn lookup(&self, coords: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, h, w) = coords.dims4()?;
        let n = b * h * w;
        let side = 2 * self.radius + 1;
        let span = side + 1;
        let device = coords.device();
        let offsets: Vec<f32> = (0..span).map(|i| i as f32 - self.radius as f32).collect();
        let offsets = Tensor::from_vec(offsets, (1, span), device)?;
        let centres = coords.permute((0, 2, 3, 1))?.reshape((n, 2))?;
        let mut features = Vec::with_capacity(self.levels.len());
        for (level, (volume, hl, wl)) in self.levels.iter().enumerate() {
            let centres = (&centres * (0.5f64).powi(level as i32))?;
            let (x, y) = (centres.narrow(1, 0, 1)?, centres.narrow(1, 1, 1)?);
            let (x0, y0) = (x.floor()?, y.floor()?);
            let (fx, fy) = ((x - &x0)?, (y - &y0)?);
            // Integer positions of the span×span block, and which of them lie inside the level.
            let xs = x0.broadcast_add(&offsets)?;
            let ys = y0.broadcast_add(&offsets)?;
            let inside = |v: &Tensor, size: usize| -> candle_core::Result<Tensor> {
                v.ge(0f64)?.to_dtype(DType::F32)? * v.le((size - 1) as f64)?.to_dtype(DType::F32)?
            };
            let (inside_x, inside_y) = (inside(&xs, *wl)?, inside(&ys, *hl)?);
            let xs = xs.clamp(0f32, (wl - 1) as f32)?;
            let ys = ys.clamp(0f32, (hl - 1) as f32)?;
            let index = (ys * *wl as f64)?
                .reshape((n, span, 1))?
                .broadcast_add(&xs.reshape((n, 1, span))?)?
                .to_dtype(DType::U32)?
                .reshape((n, span * span))?;
            let block = volume
                .gather(&index, 1)?
                .reshape((n, span, span))?
                .broadcast_mul(&inside_y.reshape((n, span, 1))?)?
                .broadcast_mul(&inside_x.reshape((n, 1, span))?)?;
            // Blend rows (y), then columns (x), weights (1 − f, f) as grid_sample does.
            let fy = fy.reshape((n, 1, 1))?;
            let fx = fx.reshape((n, 1, 1))?;
            let rows = (block
                .narrow(1, 0, side)?
                .broadcast_mul(&fy.affine(-1.0, 1.0)?)?
                + block.narrow(1, 1, side)?.broadcast_mul(&fy)?)?;
            let samples = (rows
                .narrow(2, 0, side)?
                .broadcast_mul(&fx.affine(-1.0, 1.0)?)?
                + rows.narrow(2, 1, side)?.broadcast_mul(&fx)?)?;
            // [n, y offset, x offset] → x offset major.
            features.push(samples.transpose(1, 2)?.reshape((n, side * side))?);
        }
        let channels = features.len() * side * side;
        Tensor::cat(&features, 1)?
            .reshape((b, h, w, channels))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

/// torchvision's `RAFT` in the raft_small layout (see the module documentation).
#[derive(Debug, Clone)]
pub struct Raft {
    feature_encoder: Encoder,
    context_encoder: Encoder,
    update_block: UpdateBlock,
    corr_levels: usize,
    corr_radius: usize,
    hidden_state_size: usize,
    dtype: DType,
}

impl Raft {
    /// Builds the network from tensors named as torchvision's state dict; the convolutions run
    /// in `vb`'s dtype.
    pub fn new(config: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        config.validate()?;
        Ok(Self {
            feature_encoder: Encoder::new(
                &config.feature_encoder_layers,
                true,
                vb.pp("feature_encoder"),
            )?,
            context_encoder: Encoder::new(
                &config.context_encoder_layers,
                false,
                vb.pp("context_encoder"),
            )?,
            update_block: UpdateBlock::new(config, vb.pp("update_block"))?,
            corr_levels: config.corr_levels,
            corr_radius: config.corr_radius,
            hidden_state_size: config.hidden_state_size,
            dtype: vb.dtype(),
        })
    }

    /// Optical flow from `image1` to `image2` (`[B, 3, H, W]`, RGB in [−1, 1], i.e. torchvision's
    /// `OpticalFlow` preset `(x/255 − 0.5)/0.5`; H and W multiples of 8 and at least
    /// 8·2^levels, 128 for raft_small, as torchvision requires). Returns every iteration's
    /// flow, `num_flow_updates` tensors `[B, 2, H, W]` in f32 (x then y displacement, in
    /// pixels), as torchvision returns its list.
    ///
    /// Which element to use is the caller's decision. Daydream's TensorRT export names only the
    /// first output `flow`, so its preprocessor most likely uses the flow after **one** update,
    /// not the last (docs/PREPROCESSORS.md, temporal_net_tensorrt; inferred, not verified). The
    /// iterations only depend on earlier ones, so `forward(a, b, 1)[0]` equals
    /// `forward(a, b, 12)[0]` at a twelfth of the update cost.
    pub fn forward(
        &self,
        image1: &Tensor,
        image2: &Tensor,
        num_flow_updates: usize,
    ) -> candle_core::Result<Vec<Tensor>> {
        let (b, c, h, w) = image1.dims4()?;
        if image2.dims() != image1.dims() {
            candle_core::bail!(
                "RAFT: the images differ in shape: {:?} and {:?}",
                image1.dims(),
                image2.dims()
            );
        }
        if c != 3 {
            candle_core::bail!("RAFT: images must have 3 channels, got {c}");
        }
        if !h.is_multiple_of(DOWNSAMPLING) || !w.is_multiple_of(DOWNSAMPLING) {
            candle_core::bail!("RAFT: image height and width must be multiples of 8, got {h}×{w}");
        }
        // The coarsest pyramid level must keep at least 2 pixels a side (torchvision's check;
        // with fewer, the lookup's coordinate normalisation divides by zero).
        let min_side = DOWNSAMPLING * 2 * (1 << (self.corr_levels - 1));
        if h < min_side || w < min_side {
            candle_core::bail!("RAFT: images must be at least {min_side}×{min_side}, got {h}×{w}");
        }
        let (h8, w8) = (h / DOWNSAMPLING, w / DOWNSAMPLING);

        let images = Tensor::cat(&[image1, image2], 0)?.to_dtype(self.dtype)?;
        let fmaps = self.feature_encoder.forward(&images)?;
        let pyramid = CorrPyramid::new(
            &fmaps.narrow(0, 0, b)?,
            &fmaps.narrow(0, b, b)?,
            self.corr_levels,
            self.corr_radius,
        )?;

        let context_out = self
            .context_encoder
            .forward(&image1.to_dtype(self.dtype)?)?;
        let hidden_size = self.hidden_state_size;
        let context_size = context_out.dim(1)? - hidden_size;
        let mut hidden = context_out.narrow(1, 0, hidden_size)?.tanh()?;
        let context = context_out.narrow(1, hidden_size, context_size)?.relu()?;

        // Each pixel's own coordinates (x, y) at 1/8 size; coords1 tracks its match in image 2.
        let device = image1.device();
        let xs = Tensor::arange(0f32, w8 as f32, device)?.reshape((1, 1, 1, w8))?;
        let ys = Tensor::arange(0f32, h8 as f32, device)?.reshape((1, 1, h8, 1))?;
        let coords0 = Tensor::cat(
            &[
                xs.broadcast_as((b, 1, h8, w8))?,
                ys.broadcast_as((b, 1, h8, w8))?,
            ],
            1,
        )?;
        let mut coords1 = coords0.clone();

        let mut flows = Vec::with_capacity(num_flow_updates);
        for _ in 0..num_flow_updates {
            let corr = pyramid.lookup(&coords1)?.to_dtype(self.dtype)?;
            let flow = (&coords1 - &coords0)?.to_dtype(self.dtype)?;
            let (new_hidden, delta) = self.update_block.forward(&hidden, &context, &corr, &flow)?;
            hidden = new_hidden;
            coords1 = (coords1 + delta.to_dtype(DType::F32)?)?;
            let flow = (&coords1 - &coords0)?;
            let upsampled = flow.upsample_bilinear2d(h, w, true)?;
            flows.push(upsampled.affine(DOWNSAMPLING as f64, 0.0)?);
        }
        Ok(flows)
    }
}
