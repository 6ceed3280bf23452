/* The rotary position embedding of bf16 queries or keys by float32 cos and sin, with the result rounded to bf16,
   forward and backward (rlhf/models/rotary.py).

   transformers' apply_rotary_pos_emb computes, for x = [x1, x2] (the two halves of a head):
     y = x · cos + rotate_half(x) · sin,  rotate_half(x) = [−x2, x1],
   in float32 (bf16 times float32 promotes), in 7 torch operations per tensor and ~10 more in the backward; under
   autocast the attention then casts y to bf16. Here each element is computed as those operations compute it (two
   float32 products and their sum, not fused: built with -ffp-contract=off) and rounded to bf16 at once. The
   backward, dx1 = dy1 · cos1 + dy2 · sin2 and dx2 = dy2 · cos2 − dy1 · sin1, is this same function on dy with
   sin's halves swapped and negated (rotary.py), to the same roundings.

   x (B, H, T, D) bf16 with D contiguous and strides given; cos and sin (B or 1, T, D) float32 with D contiguous,
   batch stride cb (0: shared) and position stride ct; y (B, T, H, D) contiguous bf16. */
#include <stdint.h>

#include "bf16.h"

void rotary(const bf16 *x, int64_t sb, int64_t sh, int64_t st, const float *cos, const float *sin, int64_t cb,
             int64_t ct, bf16 *y, int64_t B, int64_t H, int64_t T, int64_t D) {
    const int64_t half = D / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < B * T; bt++) {
        const int64_t b = bt / T, t = bt % T;
        const float *c = cos + b * cb + t * ct, *s = sin + b * cb + t * ct;
        for (int64_t h = 0; h < H; h++) {
            const bf16 *xr = x + b * sb + h * sh + t * st;
            bf16 *yr = y + (bt * H + h) * D;
            #pragma omp simd
            for (int64_t d = 0; d < half; d++) {
                const float x1 = bf16_to_f32(xr[d]), x2 = bf16_to_f32(xr[d + half]);
                const float a1 = x1 * c[d], b1 = -x2 * s[d];
                const float a2 = x2 * c[d + half], b2 = x1 * s[d + half];
                yr[d] = f32_to_bf16(a1 + b1);
                yr[d + half] = f32_to_bf16(a2 + b2);
            }
        }
    }
}
