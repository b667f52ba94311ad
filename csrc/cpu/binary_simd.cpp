// Code paths of the CPU binary conv: on x86-64 the AVX2 (vpshufb popcount) and
// AVX-512 (VPOPCNTQ) tiles, each function with its own target attributes
// (chosen at run time); on aarch64 the NEON tile (CNT); everywhere the
// portable scalar build of the generic loops. Torch-free (see binary_gemm.h).
#include "binary_gemm.h"

namespace ctmq {
namespace binary_detail {

void conv_block_scalar(const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                       int64_t oc1, uint64_t* P) {
  conv_block(a, n, m0, rows, oc0, oc1, P);
}

#if defined(CTMQ_X86_SIMD)
// ------------------------------------------------------- avx2 (vpshufb popcount)
// MR output pixels x 4 output channels (one vector of 4 64-bit counts per
// pixel); popcount by nibble lookup (vpshufb), counted in bytes and summed into
// the 64-bit lanes (vpsadbw) every 31 words, before a byte could overflow.
template <int MR>
CTMQ_HW CTMQ_INLINE void tile_avx2(const ConvArgs& a, const uint64_t* P, const uint64_t* invalid,
                                   int64_t n, int64_t m0, int64_t r, int64_t oc, int lanes) {
  const int64_t T = a.KH * a.KW;
  const uint64_t* wg = a.w8 + (oc / 8) * a.K * 8 + oc % 8;  // 4 channels of the group of 8
  const int64_t* pg = a.popw8 + (oc / 8) * T * 8 + oc % 8;
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  __m256i acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm256_setzero_si256();
  for (int64_t k0 = 0; k0 < a.K; k0 += 31) {
    const int64_t k1 = std::min(a.K, k0 + 31);
    __m256i bytes[MR];
    for (int i = 0; i < MR; ++i) bytes[i] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; ++k) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + k * 8));
      for (int i = 0; i < MR; ++i) {
        const __m256i v = _mm256_xor_si256(
            w, _mm256_set1_epi64x(static_cast<long long>(P[(r + i) * a.K + k])));
        const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4));
        const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
        bytes[i] = _mm256_add_epi8(bytes[i], _mm256_add_epi8(lo, hi));
      }
    }
    for (int i = 0; i < MR; ++i) {
      acc[i] = _mm256_add_epi64(acc[i], _mm256_sad_epu8(bytes[i], _mm256_setzero_si256()));
    }
  }
  const int64_t M = a.OH * a.OW;
  alignas(32) int64_t counts[4];
  for (int i = 0; i < MR; ++i) {
    const int64_t m = m0 + r + i;
    int64_t valid = T;
    for (uint64_t b = invalid[r + i]; b; b &= b - 1) {  // border taps: see build_patches
      acc[i] = _mm256_sub_epi64(
          acc[i], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + __builtin_ctzll(b) * 8)));
      --valid;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(counts), acc[i]);
    for (int l = 0; l < lanes; ++l) store(a, n, m, oc + l, valid * a.C - 2 * counts[l]);
  }
}

CTMQ_HW void conv_block_hw(const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                           int64_t oc1, uint64_t* P) {
  uint64_t invalid[kBlockM];
  build_patches(a, n, m0, rows, P, invalid);
  clear_packed(a, n, m0, rows, oc0, oc1);
  for (int64_t oc = oc0; oc < oc1; oc += 4) {  // oc0 is a multiple of 8
    const int lanes = static_cast<int>(std::min<int64_t>(4, oc1 - oc));
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) tile_avx2<4>(a, P, invalid, n, m0, r, oc, lanes);
    for (; r < rows; ++r) tile_avx2<1>(a, P, invalid, n, m0, r, oc, lanes);
  }
}

// ------------------------------------------------------- avx512 (VPOPCNTQ)

CTMQ_AVX512 CTMQ_INLINE void store_row(float* out, const float* res, __m256 v) {
  if (res) v = _mm256_add_ps(v, _mm256_loadu_ps(res));  // the residual add, fused
  _mm256_storeu_ps(out, v);
}

