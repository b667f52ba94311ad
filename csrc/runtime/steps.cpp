// The executor's native steps but the binary conv (binary_step.cpp): the
// elementwise ops, pooling, concat, flatten, layout conversions and the
// float ops (conv2d, batch_norm, linear, adaptive pools) in NHWC.
#include "steps.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "sgemm.h"

namespace ctmq {
namespace rt {

void for_range(const Context& ctx, int64_t n, int64_t cost, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (ctx.parallel.threads <= 1 || n * cost < 32768 || n == 1) {
    fn(0, n);
    return;
  }
  ctx.parallel.for_each(n, fn);
}

namespace {

// torch's output size of a window: floor, or ceil where the last window
// still starts inside the input or its left padding
int64_t out_size(const Node& node, int64_t size, int64_t k, int64_t s, int64_t p, int64_t d,
                 bool ceil_mode = false) {
  const int64_t span = size + 2 * p - d * (k - 1) - 1;
  int64_t out;
  if (ceil_mode) {
    out = (span >= 0 ? (span + s - 1) / s : -((-span) / s)) + 1;
    if ((out - 1) * s >= size + p) --out;
  } else {
    out = span >= 0 ? span / s + 1 : 0;
  }
  if (out < 1) node.fail("the window does not fit the padded input");
  return out;
}

// ------------------------------------------------------------ elementwise
// out = f(x) per element; any layout (the output keeps the input's).
template <typename F>
class Elementwise : public Step {
 public:
  Elementwise(const Node& node, F f) : Step(node.op(), node.out()), f_(f) {}
  Layout reads(int, Layout arrives) const override { return arrives; }
  Layout writes(const std::vector<Layout>& read) const override { return read[0]; }
  Shape infer(const std::vector<Shape>& in) override { return in[0]; }
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    const float* x = static_cast<const float*>(in[0].data);
    float* y = static_cast<float*>(outs[0].data);
    const int64_t numel = n * in[0].shape.numel();
    for_range(ctx, numel / 4096 + 1, 4096, [&](int64_t b, int64_t e) {
      const int64_t i1 = std::min(numel, e * 4096);
#pragma GCC ivdep
      for (int64_t i = b * 4096; i < i1; ++i) y[i] = f_(x[i]);
    });
  }

 private:
  F f_;
};

// Per-channel elementwise ops read channels innermost (NHWC or flat).
template <typename F>
class PerChannel : public Step {
 public:
  PerChannel(const Node& node, int64_t channels, F f)
      : Step(node.op(), node.out()), channels_(channels), f_(f) {}
  Shape infer(const std::vector<Shape>& in) override {
    if (in[0].c != channels_ && channels_ != 1) {
      rt::fail(op_, name_,
               "has " + std::to_string(channels_) + " values for " + std::to_string(in[0].c) + " channels");
    }
    return in[0];
  }
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    const float* x = static_cast<const float*>(in[0].data);
    float* y = static_cast<float*>(outs[0].data);
    const int64_t c = in[0].shape.c, pixels = n * in[0].shape.h * in[0].shape.w;
    for_range(ctx, pixels, c, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const float* xp = x + p * c;
        float* yp = y + p * c;
        // (no dependence between elements: the loops vectorize; y may be x)
        if (channels_ == 1) {
#pragma GCC ivdep
          for (int64_t j = 0; j < c; ++j) yp[j] = f_(xp[j], 0);
        } else {
#pragma GCC ivdep
          for (int64_t j = 0; j < c; ++j) yp[j] = f_(xp[j], j);
        }
      }
    });
  }

 private:
  int64_t channels_;
  F f_;
};

