// A strict JSON reader for artifact headers (RFC 8259: objects, arrays,
// strings with escapes, numbers, true, false, null), bounded in depth and
// size, and the canonical writer the artifact checksum hashes: Python's
// json.dumps(value, sort_keys=True) byte for byte (", " and ": " separators,
// ASCII output with \uXXXX escapes, floats in Python's repr). Torch-free.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ctmq {
namespace json {

struct ParseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Value {
 public:
  enum class Kind { kNull, kBool, kInt, kFloat, kString, kArray, kObject };

  Value() = default;
  static Value null() { return Value(); }
  static Value boolean(bool b);
  static Value integer(int64_t i);
  static Value big_integer(std::string digits);  // beyond int64: kept as its digits
  static Value number(double d);                 // a float (written with a decimal point or exponent)
  static Value string(std::string s);
  static Value array(std::vector<Value> items);
  static Value object(std::map<std::string, Value> members);

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::kNull; }
  bool is_bool() const { return kind_ == Kind::kBool; }
  bool is_int() const { return kind_ == Kind::kInt; }
  bool fits_int64() const { return kind_ == Kind::kInt && !big_; }
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kFloat; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_array() const { return kind_ == Kind::kArray; }
  bool is_object() const { return kind_ == Kind::kObject; }

  bool as_bool() const { return b_; }
  int64_t as_int() const { return i_; }  // fits_int64() first
  double as_double() const { return kind_ == Kind::kInt && !big_ ? static_cast<double>(i_) : d_; }
  const std::string& as_string() const { return s_; }
  const std::vector<Value>& items() const { return *a_; }
  const std::map<std::string, Value>& members() const { return *o_; }

  // The member `key` of an object, or nullptr (also for a non-object).
  const Value* find(const std::string& key) const;

  // Canonical text: Python's json.dumps(value, sort_keys=True).
  std::string dump() const;

 private:
  Kind kind_ = Kind::kNull;
  bool b_ = false;
  bool big_ = false;
  int64_t i_ = 0;
  double d_ = 0;
  std::string s_;
  std::shared_ptr<std::vector<Value>> a_;
  std::shared_ptr<std::map<std::string, Value>> o_;
};

struct Limits {
  size_t max_depth = 64;
  size_t max_bytes = size_t{64} << 20;
};

// The value of a whole JSON text; ParseError says where and why. Integers
// that fit int64 are ints, other numbers floats; duplicate keys are errors.
Value parse(const std::string& text, const Limits& limits = Limits{});

// Python's repr of a float (the shortest text that reads back the same).
std::string python_float_repr(double d);

}  // namespace json
}  // namespace ctmq
