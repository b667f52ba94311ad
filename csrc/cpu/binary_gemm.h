// Shared by the CPU binary conv's code paths (binary_cpu.cpp drives them,
// binary_simd.cpp holds the SIMD tiles): the conv's arguments and the portable
// GEMM pieces, which each x86 path's target attributes compile anew. Nothing
// here needs torch, so tests can drive the kernels standalone.
//
// Which paths exist is decided at compile time by the target architecture:
//   x86-64   "avx512-vpopcntdq", "avx2" (per-function target attributes, chosen
//            at run time from what the CPU has) and "scalar" (baseline ISA);
//   aarch64  "neon" (Advanced SIMD is part of the AArch64 baseline) and "scalar";
//   others   "scalar" (32-bit x86 too: torch does not build there).
// CTMQ_NO_SIMD leaves only "scalar" on every architecture, so that the tests
// can build and run the portable path on any machine.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../conv_shape.h"

#if !defined(CTMQ_NO_SIMD) && (defined(__x86_64__) || defined(_M_X64))
#define CTMQ_X86_SIMD 1
#include <immintrin.h>
#define CTMQ_HW __attribute__((target("avx2,popcnt")))
#define CTMQ_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512vpopcntdq,avx2,popcnt")))
#elif !defined(CTMQ_NO_SIMD) && defined(__aarch64__)
#define CTMQ_NEON 1
#include <arm_neon.h>
#endif

#define CTMQ_INLINE inline __attribute__((always_inline))

namespace ctmq {
namespace binary_detail {

// ---------------------------------------------------------------- conv
// The conv as an XNOR-popcount GEMM over K = KH * KW * Cw64 64-bit words:
// each task packs its block of output pixels' patches (a word of zeros where a
// tap falls outside the image), multiplies them with all output channels, and
// corrects the border: a zero word against w counts popc(w) mismatches that
// must not count, so those (precomputed per channel and tap) are subtracted.
struct ConvArgs {
  int64_t N, C, H, W, Cw, Cw64;  // input; Cw64 = 64-bit words per tap
  int64_t O, KH, KW, K;          // weight; K = KH * KW * Cw64
  int64_t OH, OW, Ow;            // output (Ow: packed output words)
  int64_t sh, sw, ph, pw, dh, dw;
  const uint32_t* x;             // (N, H, W, Cw)
  const uint64_t* w8;            // (ceil(O/8), K, 8): 8 output channels interleaved
  const int64_t* popw8;          // (ceil(O/8), KH * KW, 8): popc of each channel's tap
  const float* scale;            // [O] or null
  const float* bias;             // [O] or null
  const float* residual;         // (N, O, OH, OW) or null: added last
  float* out;                    // (N, O, OH, OW) or null
  uint32_t* packed;              // (N, OH, OW, Ow) or null
};

constexpr int64_t kBlockM = 64;  // output pixels per task
constexpr int64_t kBlockO = 64;  // output channels per task (whole packed words)
constexpr int kMR = 4, kNR = 4;  // register tile: pixels x output channels

CTMQ_INLINE void store(const ConvArgs& a, int64_t n, int64_t m, int64_t oc, int64_t val) {
  float y = static_cast<float>(val);  // exact: |val| <= C * KH * KW < 2^24
  if (a.scale) y = y * a.scale[oc];
  if (a.bias) y = y + a.bias[oc];
  if (a.residual) y = y + a.residual[(n * a.O + oc) * a.OH * a.OW + m];
  if (a.out) {
    a.out[(n * a.O + oc) * a.OH * a.OW + m] = y;
  } else if (y >= 0.f) {  // the next layer's sign, taken in the epilogue
    a.packed[(n * a.OH * a.OW + m) * a.Ow + (oc >> 5)] |= 1u << (oc & 31);
  }
}

// Patches of output pixels [m0, m0 + rows) of image n into P (rows x K words);
// invalid[r] lists the taps outside the image (one bit per tap, KH*KW <= 64).
CTMQ_INLINE void build_patches(const ConvArgs& a, int64_t n, int64_t m0, int64_t rows,
                               uint64_t* P, uint64_t* invalid) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t oh = (m0 + r) / a.OW, ow = (m0 + r) % a.OW;
    uint64_t* dst = P + r * a.K;
    uint64_t bad = 0;
    for (int64_t kh = 0, tap = 0; kh < a.KH; ++kh) {
      const int64_t ih = oh * a.sh - a.ph + kh * a.dh;
      for (int64_t kw = 0; kw < a.KW; ++kw, ++tap, dst += a.Cw64) {
        const int64_t iw = ow * a.sw - a.pw + kw * a.dw;
        if (ih < 0 || ih >= a.H || iw < 0 || iw >= a.W) {
          for (int64_t j = 0; j < a.Cw64; ++j) dst[j] = 0;
          bad |= uint64_t{1} << tap;
        } else {  // inline word copies: a memcpy call per tap costs more than the copy
          const uint32_t* src = a.x + ((n * a.H + ih) * a.W + iw) * a.Cw;
          const int64_t full = a.Cw / 2;
          for (int64_t j = 0; j < full; ++j) {
            dst[j] = static_cast<uint64_t>(src[2 * j]) | static_cast<uint64_t>(src[2 * j + 1]) << 32;
          }
          if (a.Cw % 2) dst[full] = src[a.Cw - 1];  // an odd word count: high half 0
        }
      }
    }
    invalid[r] = bad;
  }
}

