// Work items shared out over XLA's intra-op thread pool: the one copy every jaxfound native kernel includes
// (quant/int8_dense.cc, int8_dense_avx2.cc, int4_dense.cc, models/decode_attention.cc). quant.kernel.compile_library
// puts this directory on the include path and this file's bytes in each library's cache key.

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxfound {

// Items taken from a shared counter by the calling thread and by pool tasks; the caller waits only for items
// others have taken, so a pool task that starts late (or never) cannot stall it.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  int64_t total = 0;
  std::mutex mu;
  std::condition_variable cv;
  std::function<void(int64_t)> item;

  void Drain() {
    for (int64_t i; (i = next.fetch_add(1)) < total;) {
      item(i);
      if (finished.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

// item(0 .. total - 1), spread over the pool's threads and the caller; in the caller alone when parallel is false,
// the pool has one thread or there is one item.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t total, std::function<void(int64_t)> item,
                        bool parallel = true) {
  if (!parallel || pool.num_threads() <= 1 || total <= 1) {
    for (int64_t i = 0; i < total; ++i) item(i);
    return;
  }
  auto work = std::make_shared<Work>();
  work->total = total;
  work->item = std::move(item);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->finished.load() == work->total; });
}

}  // namespace jaxfound
