// The CPU binary conv (csrc/cpu/binary_conv.h), without torch, against a
// naive popcount reference on random bits, bit for bit: every path this CPU
// runs x every register tile of the path's table x shapes with K (words per
// output) around the byte counters' flush interval, odd word counts, output
// channel counts off every tile width, borders, stride, dilation x every
// combination of outputs (NCHW / NHWC float, packed with and without
// threshold, both, residual in either layout, scale / bias absent or present)
// x saturated counters (every bit mismatching) x task splits (pixel blocks
// across images, channel blocks, chunks run out of order). Then pack_nhwc,
// the argument checks and the peak loop. Built and run by
// tests/test_csrc_portable.py, natively and for aarch64 under qemu-user.
// Prints one line per path, then OK; exits 1 after the first mismatches.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "binary_conv.h"

using namespace ctmq::bconv;

namespace {

uint64_t g_state = 0x9E3779B97F4A7C15ull;
uint64_t next_u64() {  // splitmix64
  uint64_t z = (g_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
float next_float(float range) {  // in [-range, range], a multiple of range / 1024 (exact zeros too)
  return static_cast<float>(static_cast<int64_t>(next_u64() % 2049) - 1024) / 1024.f * range;
}

struct Case {
  int64_t N, C, H, W, O, KH, KW, sh, sw, ph, pw, dh, dw;
};

// Which outputs and epilogue steps a run asks for.
struct Outputs {
  bool scale, bias;
  int residual;  // 0 none, 1 NCHW, 2 NHWC
  int out;       // 0 none, 1 NCHW, 2 NHWC
  int packed;    // 0 none, 1 y >= 0, 2 y + threshold >= 0
};
const Outputs kOutputs[] = {
    {false, false, 0, 1, 0}, {false, false, 0, 2, 0}, {true, true, 0, 1, 0}, {true, true, 2, 2, 0},
    {true, false, 1, 1, 0},  {false, false, 0, 0, 1}, {true, true, 0, 0, 2}, {false, true, 1, 0, 1},
    {false, false, 2, 0, 2}, {true, true, 1, 2, 2},   {true, true, 2, 1, 1},
};

// Random bits (or all ones) with the channel padding bits 0, as ctmq packs them.
std::vector<uint32_t> random_bits(int64_t rows, int64_t C, bool ones) {
  const int64_t Cw = (C + 31) / 32;
  std::vector<uint32_t> v(rows * Cw);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < Cw; ++j) {
      const int64_t valid = std::min<int64_t>(32, C - 32 * j);
      const uint32_t mask = valid == 32 ? ~0u : (1u << valid) - 1;
      v[r * Cw + j] = (ones ? ~0u : static_cast<uint32_t>(next_u64())) & mask;
    }
  }
  return v;
}

// One shape's data and its integer conv, computed naively once.
struct Problem {
  Case c;
  int64_t OH, OW, M, Ow;
  std::vector<uint32_t> x, w;
  std::vector<int64_t> val;  // (N, O, OH, OW)
  std::vector<float> scale, bias, threshold, res_nchw, res_nhwc;
  PreparedWeight pw;

