// See artifact.h. The order and wording of the checks follow
// ctmq/artifact/format.py and vocabulary.py, so that both readers refuse a
// bad file at the same step with the same message; the op table itself is
// generated from Python's (vocabulary.inc).
#include "artifact.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "sha256.h"

namespace ctmq {
namespace rt {
namespace {

enum class AttrKind { kNone, kInt, kFloat, kBool, kStr, kPair, kTensor };
enum class Default { kRequired, kNone, kValue };

struct AttrSpec {
  const char* name;
  AttrKind kind;
  Default has_default;
  double default_number;
  const char* default_text;
  double low, high;     // NAN: none
  const char* choices;  // "a|b"
  int dims;
  DType dtype;
  const char* length_attr;  // "": none
  int length_dim;           // -1: the int attribute named length_attr
};

struct OpSpec {
  const char* name;
  int min_in, max_in;
  const AttrSpec* attrs;
  int n_attrs;
  int since;
};

#include "vocabulary.inc"

[[noreturn]] void error(const std::string& why) {
  throw ArtifactError(why);
}

// ------------------------------------------------------------ Python's repr
std::string repr_str(const std::string& s) {
  const bool single = s.find('\'') == std::string::npos || s.find('"') != std::string::npos;
  const char q = single ? '\'' : '"';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == static_cast<unsigned char>(q) || c == '\\')
      out += '\\', out += static_cast<char>(c);
    else if (c == '\n')
      out += "\\n";
    else if (c == '\r')
      out += "\\r";
    else if (c == '\t')
      out += "\\t";
    else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + q;
}

std::string repr(const json::Value& v) {
  switch (v.kind()) {
    case json::Value::Kind::kNull:
      return "None";
    case json::Value::Kind::kBool:
      return v.as_bool() ? "True" : "False";
    case json::Value::Kind::kInt:
      return v.fits_int64() ? std::to_string(v.as_int()) : v.as_string();
    case json::Value::Kind::kFloat: {
      const double d = v.as_double();
      if (std::isnan(d)) return "nan";
      if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
      return json::python_float_repr(d);
    }
    case json::Value::Kind::kString:
      return repr_str(v.as_string());
    case json::Value::Kind::kArray: {
      std::string out = "[";
      for (size_t i = 0; i < v.items().size(); ++i) out += (i ? ", " : "") + repr(v.items()[i]);
      return out + "]";
    }
    case json::Value::Kind::kObject: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, item] : v.members()) {
        out += (first ? "" : ", ") + repr_str(k) + ": " + repr(item);
        first = false;
      }
      return out + "}";
    }
  }
  return "?";
}

std::string short_repr(const json::Value* v) {
  const std::string text = v ? repr(*v) : "None";
  return text.size() < 200 ? text : text.substr(0, 200) + "...";
}

