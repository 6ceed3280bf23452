/* log softmax(z)[label] per row of logits z, and its gradient, for rlhf/models/logprobs.py.

   Forward, per row of V logits (bf16 or float32, computed in float32): m = max z, lse = m + log Σ exp(z − m),
   out = z[label] − lse; only lse is kept for the backward. Backward: dz = g · (onehot(label) − exp(z − lse)),
   written in the logits' dtype (bf16 rounded to nearest even). Torch's version materialises float32 copies of the
   (rows, V) logits and their log-softmax and makes ~7 passes over them; this reads a row twice while it sits in
   the cache and writes the gradient once.

   exp is Cephes' single-precision polynomial (relative error ~1e-7 on [−87, 0]; smaller arguments give 0), written
   as plain loops the compiler vectorises (-O3 with AVX2/AVX-512). Runs on torch's OpenMP threads, a row per
   iteration. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* exp(x) for x <= 0, branch-free and without library calls, so that loops of it vectorise: n = round(x / ln 2)
   by adding and subtracting 1.5 · 2^23, exp(x) = 2^n · exp(x − n ln 2), the latter by Cephes' polynomial */
static inline float exp_nonpositive(float x) {
    const float kept = (float)(x >= -87.0f);  /* smaller arguments give 0 */
    x = x >= -87.0f ? x : -87.0f;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale * kept;
}

#define ROW_FORWARD(LOAD)                                                                                         \
    float m = -INFINITY;                                                                                          \
    _Pragma("omp simd reduction(max : m)") for (int64_t v = 0; v < V; v++) {                                      \
        const float z = LOAD(row[v]);                                                                             \
        m = z > m ? z : m;                                                                                        \
    }                                                                                                             \
    float s = 0.0f;                                                                                               \
    _Pragma("omp simd reduction(+ : s)") for (int64_t v = 0; v < V; v++) s += exp_nonpositive(LOAD(row[v]) - m); \
    const float lse = m + logf(s);                                                                                \
    out_lse[r] = lse;                                                                                             \
    out[r] = LOAD(row[labels[r]]) - lse;

#define IDENTITY(x) (x)

void label_logprobs_forward_bf16(const uint16_t *logits, const int64_t *labels, float *out, float *out_lse,
                                 int64_t rows, int64_t V) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = logits + r * V;
        ROW_FORWARD(bf16_to_f32)
    }
}

void label_logprobs_forward_f32(const float *logits, const int64_t *labels, float *out, float *out_lse,
                                int64_t rows, int64_t V) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = logits + r * V;
        ROW_FORWARD(IDENTITY)
    }
}

void label_logprobs_backward_bf16(const uint16_t *logits, const int64_t *labels, const float *lse, const float *grad,
                                  uint16_t *dlogits, int64_t rows, int64_t V) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = logits + r * V;
        uint16_t *drow = dlogits + r * V;
        const float g = grad[r], l = lse[r];
        #pragma omp simd
        for (int64_t v = 0; v < V; v++) drow[v] = f32_to_bf16(-g * exp_nonpositive(bf16_to_f32(row[v]) - l));
        drow[labels[r]] = f32_to_bf16(g - g * exp_nonpositive(bf16_to_f32(row[labels[r]]) - l));
    }
}

void label_logprobs_backward_f32(const float *logits, const int64_t *labels, const float *lse, const float *grad,
                                 float *dlogits, int64_t rows, int64_t V) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = logits + r * V;
        float *drow = dlogits + r * V;
        const float g = grad[r], l = lse[r];
        #pragma omp simd
        for (int64_t v = 0; v < V; v++) drow[v] = -g * exp_nonpositive(row[v] - l);
        drow[labels[r]] = g - g * exp_nonpositive(row[labels[r]] - l);
    }
}
