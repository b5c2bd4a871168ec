//! The transformer of a UNet level: GEGLU feed-forward, the basic transformer block, and the
//! 2-D transformer around it.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::cpu_kernels;
use crate::kernels::norm::{GroupNorm, LayerNorm};
use crate::kernels::ops::{add_fresh, geglu};
use crate::{Error, Result};

use super::attention::{Attention, Context, ImageAttention};
use super::layers::{Linear, linear, pointwise_as_linear};
use super::{AttentionSpec, BlockSettings};

/// diffusers' `FeedForward` with GEGLU: `net.0.proj` (→ 2·inner), exact GELU gate, `net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
    /// Width of the projection's output, `2 · 4 · dim` (GEGLU's two halves).
    width: usize,
}

/// Bytes of the feed-forward's widest value, its projection, that the CPU computes at a time.
/// For all 4,096 tokens of a 512² image it is 42 MB (126 MB for a stream batch of three),
/// above glibc's mmap threshold, so every call mapped it afresh and the GEMM faulted it in page
/// by page: most of the UNet's page faults in a steady stream. Cut into row chunks of at most
/// this size it comes from the heap, reused; each row's arithmetic is the same either way.
const FEED_FORWARD_CHUNK_BYTES: usize = 16 << 20;

impl FeedForward {
    /// GEGLU feed-forward of width `dim` (inner width 4·dim).
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: linear(dim, 2 * inner, vb.pp("net").pp("0").pp("proj"))?,
            out: linear(inner, dim, vb.pp("net").pp("2"))?,
            width: 2 * inner,
        })
    }

    pub(super) fn forward_rows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The projection's bias is added by GEGLU as it reads the product.
        self.out
            .forward(&geglu(&self.proj.product(x)?, self.proj.bias.as_ref())?)
    }

    /// The feed-forward of a contiguous `x` (`[…, dim]`), `chunk_rows` rows at a time (in one
    /// piece when it has no more).
    pub(super) fn forward_chunked(
        &self,
        x: &Tensor,
        chunk_rows: usize,
    ) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let dim = dims.last().copied().unwrap_or(1).max(1);
        let rows = x.elem_count() / dim;
        if rows <= chunk_rows {
            return self.forward_rows(x);
        }
        let flat = x.reshape((rows, dim))?;
        let parts = (0..rows)
            .step_by(chunk_rows)
            .map(|first| self.forward_rows(&flat.narrow(0, first, chunk_rows.min(rows - first))?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.reshape(dims)
    }

    /// The feed-forward of `x` plus `residual` (the block's input): on a device other than the
    /// CPU's kernels the output projection adds it ([`Linear::forward_residual`]: in its
    /// epilogue where the kernel policy fuses it).
    pub(super) fn forward_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        if cpu_kernels(x.device()) {
            return add_fresh(self.forward(x)?, residual, 1);
        }
        let hidden = geglu(&self.proj.product(x)?, self.proj.bias.as_ref())?;
        self.out.forward_residual(&hidden, Some(residual))
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Chunks only keep the projection out of freshly mapped memory, at the price of reading
        // the weights once per chunk: not worth it where large blocks are reused anyway.
        if !cpu_kernels(x.device())
            || !x.is_contiguous()
            || crate::kernels::alloc::reuses_large_blocks()
        {
            return self.forward_rows(x);
        }
        let chunk_rows =
            (FEED_FORWARD_CHUNK_BYTES / (self.width * x.dtype().size_in_bytes())).max(1);
        self.forward_chunked(x, chunk_rows)
    }
}

/// diffusers' `BasicTransformerBlock` (layer_norm type): self-attn, cross-attn, GEGLU MLP.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
    /// This block's cross-attention in diffusers' `attn_processors` order (down, up, mid
    /// blocks), which IP-Adapter checkpoints number their layers by; set by the UNet.
    pub cross_attention_slot: usize,
    /// The width of its queries (what IP-Adapter's key and value projections output).
    pub width: usize,
}

impl BasicTransformerBlock {
    /// Counts the key/value projections of this block's attention layers into `counter`.
    pub fn share_projection_counter(&mut self, counter: &Arc<AtomicUsize>) {
        self.attn1.share_projection_counter(counter);
        self.attn2.share_projection_counter(counter);
    }