  Problem(const Case& cs, bool saturate) : c(cs) {
    OH = output_size(c.H, c.KH, c.sh, c.ph, c.dh);
    OW = output_size(c.W, c.KW, c.sw, c.pw, c.dw);
    M = OH * OW;
    Ow = (c.O + 31) / 32;
    const int64_t T = c.KH * c.KW, Cw = (c.C + 31) / 32;
    x = random_bits(c.N * c.H * c.W, c.C, saturate);
    w = random_bits(c.O * T, c.C, false);
    if (saturate) std::fill(w.begin(), w.end(), 0u);  // x all ones: every bit mismatches
    pw = prepare_weight(w.data(), c.O, c.KH, c.KW, c.C);
    val.assign(c.N * c.O * M, 0);
    for (int64_t n = 0; n < c.N; ++n)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t o = 0; o < c.O; ++o) {
          int64_t popc = 0, valid = 0;
          for (int64_t kh = 0; kh < c.KH; ++kh)
            for (int64_t kw = 0; kw < c.KW; ++kw) {
              const int64_t ih = m / OW * c.sh - c.ph + kh * c.dh, iw = m % OW * c.sw - c.pw + kw * c.dw;
              if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) continue;
              ++valid;
              const uint32_t* xp = &x[((n * c.H + ih) * c.W + iw) * Cw];
              const uint32_t* wp = &w[(o * T + kh * c.KW + kw) * Cw];
              for (int64_t j = 0; j < Cw; ++j) popc += __builtin_popcount(xp[j] ^ wp[j]);
            }
          val[(n * c.O + o) * M + m] = valid * c.C - 2 * popc;
        }
    for (int64_t o = 0; o < c.O; ++o) {
      scale.push_back(next_float(2.f));
      bias.push_back(next_float(8.f));
      threshold.push_back(next_float(8.f));
    }
    res_nchw.resize(c.N * c.O * M);
    res_nhwc.resize(c.N * c.O * M);
    for (int64_t n = 0; n < c.N; ++n)
      for (int64_t o = 0; o < c.O; ++o)
        for (int64_t m = 0; m < M; ++m) {
          const float r = next_float(16.f);
          res_nchw[(n * c.O + o) * M + m] = r;
          res_nhwc[(n * M + m) * c.O + o] = r;
        }
  }

  // The reference epilogue, in binary_conv.h's order.
  float y(const Outputs& e, int64_t n, int64_t o, int64_t m) const {
    float v = static_cast<float>(val[(n * c.O + o) * M + m]);
    if (e.scale) v = v * scale[o];
    if (e.bias) v = v + bias[o];
    if (e.residual) v = v + res_nchw[(n * c.O + o) * M + m];
    return v;
  }
};

constexpr int kGuard = 64;  // sentinel words past every output buffer
const float kSentinel = -12345.f;

// Runs the conv with outputs e; 0 when it matches the reference bit for bit.
int run(const Problem& pb, const Outputs& e, Path path, const Parallel& par, const Tuning* tuning,
        const char* what) {
  const Case& c = pb.c;
  const int64_t elems = c.N * c.O * pb.M, words = c.N * pb.M * pb.Ow;
  std::vector<float> out(elems + kGuard, kSentinel), expect(elems);
  std::vector<uint32_t> packed(words + kGuard, 0xDEADBEEFu), expect_packed(words, 0);
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t m = 0; m < pb.M; ++m)
      for (int64_t o = 0; o < c.O; ++o) {
        const float y = pb.y(e, n, o, m);
        expect[e.out == 2 ? (n * pb.M + m) * c.O + o : (n * c.O + o) * pb.M + m] = y;
        const float z = e.packed == 2 ? y + pb.threshold[o] : y;
        if (z >= 0.f) expect_packed[(n * pb.M + m) * pb.Ow + o / 32] |= 1u << (o % 32);
      }
  ConvParams p;
  p.x = pb.x.data();
  p.N = c.N;
  p.H = c.H;
  p.W = c.W;
  p.sh = c.sh;
  p.sw = c.sw;
  p.ph = c.ph;
  p.pw = c.pw;
  p.dh = c.dh;
  p.dw = c.dw;
  p.scale = e.scale ? pb.scale.data() : nullptr;
  p.bias = e.bias ? pb.bias.data() : nullptr;
  p.residual = e.residual == 1 ? pb.res_nchw.data() : e.residual == 2 ? pb.res_nhwc.data() : nullptr;
  p.residual_layout = e.residual == 2 ? Layout::kNHWC : Layout::kNCHW;
  p.out = e.out ? out.data() : nullptr;
  p.out_layout = e.out == 2 ? Layout::kNHWC : Layout::kNCHW;
  p.packed = e.packed ? packed.data() : nullptr;
  p.threshold = e.packed == 2 ? pb.threshold.data() : nullptr;
  conv2d(p, pb.pw, path, par, tuning);

  bool same = true;
  if (e.out) same &= std::memcmp(out.data(), expect.data(), elems * sizeof(float)) == 0;
  if (e.packed) same &= std::memcmp(packed.data(), expect_packed.data(), words * 4) == 0;
  for (int g = 0; g < kGuard; ++g) same &= out[elems + g] == kSentinel && packed[words + g] == 0xDEADBEEFu;
  if (same) return 0;
  std::printf(
      "MISMATCH path %s %s: N=%lld C=%lld H=%lld W=%lld O=%lld k=%lldx%lld s=%lld,%lld "
      "p=%lld,%lld d=%lld,%lld outputs{scale %d bias %d residual %d out %d packed %d}\n",
      path_name(path), what, (long long)c.N, (long long)c.C, (long long)c.H, (long long)c.W, (long long)c.O,
      (long long)c.KH, (long long)c.KW, (long long)c.sh, (long long)c.sw, (long long)c.ph, (long long)c.pw,
      (long long)c.dh, (long long)c.dw, e.scale, e.bias, e.residual, e.out, e.packed);
  for (int64_t i = 0; e.out && i < elems + kGuard; ++i) {
    const float want = i < elems ? expect[i] : kSentinel;
    if (std::memcmp(&out[i], &want, 4) != 0) {
      std::printf("  out[%lld] = %.9g, expected %.9g\n", (long long)i, out[i], want);
      break;
    }
  }
  for (int64_t i = 0; e.packed && i < words + kGuard; ++i) {
    const uint32_t want = i < words ? expect_packed[i] : 0xDEADBEEFu;
    if (packed[i] != want) {
      std::printf("  packed word %lld: %08x, expected %08x\n", (long long)i, packed[i], want);
      break;
    }
  }
  return 1;
}

