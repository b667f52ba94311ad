// The CPU binary convolution as a torch-free library call: the op
// (binary_cpu.cpp, through ATen), the deploy executor and the native runtime
// all call it. Nothing here includes torch. docs/design.md section 5.1 says
// how it works (tiles per code path and shape, tasks, epilogue).
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

// ------------------------------------------------------------------ code paths
// Which exist is decided at compile time by the target architecture:
//   x86-64   kAvx512 ("avx512-vpopcntdq"), kAvx2 ("avx2"): per-function target
//            attributes, usable where the CPU has them; kScalar (baseline ISA);
//   aarch64  kNeon ("neon", part of the AArch64 baseline) and kScalar;
//   others   kScalar. CTMQ_NO_SIMD leaves only kScalar everywhere.
enum class Path { kScalar, kAvx2, kAvx512, kNeon };

const char* path_name(Path path);
// The path of that name; std::invalid_argument for an unknown name.
Path path_from_name(const char* name);
// Built in this binary and supported by this CPU.
bool path_runs(Path path);
// The fastest path that runs here.
Path best_path();

// ------------------------------------------------------------------ threads
// Runs fn(begin, end) over [0, n) split into chunks, possibly in parallel;
// returns when all are done. The caller's thread pool: at::parallel_for in
// the torch extension, the native runtime's own pool elsewhere.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& fn)>;

// Runs serially in the calling thread.
void serial_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

// The pool: work is cut into tasks for `threads` workers (equal tasks, a
// multiple of threads where the shape allows), then handed to for_each.
struct Parallel {
  int64_t threads = 1;
  ParallelFor for_each = serial_for;
};

// ------------------------------------------------------------------ weight
// The weight in the form every path reads, made once per conv: output
// channels in groups of 16, each group's words interleaved per 32-bit word
// column k (k = (kh * KW + kw) * ceil(C/32) + c / 32), so one 512-bit load is
// word k of 16 channels (256-bit: 8, 128-bit: 4):
//   words     (ceil(O/16), KH*KW*ceil(C/32), 16) uint32, channels past O zero
//   tap_popc  (ceil(O/16), KH*KW, 16) int32: popcount of each channel's tap,
//             which the border correction subtracts (see binary_conv.cpp)
// A PreparedWeight is a view; `storage` owns the buffers when prepare_weight
// made them (copies share them), and is empty over the caller's buffers.
struct PreparedWeight {
  int64_t O = 0, KH = 0, KW = 0, C = 0;
  const uint32_t* words = nullptr;
  const int32_t* tap_popc = nullptr;
  std::shared_ptr<const void> storage;
};

// Element counts of the two buffers for a weight of that shape.
int64_t prepared_words_size(int64_t O, int64_t KH, int64_t KW, int64_t C);
int64_t prepared_tap_popc_size(int64_t O, int64_t KH, int64_t KW);

// bits: (O, KH, KW, ceil(C/32)) packed weight words, padding bits past C zero.
PreparedWeight prepare_weight(const uint32_t* bits, int64_t O, int64_t KH, int64_t KW, int64_t C);
// The same into the caller's buffers (sizes above), e.g. tensors.
void prepare_weight_into(const uint32_t* bits, int64_t O, int64_t KH, int64_t KW, int64_t C, uint32_t* words,
                         int32_t* tap_popc);
// A view of buffers that prepare_weight_into filled; they must outlive it.
PreparedWeight weight_view(const uint32_t* words, const int32_t* tap_popc, int64_t O, int64_t KH, int64_t KW,
                           int64_t C);
int64_t weight_bytes(const PreparedWeight& w);  // the two buffers' size

// ------------------------------------------------------------------ conv
struct ConvParams {
  const uint32_t* x = nullptr;  // (N, H, W, ceil(C/32)) packed, C = the weight's
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

// A register tile: mr output pixels x nv vectors of output channels (a
// vector holds 16 channels on avx512, 8 on avx2, 4 on neon, 1 on scalar).
struct Tile {
  int mr = 0, nv = 0;
};

// The tiles of a path's table (docs/design.md 5.1), and the one the conv
// picks for a reduction of K 32-bit words per output and O output channels.
int tile_count(Path path);
Tile tile_at(Path path, int index);
Tile choose_tile(Path path, int64_t K, int64_t O);
int channels_per_vector(Path path);

// Overrides of the automatic choices, for tests and tuning; 0 = automatic.
struct Tuning {
  Tile tile;                    // must be a tile of the path's table
  int64_t pixels_per_task = 0;  // output pixels per task (a multiple of tile.mr is best)
  int64_t channel_tasks = 0;    // output-channel blocks per pixel block
};

// The convolution; throws std::invalid_argument naming the bad argument.
// At least one of out and packed must be set.
void conv2d(const ConvParams& p, const PreparedWeight& w, Path path, const Parallel& parallel = Parallel{},
            const Tuning* tuning = nullptr);

// ------------------------------------------------------------------ packing
// x: (pixels, C) float32, channels innermost (NHWC) -> out (pixels, ceil(C/32))
// words: bit c = (x[c] + threshold[c]) >= 0 (x[c] >= 0 without threshold;
// -0.0 gives 1, NaN 0), padding bits past C zero.
void pack_nhwc(const float* x, int64_t pixels, int64_t C, const float* threshold, uint32_t* out, Path path,
               const Parallel& parallel = Parallel{});

// ------------------------------------------------------------------ peak
// The path's inner loop (xor, popcount, accumulate) on registers alone, no
// memory: the most 64-bit words per second this core can reach on the path.
// Runs about `seconds` in the calling thread, returns the best of its rounds.
double peak_words_per_second(Path path, double seconds = 0.2);

}  // namespace bconv
}  // namespace ctmq
