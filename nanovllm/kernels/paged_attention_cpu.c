/* Paged decode attention on the CPU: one query token per sequence, reading K and V in place through block tables.
 *
 * The PyTorch path (nanovllm/layers/attention.py, paged_attention) copies each sequence's blocks out of the pool,
 * pads them to the longest sequence of its group, then attends over the copy: every byte of context is read,
 * written and read again. This kernel reads each cached K and V once, where it lies, and only as far as each
 * sequence's own length, so a batch of decodes of different lengths needs no padding and no mask.
 *
 * Layouts (row-major, float32):
 *   q, out        (S, Hq, D)                 one query per sequence
 *   k, v          (num_blocks, bs, Hkv, D)   one layer's pool; position p of sequence s is in
 *                                            block tables[s][p / bs], at offset p % bs
 *   tables        (S, max_blocks) int32      physical block ids; entries past a sequence's length are not read
 *   lens          (S,) int32                 context length of each sequence, its new token included
 *
 * A sliding-window layer (window > 0) attends to each sequence's last `window` positions only: the loops start
 * there, so nothing before the window is read. A soft cap (softcap > 0, Gemma 2) bends each scaled score s into
 * softcap * tanh(s / softcap) before the softmax.
 *
 * Query head h reads KV head h / (Hq / Hkv) (grouped-query attention). Work is split over sequences (and over
 * KV heads when there are fewer sequences than threads) by OpenMP. Built with -fopenmp on Linux, this library
 * shares the OpenMP runtime torch has already loaded (same soname), so it runs on torch's own worker threads.
 * Threads of its own would have to fight them: torch's idle workers spin for a while before they sleep, and
 * measured that way two threads ran no faster than one. Without OpenMP the pragmas are ignored: one thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vectors.h"

#define MIN_FLOATS_PER_THREAD (1 << 16) /* less K and V than this (256 KB) per thread: not worth another thread */

typedef struct {
  const float *q;
  const void *k, *v; /* float32, or bfloat16 (paged_decode_attention_bf16) */
  const int32_t *tables, *lens;
  float *out;
  int S, Hq, Hkv, D, bs, max_blocks, num_blocks;
  float scale;
  int window; /* 0: none */
  float softcap; /* 0: none */
  int bf16;      /* the pool's elements are bfloat16 */
} Job;

/* Element i of the K or V pool: float32, or (B16) bfloat16, whose 16 bits are the high half of a float32 */
static inline float kv_elem(const void *pool, int64_t i, const int B16) {
  if (!B16) return ((const float *)pool)[i];
  const uint32_t bits = (uint32_t)((const uint16_t *)pool)[i] << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* Attention of sequence s's query heads [h0, h1) (whole GQA groups) over its lens[s] cached tokens (its last
 * `window` of them in a sliding-window layer). Two passes over the context: scores q.k for every position, then
 * the softmax-weighted sum of V. scores[(h - h0) * n + t - first] holds position t's score. */
static inline __attribute__((always_inline)) int attend(const Job *a, int s, int h0, int h1, float *scores,
                                                        const int D, const int B16) {
  const int group = a->Hq / a->Hkv, bs = a->bs, L = a->lens[s];
  const int32_t *table = a->tables + (int64_t)s * a->max_blocks;
  const int64_t slot = (int64_t)a->Hkv * D, block = slot * bs; /* floats between positions, between blocks */
  const float *q = a->q + (int64_t)s * a->Hq * D;
  float *out = a->out + (int64_t)s * a->Hq * D;
  if (L < 1 || L > a->max_blocks * bs) return 1;
  const int first = a->window > 0 && L > a->window ? L - a->window : 0, n = L - first; /* positions attended */
  for (int j = first / bs; j * bs < L; j++)
    if (table[j] < 0 || table[j] >= a->num_blocks) return 1;

  /* block j holds positions t0 .. t0 + bs - 1; the first block may start before the window, at offset i0 */
  for (int j = first / bs, t0 = j * bs; t0 < L; j++, t0 += bs) { /* pass 1: scores (h1 - h0, n) */
    const int64_t kb = table[j] * block; /* offsets into the pool, in elements */
    const int i0 = first > t0 ? first - t0 : 0, i1 = L - t0 < bs ? L - t0 : bs;
    for (int i = i0; i < i1; i++)
      for (int h = h0; h < h1; h++) {
        const int64_t k = kb + i * slot + (h / group) * D;
        const float *qh = q + (int64_t)h * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < D; d++) dot += qh[d] * kv_elem(a->k, k + d, B16);
        float s = dot * a->scale;
        if (a->softcap > 0.f) s = a->softcap * tanhf(s / a->softcap);
        scores[(int64_t)(h - h0) * n + t0 + i - first] = s;
      }
  }
  for (int h = h0; h < h1; h++) { /* softmax over each head's scores, in place */
    float *sc = scores + (int64_t)(h - h0) * n, max = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : max)
    for (int t = 0; t < n; t++) max = sc[t] > max ? sc[t] : max;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < n; t++) sum += (sc[t] = expf(sc[t] - max));
    const float inv = 1.f / sum;
