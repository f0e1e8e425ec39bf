// W8A8 Dense for x86-64 CPUs with AVX2 (no AVX-512), as an XLA FFI custom call (jaxfound.quant.kernel builds it).
//
//   out[m, n] = float(sum_k qx[m, k] * qw[k, n]) * (x_scale[m] * w_scale[n])
//
// the same function as int8_dense.cc (the AVX-512 VNNI path), bit for bit: the same per-token quantization
// (round half to even, clip to [-127, 127], scale absmax / 127, 1 for an all-zero row) and the same rescale.
//
// Arithmetic: vpmaddwd on int16 (sign-extended int8) pairs, int32 accumulators. The byte form llama.cpp uses,
// vpmaddubsw(|x|, sign(w, x)) then vpmaddwd(., 1), needs three multiply-port instructions per 32 products
// where vpmaddwd needs two (the adds go elsewhere); both are exact (|products| <= 2 * 127 * 127 < 2^15),
// and in int32 for K < 2^31 / 127^2, about 133k.
//
// Layout: the weights are packed per call (in parallel) into 8-column panels of int16, [N/8][K/2][8][2], so
// one 32-byte load feeds 8 output columns for 2 k; a micro-tile keeps kMR rows x kNV panels of int32
// accumulators in registers (4 x 2 = 8 of the 16 ymm registers). Work items are (row block, column chunk)
// pairs shared out over XLA's intra-op thread pool; small M is split over columns so both cores work.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
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

constexpr int kMR = 4;             // rows per micro-tile (6 x 2 spills: 12 accumulators + 2 panels + row + product > 16)
constexpr int kNV = 2;             // 8-column panels per micro-tile
constexpr int64_t kRowBlock = 96;  // rows quantized and multiplied per work item (a multiple of kMR)

// lanes [0, n) of 8 set (n clipped to [0, 8]), for maskload / maskstore
inline __m256i TailMask(int64_t n) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))), iota);
}

inline float QuantizeOne(float x, float inv) {
  return std::min(std::max(std::nearbyint(x * inv), -127.0f), 127.0f);  // default rounding: half to even
}

// One row of x (K floats) -> KP int16 q (zero padded past K); returns the row's scale.
inline float QuantizeRow(const float* x, int64_t K, int64_t KP, int16_t* q) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(abs_mask, _mm256_loadu_ps(x + k)));
  if (k < K) vmax = _mm256_max_ps(vmax, _mm256_and_ps(abs_mask, _mm256_maskload_ps(x + k, TailMask(K - k))));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float amax = _mm_cvtss_f32(m4);
  const float inv = amax == 0.0f ? 0.0f : 127.0f / amax;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(x + k), vinv);
    __m256 v1 = _mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv);
    v0 = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
    v1 = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
    // packs works within 128-bit lanes: [v0 lo, v1 lo, v0 hi, v1 hi] -> reorder the 64-bit quarters
    const __m256i packed = _mm256_packs_epi32(_mm256_cvtps_epi32(v0), _mm256_cvtps_epi32(v1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permute4x64_epi64(packed, 0xD8));
  }
  for (; k < K; ++k) q[k] = static_cast<int16_t>(QuantizeOne(x[k], inv));
  for (; k < KP; ++k) q[k] = 0;
  return amax == 0.0f ? 1.0f : amax / 127.0f;
}

// Panels [p0, p1) of qw [K, N] row-major -> [NP][KQ][8][2] int16 (zero padded).
void PackPanels(const int8_t* w, int64_t K, int64_t N, int64_t KQ, int64_t p0, int64_t p1, int16_t* packed) {
  for (int64_t p = p0; p < p1; ++p) {
    int16_t* dst = packed + p * KQ * 16;
    const int64_t n0 = p * 8;
    const int64_t cols = std::min<int64_t>(8, N - n0);
    for (int64_t kq = 0; kq < KQ; ++kq) {
      const int64_t k0 = kq * 2;
      if (cols == 8 && k0 + 2 <= K) {  // interleave 2 rows of 8 bytes, then sign-extend to int16
        const __m128i r0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k0 * N + n0));
        const __m128i r1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + (k0 + 1) * N + n0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + kq * 16), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(r0, r1)));
      } else {
        for (int64_t c = 0; c < 8; ++c) {
          for (int64_t r = 0; r < 2; ++r) {
            const bool in = c < cols && k0 + r < K;
            dst[kq * 16 + c * 2 + r] = in ? w[(k0 + r) * N + n0 + c] : 0;
          }
        }
      }
    }
  }
}