std::string tuple(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

std::string g(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

bool is_int(const json::Value* v) {
  return v && v->is_int();
}

// ------------------------------------------------------------ the graph
const OpSpec* find_op(const std::string& name) {
  for (const OpSpec& op : kOps) {
    if (name == op.name) return &op;
  }
  return nullptr;
}

std::string known_ops_repr() {
  std::set<std::string> names;
  for (const OpSpec& op : kOps) names.insert(op.name);
  std::string out = "[";
  bool first = true;
  for (const std::string& n : names) {
    out += (first ? "" : ", ") + repr_str(n);
    first = false;
  }
  return out + "]";
}

void check_graph(const json::Value& header) {
  const json::Value* nodes = header.find("nodes");
  if (!nodes || !nodes->is_array() || nodes->items().empty()) error("the header has no node list");
  const json::Value* version = header.find("version");
  const int64_t file_version = version && version->fits_int64() ? version->as_int() : kFormatVersion;
  std::set<std::string> defined{"input"};
  const auto& items = nodes->items();
  for (size_t i = 0; i < items.size(); ++i) {
    const json::Value& node = items[i];
    if (!node.is_object()) error("node " + std::to_string(i) + " is not an object");
    const json::Value* op = node.find("op");
    const json::Value* out = node.find("out");
    const json::Value* in = node.find("in");
    const std::string where =
        "node " + std::to_string(i) + " (" + short_repr(op) + " -> " + short_repr(out) + ")";
    const OpSpec* spec = op && op->is_string() ? find_op(op->as_string()) : nullptr;
    if (!spec) error(where + ": unknown layer type " + short_repr(op) + "; known: " + known_ops_repr());
    if (!out || !out->is_string() || defined.count(out->as_string())) {
      error(where + ": its output must be a new value name");
    }
    if (spec->since > file_version) {
      error(where + ": " + spec->name + " needs format version " + std::to_string(spec->since) +
            ", the file says " + short_repr(version));
    }
    bool inputs_ok = in && in->is_array() && static_cast<int>(in->items().size()) >= spec->min_in &&
                     static_cast<int>(in->items().size()) <= spec->max_in;
    if (inputs_ok) {
      for (const json::Value& v : in->items()) inputs_ok = inputs_ok && v.is_string();
    }
    if (!inputs_ok) {
      error(where + ": needs " + std::to_string(spec->min_in) + ".." + std::to_string(spec->max_in) +
            " input names, got " + short_repr(in));
    }
    std::vector<json::Value> undefined;
    for (const json::Value& v : in->items()) {
      if (!defined.count(v.as_string())) undefined.push_back(v);
    }
    if (!undefined.empty()) {
      error(where + ": reads " + repr(json::Value::array(undefined)) + ", not defined by an earlier node");
    }
    if ((std::string(spec->name) == "output") != (i == items.size() - 1)) {
      error(where + ": the graph must end with its one 'output' node");
    }
    if (std::string(spec->name) == "output" && out->as_string() != "output") {
      error(where + ": the output node's value must be named 'output'");
    }
    defined.insert(out->as_string());
  }
}

// ------------------------------------------------------------ attributes
struct Attrs {
  std::map<std::string, const json::Value*> raw;
  std::map<std::string, std::array<int64_t, 2>> pairs;
  std::map<std::string, double> numbers;  // ints and floats
  std::map<std::string, bool> flags;
  std::map<std::string, std::string> texts;
  std::map<std::string, const TensorRef*> tensors;  // null: absent
};

[[noreturn]] void node_fail(const std::string& op, const json::Value& node, const std::string& why) {
  error(op + " node " + short_repr(node.find("out")) + ": " + why);
}

Attrs read_attrs(const OpSpec& op, const json::Value& node, const Tensors& tensors) {
  Attrs a;
  for (int k = 0; k < op.n_attrs; ++k) {
    const AttrSpec& s = op.attrs[k];
    const json::Value* v = node.find(s.name);
    const bool absent = !v || v->is_null();
    if (absent && s.has_default == Default::kRequired)
      node_fail(op.name, node, std::string(s.name) + " is missing");
    if (absent && s.has_default == Default::kNone) {
      a.tensors[s.name] = nullptr;
      continue;
    }
    if (s.kind == AttrKind::kTensor) {
      if (!v->is_string() || !tensors.count(v->as_string())) {
        node_fail(op.name, node, std::string(s.name) + " names no tensor of the file: " + short_repr(v));
      }
      const TensorRef& t = tensors.at(v->as_string());
      int64_t length = -1;
      if (*s.length_attr) {
        if (s.length_dim >= 0) {
          auto ref = a.tensors.find(s.length_attr);
          if (ref != a.tensors.end() && ref->second) length = ref->second->shape[s.length_dim];
        } else if (a.numbers.count(s.length_attr)) {
          length = static_cast<int64_t>(a.numbers[s.length_attr]);
        }
      }
      if (t.dtype != s.dtype || static_cast<int>(t.shape.size()) != s.dims ||
          (length >= 0 && t.shape[0] != length)) {
        const char* want = s.dtype == DType::kInt32 ? "torch.int32" : "torch.float32";
        const char* got = t.dtype == DType::kInt32 ? "torch.int32" : "torch.float32";
        node_fail(op.name, node,
                  std::string(s.name) + " (" + v->as_string() + ") must be " + std::to_string(s.dims) +
                      "-D " + want + (length >= 0 ? " of length " + std::to_string(length) : "") + ", got " +
                      got + " " + tuple(t.shape));
      }
      a.tensors[s.name] = &t;
      continue;
    }
    // the default, or the value (its type checked)
    std::vector<double> checked;
    if (absent) {
      if (s.kind == AttrKind::kPair)
        a.pairs[s.name] = {int64_t(s.default_number), int64_t(s.default_number)};
      else if (s.kind == AttrKind::kBool)
        a.flags[s.name] = s.default_number != 0;
      else if (s.kind == AttrKind::kStr)
        a.texts[s.name] = s.default_text;
      else
        a.numbers[s.name] = s.default_number;
      checked = {s.default_number};
    } else if (s.kind == AttrKind::kPair) {
      const json::Value* one = v;
      if (v->is_array() && v->items().size() == 1) one = &v->items()[0];
      std::array<int64_t, 2> p{};
      if (one->is_int() && !one->is_bool()) {
        p = {one->as_int(), one->as_int()};
      } else if (one->is_array() && one->items().size() == 2 && one->items()[0].is_int() &&
                 one->items()[1].is_int()) {
        p = {one->items()[0].as_int(), one->items()[1].as_int()};
      } else {
        node_fail(op.name, node,
                  std::string(s.name) + " must be an int or a list of one or two ints, got " + repr(*v));
      }
      a.pairs[s.name] = p;
      const json::Value& x = one->is_array() ? one->items()[0] : *one;
      const json::Value& y = one->is_array() ? one->items()[1] : *one;
      checked = {x.as_double(), y.as_double()};
    } else {
      const bool ok =
          (s.kind == AttrKind::kInt && v->is_int()) || (s.kind == AttrKind::kFloat && v->is_number()) ||
          (s.kind == AttrKind::kBool && v->is_bool()) || (s.kind == AttrKind::kStr && v->is_string());
      if (!ok) {
        const char* kind = s.kind == AttrKind::kInt     ? "an int"
                           : s.kind == AttrKind::kFloat ? "a float"
                           : s.kind == AttrKind::kBool  ? "a bool"
                                                        : "a str";
        node_fail(op.name, node, std::string(s.name) + " must be " + kind + ", got " + repr(*v));
      }
      if (s.kind == AttrKind::kStr) {
        a.texts[s.name] = v->as_string();
        std::string choices = s.choices;
        if (!choices.empty()) {
          std::vector<std::string> list;
          std::stringstream ss(choices);
          for (std::string c; std::getline(ss, c, '|');) list.push_back(c);
          bool found = false;
          std::string said;
          for (size_t i = 0; i < list.size(); ++i) {
            found = found || list[i] == v->as_string();
            said += (i ? " or " : "") + repr_str(list[i]);
          }
          if (!found)
            node_fail(op.name, node, std::string(s.name) + " must be " + said + ", got " + repr(*v));
        }
      } else if (s.kind == AttrKind::kBool) {
        a.flags[s.name] = v->as_bool();
      } else {
        a.numbers[s.name] = v->as_double();
        checked = {v->as_double()};
      }
    }
    const std::string shown =
        absent ? ""
               : (s.kind == AttrKind::kPair ? "(" + std::to_string(a.pairs[s.name][0]) + ", " +
                                                  std::to_string(a.pairs[s.name][1]) + ")"
                                            : repr(*v));
    for (double x : checked) {
      if (!std::isnan(s.low) && x < s.low)
        node_fail(op.name, node, std::string(s.name) + " must be >= " + g(s.low) + ", got " + shown);
      if (!std::isnan(s.high) && x > s.high)
        node_fail(op.name, node, std::string(s.name) + " must be <= " + g(s.high) + ", got " + shown);
    }
  }
  // the table's per-op checks (OpDef.check)
  const std::string name = op.name;
  if (name == "conv2d") {
    const int64_t o = a.tensors["weight"]->shape[0], groups = static_cast<int64_t>(a.numbers["groups"]);
    if (o % groups)
      node_fail(op.name, node,
                "groups " + std::to_string(groups) + " does not divide the " + std::to_string(o) +
                    " output channels");
  } else if (name == "binary_conv") {
    const TensorRef* w = a.tensors["weight"];
    const int64_t c = static_cast<int64_t>(a.numbers["in_channels"]);
    if (w->shape[3] != (c + 31) / 32)
      node_fail(op.name, node,
                "weight " + tuple(w->shape) + " is not packed for " + std::to_string(c) + " input channels");
  } else if (name == "hardtanh") {
    if (!(a.numbers["min_val"] < a.numbers["max_val"])) {
      node_fail(op.name, node,
                "min_val (" + json::python_float_repr(a.numbers["min_val"]) + ") must be below max_val (" +
                    json::python_float_repr(a.numbers["max_val"]) + ")");
    }
  }
  return a;
}

// ------------------------------------------------------------ shapes
struct Val {
  std::vector<int64_t> shape;
  bool packed = false;
  bool spatial() const { return shape.size() == 3; }
};

struct ShapeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int64_t floor_div(int64_t a, int64_t b) {
  return a / b - ((a % b != 0) && ((a < 0) != (b < 0)));
}

int64_t window(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d = 1, bool ceil = false) {
  const int64_t span = size + 2 * p - d * (k - 1) - 1;
  int64_t out = ceil ? -floor_div(-span, s) + 1 : floor_div(span, s) + 1;
  if (ceil && (out - 1) * s >= size + p) --out;
  if (out < 1) {
    throw ShapeError("the window (" + std::to_string(k) + ", dilation " + std::to_string(d) +
                     ") does not fit the padded input (" + std::to_string(size) + " + 2 x " +
                     std::to_string(p) + ")");
  }
  return out;
}

const std::vector<int64_t>& spatial(const std::vector<Val>& ins) {
  if (!ins[0].spatial())
    throw ShapeError("needs a feature map (C, H, W), got a value of shape " + tuple(ins[0].shape));
  return ins[0].shape;
}

void floats(const std::vector<Val>& ins) {
  for (const Val& v : ins) {
    if (v.packed) throw ShapeError("reads packed bits where it needs floats");
  }
}

std::string pair_repr(const std::array<int64_t, 2>& p) {
  return "(" + std::to_string(p[0]) + ", " + std::to_string(p[1]) + ")";
}

Val infer(const std::string& op, Attrs& a, const std::vector<Val>& ins) {
  if (op == "conv2d") {
    floats(ins);
    const auto& s = spatial(ins);
    const TensorRef* w = a.tensors["weight"];
    const int64_t groups = static_cast<int64_t>(a.numbers["groups"]);
    if (s[0] != w->shape[1] * groups)
      throw ShapeError("weight expects " + std::to_string(w->shape[1] * groups) + " input channels, got " +
                       std::to_string(s[0]));
    const auto st = a.pairs["stride"], p = a.pairs["padding"], d = a.pairs["dilation"];
    return {{w->shape[0], window(s[1], w->shape[2], st[0], p[0], d[0]),
             window(s[2], w->shape[3], st[1], p[1], d[1])}};
  }
  if (op == "batch_norm" || op == "rprelu") {
    floats(ins);
    const int64_t n = a.tensors["weight"]->shape[0], c = ins[0].shape[0];
    if (n != c)
      throw ShapeError("weight has " + std::to_string(n) + " values for " + std::to_string(c) + " channels");
    return {ins[0].shape};
  }
  if (op == "max_pool2d" || op == "avg_pool2d") {
    floats(ins);
    const auto& s = spatial(ins);
    const auto k = a.pairs["kernel"], st = a.pairs["stride"], p = a.pairs["padding"];
    if (p[0] * 2 > k[0] || p[1] * 2 > k[1])
      throw ShapeError("padding " + pair_repr(p) + " must be at most half the kernel " + pair_repr(k));
    const bool ceil = op == "avg_pool2d" && a.flags["ceil_mode"];
    return {{s[0], window(s[1], k[0], st[0], p[0], 1, ceil), window(s[2], k[1], st[1], p[1], 1, ceil)}};
  }
  if (op == "binary_conv") {
    const auto& s = spatial(ins);
    const int64_t c = static_cast<int64_t>(a.numbers["in_channels"]);
    if (s[0] != c)
      throw ShapeError("expects " + std::to_string(c) + " input channels, got " + std::to_string(s[0]));
    if (ins[0].packed && a.tensors["input_bias"])
      throw ShapeError("has an input_bias, so it needs float input, got packed bits");
    const TensorRef* w = a.tensors["weight"];
    const auto st = a.pairs["stride"], p = a.pairs["padding"], d = a.pairs["dilation"];
    Val out{{w->shape[0], window(s[1], w->shape[1], st[0], p[0], d[0]),
             window(s[2], w->shape[2], st[1], p[1], d[1])},
            a.texts["output"] == "packed"};
    if (ins.size() == 2) {
      if (ins[1].packed || ins[1].shape != out.shape)
        throw ShapeError("residual of shape " + tuple(ins[1].shape) + " does not match the output " +
                         tuple(out.shape));
      if (out.packed) throw ShapeError("a residual with packed output");
    }
    return out;
  }
  if (op == "add") {
    floats(ins);
    for (const Val& v : ins) {
      if (v.shape != ins[0].shape) {
        std::string list = "[";
        for (size_t i = 0; i < ins.size(); ++i) list += (i ? ", " : "") + tuple(ins[i].shape);
        throw ShapeError("inputs of different shapes " + list + "]");
      }
    }
    return {ins[0].shape};
  }
  if (op == "concat") {
    floats(ins);
    std::vector<std::vector<int64_t>> shapes;
    for (const Val& v : ins) shapes.push_back(spatial({v}));
    int64_t c = 0;
    for (const auto& s : shapes) {
      if (s[1] != shapes[0][1] || s[2] != shapes[0][2]) {
        std::string list = "[";
        for (size_t i = 0; i < shapes.size(); ++i) list += (i ? ", " : "") + tuple(shapes[i]);
        throw ShapeError("inputs of different spatial sizes " + list + "]");
      }
      c += s[0];
    }
    return {{c, shapes[0][1], shapes[0][2]}};
  }
  if (op == "prelu") {
    floats(ins);
    const int64_t n = a.tensors["weight"]->shape[0], c = ins[0].shape[0];
    if (n != 1 && n != c)
      throw ShapeError("weight has " + std::to_string(n) + " values for " + std::to_string(c) +
                       " channels (1 or one per channel)");
    return {ins[0].shape};
  }
  if (op == "global_avg_pool") {
    floats(ins);
    return {{spatial(ins)[0]}};
  }
  if (op == "adaptive_avg_pool2d") {
    floats(ins);
    const auto size = a.pairs["output_size"];
    return {{spatial(ins)[0], size[0], size[1]}};
  }
  if (op == "flatten") {
    floats(ins);
    int64_t n = 1;
    for (int64_t s : ins[0].shape) n *= s;
    return {{n}};
  }
  if (op == "linear") {
    floats(ins);
    const TensorRef* w = a.tensors["weight"];
    if (ins[0].shape.size() != 1 || ins[0].shape[0] != w->shape[1])
      throw ShapeError("weight expects " + std::to_string(w->shape[1]) + " features, got a value of shape " +
                       tuple(ins[0].shape));
    return {{w->shape[0]}};
  }
  floats(ins);  // hardtanh, relu, leaky_relu, output
  return {ins[0].shape};
}

bool finite_numbers(const json::Value* v, size_t n) {
  if (!v || !v->is_array() || v->items().size() != n) return false;
  for (const json::Value& x : v->items()) {
    if (!x.is_number() || x.is_bool() || !std::isfinite(x.as_double())) return false;
  }
  return true;
}

void check_header(const json::Value& header) {
  const json::Value* spec = header.find("input");
  const json::Value* c = spec ? spec->find("channels") : nullptr;
  const json::Value* s = spec ? spec->find("size") : nullptr;
  const json::Value* mean = spec ? spec->find("mean") : nullptr;
  const json::Value* std_ = spec ? spec->find("std") : nullptr;
  bool ok = c && s && mean && std_ && c->fits_int64() && s->fits_int64() && c->as_int() >= 1 &&
            c->as_int() <= kMaxChannels && s->as_int() >= 1 && s->as_int() <= kMaxSide &&
            finite_numbers(mean, c->as_int()) && finite_numbers(std_, c->as_int());
  if (ok) {
    for (const json::Value& x : std_->items()) ok = ok && x.as_double() != 0;
  }
  if (!ok) {
    error("input must give channels (1.." + std::to_string(kMaxChannels) + "), size (1.." +
          std::to_string(kMaxSide) + ") and one mean and one nonzero std per channel (finite numbers), got " +
          short_repr(spec));
  }
  const int64_t ch = c->as_int(), size = s->as_int();
  if (ch * size * size > kMaxValueElements) {
    error("input " + std::to_string(ch) + "x" + std::to_string(size) + "x" + std::to_string(size) +
          " is not a plausible image size (at most " + std::to_string(kMaxValueElements) + " values)");
  }
  const json::Value* names = header.find("class_names");
  bool names_ok = names && names->is_array() && !names->items().empty() && names->items().size() <= 1000000;
  if (names_ok) {
    for (const json::Value& n : names->items()) names_ok = names_ok && n.is_string();
  }
  if (!names_ok) error("class_names must be a list of strings, got " + short_repr(names));
}

}  // namespace

void check_artifact(const json::Value& header, const Tensors& tensors) {
  check_graph(header);
  check_header(header);
  const json::Value* spec = header.find("input");
  const int64_t c = spec->find("channels")->as_int(), size = spec->find("size")->as_int();
  std::map<std::string, Val> values{{"input", {{c, size, size}}}};
  const std::string image =
      "(1, " + std::to_string(c) + ", " + std::to_string(size) + ", " + std::to_string(size) + ")";
  for (const json::Value& node : header.find("nodes")->items()) {
    const OpSpec& op = *find_op(node.find("op")->as_string());
    Attrs a = read_attrs(op, node, tensors);
    std::vector<Val> ins;
    for (const json::Value& v : node.find("in")->items()) ins.push_back(values.at(v.as_string()));
    Val out;
    try {
      out = infer(op.name, a, ins);
    } catch (const ShapeError& e) {
      node_fail(op.name, node, "fails on a " + image + " input: " + e.what());
    }
    int64_t elements = 1;
    bool bad = false;
    for (int64_t s : out.shape) {
      elements *= s;
      bad = bad || s < 1 || elements > kMaxValueElements;
    }
    if (bad) {
      node_fail(op.name, node,
                "its output " + tuple(out.shape) + " per image is not a plausible size (at most " +
                    std::to_string(kMaxValueElements) + " elements)");
    }
    values[node.find("out")->as_string()] = out;
  }
  const Val& logits = values["output"];
  const int64_t classes = static_cast<int64_t>(header.find("class_names")->items().size());
  if (logits.packed || logits.shape != std::vector<int64_t>{classes}) {
    error("the graph's output per image is " + tuple(logits.shape) + (logits.packed ? " (packed bits)" : "") +
          ", expected " + std::to_string(classes) + " logits (one per class name)");
  }
}

namespace {

// ------------------------------------------------------------ the container
struct RawTensor {
  std::string dtype;  // safetensors' name
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

int dtype_size(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "I8" || d == "U8" || d == "BOOL") return 1;
  return 0;
}

std::string torch_dtype(const std::string& d) {
  static const std::map<std::string, std::string> names = {
      {"F64", "torch.float64"},   {"F32", "torch.float32"}, {"F16", "torch.float16"},
      {"BF16", "torch.bfloat16"}, {"I64", "torch.int64"},   {"I32", "torch.int32"},
      {"I16", "torch.int16"},     {"I8", "torch.int8"},     {"U8", "torch.uint8"},
      {"BOOL", "torch.bool"},     {"U16", "torch.uint16"},  {"U32", "torch.uint32"},
      {"U64", "torch.uint64"}};
  auto it = names.find(d);
  return it == names.end() ? d : it->second;
}

std::map<std::string, RawTensor> tensor_table(const json::Value& outer, size_t data_size) {
  std::map<std::string, RawTensor> out;
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (const auto& [name, v] : outer.members()) {
    if (name == "__metadata__") continue;
    const json::Value* dtype = v.find("dtype");
    const json::Value* shape = v.find("shape");
    const json::Value* offsets = v.find("data_offsets");
    if (!dtype || !dtype->is_string() || !dtype_size(dtype->as_string()) || !shape || !shape->is_array() ||
        !offsets || !offsets->is_array() || offsets->items().size() != 2 ||
        !offsets->items()[0].fits_int64() || !offsets->items()[1].fits_int64()) {
      throw std::runtime_error("tensor " + name + ": bad entry");
    }
    RawTensor t;
    t.dtype = dtype->as_string();
    uint64_t n = 1;
    for (const json::Value& s : shape->items()) {
      if (!s.fits_int64() || s.as_int() < 0 || s.as_int() > (int64_t{1} << 40))
        throw std::runtime_error("tensor " + name + ": bad shape");
      t.shape.push_back(s.as_int());
      n *= static_cast<uint64_t>(s.as_int());
      if (n > (uint64_t{1} << 40)) throw std::runtime_error("tensor " + name + ": bad shape");
    }
    const int64_t b = offsets->items()[0].as_int(), e = offsets->items()[1].as_int();
    if (b < 0 || e < b || static_cast<uint64_t>(e) > data_size)
      throw std::runtime_error("tensor " + name + ": offsets past the data");
    t.begin = static_cast<uint64_t>(b);
    t.end = static_cast<uint64_t>(e);
    if (n * dtype_size(t.dtype) != t.end - t.begin)
      throw std::runtime_error("tensor " + name + ": size does not match its shape");
    spans.push_back({t.begin, t.end});
    out[name] = std::move(t);
  }
  std::sort(spans.begin(), spans.end());
  uint64_t at = 0;
  for (const auto& [b, e] : spans) {
    if (b != at) throw std::runtime_error("tensor data offsets overlap or leave gaps");
    at = e;
  }
  if (at != data_size) throw std::runtime_error("the data is longer than its tensors");
  return out;
}

}  // namespace

Artifact read_artifact_bytes(const uint8_t* data, size_t size, const std::string& name) {
  const std::string at = name + ": ";
  if (size < 8) error(at + "truncated (" + std::to_string(size) + " bytes): not a ctmq artifact");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > size - 8) {
    error(at + "truncated: its header claims " + std::to_string(n) + " bytes, the file has " +
          std::to_string(size - 8));
  }
  const std::string outer_text(reinterpret_cast<const char*>(data + 8), n);
  json::Value outer, header;
  try {
    outer = json::parse(outer_text);
    const json::Value* meta = outer.find("__metadata__");
    const json::Value* text = meta ? meta->find("ctmq") : nullptr;
    if (!outer.is_object() || (meta && !meta->is_object()) || !text || !text->is_string()) {
      throw json::ParseError("no ctmq metadata");
    }
    header = json::parse(text->as_string());
    if (!header.is_object()) throw json::ParseError("not an object");
  } catch (const json::ParseError&) {
    error(at + "no readable ctmq header (corrupt, or not exported by ctmq)");
  }
  const json::Value* format = header.find("format");
  if (!format || !format->is_string() || format->as_string() != "ctmq-binary") {
    error(at + "format " + short_repr(format) + ", expected 'ctmq-binary'");
  }
  // Python: an int (not bool) >= 1, and at most this reader's version
  const json::Value* version = header.find("version");
  const bool negative = is_int(version) && !version->fits_int64() && version->as_string()[0] == '-';
  if (!is_int(version) || negative || (version->fits_int64() && version->as_int() < 1)) {
    error(at + "format version " + short_repr(version) + " is not a version number");
  }
  if (!version->fits_int64() || version->as_int() > kFormatVersion) {
    error(at + "format version " + repr(*version) + " is newer than this ctmq reads (" +
          std::to_string(kFormatVersion) + "); upgrade ctmq");
  }
  try {
    check_graph(header);
  } catch (const ArtifactError& e) {
    error(at + e.what());
  }
  const uint8_t* body = data + 8 + n;
  const size_t body_size = size - 8 - n;
  std::map<std::string, RawTensor> raw;
  try {
    raw = tensor_table(outer, body_size);
  } catch (const std::runtime_error& e) {
    error(at + "corrupt tensor data (" + e.what() + ")");
  }
  // the checksum: the header but its checksum as Python's json.dumps(sort_keys=True),
  // then per tensor in name order "name|dtype|shape|" and its bytes
  std::map<std::string, json::Value> members = header.members();
  members.erase("checksum");
  Sha256 h;
  h.update(json::Value::object(members).dump());
  for (const auto& [tname, t] : raw) {
    h.update(tname + "|" + torch_dtype(t.dtype) + "|" + tuple(t.shape) + "|");
    h.update(body + t.begin, t.end - t.begin);
  }
  const json::Value* checksum = header.find("checksum");
  if (!checksum || !checksum->is_string() || checksum->as_string() != h.hex()) {
    error(at + "checksum mismatch: the file was changed or damaged");
  }
  Artifact art;
  art.header = header;
  size_t total = 0;
  for (const auto& [tname, t] : raw) total += (t.end - t.begin + 63) / 64 * 64;
  art.storage = std::make_shared<std::vector<uint8_t>>(total + 64);
  uint8_t* base = art.storage->data();
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  for (const auto& [tname, t] : raw) {
    if (t.dtype != "F32" && t.dtype != "I32") continue;  // no op reads another dtype
    std::memcpy(base, body + t.begin, t.end - t.begin);
    art.tensors[tname] = {t.dtype == "F32" ? DType::kFloat32 : DType::kInt32, t.shape, base};
    base += (t.end - t.begin + 63) / 64 * 64;
  }
  try {
    check_artifact(header, art.tensors);
  } catch (const ArtifactError& e) {
    error(at + e.what());
  }
  const json::Value* spec = header.find("input");
  art.channels = spec->find("channels")->as_int();
  art.size = spec->find("size")->as_int();
  for (const json::Value& v : spec->find("mean")->items())
    art.mean.push_back(static_cast<float>(v.as_double()));
  for (const json::Value& v : spec->find("std")->items())
    art.std.push_back(static_cast<float>(v.as_double()));
  for (const json::Value& v : header.find("class_names")->items()) art.class_names.push_back(v.as_string());
  return art;
}

Artifact read_artifact_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) error(path + ": cannot read (" + std::strerror(errno) + ")");
  std::vector<uint8_t> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return read_artifact_bytes(blob.data(), blob.size(), path);
}

}  // namespace rt
}  // namespace ctmq
