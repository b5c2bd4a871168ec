// Fused multi-head attention on a CUDA device (kernels/src/attention.rs launches it):
// out = softmax(scale·q·kᵀ)·v for every (image, head), without the score matrix in memory.
//
// One block of 4 warps takes 64 query rows of one (image, head); each warp owns 16 of them. The
// keys and values pass through shared memory 64 rows at a time, and the products run on tensor
// cores (WMMA 16×16×16, f16 or bf16 operands, f32 sums). Two passes over the keys:
//   1. the scores of each key tile, kept in f32, give every row its maximum and the sum of its
//      exponentials (online: the sum is rescaled when the maximum grows);
//   2. the scores again, now as probabilities exp(s − max)/sum rounded once to the storage
//      type, times the values, summed in f32 accumulators that stay in registers.
// The second pass recomputes q·kᵀ (a third more products) so that the output accumulators never
// need rescaling: WMMA does not say which lane holds which element of an accumulator, so they
// can only be scaled through memory. The probabilities are normalised before the product, as
// the unfused path's softmax is, and the output is rounded once.
//
// Operands are read in place: element j of head h, token t, image b of an operand is at
// base + b·image_stride + h·head_stride + t·row_stride + j (heads-major [B·H, T, d] and the
// projections' token-major [B, T, width] are both such layouts). The head dimension d is padded
// with zeros to DP, a multiple of 16; rows past the token counts are zeros too, and keys past
// the last one get no weight. The host guarantees d % 8 == 0, every stride and base a multiple
// of 8 elements (so 16-byte loads are aligned), and DP ≥ d.
// Compiled to PTX by kernels/build.rs (feature `cuda`).
#include <mma.h>
#include <stdint.h>

#include "storage.cuh"

namespace {

using namespace nvcuda;

constexpr int ROWS_PER_WARP = 16;
constexpr int WARPS = 4;
constexpr int BLOCK_ROWS = ROWS_PER_WARP * WARPS;  // query rows per block
constexpr int BLOCK_KEYS = 64;                      // keys per tile
constexpr int THREADS = 32 * WARPS;

// Shared memory of one block, in bytes, for padded head dimension DP (the host computes the
// same figure through attention_shared_bytes_*).
template <int DP> struct Smem {
  static constexpr int LD = DP + 8;               // row stride of q, k, v tiles (elements)
  static constexpr int LDS = BLOCK_KEYS + 4;      // row stride of a warp's f32 scores
  static constexpr int LDP = BLOCK_KEYS + 8;      // row stride of a warp's probabilities
  static constexpr int Q = BLOCK_ROWS * LD * 2;   // bytes, 2-byte elements
  static constexpr int K = BLOCK_KEYS * LD * 2;
  static constexpr int V = BLOCK_KEYS * LD * 2;
  static constexpr int S = WARPS * ROWS_PER_WARP * LDS * 4;
  static constexpr int P = WARPS * ROWS_PER_WARP * LDP * 2;
  static constexpr int TOTAL = Q + K + V + S + P;
};

// Copies `rows` rows of DP values (zeros past d and past `valid` rows) from an operand into a
// shared tile with row stride LD, 8 values (16 bytes) per load.
template <typename T, int DP, int LD>
__device__ __forceinline__ void load_tile(T *__restrict__ tile, const T *__restrict__ src,
                                          const int rows, const int valid, const int d,
                                          const int64_t row_stride) {
  constexpr int CHUNKS = DP / 8;
  for (int e = threadIdx.x; e < rows * CHUNKS; e += THREADS) {
    const int r = e / CHUNKS;
    const int c = (e % CHUNKS) * 8;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (r < valid && c < d) {
      value = *reinterpret_cast<const uint4 *>(src + (int64_t)r * row_stride + c);
    }
    *reinterpret_cast<uint4 *>(tile + r * LD + c) = value;
  }
}

// A warp's 16 × BLOCK_KEYS scores q·kᵀ of the current key tile, in f32, into `scores`.
template <typename T, int DP>
__device__ __forceinline__ void tile_scores(
    const wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> (&q)[DP / 16],
    const T *__restrict__ keys, float *__restrict__ scores) {
  using S = Smem<DP>;
#pragma unroll
  for (int c = 0; c < BLOCK_KEYS / 16; ++c) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      // kᵀ's column c·16 + i is key row c·16 + i: kᵀ read column-major from k's rows.
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kt;
      wmma::load_matrix_sync(kt, keys + (c * 16) * S::LD + kk * 16, S::LD);
      wmma::mma_sync(acc, q[kk], kt, acc);
    }
    wmma::store_matrix_sync(scores + c * 16, acc, S::LDS, wmma::mem_row_major);
  }
}

