// The few-row product y[M, N] = x[M, K] @ w[N, K]^T, written once and compiled once per
// instruction set: cpu_kernels.cpp includes this file in a namespace that defines
// `template <typename T> struct Ops` (vector width L, load, load_tail, fma, sum) under a
// `#pragma GCC target` for that set. Accumulation is in fp32; y is rounded to T once.
//
// Each thread takes a contiguous range of output rows, so it streams a contiguous part of the
// row-major weight exactly once whatever M is: R output rows at a time (R independent weight
// streams and accumulator chains; 8 for one input row, where more streams in flight read a few
// per cent faster from DRAM on the Zen 4, else 4), and for those rows up to MMAX input rows at a time (the
// weight block stays in L1/L2 while further input rows reuse it).
//
// Short rows (at most SHORT_ROW_BYTES) at one input row go one whole row after another instead:
// R rows side by side advance R streams of a few dozen cache lines each, too short for the
// hardware prefetchers to follow (a 100008 x 448 fp32 lm_head read at 19 GB/s, a 100008 x 96 one
// at 15, against 31-53 for a plain sum of the same bytes, on the Zen 4), while whole rows in turn
// are one sequential stream (29 and 62 GB/s; bench/quant_kernels.py --formats fp32,bf16). Long rows
// keep R = 8 (one row at a time read 15-20 % slower at 4096 fp32 inputs), and so does the generic
// C++ level (one scalar chain per row is bound by the adds' latency: 100008 x 448 fp32 12.3 -> 9.6
// GB/s). Each row sums its products in the same order either way, so the bits do not change.

template <typename T, int R, int MM>
static inline void block(const T* x, const T* w, T* y, int64_t K, int64_t N, int64_t n, int64_t m0) {
  using O = Ops<T>;
  typename O::acc acc[MM][R];
  for (int i = 0; i < MM; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = O::zero();
  int64_t k = 0;
  for (; k + O::L <= K; k += O::L) {
    typename O::in wv[R];
    for (int r = 0; r < R; ++r) wv[r] = O::load(w + (n + r) * K + k);
    for (int i = 0; i < MM; ++i) {
      typename O::in xv = O::load(x + (m0 + i) * K + k);
      for (int r = 0; r < R; ++r) acc[i][r] = O::fma(acc[i][r], xv, wv[r]);
    }
  }
  if (k < K) {
    const int rest = static_cast<int>(K - k);
    typename O::in wv[R];
    for (int r = 0; r < R; ++r) wv[r] = O::load_tail(w + (n + r) * K + k, rest);
    for (int i = 0; i < MM; ++i) {
      typename O::in xv = O::load_tail(x + (m0 + i) * K + k, rest);
      for (int r = 0; r < R; ++r) acc[i][r] = O::fma(acc[i][r], xv, wv[r]);
    }
  }
  for (int i = 0; i < MM; ++i)
    for (int r = 0; r < R; ++r) y[(m0 + i) * N + n + r] = T(O::sum(acc[i][r]));
}

template <typename T, int R>
static inline void rows(const T* x, const T* w, T* y, int64_t M, int64_t K, int64_t N, int64_t n) {
  int64_t m = 0;
  for (; m + MMAX <= M; m += MMAX) block<T, R, MMAX>(x, w, y, K, N, n, m);
  switch (M - m) {
    case 1: block<T, R, 1>(x, w, y, K, N, n, m); break;
    case 2: if constexpr (MMAX > 2) block<T, R, 2>(x, w, y, K, N, n, m); break;
    case 3: if constexpr (MMAX > 3) block<T, R, 3>(x, w, y, K, N, n, m); break;
    default: break;
  }
}

template <typename T>
void run(const T* x, const T* w, T* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (M == 1 && Ops<T>::L > 1 && K * static_cast<int64_t>(sizeof(T)) <= SHORT_ROW_BYTES) {
    for (; n < n1; ++n) rows<T, 1>(x, w, y, M, K, N, n);  // one row after another: one sequential stream
    return;
  }
  if (M == 1)
    for (; n + 8 <= n1; n += 8) rows<T, 8>(x, w, y, M, K, N, n);
  for (; n + 4 <= n1; n += 4) rows<T, 4>(x, w, y, M, K, N, n);
  for (; n < n1; ++n) rows<T, 1>(x, w, y, M, K, N, n);
}
