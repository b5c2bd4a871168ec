// Stand-ins for the CPU (kernels/emulate/emulate.h) of the GPU instructions attention.cu reaches
// through functions of its own, which it leaves out under SDSTREAM_EMULATED: `mma.sync.m16n8k16`
// (Mma<T>::run, Mma<T>::pack), `ldmatrix.x4` (ldmatrix_x4), `cp.async` (copy16_async,
// commit_copies, wait_copies), and nvcuda::wmma's fragments. Each follows the PTX ISA's (or the
// CUDA C++ guide's) definition: the warp-collective ones exchange their lanes' operands through
// memory between two barriers of the warp and give each lane exactly the fragment elements the
// ISA assigns it, so that a kernel's lane arithmetic is checked against the documented layouts.
// `cp.async` copies land when a `wait_group` lets them (the latest moment the ISA allows), so a
// read before the wait sees the 0xFF bytes a block starts with.
#pragma once

#include <deque>

#include "../src/storage.cuh"

namespace emu {

constexpr int kMaxWarps = 32;

// A warp's operands of one `mma` or `ldmatrix`, per lane.
struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
};
inline MmaOperands mma_operands[kMaxWarps][32];
inline const unsigned char *ldmatrix_rows[kMaxWarps][32];

// cp.async: per thread, the committed groups (oldest first) and the copies not yet committed.
struct PendingCopy {
  unsigned char *dst;
  unsigned char bytes[16];
};
inline std::vector<std::deque<std::vector<PendingCopy>>> committed_copies(1024);
inline std::vector<std::vector<PendingCopy>> open_copies(1024);

inline void forget_copies() {
  for (auto &groups : committed_copies) groups.clear();
  for (auto &open : open_copies) open.clear();
}
inline const bool copies_hooked = (block_start_hooks.push_back(&forget_copies), true);

// Element `half` (0: the low 16 bits) of a register of two 16-bit values of type T, widened.
template <typename T> float unpack(const uint32_t reg, const int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  T v;
  std::memcpy(&v, &bits, sizeof bits);
  return load(v);
}

}  // namespace emu

namespace {

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A·B + D, A 16 × 16, B 16 × 8, f32 sums.
// Lane l (g = l/4, t = l%4) holds A's rows g and g + 8 at columns 2t, 2t + 1 (registers 0, 1)
// and 2t + 8, 2t + 9 (registers 2, 3); B's column g at rows 2t, 2t + 1 (b0) and 2t + 8, 2t + 9
// (b1); D's rows g (d0, d1) and g + 8 (d2, d3) at columns 2t, 2t + 1.
template <typename T> struct Mma {
  static void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t b0, const uint32_t b1) {
    const unsigned warp = emu::linear_thread / 32, lane = emu::linear_thread % 32;
    emu::MmaOperands &mine = emu::mma_operands[warp][lane];
    for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
    mine.b[0] = b0;
    mine.b[1] = b1;
    emu::wait(emu::warp_barriers[warp]);
    const auto a_at = [&](const int row, const int k) {
      const emu::MmaOperands &o = emu::mma_operands[warp][(row % 8) * 4 + (k % 8) / 2];
      return emu::unpack<T>(o.a[row / 8 + 2 * (k / 8)], k % 2);
    };
    const auto b_at = [&](const int k, const int col) {
      const emu::MmaOperands &o = emu::mma_operands[warp][col * 4 + (k % 8) / 2];
      return emu::unpack<T>(o.b[k / 8], k % 2);
    };
    const int g = lane / 4, t = lane % 4;
    float out[4];
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
      float sum = d[e];
      for (int k = 0; k < 16; ++k) sum = std::fma(a_at(row, k), b_at(k, col), sum);
      out[e] = sum;
    }
    emu::wait(emu::warp_barriers[warp]);
    for (int e = 0; e < 4; ++e) d[e] = out[e];
  }
  // Two f32 values rounded to T, `lo` in the low 16 bits.
  static uint32_t pack(const float lo, const float hi) {
    const T l = store<T>(lo), h = store<T>(hi);
    uint16_t lb, hb;
    std::memcpy(&lb, &l, 2);
    std::memcpy(&hb, &h, 2);
    return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
  }
};

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l%8 of
// matrix l/8; r[i] gets, of matrix i, row l/4 at columns 2(l%4), 2(l%4) + 1, or with .trans
// column l/4 at rows 2(l%4), 2(l%4) + 1.
template <bool TRANS> void ldmatrix_x4(uint32_t (&r)[4], const void *row) {
  const unsigned warp = emu::linear_thread / 32, lane = emu::linear_thread % 32;
  emu::ldmatrix_rows[warp][lane] = static_cast<const unsigned char *>(row);
  emu::wait(emu::warp_barriers[warp]);
  const auto at = [&](const int matrix, const int row_in, const int col) {
    uint16_t bits;
    std::memcpy(&bits, emu::ldmatrix_rows[warp][8 * matrix + row_in] + 2 * col, 2);
    return static_cast<uint32_t>(bits);
  };
  uint32_t got[4];
  for (int i = 0; i < 4; ++i) {
    const int p = static_cast<int>(lane / 4), q = 2 * static_cast<int>(lane % 4);
    got[i] = TRANS ? at(i, q, p) | (at(i, q + 1, p) << 16) : at(i, p, q) | (at(i, p, q + 1) << 16);
  }
  emu::wait(emu::warp_barriers[warp]);
  for (int i = 0; i < 4; ++i) r[i] = got[i];
}

