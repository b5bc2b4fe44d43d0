// Few-row products for the CPU decode backend (aquilachat/backends/cpu_kernels.py):
// y[M, N] = x[M, K] @ w[N, K]^T for float32 and bfloat16, w row-major (as nn.Linear stores it).
// One kernel body (cpu_kernels_body.h) compiled for four instruction sets, chosen at run time:
//   0 generic C++, 1 AVX2 + FMA, 2 AVX-512 (F, BW, VL), 3 AVX-512 + AVX512_BF16 (VDPBF16PS).
// Every level accumulates in fp32 and rounds the result to the input dtype once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <iterator>
#include <numeric>
#include <string>
#include <atomic>
#include <tuple>
#include <type_traits>
#include <vector>
#include <cstdint>
#include <cmath>
#include <cstring>

using bf16 = c10::BFloat16;

// At one input row, a thread's range of weight rows is read as this many parts side by side
// (cpu_kernels_body.h, streams).
constexpr int STREAMS = 8;

// The VDPBF16PS int4 and int8 kernels (q4_bf16_block, q8_bf16_block) prefetch each code stream
// this many bytes ahead of their loads (and the int4 scales PREFETCH_SCALE_BYTES ahead): they
// spend more instructions per byte than the float products, and the hardware prefetchers alone
// left them short of the memory's speed. Measured on the Zen 4 in the engine, the two builds
// alternating step by step on the 7B decode step (30 pairs each): int4 1.05-1.07x and int8
// 1.08-1.11x at 256-512 bytes, 0.90x at 1024 (int8); the float products gained nothing (0.98x at
// 512 on bf16), so they have none. No effect on the results.
constexpr int PREFETCH_CODE_BYTES = 512;
constexpr int PREFETCH_SCALE_BYTES = 256;

namespace generic {
constexpr int MMAX = 4;
template <typename T> struct Ops {
  using in = float;
  using acc = float;
  static constexpr int L = 1;
  static inline float zero() { return 0.f; }
  static inline float load(const T* p) { return static_cast<float>(p[0]); }
  static inline float load_tail(const T* p, int) { return static_cast<float>(p[0]); }
  static inline float fma(float a, float x, float w) { return a + x * w; }
  static inline float sum(float a) { return a; }
};
struct QOps {
  using in = float;
  using acc = float;
  static constexpr int L = 1;
  static inline float zero() { return 0.f; }
  static inline float loadx(const float* p) { return p[0]; }
  static inline float loadx_tail(const float* p, int) { return p[0]; }
  static inline float load8(const int8_t* p) { return static_cast<float>(p[0]); }
  static inline float load8_tail(const int8_t* p, int) { return static_cast<float>(p[0]); }
  static inline float fma(float a, float x, float w) { return a + x * w; }
  static inline float sum(float a) { return a; }
};
#include "cpu_kernels_body.h"
#include "cpu_kernels_quant_body.h"
#include "cpu_kernels_int4_body.h"
}  // namespace generic

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int MMAX = 2;  // 16 ymm registers: 4 x 2 accumulators, 4 weight vectors, 1 input
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
template <typename T> struct Ops;
template <> struct Ops<float> {
  using in = __m256;
  using acc = __m256;
  static constexpr int L = 8;
  static inline __m256 zero() { return _mm256_setzero_ps(); }
  static inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static inline __m256 load_tail(const float* p, int n) {
    float buf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    std::memcpy(buf, p, n * sizeof(float));
    return _mm256_loadu_ps(buf);
  }
  static inline __m256 fma(__m256 a, __m256 x, __m256 w) { return _mm256_fmadd_ps(x, w, a); }
  static inline float sum(__m256 a) { return hsum(a); }
};
template <> struct Ops<bf16> {
  using in = __m256;
  using acc = __m256;
  static constexpr int L = 8;
  static inline __m256 widen(__m128i h) {  // 8 bf16 -> 8 fp32 (exact: bf16 is fp32's top half)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline __m256 zero() { return _mm256_setzero_ps(); }
  static inline __m256 load(const bf16* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline __m256 load_tail(const bf16* p, int n) {
    uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, n * sizeof(uint16_t));
    return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  static inline __m256 fma(__m256 a, __m256 x, __m256 w) { return _mm256_fmadd_ps(x, w, a); }
  static inline float sum(__m256 a) { return hsum(a); }
};
struct QOps {
  using in = __m256;
  using acc = __m256;
  static constexpr int L = 8;
  static inline __m256 zero() { return _mm256_setzero_ps(); }
  static inline __m256 loadx(const float* p) { return _mm256_loadu_ps(p); }
  static inline __m256 loadx_tail(const float* p, int n) { return Ops<float>::load_tail(p, n); }
  static inline __m256 load8(const int8_t* p) {  // 8 int8 -> 8 fp32 (exact)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static inline __m256 load8_tail(const int8_t* p, int n) {
    int8_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, n);
    return load8(buf);
  }
  static inline __m256 fma(__m256 a, __m256 x, __m256 w) { return _mm256_fmadd_ps(x, w, a); }
  static inline float sum(__m256 a) { return hsum(a); }
};
#include "cpu_kernels_body.h"
#include "cpu_kernels_quant_body.h"
#include "cpu_kernels_int4_body.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
namespace avx512 {
constexpr int MMAX = 4;  // 32 zmm registers: 4 x 4 accumulators, 4 weight vectors, 1 input
template <typename T> struct Ops;
template <> struct Ops<float> {
  using in = __m512;
  using acc = __m512;
  static constexpr int L = 16;
  static inline __m512 zero() { return _mm512_setzero_ps(); }
  static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static inline __m512 load_tail(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
  static inline __m512 fma(__m512 a, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, a); }
  static inline float sum(__m512 a) { return _mm512_reduce_add_ps(a); }
};
template <> struct Ops<bf16> {
  using in = __m512;
  using acc = __m512;
  static constexpr int L = 16;
  static inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static inline __m512 zero() { return _mm512_setzero_ps(); }
  static inline __m512 load(const bf16* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline __m512 load_tail(const bf16* p, int n) { return widen(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p)); }
  static inline __m512 fma(__m512 a, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, a); }
  static inline float sum(__m512 a) { return _mm512_reduce_add_ps(a); }
};
struct QOps {
  using in = __m512;
  using acc = __m512;
  static constexpr int L = 16;
  static inline __m512 zero() { return _mm512_setzero_ps(); }
  static inline __m512 loadx(const float* p) { return _mm512_loadu_ps(p); }
  static inline __m512 loadx_tail(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
  static inline __m512 load8(const int8_t* p) {  // 16 int8 -> 16 fp32 (exact)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static inline __m512 load8_tail(const int8_t* p, int n) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), p)));
  }
  static inline __m512 fma(__m512 a, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, a); }
  static inline float sum(__m512 a) { return _mm512_reduce_add_ps(a); }
};
#include "cpu_kernels_body.h"
#include "cpu_kernels_quant_body.h"
#include "cpu_kernels_int4_body.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma")
namespace avx512bf16 {
constexpr int MMAX = 4;
template <typename T> struct Ops;
template <> struct Ops<bf16> {  // VDPBF16PS: 32 bf16 pairs -> 16 fp32 sums per instruction
  using in = __m512i;
  using acc = __m512;
  static constexpr int L = 32;
  static inline __m512 zero() { return _mm512_setzero_ps(); }
  static inline __m512i load(const bf16* p) { return _mm512_loadu_si512(p); }
  static inline __m512i load_tail(const bf16* p, int n) { return _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p); }
  static inline __m512 fma(__m512 a, __m512i x, __m512i w) { return _mm512_dpbf16_ps(a, (__m512bh)x, (__m512bh)w); }
  static inline float sum(__m512 a) { return _mm512_reduce_add_ps(a); }
};
#include "cpu_kernels_body.h"

// int4 weights in this extension's layout (cpu_kernels_int4_body.h) times bfloat16 inputs, with
// VDPBF16PS on codes made bfloat16 by one bitwise op: 0x4300 | q is the bfloat16 128 + q, exact for
// q in 0..15 (128's exponent leaves a step of 1 in its 7 mantissa bits). So the group sum is
// D' = sum (128 + q) x = D + 128 X, and y = sum_g scale * (D' - 136 X) + zero * X: the sums of the
// fp32 body with 32 products per instruction and four bitwise ops per 128 codes. Each lane is one
// output row (the broadcast input pair meets 16 rows' codes), so no horizontal sums; two
// accumulators per row split the chain of dependent VDPBF16PS (nibbles 0, 2 and 1, 3).
template <int R, int MM>
static inline void q4_bf16_block(const bf16* x, const uint16_t* w, const uint32_t* sz, const float* xs, bf16* y, int64_t K, int64_t N, int64_t G, int64_t cpg, int64_t b0,
                                 int64_t m0) {
  const int64_t C = K / 8;
  const __m512i low4 = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
  const __m512i high16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 tot[MM][R];
  for (int i = 0; i < MM; ++i)
    for (int r = 0; r < R; ++r) tot[i][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 d0[MM][R], d1[MM][R];
    for (int i = 0; i < MM; ++i)
      for (int r = 0; r < R; ++r) d0[i][r] = d1[i][r] = _mm512_setzero_ps();
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + ((b0 + r) * C + c) * 32) + PREFETCH_CODE_BYTES, _MM_HINT_T0);
        const __m512i z = _mm512_loadu_si512(w + ((b0 + r) * C + c) * 32);
        const __m512i w0 = _mm512_ternarylogic_epi32(z, low4, magic, 0xEA);  // (z & 0xF) | 0x4300
        const __m512i w1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(z, 4), low4, magic, 0xEA);
        const __m512i w2 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(z, 8), low4, magic, 0xEA);
        const __m512i w3 = _mm512_or_si512(_mm512_srli_epi16(z, 12), magic);
        for (int i = 0; i < MM; ++i) {
          const int32_t* xp = reinterpret_cast<const int32_t*>(x + (m0 + i) * K + c * 8);  // 4 input pairs
          d0[i][r] = _mm512_dpbf16_ps(d0[i][r], (__m512bh)_mm512_set1_epi32(xp[0]), (__m512bh)w0);
          d1[i][r] = _mm512_dpbf16_ps(d1[i][r], (__m512bh)_mm512_set1_epi32(xp[1]), (__m512bh)w1);
          d0[i][r] = _mm512_dpbf16_ps(d0[i][r], (__m512bh)_mm512_set1_epi32(xp[2]), (__m512bh)w2);
          d1[i][r] = _mm512_dpbf16_ps(d1[i][r], (__m512bh)_mm512_set1_epi32(xp[3]), (__m512bh)w3);
        }
      }
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(sz + ((b0 + r) * G + g) * 16) + PREFETCH_SCALE_BYTES, _MM_HINT_T0);
      const __m512i s2 = _mm512_loadu_si512(sz + ((b0 + r) * G + g) * 16);  // lane l: scale | zero << 16
      const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(s2, 16));
      const __m512 zr = _mm512_castsi512_ps(_mm512_and_si512(s2, high16));
      for (int i = 0; i < MM; ++i) {
        const __m512 t = _mm512_sub_ps(_mm512_add_ps(d0[i][r], d1[i][r]), _mm512_set1_ps(136.f * xs[(m0 + i) * G + g]));
        tot[i][r] = _mm512_fmadd_ps(t, sc, tot[i][r]);
        tot[i][r] = _mm512_fmadd_ps(zr, _mm512_set1_ps(xs[(m0 + i) * G + g]), tot[i][r]);
      }
    }
  }
  for (int i = 0; i < MM; ++i)
    for (int r = 0; r < R; ++r)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m0 + i) * N + (b0 + r) * 16),
                          (__m256i)_mm512_cvtneps_pbh(tot[i][r]));
}

