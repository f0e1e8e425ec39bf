// Work items shared out over the CPU's cores: the one copy every jaxfound native kernel includes
// (quant/int8_dense.cc, int8_dense_avx2.cc, int4_dense.cc, models/decode_attention.cc). quant.kernel.compile_library
// puts this directory on the include path and this file's bytes in each library's cache key.
//
// A decode step calls a kernel ~150 times (4 GEMVs and one attention per layer), each 10-100 us of work. Handing
// items to XLA's intra-op pool wakes a parked thread each call (tens of us); instead each library keeps its own
// helper threads (XLA's pool size - 1) that stay awake for a short while after a call (pausing, then yielding the
// core to any runnable thread) before they sleep, so the next call of the same step finds them awake -- what
// llama.cpp's and OpenMP's pools do.

#pragma once

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxfound {

class SpinPool {
 public:
  // The library's pool: threads - 1 helpers (threads: XLA's intra-op pool size at the first call, which follows the
  // process's CPU affinity), started on first use, never joined (they sleep when idle).
  static SpinPool& Get(int64_t threads) {
    static SpinPool* pool = new SpinPool(static_cast<int>(std::max<int64_t>(threads, 1)) - 1);
    return *pool;
  }

  int helpers() const { return helpers_; }

  // item(0 .. total - 1) on the caller and the helpers; returns when every item is done. One job at a time; a job
  // lives in a shared_ptr, so a helper that wakes late holds the finished job it saw, never the next one.
  void Run(int64_t total, std::function<void(int64_t)> item) {
    std::lock_guard<std::mutex> one_job(run_mu_);
    auto job = std::make_shared<Job>();
    job->total = total;
    job->item = std::move(item);
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job->Drain();
    while (job->done.load(std::memory_order_acquire) < total) _mm_pause();
  }

 private:
  static constexpr int64_t kPause = 256;  // pause iterations (a few us) before a helper starts yielding
  static constexpr std::chrono::microseconds kSpinFor{300};  // awake this long after a call, then sleep

  struct Job {
    std::atomic<int64_t> next{0}, done{0};
    int64_t total = 0;
    std::function<void(int64_t)> item;

    void Drain() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_acq_rel)) < total;) {
        item(i);
        done.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  };

  explicit SpinPool(int helpers) : helpers_(helpers) {
    for (int t = 0; t < helpers; ++t) std::thread([this] { Loop(); }).detach();
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto idle_since = std::chrono::steady_clock::now();
      for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        if (spins < kPause) {
          _mm_pause();
        } else if (std::chrono::steady_clock::now() - idle_since < kSpinFor) {
          sched_yield();  // awake for the next call, but a runnable thread (XLA's own pool) gets the core first
        } else {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        job = job_;
        seen = generation_.load(std::memory_order_acquire);
      }
      job->Drain();
    }
  }

  const int helpers_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
};

// item(0 .. total - 1), spread over the library's helper threads and the caller (SpinPool, as many threads as XLA's
// intra-op pool has); in the caller alone when parallel is false or there is one item.
inline void ParallelFor(xla::ffi::ThreadPool& xla_pool, int64_t total, std::function<void(int64_t)> item,
                        bool parallel = true) {
  SpinPool& pool = SpinPool::Get(xla_pool.num_threads());
  if (!parallel || pool.helpers() == 0 || total <= 1) {
    for (int64_t i = 0; i < total; ++i) item(i);
    return;
  }
  pool.Run(total, std::move(item));
}

}  // namespace jaxfound
