// LayerNorm over the last dimension of a contiguous [rows, dim] tensor with affine weight and
// bias [dim] (kernel policy `cuda_layer_norm`; kernels/src/norm.rs launches it): a warp per row,
// the row held in registers between its three steps, so that it is read from memory once and
// written once. candle's kernel, which runs otherwise, gives a row 32 threads (1,024 where the
// row has 1,024 values or more), loads 2-byte values one at a time, reads the row twice and
// takes the variance as E[x²] − μ² (cancellation where the mean is large).
//
// Lane l holds runs l, l + 32, … of V = 16 / sizeof(T) values (one 16-byte load each). The mean
// is taken over values shifted by the row's first one (sums of x − K lose little to cancellation
// when the mean is far from zero), then the sum of squared deviations from the mean over the
// registers (a second pass, as the CPU twin's, with no second read); both summed in f32 by each
// lane in run order, then over the warp by a fixed shuffle tree. y = (x − μ)·(1/σ)·γ + β in f32,
// rounded once, as the CPU twin writes it.
//
// The host guarantees: dim a multiple of V and at most 32·CHUNKS·V, rows·dim below 2³¹, x, y,
// weight and bias 16-byte aligned. Compiled to PTX by kernels/build.rs (feature `cuda`).
#include <stdint.h>

#include "storage.cuh"

namespace {

constexpr int WARPS = 4;  // rows per block, a warp each

// The sum over the warp, the same in every lane (a butterfly: every lane adds in the same order).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T, int CHUNKS>
__device__ void layer_norm(const T *__restrict__ x, T *__restrict__ y, const T *__restrict__ weight,
                           const T *__restrict__ bias, const int rows, const int dim,
                           const float eps) {
  SDSTREAM_ASSUME_ALIGNED(x, 16);
  SDSTREAM_ASSUME_ALIGNED(y, 16);
  SDSTREAM_ASSUME_ALIGNED(weight, 16);
  SDSTREAM_ASSUME_ALIGNED(bias, 16);
  using V = Vec16<T>;
  constexpr int W = V::kWidth;
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * WARPS + threadIdx.x / 32;
  // A whole warp leaves together, so that the shuffles below always see 32 lanes.
  if (row >= rows) return;
  const int runs = dim / W;
  const V *src = reinterpret_cast<const V *>(x) + row * runs;
  // The shift: the row's first value, which every lane reads.
  const float shift = load(x[row * dim]);
  float v[CHUNKS][W] = {};
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int i = lane + 32 * c;
    if (i < runs) {
      const V r = src[i];
#pragma unroll
      for (int e = 0; e < W; ++e) {
        v[c][e] = load(r.v[e]);
        sum += v[c][e] - shift;
      }
    }
  }
  const float mean = shift + warp_sum(sum) / static_cast<float>(dim);
  float m2 = 0.0f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    if (lane + 32 * c < runs) {
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const float d = v[c][e] - mean;
        m2 += d * d;
      }
    }
  }
  const float rstd = 1.0f / sqrtf(warp_sum(m2) / static_cast<float>(dim) + eps);
  const V *gamma = reinterpret_cast<const V *>(weight);
  const V *beta = reinterpret_cast<const V *>(bias);
  V *dst = reinterpret_cast<V *>(y) + row * runs;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int i = lane + 32 * c;
    if (i < runs) {
      const V g = gamma[i], b = beta[i];
      V out;
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const float normed = (v[c][e] - mean) * rstd;
        out.v[e] = store<T>(normed * load(g.v[e]) + load(b.v[e]));
      }
      dst[i] = out;
    }
  }
}

}  // namespace

// One entry point per storage type and CHUNKS (runs a lane holds at most): the host picks the
// smallest power of two that covers the row.
#define SDSTREAM_LAYER_NORM(T, NAME, CHUNKS)                                                       \
  extern "C" __global__ void __launch_bounds__(32 * WARPS)                                         \
      layer_norm_c##CHUNKS##_##NAME(const T *x, T *y, const T *weight, const T *bias,              \
                                    const int rows, const int dim, const float eps) {              \
    layer_norm<T, CHUNKS>(x, y, weight, bias, rows, dim, eps);                                     \
  }

#define SDSTREAM_LAYER_NORM_CHUNKS(T, NAME) \
  SDSTREAM_LAYER_NORM(T, NAME, 1)           \
  SDSTREAM_LAYER_NORM(T, NAME, 2)           \
  SDSTREAM_LAYER_NORM(T, NAME, 4)           \
  SDSTREAM_LAYER_NORM(T, NAME, 8)

SDSTREAM_LAYER_NORM_CHUNKS(float, f32)
SDSTREAM_LAYER_NORM(float, f32, 16)
SDSTREAM_LAYER_NORM_CHUNKS(__half, f16)
SDSTREAM_LAYER_NORM_CHUNKS(__nv_bfloat16, bf16)
