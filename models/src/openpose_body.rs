//! The OpenPose body network (CMU's 18-keypoint COCO model) as controlnet_aux 0.0.10 runs it
//! (`open_pose/model.py`, `bodypose_model`; weights `body_pose_model.pth` in
//! `lllyasviel/Annotators`).
//!
//! * Trunk: VGG-19's first ten 3×3 convolutions (`conv1_1` … `conv4_2`, 2×2 stride-2 max-pools
//!   after `conv1_2`, `conv2_2` and `conv3_4`) and two more 3×3 convolutions (`conv4_3_CPM`,
//!   `conv4_4_CPM`): features `F` at 1/8 of the input size (each pool floors an odd size, as
//!   torch does).
//! * Stage 1: two branches on `F`, each three 3×3 convolutions, a 1×1 widening and a 1×1 output
//!   convolution: `conv5_{1..5}_CPM_L1` gives the part affinity fields (38 channels: x and y of
//!   19 limbs), `conv5_{1..5}_CPM_L2` the heatmaps (19 channels: 18 parts and the background).
//! * Stages 2–6: each reads the concatenation [PAFs, heatmaps, `F`] (38 + 19 + 128 channels)
//!   and refines both with five 7×7 convolutions, a 1×1 and a 1×1 output convolution per branch
//!   (`Mconv{1..7}_stage{s}_L1` and `_L2`).
//!
//! Every convolution is followed by a ReLU except each branch's output convolution, with one
//! exception that is controlnet_aux's (and pytorch-openpose's) and that this port keeps: its
//! list of layers without a ReLU names `Mconv7_stage6_L1` twice and never `Mconv7_stage6_L2`,
//! so the final heatmaps are clamped at zero ([`Config::final_heatmap_relu`]).
//!
//! Inputs: controlnet_aux feeds the BGR image bytes as `x / 256 − 0.5` (float32) at 368/H of
//! the image size, padded with 128 at the bottom and right to a multiple of 8; that belongs to
//! the caller. The outputs are the raw maps at 1/8 of the input size; the caller resizes them
//! back to the image and decodes people (sdstream's `preprocess::openpose`).
//!
//! The checkpoint has no config: [`Config::from_tensor_shapes`] reads every width, the number of
//! refinement stages and the output channel counts from the state dict, so the real file and
//! narrower stand-ins load alike. Tensor names are the file's: controlnet_aux's `util.transfer`
//! drops the first component of its module paths (`model0.conv1_1.weight` is stored as
//! `conv1_1.weight`, `model6_2.Mconv7_stage6_L2.bias` as `Mconv7_stage6_L2.bias`).

use std::collections::HashMap;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::conv::{Conv2d, Padding};

/// The trunk's convolutions in order; a max-pool follows the ones marked `true`.
const TRUNK_LAYERS: [(&str, bool); 12] = [
    ("conv1_1", false),
    ("conv1_2", true),
    ("conv2_1", false),
    ("conv2_2", true),
    ("conv3_1", false),
    ("conv3_2", false),
    ("conv3_3", false),
    ("conv3_4", true),
    ("conv4_1", false),
    ("conv4_2", false),
    ("conv4_3_CPM", false),
    ("conv4_4_CPM", false),
];

/// Widest layer and most refinement stages a state dict may describe (sanity bounds against a
/// corrupt file; the real network has 512 and 5).
const MAX_CHANNELS: usize = 4096;
const MAX_REFINEMENT_STAGES: usize = 16;

