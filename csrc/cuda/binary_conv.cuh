// Binary (XNOR-popcount) convolution on NVIDIA binary tensor cores: plain CUDA,
// no torch headers (nvcc compile-checks it anywhere); bound in binary_conv_bind.cpp.
// With CTMQ_CUDA_EMULATION defined, the same source compiles as host C++ against
// tests/cuda_emu/cuda_emulation.h, which runs each CUDA thread as a host thread
// (tests/test_csrc_cuda.py checks the kernel that way on machines without a GPU).
#pragma once
#ifdef CTMQ_CUDA_EMULATION
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#endif
#include <stdint.h>

#include "../conv_shape.h"

namespace ctmq {

struct BinaryConvParams {
  const uint32_t* x;        // (N, H, W, Cw) packed activations
  const uint32_t* w;        // (O, KH, KW, Cw) packed weights
  const int32_t* tap_popc;  // (O, KH * KW): popc of each channel's tap
  const float* scale;       // [O] or null
  const float* bias;        // [O] or null
  const float* residual;    // (N, O, OH, OW) or null: added last
  float* out;               // (N, O, OH, OW) or null
  uint32_t* packed;         // (N, OH, OW, ceil(O/32)) or null: bit = (y >= 0)
  int N, C, H, W, Cw, O, KH, KW, OH, OW;
  int sh, sw, ph, pw, dh, dw;
};

// Grid and copy width the launcher uses for p (host only; shared with the emulator).
struct BinaryConvPlan {
  unsigned grid_x, grid_y;  // pixel tiles, channel tiles
  int vec_words;            // words per cp.async: 4, 2 or 1
};
BinaryConvPlan plan_binary_conv(const BinaryConvParams& p);

// Launches on `stream`; returns the launch's error (cudaSuccess when queued).
cudaError_t launch_binary_conv_bmma(const BinaryConvParams& p, cudaStream_t stream);

}  // namespace ctmq
