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
  extern __shared__ __align__(128) unsigned char smem[];
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
