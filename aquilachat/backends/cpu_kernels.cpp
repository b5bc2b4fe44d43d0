// Few-row products for the CPU decode backend (aquilachat/backends/cpu_kernels.py):
// y[M, N] = x[M, K] @ w[N, K]^T for float32 and bfloat16, w row-major (as nn.Linear stores it).
// One kernel body (cpu_kernels_body.h) compiled for four instruction sets, chosen at run time:
//   0 generic C++, 1 AVX2 + FMA, 2 AVX-512 (F, BW, VL), 3 AVX-512 + AVX512_BF16 (VDPBF16PS).
// Every level accumulates in fp32 and rounds the result to the input dtype once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <vector>
#include <cstdint>
#include <cstring>

using bf16 = c10::BFloat16;

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

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, int64_t level) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear: x [M, K] and w [N, K] expected, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "linear: x has ", x.size(1), " columns, w has ", w.size(1));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear: x is ", x.scalar_type(), ", w is ", w.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear: CPU tensors expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "linear: contiguous x and w expected");
  level = std::min(level, cpu_level());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  // rows per task: at least 64 KiB of weight, so small products run on the calling thread
  const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 16) / std::max<int64_t>(1, K * w.element_size()));
  if (x.scalar_type() == at::kFloat) {
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { dispatch<float>(level, xp, wp, yp, M, K, N, n0, n1); });
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "linear: float32 or bfloat16 expected, got ", x.scalar_type());
    const bf16 *xp = x.data_ptr<bf16>(), *wp = w.data_ptr<bf16>();
    bf16* yp = y.data_ptr<bf16>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { dispatch<bf16>(level, xp, wp, yp, M, K, N, n0, n1); });
  }
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y[M, N] = x[M, K] @ w[N, K]^T (float32 / bfloat16, fp32 accumulation)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("level"));
  m.def("parallel_threads", &parallel_threads, "distinct threads that run an at::parallel_for of n items",
        pybind11::arg("n"));
  m.def("linear_int8", &linear_int8,
        "y[M, N] = (x[M, K] @ q[N, K]^T) * scales[N], int8 q, x float32 / bfloat16 (fp32 accumulation)",
        pybind11::arg("x"), pybind11::arg("q"), pybind11::arg("scales"), pybind11::arg("level"));
  m.def("cpu_level", &cpu_level, "highest instruction level this CPU runs: 0 generic, 1 AVX2, 2 AVX-512, 3 AVX512_BF16");
}
