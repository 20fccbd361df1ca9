/* The float vector the portable C kernels compute with (linear_cpu.c, paged_attention_cpu.c): GCC/Clang vector
 * extensions, LANES floats wide, which the compiler maps to the widest registers -march=native offers (AVX-512, AVX2,
 * SSE, NEON). aligned(4): loads and stores through a vf* may be unaligned. */
#ifndef NANOVLLM_VECTORS_H
#define NANOVLLM_VECTORS_H
#include <stdint.h>

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
typedef float vf __attribute__((vector_size(4 * LANES), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(4 * LANES), aligned(4), may_alias));

#endif
