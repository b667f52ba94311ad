// Typed, checked access to a header node's attributes (executor.h). The
// artifact's own checks (ctmq/artifact/vocabulary.py and the native loader)
// run before; these keep the executor safe on any input regardless.
#include <cmath>
#include <stdexcept>

#include "executor.h"

namespace ctmq {
namespace rt {

int64_t TensorRef::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::kNCHW:
      return "nchw";
    case Layout::kNHWC:
      return "nhwc";
    case Layout::kPacked:
      return "packed";
    case Layout::kFlat:
      return "flat";
  }
  return "?";
}

void fail(const std::string& op, const std::string& out, const std::string& why) {
  throw std::invalid_argument(op + " node '" + out + "': " + why);
}

Node::Node(const json::Value& node, const Tensors& tensors) : node_(node), tensors_(tensors) {
  const json::Value* op = node.find("op");
  const json::Value* out = node.find("out");
  const json::Value* in = node.find("in");
  if (!op || !op->is_string() || !out || !out->is_string() || !in || !in->is_array()) {
    throw std::invalid_argument("a node lacks its op, out or in");
  }
  op_ = op->as_string();
  out_ = out->as_string();
  for (const json::Value& v : in->items()) {
    if (!v.is_string()) rt::fail(op_, out_, "its inputs must be value names");
    in_.push_back(v.as_string());
  }
}

bool Node::has(const char* key) const {
  const json::Value* v = node_.find(key);
  return v && !v->is_null();
}

int64_t Node::integer(const char* key, const int64_t* fallback) const {
  const json::Value* v = node_.find(key);
  if ((!v || v->is_null()) && fallback) return *fallback;
  if (!v || !v->fits_int64()) fail(std::string(key) + " must be an int");
  return v->as_int();
}

double Node::number(const char* key, const double* fallback) const {
  const json::Value* v = node_.find(key);
  if ((!v || v->is_null()) && fallback) return *fallback;
  if (!v || !v->is_number()) fail(std::string(key) + " must be a float");
  return v->as_double();
}

bool Node::boolean(const char* key, bool fallback) const {
  const json::Value* v = node_.find(key);
  if (!v || v->is_null()) return fallback;
  if (!v->is_bool()) fail(std::string(key) + " must be a bool");
  return v->as_bool();
}

std::string Node::text(const char* key) const {
  const json::Value* v = node_.find(key);
  if (!v || !v->is_string()) fail(std::string(key) + " must be a str");
  return v->as_string();
}

std::array<int64_t, 2> Node::pair(const char* key, int64_t low,
                                  const std::array<int64_t, 2>* fallback) const {
  const json::Value* v = node_.find(key);
  if ((!v || v->is_null()) && fallback) return *fallback;
  std::array<int64_t, 2> out{};
  if (v && v->fits_int64()) {
    out = {v->as_int(), v->as_int()};
  } else if (v && v->is_array() && (v->items().size() == 1 || v->items().size() == 2) &&
             v->items()[0].fits_int64() && v->items().back().fits_int64()) {
    out = {v->items()[0].as_int(), v->items().back().as_int()};
  } else {
    fail(std::string(key) + " must be an int or a list of one or two ints");
  }
  if (out[0] < low || out[1] < low) fail(std::string(key) + " must be >= " + std::to_string(low));
  if (out[0] > (int64_t{1} << 30) || out[1] > (int64_t{1} << 30)) {
    fail(std::string(key) + " must be <= 2^30");
  }
  return out;
}

const TensorRef* Node::tensor(const char* key, int dims, DType dtype, bool optional, int64_t length) const {
  const json::Value* v = node_.find(key);
  if ((!v || v->is_null()) && optional) return nullptr;
  if (!v || !v->is_string()) fail(std::string(key) + " names no tensor of the file");
  auto it = tensors_.find(v->as_string());
  if (it == tensors_.end()) fail(std::string(key) + " names no tensor of the file: '" + v->as_string() + "'");
  const TensorRef& t = it->second;
  if (t.dtype != dtype || static_cast<int>(t.shape.size()) != dims || (length >= 0 && t.shape[0] != length)) {
    fail(std::string(key) + " (" + v->as_string() + ") has the wrong dtype or shape");
  }
  return &t;
}

}  // namespace rt
}  // namespace ctmq
