//! Multi-head attention on the CPU in query blocks that stay in cache.
//!
//! `softmax(scale·q·kᵀ)·v` for every (image, head) pair, as the generic path computes it (the
//! same GEMMs and the same vectorised softmax, so the same values), but a block of query rows at
//! a time on one thread: the block's scores (`rows × keys`, up to 4 MiB) are written, normalised
//! and multiplied by `v` while they sit in the core's cache, where the generic path writes
//! megabytes of scores per head to memory and reads them back twice, and copies the heads' outputs
//! together afterwards. Each block's output lands directly in its place in `[B, N, H·d]`, the
//! layout the output projection reads.
//!
//! The operands are read where they are: heads-major (`[B·H, N, d]`, [`attention`]) or, as the
//! projections write them, token-major (`[B, N, width]` with head `h`'s `d` columns at `offset +
//! h·d`, [`attention_token_major`]), so that self-attention reads its queries, keys and values
//! straight from the one fused projection instead of copying them apart first (at 4,096 tokens,
//! batch 3, that copy moved 47 MB each way per layer).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::gemm_bf16::{self, PackedA, PackedB};
use super::{
    SharedMut, contiguous_slice, cpu_kernels, cuda_kernels, for_each_range, simd, thread_count,
};

/// Scores per block, in f32 values (4 MiB): at 4,096 keys, 256 query rows. Measured on the
/// sd-turbo UNet at 512², batch 3: 1 MiB blocks 10.3–10.4 s, 4 MiB 9.8–9.9 s, 8 MiB 9.9–10.0 s.
const BLOCK_SCORES: usize = 1 << 20;
/// Fewest query rows per block (the GEMMs need some height to reach their speed).
const MIN_ROWS: usize = 16;
/// Tasks per thread the blocks aim for, so that uneven splits cost little.
const TASKS_PER_THREAD: usize = 4;

/// Whether [`attention`] runs for these tensors on the CPU: f32 on the CPU kernels.
pub fn applies(q: &Tensor) -> bool {
    cpu_kernels(q.device()) && q.dtype() == DType::F32
}

/// Whether [`attention`] and [`attention_token_major`] run for queries `q` with heads of
/// `head_dim` values: on the CPU kernels ([`applies`]) or as the fused CUDA kernel
/// ([`fused_on_cuda`]).
pub fn runs_for(q: &Tensor, head_dim: usize) -> bool {
    applies(q) || fused_on_cuda(q, head_dim)
}

/// The padded head dimensions the fused CUDA kernel is built for (attention.cu's entry
/// points): SD 1.5's 40, 80 and 160, SD 2.1's and SDXL's 64, 128, and 16 (the tiny test
/// checkpoints' 8 and 16, so that their golden streams run it).
const CUDA_HEAD_DIMS: [usize; 6] = [16, 48, 64, 80, 128, 160];

/// The kernel's padded head dimension for heads of `d` values (a multiple of 8), if it has one.
fn padded_head_dim(d: usize) -> Option<usize> {
    if d == 0 || !d.is_multiple_of(8) {
        return None;
    }
    let dp = d.div_ceil(16) * 16;
    CUDA_HEAD_DIMS.contains(&dp).then_some(dp)
}

/// Whether the fused CUDA kernel (attention.cu) runs for queries `q` with heads of `head_dim`:
/// f16 or bf16 on a CUDA device with sdstream's kernels on ([`cuda_kernels`]), a head
/// dimension it is built for, and the current [`crate::KernelPolicy`] allowing it
/// (`SDSTREAM_CUDA_ATTENTION` not `0`). f32 keeps the unfused path: tensor cores would round its
/// operands to TF32, and the f32 goldens hold on the device only without that.
pub fn fused_on_cuda(q: &Tensor, head_dim: usize) -> bool {
    cuda_kernels(q.device())
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && padded_head_dim(head_dim).is_some_and(|dp| fits_on_device(q.device(), dp))
        && crate::KernelPolicy::current().cuda_attention
}

/// Whether the WMMA kernel's shared memory for padded head dimension `dp` fits one block of
/// `device` (at 160, 89 KiB: every GPU with bf16 tensor cores has at least 99 KiB, but the
/// limit is read, not assumed).
#[cfg(feature = "cuda")]
fn fits_on_device(device: &candle_core::Device, dp: usize) -> bool {
    match device {
        candle_core::Device::Cuda(dev) => {
            cuda::shared_limit(dev).is_ok_and(|limit| cuda::shared_bytes(dp, false) <= limit)
        }
        _ => false,
    }
}