class Add : public Step {
 public:
  explicit Add(const Node& node) : Step(node.op(), node.out()) {}
  Shape infer(const std::vector<Shape>& in) override {
    if (in[0].c != in[1].c || in[0].h != in[1].h || in[0].w != in[1].w) {
      rt::fail(op_, name_, "inputs of different shapes");
    }
    return in[0];
  }
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    const float* a = static_cast<const float*>(in[0].data);
    const float* b = static_cast<const float*>(in[1].data);
    float* y = static_cast<float*>(outs[0].data);
    const int64_t numel = n * in[0].shape.numel();
    for_range(ctx, numel / 4096 + 1, 4096, [&](int64_t b0, int64_t e) {
      for (int64_t i = b0 * 4096; i < std::min(numel, e * 4096); ++i) y[i] = a[i] + b[i];
    });
  }
};

class Concat : public Step {
 public:
  explicit Concat(const Node& node) : Step(node.op(), node.out()) {}
  Shape infer(const std::vector<Shape>& in) override {
    Shape s = in[0];
    s.c = 0;
    for (const Shape& v : in) {
      if (v.h != s.h || v.w != s.w) rt::fail(op_, name_, "inputs of different spatial sizes");
      s.c += v.c;
    }
    return s;
  }
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    float* y = static_cast<float*>(outs[0].data);
    const int64_t pixels = n * outs[0].shape.h * outs[0].shape.w, c = outs[0].shape.c;
    for_range(ctx, pixels, c, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        int64_t at = 0;
        for (const Buffer& b : in) {
          std::memcpy(y + p * c + at, static_cast<const float*>(b.data) + p * b.shape.c,
                      sizeof(float) * b.shape.c);
          at += b.shape.c;
        }
      }
    });
  }
};

// ------------------------------------------------------------ pooling
class MaxPool : public Step {
 public:
  explicit MaxPool(const Node& node) : Step(node.op(), node.out()), node_(node) {
    k_ = node.pair("kernel", 1);
    s_ = node.pair("stride", 1);
    const std::array<int64_t, 2> zero{0, 0};
    p_ = node.pair("padding", 0, &zero);
  }
  Shape infer(const std::vector<Shape>& in) override {
    if (2 * p_[0] > k_[0] || 2 * p_[1] > k_[1]) node_.fail("padding must be at most half the kernel");
    return {in[0].c, out_size(node_, in[0].h, k_[0], s_[0], p_[0], 1),
            out_size(node_, in[0].w, k_[1], s_[1], p_[1], 1)};
  }
  // NHWC: each tap is a run of C channels, so the max vectorizes over channels
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    const Shape is = in[0].shape, os = outs[0].shape;
    const float* x = static_cast<const float*>(in[0].data);
    float* y = static_cast<float*>(outs[0].data);
    const int64_t C = is.c, H = is.h, W = is.w;
    for_range(ctx, n * os.h, os.w * C * k_[0] * k_[1], [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / os.h, oh = r % os.h;
        const int64_t h0 = std::max<int64_t>(0, oh * s_[0] - p_[0]);
        const int64_t h1 = std::min(H, oh * s_[0] - p_[0] + k_[0]);
        for (int64_t ow = 0; ow < os.w; ++ow) {
          const int64_t w0 = std::max<int64_t>(0, ow * s_[1] - p_[1]);
          const int64_t w1 = std::min(W, ow * s_[1] - p_[1] + k_[1]);
          float* acc = y + ((b * os.h + oh) * os.w + ow) * C;
          std::memcpy(acc, x + ((b * H + h0) * W + w0) * C, sizeof(float) * C);
          for (int64_t ih = h0; ih < h1; ++ih) {
            for (int64_t iw = ih == h0 ? w0 + 1 : w0; iw < w1; ++iw) {
              const float* px = x + ((b * H + ih) * W + iw) * C;
              for (int64_t c = 0; c < C; ++c) acc[c] = max_nan(acc[c], px[c]);
            }
          }
        }
      }
    });
  }

 private:
  static float max_nan(float a, float v) { return (v > a || v != v) ? v : a; }  // NaN wins, as in torch

  Node node_;
  std::array<int64_t, 2> k_{}, s_{}, p_{};
};

