// The frame's way on and off the GPU in 8 bits: a frame crosses the bus as packed RGB8 (a
// quarter of the f32 planes' bytes) and is converted on the device, with the arithmetic of the
// host conversions in core/src/frame.rs, so that both give the same bits:
//   rgb8_to_unit_planes:  packed [H·W, 3] u8 → planar [3, H·W] f32, y = 2·(u / 255) − 1
//                         (IEEE division; 2·p is exact, so a fused 2·p − 1 rounds as p+p−1 does);
//   unit_planes_to_packed8_*: planar [3, H·W] (f32, f16 or bf16) in [0, 1] → packed u8 pixels of
//                         `bpp` bytes, channel r/g/b at byte offsets r/g/b, alpha 255 when bpp is
//                         4: round(x·255) with ties to even (rintf), clamped to 0..255, NaN → 0.
// Compiled to PTX by kernels/build.rs (feature `cuda`).
#include <stdint.h>

#include "storage.cuh"

namespace {

__device__ __forceinline__ uint8_t quantize_unit(const float x) {
  const float v = rintf(x * 255.0f);
  if (isnan(v)) return 0;
  return (uint8_t)fminf(fmaxf(v, 0.0f), 255.0f);
}

template <typename T>
__device__ void to_packed8(const T *__restrict__ src, uint8_t *__restrict__ dst, const int64_t plane,
                           const int bpp, const int r, const int g, const int b) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= plane) return;
  uint8_t *px = dst + i * bpp;
  px[r] = quantize_unit(load(src[i]));
  px[g] = quantize_unit(load(src[plane + i]));
  px[b] = quantize_unit(load(src[2 * plane + i]));
  if (bpp == 4) px[3] = 255;
}

}  // namespace

extern "C" __global__ void rgb8_to_unit_planes(const uint8_t *__restrict__ src, float *__restrict__ dst,
                                               const int64_t plane) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= plane) return;
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    const float unit = __fdiv_rn((float)src[3 * i + c], 255.0f);
    dst[c * plane + i] = __fsub_rn(__fmul_rn(2.0f, unit), 1.0f);
  }
}

extern "C" __global__ void unit_planes_to_packed8_f32(const float *src, uint8_t *dst, const int64_t plane,
                                                      const int bpp, const int r, const int g, const int b) {
  to_packed8(src, dst, plane, bpp, r, g, b);
}

extern "C" __global__ void unit_planes_to_packed8_f16(const __half *src, uint8_t *dst, const int64_t plane,
                                                      const int bpp, const int r, const int g, const int b) {
  to_packed8(src, dst, plane, bpp, r, g, b);
}

extern "C" __global__ void unit_planes_to_packed8_bf16(const __nv_bfloat16 *src, uint8_t *dst,
                                                       const int64_t plane, const int bpp, const int r,
                                                       const int g, const int b) {
  to_packed8(src, dst, plane, bpp, r, g, b);
}
