//! The DINOv2 vision transformer as transformers' `Dinov2Backbone` computes it: the backbone of
//! Depth Anything (the `backbone.*` tensors of a `DepthAnythingForDepthEstimation` checkpoint).
//!
//! * Embeddings: a `patch_size`×`patch_size` convolution with the same stride turns each patch
//!   into a token; a learned CLS token goes in front; learned position embeddings are added. They
//!   were learned for the config's `image_size` (518 / 14 = a 37×37 grid for every released
//!   DINOv2); another patch grid gets them resampled bicubically ([`bicubic_matrix`]).
//! * `num_hidden_layers` pre-norm blocks: `x + λ₁ ⊙ attention(LN₁(x))`, then
//!   `x + λ₂ ⊙ mlp(LN₂(x))`, where λ are the per-channel layer scales, the attention is plain
//!   multi-head softmax attention with separate query/key/value projections and scale
//!   `1/√head_dim`, and the MLP is `fc2(gelu(fc1(x)))` with the exact (erf) GELU. LayerNorm eps is
//!   the config's `layer_norm_eps` (1e-6 for DINOv2).
//! * Output: the hidden states of the stages named by `out_features` / `out_indices` (stage 0 is
//!   the embeddings, stage i the output of block i), each through the final `layernorm` when
//!   `apply_layernorm` is set; as tokens `[B, 1 + h·w, D]` (CLS first), or with
//!   `reshape_hidden_states` as maps `[B, D, h, w]` without the CLS token. Blocks after the last
//!   requested stage do not change the output and are not run.
//!
//! Tensor names are transformers' (relative to the backbone's prefix): `embeddings.cls_token`,
//! `embeddings.position_embeddings`, `embeddings.patch_embeddings.projection`,
//! `encoder.layer.N.{norm1, attention.attention.{query,key,value}, attention.output.dense,
//! layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2, layer_scale2.lambda1}`, `layernorm`.
//! `embeddings.mask_token` (masked-image pretraining only) is not read.

use std::sync::Mutex;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::kernels::conv::{Conv2d, Padding};

/// A size given as one number or as `[height, width]` (transformers accepts both for
/// `image_size` and `patch_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Extent {
    /// The same size in both directions.
    Square(usize),
    /// `[height, width]`.
    Pair([usize; 2]),
}

impl Extent {
    /// The side length when both directions agree.
    pub fn square(self) -> Option<usize> {
        match self {
            Extent::Square(n) => Some(n),
            Extent::Pair([h, w]) if h == w => Some(h),
            Extent::Pair(_) => None,
        }
    }
}

/// A `Dinov2Config` (`backbone_config` of a Depth Anything `config.json`); missing keys take
/// transformers' `Dinov2Config` defaults (those of facebook/dinov2-base). Keys that only matter
/// for training (dropouts, drop path, `layerscale_value`, `initializer_range`, `use_mask_token`)
/// are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Must be `dinov2` (registers and other ViTs are different networks).
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Width of the tokens.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Transformer blocks.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads (`hidden_size / num_attention_heads` channels each).
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// MLP width as a multiple of `hidden_size` (truncated to an integer width, as Python's `int`).
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// MLP activation; only `gelu` (exact, erf-based) is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Epsilon of every LayerNorm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Image size the position embeddings were learned for (square).
    #[serde(default = "default_image_size")]
    pub image_size: Extent,
    /// Patch size (square): the embedding convolution's kernel and stride.
    #[serde(default = "default_patch_size")]
    pub patch_size: Extent,
    /// Image channels.
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    /// Whether the query/key/value projections have biases.
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    /// SwiGLU MLP (ViT-g only); not supported.
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    /// Output stages by name (`stem`, `stage1` … `stageN`).
    #[serde(default)]
    pub out_features: Option<Vec<String>>,
    /// Output stages by index (0 = `stem`; negative counts from the end, as in Python).
    #[serde(default)]
    pub out_indices: Option<Vec<i64>>,
    /// Pass each output through the final `layernorm`.
    #[serde(default = "yes")]
    pub apply_layernorm: bool,
    /// Return `[B, D, h, w]` maps without the CLS token instead of tokens.
    #[serde(default = "yes")]
    pub reshape_hidden_states: bool,
}

fn default_model_type() -> String {
    "dinov2".into()
}
fn default_hidden_size() -> usize {
    768
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-6
}
fn default_image_size() -> Extent {
    Extent::Square(224)
}
fn default_patch_size() -> Extent {
    Extent::Square(14)
}
fn default_num_channels() -> usize {
    3
}
fn yes() -> bool {
    true
}

