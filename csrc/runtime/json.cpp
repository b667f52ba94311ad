// See json.h. Parsing follows Python's json.loads where the artifact reader
// depends on it (NaN/Infinity literals, the last of duplicate keys wins,
// integers of any size), so that both readers accept and hash the same
// headers; strings hold UTF-8 (lone surrogates from \u escapes as their
// three-byte forms, as Python keeps them).
#include "json.h"

#include <charconv>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <system_error>

namespace ctmq {
namespace json {

Value Value::boolean(bool b) {
  Value v;
  v.kind_ = Kind::kBool;
  v.b_ = b;
  return v;
}

Value Value::integer(int64_t i) {
  Value v;
  v.kind_ = Kind::kInt;
  v.i_ = i;
  v.s_ = std::to_string(i);
  return v;
}

Value Value::big_integer(std::string digits) {
  Value v;
  v.kind_ = Kind::kInt;
  v.big_ = true;
  v.i_ = digits[0] == '-' ? INT64_MIN : INT64_MAX;
  v.d_ = std::strtod(digits.c_str(), nullptr);
  v.s_ = std::move(digits);
  return v;
}

Value Value::number(double d) {
  Value v;
  v.kind_ = Kind::kFloat;
  v.d_ = d;
  return v;
}

Value Value::string(std::string s) {
  Value v;
  v.kind_ = Kind::kString;
  v.s_ = std::move(s);
  return v;
}

Value Value::array(std::vector<Value> items) {
  Value v;
  v.kind_ = Kind::kArray;
  v.a_ = std::make_shared<std::vector<Value>>(std::move(items));
  return v;
}

Value Value::object(std::map<std::string, Value> members) {
  Value v;
  v.kind_ = Kind::kObject;
  v.o_ = std::make_shared<std::map<std::string, Value>>(std::move(members));
  return v;
}

const Value* Value::find(const std::string& key) const {
  if (kind_ != Kind::kObject) return nullptr;
  auto it = o_->find(key);
  return it == o_->end() ? nullptr : &it->second;
}

// ------------------------------------------------------------------ parser
namespace {

class Parser {
 public:
  Parser(const std::string& text, const Limits& limits) : t_(text), limits_(limits) {}

  Value document() {
    if (t_.size() > limits_.max_bytes) fail("text longer than the limit");
    skip_space();
    Value v = value(0);
    skip_space();
    if (pos_ != t_.size()) fail("extra data after the value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw ParseError(why + " at byte " + std::to_string(pos_));
  }

  void skip_space() {
    while (pos_ < t_.size() &&
           (t_[pos_] == ' ' || t_[pos_] == '\t' || t_[pos_] == '\n' || t_[pos_] == '\r')) {
      ++pos_;
    }
  }

  bool literal(const char* word) {
    const size_t n = std::strlen(word);
    if (t_.compare(pos_, n, word) == 0) {
      pos_ += n;
      return true;
    }
    return false;
  }

  Value value(size_t depth) {
    if (depth >= limits_.max_depth) fail("nested deeper than " + std::to_string(limits_.max_depth));
    if (pos_ >= t_.size()) fail("unexpected end");
    const char c = t_[pos_];
    if (c == '{') return object(depth);
    if (c == '[') return array(depth);
    if (c == '"') return Value::string(string());
    if (literal("true")) return Value::boolean(true);
    if (literal("false")) return Value::boolean(false);
    if (literal("null")) return Value::null();
    if (literal("NaN")) return Value::number(std::nan(""));
    if (literal("Infinity")) return Value::number(HUGE_VAL);
    if (literal("-Infinity")) return Value::number(-HUGE_VAL);
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    fail("expected a value");
  }

  Value object(size_t depth) {
    ++pos_;  // {
    std::map<std::string, Value> members;
    skip_space();
    if (pos_ < t_.size() && t_[pos_] == '}') {
      ++pos_;
      return Value::object(std::move(members));
    }
    for (;;) {
      skip_space();
      if (pos_ >= t_.size() || t_[pos_] != '"') fail("expected a string key");
      std::string key = string();
      skip_space();
      if (pos_ >= t_.size() || t_[pos_] != ':') fail("expected ':'");
      ++pos_;
      skip_space();
      members[key] = value(depth + 1);  // the last of duplicate keys wins, as in Python
      skip_space();
      if (pos_ < t_.size() && t_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < t_.size() && t_[pos_] == '}') {
        ++pos_;
        return Value::object(std::move(members));
      }
      fail("expected ',' or '}'");
    }
  }

  Value array(size_t depth) {
    ++pos_;  // [
    std::vector<Value> items;
    skip_space();
    if (pos_ < t_.size() && t_[pos_] == ']') {
      ++pos_;
      return Value::array(std::move(items));
    }
    for (;;) {
      skip_space();
      items.push_back(value(depth + 1));
      skip_space();
      if (pos_ < t_.size() && t_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < t_.size() && t_[pos_] == ']') {
        ++pos_;
        return Value::array(std::move(items));
      }
      fail("expected ',' or ']'");
    }
  }

  static void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  uint32_t hex4() {
    if (pos_ + 4 > t_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = t_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9')
        v |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f')
        v |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        v |= static_cast<uint32_t>(c - 'A' + 10);
      else
        fail("bad \\u escape");
    }
    return v;
  }

  // One UTF-8 sequence from the text, checked (as Python's strict decoder).
  void copy_utf8(std::string& out) {
    const auto b0 = static_cast<unsigned char>(t_[pos_]);
    int n = b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : b0 >= 0xC0 ? 2 : 0;
    if (n == 0 || b0 > 0xF4 || b0 == 0xC0 || b0 == 0xC1 || pos_ + n > t_.size()) fail("invalid UTF-8");
    uint32_t cp = b0 & (0x7F >> n);
    for (int i = 1; i < n; ++i) {
      const auto b = static_cast<unsigned char>(t_[pos_ + i]);
      if ((b & 0xC0) != 0x80) fail("invalid UTF-8");
      cp = (cp << 6) | (b & 0x3F);
    }
    const uint32_t min = n == 2 ? 0x80 : n == 3 ? 0x800 : 0x10000;
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) fail("invalid UTF-8");
    out.append(t_, pos_, n);
    pos_ += n;
  }

