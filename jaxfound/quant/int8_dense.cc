// W8A8 Dense for x86-64 CPUs with AVX-512 VNNI, as an XLA FFI custom call (jaxfound.quant.kernel builds it).
//
//   out[m, n] = float(sum_k qx[m, k] * qw[k, n]) * (x_scale[m] * w_scale[n])
//
// with qx, x_scale the dynamic per-token symmetric int8 quantization of x (round half to even, clip to
// [-127, 127]) -- the same numbers jaxfound.quant.int8.quantized_dot(..., "w8a8") computes with XLA ops.
//
// vpdpbusd multiplies unsigned x signed bytes, so activations are stored as u = qx + 128 and the
// int32 accumulator is corrected by 128 * colsum(qw): sum_k u * qw - 128 * sum_k qw = sum_k qx * qw
// (exact in int32 for K < 2^31 / (255 * 127), about 66k).
//
// Layout: the weights are packed per call into 16-column panels, [N/16][K/4][16][4] bytes, so one 64-byte
// load feeds 16 output columns for 4 k; a micro-tile keeps kMR rows x kNV panels of int32 accumulators in
// registers. Row blocks (quantize then multiply) are shared out over XLA's intra-op thread pool.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxfound::ParallelFor;

namespace {

constexpr int kMR = 8;          // rows per micro-tile
constexpr int kNV = 2;          // 16-column panels per micro-tile: 16 accumulators (GCC 12 spills 24)
constexpr int64_t kRowBlock = 96;  // rows quantized and multiplied per work item (a multiple of kMR)

inline __mmask16 TailMask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// One row of x (K floats) -> K bytes u = q + 128 followed by 128s up to Kp; returns the row's scale.
inline float QuantizeRow(const float* x, int64_t K, int64_t Kp, uint8_t* u) {
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(TailMask(K - k), x + k)));
  }
  const float amax = _mm512_reduce_max_ps(vmax);
  const float inv = amax == 0.0f ? 0.0f : 127.0f / amax;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  const __m512i offset = _mm512_set1_epi32(128);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = TailMask(K - k);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + k), vinv);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), offset);
    _mm_mask_storeu_epi8(u + k, mask, _mm512_cvtepi32_epi8(q));
  }
  std::memset(u + K, 128, Kp - K);
  return amax == 0.0f ? 1.0f : amax / 127.0f;
}

// qw [K, N] row-major -> panels [NP][KQ][16][4] (zero padded) and comp[n] = 128 * sum_k qw[k, n].
void PackWeights(const int8_t* w, int64_t K, int64_t N, int64_t KQ, int64_t NP, int8_t* packed, int32_t* comp) {
  for (int64_t p = 0; p < NP; ++p) {
    int8_t* dst = packed + p * KQ * 64;
    const int64_t n0 = p * 16;
    const int64_t cols = std::min<int64_t>(16, N - n0);
    for (int64_t kq = 0; kq < KQ; ++kq) {
      const int64_t k0 = kq * 4;
      if (cols == 16 && k0 + 4 <= K) {  // interleave 4 rows of 16 bytes: column-major groups of 4 k
        const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (k0 + 0) * N + n0));
        const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (k0 + 1) * N + n0));
        const __m128i r2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (k0 + 2) * N + n0));
        const __m128i r3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (k0 + 3) * N + n0));
        const __m128i t0 = _mm_unpacklo_epi8(r0, r1), t1 = _mm_unpackhi_epi8(r0, r1);
        const __m128i t2 = _mm_unpacklo_epi8(r2, r3), t3 = _mm_unpackhi_epi8(r2, r3);
        __m128i* out = reinterpret_cast<__m128i*>(dst + kq * 64);
        _mm_storeu_si128(out + 0, _mm_unpacklo_epi16(t0, t2));
        _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(t0, t2));
        _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(t1, t3));
        _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(t1, t3));
      } else {
        for (int64_t c = 0; c < 16; ++c) {
          for (int64_t r = 0; r < 4; ++r) {
            const bool in = c < cols && k0 + r < K;
            dst[kq * 64 + c * 4 + r] = in ? w[(k0 + r) * N + n0 + c] : 0;
          }
        }
      }
    }
    // column sums with the same instruction the GEMM uses: ones (u8) x panel (s8)
    __m512i sum = _mm512_setzero_si512();
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t kq = 0; kq < KQ; ++kq) {
      sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(dst + kq * 64));
    }
    _mm512_storeu_si512(comp + n0, _mm512_slli_epi32(sum, 7));
  }
}

