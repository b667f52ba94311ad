// See sgemm.h. One register tile per path: mr rows of C x one 32-column panel
// (avx512: 12 x 2 vectors; avx2: 6 x 2 vectors, twice per panel; neon: 6 x 4
// vectors, twice; scalar: 4 rows, the compiler's vectors). Each accumulator
// starts at the bias and adds one product per k, in order: the same
// arithmetic on every path. Rows past a multiple of mr take the 1-row tile.
#include "sgemm.h"

#include <algorithm>
#include <cstring>

#if !defined(CTMQ_NO_SIMD) && (defined(__x86_64__) || defined(_M_X64))
#define CTMQ_SGEMM_X86 1
#include <immintrin.h>
#define CTMQ_AVX2_FN __attribute__((target("avx2")))
#define CTMQ_AVX512_FN __attribute__((target("avx512f")))
#elif !defined(CTMQ_NO_SIMD) && defined(__aarch64__)
#define CTMQ_SGEMM_NEON 1
#include <arm_neon.h>
#endif

namespace ctmq {
namespace rt {
namespace {

constexpr int64_t kPanel = 32;

// ------------------------------------------------------------------ scalar
template <int MR>
void tile_scalar(const float* A, int64_t lda, const float* panel, int64_t K, const float* bias,
                 float* out) {  // out: MR x 32, row stride 32
  float acc[MR][kPanel];
  for (int i = 0; i < MR; ++i) std::memcpy(acc[i], bias, sizeof(float) * kPanel);
  for (int64_t k = 0; k < K; ++k) {
    const float* b = panel + k * kPanel;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float a = A[i * lda + k];
      for (int j = 0; j < kPanel; ++j) acc[i][j] = acc[i][j] + a * b[j];
    }
  }
  for (int i = 0; i < MR; ++i) std::memcpy(out + i * kPanel, acc[i], sizeof(float) * kPanel);
}

#if defined(CTMQ_SGEMM_X86)
// ------------------------------------------------------------------ avx512
template <int MR>
CTMQ_AVX512_FN void tile_avx512(const float* A, int64_t lda, const float* panel, int64_t K, const float* bias,
                                float* out) {
  __m512 acc[MR][2];
  const __m512 b0 = _mm512_loadu_ps(bias), b1 = _mm512_loadu_ps(bias + 16);
  for (int i = 0; i < MR; ++i) acc[i][0] = b0, acc[i][1] = b1;
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * kPanel), w1 = _mm512_loadu_ps(panel + k * kPanel + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * lda + k]);
      acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_mul_ps(a, w0));
      acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_mul_ps(a, w1));
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(out + i * kPanel, acc[i][0]);
    _mm512_storeu_ps(out + i * kPanel + 16, acc[i][1]);
  }
}

// ------------------------------------------------------------------ avx2
template <int MR>
CTMQ_AVX2_FN void half_avx2(const float* A, int64_t lda, const float* panel, int64_t K, const float* bias,
                            float* out, int half) {
  __m256 acc[MR][2];
  const int off = half * 16;
  const __m256 b0 = _mm256_loadu_ps(bias + off), b1 = _mm256_loadu_ps(bias + off + 8);
  for (int i = 0; i < MR; ++i) acc[i][0] = b0, acc[i][1] = b1;
  for (int64_t k = 0; k < K; ++k) {
    const float* row = panel + k * kPanel + off;
    const __m256 w0 = _mm256_loadu_ps(row), w1 = _mm256_loadu_ps(row + 8);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_set1_ps(A[i * lda + k]);
      acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_mul_ps(a, w0));
      acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_mul_ps(a, w1));
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(out + i * kPanel + off, acc[i][0]);
    _mm256_storeu_ps(out + i * kPanel + off + 8, acc[i][1]);
  }
}

