//! Multi-head attention on the CPU in query blocks that stay in cache.
//!
//! `softmax(scale·q·kᵀ)·v` for every (image, head) pair, as the generic path computes it (the
//! same GEMMs and the same vectorised softmax, so the same values), but a block of query rows at
//! a time on one thread: the block's scores (`rows × keys`, up to 4 MiB) are written, normalised
//! and multiplied by `v` while they sit in the core's cache, where the generic path writes
//! megabytes of scores per head to memory and reads them back twice, and copies the heads' outputs
//! together afterwards. Each block's output lands directly in its place in `[B, N, H·d]`, the
//! layout the output projection reads.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::gemm_bf16::{self, PackedA, PackedB};
use super::{SharedMut, contiguous_slice, cpu_kernels, for_each_range, simd, thread_count};

/// Scores per block, in f32 values (4 MiB): at 4,096 keys, 256 query rows. Measured on the
/// sd-turbo UNet at 512², batch 3: 1 MiB blocks 10.3–10.4 s, 4 MiB 9.8–9.9 s, 8 MiB 9.9–10.0 s.
const BLOCK_SCORES: usize = 1 << 20;
/// Fewest query rows per block (the GEMMs need some height to reach their speed).
const MIN_ROWS: usize = 16;

/// Whether [`attention`] runs for these tensors: f32 on the CPU kernels.
pub(crate) fn applies(q: &Tensor) -> bool {
    cpu_kernels(q.device()) && q.dtype() == DType::F32
}

/// Attention of `q` `[B·H, N, d]` over `k`, `v` `[B·H, M, d]` (heads-major pairs), with the
/// heads merged back: `[B, N, H·d]`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let op = AttentionOp {
        heads,
        scale,
        bf16: gemm_bf16::active(),
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

struct AttentionOp {
    heads: usize,
    scale: f64,
    /// Both products on bf16 operands with f32 sums ([`gemm_bf16`]); the softmax stays f32.
    bf16: bool,
}