template <typename T, int DP>
__device__ void attention(const T *__restrict__ q, const T *__restrict__ k,
                          const T *__restrict__ v, T *__restrict__ out, const int n, const int m,
                          const int heads, const int d, const int64_t q_image, const int64_t q_head,
                          const int64_t q_row, const int64_t k_image, const int64_t k_head,
                          const int64_t k_row, const int64_t v_image, const int64_t v_head,
                          const int64_t v_row, const float scale) {
  using S = Smem<DP>;
  SDSTREAM_DYNAMIC_SHARED(smem);
  T *q_tile = reinterpret_cast<T *>(smem);
  T *k_tile = reinterpret_cast<T *>(smem + S::Q);
  T *v_tile = reinterpret_cast<T *>(smem + S::Q + S::K);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float *scores = reinterpret_cast<float *>(smem + S::Q + S::K + S::V) + warp * ROWS_PER_WARP * S::LDS;
  T *probs = reinterpret_cast<T *>(smem + S::Q + S::K + S::V + S::S) + warp * ROWS_PER_WARP * S::LDP;

  const int row0 = blockIdx.x * BLOCK_ROWS;
  const int head = blockIdx.y, image = blockIdx.z;
  const T *q_src = q + image * q_image + head * q_head + row0 * q_row;
  const T *k_src = k + image * k_image + head * k_head;
  const T *v_src = v + image * v_image + head * v_head;

  load_tile<T, DP, S::LD>(q_tile, q_src, BLOCK_ROWS, min(BLOCK_ROWS, n - row0), d, q_row);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag[DP / 16];
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    wmma::load_matrix_sync(q_frag[kk], q_tile + (warp * ROWS_PER_WARP) * S::LD + kk * 16, S::LD);
  }

  // Each row of the warp's 16 belongs to two lanes: `row` and the half of the tile's columns
  // `half` (32 each).
  const int row = lane / 2, half = lane % 2;
  const float scale_log2 = scale * 1.4426950408889634f;  // exp(x·scale) = 2^(x·scale·log2 e)
  float row_max = -INFINITY, row_sum = 0.0f;
  const int tiles = (m + BLOCK_KEYS - 1) / BLOCK_KEYS;

  // Pass 1: each row's maximum and sum of exponentials.
  for (int t = 0; t < tiles; ++t) {
    const int key0 = t * BLOCK_KEYS;
    const int valid = min(BLOCK_KEYS, m - key0);
    __syncthreads();  // every warp is done with the previous tile
    load_tile<T, DP, S::LD>(k_tile, k_src + key0 * k_row, BLOCK_KEYS, valid, d, k_row);
    __syncthreads();
    tile_scores<T, DP>(q_frag, k_tile, scores);
    __syncwarp();
    const float *s = scores + row * S::LDS + half * 32;
    const int cols = max(0, min(32, valid - half * 32));
    float tile_max = -INFINITY;
    for (int j = 0; j < cols; ++j) tile_max = fmaxf(tile_max, s[j] * scale_log2);
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float new_max = fmaxf(row_max, tile_max);  // finite: the first tile has key 0
    float partial = 0.0f;
    for (int j = 0; j < cols; ++j) partial += exp2f(s[j] * scale_log2 - new_max);
    partial += __shfl_xor_sync(0xffffffffu, partial, 1);
    row_sum = row_sum * exp2f(row_max - new_max) + partial;
    row_max = new_max;
  }
  const float inv_sum = 1.0f / row_sum;

  // Pass 2: the normalised probabilities times the values.
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[DP / 16];
#pragma unroll
  for (int c = 0; c < DP / 16; ++c) wmma::fill_fragment(acc[c], 0.0f);
  for (int t = 0; t < tiles; ++t) {
    const int key0 = t * BLOCK_KEYS;
    const int valid = min(BLOCK_KEYS, m - key0);
    __syncthreads();
    load_tile<T, DP, S::LD>(k_tile, k_src + key0 * k_row, BLOCK_KEYS, valid, d, k_row);
    load_tile<T, DP, S::LD>(v_tile, v_src + key0 * v_row, BLOCK_KEYS, valid, d, v_row);
    __syncthreads();
    tile_scores<T, DP>(q_frag, k_tile, scores);
    __syncwarp();
    const float *s = scores + row * S::LDS + half * 32;
    T *p = probs + row * S::LDP + half * 32;
    for (int j = 0; j < 32; ++j) {
      const bool key = half * 32 + j < valid;
      p[j] = store<T>(key ? exp2f(s[j] * scale_log2 - row_max) * inv_sum : 0.0f);
    }
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < BLOCK_KEYS / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
      wmma::load_matrix_sync(p_frag, probs + kk * 16, S::LDP);
#pragma unroll
      for (int c = 0; c < DP / 16; ++c) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(v_frag, v_tile + (kk * 16) * S::LD + c * 16, S::LD);
        wmma::mma_sync(acc[c], p_frag, v_frag, acc[c]);
      }
    }
  }

  // The warp's 16 rows, 16 columns at a time through its score buffer, into out [B, N, H·d].
  const int64_t out_row = (int64_t)heads * d;
  T *dst = out + ((int64_t)image * n + row0 + warp * ROWS_PER_WARP) * out_row + (int64_t)head * d;
  const int rows_left = n - (row0 + warp * ROWS_PER_WARP);
