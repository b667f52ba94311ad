// See thread_pool.h.
#include "thread_pool.h"

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CTMQ_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define CTMQ_PAUSE() asm volatile("yield")
#else
#define CTMQ_PAUSE() std::this_thread::yield()
#endif

namespace ctmq {
namespace native {

namespace {
thread_local bool in_worker = false;  // a nested parallel_for runs serially

// Spin rounds before a worker sleeps (about 0.1-0.3 ms) and before a waiting
// caller starts yielding its core.
constexpr int kSpin = 1 << 14;

void range(int64_t n, int parts, int index, int64_t& begin, int64_t& end) {
  begin = n * index / parts;
  end = n * (index + 1) / parts;
}
}  // namespace

ThreadPool::ThreadPool(int threads) {
  try {
    for (int i = 1; i < std::max(1, threads); ++i) workers_.emplace_back([this, i] { work(i); });
  } catch (...) {  // a thread that could not start: the ones that did are joined
    stop_workers();
    throw;
  }
}

ThreadPool::~ThreadPool() {
  stop_workers();
}

void ThreadPool::stop_workers() {
  stop_.store(true);
  { std::lock_guard<std::mutex> lock(mu_); }
  start_.notify_all();
  for (std::thread& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::run_range(int64_t begin, int64_t end) {
  if (begin >= end) return;
  try {
    (*fn_)(begin, end);
  } catch (...) {
    std::lock_guard<std::mutex> lock(error_mu_);
    if (!error_) error_ = std::current_exception();
  }
}

void ThreadPool::work(int index) {
  in_worker = true;
  int64_t seen = 0;
  for (;;) {
    // spin, then sleep, until a new region or the stop
    int spins = 0;
    while (generation_.load() == seen && !stop_.load()) {
      if (++spins < kSpin) {
        CTMQ_PAUSE();
        continue;
      }
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1);  // before the check under the lock: see parallel_for
      start_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
      sleepers_.fetch_sub(1);
      break;
    }
    if (stop_.load()) return;
    seen = generation_.load();
    int64_t b, e;
    range(n_, threads(), index, b, e);
    run_range(b, e);
    pending_.fetch_sub(1, std::memory_order_release);
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (workers_.empty() || n == 1 || in_worker) {
    fn(0, n);
    return;
  }
  fn_ = &fn;
  n_ = n;
  pending_.store(static_cast<int>(workers_.size()));
  generation_.fetch_add(1);  // publishes fn_ and n_ (sequentially consistent)
  // A worker that found the old generation counted itself a sleeper first,
  // so it is seen here, and it holds the lock until it waits: taking the
  // lock before notifying cannot miss it.
  if (sleepers_.load() > 0) {
    {
      std::lock_guard<std::mutex> lock(mu_);
    }
    start_.notify_all();
  }
  int64_t b, e;
  range(n, threads(), 0, b, e);
  run_range(b, e);
  // every range finishes before fn_ goes out of scope, even after an exception
  for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < kSpin) {
      CTMQ_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(error_mu_);
    std::swap(error, error_);
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace native
}  // namespace ctmq