impl AttentionOp {
    fn run(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (pairs, n, m, d): (usize, usize, usize, usize),
    ) -> Vec<f32> {
        let heads = self.heads;
        let row_len = heads * d;
        let mut out = vec![0f32; pairs * n * d];
        if out.is_empty() {
            return out;
        }
        let rows = (BLOCK_SCORES / m.max(1)).max(MIN_ROWS).min(n);
        let blocks_per_pair = n.div_ceil(rows);
        let tasks = pairs * blocks_per_pair;
        let out_ptr = SharedMut(out.as_mut_ptr());
        let scale = self.scale as f32;
        let work = |range: std::ops::Range<usize>| {
            let mut scores = vec![0f32; rows * m];
            let mut packed = self.bf16.then(PackedPair::default);
            for task in range {
                let (pair, block) = (task / blocks_per_pair, task % blocks_per_pair);
                let (image, head) = (pair / heads, pair % heads);
                let r0 = block * rows;
                let nr = rows.min(n - r0);
                let q_at = (pair * n + r0) * d;
                let kv_at = pair * m * d;
                let dst_at = (image * n + r0) * row_len + head * d;
                if let Some(packed) = &mut packed {
                    packed.run(
                        (pair, &k[kv_at..][..m * d], &v[kv_at..][..m * d], (m, d)),
                        &q[q_at..][..nr * d],
                        &mut scores[..nr * m],
                        scale,
                        // SAFETY: as for the f32 products below.
                        |packed_scores, packed_v| unsafe {
                            gemm_bf16::gemm_into(
                                packed_scores,
                                packed_v,
                                out_ptr.ptr().add(dst_at),
                                row_len,
                                1,
                            )
                        },
                    );
                    continue;
                }
                // SAFETY: scores holds nr × m values (row stride m); q[pair, r0..r0 + nr] is
                // nr rows of d values; kᵀ is read from k[pair] ([m, d]) with strides swapped.
                unsafe {
                    gemm::gemm(
                        nr,
                        m,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        m as isize,
                        false,
                        q.as_ptr().add(q_at),
                        1,
                        d as isize,
                        k.as_ptr().add(kv_at),
                        d as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for row in scores[..nr * m].chunks_exact_mut(m) {
                    simd::softmax_row(row, scale);
                }
                // SAFETY: dst is out[image, r0..r0 + nr, head·d..(head + 1)·d] (row stride
                // H·d): written by this task only, since tasks partition (pair, rows). The
                // scores are nr × m (row stride m), v[pair] is m × d.
                unsafe {
                    gemm::gemm(
                        nr,
                        d,
                        m,
                        out_ptr.ptr().add(dst_at),
                        1,
                        row_len as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        m as isize,
                        v.as_ptr().add(kv_at),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        };
        let threads = thread_count(tasks, pairs * n * m);
        for_each_range(tasks, threads, &work);
        out
    }
}

/// One thread's packed operands for the bf16 products: the keys and values of the pair it
/// last saw (tasks of one pair are consecutive), the query block and the probabilities.
#[derive(Default)]
struct PackedPair {
    pair: Option<usize>,
    keys: PackedB,
    values: PackedB,
    queries: PackedA,
    probabilities: PackedA,
}

impl PackedPair {
    /// softmax(scale·q·kᵀ) into `scores` (`q` `[rows, d]`), then hands the packed
    /// probabilities and values to `multiply_v`, which writes the block's output.
    fn run(
        &mut self,
        (pair, k, v, (m, d)): (usize, &[f32], &[f32], (usize, usize)),
        q: &[f32],
        scores: &mut [f32],
        scale: f32,
        multiply_v: impl FnOnce(&PackedA, &PackedB),
    ) {
        if self.pair != Some(pair) {
            self.keys.repack_transposed(k, m, d, d, 1);
            self.values.repack_rows(v, m, d, d, 1);
            self.pair = Some(pair);
        }
        let rows = q.len() / d;
        self.queries.repack(q, rows, d, d, 1);
        // SAFETY: `scores` holds rows × m values; both operands have d columns/rows.
        unsafe { gemm_bf16::gemm_into(&self.queries, &self.keys, scores.as_mut_ptr(), m, 1) };
        for row in scores.chunks_exact_mut(m) {
            simd::softmax_row(row, scale);
        }
        self.probabilities.repack(scores, rows, m, m, 1);
        multiply_v(&self.probabilities, &self.values);
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sdstream-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (pairs, n, d) = l1.shape().dims3()?;
        let (k_pairs, m, k_d) = l2.shape().dims3()?;
        if l3.shape() != l2.shape()
            || k_pairs != pairs
            || k_d != d
            || self.heads == 0
            || !pairs.is_multiple_of(self.heads)
        {
            candle_core::bail!(
                "{name}: q {:?}, k {:?}, v {:?} do not fit {} heads",
                l1.shape(),
                l2.shape(),
                l3.shape(),
                self.heads
            );
        }
        if s1.dtype() != DType::F32 {
            candle_core::bail!("{name}: f32 only, got {:?}", s1.dtype());
        }
        let out = self.run(
            contiguous_slice(s1, l1, name)?,
            contiguous_slice(s2, l2, name)?,
            contiguous_slice(s3, l3, name)?,
            (pairs, n, m, d),
        );
        let batch = pairs / self.heads;
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, n, self.heads * d)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device};

    /// The blocked kernel gives candle's softmax(scale·q·kᵀ)·v with the heads merged, for key
    /// counts that make one block and several (with a partial last block).
    #[test]
    fn matches_the_unblocked_formula() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (batch, heads, n, m, d) in [(2, 3, 37, 29, 8), (1, 2, 600, 4096, 8)] {
            let pairs = batch * heads;
            let q = Tensor::randn(0f32, 1.0, (pairs, n, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (pairs, m, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (pairs, m, d), &dev)?;
            let scale = (d as f64).powf(-0.5);
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let want = probs
                .matmul(&v)?
                .reshape((batch, heads, n, d))?
                .transpose(1, 2)?
                .reshape((batch, n, heads * d))?;
            let got = attention(&q, &k, &v, heads, scale)?;
            assert_eq!(got.dims(), want.dims());
            let err = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(
                err < 1e-5,
                "{batch}×{heads} heads, {n} queries, {m} keys: {err}"
            );
        }
        // In bf16: the formula on rounded q, k, v and probabilities, up to f32 summation order.
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        for (batch, heads, n, m, d) in [(2, 3, 37, 29, 40), (1, 2, 600, 4096, 64)] {
            let pairs = batch * heads;
            let q = Tensor::randn(0f32, 1.0, (pairs, n, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (pairs, m, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (pairs, m, d), &dev)?;
            let scale = (d as f64).powf(-0.5);
            let scores = (round(&q)?.matmul(&round(&k)?.t()?)? * scale)?;
            let probs = round(&candle_nn::ops::softmax(&scores, D::Minus1)?)?;
            let want = probs
                .matmul(&round(&v)?)?
                .reshape((batch, heads, n, d))?
                .transpose(1, 2)?
                .reshape((batch, n, heads * d))?;
            let got = gemm_bf16::scoped(true, || attention(&q, &k, &v, heads, scale))?;
            let err = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            // A score differing in the last f32 bit can round its probability to a neighbouring
            // bf16 value (2⁻⁸ relative): bounded by that, not by f32's epsilon.
            assert!(
                err < 2e-3,
                "bf16: {batch}×{heads} heads, {n} queries, {m} keys: {err}"
            );
        }
        // Shapes that do not fit the head count are named.
        let q = Tensor::zeros((3, 4, 8), DType::F32, &dev)?;
        let err = attention(&q, &q, &q, 2, 1.0).unwrap_err().to_string();
        assert!(err.contains("heads"), "{err}");
        Ok(())
    }
}
