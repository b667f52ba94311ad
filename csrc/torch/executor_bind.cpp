// ctmq._C.Executor: the compiled executor (csrc/runtime) in the torch
// extension, which ctmq.deploy's CPU runtime calls once per forward.
//
// Threads: at::parallel_for, so torch.set_num_threads governs it. The float
// ops whose rounding depends on the kernel (conv2d, batch_norm, linear, the
// adaptive pools) run through ATen on tensors in the layout the trained
// model computes them in (NCHW; batch_norm in any), so deployed logits equal
// the model's eval logits bit for bit, as the Python runtime's did. Every
// other op is the executor's own, exact by construction.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/extension.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>

#include "../ctmq.h"
#include "../runtime/executor.h"

namespace ctmq {
namespace {

using rt::Buffer;
using rt::Layout;
using rt::Node;
using rt::Shape;

at::Tensor view(const Buffer& b, int64_t n) {
  const Shape s = b.shape;
  auto opts = at::TensorOptions().dtype(at::kFloat);
  float* p = static_cast<float*>(b.data);
  switch (b.layout) {
    case Layout::kNCHW:
      return at::from_blob(p, {n, s.c, s.h, s.w}, opts);
    case Layout::kNHWC:
      return at::from_blob(p, {n, s.c, s.h, s.w}, {s.h * s.w * s.c, 1, s.w * s.c, s.c}, opts);
    case Layout::kFlat:
      return at::from_blob(p, {n, s.c}, opts);
    default:
      TORCH_CHECK(false, "no tensor view of packed bits");
  }
}

at::Tensor weight(const rt::TensorRef* t) {
  if (t == nullptr) return at::Tensor();
  return at::from_blob(const_cast<void*>(t->data), t->shape, at::TensorOptions().dtype(at::kFloat));
}

// A float op through ATen: fn(input tensor) -> result, copied into the output.
class AtenStep : public rt::Step {
 public:
  using Fn = std::function<at::Tensor(const at::Tensor&)>;
  AtenStep(const Node& node, Fn fn, Layout reads, Layout writes, std::function<Shape(Shape)> shape)
      : Step(node.op(), node.out()),
        fn_(std::move(fn)),
        reads_(reads),
        writes_(writes),
        shape_(std::move(shape)),
        node_(node) {}
  // kNHWC for reads_ means "either layout, as it arrives" (per-channel ops)
  Layout reads(int, Layout arrives) const override {
    return reads_ == Layout::kNHWC && arrives == Layout::kNCHW ? arrives : reads_;
  }
  Layout writes(const std::vector<Layout>& read) const override {
    return writes_ == Layout::kNHWC ? read[0] : writes_;  // kNHWC: as read
  }
  Shape infer(const std::vector<Shape>& in) override {
    try {
      return shape_(in[0]);
    } catch (const std::exception& e) {
      node_.fail(e.what());
    }
  }
  // ATen allocates the result, which the next steps read where it lies
  bool owns_output() const override { return true; }
  void run(const rt::Context&, int64_t n, const std::vector<Buffer>& in, Buffer* outs) override {
    at::Tensor y = fn_(view(in[0], n));
    const Shape s = outs[0].shape;
    switch (outs[0].layout) {
      case Layout::kNCHW:
        y = y.reshape({n, s.c, s.h, s.w}).contiguous();
        break;
      case Layout::kNHWC:
        y = y.reshape({n, s.c, s.h, s.w}).contiguous(at::MemoryFormat::ChannelsLast);
        break;
      default:
        y = y.reshape({n, s.c}).contiguous();
    }
    last_ = y;
    outs[0].data = y.data_ptr<float>();
  }

