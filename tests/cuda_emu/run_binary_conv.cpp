// Runs csrc/cuda/binary_conv.cu's kernel under the host emulator on one problem.
//   run_binary_conv DIR N C H W O KH KW sh sw ph pw dh dw FLAGS X_OFFSET
// DIR holds x.bin (N,H,W,Cw int32), w.bin (O,KH,KW,Cw), tap.bin (O,KH*KW) and,
// as FLAGS says (1 scale, 2 bias, 4 residual, 8 packed output), scale.bin,
// bias.bin, residual.bin; writes out.bin (float (N,O,OH,OW) or packed int32).
// X_OFFSET words shift x in its buffer (to test unaligned bases). Prints the
// plan's copy width. Every buffer has poisoned guard words on both sides; the
// output starts poisoned, and a guard that changed is an error.
#include "binary_conv.cu"

#include <fstream>
#include <string>

namespace {

constexpr int kGuard = 64;
constexpr uint32_t kPoison = 0x7fc0dead;  // a NaN as float

struct Buffer {
  std::vector<uint32_t> words;
  size_t offset = kGuard, n = 0;
  Buffer(size_t count, size_t extra_offset)
      : words(count + 2 * kGuard + extra_offset, kPoison), offset(kGuard + extra_offset), n(count) {}
  uint32_t* data() { return words.data() + offset; }
  bool guards_intact() const {
    for (size_t i = 0; i < words.size(); ++i)
      if ((i < offset || i >= offset + n) && words[i] != kPoison) return false;
    return true;
  }
};

Buffer read_file(const std::string& path, size_t count, size_t extra_offset = 0) {
  Buffer b(count, extra_offset);
  std::ifstream f(path, std::ios::binary);
  if (!f.read(reinterpret_cast<char*>(b.data()), count * 4)) {
    std::fprintf(stderr, "cannot read %zu words from %s\n", count, path.c_str());
    std::exit(2);
  }
  emu::register_buffer(b.data(), count * 4);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 17) {
    std::fprintf(stderr, "usage: run_binary_conv DIR N C H W O KH KW sh sw ph pw dh dw FLAGS X_OFFSET\n");
    return 2;
  }
  const std::string dir = argv[1];
  int v[15];
  for (int i = 0; i < 15; ++i) v[i] = std::atoi(argv[2 + i]);
  ctmq::BinaryConvParams p{};
  p.N = v[0];
  p.C = v[1];
  p.H = v[2];
  p.W = v[3];
  p.O = v[4];
  p.KH = v[5];
  p.KW = v[6];
  p.sh = v[7];
  p.sw = v[8];
  p.ph = v[9];
  p.pw = v[10];
  p.dh = v[11];
  p.dw = v[12];
  const int flags = v[13], x_offset = v[14];
  p.Cw = (p.C + 31) / 32;
  p.OH = ctmq::conv_output_size(p.H, p.KH, p.sh, p.ph, p.dh);
  p.OW = ctmq::conv_output_size(p.W, p.KW, p.sw, p.pw, p.dw);
  const size_t T = (size_t)p.KH * p.KW, M = (size_t)p.N * p.OH * p.OW;
  std::vector<Buffer> keep;  // moving a Buffer keeps its words where they were registered
  keep.push_back(read_file(dir + "/x.bin", (size_t)p.N * p.H * p.W * p.Cw, x_offset));
  keep.push_back(read_file(dir + "/w.bin", (size_t)p.O * T * p.Cw));
  keep.push_back(read_file(dir + "/tap.bin", (size_t)p.O * T));
  p.x = keep[0].data();
  p.w = keep[1].data();
  p.tap_popc = reinterpret_cast<const int32_t*>(keep[2].data());
  if (flags & 1) {
    keep.push_back(read_file(dir + "/scale.bin", p.O));
    p.scale = reinterpret_cast<const float*>(keep.back().data());
  }
  if (flags & 2) {
    keep.push_back(read_file(dir + "/bias.bin", p.O));
    p.bias = reinterpret_cast<const float*>(keep.back().data());
  }
  if (flags & 4) {
    keep.push_back(read_file(dir + "/residual.bin", M * p.O));
    p.residual = reinterpret_cast<const float*>(keep.back().data());
  }
  const bool packed = flags & 8;
  const size_t out_words = packed ? M * ((p.O + 31) / 32) : M * p.O;
  Buffer out(out_words, 0);
  if (packed)
    p.packed = out.data();
  else
    p.out = reinterpret_cast<float*>(out.data());

  const ctmq::BinaryConvPlan plan = ctmq::plan_binary_conv(p);
  ctmq::emulate_binary_conv_bmma(p);
  for (const Buffer& b : keep)
    if (!b.guards_intact()) {
      std::fprintf(stderr, "an input buffer's guard words changed\n");
      return 1;
    }
  if (!out.guards_intact()) {
    std::fprintf(stderr, "a write landed outside the output\n");
    return 1;
  }
  std::ofstream f(dir + "/out.bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(out.data()), out_words * 4);
  std::printf("vec_words=%d grid=%ux%u\n", plan.vec_words, plan.grid_x, plan.grid_y);
  return f ? 0 : 1;
}