class AvgPool : public Step {
 public:
  explicit AvgPool(const Node& node) : Step(node.op(), node.out()), node_(node) {
    k_ = node.pair("kernel", 1);
    s_ = node.pair("stride", 1);
    const std::array<int64_t, 2> zero{0, 0};
    p_ = node.pair("padding", 0, &zero);
    ceil_ = node.boolean("ceil_mode", false);
    include_pad_ = node.boolean("count_include_pad", false);
  }
  Shape infer(const std::vector<Shape>& in) override {
    if (2 * p_[0] > k_[0] || 2 * p_[1] > k_[1]) node_.fail("padding must be at most half the kernel");
    return {in[0].c, out_size(node_, in[0].h, k_[0], s_[0], p_[0], 1, ceil_),
            out_size(node_, in[0].w, k_[1], s_[1], p_[1], 1, ceil_)};
  }
  // torch's CPU avg_pool2d: the window's sum in row order, then / its count
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    const Shape is = in[0].shape, os = outs[0].shape;
    const float* x = static_cast<const float*>(in[0].data);
    float* y = static_cast<float*>(outs[0].data);
    const int64_t C = is.c, H = is.h, W = is.w;
    for_range(ctx, n * os.h, os.w * C * k_[0] * k_[1], [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / os.h, oh = r % os.h;
        int64_t h0 = oh * s_[0] - p_[0], h1 = std::min(h0 + k_[0], H + p_[0]);
        const int64_t hpool = h1 - h0;
        h0 = std::max<int64_t>(h0, 0);
        h1 = std::min(h1, H);
        for (int64_t ow = 0; ow < os.w; ++ow) {
          int64_t w0 = ow * s_[1] - p_[1], w1 = std::min(w0 + k_[1], W + p_[1]);
          const int64_t pool = hpool * (w1 - w0);
          w0 = std::max<int64_t>(w0, 0);
          w1 = std::min(w1, W);
          const float div = static_cast<float>(include_pad_ ? pool : (h1 - h0) * (w1 - w0));
          float* out = y + ((b * os.h + oh) * os.w + ow) * C;
          std::fill(out, out + C, 0.f);
          for (int64_t ih = h0; ih < h1; ++ih) {
            for (int64_t iw = w0; iw < w1; ++iw) {
              const float* px = x + ((b * H + ih) * W + iw) * C;
              for (int64_t c = 0; c < C; ++c) out[c] = out[c] + px[c];
            }
          }
          for (int64_t c = 0; c < C; ++c) out[c] = out[c] / div;
        }
      }
    });
  }

 private:
  Node node_;
  std::array<int64_t, 2> k_{}, s_{}, p_{};
  bool ceil_ = false, include_pad_ = false;
};

// Adaptive average pooling (global: output_size 1, flattened), NHWC, the
// windows of torch's adaptive pool, summed in row order.
class AdaptivePool : public Step {
 public:
  AdaptivePool(const Node& node, bool global) : Step(node.op(), node.out()), global_(global) {
    if (!global) oh_ = node.pair("output_size", 1);
  }
  Layout writes(const std::vector<Layout>&) const override { return global_ ? Layout::kFlat : Layout::kNHWC; }
  Shape infer(const std::vector<Shape>& in) override {
    return global_ ? Shape{in[0].c, 1, 1} : Shape{in[0].c, oh_[0], oh_[1]};
  }
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    const Shape is = in[0].shape, os = outs[0].shape;
    const float* x = static_cast<const float*>(in[0].data);
    float* y = static_cast<float*>(outs[0].data);
    const int64_t C = is.c;
    for_range(ctx, n * os.h * os.w, C * is.h * is.w / (os.h * os.w), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (os.h * os.w), oh = r / os.w % os.h, ow = r % os.w;
        const int64_t h0 = oh * is.h / os.h, h1 = ((oh + 1) * is.h + os.h - 1) / os.h;
        const int64_t w0 = ow * is.w / os.w, w1 = ((ow + 1) * is.w + os.w - 1) / os.w;
        float* out = y + r * C;
        std::fill(out, out + C, 0.f);
        for (int64_t ih = h0; ih < h1; ++ih) {
          for (int64_t iw = w0; iw < w1; ++iw) {
            const float* px = x + ((b * is.h + ih) * is.w + iw) * C;
            for (int64_t c = 0; c < C; ++c) out[c] = out[c] + px[c];
          }
        }
        const float div = static_cast<float>((h1 - h0) * (w1 - w0));
        for (int64_t c = 0; c < C; ++c) out[c] = out[c] / div;
      }
    });
  }

 private:
  bool global_;
  std::array<int64_t, 2> oh_{1, 1};
};