  std::string string() {
    ++pos_;  // "
    std::string out;
    for (;;) {
      if (pos_ >= t_.size()) fail("unterminated string");
      const char c = t_[pos_];
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (static_cast<unsigned char>(c) >= 0x80) {
        copy_utf8(out);
        continue;
      }
      if (c != '\\') {
        out += c;
        ++pos_;
        continue;
      }
      if (++pos_ >= t_.size()) fail("unterminated escape");
      const char e = t_[pos_++];
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF && t_.compare(pos_, 2, "\\u") == 0) {
            const size_t save = pos_;
            pos_ += 2;
            const uint32_t low = hex4();
            if (low >= 0xDC00 && low <= 0xDFFF)
              cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            else
              pos_ = save;  // a lone high surrogate, as Python keeps it
          }
          put_utf8(out, cp);
          break;
        }
        default:
          fail("bad escape");
      }
    }
  }

  Value number() {
    const size_t start = pos_;
    if (t_[pos_] == '-') ++pos_;
    if (pos_ >= t_.size() || !(t_[pos_] >= '0' && t_[pos_] <= '9')) fail("bad number");
    if (t_[pos_] == '0')
      ++pos_;
    else
      while (pos_ < t_.size() && t_[pos_] >= '0' && t_[pos_] <= '9') ++pos_;
    bool is_float = false;
    if (pos_ < t_.size() && t_[pos_] == '.') {
      is_float = true;
      ++pos_;
      if (pos_ >= t_.size() || !(t_[pos_] >= '0' && t_[pos_] <= '9')) fail("bad number");
      while (pos_ < t_.size() && t_[pos_] >= '0' && t_[pos_] <= '9') ++pos_;
    }
    if (pos_ < t_.size() && (t_[pos_] == 'e' || t_[pos_] == 'E')) {
      is_float = true;
      ++pos_;
      if (pos_ < t_.size() && (t_[pos_] == '+' || t_[pos_] == '-')) ++pos_;
      if (pos_ >= t_.size() || !(t_[pos_] >= '0' && t_[pos_] <= '9')) fail("bad number");
      while (pos_ < t_.size() && t_[pos_] >= '0' && t_[pos_] <= '9') ++pos_;
    }
    const std::string text = t_.substr(start, pos_ - start);
    if (is_float) return Value::number(std::strtod(text.c_str(), nullptr));
    int64_t i = 0;
    const auto res = std::from_chars(text.data(), text.data() + text.size(), i);
    if (res.ec == std::errc() && res.ptr == text.data() + text.size()) return Value::integer(i);
    return Value::big_integer(text);  // beyond int64: Python keeps every digit
  }

