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