impl Default for Config {
    /// transformers' `Dinov2Config()`.
    fn default() -> Self {
        Self {
            model_type: default_model_type(),
            hidden_size: default_hidden_size(),
            num_hidden_layers: default_layers(),
            num_attention_heads: default_heads(),
            mlp_ratio: default_mlp_ratio(),
            hidden_act: default_hidden_act(),
            layer_norm_eps: default_layer_norm_eps(),
            image_size: default_image_size(),
            patch_size: default_patch_size(),
            num_channels: default_num_channels(),
            qkv_bias: true,
            use_swiglu_ffn: false,
            out_features: None,
            out_indices: None,
            apply_layernorm: true,
            reshape_hidden_states: true,
        }
    }
}

/// An error naming the config key at fault.
pub fn config_error(key: &str, detail: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("config.json: `{key}`: {detail}"))
}

impl Config {
    /// Checks every option the graph depends on; the error names the key at fault.
    pub fn validate(&self) -> Result<()> {
        self.validate_under("")
    }

    /// [`Config::validate`] for a config nested under `prefix` (e.g. `backbone_config.`), which
    /// the error messages put in front of the key.
    pub fn validate_under(&self, prefix: &str) -> Result<()> {
        let key = |k: &str| format!("{prefix}{k}");
        if self.model_type != "dinov2" {
            return Err(config_error(
                &key("model_type"),
                format!("{:?} is not supported (only \"dinov2\")", self.model_type),
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(config_error(
                &key("hidden_act"),
                format!("{:?} is not supported (only \"gelu\")", self.hidden_act),
            ));
        }
        if self.use_swiglu_ffn {
            return Err(config_error(
                &key("use_swiglu_ffn"),
                "the SwiGLU MLP is not supported",
            ));
        }
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(config_error(
                &key("num_attention_heads"),
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_hidden_size() > 0) {
            return Err(config_error(
                &key("mlp_ratio"),
                format!("{} gives no MLP width", self.mlp_ratio),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(config_error(
                &key("layer_norm_eps"),
                format!("{} is not a positive number", self.layer_norm_eps),
            ));
        }
        if self.num_channels == 0 {
            return Err(config_error(&key("num_channels"), "must be positive"));
        }
        let patch = match self.patch_size.square() {
            Some(p) if p > 0 => p,
            _ => {
                return Err(config_error(
                    &key("patch_size"),
                    format!(
                        "{:?}: only positive square patches are supported",
                        self.patch_size
                    ),
                ));
            }
        };
        match self.image_size.square() {
            Some(s) if s >= patch => {}
            _ => {
                return Err(config_error(
                    &key("image_size"),
                    format!(
                        "{:?}: must be square and at least one patch ({patch})",
                        self.image_size
                    ),
                ));
            }
        }
        self.out_stages_under(prefix).map(|_| ())
    }

    /// The patch size (after [`Config::validate`]).
    pub fn patch(&self) -> usize {
        self.patch_size.square().unwrap_or(0)
    }

    /// Side of the patch grid the position embeddings were learned for (37 for 518 / 14).
    pub fn position_grid(&self) -> usize {
        self.image_size.square().unwrap_or(0) / self.patch().max(1)
    }

    /// Width of the MLP's hidden layer: `int(hidden_size * mlp_ratio)`.
    pub fn mlp_hidden_size(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio).floor().max(0.0) as usize
    }

    /// The output stages in increasing order (0 = embeddings, i = after block i), from
    /// `out_indices` and/or `out_features` as transformers aligns them (only the last stage
    /// when neither is set).
    pub fn out_stages(&self) -> Result<Vec<usize>> {
        self.out_stages_under("")
    }

    fn out_stages_under(&self, prefix: &str) -> Result<Vec<usize>> {
        let stages = self.num_hidden_layers + 1;
        let from_indices = match &self.out_indices {
            None => None,
            Some(indices) => {
                let key = format!("{prefix}out_indices");
                let mut out = Vec::with_capacity(indices.len());
                for &i in indices {
                    let stage = if i < 0 { i + stages as i64 } else { i };
                    if !(0..stages as i64).contains(&stage) {
                        return Err(config_error(
                            &key,
                            format!(
                                "{i} is not a stage of {stages} (stem + {} blocks)",
                                stages - 1
                            ),
                        ));
                    }
                    out.push(stage as usize);
                }
                Some(out)
            }
        };
        let from_features = match &self.out_features {
            None => None,
            Some(names) => {
                let key = format!("{prefix}out_features");
                let mut out = Vec::with_capacity(names.len());
                for name in names {
                    let stage = match name.as_str() {
                        "stem" => Some(0),
                        other => other
                            .strip_prefix("stage")
                            .and_then(|n| n.parse::<usize>().ok())
                            .filter(|&n| (1..stages).contains(&n)),
                    };
                    match stage {
                        Some(s) => out.push(s),
                        None => {
                            return Err(config_error(
                                &key,
                                format!(
                                    "{name:?} is not one of stem, stage1 … stage{}",
                                    stages - 1
                                ),
                            ));
                        }
                    }
                }
                Some(out)
            }
        };
        let (key, out) = match (from_indices, from_features) {
            (None, None) => return Ok(vec![stages - 1]),
            (Some(i), None) => ("out_indices", i),
            (None, Some(f)) => ("out_features", f),
            (Some(i), Some(f)) => {
                if i != f {
                    return Err(config_error(
                        &format!("{prefix}out_features"),
                        format!("stages {f:?} disagree with out_indices {i:?}"),
                    ));
                }
                ("out_indices", i)
            }
        };
        if out.is_empty() || out.windows(2).any(|w| w[0] >= w[1]) {
            return Err(config_error(
                &format!("{prefix}{key}"),
                format!("stages {out:?} must be non-empty, increasing and without repeats"),
            ));
        }
        Ok(out)
    }
}

/// Weights of torch's `F.interpolate(mode="bicubic", align_corners=False)` (no antialiasing,
/// output size given) along one axis, from `n_in` to `n_out` samples: a row-major
/// `[n_out, n_in]` matrix whose row `o` holds the four Keys-cubic (a = −0.75) taps around
/// source position `(o + ½)·n_in/n_out − ½`; taps outside the input are clamped onto its
/// border (so their weights add up there).
///
/// The arithmetic is torch's CPU kernel's for float32: the ratio in f32, the source position
/// in f64 and then rounded to f32, the cubic polynomials in f32 with fused multiply-adds (as
/// its compiled code evaluates them). The weights then agree with torch's to about 1e-7.
pub fn bicubic_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    const A: f32 = -0.75;
    // Keys' kernel for |x| ≤ 1 and for 1 < |x| < 2.
    let near = |x: f32| ((A + 2.0).mul_add(x, -(A + 3.0)) * x).mul_add(x, 1.0);
    let far = |x: f32| {
        let u = A.mul_add(x, -5.0 * A);
        let u = u.mul_add(x, 8.0 * A);
        u.mul_add(x, -4.0 * A)
    };
    let scale = n_in as f32 / n_out as f32;
    let mut w = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        let real = (f64::from(scale) * (o as f64 + 0.5) - 0.5) as f32;
        let i0 = (real.floor() as i64).min(n_in as i64 - 1);
        let t = (real - i0 as f32).clamp(0.0, 1.0);
        let s = (1.0 - f64::from(t)) as f32;
        let taps = [
            far((f64::from(t) + 1.0) as f32),
            near(t),
            near(s),
            far((f64::from(s) + 1.0) as f32),
        ];
        for (k, tap) in taps.into_iter().enumerate() {
            let i = (i0 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
            w[o * n_in + i] += tap;
        }
    }
    w
}

/// Patch embedding, CLS token and position embeddings.
#[derive(Debug)]
struct Embeddings {
    projection: Conv2d,
    cls_token: Tensor,
    position_embeddings: Tensor,
    /// Side of the grid the position embeddings were learned for.
    grid: usize,
    patch: usize,
    /// The first resampled position embeddings made, by patch grid, kept for the network's
    /// life (a stream keeps its size; another size is made at each call, see `positions`).
    resampled: Mutex<Option<((usize, usize), Tensor)>>,
}

impl Embeddings {
    fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, patch, grid) = (config.hidden_size, config.patch(), config.position_grid());
        let projection = Conv2d::new(
            config.num_channels,
            d,
            patch,
            patch,
            Padding::uniform(0),
            true,
            vb.pp("patch_embeddings.projection"),
        )?;
        Ok(Self {
            projection,
            cls_token: vb.get((1, 1, d), "cls_token")?,
            position_embeddings: vb.get((1, grid * grid + 1, d), "position_embeddings")?,
            grid,
            patch,
            resampled: Mutex::new(None),
        })
    }

    /// Tokens `[B, 1 + h·w, D]` for pixels `[B, C, h·patch, w·patch]`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, _, height, width) = pixel_values.dims4()?;
        let (gh, gw) = (height / self.patch, width / self.patch);
        let pixel_values = pixel_values.to_dtype(self.cls_token.dtype())?;
        let patches = self.projection.forward(&pixel_values)?;
        let tokens = patches.flatten_from(2)?.transpose(1, 2)?;
        let d = self.cls_token.dim(2)?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let tokens = Tensor::cat(&[&cls, &tokens], 1)?;
        tokens.broadcast_add(&self.positions(gh, gw)?)
    }

