// attention.cu's two kernels (the WMMA kernel and the register kernel of `cuda_flash_attention`)
// emulated on the CPU (emulate.h, ptx.h) against softmax(scale·q·kᵀ)·v in f64 on the same rounded
// values: the arrangements the UNet hands them (token-major read in place from self-attention's
// fused q/k/v projection and cross-attention's key/value projection, and heads-major), each
// padded head dimension the networks use, partial tiles of queries and keys, a few keys
// (IP-Adapter's), several key tiles (the online softmax's rescaling), and large scores.
#include "ptx.h"

#include "../src/attention.cu"
#include "check.h"

namespace {

struct Shape {
  int batch, heads, n, m, d;
  float spread;  // of q and k: larger scores
};

// Element j of head h, token t, image b of an operand at base + b·image + h·head + t·row + j.
struct Strides {
  int64_t image, head, row;
};

int padded(const int d) {
  for (const int dp : {16, 48, 64, 80, 128, 160})
    if (d <= dp) return dp;
  return 0;
}

template <typename T, int DP>
void run_dp(const bool flash, const T *q, const T *k, const T *v, T *out, const Shape &s,
            const Strides &qs, const Strides &ks, const Strides &vs, const float scale) {
  const emu_dim3 grid{static_cast<unsigned>((s.n + BLOCK_ROWS - 1) / BLOCK_ROWS),
                      static_cast<unsigned>(s.heads), static_cast<unsigned>(s.batch)};
  const emu_dim3 block{THREADS};
  if (flash)
    emu::launch_shared(flash_attention<T, DP>, grid, block, FlashSmem<DP>::TOTAL, q, k, v, out,
                       s.n, s.m, s.heads, s.d, qs.image, qs.head, qs.row, ks.image, ks.head,
                       ks.row, vs.image, vs.head, vs.row, scale);
  else
    emu::launch_shared(attention<T, DP>, grid, block, Smem<DP>::TOTAL, q, k, v, out, s.n, s.m,
                       s.heads, s.d, qs.image, qs.head, qs.row, ks.image, ks.head, ks.row,
                       vs.image, vs.head, vs.row, scale);
}

template <typename T>
void run(const bool flash, const T *q, const T *k, const T *v, T *out, const Shape &s,
         const Strides &qs, const Strides &ks, const Strides &vs, const float scale) {
  switch (padded(s.d)) {
    case 16: return run_dp<T, 16>(flash, q, k, v, out, s, qs, ks, vs, scale);
    case 48: return run_dp<T, 48>(flash, q, k, v, out, s, qs, ks, vs, scale);
    case 64: return run_dp<T, 64>(flash, q, k, v, out, s, qs, ks, vs, scale);
    case 80: return run_dp<T, 80>(flash, q, k, v, out, s, qs, ks, vs, scale);
    case 128: return run_dp<T, 128>(flash, q, k, v, out, s, qs, ks, vs, scale);
    default: return run_dp<T, 160>(flash, q, k, v, out, s, qs, ks, vs, scale);
  }
}

// Mean and max |got − want| (the device test's measures).
void expect(const std::string &what, const std::vector<float> &got, const std::vector<double> &want,
            const double max_limit, const double mean_limit) {
  double max = 0, sum = 0;
  bool finite = true;
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = std::fabs(got[i] - want[i]);
    finite = finite && std::isfinite(got[i]);
    max = std::max(max, e);
    sum += e;
  }
  const double mean = sum / got.size();
  const bool ok = finite && max <= max_limit && mean <= mean_limit;
  if (!ok || check::verbose)
    std::printf("%s %s: max %.3g (limit %.3g), mean %.3g (limit %.3g)%s\n", ok ? "ok  " : "FAIL",
                what.c_str(), max, max_limit, mean, mean_limit, finite ? "" : ", not finite");
  ok ? ++check::passed : ++check::failures;
}

