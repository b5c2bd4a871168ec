// What the emulated kernels' checks share: seeded inputs, storage rounding, and a tally of the
// worst differences that makes the program's exit status.
#pragma once

#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace check {

inline int failures = 0;
inline int passed = 0;
// Every check's line when EMULATE_VERBOSE is set, else the failures' only.
inline const bool verbose = std::getenv("EMULATE_VERBOSE") != nullptr;

// The program's exit status, after a line with the counts.
inline int summary(const char *what) {
  std::printf("%s: %d checks passed, %d failed\n", what, passed, failures);
  return failures == 0 ? 0 : 1;
}

inline std::vector<float> random_values(size_t n, uint32_t seed, float scale = 1.0f,
                                        float offset = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto &x : v) x = offset + scale * normal(rng);
  return v;
}

// Values in storage type T, and back to f32 exactly.
template <typename T> std::vector<T> stored(const std::vector<float> &v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = store<T>(v[i]);
  return out;
}
template <typename T> std::vector<float> widened(const std::vector<T> &v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = load(v[i]);
  return out;
}

// The largest |got - want| / (1 + |want|); fails the run when over `bound`.
inline double expect_close(const std::string &what, const std::vector<float> &got,
                           const std::vector<double> &want, double bound) {
  double worst = 0.0;
  size_t at = 0;
  if (got.size() != want.size()) {
    std::printf("FAIL %s: %zu values, expected %zu\n", what.c_str(), got.size(), want.size());
    ++failures;
    return INFINITY;
  }
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - want[i]) / (1.0 + std::fabs(want[i]));
    if (!(d <= worst)) {
      worst = d;
      at = i;
    }
  }
  const bool ok = worst <= bound;
  if (!ok || verbose)
    std::printf("%s %s: worst %.3g at %zu (bound %.3g)\n", ok ? "ok  " : "FAIL", what.c_str(),
                worst, at, bound);
  ok ? ++passed : ++failures;
  return worst;
}

// Bit-equal outputs (two kernels that must agree exactly).
template <typename T>
void expect_equal(const std::string &what, const std::vector<T> &a, const std::vector<T> &b) {
  size_t differ = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) ++differ;
  const bool ok = a.size() == b.size() && differ == 0;
  if (!ok || verbose)
    std::printf("%s %s: %zu of %zu values differ\n", ok ? "ok  " : "FAIL", what.c_str(), differ,
                a.size());
  ok ? ++passed : ++failures;
}

// The storage type's unit roundoff, for bounds.
template <typename T> constexpr double unit() {
  if constexpr (std::is_same_v<T, float>) return 0x1p-24;
  if constexpr (std::is_same_v<T, __half>) return 0x1p-11;
  return 0x1p-8;
}
template <typename T> constexpr const char *name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  if constexpr (std::is_same_v<T, __half>) return "f16";
  return "bf16";
}

}  // namespace check
