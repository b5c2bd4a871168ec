//! Attention: self- and cross-attention with the key/value memo for unchanged text, cached
//! attention's bank, and IP-Adapter's image attention.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::Result;
use crate::attention_bank::BankCall;
use crate::kernels::ops::scaled_softmax;
use crate::kernels::{self, cpu_kernels, same_values};
use crate::weight_table;

use super::layers::{Linear, linear};

/// diffusers' `Attention` (to_q/to_k/to_v without bias, to_out.0 with bias), all heads batched
/// into one matmul. Self-attention projects q, k and v with one fused weight.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Self-attention: `[q; k; v]` stacked. Cross-attention: q alone.
    pub(super) to_q_or_qkv: Linear,
    /// Cross-attention only: `[k; v]` stacked.
    pub(super) to_kv: Option<Linear>,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
    upcast: bool,
    /// Cross-attention only: the keys and values of the last context.
    kv_memo: KvMemo,
}

/// A cross-attention layer's keys and values of the last context it saw, reused while the
/// context holds the same values: the prompt changes far less often than frames come, and the
/// stream rebuilds its context tensor every frame, so the test is on values, not identity.
/// A clone starts empty (a clone may get other weights, as a LoRA rebuild does).
#[derive(Debug, Default)]
struct KvMemo {
    /// The context and its key/value projection (`[B, M, 2·H·d]`, keys then values).
    last: Mutex<Option<(Tensor, Tensor)>>,
    /// Counts projections actually computed; shared by every layer of one network.
    computed: Arc<AtomicUsize>,
}

impl Clone for KvMemo {
    fn clone(&self) -> Self {
        Self {
            last: Mutex::default(),
            computed: Arc::clone(&self.computed),
        }
    }
}

impl KvMemo {
    /// The key/value projection of `context`, from the memo when it saw the same values.
    ///
    /// On the CPU only. On a GPU the projection is a small GEMM (77 tokens), and a memo there
    /// is unsafe under CUDA graphs ([`crate::cuda_graph`]): the capture would free the eager
    /// pass's memoised tensor inside the graph being captured, and keep one of the graph's own
    /// allocations past it. Frames on an H200 failed with `CUDA_ERROR_INVALID_VALUE` while
    /// graphs were on and this memo kept GPU tensors, and ran with graphs off.
    fn get_or_compute(
        &self,
        context: &Tensor,
        compute: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        if !context.device().is_cpu() {
            let kv = compute()?;
            self.computed.fetch_add(1, Ordering::Relaxed);
            return Ok(kv);
        }
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, kv)) = last.as_ref()
            && same_values(seen, context)
        {
            return Ok(kv.clone());
        }
        let kv = compute()?;
        self.computed.fetch_add(1, Ordering::Relaxed);
        *last = Some((context.clone(), kv.clone()));
        Ok(kv)
    }
}

/// Attention scores above this many bytes are computed in slices of heads to bound memory.
const ATTENTION_SCORE_BUDGET: usize = 256 << 20;

/// On the CPU, score blocks stay under this size (below glibc's largest mmap threshold, so the
/// allocator reuses heap memory instead of faulting in fresh pages for every block).
const ATTENTION_BLOCK_BYTES_CPU: usize = 16 << 20;