#pragma unroll
  for (int c = 0; c < DP / 16; ++c) {
    __syncwarp();
    wmma::store_matrix_sync(scores, acc[c], S::LDS, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int r = e / 16, col = c * 16 + e % 16;
      if (r < rows_left && col < d) dst[(int64_t)r * out_row + col] = store<T>(scores[r * S::LDS + e % 16]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The register-level variant (`flash_attention_*`, kernel policy `cuda_flash_attention`): one pass
// over the keys with the online softmax held in registers, as FlashAttention-2 arranges it. The
// kernel above keeps WMMA's opaque accumulators and so moves every score through shared memory
// and reads the keys twice; on an H200 it took 0.487 ms for a 4,096-token self-attention of
// 5 heads of 64, where cuDNN's fused kernel took 0.077 ms and FlashAttention-2 0.118 ms.
//
// The products are PTX `mma.sync.m16n8k16` (f16 or bf16 operands, f32 sums), whose fragment
// layouts the PTX ISA documents, so each lane knows which scores it holds: lane l of a warp holds,
// of a 16 × 8 accumulator, rows g = l/4 and g + 8, columns 2·(l%4) and 2·(l%4) + 1. A row's
// maximum and sum need the four lanes of its quad only, and the probabilities of two adjacent
// 8-key column tiles are, as they stand in the registers, the A operand of the product with the
// values (no shared memory between the two products). Operands reach the registers through
// `ldmatrix` (`.trans` for the values, whose pairs run down the key axis); key and value tiles
// are double-buffered with `cp.async`, the next tile's copy running under this tile's products.
//
// Per block: 4 warps, 64 query rows (16 per warp), keys 64 at a time. The output accumulators are
// rescaled when a row's maximum grows and divided by the row's sum once at the end (the
// probabilities enter the product unnormalised, rounded once to the storage type). Operand
// layouts and the host's guarantees are those of the kernel above.

// The PTX instructions, each behind a function of its own; kernels/emulate/ptx.h has their
// stand-ins for the CPU (SDSTREAM_EMULATED).
#ifndef SDSTREAM_EMULATED
template <typename T> struct Mma;
template <> struct Mma<__half> {
  // D = A·B + D, A 16×16 (row), B 16×8 (col), f32 accumulators.
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t b0,
                                             const uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Two f32 values as one register of two f16, `lo` in the low half (the lower column).
  static __device__ __forceinline__ uint32_t pack(const float lo, const float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&h);
  }
};
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t b0,
                                             const uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(const float lo, const float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&h);
  }
};

__device__ __forceinline__ uint32_t shared_address(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8×8 matrices of 16-bit values from shared memory; lane l gives the address of row l%8 of
// matrix l/8 and receives, of each matrix, row l/4, columns 2·(l%4) and 2·(l%4) + 1 (`trans`:
// column l/4, rows 2·(l%4) and 2·(l%4) + 1).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *row) {
  if (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
  }
}

