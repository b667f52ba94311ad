// Times the CPU binary conv (csrc/cpu/binary_conv.h) without torch, one
// thread, on ResNet-18's binary conv shapes (224x224 input), for every
// register tile of each path's table: the measurements behind the tile tables
// of docs/design.md 5.1. Words = N * OH * OW * O * KH * KW * ceil(C/64)
// 64-bit words; cycles = seconds x the TSC frequency (calibrated here against
// the steady clock), the clock every figure of the table uses.
//
//   g++ -O3 -std=c++17 -ffp-contract=off -Icsrc/cpu benchmarks/binary_tiles.cpp \
//       csrc/cpu/binary_conv.cpp csrc/cpu/binary_conv2d.cpp csrc/cpu/binary_scalar.cpp \
//       csrc/cpu/binary_avx2.cpp csrc/cpu/binary_avx512.cpp csrc/cpu/binary_neon.cpp
//       csrc/cpu/binary_patches.cpp -o tiles
//   taskset -c 1 ./tiles [path] [batch] [packed|float|nhwc]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <x86intrin.h>
#endif

#include "binary_conv.h"

using namespace ctmq::bconv;
using Clock = std::chrono::steady_clock;

namespace {

struct Shape {
  const char* name;
  int64_t C, O, size, stride, k;
};
const Shape kShapes[] = {
    {"64x64@56", 64, 64, 56, 1, 3},
    {"64x128@56/s2", 64, 128, 56, 2, 3},
    {"128x128@28", 128, 128, 28, 1, 3},
    {"128x256@28/s2", 128, 256, 28, 2, 3},
    {"256x256@14", 256, 256, 14, 1, 3},
    {"256x512@14/s2", 256, 512, 14, 2, 3},
    {"512x512@7", 512, 512, 7, 1, 3},
    {"1x1 64x128@56/s2", 64, 128, 56, 2, 1},
    {"1x1 128x256@28/s2", 128, 256, 28, 2, 1},
    {"1x1 256x512@14/s2", 256, 512, 14, 2, 1},
    // few output channels (not ResNet-18's): where narrow tiles pay
    {"32x32@32", 32, 32, 32, 1, 3},
    {"32x16@32", 32, 16, 32, 1, 3},
    {"64x8@28", 64, 8, 28, 1, 3},
};

double tsc_hz() {
#if defined(__x86_64__)
  const auto t0 = Clock::now();
  const uint64_t c0 = __rdtsc();
  while (Clock::now() - t0 < std::chrono::milliseconds(200)) {
  }
  const uint64_t c1 = __rdtsc();
  return (c1 - c0) / std::chrono::duration<double>(Clock::now() - t0).count();
#else
  return 1e9;  // no TSC: "cycles" are nanoseconds
#endif
}

struct Data {
  std::vector<uint32_t> x, w;
  std::vector<float> scale, bias, out;
  std::vector<uint32_t> packed;
  PreparedWeight pw;
  ConvParams p;
};

Data make(const Shape& s, int64_t batch, const std::string& mode) {
  Data d;
  const int64_t Cw = (s.C + 31) / 32, pad = s.k / 2;
  d.x.resize(batch * s.size * s.size * Cw);
  d.w.resize(s.O * s.k * s.k * Cw);
  uint64_t state = 12345;
  for (auto& v : d.x)
    v = static_cast<uint32_t>(state = state * 6364136223846793005ull + 1442695040888963407ull) >> 0;
  for (auto& v : d.w) v = static_cast<uint32_t>((state = state * 6364136223846793005ull + 1) >> 32);
  d.pw = prepare_weight(d.w.data(), s.O, s.k, s.k, s.C);
  d.scale.assign(s.O, 0.5f);
  d.bias.assign(s.O, 0.25f);
  const int64_t OH = output_size(s.size, s.k, s.stride, pad, 1);
  d.out.resize(batch * s.O * OH * OH);
  d.packed.resize(batch * OH * OH * ((s.O + 31) / 32));
  d.p.x = d.x.data();
  d.p.N = batch;
  d.p.H = d.p.W = s.size;
  d.p.sh = d.p.sw = s.stride;
  d.p.ph = d.p.pw = pad;
  d.p.scale = d.scale.data();
  d.p.bias = d.bias.data();
  if (mode == "packed") {
    d.p.packed = d.packed.data();
  } else {
    d.p.out = d.out.data();
    d.p.out_layout = mode == "nhwc" ? Layout::kNHWC : Layout::kNCHW;
  }
  return d;
}

// The fastest of `reps` calls.
double best_seconds(const Data& d, Path path, const Tuning* tuning, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    conv2d(d.p, d.pw, path, Parallel{}, tuning);
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  const int64_t batch = argc > 2 ? std::atoll(argv[2]) : 1;
  const std::string mode = argc > 3 ? argv[3] : "packed";
  const double hz = tsc_hz();
  std::printf("TSC %.4f GHz; batch %lld; %s output; words/cycle = 64-bit words / TSC cycles\n", hz / 1e9,
              static_cast<long long>(batch), mode.c_str());
  for (Path path : {Path::kAvx512, Path::kAvx2, Path::kNeon, Path::kScalar}) {
    if (!path_runs(path) || (!only.empty() && only != path_name(path))) continue;
    const double peak = peak_words_per_second(path, 0.3) / hz;
    std::printf("\npath %s: peak %.2f words/cycle\n%-20s %5s %5s", path_name(path), peak, "shape", "K",
                "auto");
    for (int t = 0; t < tile_count(path); ++t) {
      const Tile tile = tile_at(path, t);
      std::printf("   %2dx%d", tile.mr, tile.nv);
    }
    std::printf("   (words/cycle per tile)\n");
    for (const Shape& s : kShapes) {
      const Data d = make(s, batch, mode);
      const int64_t OH = output_size(s.size, s.k, s.stride, s.k / 2, 1);
      const double words = static_cast<double>(batch) * OH * OH * s.O * s.k * s.k * ((s.C + 63) / 64);
      const int64_t K = s.k * s.k * ((s.C + 31) / 32);
      const Tile chosen = choose_tile(path, K, s.O);
      std::printf("%-20s %5lld %2dx%d", s.name, static_cast<long long>(K), chosen.mr, chosen.nv);
      // rounds over all tiles in turn, the fastest of each: the machine's
      // drift within seconds moves every tile alike
      const int tiles = tile_count(path);
      std::vector<double> best(tiles + 1, 1e30);
      const int reps = std::max(10, static_cast<int>(2e7 / std::max(words, 1.0)));
      for (int round = 0; round < 8; ++round) {
        for (int t = 0; t <= tiles; ++t) {
          Tuning tuning;
          if (t < tiles) tuning.tile = tile_at(path, t);
          best[t] = std::min(best[t], best_seconds(d, path, t < tiles ? &tuning : nullptr, reps));
        }
      }
      for (int t = 0; t < tiles; ++t) std::printf(" %7.2f", words / (best[t] * hz));
      std::printf("   auto %.3f ms %.2f w/c (%.0f%% of peak)\n", best[tiles] * 1e3,
                  words / (best[tiles] * hz), 100 * words / (best[tiles] * hz) / peak);
    }
  }
  return 0;
}
