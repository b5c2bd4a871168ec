// OpenCV's Canny (aperture 3, L1 gradient) on the device, with the arithmetic of the host's
// implementation (core/src/preprocess/canny.rs, itself checked against cv2.Canny), so that both
// give the same edge map bit for bit:
//   canny_gray:     planar [C, H·W] f32 in [0, 1] → 8-bit grey: each value to u8 as the host's
//                   `to_u8` (v·255 + 0.5, clamped, truncated; NaN → 0, with no fused multiply-add),
//                   then cv2's RGB2GRAY in 15-bit fixed point (one channel: the value itself);
//   canny_classify: Sobel dx, dy with a replicated border, |dx| + |dy|, OpenCV's sector test and
//                   tie-breaking for non-maximum suppression (magnitudes outside the image are 0),
//                   then the thresholds: NOT_EDGE, CANDIDATE (above low) or EDGE (above high);
//   canny_grow:     hysteresis by propagation: a candidate next to an edge (8 neighbours) becomes
//                   one. Each block copies a 32×32 tile and its one-pixel ring into shared memory
//                   and propagates there until nothing changes, then writes back and raises
//                   `changed`; the host launches it again until a launch changes nothing. Marks
//                   only ever go from CANDIDATE to EDGE, so blocks reading each other's pixels
//                   mid-launch only delay a step, and the fixed point is the host's flood fill:
//                   the candidates 8-connected to an edge;
//   canny_planes_*: the map to C planes of 1 (edge) or 0, in the output's storage type.
// Compiled to PTX by kernels/build.rs (feature `cuda`).
#include <stdint.h>

#include "storage.cuh"

namespace {

constexpr uint8_t CANDIDATE = 0;
constexpr uint8_t NOT_EDGE = 1;
constexpr uint8_t EDGE = 2;
// tan(22.5°) in OpenCV's 15-bit fixed point, and that shift.
constexpr int TG22 = 13573;
constexpr int CANNY_SHIFT = 15;
constexpr int TILE = 32;

__device__ __forceinline__ uint8_t to_u8(const float v) {
  // The host computes v·255 + 0.5 in two roundings: no contraction into one fma here.
  const float t = __fadd_rn(__fmul_rn(v, 255.0f), 0.5f);
  // fmaxf takes the number over a NaN: NaN → 0, as Rust's `NaN as u8`.
  return static_cast<uint8_t>(fminf(fmaxf(t, 0.0f), 255.0f));
}

__device__ __forceinline__ int sobel_at(const uint8_t* gray, int h, int w, int y, int x, int* gx,
                                        int* gy) {
  const int yu = max(y - 1, 0), yd = min(y + 1, h - 1);
  const int xl = max(x - 1, 0), xr = min(x + 1, w - 1);
  const uint8_t* up = gray + static_cast<int64_t>(yu) * w;
  const uint8_t* mid = gray + static_cast<int64_t>(y) * w;
  const uint8_t* down = gray + static_cast<int64_t>(yd) * w;
  *gx = (up[xr] - up[xl]) + 2 * (mid[xr] - mid[xl]) + (down[xr] - down[xl]);
  *gy = (down[xl] + 2 * down[x] + down[xr]) - (up[xl] + 2 * up[x] + up[xr]);
  return abs(*gx) + abs(*gy);
}

// |dx| + |dy| at (y, x), 0 outside the image (OpenCV's NMS sees a zero frame).
__device__ __forceinline__ int magnitude(const uint8_t* gray, int h, int w, int y, int x) {
  if (y < 0 || y >= h || x < 0 || x >= w) return 0;
  int gx, gy;
  return sobel_at(gray, h, w, y, x, &gx, &gy);
}

}  // namespace

extern "C" __global__ void canny_gray(const float* planes, uint8_t* gray, const int channels,
                                      const int64_t plane) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < plane;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (channels < 3) {
      gray[i] = to_u8(planes[i]);
      continue;
    }
    const uint32_t r = to_u8(planes[i]);
    const uint32_t g = to_u8(planes[plane + i]);
    const uint32_t b = to_u8(planes[2 * plane + i]);
    gray[i] = static_cast<uint8_t>((9798u * r + 19235u * g + 3735u * b + (1u << 14)) >> 15);
  }
}

