// W4A8 Dense on weights packed once (jaxfound.quant.int4), as an XLA FFI custom call (jaxfound.quant.kernel
// builds this one source twice: with AVX-512 VNNI, and with AVX2 + FMA + F16C).
//
//   out[m, n] = x_scale[m] * sum_g (s[g, n] * sum_{k in g} qx[m, k] * u[k, n] + o[g, n] * sum_{k in g} qx[m, k])
//
// u in [0, 15] are the 4-bit weights, w[k, n] ~= s[g, n] * u[k, n] + o[g, n] for k in group g (G consecutive k);
// qx, x_scale the dynamic per-token symmetric int8 quantization of x (round half to even, clip to [-127, 127]),
// the numbers jaxfound.quant.int8.quantize_activations gives. The group dots are exact int32 (unsigned weights
// times signed activations: vpdpbusd, or vpmaddubsw + vpmaddwd on AVX2 -- 2 * 15 * 127 never saturates int16),
// so the offset needs no per-column correction: only the activations' group sums.
//
// Layout (jaxfound.quant.int4.pack_w4): one uint8 buffer (NP, ngroups * (64 + 8 G)), NP = ceil(N / 16) panels of
// 16 columns. Per (panel, group): 64 bytes of metadata -- 16 float16 scales then 16 float16 offsets -- then G / 8
// blocks of 64 bytes; block b holds k-quads 2b and 2b + 1 of the group: byte 4 c + r has u[4 (2b) + r, c] in its
// low nibble and u[4 (2b + 1) + r, c] in its high nibble. A panel is one contiguous stream (its weights, then the
// next panel's), read once per call at batch 1.

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

constexpr int64_t kRowBlock = 64;  // rows quantized per work item

struct Problem {
  const float* x;
  const uint8_t* packed;
  float* out;
  int64_t M, K, N, G, NG, NP, panel_bytes;
};

// One row of x (K floats) -> K int8 (round half to even, clip [-127, 127]), the group sums; returns the scale.
float QuantizeRow(const float* x, int64_t K, int64_t G, int8_t* q, int32_t* sums) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = amax == 0.0f ? 0.0f : 127.0f / amax;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(x + k), vinv);
    __m256 v1 = _mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv);
    v0 = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
    v1 = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
    const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(v0), _mm256_cvtps_epi32(v1)),
                                                 0xD8);
    const __m128i b8 = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), b8);
  }
  for (; k < K; ++k) {
    const float v = std::nearbyint(x[k] * inv);  // the default rounding mode: half to even
    q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
  }
  for (int64_t g = 0; g * G < K; ++g) {
    int32_t s = 0;
    for (int64_t j = g * G; j < (g + 1) * G; ++j) s += q[j];
    sums[g] = s;
  }
  return amax == 0.0f ? 1.0f : amax / 127.0f;
}

inline int32_t Quad(const int8_t* a) {
  int32_t v;
  std::memcpy(&v, a, 4);
  return v;
}

#if defined(__AVX512VNNI__)

inline __mmask16 TailMask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// MR rows x NV panels (MR * NV <= 8): one int32 accumulator per (row, panel) per group, folded into float ones.
template <int MR, int NV>
void Tile(const Problem& p, const int8_t* a, int64_t lda, const int32_t* sums, int64_t lds, const float* xs,
          int64_t panel0, float* out, int64_t cols) {
  static_assert(MR * NV <= 8, "at most 8 accumulator pairs");
  __m512 f[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) f[r][j] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int64_t group_bytes = 64 + 8 * p.G;
  const uint8_t* base = p.packed + panel0 * p.panel_bytes;
  for (int64_t g = 0; g < p.NG; ++g) {
    __m512i c[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NV; ++j) c[r][j] = _mm512_setzero_si512();
    const uint8_t* gp = base + g * group_bytes;
    const int8_t* ag = a + g * p.G;
    for (int64_t b = 0; b < p.G / 8; ++b) {
      __m512i lo[NV], hi[NV];
      for (int j = 0; j < NV; ++j) {
        const __m512i v = _mm512_loadu_si512(gp + j * p.panel_bytes + 64 + 64 * b);
        lo[j] = _mm512_and_si512(v, low);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      for (int r = 0; r < MR; ++r) {
        const __m512i a0 = _mm512_set1_epi32(Quad(ag + r * lda + 8 * b));
        const __m512i a1 = _mm512_set1_epi32(Quad(ag + r * lda + 8 * b + 4));
        for (int j = 0; j < NV; ++j) {
          c[r][j] = _mm512_dpbusd_epi32(c[r][j], lo[j], a0);
          c[r][j] = _mm512_dpbusd_epi32(c[r][j], hi[j], a1);
        }
      }
    }
    for (int j = 0; j < NV; ++j) {
      const uint8_t* meta = gp + j * p.panel_bytes;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(meta)));
      const __m512 o = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(meta + 32)));
      for (int r = 0; r < MR; ++r) {
        f[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c[r][j]), s, f[r][j]);
        f[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(sums[r * lds + g])), o, f[r][j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 xs_r = _mm512_set1_ps(xs[r]);
    for (int j = 0; j < NV; ++j) {
      const int64_t left = cols - 16 * j;
      if (left <= 0) break;
      _mm512_mask_storeu_ps(out + r * p.N + 16 * j, TailMask(left), _mm512_mul_ps(f[r][j], xs_r));
    }
  }
}

