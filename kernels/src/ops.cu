// Element-wise kernels of kernels/src/ops.rs on a CUDA device.
//   add_in_place_*: dst[(j·n + i)·inner + k] += src[i] over a contiguous dst of `total` values
//                   cut in slices of `per_slice` values, slice o reading src from o·n on (one
//                   slice: per_slice = total; several: each image's time embedding over a
//                   channels-last map),
//                   in f32 arithmetic rounded once to the storage type (as the CPU kernel and
//                   candle's broadcast add): biases per channel or per feature, time embeddings
//                   per (batch, channel), and same-shape residual adds (n = total, inner = 1),
//                   without the strided indexing of a general broadcast.
//   add_in_place_vec_*: the same 16 bytes at a time, where the source index is the same for a
//                   vector's values (inner = 1) and the operands allow it.
//   geglu_*:        GEGLU of a projection's output before its bias: x [rows, 2·inner] plus bias
//                   [2·inner] (geglu_bias_*) → out [rows, inner] = hidden · GELU(gate), with the
//                   exact (erf) GELU, hidden = x[r, i] + bias[i], gate = x[r, inner + i] +
//                   bias[inner + i]; f32 arithmetic, rounded once (the unfused path rounds the
//                   biased input, the GELU and the product each).
// Compiled to PTX by kernels/build.rs (feature `cuda`).
#include <stdint.h>
#include <climits>

#include "storage.cuh"

namespace {

// The index of src for element idx costs divisions, and a GPU has no integer divider: 64-bit
// ones are long instruction sequences, and with four of them an H200 spent about 10 µs on each of
// a frame's 346 adds, memory-bound work of 1 to 2 µs. So same-shape adds index nothing, and
// tensors of fewer than 2³¹ values (every frame's) divide in 32 bits, skipping what a single
// slice or a unit `inner` make trivial.
template <typename T, typename I>
__device__ __forceinline__ void add_in_place_indexed(T *__restrict__ dst, const T *__restrict__ src,
                                                     const I total, const I n, const I inner,
                                                     const I per_slice) {
  const bool one_slice = per_slice == total;
  for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (I)gridDim.x * blockDim.x) {
    const I in_slice = one_slice ? idx : idx % per_slice;
    const I along = inner == 1 ? in_slice : in_slice / inner;
    const I i = (one_slice ? 0 : (idx / per_slice) * n) + along % n;
    dst[idx] = store<T>(load(dst[idx]) + load(src[i]));
  }
}

template <typename T>
__device__ void add_in_place(T *__restrict__ dst, const T *__restrict__ src, const int64_t total,
                             const int64_t n, const int64_t inner, const int64_t per_slice) {
  if (n == total && inner == 1 && per_slice == total) {
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
      dst[idx] = store<T>(load(dst[idx]) + load(src[idx]));
    }
  } else if (total <= INT32_MAX) {
    add_in_place_indexed<T, uint32_t>(dst, src, (uint32_t)total, (uint32_t)n, (uint32_t)inner,
                                      (uint32_t)per_slice);
  } else {
    add_in_place_indexed<T, int64_t>(dst, src, total, n, inner, per_slice);
  }
}

// The in-place add 16 bytes at a time where the source index is the same for a run of values,
// inner = 1 (same-shape adds, biases over the last dimension, channels-last time embeddings): in
// vector units, element i reads src[(i / per_slice)·n + i % n] (one slice: src[i % n]). The host
// launches it only where n and per_slice are multiples of the vector's width and both operands
// start 16-byte aligned. A vector's values are added one by one as the scalar kernel adds them,
// so the results are the same bits.
template <typename T>
__device__ void add_in_place_vec(T *__restrict__ dst, const T *__restrict__ src,
                                 const uint32_t total, const uint32_t n, const uint32_t per_slice) {
  SDSTREAM_ASSUME_ALIGNED(dst, 16);
  SDSTREAM_ASSUME_ALIGNED(src, 16);
  using V = Vec16<T>;
  V *d = reinterpret_cast<V *>(dst);
  const V *s = reinterpret_cast<const V *>(src);
  const bool same_shape = n == total, one_slice = per_slice == total;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const uint32_t from = same_shape ? i : (one_slice ? 0 : (i / per_slice) * n) + i % n;
    V a = d[i];
    const V b = s[from];
#pragma unroll
    for (int j = 0; j < V::kWidth; ++j) a.v[j] = store<T>(load(a.v[j]) + load(b.v[j]));
    d[i] = a;
  }
}