 private:
  Fn fn_;
  at::Tensor last_;  // the output of the last run, read by the next steps
  Layout reads_, writes_;
  std::function<Shape(Shape)> shape_;
  Node node_;
};

int64_t window(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d) {
  const int64_t out = (size + 2 * p - d * (k - 1) - 1) / s + 1;
  if (size + 2 * p - d * (k - 1) - 1 < 0 || out < 1)
    throw std::invalid_argument("the kernel does not fit the padded input");
  return out;
}

class AtenFloatOps : public rt::FloatOps {
 public:
  std::unique_ptr<rt::Step> make(const Node& node) override {
    const std::string& op = node.op();
    if (op == "conv2d") {
      at::Tensor w = weight(node.tensor("weight", 4, rt::DType::kFloat32));
      at::Tensor b = weight(node.tensor("bias", 1, rt::DType::kFloat32, true, w.size(0)));
      const auto s = node.pair("stride", 1), p = node.pair("padding", 0), d = node.pair("dilation", 1);
      const int64_t one = 1, groups = node.integer("groups", &one);
      auto fn = [w, b, s, p, d, groups](const at::Tensor& x) {
        return at::conv2d(x, w, b, {s[0], s[1]}, {p[0], p[1]}, {d[0], d[1]}, groups);
      };
      auto shape = [w, s, p, d, groups](Shape in) {
        if (in.c != w.size(1) * groups)
          throw std::invalid_argument("weight expects " + std::to_string(w.size(1) * groups) +
                                      " input channels, got " + std::to_string(in.c));
        return Shape{w.size(0), window(in.h, w.size(2), s[0], p[0], d[0]),
                     window(in.w, w.size(3), s[1], p[1], d[1])};
      };
      return std::make_unique<AtenStep>(node, fn, Layout::kNCHW, Layout::kNCHW, shape);
    }
    if (op == "batch_norm") {
      at::Tensor w = weight(node.tensor("weight", 1, rt::DType::kFloat32));
      const int64_t c = w.size(0);
      at::Tensor b = weight(node.tensor("bias", 1, rt::DType::kFloat32, false, c));
      at::Tensor mean = weight(node.tensor("mean", 1, rt::DType::kFloat32, false, c));
      at::Tensor var = weight(node.tensor("var", 1, rt::DType::kFloat32, false, c));
      const double eps = node.number("eps");
      auto fn = [=](const at::Tensor& x) {
        return at::batch_norm(x, w, b, mean, var, false, 0.0, eps, true);
      };
      auto shape = [c](Shape in) {
        if (in.c != c)
          throw std::invalid_argument("weight has " + std::to_string(c) + " values for " +
                                      std::to_string(in.c) + " channels");
        return in;
      };
      // per channel, so its result does not depend on the layout: as it arrives
      return std::make_unique<AtenStep>(node, fn, Layout::kNHWC, Layout::kNHWC, shape);
    }
    if (op == "max_pool2d") {  // as it arrives: NCHW through oneDNN's pool, NHWC through ATen's
      const auto k = node.pair("kernel", 1), st = node.pair("stride", 1);
      const std::array<int64_t, 2> zero{0, 0};
      const auto p = node.pair("padding", 0, &zero);
      auto fn = [k, st, p](const at::Tensor& x) {
        if (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) {
          return at::max_pool2d(x, {k[0], k[1]}, {st[0], st[1]}, {p[0], p[1]});
        }
        return at::mkldnn_max_pool2d(x.to_mkldnn(), {k[0], k[1]}, {st[0], st[1]}, {p[0], p[1]}).to_dense();
      };
      auto shape = [k, st, p](Shape in) {
        if (2 * p[0] > k[0] || 2 * p[1] > k[1])
          throw std::invalid_argument("padding must be at most half the kernel");
        return Shape{in.c, window(in.h, k[0], st[0], p[0], 1), window(in.w, k[1], st[1], p[1], 1)};
      };
      return std::make_unique<AtenStep>(node, fn, Layout::kNHWC, Layout::kNHWC, shape);
    }
    if (op == "linear") {
      at::Tensor w = weight(node.tensor("weight", 2, rt::DType::kFloat32));
      at::Tensor b = weight(node.tensor("bias", 1, rt::DType::kFloat32, true, w.size(0)));
      auto fn = [w, b](const at::Tensor& x) { return at::linear(x, w, b); };
      auto shape = [w](Shape in) {
        if (in.h * in.w != 1 || in.c != w.size(1))
          throw std::invalid_argument("weight expects " + std::to_string(w.size(1)) + " features");
        return Shape{w.size(0), 1, 1};
      };
      return std::make_unique<AtenStep>(node, fn, Layout::kFlat, Layout::kFlat, shape);
    }
    if (op == "global_avg_pool") {
      auto fn = [](const at::Tensor& x) { return at::flatten(at::adaptive_avg_pool2d(x, {1, 1}), 1); };
      return std::make_unique<AtenStep>(node, fn, Layout::kNCHW, Layout::kFlat,
                                        [](Shape in) { return Shape{in.c, 1, 1}; });
    }
    if (op == "adaptive_avg_pool2d") {
      const auto size = node.pair("output_size", 1);
      auto fn = [size](const at::Tensor& x) { return at::adaptive_avg_pool2d(x, {size[0], size[1]}); };
      return std::make_unique<AtenStep>(node, fn, Layout::kNCHW, Layout::kNCHW,
                                        [size](Shape in) { return Shape{in.c, size[0], size[1]}; });
    }
    return nullptr;
  }
};

void aten_parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  at::parallel_for(0, n, 1, fn);
}

rt::Context context() {
  rt::Context ctx;
  ctx.path = bconv::path_from_name(binary_cpu_path("").c_str());
  ctx.parallel.threads = at::get_num_threads();
  ctx.parallel.for_each = aten_parallel_for;
  return ctx;
}

class TorchExecutor {
 public:
  TorchExecutor(const std::string& header, std::map<std::string, at::Tensor> tensors, bool aten_float_ops)
      : header_(json::parse(header)), tensors_(std::move(tensors)) {
    for (auto& [name, t] : tensors_) {
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                      (t.scalar_type() == at::kFloat || t.scalar_type() == at::kInt),
                  "tensor ", name, " must be a contiguous CPU float32 or int32 tensor");
      refs_[name] = {t.scalar_type() == at::kFloat ? rt::DType::kFloat32 : rt::DType::kInt32, t.sizes().vec(),
                     t.data_ptr()};
    }
    std::shared_ptr<rt::FloatOps> ops;
    if (aten_float_ops) ops = std::make_shared<AtenFloatOps>();
    try {
      exec_ = std::make_unique<rt::Executor>(header_, refs_, context(), ops);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(e.what());
    }
  }

