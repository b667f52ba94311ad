// Bit packing and XNOR-popcount binary convolution on the CPU, exact.
//
// Packed format (docs/design.md): NHWC, channels in 32-bit words, bit j of word w =
// channel 32w + j, bit 1 = +1 (x >= 0); channel padding bits are 0 in both the
// activation and the weight, so they never count. A tap outside the image is
// zero padding (as F.conv2d on sign(x)): it adds nothing, and each output
// counts only its valid taps: out = C * valid_taps - 2 * popc(a XOR w).
//
// Code paths (binary_gemm.h says which each architecture builds); the best one
// the CPU has is chosen at run time:
//   "avx512-vpopcntdq"  x86-64: the GEMM on 8 output channels per vector (VPOPCNTQ);
//   "avx2"              x86-64: 4 output channels per vector, vpshufb nibble popcount;
//   "neon"              aarch64: 8 output channels per tile, CNT on 16 bytes;
//   "scalar"            the same C++ for the baseline ISA (on x86-64 popcount
//                       in software, on aarch64 CNT one word at a time).
// set_cpu_path("avx2" | "neon" | "scalar") caps the path, so the tests check each.
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
#include "binary_gemm.h"

namespace ctmq {
using namespace binary_detail;
namespace {

std::atomic<int> g_max_path{kBestPath};  // lowered by set_cpu_path

Path current_path() { return static_cast<Path>(std::min<int>(g_max_path.load(), cpu_best_path())); }

// What a request may name besides "auto": this build's paths, except the best
// x86 one, which is only ever detected. Another architecture's path is an error.
struct Requestable {
  const char* name;
  Path path;
};
#if defined(CTMQ_X86_SIMD)
constexpr Requestable kRequestable[] = {{"avx2", kAvx2}, {"scalar", kScalar}};
#elif defined(CTMQ_NEON)
constexpr Requestable kRequestable[] = {{"neon", kNeon}, {"scalar", kScalar}};
#else
constexpr Requestable kRequestable[] = {{"scalar", kScalar}};
#endif

}  // namespace

std::string binary_cpu_path(const std::string& request) {
  if (request.empty()) return path_name(current_path());
  Path cap = kBestPath;
  bool known = request == "auto";
  std::string choices = "'auto'";
  constexpr size_t count = sizeof(kRequestable) / sizeof(kRequestable[0]);
  for (size_t i = 0; i < count; ++i) {
    choices += (i + 1 < count ? ", '" : " or '") + std::string(kRequestable[i].name) + "'";
    if (request == kRequestable[i].name) {
      cap = kRequestable[i].path;
      known = true;
    }
  }
  TORCH_CHECK(known, "set_cpu_path: path must be ", choices, " in this build, got '", request, "'");
  g_max_path = cap;
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

#if defined(CTMQ_X86_SIMD)
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
#endif

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
#if defined(CTMQ_X86_SIMD)
  const Path path = current_path();
  const bool hw = path >= kAvx2;
  // the avx512 row kernel reads rows of W contiguous float32 values per channel
  const bool rows512 = path == kAvx512 && x.scalar_type() == at::kFloat && a.sW == 1 && a.sC != 1;
#endif
  auto* o = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pack_bits_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, a.N * a.H, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        uint32_t* row = o + r * a.W * a.Cw;
#if defined(CTMQ_X86_SIMD)
        if (rows512 && pack_row_float_avx512(xp, a, r / a.H, r % a.H, row)) continue;
        if (hw) {
          pack_row_hw<scalar_t>(xp, a, r / a.H, r % a.H, row);
          continue;
        }
#endif
        // elsewhere one build for the baseline ISA (on aarch64 that includes NEON)
        pack_row_scalar<scalar_t>(xp, a, r / a.H, r % a.H, row);
      }
    });
  });
  return out;
}

// The weight in the GEMM's form, (ceil(O/8), K, 8): 8 output channels
// interleaved per 64-bit word column, and the popcount of each channel's tap,
// (ceil(O/8), KH * KW, 8), for the border correction. Made once per weight.
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
  a.OH = conv_output_size(a.H, a.KH, a.sh, a.ph, a.dh);
  a.OW = conv_output_size(a.W, a.KW, a.sw, a.pw, a.dw);
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
      conv_block_on(path, a, n, m0, rows, oc0, oc1, P.data());
    }
  });
  return out;
}

}  // namespace

void register_binary_cpu(torch::Library& m) {
  m.impl("pack_bits_cpu", &pack_bits_cpu);
  m.impl("binary_conv2d_cpu", &binary_conv2d_cpu);
  m.impl("binary_weight_gemm", &weight_gemm_cpu);
}

}  // namespace ctmq