// MR x NV tile (at most 8 x 4; used as 8 x 2): rows a[0..MR) (stride lda bytes) times panels b[0..NV) (stride
// KQ*64 bytes). The accumulators are named variables: GCC keeps an array of __m512i on the stack, which halves
// the speed.
template <int MR, int NV>
inline void Tile(const uint8_t* a, int64_t lda, const int8_t* b, int64_t KQ, const int32_t* comp,
                 const float* w_scale, const float* x_scale, float* out, int64_t ldo, int64_t cols) {
  static_assert(MR >= 1 && MR <= 8 && NV >= 1 && NV <= 4, "tile is at most 8 x 4");
#define JF_ROW_ACC(i) __m512i c##i##0, c##i##1, c##i##2, c##i##3;                     \
  c##i##0 = c##i##1 = c##i##2 = c##i##3 = _mm512_setzero_si512();
  JF_ROW_ACC(0) JF_ROW_ACC(1) JF_ROW_ACC(2) JF_ROW_ACC(3) JF_ROW_ACC(4) JF_ROW_ACC(5) JF_ROW_ACC(6) JF_ROW_ACC(7)
  const int64_t panel = KQ * 64;
  for (int64_t kq = 0; kq < KQ; ++kq) {
    const int8_t* bk = b + kq * 64;
    const __m512i b0 = _mm512_loadu_si512(bk);
    const __m512i b1 = NV > 1 ? _mm512_loadu_si512(bk + panel) : b0;
    const __m512i b2 = NV > 2 ? _mm512_loadu_si512(bk + 2 * panel) : b0;
    const __m512i b3 = NV > 3 ? _mm512_loadu_si512(bk + 3 * panel) : b0;
#define JF_ROW_FMA(i)                                                                   \
  if constexpr (MR > i) {                                                               \
    int32_t quad;                                                                       \
    std::memcpy(&quad, a + i * lda + kq * 4, 4);                                        \
    const __m512i av = _mm512_set1_epi32(quad);                                         \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, av, b0);                                     \
    if constexpr (NV > 1) c##i##1 = _mm512_dpbusd_epi32(c##i##1, av, b1);               \
    if constexpr (NV > 2) c##i##2 = _mm512_dpbusd_epi32(c##i##2, av, b2);               \
    if constexpr (NV > 3) c##i##3 = _mm512_dpbusd_epi32(c##i##3, av, b3);               \
  }
    JF_ROW_FMA(0) JF_ROW_FMA(1) JF_ROW_FMA(2) JF_ROW_FMA(3) JF_ROW_FMA(4) JF_ROW_FMA(5) JF_ROW_FMA(6) JF_ROW_FMA(7)
  }
  // (acc - 128 * colsum) -> float, times (x_scale * w_scale), the product XLA's path forms
