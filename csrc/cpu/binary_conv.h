// The CPU binary convolution as a torch-free library call: the op
// (binary_cpu.cpp, through ATen), the deploy executor and the native runtime
// all call it. Nothing here includes torch.
//
// Packed format: NHWC, channels in 32-bit words (bit j of word w = channel
// 32w + j), bit 1 = +1 (x >= 0), padding bits past C are 0.
//
// Per output (n, oh, ow, o), with val = C * valid_taps - 2 * popc(x XOR w)
// over the taps inside the image (an exact integer, |val| < 2^24):
//   y = float(val) * scale[o]      (if scale)
//   y = y + bias[o]                (if bias)
//   y = y + residual[n, o, oh, ow] (if residual; in residual_layout)
// each step one float32 rounding (no FMA). Outputs, any combination:
//   out     float32 y in out_layout
//   packed  (N, OH, OW, ceil(O/32)) words: bit o = (y + threshold[o]) >= 0
//           (y >= 0 without threshold; NaN gives 0); bits past O are 0.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>

namespace ctmq {
namespace bconv {

enum class Layout { kNCHW, kNHWC };

// Runs fn(begin, end) over [0, n) split into chunks, possibly in parallel;
// returns when all are done. The caller's thread pool: at::parallel_for in
// the torch extension, the native runtime's own pool elsewhere.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& fn)>;

// Runs serially in the calling thread.
void serial_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

// The weight in the form the kernels read, made once per conv.
struct PreparedWeight;
struct WeightDeleter {
  void operator()(PreparedWeight* w) const;
};
using WeightPtr = std::unique_ptr<PreparedWeight, WeightDeleter>;

// bits: (O, KH, KW, ceil(C/32)) packed weight words, padding bits past C zero.
WeightPtr prepare_weight(const uint32_t* bits, int64_t O, int64_t KH, int64_t KW, int64_t C);
int64_t weight_out_channels(const PreparedWeight& w);
int64_t weight_bytes(const PreparedWeight& w);  // memory held

struct ConvParams {
  const uint32_t* x = nullptr;  // (N, H, W, ceil(C/32)) packed
  int64_t N = 0, H = 0, W = 0;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  const float* scale = nullptr;  // [O] or null
  const float* bias = nullptr;   // [O] or null
  const float* residual = nullptr;
  Layout residual_layout = Layout::kNCHW;
  float* out = nullptr;
  Layout out_layout = Layout::kNCHW;
  uint32_t* packed = nullptr;
  const float* threshold = nullptr;  // [O] or null: packed bit = (y + threshold) >= 0
};

// Output size along one dimension (torch.nn.Conv2d's formula).
int64_t output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation);

// The code paths this build has, best first; "auto" picks the best the CPU runs.
// path: "avx512-vpopcntdq", "avx2", "neon", "scalar" (must be <= the best the CPU runs).
const char* best_path();

// The convolution; throws std::invalid_argument naming the bad argument.
void conv2d(const ConvParams& p, const PreparedWeight& w, const char* path,
            const ParallelFor& parallel = serial_for);

}  // namespace bconv
}  // namespace ctmq
