// Inside the CPU binary conv (binary_conv.h is its API): what the driver
// (binary_conv2d.cpp, binary_patches.cpp) hands each code path's file
// (binary_scalar.cpp, binary_avx2.cpp, binary_avx512.cpp, binary_neon.cpp).
// Torch-free.
//
// The conv is a GEMM of output pixels x output channels over K = KH * KW *
// ceil(C/32) 32-bit words. A task owns a block of output pixels (of any
// images) and a range of output channels: the driver finds the block's
// patches once (an indirect im2col, Block: in place where the taps lie inside
// the image, copies with zero words where they do not, and those taps' bits
// in the pixel's `invalid` mask), then the path's run_block multiplies them
// with every channel tile of the range, tile after tile (mr pixels x nv
// channel vectors, counts in registers), and the epilogue turns counts into
// outputs.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "binary_conv.h"

#if !defined(CTMQ_NO_SIMD) && (defined(__x86_64__) || defined(_M_X64))
#define CTMQ_X86_SIMD 1
#include <immintrin.h>
#define CTMQ_AVX2 __attribute__((target("avx2,popcnt")))
#define CTMQ_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512vpopcntdq,avx2,popcnt")))
#elif !defined(CTMQ_NO_SIMD) && defined(__aarch64__)
#define CTMQ_NEON 1
#include <arm_neon.h>
#endif

#define CTMQ_INLINE inline __attribute__((always_inline))
// Fully unrolls a loop over a register tile's rows or vectors, early enough
// that the tile's accumulator arrays become registers (without it GCC keeps
// them on the stack).
#define CTMQ_UNROLL _Pragma("GCC unroll 16")

