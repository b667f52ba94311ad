// The pixels a task's GEMM reads (binary_kernels.h, Source and Block), built
// once per task for all its output channels: an indirect im2col that copies
// only what touches the border. A few cycles per pixel matter here: a
// 64-channel 3x3 conv spends some 36 cycles per pixel in its GEMM, so a tile
// of adjacent interior pixels costs one Source and no per-pixel work.
// Torch-free.
#include "binary_kernels.h"

namespace ctmq {
namespace bconv {
namespace detail {
namespace {

inline void copy_words(uint32_t* __restrict dst, const uint32_t* __restrict src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
}

// Output pixels in order, without a division per pixel.
struct Cursor {
  int64_t n, oh, ow;
  void advance(const Conv& cv, int64_t by) {
    for (ow += by; ow >= cv.OW; ow -= cv.OW) {
      if (++oh == cv.OH) oh = 0, ++n;
    }
  }
};

// Segment s of the cursor's pixel: a pointer into x where every tap of it is
// inside the image, zeros where none is, else a copy at dst with zero words
// for the taps outside; the taps outside get their bits in `outside`.
const uint32_t* segment(const Conv& cv, const Cursor& px, int64_t s, uint32_t* dst, const uint32_t* zeros,
                        uint64_t& outside) {
  const int64_t kh = cv.dw == 1 ? s : s / cv.KW, kw0 = cv.dw == 1 ? 0 : s % cv.KW;
  const int64_t taps = cv.dw == 1 ? cv.KW : 1, xw = cv.xw;
  const int64_t ih = px.oh * cv.sh - cv.ph + kh * cv.dh, iw0 = px.ow * cv.sw - cv.pw + kw0 * cv.dw;
  const uint64_t first_tap = uint64_t{1} << (kh * cv.KW + kw0);
  if (ih < 0 || ih >= cv.H) {
    outside |= (first_tap << taps) - first_tap;  // the segment's taps are adjacent bits
    return zeros;
  }
  const uint32_t* row = cv.x + (px.n * cv.H + ih) * cv.W * xw;
  if (iw0 >= 0 && iw0 + (taps - 1) * cv.dw < cv.W) return row + iw0 * xw;
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t iw = iw0 + t * cv.dw;
    if (iw < 0 || iw >= cv.W) {
      std::memset(dst + t * xw, 0, sizeof(uint32_t) * xw);
      outside |= first_tap << t;
    } else {
      copy_words(dst + t * xw, row + iw * xw, xw);
    }
  }
  return dst;
}

}  // namespace

void build_block(const Conv& cv, int64_t mr, Patches& p, Block& b) {
  const int64_t S = cv.dw == 1 ? cv.KH : cv.T, run = cv.K / S, seg_words = run / cv.Cw * cv.xw;
  const int64_t tiles = (b.rows + mr - 1) / mr, span = (cv.KW - 1) * cv.dw;
  p.src.resize(tiles);
  p.seg.resize(tiles * S * mr);
  p.invalid.resize(b.rows);
  if (static_cast<int64_t>(p.copies.size()) < b.rows * S * seg_words) p.copies.resize(b.rows * S * seg_words);
  if (static_cast<int64_t>(p.zeros.size()) < seg_words) p.zeros.assign(seg_words, 0u);
  Cursor px{b.pix0 / cv.M, b.pix0 % cv.M / cv.OW, b.pix0 % cv.OW};
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r0 = t * mr, count = std::min(mr, b.rows - r0);
    const int64_t ih0 = px.oh * cv.sh - cv.ph, iw0 = px.ow * cv.sw - cv.pw;
    const bool direct = cv.dw == 1 && px.ow + count <= cv.OW && ih0 >= 0 &&
                        ih0 + (cv.KH - 1) * cv.dh < cv.H && iw0 >= 0 &&
                        iw0 + (count - 1) * cv.sw + span < cv.W;
    if (direct) {
      p.src[t] = Source{nullptr, 0, cv.x + ((px.n * cv.H + ih0) * cv.W + iw0) * cv.xw, cv.sw * cv.xw,
                        cv.dh * cv.W * cv.xw};
      for (int64_t r = 0; r < count; ++r) p.invalid[r0 + r] = 0;
      px.advance(cv, count);
      continue;
    }
    const uint32_t** seg = p.seg.data() + t * S * mr;
    p.src[t] = Source{seg, mr, nullptr, 0, 0};
    for (int64_t r = 0; r < count; ++r, px.advance(cv, 1)) {
      uint64_t outside = 0;
      uint32_t* copies = p.copies.data() + (r0 + r) * S * seg_words;
      const int64_t ih = px.oh * cv.sh - cv.ph, iw = px.ow * cv.sw - cv.pw;
      const bool cols_inside = cv.dw == 1 && iw >= 0 && iw + span < cv.W;
      for (int64_t g = 0; g < S; ++g) {
        const int64_t ihg = ih + g * cv.dh;  // with dw = 1, segment g is kernel row g
        seg[g * mr + r] = cols_inside && ihg >= 0 && ihg < cv.H
                              ? cv.x + ((px.n * cv.H + ihg) * cv.W + iw) * cv.xw
                              : segment(cv, px, g, copies + g * seg_words, p.zeros.data(), outside);
      }
      p.invalid[r0 + r] = outside;
    }
  }
  b.src = p.src.data();
  b.S = S;
  b.run = run;
  b.invalid = p.invalid.data();
}

}  // namespace detail
}  // namespace bconv
}  // namespace ctmq
