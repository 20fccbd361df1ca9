/* Weight-only INT8 and INT4 linear layers on the CPU for a few rows of activations (decode): out = x W^T + bias.
 *
 * A batch-1 decode step is bound by the bytes of weights it reads, so these kernels read the weights in their
 * quantized form (1 or 1/2 byte per weight, never dequantized to memory) and do the arithmetic in integers, the
 * way llama.cpp's q8_0 and q4_0 x q8_0 dot products do: each row of x is first quantized to int8 in blocks of 32
 * (d = max|x| / 127, q = round-half-even(x / d) computed as x * (1 / d)), then every block's int8 x int8 dot
 * product is exact in int32 and only the per-block sums are scaled and added in float32.
 *
 * Layouts (row-major, contiguous):
 *   x      (M, K) float32                 out (M, N) float32, bias (N,) float32 or NULL
 *   INT8   qweight (N, K) int8, scale (N,) float32:          w[o][i] = scale[o] * qweight[o][i]
 *   INT4   qweight (N, K / 2) uint8, scales (N, K / g):      byte j of row o holds input 2j in its low nibble and
 *          2j + 1 in its high nibble, nibble n meaning n - 8; w[o][i] = scales[o][i / g] * (nibble - 8)
 *
 * The quantized x is laid out once per call (a "pack", shared by all threads) so the inner loop needs no
 * shuffles: x's int8 values in the order the weight bytes come (for INT4, even and odd inputs apart, matching
 * the low and high nibbles), and, for every 4 weight bytes (one int32 lane of a dot-product instruction), the
 * scale of the block that lane belongs to and an integer correction for the unsigned trick below.
 *
 * x86 dot-product instructions multiply unsigned by signed bytes (vpdpbusd, vpmaddubsw). INT4 nibbles are already
 * unsigned (n = w + 8): the kernel computes sum(n * x) and starts the accumulator at -8 * sum(x), so each block's
 * sum is exactly sum(w * x). INT8 with VNNI does the same with w + 128 (w ^ 0x80) and -128 * sum(x); without VNNI,
 * vpmaddubsw would saturate its int16 pair sums on 255 * 127 * 2, so there it uses llama.cpp's sign trick,
 * |w| * (x with w's sign), whose pair sums stay below 128 * 127 * 2.
 *
 * The path is chosen at compile time (-march=native): AVX-512 VNNI, AVX-512 BW, AVX2 + FMA, or portable C.
 * Work is split over output rows by OpenMP (on torch's threads, as paged_attention_cpu.c explains); within a
 * thread, tiles of TILE_R weight rows x TILE_M rows of x share every load, so each weight row comes from memory
 * once per call however many rows x has.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define QBLOCK 32                       /* activations are quantized in blocks of this many values */
#define PAD 128                         /* pack rows are padded with zeros to a multiple of this many inputs */
#define MIN_BYTES_PER_THREAD (1 << 17)  /* less weight than this (128 KB) per thread: not worth another thread */
#ifndef X_BLOCK_BYTES
#define X_BLOCK_BYTES (1 << 18) /* quantized x read by every tile of W, kept within L2 (256 KB of it) */
#endif
/* A tile reads its TILE_R rows side by side, a pattern the hardware prefetcher does not follow: measured on one
 * thread, 8 GB/s against 22 for a plain sum of the same bytes. Prefetching along W's memory (the tile's rows are
 * adjacent, and the next tile follows them) restores the stream: 16 KB ahead into L2 measured 5-15% better than
 * 4 KB ahead into L1 on the decode shapes (benchmarks/results/cpu-quant-kernels.md). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 16384
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 2 /* __builtin_prefetch's: 2 is prefetcht1, into L2 */
#endif
#define PREFETCH(p) __builtin_prefetch((p), 0, PREFETCH_LOCALITY)