#pragma omp simd
    for (int t = 0; t < n; t++) sc[t] *= inv;
    for (int d = 0; d < D; d++) out[(int64_t)h * D + d] = 0.f;
  }
  for (int j = first / bs, t0 = j * bs; t0 < L; j++, t0 += bs) { /* pass 2: out[h] = sum_t p[h][t] v[t] */
    const int64_t vb = table[j] * block;
    const int i0 = first > t0 ? first - t0 : 0, i1 = L - t0 < bs ? L - t0 : bs;
    for (int i = i0; i < i1; i++)
      for (int h = h0; h < h1; h++) {
        const int64_t v = vb + i * slot + (h / group) * D;
        const float p = scores[(int64_t)(h - h0) * n + t0 + i - first];
        float *o = out + (int64_t)h * D;
#pragma omp simd
        for (int d = 0; d < D; d++) o[d] += p * kv_elem(a->v, v + d, B16);
      }
  }
  return 0;
}

/* ---- the same, vectorized by hand for head sizes 64 and 128 ----
 *
 * Written plainly (above), each score's exponential is a libm expf call and pass 2 loads and stores out[h] at every
 * position. Here pass 1 scores four positions at once for every head, reading the block in the order it lies, with
 * four independent chains of LANES-wide multiply-adds and one shuffle tree (sum4) for their four horizontal sums; the
 * softmax's exponentials are computed LANES at a time (vexp below); pass 2 keeps out[h] in registers over a block.
 * Zen 1, 12 sequences of 330 positions, 6 heads of 64 (12 MB of float32 K and V, from memory), a layer on 2 threads:
 * 1.05 ms with one position at a time, 0.93 ms now; a bfloat16 pool 0.85 -> 0.71 ms (and 0.68 -> 0.39 ms when its
 * 6 MB were in L3). GCC/Clang vector extensions (vectors.h). */

/* Vector c of the row of D elements of the K or V pool that starts at element `row`, as floats. A bfloat16 is the high
 * half of a float32, so a load of 2 * LANES bfloat16 as LANES 32-bit lanes holds in each lane an odd element in its
 * high half and an even one in its low half: x & 0xffff0000 is the odd elements as floats, x << 16 the even ones.
 * One operation each, where widening 16-bit lanes to 32 first costs a shuffle too. For bfloat16, vector 2m is then
 * the even and 2m + 1 the odd elements of elements [2m LANES, (2m + 2) LANES): a permutation of the row (`permuted`)
 * that a dot product with q permuted alike does not see, and that a sum of V rows undoes at the end. */
static inline vf kv_vec(const void *pool, int64_t row, int c, const int B16) {
  if (!B16) return *(const vf *)((const float *)pool + row + c * LANES);
  const vi x = *(const vi *)((const uint16_t *)pool + row + (c / 2) * 2 * LANES);
  if (c % 2) return (vf)(x & (int32_t)0xffff0000u);
  return (vf)(x << 16);
}

/* Where element d of a row is, in the order kv_vec reads a bfloat16 row */
static inline int permuted(int d) {
  const int pair = d / (2 * LANES), within = d % (2 * LANES);
  return (2 * pair + within % 2) * LANES + within / 2;
}

/* The next block of a sequence lies anywhere in the pool: the hardware prefetcher cannot guess it, and a block read
 * line after line waits on memory at each one. So each pass asks for the next block's lines, into L2, a share of
 * them at each step through the current block: many lines in flight, and never a whole block's worth at once. */