// int8 weights in this extension's blocked layout (Int8Linear layout "aquilachat") times bfloat16
// inputs, with VDPBF16PS. Each code u = q + 128 (0..255) is split into nibbles, lo = u & 15 and
// hi = u >> 4. Layout: output rows in blocks of 16; for block b and inputs 4c .. 4c + 3, 16 lanes of
// 32 bits (64 bytes), lane l holding in its low 16-bit word the lo nibbles and in its high word the hi
// nibbles of row 16b + l, input 4c + p in nibble p of each word. One shift and one bitwise op put
// nibble p at bits 3..6 of both words and OR in 0x4180 (low word: bfloat16 16 + lo, exact: 16's
// exponent leaves a step of 1 to the top four mantissa bits) and 0x4380 (high word: 256 + 16 hi,
// exact). VDPBF16PS against the input pair (x[k], x[k]) adds (16 + lo) x + (256 + 16 hi) x =
// (400 + q) x to lane l: a whole code per lane and instruction, 16 products of 8-bit codes per
// VDPBF16PS, no widening. Per group of 32 inputs the offset is removed, tot += D' - 400 X_g (X_g the
// group's input sum, fp32), which keeps the partial sums near the size of sum q x; y = scale * tot,
// rounded to bfloat16 once. Each row's sums run in the same order whatever M and its position, so a
// row gets the same bits alone or in a batch. Rows past N (the last block's padding) are not stored.
constexpr int Q8G = 32;  // inputs per offset-removal group

template <int R, int MM>
static inline void q8_bf16_block(const uint32_t* xd, const uint32_t* w, const bf16* s, const float* xs, bf16* y,
                                 int64_t K, int64_t N, int64_t b0, int64_t m0) {
  // independent VDPBF16PS chains per row block and input row (the same for every MM, so a row's
  // sums do not depend on the batch); R * MM * NA chains in all hide the instruction's latency
  constexpr int NA = 2;
  const int64_t C = K / 4, G = K / Q8G;
  const __m512i mask = _mm512_set1_epi32(0x00780078), magic = _mm512_set1_epi32(0x43804180);
  __m512 tot[MM][R];
  for (int i = 0; i < MM; ++i)
    for (int r = 0; r < R; ++r) tot[i][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 d[MM][R][NA];
    for (int i = 0; i < MM; ++i)
      for (int r = 0; r < R; ++r)
        for (int a = 0; a < NA; ++a) d[i][r][a] = _mm512_setzero_ps();
    for (int64_t c = g * (Q8G / 4); c < (g + 1) * (Q8G / 4); ++c)
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + ((b0 + r) * C + c) * 16) + PREFETCH_CODE_BYTES, _MM_HINT_T0);
        const __m512i z = _mm512_loadu_si512(w + ((b0 + r) * C + c) * 16);
        __m512i wv[4];
        wv[0] = _mm512_ternarylogic_epi32(_mm512_slli_epi32(z, 3), mask, magic, 0xEA);  // (a & b) | c
        wv[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(z, 1), mask, magic, 0xEA);
        wv[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(z, 5), mask, magic, 0xEA);
        wv[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(z, 9), mask, magic, 0xEA);
        for (int i = 0; i < MM; ++i) {
          const uint32_t* xp = xd + (m0 + i) * K + c * 4;  // (x[k], x[k]) for k = 4c .. 4c + 3
          for (int p = 0; p < 4; ++p)
            d[i][r][p % NA] = _mm512_dpbf16_ps(d[i][r][p % NA], (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[p])),
                                               (__m512bh)wv[p]);
        }
      }
    for (int i = 0; i < MM; ++i) {
      const __m512 off = _mm512_set1_ps(400.f * xs[(m0 + i) * G + g]);
      for (int r = 0; r < R; ++r) {
        __m512 sum = d[i][r][0];
        for (int a = 1; a < NA; ++a) sum = _mm512_add_ps(sum, d[i][r][a]);
        tot[i][r] = _mm512_add_ps(tot[i][r], _mm512_sub_ps(sum, off));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t n = (b0 + r) * 16;
    const int rows = static_cast<int>(std::min<int64_t>(16, N - n));
    const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
    const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, s + n)), 16));  // scales of rows n .. n + 15, fp32
    for (int i = 0; i < MM; ++i)
      _mm256_mask_storeu_epi16(y + (m0 + i) * N + n, keep, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(tot[i][r], sc)));
  }
}

// Row blocks [b0, b1) of y[M, N] for the VDPBF16PS kernels: `block(R, MM, r, m)`, with R and MM
// std::integral_constant<int, ...>, computes row blocks r .. r + R - 1 for input rows m .. m + MM - 1.
// Up to four row blocks at a time for one input row (enough independent VDPBF16PS chains to hide the
// instruction's latency, and each broadcast input serves all four), two for more (the accumulators
// must stay in registers). (C++17: the extension builds with whatever standard torch passes.)
template <int N> using Int = std::integral_constant<int, N>;

template <int R, int MM, typename Block>
static inline void row_blocks(const Block& block, int64_t b, int64_t nb, int64_t m) {
  int64_t r = b;
  for (; r + R <= b + nb; r += R) block(Int<R>{}, Int<MM>{}, r, m);
  for (; r < b + nb; ++r) block(Int<1>{}, Int<MM>{}, r, m);
}

template <typename Block>
static inline void for_row_blocks(const Block& block, int64_t M, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; b += 4) {
    const int64_t nb = std::min<int64_t>(4, b1 - b);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) row_blocks<2, 4>(block, b, nb, m);
    switch (M - m) {
      case 1: row_blocks<4, 1>(block, b, nb, m); break;
      case 2: row_blocks<2, 2>(block, b, nb, m); break;
      case 3: row_blocks<2, 3>(block, b, nb, m); break;
      default: break;
    }
  }
}

void q8_bf16_run(const uint32_t* xd, const uint32_t* w, const bf16* s, const float* xs, bf16* y, int64_t M,
                 int64_t K, int64_t N, int64_t b0, int64_t b1) {
  for_row_blocks([&](auto R, auto MM, int64_t r, int64_t m) {
    q8_bf16_block<decltype(R)::value, decltype(MM)::value>(xd, w, s, xs, y, K, N, r, m);
  }, M, b0, b1);
}

void q4_bf16_run(const bf16* x, const uint16_t* w, const uint32_t* sz, const float* xs, bf16* y,
                 int64_t M, int64_t K, int64_t N, int64_t G, int64_t b0, int64_t b1) {
  const int64_t cpg = K / G / 8;
  for_row_blocks([&](auto R, auto MM, int64_t r, int64_t m) {
    q4_bf16_block<decltype(R)::value, decltype(MM)::value>(x, w, sz, xs, y, K, N, G, cpg, r, m);
  }, M, b0, b1);
}
}  // namespace avx512bf16
#pragma GCC pop_options