/* ---- the vector vocabulary each path defines: VEC weight bytes per step, LANES int32 / float lanes ---- */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define VEC 64
#define LANES 16
#ifndef TILE_R /* measured on a Zen 4 (benchmarks/results/cpu-quant-kernels.md): more x rows per tile spilled */
#define TILE_R 4
#define TILE_M 2
#define TILE_M4 2
#endif
typedef __m512i vi;
typedef __m512 vf;
static inline vi load_w(const void *p) { return _mm512_loadu_si512(p); }
static inline vi load_w_part(const void *p, int n) { return _mm512_maskz_loadu_epi8((1ULL << n) - 1, p); }
static inline vi load_i(const void *p) { return _mm512_loadu_si512(p); }
static inline vf load_f(const float *p) { return _mm512_loadu_ps(p); }
static inline vf load_f_part(const float *p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline vf permute_f(vf v, vi idx) { return _mm512_permutexvar_ps(idx, v); }
static inline vi lane_index(int g) { /* lane k of a step covers inputs 8k .. 8k + 7 of it: which of its groups */
  int32_t idx[LANES];
  for (int k = 0; k < LANES; k++) idx[k] = 8 * k / g;
  return _mm512_loadu_si512(idx);
}
static inline vi zero_i(void) { return _mm512_setzero_si512(); }
static inline vf zero_f(void) { return _mm512_setzero_ps(); }
static inline vf set1_f(float v) { return _mm512_set1_ps(v); }
static inline vf cvt(vi v) { return _mm512_cvtepi32_ps(v); }
static inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline vi low_nibbles(vi w) { return _mm512_and_si512(w, _mm512_set1_epi8(0x0F)); }
static inline vi high_nibbles(vi w) { return _mm512_and_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi8(0x0F)); }
#if defined(__AVX512VNNI__)
#define ISA "avx512vnni"
#define INT8_OFFSET 1 /* INT8 as w + 128 with a -128 * sum(x) correction: one instruction per x row, no sign trick */
static inline vi dot4(vi acc, vi u, vi s) { return _mm512_dpbusd_epi32(acc, u, s); }
#else
#define ISA "avx512bw"
static inline vi dot4(vi acc, vi u, vi s) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
}
#endif
static inline vi abs8(vi w) { return _mm512_abs_epi8(w); }
static inline vi sign8(vi x, vi w) { return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x); }
static inline vi flip8(vi w) { return _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80)); }

