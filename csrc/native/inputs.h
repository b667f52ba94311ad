// The CLI's inputs: images (PNG, JPEG, BMP, GIF via stb_image), converted and
// resized as `ctmq infer` does with Pillow (convert to L or RGB, bilinear
// resize with Pillow's filter and fixed-point rounding, / 255, normalize),
// and .npy arrays of normalized (N, C, H, W) or (C, H, W) values.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace ctmq {
namespace native {

struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// 8-bit pixels (size, size, channels) of an image file, channels 1 or 3.
std::vector<uint8_t> load_image(const std::string& path, int channels, int size);

// Pillow's Image.resize(..., BILINEAR) of 8-bit interleaved pixels.
std::vector<uint8_t> resize_bilinear(const std::vector<uint8_t>& in, int width, int height, int channels,
                                     int out_width, int out_height);

// The float32 values of a .npy file (float32/float64 or integer types) and
// its shape; refuses pickles, Fortran order and other dtypes.
std::vector<float> load_npy(const std::string& path, std::vector<int64_t>& shape);

}  // namespace native
}  // namespace ctmq