namespace {

template <typename T>
void dispatch(int64_t level, const T* x, const T* w, T* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  if constexpr (std::is_same_v<T, bf16>) {
    if (level >= 3) return avx512bf16::run(x, w, y, M, K, N, n0, n1);
  }
  if (level >= 2) return avx512::run(x, w, y, M, K, N, n0, n1);
  if (level >= 1) return avx2::run(x, w, y, M, K, N, n0, n1);
  generic::run(x, w, y, M, K, N, n0, n1);
}

template <typename T>
void dispatch_q8(int64_t level, const float* x, const int8_t* q, const float* s, T* y, int64_t M, int64_t K, int64_t N,
                 int64_t n0, int64_t n1) {
  if (level >= 2) return avx512::q8_run<T>(x, q, s, y, M, K, N, n0, n1);
  if (level >= 1) return avx2::q8_run<T>(x, q, s, y, M, K, N, n0, n1);
  generic::q8_run<T>(x, q, s, y, M, K, N, n0, n1);
}

// The highest level this CPU runs (the caller may ask for less).
int64_t cpu_level() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    return __builtin_cpu_supports("avx512bf16") ? 3 : 2;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

// Rows [r0, r1) of `count` weights taken as one range of rows (weight i's rows follow weight i -
// 1's): y[i][M, n[i]] = x[M, K] @ w[i][n[i], K]^T on the rows of each weight inside the range.
template <typename T>
void product_rows(int64_t level, const T* x, const T* const* w, const int64_t* n, T* const* y, size_t count,
                  int64_t M, int64_t K, int64_t r0, int64_t r1) {
  int64_t base = 0;
  for (size_t i = 0; i < count; ++i) {
    const int64_t n0 = std::max(r0, base) - base, n1 = std::min(r1, base + n[i]) - base;
    if (n0 < n1) dispatch<T>(level, x, w[i], y[i], M, K, n[i], n0, n1);
    base += n[i];
  }
}

// y[M, N] = x[M, K] @ w[N, K]^T, the rows split among torch's intra-op threads (at least 64 KiB of
// weight a task, so small products run on the calling thread). Each row is computed by the same
// kernel whatever range it falls in, so a row's bits do not depend on the split.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, int64_t level) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear: x [M, K] and w [N, K] expected, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "linear: x has ", x.size(1), " columns, w has ", w.size(1));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear: x is ", x.scalar_type(), ", w is ", w.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear: CPU tensors expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "linear: contiguous x and w expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "linear: float32 or bfloat16 expected, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  level = std::min(level, cpu_level());
  const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 16) / std::max<int64_t>(1, K * x.element_size()));
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const T *xp = x.data_ptr<T>(), *wp = w.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { dispatch<T>(level, xp, wp, yp, M, K, N, n0, n1); });
  };
  if (x.scalar_type() == at::kFloat) run(float{});
  else run(bf16{});
  return y;
}

// How many distinct threads run the chunks of an at::parallel_for over `n` items here: the
// number of threads the kernels' products really use. at::parallel_for is a header template
// whose OpenMP body compiles to a serial loop unless this file is built with -fopenmp
// (cpu_kernels.py passes it); the tests check this against torch.get_num_threads().
int64_t parallel_threads(int64_t n) {
  std::vector<std::atomic<int>> seen(std::max(1, at::get_num_threads()) + 1);
  for (auto& s : seen) s = 0;
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int id = std::min<int>(at::get_thread_num(), static_cast<int>(seen.size()) - 1);
    seen[id] = 1;
    // a little work per chunk, so that one thread cannot take every chunk before the others start
    volatile double sink = 0;
    for (int i = 0; i < 200000; ++i) sink = sink + i;
  });
  int64_t count = 0;
  for (auto& s : seen) count += s.load();
  return count;
}

// y[M, N] = (x[M, K] @ q[N, K]^T) * scales[N] for int8 q: x widened to fp32 once, fp32 sums.
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t level) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scales.dim() == 1,
              "linear_int8: x [M, K], q [N, K] and scales [N] expected, got ", x.sizes(), ", ", q.sizes(), " and ",
              scales.sizes());
  TORCH_CHECK(x.size(1) == q.size(1), "linear_int8: x has ", x.size(1), " columns, q has ", q.size(1));
  TORCH_CHECK(scales.size(0) == q.size(0), "linear_int8: ", q.size(0), " rows of q but ", scales.size(0), " scales");
  TORCH_CHECK(q.scalar_type() == at::kChar, "linear_int8: q must be int8, got ", q.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "linear_int8: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scales.device().is_cpu(), "linear_int8: CPU tensors expected");
  TORCH_CHECK(q.is_contiguous(), "linear_int8: contiguous q expected");
  level = std::min<int64_t>(std::min(level, cpu_level()), 2);  // no AVX512_BF16 variant: see cpu_kernels_quant_body.h
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  const at::Tensor sf = scales.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 16) / std::max<int64_t>(1, K));
  const float* sp = sf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { dispatch_q8<float>(level, xp, qp, sp, yp, M, K, N, n0, n1); });
  } else {
    bf16* yp = y.data_ptr<bf16>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { dispatch_q8<bf16>(level, xp, qp, sp, yp, M, K, N, n0, n1); });
  }
  return y;
}


template <typename T, typename S>
void dispatch_q4(int64_t level, const float* x, const uint16_t* w, const S* sz, const float* xs, T* y, int64_t M,
                 int64_t K, int64_t N, int64_t G, int64_t b0, int64_t b1) {
  if (level >= 2) return avx512::q4_run<T, S>(x, w, sz, xs, y, M, K, N, G, b0, b1);
  if (level >= 1) return avx2::q4_run<T, S>(x, w, sz, xs, y, M, K, N, G, b0, b1);
  generic::q4_run<T, S>(x, w, sz, xs, y, M, K, N, G, b0, b1);
}

void check_q4(const char* what, const at::Tensor& w, const at::Tensor& sz) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), what,
              ": contiguous uint8 codes [N, K/2] expected, got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(w.size(0) % 16 == 0 && w.size(1) % 4 == 0, what, ": codes [N, K/2] need N % 16 == 0 and K % 8 == 0, got ",
              w.sizes());
  TORCH_CHECK(sz.dim() == 4 && sz.size(0) * 16 == w.size(0) && sz.size(2) == 16 && sz.size(3) == 2 && sz.is_contiguous(),
              what, ": scales_and_zeros [N/16, G, 16, 2] expected for ", w.size(0), " rows, got ", sz.sizes());
  TORCH_CHECK(sz.scalar_type() == at::kFloat || sz.scalar_type() == at::kBFloat16, what,
              ": float32 or bfloat16 scales expected, got ", sz.scalar_type());
  const int64_t K = w.size(1) * 2, G = sz.size(1);
  TORCH_CHECK(G > 0 && K % G == 0 && (K / G) % 8 == 0, what, ": ", G, " groups do not divide ", K,
              " inputs into multiples of 8");
  TORCH_CHECK(w.device().is_cpu() && sz.device().is_cpu(), what, ": CPU tensors expected");
}

// y[M, N] = x[M, K] @ W^T for int4 W in this extension's layout (cpu_kernels_int4_body.h): codes
// w uint8 [N, K/2] (the 16-bit words of the layout), scales and zeros sz [N/16, G, 16, 2] in x's
// dtype. fp32 sums, y rounded to x's dtype once.
at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t level) {
  check_q4("linear_int4", w, sz);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1) * 2, "linear_int4: x [M, ", w.size(1) * 2, "] expected, got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == sz.scalar_type(), "linear_int4: x is ", x.scalar_type(), ", the scales are ",
              sz.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "linear_int4: CPU tensors expected");
  level = std::min(level, cpu_level());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = sz.size(1), gs = K / G;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor xc = x.contiguous();
  // the group sums X[m, g] of the inputs, in fp32 (the same order for every row)
  at::Tensor xs = at::empty({M, G}, x.options().dtype(at::kFloat));
  at::Tensor xf = xc.to(at::kFloat).contiguous();
  {
    const float* xp = xf.data_ptr<float>();
    float* sp = xs.data_ptr<float>();
    for (int64_t i = 0; i < M * G; ++i) {
      float s = 0.f;
      for (int64_t k = 0; k < gs; ++k) s += xp[i * gs + k];
      sp[i] = s;
    }
  }
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<uint8_t>());
  const float* xsp = xs.data_ptr<float>();
  const int64_t blocks = N / 16;
  // row blocks per task: at least ~64 KiB of codes
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, 8 * K));
  if (x.scalar_type() == at::kBFloat16) {
    bf16* yp = y.data_ptr<bf16>();
    if (level >= 3) {
      const bf16* xp = xc.data_ptr<bf16>();
      const uint32_t* sp = reinterpret_cast<const uint32_t*>(sz.data_ptr<bf16>());
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
        avx512bf16::q4_bf16_run(xp, wp, sp, xsp, yp, M, K, N, G, b0, b1);
      });
    } else {
      const float* xp = xf.data_ptr<float>();
      const bf16* sp = sz.data_ptr<bf16>();
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
        dispatch_q4<bf16, bf16>(level, xp, wp, sp, xsp, yp, M, K, N, G, b0, b1);
      });
    }
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "linear_int4: float32 or bfloat16 expected, got ", x.scalar_type());
    float* yp = y.data_ptr<float>();
    const float* xp = xf.data_ptr<float>();
    const float* sp = sz.data_ptr<float>();
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      dispatch_q4<float, float>(level, xp, wp, sp, xsp, yp, M, K, N, G, b0, b1);
    });
  }
  return y;
}

