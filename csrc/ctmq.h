// Registration hooks of ctmq's C++ kernels; the schemas live in ctmq_library.cpp.
#pragma once
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

namespace ctmq {
void register_quant_cpu(torch::Library& m);
void register_binary_cpu(torch::Library& m);
// Binary CPU kernels' code path: "auto" (the best the CPU has), a cap ("avx2"
// on x86-64, "neon" on aarch64) or "scalar" (portable); "" only queries.
// Returns the path now in use (csrc/cpu/binary_cpu.cpp lists them).
std::string binary_cpu_path(const std::string& request);
// 64-bit words per second of the current path's inner loop on registers
// alone (xor, popcount, accumulate; no memory), run for about `seconds` in
// the calling thread: the path's peak, against which benchmarks rate the conv.
double binary_cpu_peak(double seconds);
// ctmq._C.Executor, the deploy runtime's compiled executor (csrc/torch/executor_bind.cpp).
void register_executor(pybind11::module& m);
}  // namespace ctmq
