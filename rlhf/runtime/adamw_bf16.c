/* AdamW for float32 weights whose products run on bf16 working copies (rlhf/runtime/working_weights.py).

   The gradients arrive in bf16, as the products made them; each weight's step reads its bf16 gradient, its float32
   weight and Adam's two float32 moments once, and writes the weight, the moments and the weight's new bf16 copy:
   28 bytes a weight, what torch's fused AdamW reads and writes for a float32 gradient alone. Done with torch ops,
   the gradient's cast to float32, the clipping's norm and multiply and the copy's cast are four more passes.

   Built with -O3 -mavx2 -mfma -fno-math-errno; the loops vectorise (square roots included) and run on torch's
   OpenMP threads. */
#include <stdint.h>

#include "bf16.h"

/* round to nearest even, as torch converts; a NaN stays a (quiet) NaN (bf16.h's f32_to_bf16 assumes finite values) */
static inline uint16_t to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    uint32_t u = v.u;
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : rounded);
}

/* Σ g² over `count` bf16 tensors g[t] of n[t] elements, in float within blocks of 1024 and in double across them. */
double bf16_square_sum(const uint16_t **g, const int64_t *n, int64_t count) {
    double total = 0.0;
    #pragma omp parallel reduction(+ : total)
    for (int64_t t = 0; t < count; t++) {
        const uint16_t *x = g[t];
        #pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < n[t]; b += 1024) {
            int64_t end = b + 1024 < n[t] ? b + 1024 : n[t];
            float s = 0.0f;
            #pragma omp simd reduction(+ : s)
            for (int64_t i = b; i < end; i++) {
                float x_i = bf16_to_f32(x[i]);
                s += x_i * x_i;
            }
            total += s;
        }
    }
    return total;
}

/* One AdamW step of `count` weights: p[t] (float32), its moments m[t] and v[t] (float32), its gradient g[t] (bf16,
   multiplied by `scale`: the clipping factor) and its bf16 copy w[t], written from the new weight. Per weight:
   step_size = lr / (1 − β1^k), bias2_sqrt = sqrt(1 − β2^k) for its step count k, decay = lr · weight_decay.
       p ← p − decay · p;  m ← m + (1 − β1)(g − m);  v ← β2 v + (1 − β2) g²;  p ← p − step_size · m / (√v / bias2_sqrt + ε) */
void adamw_bf16(float **p, float **m, float **v, const uint16_t **g, uint16_t **w, const int64_t *n, int64_t count,
                const float *step_size, const float *bias2_sqrt, const float *decay, float beta1, float beta2,
                float eps, float scale) {
    #pragma omp parallel
    for (int64_t t = 0; t < count; t++) {
        float *pt = p[t], *mt = m[t], *vt = v[t];
        const uint16_t *gt = g[t];
        uint16_t *wt = w[t];
        const float ss = step_size[t], bs = bias2_sqrt[t], dt = decay[t];
        #pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < n[t]; i++) {
            float grad = bf16_to_f32(gt[i]) * scale;
            float param = pt[i] - dt * pt[i];
            float avg = mt[i] + (1.0f - beta1) * (grad - mt[i]);
            float avg_sq = beta2 * vt[i] + (1.0f - beta2) * grad * grad;
            param -= ss * avg / (__builtin_sqrtf(avg_sq) / bs + eps);
            mt[i] = avg;
            vt[i] = avg_sq;
            pt[i] = param;
            wt[i] = to_bf16(param);
        }
    }
}