// ------------------------------------------------------------ reshaping
class Flatten : public Step {
 public:
  explicit Flatten(const Node& node) : Step(node.op(), node.out()) {}
  Layout reads(int, Layout arrives) const override {
    return arrives == Layout::kNCHW ? Layout::kNCHW : Layout::kNHWC;
  }
  Layout writes(const std::vector<Layout>&) const override { return Layout::kFlat; }
  Shape infer(const std::vector<Shape>& in) override { return {in[0].numel(), 1, 1}; }
  // torch.flatten(x, 1) of NCHW: channel-major; from NHWC a transpose
  void run(const Context&, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    const Shape s = in[0].shape;
    const float* x = static_cast<const float*>(in[0].data);
    float* y = static_cast<float*>(outs[0].data);
    if (in[0].layout == Layout::kNCHW || s.h * s.w == 1) {
      std::memcpy(y, x, sizeof(float) * n * s.numel());
      return;
    }
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t p = 0; p < s.h * s.w; ++p) {
        for (int64_t c = 0; c < s.c; ++c) y[(b * s.c + c) * s.h * s.w + p] = x[(b * s.h * s.w + p) * s.c + c];
      }
    }
  }
};

class Output : public Step {
 public:
  explicit Output(const Node& node) : Step(node.op(), node.out()) {}
  Layout reads(int, Layout) const override { return Layout::kFlat; }
  Layout writes(const std::vector<Layout>&) const override { return Layout::kFlat; }
  Shape infer(const std::vector<Shape>& in) override {
    if (in[0].h * in[0].w != 1) rt::fail(op_, name_, "the logits must be flat (N, classes)");
    return in[0];
  }
  void run(const Context&, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    std::memcpy(outs[0].data, in[0].data, sizeof(float) * n * in[0].shape.numel());
  }
};

class Convert : public Step {
 public:
  Convert(const std::string& name, Layout from, Layout to)
      : Step(std::string("to_") + layout_name(to), name), from_(from), to_(to) {}
  Layout reads(int, Layout) const override { return from_; }
  Layout writes(const std::vector<Layout>&) const override { return to_; }
  Shape infer(const std::vector<Shape>& in) override { return in[0]; }
  // a transpose of (C, HW) planes in 32 x 32 blocks, each read and written in cache
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    const Shape s = in[0].shape;
    const int64_t hw = s.h * s.w, C = s.c;
    constexpr int64_t B = 32;
    const int64_t pblocks = (hw + B - 1) / B;
    const float* x = static_cast<const float*>(in[0].data);
    float* y = static_cast<float*>(outs[0].data);
    const bool to_nhwc = to_ == Layout::kNHWC;
    for_range(ctx, n * pblocks, B * C, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / pblocks, p0 = t % pblocks * B, p1 = std::min(hw, p0 + B);
        const float* xb = x + b * hw * C;
        float* yb = y + b * hw * C;
        for (int64_t c0 = 0; c0 < C; c0 += B) {
          const int64_t c1 = std::min(C, c0 + B);
          for (int64_t p = p0; p < p1; ++p) {
            for (int64_t c = c0; c < c1; ++c) {
              if (to_nhwc)
                yb[p * C + c] = xb[c * hw + p];
              else
                yb[c * hw + p] = xb[p * C + c];
            }
          }
        }
      }
    });
  }

 private:
  Layout from_, to_;
};