// MR x NV tile (at most 6 x 2): rows a[0..MR) (stride lda int16) times panels b[0..NV) (stride KQ*16 int16).
// The accumulators are named variables: GCC keeps an array of vectors on the stack, which halves the speed.
template <int MR, int NV>
inline void Tile(const int16_t* a, int64_t lda, const int16_t* b, int64_t KQ, const float* w_scale,
                 const float* x_scale, float* out, int64_t ldo, int64_t cols) {
  static_assert(MR >= 1 && MR <= kMR + 2 && NV >= 1 && NV <= 2, "tile is at most 6 x 2");
#define JF_ROW_ACC(i) __m256i c##i##0 = _mm256_setzero_si256(), c##i##1 = _mm256_setzero_si256();
  JF_ROW_ACC(0) JF_ROW_ACC(1) JF_ROW_ACC(2) JF_ROW_ACC(3) JF_ROW_ACC(4) JF_ROW_ACC(5)
  const int64_t panel = KQ * 16;
  for (int64_t kq = 0; kq < KQ; ++kq) {
    const int16_t* bk = b + kq * 16;
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bk));
    const __m256i b1 = NV > 1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bk + panel)) : b0;
#define JF_ROW_MADD(i)                                                                        \
  if constexpr (MR > i) {                                                                     \
    int32_t pair;                                                                             \
    std::memcpy(&pair, a + i * lda + kq * 2, 4);                                              \
    const __m256i av = _mm256_set1_epi32(pair);                                               \
    c##i##0 = _mm256_add_epi32(c##i##0, _mm256_madd_epi16(av, b0));                           \
    if constexpr (NV > 1) c##i##1 = _mm256_add_epi32(c##i##1, _mm256_madd_epi16(av, b1));     \
  }
    JF_ROW_MADD(0) JF_ROW_MADD(1) JF_ROW_MADD(2) JF_ROW_MADD(3) JF_ROW_MADD(4) JF_ROW_MADD(5)
  }
  // acc -> float, times (x_scale * w_scale), the product XLA's path forms
