// Bit packing and XNOR-popcount binary convolution on the CPU, exact.
//
// Packed format (DESIGN.md): NHWC, channels in 32-bit words, bit j of word w =
// channel 32w + j, bit 1 = +1 (x >= 0); channel padding bits are 0 in both the
// activation and the weight, so they never count. A tap outside the image is
// zero padding (as F.conv2d on sign(x)): it adds nothing, and each output
// counts only its valid taps: out = C * valid_taps - 2 * popc(a XOR w).
//
// Three code paths, chosen at run time from what the CPU has:
//   "avx512-vpopcntdq"  the GEMM on 8 output channels per vector (VPOPCNTQ);
//   "avx2"              4 output channels per vector, vpshufb nibble popcount;
//   "scalar"            the same C++ for the baseline ISA (popcount in software).
// set_cpu_path("avx2" | "scalar") caps the path, so the tests check each.
#include <immintrin.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../ctmq.h"

#define CTMQ_INLINE inline __attribute__((always_inline))
#define CTMQ_HW __attribute__((target("avx2,popcnt")))
#define CTMQ_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512vpopcntdq,avx2,popcnt")))

namespace ctmq {
namespace {

enum Path : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
std::atomic<int> g_max_path{kAvx512};  // lowered by set_cpu_path

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

Path current_path() { return static_cast<Path>(std::min<int>(g_max_path.load(), cpu_best_path())); }

const char* path_name(Path p) {
  return p == kAvx512 ? "avx512-vpopcntdq" : (p == kAvx2 ? "avx2" : "scalar");
}

}  // namespace

std::string binary_cpu_path(const std::string& request) {
  TORCH_CHECK(request.empty() || request == "auto" || request == "avx2" || request == "scalar",
              "set_cpu_path: path must be 'auto', 'avx2' or 'scalar', got '", request, "'");
  if (!request.empty()) {
    g_max_path = request == "auto" ? kAvx512 : (request == "avx2" ? kAvx2 : kScalar);
  }
  return path_name(current_path());
}

namespace {

// ------------------------------------------------------------------ packing
struct PackArgs {
  int64_t N, C, H, W, Cw;
  int64_t sN, sC, sH, sW;  // element strides of x
};

// One (n, h) row of pixels: out[w * Cw + c / 32] bit c % 32 = x[n, c, h, w] >= 0.
template <typename T>
CTMQ_INLINE void pack_row(const T* x, const PackArgs& a, int64_t n, int64_t h, uint32_t* out) {
  std::memset(out, 0, sizeof(uint32_t) * a.W * a.Cw);
  const T* base = x + n * a.sN + h * a.sH;
  if (a.sC == 1) {  // channels innermost (channels_last): contiguous per pixel
    for (int64_t w = 0; w < a.W; ++w) {
      const T* px = base + w * a.sW;
      uint32_t* o = out + w * a.Cw;
      for (int64_t c = 0; c < a.C; ++c) {
        o[c >> 5] |= static_cast<uint32_t>(px[c] >= static_cast<T>(0)) << (c & 31);
      }
    }
  } else {  // a row of W values per channel
    for (int64_t c = 0; c < a.C; ++c) {
      const T* row = base + c * a.sC;
      const uint32_t bit = 1u << (c & 31);
      uint32_t* o = out + (c >> 5);
      for (int64_t w = 0; w < a.W; ++w) {
        o[w * a.Cw] |= row[w * a.sW] >= static_cast<T>(0) ? bit : 0u;
      }
    }
  }
}

template <typename T>
CTMQ_HW void pack_row_hw(const T* x, const PackArgs& a, int64_t n, int64_t h, uint32_t* out) {
  pack_row<T>(x, a, n, h, out);
}

// float32 rows of W values per channel: 16 pixels at a time, one compare and
// one masked OR per channel sets that channel's bit in 16 words at once.
CTMQ_AVX512 void pack_row_avx512(const float* x, const PackArgs& a, int64_t n, int64_t h,
                                 uint32_t* out) {
  const float* base = x + n * a.sN + h * a.sH;
  alignas(64) uint32_t words[16];
  for (int64_t w0 = 0; w0 < a.W; w0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, a.W - w0);
    const __mmask16 tail = static_cast<__mmask16>((1u << cnt) - 1);
    for (int64_t cw = 0; cw < a.Cw; ++cw) {
      __m512i v = _mm512_setzero_si512();
      for (int64_t c = cw * 32; c < std::min(a.C, cw * 32 + 32); ++c) {
        const __m512 vals = _mm512_maskz_loadu_ps(tail, base + c * a.sC + w0);
        const __mmask16 ge = _mm512_mask_cmp_ps_mask(tail, vals, _mm512_setzero_ps(), _CMP_GE_OQ);
        v = _mm512_mask_or_epi32(v, ge, v, _mm512_set1_epi32(static_cast<int>(1u << (c & 31))));
      }
      _mm512_store_si512(words, v);
      for (int64_t i = 0; i < cnt; ++i) out[(w0 + i) * a.Cw + cw] = words[i];
    }
  }
}

// Overloads: the avx512 row kernel exists for float32 only.
template <typename T>
bool pack_row_float_avx512(const T*, const PackArgs&, int64_t, int64_t, uint32_t*) {
  return false;
}
bool pack_row_float_avx512(const float* x, const PackArgs& a, int64_t n, int64_t h, uint32_t* out) {
  pack_row_avx512(x, a, n, h, out);
  return true;
}

template <typename T>
void pack_row_scalar(const T* x, const PackArgs& a, int64_t n, int64_t h, uint32_t* out) {
  pack_row<T>(x, a, n, h, out);
}

at::Tensor pack_bits_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating tensor, got ", x.scalar_type());
  PackArgs a{x.size(0), x.size(1), x.size(2), x.size(3), (x.size(1) + 31) / 32,
             x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  auto out = at::empty({a.N, a.H, a.W, a.Cw}, x.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const Path path = current_path();
  const bool hw = path >= kAvx2;
  // the avx512 row kernel reads rows of W contiguous float32 values per channel
  const bool rows512 = path == kAvx512 && x.scalar_type() == at::kFloat && a.sW == 1 && a.sC != 1;
  auto* o = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pack_bits_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, a.N * a.H, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        uint32_t* row = o + r * a.W * a.Cw;
        if (rows512 && pack_row_float_avx512(xp, a, r / a.H, r % a.H, row)) continue;
        if (hw) pack_row_hw<scalar_t>(xp, a, r / a.H, r % a.H, row);
        else pack_row_scalar<scalar_t>(xp, a, r / a.H, r % a.H, row);
      }
    });
  });
  return out;
}

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
          std::memset(dst, 0, 8 * a.Cw64);
          bad |= uint64_t{1} << tap;
        } else {
          dst[a.Cw64 - 1] = 0;  // an odd word count leaves the high half 0
          std::memcpy(dst, a.x + ((n * a.H + ih) * a.W + iw) * a.Cw, 4 * a.Cw);
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
void conv_block_scalar(const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                       int64_t oc1, uint64_t* P) {
  conv_block(a, n, m0, rows, oc0, oc1, P);
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

// (O, KH, KW, Cw) 32-bit words -> the GEMM layout every path reads: 64-bit
// words, 8 output channels interleaved, (ceil(O/8), K, 8), zeros past O; and the
// popcount of each channel's tap, (ceil(O/8), KH * KW, 8). Made once per weight.
std::tuple<at::Tensor, at::Tensor> weight_gemm_cpu(const at::Tensor& bits) {
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == at::kInt && bits.dim() == 4,
              "weight bits must be a CPU int32 (O, KH, KW, words) tensor, got ", bits.scalar_type(),
              " ", bits.sizes(), " on ", bits.device());
  const auto b = bits.contiguous();
  const int64_t O = b.size(0), T = b.size(1) * b.size(2), Cw = b.size(3), Cw64 = (Cw + 1) / 2;
  const int64_t G = (O + 7) / 8, K = T * Cw64;
  auto w8 = at::zeros({G, K, 8}, b.options().dtype(at::kLong));
  auto popw8 = at::zeros({G, T, 8}, b.options().dtype(at::kLong));
  const auto* src = reinterpret_cast<const uint32_t*>(b.const_data_ptr<int32_t>());
  auto* w = reinterpret_cast<uint64_t*>(w8.mutable_data_ptr<int64_t>());
  auto* pc = popw8.mutable_data_ptr<int64_t>();
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t t = 0; t < T; ++t) {
      const uint32_t* tap = src + (o * T + t) * Cw;
      int64_t count = 0;
      for (int64_t j = 0; j < Cw; ++j) {
        const uint64_t word = static_cast<uint64_t>(tap[j]) << (32 * (j % 2));
        w[((o / 8) * K + t * Cw64 + j / 2) * 8 + o % 8] |= word;
        count += __builtin_popcount(tap[j]);
      }
      pc[((o / 8) * T + t) * 8 + o % 8] = count;
    }
  }
  return {w8, popw8};
}

