//! CLIP text encoder, as transformers' `CLIPTextModel`.
//!
//! Token and position embeddings, a stack of pre-LayerNorm transformer layers under a causal
//! mask, and a final LayerNorm. Stable Diffusion conditions its UNet on the last hidden state
//! (after the final LayerNorm); SDXL-style pipelines use the penultimate layer's output instead,
//! which [`ClipTextModel::forward_with_penultimate`] also returns.
//!
//! Every size comes from the checkpoint's `config.json` (SD1.5's CLIP-L and SD2.1's OpenCLIP-H
//! differ only there). Weights are read under the names transformers saves: with the
//! `text_model.` prefix (transformers 4.x and every published SD checkpoint) or without it
//! (transformers 5.x).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

use crate::kernels::norm::LayerNorm;
use crate::limits::{
    Limits, MAX_CHANNELS, MAX_HEADS, MAX_POSITIONS, MAX_TEXT_LAYERS, MAX_VOCAB, MAX_WIDTH,
};

use crate::lora::LoraDeltas;
use crate::weight_table::{WeightTable, rebuild_with_lora};
use crate::{Error, Result};
use crate::{open_component_with_lora, try_vec};

/// `config.json` of a transformers `CLIPTextModel`; defaults are transformers' `CLIPTextConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Number of token embeddings.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// Number of transformer layers.
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer; must divide `hidden_size`.
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    /// Length of the position table, the longest sequence the model takes (77 for SD).
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// MLP activation: `quick_gelu` (CLIP-L), `gelu` (exact, OpenCLIP-H), `gelu_new`,
    /// `gelu_pytorch_tanh`, `relu`, `silu`.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Epsilon of every LayerNorm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// transformers' class names; `CLIPTextModelWithProjection` (SDXL's second encoder) adds
    /// the `text_projection` of the pooled output.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Width of `text_projection`'s output (transformers' default 512).
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// The end-of-text token whose hidden state is pooled. 2 is transformers' legacy value, for
    /// which the pooled token is the one with the largest id (49407, the end token, in CLIP's
    /// vocabulary), as transformers does for such configs.
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: i64,
}

/// The architecture name of a text encoder with `text_projection`.
const WITH_PROJECTION: &str = "CLIPTextModelWithProjection";

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_projection_dim() -> usize {
    512
}
fn default_eos_token_id() -> i64 {
    49407
}

impl Default for Config {
    fn default() -> Self {
        Self {
            vocab_size: default_vocab_size(),
            hidden_size: default_hidden_size(),
            intermediate_size: default_intermediate_size(),
            num_hidden_layers: default_num_hidden_layers(),
            num_attention_heads: default_num_attention_heads(),
            max_position_embeddings: default_max_position_embeddings(),
            hidden_act: default_hidden_act(),
            layer_norm_eps: default_layer_norm_eps(),
            architectures: Vec::new(),
            projection_dim: default_projection_dim(),
            eos_token_id: default_eos_token_id(),
        }
    }
}

impl Config {
    /// Whether the network has `text_projection` (transformers' `CLIPTextModelWithProjection`).
    pub fn with_projection(&self) -> bool {
        self.architectures.iter().any(|a| a == WITH_PROJECTION)
    }

    /// Checks what the graph depends on, and every size against [`crate::limits`]; the
    /// error names the offending field.
    pub fn validate(&self) -> Result<()> {
        let l = Limits::new("CLIP text encoder");
        l.value("vocab_size", self.vocab_size, MAX_VOCAB)?;
        l.value("hidden_size", self.hidden_size, MAX_CHANNELS)?;
        if self.with_projection() {
            l.value("projection_dim", self.projection_dim, MAX_CHANNELS)?;
        }
        l.value("intermediate_size", self.intermediate_size, MAX_WIDTH)?;
        l.value("num_hidden_layers", self.num_hidden_layers, MAX_TEXT_LAYERS)?;
        l.value("num_attention_heads", self.num_attention_heads, MAX_HEADS)?;
        l.value(
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_POSITIONS,
        )?;
        l.finite("layer_norm_eps", self.layer_norm_eps, false)?;
        Activation::parse(&self.hidden_act)?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::param(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.num_hidden_layers == 0 {
            return Err(Error::param("num_hidden_layers", "must be at least 1"));
        }
        Ok(())
    }
}

/// The MLP activations transformers' `ACT2FN` offers that CLIP checkpoints use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(1.702x)`, OpenAI CLIP's approximation.
    QuickGelu,
    /// Exact GELU through erf.
    GeluErf,
    /// GELU's tanh approximation.
    GeluTanh,
    /// ReLU.
    Relu,
    /// SiLU (`x·sigmoid(x)`).
    Silu,
}

