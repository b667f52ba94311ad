// A small fixed thread pool for the native runtime's parallel_for: the
// calling thread takes part, work is split into one contiguous range per
// thread. Torch-free, no OpenMP needed.
//
// A forward pass is tens of parallel regions of tens of microseconds each,
// so a worker spins for a while on the region counter before it sleeps on
// the condition variable (as OpenMP runtimes do): waking a sleeping thread
// costs about as much as a small region.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ctmq {
namespace native {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);  // threads >= 1 (the caller counts as one)
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }
  // fn(begin, end) over [0, n) in up to threads() ranges; returns when all are
  // done. An exception thrown by fn in any range is rethrown here (the first
  // one), after every range has finished.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void work(int index);
  void run_range(int64_t begin, int64_t end);
  void stop_workers();

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable start_;
  // the region: written before generation_ is bumped, read after it is seen
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> generation_{0};
  std::atomic<int> pending_{0};   // workers still in the current region
  std::atomic<int> sleepers_{0};  // workers waiting on start_
  std::atomic<bool> stop_{false};
  std::mutex error_mu_;
  std::exception_ptr error_;  // the region's first exception
};

}  // namespace native
}  // namespace ctmq
