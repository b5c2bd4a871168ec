//! OpenPose's hand and face keypoint networks as controlnet_aux 0.0.10 runs them
//! (`open_pose/model.py`, `handpose_model`, weights `hand_pose_model.pth`; `open_pose/face.py`,
//! `FaceNet`, weights `facenet.pth`; both in `lllyasviel/Annotators`). The two are one
//! structure, a single-branch convolutional pose machine, with different widths:
//!
//! * Trunk: `conv1_1` … `conv5_2` (VGG-19's first convolutions: two, two, four, four and two
//!   3×3 convolutions, 2×2 stride-2 max-pools after `conv1_2`, `conv2_2` and `conv3_4`) and
//!   `conv5_3_CPM`: features `F` at 1/8 of the input size.
//! * Stage 1: `conv6_1_CPM` (1×1, widening) and `conv6_2_CPM` (1×1): the keypoint heatmaps
//!   (hand: 21 parts and the background, 22 channels; face: 70 landmarks and the background, 71).
//! * Stages 2–6: each reads [heatmaps, `F`] and refines them with five 7×7 convolutions, a 1×1
//!   and a 1×1 output convolution (`Mconv{1..7}_stage{s}`).
//!
//! Every convolution is followed by a ReLU except the heatmap outputs (`conv6_2_CPM`,
//! `Mconv7_stage*`). The caller feeds BGR levels as `x / 256 − 0.5` and reads the last stage.
//!
//! Tensor names are the files': `facenet.pth` is `FaceNet`'s own state dict, and
//! controlnet_aux's `util.transfer` maps `handpose_model`'s module paths onto the hand file by
//! dropping their first component (`model1_0.conv1_1.weight` is stored as `conv1_1.weight`), so
//! both files name the layers alike. The widths and the number of stages are read from the shapes.

use std::collections::HashMap;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::conv::{Conv2d, Padding};
use crate::{Error, Result};

/// The trunk's convolutions in order; a max-pool follows the ones marked `true`.
const TRUNK_LAYERS: [(&str, bool); 15] = [
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
    ("conv4_3", false),
    ("conv4_4", false),
    ("conv5_1", false),
    ("conv5_2", false),
    ("conv5_3_CPM", false),
];
/// Widest layer and most refinement stages accepted (the real networks: 512 and 5).
const MAX_CHANNELS: usize = 4096;
const MAX_REFINEMENT_STAGES: usize = 16;

/// Widths and depth of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Image channels in (3: BGR).
    pub in_channels: usize,
    /// Output channels of the trunk's convolutions, in [`TRUNK_LAYERS`] order; the last is the
    /// width of the features every stage reads.
    pub trunk_channels: [usize; 15],
    /// Width of stage 1's widening (`conv6_1_CPM`).
    pub stage1_hidden_channels: usize,
    /// Width of the refinement stages' `Mconv1` … `Mconv6`.
    pub refinement_channels: usize,
    /// Refinement stages after stage 1.
    pub refinement_stages: usize,
    /// Heatmap channels (hand 22, face 71).
    pub heatmap_channels: usize,
}

impl Config {
    /// `hand_pose_model.pth`'s network (`heatmaps` 22) or `facenet.pth`'s (71).
    pub fn published(heatmap_channels: usize) -> Self {
        Self {
            in_channels: 3,
            trunk_channels: [
                64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 128,
            ],
            stage1_hidden_channels: 512,
            refinement_channels: 128,
            refinement_stages: 5,
            heatmap_channels,
        }
    }

