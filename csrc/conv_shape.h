// The output size of a convolution along one dimension: torch.nn.Conv2d's
// formula, and the C++ side of ctmq/ops/shapes.py's conv_output_size (the
// Python op checks every argument before a kernel runs).
#pragma once

#include <cstdint>

namespace ctmq {

inline int64_t conv_output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding,
                                int64_t dilation) {
  return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

}  // namespace ctmq