// MR output pixels x 8 output channels (one vector of 64-bit counts per pixel).
template <int MR>
CTMQ_AVX512 CTMQ_INLINE void tile_avx512(const ConvArgs& a, const uint64_t* P, const uint64_t* invalid,
                                         int64_t n, int64_t m0, int64_t r, int64_t ocg, int lanes) {
  const int64_t T = a.KH * a.KW;
  const uint64_t* wg = a.w8 + (ocg / 8) * a.K * 8;
  const int64_t* pg = a.popw8 + (ocg / 8) * T * 8;
  __m512i acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t k = 0; k < a.K; ++k) {
    const __m512i w = _mm512_loadu_si512(wg + k * 8);
    for (int i = 0; i < MR; ++i) {
      const __m512i p = _mm512_set1_epi64(static_cast<long long>(P[(r + i) * a.K + k]));
      acc[i] = _mm512_add_epi64(acc[i], _mm512_popcnt_epi64(_mm512_xor_si512(w, p)));
    }
  }
  const __mmask8 lane_mask = static_cast<__mmask8>((1u << lanes) - 1);
  const __m256 scale = a.scale ? _mm256_maskz_loadu_ps(lane_mask, a.scale + ocg) : _mm256_set1_ps(1.f);
  const __m256 bias = a.bias ? _mm256_maskz_loadu_ps(lane_mask, a.bias + ocg) : _mm256_setzero_ps();
  const int64_t M = a.OH * a.OW;
  __m256 ys[MR];
  for (int i = 0; i < MR; ++i) {
    const int64_t m = m0 + r + i;
    int64_t valid = T;
    for (uint64_t b = invalid[r + i]; b; b &= b - 1) {  // border taps: see build_patches
      acc[i] = _mm512_sub_epi64(acc[i], _mm512_loadu_si512(pg + __builtin_ctzll(b) * 8));
      --valid;
    }
    const __m512i val = _mm512_sub_epi64(_mm512_set1_epi64(valid * a.C), _mm512_slli_epi64(acc[i], 1));
    __m256 y = _mm256_cvtepi32_ps(_mm512_cvtepi64_epi32(val));  // exact below 2^24
    if (a.scale) y = _mm256_mul_ps(y, scale);
    if (a.bias) y = _mm256_add_ps(y, bias);
    ys[i] = y;
    if (a.packed) {
      if (a.residual) {  // gather this pixel's 8 residuals (one per channel row)
        alignas(32) float res[8] = {};
        for (int l = 0; l < lanes; ++l) res[l] = a.residual[(n * a.O + ocg + l) * M + m];
        y = _mm256_add_ps(y, _mm256_load_ps(res));
      }
      const uint32_t bits = _mm256_cmp_ps_mask(y, _mm256_setzero_ps(), _CMP_GE_OQ) & lane_mask;
      a.packed[(n * M + m) * a.Ow + (ocg >> 5)] |= bits << (ocg & 31);
    }
  }
  if (!a.out) return;
  float* out = a.out + (n * a.O + ocg) * M + m0 + r;  // (channel l, pixel i) at out[l * M + i]
  const float* res = a.residual ? a.residual + (n * a.O + ocg) * M + m0 + r : nullptr;
  if constexpr (MR == 8) {
    if (lanes == 8) {  // 8 pixels x 8 channels: transpose, then one 8-float store per channel
      const __m256 t0 = _mm256_unpacklo_ps(ys[0], ys[1]), t1 = _mm256_unpackhi_ps(ys[0], ys[1]);
      const __m256 t2 = _mm256_unpacklo_ps(ys[2], ys[3]), t3 = _mm256_unpackhi_ps(ys[2], ys[3]);
      const __m256 t4 = _mm256_unpacklo_ps(ys[4], ys[5]), t5 = _mm256_unpackhi_ps(ys[4], ys[5]);
      const __m256 t6 = _mm256_unpacklo_ps(ys[6], ys[7]), t7 = _mm256_unpackhi_ps(ys[6], ys[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      store_row(out + 0 * M, res ? res + 0 * M : nullptr, _mm256_permute2f128_ps(u0, u4, 0x20));
      store_row(out + 1 * M, res ? res + 1 * M : nullptr, _mm256_permute2f128_ps(u1, u5, 0x20));
      store_row(out + 2 * M, res ? res + 2 * M : nullptr, _mm256_permute2f128_ps(u2, u6, 0x20));
      store_row(out + 3 * M, res ? res + 3 * M : nullptr, _mm256_permute2f128_ps(u3, u7, 0x20));
      store_row(out + 4 * M, res ? res + 4 * M : nullptr, _mm256_permute2f128_ps(u0, u4, 0x31));
      store_row(out + 5 * M, res ? res + 5 * M : nullptr, _mm256_permute2f128_ps(u1, u5, 0x31));
      store_row(out + 6 * M, res ? res + 6 * M : nullptr, _mm256_permute2f128_ps(u2, u6, 0x31));
      store_row(out + 7 * M, res ? res + 7 * M : nullptr, _mm256_permute2f128_ps(u3, u7, 0x31));
      return;
    }
  }
  for (int i = 0; i < MR; ++i) {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, ys[i]);
    for (int l = 0; l < lanes; ++l) out[l * M + i] = res ? tmp[l] + res[l * M + i] : tmp[l];
  }
}

CTMQ_AVX512 void conv_block_avx512(const ConvArgs& a, int64_t n, int64_t m0, int64_t rows,
                                   int64_t oc0, int64_t oc1, uint64_t* P) {
  uint64_t invalid[kBlockM];
  build_patches(a, n, m0, rows, P, invalid);
  clear_packed(a, n, m0, rows, oc0, oc1);
  for (int64_t ocg = oc0; ocg < oc1; ocg += 8) {  // oc0 is a multiple of 8
    const int lanes = static_cast<int>(std::min<int64_t>(8, oc1 - ocg));
    int64_t r = 0;
    for (; r + 8 <= rows; r += 8) tile_avx512<8>(a, P, invalid, n, m0, r, ocg, lanes);
    for (; r < rows; ++r) tile_avx512<1>(a, P, invalid, n, m0, r, ocg, lanes);
  }
}

