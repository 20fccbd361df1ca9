/* The small operations of a decode step on the CPU, one C call each: RMSNorm, rotary embedding, SwiGLU (chapter 6).
 *
 * On a decode step each of these touches a few thousand floats, yet in PyTorch each is a chain of 4-8 operators
 * (RMSNorm: pow, mean, add, rsqrt, mul, mul), and every operator costs 3-15 microseconds of dispatch, allocation and
 * thread setup whatever its size: measured on the development CPU, RMSNorm of 768 floats 56 us, rotary of one token's
 * 12 query heads 53 us, SwiGLU of 2048 floats 24 us. A layer calls them five times, so a 12-layer model spends
 * ~3 ms a step in them, as long as reading the weights of a 100M-parameter INT8 model takes. One C call does each
 * in 1-5 us. This is the fixed cost of a step that CUDA graphs remove on a GPU, removed on the CPU by fusion.
 *
 * Every function reads and writes float32, row-major. The arithmetic follows PyTorch's order where it can, so the
 * results are PyTorch's to float32 rounding: rotary is exact (the same products and sums, no fused multiply-add),
 * RMSNorm differs only in how the sum of squares is added up, SwiGLU in the exp function's last bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off") /* a * b + c * d rounded twice, as PyTorch's separate operators do */
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

/* out[r] = weight * (x[r] * 1 / sqrt(mean(x[r]^2) + eps)) for each of `rows` rows of `dim` values (Llama's order:
 * normalise, then scale). x and out may be the same memory. */
void rms_norm(const float *x, const float *weight, float *out, int rows, int dim, float eps) {
  for (int r = 0; r < rows; r++) {
    const float *xr = x + (int64_t)r * dim;
    float *yr = out + (int64_t)r * dim;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < dim; i++) sum += xr[i] * xr[i];
    const float inv = 1.f / sqrtf(sum / (float)dim + eps);
#pragma omp simd
    for (int i = 0; i < dim; i++) yr[i] = weight[i] * (xr[i] * inv);
  }
}

/* Rotates, in place, the first `heads` heads of each of `rows` rows: head h of row r starts at
 * x + r * row_stride + h * head_dim. Within a head, channel j < rotary_dim / 2 pairs with j + rotary_dim / 2
 * (Hugging Face's rotate-half layout) and the pair turns by its angle: cos and sin are (rows, rotary_dim).
 * Channels from rotary_dim on are left as they are (partial rotary). */
void rotary(float *x, const float *cos, const float *sin, int rows, int heads, int head_dim, int rotary_dim,
            int64_t row_stride) {
  const int half = rotary_dim / 2;
  for (int r = 0; r < rows; r++) {
    const float *c = cos + (int64_t)r * rotary_dim, *s = sin + (int64_t)r * rotary_dim;
    for (int h = 0; h < heads; h++) {
      float *x1 = x + r * row_stride + (int64_t)h * head_dim, *x2 = x1 + half;
#pragma omp simd
      for (int j = 0; j < half; j++) {
        const float a = x1[j], b = x2[j];
        x1[j] = a * c[j] + (-b) * s[j];             /* x * cos + cat(-x2, x1) * sin, first half */
        x2[j] = b * c[half + j] + a * s[half + j]; /* second half */
      }
    }
  }
}

/* out[r, j] = silu(gate_up[r, j]) * gate_up[r, size + j], silu(g) = g / (1 + exp(-g)): the SwiGLU of a fused
 * gate/up projection's output, (rows, 2 * size) -> (rows, size). */
void silu_mul(const float *gate_up, float *out, int rows, int size) {
  for (int r = 0; r < rows; r++) {
    const float *g = gate_up + (int64_t)r * 2 * size, *u = g + size;
    float *o = out + (int64_t)r * size;
#pragma omp simd
    for (int j = 0; j < size; j++) o[j] = g[j] / (1.f + expf(-g[j])) * u[j];
  }
}

/* ---- a whole decode step's layers in one call (chapter 6's answer on the CPU to a CUDA graph) ----
 *
 * Even with the operations above, a layer of a decode step is a dozen calls from Python (norm, qkv, rotary, K/V
 * store, attention, o, residual, norm, gate/up, SwiGLU, down, residual), each paying Python's and ctypes' fixed
 * cost: ~2 ms a step on a 12-layer model. decode_layers runs every layer of the step in C, calling the very kernels
 * the Python path calls (the linear and attention kernels' addresses come in the plan), in the same order on the
 * same values, so its result is the Python path's bit for bit. nanovllm/models/decode_step.py builds the plan. */

typedef int (*fp32_linear_fn)(const float *, const float *, const float *, float *, int, int, int, int);
typedef int (*int8_linear_fn)(const float *, const void *, const float *, const float *, float *, int, int, int, int);
typedef int (*int4_linear_fn)(const float *, const void *, const float *, const float *, float *, int, int, int, int,
                              int);
typedef int (*attention_fn)(const float *, const void *, const void *, const int32_t *, const int32_t *, float *, int,
                            int, int, int, int, int, int, float, int, float, int);

enum { FP32 = 0, INT8 = 1, INT4 = 2 };

typedef struct { /* one linear layer: y = x W^T + b */
  const void *weight; /* FP32: W^T (in, out) float; INT8: (out, in) int8; INT4: (out, in / 2) packed nibbles */
  const float *scales, *bias; /* scales: INT8 (out,), INT4 (out, in / group); bias may be NULL */
  int kind, in, out, group;
} Linear;