impl Attention {
    /// Builds the attention from `vb` (`to_q`, `to_k`, `to_v`, `to_out.0`); keys and values are
    /// projected from `context_dim` channels (the input's `query_dim` when `None`).
    pub fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        upcast: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        let wq = vb.get((inner, query_dim), "to_q.weight")?;
        let wk = vb.get((inner, kv_dim), "to_k.weight")?;
        let wv = vb.get((inner, kv_dim), "to_v.weight")?;
        let name = |leaf: &str| format!("{}.{leaf}.weight", vb.prefix());
        // The fused projections are copies: the weight table keeps views of them instead of
        // the separate tensors (see model::weight_table).
        let (to_q_or_qkv, to_kv) = if context_dim.is_none() {
            let qkv = Linear::new(Tensor::cat(&[&wq, &wk, &wv], 0)?, None)?;
            weight_table::record_rows(&[name("to_q"), name("to_k"), name("to_v")], qkv.weight())?;
            (qkv, None)
        } else {
            let q = Linear::new(wq, None)?;
            weight_table::record(&name("to_q"), q.weight());
            let kv = Linear::new(Tensor::cat(&[&wk, &wv], 0)?, None)?;
            weight_table::record_rows(&[name("to_k"), name("to_v")], kv.weight())?;
            (q, Some(kv))
        };
        Ok(Self {
            to_q_or_qkv,
            to_kv,
            to_out: linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            upcast,
            kv_memo: KvMemo::default(),
        })
    }

    /// Counts this layer's key/value projections into `counter` (with every other layer of
    /// its network).
    pub fn share_projection_counter(&mut self, counter: &Arc<AtomicUsize>) {
        self.kv_memo.computed = Arc::clone(counter);
    }

    /// `x`: `[B, N, C]`; `context`: `[B, M, D]` for cross-attention (ignored for self-attention).
    /// With `bank`, self-attention also attends to the banked keys and values
    /// ([`crate::attention_bank`]).
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        bank: Option<&RefCell<BankCall<'_>>>,
    ) -> candle_core::Result<Tensor> {
        self.forward_with_image(x, context, bank, None)
    }

    /// [`forward`](Self::forward) with IP-Adapter's decoupled cross-attention: the queries
    /// also attend to the image tokens' keys and values, and that result, times the layer's
    /// scale, is added to the text attention's before the output projection.
    pub fn forward_with_image(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        bank: Option<&RefCell<BankCall<'_>>>,
        image: Option<ImageAttention<'_>>,
    ) -> candle_core::Result<Tensor> {
        self.forward_residual(x, context, bank, image, None)
    }

    /// [`forward_with_image`](Self::forward_with_image) plus `residual` (`[B, N, C]`, the
    /// block's input), added by the output projection ([`Linear::forward_residual`]: in its
    /// epilogue where the kernel policy fuses it).
    pub fn forward_residual(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        bank: Option<&RefCell<BankCall<'_>>>,
        image: Option<ImageAttention<'_>>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (h, d) = (self.heads, self.head_dim);
        let bank = bank.filter(|_| self.to_kv.is_none());
        // Self-attention: q, k and v side by side; cross-attention: q alone, and the context's
        // key/value projection from the memo.
        let queries = self.to_q_or_qkv.forward(x)?;
        let keys_values = match (&self.to_kv, context) {
            (None, _) => None,
            (Some(to_kv), Some(ctx)) => {
                Some(self.kv_memo.get_or_compute(ctx, || to_kv.forward(ctx))?)
            }
            (Some(_), None) => candle_core::bail!("cross-attention called without a context"),
        };
        if kernels::attention::runs_for(&queries, d) && bank.is_none() {
            return self.attend_in_place(&queries, keys_values.as_ref(), image, residual);
        }
        // Heads-major layout [·, B, H, tokens, d] so that every (batch, head) pair is one matmul.
        let heads_major = |kv: Tensor, tokens: usize| {
            kv.reshape((b, tokens, 2, h, d))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()
        };
        let (q, k, v, m) = match keys_values {
            None => {
                let qkv = queries
                    .reshape((b, n, 3, h, d))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()?;
                (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?, n)
            }
            Some(kv) => {
                let m = kv.dim(1)?;
                let q = queries
                    .reshape((b, n, h, d))?
                    .transpose(1, 2)?
                    .contiguous()?;
                let kv = heads_major(kv, m)?;
                (q, kv.get(0)?, kv.get(1)?, m)
            }
        };
        let q = q.reshape((b * h, n, d))?;
        let k = k.reshape((b * h, m, d))?;
        let v = v.reshape((b * h, m, d))?;
        let (k, v, m) = match bank {
            Some(bank) => {
                let (k, v) = bank.borrow_mut().extend(&k, &v)?;
                let m = k.dim(1)?;
                (k, v, m)
            }
            None => (k, v, m),
        };
        let mut out = self.attend_blocks(&q, &k, &v, b, n, m)?;
        if let Some(image) = image {
            let t = image.tokens.dim(1)?;
            let kv = heads_major(image.to_kv.forward(image.tokens)?, t)?;
            let k = kv.get(0)?.reshape((b * h, t, d))?;
            let v = kv.get(1)?.reshape((b * h, t, d))?;
            let from_image = self.attend_blocks(&q, &k, &v, b, n, t)?;
            out = (out + (from_image * image.scale)?)?;
        }
        self.to_out.forward_residual(&out, residual)
    }

    /// [`forward_with_image`](Self::forward_with_image) on the CPU kernels without a bank: the
    /// attention reads its heads in place from the projections' `[B, tokens, width]` outputs
    /// (`queries`, and cross-attention's `keys_values`).
    fn attend_in_place(
        &self,
        queries: &Tensor,
        keys_values: Option<&Tensor>,
        image: Option<ImageAttention<'_>>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (h, d) = (self.heads, self.head_dim);
        // The queries' attention over the keys at column `keys` of `kv` and the values right
        // after them.
        let attend = |kv: &Tensor, keys: usize| {
            let view = |tensor, offset| kernels::attention::TokenMajor { tensor, offset };
            kernels::attention::attention_token_major(
                view(queries, 0),
                view(kv, keys),
                view(kv, keys + h * d),
                h,
                d,
                self.scale,
            )
        };
        let mut out = match keys_values {
            // Self-attention: `queries` is q, k and v side by side.
            None => attend(queries, h * d)?,
            Some(kv) => attend(kv, 0)?,
        };
        if let Some(image) = image {
            let from_image = attend(&image.to_kv.forward(image.tokens)?, 0)?;
            out = (out + (from_image * image.scale)?)?;
        }
        self.to_out.forward_residual(&out, residual)
    }

    /// Attention of `q` `[B·H, N, d]` over `k`, `v` `[B·H, M, d]`, heads merged back:
    /// `[B, N, H·d]` (before the output projection).
    fn attend_blocks(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        b: usize,
        n: usize,
        m: usize,
    ) -> candle_core::Result<Tensor> {
        let (h, d) = (self.heads, self.head_dim);
        if kernels::attention::runs_for(q, d) {
            return kernels::attention::attention(q, k, v, h, self.scale);
        }
        // Scores are computed in blocks of (head, query rows): on the CPU a block fits the
        // allocator's reusable heap (no page faults per call) and stays cache-friendly; on other
        // devices blocks only bound memory.
        let score_dtype = if self.upcast { DType::F32 } else { q.dtype() };
        let budget = if cpu_kernels(q.device()) {
            ATTENTION_BLOCK_BYTES_CPU
        } else {
            ATTENTION_SCORE_BUDGET
        } / score_dtype.size_in_bytes();
        let pairs = b * h;
        let out = if pairs * n * m <= budget {
            self.attend(q, k, v)?
        } else if n * m <= budget {
            let group = budget / (n * m);
            let mut parts = Vec::with_capacity(pairs.div_ceil(group));
            let mut start = 0;
            while start < pairs {
                let len = group.min(pairs - start);
                parts.push(self.attend(
                    &q.narrow(0, start, len)?,
                    &k.narrow(0, start, len)?,
                    &v.narrow(0, start, len)?,
                )?);
                start += len;
            }
            Tensor::cat(&parts, 0)?
        } else {
            let rows = (budget / m).max(1);
            let mut per_pair = Vec::with_capacity(pairs);
            for p in 0..pairs {
                let (qp, kp, vp) = (q.narrow(0, p, 1)?, k.narrow(0, p, 1)?, v.narrow(0, p, 1)?);
                let mut parts = Vec::with_capacity(n.div_ceil(rows));
                let mut start = 0;
                while start < n {
                    let len = rows.min(n - start);
                    parts.push(self.attend(&qp.narrow(1, start, len)?, &kp, &vp)?);
                    start += len;
                }
                per_pair.push(Tensor::cat(&parts, 1)?);
            }
            Tensor::cat(&per_pair, 0)?
        };
        out.reshape((b, h, n, d))?
            .transpose(1, 2)?
            .reshape((b, n, h * d))
    }

    /// softmax(q·kᵀ·scale)·v for `[P, N, d]` × `[P, M, d]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = q.dtype();
        let upcast = self.upcast && dtype != DType::F32 && dtype != DType::F64;
        let (q, k) = if upcast {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q.clone(), k.clone())
        };
        let probs = scaled_softmax(q.matmul(&k.t()?)?, self.scale)?;
        let probs = if upcast {
            probs.to_dtype(dtype)?
        } else {
            probs
        };
        probs.matmul(v)
    }
}

