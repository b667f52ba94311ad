// Binds the binary tensor-core convolution (binary_conv.cu) as the CUDA kernel
// of ctmq::binary_conv2d_bmma. Built only where CUDA sources are (setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binary_conv.cuh"

namespace ctmq {
namespace {

void check_int32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == dim && t.is_contiguous(), name,
              " must be a contiguous int32 ", dim, "-D tensor, got ", t.scalar_type(), " ", t.sizes());
}

const float* float_vector(const std::optional<at::Tensor>& t, const char* name, int64_t n,
                          const at::Device& dev) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == dev && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 1 &&
                  t->size(0) == n,
              name, " must be a contiguous float32 [", n, "] tensor on ", dev, ", got ", t->sizes());
  return t->const_data_ptr<float>();
}

at::Tensor binary_conv2d_bmma_cuda(const at::Tensor& x, int64_t in_channels, const at::Tensor& bits,
                                   const at::Tensor& tap_popc, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                   const std::optional<at::Tensor>& scale,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& residual, bool packed_out) {
  check_int32(x, "x", 4);
  check_int32(bits, "weight bits", 4);
  check_int32(tap_popc, "tap_popc", 2);
  TORCH_CHECK(bits.device() == x.device() && tap_popc.device() == x.device(),
              "x, weight bits and tap_popc must be on one device");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding and dilation must have 2 values each");
  BinaryConvParams p{};
  p.N = x.size(0);
  p.H = x.size(1);
  p.W = x.size(2);
  p.Cw = x.size(3);
  p.C = in_channels;
  p.O = bits.size(0);
  p.KH = bits.size(1);
  p.KW = bits.size(2);
  TORCH_CHECK(in_channels >= 1 && (in_channels + 31) / 32 == p.Cw, "in_channels (", in_channels,
              ") does not fit x's ", p.Cw, " words per pixel");
  TORCH_CHECK(bits.size(3) == p.Cw, "weight is packed for ", bits.size(3), " words per pixel, x has ", p.Cw);
  TORCH_CHECK(tap_popc.size(0) == p.O && tap_popc.size(1) == p.KH * p.KW, "tap_popc must be (O, KH*KW) = (",
              p.O, ", ", p.KH * p.KW, "), got ", tap_popc.sizes());
  p.sh = stride[0];
  p.sw = stride[1];
  p.ph = padding[0];
  p.pw = padding[1];
  p.dh = dilation[0];
  p.dw = dilation[1];
  TORCH_CHECK(p.sh >= 1 && p.sw >= 1 && p.ph >= 0 && p.pw >= 0 && p.dh >= 1 && p.dw >= 1,
              "stride and dilation must be >= 1 and padding >= 0, got ", stride, padding, dilation);
  p.OH = conv_output_size(p.H, p.KH, p.sh, p.ph, p.dh);
  p.OW = conv_output_size(p.W, p.KW, p.sw, p.pw, p.dw);
  TORCH_CHECK(p.OH >= 1 && p.OW >= 1, "the kernel does not fit the padded input");
  TORCH_CHECK((int64_t)p.N * p.OH * p.OW < (int64_t{1} << 31) - 128,
              "binary_conv2d_bmma: N * OH * OW must be below 2^31 (split the batch), got ",
              (int64_t)p.N * p.OH * p.OW);
  const int64_t Ow = (p.O + 31) / 32;
  at::Tensor out = packed_out ? at::empty({p.N, p.OH, p.OW, Ow}, x.options())
                              : at::empty({p.N, p.O, p.OH, p.OW}, x.options().dtype(at::kFloat));
  p.x = reinterpret_cast<const uint32_t*>(x.const_data_ptr<int32_t>());
  p.w = reinterpret_cast<const uint32_t*>(bits.const_data_ptr<int32_t>());
  p.tap_popc = tap_popc.const_data_ptr<int32_t>();
  p.scale = float_vector(scale, "scale", p.O, x.device());
  p.bias = float_vector(bias, "bias", p.O, x.device());
  if (residual.has_value()) {
    TORCH_CHECK(residual->device() == x.device() && residual->scalar_type() == at::kFloat &&
                    residual->is_contiguous() && residual->sizes() == at::IntArrayRef({p.N, p.O, p.OH, p.OW}),
                "residual must be a contiguous float32 (N, O, OH, OW) tensor on ", x.device());
    p.residual = residual->const_data_ptr<float>();
  }
  if (packed_out)
    p.packed = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>());
  else
    p.out = out.mutable_data_ptr<float>();
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = launch_binary_conv_bmma(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "binary_conv2d_bmma: CUDA error ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace ctmq

TORCH_LIBRARY_IMPL(ctmq, CUDA, m) {
  m.impl("binary_conv2d_bmma", &ctmq::binary_conv2d_bmma_cuda);
}