// Rows [n0, n1) (multiples of 16) of the int4 weight in this extension's layout as [n1 - n0, K] in
// the scales' dtype: (q - 8) * scale + zero in fp32, rounded once.
at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& sz, int64_t n0, int64_t n1) {
  check_q4("dequantize_int4", w, sz);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= w.size(0) && n0 % 16 == 0 && n1 % 16 == 0,
              "dequantize_int4: rows [", n0, ", ", n1, ") are not multiples of 16 within ", w.size(0));
  const int64_t K = w.size(1) * 2, G = sz.size(1);
  at::Tensor out = at::empty({n1 - n0, K}, sz.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<uint8_t>());
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, 8 * K));
  if (sz.scalar_type() == at::kBFloat16) {
    const bf16* sp = sz.data_ptr<bf16>();
    bf16* op = out.data_ptr<bf16>();
    at::parallel_for(n0 / 16, n1 / 16, grain, [&](int64_t b0, int64_t b1) {
      generic::q4_dequantize<bf16, bf16>(wp, sp, op + (b0 * 16 - n0) * K, K, G, b0, b1);
    });
  } else {
    const float* sp = sz.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(n0 / 16, n1 / 16, grain, [&](int64_t b0, int64_t b1) {
      generic::q4_dequantize<float, float>(wp, sp, op + (b0 * 16 - n0) * K, K, G, b0, b1);
    });
  }
  return out;
}

void check_q8_blocked(const char* what, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu(), what,
              ": contiguous uint8 CPU codes [N padded to 16, K] in the blocked layout expected, got ", w.scalar_type(),
              " ", w.sizes());
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() &&
              scales.device().is_cpu(), what, ": contiguous bfloat16 CPU scales [N] expected, got ",
              scales.scalar_type(), " ", scales.sizes());
  const int64_t N = scales.size(0);
  TORCH_CHECK(w.size(0) % 16 == 0 && w.size(0) >= N && w.size(0) < N + 16, what, ": ", w.size(0),
              " code rows do not pad ", N, " scales to a multiple of 16");
  TORCH_CHECK(w.size(1) % avx512bf16::Q8G == 0, what, ": the blocked layout needs K % ", avx512bf16::Q8G, " == 0, got K = ", w.size(1));
}

// y[M, N] = (x[M, K] @ q[N, K]^T) * scales[N] for int8 q in the blocked layout (Int8Linear layout
// "aquilachat", q8_bf16_block): bfloat16 x and scales, AVX512_BF16 only (level 3).
at::Tensor linear_int8_blocked(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t level) {
  check_q8_blocked("linear_int8_blocked", w, scales);
  const int64_t K = w.size(1), N = scales.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "linear_int8_blocked: bfloat16 CPU x [M, ", K, "] expected, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(std::min(level, cpu_level()) >= 3, "linear_int8_blocked: needs AVX512_BF16 (level 3); level ",
              std::min(level, cpu_level()), " here");
  const int64_t M = x.size(0), G = K / avx512bf16::Q8G;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor xc = x.contiguous();
  // (x[k], x[k]) as one 32-bit word per input, and the group sums X[m, g] in fp32
  at::Tensor xd = at::empty({M, K}, x.options().dtype(at::kInt));
  at::Tensor xs = at::empty({M, G}, x.options().dtype(at::kFloat));
  {
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<bf16>());
    uint32_t* dp = reinterpret_cast<uint32_t*>(xd.data_ptr<int32_t>());
    float* sp = xs.data_ptr<float>();
    for (int64_t i = 0; i < M * K; ++i) dp[i] = static_cast<uint32_t>(xp[i]) * 0x10001u;
    const bf16* xb = xc.data_ptr<bf16>();
    for (int64_t i = 0; i < M * G; ++i) {
      float acc = 0.f;
      for (int64_t k = 0; k < avx512bf16::Q8G; ++k) acc += static_cast<float>(xb[i * avx512bf16::Q8G + k]);
      sp[i] = acc;
    }
  }
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(w.data_ptr<uint8_t>());
  const uint32_t* xdp = reinterpret_cast<const uint32_t*>(xd.data_ptr<int32_t>());
  const float* xsp = xs.data_ptr<float>();
  const bf16* sp = scales.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  // row blocks per task: at least ~64 KiB of codes
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, 16 * K));
  at::parallel_for(0, (N + 15) / 16, grain, [&](int64_t b0, int64_t b1) {
    avx512bf16::q8_bf16_run(xdp, wp, sp, xsp, yp, M, K, N, b0, b1);
  });
  return y;
}

// Rows [n0, n1) of an int8 weight in the blocked layout as [n1 - n0, K] bfloat16: q * scale in fp32,
// rounded once (for products of many rows, which go to torch's blocked matmul).
at::Tensor dequantize_int8_blocked(const at::Tensor& w, const at::Tensor& scales, int64_t n0, int64_t n1) {
  check_q8_blocked("dequantize_int8_blocked", w, scales);
  const int64_t K = w.size(1), N = scales.size(0), C = K / 4;
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N && n0 % 16 == 0, "dequantize_int8_blocked: rows [", n0, ", ", n1,
              ") do not start at a multiple of 16 within ", N);
  at::Tensor out = at::empty({n1 - n0, K}, scales.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<uint8_t>());
  const bf16* sp = scales.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, 16 * K));
  at::parallel_for(n0 / 16, (n1 + 15) / 16, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int l = 0; l < 16 && b * 16 + l < n1; ++l) {
        const float sc = static_cast<float>(sp[b * 16 + l]);
        bf16* row = op + (b * 16 + l - n0) * K;
        for (int64_t c = 0; c < C; ++c) {
          const uint16_t lo = wp[(b * C + c) * 32 + 2 * l], hi = wp[(b * C + c) * 32 + 2 * l + 1];
          for (int p = 0; p < 4; ++p) {
            const int u = ((lo >> (4 * p)) & 15) | (((hi >> (4 * p)) & 15) << 4);
            row[c * 4 + p] = bf16(static_cast<float>(u - 128) * sc);
          }
        }
      }
  });
  return out;
}

// Rows [n0, n1) of an int8 weight as [n1 - n0, K] in the scales' dtype: q * scale in fp32, rounded
// once (for products of many rows, which go to torch's blocked matmul).
at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scales, int64_t n0, int64_t n1) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.device().is_cpu(),
              "dequantize_int8: contiguous int8 CPU codes [N, K] expected, got ", q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == q.size(0), "dequantize_int8: ", q.size(0),
              " scales expected, got ", scales.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16,
              "dequantize_int8: float32 or bfloat16 scales expected, got ", scales.scalar_type());
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= q.size(0), "dequantize_int8: rows [", n0, ", ", n1, ") outside ", q.size(0));
  const int64_t K = q.size(1);
  const at::Tensor sf = scales.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({n1 - n0, K}, scales.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K));
  auto body = [&](auto* op) {
    using T = std::remove_pointer_t<decltype(op)>;
    at::parallel_for(n0, n1, grain, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) {
        const float s = sp[n];
        const int8_t* row = qp + n * K;
        T* o = op + (n - n0) * K;
        for (int64_t k = 0; k < K; ++k) o[k] = T(static_cast<float>(row[k]) * s);
      }
    });
  };
  if (scales.scalar_type() == at::kBFloat16) body(out.data_ptr<bf16>());
  else body(out.data_ptr<float>());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Fused decode-step ops (the same plain C++ at every instruction level: they are small next to
// the products; what they save is torch's per-op dispatch, a few microseconds each).

// RMSNorm as model.rms_norm: y = w * cast(x * rsqrt(mean(x^2) + eps)), statistics in fp32, the
// normalised value rounded to T before the product with w (one rounding more for bfloat16).
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t C, float eps) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    for (int j = 0; j < 8; ++j) {
      const float v = static_cast<float>(x[c + j]);
      part[j] += v * v;
    }
  for (; c < C; ++c) {
    const float v = static_cast<float>(x[c]);
    part[0] += v * v;
  }
  const float ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(C) + eps);
  for (c = 0; c < C; ++c) {
    const T n = static_cast<T>(static_cast<float>(x[c]) * r);
    y[c] = static_cast<T>(static_cast<float>(w[c]) * static_cast<float>(n));
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0),
              "rms_norm: x [N, C] and w [C] expected, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x is ", x.scalar_type(), ", w is ", w.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU tensors expected");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t N = x.size(0), C = x.size(1);
  if (x.scalar_type() == at::kFloat) {
    for (int64_t n = 0; n < N; ++n)
      rms_norm_rows<float>(xc.data_ptr<float>() + n * C, wc.data_ptr<float>(), y.data_ptr<float>() + n * C, C, eps);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rms_norm: float32 or bfloat16 expected, got ", x.scalar_type());
    for (int64_t n = 0; n < N; ++n)
      rms_norm_rows<bf16>(xc.data_ptr<bf16>() + n * C, wc.data_ptr<bf16>(), y.data_ptr<bf16>() + n * C, C, eps);
  }
  return y;
}

// Rotary embedding as model.rotate: y = x * cos + roll(x, D/2) * signed_sin for x [N, heads, D]
// and tables [N, D] (one row per token, shared by its heads); each product and the sum rounded
// to T as torch's three elementwise ops round them.
template <typename T>
void rotate_rows(const T* x, const T* cs, const T* sn, T* y, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h, x += D, y += D)
    for (int64_t d = 0; d < D; ++d) {
      const int64_t src = d < half ? d + (D - half) : d - half;  // roll by D/2: y[d] takes x[d - D/2]
      const float a = static_cast<float>(static_cast<T>(static_cast<float>(x[d]) * static_cast<float>(cs[d])));
      const float b = static_cast<float>(static_cast<T>(static_cast<float>(x[src]) * static_cast<float>(sn[d])));
      y[d] = static_cast<T>(a + b);
    }
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && sin.sizes() == cos.sizes() && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(2),
              "rotate: x [N, heads, D], cos and sin [N, D] expected, got ", x.sizes(), ", ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && x.scalar_type() == sin.scalar_type(),
              "rotate: one dtype expected, got ", x.scalar_type(), ", ", cos.scalar_type(), " and ", sin.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "rotate: CPU tensors expected");
  const at::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t N = x.size(0), Hn = x.size(1), D = x.size(2);
  if (x.scalar_type() == at::kFloat) {
    for (int64_t n = 0; n < N; ++n)
      rotate_rows<float>(xc.data_ptr<float>() + n * Hn * D, cc.data_ptr<float>() + n * D, sc.data_ptr<float>() + n * D,
                         y.data_ptr<float>() + n * Hn * D, Hn, D);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rotate: float32 or bfloat16 expected, got ", x.scalar_type());
    for (int64_t n = 0; n < N; ++n)
      rotate_rows<bf16>(xc.data_ptr<bf16>() + n * Hn * D, cc.data_ptr<bf16>() + n * D, sc.data_ptr<bf16>() + n * D,
                        y.data_ptr<bf16>() + n * Hn * D, Hn, D);
  }
  return y;
}