// ------------------------------------------------------------ float ops
// conv2d, NHWC: the patches of each output row (im2col) times the weight
// (sgemm), plus the bias; groups run one after the other.
class Conv2d : public Step {
 public:
  explicit Conv2d(const Node& node) : Step(node.op(), node.out()), node_(node) {
    const TensorRef* w = node.tensor("weight", 4, DType::kFloat32);
    O_ = w->shape[0];
    Cg_ = w->shape[1];
    KH_ = w->shape[2];
    KW_ = w->shape[3];
    const int64_t one = 1;
    groups_ = node.integer("groups", &one);
    if (groups_ < 1 || O_ % groups_) node.fail("groups does not divide the output channels");
    bias_ = node.tensor("bias", 1, DType::kFloat32, true, O_);
    s_ = node.pair("stride", 1);
    p_ = node.pair("padding", 0);
    d_ = node.pair("dilation", 1);
    // (O, Cg, KH, KW) -> per group (K = KH*KW*Cg, Og): k = (kh * KW + kw) * Cg + c
    const int64_t Og = O_ / groups_, K = KH_ * KW_ * Cg_;
    std::vector<float> wt(K * Og);
    for (int64_t g = 0; g < groups_; ++g) {
      for (int64_t o = 0; o < Og; ++o)
        for (int64_t c = 0; c < Cg_; ++c)
          for (int64_t kh = 0; kh < KH_; ++kh)
            for (int64_t kw = 0; kw < KW_; ++kw)
              wt[((kh * KW_ + kw) * Cg_ + c) * Og + o] =
                  w->f32()[(((g * Og + o) * Cg_ + c) * KH_ + kh) * KW_ + kw];
      packed_.push_back(pack_b(wt.data(), K, Og, Og));
    }
  }
  Shape infer(const std::vector<Shape>& in) override {
    if (in[0].c != Cg_ * groups_)
      node_.fail("weight expects " + std::to_string(Cg_ * groups_) + " input channels, got " +
                 std::to_string(in[0].c));
    return {O_, out_size(node_, in[0].h, KH_, s_[0], p_[0], d_[0]),
            out_size(node_, in[0].w, KW_, s_[1], p_[1], d_[1])};
  }
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override;

 private:
  Node node_;
  int64_t O_ = 0, Cg_ = 0, KH_ = 0, KW_ = 0, groups_ = 1;
  const TensorRef* bias_ = nullptr;
  std::array<int64_t, 2> s_{}, p_{}, d_{};
  std::vector<PackedB> packed_;  // per group
};

// Tasks of 96 output pixels (whole register tiles of every sgemm path): the
// patches of a task (im2col), then one sgemm per group over all of them.
void Conv2d::run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) {
  const Shape is = in[0].shape, os = outs[0].shape;
  const float* x = static_cast<const float*>(in[0].data);
  float* y = static_cast<float*>(outs[0].data);
  const int64_t Og = O_ / groups_, K = KH_ * KW_ * Cg_, C = is.c;
  constexpr int64_t kChunk = 96;
  const int64_t pixels = n * os.h * os.w, tasks = (pixels + kChunk - 1) / kChunk;
  for_range(ctx, tasks, kChunk * K * O_ / 8, [&](int64_t t0, int64_t t1) {
    std::vector<float> patch(kChunk * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = t * kChunk, rows = std::min(kChunk, pixels - p0);
      for (int64_t g = 0; g < groups_; ++g) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t p = p0 + r, b = p / (os.h * os.w), oh = p / os.w % os.h, ow = p % os.w;
          float* dst = patch.data() + r * K;
          const int64_t iw0 = ow * s_[1] - p_[1];
          // the KW taps of a kernel row lie side by side in NHWC when the row
          // is inside the map and the kernel neither dilates nor groups
          const bool whole_rows = groups_ == 1 && d_[1] == 1 && iw0 >= 0 && iw0 + KW_ <= is.w;
          for (int64_t kh = 0; kh < KH_; ++kh) {
            const int64_t ih = oh * s_[0] - p_[0] + kh * d_[0];
            if (whole_rows && ih >= 0 && ih < is.h) {
              std::memcpy(dst, x + ((b * is.h + ih) * is.w + iw0) * C, sizeof(float) * KW_ * C);
              dst += KW_ * C;
              continue;
            }
            for (int64_t kw = 0; kw < KW_; ++kw, dst += Cg_) {
              const int64_t iw = ow * s_[1] - p_[1] + kw * d_[1];
              if (ih < 0 || ih >= is.h || iw < 0 || iw >= is.w) {
                for (int64_t c = 0; c < Cg_; ++c) dst[c] = 0.f;
              } else {
                const float* src = x + ((b * is.h + ih) * is.w + iw) * C + g * Cg_;
                for (int64_t c = 0; c < Cg_; ++c) dst[c] = src[c];
              }
            }
          }
        }
        sgemm(rows, patch.data(), K, packed_[g], y + p0 * O_ + g * Og, O_,
              bias_ ? bias_->f32() + g * Og : nullptr, ctx.path);
      }
    }
  });
}

