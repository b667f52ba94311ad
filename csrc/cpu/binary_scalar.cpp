// The portable code path ("scalar"): plain C++ for the baseline ISA, the only
// path of a CTMQ_NO_SIMD build. Its epilogue states the output rules one
// output at a time; the SIMD paths do the same per vector. Torch-free.
#include "binary_kernels.h"

namespace ctmq {
namespace bconv {
namespace detail {
namespace scalar {

constexpr int kMaxMR = 4, kMaxNV = 8;
// mr x nv channels; 16 accumulators fill x86-64's general registers. 4x4 is
// the fastest or within 3% on ResNet-18's shapes (docs/design.md 5.1).
constexpr Tile kTiles[] = {{4, 4}, {2, 8}, {2, 4}};

Tile choose(int64_t, int64_t) {
  return kTiles[0];
}

template <int MR, int NV>
struct Gemm {
  static void run(const Source& src, int64_t S, int64_t run, const uint32_t* const* w, int32_t* counts) {
    int32_t acc[MR][NV] = {};
    for (int64_t s = 0; s < S; ++s) {
      const uint32_t* a[MR];
      tile_rows<MR>(src, s, a);
      for (int64_t kk = 0; kk < run; ++kk) {
        const int64_t k = s * run + kk;
        uint32_t wv[NV];
        CTMQ_UNROLL for (int j = 0; j < NV; ++j) wv[j] = w[j][kGroup * k];
        CTMQ_UNROLL for (int i = 0; i < MR; ++i) {
          const uint32_t p = a[i][kk];
          CTMQ_UNROLL for (int j = 0; j < NV; ++j) acc[i][j] += popc32(p ^ wv[j]);
        }
      }
    }
    CTMQ_UNROLL for (int i = 0; i < MR; ++i) CTMQ_UNROLL for (int j = 0; j < NV; ++j)
        counts[i * kMaxTileCols + j] = acc[i][j];
  }
};

// The tile's outputs one by one, per the rules of binary_conv.h (an absent
// scale, bias or threshold is an identity in Conv): kOut 0 / 1 / 2 = no float
// output / NCHW / NHWC (binary_kernels.h).
template <int kOut, bool kPacked, bool kRes>
struct Epilogue {
  static void run(const Conv& cv, const int32_t* counts, int rows, int cols, int64_t pix0, int64_t c,
                  const uint64_t* invalid, float* stage) {
    // locals, not cv's fields: the packed stores are bytes, which may alias anything
    const int64_t O = cv.O, M = cv.M, T = cv.T, C = cv.C;
    const float *scale = cv.scale, *bias = cv.bias, *thr = cv.threshold, *res = cv.residual;
    const int32_t* taps = cv.tap_popc;
    float* const out = cv.out;
    const bool res_nhwc = cv.residual_layout == Layout::kNHWC;
    const int n_out = static_cast<int>(std::min<int64_t>(cols, O - c));
    int64_t n = pix0 / M, m = pix0 % M;
    for (int i = 0; i < rows; ++i) {
      const int64_t pix = pix0 + i;
      const uint64_t inv = invalid[i];
      const int64_t base = (T - popc64(inv)) * C;
      uint8_t* packed = kPacked ? packed_bytes(cv, pix) : nullptr;
      for (int j = 0; j < n_out; ++j) {
        const int64_t o = c + j;
        int64_t popc = counts[i * kMaxTileCols + j];
        for (uint64_t b = inv; b; b &= b - 1) {  // the zero words of outside taps counted popc(w)
          popc -= taps[((o / kGroup) * T + __builtin_ctzll(b)) * kGroup + o % kGroup];
        }
        float y = static_cast<float>(base - 2 * popc);
        y = y * scale[o];
        y = y + bias[o];
        if (kRes) y = y + res[res_nhwc ? pix * O + o : (n * O + o) * M + m];
        if (kOut == 2) out[pix * O + o] = y;
        if (kOut == 1) stage[i * kMaxTileCols + j] = y;
        if (kPacked) packed[o / 8] |= static_cast<uint8_t>((y + thr[o] >= 0.f) << (o % 8));  // no branch
      }
      if (++m == M) m = 0, ++n;
    }
  }
};

void transpose(const float* a, int64_t lda, float* b, int64_t ldb, int rows, int cols) {
  transpose_scalar(a, lda, b, ldb, rows, cols);
}

void run_block(const Conv& cv, const Block& b, Tile tile) {
  const TileOps ops{1, &gemm_lookup<Gemm, kMaxMR, kMaxNV>, epilogue_for<Epilogue>(cv), &transpose, nullptr};
  run_tiles(cv, b, tile, ops);
}

void pack(const float* x, int64_t pixels, int64_t C, const float* threshold, uint32_t* out) {
  const int64_t Cw = (C + 31) / 32;
  for (int64_t p = 0; p < pixels; ++p) {
    const float* px = x + p * C;
    for (int64_t wd = 0; wd < Cw; ++wd) {
      uint32_t word = 0;
      for (int64_t c = wd * 32; c < std::min(C, wd * 32 + 32); ++c) {
        const float v = threshold ? px[c] + threshold[c] : px[c];
        word |= static_cast<uint32_t>(v >= 0.f) << (c % 32);
      }
      out[p * Cw + wd] = word;
    }
  }
}

// Gemm<4, 4>'s step on registers: 4 pixel words x 4 channel words, xor +
// popcount + add. The asm hides the pixel words' values each round (so the
// counts cannot be hoisted or folded), as Gemm reads them from memory;
// "scalar" is the portable C++, which GCC vectorizes alike in both (SSE2 on
// x86-64).
double peak_loop(int64_t iterations) {
  uint32_t p[4] = {0x12345678u, 0x9abcdef0u, 0x0f0f0f0fu, 0x33333333u};
  uint32_t w[4] = {0xdeadbeefu, 0x01234567u, 0x89abcdefu, 0x55555555u};
  int32_t acc[4][4] = {};
  for (int64_t it = 0; it < iterations; ++it) {
    CTMQ_UNROLL for (int i = 0; i < 4; ++i) CTMQ_UNROLL for (int j = 0; j < 4; ++j) acc[i][j] +=
        popc32(p[i] ^ w[j]);
    CTMQ_UNROLL for (int i = 0; i < 4; ++i) __asm__ volatile("" : "+r"(p[i]));
  }
  __asm__ volatile("" : : "m"(acc));                // every count is used
  return static_cast<double>(iterations) * 16 / 2;  // 64-bit words
}

}  // namespace scalar

const PathInfo& scalar_path() {
  using namespace scalar;
  static const PathInfo info{
      1,       false,   false,      kTiles, static_cast<int>(sizeof(kTiles) / sizeof(kTiles[0])),
      &choose, nullptr, &run_block, &pack,  &peak_loop};
  return info;
}

}  // namespace detail
}  // namespace bconv
}  // namespace ctmq