// One decode token per row: writes k, v [B, Hkv, D] at (slot_ids[b], :, positions[b]) of the
// caches [slots, Hkv, S, D], then attends q [B, H, D] over that slot's positions 0..positions[b]
// (what model.attend's mask allows when kv_len > positions): softmax(q.k / sqrt(D)) v with
// grouped heads (query head h reads kv head h / (H / Hkv), as SDPA's enable_gqa); fp32 sums,
// the output [B, H * D] rounded to T once.
template <typename T>
void attend_head(const T* q, const T* kc, const T* vc, T* out, int64_t n, int64_t D, float scale, float* scores,
                 float* acc) {
  float mx = -INFINITY;
  for (int64_t p = 0; p < n; ++p) {
    const T* kp = kc + p * D;
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int j = 0; j < 8; ++j) part[j] += static_cast<float>(q[d + j]) * static_cast<float>(kp[d + j]);
    for (; d < D; ++d) part[0] += static_cast<float>(q[d]) * static_cast<float>(kp[d]);
    const float s = (((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))) * scale;
    scores[p] = s;
    mx = std::max(mx, s);
  }
  float total = 0;
  for (int64_t p = 0; p < n; ++p) {
    scores[p] = std::exp(scores[p] - mx);
    total += scores[p];
  }
  for (int64_t d = 0; d < D; ++d) acc[d] = 0;
  for (int64_t p = 0; p < n; ++p) {
    const T* vp = vc + p * D;
    const float w = scores[p];
    for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<float>(vp[d]);
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] * inv);
}

template <typename T>
void decode_attend_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kc, at::Tensor& vc,
                        const int64_t* slots, const int64_t* pos, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), S = kc.size(2);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T *kcp = kc.data_ptr<T>(), *vcp = vc.data_ptr<T>(), *op = out.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t row = ((slots[b] * Hkv + h) * S + pos[b]) * D;
      std::memcpy(kcp + row, kp + (b * Hkv + h) * D, D * sizeof(T));
      std::memcpy(vcp + row, vp + (b * Hkv + h) * D, D * sizeof(T));
    }
  const int64_t group = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, pos[b] + 1);
  // (row, head) pairs per task: at least ~64 K multiply-adds, so short contexts run on this thread
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, 2 * longest * D));
  at::parallel_for(0, B * H, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(longest), acc(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const int64_t base = (slots[b] * Hkv + h / group) * S * D;
      attend_head<T>(qp + i * D, kcp + base, vcp + base, op + i * D, pos[b] + 1, D, scale, scores.data(), acc.data());
    }
  });
}

at::Tensor decode_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache,
                         at::Tensor v_cache, const at::Tensor& slot_ids, const at::Tensor& positions) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "decode_attend: q [B, H, D], k and v [B, Hkv, D] expected, got ", q.sizes(), ", ", k.sizes(), " and ",
              v.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "decode_attend: ", H, " query heads are not a multiple of ", Hkv, " kv heads");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(1) == Hkv && k_cache.size(3) == D,
              "decode_attend: caches [slots, ", Hkv, ", S, ", D, "] expected, got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attend: contiguous caches expected");
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && k_cache.scalar_type() == dt && v_cache.scalar_type() == dt,
              "decode_attend: one dtype expected for q, k, v and the caches");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && k_cache.device().is_cpu() &&
                  v_cache.device().is_cpu(),
              "decode_attend: CPU tensors expected");
  TORCH_CHECK(slot_ids.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slot_ids.numel() == B &&
                  positions.numel() == B,
              "decode_attend: int64 slot_ids and positions [B] expected");
  const at::Tensor sl = slot_ids.contiguous(), ps = positions.contiguous();
  const int64_t *slots = sl.data_ptr<int64_t>(), *pos = ps.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < k_cache.size(0), "decode_attend: slot ", slots[b], " outside the cache");
    TORCH_CHECK(pos[b] >= 0 && pos[b] < k_cache.size(2), "decode_attend: position ", pos[b], " outside the cache");
  }
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty({B, H * D}, q.options());
  if (dt == at::kFloat) {
    decode_attend_impl<float>(qc, kc, vc, k_cache, v_cache, slots, pos, out);
  } else {
    TORCH_CHECK(dt == at::kBFloat16, "decode_attend: float32 or bfloat16 expected, got ", dt);
    decode_attend_impl<bf16>(qc, kc, vc, k_cache, v_cache, slots, pos, out);
  }
  return out;
}


// silu(g) * u as model.MLP computes it with torch (silu rounded to T, then the product rounded to
// T), with silu(v) = v / (1 + exp(-v)) in fp32 through std::exp: each element on its own, so the
// bits do not depend on how the elements are split among threads.
template <typename T>
inline void silu_mul_span(const T* g, const T* u, T* y, int64_t n0, int64_t n1) {
  for (int64_t i = n0; i < n1; ++i) {
    const float v = static_cast<float>(g[i]);
    const T s = static_cast<T>(v / (1.0f + std::exp(-v)));
    y[i] = static_cast<T>(static_cast<float>(s) * static_cast<float>(u[i]));
  }
}

at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u) {
  TORCH_CHECK(g.sizes() == u.sizes() && g.scalar_type() == u.scalar_type() && g.device().is_cpu() && u.device().is_cpu(),
              "silu_mul: g and u of one shape and dtype on the CPU expected, got ", g.sizes(), " ", g.scalar_type(),
              " and ", u.sizes(), " ", u.scalar_type());
  const at::Tensor gc = g.contiguous(), uc = u.contiguous();
  at::Tensor y = at::empty_like(gc);
  const int64_t n = gc.numel();
  if (g.scalar_type() == at::kFloat) {
    silu_mul_span<float>(gc.data_ptr<float>(), uc.data_ptr<float>(), y.data_ptr<float>(), 0, n);
  } else {
    TORCH_CHECK(g.scalar_type() == at::kBFloat16, "silu_mul: float32 or bfloat16 expected, got ", g.scalar_type());
    silu_mul_span<bf16>(gc.data_ptr<bf16>(), uc.data_ptr<bf16>(), y.data_ptr<bf16>(), 0, n);
  }
  return y;
}

// torch.max(x, dim=-1) for float32 x [B, V]: each row's largest value and the index of its first
// occurrence; a row holding a NaN gives its first NaN (torch counts NaN as the largest). Sixteen
// interleaved running maxima per row, each keeping its first index (sixteen independent chains
// of selects, not one chain of compares), merged with ties going to the smaller index; chunks of
// 4096 values are checked for NaN as they pass. Plain C++ (the baseline instruction set): ~75 us
// for 100008 values warm, against ~50 us for torch's vectorised amax-based path, but one op on
// cold caches instead of seven (see the backend's max_rows).
std::vector<at::Tensor> max_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.size(1) < (int64_t(1) << 31) && x.scalar_type() == at::kFloat &&
                  x.device().is_cpu(),
              "max_rows: float32 CPU x [B, V] with 0 < V < 2^31 expected, got ", x.sizes(), " ", x.scalar_type());
  const at::Tensor xc = x.contiguous();
  const int64_t B = xc.size(0), V = xc.size(1);
  constexpr int W = 16;
  constexpr int64_t CHUNK = 4096;
  at::Tensor values = at::empty({B}, xc.options()), indices = at::empty({B}, xc.options().dtype(at::kLong));
  for (int64_t b = 0; b < B; ++b) {
    const float* row = xc.data_ptr<float>() + b * V;
    float m = row[0];
    int64_t idx = 0, i = 0;
    bool nan = false;
    if (V >= W) {
      float best[W];
      int32_t at[W];
      for (int j = 0; j < W; ++j) {
        best[j] = row[j];
        at[j] = j;
      }
      const int64_t n = V / W * W;
      for (int64_t c = 0; c < n && !nan; c += CHUNK) {
        const int64_t end = std::min(n, c + CHUNK);
        int32_t nans = 0;
        for (int64_t k = c; k < end; k += W)
          for (int j = 0; j < W; ++j) {
            const float v = row[k + j];
            const bool gt = v > best[j];
            best[j] = gt ? v : best[j];
            at[j] = gt ? static_cast<int32_t>(k + j) : at[j];
            nans |= static_cast<int32_t>(v != v);
          }
        nan = nans != 0;
      }
      m = best[0];
      idx = at[0];
      for (int j = 1; j < W; ++j)
        if (best[j] > m || (best[j] == m && at[j] < idx)) {
          m = best[j];
          idx = at[j];
        }
      i = n;
    }
    for (; i < V && !nan; ++i) {
      const float v = row[i];
      nan = v != v;
      if (v > m) {
        m = v;
        idx = i;
      }
    }
    if (nan || m != m) {  // the first NaN of the row
      for (i = 0; row[i] == row[i]; ++i) {
      }
      m = row[i];
      idx = i;
    }
    values.data_ptr<float>()[b] = m;
    indices.data_ptr<int64_t>()[b] = idx;
  }
  return {values, indices};
}