typedef struct { /* one decoder layer (Llama's: pre-norms, fused q/k/v and gate/up, SwiGLU) */
  const float *input_norm, *post_attention_norm;
  Linear qkv, o, gate_up, down;
  void *k_cache, *v_cache; /* this layer's pool, (num_blocks, block_size, Hkv, D), float32 or bfloat16 */
  float scale, softcap;     /* softcap 0: none */
  int window;               /* 0: none */
} Layer;

typedef struct { /* what every layer shares, and the kernels the plan calls */
  void *fp32_linear, *int8_linear, *int4_linear, *attention;
  int num_layers, hidden, heads, kv_heads, head_dim, rotary_dim, block_size, num_blocks;
  float eps;
  int kv_bf16; /* the pool is bfloat16: K and V are rounded to it as they are stored */
} Plan;

/* float32 -> bfloat16, rounding to nearest, ties to even: what PyTorch's .to(torch.bfloat16) does (NaN aside) */
static inline uint16_t to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static int linear(const Plan *p, const Linear *l, const float *x, float *y, int rows, int threads) {
  switch (l->kind) {
    case FP32: return ((fp32_linear_fn)p->fp32_linear)(x, l->weight, l->bias, y, rows, l->out, l->in, threads);
    case INT8: return ((int8_linear_fn)p->int8_linear)(x, l->weight, l->scales, l->bias, y, rows, l->out, l->in, threads);
    default:
      return ((int4_linear_fn)p->int4_linear)(x, l->weight, l->scales, l->bias, y, rows, l->out, l->in, l->group, threads);
  }
}

/* x (rows, hidden): the residual stream, updated in place by every layer. Row r is a decoding sequence's newest
 * token: its K and V go to slots[r] (skipped when negative: a padding row), and it attends to lens[r] positions
 * through tables[r] (max_blocks entries). cos, sin (rows, rotary_dim). Returns 0, 1 (a length or block id out of
 * range), 2 (out of memory), or a linear kernel's error. */
int decode_layers(const Plan *p, const Layer *layers, float *x, const float *cos, const float *sin,
                  const int64_t *slots, const int32_t *tables, const int32_t *lens, int rows, int max_blocks,
                  int threads) {
  const int E = p->hidden, D = p->head_dim, Hq = p->heads, Hkv = p->kv_heads;
  const int qkv_width = (Hq + 2 * Hkv) * D, kv = Hkv * D;
  int widest = qkv_width > E ? qkv_width : E; /* the largest output any linear of any layer writes */
  for (int l = 0; l < p->num_layers; l++) {
    widest = layers[l].gate_up.out > widest ? layers[l].gate_up.out : widest;
    widest = layers[l].down.in > widest ? layers[l].down.in : widest;
  }
  float *h = malloc(sizeof(float) * (size_t)rows * E), *wide = malloc(sizeof(float) * (size_t)rows * widest);
  float *q = malloc(sizeof(float) * (size_t)rows * Hq * D), *att = malloc(sizeof(float) * (size_t)rows * Hq * D);
  float *act = malloc(sizeof(float) * (size_t)rows * widest), *y = malloc(sizeof(float) * (size_t)rows * E);
  int error = h && wide && q && att && act && y ? 0 : 2;
  for (int l = 0; l < p->num_layers && !error; l++) {
    const Layer *L = layers + l;
    rms_norm(x, L->input_norm, h, rows, E, p->eps);
    if ((error = linear(p, &L->qkv, h, wide, rows, threads))) break;
    rotary(wide, cos, sin, rows, Hq + Hkv, D, p->rotary_dim, qkv_width); /* q's heads, then k's */
    for (int r = 0; r < rows; r++) {
      const float *row = wide + (int64_t)r * qkv_width;
      for (int i = 0; i < Hq * D; i++) q[(int64_t)r * Hq * D + i] = row[i]; /* q, contiguous for the kernel */
      if (slots[r] < 0) continue;
      if (slots[r] >= (int64_t)p->num_blocks * p->block_size) { error = 1; break; }
      if (p->kv_bf16)
        for (int i = 0; i < kv; i++) {
          ((uint16_t *)L->k_cache)[slots[r] * kv + i] = to_bf16(row[Hq * D + i]);
          ((uint16_t *)L->v_cache)[slots[r] * kv + i] = to_bf16(row[Hq * D + kv + i]);
        }
      else
        for (int i = 0; i < kv; i++) {
          ((float *)L->k_cache)[slots[r] * kv + i] = row[Hq * D + i];
          ((float *)L->v_cache)[slots[r] * kv + i] = row[Hq * D + kv + i];
        }
    }
    if (error) break;
    error = ((attention_fn)p->attention)(q, L->k_cache, L->v_cache, tables, lens, att, rows, Hq, Hkv, D, p->block_size,
                                         max_blocks, p->num_blocks, L->scale, L->window, L->softcap, threads);
    if (error || (error = linear(p, &L->o, att, y, rows, threads))) break;
    for (int64_t i = 0; i < (int64_t)rows * E; i++) x[i] = x[i] + y[i];
    rms_norm(x, L->post_attention_norm, h, rows, E, p->eps);
    if ((error = linear(p, &L->gate_up, h, wide, rows, threads))) break;
    silu_mul(wide, act, rows, L->gate_up.out / 2);
    if ((error = linear(p, &L->down, act, y, rows, threads))) break;
    for (int64_t i = 0; i < (int64_t)rows * E; i++) x[i] = x[i] + y[i];
  }
  free(h), free(wide), free(q), free(att), free(act), free(y);
  return error;
}
