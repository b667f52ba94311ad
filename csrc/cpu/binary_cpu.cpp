// The torch ops of the CPU binary conv: bit packing (pack_bits_cpu), the
// prepared weight (binary_weight_gemm) and the conv (binary_conv2d_cpu), which
// calls the torch-free library of binary_conv.h with at::parallel_for as its
// pool. Exact: out = C * valid_taps - 2 * popc(a XOR w) over the taps inside
// the image, then the epilogue (docs/design.md sections 3 and 5.1).
//
// Code paths, the best one the CPU has chosen at run time:
//   "avx512-vpopcntdq"  x86-64: VPOPCNTD on 16 output channels per vector;
//   "avx2"              x86-64: vpshufb nibble popcount, 8 channels per vector;
//   "neon"              aarch64: CNT, 4 channels per vector;
//   "scalar"            the same loops for the baseline ISA.
// set_cpu_path("avx2" | "neon" | "scalar") caps the path, so the tests check each.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>

#include "../ctmq.h"
#include "binary_conv.h"
#include "binary_kernels.h"

namespace ctmq {
using bconv::Layout;
using bconv::Path;
namespace {

// This build's paths, slowest first: set_cpu_path caps the rank.
#if defined(CTMQ_X86_SIMD)
constexpr Path kRanked[] = {Path::kScalar, Path::kAvx2, Path::kAvx512};
#elif defined(CTMQ_NEON)
constexpr Path kRanked[] = {Path::kScalar, Path::kNeon};
#else
constexpr Path kRanked[] = {Path::kScalar};
#endif
constexpr int kPaths = sizeof(kRanked) / sizeof(kRanked[0]);

std::atomic<int> g_cap{kPaths - 1};  // lowered by set_cpu_path

Path current_path() {
  for (int r = g_cap.load(); r > 0; --r) {
    if (bconv::path_runs(kRanked[r])) return kRanked[r];
  }
  return Path::kScalar;
}

// What a request may name besides "auto": this build's paths, except the best
// x86 one, which is only ever detected. Another architecture's path is an error.
struct Requestable {
  const char* name;
  int rank;
};
#if defined(CTMQ_X86_SIMD)
constexpr Requestable kRequestable[] = {{"avx2", 1}, {"scalar", 0}};
#elif defined(CTMQ_NEON)
constexpr Requestable kRequestable[] = {{"neon", 1}, {"scalar", 0}};
#else
constexpr Requestable kRequestable[] = {{"scalar", 0}};
#endif

// at::parallel_for as the library's pool (one thread inside a parallel region,
// where at::parallel_for runs serially).
bconv::Parallel torch_parallel() {
  bconv::Parallel par;
  par.threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  par.for_each = [](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    at::parallel_for(0, n, 1, fn);
  };
  return par;
}

}  // namespace

std::string binary_cpu_path(const std::string& request) {
  if (request.empty()) return bconv::path_name(current_path());
  int cap = kPaths - 1;
  bool known = request == "auto";
  std::string choices = "'auto'";
  constexpr size_t count = sizeof(kRequestable) / sizeof(kRequestable[0]);
  for (size_t i = 0; i < count; ++i) {
    choices += (i + 1 < count ? ", '" : " or '") + std::string(kRequestable[i].name) + "'";
    if (request == kRequestable[i].name) {
      cap = kRequestable[i].rank;
      known = true;
    }
  }
  TORCH_CHECK(known, "set_cpu_path: path must be ", choices, " in this build, got '", request, "'");
  g_cap = cap;
  return bconv::path_name(current_path());
}

double binary_cpu_peak(double seconds) {
  TORCH_CHECK(seconds > 0 && seconds <= 60, "binary_cpu_peak: seconds must be in (0, 60], got ", seconds);
  return bconv::peak_words_per_second(current_path(), seconds);
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
CTMQ_AVX2 void pack_row_hw(const T* x, const PackArgs& a, int64_t n, int64_t h, uint32_t* out) {
  pack_row<T>(x, a, n, h, out);
}

// float32 rows of W values per channel: 16 pixels at a time, one compare and
// one masked OR per channel sets that channel's bit in 16 words at once.
CTMQ_AVX512 void pack_row_avx512(const float* x, const PackArgs& a, int64_t n, int64_t h, uint32_t* out) {
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
  PackArgs a{x.size(0),   x.size(1),   x.size(2),   x.size(3),  (x.size(1) + 31) / 32,
             x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  auto out = at::empty({a.N, a.H, a.W, a.Cw}, x.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const Path path = current_path();
  auto* o = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>());
  if (x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    // NHWC float32: the conv library's vectorized packing, pixel after pixel
    bconv::pack_nhwc(x.const_data_ptr<float>(), a.N * a.H * a.W, a.C, nullptr, o, path, torch_parallel());
    return out;
  }
#if defined(CTMQ_X86_SIMD)
  const bool hw = path != Path::kScalar;
  // the avx512 row kernel reads rows of W contiguous float32 values per channel
  const bool rows512 = path == Path::kAvx512 && x.scalar_type() == at::kFloat && a.sW == 1 && a.sC != 1;
#endif
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

// The weight as the library's kernels read it (binary_conv.h): words
// (ceil(O/16), K, 16) int32 with K = KH * KW * ceil(C/32), 16 output channels
// interleaved per word column, and tap popcounts (ceil(O/16), KH * KW, 16)
// int32 for the border correction. Made once per weight.
std::tuple<at::Tensor, at::Tensor> weight_gemm_cpu(const at::Tensor& bits) {
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == at::kInt && bits.dim() == 4,
              "weight bits must be a CPU int32 (O, KH, KW, words) tensor, got ", bits.scalar_type(), " ",
              bits.sizes(), " on ", bits.device());
  const auto b = bits.contiguous();
  const int64_t O = b.size(0), KH = b.size(1), KW = b.size(2), Cw = b.size(3);
  const int64_t G = (O + 15) / 16, T = KH * KW;
  auto words = at::empty({G, T * Cw, 16}, b.options());
  auto popc = at::empty({G, T, 16}, b.options());
  if (O == 0 || T == 0 || Cw == 0) return {words.zero_(), popc.zero_()};
  try {  // C = 32 * Cw: the padding bits are zero, so any C of those words gives the same form
    bconv::prepare_weight_into(reinterpret_cast<const uint32_t*>(b.const_data_ptr<int32_t>()), O, KH, KW,
                               32 * Cw, reinterpret_cast<uint32_t*>(words.mutable_data_ptr<int32_t>()),
                               popc.mutable_data_ptr<int32_t>());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  return {words, popc};
}

void check_packed(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32 packed bits, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(), name, " must be a contiguous 4-D packed tensor, got ",
              t.sizes(), (t.is_contiguous() ? "" : " (non-contiguous)"));
}

std::optional<at::Tensor> check_vector(const std::optional<at::Tensor>& t, const char* name, int64_t O) {
  if (!t.has_value()) return t;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == O, name, " must have one value per output channel (", O,
              "), got shape ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

// The prepared weight's tensors, checked against the conv's shape.
bconv::PreparedWeight weight_of(const at::Tensor& words, const at::Tensor& popc, int64_t O,
                                at::IntArrayRef kernel_size, int64_t C) {
  const int64_t KH = kernel_size[0], KW = kernel_size[1], Cw = (C + 31) / 32, G = (O + 15) / 16;
  TORCH_CHECK(KH >= 1 && KW >= 1 && KH * KW <= 64, "kernel_size must be >= 1 with at most 64 taps, got ",
              kernel_size);
  TORCH_CHECK(O >= 1, "out_channels must be >= 1, got ", O);
  TORCH_CHECK(words.device().is_cpu() && words.scalar_type() == at::kInt && words.is_contiguous() &&
                  words.dim() == 3 && words.size(0) == G && words.size(2) == 16,
              "weight must be the contiguous int32 (ceil(O/16), K, 16) layout of ctmq.binary.pack_weight "
              "for ",
              O, " output channels, got ", words.scalar_type(), " ", words.sizes());
  TORCH_CHECK(words.size(1) == KH * KW * Cw, "weight is packed for ", words.size(1),
              " words per output "
              "channel (another channel count or kernel size), x needs ",
              KH * KW * Cw);
  TORCH_CHECK(popc.scalar_type() == at::kInt && popc.is_contiguous() &&
                  popc.sizes() == at::IntArrayRef({G, KH * KW, 16}),
              "tap_popc must be int32 (ceil(O/16), KH*KW, 16), got ", popc.scalar_type(), " ", popc.sizes());
  return bconv::weight_view(reinterpret_cast<const uint32_t*>(words.const_data_ptr<int32_t>()),
                            popc.const_data_ptr<int32_t>(), O, KH, KW, C);
}

at::Tensor binary_conv2d_cpu(const at::Tensor& x, int64_t in_channels, const at::Tensor& weight,
                             const at::Tensor& tap_popc, int64_t out_channels, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             const std::optional<at::Tensor>& scale_in,
                             const std::optional<at::Tensor>& bias_in,
                             const std::optional<at::Tensor>& residual, bool packed_out) {
  check_packed(x, "x");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "kernel_size, stride, padding and dilation must have 2 values each");
  const int64_t Cw = x.size(3);
  TORCH_CHECK(in_channels >= 1 && (in_channels + 31) / 32 == Cw, "in_channels (", in_channels,
              ") does not fit x's ", Cw, " words per pixel");
  const bconv::PreparedWeight w = weight_of(weight, tap_popc, out_channels, kernel_size, in_channels);
  bconv::ConvParams p;
  p.N = x.size(0);
  p.H = x.size(1);
  p.W = x.size(2);
  p.sh = stride[0];
  p.sw = stride[1];
  p.ph = padding[0];
  p.pw = padding[1];
  p.dh = dilation[0];
  p.dw = dilation[1];
  TORCH_CHECK(p.sh >= 1 && p.sw >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK(p.ph >= 0 && p.pw >= 0, "padding must be >= 0, got ", padding);
  TORCH_CHECK(p.dh >= 1 && p.dw >= 1, "dilation must be >= 1, got ", dilation);
  const int64_t OH = bconv::output_size(p.H, w.KH, p.sh, p.ph, p.dh);
  const int64_t OW = bconv::output_size(p.W, w.KW, p.sw, p.pw, p.dw);
  TORCH_CHECK(OH >= 1 && OW >= 1, "the kernel (", w.KH, "x", w.KW, ", dilation ", dilation,
              ") does not fit the padded input (", p.H, "x", p.W, ", padding ", padding, ")");
  const int64_t O = out_channels;
  auto scale = check_vector(scale_in, "scale", O);
  auto bias = check_vector(bias_in, "bias", O);
  at::Tensor out = packed_out ? at::empty({p.N, OH, OW, (O + 31) / 32}, x.options())
                              : at::empty({p.N, O, OH, OW}, x.options().dtype(at::kFloat));
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() &&
                    residual->sizes() == at::IntArrayRef({p.N, O, OH, OW}),
                "residual must be a contiguous float32 (", p.N, ", ", O, ", ", OH, ", ", OW, ") tensor, got ",
                residual->scalar_type(), " ", residual->sizes());
    p.residual = residual->const_data_ptr<float>();
    p.residual_layout = Layout::kNCHW;
  }
  if (out.numel() == 0) return out;
  p.x = reinterpret_cast<const uint32_t*>(x.const_data_ptr<int32_t>());
  p.scale = scale ? scale->const_data_ptr<float>() : nullptr;
  p.bias = bias ? bias->const_data_ptr<float>() : nullptr;
  if (packed_out)
    p.packed = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>());
  else
    p.out = out.mutable_data_ptr<float>();
  p.out_layout = Layout::kNCHW;
  try {
    bconv::conv2d(p, w, current_path(), torch_parallel());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
  return out;
}

}  // namespace

void register_binary_cpu(torch::Library& m) {
  m.impl("pack_bits_cpu", &pack_bits_cpu);
  m.impl("binary_conv2d_cpu", &binary_conv2d_cpu);
  m.impl("binary_weight_gemm", &weight_gemm_cpu);
}

}  // namespace ctmq
