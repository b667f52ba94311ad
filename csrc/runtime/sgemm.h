// Float GEMM for the native engine's float ops (conv2d as patches x weight,
// linear): C (M x N) = bias + A (M x K) B (K x N), row-major. Torch-free.
//
// Every output is bias[j] + a[0] b[0][j] + a[1] b[1][j] + ... in that order,
// each product and each sum rounded once (no fused multiply-add), whatever
// the code path: register tiles of AVX-512, AVX2 or NEON vectors (chosen at
// run time, as the binary kernels' paths) or plain C++ give the same bits,
// so the native runtime's logits are the same on every CPU.
#pragma once
#include <cstdint>
#include <vector>

#include "../cpu/binary_conv.h"

namespace ctmq {
namespace rt {

// B (K x N) in the kernels' layout: panels of 32 columns, each K rows of 32
// floats, zero past N. Made once per weight.
struct PackedB {
  int64_t K = 0, N = 0;
  std::vector<float> panels;
};
PackedB pack_b(const float* B, int64_t K, int64_t N, int64_t ldb);

// C rows [0, M) of bias + A B; lda, ldc: row strides. bias may be null (0).
// path: the binary kernels' path, which names the vector width to use here
// (the results are the same on every path).
void sgemm(int64_t M, const float* A, int64_t lda, const PackedB& B, float* C, int64_t ldc, const float* bias,
           bconv::Path path);

}  // namespace rt
}  // namespace ctmq
