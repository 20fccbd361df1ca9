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
 * to MB_MAX rows of x of a pass. From BLOCK_MIN_ROWS rows of x on, the product is bound by arithmetic rather than
 * by reading w_t, and blocks() takes over: register-blocked, the way a BLAS kernel is (see its comment).
 *
 * One code path, written with GCC/Clang vector extensions: the compiler maps a vector of LANES floats to the widest
 * registers -march=native offers (AVX-512, AVX2, SSE, NEON). Work is split over column ranges by OpenMP, on
 * torch's threads (as paged_attention_cpu.c explains).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "vectors.h"

#ifndef CHUNK_FLOATS
#define CHUNK_FLOATS 4096 /* the chunk's sums, for all rows of a pass: 16 KB, within L1 */
#endif
#define MB_MAX 16 /* rows of x per pass over the weights (each pass reads them again) */
#define KB 8      /* rows of w_t per step */
#ifndef BLOCK_MIN_ROWS
#define BLOCK_MIN_ROWS 8 /* from this many rows of x on, blocks() (below) rather than columns(): measured on a Zen 1 */
#endif
/* KB rows side by side are KB short streams that restart at every step, which the hardware prefetcher follows
 * badly when a row is short (llama-20m's o and down projections, 384 columns: 1.5 KB). Prefetching the same columns
 * PREFETCH_ROWS rows on, into L2, measured 1.3-1.7x faster on those two, and 16 rows better than 8 or 32 (one thread,
 * Zen 4, a shared machine). Past the last row it prefetches addresses it never reads: a prefetch never faults. */
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 16
#endif
/* ... but a long row is one stream the hardware follows well, and PREFETCH_ROWS rows of it ahead lie pages away:
 * on a Zen 1, prefetching lm_head's rows (32000 columns, 2 MB ahead) made it 1.7x slower than no prefetch. Rows
 * whose PREFETCH_ROWS rows ahead are further than this are not prefetched. */
