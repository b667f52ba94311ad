// conv2d, pack_nhwc and the peak loop of binary_conv.h: the checks, the cut
// into tasks (each builds its pixels' patches once for all its output
// channels, binary_patches.cpp), and the tile loop every path shares.
// Torch-free.
#include <chrono>
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

const PathInfo& info_of(Path path) {
  if (!path_runs(path)) {
    bad(std::string("path '") + path_name(path) + "' does not run here (best: '" + path_name(best_path()) +
        "')");
  }
  switch (path) {
#if defined(CTMQ_X86_SIMD)
    case Path::kAvx2:
      return avx2_path();
    case Path::kAvx512:
      return avx512_path();
#endif
#if defined(CTMQ_NEON)
    case Path::kNeon:
      return neon_path();
#endif
    default:
      return scalar_path();
  }
}

// ---------------------------------------------------------------- checks
Conv resolve(const ConvParams& p, const PreparedWeight& w) {
  if (!w.words || !w.tap_popc) bad("weight: not prepared (null words or tap_popc)");
  if (!p.x) bad("x must not be null");
  if (p.N < 1 || p.H < 1 || p.W < 1) {
    bad("x: N, H and W must be >= 1, got " + str(p.N) + ", " + str(p.H) + ", " + str(p.W));
  }
  if (p.sh < 1 || p.sw < 1) bad("stride must be >= 1, got " + str(p.sh) + ", " + str(p.sw));
  if (p.ph < 0 || p.pw < 0) bad("padding must be >= 0, got " + str(p.ph) + ", " + str(p.pw));
  if (p.dh < 1 || p.dw < 1) bad("dilation must be >= 1, got " + str(p.dh) + ", " + str(p.dw));
  if (!p.out && !p.packed) bad("out and packed are both null: nothing to write");
  Conv cv{};
  cv.N = p.N;
  cv.H = p.H;
  cv.W = p.W;
  cv.C = w.C;
  cv.Cw = (w.C + 31) / 32;
  cv.O = w.O;
  cv.G = (w.O + kGroup - 1) / kGroup;
  cv.KH = w.KH;
  cv.KW = w.KW;
  cv.T = w.KH * w.KW;
  cv.K = cv.T * cv.Cw;
  cv.sh = p.sh;
  cv.sw = p.sw;
  cv.ph = p.ph;
  cv.pw = p.pw;
  cv.dh = p.dh;
  cv.dw = p.dw;
  cv.OH = output_size(p.H, w.KH, p.sh, p.ph, p.dh);
  cv.OW = output_size(p.W, w.KW, p.sw, p.pw, p.dw);
  if (cv.OH < 1 || cv.OW < 1) {
    bad("the kernel (" + str(w.KH) + "x" + str(w.KW) + ", dilation " + str(p.dh) + ", " + str(p.dw) +
        ") does not fit the padded input (" + str(p.H) + "x" + str(p.W) + ", padding " + str(p.ph) + ", " +
        str(p.pw) + ")");
  }
  if (w.KH * w.KW > kMaxTaps) bad("weight: kernel of at most 64 taps");
  cv.M = cv.OH * cv.OW;
  cv.Ow = (cv.O + 31) / 32;
  cv.x = p.x;
  cv.xw = cv.Cw;
  cv.w = w.words;
  cv.tap_popc = w.tap_popc;
  cv.residual = p.residual;
  cv.residual_layout = p.residual_layout;
  cv.out = p.out;
  cv.out_layout = p.out_layout;
  cv.packed = p.packed;
  return cv;
}

// scale, bias and threshold as Conv has them: padded to whole groups, the
// identity (1, -0.0) where absent.
struct Padded {
  std::vector<float> scale, bias, threshold;
  static const float* copy(const float* v, float absent, const Conv& cv, std::vector<float>& dst) {
    dst.assign(cv.G * kGroup, absent);
    if (v) std::copy(v, v + cv.O, dst.begin());
    return dst.data();
  }
};

// ---------------------------------------------------------------- tasks
// Tasks: ptasks pixel ranges x ctasks channel ranges. Pixel range t is
// [begin(t), begin(t + 1)) with begin(t) = min(NM, (t * units / ptasks) * unit).
struct Plan {
  Tile tile;
  int64_t NM, unit, units, ptasks, ctasks, cblock;
  int64_t begin(int64_t t) const { return std::min(NM, (t * units / ptasks) * unit); }
};

// The pixels of a task: their K words within L1 beside a weight tile.
constexpr int64_t kBlockBytes = 24 << 10;