namespace ctmq {
namespace bconv {
namespace detail {

constexpr int kGroup = 16;        // output channels per weight group (binary_conv.h)
constexpr int kMaxTaps = 64;      // taps per kernel: one bit each in `invalid`
constexpr int kMaxTileRows = 16;  // the largest mr of any table
constexpr int kMaxTileCols = 64;  // the largest tile width in channels

// A call's arguments, checked and resolved. scale, bias and threshold are
// never null: copies padded to whole groups, where an absent scale is 1 and an
// absent bias or threshold -0.0 (x * 1 and x + -0.0 are x, signed zeros too),
// so that every epilogue runs the same steps.
struct Conv {
  int64_t N, H, W, C, Cw;      // input; Cw = 32-bit words per pixel
  int64_t xw;                  // words per pixel of x as the GEMM reads it (avx2: 2 Cw)
  int64_t O, G, KH, KW, T, K;  // weight; G = groups of 16 channels, T = taps
  int64_t OH, OW, M, Ow;       // output; M = OH * OW, Ow = packed words per pixel
  int64_t sh, sw, ph, pw, dh, dw;
  const uint32_t* x;        // (N, H, W, xw)
  const uint32_t* w;        // (G, K, 16)
  const int32_t* tap_popc;  // (G, T, 16)
  const float* scale;       // [G * 16]
  const float* bias;
  const float* threshold;
  const float* residual;  // or null
  Layout residual_layout;
  float* out;  // or null
  Layout out_layout;
  uint32_t* packed;  // or null
};

// One task's pixels as the GEMM reads them. A pixel's K words are S
// segments of `run` words (`run` word pairs on avx2, its nibble split), each
// adjacent in memory: one segment per kernel row when dilation_w is 1 (KW
// taps of Cw words lie side by side in NHWC), else one per tap. A register
// tile's pixels are found through its Source: directly (a tile of adjacent
// pixels of one output row with every tap inside: pixel i's segment s at
// base + s * segment_stride + i * pixel_stride), or through a table of
// pointers into x, or at copies with zero words for the taps outside the
// image (those taps' bits in the pixel's invalid mask).
struct Source {
  const uint32_t* const* seg;  // table: segment s of row i at seg[s * ld + i]; null when direct
  int64_t ld;
  const uint32_t* base;
  int64_t pixel_stride, segment_stride;
};

struct Block {
  int64_t pix0, rows;  // output pixels pix0 .. pix0 + rows - 1 (pixel = n * M + m)
  const Source* src;   // per register tile of mr rows
  int64_t S, run;
  const uint64_t* invalid;  // per row: the taps outside the image
  int64_t c0, c1;           // output channels [c0, c1), c0 a multiple of 32
};

// counts (mr x cols, row stride kMaxTileCols) of one register tile against
// channel vectors j < nv, w[j] = word 0 of vector j (word k at w[j] + 16 k).
using GemmFn = void (*)(const Source& src, int64_t S, int64_t run, const uint32_t* const* w, int32_t* counts);

// The segments of a tile's pixel rows i < MR, for segment s.
template <int MR>
CTMQ_INLINE void tile_rows(const Source& src, int64_t s, const uint32_t* (&a)[MR]) {
  if (src.seg) {
    CTMQ_UNROLL for (int i = 0; i < MR; ++i) a[i] = src.seg[s * src.ld + i];
  } else {
    CTMQ_UNROLL for (int i = 0; i < MR; ++i) a[i] = src.base + s * src.segment_stride + i * src.pixel_stride;
  }
}

// A task's block, built once for all its output channels (binary_patches.cpp).
struct Patches {
  std::vector<Source> src;
  std::vector<const uint32_t*> seg;
  std::vector<uint32_t> copies, zeros;
  std::vector<uint64_t> invalid;
};
void build_block(const Conv& cv, int64_t mr, Patches& p, Block& b);

// The outputs of a tile's counts: rows pixels from pix0, channels c .. c + cols - 1
// (those past O are not written). An NCHW float output goes to stage
// instead (row i at stage + i * kMaxTileCols), which run_tiles transposes
// into the planes for several tiles at once: a 6-pixel tile alone would
// store 24 bytes per channel plane.
using EpilogueFn = void (*)(const Conv& cv, const int32_t* counts, int rows, int cols, int64_t pix0,
                            int64_t c, const uint64_t* invalid, float* stage);

// b[j * ldb + i] = a[i * lda + j]: each path's register transposes.
using TransposeFn = void (*)(const float* a, int64_t lda, float* b, int64_t ldb, int rows, int cols);

// A path's pieces of the tile loop.
struct TileOps {
  int lanes;                           // channels per vector
  GemmFn (*gemm_for)(int mr, int nv);  // Gemm<MR, NV>::run, tails included
  EpilogueFn epilogue;
  TransposeFn transpose;  // stage -> NCHW planes
  // The weight of a channel tile as its Gemm reads it (w[j] per vector); null:
  // the prepared layout itself.
  void (*weights)(const Conv& cv, int64_t c, int nv, const uint32_t** w);
};

constexpr int kStageRows = 48;  // NCHW rows staged before a transpose

// A block's channel tiles, and within each its pixel tiles (the weight tile
// stays in L1 while the pixels stream), each GEMM then its epilogue.
void run_tiles(const Conv& cv, const Block& b, Tile tile, const TileOps& ops);

// gemm_for of a path: Gemm<MR, NV>::run for 1 <= mr <= MaxMR, 1 <= nv <= MaxNV.
// Each path's kernels live in a namespace named after the path, not an
// anonymous one: GCC gives the local statics of these templates one symbol
// across files when the template arguments come from anonymous namespaces,
// and one path would then run another's kernels.
template <template <int, int> class Gemm, int MaxNV, int... I>
constexpr std::array<GemmFn, sizeof...(I)> gemm_table(std::integer_sequence<int, I...>) {
  return {{&Gemm<I / MaxNV + 1, I % MaxNV + 1>::run...}};
}
template <template <int, int> class Gemm, int MaxMR, int MaxNV>
GemmFn gemm_lookup(int mr, int nv) {
  static constexpr std::array<GemmFn, MaxMR * MaxNV> table =
      gemm_table<Gemm, MaxNV>(std::make_integer_sequence<int, MaxMR * MaxNV>());
  return table[(mr - 1) * MaxNV + (nv - 1)];
}

// The epilogue variant for a call's outputs: Epi<kOut, kPacked, kResidual>::run
// with kOut 0 (no float output), 1 (NCHW) or 2 (NHWC).
template <template <int, bool, bool> class Epi>
EpilogueFn epilogue_for(const Conv& cv) {
  const int out = cv.out ? (cv.out_layout == Layout::kNCHW ? 1 : 2) : 0;
  const bool packed = cv.packed != nullptr, res = cv.residual != nullptr;
  static constexpr EpilogueFn table[3][2][2] = {
      {{nullptr, nullptr}, {&Epi<0, true, false>::run, &Epi<0, true, true>::run}},
      {{&Epi<1, false, false>::run, &Epi<1, false, true>::run},
       {&Epi<1, true, false>::run, &Epi<1, true, true>::run}},
      {{&Epi<2, false, false>::run, &Epi<2, false, true>::run},
       {&Epi<2, true, false>::run, &Epi<2, true, true>::run}}};
  return table[out][packed][res];
}

// What the driver needs to know of a path.
struct PathInfo {
  int lanes;          // channels per vector
  bool split;         // avx2: reads x split into nibbles (split_words), 2 words a word
  bool whole_bytes;   // the epilogue stores whole packed bytes (lanes a multiple of 8)
  const Tile* tiles;  // the table
  int tile_count;
  Tile (*choose)(int64_t K, int64_t O);                                // the table's pick for a shape
  void (*split_words)(const uint32_t* src, int64_t n, uint32_t* dst);  // or null
  void (*run_block)(const Conv& cv, const Block& b, Tile tile);
  void (*pack_nhwc)(const float* x, int64_t pixels, int64_t C, const float* threshold, uint32_t* out);
  double (*peak_loop)(int64_t iterations);  // 64-bit words done (see peak_words_per_second)
};

const PathInfo& scalar_path();
#if defined(CTMQ_X86_SIMD)
const PathInfo& avx2_path();
const PathInfo& avx512_path();
#endif
#if defined(CTMQ_NEON)
const PathInfo& neon_path();
#endif

// ------------------------------------------------------------ shared helpers

// The pixel of a global index, and its offset in an NCHW plane.
CTMQ_INLINE int64_t image_of(const Conv& cv, int64_t pix) {
  return pix / cv.M;
}

// Rows [r0, r1) of a tile that lie in one image: the NCHW stores go by runs.
CTMQ_INLINE int64_t run_end(const Conv& cv, int64_t pix0, int64_t r0, int64_t r1) {
  const int64_t next_image = (image_of(cv, pix0 + r0) + 1) * cv.M - pix0;
  return std::min(r1, next_image);
}

// popcounts in the baseline ISA: x86-64 has no POPCNT before SSE4.2 (GCC
// would call libgcc), aarch64's become CNT.
CTMQ_INLINE int popc32(uint32_t v) {
#if defined(__x86_64__) && !defined(__POPCNT__)
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  v = (v + (v >> 4)) & 0x0F0F0F0Fu;
  return static_cast<int>((v * 0x01010101u) >> 24);
#else
  return __builtin_popcount(v);
#endif
}

CTMQ_INLINE int popc64(uint64_t v) {
  return popc32(static_cast<uint32_t>(v)) + popc32(static_cast<uint32_t>(v >> 32));
}

// b[j * ldb + i] = a[i * lda + j] for i < rows, j < cols (scalar; the paths
// transpose full 8x8 or 4x4 blocks in registers and leave the rest to this).
CTMQ_INLINE void transpose_scalar(const float* a, int64_t lda, float* b, int64_t ldb, int rows, int cols) {
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < rows; ++i) b[j * ldb + i] = a[i * lda + j];
}

#if defined(CTMQ_X86_SIMD)
void transpose_avx(const float* a, int64_t lda, float* b, int64_t ldb, int rows, int cols);

// r[k] (row k of an 8x8 block) becomes column k.
CTMQ_AVX2 CTMQ_INLINE void transpose8x8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  CTMQ_UNROLL for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  CTMQ_UNROLL for (int k = 0; k < 8; k += 4) {
    u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
    u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
  }
  CTMQ_UNROLL for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
    r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
  }
}
#endif

