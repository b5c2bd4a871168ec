// GroupNorm (optionally fused with SiLU) over a contiguous [B, C, spatial…] tensor (or, in the
// `_nhwc` entry points, a channels-last [B, spatial…, C] one), in two
// launches that spread every group over several blocks: `stats` reduces each chunk of a group to
// (count, mean, M2) with Welford's update and a block-wide Chan merge; `apply` merges a group's
// chunk statistics (in a fixed order, so results do not depend on scheduling) and writes
// y = x·scale + shift per channel, scale = γ/σ and shift = β − scale·μ, then SiLU when asked.
// Statistics and arithmetic in f32 for every storage type, as the portable twin
// (kernels/src/norm.rs) does. Compiled to PTX by kernels/build.rs (feature `cuda`).
#include <stdint.h>

#include "storage.cuh"

namespace {

struct Stat {
  float n;
  float mean;
  float m2;
};

__device__ __forceinline__ Stat merge(const Stat a, const Stat b) {
  const float n = a.n + b.n;
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float d = b.mean - a.mean;
  const float fb = b.n / n;
  return Stat{n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}

__device__ __forceinline__ Stat warp_reduce(Stat s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Stat o{__shfl_down_sync(0xffffffffu, s.n, offset),
                 __shfl_down_sync(0xffffffffu, s.mean, offset),
                 __shfl_down_sync(0xffffffffu, s.m2, offset)};
    s = merge(s, o);
  }
  return s;
}

// The block's statistics, valid in thread 0. blockDim.x is a multiple of 32, at most 1024.
__device__ Stat block_reduce(Stat s) {
  __shared__ Stat warps[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  s = warp_reduce(s);
  if (lane == 0) warps[warp] = s;
  __syncthreads();
  const int n_warps = blockDim.x >> 5;
  if (warp == 0) {
    s = lane < n_warps ? warps[lane] : Stat{0.f, 0.f, 0.f};
    s = warp_reduce(s);
  }
  return s;
}

// Grid (groups in all batches, chunks). partial: 3 floats per (group, chunk).
// Where element i of group g lies: channels first, the group is one contiguous run; channels
// last ([B, spatial, C]), pixel i / per_group's run of per_group channels from the group's first.
template <bool CHANNELS_LAST>
__device__ __forceinline__ int64_t element(const int64_t g, const int64_t i, const int64_t group_len,
                                           const int groups, const int per_group) {
  if (!CHANNELS_LAST) return g * group_len + i;
  const int64_t channels = static_cast<int64_t>(groups) * per_group;
  const int64_t b = g / groups;
  const int64_t first = (g % groups) * per_group;
  const int64_t pixel = i / per_group;
  return b * group_len * groups + pixel * channels + first + i % per_group;
}

// The channel of element i of group g (either layout).
template <bool CHANNELS_LAST>
__device__ __forceinline__ int channel_of(const int64_t g, const int64_t i, const int groups,
                                          const int per_group, const int64_t spatial) {
  const int first = static_cast<int>(g % groups) * per_group;
  return first + static_cast<int>(CHANNELS_LAST ? i % per_group : i / spatial);
}

template <typename T, bool CHANNELS_LAST>
__device__ void stats(const T* x, float* partial, const int64_t group_len, const int chunks,
                      const int groups, const int per_group) {
  const int64_t g = blockIdx.x;
  const int c = blockIdx.y;
  const int64_t per_chunk = (group_len + chunks - 1) / chunks;
  const int64_t begin = c * per_chunk;
  const int64_t end = min(group_len, begin + per_chunk);
  Stat s{0.f, 0.f, 0.f};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = load(x[element<CHANNELS_LAST>(g, i, group_len, groups, per_group)]);
    s.n += 1.f;
    const float d = v - s.mean;
    s.mean += d / s.n;
    s.m2 += d * (v - s.mean);
  }
  s = block_reduce(s);
  if (threadIdx.x == 0) {
    float* p = partial + 3 * (g * chunks + c);
    p[0] = s.n;
    p[1] = s.mean;
    p[2] = s.m2;
  }
}

// Grid (groups in all batches, chunks). Group g covers channels (g % groups) · per_group … of
// its batch, each `spatial` values long.
template <typename T, bool CHANNELS_LAST>
__device__ void apply(const T* x, T* y, const T* weight, const T* bias, const float* partial,
                      const int64_t group_len, const int chunks, const int groups,
                      const int per_group, const int64_t spatial, const float eps,
                      const int silu) {
  __shared__ float mean_rstd[2];
  const int64_t g = blockIdx.x;
  const int c = blockIdx.y;
  if (threadIdx.x == 0) {
    Stat s{0.f, 0.f, 0.f};
    for (int k = 0; k < chunks; ++k) {
      const float* p = partial + 3 * (g * chunks + k);
      s = merge(s, Stat{p[0], p[1], p[2]});
    }
    mean_rstd[0] = s.mean;
    mean_rstd[1] = rsqrtf(s.m2 / s.n + eps);
  }
  __syncthreads();
  const float mean = mean_rstd[0];
  const float rstd = mean_rstd[1];
  const int64_t per_chunk = (group_len + chunks - 1) / chunks;
  const int64_t begin = c * per_chunk;
  const int64_t end = min(group_len, begin + per_chunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int channel = channel_of<CHANNELS_LAST>(g, i, groups, per_group, spatial);
    const int64_t at = element<CHANNELS_LAST>(g, i, group_len, groups, per_group);
    const float scale = rstd * load(weight[channel]);
    const float shift = load(bias[channel]) - scale * mean;
    float v = load(x[at]) * scale + shift;
    if (silu) v = v / (1.f + __expf(-v));
    y[at] = store<T>(v);
  }
}

}  // namespace

// Entry points per storage type; `_nhwc` for channels-last input [B, spatial…, C].
#define GROUP_NORM(NAME, T)                                                                       \
  extern "C" __global__ void group_norm_stats_##NAME(const T* x, float* partial,                 \
                                                      const int64_t group_len, const int chunks) { \
    stats<T, false>(x, partial, group_len, chunks, 1, 1);                                         \
  }                                                                                               \
  extern "C" __global__ void group_norm_apply_##NAME(                                             \
      const T* x, T* y, const T* weight, const T* bias, const float* partial,                     \
      const int64_t group_len, const int chunks, const int groups, const int per_group,           \
      const int64_t spatial, const float eps, const int silu) {                                   \
    apply<T, false>(x, y, weight, bias, partial, group_len, chunks, groups, per_group, spatial,   \
                    eps, silu);                                                                   \
  }                                                                                               \
  extern "C" __global__ void group_norm_stats_nhwc_##NAME(                                        \
      const T* x, float* partial, const int64_t group_len, const int chunks, const int groups,    \
      const int per_group) {                                                                      \
    stats<T, true>(x, partial, group_len, chunks, groups, per_group);                             \
  }                                                                                               \
  extern "C" __global__ void group_norm_apply_nhwc_##NAME(                                        \
      const T* x, T* y, const T* weight, const T* bias, const float* partial,                     \
      const int64_t group_len, const int chunks, const int groups, const int per_group,           \
      const int64_t spatial, const float eps, const int silu) {                                   \
    apply<T, true>(x, y, weight, bias, partial, group_len, chunks, groups, per_group, spatial,    \
                   eps, silu);                                                                    \
  }

GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
GROUP_NORM(bf16, __nv_bfloat16)