CTMQ_INLINE void finish(const ConvArgs& a, int64_t n, int64_t m, int64_t oc, uint64_t bad,
                        int64_t popc) {
  int64_t valid = a.KH * a.KW;
  for (uint64_t b = bad; b; b &= b - 1) {
    popc -= a.popw8[((oc / 8) * a.KH * a.KW + __builtin_ctzll(b)) * 8 + oc % 8];
    --valid;
  }
  store(a, n, m, oc, valid * a.C - 2 * popc);
}

template <int MR, int NR>
CTMQ_INLINE void micro(const ConvArgs& a, const uint64_t* P, const uint64_t* invalid, int64_t n,
                       int64_t m0, int64_t r, int64_t oc) {
  int64_t acc[MR][NR] = {};
  const uint64_t* p[MR];
  const uint64_t* w[NR];
  for (int i = 0; i < MR; ++i) p[i] = P + (r + i) * a.K;
  for (int j = 0; j < NR; ++j) w[j] = a.w8 + (oc + j) / 8 * a.K * 8 + (oc + j) % 8;
  for (int64_t k = 0; k < a.K; ++k) {
    uint64_t pv[MR], wv[NR];
    for (int i = 0; i < MR; ++i) pv[i] = p[i][k];
    for (int j = 0; j < NR; ++j) wv[j] = w[j][k * 8];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += __builtin_popcountll(pv[i] ^ wv[j]);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) finish(a, n, m0 + r + i, oc + j, invalid[r + i], acc[i][j]);
}

// A task owns the packed output words [oc0 / 32, ceil(oc1 / 32)) of its pixels.
CTMQ_INLINE void clear_packed(const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                              int64_t oc1) {
  if (!a.packed) return;
  for (int64_t r = 0; r < rows; ++r) {
    uint32_t* words = a.packed + (n * a.OH * a.OW + m0 + r) * a.Ow;
    for (int64_t wd = oc0 / 32; wd < (oc1 + 31) / 32; ++wd) words[wd] = 0;
  }
}

// One task: output pixels [m0, m0 + rows) of image n, output channels [oc0, oc1).
CTMQ_INLINE void conv_block(const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                            int64_t oc1, uint64_t* P) {
  uint64_t invalid[kBlockM];
  build_patches(a, n, m0, rows, P, invalid);
  clear_packed(a, n, m0, rows, oc0, oc1);
  const int64_t oc4 = oc0 + (oc1 - oc0) / kNR * kNR, r4 = rows - rows % kMR;
  for (int64_t oc = oc0; oc < oc4; oc += kNR) {
    int64_t r = 0;
    for (; r < r4; r += kMR) micro<kMR, kNR>(a, P, invalid, n, m0, r, oc);
    for (; r < rows; ++r) micro<1, kNR>(a, P, invalid, n, m0, r, oc);
  }
  for (int64_t oc = oc4; oc < oc1; ++oc) {
    for (int64_t r = 0; r < rows; ++r) micro<1, 1>(a, P, invalid, n, m0, r, oc);
  }
}


// ---------------------------------------------------------------- paths
// This build's code paths, ranked: set_cpu_path caps the rank.
#if defined(CTMQ_X86_SIMD)
enum Path : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kBestPath = kAvx512 };
#elif defined(CTMQ_NEON)
enum Path : int { kScalar = 0, kNeon = 1, kBestPath = kNeon };
#else
enum Path : int { kScalar = 0, kBestPath = kScalar };
#endif

Path cpu_best_path();  // the best path this CPU runs (detected once)
const char* path_name(Path p);

// One task (see conv_block) on path p, which must be <= cpu_best_path().
void conv_block_on(Path p, const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                   int64_t oc1, uint64_t* P);

}  // namespace binary_detail
}  // namespace ctmq