class BatchNorm : public Step {
 public:
  explicit BatchNorm(const Node& node) : Step(node.op(), node.out()) {
    const TensorRef* w = node.tensor("weight", 1, DType::kFloat32);
    const int64_t c = w->shape[0];
    const TensorRef* b = node.tensor("bias", 1, DType::kFloat32, false, c);
    const TensorRef* mean = node.tensor("mean", 1, DType::kFloat32, false, c);
    const TensorRef* var = node.tensor("var", 1, DType::kFloat32, false, c);
    const double eps = node.number("eps");
    alpha_.resize(c);
    beta_.resize(c);
    for (int64_t i = 0; i < c; ++i) {  // torch's linear and constant terms
      const double invstd = 1.0 / std::sqrt(static_cast<double>(var->f32()[i]) + eps);
      alpha_[i] = static_cast<float>(invstd * w->f32()[i]);
      beta_[i] = static_cast<float>(b->f32()[i] - mean->f32()[i] * invstd * w->f32()[i]);
    }
  }
  Shape infer(const std::vector<Shape>& in) override {
    if (in[0].c != static_cast<int64_t>(alpha_.size())) {
      rt::fail(op_, name_,
               "weight has " + std::to_string(alpha_.size()) + " values for " + std::to_string(in[0].c) +
                   " channels");
    }
    return in[0];
  }
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    const float* x = static_cast<const float*>(in[0].data);
    float* y = static_cast<float*>(outs[0].data);
    const int64_t c = in[0].shape.c, pixels = n * in[0].shape.h * in[0].shape.w;
    for_range(ctx, pixels, c, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t j = 0; j < c; ++j) y[p * c + j] = x[p * c + j] * alpha_[j] + beta_[j];
    });
  }

 private:
  std::vector<float> alpha_, beta_;
};

class Linear : public Step {
 public:
  explicit Linear(const Node& node) : Step(node.op(), node.out()) {
    const TensorRef* w = node.tensor("weight", 2, DType::kFloat32);
    O_ = w->shape[0];
    F_ = w->shape[1];
    bias_ = node.tensor("bias", 1, DType::kFloat32, true, O_);
    std::vector<float> wt(F_ * O_);  // (F, O)
    for (int64_t o = 0; o < O_; ++o)
      for (int64_t f = 0; f < F_; ++f) wt[f * O_ + o] = w->f32()[o * F_ + f];
    packed_ = pack_b(wt.data(), F_, O_, O_);
  }
  Layout reads(int, Layout) const override { return Layout::kFlat; }
  Layout writes(const std::vector<Layout>&) const override { return Layout::kFlat; }
  Shape infer(const std::vector<Shape>& in) override {
    if (in[0].h * in[0].w != 1 || in[0].c != F_) {
      rt::fail(op_, name_, "weight expects " + std::to_string(F_) + " features");
    }
    return {O_, 1, 1};
  }
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    sgemm(n, static_cast<const float*>(in[0].data), F_, packed_, static_cast<float*>(outs[0].data), O_,
          bias_ ? bias_->f32() : nullptr, ctx.path);
  }

 private:
  int64_t O_ = 0, F_ = 0;
  const TensorRef* bias_ = nullptr;
  PackedB packed_;
};

