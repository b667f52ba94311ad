// The CPU binary conv's code paths (csrc/cpu/binary_simd.cpp), without torch,
// against a naive popcount reference on random bits: every path this CPU runs,
// every epilogue, bit for bit. Built and run by tests/test_csrc_portable.py,
// natively and for aarch64 under qemu-user. Prints one line per path, then OK;
// exits 1 at the first mismatch.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "binary_gemm.h"

using namespace ctmq::binary_detail;

namespace {

uint64_t g_state = 0x9E3779B97F4A7C15ull;
uint64_t next_u64() {  // splitmix64
  uint64_t z = (g_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
float next_float(float range) {  // in [-range, range], a multiple of range / 1024
  return static_cast<float>(static_cast<int64_t>(next_u64() % 2049) - 1024) / 1024.f * range;
}

struct Case {
  int64_t N, C, H, W, O, KH, KW, sh, sw, ph, pw, dh, dw;
};

// Random bits (or all ones) with the channel padding bits 0, as ctmq.binary
// packs them.
std::vector<uint32_t> random_bits(int64_t rows, int64_t C, bool ones = false) {
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

// saturate: x all ones, w all zeros, so every bit of every word mismatches
// (the most a SIMD path's byte counters ever hold).
int check(const Case& c, int epilogue, bool saturate, Path path) {
  ConvArgs a{};
  a.N = c.N; a.C = c.C; a.H = c.H; a.W = c.W; a.Cw = (c.C + 31) / 32; a.Cw64 = (a.Cw + 1) / 2;
  a.O = c.O; a.KH = c.KH; a.KW = c.KW; a.K = c.KH * c.KW * a.Cw64;
  a.sh = c.sh; a.sw = c.sw; a.ph = c.ph; a.pw = c.pw; a.dh = c.dh; a.dw = c.dw;
  a.OH = ctmq::conv_output_size(a.H, a.KH, a.sh, a.ph, a.dh);
  a.OW = ctmq::conv_output_size(a.W, a.KW, a.sw, a.pw, a.dw);
  a.Ow = (a.O + 31) / 32;
  const int64_t T = a.KH * a.KW, M = a.OH * a.OW, G = (a.O + 7) / 8;

  const std::vector<uint32_t> x = random_bits(a.N * a.H * a.W, a.C, saturate);
  std::vector<uint32_t> w = random_bits(a.O * T, a.C);  // (O, KH, KW, Cw)
  if (saturate) std::fill(w.begin(), w.end(), 0u);
  // the GEMM layout of ctmq.binary.pack_weight (binary_cpu.cpp, weight_gemm_cpu)
  std::vector<uint64_t> w8(G * a.K * 8, 0);
  std::vector<int64_t> popw8(G * T * 8, 0);
  for (int64_t o = 0; o < a.O; ++o) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < a.Cw; ++j) {
        const uint32_t word = w[(o * T + t) * a.Cw + j];
        w8[((o / 8) * a.K + t * a.Cw64 + j / 2) * 8 + o % 8] |= static_cast<uint64_t>(word)
                                                                << (32 * (j % 2));
        popw8[((o / 8) * T + t) * 8 + o % 8] += __builtin_popcount(word);
      }
    }
  }
  std::vector<float> scale(a.O), bias(a.O), residual(a.N * a.O * M);
  for (auto& v : scale) v = next_float(2.f);
  for (auto& v : bias) v = next_float(8.f);
  for (auto& v : residual) v = next_float(16.f);
  const bool affine = epilogue == 1 || epilogue == 4, with_res = epilogue == 2 || epilogue == 4;
  const bool packed = epilogue >= 3;
  a.x = x.data(); a.w8 = w8.data(); a.popw8 = popw8.data();
  a.scale = affine ? scale.data() : nullptr;
  a.bias = affine ? bias.data() : nullptr;
  a.residual = with_res ? residual.data() : nullptr;

  // Reference: out = C * valid_taps - 2 * popc(x XOR w) over the valid taps,
  // then the epilogue in the kernels' fp32 op order.
  std::vector<float> ref(a.N * a.O * M);
  std::vector<uint32_t> ref_packed(a.N * M * a.Ow, 0);
  for (int64_t n = 0; n < a.N; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const int64_t oh = m / a.OW, ow = m % a.OW;
      for (int64_t o = 0; o < a.O; ++o) {
        int64_t popc = 0, valid = 0;
        for (int64_t kh = 0; kh < a.KH; ++kh) {
          for (int64_t kw = 0; kw < a.KW; ++kw) {
            const int64_t ih = oh * a.sh - a.ph + kh * a.dh, iw = ow * a.sw - a.pw + kw * a.dw;
            if (ih < 0 || ih >= a.H || iw < 0 || iw >= a.W) continue;
            ++valid;
            const uint32_t* xp = &x[((n * a.H + ih) * a.W + iw) * a.Cw];
            const uint32_t* wp = &w[(o * T + kh * a.KW + kw) * a.Cw];
            for (int64_t j = 0; j < a.Cw; ++j) popc += __builtin_popcount(xp[j] ^ wp[j]);
          }
        }
        float y = static_cast<float>(valid * a.C - 2 * popc);
        if (affine) y = y * scale[o];
        if (affine) y = y + bias[o];
        if (with_res) y = y + residual[(n * a.O + o) * M + m];
        ref[(n * a.O + o) * M + m] = y;
        if (y >= 0.f) ref_packed[(n * M + m) * a.Ow + o / 32] |= 1u << (o % 32);
      }
    }
  }

