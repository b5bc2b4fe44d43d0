// The few-row product y[M, N] = x[M, K] @ w[N, K]^T, written once and compiled once per
// instruction set: cpu_kernels.cpp includes this file in a namespace that defines
// `template <typename T> struct Ops` (vector width L, load, load_tail, fma, sum) under a
// `#pragma GCC target` for that set. Accumulation is in fp32; y is rounded to T once.
//
// Each thread takes a contiguous range of output rows, so it streams a contiguous part of the
// row-major weight exactly once whatever M is.
//
// At one input row (a batch-1 decode step) the range is cut into STREAMS equal parts read side by
// side: row i of every part at a time, each with its own accumulator chain (`streams`). That keeps
// STREAMS long sequential streams in flight for the hardware prefetchers. Before, rows went 8
// adjacent rows at a time (8 streams of a row each, too short for the prefetchers when a row is a
// few cache lines: a 100008 x 448 fp32 lm_head read at 19 GB/s) or, for rows of at most 4 KiB, one
// whole row after another (one stream: 22-23 GB/s). Measured on the Zen 4 (bench-100m in the
// engine, the two builds alternating step by step: 1.13-1.22x; the 7B bf16 step 1.086x; 4 parts
// 1.03-1.14x, 16 parts 0.96-1.14x).
//
// At more input rows: R output rows at a time (R = 4 weight streams and accumulator chains), and
// for those rows up to MMAX input rows at a time (the weight block stays in L1/L2 while further
// input rows reuse it).
//
// Every row sums its products in the same order on every path (one chain over k, then `sum`), so
// a row's bits do not depend on the path, the split or the other rows.

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

// Rows [n0, n1) at one input row as STREAMS parts read side by side (see the top of this file);
// the rows that do not fill a part go one after another at the end.
template <typename T>
static inline void streams(const T* x, const T* w, T* y, int64_t K, int64_t n0, int64_t n1) {
  using O = Ops<T>;
  constexpr int S = STREAMS;
  const int64_t len = (n1 - n0) / S;
  for (int64_t i = 0; i < len; ++i) {
    typename O::acc acc[S];
    for (int s = 0; s < S; ++s) acc[s] = O::zero();
    int64_t k = 0;
    for (; k + O::L <= K; k += O::L) {
      typename O::in xv = O::load(x + k);
      for (int s = 0; s < S; ++s) acc[s] = O::fma(acc[s], xv, O::load(w + (n0 + s * len + i) * K + k));
    }
    if (k < K) {
      const int rest = static_cast<int>(K - k);
      typename O::in xv = O::load_tail(x + k, rest);
      for (int s = 0; s < S; ++s) acc[s] = O::fma(acc[s], xv, O::load_tail(w + (n0 + s * len + i) * K + k, rest));
    }
    for (int s = 0; s < S; ++s) y[n0 + s * len + i] = T(O::sum(acc[s]));
  }
  for (int64_t n = n0 + S * len; n < n1; ++n) block<T, 1, 1>(x, w, y, K, 0, n, 0);
}

template <typename T>
void run(const T* x, const T* w, T* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  if (M == 1) return streams<T>(x, w, y, K, n0, n1);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) rows<T, 4>(x, w, y, M, K, N, n);
  for (; n < n1; ++n) rows<T, 1>(x, w, y, M, K, N, n);
}
