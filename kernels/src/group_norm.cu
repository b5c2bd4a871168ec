// GroupNorm (optionally fused with SiLU) over a contiguous [B, C, spatial…] tensor (or, in the
// `_nhwc` entry points, a channels-last [B, spatial…, C] one), in two
// launches that spread every group over several blocks: `stats` reduces each chunk of a group to
// (count, mean, M2) with Welford's update and a block-wide Chan merge; `apply` merges a group's
// chunk statistics (in a fixed order, so results do not depend on scheduling) and writes
// y = x·scale + shift per channel, scale = γ/σ and shift = β − scale·μ, then SiLU when asked.
// Statistics and arithmetic in f32 for every storage type, as the portable twin
// (kernels/src/norm.rs) does. Compiled to PTX by kernels/build.rs (feature `cuda`).
//
// The `_rows` entry points are a second channels-last GroupNorm (kernel policy
// `cuda_group_norm_rows`), in two launches whose blocks read whole pixels, all C channels of
// each, so that a warp's loads are consecutive: `stats` gives each thread a fixed run of V
// channels (V = 2 where a group's channels are even in number and the rows aligned, else 1) over
// a chunk of pixels, merges the threads of each group in a fixed order; `apply` first merges
// each group's chunks into its mean and 1/σ (a warp per group, a fixed shuffle tree, so every
// block of an image gets the same bits), then scales and shifts each thread's V channels.
// Merging in `apply` costs each block a few kilobytes of reads from L2 and saves a launch of
// its own per GroupNorm (61 a UNet call, a third of its small kernels' launches with three).
// Indices are 32-bit (the launch checks that every one fits). The first pair of kernels
// (above) has each block walk one group's values with four 64-bit divisions per value,
// strided C apart for want of the other groups' channels: 61 calls took 1.69 ms of an H200
// frame under the profiler, about 28 µs each for 2–8 MB of traffic.
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

// A thread's running sums over values shifted by the first one it read (the shifted-data
// algorithm: sums of v − K lose little to cancellation when the mean is far from zero), as the
// (count, mean, M2) that Chan's merge takes. Adding a value costs no division, unlike Welford's
// update.
struct Shifted {
  float k, s1, s2;
  int n;
  __device__ __forceinline__ void add(const float v) {
    const float d = v - k;
    s1 += d;
    s2 += d * d;
    ++n;
  }
  __device__ __forceinline__ Stat stat() const {
    if (n == 0) return Stat{0.f, 0.f, 0.f};
    const float count = static_cast<float>(n);
    const float shift = s1 / count;
    return Stat{count, k + shift, fmaxf(s2 - s1 * shift, 0.f)};
  }
};

// V consecutive values, loaded and stored as one access.
template <typename T, int V> struct alignas(sizeof(T) * V) Run {
  T v[V];
};

// The most threads a block of the `_rows` kernels has: one per run of V channels (a block row),
// times the block rows.
constexpr int kRowsMaxThreads = 1024;

// What the `_rows` kernels normalise: x itself, or (ADD) x plus each image's value per channel
// (a resnet's time embedding, [images, C], image i's C values from per_image + i · stride: a
// network's projections for all its resnets hand each its columns of one product), the sum
// rounded to T as the separate add that it replaces rounds it, so that the result is the same
// bits.
template <typename T, int V, bool ADD> struct RowsInput {
  float add[V];
  __device__ __forceinline__ RowsInput(const T* __restrict__ per_image, const int stride,
                                       const int image, const int lane) {
#pragma unroll
    for (int j = 0; j < V; ++j)
      add[j] = ADD ? load(per_image[static_cast<size_t>(image) * stride + lane * V + j]) : 0.f;
  }
  __device__ __forceinline__ float operator()(const Run<T, V>& r, const int j) const {
    return ADD ? load(store<T>(load(r.v[j]) + add[j])) : load(r.v[j]);
  }
};