#define JF_STORE(i, j)                                                                                  \
  {                                                                                                     \
    const __m256i mask = TailMask(cols - 8 * j);                                                        \
    const __m256 s = _mm256_mul_ps(_mm256_set1_ps(x_scale[i]), _mm256_maskload_ps(w_scale + 8 * j, mask)); \
    _mm256_maskstore_ps(out + i * ldo + 8 * j, mask, _mm256_mul_ps(_mm256_cvtepi32_ps(c##i##j), s));    \
  }
#define JF_ROW_STORE(i)                                                                 \
  if constexpr (MR > i) {                                                               \
    JF_STORE(i, 0)                                                                      \
    if constexpr (NV > 1) JF_STORE(i, 1)                                                \
  }
  JF_ROW_STORE(0) JF_ROW_STORE(1) JF_ROW_STORE(2) JF_ROW_STORE(3) JF_ROW_STORE(4) JF_ROW_STORE(5)
#undef JF_ROW_ACC
#undef JF_ROW_MADD
#undef JF_ROW_STORE
#undef JF_STORE
}

template <int MR>
inline void TileRows(int nv, const int16_t* a, int64_t lda, const int16_t* b, int64_t KQ, const float* ws,
                     const float* xs, float* out, int64_t ldo, int64_t cols) {
  if (nv == 2) return Tile<MR, 2>(a, lda, b, KQ, ws, xs, out, ldo, cols);
  return Tile<MR, 1>(a, lda, b, KQ, ws, xs, out, ldo, cols);
}

void TileAny(int mr, int nv, const int16_t* a, int64_t lda, const int16_t* b, int64_t KQ, const float* ws,
             const float* xs, float* out, int64_t ldo, int64_t cols) {
  static_assert(kMR == 4, "TileAny instantiates 1..4 rows");
  switch (mr) {
    case 4: return TileRows<4>(nv, a, lda, b, KQ, ws, xs, out, ldo, cols);
    case 3: return TileRows<3>(nv, a, lda, b, KQ, ws, xs, out, ldo, cols);
    case 2: return TileRows<2>(nv, a, lda, b, KQ, ws, xs, out, ldo, cols);
    default: return TileRows<1>(nv, a, lda, b, KQ, ws, xs, out, ldo, cols);
  }
}

struct Problem {
  const float* x;
  const int16_t* packed;
  const float* w_scale;
  float* out;
  int64_t M, K, N, KP, KQ, NP;
};

// Rows [m0, m1) x panels [q0, q1): quantize the rows into a thread-local buffer, then every tile.
void Block(const Problem& p, int64_t m0, int64_t m1, int64_t q0, int64_t q1) {
  thread_local std::vector<int16_t> a;
  thread_local std::vector<float> xs;
  const int64_t rows = m1 - m0;
  if (static_cast<int64_t>(a.size()) < rows * p.KP) a.resize(rows * p.KP);
  if (static_cast<int64_t>(xs.size()) < rows) xs.resize(rows);
  for (int64_t r = 0; r < rows; ++r) xs[r] = QuantizeRow(p.x + (m0 + r) * p.K, p.K, p.KP, a.data() + r * p.KP);
  for (int64_t p0 = q0; p0 < q1; p0 += kNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, q1 - p0));
    const int64_t n0 = p0 * 8;
    const int64_t cols = std::min<int64_t>(8 * nv, p.N - n0);
    for (int64_t r = 0; r < rows; r += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - r));
      TileAny(mr, nv, a.data() + r * p.KP, p.KP, p.packed + p0 * p.KQ * 16, p.KQ, p.w_scale + n0,
              xs.data() + r, p.out + (m0 + r) * p.N + n0, p.N, cols);
    }
  }
}



ffi::Error W8A8DenseImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                         ffi::Buffer<ffi::F32> w_scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || w_scale.element_count() != wd[1]) {
    return ffi::Error::InvalidArgument("jaxfound_w8a8_dense_avx2: expects x (M, K), w int8 (K, N), w_scale (N,)");
  }
  Problem p;
  p.M = xd[0];
  p.K = xd[1];
  p.N = wd[1];
  p.KQ = (p.K + 1) / 2;
  p.KP = p.KQ * 2;
  p.NP = (p.N + 7) / 8;
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  std::vector<int16_t> packed(p.NP * p.KQ * 16);
  p.x = x.typed_data();
  p.packed = packed.data();
  p.w_scale = w_scale.typed_data();
  p.out = out->typed_data();

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int8_t* wp = w.typed_data();
  const int64_t pack_items = std::min<int64_t>(p.NP, 4 * threads);
  ParallelFor(pool, pack_items, [&](int64_t i) {
    PackPanels(wp, p.K, p.N, p.KQ, p.NP * i / pack_items, p.NP * (i + 1) / pack_items, packed.data());
  });

  // split the columns too when there are fewer row blocks than 2 per thread, in whole micro-tile widths
  const int64_t row_blocks = (p.M + kRowBlock - 1) / kRowBlock;
  const int64_t tiles = (p.NP + kNV - 1) / kNV;
  const int64_t col_chunks = std::clamp<int64_t>((2 * threads + row_blocks - 1) / row_blocks, 1, tiles);
  ParallelFor(pool, row_blocks * col_chunks, [&](int64_t i) {
    const int64_t rb = i / col_chunks, cc = i % col_chunks;
    const int64_t q0 = tiles * cc / col_chunks * kNV, q1 = std::min(p.NP, tiles * (cc + 1) / col_chunks * kNV);
    Block(p, rb * kRowBlock, std::min(p.M, (rb + 1) * kRowBlock), q0, q1);
  });
  return ffi::Error::Success();
}

