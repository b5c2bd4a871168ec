// The storage types sdstream's CUDA kernels read and write (f32, f16, bf16), converted to and
// from the f32 they compute in: `load` widens exactly, `store` rounds once to nearest-even.
// Included by every .cu file here (kernels/build.rs recompiles them when it changes).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// A kernel's dynamic shared memory as `unsigned char NAME[]`, 128-byte aligned (the CPU's
// stand-in, kernels/emulate, defines it first).
#ifndef SDSTREAM_DYNAMIC_SHARED
#define SDSTREAM_DYNAMIC_SHARED(NAME) extern __shared__ __align__(128) unsigned char NAME[]
#endif

// Where a kernel relies on a pointer's alignment (vector loads), it says so; the CPU's stand-in
// checks it, the device trusts the host's launch (which checks the addresses).
#ifndef SDSTREAM_ASSUME_ALIGNED
#define SDSTREAM_ASSUME_ALIGNED(POINTER, BYTES) ((void)0)
#endif

namespace {

template <typename T> __device__ __forceinline__ float load(const T v);
template <> __device__ __forceinline__ float load<float>(const float v) { return v; }
template <> __device__ __forceinline__ float load<__half>(const __half v) { return __half2float(v); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T store(const float v);
template <> __device__ __forceinline__ float store<float>(const float v) { return v; }
template <> __device__ __forceinline__ __half store<__half>(const float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(const float v) {
  return __float2bfloat16_rn(v);
}

// 16 bytes of T, loaded and stored as one access (the host checks the alignment).
template <typename T> struct alignas(16) Vec16 {
  static constexpr int kWidth = 16 / sizeof(T);
  T v[kWidth];
};

}  // namespace