#else  // AVX2: a 64-byte block is two 256-bit halves (columns 0-7, 8-15)

inline __m256i TailMask8(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(n, 8))), idx);
}

template <int MR, int NV>
void Tile(const Problem& p, const int8_t* a, int64_t lda, const int32_t* sums, int64_t lds, const float* xs,
          int64_t panel0, float* out, int64_t cols) {
  static_assert(MR * NV <= 2, "at most 2 (row, panel) pairs: 16 ymm registers");
  __m256 f[MR][NV][2];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) f[r][j][0] = f[r][j][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t group_bytes = 64 + 8 * p.G;
  const uint8_t* base = p.packed + panel0 * p.panel_bytes;
  for (int64_t g = 0; g < p.NG; ++g) {
    __m256i c[MR][NV][2];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NV; ++j) c[r][j][0] = c[r][j][1] = _mm256_setzero_si256();
    const uint8_t* gp = base + g * group_bytes;
    const int8_t* ag = a + g * p.G;
    for (int64_t b = 0; b < p.G / 8; ++b) {
      for (int r = 0; r < MR; ++r) {
        const __m256i a0 = _mm256_set1_epi32(Quad(ag + r * lda + 8 * b));
        const __m256i a1 = _mm256_set1_epi32(Quad(ag + r * lda + 8 * b + 4));
        for (int j = 0; j < NV; ++j) {
          for (int h = 0; h < 2; ++h) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                gp + j * p.panel_bytes + 64 + 64 * b + 32 * h));
            const __m256i lo = _mm256_and_si256(v, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_maddubs_epi16(hi, a1));
            c[r][j][h] = _mm256_add_epi32(c[r][j][h], _mm256_madd_epi16(s16, ones));
          }
        }
      }
    }
    for (int j = 0; j < NV; ++j) {
      const uint8_t* meta = gp + j * p.panel_bytes;
      for (int h = 0; h < 2; ++h) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(meta + 16 * h)));
        const __m256 o = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(meta + 32 + 16 * h)));
        for (int r = 0; r < MR; ++r) {
          f[r][j][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[r][j][h]), s, f[r][j][h]);
          f[r][j][h] = _mm256_fmadd_ps(_mm256_set1_ps(static_cast<float>(sums[r * lds + g])), o, f[r][j][h]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m256 xs_r = _mm256_set1_ps(xs[r]);
    for (int j = 0; j < NV; ++j) {
      for (int h = 0; h < 2; ++h) {
        const int64_t left = cols - 16 * j - 8 * h;
        if (left <= 0) break;
        _mm256_maskstore_ps(out + r * p.N + 16 * j + 8 * h, TailMask8(left), _mm256_mul_ps(f[r][j][h], xs_r));
      }
    }
  }
}

#endif

#if defined(__AVX512VNNI__)
constexpr int kPanelsOneRow = 4;  // a batch-1 step: 4 panels of one row, 4 independent accumulator chains
constexpr int kRows = 4;          // larger batches: 4 rows x 2 panels
constexpr int kPanelsRows = 2;
#else
constexpr int kPanelsOneRow = 2;
constexpr int kRows = 2;
constexpr int kPanelsRows = 1;
#endif

