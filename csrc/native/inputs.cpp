// See inputs.h. The conversions are Pillow's arithmetic (ITU-R 601-2 luma in
// 16-bit fixed point; the bilinear filter widened by the scale factor when
// shrinking, its weights normalized and rounded to 22 fractional bits), the
// width resized first, then the height, as `ctmq infer` does, so that a PNG
// gives the same normalized pixels here as there.
#include "inputs.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_HDR
#define STBI_NO_LINEAR
#define STBI_NO_PSD
#define STBI_NO_TGA
#define STBI_NO_PIC
#define STBI_NO_PNM
#define STBI_FAILURE_USERMSG
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#endif
#include "third_party/stb_image.h"
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

namespace ctmq {
namespace native {
namespace {

constexpr int kPrecision = 22;  // fractional bits of the fixed-point weights

struct Weights {
  int ksize = 0;
  std::vector<int> first, count;  // per output pixel: the first input pixel and how many
  std::vector<int32_t> k;         // count weights per output pixel (ksize apart)
};

Weights weights(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 1.0 * filterscale;  // the bilinear filter reaches 1 input pixel
  Weights w;
  w.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  w.first.resize(out_size);
  w.count.resize(out_size);
  w.k.assign(static_cast<size_t>(out_size) * w.ksize, 0);
  std::vector<double> kk(w.ksize);
  const double ss = 1.0 / filterscale;  // multiplied, not divided: Pillow's rounding
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    int xmin = static_cast<int>(center - support + 0.5);
    int xmax = static_cast<int>(center + support + 0.5);
    xmin = xmin < 0 ? 0 : xmin;
    xmax = (xmax > in_size ? in_size : xmax) - xmin;
    double total = 0.0;
    for (int x = 0; x < xmax; ++x) {
      double t = (x + xmin - center + 0.5) * ss;
      t = t < 0 ? -t : t;
      kk[x] = t < 1.0 ? 1.0 - t : 0.0;
      total += kk[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = total != 0.0 ? kk[x] / total : kk[x];
      w.k[static_cast<size_t>(xx) * w.ksize + x] =
          static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecision) : 0.5 + v * (1 << kPrecision));
    }
    w.first[xx] = xmin;
    w.count[xx] = xmax;
  }
  return w;
}

inline uint8_t clip8(int32_t v) {
  const int32_t x = v >> kPrecision;
  return static_cast<uint8_t>(x < 0 ? 0 : (x > 255 ? 255 : x));
}

}  // namespace

std::vector<uint8_t> resize_bilinear(const std::vector<uint8_t>& in, int width, int height, int channels,
                                     int out_width, int out_height) {
  if (width == out_width && height == out_height) return in;
  std::vector<uint8_t> mid = in;
  int w = width;
  if (out_width != width) {  // the horizontal pass first, as Pillow
    const Weights wx = weights(width, out_width);
    mid.assign(static_cast<size_t>(height) * out_width * channels, 0);
    for (int y = 0; y < height; ++y) {
      for (int xx = 0; xx < out_width; ++xx) {
        const int32_t* k = &wx.k[static_cast<size_t>(xx) * wx.ksize];
        for (int c = 0; c < channels; ++c) {
          int32_t s = 1 << (kPrecision - 1);
          for (int x = 0; x < wx.count[xx]; ++x) {
            s += in[(static_cast<size_t>(y) * width + wx.first[xx] + x) * channels + c] * k[x];
          }
          mid[(static_cast<size_t>(y) * out_width + xx) * channels + c] = clip8(s);
        }
      }
    }
    w = out_width;
  }
  if (out_height == height) return mid;
  const Weights wy = weights(height, out_height);
  std::vector<uint8_t> out(static_cast<size_t>(out_height) * w * channels);
  for (int yy = 0; yy < out_height; ++yy) {
    const int32_t* k = &wy.k[static_cast<size_t>(yy) * wy.ksize];
    for (int x = 0; x < w; ++x) {
      for (int c = 0; c < channels; ++c) {
        int32_t s = 1 << (kPrecision - 1);
        for (int y = 0; y < wy.count[yy]; ++y) {
          s += mid[(static_cast<size_t>(wy.first[yy] + y) * w + x) * channels + c] * k[y];
        }
        out[(static_cast<size_t>(yy) * w + x) * channels + c] = clip8(s);
      }
    }
  }
  return out;
}

