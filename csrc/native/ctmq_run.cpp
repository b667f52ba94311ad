// ctmq-run: classify images or .npy tensors with a ctmq artifact, without
// Python, printing what `ctmq infer` prints:
//
//   ctmq-run MODEL.ctmq INPUT... [--topk K] [--threads N] [--cpu-path P]
//            [--logits OUT.npy] [--bench]
//
// INPUT: an image (PNG/JPEG/BMP/GIF; converted and resized as ctmq infer
// does), a .npy array of normalized (N, C, H, W) or (C, H, W) values, or a
// folder of them. An input that cannot be read is reported and the others
// go on (exit 1); bad arguments or a bad model: one line, exit 2.
// --logits writes every classified row's logits, in input order, as a
// float32 .npy array (rows, classes).
#include <dirent.h>
#include <sys/stat.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ctmq_runtime.h"
#include "inputs.h"

namespace {

using ctmq::native::InputError;

const char* kUsage =
    "usage: ctmq-run MODEL.ctmq INPUT... [--topk K] [--threads N] "
    "[--cpu-path auto|avx512-vpopcntdq|avx2|neon|scalar] [--logits OUT.npy] [--bench]\n";

int usage_error(const std::string& why) {
  std::fprintf(stderr, "ctmq-run: error: %s\n", why.c_str());
  std::fputs(kUsage, stderr);
  return 2;
}

// A float32 .npy file (rows, cols), written whole or not at all (temp + rename).
bool write_npy(const std::string& path, const std::vector<float>& v, int64_t rows, int64_t cols) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(rows) + ", " +
                       std::to_string(cols) + "), }";
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) return false;
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                static_cast<unsigned char>(header.size() >> 8)};
  bool ok = std::fwrite("\x93NUMPY\x01\x00", 1, 8, f) == 8 && std::fwrite(len, 1, 2, f) == 2 &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
            std::fwrite(v.data(), sizeof(float), v.size(), f) == v.size();
  ok = std::fclose(f) == 0 && ok;
  if (ok) ok = std::rename(tmp.c_str(), path.c_str()) == 0;
  if (!ok) std::remove(tmp.c_str());
  return ok;
}

bool positive(const char* text, int& out) {
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  if (!end || *end || v < 1 || v > 1 << 20) return false;
  out = static_cast<int>(v);
  return true;
}

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  if (s.size() < n) return false;
  for (size_t i = 0; i < n; ++i) {
    if (std::tolower(static_cast<unsigned char>(s[s.size() - n + i])) != suffix[i]) return false;
  }
  return true;
}

bool is_image(const std::string& p) {
  for (const char* e : {".png", ".jpg", ".jpeg", ".bmp", ".gif"}) {
    if (ends_with(p, e)) return true;
  }
  return false;
}

// The files of the inputs: folders expanded (sorted), missing names kept (they fail later).
std::vector<std::string> expand(const std::vector<std::string>& inputs) {
  std::vector<std::string> files;
  for (const std::string& in : inputs) {
    struct stat st {};
    if (stat(in.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
      std::vector<std::string> found;
      if (DIR* d = opendir(in.c_str())) {
        while (dirent* e = readdir(d)) {
          const std::string path = in + "/" + e->d_name;
          if (is_image(path) || ends_with(path, ".npy")) found.push_back(path);
        }
        closedir(d);
      }
      std::sort(found.begin(), found.end());
      if (found.empty()) found.push_back(in + "/");  // reported as unreadable
      files.insert(files.end(), found.begin(), found.end());
    } else {
      files.push_back(in);
    }
  }
  return files;
}

// The normalized batch (n, C, size, size) of one input file.
std::vector<float> read_input(ctmq_model* model, const std::string& path, int& n) {
  const int c = ctmq_input_channels(model), size = ctmq_input_size(model);
  const int64_t per = static_cast<int64_t>(c) * size * size;
  if (ends_with(path, ".npy")) {
    std::vector<int64_t> shape;
    std::vector<float> x = ctmq::native::load_npy(path, shape);
    if (shape.size() == 3) shape.insert(shape.begin(), 1);
    if (shape.size() != 4 || shape[1] != c || shape[2] != size || shape[3] != size) {
      std::string got = "(";
      for (size_t i = 0; i < shape.size(); ++i) got += (i ? ", " : "") + std::to_string(shape[i]);
      throw InputError(path + ": images must have shape (N, " + std::to_string(c) + ", " +
                       std::to_string(size) + ", " + std::to_string(size) + ") (channels, height, width " +
                       "of the exported model), got " + got + ")");
    }
    n = static_cast<int>(shape[0]);
    return x;
  }
  if (is_image(path)) {
    const std::vector<uint8_t> px = ctmq::native::load_image(path, c, size);
    const float* mean = ctmq_input_mean(model);
    const float* std_ = ctmq_input_std(model);
    std::vector<float> x(per);
    for (int64_t p = 0; p < static_cast<int64_t>(size) * size; ++p) {
      for (int j = 0; j < c; ++j) {
        const float v = static_cast<float>(px[p * c + j]) / 255.0f;
        x[j * size * size + p] = (v - mean[j]) / std_[j];
      }
    }
    n = 1;
    return x;
  }
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) throw InputError(path + ": no such file or folder");
  if (!path.empty() && path.back() == '/') {
    throw InputError(path.substr(0, path.size() - 1) +
                     ": no images (.png, .jpg, .jpeg, .bmp, .gif) or "
                     "tensors (.npy) in this folder");
  }
  throw InputError(path + ": expected an image (.png, .jpg, .jpeg, .bmp, .gif) or a tensor (.npy)");
}

