// Bit packing and XNOR-popcount binary convolution on the CPU, exact.
//
// Packed format (DESIGN.md): NHWC, channels in 32-bit words, bit j of word w =
// channel 32w + j, bit 1 = +1 (x >= 0); channel padding bits are 0 in both the
// activation and the weight, so they never count. A tap outside the image is
// zero padding (as F.conv2d on sign(x)): it adds nothing, and each output
// counts only its valid taps: out = C * valid_taps - 2 * popc(a XOR w).
//
// Two code paths, chosen at run time: "avx2" (AVX2 + POPCNT instructions,
// gcc target attributes) and the portable "scalar" one (same C++, built for
// the baseline ISA: popcount in software). set_cpu_path("scalar") forces the
// portable one, which the tests use to check both.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../ctmq.h"

#define CTMQ_INLINE inline __attribute__((always_inline))
#define CTMQ_HW __attribute__((target("avx2,popcnt")))

namespace ctmq {
namespace {

std::atomic<bool> g_force_scalar{false};

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  return ok;
}

bool use_hw() { return !g_force_scalar.load() && cpu_has_avx2(); }

}  // namespace

std::string binary_cpu_path(const std::string& request) {
  TORCH_CHECK(request.empty() || request == "auto" || request == "scalar",
              "set_cpu_path: path must be 'auto' or 'scalar', got '", request, "'");
  if (!request.empty()) g_force_scalar = request == "scalar";
  return use_hw() ? "avx2" : "scalar";
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
  const bool hw = use_hw();
  auto* o = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pack_bits_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, a.N * a.H, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        uint32_t* row = o + r * a.W * a.Cw;
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
  const uint64_t* w;             // (O, K)
  const int32_t* popw;           // (O, KH * KW): popc of each channel's tap
  const float* scale;            // [O] or null
  const float* bias;             // [O] or null
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
    popc -= a.popw[oc * a.KH * a.KW + __builtin_ctzll(b)];
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
  for (int j = 0; j < NR; ++j) w[j] = a.w + (oc + j) * a.K;
  for (int64_t k = 0; k < a.K; ++k) {
    uint64_t pv[MR], wv[NR];
    for (int i = 0; i < MR; ++i) pv[i] = p[i][k];
    for (int j = 0; j < NR; ++j) wv[j] = w[j][k];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += __builtin_popcountll(pv[i] ^ wv[j]);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) finish(a, n, m0 + r + i, oc + j, invalid[r + i], acc[i][j]);
}

// One task: output pixels [m0, m0 + rows) of image n, output channels [oc0, oc1).
CTMQ_INLINE void conv_block(const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                            int64_t oc1, uint64_t* P) {
  uint64_t invalid[kBlockM];
  build_patches(a, n, m0, rows, P, invalid);
  if (a.packed) {  // this task owns words [oc0 / 32, ceil(oc1 / 32)) of its pixels
    for (int64_t r = 0; r < rows; ++r) {
      uint32_t* words = a.packed + (n * a.OH * a.OW + m0 + r) * a.Ow;
      for (int64_t wd = oc0 / 32; wd < (oc1 + 31) / 32; ++wd) words[wd] = 0;
    }
  }
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

CTMQ_HW void conv_block_hw(const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                           int64_t oc1, uint64_t* P) {
  conv_block(a, n, m0, rows, oc0, oc1, P);
}
void conv_block_scalar(const ConvArgs& a, int64_t n, int64_t m0, int64_t rows, int64_t oc0,
                       int64_t oc1, uint64_t* P) {
  conv_block(a, n, m0, rows, oc0, oc1, P);
}

// (O, KH, KW, Cw) 32-bit words -> (O, K) 64-bit words, and popc per (O, tap).
void gemm_weight(const at::Tensor& weight, int64_t Cw64, at::Tensor& w64, at::Tensor& popw) {
  const int64_t O = weight.size(0), taps = weight.size(1) * weight.size(2), Cw = weight.size(3);
  w64 = at::zeros({O, taps * Cw64}, weight.options().dtype(at::kLong));
  popw = at::empty({O, taps}, weight.options());
  const auto* src = reinterpret_cast<const uint32_t*>(weight.const_data_ptr<int32_t>());
  auto* dst = reinterpret_cast<uint64_t*>(w64.mutable_data_ptr<int64_t>());
  auto* pc = popw.mutable_data_ptr<int32_t>();
  for (int64_t t = 0; t < O * taps; ++t) {
    std::memcpy(dst + t * Cw64, src + t * Cw, 4 * Cw);
    int32_t c = 0;
    for (int64_t j = 0; j < Cw; ++j) c += __builtin_popcount(src[t * Cw + j]);
    pc[t] = c;
  }
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

at::Tensor binary_conv2d_cpu(const at::Tensor& x, int64_t in_channels, const at::Tensor& weight,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             const std::optional<at::Tensor>& scale_in,
                             const std::optional<at::Tensor>& bias_in, bool packed_out) {
  check_packed(x, "x");
  check_packed(weight, "weight");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding and dilation must have 2 values each");
  const int64_t Cw = x.size(3);
  TORCH_CHECK(in_channels >= 1 && (in_channels + 31) / 32 == Cw, "in_channels (", in_channels,
              ") does not fit x's ", Cw, " words per pixel");
  TORCH_CHECK(weight.size(3) == Cw, "weight is packed for ", weight.size(3), " words per pixel (",
              "another channel count), x has ", Cw);
  ConvArgs a{};
  a.N = x.size(0); a.H = x.size(1); a.W = x.size(2); a.C = in_channels; a.Cw = Cw;
  a.Cw64 = (Cw + 1) / 2;
  a.O = weight.size(0); a.KH = weight.size(1); a.KW = weight.size(2);
  a.K = a.KH * a.KW * a.Cw64;
  TORCH_CHECK(a.KH * a.KW <= 64, "kernels of more than 64 taps are not supported, got ",
              a.KH, "x", a.KW);
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
  if (out.numel() == 0) return out;
  at::Tensor w64, popw;
  gemm_weight(weight, a.Cw64, w64, popw);
  a.x = reinterpret_cast<const uint32_t*>(x.const_data_ptr<int32_t>());
  a.w = reinterpret_cast<const uint64_t*>(w64.const_data_ptr<int64_t>());
  a.popw = popw.const_data_ptr<int32_t>();
  a.scale = scale ? scale->const_data_ptr<float>() : nullptr;
  a.bias = bias ? bias->const_data_ptr<float>() : nullptr;
  if (packed_out) a.packed = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>());
  else a.out = out.mutable_data_ptr<float>();
  const bool hw = use_hw();
  const int64_t M = a.OH * a.OW, mblocks = (M + kBlockM - 1) / kBlockM;
  const int64_t oblocks = (a.O + kBlockO - 1) / kBlockO;
  at::parallel_for(0, a.N * mblocks * oblocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint64_t> P(kBlockM * a.K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ob = t % oblocks, mb = (t / oblocks) % mblocks, n = t / (oblocks * mblocks);
      const int64_t m0 = mb * kBlockM, rows = std::min(kBlockM, M - m0);
      const int64_t oc0 = ob * kBlockO, oc1 = std::min(a.O, oc0 + kBlockO);
      if (hw) conv_block_hw(a, n, m0, rows, oc0, oc1, P.data());
      else conv_block_scalar(a, n, m0, rows, oc0, oc1, P.data());
    }
  });
  return out;
}

}  // namespace

void register_binary_cpu(torch::Library& m) {
  m.impl("pack_bits", &pack_bits_cpu);
  m.impl("binary_conv2d", &binary_conv2d_cpu);
}

}  // namespace ctmq