/// Widths and depth of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Image channels in (3: BGR).
    pub in_channels: usize,
    /// Output channels of the trunk's twelve 3×3 convolutions, in the order `conv1_1`,
    /// `conv1_2`, `conv2_1`, `conv2_2`, `conv3_1` … `conv3_4`, `conv4_1`, `conv4_2`,
    /// `conv4_3_CPM`, `conv4_4_CPM`; the last is the width of the features every stage reads.
    pub trunk_channels: [usize; 12],
    /// Width of stage 1's three 3×3 convolutions (`conv5_{1,2,3}_CPM_L*`).
    pub stage1_channels: usize,
    /// Width of stage 1's 1×1 widening (`conv5_4_CPM_L*`).
    pub stage1_hidden_channels: usize,
    /// Width of the refinement stages' `Mconv1` … `Mconv6` (0 when there are none).
    pub refinement_channels: usize,
    /// Refinement stages after stage 1 (stages 2 … 1 + this).
    pub refinement_stages: usize,
    /// Part affinity field channels (the `L1` branches' output).
    pub paf_channels: usize,
    /// Heatmap channels (the `L2` branches' output).
    pub heatmap_channels: usize,
    /// Whether the last heatmap convolution is followed by a ReLU, as in controlnet_aux (module
    /// docs). Not stored in the weights; `true` by default and from [`Config::from_tensor_shapes`].
    pub final_heatmap_relu: bool,
}

impl Default for Config {
    /// `body_pose_model.pth`'s network.
    fn default() -> Self {
        Self {
            in_channels: 3,
            trunk_channels: [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 256, 128],
            stage1_channels: 128,
            stage1_hidden_channels: 512,
            refinement_channels: 128,
            refinement_stages: 5,
            paf_channels: 38,
            heatmap_channels: 19,
            final_heatmap_relu: true,
        }
    }
}

/// The two branches of a stage: part affinity fields and heatmaps.
const BRANCHES: [&str; 2] = ["L1", "L2"];

/// One convolution of the structure: its tensor prefix, (out, in, kernel).
struct ConvSpec {
    name: String,
    c_out: usize,
    c_in: usize,
    kernel: usize,
}

impl ConvSpec {
    fn new(name: String, c_out: usize, c_in: usize, kernel: usize) -> Self {
        Self {
            name,
            c_out,
            c_in,
            kernel,
        }
    }
}

/// The convolutions of one branch of stage `stage` (1 …), in order.
fn branch_specs(config: &Config, stage: usize, branch: usize) -> Vec<ConvSpec> {
    let suffix = BRANCHES[branch];
    let c_out = if branch == 0 {
        config.paf_channels
    } else {
        config.heatmap_channels
    };
    let features = config.trunk_channels[11];
    if stage == 1 {
        let (w, hidden) = (config.stage1_channels, config.stage1_hidden_channels);
        let name = |i: usize| format!("conv5_{i}_CPM_{suffix}");
        vec![
            ConvSpec::new(name(1), w, features, 3),
            ConvSpec::new(name(2), w, w, 3),
            ConvSpec::new(name(3), w, w, 3),
            ConvSpec::new(name(4), hidden, w, 1),
            ConvSpec::new(name(5), c_out, hidden, 1),
        ]
    } else {
        let w = config.refinement_channels;
        let concat = config.paf_channels + config.heatmap_channels + features;
        let name = |i: usize| format!("Mconv{i}_stage{stage}_{suffix}");
        let mut specs = vec![ConvSpec::new(name(1), w, concat, 7)];
        specs.extend((2..=5).map(|i| ConvSpec::new(name(i), w, w, 7)));
        specs.push(ConvSpec::new(name(6), w, w, 1));
        specs.push(ConvSpec::new(name(7), c_out, w, 1));
        specs
    }
}

/// Every convolution of the network described by `config`, trunk first.
fn all_specs(config: &Config) -> Vec<ConvSpec> {
    let mut specs = Vec::new();
    let mut c_in = config.in_channels;
    for ((name, _), &c_out) in TRUNK_LAYERS.iter().zip(&config.trunk_channels) {
        specs.push(ConvSpec::new(name.to_string(), c_out, c_in, 3));
        c_in = c_out;
    }
    for stage in 1..=1 + config.refinement_stages {
        for branch in 0..2 {
            specs.extend(branch_specs(config, stage, branch));
        }
    }
    specs
}