// The threads of decode_layer's one parallel region: thread t of T takes items
// [n * t / T, n * (t + 1) / T) of each phase, and all meet at a barrier between phases.
struct Team {
  int t = 0, T = 1;
  std::pair<int64_t, int64_t> share(int64_t n) const { return {n * t / T, n * (t + 1) / T}; }
  // a barrier of the region's team; none for a team of one (which runs outside any region: an
  // orphaned barrier there would bind to an enclosing region's team)
  void sync() const {
#ifdef _OPENMP
    if (T > 1) {
#pragma omp barrier
    }
#endif
  }
};

template <typename T>
void decode_layer_impl(const T* x, const std::vector<const T*>& w, const std::vector<int64_t>& rows, float eps1,
                       float eps2, T* kc, T* vc, const T* cs, const T* sn, const int64_t* slots, const int64_t* pos,
                       int64_t B, int64_t C, int64_t I, int64_t H, int64_t Hkv, int64_t D, int64_t S, int64_t level,
                       const std::vector<T*>& buf, float* scratch, int64_t scratch_per_thread, const Team& team) {
  T *h = buf[0], *q = buf[1], *k = buf[2], *v = buf[3], *a = buf[4], *o = buf[5], *x1 = buf[6], *h2 = buf[7],
    *g = buf[8], *u = buf[9], *act = buf[10], *d = buf[11], *out = buf[12];
  // products of several weights as one range of rows (product_rows): ys[i] = in @ ws[i]^T,
  // this thread's share of the rows of weights first .. first + count - 1 (as one range)
  auto products_of = [&](const T* in, int64_t K, size_t first, size_t count, std::initializer_list<T*> ys) {
    const int64_t total = std::accumulate(rows.begin() + first, rows.begin() + first + count, int64_t(0));
    const auto [r0, r1] = team.share(total);
    product_rows<T>(level, in, w.data() + first, rows.data() + first, std::data(ys), count, B, K, r0, r1);
  };
  int64_t b0, b1, i0, i1;
  std::tie(b0, b1) = team.share(B);
  for (int64_t b = b0; b < b1; ++b) rms_norm_rows<T>(x + b * C, w[0], h + b * C, C, eps1);
  team.sync();
  products_of(h, C, 1, 3, {q, k, v});
  team.sync();
  // rotary on k, then k and v into the caches at (slot, head, position)
  std::tie(i0, i1) = team.share(B * Hkv);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / Hkv, hk = i % Hkv, row = ((slots[b] * Hkv + hk) * S + pos[b]) * D;
    rotate_rows<T>(k + i * D, cs + b * D, sn + b * D, kc + row, 1, D);
    std::memcpy(vc + row, v + i * D, D * sizeof(T));
  }
  team.sync();
  // rotary on each query head, then attention over its slot's positions 0..pos
  const int64_t group = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  float* qr_f = scratch + team.t * scratch_per_thread;  // [D] rotated query (as T), [D] acc, scores
  T* qr = reinterpret_cast<T*>(qr_f);
  float *acc = qr_f + D, *scores = qr_f + 2 * D;
  std::tie(i0, i1) = team.share(B * H);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / H, hq = i % H, base = (slots[b] * Hkv + hq / group) * S * D;
    rotate_rows<T>(q + i * D, cs + b * D, sn + b * D, qr, 1, D);
    attend_head<T>(qr, kc + base, vc + base, a + i * D, pos[b] + 1, D, scale, scores, acc);
  }
  team.sync();
  products_of(a, H * D, 4, 1, {o});
  team.sync();
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t c = 0; c < C; ++c) x1[b * C + c] = static_cast<T>(static_cast<float>(x[b * C + c]) + static_cast<float>(o[b * C + c]));
    rms_norm_rows<T>(x1 + b * C, w[5], h2 + b * C, C, eps2);
  }
  team.sync();
  products_of(h2, C, 6, 2, {g, u});
  team.sync();
  std::tie(i0, i1) = team.share(B * I);
  silu_mul_span<T>(g, u, act, i0, i1);
  team.sync();
  products_of(act, I, 8, 1, {d});
  team.sync();
  std::tie(i0, i1) = team.share(B * C);
  for (int64_t i = i0; i < i1; ++i) out[i] = static_cast<T>(static_cast<float>(x1[i]) + static_cast<float>(d[i]));
}

// One decoder layer for one decode token per row (CpuDecodeBackend._layer's fused decode path, in
// one call instead of ~16 from Python): x [B, hidden] and plain float weights of x's dtype in
// `weights` = (input norm, q, k, v, o, post-attention norm, gate, up, down) as nn.Linear stores
// them; cos and sin [B, head_dim] the rows' rotary tables, the caches [slots, kv heads, S,
// head_dim]. The same ops in the same order as that path (rms_norm, q/k/v products, rotate,
// decode_attend, o product and residual add, rms_norm, gate/up products, silu_mul, down product
// and residual add), each row, head and element computed by the same code, so the same bits;
// they run in one parallel region whose threads split each op's rows, heads or elements and
// meet at a barrier between ops (instead of one fork and join per product: ~8 us each here,
// where a 448 x 448 fp32 product takes ~25 us). Returns the layer's output [B, hidden].
// Checks one layer's weights as decode_layer takes them (`what`: the caller, and the layer for
// decode_greedy); returns (head_dim, intermediate size).
std::pair<int64_t, int64_t> check_layer(const std::string& what, const at::Tensor* weights, int64_t C,
                                        at::ScalarType dt, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
              what, ": ", num_heads, " query heads are not a multiple of ", num_kv_heads, " kv heads");
  const int64_t D = weights[1].dim() == 2 ? weights[1].size(0) / num_heads : 0;
  const int64_t I = weights[6].dim() == 2 ? weights[6].size(0) : 0;
  const std::vector<std::vector<int64_t>> shapes{{C}, {num_heads * D, C}, {num_kv_heads * D, C}, {num_kv_heads * D, C},
                                                 {C, num_heads * D}, {C}, {I, C}, {I, C}, {C, I}};
  for (size_t i = 0; i < shapes.size(); ++i)
    TORCH_CHECK(D > 0 && weights[i].sizes() == at::IntArrayRef(shapes[i]) && weights[i].scalar_type() == dt &&
                    weights[i].is_contiguous() && weights[i].device().is_cpu(),
                what, ": weight ", i, " (norm, q, k, v, o, norm, gate, up, down) must be a contiguous CPU ",
                dt, " tensor of shape ", at::IntArrayRef(shapes[i]), ", got ", weights[i].sizes(), " ",
                weights[i].scalar_type());
  return {D, I};
}

// Checks a layer's caches: contiguous CPU [slots, num_kv_heads, S, D] of dtype dt.
void check_caches(const std::string& what, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t num_kv_heads,
                  int64_t D, at::ScalarType dt) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(1) == num_kv_heads &&
                  k_cache.size(3) == D && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == dt && v_cache.scalar_type() == dt && k_cache.device().is_cpu() &&
                  v_cache.device().is_cpu(),
              what, ": contiguous CPU caches [slots, ", num_kv_heads, ", S, ", D, "] of x's dtype expected, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
}

// The threads of a parallel region over `threads` threads (one: no region), each running
// body(team).
template <typename Body>
void run_team(int threads, const Body& body) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      Team team;
      team.t = omp_get_thread_num();
      team.T = omp_get_num_threads();
      body(team);
    }
    return;
  }
#endif
  body(Team{});
}

// torch's intra-op thread count here (1 inside another parallel region).
int team_size() {
  int threads = 1;
#ifdef _OPENMP
  threads = omp_in_parallel() ? 1 : std::max(1, at::get_num_threads());
#endif
  return threads;
}

// Widths of decode_layer_impl's intermediates (h, q, k, v, attention, o, x1, h2, gate, up,
// silu * up, down, output) per row.
std::vector<int64_t> layer_widths(int64_t C, int64_t I, int64_t H, int64_t Hkv, int64_t D) {
  return {C, H * D, Hkv * D, Hkv * D, H * D, C, C, C, I, I, I, C, C};
}