Plan plan(const Conv& cv, const PathInfo& info, const Parallel& par, const Tuning* tuning) {
  Plan pl{};
  pl.tile = info.choose(cv.K, cv.O);
  if (tuning && tuning->tile.mr > 0) {
    bool listed = false;
    for (int i = 0; i < info.tile_count; ++i) {
      listed |= info.tiles[i].mr == tuning->tile.mr && info.tiles[i].nv == tuning->tile.nv;
    }
    if (!listed) {
      bad("tuning.tile " + str(tuning->tile.mr) + "x" + str(tuning->tile.nv) + " is not in the table");
    }
    pl.tile = tuning->tile;
  }
  const int64_t mr = pl.tile.mr, threads = std::max<int64_t>(1, par.threads);
  pl.NM = cv.N * cv.M;
  const int64_t tiles = (pl.NM + mr - 1) / mr;
  const int64_t cap = std::max<int64_t>(1, kBlockBytes / (4 * cv.K * cv.xw / cv.Cw) / mr);
  pl.unit = mr;
  pl.units = tiles;
  pl.ptasks = (tiles + cap - 1) / cap;
  pl.ctasks = 1;
  if (threads > 1) {
    // Equal tasks, a multiple of the threads; with fewer tiles than 4 per
    // thread a pixel split leaves a thread idle part of the time, so the
    // threads share the output channels of every pixel block instead.
    const int64_t groups32 = (cv.O + 31) / 32;
    if (tiles < 4 * threads && groups32 >= threads) {
      pl.ctasks = threads;
    } else {
      pl.ptasks = std::min(tiles, (std::max(pl.ptasks, threads) + threads - 1) / threads * threads);
    }
  }
  if (tuning && tuning->pixels_per_task > 0) {
    pl.unit = tuning->pixels_per_task;
    pl.units = pl.ptasks = (pl.NM + pl.unit - 1) / pl.unit;
  }
  if (tuning && tuning->channel_tasks > 0) pl.ctasks = tuning->channel_tasks;
  pl.cblock = ((cv.O + pl.ctasks - 1) / pl.ctasks + 31) / 32 * 32;
  pl.ctasks = (cv.O + pl.cblock - 1) / pl.cblock;
  return pl;
}

// A task's packed bytes that its epilogues do not store whole: all of its
// channels' for paths that OR bits in, else only those past its last vector
// up to the word's end (the padding bits past O are 0).
void zero_packed(const Conv& cv, const PathInfo& info, int64_t pix0, int64_t rows, int64_t c0, int64_t c1) {
  const int64_t stored = info.whole_bytes ? (c1 + info.lanes - 1) / info.lanes * info.lanes : c0;
  const int64_t b0 = stored / 8, b1 = c1 == cv.O ? cv.Ow * 4 : c1 / 8;
  if (b1 <= b0) return;
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* bytes = packed_bytes(cv, pix0 + r);
    for (int64_t i = b0; i < b1; ++i) bytes[i] = 0;
  }
}

void run_task(const Conv& cv, const PathInfo& info, const Plan& pl, int64_t t, Patches& patches) {
  const int64_t pt = t / pl.ctasks, ct = t % pl.ctasks;
  Block b;
  b.pix0 = pl.begin(pt);
  b.rows = pl.begin(pt + 1) - b.pix0;
  b.c0 = ct * pl.cblock;
  b.c1 = std::min(cv.O, b.c0 + pl.cblock);
  if (b.rows <= 0) return;
  build_block(cv, pl.tile.mr, patches, b);
  if (cv.packed) zero_packed(cv, info, b.pix0, b.rows, b.c0, b.c1);
  info.run_block(cv, b, pl.tile);
}

// x split into nibbles for paths that read it so (avx2), in parallel.
const uint32_t* split_input(const Conv& cv, const PathInfo& info, const ParallelFor& for_each,
                            std::vector<uint32_t>& buf) {
  const int64_t words = cv.N * cv.H * cv.W * cv.Cw, chunk = 1 << 14;
  buf.resize(2 * words);
  for_each((words + chunk - 1) / chunk, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t w0 = t * chunk;
      info.split_words(cv.x + w0, std::min(chunk, words - w0), buf.data() + 2 * w0);
    }
  });
  return buf.data();
}

}  // namespace