template <typename F>
std::unique_ptr<Step> elementwise(const Node& node, F f) {
  return std::make_unique<Elementwise<F>>(node, f);
}

template <typename F>
std::unique_ptr<Step> per_channel(const Node& node, int64_t channels, F f) {
  return std::make_unique<PerChannel<F>>(node, channels, f);
}

}  // namespace

std::unique_ptr<Step> make_step(const Node& node) {
  const std::string& op = node.op();
  if (op == "binary_conv") return make_binary_conv(node);
  if (op == "conv2d") return std::make_unique<Conv2d>(node);
  if (op == "batch_norm") return std::make_unique<BatchNorm>(node);
  if (op == "linear") return std::make_unique<Linear>(node);
  if (op == "max_pool2d") return std::make_unique<MaxPool>(node);
  if (op == "avg_pool2d") return std::make_unique<AvgPool>(node);
  if (op == "global_avg_pool") return std::make_unique<AdaptivePool>(node, true);
  if (op == "adaptive_avg_pool2d") return std::make_unique<AdaptivePool>(node, false);
  if (op == "add") return std::make_unique<Add>(node);
  if (op == "concat") return std::make_unique<Concat>(node);
  if (op == "flatten") return std::make_unique<Flatten>(node);
  if (op == "output") return std::make_unique<Output>(node);
  if (op == "relu") return elementwise(node, [](float x) { return x < 0.f ? 0.f : x; });
  if (op == "hardtanh") {
    const double lo_d = -1.0, hi_d = 1.0;
    const float lo = static_cast<float>(node.number("min_val", &lo_d));
    const float hi = static_cast<float>(node.number("max_val", &hi_d));
    if (!(lo < hi)) node.fail("min_val must be below max_val");
    return elementwise(node, [lo, hi](float x) {
      const float up = x < lo ? lo : x;  // NaN stays NaN, as in torch
      return up > hi ? hi : up;
    });
  }
  if (op == "leaky_relu") {
    const double d = 0.01;
    const float slope = static_cast<float>(node.number("negative_slope", &d));
    return elementwise(node, [slope](float x) { return x > 0.f ? x : x * slope; });
  }
  if (op == "prelu") {
    const TensorRef* w = node.tensor("weight", 1, DType::kFloat32);
    const float* wp = w->f32();
    // (the weight is loaded whatever the sign, so the loop needs no branch)
    return per_channel(node, w->shape[0], [wp](float x, int64_t c) {
      const float slope = wp[c];
      return x > 0.f ? x : slope * x;
    });
  }
  if (op == "rprelu") {
    const TensorRef* w = node.tensor("weight", 1, DType::kFloat32);
    const int64_t c = w->shape[0];
    const float* a = node.tensor("shift_in", 1, DType::kFloat32, false, c)->f32();
    const float* b = node.tensor("shift_out", 1, DType::kFloat32, false, c)->f32();
    const float* wp = w->f32();
    return per_channel(node, c, [a, b, wp](float x, int64_t j) {
      const float t = x + a[j], slope = wp[j];
      const float p = t > 0.f ? t : slope * t;
      return p + b[j];
    });
  }
  node.fail("unknown op");
}

std::unique_ptr<Step> make_convert(const std::string& name, Layout from, Layout to) {
  return std::make_unique<Convert>(name, from, to);
}

std::vector<std::string> known_ops() {
  return {"conv2d",
          "batch_norm",
          "max_pool2d",
          "avg_pool2d",
          "binary_conv",
          "add",
          "concat",
          "hardtanh",
          "relu",
          "prelu",
          "rprelu",
          "leaky_relu",
          "global_avg_pool",
          "adaptive_avg_pool2d",
          "flatten",
          "linear",
          "output"};
}

}  // namespace rt
}  // namespace ctmq
