// One decode step's attention over a KV cache, for x86-64 CPUs (AVX2 + FMA), as an XLA FFI custom call
// (jaxfound.models.native builds it; jaxfound.models.cache.update_and_attend calls it).
//
// Inputs: q (B, Q, N, H), the new keys and values (B, Q, K, H), the layer's cache k, v (B, K, S, H) and each row's
// write index (B,). Outputs: the attention output (B, Q, N, H) and the cache with the new keys and values written
// at slots clamp(index, 0, S - Q) + 0 .. Q - 1 (what lax.dynamic_update_slice does), in place: the cache outputs
// alias the cache inputs. Query i of row b sits at position p = index[b] + i and sees slots s <= p (and, with a
// window W > 0, p - s < W): softmax(q k^T / sqrt(H)) v over those slots only, in float32, grouped-query (query head
// n reads key / value head n / (N / K)).
//
// Why: the same step as XLA ops (cache.write then cache.attend) costs XLA:CPU a scatter, layout copies of the
// cache and a dozen small fusions per layer, ~120 us per layer for SmolLM2 at batch 1 (a third of the step); here
// it is one pass over the visible slots. Work items (row, key/value head) are shared over XLA's intra-op pool when
// there is enough of it.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxfound::ParallelFor;

namespace {

constexpr int64_t kParallelWork = 1 << 16;  // visible slots x head dim x query heads below which one thread runs it

// dot of two float vectors of length n: 8 independent partial sums, so the compiler keeps them in one vector
inline float Dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}



ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                               ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::F32> k_cache,
                               ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::S32> index, int64_t window,
                               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k_out,
                               ffi::ResultBuffer<ffi::F32> v_out) {
  const auto qd = q.dimensions();
  const auto nd = k_new.dimensions();
  const auto cd = k_cache.dimensions();
  const auto vnd = v_new.dimensions();
  const auto vcd = v_cache.dimensions();
  if (qd.size() != 4 || nd.size() != 4 || cd.size() != 4 || vnd.size() != 4 || vcd.size() != 4 ||
      !std::equal(nd.begin(), nd.end(), vnd.begin()) || !std::equal(cd.begin(), cd.end(), vcd.begin()) ||
      nd[0] != qd[0] || nd[1] != qd[1] || nd[3] != qd[3] || cd[0] != qd[0] ||
      cd[1] != nd[2] || cd[3] != qd[3] || index.element_count() != qd[0] || nd[2] == 0 || qd[2] % nd[2] != 0 ||
      nd[1] > cd[2]) {
    return ffi::Error::InvalidArgument(
        "jaxfound_decode_attention: expects q (B, Q, N, H), k_new / v_new (B, Q, K, H), k / v cache (B, K, S, H) "
        "with N a multiple of K and Q <= S, index (B,)");
  }
  const int64_t B = qd[0], Q = qd[1], N = qd[2], H = qd[3], K = nd[2], S = cd[2], G = N / K;
  const float* qp = q.typed_data();
  const float* kn = k_new.typed_data();
  const float* vn = v_new.typed_data();
  const int32_t* idx = index.typed_data();
  float* o = out->typed_data();
  float* kc = k_out->typed_data();
  float* vc = v_out->typed_data();
  // the outputs alias the inputs when XLA donates them; otherwise start from a copy of the inputs
  if (kc != k_cache.typed_data()) std::copy_n(k_cache.typed_data(), k_cache.element_count(), kc);
  if (vc != v_cache.typed_data()) std::copy_n(v_cache.typed_data(), v_cache.element_count(), vc);
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));

  int64_t visible = 0;  // the work: visible slots summed over rows and queries
  for (int64_t b = 0; b < B; ++b) visible += Q * std::min<int64_t>(S, std::max<int64_t>(0, idx[b] + Q));
  const bool parallel = visible * H * N >= kParallelWork;

  ParallelFor(pool, B * K, [&](int64_t item) {
    const int64_t b = item / K, kh = item % K;
    const int64_t start = std::clamp<int64_t>(idx[b], 0, S - Q);
    float* kb = kc + (b * K + kh) * S * H;
    float* vb = vc + (b * K + kh) * S * H;
    for (int64_t i = 0; i < Q; ++i) {
      std::copy_n(kn + ((b * Q + i) * K + kh) * H, H, kb + (start + i) * H);
      std::copy_n(vn + ((b * Q + i) * K + kh) * H, H, vb + (start + i) * H);
    }
    std::vector<float> qs(H), logits(S), acc(H);
    for (int64_t i = 0; i < Q; ++i) {
      const int64_t pos = static_cast<int64_t>(idx[b]) + i;
      const int64_t hi = std::min<int64_t>(pos, S - 1);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t n = kh * G + g;
        const float* qv = qp + ((b * Q + i) * N + n) * H;
        float* ov = o + ((b * Q + i) * N + n) * H;
        if (hi < lo) {  // no visible slot (a negative index): zeros
          std::fill_n(ov, H, 0.0f);
          continue;
        }
        for (int64_t h = 0; h < H; ++h) qs[h] = qv[h] * scale;
        float m = -INFINITY;
        for (int64_t s = lo; s <= hi; ++s) {
          logits[s] = Dot(qs.data(), kb + s * H, H);
          m = std::max(m, logits[s]);
        }
        float total = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t s = lo; s <= hi; ++s) {
          const float p = std::exp(logits[s] - m);
          total += p;
          const float* vs = vb + s * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += p * vs[h];
        }
        const float inv = 1.0f / total;
        for (int64_t h = 0; h < H; ++h) ov[h] = acc[h] * inv;
      }
    }
  }, parallel);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfoundDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