#[cfg(not(feature = "cuda"))]
fn fits_on_device(_: &candle_core::Device, _: usize) -> bool {
    false
}

/// Attention of `q` `[B·H, N, d]` over `k`, `v` `[B·H, M, d]` (heads-major pairs), with the
/// heads merged back: `[B, N, H·d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    AttentionOp::apply(q, k, v, (heads, scale), Arrangement::HeadsMajor)
}

/// One operand of [`attention_token_major`]: a `[B, tokens, width]` tensor whose head `h` is
/// columns `offset + h·d .. offset + (h + 1)·d`.
#[derive(Clone, Copy)]
pub struct TokenMajor<'a> {
    /// The `[B, tokens, width]` tensor (several operands may share one, as a fused QKV does).
    pub tensor: &'a Tensor,
    /// The column where this operand's first head starts.
    pub offset: usize,
}

/// Attention of `heads` heads of `head_dim` values each, read in place from token-major
/// operands (queries `[B, N, ·]`, keys and values `[B, M, ·]`; keys and values may be one
/// tensor, and so may all three), heads merged: `[B, N, H·d]`.
pub fn attention_token_major(
    q: TokenMajor<'_>,
    k: TokenMajor<'_>,
    v: TokenMajor<'_>,
    heads: usize,
    head_dim: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let arrangement = Arrangement::TokenMajor {
        head_dim,
        offsets: [q.offset, k.offset, v.offset],
    };
    AttentionOp::apply(q.tensor, k.tensor, v.tensor, (heads, scale), arrangement)
}

/// How the operands hold their heads.
#[derive(Clone, Copy)]
enum Arrangement {
    /// `[B·H, tokens, d]`.
    HeadsMajor,
    /// `[B, tokens, width]`, head `h` at columns `offset + h·d` (one offset per operand).
    TokenMajor {
        head_dim: usize,
        offsets: [usize; 3],
    },
}

/// Where an operand's rows lie in its buffer: row `r` of image `i`, head `h` starts at
/// `i·image_stride + h·head_stride + r·row_stride + offset`, and is `d` values long.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rows {
    image_stride: usize,
    head_stride: usize,
    row_stride: usize,
    offset: usize,
}

impl Rows {
    pub(crate) fn heads_major(heads: usize, tokens: usize, d: usize) -> Self {
        Self {
            image_stride: heads * tokens * d,
            head_stride: tokens * d,
            row_stride: d,
            offset: 0,
        }
    }

    pub(crate) fn token_major(tokens: usize, width: usize, d: usize, offset: usize) -> Self {
        Self {
            image_stride: tokens * width,
            head_stride: d,
            row_stride: width,
            offset,
        }
    }

    fn at(&self, image: usize, head: usize, row: usize) -> usize {
        image * self.image_stride + head * self.head_stride + row * self.row_stride + self.offset
    }

    /// The values `rows` rows of (image, head) span from their first: what a slice of them
    /// must hold.
    fn span(&self, rows: usize, d: usize) -> usize {
        if rows == 0 {
            0
        } else {
            (rows - 1) * self.row_stride + d
        }
    }
}

/// The operands' sizes: images, heads, queries, keys, values per head.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) batch: usize,
    pub(crate) heads: usize,
    pub(crate) n: usize,
    pub(crate) m: usize,
    pub(crate) d: usize,
}

/// One tensor of cuDNN's attention graph (cudnn_attention.rs): dims and strides in cuDNN's
/// order (image, head, then the matrix's rows and columns), in values, and where its first
/// value lies in its operand (values from the layout's start).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GraphOperand {
    pub(crate) dims: [i64; 4],
    pub(crate) strides: [i64; 4],
    pub(crate) offset: usize,
}