// 16 bytes from global to shared memory without the registers; zeros where `valid` is false (the
// source is then not read, but must still be an address of the operand).
__device__ __forceinline__ void copy16_async(void *dst, const void *src, const bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(bytes));
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING> __device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}
#endif  // SDSTREAM_EMULATED

// Row stride (elements) of the register kernel's tiles: DP + 8 makes a row (DP/8 + 1)·16 bytes, an
// odd number of 16-byte units for every DP multiple of 16, so the 8 rows of an ldmatrix phase fall
// on distinct banks.
template <int DP> struct FlashSmem {
  static constexpr int LD = DP + 8;
  static constexpr int TILE = BLOCK_KEYS * LD;  // elements of one 64-row tile
  // q, then k and v twice each (double buffering), 2-byte elements.
  static constexpr int TOTAL = (BLOCK_ROWS + 4 * BLOCK_KEYS) * LD * 2;
};

// Starts the copy of `rows` rows of DP values from an operand into a shared tile (zeros past d
// and past `valid` rows).
template <typename T, int DP>
__device__ __forceinline__ void copy_tile_async(T *__restrict__ tile, const T *__restrict__ src,
                                                const int rows, const int valid, const int d,
                                                const int64_t row_stride) {
  constexpr int CHUNKS = DP / 8;
  constexpr int LD = FlashSmem<DP>::LD;
  for (int e = threadIdx.x; e < rows * CHUNKS; e += THREADS) {
    const int r = e / CHUNKS;
    const int c = (e % CHUNKS) * 8;
    const bool inside = r < valid && c < d;
    copy16_async(tile + r * LD + c, inside ? src + (int64_t)r * row_stride + c : src, inside);
  }
}

template <typename T, int DP>
__device__ void flash_attention(const T *__restrict__ q, const T *__restrict__ k,
                                const T *__restrict__ v, T *__restrict__ out, const int n,
                                const int m, const int heads, const int d, const int64_t q_image,
                                const int64_t q_head, const int64_t q_row, const int64_t k_image,
                                const int64_t k_head, const int64_t k_row, const int64_t v_image,
                                const int64_t v_head, const int64_t v_row, const float scale) {
  using S = FlashSmem<DP>;
  constexpr int LD = S::LD;
  constexpr int KSTEPS = DP / 16;           // steps of the q·kᵀ product over the head dimension
  constexpr int OTILES = DP / 8;            // 8-column tiles of the output
  constexpr int STILES = BLOCK_KEYS / 8;    // 8-key tiles of the scores
  SDSTREAM_DYNAMIC_SHARED(smem);
  T *q_tile = reinterpret_cast<T *>(smem);
  T *k_tiles = q_tile + BLOCK_ROWS * LD;     // two tiles
  T *v_tiles = k_tiles + 2 * S::TILE;        // two tiles
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;     // the lane's row (and row + 8) and column pair

  const int row0 = blockIdx.x * BLOCK_ROWS;
  const int head = blockIdx.y, image = blockIdx.z;
  const T *q_src = q + image * q_image + head * q_head + row0 * q_row;
  const T *k_src = k + image * k_image + head * k_head;
  const T *v_src = v + image * v_image + head * v_head;
  const int tiles = (m + BLOCK_KEYS - 1) / BLOCK_KEYS;

  copy_tile_async<T, DP>(q_tile, q_src, BLOCK_ROWS, min(BLOCK_ROWS, n - row0), d, q_row);
  commit_copies();
  copy_tile_async<T, DP>(k_tiles, k_src, BLOCK_KEYS, min(BLOCK_KEYS, m), d, k_row);
  copy_tile_async<T, DP>(v_tiles, v_src, BLOCK_KEYS, min(BLOCK_KEYS, m), d, v_row);
  commit_copies();
  wait_copies<1>();  // q has arrived (the first key tile may still be on its way)
  __syncthreads();

  // The warp's 16 query rows as A fragments, one per 16 columns of the head dimension: lanes
  // 0–15 address rows 0–15 at column 0 of the step, lanes 16–31 the same rows at column 8.
  uint32_t qf[KSTEPS][4];
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    ldmatrix_x4<false>(qf[kk], q_tile + (warp * ROWS_PER_WARP + lane % 16) * LD + kk * 16 + (lane / 16) * 8);
  }

  float o[OTILES][4];
