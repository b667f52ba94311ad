// The binary conv step (the vocabulary's binary_conv) and the pack step, on
// the kernels of csrc/cpu/binary_conv.h. The step reads its input as packed
// bits, which the planner has the producer write (a binary conv's epilogue,
// with this conv's input bias as the threshold) or a pack step make.
#include <cstring>
#include <vector>

#include "steps.h"

namespace ctmq {
namespace rt {
namespace {

class BinaryConv : public Step, public SignsWriter {
 public:
  explicit BinaryConv(const Node& node) : Step(node.op(), node.out()), node_(node) {
    const TensorRef* bits = node.tensor("weight", 4, DType::kInt32);
    C_ = node.integer("in_channels");
    O_ = bits->shape[0];
    const int64_t KH = bits->shape[1], KW = bits->shape[2], words = bits->shape[3];
    if (C_ < 1 || words != (C_ + 31) / 32) node.fail("weight is not packed for its in_channels");
    // the kernels count every bit: clear those past in_channels
    std::vector<uint32_t> clean(bits->u32(), bits->u32() + bits->numel());
    if (C_ % 32) {
      const uint32_t keep = (1u << (C_ % 32)) - 1;
      for (size_t i = words - 1; i < clean.size(); i += words) clean[i] &= keep;
    }
    weight_ = bconv::prepare_weight(clean.data(), O_, KH, KW, C_);
    scale_ = node.tensor("scale", 1, DType::kFloat32, false, O_)->f32();
    bias_ = node.tensor("bias", 1, DType::kFloat32, false, O_)->f32();
    const TensorRef* input_bias = node.tensor("input_bias", 1, DType::kFloat32, true, C_);
    input_bias_ = input_bias ? input_bias->f32() : nullptr;
    stride_ = node.pair("stride", 1);
    padding_ = node.pair("padding", 0);
    dilation_ = node.pair("dilation", 1);
    const std::string output = node.text("output");
    if (output != "float" && output != "packed") node.fail("output must be 'float' or 'packed'");
    packed_output_ = output == "packed";
    floats_ = !packed_output_;
  }

  Layout reads(int i, Layout) const override { return i == 0 ? Layout::kPacked : Layout::kNHWC; }
  Layout writes(const std::vector<Layout>&) const override {
    return packed_output_ ? Layout::kPacked : Layout::kNHWC;
  }
  Shape infer(const std::vector<Shape>& in) override {
    if (in[0].c != C_) {
      node_.fail("expects " + std::to_string(C_) + " input channels, got " + std::to_string(in[0].c));
    }
    Shape out{O_, bconv::output_size(in[0].h, weight_.KH, stride_[0], padding_[0], dilation_[0]),
              bconv::output_size(in[0].w, weight_.KW, stride_[1], padding_[1], dilation_[1])};
    if (out.h < 1 || out.w < 1) node_.fail("the kernel does not fit the padded input");
    if (in.size() == 2 && (in[1].c != out.c || in[1].h != out.h || in[1].w != out.w)) {
      node_.fail("its residual does not match its output");
    }
    return out;
  }
  void write_signs(const float* threshold) override {
    signs_ = true;
    threshold_ = threshold;
  }
  void drop_floats() override { floats_ = false; }

  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    bconv::ConvParams p;
    p.x = static_cast<const uint32_t*>(in[0].data);
    p.N = n;
    p.H = in[0].shape.h;
    p.W = in[0].shape.w;
    p.sh = stride_[0];
    p.sw = stride_[1];
    p.ph = padding_[0];
    p.pw = padding_[1];
    p.dh = dilation_[0];
    p.dw = dilation_[1];
    p.scale = scale_;
    p.bias = bias_;
    if (in.size() == 2) {
      p.residual = static_cast<const float*>(in[1].data);
      p.residual_layout = bconv::Layout::kNHWC;
    }
    if (packed_output_) {
      p.packed = static_cast<uint32_t*>(outs[0].data);
    } else {
      if (floats_) {
        p.out = static_cast<float*>(outs[0].data);
        p.out_layout = bconv::Layout::kNHWC;
      }
      if (signs_) {
        p.packed = static_cast<uint32_t*>(outs[1].data);
        p.threshold = threshold_;
      }
    }
    bconv::conv2d(p, weight_, ctx.path, ctx.parallel);
  }

  const float* input_bias() const { return input_bias_; }
  bool packed_output() const { return packed_output_; }

 private:
  Node node_;
  int64_t C_ = 0, O_ = 0;
  bconv::PreparedWeight weight_;
  const float* scale_ = nullptr;
  const float* bias_ = nullptr;
  const float* input_bias_ = nullptr;
  std::array<int64_t, 2> stride_{}, padding_{}, dilation_{};
  bool packed_output_ = false, floats_ = true, signs_ = false;
  const float* threshold_ = nullptr;
};

class Pack : public Step {
 public:
  Pack(const std::string& name, const float* threshold) : Step("pack", name), threshold_(threshold) {}
  Layout reads(int, Layout) const override { return Layout::kNHWC; }
  Layout writes(const std::vector<Layout>&) const override { return Layout::kPacked; }
  Shape infer(const std::vector<Shape>& in) override { return in[0]; }
  void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    const Shape s = in[0].shape;
    bconv::pack_nhwc(static_cast<const float*>(in[0].data), n * s.h * s.w, s.c, threshold_,
                     static_cast<uint32_t*>(outs[0].data), ctx.path, ctx.parallel);
  }

 private:
  const float* threshold_;
};

}  // namespace

std::unique_ptr<Step> make_binary_conv(const Node& node) {
  return std::make_unique<BinaryConv>(node);
}

std::unique_ptr<Step> make_pack(const std::string& name, const float* threshold) {
  return std::make_unique<Pack>(name, threshold);
}

const float* binary_conv_input_bias(const Step& step) {
  const auto* conv = dynamic_cast<const BinaryConv*>(&step);
  return conv ? conv->input_bias() : nullptr;
}

bool is_binary_conv(const Step& step) {
  return dynamic_cast<const BinaryConv*>(&step) != nullptr;
}

}  // namespace rt
}  // namespace ctmq