Path cpu_best_path() {
  static const Path best = [] {
    if (!__builtin_cpu_supports("popcnt") || !__builtin_cpu_supports("avx2")) return kScalar;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      return kAvx512;
    }
    return kAvx2;
  }();
  return best;
}

const char* path_name(Path p) {
  return p == kAvx512 ? "avx512-vpopcntdq" : (p == kAvx2 ? "avx2" : "scalar");
}

void conv_block_on(Path p, const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                   int64_t oc1, uint64_t* P) {
  if (p == kAvx512) conv_block_avx512(a, n, m0, rows, oc0, oc1, P);
  else if (p == kAvx2) conv_block_hw(a, n, m0, rows, oc0, oc1, P);
  else conv_block_scalar(a, n, m0, rows, oc0, oc1, P);
}

#elif defined(CTMQ_NEON)
// ------------------------------------------------------- neon (CNT)
// MR output pixels x the 8 output channels of a weight group (four vectors of
// two 64-bit words per pixel). A plain __builtin_popcountll also becomes CNT
// here, but one word at a time, with a move to and from the vector registers
// and a horizontal add (ADDV) per word; this tile counts 16 bytes per CNT,
// adds the byte counts up (ADD) and widens them to the 64-bit lanes
// (UADDLP, UADALP) only every 31 words, before a byte could overflow.
template <int MR>
CTMQ_INLINE void tile_neon(const ConvArgs& a, const uint64_t* P, const uint64_t* invalid, int64_t n,
                           int64_t m0, int64_t r, int64_t ocg, int lanes) {
  const int64_t T = a.KH * a.KW;
  const uint64_t* wg = a.w8 + (ocg / 8) * a.K * 8;
  const int64_t* pg = a.popw8 + (ocg / 8) * T * 8;
  uint64x2_t acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = vdupq_n_u64(0);
  for (int64_t k0 = 0; k0 < a.K; k0 += 31) {
    const int64_t k1 = std::min(a.K, k0 + 31);
    uint8x16_t bytes[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) bytes[i][j] = vdupq_n_u8(0);
    for (int64_t k = k0; k < k1; ++k) {
      uint64x2_t w[4];
      for (int j = 0; j < 4; ++j) w[j] = vld1q_u64(wg + k * 8 + 2 * j);
      for (int i = 0; i < MR; ++i) {
        const uint64x2_t p = vld1q_dup_u64(P + (r + i) * a.K + k);
        for (int j = 0; j < 4; ++j) {
          bytes[i][j] = vaddq_u8(bytes[i][j], vcntq_u8(vreinterpretq_u8_u64(veorq_u64(w[j], p))));
        }
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = vpadalq_u32(acc[i][j], vpaddlq_u16(vpaddlq_u8(bytes[i][j])));
  }
  for (int i = 0; i < MR; ++i) {
    uint64_t counts[8];
    for (int j = 0; j < 4; ++j) vst1q_u64(counts + 2 * j, acc[i][j]);
    int64_t popc[8];
    for (int l = 0; l < 8; ++l) popc[l] = static_cast<int64_t>(counts[l]);
    int64_t valid = T;
    for (uint64_t b = invalid[r + i]; b; b &= b - 1) {  // border taps: see build_patches
      const int64_t* tap = pg + __builtin_ctzll(b) * 8;
      for (int l = 0; l < 8; ++l) popc[l] -= tap[l];
      --valid;
    }
    for (int l = 0; l < lanes; ++l) store(a, n, m0 + r + i, ocg + l, valid * a.C - 2 * popc[l]);
  }
}

void conv_block_neon(const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                     int64_t oc1, uint64_t* P) {
  uint64_t invalid[kBlockM];
  build_patches(a, n, m0, rows, P, invalid);
  clear_packed(a, n, m0, rows, oc0, oc1);
  for (int64_t ocg = oc0; ocg < oc1; ocg += 8) {  // oc0 is a multiple of 8
    const int lanes = static_cast<int>(std::min<int64_t>(8, oc1 - ocg));
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) tile_neon<4>(a, P, invalid, n, m0, r, ocg, lanes);
    for (; r < rows; ++r) tile_neon<1>(a, P, invalid, n, m0, r, ocg, lanes);
  }
}

// Advanced SIMD is mandatory on AArch64 Linux: nothing to detect.
Path cpu_best_path() { return kNeon; }

const char* path_name(Path p) { return p == kNeon ? "neon" : "scalar"; }

void conv_block_on(Path p, const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                   int64_t oc1, uint64_t* P) {
  if (p == kNeon) conv_block_neon(a, n, m0, rows, oc0, oc1, P);
  else conv_block_scalar(a, n, m0, rows, oc0, oc1, P);
}

#else
Path cpu_best_path() { return kScalar; }

const char* path_name(Path) { return "scalar"; }

void conv_block_on(Path, const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                   int64_t oc1, uint64_t* P) {
  conv_block_scalar(a, n, m0, rows, oc0, oc1, P);
}
#endif

}  // namespace binary_detail
}  // namespace ctmq