    /// Builds self-attention, cross-attention and the feed-forward from `vb`.
    pub fn new(dim: usize, spec: &AttentionSpec, upcast: bool, vb: VarBuilder) -> Result<Self> {
        let head_dim = dim / spec.heads;
        let attn1_context = spec
            .only_cross_attention
            .then_some(spec.cross_attention_dim);
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(
                dim,
                attn1_context,
                spec.heads,
                head_dim,
                upcast,
                vb.pp("attn1"),
            )?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(
                dim,
                Some(spec.cross_attention_dim),
                spec.heads,
                head_dim,
                upcast,
                vb.pp("attn2"),
            )?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            only_cross_attention: spec.only_cross_attention,
            cross_attention_slot: 0,
            width: dim,
        })
    }

    /// Self-attention (extended by the bank when on), cross-attention, then the feed-forward, each
    /// pre-norm with its residual.
    pub fn forward(&self, x: &Tensor, context: Context<'_, '_>) -> candle_core::Result<Tensor> {
        // The bank extends self-attention only (an `only_cross_attention` attn1 reads the text).
        let (ctx1, bank) = if self.only_cross_attention {
            (Some(context.text), None)
        } else {
            (None, context.bank)
        };
        let x = self
            .attn1
            .forward_residual(&self.norm1.forward(x)?, ctx1, bank, None, Some(x))?;
        // A layer at scale 0 adds nothing: skipped, as the adapter's absence.
        let image = context.image.and_then(|image| {
            let slot = self.cross_attention_slot;
            let scale = *image.scales.get(slot)?;
            (scale != 0.0).then(|| ImageAttention {
                tokens: image.tokens,
                to_kv: &image.layers[slot],
                scale,
            })
        });
        let x = self.attn2.forward_residual(
            &self.norm2.forward(&x)?,
            Some(context.text),
            None,
            image,
            Some(&x),
        )?;
        self.ff.forward_residual(&self.norm3.forward(&x)?, &x)
    }
}

/// diffusers' `Transformer2DModel` over continuous input: GroupNorm (eps 1e-6), proj_in,
/// transformer blocks on `[B, HW, C]` tokens, proj_out, residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
    /// Maps are `[B, H, W, C]`, so its tokens are a reshape of them, not a transpose.
    channels_last: bool,
}

impl Transformer2DModel {
    /// Builds the norm, the input and output projections and the transformer blocks from `vb`.
    pub fn new(
        channels: usize,
        spec: &AttentionSpec,
        s: &BlockSettings,
        vb: VarBuilder,
    ) -> Result<Self> {
        if spec.heads == 0 || !channels.is_multiple_of(spec.heads) {
            return Err(Error::UnsupportedConfig {
                model: "UNet".into(),
                option: "attention_head_dim".into(),
                detail: format!("{} heads do not divide {channels} channels", spec.heads),
            });
        }
        // inner_dim = heads · (channels / heads) = channels.
        let inner = channels;
        let (proj_in, proj_out) = if s.linear_projection {
            (
                linear(channels, inner, vb.pp("proj_in"))?,
                linear(inner, channels, vb.pp("proj_out"))?,
            )
        } else {
            (
                pointwise_as_linear(channels, inner, vb.pp("proj_in"))?,
                pointwise_as_linear(inner, channels, vb.pp("proj_out"))?,
            )
        };
        let blocks = (0..spec.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    inner,
                    spec,
                    s.upcast_attention,
                    vb.pp("transformer_blocks").pp(i.to_string()),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: s.norm(GroupNorm::new(s.groups, channels, 1e-6, vb.pp("norm"))?),
            proj_in,
            blocks,
            channels_last: s.channels_last,
            proj_out,
        })
    }

    /// Its transformer blocks, in order.
    pub fn blocks_mut(&mut self) -> impl Iterator<Item = &mut BasicTransformerBlock> {
        self.blocks.iter_mut()
    }

    /// Normalises and projects `x` to tokens, runs the transformer blocks and projects back, adding
    /// the input.
    pub fn forward(&self, x: &Tensor, context: Context<'_, '_>) -> candle_core::Result<Tensor> {
        if self.channels_last {
            let (b, h, w, c) = x.dims4()?;
            let tokens = self.norm.forward(x)?.reshape((b, h * w, c))?;
            let mut t = self.proj_in.forward(&tokens)?;
            for block in &self.blocks {
                t = block.forward(&t, context)?;
            }
            // x's tokens are a reshape of it (channels last): the projection adds them.
            let x_tokens = x.reshape((b, h * w, c))?;
            return self
                .proj_out
                .forward_residual(&t, Some(&x_tokens))?
                .reshape((b, h, w, c));
        }
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .permute((0, 2, 3, 1))?
            .reshape((b, h * w, c))?;
        let mut t = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let t = self.proj_out.forward(&t)?;
        t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))? + x
    }
}