// A pool stand-in: `threads` chunks of [0, n), run last first (the tasks must
// not depend on their order).
Parallel reversed_chunks(int64_t threads) {
  Parallel par;
  par.threads = threads;
  par.for_each = [threads](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t per = (n + threads - 1) / threads;
    for (int64_t t0 = (n - 1) / per * per; t0 >= 0; t0 -= per) fn(t0, std::min(n, t0 + per));
  };
  return par;
}

// K = KH * KW * ceil(C / 32) words: 1, 2, 18, 27, 30-33 and 62-64 (the byte
// counters flush every 31 words), 36, 45, 144, 200; C = 1, 33, 65, 100 and
// more; O = 1, 7, 9, 33, 65 and others off the 16-, 24-, 32-, 48- and
// 64-channel tile widths; pixels across images, borders, stride, dilation.
const Case kCases[] = {
    // N  C     H   W   O    KH KW sh sw ph pw dh dw
    {2, 1, 5, 4, 1, 1, 1, 1, 1, 0, 0, 1, 1},        // K = 1, O = 1
    {2, 33, 7, 5, 7, 1, 1, 2, 1, 1, 1, 1, 1},       // K = 2, zero-padded border pixels
    {1, 65, 6, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1},       // K = 27 (3 words a tap)
    {1, 100, 5, 6, 33, 3, 3, 2, 2, 1, 1, 1, 1},     // K = 36, stride 2
    {3, 64, 4, 5, 65, 3, 3, 1, 1, 1, 1, 1, 1},      // K = 18, 20 pixels an image
    {1, 960, 3, 4, 20, 1, 1, 1, 1, 0, 0, 1, 1},     // K = 30
    {1, 992, 2, 5, 20, 1, 1, 1, 1, 0, 0, 1, 1},     // K = 31
    {1, 1000, 3, 4, 24, 1, 1, 1, 1, 0, 0, 1, 1},    // K = 32
    {1, 1025, 3, 3, 17, 1, 1, 1, 1, 0, 0, 1, 1},    // K = 33
    {1, 2000, 2, 3, 16, 1, 1, 1, 1, 0, 0, 1, 1},    // K = 63
    {1, 2048, 2, 2, 48, 1, 1, 1, 1, 0, 0, 1, 1},    // K = 64
    {2, 40, 3, 33, 9, 1, 31, 1, 1, 1, 0, 1, 1},     // K = 62 (31 taps), border rows
    {2, 17, 5, 13, 5, 3, 11, 1, 1, 1, 5, 1, 1},     // K = 33 (33 taps), all borders
    {1, 250, 7, 6, 13, 5, 5, 1, 1, 2, 2, 1, 1},     // K = 200
    {1, 1600, 6, 5, 11, 2, 2, 1, 1, 1, 1, 2, 2},    // K = 200, dilation 2
    {1, 130, 10, 10, 129, 3, 3, 1, 1, 1, 1, 1, 1},  // K = 45, 100 pixels, O = 129
    {2, 64, 9, 9, 64, 3, 3, 2, 1, 0, 2, 1, 2},      // stride 2 x 1, dilation 1 x 2
    {1, 32, 3, 3, 200, 1, 1, 1, 1, 0, 0, 1, 1},     // O = 200
    {1, 64, 12, 12, 40, 3, 3, 2, 2, 1, 1, 1, 1},    // stride 2 with interior tiles (read in place)
    {2, 96, 10, 10, 20, 1, 1, 2, 2, 0, 0, 1, 1},    // 1x1 stride 2, K = 3
    {5, 33, 1, 1, 40, 1, 1, 1, 1, 0, 0, 1, 1},      // 1x1 images (a GEMM)
    {1, 512, 7, 7, 64, 3, 3, 1, 1, 1, 1, 1, 1},     // K = 144, ResNet-18's 7x7 map
};