    /// Position embeddings `[1, 1 + gh·gw, D]` for a `gh`×`gw` patch grid: the learned ones on
    /// their own grid, else transformers' resampling: the CLS entry as is, the grid bicubically
    /// to `(gh, gw)` (`F.interpolate(size=(gh, gw), mode="bicubic", align_corners=False)`, no
    /// antialiasing, no offset added to the size) in float32, then back to the weights' dtype.
    fn positions(&self, gh: usize, gw: usize) -> Result<Tensor> {
        if (gh, gw) == (self.grid, self.grid) {
            return Ok(self.position_embeddings.clone());
        }
        let mut cache = self.resampled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((size, t)) = cache.as_ref()
            && *size == (gh, gw)
        {
            return Ok(t.clone());
        }
        let (s, d) = (self.grid, self.position_embeddings.dim(2)?);
        let dev = self.position_embeddings.device();
        let table = self.position_embeddings.to_dtype(DType::F32)?;
        let cls = table.narrow(1, 0, 1)?;
        // Rows of the learned grid as one matrix [s, s·D], so each axis is one matmul.
        let grid = table.narrow(1, 1, s * s)?.reshape((s, s * d))?;
        let wy = Tensor::from_vec(bicubic_matrix(s, gh), (gh, s), dev)?;
        let wx = Tensor::from_vec(bicubic_matrix(s, gw), (gw, s), dev)?;
        let rows = wy.matmul(&grid)?.reshape((gh, s, d))?;
        let resampled = wx.broadcast_left(gh)?.matmul(&rows)?;
        let resampled = resampled.reshape((1, gh * gw, d))?;
        let t = Tensor::cat(&[&cls, &resampled], 1)?.to_dtype(self.position_embeddings.dtype())?;
        // Made on this thread's CUDA stream, read by every thread that runs the network (the
        // stream's worker and its prepare thread, other streams sharing it): written before it
        // is shared, and never dropped while another thread's kernels may still read it (a
        // grid of another size makes its own, uncached).
        if cache.is_none() {
            t.device().synchronize()?;
            *cache = Some(((gh, gw), t.clone()));
        }
        Ok(t)
    }
}