void bench(ctmq_model* model) {
  const int c = ctmq_input_channels(model), size = ctmq_input_size(model), k = ctmq_num_classes(model);
  std::printf("ctmq-run --bench: %s path, input %dx%dx%d\n%5s %9s %9s\n", ctmq_cpu_path(model), c, size, size,
              "batch", "ms/batch", "images/s");
  for (int n : {1, 8}) {
    std::vector<float> x(static_cast<size_t>(n) * c * size * size, 0.f), y(static_cast<size_t>(n) * k);
    std::vector<double> times;
    const auto start = std::chrono::steady_clock::now();
    ctmq_run(model, x.data(), n, y.data(), nullptr, 0);  // warm-up
    while (times.size() < 5 ||
           (std::chrono::steady_clock::now() - start < std::chrono::seconds(1) && times.size() < 1000)) {
      const auto t0 = std::chrono::steady_clock::now();
      ctmq_run(model, x.data(), n, y.data(), nullptr, 0);
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    const double median = times[times.size() / 2];
    std::printf("%5d %9.3f %9.1f\n", n, median * 1e3, n / median);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  int topk = 5;
  ctmq_options options{0, nullptr};
  bool run_bench = false;
  std::string logits_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--topk" || a == "--threads" || a == "--cpu-path" || a == "--logits") {
      if (i + 1 >= argc) return usage_error("argument " + a + ": expected one value");
      const char* v = argv[++i];
      if (a == "--cpu-path")
        options.cpu_path = v;
      else if (a == "--logits")
        logits_path = v;
      else if (!positive(v, a == "--topk" ? topk : options.threads)) {
        return usage_error("argument " + a + ": expected a positive integer, got '" + v + "'");
      }
    } else if (a == "--bench") {
      run_bench = true;
    } else if (a == "--version") {
      std::printf("ctmq-run %s\n", ctmq_version());
      return 0;
    } else if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a.size() > 1 && a[0] == '-') {
      return usage_error("unrecognized argument " + a);
    } else {
      positional.push_back(a);
    }
  }
  if (positional.empty()) return usage_error("the following arguments are required: MODEL.ctmq");
  if (positional.size() == 1 && !run_bench) return usage_error("the following arguments are required: INPUT");
  char err[1024];
  ctmq_model* model = ctmq_open(positional[0].c_str(), &options, err, sizeof(err));
  if (!model) {
    std::fprintf(stderr, "ctmq-run: error: %s\n", err);
    return 2;
  }
  const int classes = ctmq_num_classes(model);
  int done = 0, failed = 0;
  std::vector<float> all_logits;
  for (const std::string& path : expand({positional.begin() + 1, positional.end()})) {
    int n = 0;
    std::vector<float> x;
    try {
      x = read_input(model, path, n);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "ctmq-run: error: %s\n", e.what());
      ++failed;
      continue;
    }
    std::vector<float> logits(static_cast<size_t>(n) * classes);
    if (ctmq_run(model, x.data(), n, logits.data(), err, sizeof(err)) != 0) {
      std::fprintf(stderr, "ctmq-run: error: %s: %s\n", path.c_str(), err);
      ++failed;
      continue;
    }
    all_logits.insert(all_logits.end(), logits.begin(), logits.end());
    const int k = std::min(topk, classes);
    std::vector<int> idx(k);
    std::vector<float> prob(k);
    for (int row = 0; row < n; ++row) {
      ctmq_topk(logits.data() + static_cast<size_t>(row) * classes, classes, k, idx.data(), prob.data());
      std::string line = n == 1 ? path : path + "[" + std::to_string(row) + "]";
      line += ": ";
      for (int i = 0; i < k; ++i) {
        char pct[32];
        std::snprintf(pct, sizeof(pct), "%.1f%%", static_cast<double>(prob[i]) * 100.0);
        line += std::string(i ? ", " : "") + ctmq_class_name(model, idx[i]) + " " + pct;
      }
      std::printf("%s\n", line.c_str());
      ++done;
    }
  }
  if (run_bench) bench(model);
  ctmq_close(model);
  if (!logits_path.empty() && !write_npy(logits_path, all_logits, done, classes)) {
    std::fprintf(stderr, "ctmq-run: error: --logits %s: cannot write\n", logits_path.c_str());
    return 2;
  }
  if (failed && !done) {
    std::fprintf(stderr, "ctmq-run: error: no input could be classified (%d failed)\n", failed);
    return 2;
  }
  if (failed) {
    std::fprintf(stderr, "ctmq-run: %d of %d inputs failed\n", failed, failed + done);
    return 1;
  }
  return 0;
}
