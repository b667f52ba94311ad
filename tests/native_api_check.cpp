// Edges of the native runtime that only C++ reaches: the C API's top-k, a run
// whose images cannot be allocated (an error string, nothing thrown across
// the C API), and the thread pool when a range throws. Built and run by
// tests/test_native.py against the static library:
//   native_api_check MODEL.ctmq   prints "ok" and exits 0, or names the failure.
#include <atomic>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "ctmq_runtime.h"
#include "thread_pool.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what.c_str());
    ++failures;
  }
}

void topk() {
  const float logits[6] = {0.5f, 2.0f, -1.0f, 2.0f, 0.5f, 3.0f};
  int idx[6];
  float prob[6];
  ctmq_topk(logits, 6, 6, idx, prob);
  const int want[6] = {5, 1, 3, 0, 4, 2};  // ties to the lower index
  check(std::memcmp(idx, want, sizeof want) == 0, "top-k order with ties");
  float sum = 0;
  for (float p : prob) sum += p;
  check(sum > 0.9999f && sum < 1.0001f, "top-k probabilities sum to 1");
  check(prob[1] == prob[2] && prob[0] > prob[1], "top-k probabilities follow the logits");
  int two[2] = {-7, -7};
  ctmq_topk(logits, 6, 2, two, nullptr);
  check(two[0] == 5 && two[1] == 1, "top-2");
  int many[3] = {-7, -7, -7};
  ctmq_topk(logits, 2, 3, many, nullptr);  // k > classes: the classes there are
  check(many[0] == 1 && many[1] == 0 && many[2] == -7, "k above the class count");
}

void pixels_that_cannot_be_held(const char* path) {
  char err[512] = "";
  ctmq_options options = {1, "auto"};
  ctmq_model* model = ctmq_open(path, &options, err, sizeof err);
  check(model != nullptr, std::string("open: ") + err);
  if (!model) return;
  // 2^20 images of the model's size as float32: far more than any machine holds
  const int n = 1 << 20;
  const uint8_t pixel = 0;
  std::vector<float> logits(16);
  err[0] = 0;
  const int rc = ctmq_run_pixels(model, &pixel, n, logits.data(), err, sizeof err);
  check(rc == 1 && std::strstr(err, "cannot hold") != nullptr,
        std::string("ctmq_run_pixels beyond memory: rc ") + std::to_string(rc) + ", '" + err + "'");
  ctmq_close(model);
}

void pool_rethrows() {
  ctmq::native::ThreadPool pool(4);
  for (int thrower : {0, 2}) {  // the caller's own range, a worker's
    std::atomic<int> ran{0};
    bool caught = false;
    try {
      pool.parallel_for(4, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          ran.fetch_add(1);
          if (i == thrower) throw std::runtime_error("range " + std::to_string(i));
        }
      });
    } catch (const std::runtime_error& e) {
      caught = std::string(e.what()) == "range " + std::to_string(thrower);
    }
    check(caught, "the exception of range " + std::to_string(thrower) + " reaches the caller");
    check(ran.load() == 4, "every range ran before parallel_for returned");
  }
  std::atomic<int64_t> sum{0};  // the pool works on after an exception
  pool.parallel_for(1000, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sum.fetch_add(i);
  });
  check(sum.load() == 999 * 1000 / 2, "a region after an exception");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: native_api_check MODEL.ctmq\n");
    return 2;
  }
  topk();
  pixels_that_cannot_be_held(argv[1]);
  pool_rethrows();
  if (failures) return 1;
  std::printf("ok\n");
  return 0;
}
