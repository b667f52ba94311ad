// The "avx2" code path (x86-64): popcount by nibble lookup (vpshufb) in byte
// counters, 8 output channels' 32-bit words per 256-bit vector. Every
// function carries its own target attributes (a baseline build;
// binary_conv.cpp checks the CPU). Torch-free.
//
// popc(p ^ w) per byte = lut[(p ^ w) & 15] + lut[(p ^ w) >> 4]; both sides
// are split into nibbles beforehand, (p & 15) ^ (w & 15) and (p >> 4 & 15) ^
// (w >> 4 & 15), so a pair costs xor, xor, vpshufb, vpshufb, add, add: the
// input once per call (split_words), the weight once per channel tile and
// task (split_weights). A byte counter gains at most 8 per word, so the
// counters are summed into 32-bit lanes every 31 words (vpmaddubsw, vpmaddwd).
#include <vector>

#include "binary_kernels.h"

#if defined(CTMQ_X86_SIMD)

namespace ctmq {
namespace bconv {
namespace detail {

// ------------------------------------------------------------ transposes
namespace avx2 {
CTMQ_AVX2 CTMQ_INLINE void transpose8x8(const float* a, int64_t lda, float* b, int64_t ldb) {
  __m256 r[8];
  CTMQ_UNROLL for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(a + k * lda);
  detail::transpose8x8(r);
  CTMQ_UNROLL for (int k = 0; k < 8; ++k) _mm256_storeu_ps(b + k * ldb, r[k]);
}

CTMQ_AVX2 CTMQ_INLINE void transpose4x4(const float* a, int64_t lda, float* b, int64_t ldb) {
  __m128 r0 = _mm_loadu_ps(a), r1 = _mm_loadu_ps(a + lda);
  __m128 r2 = _mm_loadu_ps(a + 2 * lda), r3 = _mm_loadu_ps(a + 3 * lda);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(b, r0);
  _mm_storeu_ps(b + ldb, r1);
  _mm_storeu_ps(b + 2 * ldb, r2);
  _mm_storeu_ps(b + 3 * ldb, r3);
}
}  // namespace avx2

CTMQ_AVX2 void transpose_avx(const float* a, int64_t lda, float* b, int64_t ldb, int rows, int cols) {
  int i = 0;
  for (; i + 8 <= rows; i += 8) {
    int j = 0;
    for (; j + 8 <= cols; j += 8) avx2::transpose8x8(a + i * lda + j, lda, b + j * ldb + i, ldb);
    transpose_scalar(a + i * lda + j, lda, b + j * ldb + i, ldb, 8, cols - j);
  }
  for (; i + 4 <= rows; i += 4) {
    int j = 0;
    for (; j + 4 <= cols; j += 4) avx2::transpose4x4(a + i * lda + j, lda, b + j * ldb + i, ldb);
    transpose_scalar(a + i * lda + j, lda, b + j * ldb + i, ldb, 4, cols - j);
  }
  transpose_scalar(a + i * lda, lda, b + i, ldb, rows - i, cols);
}

namespace avx2 {

constexpr int kLanes = 8;
constexpr int kMaxMR = 10, kMaxNV = 4;
constexpr int kFlush = 31;  // words between byte-counter flushes: 31 * 8 < 256

// mr x nv: mr * nv byte counters, the pixel word's two nibble vectors, the
// lookup table and temporaries within the 16 ymm registers; the weights stay
// memory operands (see Gemm), so a wide tile pays: 3x4 is the fastest or
// within 4% of it on ResNet-18's shapes (K = 2..144, O = 8..512) on Zen 5
// capped to AVX2 (docs/design.md 5.1; not measured on an AVX2-only CPU).
constexpr Tile kTiles[] = {{3, 4}, {2, 4}, {3, 3}, {4, 2}, {5, 2}, {8, 1}};

Tile choose(int64_t, int64_t) {
  return kTiles[0];
}

CTMQ_AVX2 CTMQ_INLINE __m256i nibble_lut() {
  return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3,
                          2, 3, 3, 4);
}

// n words become n (low nibbles, high nibbles) word pairs.
CTMQ_AVX2 void split_words(const uint32_t* src, int64_t n, uint32_t* dst) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
    const __m256i lo = _mm256_and_si256(v, low4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    const __m256i a = _mm256_unpacklo_epi32(lo, hi), b = _mm256_unpackhi_epi32(lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * k), _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * k + 8), _mm256_permute2x128_si256(a, b, 0x31));
  }
  for (; k < n; ++k) {
    dst[2 * k] = src[k] & 0x0f0f0f0fu;
    dst[2 * k + 1] = (src[k] >> 4) & 0x0f0f0f0fu;
  }
}