// GEGLU over rows·inner outputs; I is the index type (32 bits where every index fits: a GPU has
// no integer divider, and 64-bit divisions are long instruction sequences).
template <typename T, bool BIAS, typename I>
__device__ __forceinline__ void geglu_indexed(const T *__restrict__ x, const T *__restrict__ bias,
                                              T *__restrict__ out, const I rows, const I inner) {
  const I total = rows * inner;
  for (I idx = (I)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (I)gridDim.x * blockDim.x) {
    const I r = idx / inner, i = idx % inner;
    float hidden = load(x[r * 2 * inner + i]);
    float gate = load(x[r * 2 * inner + inner + i]);
    if (BIAS) {
      hidden += load(bias[i]);
      gate += load(bias[inner + i]);
    }
    out[idx] = store<T>(hidden * (0.5f * gate * (1.0f + erff(gate * 0.70710678118654752f))));
  }
}

// The four phases of a nearest-2× upsampling followed by a 3×3 convolution, computed as one
// 2×2 convolution with 4·C outputs over the map itself (Conv2d's phase path), put in their
// places: phase (a, b) of output pixel (2i + a, 2j + b) is z[image, i + a, j + b, (2a + b)·C + c]
// of z [images, h + 1, w + 1, 4·C]; out [images, 2h, 2w, C] gets it, plus bias[c] when BIAS
// (rounded once more, as the separate bias add rounds it). One thread a 16-byte vector of out:
// C is a whole number of vectors (c_vecs of them), the operands 16-byte aligned, and every
// index of z and out below 2³¹ (the host checks all of it).
template <typename T, bool BIAS>
__device__ void phase_interleave(const T *__restrict__ z, const T *__restrict__ bias,
                                 T *__restrict__ out, const uint32_t images, const uint32_t h,
                                 const uint32_t w, const uint32_t c_vecs) {
  SDSTREAM_ASSUME_ALIGNED(z, 16);
  SDSTREAM_ASSUME_ALIGNED(out, 16);
  using V = Vec16<T>;
  const V *zv = reinterpret_cast<const V *>(z);
  const V *bv = reinterpret_cast<const V *>(bias);
  V *ov = reinterpret_cast<V *>(out);
  const uint32_t total = images * 2 * h * 2 * w * c_vecs;
  for (uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gridDim.x * blockDim.x) {
    const uint32_t cv = idx % c_vecs;
    uint32_t rest = idx / c_vecs;
    const uint32_t x = rest % (2 * w);
    rest /= 2 * w;
    const uint32_t y = rest % (2 * h);
    const uint32_t image = rest / (2 * h);
    const uint32_t a = y % 2, b = x % 2;
    const uint32_t pixel = (image * (h + 1) + y / 2 + a) * (w + 1) + x / 2 + b;
    V v = zv[(pixel * 4 + 2 * a + b) * c_vecs + cv];
    if (BIAS) {
      SDSTREAM_ASSUME_ALIGNED(bias, 16);
      const V add = bv[cv];
#pragma unroll
      for (int j = 0; j < V::kWidth; ++j) v.v[j] = store<T>(load(v.v[j]) + load(add.v[j]));
    }
    ov[idx] = v;
  }
}