#pragma unroll
  for (int c = 0; c < OTILES; ++c) o[c][0] = o[c][1] = o[c][2] = o[c][3] = 0.0f;
  // Rows g and g + 8: the running maximum (in log2 units) and this lane's share of the sum.
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};
  const float scale_log2 = scale * 1.4426950408889634f;

  for (int t = 0; t < tiles; ++t) {
    const T *k_tile = k_tiles + (t & 1) * S::TILE;
    const T *v_tile = v_tiles + (t & 1) * S::TILE;
    if (t + 1 < tiles) {
      // The other buffer was last read in tile t − 1, which every warp has finished (the
      // barrier at the end of the loop).
      const int key1 = (t + 1) * BLOCK_KEYS;
      const int valid1 = min(BLOCK_KEYS, m - key1);
      copy_tile_async<T, DP>(k_tiles + ((t + 1) & 1) * S::TILE, k_src + key1 * k_row, BLOCK_KEYS, valid1, d, k_row);
      copy_tile_async<T, DP>(v_tiles + ((t + 1) & 1) * S::TILE, v_src + key1 * v_row, BLOCK_KEYS, valid1, d, v_row);
      commit_copies();
      wait_copies<1>();  // tile t has arrived; tile t + 1 may still be on its way
    } else {
      wait_copies<0>();
    }
    __syncthreads();

    // Scores of the warp's 16 rows and the tile's 64 keys: s[j] is the 16 × 8 accumulator of keys
    // 8j … 8j + 7. kᵀ's B fragments come from k's rows (key-major, the head dimension
    // contiguous): lanes 0–7 address keys 8j … 8j + 7 at column 16·kk, lanes 8–15 the same keys at
    // column 16·kk + 8, lanes 16–31 keys 8(j + 1) … likewise.
    float s[STILES][4];
#pragma unroll
    for (int j = 0; j < STILES; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
      for (int j = 0; j < STILES; j += 2) {
        uint32_t b[4];
        const int key = 8 * j + (lane % 8) + 8 * (lane / 16);
        ldmatrix_x4<false>(b, k_tile + key * LD + kk * 16 + 8 * ((lane / 8) % 2));
        Mma<T>::run(s[j], qf[kk], b[0], b[1]);
        Mma<T>::run(s[j + 1], qf[kk], b[2], b[3]);
      }
    }

    // The online softmax of rows g (registers 0, 1) and g + 8 (registers 2, 3).
    const int key0 = t * BLOCK_KEYS;
    const int valid = min(BLOCK_KEYS, m - key0);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < STILES; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = 8 * j + 2 * t4 + (e & 1);
        s[j][e] = key < valid ? s[j][e] * scale_log2 : -INFINITY;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[j][e]);
      }
    }
    float correction[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      // Finite: every tile has at least one key.
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      correction[r] = exp2f(row_max[r] - new_max);  // 0 on the first tile
      row_max[r] = new_max;
      row_sum[r] *= correction[r];
    }
#pragma unroll
    for (int c = 0; c < OTILES; ++c) {
      o[c][0] *= correction[0];
      o[c][1] *= correction[0];
      o[c][2] *= correction[1];
      o[c][3] *= correction[1];
    }
#pragma unroll
    for (int j = 0; j < STILES; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - row_max[e / 2]);  // masked keys: exp2(−inf) = 0
        row_sum[e / 2] += s[j][e];
      }
    }

    // Output += probabilities · values, 16 keys a step. The probabilities of key tiles 2kk and
    // 2kk + 1 are the A fragment as they stand. v's B fragments come transposed from its rows:
    // lanes 0–7 address keys 16kk … 16kk + 7 at column 8c, lanes 8–15 keys 16kk + 8 … at column
    // 8c, lanes 16–31 the same keys at column 8(c + 1).