/// cuDNN's four tensors for attention of `dims` over operands whose rows lie as `rows` (q, k,
/// v): q as `[B, H, N, d]`; k as kᵀ `[B, H, d, M]`, the same values with the last two strides
/// swapped (cuDNN's graph multiplies q by kᵀ as it is described); v `[B, H, M, d]`; and the
/// output `[B, H, N, d]` with the strides of `[B, N, H·d]`, the layout the output projection
/// reads.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) fn cudnn_operands(dims: Dims, rows: [Rows; 3]) -> [GraphOperand; 4] {
    let Dims {
        batch,
        heads,
        n,
        m,
        d,
    } = dims;
    let i = |v: usize| v as i64;
    let matrix = |r: &Rows, tokens: usize, transposed: bool| {
        let (dims, strides) = if transposed {
            (
                [batch, heads, d, tokens],
                [r.image_stride, r.head_stride, 1, r.row_stride],
            )
        } else {
            (
                [batch, heads, tokens, d],
                [r.image_stride, r.head_stride, r.row_stride, 1],
            )
        };
        GraphOperand {
            dims: dims.map(i),
            strides: strides.map(i),
            offset: r.offset,
        }
    };
    let out = GraphOperand {
        dims: [batch, heads, n, d].map(i),
        strides: [n * heads * d, d, heads * d, 1].map(i),
        offset: 0,
    };
    [
        matrix(&rows[0], n, false),
        matrix(&rows[1], m, true),
        matrix(&rows[2], m, false),
        out,
    ]
}

/// `graph` with its batch left out (the batch dimension 0, the offsets 0): what every batch of
/// one geometry has in common, since no stride depends on the batch. The key of the kernel
/// cache that plans of several rows share (`cudnn_attention`).
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) fn batchless(graph: [GraphOperand; 4]) -> [GraphOperand; 4] {
    graph.map(|mut g| {
        g.dims[0] = 0;
        g.offset = 0;
        g
    })
}

struct AttentionOp {
    heads: usize,
    scale: f64,
    /// Both products on bf16 operands with f32 sums ([`gemm_bf16`]); the softmax stays f32.
    bf16: bool,
    arrangement: Arrangement,
}

impl AttentionOp {
    /// The op on these operands, bf16 products where the thread's scope asks for them.
    fn apply(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (heads, scale): (usize, f64),
        arrangement: Arrangement,
    ) -> candle_core::Result<Tensor> {
        let op = Self {
            heads,
            scale,
            bf16: gemm_bf16::active(),
            arrangement,
        };
        q.contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
    }