    /// Reads the widths from a state dict's shapes; the tensors' exact shapes are checked when
    /// the network is built.
    pub fn from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<Self> {
        let bad = |detail: String| Error::UnsupportedConfig {
            model: "OpenPose hand/face network".into(),
            option: "weights".into(),
            detail,
        };
        let width = |name: &str| -> Result<usize> {
            let key = format!("{name}.weight");
            match shapes.get(&key) {
                Some(s) if s.len() == 4 && (1..=MAX_CHANNELS).contains(&s[0]) => Ok(s[0]),
                Some(s) => Err(bad(format!(
                    "tensor `{key}` has shape {s:?}: a convolution weight with 1 to \
                     {MAX_CHANNELS} output channels expected"
                ))),
                None => Err(bad(format!(
                    "no tensor `{key}`: not an OpenPose hand or face network"
                ))),
            }
        };
        let mut trunk_channels = [0; 15];
        for (c, (name, _)) in trunk_channels.iter_mut().zip(TRUNK_LAYERS) {
            *c = width(name)?;
        }
        let mut refinement_stages = 0;
        while shapes.contains_key(&format!("Mconv1_stage{}.weight", refinement_stages + 2)) {
            refinement_stages += 1;
            if refinement_stages > MAX_REFINEMENT_STAGES {
                return Err(bad(format!(
                    "more than {MAX_REFINEMENT_STAGES} refinement stages"
                )));
            }
        }
        Ok(Self {
            in_channels: shapes["conv1_1.weight"][1],
            trunk_channels,
            stage1_hidden_channels: width("conv6_1_CPM")?,
            refinement_channels: if refinement_stages > 0 {
                width("Mconv1_stage2")?
            } else {
                0
            },
            refinement_stages,
            heatmap_channels: width("conv6_2_CPM")?,
        })
    }
}

/// A chain of convolutions with bias and size-keeping zero padding, each followed by a ReLU but
/// the last.
#[derive(Debug, Clone)]
struct Chain {
    convs: Vec<Conv2d>,
}

impl Chain {
    /// `layers`: (name, output channels, kernel) in order, from `c_in` channels.
    fn new(layers: &[(String, usize, usize)], c_in: usize, vb: &VarBuilder) -> Result<Self> {
        let mut c = c_in;
        let mut convs = Vec::with_capacity(layers.len());
        for (name, c_out, k) in layers {
            let pad = Padding::uniform(k / 2);
            convs.push(Conv2d::new(c, *c_out, *k, 1, pad, true, vb.pp(name))?);
            c = *c_out;
        }
        Ok(Self { convs })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut h = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            h = conv.forward(&h)?;
            if i < last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// OpenPose's hand or face keypoint network.
#[derive(Debug, Clone)]
pub struct KeypointNet {
    /// The trunk's convolutions (each followed by a ReLU) and whether a max-pool follows.
    trunk: Vec<(Conv2d, bool)>,
    /// Stage 1, then the refinement stages.
    stages: Vec<Chain>,
    dtype: DType,
    config: Config,
}

impl KeypointNet {
    /// Builds the network from `config` with weights from `vb` (names as in the files).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        let mut c = config.in_channels;
        let mut trunk = Vec::with_capacity(TRUNK_LAYERS.len());
        for ((name, pool), &c_out) in TRUNK_LAYERS.iter().zip(&config.trunk_channels) {
            let conv = Conv2d::new(c, c_out, 3, 1, Padding::uniform(1), true, vb.pp(name))?;
            trunk.push((conv, *pool));
            c = c_out;
        }
        let features = c;
        let k = config.heatmap_channels;
        let mut stages = vec![Chain::new(
            &[
                ("conv6_1_CPM".into(), config.stage1_hidden_channels, 1),
                ("conv6_2_CPM".into(), k, 1),
            ],
            features,
            &vb,
        )?];
        let r = config.refinement_channels;
        for s in 2..2 + config.refinement_stages {
            let mut layers: Vec<(String, usize, usize)> = (1..=5)
                .map(|i| (format!("Mconv{i}_stage{s}"), r, 7))
                .collect();
            layers.push((format!("Mconv6_stage{s}"), r, 1));
            layers.push((format!("Mconv7_stage{s}"), k, 1));
            stages.push(Chain::new(&layers, k + features, &vb)?);
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

    /// The last stage's heatmaps `[B, heatmap_channels, H/8, W/8]` of `x` `[B, in, H, W]`
    /// (each /8 three floored halvings).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut features = x.to_dtype(self.dtype)?;
        for (conv, pool) in &self.trunk {
            features = conv.forward(&features)?.relu()?;
            if *pool {
                features = features.max_pool2d(2)?;
            }
        }
        let mut heatmaps = self.stages[0].forward(&features)?;
        for stage in &self.stages[1..] {
            heatmaps = stage.forward(&Tensor::cat(&[&heatmaps, &features], 1)?)?;
        }
        Ok(heatmaps)
    }
}