at::Tensor decode_layer(const at::Tensor& x, const std::vector<at::Tensor>& weights, double eps1, double eps2,
                        at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& slot_ids, const at::Tensor& positions, int64_t num_heads,
                        int64_t num_kv_heads, int64_t level) {
  TORCH_CHECK(weights.size() == 9, "decode_layer: 9 weights expected (norm, q, k, v, o, norm, gate, up, down), got ",
              weights.size());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "decode_layer: a contiguous CPU x [B, hidden] expected, got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "decode_layer: float32 or bfloat16 expected, got ", dt);
  const int64_t B = x.size(0), C = x.size(1);
  int64_t D, I;
  std::tie(D, I) = check_layer("decode_layer", weights.data(), C, dt, num_heads, num_kv_heads);
  check_caches("decode_layer", k_cache, v_cache, num_kv_heads, D, dt);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == B && cos.size(1) == D && sin.sizes() == cos.sizes() &&
                  cos.scalar_type() == dt && sin.scalar_type() == dt,
              "decode_layer: cos and sin [", B, ", ", D, "] of x's dtype expected, got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(slot_ids.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slot_ids.numel() == B &&
                  positions.numel() == B,
              "decode_layer: int64 slot_ids and positions [B] expected");
  const at::Tensor sl = slot_ids.contiguous(), ps = positions.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  const int64_t *slots = sl.data_ptr<int64_t>(), *pos = ps.data_ptr<int64_t>();
  const int64_t S = k_cache.size(2);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < k_cache.size(0), "decode_layer: slot ", slots[b], " outside the cache");
    TORCH_CHECK(pos[b] >= 0 && pos[b] < S, "decode_layer: position ", pos[b], " outside the cache");
    longest = std::max(longest, pos[b] + 1);
  }
  const int64_t H = num_heads, Hkv = num_kv_heads;
  // every intermediate of the layer, allocated once
  const std::vector<int64_t> widths = layer_widths(C, I, H, Hkv, D);
  int64_t total = 0;
  for (int64_t wd : widths) total += B * wd;
  at::Tensor arena = at::empty({total}, x.options());
  at::Tensor out = at::empty({B, C}, x.options());
  level = std::min(level, cpu_level());
  const int threads = team_size();
  const int64_t per_thread = 2 * D + longest + 16;  // floats: a rotated query, acc and the scores
  std::vector<float> scratch(per_thread * threads);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    std::vector<const T*> w;
    std::vector<int64_t> rows;
    for (const auto& t : weights) {
      w.push_back(t.data_ptr<T>());
      rows.push_back(t.size(0));
    }
    std::vector<T*> buf;
    T* p = arena.data_ptr<T>();
    for (int64_t wd : widths) {
      buf.push_back(p);
      p += B * wd;
    }
    buf.back() = out.data_ptr<T>();
    const T *xp = x.data_ptr<T>(), *csp = cc.data_ptr<T>(), *snp = sc.data_ptr<T>();
    T *kcp = k_cache.data_ptr<T>(), *vcp = v_cache.data_ptr<T>();
    run_team(threads, [&](const Team& team) {
      decode_layer_impl<T>(xp, w, rows, static_cast<float>(eps1), static_cast<float>(eps2), kcp, vcp, csp, snp, slots,
                           pos, B, C, I, H, Hkv, D, S, level, buf, scratch.data(), per_thread, team);
    });
  };
  if (dt == at::kFloat) run(float{});
  else run(bf16{});
  return out;
}

