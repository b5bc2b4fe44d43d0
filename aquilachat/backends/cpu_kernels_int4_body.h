// Few-row products with int4 weights in this extension's own layout (Int4Linear, layout
// "aquilachat"), written once in plain C++ and compiled once per instruction set (cpu_kernels.cpp
// includes it in each namespace under that set's `#pragma GCC target`; the 16-lane loops below
// are what GCC vectorizes at -O3). The AVX512_BF16 variant for bfloat16 inputs is in
// cpu_kernels.cpp (q4_bf16_run): the same layout and the same sums with VDPBF16PS.
//
// Layout (aquilachat.quantization, "int4 kernel layout"): output rows in blocks of 16; for block b
// and inputs 8c .. 8c + 7, 32 little-endian 16-bit words, word 2l + t holding in its nibble p
// (bits 4p .. 4p + 3) the code q[16b + l, 8c + 2p + t] (0..15). Scales and zeros: S [N/16, G, 16, 2]
// (lane l: scale, zero of row 16b + l, group g). A weight is (q - 8) * scale + zero, so
//   y[m, n] = sum_g scale[n, g] * (D[m, n, g] - 8 * X[m, g]) + zero[n, g] * X[m, g],
//   D = sum over the group of q * x,  X = sum over the group of x,
// in fp32, rounded to T once. Each row's sum runs in the same order whatever M and its position
// in the batch, so a row gets the same bits alone or in a batch: the multiply-adds are written as
// std::fma and the extension is built with -ffp-contract=off, so that no instantiation fuses
// differently from another.

template <typename S>
static inline float q4_scale_part(const S* sz, int64_t i) { return static_cast<float>(sz[i]); }

template <typename T, typename S, int R, int MM>
static inline void q4_block(const float* x, const uint16_t* w, const S* sz, const float* xs, T* y, int64_t K,
                            int64_t N, int64_t G, int64_t cpg, int64_t b0, int64_t m0) {
  const int64_t C = K / 8;
  float tot[MM][R][16];
  for (int i = 0; i < MM; ++i)
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < 16; ++l) tot[i][r][l] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    float d[MM][R][16];
    for (int i = 0; i < MM; ++i)
      for (int r = 0; r < R; ++r)
        for (int l = 0; l < 16; ++l) d[i][r][l] = 0.f;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
      for (int r = 0; r < R; ++r) {
        const uint16_t* wp = w + ((b0 + r) * C + c) * 32;
        for (int j = 0; j < 8; ++j) {  // input 8c + j: nibble j / 2 of word 2l + j % 2
          const int p = j >> 1, t = j & 1;
          float wv[16];
          for (int l = 0; l < 16; ++l) wv[l] = static_cast<float>((wp[2 * l + t] >> (4 * p)) & 15);
          for (int i = 0; i < MM; ++i) {
            const float xv = x[(m0 + i) * K + c * 8 + j];
            for (int l = 0; l < 16; ++l) d[i][r][l] = std::fma(xv, wv[l], d[i][r][l]);
          }
        }
      }
    for (int r = 0; r < R; ++r) {
      const S* sp = sz + ((b0 + r) * G + g) * 32;
      float sc[16], zr[16];
      for (int l = 0; l < 16; ++l) {
        sc[l] = q4_scale_part(sp, 2 * l);
        zr[l] = q4_scale_part(sp, 2 * l + 1);
      }
      for (int i = 0; i < MM; ++i) {
        const float xg = xs[(m0 + i) * G + g];
        for (int l = 0; l < 16; ++l)
          tot[i][r][l] = std::fma(zr[l], xg, std::fma(d[i][r][l] - 8.f * xg, sc[l], tot[i][r][l]));
      }
    }
  }
  for (int i = 0; i < MM; ++i)
    for (int r = 0; r < R; ++r)
      for (int l = 0; l < 16; ++l) y[(m0 + i) * N + (b0 + r) * 16 + l] = T(tot[i][r][l]);
}

template <typename T, typename S, int R>
static inline void q4_rows(const float* x, const uint16_t* w, const S* sz, const float* xs, T* y, int64_t M,
                           int64_t K, int64_t N, int64_t G, int64_t cpg, int64_t b) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) q4_block<T, S, R, 4>(x, w, sz, xs, y, K, N, G, cpg, b, m);
  switch (M - m) {
    case 1: q4_block<T, S, R, 1>(x, w, sz, xs, y, K, N, G, cpg, b, m); break;
    case 2: q4_block<T, S, R, 2>(x, w, sz, xs, y, K, N, G, cpg, b, m); break;
    case 3: q4_block<T, S, R, 3>(x, w, sz, xs, y, K, N, G, cpg, b, m); break;
    default: break;
  }
}

// Row blocks [b0, b1) of y[M, N] (fp32 inputs x [M, K], group sums xs [M, G]).
template <typename T, typename S>
void q4_run(const float* x, const uint16_t* w, const S* sz, const float* xs, T* y, int64_t M, int64_t K, int64_t N,
            int64_t G, int64_t b0, int64_t b1) {
  const int64_t cpg = K / G / 8;
  int64_t b = b0;
  for (; b + 2 <= b1; b += 2) q4_rows<T, S, 2>(x, w, sz, xs, y, M, K, N, G, cpg, b);
  for (; b < b1; ++b) q4_rows<T, S, 1>(x, w, sz, xs, y, M, K, N, G, cpg, b);
}

// The weight rows of blocks [b0, b1) as T [16 (b1 - b0), K]: (q - 8) * scale + zero in fp32,
// rounded to T once (for products of many rows, which go to torch's blocked matmul).
template <typename T, typename S>
void q4_dequantize(const uint16_t* w, const S* sz, T* out, int64_t K, int64_t G, int64_t b0, int64_t b1) {
  const int64_t C = K / 8, gs = K / G;
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const uint16_t* wp = w + (b * C + c) * 32;
      const S* sp = sz + (b * G + (c * 8) / gs) * 32;
      for (int l = 0; l < 16; ++l) {
        const float sc = q4_scale_part(sp, 2 * l), zr = q4_scale_part(sp, 2 * l + 1);
        T* row = out + ((b - b0) * 16 + l) * K + c * 8;
        for (int j = 0; j < 8; ++j) {
          const float q = static_cast<float>((wp[2 * l + (j & 1)] >> (4 * (j >> 1))) & 15);
          row[j] = T((q - 8.f) * sc + zr);
        }
      }
    }
}