impl Activation {
    /// Reads transformers' `hidden_act` name (`quick_gelu`, `gelu`, `gelu_new`, `relu`, `silu`);
    /// others are an unsupported config.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => {
                return Err(Error::param(
                    "hidden_act",
                    format!(
                        "unsupported activation {other:?} (supported: quick_gelu, gelu, gelu_new, \
                         gelu_pytorch_tanh, gelu_fast, relu, silu, swish)"
                    ),
                ));
            }
        })
    }

    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::GeluErf => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
            Self::Silu => xs.silu(),
        }
    }
}

/// Multi-head self-attention with a causal mask.
#[derive(Debug, Clone)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl SelfAttention {
    fn new(dim: usize, num_heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let head_dim = dim / num_heads;
        Ok(Self {
            q_proj: candle_nn::linear(dim, dim, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(dim, dim, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(dim, dim, vb.pp("out_proj"))?,
            num_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `xs`: [B, S, D]; `mask`: [S, S] additive (the text model's causal mask: 0 on and below
    /// the diagonal, −∞ above), none for the vision tower.
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, s, d) = xs.dims3()?;
        // [B, S, D] -> [B, H, S, Dh]
        let heads = |t: Tensor| {
            t.reshape((b, s, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q_proj.forward(xs)?)?;
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        // transformers takes the softmax in f32 whatever the model dtype.
        let dtype = scores.dtype();
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, d))?;
        self.out_proj.forward(&out)
    }
}

/// One pre-LayerNorm transformer layer (the text and the vision towers share it).
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl EncoderLayer {
    /// A layer of width `sizes.0` with `sizes.1` heads and an MLP of `sizes.2`.
    pub fn new(
        (dim, num_heads, intermediate): (usize, usize, usize),
        eps: f64,
        activation: Activation,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: LayerNorm::new(dim, eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(dim, num_heads, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(dim, eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(dim, intermediate, mlp.pp("fc1"))?,
            fc2: candle_nn::linear(intermediate, dim, mlp.pp("fc2"))?,
            activation,
        })
    }

    /// One encoder layer: pre-norm self-attention (under `mask`, the causal mask) and pre-norm MLP,
    /// each with its residual.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (xs + attn)?;
        let hidden = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let mlp = self.fc2.forward(&self.activation.apply(&hidden)?)?;
        xs + mlp
    }
}

/// transformers' `CLIPTextModel`: token ids in, per-token hidden states out.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    /// [max_position_embeddings, hidden_size]; positions are 0..S, so a slice replaces a gather.
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// [max_position_embeddings, max_position_embeddings] additive causal mask, model dtype.
    causal_mask: Tensor,
    /// `text_projection.weight` transposed, [hidden_size, projection_dim]
    /// (`CLIPTextModelWithProjection` only).
    text_projection: Option<Tensor>,
    config: Config,
}

/// Every output SD and SDXL read from a text encoder, from one pass.
#[derive(Debug, Clone)]
pub struct ClipTextOutputs {
    /// After the final LayerNorm, [B, S, hidden_size] (SD 1.5/2.1's conditioning).
    pub last_hidden_state: Tensor,
    /// The penultimate layer's output, [B, S, hidden_size] (SDXL's conditioning).
    pub penultimate: Tensor,
    /// The end token's final hidden state, projected by `text_projection` when the network has
    /// one: [B, projection_dim] (SDXL's `text_embeds`), else [B, hidden_size].
    pub pooled: Tensor,
}

impl ClipTextModel {
    /// Builds the network from `config` with weights from `vb` (rooted at the file's top level;
    /// the `text_model.` prefix is detected).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let activation = Activation::parse(&config.hidden_act)?;
        // The projection sits beside `text_model`, at the file's top level.
        let text_projection = if config.with_projection() {
            let weight = vb.get(
                (config.projection_dim, config.hidden_size),
                "text_projection.weight",
            )?;
            Some(weight.t()?.contiguous()?)
        } else {
            None
        };
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let dim = config.hidden_size;
        let embeddings = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(config.vocab_size, dim, embeddings.pp("token_embedding"))?;
        let position_embedding = embeddings
            .pp("position_embedding")
            .get((config.max_position_embeddings, dim), "weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                EncoderLayer::new(
                    (
                        config.hidden_size,
                        config.num_attention_heads,
                        config.intermediate_size,
                    ),
                    config.layer_norm_eps,
                    activation,
                    vb.pp(format!("encoder.layers.{i}")),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm =
            LayerNorm::new(dim, config.layer_norm_eps, vb.pp("final_layer_norm"))?;
        let causal_mask = causal_mask(config.max_position_embeddings, vb.dtype(), vb.device())?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            causal_mask,
            text_projection,
            config: config.clone(),
        })
    }

    /// Loads a transformers text-encoder folder (`config.json` + `model.safetensors`, or the
    /// `model.fp16.safetensors` variant, preferred when `dtype` is half precision).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_lora(dir, dtype, device, None).map(|(model, _)| model)
    }

    /// [`load`](Self::load) with LoRA deltas fused into the weights they patch; also returns
    /// the tensors it was built from, for [`rebuild_with_lora`](Self::rebuild_with_lora).
    pub fn load_with_lora(
        dir: &Path,
        dtype: DType,
        device: &Device,
        lora: Option<Arc<LoraDeltas>>,
    ) -> Result<(Self, WeightTable)> {
        open_component_with_lora(
            dir,
            "model",
            dtype,
            device,
            position_ids_buffer,
            lora,
            Config::validate,
            Self::new,
        )
    }

    /// The same network with the LoRA deltas `new` fused instead of `old`, built from `table`
    /// (what [`load_with_lora`](Self::load_with_lora) returned with it) without reading its
    /// files: tensors neither set patches are shared with this network.
    pub fn rebuild_with_lora(
        &self,
        table: &WeightTable,
        old: Option<Arc<LoraDeltas>>,
        new: Option<Arc<LoraDeltas>>,
        device: &Device,
    ) -> Result<(Self, WeightTable)> {
        rebuild_with_lora(
            &self.config,
            table,
            self.dtype(),
            device,
            old,
            new,
            Self::new,
        )
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The model's dtype (that of its weights).
    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    /// `input_ids`: [B, S] u32 with S ≤ `max_position_embeddings` (77 for SD).
    /// Returns the last hidden state after the final LayerNorm, [B, S, hidden_size]: what
    /// diffusers' `encode_prompt` feeds the UNet for SD1.5/2.1 (no clip skip).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let mut xs = self.embed(input_ids)?;
        let mask = self.mask_for(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, Some(&mask))?;
        }
        Ok(self.final_layer_norm.forward(&xs)?)
    }

    /// Like [`forward`](Self::forward), and also the output of the penultimate layer (before
    /// any LayerNorm): transformers' `hidden_states[-2]`, which SDXL conditions on.
    ///
    /// With a single layer the "penultimate" output is the embeddings themselves, as in
    /// transformers.
    pub fn forward_with_penultimate(&self, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut xs = self.embed(input_ids)?;
        let mask = self.mask_for(&xs)?;
        let mut penultimate = xs.clone();
        for layer in &self.layers {
            penultimate = xs;
            xs = layer.forward(&penultimate, Some(&mask))?;
        }
        Ok((self.final_layer_norm.forward(&xs)?, penultimate))
    }

    /// One pass giving every output SD and SDXL read (see [`ClipTextOutputs`]). The pooled token
    /// of each row is its first `eos_token_id`, or, for the legacy `eos_token_id` 2, the token
    /// with the largest id, as transformers picks it.
    pub fn forward_all(&self, input_ids: &Tensor) -> Result<ClipTextOutputs> {
        let (last_hidden_state, penultimate) = self.forward_with_penultimate(input_ids)?;
        let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let mut rows = Vec::with_capacity(ids.len());
        for (b, row) in ids.iter().enumerate() {
            let position = if self.config.eos_token_id == 2 {
                // The first largest id, as torch's argmax returns it.
                row.iter()
                    .enumerate()
                    .fold(
                        (0, i64::MIN),
                        |best, (i, &id)| if id > best.1 { (i, id) } else { best },
                    )
                    .0
            } else {
                row.iter()
                    .position(|&id| id == self.config.eos_token_id)
                    .ok_or_else(|| {
                        Error::param(
                            "input_ids",
                            format!(
                                "row {b} has no end-of-text token ({})",
                                self.config.eos_token_id
                            ),
                        )
                    })?
            };
            rows.push(last_hidden_state.get(b)?.get(position)?.unsqueeze(0)?);
        }
        let pooled = Tensor::cat(&rows, 0)?;
        let pooled = match &self.text_projection {
            Some(weight) => pooled.matmul(weight)?,
            None => pooled,
        };
        Ok(ClipTextOutputs {
            last_hidden_state,
            penultimate,
            pooled,
        })
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, seq_len) = input_ids.dims2()?;
        if seq_len > self.config.max_position_embeddings {
            return Err(Error::param(
                "input_ids",
                format!(
                    "sequence of {seq_len} tokens is longer than max_position_embeddings {}",
                    self.config.max_position_embeddings
                ),
            ));
        }
        let tokens = self.token_embedding.forward(input_ids)?;
        let positions = self.position_embedding.narrow(0, 0, seq_len)?;
        Ok(tokens.broadcast_add(&positions)?)
    }

    fn mask_for(&self, xs: &Tensor) -> Result<Tensor> {
        let seq_len = xs.dim(1)?;
        Ok(self
            .causal_mask
            .narrow(0, 0, seq_len)?
            .narrow(1, 0, seq_len)?
            .contiguous()?)
    }
}