template <int MR>
void tile_avx2(const float* A, int64_t lda, const float* panel, int64_t K, const float* bias, float* out) {
  half_avx2<MR>(A, lda, panel, K, bias, out, 0);
  half_avx2<MR>(A, lda, panel, K, bias, out, 1);
}
#endif

#if defined(CTMQ_SGEMM_NEON)
// ------------------------------------------------------------------ neon
template <int MR>
void half_neon(const float* A, int64_t lda, const float* panel, int64_t K, const float* bias, float* out,
               int half) {
  float32x4_t acc[MR][4];
  const int off = half * 16;
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 4; ++v) acc[i][v] = vld1q_f32(bias + off + 4 * v);
  for (int64_t k = 0; k < K; ++k) {
    const float* row = panel + k * kPanel + off;
    float32x4_t w[4];
    for (int v = 0; v < 4; ++v) w[v] = vld1q_f32(row + 4 * v);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float32x4_t a = vdupq_n_f32(A[i * lda + k]);
      for (int v = 0; v < 4; ++v) acc[i][v] = vaddq_f32(acc[i][v], vmulq_f32(a, w[v]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < 4; ++v) vst1q_f32(out + i * kPanel + off + 4 * v, acc[i][v]);
}

template <int MR>
void tile_neon(const float* A, int64_t lda, const float* panel, int64_t K, const float* bias, float* out) {
  half_neon<MR>(A, lda, panel, K, bias, out, 0);
  half_neon<MR>(A, lda, panel, K, bias, out, 1);
}
#endif

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*);

struct Path {
  const char* name;
  int mr;
  TileFn full, one;
};

Path tiles(bconv::Path p) {
#if defined(CTMQ_SGEMM_X86)
  if (p == bconv::Path::kAvx512) return {"avx512", 12, tile_avx512<12>, tile_avx512<1>};
  if (p == bconv::Path::kAvx2) return {"avx2", 6, tile_avx2<6>, tile_avx2<1>};
#elif defined(CTMQ_SGEMM_NEON)
  if (p == bconv::Path::kNeon) return {"neon", 6, tile_neon<6>, tile_neon<1>};
#endif
  (void)p;
  return {"scalar", 4, tile_scalar<4>, tile_scalar<1>};
}

}  // namespace

PackedB pack_b(const float* B, int64_t K, int64_t N, int64_t ldb) {
  PackedB p;
  p.K = K;
  p.N = N;
  const int64_t panels = (N + kPanel - 1) / kPanel;
  p.panels.assign(panels * K * kPanel, 0.f);
  for (int64_t q = 0; q < panels; ++q)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < kPanel && q * kPanel + j < N; ++j) {
        p.panels[(q * K + k) * kPanel + j] = B[k * ldb + q * kPanel + j];
      }
  return p;
}

void sgemm(int64_t M, const float* A, int64_t lda, const PackedB& B, float* C, int64_t ldc, const float* bias,
           bconv::Path which) {
  const Path path = tiles(which);
  const int64_t K = B.K, N = B.N;
  alignas(64) float b[kPanel];
  alignas(64) float out[12 * kPanel];
  for (int64_t q = 0; q * kPanel < N; ++q) {
    const int64_t j0 = q * kPanel, cols = std::min(kPanel, N - j0);
    for (int64_t j = 0; j < kPanel; ++j) b[j] = bias && j < cols ? bias[j0 + j] : 0.f;
    const float* panel = B.panels.data() + q * K * kPanel;
    int64_t i = 0;
    for (; i + path.mr <= M; i += path.mr) {
      path.full(A + i * lda, lda, panel, K, b, out);
      for (int r = 0; r < path.mr; ++r)
        std::memcpy(C + (i + r) * ldc + j0, out + r * kPanel, sizeof(float) * cols);
    }
    for (; i < M; ++i) {
      path.one(A + i * lda, lda, panel, K, b, out);
      std::memcpy(C + i * ldc + j0, out, sizeof(float) * cols);
    }
  }
}

}  // namespace rt
}  // namespace ctmq