#define JF_STORE(i, j)                                                                                       \
  {                                                                                                          \
    const __mmask16 mask = TailMask(cols - 16 * j);                                                          \
    const __m512i c = _mm512_maskz_loadu_epi32(mask, comp + 16 * j);                                         \
    const __m512 s = _mm512_mul_ps(_mm512_set1_ps(x_scale[i]), _mm512_maskz_loadu_ps(mask, w_scale + 16 * j)); \
    const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(c##i##j, c));                                       \
    _mm512_mask_storeu_ps(out + i * ldo + 16 * j, mask, _mm512_mul_ps(f, s));                                \
  }
#define JF_ROW_STORE(i)                                                                 \
  if constexpr (MR > i) {                                                               \
    JF_STORE(i, 0)                                                                      \
    if constexpr (NV > 1) JF_STORE(i, 1)                                                \
    if constexpr (NV > 2) JF_STORE(i, 2)                                                \
    if constexpr (NV > 3) JF_STORE(i, 3)                                                \
  }
  JF_ROW_STORE(0) JF_ROW_STORE(1) JF_ROW_STORE(2) JF_ROW_STORE(3) JF_ROW_STORE(4) JF_ROW_STORE(5) JF_ROW_STORE(6) JF_ROW_STORE(7)
#undef JF_ROW_ACC
#undef JF_ROW_FMA
#undef JF_ROW_STORE
#undef JF_STORE
}