template <typename T> void shapes(const double max_limit, const double mean_limit) {
  const Shape all[] = {
      {1, 2, 130, 130, 64, 1.f},  // self: three key tiles, a partial query block
      {2, 2, 70, 77, 64, 1.f},    // cross: 77 text keys
      {1, 2, 64, 64, 40, 1.f},    // SD 1.5's heads of 40 (padded to 48)
      {1, 1, 40, 77, 80, 1.f},    // and of 80
      {1, 1, 20, 77, 160, 1.f},   // and of 160
      {1, 2, 37, 29, 64, 1.f},    // partial tiles everywhere
      {1, 2, 100, 4, 64, 1.f},    // IP-Adapter's 4 keys
      {1, 2, 50, 150, 16, 1.f},   // a tiny checkpoint's heads
      {1, 1, 30, 100, 8, 1.f},
      {1, 2, 64, 200, 64, 4.f},   // large scores: the running maximum moves
  };
  uint32_t seed = 100;
  for (const Shape &s : all) {
    const int hd = s.heads * s.d;
    const bool self = s.n == s.m;
    const float scale = 1.0f / std::sqrt(static_cast<float>(s.d));
    // Token-major sources as the projections write them: self-attention's [B, N, 3·H·d] (q, k,
    // v side by side), cross-attention's q [B, N, H·d] and key/value [B, M, 2·H·d].
    const int q_width = self ? 3 * hd : hd, kv_width = self ? 3 * hd : 2 * hd;
    std::vector<float> qf = check::random_values(static_cast<size_t>(s.batch) * s.n * q_width, seed++, s.spread);
    std::vector<float> kvf = self ? qf : check::random_values(static_cast<size_t>(s.batch) * s.m * kv_width, seed++, 1.f);
    if (!self)  // k spread as q; v as drawn
      for (size_t i = 0; i < kvf.size(); ++i)
        if (static_cast<int>(i % kv_width) < hd) kvf[i] *= s.spread;
    if (self)  // v at unit spread
      for (size_t i = 0; i < qf.size(); ++i)
        if (static_cast<int>(i % q_width) >= 2 * hd) qf[i] /= s.spread;
    const auto q_tok = check::stored<T>(qf);
    const auto kv_tok = self ? q_tok : check::stored<T>(kvf);
    const int k_at = self ? hd : 0, v_at = self ? 2 * hd : hd;
    const auto at = [](const std::vector<T> &src, int width, int tokens, int offset, int b, int h,
                       int t, int j, int d) {
      return load(src[(static_cast<size_t>(b) * tokens + t) * width + offset + h * d + j]);
    };
    // The reference in f64 on the rounded values.
    std::vector<double> want(static_cast<size_t>(s.batch) * s.n * hd);
    for (int b = 0; b < s.batch; ++b)
      for (int h = 0; h < s.heads; ++h)
        for (int i = 0; i < s.n; ++i) {
          std::vector<double> p(s.m);
          double mx = -INFINITY, total = 0;
          for (int j = 0; j < s.m; ++j) {
            double dot = 0;
            for (int e = 0; e < s.d; ++e)
              dot += static_cast<double>(at(q_tok, q_width, s.n, 0, b, h, i, e, s.d)) *
                     at(kv_tok, kv_width, s.m, k_at, b, h, j, e, s.d);
            p[j] = dot * scale;
            mx = std::max(mx, p[j]);
          }
          for (int j = 0; j < s.m; ++j) total += p[j] = std::exp(p[j] - mx);
          for (int e = 0; e < s.d; ++e) {
            double o = 0;
            for (int j = 0; j < s.m; ++j) o += p[j] * at(kv_tok, kv_width, s.m, v_at, b, h, j, e, s.d);
            want[(static_cast<size_t>(b) * s.n + i) * hd + h * s.d + e] = o / total;
          }
        }
    // Heads-major copies [B·H, T, d].
    const auto heads_major = [&](const std::vector<T> &src, int width, int tokens, int offset) {
      std::vector<T> out(static_cast<size_t>(s.batch) * s.heads * tokens * s.d);
      for (int b = 0; b < s.batch; ++b)
        for (int h = 0; h < s.heads; ++h)
          for (int t = 0; t < tokens; ++t)
            for (int e = 0; e < s.d; ++e)
              out[((static_cast<size_t>(b) * s.heads + h) * tokens + t) * s.d + e] =
                  src[(static_cast<size_t>(b) * tokens + t) * width + offset + h * s.d + e];
      return out;
    };
    const auto qh = heads_major(q_tok, q_width, s.n, 0);
    const auto kh = heads_major(kv_tok, kv_width, s.m, k_at);
    const auto vh = heads_major(kv_tok, kv_width, s.m, v_at);
    const Strides q_tok_s{static_cast<int64_t>(s.n) * q_width, s.d, q_width};
    const Strides kv_tok_s{static_cast<int64_t>(s.m) * kv_width, s.d, kv_width};
    const Strides qh_s{static_cast<int64_t>(s.heads) * s.n * s.d, static_cast<int64_t>(s.n) * s.d, s.d};
    const Strides kh_s{static_cast<int64_t>(s.heads) * s.m * s.d, static_cast<int64_t>(s.m) * s.d, s.d};
    for (const bool flash : {false, true}) {
      char what[160];
      std::snprintf(what, sizeof what, "%s %s [%d×%d, %d × %d keys, d %d, spread %g]",
                    flash ? "registers" : "WMMA", check::name<T>(), s.batch, s.heads, s.n, s.m,
                    s.d, s.spread);
      std::vector<T> out(want.size());
      run<T>(flash, q_tok.data(), kv_tok.data() + k_at, kv_tok.data() + v_at, out.data(), s,
             q_tok_s, kv_tok_s, kv_tok_s, scale);
      expect(std::string(what) + ", token-major", check::widened(out), want, max_limit, mean_limit);
      std::vector<T> out_h(want.size());
      run<T>(flash, qh.data(), kh.data(), vh.data(), out_h.data(), s, qh_s, kh_s, kh_s, scale);
      expect(std::string(what) + ", heads-major", check::widened(out_h), want, max_limit,
             mean_limit);
    }
  }
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  // The device test's limits (core/tests/cuda.rs, cuda_fused_attention_matches_the_f32_formula).
  shapes<__half>(4e-3, 4e-4);
  shapes<__nv_bfloat16>(3e-2, 3e-3);
  return check::summary("attention.cu, emulated");
}
