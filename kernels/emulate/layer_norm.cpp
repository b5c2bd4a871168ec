// layer_norm.cu's kernel emulated on the CPU (kernels/emulate/emulate.h) against LayerNorm in
// f64: the transformers' widths (320, 640, 1280) and the text encoders' (768, 1024), rows that
// leave the last block part empty, the narrowest row (one run), every CHUNKS the host picks,
// values far from zero, in f32, f16 and bf16.
#include "../src/layer_norm.cu"
#include "check.h"

namespace {

struct Case {
  int rows, dim;
  float offset;  // added to every value: a mean far from zero
};

// LayerNorm in f64 over [rows, dim] values.
std::vector<double> reference(const std::vector<float> &x, const std::vector<float> &w,
                              const std::vector<float> &b, const Case &c, double eps) {
  std::vector<double> y(x.size());
  for (int r = 0; r < c.rows; ++r) {
    const float *row = &x[static_cast<size_t>(r) * c.dim];
    double sum = 0, sq = 0;
    for (int i = 0; i < c.dim; ++i) sum += row[i];
    const double mean = sum / c.dim;
    for (int i = 0; i < c.dim; ++i) sq += (row[i] - mean) * (row[i] - mean);
    const double rstd = 1.0 / std::sqrt(sq / c.dim + eps);
    for (int i = 0; i < c.dim; ++i)
      y[static_cast<size_t>(r) * c.dim + i] = (row[i] - mean) * rstd * w[i] + b[i];
  }
  return y;
}

// The host's choice (kernels/src/norm.rs, `layer_norm_chunks`): the smallest power of two of
// runs a lane holds that covers the row.
int chunks_for(int runs) {
  int chunks = 1;
  while (32 * chunks < runs) chunks *= 2;
  return chunks;
}

template <typename T> void run_case(const Case &c, uint32_t seed) {
  constexpr int W = Vec16<T>::kWidth;
  const double eps = 1e-5;
  const auto x = check::stored<T>(check::random_values(static_cast<size_t>(c.rows) * c.dim, seed, 2.0f, c.offset));
  const auto w = check::stored<T>(check::random_values(c.dim, seed + 1, 0.2f, 1.0f));
  const auto b = check::stored<T>(check::random_values(c.dim, seed + 2, 0.2f));
  std::vector<T> y(x.size());
  const auto want = reference(check::widened(x), check::widened(w), check::widened(b), c, eps);
  const int chunks = chunks_for(c.dim / W);
  const emu_dim3 grid{static_cast<unsigned>((c.rows + WARPS - 1) / WARPS)};
  const emu_dim3 block{32 * WARPS};
  const auto args = std::make_tuple(x.data(), y.data(), w.data(), b.data(), c.rows, c.dim,
                                    static_cast<float>(eps));
  auto go = [&](auto kernel) {
    std::apply([&](auto... a) { emu::launch(kernel, grid, block, a...); }, args);
  };
  switch (chunks) {
    case 1: go(layer_norm<T, 1>); break;
    case 2: go(layer_norm<T, 2>); break;
    case 4: go(layer_norm<T, 4>); break;
    case 8: go(layer_norm<T, 8>); break;
    case 16: go(layer_norm<T, 16>); break;
    default: std::printf("FAIL no kernel for %d runs a lane\n", chunks); ++check::failures; return;
  }
  // f32 sums of up to 2,048 values beside the output's own rounding; far from zero, x − μ in
  // f32 is only as exact as x's f32 ulp allows (as in the CPU twin).
  const double bound = check::unit<T>() + 2e-6 + std::fabs(c.offset) * 0x1p-24;
  char what[160];
  std::snprintf(what, sizeof what, "layer_norm %s [%d, %d] offset %g (%d runs a lane)",
                check::name<T>(), c.rows, c.dim, c.offset, chunks);
  check::expect_close(what, check::widened(y), want, bound);
}

template <typename T> void cases() {
  constexpr int W = Vec16<T>::kWidth;
  const Case all[] = {
      {37, 320, 0.0f},  {9, 640, 0.0f},   {6, 1280, 0.0f}, {5, 768, 0.0f},
      {3, 1024, 0.0f},  {13, 320, 100.0f}, {2, 2048, 0.0f}, {7, W, 0.0f},
      {4, 40 * W, -30.0f},
  };
  uint32_t seed = 11;
  for (const auto &c : all) run_case<T>(c, seed += 3);
}

}  // namespace

int main() {
  cases<float>();
  cases<__half>();
  cases<__nv_bfloat16>();
  return check::summary("layer_norm.cu, emulated");
}
