// The "avx512-vpopcntdq" code path (x86-64): VPOPCNTD counts 16 output
// channels' 32-bit words per instruction. Every function carries its own
// target attributes (a baseline build; binary_conv.cpp checks the CPU).
// Torch-free.
#include "binary_kernels.h"

#if defined(CTMQ_X86_SIMD)

namespace ctmq {
namespace bconv {
namespace detail {
namespace {

constexpr int kLanes = 16;
constexpr int kMaxMR = 12, kMaxNV = 4;

// mr x nv: mr * nv accumulators + nv weight vectors + the broadcast pixel
// word + a temporary within the 32 zmm registers.
constexpr Tile kTiles[] = {{6, 4}, {8, 3}, {12, 2}, {4, 4}, {8, 2}};

Tile choose(int64_t K, int64_t O) {
  (void)K;
  (void)O;
  return kTiles[0];
}

template <int MR, int NV>
struct Gemm {
  CTMQ_AVX512 static void run(const uint32_t* P, int64_t ldp, int64_t K, const uint32_t* const* w,
                              int32_t* counts) {
    __m512i acc[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; ++k) {
      __m512i wv[NV];
      for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_si512(w[j] + kGroup * k);
      for (int i = 0; i < MR; ++i) {
        const __m512i p = _mm512_set1_epi32(static_cast<int>(P[i * ldp + k]));
        for (int j = 0; j < NV; ++j) {
          acc[i][j] = _mm512_add_epi32(acc[i][j], _mm512_popcnt_epi32(_mm512_xor_si512(wv[j], p)));
        }
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) _mm512_store_si512(counts + i * kMaxTileCols + j * kLanes, acc[i][j]);
  }
};

// One vector of 16 channels from c of pixel row i: the rules of binary_conv.h.
CTMQ_AVX512 CTMQ_INLINE __m512 output_vector(const Conv& cv, const int32_t* counts, int64_t c,
                                             uint64_t invalid) {
  __m512i cnt = _mm512_load_si512(counts);
  const int32_t* taps = cv.tap_popc + (c / kGroup) * cv.T * kGroup;
  for (uint64_t b = invalid; b; b &= b - 1) {  // outside taps' zero words counted popc(w)
    cnt = _mm512_sub_epi32(cnt, _mm512_loadu_si512(taps + __builtin_ctzll(b) * kGroup));
  }
  const __m512i base = _mm512_set1_epi32(static_cast<int>(valid_taps(cv, invalid) * cv.C));
  __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(base, _mm512_slli_epi32(cnt, 1)));
  if (cv.scale) y = _mm512_mul_ps(y, _mm512_loadu_ps(cv.scale + c));
  if (cv.bias) y = _mm512_add_ps(y, _mm512_loadu_ps(cv.bias + c));
  return y;
}

CTMQ_AVX512 void epilogue(const Conv& cv, const int32_t* counts, int rows, int cols, int64_t pix0,
                          int64_t c, const uint64_t* invalid) {
  alignas(64) float rows_nchw[kMaxTileRows * kMaxTileCols];  // NCHW residual in, NCHW out
  const int valid_cols = static_cast<int>(std::min<int64_t>(cols, cv.O - c));
  const bool res_nchw = cv.residual && cv.residual_layout == Layout::kNCHW;
  const bool res_nhwc = cv.residual && cv.residual_layout == Layout::kNHWC;
  const bool out_nchw = cv.out && cv.out_layout == Layout::kNCHW;
  const bool out_nhwc = cv.out && cv.out_layout == Layout::kNHWC;
  if (res_nchw) nchw_to_tile(cv, cv.residual, pix0, rows, c, valid_cols, rows_nchw, &transpose_avx);
  for (int i = 0; i < rows; ++i) {
    const int64_t pix = pix0 + i;
    for (int j = 0; j * kLanes < cols; ++j) {
      const int64_t cj = c + j * kLanes;
      const int n = static_cast<int>(std::min<int64_t>(kLanes, cv.O - cj));
      const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
      float* row = rows_nchw + i * kMaxTileCols + j * kLanes;
      __m512 y = output_vector(cv, counts + i * kMaxTileCols + j * kLanes, cj, invalid[i]);
      if (res_nhwc) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(live, cv.residual + pix * cv.O + cj));
      if (res_nchw) y = _mm512_add_ps(y, _mm512_load_ps(row));
      if (out_nhwc) _mm512_mask_storeu_ps(cv.out + pix * cv.O + cj, live, y);
      if (out_nchw) _mm512_store_ps(row, y);
      if (cv.packed) {
        const __m512 z = cv.threshold ? _mm512_add_ps(y, _mm512_loadu_ps(cv.threshold + cj)) : y;
        const uint16_t bits = _mm512_mask_cmp_ps_mask(live, z, _mm512_setzero_ps(), _CMP_GE_OQ);
        std::memcpy(packed_bytes(cv, pix) + cj / 8, &bits, 2);
      }
    }
  }
  if (out_nchw) tile_to_nchw(cv, rows_nchw, pix0, rows, c, valid_cols, cv.out, &transpose_avx);
}

void run_block(const Conv& cv, const Block& b, Tile tile) {
  run_tiles(cv, b, tile, kLanes, &gemm_lookup<Gemm, kMaxMR, kMaxNV>, &epilogue);
}

// 16 channels per compare: bit c of the word = (x[c] + threshold[c]) >= 0.
CTMQ_AVX512 void pack(const float* x, int64_t pixels, int64_t C, const float* threshold,
                      uint32_t* out) {
  const int64_t Cw = (C + 31) / 32;
  for (int64_t p = 0; p < pixels; ++p) {
    const float* px = x + p * C;
    uint16_t* dst = reinterpret_cast<uint16_t*>(out + p * Cw);
    for (int64_t c = 0; c < Cw * 32; c += 16) {
      const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, C - c));
      const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
      __m512 v = _mm512_maskz_loadu_ps(live, px + c);
      if (threshold) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, threshold + c));
      dst[c / 16] = _mm512_mask_cmp_ps_mask(live, v, _mm512_setzero_ps(), _CMP_GE_OQ);
    }
  }
}