// Greedy decoding of up to `steps` tokens per row in one call (vLLM's multi-step decoding,
// `num_scheduler_steps`): the whole decode step of CpuDecodeBackend (the token's embedding row,
// decode_layer for every layer, the final rms_norm, the vocabulary product and the greedy pick
// of aquilachat.sampling.sample) repeated, each step's token fed to the next, in one parallel
// region: no Python, no fork and join between steps. Each op is the code the one-step path runs
// on the same values (embedding rows copied, decode_layer_impl, rms_norm_rows, the product's
// dispatch on ranges of rows, whose rows do not depend on the split), so the same bits: the same
// tokens and the same cache entries as `steps` single steps.
//
// tokens [B] int64: each row's last token, at positions [B] (its cache position); slot_ids [B];
// embed [V, C] and head [V, C]: the token embedding and vocabulary projection weights; weights:
// 9 per layer as decode_layer takes them, eps 2 per layer; norm [C] the final norm's weight;
// caches one [slots, Hkv, S, D] pair per layer; cos, sin [steps, B, D]: the rotary tables of
// positions + j at step j. allowed [V] bool (or None): the ids a token may be; end_ids [E]: ids
// that end a row.
//
// A step's pick is plain when its row's logits hold no NaN and no +inf (the greedy fast path of
// sample) and some allowed id is above -inf: the first allowed id with the largest logit.
// Decoding stops after the step where every row has produced an end id, and before accepting a
// step with a pick that is not plain (its keys and values for the fed tokens are in the cache,
// the same a single step writes; the caller runs that step again through the sampler, which
// decides). Returns (tokens [B, steps] int64, done [1] int64): rows' tokens of steps 0 .. done - 1.
std::vector<at::Tensor> decode_greedy(const at::Tensor& tokens, const at::Tensor& embed,
                                      const std::vector<at::Tensor>& weights, const std::vector<double>& eps,
                                      const at::Tensor& norm, double norm_eps, const at::Tensor& head,
                                      const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                                      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slot_ids,
                                      const at::Tensor& positions, const c10::optional<at::Tensor>& allowed,
                                      const at::Tensor& end_ids, int64_t num_heads, int64_t num_kv_heads,
                                      int64_t level) {
  const size_t L = k_caches.size();
  TORCH_CHECK(L > 0 && weights.size() == 9 * L && eps.size() == 2 * L && v_caches.size() == L,
              "decode_greedy: 9 weights, 2 eps and a k and v cache per layer expected, got ", weights.size(), ", ",
              eps.size(), ", ", k_caches.size(), " and ", v_caches.size());
  TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous() && embed.device().is_cpu(),
              "decode_greedy: a contiguous CPU embedding [V, C] expected, got ", embed.sizes());
  const auto dt = embed.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "decode_greedy: float32 or bfloat16 expected, got ", dt);
  const int64_t V = embed.size(0), C = embed.size(1);
  TORCH_CHECK(head.sizes() == embed.sizes() && head.scalar_type() == dt && head.is_contiguous() &&
                  head.device().is_cpu() && norm.dim() == 1 && norm.size(0) == C && norm.scalar_type() == dt &&
                  norm.is_contiguous(),
              "decode_greedy: the head [", V, ", ", C, "] and norm [", C, "] must be contiguous CPU ", dt,
              " tensors, got ", head.sizes(), " ", head.scalar_type(), " and ", norm.sizes(), " ", norm.scalar_type());
  int64_t D = 0, I = 0;
  for (size_t l = 0; l < L; ++l) {
    const std::string what = "decode_greedy, layer " + std::to_string(l);
    std::tie(D, I) = check_layer(what, weights.data() + 9 * l, C, dt, num_heads, num_kv_heads);
    check_caches(what, k_caches[l], v_caches[l], num_kv_heads, D, dt);
    TORCH_CHECK(k_caches[l].sizes() == k_caches[0].sizes(), what, ": caches of another shape than layer 0's");
    TORCH_CHECK(l == 0 || weights[9 * l + 6].size(0) == weights[6].size(0), what, ": another intermediate size");
  }
  const int64_t B = tokens.numel(), S = k_caches[0].size(2), steps = cos.dim() == 3 ? cos.size(0) : 0;
  TORCH_CHECK(B > 0 && tokens.scalar_type() == at::kLong && slot_ids.scalar_type() == at::kLong &&
                  positions.scalar_type() == at::kLong && slot_ids.numel() == B && positions.numel() == B,
              "decode_greedy: int64 tokens, slot_ids and positions [B] expected");
  TORCH_CHECK(steps > 0 && cos.size(1) == B && cos.size(2) == D && sin.sizes() == cos.sizes() &&
                  cos.scalar_type() == dt && sin.scalar_type() == dt,
              "decode_greedy: cos and sin [steps, ", B, ", ", D, "] of the weights' dtype expected, got ", cos.sizes(),
              " and ", sin.sizes());
  TORCH_CHECK(end_ids.scalar_type() == at::kLong, "decode_greedy: int64 end_ids expected");
  const bool* allow = nullptr;
  at::Tensor al;
  if (allowed.has_value()) {
    al = allowed->contiguous();
    TORCH_CHECK(al.scalar_type() == at::kBool && al.numel() == V, "decode_greedy: allowed must be bool [", V, "]");
    allow = al.data_ptr<bool>();
  }
  const at::Tensor tk = tokens.contiguous(), sl = slot_ids.contiguous(), ps = positions.contiguous(),
                   cc = cos.contiguous(), sc = sin.contiguous(), ends = end_ids.contiguous();
  const int64_t* slots = sl.data_ptr<int64_t>();
  std::vector<int64_t> tok(tk.data_ptr<int64_t>(), tk.data_ptr<int64_t>() + B);
  std::vector<int64_t> pos(ps.data_ptr<int64_t>(), ps.data_ptr<int64_t>() + B);
  const std::vector<int64_t> end_list(ends.data_ptr<int64_t>(), ends.data_ptr<int64_t>() + ends.numel());
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(tok[b] >= 0 && tok[b] < V, "decode_greedy: token ", tok[b], " outside the vocabulary");
    TORCH_CHECK(slots[b] >= 0 && slots[b] < k_caches[0].size(0), "decode_greedy: slot ", slots[b], " outside the cache");
    TORCH_CHECK(pos[b] >= 0 && pos[b] + steps <= S, "decode_greedy: positions ", pos[b], "..", pos[b] + steps - 1,
                " outside the cache (", S, " positions)");
    longest = std::max(longest, pos[b] + steps);
  }
  const int64_t H = num_heads, Hkv = num_kv_heads;
  const std::vector<int64_t> widths = layer_widths(C, I, H, Hkv, D);
  int64_t total = 2 * B * C + B * C + B * V;  // two layer inputs / outputs, the final norm, logits
  for (int64_t wd : widths) total += B * wd;
  at::Tensor arena = at::empty({total}, embed.options());
  at::Tensor out = at::zeros({B, steps}, tokens.options().dtype(at::kLong));
  at::Tensor done = at::zeros({1}, tokens.options().dtype(at::kLong));
  int64_t* outp = out.data_ptr<int64_t>();
  level = std::min(level, cpu_level());
  const int threads = team_size();
  const int64_t per_thread = 2 * D + longest + 16;
  std::vector<float> scratch(per_thread * threads);
  // each thread's greedy pick over its vocabulary rows: [thread][row]
  std::vector<float> top(threads * B), best(threads * B);
  std::vector<int64_t> best_id(threads * B);
  std::vector<char> nan(threads * B), ended(B, 0);
  int64_t steps_done = 0;
  auto run = [&](auto zero) {
    using T = decltype(zero);
    std::vector<std::vector<const T*>> w(L);
    std::vector<int64_t> rows;
    for (size_t i = 0; i < 9; ++i) rows.push_back(weights[i].size(0));
    for (size_t l = 0; l < L; ++l)
      for (size_t i = 0; i < 9; ++i) w[l].push_back(weights[9 * l + i].data_ptr<T>());
    T* p = arena.data_ptr<T>();
    T *xa = p, *xb = p + B * C, *hn = p + 2 * B * C, *logits = p + 3 * B * C;
    p += 3 * B * C + B * V;
    std::vector<T*> buf_a, buf_b;  // a layer's intermediates; the output into xb or xa
    for (int64_t wd : widths) {
      buf_a.push_back(p);
      p += B * wd;
    }
    buf_b = buf_a;
    buf_a.back() = xb;
    buf_b.back() = xa;
    const T *ep = embed.data_ptr<T>(), *hp = head.data_ptr<T>(), *np = norm.data_ptr<T>();
    const T *csp = cc.data_ptr<T>(), *snp = sc.data_ptr<T>();
    std::vector<T*> kcp, vcp;
    for (size_t l = 0; l < L; ++l) {
      kcp.push_back(k_caches[l].data_ptr<T>());
      vcp.push_back(v_caches[l].data_ptr<T>());
    }
    run_team(threads, [&](const Team& team) {
      int64_t b0, b1, r0, r1;
      std::tie(b0, b1) = team.share(B);
      std::tie(r0, r1) = team.share(V);
      for (int64_t j = 0; j < steps; ++j) {
        for (int64_t b = b0; b < b1; ++b) std::memcpy(xa + b * C, ep + tok[b] * C, C * sizeof(T));
        team.sync();
        const T* cs = csp + j * B * D;
        const T* sn = snp + j * B * D;
        for (size_t l = 0; l < L; ++l) {
          const bool even = l % 2 == 0;
          decode_layer_impl<T>(even ? xa : xb, w[l], rows, static_cast<float>(eps[2 * l]),
                               static_cast<float>(eps[2 * l + 1]), kcp[l], vcp[l], cs, sn, slots, pos.data(), B, C,
                               I, H, Hkv, D, S, level, even ? buf_a : buf_b, scratch.data(), per_thread, team);
          team.sync();
        }
        const T* last = L % 2 == 1 ? xb : xa;
        for (int64_t b = b0; b < b1; ++b) rms_norm_rows<T>(last + b * C, np, hn + b * C, C, static_cast<float>(norm_eps));
        team.sync();
        dispatch<T>(level, hn, hp, logits, B, C, V, r0, r1);
        for (int64_t b = 0; b < B; ++b) {  // this thread's rows of the pick
          const T* row = logits + b * V;
          float m = -INFINITY, bv = -INFINITY;
          int64_t bi = -1;
          bool has_nan = false;
          for (int64_t i = r0; i < r1; ++i) {
            const float v = static_cast<float>(row[i]);
            has_nan |= v != v;
            m = v > m ? v : m;
            if (v > bv && (allow == nullptr || allow[i])) {
              bv = v;
              bi = i;
            }
          }
          const int64_t k = team.t * B + b;
          top[k] = m, best[k] = bv, best_id[k] = bi, nan[k] = has_nan;
        }
        team.sync();
        if (team.t == 0) {
          bool plain = true, all_ended = true;
          for (int64_t b = 0; b < B; ++b) {
            float m = -INFINITY, bv = -INFINITY;
            int64_t bi = -1;
            bool has_nan = false;
            for (int t = 0; t < team.T; ++t) {  // threads' ranges ascend: ties go to the earlier id
              const int64_t k = t * B + b;
              has_nan |= nan[k] != 0;
              m = std::max(m, top[k]);
              if (best[k] > bv) {
                bv = best[k];
                bi = best_id[k];
              }
            }
            if (has_nan || m == INFINITY || bi < 0) plain = false;
            tok[b] = bi;
          }
          if (plain) {
            for (int64_t b = 0; b < B; ++b) {
              outp[b * steps + j] = tok[b];
              ++pos[b];
              ended[b] |= std::find(end_list.begin(), end_list.end(), tok[b]) != end_list.end();
              all_ended = all_ended && ended[b];
            }
            steps_done = j + 1;
          }
          if (!plain || all_ended) steps_done = -steps_done - 1;  // stop: encoded as negative
        }
        team.sync();
        if (steps_done < 0) break;
      }
    });
  };
  if (dt == at::kFloat) run(float{});
  else run(bf16{});
  done.data_ptr<int64_t>()[0] = steps_done < 0 ? -steps_done - 1 : steps_done;
  return {out, done};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y[M, N] = x[M, K] @ w[N, K]^T (float32 / bfloat16, fp32 accumulation)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("level"));
  m.def("parallel_threads", &parallel_threads, "distinct threads that run an at::parallel_for of n items",
        pybind11::arg("n"));
  m.def("linear_int8", &linear_int8,
        "y[M, N] = (x[M, K] @ q[N, K]^T) * scales[N], int8 q, x float32 / bfloat16 (fp32 accumulation)",
        pybind11::arg("x"), pybind11::arg("q"), pybind11::arg("scales"), pybind11::arg("level"));
  m.def("linear_int4", &linear_int4,
        "y[M, N] = x[M, K] @ W^T for int4 W in this extension's layout: codes w uint8 [N, K/2], scales_and_zeros "
        "[N/16, G, 16, 2] in x's dtype (fp32 accumulation)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("scales_and_zeros"), pybind11::arg("level"));
  m.def("dequantize_int4", &dequantize_int4,
        "rows [n0, n1) of an int4 weight in this extension's layout as [n1 - n0, K] in the scales' dtype",
        pybind11::arg("w"), pybind11::arg("scales_and_zeros"), pybind11::arg("n0"), pybind11::arg("n1"));
  m.def("dequantize_int8", &dequantize_int8, "rows [n0, n1) of an int8 weight as q * scale in the scales' dtype",
        pybind11::arg("q"), pybind11::arg("scales"), pybind11::arg("n0"), pybind11::arg("n1"));
  m.def("linear_int8_blocked", &linear_int8_blocked,
        "y[M, N] = (x[M, K] @ q[N, K]^T) * scales[N] for int8 q in this extension's blocked layout (uint8 [N padded "
        "to 16, K]), bfloat16 x and scales, AVX512_BF16 (fp32 accumulation)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("scales"), pybind11::arg("level"));
  m.def("dequantize_int8_blocked", &dequantize_int8_blocked,
        "rows [n0, n1) of an int8 weight in this extension's blocked layout as q * scale, bfloat16",
        pybind11::arg("w"), pybind11::arg("scales"), pybind11::arg("n0"), pybind11::arg("n1"));
  m.def("rms_norm", &rms_norm, "model.rms_norm for x [N, C] and w [C] of one dtype (fp32 statistics)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("eps"));
  m.def("rotate", &rotate, "model.rotate for x [N, heads, D] and tables [N, D] of one dtype",
        pybind11::arg("x"), pybind11::arg("cos"), pybind11::arg("sin"));
  m.def("decode_attend", &decode_attend,
        "write k, v [B, Hkv, D] into the caches at (slot, position), attend q [B, H, D] over positions <= position",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("slot_ids"), pybind11::arg("positions"));
  m.def("max_rows", &max_rows, "torch.max(x, dim=-1) for float32 x [B, V]: (values [B], first indices [B]), NaN first",
        pybind11::arg("x"));
  m.def("silu_mul", &silu_mul, "silu(g) * u rounded as torch's two ops round them, silu through std::exp",
        pybind11::arg("g"), pybind11::arg("u"));
  m.def("decode_layer", &decode_layer,
        "one decoder layer for one decode token per row, as CpuDecodeBackend._layer's fused path (same bits)",
        pybind11::arg("x"), pybind11::arg("weights"), pybind11::arg("eps1"), pybind11::arg("eps2"),
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("cos"), pybind11::arg("sin"),
        pybind11::arg("slot_ids"), pybind11::arg("positions"), pybind11::arg("num_heads"),
        pybind11::arg("num_kv_heads"), pybind11::arg("level"));
  m.def("decode_greedy", &decode_greedy,
        "greedy decoding of up to steps tokens per row in one call, as steps single decode steps of "
        "CpuDecodeBackend and the sampler's greedy pick (same bits): (tokens [B, steps], done [1])",
        pybind11::arg("tokens"), pybind11::arg("embed"), pybind11::arg("weights"), pybind11::arg("eps"),
        pybind11::arg("norm"), pybind11::arg("norm_eps"), pybind11::arg("head"), pybind11::arg("k_caches"),
        pybind11::arg("v_caches"), pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("slot_ids"),
        pybind11::arg("positions"), pybind11::arg("allowed"), pybind11::arg("end_ids"), pybind11::arg("num_heads"),
        pybind11::arg("num_kv_heads"), pybind11::arg("level"),
        // a burst runs for seconds at 7B: the server's other threads keep running meanwhile (the
        // function touches tensor memory only, never a Python object)
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("cpu_level", &cpu_level, "highest instruction level this CPU runs: 0 generic, 1 AVX2, 2 AVX-512, 3 AVX512_BF16");
}