// Grid (chunks, images), block (C / V, rows). Thread (lane, row) reads channels lane·V … of
// pixels begin + row, begin + row + rows, … of its chunk; partial gets 3 floats per (image,
// group, chunk).
template <typename T, int V, bool ADD>
__device__ void rows_stats(const T* __restrict__ x, const T* __restrict__ per_image,
                           const int per_image_stride,
                           float* __restrict__ partial, const int pixels, const int channels,
                           const int groups, const int chunk_pixels) {
  __shared__ Stat lane_stats[kRowsMaxThreads];
  const int lanes = channels / V;
  const int lane = threadIdx.x;
  const int image = blockIdx.y;
  const int begin = blockIdx.x * chunk_pixels;
  const int end = min(pixels, begin + chunk_pixels);
  const Run<T, V>* runs = reinterpret_cast<const Run<T, V>*>(x) + static_cast<size_t>(image) * pixels * lanes;
  const RowsInput<T, V, ADD> input(per_image, per_image_stride, image, lane);
  Shifted s{0.f, 0.f, 0.f, 0};
  int p = begin + static_cast<int>(threadIdx.y);
  if (p < end) s.k = input(runs[p * lanes + lane], 0);
  for (; p < end; p += blockDim.y) {
    const Run<T, V> r = runs[p * lanes + lane];
#pragma unroll
    for (int j = 0; j < V; ++j) s.add(input(r, j));
  }
  lane_stats[threadIdx.y * lanes + lane] = s.stat();
  __syncthreads();
  // A group's channels are lanes_per_group consecutive lanes; its statistics in this chunk
  // merge them row by row, lane by lane, in that order.
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  if (t < groups) {
    const int lanes_per_group = lanes / groups;
    Stat m{0.f, 0.f, 0.f};
    for (int row = 0; row < static_cast<int>(blockDim.y); ++row)
      for (int l = t * lanes_per_group; l < (t + 1) * lanes_per_group; ++l)
        m = merge(m, lane_stats[row * lanes + l]);
    float* out = partial + 3 * ((static_cast<size_t>(image) * groups + t) * gridDim.x + blockIdx.x);
    out[0] = m.n;
    out[1] = m.mean;
    out[2] = m.m2;
  }
}

// The most groups an image may have in the `_rows` kernels: `apply` keeps each group's mean
// and 1/σ in shared memory (norm.rs's `RowsGeometry::MAX_GROUPS`).
constexpr int kRowsMaxGroups = 128;

// Group g's (of all images) statistics from its chunks' in partial, valid in lane 0: lane k
// merges chunks k, k + 32, …, then the warp's shuffle tree merges the lanes. A fixed order, so
// every block that asks gets the same bits. Every lane of a whole warp calls it.
__device__ __forceinline__ Stat merge_chunks(const float* __restrict__ partial, const int g,
                                             const int chunks, const int lane) {
  Stat s{0.f, 0.f, 0.f};
  for (int c = lane; c < chunks; c += 32) {
    const float* p = partial + 3 * (static_cast<size_t>(g) * chunks + c);
    s = merge(s, Stat{p[0], p[1], p[2]});
  }
  return warp_reduce(s);
}