/// Multi-head self-attention (`attention.attention.{query,key,value}`, `attention.output.dense`),
/// the layout transformers' ViTs share (DINOv2's, DPT's).
#[derive(Debug)]
pub(crate) struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        Self::with_sizes(
            config.hidden_size,
            config.num_attention_heads,
            config.qkv_bias,
            vb,
        )
    }

    /// `d` wide, `heads` heads, biases on the query, key and value when `qkv_bias`; weights
    /// under `vb` (the layer's `attention`).
    pub(crate) fn with_sizes(
        d: usize,
        heads: usize,
        qkv_bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let projection = |name: &str| {
            let vb = vb.pp("attention").pp(name);
            if qkv_bias {
                candle_nn::linear(d, d, vb)
            } else {
                candle_nn::linear_no_bias(d, d, vb)
            }
        };
        Ok(Self {
            query: projection("query")?,
            key: projection("key")?,
            value: projection("value")?,
            output: candle_nn::linear(d, d, vb.pp("output.dense"))?,
            heads,
            head_dim: d / heads,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let heads = |proj: &Linear| -> Result<Tensor> {
            proj.forward(x)?
                .reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        // Scaling the queries rather than the scores: fewer multiplications, same result.
        let q = (heads(&self.query)? * (self.head_dim as f64).powf(-0.5))?;
        let k = heads(&self.key)?;
        let v = heads(&self.value)?;
        let scores = q.matmul(&k.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.output.forward(&context)
    }
}

/// `fc2(gelu(fc1(x)))` with the exact GELU.
#[derive(Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, hidden) = (config.hidden_size, config.mlp_hidden_size());
        Ok(Self {
            fc1: candle_nn::linear(d, hidden, vb.pp("fc1"))?,
            fc2: candle_nn::linear(hidden, d, vb.pp("fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu_erf()?)
    }
}

/// One pre-norm transformer block with layer scales (`encoder.layer.N`).
#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    attention: Attention,
    layer_scale1: Tensor,
    norm2: LayerNorm,
    mlp: Mlp,
    layer_scale2: Tensor,
}

impl Block {
    fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (config.hidden_size, config.layer_norm_eps);
        Ok(Self {
            norm1: candle_nn::layer_norm(d, eps, vb.pp("norm1"))?,
            attention: Attention::new(config, vb.pp("attention"))?,
            layer_scale1: vb.get(d, "layer_scale1.lambda1")?,
            norm2: candle_nn::layer_norm(d, eps, vb.pp("norm2"))?,
            mlp: Mlp::new(config, vb.pp("mlp"))?,
            layer_scale2: vb.get(d, "layer_scale2.lambda1")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let attended = self.attention.forward(&self.norm1.forward(x)?)?;
        let x = (x + attended.broadcast_mul(&self.layer_scale1)?)?;
        let mlp = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x + mlp.broadcast_mul(&self.layer_scale2)?
    }
}

/// transformers' `Dinov2Backbone`: the feature maps of the configured stages.
#[derive(Debug)]
pub struct Dinov2Backbone {
    embeddings: Embeddings,
    blocks: Vec<Block>,
    layernorm: LayerNorm,
    out_stages: Vec<usize>,
    apply_layernorm: bool,
    reshape_hidden_states: bool,
    patch: usize,
    num_channels: usize,
}

impl Dinov2Backbone {
    /// Builds the backbone from `vb` (the backbone's prefix, `backbone` in Depth Anything);
    /// validates the config first.
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let blocks = (0..config.num_hidden_layers)
            .map(|i| Block::new(config, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::new(config, vb.pp("embeddings"))?,
            blocks,
            layernorm: candle_nn::layer_norm(
                config.hidden_size,
                config.layer_norm_eps,
                vb.pp("layernorm"),
            )?,
            out_stages: config.out_stages()?,
            apply_layernorm: config.apply_layernorm,
            reshape_hidden_states: config.reshape_hidden_states,
            patch: config.patch(),
            num_channels: config.num_channels,
        })
    }

    /// The output stages (0 = embeddings, i = after block i), increasing.
    pub fn out_stages(&self) -> &[usize] {
        &self.out_stages
    }

    /// The patch size.
    pub fn patch_size(&self) -> usize {
        self.patch
    }

    /// Feature maps of the output stages for `pixel_values` `[B, C, H, W]` (H and W positive
    /// multiples of the patch size): tokens `[B, 1 + (H/p)·(W/p), D]` with the CLS token first,
    /// or `[B, D, H/p, W/p]` with `reshape_hidden_states`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Vec<Tensor>> {
        let (b, c, height, width) = pixel_values.dims4()?;
        if c != self.num_channels
            || height == 0
            || width == 0
            || !height.is_multiple_of(self.patch)
            || !width.is_multiple_of(self.patch)
        {
            candle_core::bail!(
                "Dinov2: input {:?} must be [B, {}, H, W] with H and W positive multiples of {}",
                pixel_values.dims(),
                self.num_channels,
                self.patch
            );
        }
        let (gh, gw) = (height / self.patch, width / self.patch);
        let mut hidden = self.embeddings.forward(pixel_values)?;
        let mut maps = Vec::with_capacity(self.out_stages.len());
        let last = self.out_stages.last().copied().unwrap_or(0);
        for stage in 0..=last {
            if stage > 0 {
                hidden = self.blocks[stage - 1].forward(&hidden)?;
            }
            if self.out_stages.contains(&stage) {
                let map = if self.apply_layernorm {
                    self.layernorm.forward(&hidden)?
                } else {
                    hidden.clone()
                };
                let map = if self.reshape_hidden_states {
                    let d = map.dim(2)?;
                    map.narrow(1, 1, gh * gw)?
                        .reshape((b, gh, gw, d))?
                        .permute((0, 3, 1, 2))?
                        .contiguous()?
                } else {
                    map
                };
                maps.push(map);
            }
        }
        Ok(maps)
    }
}