template <int MR>
inline void TileRows(int nv, const uint8_t* a, int64_t lda, const int8_t* b, int64_t KQ, const int32_t* comp,
                     const float* ws, const float* xs, float* out, int64_t ldo, int64_t cols) {
  if constexpr (MR <= 4) {  // 3 or 4 panels only for at most 4 rows (callers keep nv <= 2 above 4 rows)
    if (nv == 4) return Tile<MR, 4>(a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
    if (nv == 3) return Tile<MR, 3>(a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
  }
  if (nv == 2) return Tile<MR, 2>(a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
  return Tile<MR, 1>(a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
}

void TileAny(int mr, int nv, const uint8_t* a, int64_t lda, const int8_t* b, int64_t KQ, const int32_t* comp,
             const float* ws, const float* xs, float* out, int64_t ldo, int64_t cols) {
  switch (mr) {
    case 8: return TileRows<8>(nv, a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
    case 7: return TileRows<7>(nv, a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
    case 6: return TileRows<6>(nv, a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
    case 5: return TileRows<5>(nv, a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
    case 4: return TileRows<4>(nv, a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
    case 3: return TileRows<3>(nv, a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
    case 2: return TileRows<2>(nv, a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
    default: return TileRows<1>(nv, a, lda, b, KQ, comp, ws, xs, out, ldo, cols);
  }
}

struct Problem {
  const float* x;
  const int8_t* packed;
  const int32_t* comp;
  const float* w_scale;
  float* out;
  int64_t M, K, N, KP, KQ, NP;
};

// Rows [m0, m1): quantize them into a thread-local buffer, then every column panel.
void RowBlock(const Problem& p, int64_t m0, int64_t m1) {
  thread_local std::vector<uint8_t> u;
  thread_local std::vector<float> xs;
  const int64_t rows = m1 - m0;
  if (static_cast<int64_t>(u.size()) < rows * p.KP) u.resize(rows * p.KP);
  if (static_cast<int64_t>(xs.size()) < rows) xs.resize(rows);
  for (int64_t r = 0; r < rows; ++r) xs[r] = QuantizeRow(p.x + (m0 + r) * p.K, p.K, p.KP, u.data() + r * p.KP);
  for (int64_t p0 = 0; p0 < p.NP; p0 += kNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, p.NP - p0));
    const int64_t n0 = p0 * 16;
    const int64_t cols = std::min<int64_t>(16 * nv, p.N - n0);
    for (int64_t r = 0; r < rows; r += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - r));
      TileAny(mr, nv, u.data() + r * p.KP, p.KP, p.packed + p0 * p.KQ * 64, p.KQ, p.comp + n0, p.w_scale + n0,
              xs.data() + r, p.out + (m0 + r) * p.N + n0, p.N, cols);
    }
  }
}


ffi::Error W8A8DenseImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                         ffi::Buffer<ffi::F32> w_scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || w_scale.element_count() != wd[1]) {
    return ffi::Error::InvalidArgument("jaxfound_w8a8_dense: expects x (M, K), w int8 (K, N), w_scale (N,)");
  }
  Problem p;
  p.M = xd[0];
  p.K = xd[1];
  p.N = wd[1];
  p.KQ = (p.K + 3) / 4;
  p.KP = p.KQ * 4;
  p.NP = (p.N + 15) / 16;
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  std::vector<int8_t> packed(p.NP * p.KQ * 64);
  std::vector<int32_t> comp(p.NP * 16);
  PackWeights(w.typed_data(), p.K, p.N, p.KQ, p.NP, packed.data(), comp.data());
  p.x = x.typed_data();
  p.packed = packed.data();
  p.comp = comp.data();
  p.w_scale = w_scale.typed_data();
  p.out = out->typed_data();

  ParallelFor(pool, (p.M + kRowBlock - 1) / kRowBlock,
              [&p](int64_t i) { RowBlock(p, i * kRowBlock, std::min(p.M, (i + 1) * kRowBlock)); });
  return ffi::Error::Success();
}



// ---- weights packed once (jaxfound.quant.packed): the panels PackWeights would make, and comp, given as inputs.
// Small M (decode) is the case this serves: no per-call packing, up to 4 panels per tile when M <= 4, and the
// columns split over the pool so every core streams its share of the weights.

// Panels per micro-tile for a block of `rows` rows: 4 x 4 and 8 x 2 tiles both hold 16 accumulators.
inline int PanelsPerTile(int64_t rows) { return rows <= 16 ? 4 : kNV; }

// Rows [m0, m1) x panels [q0, q1): quantize the rows into a thread-local buffer, then every tile.
void PackedBlock(const Problem& p, int64_t m0, int64_t m1, int64_t q0, int64_t q1) {
  thread_local std::vector<uint8_t> u;
  thread_local std::vector<float> xs;
  const int64_t rows = m1 - m0;
  if (static_cast<int64_t>(u.size()) < rows * p.KP) u.resize(rows * p.KP);
  if (static_cast<int64_t>(xs.size()) < rows) xs.resize(rows);
  for (int64_t r = 0; r < rows; ++r) xs[r] = QuantizeRow(p.x + (m0 + r) * p.K, p.K, p.KP, u.data() + r * p.KP);
  const int nv_max = PanelsPerTile(rows);
  const int mr_max = rows <= 16 ? 4 : kMR;
  for (int64_t p0 = q0; p0 < q1; p0 += nv_max) {
    const int nv = static_cast<int>(std::min<int64_t>(nv_max, q1 - p0));
    const int64_t n0 = p0 * 16;
    const int64_t cols = std::min<int64_t>(16 * nv, p.N - n0);
    for (int64_t r = 0; r < rows; r += mr_max) {
      const int mr = static_cast<int>(std::min<int64_t>(mr_max, rows - r));
      TileAny(mr, nv, u.data() + r * p.KP, p.KP, p.packed + p0 * p.KQ * 64, p.KQ, p.comp + n0, p.w_scale + n0,
              xs.data() + r, p.out + (m0 + r) * p.N + n0, p.N, cols);
    }
  }
}

// The shapes of a packed call (x (M, K), packed (ceil(N/16), ceil(K/4)*64), comp (16*ceil(N/16),), w_scale (N,))
// into p, with its data pointers; false when they do not fit that layout.
template <typename P>
bool ReadPacked(P& p, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::S8>& packed, ffi::Buffer<ffi::S32>& comp,
                ffi::Buffer<ffi::F32>& w_scale, ffi::ResultBuffer<ffi::F32>& out) {
  const auto xd = x.dimensions();
  const auto pd = packed.dimensions();
  p.M = xd.size() == 2 ? xd[0] : 0;
  p.K = xd.size() == 2 ? xd[1] : 0;
  p.N = w_scale.element_count();
  p.KQ = (p.K + 3) / 4;
  p.KP = p.KQ * 4;
  p.NP = (p.N + 15) / 16;
  if (xd.size() != 2 || pd.size() != 2 || pd[0] != p.NP || pd[1] != p.KQ * 64 || comp.element_count() != p.NP * 16) {
    return false;
  }
  p.x = x.typed_data();
  p.packed = packed.typed_data();
  p.w_scale = w_scale.typed_data();
  p.out = out->typed_data();
  return true;
}

ffi::Error W8A8PackedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> packed,
                          ffi::Buffer<ffi::S32> comp, ffi::Buffer<ffi::F32> w_scale, ffi::ResultBuffer<ffi::F32> out) {
  Problem p;
  if (!ReadPacked(p, x, packed, comp, w_scale, out)) {
    return ffi::Error::InvalidArgument(
        "jaxfound_w8a8_packed: expects x (M, K), packed int8 (ceil(N/16), ceil(K/4)*64), comp int32 (16*ceil(N/16),), "
        "w_scale (N,)");
  }
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  p.comp = comp.typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t row_blocks = (p.M + kRowBlock - 1) / kRowBlock;
  const int64_t tw = PanelsPerTile(std::min(p.M, kRowBlock));
  const int64_t tiles = (p.NP + tw - 1) / tw;
  // a few column chunks per thread when the rows are few (one slow thread then delays the call less)
  const int64_t col_chunks = std::clamp<int64_t>((4 * threads + row_blocks - 1) / row_blocks, 1, tiles);
  ParallelFor(pool, row_blocks * col_chunks, [&](int64_t i) {
    const int64_t rb = i / col_chunks, cc = i % col_chunks;
    const int64_t q0 = tiles * cc / col_chunks * tw, q1 = std::min(p.NP, tiles * (cc + 1) / col_chunks * tw);
    PackedBlock(p, rb * kRowBlock, std::min(p.M, (rb + 1) * kRowBlock), q0, q1);
  });
  return ffi::Error::Success();
}

// ---- weight-only (w8) on the same panels: float activations, int8 weights converted to float in registers.
//   out[m, n] = (sum_k x[m, k] * float(qw[k, n])) * w_scale[n]
// A 64-byte panel vector (16 columns x 4 k) becomes 4 float vectors of 4 columns x 4 k; the row's 4 x broadcast to
// every 128-bit lane multiplies them, so each accumulator holds 4 partial sums per column, added at the end.

constexpr int kW8MR = 4;  // rows per tile: 4 x 4 accumulators + 4 weight vectors + 1 row

// lanes 4c..4c+3 of v summed, for c = 0..3
inline __m128 SumQuads(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                         0, 0), v));
}

template <int MR>
inline void W8Tile(const float* a, int64_t lda, const int8_t* b, int64_t KQ, const float* w_scale, float* out,
                   int64_t ldo, int64_t cols) {
  static_assert(MR >= 1 && MR <= kW8MR, "tile is 1..4 rows x 16 columns");
#define JF_W8ACC(i) __m512 f##i##0, f##i##1, f##i##2, f##i##3;                          \
  f##i##0 = f##i##1 = f##i##2 = f##i##3 = _mm512_setzero_ps();
  JF_W8ACC(0) JF_W8ACC(1) JF_W8ACC(2) JF_W8ACC(3)
  for (int64_t kq = 0; kq < KQ; ++kq) {
    const int8_t* bk = b + kq * 64;
#define JF_W8LOAD(j) \
    const __m512 w##j = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bk + 16 * j))));
    JF_W8LOAD(0) JF_W8LOAD(1) JF_W8LOAD(2) JF_W8LOAD(3)
#define JF_W8ROW(i)                                                                     \
    if constexpr (MR > i) {                                                             \
      const __m512 xv = _mm512_broadcast_f32x4(_mm_loadu_ps(a + i * lda + kq * 4));     \
      f##i##0 = _mm512_fmadd_ps(w0, xv, f##i##0);                                       \
      f##i##1 = _mm512_fmadd_ps(w1, xv, f##i##1);                                       \
      f##i##2 = _mm512_fmadd_ps(w2, xv, f##i##2);                                       \
      f##i##3 = _mm512_fmadd_ps(w3, xv, f##i##3);                                       \
    }
    JF_W8ROW(0) JF_W8ROW(1) JF_W8ROW(2) JF_W8ROW(3)
  }
  const __mmask16 mask = TailMask(cols);
  const __m512 ws = _mm512_maskz_loadu_ps(mask, w_scale);
#define JF_W8STORE(i)                                                                                   \
  if constexpr (MR > i) {                                                                               \
    __m512 sum = _mm512_castps128_ps512(SumQuads(f##i##0));                                             \
    sum = _mm512_insertf32x4(sum, SumQuads(f##i##1), 1);                                                \
    sum = _mm512_insertf32x4(sum, SumQuads(f##i##2), 2);                                                \
    sum = _mm512_insertf32x4(sum, SumQuads(f##i##3), 3);                                                \
    _mm512_mask_storeu_ps(out + i * ldo, mask, _mm512_mul_ps(sum, ws));                                 \
  }
  JF_W8STORE(0) JF_W8STORE(1) JF_W8STORE(2) JF_W8STORE(3)
#undef JF_W8ACC
#undef JF_W8LOAD
#undef JF_W8ROW
#undef JF_W8STORE
}

// Rows [m0, m1) x panels [q0, q1): copy the rows zero padded to KQ * 4 floats, then every tile.
void W8Block(const Problem& p, int64_t m0, int64_t m1, int64_t q0, int64_t q1) {
  thread_local std::vector<float> a;
  const int64_t rows = m1 - m0;
  if (static_cast<int64_t>(a.size()) < rows * p.KP) a.resize(rows * p.KP);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(a.data() + r * p.KP, p.x + (m0 + r) * p.K, p.K * sizeof(float));
    std::fill(a.data() + r * p.KP + p.K, a.data() + (r + 1) * p.KP, 0.0f);
  }
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t n0 = q * 16;
    const int64_t cols = std::min<int64_t>(16, p.N - n0);
    for (int64_t r = 0; r < rows; r += kW8MR) {
      const float* ar = a.data() + r * p.KP;
      const int8_t* bq = p.packed + q * p.KQ * 64;
      float* o = p.out + (m0 + r) * p.N + n0;
      switch (std::min<int64_t>(kW8MR, rows - r)) {
        case 4: W8Tile<4>(ar, p.KP, bq, p.KQ, p.w_scale + n0, o, p.N, cols); break;
        case 3: W8Tile<3>(ar, p.KP, bq, p.KQ, p.w_scale + n0, o, p.N, cols); break;
        case 2: W8Tile<2>(ar, p.KP, bq, p.KQ, p.w_scale + n0, o, p.N, cols); break;
        default: W8Tile<1>(ar, p.KP, bq, p.KQ, p.w_scale + n0, o, p.N, cols);
      }
    }
  }
}

ffi::Error W8PackedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> packed,
                        ffi::Buffer<ffi::S32> comp, ffi::Buffer<ffi::F32> w_scale, ffi::ResultBuffer<ffi::F32> out) {
  Problem p;
  if (!ReadPacked(p, x, packed, comp, w_scale, out)) {
    return ffi::Error::InvalidArgument(
        "jaxfound_w8_packed: expects x (M, K), packed int8 (ceil(N/16), ceil(K/4)*64), comp int32 (16*ceil(N/16),), "
        "w_scale (N,)");
  }
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t row_blocks = (p.M + kRowBlock - 1) / kRowBlock;
  const int64_t col_chunks = std::clamp<int64_t>((4 * threads + row_blocks - 1) / row_blocks, 1, p.NP);
  ParallelFor(pool, row_blocks * col_chunks, [&](int64_t i) {
    const int64_t rb = i / col_chunks, cc = i % col_chunks;
    W8Block(p, rb * kRowBlock, std::min(p.M, (rb + 1) * kRowBlock), p.NP * cc / col_chunks,
            p.NP * (cc + 1) / col_chunks);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfoundW8A8Dense, W8A8DenseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfoundW8A8Packed, W8A8PackedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfoundW8Packed, W8PackedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
