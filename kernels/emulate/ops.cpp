// ops.cu's in-place adds, GEGLU and the phase interleave, emulated on the CPU (kernels/emulate/emulate.h), against
// the formulas in f64: every indexing branch of the adds (same shape, one slice with and without
// an inner stride, several slices) and both GEGLU entry points, in f32, f16 and bf16.
#include "../src/ops.cu"
#include "check.h"

namespace {

struct AddCase {
  const char *what;
  int64_t total, n, inner, outer;
};

template <typename T> void adds() {
  // Shapes from the networks at tiny sizes: a channels-last bias ([pixels, C] += [C]), a
  // channels-first bias ([C, pixels] += [C], inner = pixels), a residual (n = total), a time
  // embedding per image over channels-last maps (outer = images), and a channels-first one.
  const AddCase cases[] = {
      {"bias, channels last", 37 * 24, 24, 1, 1},
      {"bias, channels first", 24 * 37, 24, 37, 1},
      {"residual", 999, 999, 1, 1},
      {"time embedding, channels last, 3 images", 3 * 19 * 16, 16, 1, 3},
      {"time embedding, channels first, 2 images", 2 * 16 * 21, 16, 21, 2},
  };
  for (const auto &c : cases) {
    const auto dst0 = check::random_values(c.total, 1);
    const auto src0 = check::random_values(c.n * c.outer, 2);
    auto dst = check::stored<T>(dst0);
    const auto src = check::stored<T>(src0);
    const auto dst_in = check::widened(dst);
    const auto src_in = check::widened(src);
    const int64_t per_slice = c.total / c.outer;
    std::vector<double> want(c.total);
    for (int64_t idx = 0; idx < c.total; ++idx) {
      const int64_t o = idx / per_slice, in = idx % per_slice;
      want[idx] = static_cast<double>(dst_in[idx]) + src_in[o * c.n + (in / c.inner) % c.n];
    }
    // A grid smaller than the work, so that the stride loop runs more than once.
    emu::launch(add_in_place<T>, {3}, {64}, dst.data(), src.data(), c.total, c.n, c.inner,
                per_slice);
    check::expect_close(std::string("add_in_place ") + check::name<T>() + ", " + c.what,
                        check::widened(dst), want, check::unit<T>());
  }
}

// The vectorised add against the scalar one, bit for bit, where the host launches it (inner = 1,
// n and per_slice multiples of the vector's width): a residual, a bias over the last dimension
// and channels-last time embeddings of 3 images.
template <typename T> void vector_adds() {
  constexpr int W = Vec16<T>::kWidth;
  const AddCase cases[] = {
      {"residual", 13 * W * 8, 13 * W * 8, 1, 1},
      {"bias, channels last", 37 * 4 * W, 4 * W, 1, 1},
      {"time embedding, channels last, 3 images", 3 * 19 * 2 * W, 2 * W, 1, 3},
  };
  for (const auto &c : cases) {
    const auto dst0 = check::stored<T>(check::random_values(c.total, 5));
    const auto src = check::stored<T>(check::random_values(c.n * c.outer, 6));
    const int64_t per_slice = c.total / c.outer;
    auto scalar = dst0, vector = dst0;
    emu::launch(add_in_place<T>, {3}, {64}, scalar.data(), src.data(), c.total, c.n, c.inner,
                per_slice);
    emu::launch(add_in_place_vec<T>, {2}, {32}, vector.data(), src.data(),
                static_cast<uint32_t>(c.total / W), static_cast<uint32_t>(c.n / W),
                static_cast<uint32_t>(per_slice / W));
    check::expect_equal(std::string("add_in_place_vec ") + check::name<T>() + ", " + c.what +
                            " (against the scalar kernel)",
                        vector, scalar);
  }
}

template <typename T> void geglus() {
  const int64_t rows = 13, inner = 40;
  const auto x = check::stored<T>(check::random_values(rows * 2 * inner, 3, 2.0f));
  const auto bias = check::stored<T>(check::random_values(2 * inner, 4, 0.5f));
  const auto xf = check::widened(x);
  const auto bf = check::widened(bias);
  for (const bool with_bias : {false, true}) {
    std::vector<T> out(rows * inner);
    std::vector<double> want(rows * inner);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < inner; ++i) {
        double h = xf[r * 2 * inner + i], g = xf[r * 2 * inner + inner + i];
        if (with_bias) {
          h += bf[i];
          g += bf[inner + i];
        }
        want[r * inner + i] = h * 0.5 * g * (1.0 + std::erf(g / std::sqrt(2.0)));
      }
    if (with_bias)
      emu::launch(geglu<T, true>, {2}, {128}, x.data(), bias.data(), out.data(), rows, inner);
    else
      emu::launch(geglu<T, false>, {2}, {128}, x.data(), bias.data(), out.data(), rows, inner);
    // The hidden and gate sums are rounded to f32 once each: a few f32 ulps beside the output's
    // own rounding.
    check::expect_close(std::string("geglu ") + check::name<T>() + (with_bias ? ", bias" : ""),
                        check::widened(out), want, check::unit<T>() + 1e-6);
  }
}

// The phase interleave against its definition, bit for bit: out[image, 2i + a, 2j + b, c] is
// z[image, i + a, j + b, (2a + b)·C + c] (plus bias[c], rounded once), for 2 images of uneven
// height and width, with and without the bias.
template <typename T> void phase_interleaves() {
  constexpr int W = Vec16<T>::kWidth;
  const uint32_t images = 2, h = 5, w = 3, c = 3 * W;
  const auto z = check::stored<T>(check::random_values(images * (h + 1) * (w + 1) * 4 * c, 7));
  const auto bias = check::stored<T>(check::random_values(c, 8));
  for (const bool with_bias : {false, true}) {
    std::vector<T> want(images * 2 * h * 2 * w * c), got(want.size());
    for (uint32_t n = 0; n < images; ++n)
      for (uint32_t y = 0; y < 2 * h; ++y)
        for (uint32_t x = 0; x < 2 * w; ++x)
          for (uint32_t k = 0; k < c; ++k) {
            const uint32_t a = y % 2, b = x % 2;
            const T v = z[((n * (h + 1) + y / 2 + a) * (w + 1) + x / 2 + b) * 4 * c + (2 * a + b) * c + k];
            want[((n * 2 * h + y) * 2 * w + x) * c + k] =
                with_bias ? store<T>(load(v) + load(bias[k])) : v;
          }
    // A grid smaller than the work, so that the stride loop runs more than once.
    if (with_bias)
      emu::launch(phase_interleave<T, true>, {2}, {32}, z.data(), bias.data(), got.data(), images,
                  h, w, c / W);
    else
      emu::launch(phase_interleave<T, false>, {2}, {32}, z.data(), bias.data(), got.data(),
                  images, h, w, c / W);
    check::expect_equal(std::string("phase_interleave ") + check::name<T>() +
                            (with_bias ? ", bias" : ""),
                        got, want);
  }
}

}  // namespace

int main() {
  adds<float>();
  adds<__half>();
  adds<__nv_bfloat16>();
  vector_adds<float>();
  vector_adds<__half>();
  vector_adds<__nv_bfloat16>();
  geglus<float>();
  geglus<__half>();
  geglus<__nv_bfloat16>();
  phase_interleaves<float>();
  phase_interleaves<__half>();
  phase_interleaves<__nv_bfloat16>();
  return check::summary("ops.cu, emulated");
}
