// Binary (XNOR-popcount) convolution on NVIDIA binary tensor cores: plain CUDA,
// no torch headers (nvcc compile-checks it anywhere); bound in binary_conv_bind.cpp.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace ctmq {

struct BinaryConvParams {
  const uint32_t* x;          // (N, H, W, Cw) packed activations
  const uint32_t* w;          // (O, KH, KW, Cw) packed weights
  const int32_t* tap_popc;    // (O, KH * KW): popc of each channel's tap
  const float* scale;         // [O] or null
  const float* bias;          // [O] or null
  const float* residual;      // (N, O, OH, OW) or null: added last
  float* out;                 // (N, O, OH, OW) or null
  uint32_t* packed;           // (N, OH, OW, ceil(O/32)) or null; zeroed by the launcher
  int N, C, H, W, Cw, O, KH, KW, OH, OW;
  int sh, sw, ph, pw, dh, dw;
};

// Launches on `stream`; returns the launch's error (cudaSuccess when queued).
cudaError_t launch_binary_conv_bmma(const BinaryConvParams& p, cudaStream_t stream);

}  // namespace ctmq
