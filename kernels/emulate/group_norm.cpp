// group_norm.cu's kernels emulated on the CPU (kernels/emulate/emulate.h) against GroupNorm in
// f64: the channels-first and channels-last kernels, and the channels-last `_rows` kernels with
// both run widths, over the networks' channel counts at small sizes, with and without SiLU,
// in f32, f16 and bf16, one and several chunks per image, and values far from zero; the `_rows`
// kernels' per-image add against the plain kernels on the sum, bit for bit.
#include "../src/group_norm.cu"
#include "check.h"

namespace {

struct Case {
  int images, pixels, channels, groups;
  float offset;  // added to every value: a mean far from zero
};

// GroupNorm in f64 over channels-last [images, pixels, channels] values.
std::vector<double> reference(const std::vector<float> &x, const std::vector<float> &w,
                              const std::vector<float> &b, const Case &c, bool silu,
                              double eps) {
  std::vector<double> y(x.size());
  const int per = c.channels / c.groups;
  for (int i = 0; i < c.images; ++i)
    for (int g = 0; g < c.groups; ++g) {
      double sum = 0, sq = 0;
      const double n = static_cast<double>(per) * c.pixels;
      for (int p = 0; p < c.pixels; ++p)
        for (int k = 0; k < per; ++k) sum += x[(static_cast<size_t>(i) * c.pixels + p) * c.channels + g * per + k];
      const double mean = sum / n;
      for (int p = 0; p < c.pixels; ++p)
        for (int k = 0; k < per; ++k) {
          const double d = x[(static_cast<size_t>(i) * c.pixels + p) * c.channels + g * per + k] - mean;
          sq += d * d;
        }
      const double rstd = 1.0 / std::sqrt(sq / n + eps);
      for (int p = 0; p < c.pixels; ++p)
        for (int k = 0; k < per; ++k) {
          const int ch = g * per + k;
          const size_t at = (static_cast<size_t>(i) * c.pixels + p) * c.channels + ch;
          double v = (x[at] - mean) * rstd * w[ch] + b[ch];
          if (silu) v = v / (1.0 + std::exp(-v));
          y[at] = v;
        }
    }
  return y;
}

// channels-last [images, pixels, C] → channels-first [images, C, pixels].
template <typename T>
std::vector<T> to_channels_first(const std::vector<T> &x, const Case &c) {
  std::vector<T> out(x.size());
  for (int i = 0; i < c.images; ++i)
    for (int p = 0; p < c.pixels; ++p)
      for (int ch = 0; ch < c.channels; ++ch)
        out[(static_cast<size_t>(i) * c.channels + ch) * c.pixels + p] =
            x[(static_cast<size_t>(i) * c.pixels + p) * c.channels + ch];
  return out;
}
template <typename T>
std::vector<T> to_channels_last(const std::vector<T> &x, const Case &c) {
  std::vector<T> out(x.size());
  for (int i = 0; i < c.images; ++i)
    for (int p = 0; p < c.pixels; ++p)
      for (int ch = 0; ch < c.channels; ++ch)
        out[(static_cast<size_t>(i) * c.pixels + p) * c.channels + ch] =
            x[(static_cast<size_t>(i) * c.channels + ch) * c.pixels + p];
  return out;
}

// What the `_rows` kernels computed in three launches before `apply` merged the chunks itself:
// a warp per group (of all images) merging its chunks into (mean, 1/σ), lane k chunks k,
// k + 32, …, then the shuffle tree. `apply` must give the bits this gives.
void three_launch_finalize(const float *partial, float *mean_rstd, const int groups_total,
                           const int chunks, const float eps) {
  const int g = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (g >= groups_total) return;
  Stat s{0.f, 0.f, 0.f};
  for (int c = lane; c < chunks; c += 32) {
    const float *p = partial + 3 * (static_cast<size_t>(g) * chunks + c);
    s = merge(s, Stat{p[0], p[1], p[2]});
  }
  s = warp_reduce(s);
  if (lane == 0) {
    mean_rstd[2 * g] = s.mean;
    mean_rstd[2 * g + 1] = rsqrtf(s.m2 / s.n + eps);
  }
}

// The `_rows` kernels' launch (as norm.rs's geometry cuts it, for `chunks_wanted` chunks an
// image) and the statistics their first launch left.
struct RowsRun {
  int chunk_pixels, chunks;
  emu_dim3 grid, block;
  std::vector<float> partial;
};

// The `_rows` kernels' first launch; with `per_image` ([images, C]) its `_add` entry point.
template <typename T, int V>
RowsRun rows_partial(const std::vector<T> &x, const Case &c, int chunks_wanted,
                     const T *per_image, int per_image_stride) {
  const int lanes = c.channels / V;
  const unsigned rows = std::max(1, 512 / lanes);
  RowsRun run;
  run.chunk_pixels = (c.pixels + chunks_wanted - 1) / chunks_wanted;
  run.chunks = (c.pixels + run.chunk_pixels - 1) / run.chunk_pixels;
  run.grid = emu_dim3{static_cast<unsigned>(run.chunks), static_cast<unsigned>(c.images)};
  run.block = emu_dim3{static_cast<unsigned>(lanes), rows};
  run.partial.assign(3 * static_cast<size_t>(c.images) * c.groups * run.chunks, NAN);
  if (per_image)
    emu::launch(rows_stats<T, V, true>, run.grid, run.block, x.data(), per_image,
                per_image_stride, run.partial.data(), c.pixels, c.channels, c.groups,
                run.chunk_pixels);
  else
    emu::launch(rows_stats<T, V, false>, run.grid, run.block, x.data(), per_image,
                per_image_stride, run.partial.data(), c.pixels, c.channels, c.groups,
                run.chunk_pixels);
  return run;
}

// The `_rows` kernels (stats, then apply); with `per_image` ([images, C], rows
// `per_image_stride` values apart, C when 0) their `_add` entry points, which normalise x plus
// each image's value per channel.
template <typename T, int V>
std::vector<T> run_rows(const std::vector<T> &x, const std::vector<T> &w, const std::vector<T> &b,
                        const Case &c, bool silu, float eps, int chunks_wanted,
                        const T *per_image = nullptr, int per_image_stride = 0) {
  if (per_image_stride == 0) per_image_stride = c.channels;
  const RowsRun run = rows_partial<T, V>(x, c, chunks_wanted, per_image, per_image_stride);
  std::vector<T> y(x.size());
  if (per_image)
    emu::launch(rows_apply<T, V, true>, run.grid, run.block, x.data(), per_image,
                per_image_stride, y.data(), w.data(), b.data(), run.partial.data(), c.pixels,
                c.channels, c.groups, run.chunk_pixels, eps, silu ? 1 : 0);
  else
    emu::launch(rows_apply<T, V, false>, run.grid, run.block, x.data(), per_image,
                per_image_stride, y.data(), w.data(), b.data(), run.partial.data(), c.pixels,
                c.channels, c.groups, run.chunk_pixels, eps, silu ? 1 : 0);
  return y;
}

// The output the three launches gave: the same statistics, the separate finalize, then each
// value scaled and shifted as `apply` does it.
template <typename T, int V>
std::vector<T> run_rows_three_launches(const std::vector<T> &x, const std::vector<T> &w,
                                       const std::vector<T> &b, const Case &c, bool silu,
                                       float eps, int chunks_wanted) {
  const RowsRun run = rows_partial<T, V>(x, c, chunks_wanted, nullptr, c.channels);
  const int groups_total = c.images * c.groups;
  std::vector<float> mean_rstd(2 * static_cast<size_t>(groups_total), NAN);
  emu::launch(three_launch_finalize, {static_cast<unsigned>((groups_total + 3) / 4)}, {128},
              run.partial.data(), mean_rstd.data(), groups_total, run.chunks, eps);
  std::vector<T> y(x.size());
  const int per_group = c.channels / c.groups;
  for (size_t i = 0; i < x.size(); ++i) {
    const int ch = static_cast<int>(i % c.channels);
    const size_t image = i / (static_cast<size_t>(c.pixels) * c.channels);
    const size_t g = image * c.groups + ch / per_group;
    const float scale = mean_rstd[2 * g + 1] * load(w[ch]);
    const float shift = load(b[ch]) - scale * mean_rstd[2 * g];
    float v = load(x[i]) * scale + shift;
    if (silu) v = v / (1.f + __expf(-v));
    y[i] = store<T>(v);
  }
  return y;
}

template <typename T>
std::vector<T> run_two_pass(const std::vector<T> &x_last, const std::vector<T> &w,
                            const std::vector<T> &b, const Case &c, bool silu, float eps,
                            bool channels_last, int chunks) {
  const int per = c.channels / c.groups;
  const int64_t group_len = static_cast<int64_t>(per) * c.pixels;
  const int groups_total = c.images * c.groups;
  const std::vector<T> x = channels_last ? x_last : to_channels_first(x_last, c);
  std::vector<float> partial(3 * static_cast<size_t>(groups_total) * chunks, 0.f);
  std::vector<T> y(x.size());
  const emu_dim3 grid{static_cast<unsigned>(groups_total), static_cast<unsigned>(chunks)};
  if (channels_last) {
    emu::launch(stats<T, true>, grid, {128}, x.data(), partial.data(), group_len, chunks,
                c.groups, per);
    emu::launch(apply<T, true>, grid, {128}, x.data(), y.data(), w.data(), b.data(),
                partial.data(), group_len, chunks, c.groups, per, static_cast<int64_t>(c.pixels),
                eps, silu ? 1 : 0);
    return y;
  }
  emu::launch(stats<T, false>, grid, {128}, x.data(), partial.data(), group_len, chunks, 1, 1);
  emu::launch(apply<T, false>, grid, {128}, x.data(), y.data(), w.data(), b.data(),
              partial.data(), group_len, chunks, c.groups, per, static_cast<int64_t>(c.pixels), eps,
              silu ? 1 : 0);
  return to_channels_last(y, c);
}

template <typename T> void cases() {
  // Channel counts of SD's UNet (320: 10 a group; 1280: 40, 640 lanes at V = 2, a block row
  // of its own), the VAE's 128, and tiny checkpoints' odd groups (3 channels a group: V = 1).
  const Case all[] = {
      {1, 67, 320, 32, 0.f},  {2, 40, 64, 32, 0.f},  {1, 9, 1280, 32, 0.f},
      {2, 30, 96, 32, 0.f},   {1, 50, 128, 32, 40.f}, {3, 17, 24, 4, 0.f},
      // More groups than a block's 10 whole warps (320 threads), so warps take several.
      {2, 12, 640, 64, 0.f},
  };
  const float eps = 1e-5f;
  uint32_t seed = 10;
  for (const auto &c : all) {
    const size_t n = static_cast<size_t>(c.images) * c.pixels * c.channels;
    const auto x = check::stored<T>(check::random_values(n, seed++, 1.5f, c.offset));
    const auto w = check::stored<T>(check::random_values(c.channels, seed++, 0.5f, 1.0f));
    const auto b = check::stored<T>(check::random_values(c.channels, seed++, 0.5f));
    const auto xf = check::widened(x), wf = check::widened(w), bf = check::widened(b);
    const int per = c.channels / c.groups;
    for (const bool silu : {false, true}) {
      const auto want = reference(xf, wf, bf, c, silu, eps);
      char what[160];
      std::snprintf(what, sizeof what, " %s, %d×%d px×%d ch, %d groups%s%s", check::name<T>(),
                    c.images, c.pixels, c.channels, c.groups, c.offset != 0.f ? ", offset" : "",
                    silu ? ", SiLU" : "");
      // The output's rounding, and f32 statistics (the offset case's far-from-zero mean costs
      // the shifted sums a few f32 ulps of the mean's size relative to σ).
      const double bound = check::unit<T>() * 1.01 + (c.offset != 0.f ? 2e-5 : 2e-6);
      // One chunk; a few; more than a warp's lanes (finalize's strided merge), where pixels allow.
      for (const int chunks : {1, 4, 40}) {
        const std::string tag = ", " + std::to_string(chunks) + " chunks wanted";
        std::vector<T> y;
        if (per % 2 == 0)
          y = run_rows<T, 2>(x, w, b, c, silu, eps, chunks);
        else
          y = run_rows<T, 1>(x, w, b, c, silu, eps, chunks);
        check::expect_close(std::string("rows") + (per % 2 == 0 ? " V=2" : " V=1") + what + tag,
                            check::widened(y), want, bound);
        // `apply`'s own merge of the chunks: the bits of the separate finalize launch.
        const std::vector<T> three = per % 2 == 0
                                         ? run_rows_three_launches<T, 2>(x, w, b, c, silu, eps, chunks)
                                         : run_rows_three_launches<T, 1>(x, w, b, c, silu, eps, chunks);
        check::expect_equal(std::string("rows, chunks merged in apply") + what + tag +
                                " (against the three-launch kernels)",
                            y, three);
        if (per % 2 == 0 && c.channels <= kRowsMaxThreads) {
          const auto y1 = run_rows<T, 1>(x, w, b, c, silu, eps, chunks);
          check::expect_close(std::string("rows V=1") + what + tag, check::widened(y1), want,
                              bound);
        }
      }
      // A time embedding per image and channel added in the kernel: the same bits as the
      // plain kernels on the sum the separate add rounds to T.
      {
        const auto t = check::stored<T>(check::random_values(
            static_cast<size_t>(c.images) * c.channels, seed + 100, 0.7f));
        std::vector<T> summed(x.size());
        for (size_t i = 0; i < x.size(); ++i) {
          const size_t image = i / (static_cast<size_t>(c.pixels) * c.channels);
          summed[i] = store<T>(load(x[i]) + load(t[image * c.channels + i % c.channels]));
        }
        const std::string tag = std::string("rows with a per-image add") +
                                (per % 2 == 0 ? " V=2" : " V=1") + what +
                                " (against the plain kernels on the sum)";
        const auto added = [&](const T *per_image, int stride) {
          return per % 2 == 0 ? run_rows<T, 2>(x, w, b, c, silu, eps, 4, per_image, stride)
                              : run_rows<T, 1>(x, w, b, c, silu, eps, 4, per_image, stride);
        };
        const auto plain = per % 2 == 0 ? run_rows<T, 2>(summed, w, b, c, silu, eps, 4)
                                        : run_rows<T, 1>(summed, w, b, c, silu, eps, 4);
        check::expect_equal(tag, added(t.data(), 0), plain);
        // The same values as columns 3 … 3 + C of rows C + 7 wide: one image's columns of the
        // product of every resnet's time projection.
        const int stride = c.channels + 7;
        std::vector<T> wide(static_cast<size_t>(c.images) * stride, store<T>(1e4f));
        for (int i = 0; i < c.images; ++i)
          for (int ch = 0; ch < c.channels; ++ch)
            wide[static_cast<size_t>(i) * stride + 3 + ch] = t[static_cast<size_t>(i) * c.channels + ch];
        check::expect_equal(tag + ", its rows " + std::to_string(stride) + " apart",
                            added(wide.data() + 3, stride), plain);
      }
      check::expect_close(std::string("two-pass, channels last") + what,
                          check::widened(run_two_pass(x, w, b, c, silu, eps, true, 3)), want,
                          bound);
      check::expect_close(std::string("two-pass, channels first") + what,
                          check::widened(run_two_pass(x, w, b, c, silu, eps, false, 3)), want,
                          bound);
    }
  }
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  cases<float>();
  cases<__half>();
  cases<__nv_bfloat16>();
  return check::summary("group_norm.cu, emulated");
}