// The channel tile's weight as (k, vector j, low / high nibbles, 8 lanes).
CTMQ_AVX2 void split_weights(const Conv& cv, int64_t c, int nv, uint32_t* ws) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  for (int j = 0; j < nv; ++j) {
    const int64_t cj = c + j * kLanes;
    const uint32_t* src = cv.w + (cj / kGroup) * cv.K * kGroup + cj % kGroup;
    for (int64_t k = 0; k < cv.K; ++k) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k * kGroup));
      uint32_t* dst = ws + (k * nv + j) * 2 * kLanes;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_and_si256(v, low4));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + kLanes),
                          _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
    }
  }
}

// The byte counters into the 32-bit sums (each lane's 4 bytes), then zero.
template <int MR, int NV>
CTMQ_AVX2 CTMQ_INLINE void flush(__m256i (&bytes)[MR][NV], __m256i* total) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  CTMQ_UNROLL for (int i = 0; i < MR; ++i) {
    CTMQ_UNROLL for (int j = 0; j < NV; ++j) {
      const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(bytes[i][j], ones8), ones16);
      _mm256_store_si256(total + i * 8 + j, _mm256_add_epi32(_mm256_load_si256(total + i * 8 + j), sums));
      bytes[i][j] = _mm256_setzero_si256();
    }
  }
}

template <int MR, int NV>
struct Gemm {
  CTMQ_AVX2 static void run(const Source& src, int64_t S, int64_t run, const uint32_t* const* w,
                            int32_t* counts) {
    const __m256i lut = nibble_lut();
    __m256i* total = reinterpret_cast<__m256i*>(counts);  // 32-bit sums, (i, j) at i * 8 + j
    CTMQ_UNROLL for (int i = 0; i < MR; ++i) CTMQ_UNROLL for (int j = 0; j < NV; ++j)
        _mm256_store_si256(total + i * 8 + j, _mm256_setzero_si256());
    __m256i bytes[MR][NV];
    int filled = 0;  // words counted in bytes since the last flush
    CTMQ_UNROLL for (int i = 0; i < MR; ++i) CTMQ_UNROLL for (int j = 0; j < NV; ++j) bytes[i][j] =
        _mm256_setzero_si256();
    const __m256i* wk = reinterpret_cast<const __m256i*>(w[0]);  // split_weights' order
    for (int64_t s = 0; s < S; ++s) {
      const uint32_t* a[MR];
      tile_rows<MR>(src, s, a);
      for (int64_t k0 = 0; k0 < run;) {
        const int64_t k1 = std::min<int64_t>(run, k0 + kFlush - filled);  // no branch inside
        for (int64_t kk = k0; kk < k1; ++kk, wk += 2 * NV) {
          CTMQ_UNROLL for (int i = 0; i < MR; ++i) {
            // The weight vectors stay memory operands of the xors (reloaded
            // per pixel from L1), leaving the 16 registers to the counters.
            __asm__("" : "+r"(wk));
            const __m256i pl = _mm256_set1_epi32(static_cast<int>(a[i][2 * kk]));
            const __m256i ph = _mm256_set1_epi32(static_cast<int>(a[i][2 * kk + 1]));
            CTMQ_UNROLL for (int j = 0; j < NV; ++j) {
              const __m256i lo =
                  _mm256_shuffle_epi8(lut, _mm256_xor_si256(pl, _mm256_loadu_si256(wk + 2 * j)));
              const __m256i hi =
                  _mm256_shuffle_epi8(lut, _mm256_xor_si256(ph, _mm256_loadu_si256(wk + 2 * j + 1)));
              bytes[i][j] = _mm256_add_epi8(bytes[i][j], _mm256_add_epi8(lo, hi));
            }
          }
        }
        filled += static_cast<int>(k1 - k0);
        k0 = k1;
        if (filled == kFlush) flush<MR, NV>(bytes, total), filled = 0;
      }
    }
    if (filled) flush<MR, NV>(bytes, total);
  }
};

