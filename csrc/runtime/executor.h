// The compiled executor of a ctmq artifact's graph, over plain buffers: the
// graph is planned once (steps with their weights prepared, every value's
// layout and a buffer in one arena reused as values die), then each forward
// is one call. Torch-free: the torch extension (csrc/torch/executor_bind.cpp)
// and the native runtime (csrc/native) build it, each with its own threads
// and, for the float ops, its own kernels (FloatOps).
//
// Layouts: float feature maps are NHWC between steps; the graph input is the
// NCHW image batch; a binary conv's sign bits are packed words (the format of
// binary_conv.h); flat values are (N, F). A binary conv whose readers take
// signs writes them from its epilogue (with the next conv's input bias as the
// threshold), besides or instead of floats, so no float map is packed again.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "../cpu/binary_conv.h"
#include "json.h"

namespace ctmq {
namespace rt {

enum class DType { kFloat32, kInt32 };

// A tensor of the artifact, borrowed: its data must outlive the executor.
struct TensorRef {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t numel() const;
  const float* f32() const { return static_cast<const float*>(data); }
  const uint32_t* u32() const { return static_cast<const uint32_t*>(data); }
};
using Tensors = std::map<std::string, TensorRef>;

enum class Layout { kNCHW, kNHWC, kPacked, kFlat };
const char* layout_name(Layout layout);

// A value per image: (C, H, W) for maps (flat: (C, 1, 1), C features).
struct Shape {
  int64_t c = 0, h = 1, w = 1;
  int64_t numel() const { return c * h * w; }
};

// Errors: the node (its output name and op) and why. std::invalid_argument.
[[noreturn]] void fail(const std::string& op, const std::string& out, const std::string& why);

// A node of the header with typed, checked access to its attributes.
class Node {
 public:
  Node(const json::Value& node, const Tensors& tensors);
  const std::string& op() const { return op_; }
  const std::string& out() const { return out_; }
  const std::vector<std::string>& inputs() const { return in_; }
  [[noreturn]] void fail(const std::string& why) const { rt::fail(op_, out_, why); }

  bool has(const char* key) const;
  int64_t integer(const char* key, const int64_t* fallback = nullptr) const;
  double number(const char* key, const double* fallback = nullptr) const;
  bool boolean(const char* key, bool fallback) const;
  std::string text(const char* key) const;
  // An int or a list of one or two ints; >= low.
  std::array<int64_t, 2> pair(const char* key, int64_t low,
                              const std::array<int64_t, 2>* fallback = nullptr) const;
  // The tensor an attribute names (null when optional and absent/null).
  const TensorRef* tensor(const char* key, int dims, DType dtype, bool optional = false,
                          int64_t length = -1) const;

 private:
  const json::Value& node_;
  const Tensors& tensors_;
  std::string op_, out_;
  std::vector<std::string> in_;
};

// Where the work runs: the binary kernels' path and the thread pool.
struct Context {
  bconv::Path path = bconv::Path::kScalar;
  bconv::Parallel parallel;
};

// One value's buffer as a step sees it.
struct Buffer {
  void* data = nullptr;
  Shape shape;
  Layout layout = Layout::kNHWC;
};

class Step {
 public:
  virtual ~Step() = default;
  const std::string& op() const { return op_; }
  const std::string& name() const { return name_; }

  // The layout this step reads input i in, given the layout it arrives in
  // (a step that can read several returns `arrives`); the planner converts
  // where they differ.
  virtual Layout reads(int i, Layout arrives) const {
    (void)i;
    (void)arrives;
    return Layout::kNHWC;
  }
  // The output's layout, given the layouts the inputs are read in.
  virtual Layout writes(const std::vector<Layout>& read) const {
    (void)read;
    return Layout::kNHWC;
  }
  // Shape of the output from the inputs' shapes (checked: throws naming the node).
  virtual Shape infer(const std::vector<Shape>& in) = 0;
  // outs[0]: the output (data null where no reader needs it, see
  // SignsWriter); outs[1]: the sign bits, for a SignsWriter asked for them.
  virtual void run(const Context& ctx, int64_t n, const std::vector<Buffer>& in, Buffer* outs) = 0;
  // A step that allocates its own output (an engine's float op) sets
  // outs[0].data in run(), valid until its next run; no arena region then.
  virtual bool owns_output() const { return false; }

 protected:
  Step(std::string op, std::string name) : op_(std::move(op)), name_(std::move(name)) {}
  std::string op_, name_;
};

// A step that can write the packed sign bits of its float output too:
// bit = (y + threshold[c]) >= 0 (threshold may be null), from its epilogue.
class SignsWriter {
 public:
  virtual ~SignsWriter() = default;
  virtual void write_signs(const float* threshold) = 0;
  // No reader takes the floats: write the signs alone.
  virtual void drop_floats() = 0;
};

// The float ops an engine may run with its own kernels: the torch extension
// runs these through ATen on NCHW tensors, so that their rounding is the
// trained model's; the native runtime runs its own NHWC kernels. Each
// returns a step for the node, or null to take the executor's own.
struct FloatOps {
  virtual ~FloatOps() = default;
  virtual std::unique_ptr<Step> make(const Node& node) = 0;
};

struct Profile {
  std::map<std::string, double> seconds_by_op;  // summed over steps of each op
  // each step in the order run: (its name: the node's output, or
  // "to_nhwc:<value>" for a planned conversion; op; seconds)
  std::vector<std::tuple<std::string, std::string, double>> steps;
  int64_t layout_conversions = 0;  // planned to_nhwc / to_nchw steps
};

class Executor {
 public:
  // header: the artifact's JSON header (its "nodes" and "input"); tensors:
  // the artifact's tensors. float_ops may be null (the executor's own).
  Executor(const json::Value& header, const Tensors& tensors, Context ctx,
           std::shared_ptr<FloatOps> float_ops = nullptr);
  ~Executor();

  int64_t channels() const { return channels_; }
  int64_t size() const { return size_; }
  int64_t classes() const { return classes_; }

  // The path and threads later runs use (e.g. after the caller's thread count changed).
  void set_context(Context ctx);
  // logits (N, classes) of normalized images (N, C, H, W), float32, NCHW.
  void run(const float* images, int64_t n, float* logits, Profile* profile = nullptr);
  // The steps as planned: "op name <- inputs [layout]" per line.
  std::string describe() const;
  int64_t layout_conversions() const;
  // Bytes of the activation arena planned for a batch of n.
  int64_t arena_bytes(int64_t n);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int64_t channels_ = 0, size_ = 0, classes_ = 0;
};

// The ops this executor runs (the artifact vocabulary's names).
std::vector<std::string> known_ops();

}  // namespace rt
}  // namespace ctmq