/// What the transformer blocks read besides their input: the text embeddings and, with cached
/// attention, this UNet call's use of the bank.
#[derive(Clone, Copy)]
pub struct Context<'a, 'b> {
    /// The text embeddings the cross-attention reads.
    pub text: &'a Tensor,
    /// This UNet call's use of the attention bank (cached attention), when it is on.
    pub bank: Option<&'a RefCell<BankCall<'b>>>,
    /// IP-Adapter's image tokens and layers, when an adapter is active.
    pub image: Option<&'a ImageContext<'a>>,
}

impl<'a> Context<'a, 'static> {
    /// The text alone (no bank, no image).
    pub fn text(text: &'a Tensor) -> Self {
        Self {
            text,
            bank: None,
            image: None,
        }
    }
}

/// IP-Adapter's part in one UNet call ([`crate::ip_adapter`]).
pub struct ImageContext<'a> {
    /// The image tokens of every batch row, `[B, T, D]`.
    pub tokens: &'a Tensor,
    /// Per cross-attention layer (diffusers' `attn_processors` order): `[to_k_ip; to_v_ip]`.
    pub layers: &'a [Linear],
    /// Per cross-attention layer: the scale of its image attention.
    pub scales: &'a [f64],
}

/// What one cross-attention layer reads of an [`ImageContext`].
#[derive(Clone, Copy)]
pub struct ImageAttention<'a> {
    pub(super) tokens: &'a Tensor,
    pub(super) to_kv: &'a Linear,
    pub(super) scale: f64,
}