  at::Tensor run(const at::Tensor& images, rt::Profile* profile = nullptr) {
    TORCH_CHECK(images.device().is_cpu() && images.scalar_type() == at::kFloat && images.dim() == 4 &&
                    images.size(1) == exec_->channels() && images.size(2) == exec_->size() &&
                    images.size(3) == exec_->size(),
                "images must be a float32 CPU tensor (N, ", exec_->channels(), ", ", exec_->size(), ", ",
                exec_->size(), "), got ", images.sizes());
    c10::InferenceMode guard;
    const at::Tensor x = images.contiguous();
    at::Tensor logits = at::empty({x.size(0), exec_->classes()}, x.options());
    {
      pybind11::gil_scoped_release release;
      exec_->set_context(context());  // the path cap and thread count of now
      exec_->run(x.data_ptr<float>(), x.size(0), logits.data_ptr<float>(), profile);
    }
    return logits;
  }

  // (logits, {op: seconds}, [(step, op, seconds)] in the order run)
  std::tuple<at::Tensor, std::map<std::string, double>,
             std::vector<std::tuple<std::string, std::string, double>>>
  profile(const at::Tensor& images) {
    rt::Profile profile;
    at::Tensor logits = run(images, &profile);
    return {logits, profile.seconds_by_op, profile.steps};
  }

  std::string describe() const { return exec_->describe(); }
  int64_t layout_conversions() const { return exec_->layout_conversions(); }
  int64_t arena_bytes(int64_t n) { return exec_->arena_bytes(n); }

 private:
  json::Value header_;
  std::map<std::string, at::Tensor> tensors_;
  rt::Tensors refs_;
  std::unique_ptr<rt::Executor> exec_;
};

}  // namespace

void register_executor(pybind11::module& m) {
  pybind11::class_<TorchExecutor>(m, "Executor")
      .def(pybind11::init<const std::string&, std::map<std::string, at::Tensor>, bool>(),
           pybind11::arg("header"), pybind11::arg("tensors"), pybind11::arg("aten_float_ops") = true)
      .def("run", [](TorchExecutor& e, const at::Tensor& x) { return e.run(x); })
      .def("profile", &TorchExecutor::profile)
      .def("describe", &TorchExecutor::describe)
      .def_property_readonly("layout_conversions", &TorchExecutor::layout_conversions)
      .def("arena_bytes", &TorchExecutor::arena_bytes);
  m.def("executor_ops", &rt::known_ops);
}

}  // namespace ctmq