namespace detail {

void run_tiles(const Conv& cv, const Block& b, Tile tile, const TileOps& ops) {
  alignas(64) int32_t counts[kMaxTileRows * kMaxTileCols];
  alignas(64) float stage[kStageRows * kMaxTileCols];
  const uint32_t* w[kMaxTileCols];
  const bool nchw = cv.out && cv.out_layout == Layout::kNCHW;
  const int64_t width = static_cast<int64_t>(tile.nv) * ops.lanes;
  for (int64_t c = b.c0; c < b.c1; c += width) {
    const int nv = static_cast<int>(std::min<int64_t>(tile.nv, (b.c1 - c + ops.lanes - 1) / ops.lanes));
    const int cols = static_cast<int>(std::min<int64_t>(nv * ops.lanes, cv.O - c));
    if (ops.weights) {
      ops.weights(cv, c, nv, w);
    } else {
      for (int j = 0; j < nv; ++j) {
        const int64_t cj = c + static_cast<int64_t>(j) * ops.lanes;
        w[j] = cv.w + (cj / kGroup) * cv.K * kGroup + cj % kGroup;
      }
    }
    const GemmFn full = ops.gemm_for(tile.mr, nv);
    int staged = 0;  // rows in stage, from pixel b.pix0 + r - staged
    for (int64_t r = 0, t = 0; r < b.rows; r += tile.mr, ++t) {
      const int mr = static_cast<int>(std::min<int64_t>(tile.mr, b.rows - r));
      if (nchw && staged + mr > kStageRows) {
        tile_to_nchw(cv, stage, b.pix0 + r - staged, staged, c, cols, cv.out, ops.transpose);
        staged = 0;
      }
      (mr == tile.mr ? full : ops.gemm_for(mr, nv))(b.src[t], b.S, b.run, w, counts);
      ops.epilogue(cv, counts, mr, nv * ops.lanes, b.pix0 + r, c, b.invalid + r,
                   stage + staged * kMaxTileCols);
      staged += mr;
    }
    if (nchw) tile_to_nchw(cv, stage, b.pix0 + b.rows - staged, staged, c, cols, cv.out, ops.transpose);
  }
}

}  // namespace detail

void conv2d(const ConvParams& p, const PreparedWeight& w, Path path, const Parallel& parallel,
            const Tuning* tuning) {
  const PathInfo& info = info_of(path);
  Conv cv = resolve(p, w);
  Padded padded;
  cv.scale = Padded::copy(p.scale, 1.f, cv, padded.scale);
  cv.bias = Padded::copy(p.bias, -0.f, cv, padded.bias);
  cv.threshold = Padded::copy(p.threshold, -0.f, cv, padded.threshold);
  const ParallelFor& for_each = parallel.for_each ? parallel.for_each : ParallelFor(serial_for);
  std::vector<uint32_t> split;
  if (info.split) {
    cv.x = split_input(cv, info, for_each, split);
    cv.xw = 2 * cv.Cw;
  }
  const Plan pl = plan(cv, info, parallel, tuning);
  for_each(pl.ptasks * pl.ctasks, [&](int64_t t0, int64_t t1) {
    thread_local Patches patches;
    for (int64_t t = t0; t < t1; ++t) run_task(cv, info, pl, t, patches);
  });
}

void pack_nhwc(const float* x, int64_t pixels, int64_t C, const float* threshold, uint32_t* out, Path path,
               const Parallel& parallel) {
  const PathInfo& info = info_of(path);
  if (pixels < 0) bad("pack_nhwc: pixels must be >= 0, got " + str(pixels));
  if (C < 1) bad("pack_nhwc: C must be >= 1, got " + str(C));
  if (pixels == 0) return;
  if (!x || !out) bad("pack_nhwc: x and out must not be null");
  const int64_t threads = std::max<int64_t>(1, parallel.threads);
  const int64_t per = std::max<int64_t>((pixels + threads - 1) / threads, (1 << 14) / C + 1);
  const int64_t chunks = (pixels + per - 1) / per, Cw = (C + 31) / 32;
  const ParallelFor& for_each = parallel.for_each ? parallel.for_each : ParallelFor(serial_for);
  for_each(chunks, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = t * per, n = std::min(pixels, p0 + per) - p0;
      info.pack_nhwc(x + p0 * C, n, C, threshold, out + p0 * Cw);
    }
  });
}

double peak_words_per_second(Path path, double seconds) {
  const PathInfo& info = info_of(path);
  using clock = std::chrono::steady_clock;
  int64_t iterations = 1 << 12;
  double best = 0, spent = 0;
  for (int round = 0; round < 100 && (round < 3 || spent < seconds); ++round) {
    const auto t0 = clock::now();
    const double words = info.peak_loop(iterations);
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    spent += dt;
    best = std::max(best, words / std::max(dt, 1e-9));
    if (dt < seconds / 20) iterations *= 2;  // rounds of about a twentieth of the time
  }
  return best;
}

}  // namespace bconv
}  // namespace ctmq