#pragma unroll
    for (int kk = 0; kk < BLOCK_KEYS / 16; ++kk) {
      const uint32_t a[4] = {
          Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]), Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
          Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]), Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int c = 0; c < OTILES; c += 2) {
        uint32_t b[4];
        const int key = 16 * kk + (lane % 8) + 8 * ((lane / 8) % 2);
        ldmatrix_x4<true>(b, v_tile + key * LD + 8 * c + 8 * (lane / 16));
        Mma<T>::run(o[c], a, b[0], b[1]);
        Mma<T>::run(o[c + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this tile's buffers before they are refilled
  }

  // Each row's sum over its quad, then out [B, N, H·d] in pairs of columns.
  float inv_sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    inv_sum[r] = 1.0f / total;
  }
  const int64_t out_row = (int64_t)heads * d;
  const int first = row0 + warp * ROWS_PER_WARP + g;
  T *dst = out + ((int64_t)image * n + first) * out_row + (int64_t)head * d;
#pragma unroll
  for (int c = 0; c < OTILES; ++c) {
    const int col = 8 * c + 2 * t4;
    if (col >= d) continue;  // d is a multiple of 8: a tile is wholly inside or outside
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (first + 8 * r < n) {
        const uint32_t pair = Mma<T>::pack(o[c][2 * r] * inv_sum[r], o[c][2 * r + 1] * inv_sum[r]);
        *reinterpret_cast<uint32_t *>(dst + (int64_t)(8 * r) * out_row + col) = pair;
      }
    }
  }
}

static_assert(FlashSmem<16>::TOTAL == 15360, "register kernel's shared memory, DP 16");
static_assert(FlashSmem<64>::TOTAL == 46080, "register kernel's shared memory, DP 64");
static_assert(FlashSmem<160>::TOTAL == 107520, "register kernel's shared memory, DP 160");

// The host's figure (attention.rs, cuda::shared_bytes) for each built head dimension.
static_assert(Smem<16>::TOTAL == 35840, "shared memory, DP 16");
static_assert(Smem<48>::TOTAL == 48128, "shared memory, DP 48");
static_assert(Smem<64>::TOTAL == 54272, "shared memory, DP 64");
static_assert(Smem<80>::TOTAL == 60416, "shared memory, DP 80");
static_assert(Smem<128>::TOTAL == 78848, "shared memory, DP 128");
static_assert(Smem<160>::TOTAL == 91136, "shared memory, DP 160");

}  // namespace

// One entry point per storage type and padded head dimension, and each one's shared memory.
#define SDSTREAM_ATTENTION(T, SUFFIX, DP)                                                        \
  extern "C" __global__ void __launch_bounds__(THREADS) attention_##SUFFIX##_##DP(              \
      const T *q, const T *k, const T *v, T *out, const int n, const int m, const int heads,     \
      const int d, const int64_t q_image, const int64_t q_head, const int64_t q_row,            \
      const int64_t k_image, const int64_t k_head, const int64_t k_row, const int64_t v_image,  \
      const int64_t v_head, const int64_t v_row, const float scale) {                           \
    attention<T, DP>(q, k, v, out, n, m, heads, d, q_image, q_head, q_row, k_image, k_head,     \
                     k_row, v_image, v_head, v_row, scale);                                     \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(THREADS) flash_attention_##SUFFIX##_##DP(        \
      const T *q, const T *k, const T *v, T *out, const int n, const int m, const int heads,     \
      const int d, const int64_t q_image, const int64_t q_head, const int64_t q_row,            \
      const int64_t k_image, const int64_t k_head, const int64_t k_row, const int64_t v_image,  \
      const int64_t v_head, const int64_t v_row, const float scale) {                           \
    flash_attention<T, DP>(q, k, v, out, n, m, heads, d, q_image, q_head, q_row, k_image,       \
                           k_head, k_row, v_image, v_head, v_row, scale);                       \
  }

#define SDSTREAM_ATTENTION_DIMS(T, SUFFIX) \
  SDSTREAM_ATTENTION(T, SUFFIX, 16)        \
  SDSTREAM_ATTENTION(T, SUFFIX, 48)        \
  SDSTREAM_ATTENTION(T, SUFFIX, 64)        \
  SDSTREAM_ATTENTION(T, SUFFIX, 80)        \
  SDSTREAM_ATTENTION(T, SUFFIX, 128)       \
  SDSTREAM_ATTENTION(T, SUFFIX, 160)

SDSTREAM_ATTENTION_DIMS(__half, f16)
SDSTREAM_ATTENTION_DIMS(__nv_bfloat16, bf16)
