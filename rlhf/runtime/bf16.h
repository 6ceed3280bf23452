/* bf16 ⇄ float32 per element, shared by the C kernels (rlhf/runtime/kernels.py builds them with this folder on the
   include path and hashes this header into each library's cache key).

   A bf16 is the top 16 bits of a float32: widening is a shift, narrowing rounds to nearest even as torch does.
   `f32_to_bf16` assumes a finite value (the kernels' values are); AdamW's step, which may see a NaN, keeps its own
   (rlhf/runtime/adamw_bf16.c). memcpy rather than a union: GCC compiles either to one move and both vectorise. */
#ifndef RLHF_BF16_H
#define RLHF_BF16_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 f32_to_bf16(float f) { /* round to nearest even; finite values */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

#endif