CTMQ_AVX2 CTMQ_INLINE __m256i lanes_below(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The tile's outputs, vector by vector, per the rules of binary_conv.h:
// kOut 0 / 1 / 2 = no float output / NCHW / NHWC (binary_kernels.h).
template <int kOut, bool kPacked, bool kRes>
struct Epilogue {
  CTMQ_AVX2 static void run(const Conv& cv, const int32_t* counts, int rows, int cols, int64_t pix0,
                            int64_t c, const uint64_t* invalid, float* stage) {
    alignas(32) float tile[kMaxTileRows * kMaxTileCols];  // an NCHW residual, gathered
    const int nv = cols / kLanes, valid_cols = static_cast<int>(std::min<int64_t>(cols, cv.O - c));
    // zeroed: gcc cannot see that only the first nv entries are read
    __m256 scale[kMaxNV]{}, bias[kMaxNV]{}, thr[kMaxNV]{};
    __m256i live[kMaxNV]{};
    int live_bits[kMaxNV]{};
    CTMQ_UNROLL for (int j = 0; j < kMaxNV; ++j) {
      if (j >= nv) break;
      scale[j] = _mm256_loadu_ps(cv.scale + c + j * kLanes);
      bias[j] = _mm256_loadu_ps(cv.bias + c + j * kLanes);
      thr[j] = _mm256_loadu_ps(cv.threshold + c + j * kLanes);
      const int n = static_cast<int>(std::min<int64_t>(kLanes, cv.O - c - j * kLanes));
      live[j] = lanes_below(n);
      live_bits[j] = (1 << n) - 1;
    }
    const float* res = tile;  // residual row i at res + i * res_ld
    int64_t res_ld = kMaxTileCols;
    if (kRes && cv.residual_layout == Layout::kNCHW) {
      nchw_to_tile(cv, cv.residual, pix0, rows, c, valid_cols, tile, &transpose_avx);
    } else if (kRes) {
      res = cv.residual + pix0 * cv.O + c;
      res_ld = cv.O;
    }
    for (int i = 0; i < rows; ++i) {
      const int64_t pix = pix0 + i;
      const uint64_t inv = invalid[i];
      const __m256i base = _mm256_set1_epi32(static_cast<int>((cv.T - __builtin_popcountll(inv)) * cv.C));
      CTMQ_UNROLL for (int j = 0; j < kMaxNV; ++j) {
        if (j >= nv) break;
        const int64_t cj = c + j * kLanes;
        __m256i cnt =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(counts + i * kMaxTileCols + j * kLanes));
        if (inv) {  // outside taps' zero words counted popc(w)
          const int32_t* taps = cv.tap_popc + (cj / kGroup) * cv.T * kGroup + cj % kGroup;
          for (uint64_t b = inv; b; b &= b - 1) {
            cnt = _mm256_sub_epi32(
                cnt,
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(taps + __builtin_ctzll(b) * kGroup)));
          }
        }
        __m256 y = _mm256_cvtepi32_ps(_mm256_sub_epi32(base, _mm256_slli_epi32(cnt, 1)));
        y = _mm256_add_ps(_mm256_mul_ps(y, scale[j]), bias[j]);
        if (kRes) y = _mm256_add_ps(y, _mm256_maskload_ps(res + i * res_ld + j * kLanes, live[j]));
        if (kOut == 2) _mm256_maskstore_ps(cv.out + pix * cv.O + cj, live[j], y);
        if (kOut == 1) _mm256_store_ps(stage + i * kMaxTileCols + j * kLanes, y);
        if (kPacked) {
          const __m256 z = _mm256_add_ps(y, thr[j]);
          const int ge = _mm256_movemask_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ));
          packed_bytes(cv, pix)[cj / 8] = static_cast<uint8_t>(ge & live_bits[j]);
        }
      }
    }
  }
};