extern "C" __global__ void canny_classify(const uint8_t* gray, uint8_t* map, const int h,
                                          const int w, const int low, const int high) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x >= w || y >= h) return;
  int xs, ys;
  const int m = sobel_at(gray, h, w, y, x, &xs, &ys);
  uint8_t mark = NOT_EDGE;
  if (m > low) {
    const int ax = abs(xs);
    const int ay = abs(ys) << CANNY_SHIFT;
    const int tg22x = ax * TG22;
    bool is_max;
    if (ay < tg22x) {
      is_max = m > magnitude(gray, h, w, y, x - 1) && m >= magnitude(gray, h, w, y, x + 1);
    } else {
      const int tg67x = tg22x + (ax << (CANNY_SHIFT + 1));
      if (ay > tg67x) {
        is_max = m > magnitude(gray, h, w, y - 1, x) && m >= magnitude(gray, h, w, y + 1, x);
      } else if ((xs ^ ys) < 0) {
        is_max = m > magnitude(gray, h, w, y - 1, x + 1) && m > magnitude(gray, h, w, y + 1, x - 1);
      } else {
        is_max = m > magnitude(gray, h, w, y - 1, x - 1) && m > magnitude(gray, h, w, y + 1, x + 1);
      }
    }
    if (is_max) mark = m > high ? EDGE : CANDIDATE;
  }
  map[static_cast<int64_t>(y) * w + x] = mark;
}

// Blocks of 256 threads over 32×32 tiles.
extern "C" __global__ void canny_grow(uint8_t* map, const int h, const int w, int* changed) {
  __shared__ uint8_t tile[TILE + 2][TILE + 2];
  __shared__ int any;
  __shared__ int wrote;
  const int x0 = blockIdx.x * TILE, y0 = blockIdx.y * TILE;
  for (int k = threadIdx.x; k < (TILE + 2) * (TILE + 2); k += blockDim.x) {
    const int ty = k / (TILE + 2), tx = k % (TILE + 2);
    const int y = y0 + ty - 1, x = x0 + tx - 1;
    tile[ty][tx] = (y < 0 || y >= h || x < 0 || x >= w)
                       ? NOT_EDGE
                       : map[static_cast<int64_t>(y) * w + x];
  }
  if (threadIdx.x == 0) wrote = 0;
  for (;;) {
    __syncthreads();
    if (threadIdx.x == 0) any = 0;
    __syncthreads();
    bool mine = false;
    for (int k = threadIdx.x; k < TILE * TILE; k += blockDim.x) {
      const int ty = k / TILE + 1, tx = k % TILE + 1;
      if (tile[ty][tx] != CANDIDATE) continue;
      const bool touches = tile[ty - 1][tx - 1] == EDGE || tile[ty - 1][tx] == EDGE ||
                           tile[ty - 1][tx + 1] == EDGE || tile[ty][tx - 1] == EDGE ||
                           tile[ty][tx + 1] == EDGE || tile[ty + 1][tx - 1] == EDGE ||
                           tile[ty + 1][tx] == EDGE || tile[ty + 1][tx + 1] == EDGE;
      if (touches) {
        tile[ty][tx] = EDGE;
        mine = true;
      }
    }
    if (mine) {
      any = 1;
      wrote = 1;
    }
    __syncthreads();
    if (!any) break;
  }
  if (!wrote) return;
  for (int k = threadIdx.x; k < TILE * TILE; k += blockDim.x) {
    const int ty = k / TILE, tx = k % TILE;
    const int y = y0 + ty, x = x0 + tx;
    if (y < h && x < w && tile[ty + 1][tx + 1] == EDGE) {
      map[static_cast<int64_t>(y) * w + x] = EDGE;
    }
  }
  if (threadIdx.x == 0) atomicExch(changed, 1);
}

#define SDSTREAM_CANNY_PLANES(T, SUFFIX)                                                      \
  extern "C" __global__ void canny_planes_##SUFFIX(const uint8_t* map, T* out,               \
                                                   const int channels, const int64_t plane) {  \
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < plane;  \
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {                                  \
      const T v = store<T>(map[i] == EDGE ? 1.0f : 0.0f);                                     \
      for (int c = 0; c < channels; ++c) out[c * plane + i] = v;                              \
    }                                                                                          \
  }

SDSTREAM_CANNY_PLANES(float, f32)
SDSTREAM_CANNY_PLANES(__half, f16)
SDSTREAM_CANNY_PLANES(__nv_bfloat16, bf16)