// cp.async.cg.shared.global with a source size of 16 or 0 bytes (zeros).
void copy16_async(void *dst, const void *src, const bool valid) {
  emu::PendingCopy copy{static_cast<unsigned char *>(dst), {}};
  if (valid) std::memcpy(copy.bytes, src, 16);
  emu::open_copies[emu::linear_thread].push_back(copy);
}
// cp.async.commit_group.
void commit_copies() {
  auto &open = emu::open_copies[emu::linear_thread];
  emu::committed_copies[emu::linear_thread].push_back(std::move(open));
  open.clear();
}
// cp.async.wait_group PENDING: every committed group but the newest PENDING has landed.
template <int PENDING> void wait_copies() {
  auto &groups = emu::committed_copies[emu::linear_thread];
  while (groups.size() > PENDING) {
    for (const auto &c : groups.front()) std::memcpy(c.dst, c.bytes, 16);
    groups.pop_front();
  }
}

}  // namespace

// nvcuda::wmma with 16 × 16 × 16 fragments. A fragment's layout is the implementation's to
// choose: here every lane keeps the whole matrix (as f32: f16 and bf16 widen exactly), loads,
// multiplies and stores it, which is what the API defines.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the stand-in has 16 × 16 × 16 fragments only");
  float x[16][16];
};

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout> &f, const T *p, const unsigned ld) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r][c] = load(std::is_same_v<Layout, col_major> ? p[c * ld + r] : p[r * ld + c]);
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float> &f, const float v) {
  for (auto &row : f.x)
    for (auto &e : row) e = v;
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float> &d,
              const fragment<matrix_a, 16, 16, 16, TA, LA> &a,
              const fragment<matrix_b, 16, 16, 16, TB, LB> &b,
              const fragment<accumulator, 16, 16, 16, float> &c) {
  fragment<accumulator, 16, 16, 16, float> out;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float sum = c.x[i][j];
      for (int k = 0; k < 16; ++k) sum = std::fma(a.x[i][k], b.x[k][j], sum);
      out.x[i][j] = sum;
    }
  d = out;
}

inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f,
                              const unsigned ld, const layout_t layout) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[layout == mem_row_major ? r * ld + c : c * ld + r] = f.x[r][c];
}
}  // namespace wmma
}  // namespace nvcuda