template <typename T, bool BIAS>
__device__ void geglu(const T *__restrict__ x, const T *__restrict__ bias, T *__restrict__ out,
                      const int64_t rows, const int64_t inner) {
  // The input has 2·rows·inner values: its indices must fit too.
  if (2 * rows * inner <= INT32_MAX)
    geglu_indexed<T, BIAS, uint32_t>(x, bias, out, (uint32_t)rows, (uint32_t)inner);
  else
    geglu_indexed<T, BIAS, int64_t>(x, bias, out, rows, inner);
}

}  // namespace

extern "C" __global__ void add_in_place_f32(float *dst, const float *src, const int64_t total,
                                            const int64_t n, const int64_t inner,
                                            const int64_t per_slice) {
  add_in_place(dst, src, total, n, inner, per_slice);
}

extern "C" __global__ void add_in_place_f16(__half *dst, const __half *src, const int64_t total,
                                            const int64_t n, const int64_t inner,
                                            const int64_t per_slice) {
  add_in_place(dst, src, total, n, inner, per_slice);
}

extern "C" __global__ void add_in_place_bf16(__nv_bfloat16 *dst, const __nv_bfloat16 *src,
                                             const int64_t total, const int64_t n, const int64_t inner,
                                            const int64_t per_slice) {
  add_in_place(dst, src, total, n, inner, per_slice);
}

// The vectorised in-place add's entry points (totals in 16-byte vectors).
#define SDSTREAM_ADD_IN_PLACE_VEC(T, SUFFIX)                                                     \
  extern "C" __global__ void add_in_place_vec_##SUFFIX(T *dst, const T *src, const uint32_t total, \
                                                      const uint32_t n, const uint32_t per_slice) { \
    add_in_place_vec(dst, src, total, n, per_slice);                                             \
  }

SDSTREAM_ADD_IN_PLACE_VEC(float, f32)
SDSTREAM_ADD_IN_PLACE_VEC(__half, f16)
SDSTREAM_ADD_IN_PLACE_VEC(__nv_bfloat16, bf16)

// GEGLU's entry points: without and with the projection's bias, per storage type.
#define SDSTREAM_GEGLU(T, SUFFIX)                                                                \
  extern "C" __global__ void geglu_##SUFFIX(const T *x, const T *bias, T *out,                  \
                                            const int64_t rows, const int64_t inner) {          \
    geglu<T, false>(x, bias, out, rows, inner);                                                 \
  }                                                                                             \
  extern "C" __global__ void geglu_bias_##SUFFIX(const T *x, const T *bias, T *out,             \
                                                 const int64_t rows, const int64_t inner) {     \
    geglu<T, true>(x, bias, out, rows, inner);                                                  \
  }

SDSTREAM_GEGLU(float, f32)
SDSTREAM_GEGLU(__half, f16)
SDSTREAM_GEGLU(__nv_bfloat16, bf16)

// The phase interleave's entry points: without and with the convolution's bias.
#define SDSTREAM_PHASE_INTERLEAVE(T, SUFFIX)                                                       \
  extern "C" __global__ void phase_interleave_##SUFFIX(const T *z, const T *bias, T *out,         \
                                                       const uint32_t images, const uint32_t h,   \
                                                       const uint32_t w, const uint32_t c_vecs) { \
    phase_interleave<T, false>(z, bias, out, images, h, w, c_vecs);                               \
  }                                                                                               \
  extern "C" __global__ void phase_interleave_bias_##SUFFIX(                                      \
      const T *z, const T *bias, T *out, const uint32_t images, const uint32_t h,                 \
      const uint32_t w, const uint32_t c_vecs) {                                                  \
    phase_interleave<T, true>(z, bias, out, images, h, w, c_vecs);                                \
  }

SDSTREAM_PHASE_INTERLEAVE(float, f32)
SDSTREAM_PHASE_INTERLEAVE(__half, f16)
SDSTREAM_PHASE_INTERLEAVE(__nv_bfloat16, bf16)