int check_path(Path path, int* runs) {
  int failures = 0;
  const int tiles = tile_count(path);
  for (const Case& c : kCases) {
    const int64_t K = c.KH * c.KW * ((c.C + 31) / 32);
    for (bool saturate : {false, true}) {
      if (saturate && K < 30) continue;
      const Problem pb(c, saturate);
      // every tile of the table, every combination of outputs, serially
      for (int t = 0; t < tiles; ++t) {
        Tuning tuning;
        tuning.tile = tile_at(path, t);
        for (const Outputs& e : kOutputs) {
          ++*runs;
          failures += run(pb, e, path, Parallel{}, &tuning, saturate ? "tile saturated" : "tile");
        }
      }
      if (saturate) continue;
      // the automatic plan for 2 and 3 threads, and forced task splits
      const Outputs& e = kOutputs[9];   // NHWC float + packed with threshold + NCHW residual
      const Outputs& f = kOutputs[10];  // NCHW float + packed + NHWC residual
      for (int64_t threads : {2, 3}) {
        *runs += 2;
        failures += run(pb, e, path, reversed_chunks(threads), nullptr, "threads");
        failures += run(pb, f, path, reversed_chunks(threads), nullptr, "threads");
      }
      for (int64_t ppt : {1, 5, 7}) {
        for (int64_t ctasks : {0, 2, 3}) {
          Tuning tuning;
          tuning.pixels_per_task = ppt;
          tuning.channel_tasks = ctasks;
          *runs += 2;
          failures += run(pb, e, path, reversed_chunks(2), &tuning, "task split");
          failures += run(pb, f, path, reversed_chunks(2), &tuning, "task split");
        }
      }
      if (failures) return failures;
    }
  }
  return failures;
}

int check_pack(Path path) {
  int failures = 0;
  for (int64_t C : {1, 7, 8, 9, 16, 17, 31, 32, 33, 65, 100, 64}) {
    const int64_t pixels = C == 64 ? 3001 : 13, Cw = (C + 31) / 32;  // 3001: several chunks
    std::vector<float> x(pixels * C), thr(C);
    for (auto& v : x) v = next_float(1.f);
    for (auto& v : thr) v = next_float(1.f);
    x[0] = -0.0f;
    if (C > 1) x[1] = std::nanf("");
    if (C > 2) x[2] = 0.0f;
    for (bool with_thr : {false, true}) {
      std::vector<uint32_t> out(pixels * Cw + kGuard, 0xDEADBEEFu), expect(pixels * Cw, 0);
      for (int64_t p = 0; p < pixels; ++p)
        for (int64_t c = 0; c < C; ++c) {
          const float v = with_thr ? x[p * C + c] + thr[c] : x[p * C + c];
          if (v >= 0.f) expect[p * Cw + c / 32] |= 1u << (c % 32);
        }
      pack_nhwc(x.data(), pixels, C, with_thr ? thr.data() : nullptr, out.data(), path, reversed_chunks(2));
      bool same = std::memcmp(out.data(), expect.data(), expect.size() * 4) == 0;
      for (int g = 0; g < kGuard; ++g) same &= out[pixels * Cw + g] == 0xDEADBEEFu;
      if (!same) {
        std::printf("MISMATCH pack_nhwc path %s C=%lld threshold %d\n", path_name(path), (long long)C,
                    with_thr);
        ++failures;
      }
    }
  }
  return failures;
}

