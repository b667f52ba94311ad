// The one TORCH_LIBRARY(ctmq) of the C++ extension: schemas of the kernels
// implemented in csrc/, registered per device by their own files. The
// user-facing ops (ctmq/ops.py) call these and fall back to torch code where
// the extension is not built.
#include <torch/extension.h>

#include "ctmq.h"

TORCH_LIBRARY(ctmq, m) {
  m.def("quantize_act_fused(Tensor x, int bits) -> (Tensor, Tensor)");
  m.def("masked_grad_fused(Tensor grad, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(ctmq, CPU, m) { ctmq::register_quant_cpu(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ctmq C++/CUDA kernels; the ops are registered under torch.ops.ctmq";
}
