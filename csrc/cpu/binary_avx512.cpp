// The "avx512-vpopcntdq" code path (x86-64): VPOPCNTD counts 16 output
// channels' 32-bit words per instruction. Every function carries its own
// target attributes (a baseline build; binary_conv.cpp checks the CPU).
// Torch-free.
#include "binary_kernels.h"

#if defined(CTMQ_X86_SIMD)

// GCC 12's avx512fintrin.h fills the unused merge operand of
// _mm512_slli_epi32 and _mm512_cvtepi32_ps with _mm512_undefined_*(), which
// -Wmaybe-uninitialized then reports inside the header.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace ctmq {
namespace bconv {
namespace detail {
namespace avx512 {

constexpr int kLanes = 16;
constexpr int kMaxMR = 12, kMaxNV = 4;

// mr x nv: mr * nv accumulators + nv weight vectors + the broadcast pixel
// word + a temporary within the 32 zmm registers. Measured on Zen 5 over
// ResNet-18's shapes (K = 2..144 words, O = 8..512; docs/design.md 5.1):
// 6x4 is the fastest or within 2% everywhere, so the choice does not depend
// on the shape (a narrower O only clamps nv).
constexpr Tile kTiles[] = {{6, 4}, {5, 4}, {4, 4}, {8, 3}, {12, 2}, {8, 2}};

Tile choose(int64_t, int64_t) {
  return kTiles[0];
}

// b[j * ldb + i] = a[i * lda + j] for i < rows, j < cols, in 8x8 blocks;
// a partial block loads and stores with masks (a tile of 6 pixels is one).
CTMQ_AVX512 void transpose(const float* a, int64_t lda, float* b, int64_t ldb, int rows, int cols) {
  for (int i0 = 0; i0 < rows; i0 += 8) {
    const int r = std::min(8, rows - i0);
    const __mmask8 row_mask = static_cast<__mmask8>((1u << r) - 1);
    for (int j0 = 0; j0 < cols; j0 += 8) {
      const int c = std::min(8, cols - j0);
      __m256 v[8];
      if (r == 8 && c == 8) {  // the common block, without masks or branches
        CTMQ_UNROLL for (int k = 0; k < 8; ++k) v[k] = _mm256_loadu_ps(a + (i0 + k) * lda + j0);
        transpose8x8(v);
        CTMQ_UNROLL for (int k = 0; k < 8; ++k) _mm256_storeu_ps(b + (j0 + k) * ldb + i0, v[k]);
        continue;
      }
      const __mmask8 col_mask = static_cast<__mmask8>((1u << c) - 1);
      CTMQ_UNROLL for (int k = 0; k < 8; ++k) {
        v[k] = k < r ? _mm256_maskz_loadu_ps(col_mask, a + (i0 + k) * lda + j0) : _mm256_setzero_ps();
      }
      transpose8x8(v);
      CTMQ_UNROLL for (int k = 0; k < 8; ++k) {
        if (k < c) _mm256_mask_storeu_ps(b + (j0 + k) * ldb + i0, row_mask, v[k]);
      }
    }
  }
}

template <int MR, int NV>
struct Gemm {
  CTMQ_AVX512 static void run(const Source& src, int64_t S, int64_t run, const uint32_t* const* w,
                              int32_t* counts) {
    __m512i acc[MR][NV];
    const uint32_t* wp[NV];
    CTMQ_UNROLL for (int j = 0; j < NV; ++j) wp[j] = w[j];
    CTMQ_UNROLL for (int i = 0; i < MR; ++i) CTMQ_UNROLL for (int j = 0; j < NV; ++j) acc[i][j] =
        _mm512_setzero_si512();
    for (int64_t s = 0; s < S; ++s) {
      const uint32_t* a[MR];
      tile_rows<MR>(src, s, a);
      for (int64_t kk = 0; kk < run; ++kk) {
        __m512i wv[NV];
        CTMQ_UNROLL for (int j = 0; j < NV; ++j) wv[j] = _mm512_loadu_si512(wp[j] + kGroup * kk);
        CTMQ_UNROLL for (int i = 0; i < MR; ++i) {
          const __m512i p = _mm512_set1_epi32(static_cast<int>(a[i][kk]));
          CTMQ_UNROLL for (int j = 0; j < NV; ++j) {
            acc[i][j] = _mm512_add_epi32(acc[i][j], _mm512_popcnt_epi32(_mm512_xor_si512(wv[j], p)));
          }
        }
      }
      CTMQ_UNROLL for (int j = 0; j < NV; ++j) wp[j] += kGroup * run;
    }
    CTMQ_UNROLL for (int i = 0; i < MR; ++i) CTMQ_UNROLL for (int j = 0; j < NV; ++j)
        _mm512_store_si512(counts + i * kMaxTileCols + j * kLanes, acc[i][j]);
  }
};

// The tile's outputs, vector by vector, per the rules of binary_conv.h:
// kOut 0 / 1 / 2 = no float output / NCHW / NHWC (binary_kernels.h).
template <int kOut, bool kPacked, bool kRes>
struct Epilogue {
  CTMQ_AVX512 static void run(const Conv& cv, const int32_t* counts, int rows, int cols, int64_t pix0,
                              int64_t c, const uint64_t* invalid, float* stage) {
    alignas(64) float tile[kMaxTileRows * kMaxTileCols];  // an NCHW residual, gathered
    // locals, not cv's fields: the packed stores are bytes, which may alias anything
    const int64_t O = cv.O, T = cv.T, C = cv.C, packed_ld = cv.Ow * 4;
    const int32_t* const taps = cv.tap_popc + (c / kGroup) * T * kGroup;
    float* const out = cv.out + (kOut == 2 ? pix0 * O + c : 0);
    uint8_t* const packed = kPacked ? packed_bytes(cv, pix0) + c / 8 : nullptr;
    const int nv = cols / kLanes, valid_cols = static_cast<int>(std::min<int64_t>(cols, O - c));
    // zeroed: gcc cannot see that only the first nv entries are read
    __m512 scale[kMaxNV]{}, bias[kMaxNV]{}, thr[kMaxNV]{};
    __mmask16 live[kMaxNV]{};
    CTMQ_UNROLL for (int j = 0; j < kMaxNV; ++j) {
      if (j >= nv) break;
      scale[j] = _mm512_loadu_ps(cv.scale + c + j * kLanes);
      bias[j] = _mm512_loadu_ps(cv.bias + c + j * kLanes);
      thr[j] = _mm512_loadu_ps(cv.threshold + c + j * kLanes);
      const int n = static_cast<int>(std::min<int64_t>(kLanes, O - c - j * kLanes));
      live[j] = static_cast<__mmask16>((1u << n) - 1);
    }
    const float* res = tile;  // residual row i at res + i * res_ld
    int64_t res_ld = kMaxTileCols;
    if (kRes && cv.residual_layout == Layout::kNCHW) {
      nchw_to_tile(cv, cv.residual, pix0, rows, c, valid_cols, tile, &transpose);
    } else if (kRes) {
      res = cv.residual + pix0 * O + c;
      res_ld = O;
    }
    for (int i = 0; i < rows; ++i) {
      const uint64_t inv = invalid[i];
      const __m512i base = _mm512_set1_epi32(static_cast<int>((T - __builtin_popcountll(inv)) * C));
      uint64_t bits = 0;  // the row's packed bits, 16 per vector
      CTMQ_UNROLL for (int j = 0; j < kMaxNV; ++j) {
        if (j >= nv) break;
        __m512i cnt = _mm512_load_si512(counts + i * kMaxTileCols + j * kLanes);
        for (uint64_t b = inv; b; b &= b - 1) {  // outside taps' zero words counted popc(w)
          cnt = _mm512_sub_epi32(cnt, _mm512_loadu_si512(taps + (j * T + __builtin_ctzll(b)) * kGroup));
        }
        __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(base, _mm512_slli_epi32(cnt, 1)));
        y = _mm512_add_ps(_mm512_mul_ps(y, scale[j]), bias[j]);
        if (kRes) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(live[j], res + i * res_ld + j * kLanes));
        if (kOut == 2) _mm512_mask_storeu_ps(out + i * O + j * kLanes, live[j], y);
        if (kOut == 1) _mm512_store_ps(stage + i * kMaxTileCols + j * kLanes, y);
        if (kPacked) {
          const __mmask16 ge =
              _mm512_mask_cmp_ps_mask(live[j], _mm512_add_ps(y, thr[j]), _mm512_setzero_ps(), _CMP_GE_OQ);
          bits |= static_cast<uint64_t>(_cvtmask16_u32(ge)) << (16 * j);
        }
      }
      if (kPacked) {  // one store of the row's bytes (little-endian: channel c first)
        uint8_t* dst = packed + i * packed_ld;
        if (nv == 4)
          std::memcpy(dst, &bits, 8);
        else if (nv == 2)
          std::memcpy(dst, &bits, 4);
        else
          for (int j = 0; j < nv; ++j)
            std::memcpy(dst + 2 * j, reinterpret_cast<const uint8_t*>(&bits) + 2 * j, 2);
      }
    }
  }
};

void run_block(const Conv& cv, const Block& b, Tile tile) {
  const TileOps ops{kLanes, &gemm_lookup<Gemm, kMaxMR, kMaxNV>, epilogue_for<Epilogue>(cv), &transpose,
                    nullptr};
  run_tiles(cv, b, tile, ops);
}

// 16 channels per compare: bit c of the word = (x[c] + threshold[c]) >= 0.
CTMQ_AVX512 void pack(const float* x, int64_t pixels, int64_t C, const float* threshold, uint32_t* out) {
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
  CTMQ_UNROLL for (int j = 0; j < 4; ++j) w[j] = _mm512_set1_epi32(static_cast<int>(0x9E3779B9u * (j + 1u)));
  CTMQ_UNROLL for (int i = 0; i < 4; ++i) {
    p[i] = _mm512_set1_epi32(static_cast<int>(0x7F4A7C15u * (i + 3u)));
    CTMQ_UNROLL for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  }
  for (int64_t it = 0; it < iterations; ++it) {
    CTMQ_UNROLL for (int i = 0; i < 4; ++i) CTMQ_UNROLL for (int j = 0; j < 4; ++j) acc[i][j] =
        _mm512_add_epi32(acc[i][j], _mm512_popcnt_epi32(_mm512_xor_si512(w[j], p[i])));
    CTMQ_UNROLL for (int i = 0; i < 4; ++i) __asm__ volatile("" : "+v"(p[i]));
  }
  __m512i sum = _mm512_setzero_si512();
  for (auto& row : acc)
    for (const __m512i& v : row) sum = _mm512_add_epi32(sum, v);
  __asm__ volatile("" : : "v"(sum));
  return static_cast<double>(iterations) * 16 * 8;  // 16 vectors of 8 64-bit words
}

}  // namespace avx512

const PathInfo& avx512_path() {
  using namespace avx512;
  static const PathInfo info{
      kLanes,  false,   true,       kTiles, static_cast<int>(sizeof(kTiles) / sizeof(kTiles[0])),
      &choose, nullptr, &run_block, &pack,  &peak_loop};
  return info;
}

}  // namespace detail
}  // namespace bconv
}  // namespace ctmq

#endif  // CTMQ_X86_SIMD
