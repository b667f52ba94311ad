// Registration hooks of ctmq's C++ kernels; the schemas live in ctmq_library.cpp.
#pragma once
#include <torch/library.h>

namespace ctmq {
void register_quant_cpu(torch::Library& m);
}  // namespace ctmq
