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

// The `_rows` kernels; with `per_image` ([images, C]) their `_add` entry points, which normalise
// x plus each image's value per channel.
template <typename T, int V>
std::vector<T> run_rows(const std::vector<T> &x, const std::vector<T> &w, const std::vector<T> &b,
                        const Case &c, bool silu, float eps, int chunks_wanted,
                        const std::vector<T> *per_image = nullptr) {
  const int lanes = c.channels / V;
  const unsigned rows = std::max(1, 512 / lanes);
  const int chunk_pixels = (c.pixels + chunks_wanted - 1) / chunks_wanted;
  const int chunks = (c.pixels + chunk_pixels - 1) / chunk_pixels;
  std::vector<float> partial(3 * static_cast<size_t>(c.images) * c.groups * chunks, NAN);
  std::vector<float> mean_rstd(2 * static_cast<size_t>(c.images) * c.groups, NAN);
  std::vector<T> y(x.size());
  const emu_dim3 grid{static_cast<unsigned>(chunks), static_cast<unsigned>(c.images)};
  const emu_dim3 block{static_cast<unsigned>(lanes), rows};
  const T *add = per_image ? per_image->data() : nullptr;
  if (per_image)
    emu::launch(rows_stats<T, V, true>, grid, block, x.data(), add, partial.data(), c.pixels,
                c.channels, c.groups, chunk_pixels);
  else
    emu::launch(rows_stats<T, V, false>, grid, block, x.data(), add, partial.data(), c.pixels,
                c.channels, c.groups, chunk_pixels);
  const int groups_total = c.images * c.groups;
  emu::launch(rows_finalize, {static_cast<unsigned>((groups_total + 3) / 4)}, {128},
              partial.data(), mean_rstd.data(), groups_total, chunks, eps);
  if (per_image)
    emu::launch(rows_apply<T, V, true>, grid, block, x.data(), add, y.data(), w.data(), b.data(),
                mean_rstd.data(), c.pixels, c.channels, c.groups, chunk_pixels, silu ? 1 : 0);
  else
    emu::launch(rows_apply<T, V, false>, grid, block, x.data(), add, y.data(), w.data(), b.data(),
                mean_rstd.data(), c.pixels, c.channels, c.groups, chunk_pixels, silu ? 1 : 0);
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
        if (per % 2 == 0)
          check::expect_equal(tag, run_rows<T, 2>(x, w, b, c, silu, eps, 4, &t),
                              run_rows<T, 2>(summed, w, b, c, silu, eps, 4));
        else
          check::expect_equal(tag, run_rows<T, 1>(x, w, b, c, silu, eps, 4, &t),
                              run_rows<T, 1>(summed, w, b, c, silu, eps, 4));
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