/// transformers 4.x saved the `position_ids` buffer (0..positions) with the weights; positions
/// are computed here instead.
fn position_ids_buffer(name: &str) -> bool {
    name.ends_with("embeddings.position_ids")
}

/// Additive causal mask: −∞ where a query would see a later key.
fn causal_mask(len: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let cells = len
        .checked_mul(len)
        .ok_or_else(|| candle_core::Error::Msg(format!("causal mask of {len}² overflows")))?;
    let mut values = try_vec(cells, "the causal mask")?;
    values.resize(cells, 0f32);
    for (i, row) in values.chunks_exact_mut(len.max(1)).enumerate() {
        row[i + 1..].fill(f32::NEG_INFINITY);
    }
    Tensor::from_vec(values, (len, len), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_gelu_matches_its_formula() -> Result<()> {
        let x = Tensor::new(&[-2.0f32, -0.5, 0.0, 0.7, 3.0], &Device::Cpu)?;
        let y: Vec<f32> = Activation::QuickGelu.apply(&x)?.to_vec1()?;
        for (xi, yi) in [-2.0f32, -0.5, 0.0, 0.7, 3.0].iter().zip(y) {
            let want = xi / (1.0 + (-1.702 * xi).exp());
            assert!((want - yi).abs() < 1e-6, "{xi}: {want} vs {yi}");
        }
        Ok(())
    }

    #[test]
    fn unknown_activation_is_named() {
        let cfg = Config {
            hidden_act: "gelu_10".into(),
            ..Config::default()
        };
        let err = cfg
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("hidden_act") && err.contains("gelu_10"),
            "{err}"
        );
    }

    #[test]
    fn causal_mask_hides_the_future() -> Result<()> {
        let m: Vec<Vec<f32>> = causal_mask(3, DType::F32, &Device::Cpu)?.to_vec2()?;
        assert_eq!(m[0][0], 0.0);
        assert_eq!(m[2][1], 0.0);
        assert!(m[0][1].is_infinite() && m[1][2].is_infinite());
        Ok(())
    }
}
