// The "neon" code path (aarch64): CNT counts the bytes of 4 output channels'
// 32-bit words per 128-bit vector into byte counters, which are widened into
// 32-bit lanes (UADDLP, UADALP) every 31 words, before a byte could overflow
// (a byte gains at most 8 per word). Advanced SIMD is part of the AArch64
// baseline: no target attributes, nothing to detect. Torch-free.
#include "binary_kernels.h"

#if defined(CTMQ_NEON)

namespace ctmq {
namespace bconv {
namespace detail {
namespace neon {

constexpr int kLanes = 4;
constexpr int kMaxMR = 12, kMaxNV = 4;
constexpr int kFlush = 31;

// mr x nv: mr * nv byte counters + nv weight vectors + the broadcast pixel
// word + a temporary within the 32 q registers. Not measured on aarch64
// hardware (qemu checks correctness only): 6x4 follows the register budget
// and the other paths' measurements (docs/design.md 5.1).
constexpr Tile kTiles[] = {{6, 4}, {4, 4}, {12, 2}, {8, 2}};

Tile choose(int64_t, int64_t) {
  return kTiles[0];
}

// The byte counters into the 32-bit sums (each lane's 4 bytes), then zero.
template <int MR, int NV>
CTMQ_INLINE void flush(uint8x16_t (&bytes)[MR][NV], uint32x4_t* total) {
  CTMQ_UNROLL for (int i = 0; i < MR; ++i) {
    CTMQ_UNROLL for (int j = 0; j < NV; ++j) {
      total[i * 16 + j] = vpadalq_u16(total[i * 16 + j], vpaddlq_u8(bytes[i][j]));
      bytes[i][j] = vdupq_n_u8(0);
    }
  }
}

template <int MR, int NV>
struct Gemm {
  static void run(const Source& src, int64_t S, int64_t run, const uint32_t* const* w, int32_t* counts) {
    uint32x4_t* total = reinterpret_cast<uint32x4_t*>(counts);  // (i, j) at i * 16 + j
    CTMQ_UNROLL for (int i = 0; i < MR; ++i) CTMQ_UNROLL for (int j = 0; j < NV; ++j) total[i * 16 + j] =
        vdupq_n_u32(0);
    uint8x16_t bytes[MR][NV];
    CTMQ_UNROLL for (int i = 0; i < MR; ++i) CTMQ_UNROLL for (int j = 0; j < NV; ++j) bytes[i][j] =
        vdupq_n_u8(0);
    const uint32_t* wp[NV];
    CTMQ_UNROLL for (int j = 0; j < NV; ++j) wp[j] = w[j];
    int filled = 0;  // words counted in bytes since the last flush
    for (int64_t s = 0; s < S; ++s) {
      const uint32_t* a[MR];
      tile_rows<MR>(src, s, a);
      for (int64_t k0 = 0; k0 < run;) {
        const int64_t k1 = std::min<int64_t>(run, k0 + kFlush - filled);  // no branch inside
        for (int64_t kk = k0; kk < k1; ++kk) {
          uint8x16_t wv[NV];
          CTMQ_UNROLL for (int j = 0; j < NV; ++j) wv[j] =
              vreinterpretq_u8_u32(vld1q_u32(wp[j] + kGroup * kk));
          CTMQ_UNROLL for (int i = 0; i < MR; ++i) {
            const uint8x16_t p = vreinterpretq_u8_u32(vld1q_dup_u32(a[i] + kk));
            CTMQ_UNROLL for (int j = 0; j < NV; ++j) {
              bytes[i][j] = vaddq_u8(bytes[i][j], vcntq_u8(veorq_u8(wv[j], p)));
            }
          }
        }
        filled += static_cast<int>(k1 - k0);
        k0 = k1;
        if (filled == kFlush) flush<MR, NV>(bytes, total), filled = 0;
      }
      CTMQ_UNROLL for (int j = 0; j < NV; ++j) wp[j] += kGroup * run;
    }
    if (filled) flush<MR, NV>(bytes, total);
  }
};

// b[j * ldb + i] = a[i * lda + j], 4x4 blocks in registers.
void transpose_neon(const float* a, int64_t lda, float* b, int64_t ldb, int rows, int cols) {
  int i = 0;
  for (; i + 4 <= rows; i += 4) {
    int j = 0;
    for (; j + 4 <= cols; j += 4) {
      const float* s = a + i * lda + j;
      const float32x4x2_t t01 = vtrnq_f32(vld1q_f32(s), vld1q_f32(s + lda));
      const float32x4x2_t t23 = vtrnq_f32(vld1q_f32(s + 2 * lda), vld1q_f32(s + 3 * lda));
      float* d = b + j * ldb + i;
      vst1q_f32(d, vcombine_f32(vget_low_f32(t01.val[0]), vget_low_f32(t23.val[0])));
      vst1q_f32(d + ldb, vcombine_f32(vget_low_f32(t01.val[1]), vget_low_f32(t23.val[1])));
      vst1q_f32(d + 2 * ldb, vcombine_f32(vget_high_f32(t01.val[0]), vget_high_f32(t23.val[0])));
      vst1q_f32(d + 3 * ldb, vcombine_f32(vget_high_f32(t01.val[1]), vget_high_f32(t23.val[1])));
    }
    transpose_scalar(a + i * lda + j, lda, b + j * ldb + i, ldb, 4, cols - j);
  }
  transpose_scalar(a + i * lda, lda, b + i, ldb, rows - i, cols);
}

// n < 4 lanes at the channel tail: through a stack copy.
inline float32x4_t load_lanes(const float* src, int n) {
  if (n == kLanes) return vld1q_f32(src);
  float tmp[kLanes] = {};
  for (int l = 0; l < n; ++l) tmp[l] = src[l];
  return vld1q_f32(tmp);
}

inline void store_lanes(float* dst, float32x4_t v, int n) {
  if (n == kLanes) return vst1q_f32(dst, v);
  float tmp[kLanes];
  vst1q_f32(tmp, v);
  for (int l = 0; l < n; ++l) dst[l] = tmp[l];
}

inline uint32_t sign_bits(float32x4_t z, int n) {
  const uint32x4_t weights = {1, 2, 4, 8};
  const uint32_t bits = vaddvq_u32(vandq_u32(vcgeq_f32(z, vdupq_n_f32(0.f)), weights));
  return bits & ((1u << n) - 1);
}

// The tile's outputs, vector by vector, per the rules of binary_conv.h:
// kOut 0 / 1 / 2 = no float output / NCHW / NHWC (binary_kernels.h).
template <int kOut, bool kPacked, bool kRes>
struct Epilogue {
  static void run(const Conv& cv, const int32_t* counts, int rows, int cols, int64_t pix0, int64_t c,
                  const uint64_t* invalid, float* stage) {
    alignas(16) float tile[kMaxTileRows * kMaxTileCols];  // an NCHW residual, gathered
    // locals, not cv's fields: the packed stores are bytes, which may alias anything
    const int64_t O = cv.O, T = cv.T, C = cv.C;
    const float *scale = cv.scale + c, *bias = cv.bias + c, *thr = cv.threshold + c;
    const int32_t* const taps = cv.tap_popc;
    float* const out = cv.out + (kOut == 2 ? pix0 * O + c : 0);
    uint8_t* const packed = kPacked ? packed_bytes(cv, pix0) + c / 8 : nullptr;
    const int64_t packed_ld = cv.Ow * 4;
    const int nv = cols / kLanes, valid_cols = static_cast<int>(std::min<int64_t>(cols, O - c));
    const float* res = tile;  // residual row i at res + i * res_ld
    int64_t res_ld = kMaxTileCols;
    if (kRes && cv.residual_layout == Layout::kNCHW) {
      nchw_to_tile(cv, cv.residual, pix0, rows, c, valid_cols, tile, &transpose_neon);
    } else if (kRes) {
      res = cv.residual + pix0 * O + c;
      res_ld = O;
    }
    for (int i = 0; i < rows; ++i) {
      const uint64_t inv = invalid[i];
      const int32x4_t base = vdupq_n_s32(static_cast<int32_t>((T - popc64(inv)) * C));
      for (int j = 0; j < nv; ++j) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, O - c - j * kLanes));
        int32x4_t cnt = vld1q_s32(counts + i * kMaxTileCols + j * kLanes);
        const int64_t cj = c + j * kLanes;
        const int32_t* tap = taps + (cj / kGroup) * T * kGroup + cj % kGroup;
        for (uint64_t b = inv; b; b &= b - 1) {  // outside taps' zero words counted popc(w)
          cnt = vsubq_s32(cnt, vld1q_s32(tap + __builtin_ctzll(b) * kGroup));
        }
        float32x4_t y = vcvtq_f32_s32(vsubq_s32(base, vshlq_n_s32(cnt, 1)));
        y = vaddq_f32(vmulq_f32(y, vld1q_f32(scale + j * kLanes)), vld1q_f32(bias + j * kLanes));
        if (kRes) y = vaddq_f32(y, load_lanes(res + i * res_ld + j * kLanes, n));
        if (kOut == 2) store_lanes(out + i * O + j * kLanes, y, n);
        if (kOut == 1) vst1q_f32(stage + i * kMaxTileCols + j * kLanes, y);
        if (kPacked) {
          const uint32_t bits = sign_bits(vaddq_f32(y, vld1q_f32(thr + j * kLanes)), n);
          packed[i * packed_ld + j / 2] |= static_cast<uint8_t>(bits << (j % 2 * 4));
        }
      }
    }
  }
};

void run_block(const Conv& cv, const Block& b, Tile tile) {
  const TileOps ops{kLanes, &gemm_lookup<Gemm, kMaxMR, kMaxNV>, epilogue_for<Epilogue>(cv), &transpose_neon,
                    nullptr};
  run_tiles(cv, b, tile, ops);
}

// 4 channels per compare: bit c of the word = (x[c] + threshold[c]) >= 0.
void pack(const float* x, int64_t pixels, int64_t C, const float* threshold, uint32_t* out) {
  const int64_t Cw = (C + 31) / 32;
  for (int64_t p = 0; p < pixels; ++p) {
    const float* px = x + p * C;
    for (int64_t wd = 0; wd < Cw; ++wd) {
      uint32_t word = 0;
      for (int64_t c = wd * 32; c < std::min(C, wd * 32 + 32); c += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, C - c));
        float32x4_t v = load_lanes(px + c, n);
        if (threshold) v = vaddq_f32(v, load_lanes(threshold + c, n));
        word |= sign_bits(v, n) << (c % 32);
      }
      out[p * Cw + wd] = word;
    }
  }
}

