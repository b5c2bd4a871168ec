// Element-wise kernels of kernels/src/ops.rs on a CUDA device.
//   add_in_place_*: dst[(j·n + i)·inner + k] += src[i] over a contiguous dst of `total` values,
//                   in f32 arithmetic rounded once to the storage type (as the CPU kernel and
//                   candle's broadcast add): biases per channel or per feature, time embeddings
//                   per (batch, channel), and same-shape residual adds (n = total, inner = 1),
//                   without the strided indexing of a general broadcast.
// Compiled to PTX by kernels/build.rs (feature `cuda`).
#include <stdint.h>

#include "storage.cuh"

namespace {

template <typename T>
__device__ void add_in_place(T *__restrict__ dst, const T *__restrict__ src, const int64_t total,
                             const int64_t n, const int64_t inner) {
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = (idx / inner) % n;
    dst[idx] = store<T>(load(dst[idx]) + load(src[i]));
  }
}

}  // namespace

extern "C" __global__ void add_in_place_f32(float *dst, const float *src, const int64_t total,
                                            const int64_t n, const int64_t inner) {
  add_in_place(dst, src, total, n, inner);
}

extern "C" __global__ void add_in_place_f16(__half *dst, const __half *src, const int64_t total,
                                            const int64_t n, const int64_t inner) {
  add_in_place(dst, src, total, n, inner);
}

extern "C" __global__ void add_in_place_bf16(__nv_bfloat16 *dst, const __nv_bfloat16 *src,
                                             const int64_t total, const int64_t n, const int64_t inner) {
  add_in_place(dst, src, total, n, inner);
}
