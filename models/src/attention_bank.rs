//! Cached attention: StreamV2V's feature bank, as Daydream's `cached_attention` runs it.
//!
//! Every self-attention layer of the UNet (each transformer block's `attn1`) attends, besides
//! its own tokens, to the keys and values it computed in up to `max_frames` earlier UNet calls.
//! For a layer with queries Q and keys/values K, V of this call (per batch row and head):
//!
//! ```text
//! out = softmax(Q · [K; K₁; …; K_F]ᵀ / √d) · [V; V₁; …; V_F]
//! ```
//!
//! where (K_j, V_j) are the banked frames. The bank starts as F frames of zeros (Daydream
//! allocates it zero-filled and always attends to all of it); after a call whose index c (from 0)
//! is a multiple of `interval`, each layer's oldest banked frame is dropped and this call's K, V
//! appended. Rows are banked row by row: row r of the stream batch attends to row r of earlier
//! calls. A change of the batch's shape (a new `t_index_list` length) starts a zero bank.

use std::cell::RefCell;

use candle_core::Tensor;

use crate::{Error, Result};

/// The most frames the bank holds: Daydream's `CACHED_ATTENTION_MAX_FRAMES`, which sdstream's
/// parameters take from here as their bound.
pub const MAX_BANKED_FRAMES: usize = 4;

/// The keys and values kept across UNet calls, one entry per self-attention layer.
#[derive(Debug, Clone)]
pub struct AttentionBank {
    max_frames: usize,
    interval: usize,
    calls: u64,
    /// Per layer in call order: banked K and V, each `[B·H, F·N, d]` (oldest frame first).
    layers: Vec<(Tensor, Tensor)>,
}

/// One UNet call's use of the bank: which layer comes next, and the fresh K/V of each.
pub struct BankCall<'a> {
    bank: &'a AttentionBank,
    next: usize,
    fresh: Vec<(Tensor, Tensor)>,
}

impl AttentionBank {
    /// An empty bank of `max_frames` (1–4) frames, refreshed every `interval` (≥ 1) calls.
    pub fn new(max_frames: usize, interval: usize) -> Result<Self> {
        check(max_frames, interval)?;
        Ok(Self {
            max_frames,
            interval,
            calls: 0,
            layers: Vec::new(),
        })
    }

    /// Frames the bank holds.
    pub fn max_frames(&self) -> usize {
        self.max_frames
    }

    /// Calls between refreshes.
    pub fn interval(&self) -> usize {
        self.interval
    }

    /// UNet calls made with the bank.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Changes the size and pace, keeping what fits: a larger bank gets zero frames in front
    /// (the oldest places), a smaller one keeps the newest frames; the call count goes on.
    pub fn resize(&mut self, max_frames: usize, interval: usize) -> Result<()> {
        check(max_frames, interval)?;
        let old = self.max_frames;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (k, v) in &self.layers {
            let n = k.dim(1)? / old;
            let fit = |t: &Tensor| -> Result<Tensor> {
                Ok(if max_frames > old {
                    let (bh, _, d) = t.dims3()?;
                    let pad =
                        Tensor::zeros((bh, (max_frames - old) * n, d), t.dtype(), t.device())?;
                    Tensor::cat(&[&pad, t], 1)?
                } else {
                    t.narrow(1, (old - max_frames) * n, max_frames * n)?
                })
            };
            layers.push((fit(k)?, fit(v)?));
        }
        self.layers = layers;
        self.max_frames = max_frames;
        self.interval = interval;
        Ok(())
    }

    /// Forgets every banked frame (the next call starts from zeros).
    pub fn clear(&mut self) {
        self.layers.clear();
        self.calls = 0;
    }

    /// The banked K and V of `layer` (`[B·H, F·N, d]`), for diagnostics and tests.
    pub fn banked(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer)
    }

    /// Starts one UNet call's use of the bank: its attention layers read the banked K and V in
    /// order and record this call's fresh ones.
    pub fn begin(&self) -> RefCell<BankCall<'_>> {
        RefCell::new(BankCall {
            bank: self,
            next: 0,
            fresh: Vec::new(),
        })
    }

    /// Ends a call: counts it and, on a refresh call, shifts its K/V into the bank.
    pub fn commit(&mut self, fresh: Vec<(Tensor, Tensor)>) -> Result<()> {
        let index = self.calls;
        self.calls += 1;
        let f = self.max_frames;
        let fits = self.layers.len() == fresh.len()
            && self
                .layers
                .iter()
                .zip(&fresh)
                .all(|((bk, _), (k, _))| banked_shape(k, f) == bk.dims());
        if !fits {
            self.layers = fresh
                .iter()
                .map(|(k, _)| {
                    let z = Tensor::zeros(banked_shape(k, f), k.dtype(), k.device())?;
                    Ok((z.clone(), z))
                })
                .collect::<Result<_>>()?;
        }
        if !index.is_multiple_of(self.interval as u64) {
            return Ok(());
        }
        for ((bk, bv), (k, v)) in self.layers.iter_mut().zip(fresh) {
            let n = k.dim(1)?;
            *bk = Tensor::cat(&[&bk.narrow(1, n, (f - 1) * n)?, &k], 1)?;
            *bv = Tensor::cat(&[&bv.narrow(1, n, (f - 1) * n)?, &v], 1)?;
        }
        Ok(())
    }
}

/// `[B·H, F·N, d]` for a layer whose keys are `[B·H, N, d]`.
fn banked_shape(k: &Tensor, frames: usize) -> Vec<usize> {
    let d = k.dims();
    vec![d[0], d[1] * frames, d[2]]
}

fn check(max_frames: usize, interval: usize) -> Result<()> {
    if !(1..=MAX_BANKED_FRAMES).contains(&max_frames) {
        return Err(Error::param(
            "cached_attention.max_frames",
            format!("{max_frames} is out of range [1, {MAX_BANKED_FRAMES}]"),
        ));
    }
    if interval == 0 {
        return Err(Error::param(
            "cached_attention.interval",
            "must be at least 1",
        ));
    }
    Ok(())
}

impl BankCall<'_> {
    /// The fresh keys and values of every layer, in call order.
    pub fn into_fresh(self) -> Vec<(Tensor, Tensor)> {
        self.fresh
    }

    /// This layer's keys and values with the banked ones after them; `k`, `v`: `[B·H, N, d]`.
    pub fn extend(&mut self, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let layer = self.next;
        self.next += 1;
        self.fresh.push((k.clone(), v.clone()));
        let shape = banked_shape(k, self.bank.max_frames);
        let (bk, bv) = match self.bank.layers.get(layer) {
            Some((bk, bv)) if bk.dims() == shape.as_slice() => {
                (bk.to_dtype(k.dtype())?, bv.to_dtype(v.dtype())?)
            }
            _ => {
                let z = Tensor::zeros(shape, k.dtype(), k.device())?;
                (z.clone(), z)
            }
        };
        Ok((Tensor::cat(&[k, &bk], 1)?, Tensor::cat(&[v, &bv], 1)?))
    }
}