// The GEMM's inner step on registers: 4 pixel words x 4 vectors, eor + CNT +
// add; the asm hides the pixel words' values.
double peak_loop(int64_t iterations) {
  uint8x16_t acc[4][4], w[4], p[4];
  CTMQ_UNROLL for (int j = 0; j < 4; ++j) {
    w[j] = vdupq_n_u8(static_cast<uint8_t>(0x5a + 17 * j));
    p[j] = vdupq_n_u8(static_cast<uint8_t>(0x3c + 29 * j));
    CTMQ_UNROLL for (int i = 0; i < 4; ++i) acc[j][i] = vdupq_n_u8(0);
  }
  for (int64_t it = 0; it < iterations; ++it) {
    CTMQ_UNROLL for (int i = 0; i < 4; ++i) CTMQ_UNROLL for (int j = 0; j < 4; ++j) acc[i][j] =
        vaddq_u8(acc[i][j], vcntq_u8(veorq_u8(w[j], p[i])));
    CTMQ_UNROLL for (int i = 0; i < 4; ++i) __asm__ volatile("" : "+w"(p[i]));
  }
  uint8x16_t sum = vdupq_n_u8(0);
  for (auto& row : acc)
    for (const uint8x16_t& v : row) sum = vaddq_u8(sum, v);
  __asm__ volatile("" : : "w"(sum));
  return static_cast<double>(iterations) * 16 * 2;  // 16 vectors of 2 64-bit words
}

}  // namespace neon

const PathInfo& neon_path() {
  using namespace neon;
  static const PathInfo info{
      kLanes,  false,   false,      kTiles, static_cast<int>(sizeof(kTiles) / sizeof(kTiles[0])),
      &choose, nullptr, &run_block, &pack,  &peak_loop};
  return info;
}

}  // namespace detail
}  // namespace bconv
}  // namespace ctmq

#endif  // CTMQ_NEON