std::vector<uint8_t> load_image(const std::string& path, int channels, int size) {
  if (channels != 1 && channels != 3) {
    throw InputError(path + ": the model takes " + std::to_string(channels) +
                     " channels; give it a tensor file instead of an image");
  }
  int w = 0, h = 0, comp = 0;
  std::unique_ptr<stbi_uc, void (*)(void*)> data(stbi_load(path.c_str(), &w, &h, &comp, 0), stbi_image_free);
  if (!data) throw InputError(path + ": not a readable image (" + stbi_failure_reason() + ")");
  const size_t pixels = static_cast<size_t>(w) * h;
  std::vector<uint8_t> px(pixels * channels);
  const stbi_uc* d = data.get();
  for (size_t i = 0; i < pixels; ++i) {
    const stbi_uc* p = d + i * comp;
    if (channels == 3) {  // Pillow's convert("RGB"): gray replicated, alpha dropped
      const bool gray = comp < 3;
      px[i * 3 + 0] = p[0];
      px[i * 3 + 1] = gray ? p[0] : p[1];
      px[i * 3 + 2] = gray ? p[0] : p[2];
    } else if (comp >= 3) {  // convert("L"): L = R 299/1000 + G 587/1000 + B 114/1000
      px[i] = static_cast<uint8_t>((p[0] * 19595 + p[1] * 38470 + p[2] * 7471 + 0x8000) >> 16);
    } else {
      px[i] = p[0];
    }
  }
  return resize_bilinear(px, w, h, channels, size, size);
}

namespace {

template <typename T>
void convert(const std::vector<char>& raw, size_t offset, size_t n, std::vector<float>& out) {
  for (size_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, raw.data() + offset + i * sizeof(T), sizeof(T));
    out[i] = static_cast<float>(v);
  }
}

std::string dict_value(const std::string& header, const std::string& key) {
  const size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) return "";
  size_t v = header.find(':', at);
  if (v == std::string::npos) return "";
  ++v;
  while (v < header.size() && header[v] == ' ') ++v;
  if (header[v] == '(') return header.substr(v, header.find(')', v) - v + 1);
  if (header[v] == '\'') return header.substr(v + 1, header.find('\'', v + 1) - v - 1);
  return header.substr(v, header.find_first_of(",}", v) - v);
}

}  // namespace

std::vector<float> load_npy(const std::string& path, std::vector<int64_t>& shape) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": no such file or folder");
  std::vector<char> raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (raw.size() < 10 || std::memcmp(raw.data(), "\x93NUMPY", 6) != 0) {
    throw InputError(path + ": not a readable .npy file (no NUMPY magic)");
  }
  const int major = static_cast<unsigned char>(raw[6]);
  size_t header_len, start;
  if (major == 1) {
    header_len = static_cast<unsigned char>(raw[8]) | static_cast<unsigned char>(raw[9]) << 8;
    start = 10;
  } else {
    if (raw.size() < 12) throw InputError(path + ": not a readable .npy file (truncated)");
    header_len = 0;
    for (int i = 3; i >= 0; --i) header_len = header_len << 8 | static_cast<unsigned char>(raw[8 + i]);
    start = 12;
  }
  if (start + header_len > raw.size()) throw InputError(path + ": not a readable .npy file (truncated)");
  const std::string header(raw.data() + start, header_len);
  const std::string descr = dict_value(header, "descr");
  if (dict_value(header, "fortran_order") != "False") {
    throw InputError(path + ": not a readable .npy file (Fortran order)");
  }
  std::string dims = dict_value(header, "shape");
  shape.clear();
  int64_t n = 1;
  for (size_t i = 1; i + 1 < dims.size();) {
    while (i < dims.size() && (dims[i] == ' ' || dims[i] == ',')) ++i;
    if (i + 1 >= dims.size()) break;
    size_t used = 0;
    const long long v = std::stoll(dims.substr(i), &used);
    // every dimension and the element count bounded before the product (no overflow)
    if (v < 0 || v > (1ll << 32) || (v > 0 && n > (int64_t(1) << 40) / v)) {
      throw InputError(path + ": not a readable .npy file (shape)");
    }
    shape.push_back(v);
    n *= v;
    i += used;
  }
  const size_t data = start + header_len;
  const std::string code = descr.size() >= 2 ? descr.substr(1) : descr;
  const char order = descr.empty() ? '?' : descr[0];
  size_t item = 0;
  if (code == "f4" || code == "i4" || code == "u4")
    item = 4;
  else if (code == "f8" || code == "i8" || code == "u8")
    item = 8;
  else if (code == "i2" || code == "u2" || code == "f2")
    item = 2;
  else if (code == "i1" || code == "u1")
    item = 1;
  if (!item || order == '>' || code == "f2") {
    throw InputError(path + ": holds " + descr + " values, expected numbers");
  }
  if (data + static_cast<size_t>(n) * item != raw.size()) {
    throw InputError(path + ": not a readable .npy file (its data does not match its shape)");
  }
  std::vector<float> out(static_cast<size_t>(n));
  if (code == "f4")
    convert<float>(raw, data, n, out);
  else if (code == "f8")
    convert<double>(raw, data, n, out);
  else if (code == "i4")
    convert<int32_t>(raw, data, n, out);
  else if (code == "u4")
    convert<uint32_t>(raw, data, n, out);
  else if (code == "i8")
    convert<int64_t>(raw, data, n, out);
  else if (code == "u8")
    convert<uint64_t>(raw, data, n, out);
  else if (code == "i2")
    convert<int16_t>(raw, data, n, out);
  else if (code == "u2")
    convert<uint16_t>(raw, data, n, out);
  else if (code == "i1")
    convert<int8_t>(raw, data, n, out);
  else
    convert<uint8_t>(raw, data, n, out);
  return out;
}

}  // namespace native
}  // namespace ctmq