// rows r (at most kRows) x panels [panel0, panel0 + nv) with nv <= the tile width for that many rows
void TileAny(const Problem& p, int rows, int nv, const int8_t* a, int64_t lda, const int32_t* sums, int64_t lds,
             const float* xs, int64_t panel0, float* out, int64_t cols) {
#define JF_TILE(MR, NV) return Tile<MR, NV>(p, a, lda, sums, lds, xs, panel0, out, cols)
  if (rows == 1) {
    if (nv >= 4 && kPanelsOneRow >= 4) JF_TILE(1, (kPanelsOneRow >= 4 ? 4 : 1));
    if (nv == 3 && kPanelsOneRow >= 4) JF_TILE(1, (kPanelsOneRow >= 4 ? 3 : 1));
    if (nv >= 2) JF_TILE(1, 2);
    JF_TILE(1, 1);
  }
  if (rows >= 4 && kRows >= 4) {
    if (nv >= 2) JF_TILE((kRows >= 4 ? 4 : 1), kPanelsRows);
    JF_TILE((kRows >= 4 ? 4 : 1), 1);
  }
  if (rows == 3 && kRows >= 4) {
    if (nv >= 2) JF_TILE((kRows >= 4 ? 3 : 1), kPanelsRows);
    JF_TILE((kRows >= 4 ? 3 : 1), 1);
  }
  if (nv >= 2 && kPanelsRows >= 2) JF_TILE(2, (kPanelsRows >= 2 ? 2 : 1));
  JF_TILE(2, 1);
#undef JF_TILE
}

// Rows [m0, m1) x panels [q0, q1): quantize the rows into thread-local buffers, then every tile.
void Block(const Problem& p, int64_t m0, int64_t m1, int64_t q0, int64_t q1) {
  thread_local std::vector<int8_t> a;
  thread_local std::vector<int32_t> sums;
  thread_local std::vector<float> xs;
  const int64_t rows = m1 - m0;
  if (static_cast<int64_t>(a.size()) < rows * p.K) a.resize(rows * p.K);
  if (static_cast<int64_t>(sums.size()) < rows * p.NG) sums.resize(rows * p.NG);
  if (static_cast<int64_t>(xs.size()) < rows) xs.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    xs[r] = QuantizeRow(p.x + (m0 + r) * p.K, p.K, p.G, a.data() + r * p.K, sums.data() + r * p.NG);
  }
  for (int64_t r = 0; r < rows;) {
    const int mr = rows - r == 1 ? 1 : static_cast<int>(std::min<int64_t>(kRows, rows - r));
    const int width = mr == 1 ? kPanelsOneRow : (mr >= 3 ? kPanelsRows : std::min(kPanelsRows, 2));
    for (int64_t q = q0; q < q1; q += width) {
      const int nv = static_cast<int>(std::min<int64_t>(width, q1 - q));
      const int64_t n0 = q * 16;
      TileAny(p, mr, nv, a.data() + r * p.K, p.K, sums.data() + r * p.NG, p.NG, xs.data() + r, q,
              p.out + (m0 + r) * p.N + n0, std::min<int64_t>(16 * nv, p.N - n0));
    }
    r += mr;
  }
}



ffi::Error W4A8PackedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                          ffi::ResultBuffer<ffi::F32> out, int64_t n, int64_t group) {
  const auto xd = x.dimensions();
  const auto pd = packed.dimensions();
  Problem p;
  p.M = xd.size() == 2 ? xd[0] : 0;
  p.K = xd.size() == 2 ? xd[1] : 0;
  p.N = n;
  p.G = group;
  p.NG = group > 0 ? p.K / group : 0;
  p.NP = (n + 15) / 16;
  p.panel_bytes = p.NG * (64 + 8 * group);
  if (xd.size() != 2 || pd.size() != 2 || group <= 0 || group % 8 != 0 || p.K % group != 0 || pd[0] != p.NP ||
      pd[1] != p.panel_bytes) {
    return ffi::Error::InvalidArgument(
        "jaxfound_w4a8_packed: expects x (M, K), packed uint8 (ceil(N/16), K/G * (64 + 8 G)) with G a multiple of 8 "
        "dividing K");
  }
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  p.x = x.typed_data();
  p.packed = packed.typed_data();
  p.out = out->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t row_blocks = (p.M + kRowBlock - 1) / kRowBlock;
  const int64_t width = kPanelsOneRow;
  const int64_t tiles = (p.NP + width - 1) / width;
  const int64_t col_chunks = std::clamp<int64_t>((4 * threads + row_blocks - 1) / row_blocks, 1, tiles);
  ParallelFor(pool, row_blocks * col_chunks, [&](int64_t i) {
    const int64_t rb = i / col_chunks, cc = i % col_chunks;
    const int64_t q0 = tiles * cc / col_chunks * width, q1 = std::min(p.NP, tiles * (cc + 1) / col_chunks * width);
    Block(p, rb * kRowBlock, std::min(p.M, (rb + 1) * kRowBlock), q0, q1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxfoundW4A8Packed, W4A8PackedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("group"));
