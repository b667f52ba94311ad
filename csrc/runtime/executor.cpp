// The executor's planner and its run loop (executor.h).
//
// Planning, once: one step per node (the engine's float ops first, else the
// executor's own), shapes inferred, then every value given the forms its
// readers need: a float map in the layout each reads (a conversion step
// where two differ and the map is not 1x1), and for binary convs packed
// sign bits with the reader's input bias as threshold, written by the
// producer's epilogue where the producer is a binary conv, else by a pack
// step right after it. A binary conv whose floats nobody reads writes its
// signs alone. Buffers: per batch size, one arena; each form gets a region
// for the steps between its writer and its last reader (first fit).
#include <algorithm>
#include <chrono>
#include <map>
#include <sstream>

#include "steps.h"

namespace ctmq {
namespace rt {

namespace {

struct Slot {
  std::string name;
  Shape shape;
  Layout layout = Layout::kNHWC;
  int def = -1, last = -1;  // emission indices of its writer and last reader
  bool external = false;    // the images or the logits: the caller's memory
  bool dynamic = false;     // written where its step allocates (Step::owns_output)
  int64_t bytes(int64_t n) const {
    const int64_t per =
        layout == Layout::kPacked ? shape.h * shape.w * ((shape.c + 31) / 32) * 4 : shape.numel() * 4;
    return per * n;
  }
};

struct Emitted {
  Step* step;
  std::vector<int> in;  // slots
  int out = -1, signs = -1;
};

constexpr int64_t kAlign = 64;

}  // namespace

struct Executor::Impl {
  Context ctx;
  std::shared_ptr<FloatOps> float_ops;
  std::vector<std::unique_ptr<Step>> steps;  // owned; emitted in `order`
  std::vector<Emitted> order;
  std::vector<Slot> slots;
  int input = -1, output = -1;
  int64_t conversions = 0;
  std::map<int64_t, std::vector<int64_t>> offsets;  // batch size -> slot offsets
  std::map<int64_t, int64_t> arena_size;
  std::vector<char> arena;

  int new_slot(const std::string& name, Shape shape, Layout layout) {
    slots.push_back({name, shape, layout});
    return static_cast<int>(slots.size()) - 1;
  }