    fn run(&self, (q, k, v): (&[f32], &[f32], &[f32]), rows: [Rows; 3], dims: Dims) -> Vec<f32> {
        let Dims {
            batch,
            heads,
            n,
            m,
            d,
        } = dims;
        let [q_rows, k_rows, v_rows] = rows;
        let pairs = batch * heads;
        let row_len = heads * d;
        let mut out = vec![0f32; pairs * n * d];
        if out.is_empty() {
            return out;
        }
        let rows = block_rows(pairs, n, m, super::threads());
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
                let q_at = q_rows.at(image, head, r0);
                let (k_at, v_at) = (k_rows.at(image, head, 0), v_rows.at(image, head, 0));
                let dst_at = (image * n + r0) * row_len + head * d;
                if let Some(packed) = &mut packed {
                    packed.run(
                        (
                            pair,
                            (&k[k_at..][..k_rows.span(m, d)], k_rows.row_stride),
                            (&v[v_at..][..v_rows.span(m, d)], v_rows.row_stride),
                            (m, d),
                        ),
                        (&q[q_at..][..q_rows.span(nr, d)], q_rows.row_stride),
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
                // SAFETY: scores holds nr × m values (row stride m); q's block is nr rows of d
                // values (row stride q_rows.row_stride); kᵀ is read from k's m rows of (image,
                // head) with strides swapped. cpu_fwd checked that every such row lies inside
                // its operand.
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
                        q_rows.row_stride as isize,
                        k.as_ptr().add(k_at),
                        k_rows.row_stride as isize,
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
                // scores are nr × m (row stride m), v's rows of (image, head) m × d (row stride
                // v_rows.row_stride, checked in cpu_fwd).
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
                        v.as_ptr().add(v_at),
                        1,
                        v_rows.row_stride as isize,
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

/// Query rows per task: as many as fit [`BLOCK_SCORES`], but few enough that the `pairs` ×
/// blocks tasks give each of `threads` threads [`TASKS_PER_THREAD`] (a UNet's top level at 256²
/// has 5 heads of 1,024 queries: 5 whole-pair tasks would leave one of 2 threads idle a sixth
/// of the time), and never fewer than [`MIN_ROWS`].
fn block_rows(pairs: usize, n: usize, m: usize, threads: usize) -> usize {
    let by_memory = (BLOCK_SCORES / m.max(1)).max(MIN_ROWS);
    let blocks_wanted = (threads * TASKS_PER_THREAD).div_ceil(pairs.max(1));
    let by_balance = n.div_ceil(blocks_wanted).max(MIN_ROWS);
    by_memory.min(by_balance).min(n).max(1)
}

/// An operand's rows of one (image, head) pair and their row stride.
type StridedRows<'a> = (&'a [f32], usize);

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
    /// `k`, `v` and `q` come with their row strides.
    fn run(
        &mut self,
        (pair, (k, k_stride), (v, v_stride), (m, d)): (
            usize,
            StridedRows,
            StridedRows,
            (usize, usize),
        ),
        (q, q_stride): StridedRows,
        scores: &mut [f32],
        scale: f32,
        multiply_v: impl FnOnce(&PackedA, &PackedB),
    ) {
        if self.pair != Some(pair) {
            self.keys.repack_transposed(k, m, d, k_stride, 1);
            self.values.repack_rows(v, m, d, v_stride, 1);
            self.pair = Some(pair);
        }
        let rows = scores.len() / m;
        self.queries.repack(q, rows, d, q_stride, 1);
        // SAFETY: `scores` holds rows × m values; both operands have d columns/rows.
        unsafe { gemm_bf16::gemm_into(&self.queries, &self.keys, scores.as_mut_ptr(), m, 1) };
        for row in scores.chunks_exact_mut(m) {
            simd::softmax_row(row, scale);
        }
        self.probabilities.repack(scores, rows, m, m, 1);
        multiply_v(&self.probabilities, &self.values);
    }
}

impl AttentionOp {
    /// The operands' sizes and where each one's rows lie, from their shapes; an error naming
    /// the shapes when they do not fit the op's heads (or its arrangement's offsets).
    fn layout(
        &self,
        l1: &Layout,
        l2: &Layout,
        l3: &Layout,
    ) -> candle_core::Result<(Dims, [Rows; 3])> {
        let name = self.name();
        let heads = self.heads;
        let misfit = || {
            candle_core::Error::Msg(format!(
                "{name}: q {:?}, k {:?}, v {:?} do not fit {heads} heads",
                l1.shape(),
                l2.shape(),
                l3.shape(),
            ))
        };
        let (q_dims, k_dims, v_dims) = (
            l1.shape().dims3()?,
            l2.shape().dims3()?,
            l3.shape().dims3()?,
        );
        if heads == 0 || k_dims.1 != v_dims.1 || k_dims.0 != q_dims.0 || v_dims.0 != q_dims.0 {
            return Err(misfit());
        }
        match self.arrangement {
            Arrangement::HeadsMajor => {
                let (pairs, n, d) = q_dims;
                let m = k_dims.1;
                if k_dims != (pairs, m, d) || v_dims != k_dims || !pairs.is_multiple_of(heads) {
                    return Err(misfit());
                }
                let batch = pairs / heads;
                let rows = [
                    Rows::heads_major(heads, n, d),
                    Rows::heads_major(heads, m, d),
                    Rows::heads_major(heads, m, d),
                ];
                let dims = Dims {
                    batch,
                    heads,
                    n,
                    m,
                    d,
                };
                Ok((dims, rows))
            }
            Arrangement::TokenMajor { head_dim, offsets } => {
                let (batch, n, m) = (q_dims.0, q_dims.1, k_dims.1);
                let widths = [q_dims.2, k_dims.2, v_dims.2];
                if head_dim == 0 || (0..3).any(|i| offsets[i] + heads * head_dim > widths[i]) {
                    return Err(misfit());
                }
                let tokens = [n, m, m];
                let rows = std::array::from_fn(|i| {
                    Rows::token_major(tokens[i], widths[i], head_dim, offsets[i])
                });
                let dims = Dims {
                    batch,
                    heads,
                    n,
                    m,
                    d: head_dim,
                };
                Ok((dims, rows))
            }
        }
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
        let (dims, rows) = self.layout(l1, l2, l3)?;
        if s1.dtype() != DType::F32 {
            candle_core::bail!("{name}: f32 only, got {:?}", s1.dtype());
        }
        let out = self.run(
            (
                contiguous_slice(s1, l1, name)?,
                contiguous_slice(s2, l2, name)?,
                contiguous_slice(s3, l3, name)?,
            ),
            rows,
            dims,
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from((dims.batch, dims.n, self.heads * dims.d)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (dims, rows) = self.layout(l1, l2, l3)?;
        cuda::forward(self.scale, dims, rows, [(s1, l1), (s2, l2), (s3, l3)])
    }
}

/// The fused attention kernel (attention.cu, compiled to PTX by build.rs): tensor-core
/// products in f16 or bf16 with f32 sums, the scores never in memory. Its portable twin is
/// the CPU kernel above (the same arrangements, the same formula in f32).
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::sys::{
        CUdevice_attribute, CUfunction_attribute_enum,
    };
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Shape};
    use std::sync::Mutex;

    use super::{Dims, Rows};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const MODULE: &str = "sdstream_attention";
    /// attention.cu's block: query rows, keys per tile, threads, warps.
    const BLOCK_ROWS: usize = 64;
    const BLOCK_KEYS: usize = 64;
    const THREADS: u32 = 128;
    const WARPS: usize = 4;
    /// Shared memory a kernel may use without asking for more.
    const DEFAULT_SHARED: usize = 48 * 1024;

    /// The most dynamic shared memory one block may ask for on `dev` (the opt-in limit: 227 KiB
    /// on Hopper, 163 KiB on the A100, 99 KiB on Ampere's and Ada's other parts), read once per
    /// device.
    pub(super) fn shared_limit(dev: &CudaDevice) -> candle_core::Result<usize> {
        static LIMITS: Mutex<Vec<(DeviceId, usize)>> = Mutex::new(Vec::new());
        let mut limits = LIMITS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, limit)) = limits.iter().find(|(id, _)| *id == dev.id()) {
            return Ok(*limit);
        }
        let limit = dev
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .w()?;
        let limit = usize::try_from(limit).unwrap_or(0);
        limits.push((dev.id(), limit));
        Ok(limit)
    }