#ifndef PREFETCH_MAX_BYTES
#define PREFETCH_MAX_BYTES (1 << 18)
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
  const int nv = nc / LANES * LANES, prefetch = (size_t)N * sizeof(float) * PREFETCH_ROWS <= PREFETCH_MAX_BYTES;
  float xs[MB_MAX][KB];
  int k = 0;
  for (; k + KB <= K; k += KB) {
    const float *wk = w + (size_t)k * N + n0;
    for (int m = 0; m < MB; m++)
      for (int j = 0; j < KB; j++) xs[m][j] = x[(size_t)m * K + k + j];
    for (int n = 0; n < nv; n += LANES) {
      vf wv[KB];
      for (int j = 0; j < KB; j++) {
        if (prefetch) __builtin_prefetch(wk + (size_t)(j + PREFETCH_ROWS) * N + n, 0, PREFETCH_LOCALITY);
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

/* Several rows of x (a batched decode step) make the product compute-bound, not bound by reading w_t: then what
 * counts is how many multiply-adds each load feeds. A block of MR rows of x by NV vectors of columns keeps its
 * MR * NV sums in registers for the whole of K (12 of AVX2's 16 registers), and each step loads NV weight vectors
 * and MR values of x for MR * NV multiply-adds. R and V are constants in every copy (the tails are copies too).
 *
 * The block's columns of w_t are a narrow strip down rows N floats apart: every row on another page, and for some
 * N (384: 1.5 KB) on the same few L1 sets. Read that way by each block of rows, a strip ran at half the speed of
 * one laid out contiguously, so the first block copies the strip as it reads it (`pack`, K x V vectors) and the
 * next blocks read the copy. */
#define MR 4
#define NV 3
/* A strip's rows are a row of w_t apart: with long rows (lm_head's) each on another page, out of the hardware
 * prefetcher's reach, and the first block of rows waited on memory at every row. Prefetching, as it reads a row, the
 * same row two strips on (into L2) keeps that memory in flight while it computes. Zen 1, 12 rows, weights cold:
 * llama-20m's lm_head 12.8 -> 10.7 ms on one thread, 7.0 -> 5.8 ms on two (a strip on: 11.1 and 6.0 ms; spreading
 * the prefetches over every block of rows: slower); its q/k/v 0.59 -> 0.55 and 0.37 -> 0.33 ms, gate/up 1.10 -> 0.85
 * and 0.64 -> 0.54 ms; llama-134m's shapes within 5% either way. */
#define STRIPS_AHEAD 2
static inline __attribute__((always_inline)) void block(const float *x, const float *w, size_t w_stride,
                                                        const float *bias, float *out, int K, int N, float *pack,
                                                        const int R, const int V) {
  const int prefetch = w_stride * sizeof(float) * PREFETCH_ROWS <= PREFETCH_MAX_BYTES;
  vf acc[MR][NV];
  for (int v = 0; v < V; v++) {
    const vf b = bias ? *(const vf *)(bias + v * LANES) : (vf){0};
    for (int r = 0; r < R; r++) acc[r][v] = b;
  }
  for (int k = 0; k < K; k++) {
    const float *wk = w + k * w_stride;
    vf wv[NV];
    if (pack && prefetch) {
      __builtin_prefetch(wk + PREFETCH_ROWS * w_stride, 0, PREFETCH_LOCALITY);
      if (V * LANES > 16) __builtin_prefetch(wk + PREFETCH_ROWS * w_stride + V * LANES - 1, 0, PREFETCH_LOCALITY);
    }
    if (pack) { /* the same row STRIPS_AHEAD strips on, fetched while this one is read */
      __builtin_prefetch(wk + STRIPS_AHEAD * V * LANES, 0, PREFETCH_LOCALITY);
      __builtin_prefetch(wk + (STRIPS_AHEAD + 1) * V * LANES - 1, 0, PREFETCH_LOCALITY);
    }
    for (int v = 0; v < V; v++) wv[v] = *(const vf *)(wk + v * LANES);
    if (pack)
      for (int v = 0; v < V; v++) *(vf *)(pack + (size_t)k * V * LANES + v * LANES) = wv[v];
    for (int r = 0; r < R; r++) {
      const float xr = x[(size_t)r * K + k];
      for (int v = 0; v < V; v++) acc[r][v] += xr * wv[v];
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < V; v++) *(vf *)(out + (size_t)r * N + v * LANES) = acc[r][v];
}

/* Columns [n, n + V vectors) of every row of out: the first block of rows from w_t (copying the strip into pack),
 * the others from the copy. */
#define BLOCK_ROWS(V)                                                                                    \
  for (int m0 = 0; m0 < M; m0 += MR) {                                                                   \
    const int first = m0 == 0;                                                                          \
    const float *wm = first ? w + n : pack;                                                              \
    const size_t stride = first ? (size_t)N : (size_t)(V) * LANES;                                       \
    float *to = first && M > MR ? pack : NULL;                                                           \
    const float *xm = x + (size_t)m0 * K, *bn = bias ? bias + n : NULL;                                  \
    float *om = out + (size_t)m0 * N + n;                                                                \
    switch (M - m0 < MR ? M - m0 : MR) {                                                                 \
      case 1: block(xm, wm, stride, bn, om, K, N, to, 1, V); break;                                      \
      case 2: block(xm, wm, stride, bn, om, K, N, to, 2, V); break;                                      \
      case 3: block(xm, wm, stride, bn, om, K, N, to, 3, V); break;                                      \
      default: block(xm, wm, stride, bn, om, K, N, to, MR, V); break;                                    \
    }                                                                                                    \
  }

/* Columns [c0, c1) of every row of out, block by block: NV vectors wide, then one vector, then single columns.
 * Returns 0, or 2 when there was no memory for the strip's copy. */
static int blocks(const float *x, const float *w, const float *bias, float *out, int M, int N, int K, int c0,
                  int c1) {
  float *pack = M > MR ? aligned_alloc(64, (size_t)K * NV * LANES * sizeof(float)) : NULL;
  if (M > MR && !pack) return 2;
  int n = c0;
  for (; n + NV * LANES <= c1; n += NV * LANES) BLOCK_ROWS(NV)
  for (; n + LANES <= c1; n += LANES) BLOCK_ROWS(1)
  for (; n < c1; n++)
    for (int m = 0; m < M; m++) {
      float sum = bias ? bias[n] : 0.f;
      for (int k = 0; k < K; k++) sum += x[(size_t)m * K + k] * w[(size_t)k * N + n];
      out[(size_t)m * N + n] = sum;
    }
  free(pack);
  return 0;
}

/* Columns [c0, c1) of every row of out: MB_MAX rows of x at a time, chunk by chunk. */
static int columns(const float *x, const float *w, const float *bias, float *out, int M, int N, int K, int c0,
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
  return 0;
}

int dense_linear_lanes(void) { return LANES; }

/* out (M, N) = x (M, K) @ w_t (K, N) + bias. Returns 0, or 2 when memory ran out. */
int fp32_linear(const float *x, const float *w_t, const float *bias, float *out, int M, int N, int K,
                int num_threads) {
  int threads = num_threads;
  const size_t bytes = (size_t)K * N * sizeof(float);
  if ((size_t)threads > bytes / MIN_BYTES_PER_THREAD) threads = (int)(bytes / MIN_BYTES_PER_THREAD);
  if ((size_t)threads > (size_t)(N / LANES)) threads = N / LANES;
  int (*part)(const float *, const float *, const float *, float *, int, int, int, int, int) =
      M >= BLOCK_MIN_ROWS ? blocks : columns;
  if (threads <= 1) /* no parallel region at all: even a team of one costs about a microsecond */
    return part(x, w_t, bias, out, M, N, K, 0, N);
  int error = 0;
  /* each thread a whole number of units of columns (a vector, or a block's width), the last one the rest */
  const int unit = (part == blocks && N / (NV * LANES) >= threads ? NV : 1) * LANES, units = N / unit;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int t = 0; t < threads; t++) {
    const int c0 = (int)((int64_t)units * t / threads) * unit;
    const int c1 = t == threads - 1 ? N : (int)((int64_t)units * (t + 1) / threads) * unit;
    if (part(x, w_t, bias, out, M, N, K, c0, c1)) error = 2; /* any thread's: all write the same value */
  }
  return error;
}
