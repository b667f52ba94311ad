// The one TORCH_LIBRARY(ctmq) of the C++ extension: schemas of the kernels
// implemented in csrc/, registered per device by their own files. ctmq's ops
// (ctmq/ops) call them from their CPU and CUDA kernels (ctmq/ops/cpu.py,
// ctmq/ops/cuda.py), which fall back to the torch references where the
// extension is not built.
#include <torch/extension.h>

#include "ctmq.h"

TORCH_LIBRARY(ctmq, m) {
  m.def("quantize_act_fused(Tensor x, int bits) -> (Tensor, Tensor)");
  m.def("masked_grad_fused(Tensor grad, Tensor mask) -> Tensor");
  m.def("pack_bits_cpu(Tensor x) -> Tensor");
  m.def("binary_weight_gemm(Tensor bits) -> (Tensor, Tensor)");
  m.def(
      "binary_conv2d_cpu(Tensor x, int in_channels, Tensor weight, Tensor tap_popc, int out_channels, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, Tensor? scale, "
      "Tensor? bias, Tensor? residual, bool packed_out) -> Tensor");
  m.def(
      "binary_conv2d_bmma(Tensor x, int in_channels, Tensor bits, Tensor tap_popc, int[2] stride, "
      "int[2] padding, int[2] dilation, Tensor? scale, Tensor? bias, Tensor? residual, "
      "bool packed_out) -> Tensor");  // CUDA only: csrc/cuda/binary_conv_bind.cpp
  m.def("set_cpu_path(str path) -> str", &ctmq::binary_cpu_path);
  m.def("binary_cpu_peak(float seconds) -> float", &ctmq::binary_cpu_peak);
}

TORCH_LIBRARY_IMPL(ctmq, CPU, m) {
  ctmq::register_quant_cpu(m);
  ctmq::register_binary_cpu(m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ctmq C++/CUDA kernels; the ops are registered under torch.ops.ctmq";
  ctmq::register_executor(m);  // csrc/torch/executor_bind.cpp
}