// ---- weights packed once (jaxfound.quant.packed): int8 panels [NP][KQ4][16][4], the layout of the AVX-512 path,
// so one packed tree serves both. Each 16-byte quarter (4 columns x 4 k) is sign-extended to int16 in registers and
// multiplied with vpmaddwd by the row's 4 k broadcast, giving 2 partial sums per column that are added at the end.
// Weights stay int8 in memory: decode (small M) reads a quarter of the bytes of float32 weights.

constexpr int kPackedMR = 3;  // rows per tile: 3 x 4 accumulators + 3 broadcast rows + 1 weight quarter = 16 ymm

template <int MR>
inline void PackedTile(const int16_t* a, int64_t lda, const int8_t* b, int64_t KQ, const float* w_scale,
                       const float* x_scale, float* out, int64_t ldo, int64_t cols) {
  static_assert(MR >= 1 && MR <= kPackedMR, "tile is 1..3 rows x 16 columns");
#define JF_ACC(i) __m256i c##i##0, c##i##1, c##i##2, c##i##3;                                  \
  c##i##0 = c##i##1 = c##i##2 = c##i##3 = _mm256_setzero_si256();
  JF_ACC(0) JF_ACC(1) JF_ACC(2)
  for (int64_t kq = 0; kq < KQ; ++kq) {
    __m256i x0, x1, x2;
    int64_t quad;
    std::memcpy(&quad, a + kq * 4, 8);
    x0 = _mm256_set1_epi64x(quad);
    if constexpr (MR > 1) { std::memcpy(&quad, a + lda + kq * 4, 8); x1 = _mm256_set1_epi64x(quad); }
    if constexpr (MR > 2) { std::memcpy(&quad, a + 2 * lda + kq * 4, 8); x2 = _mm256_set1_epi64x(quad); }
    const int8_t* bk = b + kq * 64;
#define JF_QUARTER(j)                                                                               \
    {                                                                                               \
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bk + 16 * j))); \
      c0##j = _mm256_add_epi32(c0##j, _mm256_madd_epi16(w, x0));                                    \
      if constexpr (MR > 1) c1##j = _mm256_add_epi32(c1##j, _mm256_madd_epi16(w, x1));              \
      if constexpr (MR > 2) c2##j = _mm256_add_epi32(c2##j, _mm256_madd_epi16(w, x2));              \
    }
    JF_QUARTER(0) JF_QUARTER(1) JF_QUARTER(2) JF_QUARTER(3)
  }
  // quarters hold (k0k1, k2k3) per column: hadd gives [c0 c1 c4 c5 | c2 c3 c6 c7]; permute restores column order