// The channel tile's weight split into nibbles, in a buffer of the thread's.
CTMQ_AVX2 void weights(const Conv& cv, int64_t c, int nv, const uint32_t** w) {
  thread_local std::vector<uint32_t> split;
  if (static_cast<int64_t>(split.size()) < cv.K * nv * 2 * kLanes) split.resize(cv.K * nv * 2 * kLanes);
  split_weights(cv, c, nv, split.data());
  w[0] = split.data();
}

void run_block(const Conv& cv, const Block& b, Tile tile) {
  const TileOps ops{kLanes, &gemm_lookup<Gemm, kMaxMR, kMaxNV>, epilogue_for<Epilogue>(cv), &transpose_avx,
                    &weights};
  run_tiles(cv, b, tile, ops);
}

// 8 channels per compare: bit c of the word = (x[c] + threshold[c]) >= 0.
CTMQ_AVX2 void pack(const float* x, int64_t pixels, int64_t C, const float* threshold, uint32_t* out) {
  const int64_t Cw = (C + 31) / 32;
  for (int64_t p = 0; p < pixels; ++p) {
    const float* px = x + p * C;
    uint8_t* dst = reinterpret_cast<uint8_t*>(out + p * Cw);
    for (int64_t c = 0; c < Cw * 32; c += 8) {
      const int n = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, C - c)));
      const __m256i live = lanes_below(n);
      __m256 v = n == 8 ? _mm256_loadu_ps(px + c) : _mm256_maskload_ps(px + c, live);
      if (threshold) {
        v = _mm256_add_ps(v,
                          n == 8 ? _mm256_loadu_ps(threshold + c) : _mm256_maskload_ps(threshold + c, live));
      }
      const int ge = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ));
      dst[c / 8] = static_cast<uint8_t>(ge & ((1 << n) - 1));
    }
  }
}

// The GEMM's inner step on registers: 2 pixels x 2 vectors, each pair xor,
// xor, vpshufb, vpshufb, add, add; the asm hides the pixel words' values.
CTMQ_AVX2 double peak_loop(int64_t iterations) {
  const __m256i lut = nibble_lut();
  __m256i acc[2][2], wl[2], wh[2], pl[2], ph[2];
  CTMQ_UNROLL for (int j = 0; j < 2; ++j) {
    wl[j] = _mm256_set1_epi8(static_cast<char>(3 + 5 * j));
    wh[j] = _mm256_set1_epi8(static_cast<char>(9 + j));
    pl[j] = _mm256_set1_epi8(static_cast<char>(6 + j));
    ph[j] = _mm256_set1_epi8(static_cast<char>(12 - 3 * j));
    acc[j][0] = acc[j][1] = _mm256_setzero_si256();
  }
  for (int64_t it = 0; it < iterations; ++it) {
    CTMQ_UNROLL for (int i = 0; i < 2; ++i) {
      CTMQ_UNROLL for (int j = 0; j < 2; ++j) {
        const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_xor_si256(pl[i], wl[j]));
        const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_xor_si256(ph[i], wh[j]));
        acc[i][j] = _mm256_add_epi8(_mm256_add_epi8(acc[i][j], lo), hi);
      }
    }
    CTMQ_UNROLL for (int i = 0; i < 2; ++i) __asm__ volatile("" : "+x"(pl[i]), "+x"(ph[i]));
  }
  const __m256i sum =
      _mm256_add_epi8(_mm256_add_epi8(acc[0][0], acc[0][1]), _mm256_add_epi8(acc[1][0], acc[1][1]));
  __asm__ volatile("" : : "x"(sum));
  return static_cast<double>(iterations) * 4 * 4;  // 4 vectors of 4 64-bit words
}

}  // namespace avx2

const PathInfo& avx2_path() {
  using namespace avx2;
  static const PathInfo info{
      kLanes,  true,         true,       kTiles, static_cast<int>(sizeof(kTiles) / sizeof(kTiles[0])),
      &choose, &split_words, &run_block, &pack,  &peak_loop};
  return info;
}

}  // namespace detail
}  // namespace bconv
}  // namespace ctmq

#endif  // CTMQ_X86_SIMD
