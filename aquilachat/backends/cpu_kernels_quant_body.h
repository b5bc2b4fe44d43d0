// Few-row products with weight-only quantized weights, written once and compiled once per
// instruction set: cpu_kernels.cpp includes this file in a namespace that defines `struct QOps`
// (fp32 vector width L, loadx / loadx_tail of fp32 inputs, load8 / load8_tail widening int8
// weights to fp32 (exact), fma, sum) under a `#pragma GCC target` for that set, plus MMAX.
//
// int8: y[m, n] = scale[n] * sum_k x[m, k] * q[n, k], x widened to fp32 once per call,
// accumulated in fp32 and rounded to T once. Each thread takes a contiguous range of output rows
// and streams its part of the int8 weight once: R output rows at a time, and for them up to MMAX
// input rows at a time (the weight block stays in L1/L2 while further input rows reuse it). A
// row's sum runs over k in the same order whatever M and its position, so every row gets the
// same bits alone or in a batch.
//
// This body serves the plain [N, K] codes (Int8Linear layout "plain": fp32 activations, CPUs
// without AVX512_BF16). With AVX512_BF16 and bf16 activations Int8Linear uses the blocked layout
// and q8_bf16_block (cpu_kernels.cpp), whose nibble-split codes become bf16 with one bitwise op.
// Tried and dropped before that: VDPBF16PS on codes made bf16 by int8 -> int32 -> fp32 -> bf16
// conversion or by VPERMI2B table look-ups; the conversion cost more than the multiplies it saved.

template <typename T, int R, int MM>
static inline void q8_block(const float* x, const int8_t* q, const float* s, T* y, int64_t K, int64_t N,
                            int64_t n, int64_t m0) {
  using O = QOps;
  typename O::acc acc[MM][R];
  for (int i = 0; i < MM; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = O::zero();
  int64_t k = 0;
  for (; k + O::L <= K; k += O::L) {
    typename O::in wv[R];
    for (int r = 0; r < R; ++r) wv[r] = O::load8(q + (n + r) * K + k);
    for (int i = 0; i < MM; ++i) {
      typename O::in xv = O::loadx(x + (m0 + i) * K + k);
      for (int r = 0; r < R; ++r) acc[i][r] = O::fma(acc[i][r], xv, wv[r]);
    }
  }
  if (k < K) {
    const int rest = static_cast<int>(K - k);
    typename O::in wv[R];
    for (int r = 0; r < R; ++r) wv[r] = O::load8_tail(q + (n + r) * K + k, rest);
    for (int i = 0; i < MM; ++i) {
      typename O::in xv = O::loadx_tail(x + (m0 + i) * K + k, rest);
      for (int r = 0; r < R; ++r) acc[i][r] = O::fma(acc[i][r], xv, wv[r]);
    }
  }
  for (int i = 0; i < MM; ++i)
    for (int r = 0; r < R; ++r) y[(m0 + i) * N + n + r] = T(s[n + r] * O::sum(acc[i][r]));
}


template <typename T, int R>
static inline void q8_rows(const float* x, const int8_t* q, const float* s, T* y, int64_t M, int64_t K, int64_t N,
                           int64_t n) {
  int64_t m = 0;
  for (; m + MMAX <= M; m += MMAX) q8_block<T, R, MMAX>(x, q, s, y, K, N, n, m);
  switch (M - m) {
    case 1: q8_block<T, R, 1>(x, q, s, y, K, N, n, m); break;
    case 2: if constexpr (MMAX > 2) q8_block<T, R, 2>(x, q, s, y, K, N, n, m); break;
    case 3: if constexpr (MMAX > 3) q8_block<T, R, 3>(x, q, s, y, K, N, n, m); break;
    default: break;
  }
}

template <typename T>
void q8_run(const float* x, const int8_t* q, const float* s, T* y, int64_t M, int64_t K, int64_t N, int64_t n0,
            int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) q8_rows<T, 4>(x, q, s, y, M, K, N, n);
  for (; n < n1; ++n) q8_rows<T, 1>(x, q, s, y, M, K, N, n);
}