// Grid and block as `rows_stats`, whose partial statistics (gridDim.x chunks an image) it
// reads: each group's mean and 1/σ (the block's whole warps a group each, in turn), then
// y = x·scale + shift per channel (then SiLU when asked), scale = γ/σ and shift = β − scale·μ,
// as `apply` computes them. groups is at most kRowsMaxGroups.
template <typename T, int V, bool ADD>
__device__ void rows_apply(const T* __restrict__ x, const T* __restrict__ per_image,
                           const int per_image_stride,
                           T* __restrict__ y, const T* __restrict__ weight,
                           const T* __restrict__ bias, const float* __restrict__ partial,
                           const int pixels, const int channels, const int groups,
                           const int chunk_pixels, const float eps, const int silu) {
  __shared__ float mean_rstd[2 * kRowsMaxGroups];
  const int lanes = channels / V;
  const int lane = threadIdx.x;
  const int image = blockIdx.y;
  const int per_group = channels / groups;
  {
    // A block has at least 257 threads (norm.rs's geometry), so at least 8 whole warps; the
    // threads of a last, partial warp take no group (a shuffle needs every lane of its warp).
    const int t = threadIdx.y * blockDim.x + threadIdx.x;
    const int whole_warps = static_cast<int>(blockDim.x * blockDim.y) / 32;
    const int warp = t / 32;
    if (warp < whole_warps) {
      for (int g = warp; g < groups; g += whole_warps) {
        const Stat s = merge_chunks(partial, image * groups + g, gridDim.x, t % 32);
        if (t % 32 == 0) {
          mean_rstd[2 * g] = s.mean;
          mean_rstd[2 * g + 1] = rsqrtf(s.m2 / s.n + eps);
        }
      }
    }
    __syncthreads();
  }
  const RowsInput<T, V, ADD> input(per_image, per_image_stride, image, lane);
  float scale[V], shift[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int c = lane * V + j;
    const int g = c / per_group;
    const float mean = mean_rstd[2 * g];
    scale[j] = mean_rstd[2 * g + 1] * load(weight[c]);
    shift[j] = load(bias[c]) - scale[j] * mean;
  }
  const int begin = blockIdx.x * chunk_pixels;
  const int end = min(pixels, begin + chunk_pixels);
  const size_t first = static_cast<size_t>(image) * pixels * lanes;
  const Run<T, V>* in = reinterpret_cast<const Run<T, V>*>(x) + first;
  Run<T, V>* out = reinterpret_cast<Run<T, V>*>(y) + first;
  for (int p = begin + static_cast<int>(threadIdx.y); p < end; p += blockDim.y) {
    const Run<T, V> r = in[p * lanes + lane];
    Run<T, V> w;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float v = input(r, j) * scale[j] + shift[j];
      if (silu) v = v / (1.f + __expf(-v));
      w.v[j] = store<T>(v);
    }
    out[p * lanes + lane] = w;
  }
}

}  // namespace

// The `_rows` entry points per storage type and run width V; `_add` normalises x plus a value
// per image and channel (`per_image`, [images, C], rows `per_image_stride` values apart; the
// plain ones never read it). The host
// launches blocks of up to 1,024 threads (norm.rs, `MAX_THREADS`), which only start where a
// thread needs at most 64 registers (ptxas, sm_90: 37 at most now): the bound keeps it so.
#define GROUP_NORM_ROWS_ADD(NAME, T, V, ADD, TAG)                                                 \
  extern "C" __global__ void __launch_bounds__(1024) group_norm_rows_stats##TAG##_v##V##_##NAME(  \
      const T* x, const T* per_image, const int per_image_stride, float* partial,                 \
      const int pixels, const int channels, const int groups, const int chunk_pixels) {           \
    rows_stats<T, V, ADD>(x, per_image, per_image_stride, partial, pixels, channels, groups,      \
                          chunk_pixels);                                                          \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(1024) group_norm_rows_apply##TAG##_v##V##_##NAME(  \
      const T* x, const T* per_image, const int per_image_stride, T* y, const T* weight,          \
      const T* bias, const float* partial, const int pixels, const int channels,                  \
      const int groups, const int chunk_pixels, const float eps, const int silu) {                \
    rows_apply<T, V, ADD>(x, per_image, per_image_stride, y, weight, bias, partial, pixels,       \
                          channels, groups, chunk_pixels, eps, silu);                             \
  }
#define GROUP_NORM_ROWS(NAME, T, V)            \
  GROUP_NORM_ROWS_ADD(NAME, T, V, false, )     \
  GROUP_NORM_ROWS_ADD(NAME, T, V, true, _add)

GROUP_NORM_ROWS(f32, float, 1)
GROUP_NORM_ROWS(f32, float, 2)
GROUP_NORM_ROWS(f16, __half, 1)
GROUP_NORM_ROWS(f16, __half, 2)
GROUP_NORM_ROWS(bf16, __nv_bfloat16, 1)
GROUP_NORM_ROWS(bf16, __nv_bfloat16, 2)

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
