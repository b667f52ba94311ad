// Fused CPU kernels of the CTMQ activation quantizer and its STE backward.
// One pass over x writes Q_k(x) and the bit-packed STE mask (bit j of byte i =
// memory element 8i + j), the same format and the same fp32 op order as the
// Triton kernels and the torch reference in ctmq/ops/reference.py (compiled with
// -ffp-contract=off so no FMA changes a rounding; -fno-trapping-math lets gcc
// turn the selects into vector blends, without changing any value).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../ctmq.h"

namespace ctmq {
namespace {

constexpr int64_t kBytesPerTask = 4096;  // 32768 elements per parallel chunk

// floor() for |y| < 2^31 without a libm call (SSE2 has no roundps); exact,
// as both conversions are exact in that range.
inline float floor_small(float y) {
  const float t = static_cast<float>(static_cast<int32_t>(y));
  return t - static_cast<float>(t > y);
}

// Branch-free (selects, min/max) so that gcc vectorizes the loop; NaN is kept
// by the last select and never reaches the int conversion.
template <bool kBinary>
inline float ctmq_level(float v, float n, float half_n) {
  float level;
  if constexpr (kBinary) {
    level = v >= 0.f ? 1.f : -1.f;
  } else {
    const float c = v == v ? std::min(std::max(v, -1.f), 1.f) : 0.f;
    level = (floor_small(c * half_n) * 2.f + 1.f) / n;
  }
  return v == v ? level : v;
}

template <typename T, bool kBinary>
void quantize_act_impl(const T* x, T* out, uint8_t* mask, int64_t numel, int bits) {
  const float n = static_cast<float>((1 << bits) - 1), half_n = n * 0.5f;
  const int64_t nbytes = (numel + 7) / 8;
  at::parallel_for(0, nbytes, kBytesPerTask, [&](int64_t b0, int64_t b1) {
    const int64_t e0 = b0 * 8, e1 = std::min(b1 * 8, numel);
    for (int64_t i = e0; i < e1; ++i) {
      out[i] = static_cast<T>(ctmq_level<kBinary>(static_cast<float>(x[i]), n, half_n));
    }
    for (int64_t b = b0; b < b1; ++b) {  // second pass over x, now in cache
      const int64_t i0 = b * 8, i1 = std::min(i0 + 8, numel);
      uint8_t byte = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const float v = static_cast<float>(x[i]);
        byte |= static_cast<uint8_t>(v >= -1.f && v <= 1.f) << (i - i0);
      }
      mask[b] = byte;
    }
  });
}

template <typename T>
void masked_grad_impl(const T* g, const uint8_t* mask, T* out, int64_t numel) {
  const int64_t nbytes = (numel + 7) / 8;
  at::parallel_for(0, nbytes, kBytesPerTask, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * 8, e1 = std::min(e0 + 8, numel);
      const uint8_t byte = mask[b];
      for (int64_t i = e0; i < e1; ++i) {
        out[i] = static_cast<T>(static_cast<float>(g[i]) * static_cast<float>((byte >> (i - e0)) & 1));
      }
    }
  });
}

void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name,
              " must be dense (contiguous or another stride order), got strides ", t.strides());
}

std::tuple<at::Tensor, at::Tensor> quantize_act_cpu(const at::Tensor& x, int64_t bits) {
  check_dense(x, "x");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got ", bits);
  auto out = at::empty_like(x);
  auto mask = at::empty({(x.numel() + 7) / 8}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_act_cpu", [&] {
    auto impl = bits == 1 ? quantize_act_impl<scalar_t, true> : quantize_act_impl<scalar_t, false>;
    impl(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<uint8_t>(),
         x.numel(), static_cast<int>(bits));
  });
  return {out, mask};
}

at::Tensor masked_grad_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  check_dense(grad, "grad");
  TORCH_CHECK(
      mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.numel() == (grad.numel() + 7) / 8,
      "mask must be a contiguous uint8 tensor of ceil(grad.numel() / 8) = ", (grad.numel() + 7) / 8,
      " bytes, got ", mask.scalar_type(), " with ", mask.numel());
  auto out = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "masked_grad_cpu", [&] {
    masked_grad_impl<scalar_t>(grad.const_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(),
                               out.mutable_data_ptr<scalar_t>(), grad.numel());
  });
  return out;
}

}  // namespace

void register_quant_cpu(torch::Library& m) {
  m.impl("quantize_act_fused", &quantize_act_cpu);
  m.impl("masked_grad_fused", &masked_grad_cpu);
}

}  // namespace ctmq