#define JF_PSTORE(i, lo, hi, j)                                                                          \
  {                                                                                                      \
    const __m256i sum = _mm256_permute4x64_epi64(_mm256_hadd_epi32(c##i##lo, c##i##hi), 0xD8);           \
    const __m256i mask = TailMask(cols - 8 * j);                                                         \
    const __m256 s = _mm256_mul_ps(_mm256_set1_ps(x_scale[i]), _mm256_maskload_ps(w_scale + 8 * j, mask)); \
    _mm256_maskstore_ps(out + i * ldo + 8 * j, mask, _mm256_mul_ps(_mm256_cvtepi32_ps(sum), s));          \
  }
#define JF_PROW(i)                                                                      \
  if constexpr (MR > i) {                                                               \
    JF_PSTORE(i, 0, 1, 0)                                                               \
    if (cols > 8) JF_PSTORE(i, 2, 3, 1)                                                 \
  }
  JF_PROW(0) JF_PROW(1) JF_PROW(2)
#undef JF_ACC
#undef JF_QUARTER
#undef JF_PSTORE
#undef JF_PROW
}

void PackedTileAny(int mr, const int16_t* a, int64_t lda, const int8_t* b, int64_t KQ, const float* ws,
                   const float* xs, float* out, int64_t ldo, int64_t cols) {
  static_assert(kPackedMR == 3, "PackedTileAny instantiates 1..3 rows");
  if (mr == 3) return PackedTile<3>(a, lda, b, KQ, ws, xs, out, ldo, cols);
  if (mr == 2) return PackedTile<2>(a, lda, b, KQ, ws, xs, out, ldo, cols);
  return PackedTile<1>(a, lda, b, KQ, ws, xs, out, ldo, cols);
}

struct PackedProblem {
  const float* x;
  const int8_t* packed;
  const float* w_scale;
  float* out;
  int64_t M, K, N, KP, KQ, NP;
};

// Rows [m0, m1) x panels [q0, q1): quantize the rows (int16, K padded to KQ * 4), then every tile.
void PackedBlock(const PackedProblem& p, int64_t m0, int64_t m1, int64_t q0, int64_t q1) {
  thread_local std::vector<int16_t> a;
  thread_local std::vector<float> xs;
  const int64_t rows = m1 - m0;
  if (static_cast<int64_t>(a.size()) < rows * p.KP) a.resize(rows * p.KP);
  if (static_cast<int64_t>(xs.size()) < rows) xs.resize(rows);
  for (int64_t r = 0; r < rows; ++r) xs[r] = QuantizeRow(p.x + (m0 + r) * p.K, p.K, p.KP, a.data() + r * p.KP);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t n0 = q * 16;
    const int64_t cols = std::min<int64_t>(16, p.N - n0);
    for (int64_t r = 0; r < rows; r += kPackedMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kPackedMR, rows - r));
      PackedTileAny(mr, a.data() + r * p.KP, p.KP, p.packed + q * p.KQ * 64, p.KQ, p.w_scale + n0, xs.data() + r,
                    p.out + (m0 + r) * p.N + n0, p.N, cols);
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
  PackedProblem p;
  // comp (128 x column sums) is for the AVX-512 path's unsigned activations; this path does not need it
  if (!ReadPacked(p, x, packed, comp, w_scale, out)) {
    return ffi::Error::InvalidArgument(
        "jaxfound_w8a8_packed_avx2: expects x (M, K), packed int8 (ceil(N/16), ceil(K/4)*64), comp int32 "
        "(16*ceil(N/16),), w_scale (N,)");
  }
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t row_blocks = (p.M + kRowBlock - 1) / kRowBlock;
  const int64_t col_chunks = std::clamp<int64_t>((4 * threads + row_blocks - 1) / row_blocks, 1, p.NP);
  ParallelFor(pool, row_blocks * col_chunks, [&](int64_t i) {
    const int64_t rb = i / col_chunks, cc = i % col_chunks;
    PackedBlock(p, rb * kRowBlock, std::min(p.M, (rb + 1) * kRowBlock), p.NP * cc / col_chunks,
                p.NP * (cc + 1) / col_chunks);
  });
  return ffi::Error::Success();
}

// ---- weight-only (w8) on the same panels: float activations, int8 weights converted to float in registers.
//   out[m, n] = (sum_k x[m, k] * float(qw[k, n])) * w_scale[n]
// Half a panel (8 columns) at a time: 8 bytes (2 columns x 4 k) become a float vector multiplied by the row's 4 x
// broadcast to both 128-bit lanes, so each accumulator holds 4 partial sums for 2 columns, added at the end.

constexpr int kW8MR = 2;  // rows per tile: 2 x 4 accumulators + 4 weight vectors + 1 row of the 16 ymm

