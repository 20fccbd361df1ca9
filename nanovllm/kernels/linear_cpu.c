/* The fp32 linear layer on the CPU for a few rows of activations (decode): out = x W^T + bias, read from W^T.
 *
 * A decode step multiplies one row per sequence by every weight matrix: it is bound by reading the weights, and
 * for a small model a step is many such products, each with a fixed cost on top (PyTorch's dispatch and its BLAS
 * setting up a general matrix product for a single row). This kernel has no set-up and reads the weights in the
 * order they lie in memory, with nothing to compute but one multiply-add per weight and row of x.
 *
 * Layouts (row-major, contiguous), the engine's own (nanovllm/layers/linear.py keeps W^T):
 *   x (M, K) float32,  w_t (K, N) float32 = W^T,  bias (N,) float32 or NULL,  out (M, N) float32
 *
 * out[m] = sum over k of x[m][k] * w_t[k]: a sum of rows of w_t scaled by x's values, so w_t is read row after row
 * (KB rows side by side) and no horizontal sums are needed. The sums of a stretch of columns (a "chunk") for every
 * row of x stay in a small buffer in L1 while the rows of w_t go by; each weight is loaded once and used by the up
 * to MB_MAX rows of x of a pass.
 *
 * One code path, written with GCC/Clang vector extensions: the compiler maps a vector of LANES floats to the widest
 * registers -march=native offers (AVX-512, AVX2, SSE, NEON). Work is split over column ranges by OpenMP, on
 * torch's threads (as paged_attention_cpu.c explains).
 */
#include <stddef.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vf __attribute__((vector_size(4 * LANES), aligned(4), may_alias)); /* aligned(4): unaligned loads */

#ifndef CHUNK_FLOATS
#define CHUNK_FLOATS 4096 /* the chunk's sums, for all rows of a pass: 16 KB, within L1 */
#endif
#define MB_MAX 16 /* rows of x per pass over the weights (each pass reads them again) */
#define KB 8      /* rows of w_t per step */
/* KB rows side by side are KB short streams that restart at every step, which the hardware prefetcher follows
 * badly when a row is short (llama-20m's o and down projections, 384 columns: 1.5 KB). Prefetching the same columns
 * PREFETCH_ROWS rows on, into L2, measured 1.3-1.7x faster on those two, and 16 rows better than 8 or 32 (one thread,
 * Zen 4, a shared machine). Past the last row it prefetches addresses it never reads: a prefetch never faults. */
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 16
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 2 /* __builtin_prefetch's: 2 is prefetcht1, into L2 */
#endif
#define MIN_BYTES_PER_THREAD (1 << 17) /* less weight than this (128 KB) per thread: not worth another thread */

/* Columns [n0, n0 + nc) of MB rows of x (x, K apart), added into y (MB rows, ys apart). Each step loads one vector
 * of columns from KB rows of w_t (into registers) and adds its products with every row of x to that row's sums:
 * the weights come from memory once however many rows x has; y is loaded and stored once per KB weight vectors.
 * MB is a constant in the copies for one and two rows (their sums stay in registers), a variable in the other. */
static inline __attribute__((always_inline)) void chunk(const float *x, const float *w, float *y, int K, int N, int n0,
                                                        int nc, int ys, const int MB) {
  const int nv = nc / LANES * LANES;
  float xs[MB_MAX][KB];
  int k = 0;
  for (; k + KB <= K; k += KB) {
    const float *wk = w + (size_t)k * N + n0;
    for (int m = 0; m < MB; m++)
      for (int j = 0; j < KB; j++) xs[m][j] = x[(size_t)m * K + k + j];
    for (int n = 0; n < nv; n += LANES) {
      vf wv[KB];
      for (int j = 0; j < KB; j++) {
        __builtin_prefetch(wk + (size_t)(j + PREFETCH_ROWS) * N + n, 0, PREFETCH_LOCALITY);
        wv[j] = *(const vf *)(wk + (size_t)j * N + n);
      }
      for (int m = 0; m < MB; m++) {
        vf a = *(vf *)(y + m * ys + n), b = {0}; /* two sums: half as many dependent additions */
        for (int j = 0; j < KB; j += 2) a += xs[m][j] * wv[j], b += xs[m][j + 1] * wv[j + 1];
        *(vf *)(y + m * ys + n) = a + b;
      }
    }
    for (int n = nv; n < nc; n++) /* the last few columns, one at a time */
      for (int m = 0; m < MB; m++)
        for (int j = 0; j < KB; j++) y[m * ys + n] += xs[m][j] * wk[(size_t)j * N + n];
  }
  for (; k < K; k++) { /* the last few rows of w_t, one at a time */
    const float *wk = w + (size_t)k * N + n0;
    for (int m = 0; m < MB; m++) {
      const float xv = x[(size_t)m * K + k];
      for (int n = 0; n < nv; n += LANES) *(vf *)(y + m * ys + n) += xv * *(const vf *)(wk + n);
      for (int n = nv; n < nc; n++) y[m * ys + n] += xv * wk[n];
    }
  }
}

/* Columns [c0, c1) of every row of out: MB_MAX rows of x at a time, chunk by chunk. */
static void columns(const float *x, const float *w, const float *bias, float *out, int M, int N, int K, int c0,
                    int c1) {
  float y[CHUNK_FLOATS] __attribute__((aligned(64)));
  for (int m0 = 0; m0 < M; m0 += MB_MAX) {
    const int mb = M - m0 < MB_MAX ? M - m0 : MB_MAX;
    const int width = CHUNK_FLOATS / mb / LANES * LANES; /* columns a chunk holds for mb rows */
    const float *xm = x + (size_t)m0 * K;
    for (int n0 = c0; n0 < c1; n0 += width) {
      const int nc = c1 - n0 < width ? c1 - n0 : width;
      for (int m = 0; m < mb; m++)
        for (int n = 0; n < nc; n++) y[m * width + n] = bias ? bias[n0 + n] : 0.f;
      if (mb == 1)
        chunk(xm, w, y, K, N, n0, nc, width, 1);
      else if (mb == 2)
        chunk(xm, w, y, K, N, n0, nc, width, 2);
      else
        chunk(xm, w, y, K, N, n0, nc, width, mb);
      for (int m = 0; m < mb; m++)
        for (int n = 0; n < nc; n++) out[(size_t)(m0 + m) * N + n0 + n] = y[m * width + n];
    }
  }
}

int dense_linear_lanes(void) { return LANES; }

/* out (M, N) = x (M, K) @ w_t (K, N) + bias. Returns 0. */
int fp32_linear(const float *x, const float *w_t, const float *bias, float *out, int M, int N, int K,
                int num_threads) {
  int threads = num_threads;
  const size_t bytes = (size_t)K * N * sizeof(float);
  if ((size_t)threads > bytes / MIN_BYTES_PER_THREAD) threads = (int)(bytes / MIN_BYTES_PER_THREAD);
  if ((size_t)threads > (size_t)(N / LANES)) threads = N / LANES;
  if (threads <= 1) { /* no parallel region at all: even a team of one costs about a microsecond */
    columns(x, w_t, bias, out, M, N, K, 0, N);
    return 0;
  }
  const int vectors = N / LANES; /* each thread a whole number of vectors of columns; the last one the rest */
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; t++) {
    const int c0 = (int)((int64_t)vectors * t / threads) * LANES;
    const int c1 = t == threads - 1 ? N : (int)((int64_t)vectors * (t + 1) / threads) * LANES;
    columns(x, w_t, bias, out, M, N, K, c0, c1);
  }
  return 0;
}