void check_packed(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32 packed bits, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(), name, " must be a contiguous 4-D packed tensor, got ",
              t.sizes(), (t.is_contiguous() ? "" : " (non-contiguous)"));
}

std::optional<at::Tensor> check_vector(const std::optional<at::Tensor>& t, const char* name, int64_t O) {
  if (!t.has_value()) return t;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == O, name, " must have one value per output channel (",
              O, "), got shape ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

at::Tensor binary_conv2d_cpu(const at::Tensor& x, int64_t in_channels, const at::Tensor& w8,
                             const at::Tensor& popw8, int64_t out_channels, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             const std::optional<at::Tensor>& scale_in,
                             const std::optional<at::Tensor>& bias_in,
                             const std::optional<at::Tensor>& residual, bool packed_out) {
  check_packed(x, "x");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "kernel_size, stride, padding and dilation must have 2 values each");
  const int64_t Cw = x.size(3);
  TORCH_CHECK(in_channels >= 1 && (in_channels + 31) / 32 == Cw, "in_channels (", in_channels,
              ") does not fit x's ", Cw, " words per pixel");
  const int64_t KH = kernel_size[0], KW = kernel_size[1], Cw64 = (Cw + 1) / 2;
  TORCH_CHECK(KH >= 1 && KW >= 1 && KH * KW <= 64, "kernel_size must be >= 1 with at most 64 taps, got ",
              kernel_size);
  TORCH_CHECK(out_channels >= 1, "out_channels must be >= 1, got ", out_channels);
  TORCH_CHECK(w8.device().is_cpu() && w8.scalar_type() == at::kLong && w8.is_contiguous() &&
                  w8.dim() == 3 && w8.size(0) == (out_channels + 7) / 8 && w8.size(2) == 8,
              "weight must be the contiguous int64 (ceil(O/8), K, 8) layout of ctmq.binary.pack_weight "
              "for ", out_channels, " output channels, got ", w8.scalar_type(), " ", w8.sizes());
  TORCH_CHECK(w8.size(1) == KH * KW * Cw64, "weight is packed for ", w8.size(1), " words per output "
              "channel (another channel count or kernel size), x needs ", KH * KW * Cw64);
  TORCH_CHECK(popw8.scalar_type() == at::kLong && popw8.is_contiguous() &&
                  popw8.sizes() == at::IntArrayRef({w8.size(0), KH * KW, 8}),
              "tap_popc must be int64 (ceil(O/8), KH*KW, 8), got ", popw8.sizes());
  ConvArgs a{};
  a.N = x.size(0); a.H = x.size(1); a.W = x.size(2); a.C = in_channels; a.Cw = Cw; a.Cw64 = Cw64;
  a.O = out_channels; a.KH = KH; a.KW = KW; a.K = KH * KW * Cw64;
  a.sh = stride[0]; a.sw = stride[1]; a.ph = padding[0]; a.pw = padding[1];
  a.dh = dilation[0]; a.dw = dilation[1];
  TORCH_CHECK(a.sh >= 1 && a.sw >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK(a.ph >= 0 && a.pw >= 0, "padding must be >= 0, got ", padding);
  TORCH_CHECK(a.dh >= 1 && a.dw >= 1, "dilation must be >= 1, got ", dilation);
  a.OH = (a.H + 2 * a.ph - a.dh * (a.KH - 1) - 1) / a.sh + 1;
  a.OW = (a.W + 2 * a.pw - a.dw * (a.KW - 1) - 1) / a.sw + 1;
  TORCH_CHECK(a.OH >= 1 && a.OW >= 1, "the kernel (", a.KH, "x", a.KW, ", dilation ", dilation,
              ") does not fit the padded input (", a.H, "x", a.W, ", padding ", padding, ")");
  a.Ow = (a.O + 31) / 32;
  auto scale = check_vector(scale_in, "scale", a.O);
  auto bias = check_vector(bias_in, "bias", a.O);
  at::Tensor out = packed_out ? at::empty({a.N, a.OH, a.OW, a.Ow}, x.options())
                              : at::empty({a.N, a.O, a.OH, a.OW}, x.options().dtype(at::kFloat));
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() &&
                    residual->sizes() == at::IntArrayRef({a.N, a.O, a.OH, a.OW}),
                "residual must be a contiguous float32 (", a.N, ", ", a.O, ", ", a.OH, ", ", a.OW,
                ") tensor, got ", residual->scalar_type(), " ", residual->sizes());
    a.residual = residual->const_data_ptr<float>();
  }
  if (out.numel() == 0) return out;
  a.x = reinterpret_cast<const uint32_t*>(x.const_data_ptr<int32_t>());
  a.w8 = reinterpret_cast<const uint64_t*>(w8.const_data_ptr<int64_t>());
  a.popw8 = popw8.const_data_ptr<int64_t>();
  a.scale = scale ? scale->const_data_ptr<float>() : nullptr;
  a.bias = bias ? bias->const_data_ptr<float>() : nullptr;
  if (packed_out) a.packed = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>());
  else a.out = out.mutable_data_ptr<float>();
  const Path path = current_path();
  const int64_t M = a.OH * a.OW, mblocks = (M + kBlockM - 1) / kBlockM;
  const int64_t oblocks = (a.O + kBlockO - 1) / kBlockO;
  at::parallel_for(0, a.N * mblocks * oblocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint64_t> P(kBlockM * a.K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ob = t % oblocks, mb = (t / oblocks) % mblocks, n = t / (oblocks * mblocks);
      const int64_t m0 = mb * kBlockM, rows = std::min(kBlockM, M - m0);
      const int64_t oc0 = ob * kBlockO, oc1 = std::min(a.O, oc0 + kBlockO);
      if (path == kAvx512) conv_block_avx512(a, n, m0, rows, oc0, oc1, P.data());
      else if (path == kAvx2) conv_block_hw(a, n, m0, rows, oc0, oc1, P.data());
      else conv_block_scalar(a, n, m0, rows, oc0, oc1, P.data());
    }
  });
  return out;
}

}  // namespace

void register_binary_cpu(torch::Library& m) {
  m.impl("pack_bits", &pack_bits_cpu);
  m.impl("binary_conv2d", &binary_conv2d_cpu);
  m.impl("binary_weight_gemm", &weight_gemm_cpu);
}

}  // namespace ctmq
