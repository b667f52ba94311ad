// The C API of ctmq_runtime.h over the artifact reader (csrc/runtime/artifact.h)
// and the executor (csrc/runtime/executor.h) with its own float kernels.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../runtime/artifact.h"
#include "../runtime/executor.h"
#include "ctmq_runtime.h"
#include "thread_pool.h"

#ifndef CTMQ_VERSION
#define CTMQ_VERSION "0.1.0"
#endif

struct ctmq_model {
  ctmq::rt::Artifact artifact;
  std::unique_ptr<ctmq::native::ThreadPool> pool;
  std::unique_ptr<ctmq::rt::Executor> executor;
  std::mutex mu;
  const char* cpu_path = "scalar";
};

namespace {

void say(char* err, size_t size, const std::string& why) {
  if (err && size) {
    const size_t n = std::min(size - 1, why.size());
    std::memcpy(err, why.data(), n);
    err[n] = '\0';
  }
}

ctmq::rt::Context context(ctmq_model& m, const ctmq_options* options) {
  using namespace ctmq;
  rt::Context ctx;
  const char* path = options && options->cpu_path ? options->cpu_path : "auto";
  ctx.path = std::string(path) == "auto" ? bconv::best_path() : bconv::path_from_name(path);
  if (!bconv::path_runs(ctx.path)) {
    throw std::invalid_argument(std::string("cpu_path '") + path + "' does not run on this CPU (best: '" +
                                bconv::path_name(bconv::best_path()) + "')");
  }
  int threads = options && options->threads > 0 ? options->threads
                                                : static_cast<int>(std::thread::hardware_concurrency());
  threads = std::max(1, std::min(threads, 256));
  m.cpu_path = bconv::path_name(ctx.path);
  m.pool = std::make_unique<native::ThreadPool>(threads);
  native::ThreadPool* pool = m.pool.get();
  ctx.parallel.threads = threads;
  ctx.parallel.for_each = [pool](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    pool->parallel_for(n, fn);
  };
  return ctx;
}

ctmq_model* open(ctmq::rt::Artifact (*read)(const void*, size_t, const std::string&), const void* a, size_t b,
                 const std::string& name, const ctmq_options* options, char* err, size_t err_size) {
  try {
    auto m = std::make_unique<ctmq_model>();
    m->artifact = read(a, b, name);
    ctmq::rt::Context ctx = context(*m, options);
    m->executor = std::make_unique<ctmq::rt::Executor>(m->artifact.header, m->artifact.tensors, ctx);
    // once on zeros of the declared size, as ctmq.deploy does: what only the
    // kernels refuse (e.g. more than 64 taps) fails here, not at the first call
    const ctmq::rt::Artifact& a = m->artifact;
    std::vector<float> zeros(static_cast<size_t>(a.channels * a.size * a.size), 0.f);
    std::vector<float> logits(a.class_names.size());
    try {
      m->executor->run(zeros.data(), 1, logits.data());
    } catch (const std::exception& e) {
      throw ctmq::rt::ArtifactError(name + ": " + e.what());
    }
    return m.release();
  } catch (const std::exception& e) {
    say(err, err_size, e.what());
    return nullptr;
  }
}

ctmq::rt::Artifact read_file(const void* path, size_t, const std::string&) {
  return ctmq::rt::read_artifact_file(static_cast<const char*>(path));
}

ctmq::rt::Artifact read_memory(const void* data, size_t size, const std::string& name) {
  return ctmq::rt::read_artifact_bytes(static_cast<const uint8_t*>(data), size, name);
}

bool check_run(ctmq_model* model, const void* in, int n, const float* logits, char* err, size_t size) {
  if (!model || !in || !logits) {
    say(err, size, "model, input and logits must not be NULL");
    return false;
  }
  if (n < 1 || n > (1 << 20)) {
    say(err, size, "n must be in [1, 2^20], got " + std::to_string(n));
    return false;
  }
  return true;
}

}  // namespace