static inline void prefetch_block(const void *pool, int64_t first, int64_t elements, const int B16) {
  const char *p = (const char *)pool + first * (B16 ? 2 : 4), *end = p + elements * (B16 ? 2 : 4);
  for (; p < end; p += 64) __builtin_prefetch(p, 0, 2);
}

typedef float v4 __attribute__((vector_size(16)));
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else /* GCC before 12 has no __builtin_shufflevector */
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

/* The sums of the lanes of a, b, c and d, as four lanes: two rounds of adding pairs of shuffled vectors (within each
 * 128-bit quarter), then the quarters added, instead of 4 * LANES scalar additions in chains. */
static inline v4 sum4(vf a, vf b, vf c, vf d) {
#if LANES == 4
  const vf x = SHUFFLE(a, b, 0, 4, 1, 5) + SHUFFLE(a, b, 2, 6, 3, 7); /* a01 b01 a23 b23 (pairs summed) */
  const vf y = SHUFFLE(c, d, 0, 4, 1, 5) + SHUFFLE(c, d, 2, 6, 3, 7);
  const vf z = SHUFFLE(x, y, 0, 1, 4, 5) + SHUFFLE(x, y, 2, 3, 6, 7); /* a b c d */
#elif LANES == 8
  const vf x = SHUFFLE(a, b, 0, 8, 1, 9, 4, 12, 5, 13) + SHUFFLE(a, b, 2, 10, 3, 11, 6, 14, 7, 15);
  const vf y = SHUFFLE(c, d, 0, 8, 1, 9, 4, 12, 5, 13) + SHUFFLE(c, d, 2, 10, 3, 11, 6, 14, 7, 15);
  vf z = SHUFFLE(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + SHUFFLE(x, y, 2, 3, 10, 11, 6, 7, 14, 15); /* a b c d | a b c d */
  z += SHUFFLE(z, z, 4, 5, 6, 7, 0, 1, 2, 3);
#else /* 16 */
  const vf x = SHUFFLE(a, b, 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29) +
               SHUFFLE(a, b, 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
  const vf y = SHUFFLE(c, d, 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29) +
               SHUFFLE(c, d, 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
  vf z = SHUFFLE(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         SHUFFLE(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  z += SHUFFLE(z, z, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  z += SHUFFLE(z, z, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
#endif
  return (v4){z[0], z[1], z[2], z[3]};
}

static inline float hsum(vf v) {
  float s = 0.f;
  for (int l = 0; l < LANES; l++) s += v[l];
  return s;
}

/* e^x for x <= 0 (scores minus their maximum): e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its
 * degree-6 Taylor polynomial (error < 2e-7 relative, as expf's float rounding), 2^n put in the exponent bits.
 * Below -87 the result would be subnormal: it is 0, as it is to float32 sums of numbers near 1. */
static inline vf vexp(vf x) {
  const vf ln2_hi = (vf){0} + 0.693145751953125f, ln2_lo = (vf){0} + 1.428606765330187e-06f;
  vi small = x < -87.f;
  x = (vf)((vi)x & ~small) + (vf)((vi)((vf){0} - 87.f) & small); /* clamp without a branch */
  const vf n = __builtin_convertvector(__builtin_convertvector(x * 1.4426950408889634f + ((vf){0} - 0.5f), vi), vf);
  /* truncation of x / ln 2 - 0.5 toward zero is floor for x <= 0 after the shift: n = round(x / ln 2) */
  const vf r = (x - n * ln2_hi) - n * ln2_lo;
  vf p = (vf){0} + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi bits = (vi)p + (__builtin_convertvector(n, vi) << 23);
  return (vf)(bits & ~small);
}

static inline __attribute__((always_inline)) int attend_vec(const Job *a, int s, int h0, int h1, float *scores,
                                                            const int D, const int B16) {
  const int group = a->Hq / a->Hkv, bs = a->bs, L = a->lens[s], V = D / LANES;
  const int32_t *table = a->tables + (int64_t)s * a->max_blocks;
  const int64_t slot = (int64_t)a->Hkv * D, block = slot * bs;
  const float *q = a->q + (int64_t)s * a->Hq * D;
  float *out = a->out + (int64_t)s * a->Hq * D;
  if (L < 1 || L > a->max_blocks * bs) return 1;
  const int first = a->window > 0 && L > a->window ? L - a->window : 0, n = L - first;
  for (int j = first / bs; j * bs < L; j++)
    if (table[j] < 0 || table[j] >= a->num_blocks) return 1;
  float *scratch = scores + (int64_t)(h1 - h0) * n; /* (h1 - h0, D): q permuted as kv_vec reads, then out's rows */
  if (B16) {
    for (int h = h0; h < h1; h++)
      for (int d = 0; d < D; d++) scratch[(h - h0) * D + permuted(d)] = q[(int64_t)h * D + d];
    q = scratch - (int64_t)h0 * D;
  }

  for (int j = first / bs, t0 = j * bs; t0 < L; j++, t0 += bs) { /* pass 1: scores, four positions at a time */
    const int64_t kb = table[j] * block; /* offsets into the pool, in elements */
    const int i0 = first > t0 ? first - t0 : 0, i1 = L - t0 < bs ? L - t0 : bs;
    const int64_t next = t0 + bs < L ? table[j + 1] * block : -1;
    for (int i = i0; i < i1; i += 4) { /* every head of four positions: the block is read in the order it lies */
      if (next >= 0) prefetch_block(a->k, next + i * slot, 4 * slot, B16);
      /* positions past i1 repeat the last one: each lane's sum is its own, and only real lanes are stored */
      const int64_t k0 = kb + i * slot, k1 = i + 1 < i1 ? k0 + slot : k0;
      const int64_t k2 = i + 2 < i1 ? k0 + 2 * slot : k0, k3 = i + 3 < i1 ? k0 + 3 * slot : k0;
      for (int h = h0; h < h1; h++) {
        const float *qh = q + (int64_t)h * D;
        const int64_t kh = (h / group) * D;
        vf d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0};
        for (int c = 0; c < V; c++) {
          const vf qc = *(const vf *)(qh + c * LANES);
          d0 += qc * kv_vec(a->k, k0 + kh, c, B16), d1 += qc * kv_vec(a->k, k1 + kh, c, B16);
          d2 += qc * kv_vec(a->k, k2 + kh, c, B16), d3 += qc * kv_vec(a->k, k3 + kh, c, B16);
        }
        const v4 score = sum4(d0, d1, d2, d3) * a->scale;
        float *sc = scores + (int64_t)(h - h0) * n + t0 - first;
        for (int l = 0; l < 4 && i + l < i1; l++)
          sc[i + l] = a->softcap > 0.f ? a->softcap * tanhf(score[l] / a->softcap) : score[l];
      }
    }
  }
  for (int h = h0; h < h1; h++) { /* softmax over each head's scores, in place, LANES at a time */
    float *sc = scores + (int64_t)(h - h0) * n, max = -INFINITY, sum = 0.f;
    for (int t = 0; t < n; t++) max = sc[t] > max ? sc[t] : max;
    int t = 0;
    vf vsum = {0};
    for (; t + LANES <= n; t += LANES) {
      const vf e = vexp(*(vf *)(sc + t) - max);
      *(vf *)(sc + t) = e;
      vsum += e;
    }
    sum = hsum(vsum);
    for (; t < n; t++) sum += (sc[t] = expf(sc[t] - max));
    const float inv = 1.f / sum;
    for (t = 0; t < n; t++) sc[t] *= inv;
  }
  float *o0 = B16 ? scratch : out + (int64_t)h0 * D; /* out[h0 .. h1), for bfloat16 permuted until the end */
  for (int d = 0; d < (h1 - h0) * D; d++) o0[d] = 0.f;
  for (int j = first / bs, t0 = j * bs; t0 < L; j++, t0 += bs) { /* pass 2: out[h] += p[h][t] v[t], a block at once */
    const int64_t vb = table[j] * block;
    const int i0 = first > t0 ? first - t0 : 0, i1 = L - t0 < bs ? L - t0 : bs;
    const int64_t next = t0 + bs < L ? table[j + 1] * block : -1, share = (block + h1 - h0 - 1) / (h1 - h0);
    for (int h = h0; h < h1; h++) {
      if (next >= 0) prefetch_block(a->v, next + (h - h0) * share, share, B16);
      const int64_t vh = vb + (h / group) * D;
      const float *p = scores + (int64_t)(h - h0) * n + t0 - first;
      vf acc[128 / 4]; /* D / LANES sums, D <= 128 (attend_any sends larger heads to the plain loop) */
      float *o = o0 + (int64_t)(h - h0) * D;
      for (int c = 0; c < V; c++) acc[c] = *(vf *)(o + c * LANES);
      for (int i = i0; i < i1; i++)
        for (int c = 0; c < V; c++) acc[c] += p[i] * kv_vec(a->v, vh + i * slot, c, B16);
      for (int c = 0; c < V; c++) *(vf *)(o + c * LANES) = acc[c];
    }
  }
  if (B16)
    for (int h = h0; h < h1; h++)
      for (int d = 0; d < D; d++) out[(int64_t)h * D + d] = scratch[(h - h0) * D + permuted(d)];
  return 0;
}

/* the common head sizes get their own copy, vectorized and unrolled for that size; any other the plain loops */
static int attend_any(const Job *a, int s, int h0, int h1, float *scores) {
  const int b = a->bf16;
  if (a->D == 64) return b ? attend_vec(a, s, h0, h1, scores, 64, 1) : attend_vec(a, s, h0, h1, scores, 64, 0);
  if (a->D == 128) return b ? attend_vec(a, s, h0, h1, scores, 128, 1) : attend_vec(a, s, h0, h1, scores, 128, 0);
  return b ? attend(a, s, h0, h1, scores, a->D, 1) : attend(a, s, h0, h1, scores, a->D, 0);
}

/* Returns 0 on success, 1 when a length or block id is out of range, 2 when memory ran out. */
static int decode_attention(const float *q, const void *k, const void *v, const int32_t *tables, const int32_t *lens,
                            float *out, int S, int Hq, int Hkv, int D, int bs, int max_blocks, int num_blocks,
                            float scale, int window, float softcap, int num_threads, int bf16) {
  int64_t floats = 0; /* K and V this call reads */
  int longest = 1;
  for (int s = 0; s < S; s++) {
    const int n = window > 0 && lens[s] > window ? window : lens[s]; /* the positions sequence s reads */
    floats += 2 * (int64_t)n * Hkv * D;
    longest = n > longest ? n : longest;
  }
  int threads = num_threads;
  if (threads > floats / MIN_FLOATS_PER_THREAD) threads = (int)(floats / MIN_FLOATS_PER_THREAD);
  if (threads < 1) threads = 1;
  int splits = 1; /* fewer sequences than threads: give each thread a share of every sequence's KV heads */
  while (S * splits < threads && splits < Hkv) splits++;
  const int tasks = S * splits, kv_per_split = (Hkv + splits - 1) / splits, group = Hq / Hkv;
  const Job job = {q, k, v, tables, lens, out, S, Hq, Hkv, D, bs, max_blocks, num_blocks, scale, window, softcap, bf16};
  int error = 0;
#pragma omp parallel num_threads(threads) reduction(max : error)
  {
    float *scores = malloc(sizeof(float) * ((size_t)longest + D) * Hq); /* scores, then attend_vec's scratch */
    int mine = scores ? 0 : 2; /* this thread's error: the reduction's private copy starts at INT_MIN */
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < tasks; task++) {
      const int s = task / splits, kv0 = task % splits * kv_per_split;
      const int kv1 = kv0 + kv_per_split < Hkv ? kv0 + kv_per_split : Hkv;
      if (!mine && kv0 < kv1) mine = attend_any(&job, s, kv0 * group, kv1 * group, scores);
    }
    free(scores);
    error = mine;
  }
  return error;
}

/* k, v: a float32 pool */
int paged_decode_attention(const float *q, const float *k, const float *v, const int32_t *tables, const int32_t *lens,
                           float *out, int S, int Hq, int Hkv, int D, int bs, int max_blocks, int num_blocks,
                           float scale, int window, float softcap, int num_threads) {
  return decode_attention(q, k, v, tables, lens, out, S, Hq, Hkv, D, bs, max_blocks, num_blocks, scale, window,
                          softcap, num_threads, 0);
}

/* k, v: a bfloat16 pool (kv_cache_dtype="bfloat16"): half the bytes to read; q, out and the arithmetic stay float32 */
int paged_decode_attention_bf16(const float *q, const uint16_t *k, const uint16_t *v, const int32_t *tables,
                                const int32_t *lens, float *out, int S, int Hq, int Hkv, int D, int bs, int max_blocks,
                                int num_blocks, float scale, int window, float softcap, int num_threads) {
  return decode_attention(q, k, v, tables, lens, out, S, Hq, Hkv, D, bs, max_blocks, num_blocks, scale, window,
                          softcap, num_threads, 1);
}
