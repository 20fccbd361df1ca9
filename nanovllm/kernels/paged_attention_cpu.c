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

#define MIN_FLOATS_PER_THREAD (1 << 16) /* less K and V than this (256 KB) per thread: not worth another thread */

typedef struct {
  const float *q, *k, *v;
  const int32_t *tables, *lens;
  float *out;
  int S, Hq, Hkv, D, bs, max_blocks, num_blocks;
  float scale;
  int window; /* 0: none */
  float softcap; /* 0: none */
} Job;

/* Attention of sequence s's query heads [h0, h1) (whole GQA groups) over its lens[s] cached tokens (its last
 * `window` of them in a sliding-window layer). Two passes over the context: scores q.k for every position, then
 * the softmax-weighted sum of V. scores[(h - h0) * n + t - first] holds position t's score. */
static inline __attribute__((always_inline)) int attend(const Job *a, int s, int h0, int h1, float *scores,
                                                        const int D) {
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
    const float *kb = a->k + table[j] * block;
    const int i0 = first > t0 ? first - t0 : 0, i1 = L - t0 < bs ? L - t0 : bs;
    for (int i = i0; i < i1; i++)
      for (int h = h0; h < h1; h++) {
        const float *k = kb + i * slot + (h / group) * D, *qh = q + (int64_t)h * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int d = 0; d < D; d++) dot += qh[d] * k[d];
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
    const float *vb = a->v + table[j] * block;
    const int i0 = first > t0 ? first - t0 : 0, i1 = L - t0 < bs ? L - t0 : bs;
    for (int i = i0; i < i1; i++)
      for (int h = h0; h < h1; h++) {
        const float *v = vb + i * slot + (h / group) * D;
        const float p = scores[(int64_t)(h - h0) * n + t0 + i - first];
        float *o = out + (int64_t)h * D;
#pragma omp simd
        for (int d = 0; d < D; d++) o[d] += p * v[d];
      }
  }
  return 0;
}

/* the common head sizes get their own copy of attend, its loops unrolled for that size */
static int attend_any(const Job *a, int s, int h0, int h1, float *scores) {
  switch (a->D) {
    case 64: return attend(a, s, h0, h1, scores, 64);
    case 128: return attend(a, s, h0, h1, scores, 128);
    default: return attend(a, s, h0, h1, scores, a->D);
  }
}

/* Returns 0 on success, 1 when a length or block id is out of range, 2 when memory ran out. */
int paged_decode_attention(const float *q, const float *k, const float *v, const int32_t *tables, const int32_t *lens,
                           float *out, int S, int Hq, int Hkv, int D, int bs, int max_blocks, int num_blocks,
                           float scale, int window, float softcap, int num_threads) {
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
  const Job job = {q, k, v, tables, lens, out, S, Hq, Hkv, D, bs, max_blocks, num_blocks, scale, window, softcap};
  int error = 0;
#pragma omp parallel num_threads(threads) reduction(max : error)
  {
    float *scores = malloc(sizeof(float) * (size_t)longest * Hq);
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