// The GEMM's inner step on registers: 4 pixel words x 4 vectors of 16
// channels, xor + VPOPCNTD + add; the asm hides the pixel words' values.
CTMQ_AVX512 double peak_loop(int64_t iterations) {
  __m512i acc[4][4], w[4], p[4];
  for (int j = 0; j < 4; ++j) w[j] = _mm512_set1_epi32(static_cast<int>(0x9E3779B9u * (j + 1u)));
  for (int i = 0; i < 4; ++i) {
    p[i] = _mm512_set1_epi32(static_cast<int>(0x7F4A7C15u * (i + 3u)));
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  }
  for (int64_t it = 0; it < iterations; ++it) {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        acc[i][j] = _mm512_add_epi32(acc[i][j], _mm512_popcnt_epi32(_mm512_xor_si512(w[j], p[i])));
    for (int i = 0; i < 4; ++i) __asm__ volatile("" : "+v"(p[i]));
  }
  __m512i sum = _mm512_setzero_si512();
  for (auto& row : acc)
    for (const __m512i& v : row) sum = _mm512_add_epi32(sum, v);
  __asm__ volatile("" : : "v"(sum));
  return static_cast<double>(iterations) * 16 * 8;  // 16 vectors of 8 64-bit words
}

}  // namespace

const PathInfo& avx512_path() {
  static const PathInfo info{kLanes, 1, kTiles, static_cast<int>(sizeof(kTiles) / sizeof(kTiles[0])),
                             &choose, nullptr, &run_block, &pack, &peak_loop};
  return info;
}

}  // namespace detail
}  // namespace bconv
}  // namespace ctmq

#endif  // CTMQ_X86_SIMD