#elif defined(__AVX2__) && defined(__FMA__)
#define ISA "avx2"
#define VEC 32
#define LANES 8
#ifndef TILE_R
#define TILE_R 2 /* 16 vector registers, not 32 */
#define TILE_M 2
#define TILE_M4 2
#endif
typedef __m256i vi;
typedef __m256 vf;
static inline vi load_w(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vi load_w_part(const void *p, int n) { /* n < 32 bytes left in the row: never read past them */
  int8_t tail[VEC] = {0};
  memcpy(tail, p, (size_t)n);
  return _mm256_loadu_si256((const __m256i *)tail);
}
static inline vi load_i(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vf load_f(const float *p) { return _mm256_loadu_ps(p); }
static inline vf load_f_part(const float *p, int n) {
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
static inline vf permute_f(vf v, vi idx) { return _mm256_permutevar8x32_ps(v, idx); }
static inline vi lane_index(int g) {
  int32_t idx[LANES];
  for (int k = 0; k < LANES; k++) idx[k] = 8 * k / g;
  return _mm256_loadu_si256((const __m256i *)idx);
}
static inline vi zero_i(void) { return _mm256_setzero_si256(); }
static inline vf zero_f(void) { return _mm256_setzero_ps(); }
static inline vf set1_f(float v) { return _mm256_set1_ps(v); }
static inline vf cvt(vi v) { return _mm256_cvtepi32_ps(v); }
static inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float hsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vi low_nibbles(vi w) { return _mm256_and_si256(w, _mm256_set1_epi8(0x0F)); }
static inline vi high_nibbles(vi w) { return _mm256_and_si256(_mm256_srli_epi16(w, 4), _mm256_set1_epi8(0x0F)); }
static inline vi dot4(vi acc, vi u, vi s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
/* INT4's two nibbles of a byte: their int16 pair sums are added before the one widening multiply (llama.cpp's
 * q4 dot products do the same). Exact: a nibble is at most 15 and |x| at most 127, so each sum stays within
 * 4 * 15 * 127 = 7620, far from int16's limit. On a Zen 1 (256-bit multiplies issued as two halves) one multiply
 * fewer out of four, and the scales below, measured 1.5x on llama-134m's decode shapes. */
#define DOT8 1
static inline vi dot8(vi acc, vi lo, vi xe, vi hi, vi xo) {
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
/* The scales of a step's two groups (g32: lanes 0-3 the first, 4-7 the second), broadcast into the two halves:
 * cheaper than a masked load and a lane-crossing permute, which a Zen 1 executes slowly. */
#define TWO_GROUP_SCALES 1
static inline vf two_group_scales(const float *s) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(s)), _mm_broadcast_ss(s + 1), 1);
}
static inline vi abs8(vi w) { return _mm256_sign_epi8(w, w); } /* -128 stays 0x80: 128 read as unsigned */
static inline vi sign8(vi x, vi w) { return _mm256_sign_epi8(x, w); }

#else
#define ISA "scalar"
#define PORTABLE 1
#define TILE_R 1
#define TILE_M 1
#define TILE_M4 1
#endif

#ifndef INT8_OFFSET
#define INT8_OFFSET 0
#endif

/* ---- activations: q8_0 quantization and the pack ---- */

/* One block of n <= 32 values (the rest of the block zero): q = round(x / d), d = max|x| / 127. Returns d. */
static float quantize_block(const float *x, int n, int8_t *q) {
  float amax = 0.f;
  for (int i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  for (int i = 0; i < QBLOCK; i++) {
    float v = i < n ? x[i] * id : 0.f;
    v = v < -127.f ? -127.f : (v > 127.f ? 127.f : v);
    /* round half to even without libm (what torch.round does): adding 1.5 * 2^23 leaves no fraction bits */
    q[i] = (int8_t)(int)((v + 0x1.8p23f) - 0x1.8p23f);
  }
  return d;
}

/* INT8 pack of one row (P = K rounded up to PAD): q[P] int8 in input order, then per lane (4 inputs) the
 * correction -128 * (sum of its 4 values) int32[P / 4], then its block's scale float[P / 4]. 3P bytes. */
static void pack_int8_row(const float *x, int K, int P, uint8_t *pack) {
  int8_t *q = (int8_t *)pack;
  int32_t *corr = (int32_t *)(pack + P);
  float *sx = (float *)(pack + 2 * (size_t)P);
  for (int b = 0; b * QBLOCK < P; b++) {
    const int i0 = b * QBLOCK, n = K - i0 < 0 ? 0 : (K - i0 < QBLOCK ? K - i0 : QBLOCK);
    const float d = quantize_block(x + i0, n, q + i0);
    for (int l = i0 / 4; l < (i0 + QBLOCK) / 4; l++) {
      corr[l] = -128 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
      sx[l] = d;
    }
  }
}

/* INT4 pack of one row: the values at even inputs, int8[P / 2], and at odd inputs, int8[P / 2] (byte j of a weight
 * row meets xe[j] with its low nibble and xo[j] with its high one), then per lane (4 weight bytes = 8 inputs) the
 * correction -8 * (sum of its 8 values) int32[P / 8] and its block's scale float[P / 8]. 2P bytes. */
static void pack_int4_row(const float *x, int K, int P, uint8_t *pack) {
  int8_t *xe = (int8_t *)pack, *xo = xe + P / 2, q[QBLOCK];
  int32_t *corr = (int32_t *)(pack + P);
  float *sx = (float *)(pack + P + (size_t)P / 2);
  for (int b = 0; b * QBLOCK < P; b++) {
    const int i0 = b * QBLOCK, n = K - i0 < 0 ? 0 : (K - i0 < QBLOCK ? K - i0 : QBLOCK);
    const float d = quantize_block(x + i0, n, q);
    for (int j = 0; j < QBLOCK / 2; j++) xe[i0 / 2 + j] = q[2 * j], xo[i0 / 2 + j] = q[2 * j + 1];
    for (int l = 0; l < QBLOCK / 8; l++) {
      int sum = 0;
      for (int i = 8 * l; i < 8 * l + 8; i++) sum += q[i];
      corr[i0 / 8 + l] = -8 * sum;
      sx[i0 / 8 + l] = d;
    }
  }
}

typedef struct {
  const void *w;  /* int8 (N, K) or packed uint8 (N, K / 2) */
  const float *scale, *bias;
  float *out;
  const uint8_t *pack;
  size_t pack_row; /* bytes per row of x in the pack */
  int M, N, K, P, g;
} Job;

static inline void store(const Job *j, int m, int o, float sum) {
  j->out[(size_t)m * j->N + o] = sum + (j->bias ? j->bias[o] : 0.f);
}

#ifndef PORTABLE
/* ---- INT8: rows o0 .. o0 + R - 1 of W against rows m0 .. m0 + MB - 1 of x ---- */

/* one step of VEC weight bytes at byte `off` of each row; w[r] holds them as loaded */
static inline __attribute__((always_inline)) void int8_step(const Job *j, const vi *w, int off, int m0, vf *acc,
                                                            const int R, const int MB) {
  vi u[TILE_R];
#if INT8_OFFSET
  for (int r = 0; r < R; r++) u[r] = flip8(w[r]); /* w + 128, unsigned */
#else
  for (int r = 0; r < R; r++) u[r] = abs8(w[r]);
#endif
  for (int m = 0; m < MB; m++) {
    const uint8_t *p = j->pack + (size_t)(m0 + m) * j->pack_row;
    const vi x = load_i(p + off);
    const vf sx = load_f((const float *)(p + 2 * (size_t)j->P + off)); /* lane l's entries sit at 4 * l */
#if INT8_OFFSET
    const vi start = load_i(p + j->P + off);
#endif
    for (int r = 0; r < R; r++) {
#if INT8_OFFSET
      const vi dots = dot4(start, u[r], x); /* each lane exact: 4 products */
#else
      const vi dots = dot4(zero_i(), u[r], sign8(x, w[r]));
#endif
      acc[r * MB + m] = fmadd(cvt(dots), sx, acc[r * MB + m]);
    }
  }
}

static inline __attribute__((always_inline)) void int8_tile(const Job *j, int o0, int m0, const int R, const int MB) {
  const int8_t *w = (const int8_t *)j->w + (size_t)o0 * j->K;
  const int K = j->K, full = K / VEC * VEC;
  vf acc[TILE_R * TILE_M];
  vi wv[TILE_R];
  for (int i = 0; i < R * MB; i++) acc[i] = zero_f();
  for (int off = 0; off < full; off += VEC) {
    for (int r = 0; r < R; r++) PREFETCH(w + (size_t)off * R + r * VEC + PREFETCH_BYTES);
    for (int r = 0; r < R; r++) wv[r] = load_w(w + (size_t)r * K + off);
    int8_step(j, wv, off, m0, acc, R, MB);
  }
  if (full < K) {
    for (int r = 0; r < R; r++) wv[r] = load_w_part(w + (size_t)r * K + full, K - full);
    int8_step(j, wv, full, m0, acc, R, MB);
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < MB; m++) store(j, m0 + m, o0 + r, j->scale[o0 + r] * hsum(acc[r * MB + m]));
}

/* ---- INT4: the same, with each weight byte two inputs and a scale per group of G inputs ---- */

/* The scale of each lane's group, for a step touching n groups from s on (lane k: inputs 8k .. 8k + 7 of the step) */
static inline vf group_scales(const float *s, int n, vi lane_group) {
#if defined(TWO_GROUP_SCALES)
  if (n == 2) return two_group_scales(s);
#endif
  return n == 1 ? set1_f(s[0]) : permute_f(load_f_part(s, n), lane_group);
}
#if !defined(DOT8)
static inline vi dot8(vi acc, vi lo, vi xe, vi hi, vi xo) { return dot4(dot4(acc, lo, xe), hi, xo); }
#endif

static inline __attribute__((always_inline)) void int4_step(const uint8_t *const *px, int P, const vi *w,
                                                            const vf *ws, int off, vf *acc, const int R, const int MB) {
  vi lo[TILE_R], hi[TILE_R];
  for (int r = 0; r < R; r++) lo[r] = low_nibbles(w[r]), hi[r] = high_nibbles(w[r]);
  for (int m = 0; m < MB; m++) {
    const uint8_t *p = px[m];
    const vi xe = load_i(p + off), xo = load_i(p + P / 2 + off);
    const vi start = load_i(p + P + off);                           /* lane l (4 bytes) at 4 * l: off bytes on */
    const vf sx = load_f((const float *)(p + P + (size_t)P / 2 + off));
    for (int r = 0; r < R; r++) {
      const vi dots = dot8(start, lo[r], xe, hi[r], xo); /* each lane exact: 8 products */
      acc[r * MB + m] = fmadd(cvt(dots), mul(sx, ws[r]), acc[r * MB + m]);
    }
  }
}

/* G, the group size, is a constant in each copy: the group of a step is a shift, its scales one load (or two) */
static inline __attribute__((always_inline)) void int4_tile(const Job *j, int o0, int m0, const int R, const int MB,
                                                            const int G) {
  const int row = j->K / 2, full = row / VEC * VEC, groups = j->K / G, P = j->P;
  const int per_step = 2 * VEC / G > 1 ? 2 * VEC / G : 1; /* groups a step of VEC bytes (2 VEC inputs) touches */
  const uint8_t *w = (const uint8_t *)j->w + (size_t)o0 * row;
  const float *s = j->scale + (size_t)o0 * groups;
  const vi lane_group = lane_index(G);
  const uint8_t *px[TILE_M4];
  vf acc[TILE_R * TILE_M4], ws[TILE_R];
  vi wv[TILE_R];
  for (int m = 0; m < MB; m++) px[m] = j->pack + (size_t)(m0 + m) * j->pack_row;
  for (int i = 0; i < R * MB; i++) acc[i] = zero_f();
  for (int off = 0; off < full; off += VEC) {
    for (int r = 0; r < R; r++) PREFETCH(w + (size_t)off * R + r * VEC + PREFETCH_BYTES);
    if (G <= 64) /* the scales are a second stream (8 / G bytes a weight byte), read row by row as W is */
      PREFETCH((const char *)s + ((size_t)off * R + PREFETCH_BYTES) * 8 / G);
    for (int r = 0; r < R; r++) {
      wv[r] = load_w(w + (size_t)r * row + off);
      ws[r] = group_scales(s + (size_t)r * groups + 2 * off / G, per_step, lane_group);
    }
    int4_step(px, P, wv, ws, off, acc, R, MB);
  }
  if (full < row) {
    const int g0 = 2 * full / G, n = groups - g0 < per_step ? groups - g0 : per_step;
    for (int r = 0; r < R; r++) {
      wv[r] = load_w_part(w + (size_t)r * row + full, row - full);
      ws[r] = permute_f(load_f_part(s + (size_t)r * groups + g0, n), lane_group);
    }
    int4_step(px, P, wv, ws, full, acc, R, MB);
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < MB; m++) store(j, m0 + m, o0 + r, hsum(acc[r * MB + m]));
}
static inline __attribute__((always_inline)) void int4_tile_g32(const Job *j, int o, int m0, const int R,
                                                                const int MB) {
  int4_tile(j, o, m0, R, MB, 32);
}
static inline __attribute__((always_inline)) void int4_tile_g64(const Job *j, int o, int m0, const int R,
                                                                const int MB) {
  int4_tile(j, o, m0, R, MB, 64);
}
static inline __attribute__((always_inline)) void int4_tile_g128(const Job *j, int o, int m0, const int R,
                                                                 const int MB) {
  int4_tile(j, o, m0, R, MB, 128);
}

#else
/* ---- portable C: one weight row against one row of x, block by block ---- */

static void int8_tile(const Job *j, int o, int m, int R, int MB) {
  (void)R, (void)MB;
  const int8_t *w = (const int8_t *)j->w + (size_t)o * j->K;
  const uint8_t *p = j->pack + (size_t)m * j->pack_row;
  const int8_t *q = (const int8_t *)p;
  const float *sx = (const float *)(p + 2 * (size_t)j->P);
  float sum = 0.f;
  for (int i0 = 0; i0 < j->K; i0 += QBLOCK) {
    const int n = j->K - i0 < QBLOCK ? j->K - i0 : QBLOCK;
    int32_t dot = 0;
    for (int i = i0; i < i0 + n; i++) dot += w[i] * q[i];
    sum += sx[i0 / 4] * (float)dot;
  }
  store(j, m, o, j->scale[o] * sum);
}

static void int4_tile_any(const Job *j, int o, int m, int R, int MB) {
  (void)R, (void)MB;
  const int P = j->P, groups = j->K / j->g;
  const uint8_t *w = (const uint8_t *)j->w + (size_t)o * (j->K / 2);
  const uint8_t *p = j->pack + (size_t)m * j->pack_row;
  const int8_t *xe = (const int8_t *)p, *xo = xe + P / 2;
  const float *sx = (const float *)(p + P + (size_t)P / 2);
  float sum = 0.f;
  for (int i0 = 0; i0 < j->K; i0 += QBLOCK) {
    int32_t dot = 0;
    for (int b = i0 / 2; b < (i0 + QBLOCK) / 2; b++) dot += ((w[b] & 15) - 8) * xe[b] + ((w[b] >> 4) - 8) * xo[b];
    sum += sx[i0 / 8] * j->scale[(size_t)o * groups + i0 / j->g] * (float)dot;
  }
  store(j, m, o, sum);
}
#define int4_tile_g32 int4_tile_any
#define int4_tile_g64 int4_tile_any
#define int4_tile_g128 int4_tile_any
#endif

/* Rows [o0, o1) of W (a thread's share) against every row of x: tiles of TILE_R rows (the last few rows one by one)
 * and up to MB_MAX rows of x. The switch turns R and mb into constants: each case is its own copy of the tile, its
 * accumulators all in registers. Many rows of x (a prefill) are taken X_BLOCK_BYTES of the pack at a time, which
 * stay in L2 while every tile of W reads them; each block re-reads the thread's rows of W. */
#define MB(n, MB_MAX) ((n) < (MB_MAX) ? (n) : (MB_MAX))
#define TILE_ANY(tile, R, MB_MAX)                                         \
  switch (mb) {                                                           \
    case 1: tile(j, o, m0, R, 1); break;                                  \
    case 2: tile(j, o, m0, R, MB(2, MB_MAX)); break;                      \
    case 3: tile(j, o, m0, R, MB(3, MB_MAX)); break;                      \
    default: tile(j, o, m0, R, MB(4, MB_MAX)); break; /* MB_MAX <= 4 */  \
  }
#define ROWS(name, tile, MB_MAX)                                                    \
  static void name(const Job *j, int o0, int o1) {                                  \
    int block = (int)(X_BLOCK_BYTES / j->pack_row) / (MB_MAX) * (MB_MAX);          \
    block = block > (MB_MAX) ? block : (MB_MAX);                                    \
    for (int b0 = 0; b0 < j->M; b0 += block) {                                      \
      const int b1 = b0 + block < j->M ? b0 + block : j->M;                         \
      for (int o = o0; o < o1; o += o + TILE_R <= o1 ? TILE_R : 1)                  \
        for (int m0 = b0; m0 < b1; m0 += MB_MAX) {                                  \
          const int mb = b1 - m0 < MB_MAX ? b1 - m0 : MB_MAX;                       \
          if (o + TILE_R <= o1) TILE_ANY(tile, TILE_R, MB_MAX)                      \
          else TILE_ANY(tile, 1, MB_MAX)                                            \
        }                                                                           \
    }                                                                               \
  }
ROWS(int8_rows, int8_tile, TILE_M)
ROWS(int4_rows_g32, int4_tile_g32, TILE_M4)
ROWS(int4_rows_g64, int4_tile_g64, TILE_M4)
ROWS(int4_rows_g128, int4_tile_g128, TILE_M4)
static void int4_rows(const Job *j, int o0, int o1) {
  (j->g == 32 ? int4_rows_g32 : j->g == 64 ? int4_rows_g64 : int4_rows_g128)(j, o0, o1);
}

/* Quantize x into the pack, then share the output rows out among the threads (whole tiles, contiguous ranges so
 * each thread streams one stretch of W). Returns 0, or 2 when memory ran out. */
/* Threads worth starting for `bytes` of weight: at most num_threads, none with less than MIN_BYTES_PER_THREAD */
static int threads_for(size_t bytes, int num_threads) {
  int threads = num_threads;
  if ((size_t)threads > bytes / MIN_BYTES_PER_THREAD) threads = (int)(bytes / MIN_BYTES_PER_THREAD);
  return threads < 1 ? 1 : threads;
}

static int run(Job *j, void (*pack_row)(const float *, int, int, uint8_t *), void (*rows)(const Job *, int, int),
               const float *x, size_t weight_bytes, int num_threads) {
  const int threads = threads_for(weight_bytes, num_threads);
  const int tiles = (j->N + TILE_R - 1) / TILE_R;
  uint8_t *pack = aligned_alloc(64, j->pack_row * (size_t)j->M);
  if (!pack) return 2;
  j->pack = pack;
  if (threads == 1) { /* no parallel region at all: even a team of one costs about a microsecond */
    for (int m = 0; m < j->M; m++) pack_row(x + (size_t)m * j->K, j->K, j->P, pack + (size_t)m * j->pack_row);
    rows(j, 0, j->N);
  } else {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int m = 0; m < j->M; m++) pack_row(x + (size_t)m * j->K, j->K, j->P, pack + (size_t)m * j->pack_row);
#pragma omp for schedule(static)
      for (int t = 0; t < threads; t++) {
        const int o0 = (int)((int64_t)tiles * t / threads) * TILE_R;
        const int o1 = (int)((int64_t)tiles * (t + 1) / threads) * TILE_R;
        rows(j, o0, o1 < j->N ? o1 : j->N);
      }
    }
  }
  free(pack);
  return 0;
}

const char *quant_linear_isa(void) { return ISA; }

int int8_linear(const float *x, const int8_t *qweight, const float *scale, const float *bias, float *out, int M, int N,
                int K, int num_threads) {
  const int P = (K + PAD - 1) / PAD * PAD;
  Job j = {qweight, scale, bias, out, NULL, 3 * (size_t)P, M, N, K, P, 0};
  return run(&j, pack_int8_row, int8_rows, x, (size_t)N * K, num_threads);
}

int int4_linear(const float *x, const uint8_t *qweight, const float *scales, const float *bias, float *out, int M,
                int N, int K, int group_size, int num_threads) {
  const int P = (K + PAD - 1) / PAD * PAD;
  Job j = {qweight, scales, bias, out, NULL, 2 * (size_t)P, M, N, K, P, group_size};
  return run(&j, pack_int4_row, int4_rows, x, (size_t)N * K / 2, num_threads);
}

/* ---- dequantizing: rows [o0, o1) of W back to float32, for many rows of x (a prefill), which multiply faster as
 * float32 matrices. Each value is one float32 product, (float)q * scale, as PyTorch computes it
 * (nanovllm/layers/quantization.py: dequantize_int8, dequantize_int4): bit for bit the same weights. ---- */

/* out ((o1 - o0), K) float32 = scale[o] * qweight[o] for o in [o0, o1). Returns 0. */
int int8_dequantize(const int8_t *qweight, const float *scale, float *out, int o0, int o1, int K, int num_threads) {
  const int threads = threads_for((size_t)(o1 - o0) * K * 4, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int o = o0; o < o1; o++) {
    const int8_t *q = qweight + (size_t)o * K;
    float *w = out + (size_t)(o - o0) * K;
    const float s = scale[o];
    for (int i = 0; i < K; i++) w[i] = (float)q[i] * s;
  }
  return 0;
}

/* out ((o1 - o0), K) float32 = scales[o][i / g] * (nibble - 8) for o in [o0, o1). Returns 0. */
int int4_dequantize(const uint8_t *qweight, const float *scales, float *out, int o0, int o1, int K, int g,
                    int num_threads) {
  const int threads = threads_for((size_t)(o1 - o0) * K * 4, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int o = o0; o < o1; o++) {
    const uint8_t *q = qweight + (size_t)o * (K / 2);
    const float *s = scales + (size_t)o * (K / g);
    float *w = out + (size_t)(o - o0) * K;
    for (int i0 = 0; i0 < K; i0 += g) { /* one group: one scale */
      const float sg = s[i0 / g];
      for (int j = i0 / 2; j < (i0 + g) / 2; j++) {
        w[2 * j] = (float)((q[j] & 15) - 8) * sg;
        w[2 * j + 1] = (float)((q[j] >> 4) - 8) * sg;
      }
    }
  }
  return 0;
}