  // The driver loop of binary_conv2d_cpu, one task after another.
  std::vector<float> out(a.N * a.O * M, -12345.f);
  std::vector<uint32_t> out_packed(a.N * M * a.Ow, 0xDEADBEEFu);  // each task clears its words
  if (packed) a.packed = out_packed.data();
  else a.out = out.data();
  std::vector<uint64_t> P(kBlockM * a.K);
  const int64_t mblocks = (M + kBlockM - 1) / kBlockM, oblocks = (a.O + kBlockO - 1) / kBlockO;
  for (int64_t t = 0; t < a.N * mblocks * oblocks; ++t) {
    const int64_t ob = t % oblocks, mb = (t / oblocks) % mblocks, n = t / (oblocks * mblocks);
    const int64_t m0 = mb * kBlockM, rows = std::min(kBlockM, M - m0);
    const int64_t oc0 = ob * kBlockO, oc1 = std::min(a.O, oc0 + kBlockO);
    conv_block_on(path, a, n, m0, rows, oc0, oc1, P.data());
  }

  const bool same = packed ? out_packed == ref_packed
                           : std::memcmp(out.data(), ref.data(), out.size() * sizeof(float)) == 0;
  if (same) return 0;
  std::printf("MISMATCH path %s epilogue %d%s: N=%lld C=%lld H=%lld W=%lld O=%lld k=%lldx%lld K=%lld\n",
              path_name(path), epilogue, saturate ? " saturated" : "", (long long)c.N, (long long)c.C, (long long)c.H,
              (long long)c.W, (long long)c.O, (long long)c.KH, (long long)c.KW, (long long)a.K);
  for (size_t i = 0; i < (packed ? out_packed.size() : out.size()); ++i) {
    if (packed && out_packed[i] != ref_packed[i]) {
      std::printf("  packed word %zu: %08x, expected %08x\n", i, out_packed[i], ref_packed[i]);
      break;
    }
    if (!packed && std::memcmp(&out[i], &ref[i], sizeof(float)) != 0) {
      std::printf("  out[%zu] = %.9g, expected %.9g\n", i, out[i], ref[i]);
      break;
    }
  }
  return 1;
}

}  // namespace

int main() {
  // K = KH * KW * ceil(C / 64) words: 1, 31, 33 and 100 (a SIMD path flushes
  // its byte counts every 31 words), odd word counts, output channels past the
  // 4- and 8-channel vectors and the 64-channel task, pixel rows not a
  // multiple of the tile, more pixels than a task, borders, stride, dilation.
  const Case cases[] = {
      // N  C     H   W   O    KH KW sh sw ph pw dh dw
      {2, 1, 5, 4, 1, 1, 1, 1, 1, 0, 0, 1, 1},          // K = 1
      {2, 33, 7, 5, 13, 1, 1, 2, 1, 1, 1, 1, 1},        // K = 1, zero-padded border
      {1, 64, 9, 9, 70, 1, 1, 1, 1, 0, 0, 1, 1},        // K = 1, 81 pixels, two channel tasks
      {1, 1970, 3, 5, 9, 1, 1, 1, 1, 0, 0, 1, 1},       // K = 31 (62 32-bit words)
      {2, 40, 3, 33, 7, 1, 31, 1, 1, 1, 0, 1, 1},       // K = 31 (31 taps), border rows
      {1, 2100, 3, 3, 37, 1, 1, 1, 2, 1, 0, 1, 1},      // K = 33 (66 words), border
      {2, 17, 5, 13, 5, 3, 11, 1, 1, 1, 5, 1, 1},       // K = 33 (33 taps), all borders
      {1, 250, 7, 6, 13, 5, 5, 1, 1, 2, 2, 1, 1},       // K = 100 (5x5 x 4 words)
      {1, 1600, 6, 5, 11, 2, 2, 1, 1, 1, 1, 2, 2},      // K = 100 (2x2 x 25 words), dilation 2
      {3, 65, 11, 9, 129, 3, 3, 2, 2, 1, 1, 1, 1},      // K = 18, 3 channel tasks, odd tails
      {1, 130, 10, 10, 65, 3, 3, 1, 1, 1, 1, 1, 1},     // K = 27, 100 pixels, 65 channels
  };
  const char* names[] = {"plain", "scale_bias", "residual", "packed", "packed_scale_bias_residual"};
  int failures = 0;
  for (int p = kScalar; p <= cpu_best_path(); ++p) {
    const Path path = static_cast<Path>(p);
    int runs = 0;
    for (const Case& c : cases) {
      for (int e = 0; e < 5; ++e) {
        for (bool saturate : {false, true}) {
          ++runs;
          if (check(c, e, saturate, path)) {
            std::printf("  (%s)\n", names[e]);
            ++failures;
          }
        }
      }
    }
    std::printf("path %s: %d convs\n", path_name(path), runs);
  }
  if (failures) return 1;
  std::printf("OK\n");
  return 0;
}