impl Config {
    /// Reads the network from a state dict's tensor shapes (keys as in `body_pose_model.pth`):
    /// the trunk widths from `conv1_1.weight` … `conv4_4_CPM.weight`, stage 1's widths from
    /// `conv5_1_CPM_L1.weight` and `conv5_4_CPM_L1.weight`, the output channels from
    /// `conv5_5_CPM_L1.weight` and `conv5_5_CPM_L2.weight`, the refinement stages by counting
    /// `Mconv1_stage{2,3,…}_L1.weight` and their width from the first. Then every tensor the
    /// structure needs must be there with its exact shape (weights `[out, in, k, k]`, biases
    /// `[out]`), and nothing else may be: an error names the offending tensor.
    pub fn from_tensor_shapes(shapes: &HashMap<String, Vec<usize>>) -> candle_core::Result<Self> {
        let shape = |name: &str| -> candle_core::Result<&[usize]> {
            match shapes.get(name) {
                Some(s) if s.len() == 4 => Ok(s),
                Some(s) => candle_core::bail!(
                    "OpenPose body weights: tensor `{name}` has shape {s:?}, expected a 4-D \
                     convolution weight"
                ),
                None => candle_core::bail!("OpenPose body weights: no tensor `{name}`"),
            }
        };
        let width = |name: &str| -> candle_core::Result<usize> {
            let c = shape(name)?[0];
            if c == 0 || c > MAX_CHANNELS {
                candle_core::bail!(
                    "OpenPose body weights: tensor `{name}` has {c} output channels (1 to \
                     {MAX_CHANNELS} supported)"
                );
            }
            Ok(c)
        };
        let mut trunk_channels = [0; 12];
        for (c, (name, _)) in trunk_channels.iter_mut().zip(TRUNK_LAYERS) {
            *c = width(&format!("{name}.weight"))?;
        }
        let in_channels = shape("conv1_1.weight")?[1];
        let mut refinement_stages = 0;
        while shapes.contains_key(&format!("Mconv1_stage{}_L1.weight", refinement_stages + 2)) {
            refinement_stages += 1;
            if refinement_stages > MAX_REFINEMENT_STAGES {
                candle_core::bail!(
                    "OpenPose body weights: more than {MAX_REFINEMENT_STAGES} refinement stages"
                );
            }
        }
        let config = Self {
            in_channels,
            trunk_channels,
            stage1_channels: width("conv5_1_CPM_L1.weight")?,
            stage1_hidden_channels: width("conv5_4_CPM_L1.weight")?,
            refinement_channels: if refinement_stages > 0 {
                width("Mconv1_stage2_L1.weight")?
            } else {
                0
            },
            refinement_stages,
            paf_channels: width("conv5_5_CPM_L1.weight")?,
            heatmap_channels: width("conv5_5_CPM_L2.weight")?,
            final_heatmap_relu: true,
        };
        let specs = all_specs(&config);
        let mut expected: HashMap<String, Vec<usize>> = HashMap::with_capacity(2 * specs.len());
        for spec in &specs {
            expected.insert(
                format!("{}.weight", spec.name),
                vec![spec.c_out, spec.c_in, spec.kernel, spec.kernel],
            );
            expected.insert(format!("{}.bias", spec.name), vec![spec.c_out]);
        }
        // In the structure's order, so that the first misfit named is the earliest one.
        for spec in &specs {
            for key in [
                format!("{}.weight", spec.name),
                format!("{}.bias", spec.name),
            ] {
                let want = &expected[&key];
                match shapes.get(&key) {
                    None => candle_core::bail!("OpenPose body weights: no tensor `{key}`"),
                    Some(got) if got != want => candle_core::bail!(
                        "OpenPose body weights: tensor `{key}` has shape {got:?}, expected \
                         {want:?} for this structure"
                    ),
                    Some(_) => {}
                }
            }
        }
        let mut extra: Vec<&String> = shapes
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .collect();
        extra.sort();
        if let Some(key) = extra.first() {
            candle_core::bail!(
                "OpenPose body weights: tensor `{key}` is not part of the body network \
                 ({refinement_stages} refinement stages found)"
            );
        }
        Ok(config)
    }
}