extern "C" {

const char* ctmq_version(void) {
  return CTMQ_VERSION;
}

ctmq_model* ctmq_open(const char* path, const ctmq_options* options, char* err, size_t err_size) {
  if (!path) {
    say(err, err_size, "path must not be NULL");
    return nullptr;
  }
  return open(read_file, path, 0, path, options, err, err_size);
}

ctmq_model* ctmq_open_memory(const void* data, size_t size, const ctmq_options* options, char* err,
                             size_t err_size) {
  if (!data && size) {
    say(err, err_size, "data must not be NULL");
    return nullptr;
  }
  return open(read_memory, data, size, "<memory>", options, err, err_size);
}

void ctmq_close(ctmq_model* model) {
  delete model;
}

int ctmq_input_channels(const ctmq_model* m) {
  return m ? static_cast<int>(m->artifact.channels) : 0;
}
int ctmq_input_size(const ctmq_model* m) {
  return m ? static_cast<int>(m->artifact.size) : 0;
}
const float* ctmq_input_mean(const ctmq_model* m) {
  return m ? m->artifact.mean.data() : nullptr;
}
const float* ctmq_input_std(const ctmq_model* m) {
  return m ? m->artifact.std.data() : nullptr;
}
int ctmq_num_classes(const ctmq_model* m) {
  return m ? static_cast<int>(m->artifact.class_names.size()) : 0;
}

const char* ctmq_class_name(const ctmq_model* m, int index) {
  if (!m || index < 0 || index >= static_cast<int>(m->artifact.class_names.size())) return nullptr;
  return m->artifact.class_names[index].c_str();
}

const char* ctmq_cpu_path(const ctmq_model* m) {
  return m ? m->cpu_path : nullptr;
}

int ctmq_run(ctmq_model* model, const float* images, int n, float* logits, char* err, size_t err_size) {
  if (!check_run(model, images, n, logits, err, err_size)) return 1;
  try {
    std::lock_guard<std::mutex> lock(model->mu);
    const int64_t count =
        static_cast<int64_t>(n) * model->artifact.channels * model->artifact.size * model->artifact.size;
    for (int64_t i = 0; i < count; ++i) {
      if (!std::isfinite(images[i])) {
        say(err, err_size, "images contain NaN or infinite values");
        return 1;
      }
    }
    model->executor->run(images, n, logits);
    return 0;
  } catch (const std::exception& e) {
    say(err, err_size, e.what());
    return 1;
  }
}

int ctmq_run_pixels(ctmq_model* model, const uint8_t* pixels, int n, float* logits, char* err,
                    size_t err_size) {
  if (!check_run(model, pixels, n, logits, err, err_size)) return 1;
  const ctmq::rt::Artifact& a = model->artifact;
  const int64_t c = a.channels, hw = a.size * a.size;
  std::vector<float> images;
  try {  // nothing throws across the C API (n images may not fit in memory)
    images.resize(static_cast<size_t>(n * c * hw));
  } catch (const std::exception& e) {
    say(err, err_size, "cannot hold " + std::to_string(n) + " images as float32: " + e.what());
    return 1;
  }
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t p = 0; p < hw; ++p) {
      for (int64_t j = 0; j < c; ++j) {  // as ctmq infer: (pixel / 255 - mean) / std, in float32
        const float x = static_cast<float>(pixels[(b * hw + p) * c + j]) / 255.0f;
        images[(b * c + j) * hw + p] = (x - a.mean[j]) / a.std[j];
      }
    }
  }
  return ctmq_run(model, images.data(), n, logits, err, err_size);
}

void ctmq_topk(const float* logits, int classes, int k, int* indices, float* probabilities) {
  if (!logits || classes < 1 || k < 1) return;
  k = std::min(k, classes);
  float top = logits[0];
  for (int i = 1; i < classes; ++i) top = std::max(top, logits[i]);
  double sum = 0;
  for (int i = 0; i < classes; ++i) sum += std::exp(static_cast<double>(logits[i]) - top);
  // The k largest, ties to the lower index: one scan per place, nothing
  // allocated (nothing may throw across the C API).
  const auto before = [&](int x, int y) {
    return logits[x] > logits[y] || (logits[x] == logits[y] && x < y);
  };
  int prev = -1;
  for (int i = 0; i < k; ++i) {
    int best = -1;
    for (int j = 0; j < classes; ++j) {
      if (prev >= 0 && !before(prev, j)) continue;  // placed already
      if (best < 0 || before(j, best)) best = j;
    }
    prev = best;
    if (indices) indices[i] = best;
    if (probabilities) {
      probabilities[i] =
          best < 0 ? 0.f : static_cast<float>(std::exp(static_cast<double>(logits[best]) - top) / sum);
    }
  }
}

}  // extern "C"
