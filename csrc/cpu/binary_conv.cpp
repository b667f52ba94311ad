// The CPU binary conv's driver (binary_conv.h): checks a call, picks the
// path's register tile for the shape, cuts the output into tasks for the
// caller's threads, and per task builds the patches once (im2col) and hands
// them to the path (binary_kernels.h). Torch-free.
#include <stdexcept>
#include <string>
#include <vector>

#include "binary_kernels.h"

namespace ctmq {
namespace bconv {
using namespace detail;

namespace {

[[noreturn]] void bad(const std::string& what) {
  throw std::invalid_argument("ctmq binary conv: " + what);
}

std::string str(int64_t v) {
  return std::to_string(v);
}

const PathInfo* built_path(Path path) {
  switch (path) {
    case Path::kScalar:
      return &scalar_path();
#if defined(CTMQ_X86_SIMD)
    case Path::kAvx2:
      return &avx2_path();
    case Path::kAvx512:
      return &avx512_path();
#endif
#if defined(CTMQ_NEON)
    case Path::kNeon:
      return &neon_path();
#endif
    default:
      return nullptr;
  }
}

bool cpu_has(Path path) {
#if defined(CTMQ_X86_SIMD)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vpopcntdq");
  if (path == Path::kAvx2) return avx2;
  if (path == Path::kAvx512) return avx512;
#endif
  return path == Path::kScalar || path == Path::kNeon;  // NEON: mandatory on AArch64
}

const PathInfo& runnable(Path path, const char* what) {
  if (!path_runs(path)) {
    bad(std::string("path '") + path_name(path) + "' does not run here (" + what + "; best: '" +
        path_name(best_path()) + "')");
  }
  return *built_path(path);
}

}  // namespace

// ---------------------------------------------------------------- paths
const char* path_name(Path path) {
  switch (path) {
    case Path::kScalar:
      return "scalar";
    case Path::kAvx2:
      return "avx2";
    case Path::kAvx512:
      return "avx512-vpopcntdq";
    case Path::kNeon:
      return "neon";
  }
  return "?";
}

Path path_from_name(const char* name) {
  const std::string s = name ? name : "";
  for (Path p : {Path::kScalar, Path::kAvx2, Path::kAvx512, Path::kNeon}) {
    if (s == path_name(p)) return p;
  }
  bad("path must be 'avx512-vpopcntdq', 'avx2', 'neon' or 'scalar', got '" + s + "'");
}

bool path_runs(Path path) {
  return built_path(path) != nullptr && cpu_has(path);
}

Path best_path() {
  for (Path p : {Path::kAvx512, Path::kAvx2, Path::kNeon}) {
    if (path_runs(p)) return p;
  }
  return Path::kScalar;
}

void serial_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n > 0) fn(0, n);
}

int64_t output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// ---------------------------------------------------------------- weight
int64_t prepared_words_size(int64_t O, int64_t KH, int64_t KW, int64_t C) {
  return (O + kGroup - 1) / kGroup * KH * KW * ((C + 31) / 32) * kGroup;
}

int64_t prepared_tap_popc_size(int64_t O, int64_t KH, int64_t KW) {
  return (O + kGroup - 1) / kGroup * KH * KW * kGroup;
}

namespace {
void check_weight_shape(int64_t O, int64_t KH, int64_t KW, int64_t C) {
  if (O < 1) bad("weight: O must be >= 1, got " + str(O));
  if (KH < 1 || KW < 1) bad("weight: kernel must be at least 1x1, got " + str(KH) + "x" + str(KW));
  if (KH * KW > kMaxTaps) {
    bad("weight: kernel of at most 64 taps, got " + str(KH) + "x" + str(KW));
  }
  if (C < 1) bad("weight: C must be >= 1, got " + str(C));
  if (C * KH * KW >= (int64_t{1} << 24)) {
    bad("weight: C * KH * KW must stay below 2^24 (exact in float32), got " + str(C * KH * KW));
  }
}
}  // namespace

void prepare_weight_into(const uint32_t* bits, int64_t O, int64_t KH, int64_t KW, int64_t C, uint32_t* words,
                         int32_t* tap_popc) {
  check_weight_shape(O, KH, KW, C);
  if (!bits || !words || !tap_popc) bad("prepare_weight: bits, words and tap_popc must not be null");
  const int64_t T = KH * KW, Cw = (C + 31) / 32, K = T * Cw;
  std::memset(words, 0, sizeof(uint32_t) * prepared_words_size(O, KH, KW, C));
  std::memset(tap_popc, 0, sizeof(int32_t) * prepared_tap_popc_size(O, KH, KW));
  for (int64_t o = 0; o < O; ++o) {
    uint32_t* col = words + (o / kGroup) * K * kGroup + o % kGroup;
    int32_t* pc = tap_popc + (o / kGroup) * T * kGroup + o % kGroup;
    for (int64_t t = 0; t < T; ++t) {
      int32_t count = 0;
      for (int64_t j = 0; j < Cw; ++j) {
        const uint32_t word = bits[(o * T + t) * Cw + j];
        col[(t * Cw + j) * kGroup] = word;
        count += popc32(word);
      }
      pc[t * kGroup] = count;
    }
  }
}

PreparedWeight weight_view(const uint32_t* words, const int32_t* tap_popc, int64_t O, int64_t KH, int64_t KW,
                           int64_t C) {
  check_weight_shape(O, KH, KW, C);
  if (!words || !tap_popc) bad("weight_view: words and tap_popc must not be null");
  PreparedWeight w;
  w.O = O;
  w.KH = KH;
  w.KW = KW;
  w.C = C;
  w.words = words;
  w.tap_popc = tap_popc;
  return w;
}

PreparedWeight prepare_weight(const uint32_t* bits, int64_t O, int64_t KH, int64_t KW, int64_t C) {
  check_weight_shape(O, KH, KW, C);
  struct Buffers {
    std::vector<uint32_t> words;
    std::vector<int32_t> popc;
  };
  auto buf = std::make_shared<Buffers>();
  buf->words.resize(prepared_words_size(O, KH, KW, C));
  buf->popc.resize(prepared_tap_popc_size(O, KH, KW));
  prepare_weight_into(bits, O, KH, KW, C, buf->words.data(), buf->popc.data());
  PreparedWeight w = weight_view(buf->words.data(), buf->popc.data(), O, KH, KW, C);
  w.storage = buf;
  return w;
}

int64_t weight_bytes(const PreparedWeight& w) {
  return static_cast<int64_t>(sizeof(uint32_t)) * prepared_words_size(w.O, w.KH, w.KW, w.C) +
         static_cast<int64_t>(sizeof(int32_t)) * prepared_tap_popc_size(w.O, w.KH, w.KW);
}

// ---------------------------------------------------------------- tiles
int tile_count(Path path) {
  return runnable(path, "tile_count").tile_count;
}

Tile tile_at(Path path, int index) {
  const PathInfo& info = runnable(path, "tile_at");
  if (index < 0 || index >= info.tile_count) {
    bad("tile index must be in [0, " + str(info.tile_count) + "), got " + str(index));
  }
  return info.tiles[index];
}

int channels_per_vector(Path path) {
  return runnable(path, "channels_per_vector").lanes;
}

Tile choose_tile(Path path, int64_t K, int64_t O) {
  const PathInfo& info = runnable(path, "choose_tile");
  return info.choose(K, O);
}

}  // namespace bconv
}  // namespace ctmq