  const std::vector<int64_t>& plan_offsets(int64_t n);
};

namespace {

// One value of the graph while planning: its float form (slot per layout)
// and its packed forms (slot per threshold).
struct ValueForms {
  Shape shape;
  int producer = -1;     // index into Impl::order of the writer
  Step* step = nullptr;  // the writer's step (null: the images)
  std::map<Layout, int> floats;
  std::map<const float*, int> packed;
  bool packed_only = false;  // a binary conv with output "packed"
};

}  // namespace

Executor::Executor(const json::Value& header, const Tensors& tensors, Context ctx,
                   std::shared_ptr<FloatOps> float_ops)
    : impl_(std::make_unique<Impl>()) {
  Impl& im = *impl_;
  im.ctx = std::move(ctx);
  im.float_ops = std::move(float_ops);
  const json::Value* spec = header.find("input");
  const json::Value* nodes = header.find("nodes");
  const json::Value* classes = header.find("class_names");
  if (!spec || !spec->find("channels") || !spec->find("size") || !nodes || !nodes->is_array() || !classes ||
      !classes->is_array()) {
    throw std::invalid_argument("the header lacks its input, nodes or class_names");
  }
  channels_ = spec->find("channels")->as_int();
  size_ = spec->find("size")->as_int();
  classes_ = static_cast<int64_t>(classes->items().size());

  // steps and shapes, in node order
  std::map<std::string, ValueForms> values;
  values["input"].shape = {channels_, size_, size_};
  im.input = im.new_slot("input", values["input"].shape, Layout::kNCHW);
  im.slots[im.input].external = true;
  im.slots[im.input].def = -1;
  values["input"].floats[Layout::kNCHW] = im.input;

  std::vector<Node> parsed;
  for (const json::Value& v : nodes->items()) parsed.emplace_back(v, tensors);
  std::map<std::string, std::vector<std::pair<Step*, int>>> float_readers;
  std::map<std::string, std::vector<Step*>> sign_readers;
  for (const Node& node : parsed) {
    std::unique_ptr<Step> step = im.float_ops ? im.float_ops->make(node) : nullptr;
    if (!step) step = make_step(node);
    std::vector<Shape> shapes;
    for (const std::string& name : node.inputs()) {
      auto it = values.find(name);
      if (it == values.end()) node.fail("reads '" + name + "', not defined by an earlier node");
      shapes.push_back(it->second.shape);
    }
    ValueForms& out = values[node.out()];
    out.shape = step->infer(shapes);
    out.step = step.get();
    out.packed_only = is_binary_conv(*step) && step->writes({}) == Layout::kPacked;
    for (size_t i = 0; i < node.inputs().size(); ++i) {
      if (is_binary_conv(*step) && i == 0)
        sign_readers[node.inputs()[i]].push_back(step.get());
      else
        float_readers[node.inputs()[i]].push_back({step.get(), static_cast<int>(i)});
    }
    im.steps.push_back(std::move(step));
  }

  // forms: decide what each writer writes, before emitting anything
  for (auto& [name, v] : values) {
    auto* conv =
        v.step && is_binary_conv(*v.step) && !v.packed_only ? dynamic_cast<SignsWriter*>(v.step) : nullptr;
    if (conv && !sign_readers[name].empty()) {
      conv->write_signs(binary_conv_input_bias(*sign_readers[name][0]));
      if (float_readers[name].empty()) conv->drop_floats();
    }
  }

  // emission: each step, then the pack steps of its output; conversions just
  // before the step that needs them
  auto float_form = [&](const std::string& name, Layout want) -> int {
    ValueForms& v = values[name];
    if (v.packed_only) rt::fail("graph", name, "packed bits are read as floats");
    auto hit = v.floats.find(want);
    if (hit != v.floats.end()) return hit->second;
    if (v.shape.h * v.shape.w == 1 && !v.floats.empty() && want != Layout::kPacked) {
      return v.floats.begin()->second;  // 1x1 maps: every float layout is the same memory
    }
    if (v.floats.empty()) rt::fail("graph", name, "has no float form to read");
    const auto [have, src] = *v.floats.begin();
    auto step = make_convert(name, have, want);
    step->infer({v.shape});
    const int slot = im.new_slot(name + "@" + layout_name(want), v.shape, want);
    im.slots[slot].def = static_cast<int>(im.order.size());
    im.slots[src].last = std::max(im.slots[src].last, static_cast<int>(im.order.size()));
    im.order.push_back({step.get(), {src}, slot, -1});
    im.steps.push_back(std::move(step));
    ++im.conversions;
    v.floats[want] = slot;
    return slot;
  };
  auto signs_form = [&](const std::string& name, const float* threshold) -> int {
    ValueForms& v = values[name];
    auto hit = v.packed.find(threshold);
    if (hit != v.packed.end()) return hit->second;
    if (v.packed_only) {
      if (threshold) rt::fail("graph", name, "packed bits are read with an input bias");
      return v.packed.begin()->second;
    }
    const int src = float_form(name, Layout::kNHWC);
    auto step = make_pack(name, threshold);
    step->infer({v.shape});
    const int slot = im.new_slot(name + "#bits", v.shape, Layout::kPacked);
    im.slots[slot].def = static_cast<int>(im.order.size());
    im.slots[src].last = std::max(im.slots[src].last, static_cast<int>(im.order.size()));
    im.order.push_back({step.get(), {src}, slot, -1});
    im.steps.push_back(std::move(step));
    v.packed[threshold] = slot;
    return slot;
  };

  for (size_t k = 0; k < parsed.size(); ++k) {
    const Node& node = parsed[k];
    Step* step = im.steps[k].get();
    Emitted e{step, {}, -1, -1};
    std::vector<Layout> read_layouts;
    for (size_t i = 0; i < node.inputs().size(); ++i) {
      const std::string& name = node.inputs()[i];
      int slot;
      if (is_binary_conv(*step) && i == 0) {
        slot = signs_form(name, binary_conv_input_bias(*step));
      } else {
        ValueForms& v = values[name];
        const Layout arrives = v.floats.empty() ? Layout::kNHWC : v.floats.begin()->first;
        slot = float_form(name, step->reads(static_cast<int>(i), arrives));
      }
      read_layouts.push_back(im.slots[slot].layout);
      e.in.push_back(slot);
    }
    ValueForms& v = values[node.out()];
    const int idx = static_cast<int>(im.order.size());
    for (int s : e.in) im.slots[s].last = std::max(im.slots[s].last, idx);
    const Layout layout = step->writes(read_layouts);
    auto* conv = is_binary_conv(*step) && !v.packed_only ? dynamic_cast<SignsWriter*>(step) : nullptr;
    const bool floats = !conv || !float_readers[node.out()].empty() || sign_readers[node.out()].empty();
    if (v.packed_only) {
      e.out = im.new_slot(node.out(), v.shape, Layout::kPacked);
      v.packed[nullptr] = e.out;
    } else if (floats) {
      e.out = im.new_slot(node.out(), v.shape, layout);
      v.floats[layout] = e.out;
    }
    if (e.out >= 0) {
      im.slots[e.out].def = idx;
      im.slots[e.out].dynamic = step->owns_output();
    }
    if (conv && !sign_readers[node.out()].empty()) {
      const float* th = binary_conv_input_bias(*sign_readers[node.out()][0]);
      e.signs = im.new_slot(node.out() + "#bits", v.shape, Layout::kPacked);
      im.slots[e.signs].def = idx;
      v.packed[th] = e.signs;
    }
    im.order.push_back(e);
    if (node.op() == "output") {
      im.output = e.out;
      im.slots[e.out].external = true;
    }
    // pack steps right after their writer, while its output is in cache
    for (Step* reader : sign_readers[node.out()]) signs_form(node.out(), binary_conv_input_bias(*reader));
  }
  if (im.output < 0) throw std::invalid_argument("the graph has no output node");
  if (im.slots[im.output].shape.c != classes_) {
    throw std::invalid_argument("the graph's output has " + std::to_string(im.slots[im.output].shape.c) +
                                " values per image, expected one per class name (" +
                                std::to_string(classes_) + ")");
  }
}

Executor::~Executor() = default;

void Executor::set_context(Context ctx) {
  impl_->ctx = std::move(ctx);
}

const std::vector<int64_t>& Executor::Impl::plan_offsets(int64_t n) {
  auto hit = offsets.find(n);
  if (hit != offsets.end()) return hit->second;
  std::vector<int64_t> off(slots.size(), -1);
  struct Block {
    int64_t start, size;
    int until;  // free after this emission index
  };
  std::vector<Block> live;
  int64_t top = 0;
  std::vector<int> by_def;
  for (size_t s = 0; s < slots.size(); ++s) {
    if (!slots[s].external && !slots[s].dynamic) by_def.push_back(static_cast<int>(s));
  }
  std::stable_sort(by_def.begin(), by_def.end(), [&](int a, int b) { return slots[a].def < slots[b].def; });
  for (int s : by_def) {
    const Slot& slot = slots[s];
    const int64_t size = (slot.bytes(n) + kAlign - 1) / kAlign * kAlign;
    const int last = std::max(slot.last, slot.def);
    // blocks whose value died before this one is written are free (a step
    // never writes into a buffer it reads)
    std::vector<Block> in_use;
    for (const Block& b : live) {
      if (b.until >= slot.def) in_use.push_back(b);
    }
    std::sort(in_use.begin(), in_use.end(), [](const Block& a, const Block& b) { return a.start < b.start; });
    int64_t at = 0;
    for (const Block& b : in_use) {
      if (b.start - at >= size) break;
      at = std::max(at, b.start + b.size);
    }
    off[s] = at;
    top = std::max(top, at + size);
    in_use.push_back({at, size, last});
    live.swap(in_use);
  }
  arena_size[n] = top;
  return offsets.emplace(n, std::move(off)).first->second;
}

void Executor::run(const float* images, int64_t n, float* logits, Profile* profile) {
  Impl& im = *impl_;
  if (n < 1) throw std::invalid_argument("batch must be >= 1");
  const std::vector<int64_t>& off = im.plan_offsets(n);
  const int64_t need = im.arena_size[n];
  if (static_cast<int64_t>(im.arena.size()) < need + kAlign) im.arena.resize(need + kAlign);
  char* base = im.arena.data();
  base += (kAlign - reinterpret_cast<uintptr_t>(base) % kAlign) % kAlign;
  std::vector<void*> dynamic(im.slots.size(), nullptr);
  auto buffer = [&](int s) -> Buffer {
    if (s < 0) return {};
    const Slot& slot = im.slots[s];
    void* data = s == im.input    ? const_cast<float*>(images)
                 : s == im.output ? static_cast<void*>(logits)
                 : slot.dynamic   ? dynamic[s]
                                  : base + off[s];
    return {data, slot.shape, slot.layout};
  };
  using clock = std::chrono::steady_clock;
  std::vector<Buffer> in;
  for (const Emitted& e : im.order) {
    in.clear();
    for (int s : e.in) in.push_back(buffer(s));
    Buffer outs[2] = {buffer(e.out), buffer(e.signs)};
    if (e.out < 0) outs[0].shape = im.slots[e.signs].shape;
    const auto t0 = profile ? clock::now() : clock::time_point{};
    try {
      e.step->run(im.ctx, n, in, outs);
    } catch (const std::exception& err) {  // a kernel's own limit, named with its node
      throw std::invalid_argument(e.step->op() + " node '" + e.step->name() + "' fails on a (" +
                                  std::to_string(n) + ", " + std::to_string(channels_) + ", " +
                                  std::to_string(size_) + ", " + std::to_string(size_) +
                                  ") input: " + err.what());
    }
    if (e.out >= 0 && im.slots[e.out].dynamic) dynamic[e.out] = outs[0].data;
    if (profile) {
      const double seconds = std::chrono::duration<double>(clock::now() - t0).count();
      profile->seconds_by_op[e.step->op()] += seconds;
      profile->steps.emplace_back(e.step->name(), e.step->op(), seconds);
    }
  }
  if (profile) profile->layout_conversions = im.conversions;
}

std::string Executor::describe() const {
  std::ostringstream os;
  for (const Emitted& e : impl_->order) {
    os << e.step->op() << " " << e.step->name() << " <-";
    for (int s : e.in) os << " " << impl_->slots[s].name << "[" << layout_name(impl_->slots[s].layout) << "]";
    if (e.out >= 0) os << " -> [" << layout_name(impl_->slots[e.out].layout) << "]";
    if (e.signs >= 0) os << " +signs";
    os << "\n";
  }
  return os.str();
}

int64_t Executor::layout_conversions() const {
  return impl_->conversions;
}

int64_t Executor::arena_bytes(int64_t n) {
  impl_->plan_offsets(n);
  return impl_->arena_size[n];
}

}  // namespace rt
}  // namespace ctmq