template <int MR>
inline void W8Tile(const float* a, int64_t lda, const int8_t* b, int64_t KQ, const float* w_scale, float* out,
                   int64_t ldo, int64_t cols) {
  static_assert(MR >= 1 && MR <= kW8MR, "tile is 1..2 rows x 8 columns");
  __m256 f00 = _mm256_setzero_ps(), f01 = f00, f02 = f00, f03 = f00, f10 = f00, f11 = f00, f12 = f00, f13 = f00;
  for (int64_t kq = 0; kq < KQ; ++kq) {
    const int8_t* bk = b + kq * 64;
#define JF_W8LOAD(j) \
    const __m256 w##j = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bk + 8 * j))));
    JF_W8LOAD(0) JF_W8LOAD(1) JF_W8LOAD(2) JF_W8LOAD(3)
    const __m256 x0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(a + kq * 4));
    f00 = _mm256_fmadd_ps(w0, x0, f00);
    f01 = _mm256_fmadd_ps(w1, x0, f01);
    f02 = _mm256_fmadd_ps(w2, x0, f02);
    f03 = _mm256_fmadd_ps(w3, x0, f03);
    if constexpr (MR > 1) {
      const __m256 x1 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(a + lda + kq * 4));
      f10 = _mm256_fmadd_ps(w0, x1, f10);
      f11 = _mm256_fmadd_ps(w1, x1, f11);
      f12 = _mm256_fmadd_ps(w2, x1, f12);
      f13 = _mm256_fmadd_ps(w3, x1, f13);
    }
  }
  // hadd twice: [c0 c2 c4 c6 | c1 c3 c5 c7]; the permute restores column order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i mask = TailMask(cols);
  const __m256 ws = _mm256_maskload_ps(w_scale, mask);
  const __m256 s0 = _mm256_permutevar8x32_ps(
      _mm256_hadd_ps(_mm256_hadd_ps(f00, f01), _mm256_hadd_ps(f02, f03)), order);
  _mm256_maskstore_ps(out, mask, _mm256_mul_ps(s0, ws));
  if constexpr (MR > 1) {
    const __m256 s1 = _mm256_permutevar8x32_ps(
        _mm256_hadd_ps(_mm256_hadd_ps(f10, f11), _mm256_hadd_ps(f12, f13)), order);
    _mm256_maskstore_ps(out + ldo, mask, _mm256_mul_ps(s1, ws));
  }
#undef JF_W8LOAD
}

// Rows [m0, m1) x panels [q0, q1): copy the rows zero padded to KQ * 4 floats, then every half-panel tile.
void W8Block(const PackedProblem& p, int64_t m0, int64_t m1, int64_t q0, int64_t q1) {
  thread_local std::vector<float> a;
  const int64_t rows = m1 - m0;
  if (static_cast<int64_t>(a.size()) < rows * p.KP) a.resize(rows * p.KP);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(a.data() + r * p.KP, p.x + (m0 + r) * p.K, p.K * sizeof(float));
    std::fill(a.data() + r * p.KP + p.K, a.data() + (r + 1) * p.KP, 0.0f);
  }
  for (int64_t q = q0; q < q1; ++q) {
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t n0 = q * 16 + 8 * half;
      const int64_t cols = std::min<int64_t>(8, p.N - n0);
      if (cols <= 0) break;
      for (int64_t r = 0; r < rows; r += kW8MR) {
        const float* ar = a.data() + r * p.KP;
        const int8_t* bq = p.packed + q * p.KQ * 64 + 32 * half;
        float* o = p.out + (m0 + r) * p.N + n0;
        if (rows - r >= 2) {
          W8Tile<2>(ar, p.KP, bq, p.KQ, p.w_scale + n0, o, p.N, cols);
        } else {
          W8Tile<1>(ar, p.KP, bq, p.KQ, p.w_scale + n0, o, p.N, cols);
        }
      }
    }
  }
}

ffi::Error W8PackedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> packed,
                        ffi::Buffer<ffi::S32> comp, ffi::Buffer<ffi::F32> w_scale, ffi::ResultBuffer<ffi::F32> out) {
  PackedProblem p;
  if (!ReadPacked(p, x, packed, comp, w_scale, out)) {
    return ffi::Error::InvalidArgument(
        "jaxfound_w8_packed_avx2: expects x (M, K), packed int8 (ceil(N/16), ceil(K/4)*64), comp int32 "
        "(16*ceil(N/16),), w_scale (N,)");
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfoundW8A8DenseAvx2, W8A8DenseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfoundW8A8PackedAvx2, W8A8PackedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfoundW8PackedAvx2, W8PackedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