    /// Says once per device and head dimension that the register kernel does not fit.
    fn note_flash_too_large(dev: &CudaDevice, dp: usize, limit: usize) {
        static SAID: Mutex<Vec<(DeviceId, usize)>> = Mutex::new(Vec::new());
        let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
        if !said.contains(&(dev.id(), dp)) {
            said.push((dev.id(), dp));
            tracing::warn!(
                "the register attention kernel needs {} bytes of shared memory for heads padded \
                 to {dp}, more than this GPU's {limit}: the WMMA kernel runs them instead",
                shared_bytes(dp, true)
            );
        }
    }

    /// attention.cu's shared memory for padded head dimension `dp`. The WMMA kernel
    /// (`attention_*`, its `Smem<DP>::TOTAL`): q, k and v tiles with rows of `dp + 8`, each
    /// warp's f32 scores (rows of 68) and probabilities (rows of 72). The register kernel
    /// (`flash_attention_*`, its `FlashSmem<DP>::TOTAL`): the q tile and two k and two v tiles
    /// (double-buffered), rows of `dp + 8`.
    pub(super) fn shared_bytes(dp: usize, registers: bool) -> usize {
        if registers {
            return (BLOCK_ROWS + 4 * BLOCK_KEYS) * (dp + 8) * 2;
        }
        let tiles = (BLOCK_ROWS + 2 * BLOCK_KEYS) * (dp + 8) * 2;
        let scores = WARPS * 16 * (BLOCK_KEYS + 4) * 4;
        let probabilities = WARPS * 16 * (BLOCK_KEYS + 8) * 2;
        tiles + scores + probabilities
    }