  const std::string& t_;
  const Limits& limits_;
  size_t pos_ = 0;
};

}  // namespace

Value parse(const std::string& text, const Limits& limits) {
  return Parser(text, limits).document();
}

// ------------------------------------------------------------------ writer
std::string python_float_repr(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  const std::string sci(buf, res.ptr);  // [-]d[.ddd]e[+-]x: the shortest round trip
  const size_t e = sci.find('e');
  const bool neg = sci[0] == '-';
  std::string digits;
  for (size_t i = neg ? 1 : 0; i < e; ++i) {
    if (sci[i] != '.') digits += sci[i];
  }
  const int exp10 = std::atoi(sci.c_str() + e + 1);
  const int decpt = exp10 + 1;  // digits[0] sits at 10^(decpt - 1)
  const int n = static_cast<int>(digits.size());
  std::string out = neg ? "-" : "";
  if (decpt > -4 && decpt <= 16) {  // Python's 'r' format: fixed notation here
    if (decpt <= 0) {
      out += "0." + std::string(-decpt, '0') + digits;
    } else if (decpt >= n) {
      out += digits + std::string(decpt - n, '0') + ".0";
    } else {
      out += digits.substr(0, decpt) + "." + digits.substr(decpt);
    }
  } else {
    out += digits.substr(0, 1);
    if (n > 1) out += "." + digits.substr(1);
    const int x = decpt - 1;
    char ebuf[16];
    std::snprintf(ebuf, sizeof(ebuf), "e%c%02d", x < 0 ? '-' : '+', x < 0 ? -x : x);
    out += ebuf;
  }
  return out;
}

namespace {

// Decode one UTF-8 sequence (well formed: the parser checked it, or it holds
// a surrogate's three-byte form) into a code point.
uint32_t next_code_point(const std::string& s, size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  const int n = b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : b0 >= 0xC0 ? 2 : 1;
  uint32_t cp = n == 1 ? b0 : b0 & (0x7F >> n);
  for (int k = 1; k < n && i + k < s.size(); ++k) cp = (cp << 6) | (s[i + k] & 0x3F);
  i += n;
  return cp;
}

void write_string(std::string& out, const std::string& s) {
  static const char* hex = "0123456789abcdef";
  auto u = [&](uint32_t v) {
    out += "\\u";
    for (int shift = 12; shift >= 0; shift -= 4) out += hex[(v >> shift) & 0xF];
  };
  out += '"';
  for (size_t i = 0; i < s.size();) {
    const uint32_t cp = next_code_point(s, i);
    switch (cp) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (cp < 0x20 || (cp > 0x7E && cp < 0x10000)) {
          u(cp);
        } else if (cp >= 0x10000) {  // a surrogate pair, as Python's ensure_ascii
          const uint32_t v = cp - 0x10000;
          u(0xD800 + (v >> 10));
          u(0xDC00 + (v & 0x3FF));
        } else {
          out += static_cast<char>(cp);
        }
    }
  }
  out += '"';
}

void write(std::string& out, const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kNull:
      out += "null";
      break;
    case Value::Kind::kBool:
      out += v.as_bool() ? "true" : "false";
      break;
    case Value::Kind::kInt:
      out += v.fits_int64() ? std::to_string(v.as_int()) : v.as_string();
      break;
    case Value::Kind::kFloat:
      out += python_float_repr(v.as_double());
      break;
    case Value::Kind::kString:
      write_string(out, v.as_string());
      break;
    case Value::Kind::kArray: {
      out += '[';
      bool first = true;
      for (const Value& item : v.items()) {
        if (!first) out += ", ";
        first = false;
        write(out, item);
      }
      out += ']';
      break;
    }
    case Value::Kind::kObject: {
      out += '{';
      bool first = true;
      for (const auto& [key, item] : v.members()) {  // std::map: sorted by code point
        if (!first) out += ", ";
        first = false;
        write_string(out, key);
        out += ": ";
        write(out, item);
      }
      out += '}';
      break;
    }
  }
}

}  // namespace

std::string Value::dump() const {
  std::string out;
  write(out, *this);
  return out;
}

}  // namespace json
}  // namespace ctmq
