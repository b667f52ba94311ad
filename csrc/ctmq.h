// Registration hooks of ctmq's C++ kernels; the schemas live in ctmq_library.cpp.
#pragma once
#include <torch/library.h>

#include <string>

namespace ctmq {
void register_quant_cpu(torch::Library& m);
void register_binary_cpu(torch::Library& m);
// Binary CPU kernels' code path: "auto" (AVX2 + POPCNT when the CPU has them)
// or "scalar" (portable); "" only queries. Returns the path now in use.
std::string binary_cpu_path(const std::string& request);
}  // namespace ctmq