    pub(super) fn forward(
        scale: f64,
        dims: Dims,
        rows: [Rows; 3],
        operands: [(&CudaStorage, &Layout); 3],
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        // cuDNN's fused attention first where the kernel policy asks for it; attention.cu's
        // kernel where cuDNN refuses the geometry (said once per thread and geometry).
        #[cfg(feature = "cudnn")]
        if crate::KernelPolicy::current().cuda_cudnn_attention {
            let graph = super::cudnn_operands(dims, rows);
            let shape = Shape::from((dims.batch, dims.n, dims.heads * dims.d));
            match crate::cudnn_attention::forward(scale, graph, shape, operands) {
                Ok(Some(out)) => return Ok(out),
                // Refused: said when the plan was.
                Ok(None) => {}
                Err(e) => crate::cudnn_attention::note_refusal(&graph, &e),
            }
        }
        let dp = super::padded_head_dim(dims.d).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "sdstream-attention: no CUDA kernel for head dimension {}",
                dims.d
            ))
        })?;
        match operands[0].0.dtype() {
            DType::F16 => run::<half::f16>(scale, dims, rows, operands, ("f16", dp)),
            DType::BF16 => run::<half::bf16>(scale, dims, rows, operands, ("bf16", dp)),
            other => candle_core::bail!("sdstream-attention: no CUDA kernel for {other:?}"),
        }
    }

    fn run<T: CudaDType + DeviceRepr>(
        scale: f64,
        dims: Dims,
        rows: [Rows; 3],
        operands: [(&CudaStorage, &Layout); 3],
        (suffix, dp): (&str, usize),
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Dims {
            batch,
            heads,
            n,
            m,
            d,
        } = dims;
        let shape = Shape::from((batch, n, heads * d));
        let dev = operands[0].0.device().clone();
        // SAFETY: every element is written by the launch below (each (image, query row, head)
        // by the block and warp that own the row) before anything reads it.
        let dst = unsafe { dev.alloc::<T>(shape.elem_count())? };
        if shape.elem_count() == 0 {
            return Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape));
        }
        if m == 0 {
            candle_core::bail!("sdstream-attention: no keys to attend to");
        }
        // The kernel reads 8 values (16 bytes) at a time: every row must start at a multiple of 8.
        let mut views = Vec::with_capacity(3);
        for (i, (storage, layout)) in operands.iter().enumerate() {
            let at = layout.start_offset() + rows[i].offset;
            let r = &rows[i];
            if d % 8 != 0
                || [at, r.image_stride, r.head_stride, r.row_stride]
                    .iter()
                    .any(|x| x % 8 != 0)
            {
                candle_core::bail!(
                    "sdstream-attention: the CUDA kernel reads rows at multiples of 8 values; \
                     operand {i} starts at {at} with strides {r:?}"
                )
            }
            if !layout.is_contiguous() {
                candle_core::bail!("sdstream-attention: operand {i} is not contiguous")
            }
            views.push(storage.as_cuda_slice::<T>()?.slice(at..));
        }
        // The register kernel where the kernel policy asks for it (`SDSTREAM_CUDA_FLASH_ATTENTION`)
        // and its double-buffered tiles fit one block of this device (at 160, 105 KiB: more
        // than Ampere's and Ada's consumer parts allow); the WMMA kernel otherwise.
        let limit = shared_limit(&dev)?;
        let registers = crate::KernelPolicy::current().cuda_flash_attention && {
            let fits = shared_bytes(dp, true) <= limit;
            if !fits {
                note_flash_too_large(&dev, dp, limit);
            }
            fits
        };
        let name = if registers {
            format!("flash_attention_{suffix}_{dp}")
        } else {
            format!("attention_{suffix}_{dp}")
        };
        let shared = shared_bytes(dp, registers);
        if shared > limit {
            candle_core::bail!(
                "sdstream-attention: heads of {d} values need {shared} bytes of shared memory \
                 a block; this GPU allows {limit}"
            )
        }
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        // The limit is a property of the loaded function, so it is read from the function on
        // every call: two threads' first calls can each load the module (candle's map keeps
        // the later copy), and a setting remembered by name would then belong to a function
        // no longer in use. Reading it is a host call; setting it is no stream operation, so
        // it is allowed while a CUDA graph is being captured (where it is never needed: the
        // graph's eager pass comes first).
        if shared > DEFAULT_SHARED {
            let attribute =
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            if func.get_attribute(attribute).w()? < shared as i32 {
                func.set_attribute(attribute, shared as i32).w()?;
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(BLOCK_ROWS) as u32, heads as u32, batch as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let (n_, m_, heads_, d_) = (n as i32, m as i32, heads as i32, d as i32);
        let strides: Vec<i64> = rows
            .iter()
            .flat_map(|r| {
                [
                    r.image_stride as i64,
                    r.head_stride as i64,
                    r.row_stride as i64,
                ]
            })
            .collect();
        let scale = scale as f32;
        let mut builder = func.builder();
        builder.arg(&views[0]);
        builder.arg(&views[1]);
        builder.arg(&views[2]);
        builder.arg(&dst);
        builder.arg(&n_);
        builder.arg(&m_);
        builder.arg(&heads_);
        builder.arg(&d_);
        for stride in &strides {
            builder.arg(stride);
        }
        builder.arg(&scale);
        // SAFETY: the arguments match attention.cu's parameters one for one. layout() checked
        // that every head's rows lie inside its operand (offset + heads·d within each row's
        // width, tokens within the shape); the kernel reads rows below n and m and columns below
        // d only, and writes out [batch, n, heads·d], which dst holds.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device};

    /// cuDNN's graph tensors address the values the kernels read: for every (image, head, row,
    /// column) of q, k and v, the tensor's offset plus its strides give `Rows::at` plus the
    /// column (kᵀ with row and column swapped), and the output's give `[B, N, H·d]`'s index.
    #[test]
    fn cudnn_operands_address_the_kernels_values() {
        let (batch, heads, n, m, d) = (2, 3, 5, 7, 8);
        let width = heads * d;
        let dims = Dims {
            batch,
            heads,
            n,
            m,
            d,
        };
        let arrangements = [
            // A fused q/k/v projection (self-attention's shape needs n == m: keys of 5 here).
            [
                Rows::token_major(n, 3 * width, d, 0),
                Rows::token_major(m, 2 * width + 8, d, 8),
                Rows::token_major(m, 2 * width + 8, d, width + 8),
            ],
            [
                Rows::heads_major(heads, n, d),
                Rows::heads_major(heads, m, d),
                Rows::heads_major(heads, m, d),
            ],
        ];
        let mut checked = 0;
        for rows in arrangements {
            let graph = cudnn_operands(dims, rows);
            let at = |g: &GraphOperand, idx: [usize; 4]| {
                g.offset as i64 + (0..4).map(|i| idx[i] as i64 * g.strides[i]).sum::<i64>()
            };
            for image in 0..batch {
                for head in 0..heads {
                    for col in 0..d {
                        for row in 0..n {
                            let want = (rows[0].at(image, head, row) + col) as i64;
                            assert_eq!(at(&graph[0], [image, head, row, col]), want, "q");
                            let out = ((image * n + row) * width + head * d + col) as i64;
                            assert_eq!(at(&graph[3], [image, head, row, col]), out, "out");
                            checked += 2;
                        }
                        for key in 0..m {
                            let k = (rows[1].at(image, head, key) + col) as i64;
                            assert_eq!(at(&graph[1], [image, head, col, key]), k, "kᵀ");
                            let v = (rows[2].at(image, head, key) + col) as i64;
                            assert_eq!(at(&graph[2], [image, head, key, col]), v, "v");
                            checked += 2;
                        }
                    }
                }
            }
            assert_eq!(graph[0].dims, [2, 3, 5, 8]);
            assert_eq!(graph[1].dims, [2, 3, 8, 7]);
            assert_eq!(graph[2].dims, [2, 3, 7, 8]);
            assert_eq!(graph[3].dims, [2, 3, 5, 8]);
        }
        assert_eq!(checked, 2 * batch * heads * d * 2 * (n + m));
    }

    /// Every batch of one geometry gives cuDNN the same operands but for the batch (the kernel
    /// cache that plans of several rows share is keyed so), in both arrangements; another
    /// geometry (other keys, other heads) does not.
    #[test]
    fn a_geometrys_operands_differ_only_in_their_batch() {
        let (heads, n, d) = (5, 64, 64);
        let width = heads * d;
        let arrangements = |m: usize| {
            [
                [
                    Rows::token_major(n, 3 * width, d, 0),
                    Rows::token_major(m, 3 * width, d, width),
                    Rows::token_major(m, 3 * width, d, 2 * width),
                ],
                [
                    Rows::heads_major(heads, n, d),
                    Rows::heads_major(heads, m, d),
                    Rows::heads_major(heads, m, d),
                ],
            ]
        };
        let dims = |batch, heads, m| Dims {
            batch,
            heads,
            n,
            m,
            d,
        };
        let mut keys = Vec::new();
        for rows in arrangements(n) {
            let key = batchless(cudnn_operands(dims(1, heads, n), rows));
            for batch in 1..=8 {
                let graph = cudnn_operands(dims(batch, heads, n), rows);
                assert!(graph.iter().all(|g| g.dims[0] == batch as i64), "{graph:?}");
                assert_eq!(batchless(graph), key, "batch {batch}");
            }
            keys.push(key);
        }
        assert_ne!(
            keys[0], keys[1],
            "the arrangements are geometries of their own"
        );
        let [token_major, heads_major] = arrangements(77);
        let fewer_keys = [
            batchless(cudnn_operands(dims(2, heads, 77), token_major)),
            batchless(cudnn_operands(dims(2, heads, 77), heads_major)),
        ];
        assert!(fewer_keys.iter().all(|k| !keys.contains(k)), "77 keys");
        let other_heads = batchless(cudnn_operands(
            dims(2, 10, n),
            [
                Rows::heads_major(10, n, d),
                Rows::heads_major(10, n, d),
                Rows::heads_major(10, n, d),
            ],
        ));
        assert!(!keys.contains(&other_heads), "10 heads");
    }

    /// Blocks give every thread several tasks where the rows allow, within the memory bound.
    #[test]
    fn blocks_spread_over_the_threads() {
        let tasks =
            |pairs, n: usize, m, threads| pairs * n.div_ceil(block_rows(pairs, n, m, threads));
        // The UNet's top level at 256², batch 1: 5 heads of 1,024 queries and keys.
        assert_eq!(block_rows(5, 1024, 1024, 2), 512);
        assert_eq!(tasks(5, 1024, 1024, 2), 10);
        assert_eq!(tasks(5, 1024, 77, 16), 65);
        // At 512² the memory bound decides: 4 MiB of scores is 256 rows of 4,096 keys.
        assert_eq!(block_rows(5, 4096, 4096, 2), 256);
        // Small problems keep MIN_ROWS, or all their rows.
        assert_eq!(block_rows(20, 64, 64, 2), 64);
        assert_eq!(block_rows(1, 40, 64, 16), MIN_ROWS);
        assert_eq!(block_rows(1, 5, 64, 16), 5);
    }

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

    /// Read in place from token-major projections (self-attention's fused `[B, N, 3·H·d]`, and
    /// cross-attention's `q` beside a `[B, M, 2·H·d]` key/value projection), in f32 and bf16,
    /// the kernel gives what it gives on the same values copied apart heads-major.
    #[test]
    fn token_major_operands_match_heads_major_ones() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let heads_major = |t: &Tensor, parts: usize, part: usize, heads: usize, d: usize| {
            let (b, tokens, _) = t.dims3()?;
            t.reshape((b, tokens, parts, heads, d))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?
                .get(part)?
                .reshape((b * heads, tokens, d))
        };
        let largest_difference = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        for bf16 in [false, true] {
            for (batch, heads, n, m, d) in [(2, 3, 37, 29, 8), (1, 5, 300, 77, 64)] {
                let view = |tensor, offset| TokenMajor { tensor, offset };
                let scale = (d as f64).powf(-0.5);
                let (hd, run) = (heads * d, |f: &dyn Fn() -> candle_core::Result<Tensor>| {
                    gemm_bf16::scoped(bf16, f)
                });
                // Self-attention: q, k and v side by side in one tensor.
                let qkv = Tensor::randn(0f32, 1.0, (batch, n, 3 * hd), &dev)?;
                let got = run(&|| {
                    attention_token_major(
                        view(&qkv, 0),
                        view(&qkv, hd),
                        view(&qkv, 2 * hd),
                        heads,
                        d,
                        scale,
                    )
                })?;
                let (q, k, v) = (
                    heads_major(&qkv, 3, 0, heads, d)?,
                    heads_major(&qkv, 3, 1, heads, d)?,
                    heads_major(&qkv, 3, 2, heads, d)?,
                );
                let want = run(&|| attention(&q, &k, &v, heads, scale))?;
                assert_eq!(got.dims(), &[batch, n, hd]);
                let err = largest_difference(&got, &want)?;
                assert!(err <= 1e-6, "self, bf16 {bf16}, {heads} heads: {err}");
                // Cross-attention: q alone, keys and values in one projection.
                let q = Tensor::randn(0f32, 1.0, (batch, n, hd), &dev)?;
                let kv = Tensor::randn(0f32, 1.0, (batch, m, 2 * hd), &dev)?;
                let got = run(&|| {
                    attention_token_major(view(&q, 0), view(&kv, 0), view(&kv, hd), heads, d, scale)
                })?;
                let (k, v) = (
                    heads_major(&kv, 2, 0, heads, d)?,
                    heads_major(&kv, 2, 1, heads, d)?,
                );
                let q_heads = heads_major(&Tensor::cat(&[&q, &q], 2)?, 2, 0, heads, d)?;
                let want = run(&|| attention(&q_heads, &k, &v, heads, scale))?;
                let err = largest_difference(&got, &want)?;
                assert!(err <= 1e-6, "cross, bf16 {bf16}, {heads} heads: {err}");
            }
        }
        // Heads that pass the end of an operand's rows are named, not read.
        let qkv = Tensor::zeros((1, 4, 24), DType::F32, &dev)?;
        let view = |offset| TokenMajor {
            tensor: &qkv,
            offset,
        };
        let err = attention_token_major(view(0), view(8), view(17), 2, 4, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit 2 heads"), "{err}");
        Ok(())
    }
}