// Each bad argument is refused with std::invalid_argument naming it.
int check_errors() {
  const uint32_t bits[4] = {1, 2, 3, 4};
  const PreparedWeight w = prepare_weight(bits, 1, 1, 1, 40);  // 2 words per pixel
  float out[4];
  int failures = 0;
  auto expect = [&](const char* word, ConvParams p, const PreparedWeight& wt) {
    try {
      conv2d(p, wt, Path::kScalar);
    } catch (const std::invalid_argument& e) {
      if (std::string(e.what()).find(word) != std::string::npos) return;
      std::printf("ERROR MESSAGE without '%s': %s\n", word, e.what());
      ++failures;
      return;
    }
    std::printf("NO ERROR for a bad %s\n", word);
    ++failures;
  };
  ConvParams ok;
  ok.x = bits;
  ok.N = 1;
  ok.H = 1;
  ok.W = 2;
  ok.out = out;
  ConvParams p = ok;
  p.x = nullptr;
  expect("x must not be null", p, w);
  p = ok;
  p.sh = 0;
  expect("stride", p, w);
  p = ok;
  p.pw = -1;
  expect("padding", p, w);
  p = ok;
  p.dw = 0;
  expect("dilation", p, w);
  p = ok;
  p.N = 0;
  expect("N, H and W", p, w);
  p = ok;
  p.out = nullptr;
  expect("nothing to write", p, w);
  p = ok;
  p.dh = 3;
  p.H = 1;
  expect("does not fit", p, prepare_weight(bits, 1, 2, 1, 1));
  expect("not prepared", ok, PreparedWeight{});
  for (const char* bad_shape : {"O", "kernel", "C"}) {
    try {
      const std::string s = bad_shape;
      prepare_weight(bits, s == "O" ? 0 : 1, s == "kernel" ? 9 : 1, s == "kernel" ? 8 : 1, s == "C" ? 0 : 1);
      std::printf("NO ERROR for a bad weight %s\n", bad_shape);
      ++failures;
    } catch (const std::invalid_argument& e) {
      if (std::string(e.what()).find(bad_shape) == std::string::npos) ++failures;
    }
  }
  try {
    path_from_name("avx9000");
    ++failures;
  } catch (const std::invalid_argument&) {
  }
  try {  // a tile outside the path's table
    Tuning tuning;
    tuning.tile = Tile{7, 7};
    conv2d(ok, w, Path::kScalar, Parallel{}, &tuning);
    std::printf("NO ERROR for a tile outside the table\n");
    ++failures;
  } catch (const std::invalid_argument& e) {
    if (std::string(e.what()).find("not in the table") == std::string::npos) ++failures;
  }
  // prepare_weight_into + weight_view is prepare_weight over the caller's buffers
  std::vector<uint32_t> words(prepared_words_size(1, 1, 1, 40));
  std::vector<int32_t> popc(prepared_tap_popc_size(1, 1, 1));
  prepare_weight_into(bits, 1, 1, 1, 40, words.data(), popc.data());
  if (std::memcmp(words.data(), w.words, words.size() * 4) != 0 ||
      std::memcmp(popc.data(), w.tap_popc, popc.size() * 4) != 0 ||
      weight_bytes(weight_view(words.data(), popc.data(), 1, 1, 1, 40)) !=
          static_cast<int64_t>(4 * (words.size() + popc.size()))) {
    std::printf("prepare_weight_into differs from prepare_weight\n");
    ++failures;
  }
  for (Path p : {Path::kScalar, Path::kAvx2, Path::kAvx512, Path::kNeon}) {
    if (path_runs(p)) continue;
    try {
      conv2d(ok, w, p);
      std::printf("NO ERROR for path %s, which does not run here\n", path_name(p));
      ++failures;
    } catch (const std::invalid_argument&) {
    }
  }
  return failures;
}

}  // namespace

int main() {
  int failures = check_errors();
  for (Path path : {Path::kScalar, Path::kAvx2, Path::kAvx512, Path::kNeon}) {
    if (!path_runs(path)) continue;
    int runs = 0;
    failures += check_path(path, &runs);
    failures += check_pack(path);
    if (!(peak_words_per_second(path, 0.001) > 0)) {
      std::printf("peak loop of %s measured nothing\n", path_name(path));
      ++failures;
    }
    std::printf("path %s: %d convs, %d tiles\n", path_name(path), runs, tile_count(path));
    if (failures) break;
  }
  if (failures) return 1;
  std::printf("OK\n");
  return 0;
}