/// The convolution `spec` describes, with bias and zero padding k/2 (the size is kept), weights
/// under `spec.name`.
fn conv(spec: &ConvSpec, vb: &VarBuilder) -> candle_core::Result<Conv2d> {
    Conv2d::new(
        spec.c_in,
        spec.c_out,
        spec.kernel,
        1,
        Padding::uniform(spec.kernel / 2),
        true,
        vb.pp(&spec.name),
    )
}

/// A chain of convolutions, each followed by a ReLU except the last unless `relu_last`.
#[derive(Debug, Clone)]
struct Branch {
    convs: Vec<Conv2d>,
    relu_last: bool,
}

impl Branch {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut h = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            h = conv.forward(&h)?;
            if i < last || self.relu_last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// One stage: the part affinity field branch and the heatmap branch.
#[derive(Debug, Clone)]
struct Stage {
    pafs: Branch,
    heatmaps: Branch,
}

/// controlnet_aux's `bodypose_model`.
#[derive(Debug, Clone)]
pub struct BodyPoseNet {
    /// The trunk's convolutions (each followed by a ReLU) and whether a max-pool follows.
    trunk: Vec<(Conv2d, bool)>,
    /// Stage 1, then the refinement stages.
    stages: Vec<Stage>,
    dtype: DType,
    config: Config,
}

impl BodyPoseNet {
    /// Builds the network from `config` with weights from `vb` (rooted at the file's top level,
    /// tensor names as in `body_pose_model.pth`).
    pub fn new(config: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let zero = config.in_channels == 0
            || config.trunk_channels.contains(&0)
            || config.stage1_channels == 0
            || config.stage1_hidden_channels == 0
            || (config.refinement_stages > 0 && config.refinement_channels == 0)
            || config.paf_channels == 0
            || config.heatmap_channels == 0;
        if zero {
            candle_core::bail!("OpenPose body config: every width must be at least 1: {config:?}");
        }
        let specs = all_specs(config);
        let (trunk_specs, stage_specs) = specs.split_at(TRUNK_LAYERS.len());
        let trunk = trunk_specs
            .iter()
            .zip(TRUNK_LAYERS)
            .map(|(spec, (_, pool))| Ok((conv(spec, &vb)?, pool)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let last_stage = config.refinement_stages + 1;
        let mut stages = Vec::with_capacity(last_stage);
        let mut rest = stage_specs;
        for stage in 1..=last_stage {
            let mut branches = Vec::with_capacity(2);
            for branch in 0..2 {
                let count = branch_specs(config, stage, branch).len();
                let (mine, after) = rest.split_at(count);
                rest = after;
                branches.push(Branch {
                    convs: mine
                        .iter()
                        .map(|spec| conv(spec, &vb))
                        .collect::<candle_core::Result<Vec<_>>>()?,
                    relu_last: branch == 1 && stage == last_stage && config.final_heatmap_relu,
                });
            }
            let heatmaps = branches.pop().expect("two branches");
            let pafs = branches.pop().expect("two branches");
            stages.push(Stage { pafs, heatmaps });
        }
        Ok(Self {
            trunk,
            stages,
            dtype: vb.dtype(),
            config: config.clone(),
        })
    }

    /// The network's widths and depth.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// (part affinity fields `[B, paf_channels, H/8, W/8]`, heatmaps
    /// `[B, heatmap_channels, H/8, W/8]`) of `x` `[B, in_channels, H, W]` (converted to the
    /// weights' dtype), the last stage's outputs; each /8 is three floored halvings.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut features = x.to_dtype(self.dtype)?;
        for (conv, pool) in &self.trunk {
            features = conv.forward(&features)?.relu()?;
            if *pool {
                features = features.max_pool2d(2)?;
            }
        }
        let mut pafs = self.stages[0].pafs.forward(&features)?;
        let mut heatmaps = self.stages[0].heatmaps.forward(&features)?;
        for stage in &self.stages[1..] {
            let input = Tensor::cat(&[&pafs, &heatmaps, &features], 1)?;
            pafs = stage.pafs.forward(&input)?;
            heatmaps = stage.heatmaps.forward(&input)?;
        }
        Ok((pafs, heatmaps))
    }
}