// A tile's rows (row stride kMaxTileCols) to and from NCHW planes: pixels of
// one image are adjacent there, so each run of a tile's rows inside one image
// is one transpose.
inline void tile_to_nchw(const Conv& cv, const float* tile, int64_t pix0, int rows, int64_t c, int cols,
                         float* dst, TransposeFn transpose) {
  for (int r0 = 0, r1; r0 < rows; r0 = r1) {
    r1 = static_cast<int>(run_end(cv, pix0, r0, rows));
    const int64_t pix = pix0 + r0, n = pix / cv.M, m = pix % cv.M;
    transpose(tile + r0 * kMaxTileCols, kMaxTileCols, dst + (n * cv.O + c) * cv.M + m, cv.M, r1 - r0, cols);
  }
}

inline void nchw_to_tile(const Conv& cv, const float* src, int64_t pix0, int rows, int64_t c, int cols,
                         float* tile, TransposeFn transpose) {
  for (int r0 = 0, r1; r0 < rows; r0 = r1) {
    r1 = static_cast<int>(run_end(cv, pix0, r0, rows));
    const int64_t pix = pix0 + r0, n = pix / cv.M, m = pix % cv.M;
    transpose(src + (n * cv.O + c) * cv.M + m, cv.M, tile + r0 * kMaxTileCols, kMaxTileCols, cols, r1 - r0);
  }
}

// Packed output bytes are written whole: byte c / 8 of a pixel holds channels
// c .. c + 7. The driver zeroes a task's bytes first, so paths may OR.
CTMQ_INLINE uint8_t* packed_bytes(const Conv& cv, int64_t pix) {
  return reinterpret_cast<uint8_t*>(cv.packed + pix * cv.Ow);
}

}  // namespace detail
}  // namespace bconv
}  // namespace ctmq
