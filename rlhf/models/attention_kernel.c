/* Attention of short bf16 sequences on CPUs with AVX512-BF16, forward and backward (rlhf/models/attention.py).

   Per row b and key/value head, for each of its query heads h (grouped-query attention):
     S = Q Kᵀ (float32), P = softmax(scaling · S + mask) (float32), O = P V, rounded to bf16 once;
   backward, from dO:
     dP = dO Vᵀ, dS = scaling · P ⊙ (dP − rowsum(P ⊙ dP)) (rounded to bf16, as the plain products multiply it),
     dQ = dS K, dK = Σ_h dSᵀ Q, dV = Σ_h Pᵀ dO.
   Every product multiplies bf16 pairs into float32 sums (vdpbf16ps). Where a factor is float32 (P in O = P V and
   dV = Pᵀ dO) it is split into two bf16 parts, hi = bf16(p) and lo = bf16(p − hi), and both are multiplied: p is
   then carried to ~16 bits, as the float32 products torch would run carry it to the rounding of their inputs.

   Layouts: q (B, H, T, D), k and v (B, Hkv, T, D) bf16 with D contiguous and the other strides given; mask (B, T, T)
   bytes, 1 = attend, with rows padded to Tn (T rounded up to 16) by zeros; out, dq (B, T, H, D) and dk, dv
   (B, T, Hkv, D) bf16, contiguous; P (B, H, T, Tn) float32, kept from the forward for the backward. A query row that may attend to nothing
   averages every key (as float32's lowest score would in a plain softmax). D must be a multiple of 16.

   The products run through one register-blocked kernel, C (M × N) (+)= A (M × K) B (K × N): A bf16 row-major (so
   each k pair is one 32-bit word to broadcast), B packed as 32-bit words of k pairs, [K/2][N] ("VNNI" layout),
   N a multiple of 16, 4 rows × up to 64 columns of float32 sums in registers. Work is split over (b, key/value
   head) pairs on torch's OpenMP threads. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

static inline uint32_t pair(bf16 lo, bf16 hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

/* rows m0 … m0 + mr − 1 (mr ≤ 4) of C, columns n0 … n0 + 16·NV − 1. A's k pair kp of row m is the 32-bit word
   A[m · lda + kp · ka] */
static inline __attribute__((always_inline)) void micro(const int NV, const uint32_t *A, int64_t lda, int64_t ka,
                                                        int mr, const uint32_t *B, int64_t ldb, int64_t kpairs,
                                                        float *C, int64_t ldc, int accumulate) {
    __m512 acc[4][4];
    for (int m = 0; m < 4; m++)
        for (int v = 0; v < NV; v++) acc[m][v] = _mm512_setzero_ps();
    const uint32_t *a0 = A, *a1 = A + (mr > 1 ? lda : 0), *a2 = A + (mr > 2 ? 2 * lda : 0);
    const uint32_t *a3 = A + (mr > 3 ? 3 * lda : 0);
    for (int64_t kp = 0; kp < kpairs; kp++) {
        __m512bh b[4];
        for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512(B + kp * ldb + 16 * v);
        const __m512bh x0 = (__m512bh)_mm512_set1_epi32((int32_t)a0[kp * ka]);
        const __m512bh x1 = (__m512bh)_mm512_set1_epi32((int32_t)a1[kp * ka]);
        const __m512bh x2 = (__m512bh)_mm512_set1_epi32((int32_t)a2[kp * ka]);
        const __m512bh x3 = (__m512bh)_mm512_set1_epi32((int32_t)a3[kp * ka]);
        for (int v = 0; v < NV; v++) {
            acc[0][v] = _mm512_dpbf16_ps(acc[0][v], x0, b[v]);
            acc[1][v] = _mm512_dpbf16_ps(acc[1][v], x1, b[v]);
            acc[2][v] = _mm512_dpbf16_ps(acc[2][v], x2, b[v]);
            acc[3][v] = _mm512_dpbf16_ps(acc[3][v], x3, b[v]);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int v = 0; v < NV; v++) {
            float *c = C + m * ldc + 16 * v;
            __m512 r = acc[m][v];
            if (accumulate) r = _mm512_add_ps(r, _mm512_loadu_ps(c));
            _mm512_storeu_ps(c, r);
        }
}

/* C (M × N, row stride ldc) (+)= A (M × 2·kpairs, as words: row stride lda, pair stride ka) · B (kpairs × N
   words, row stride ldb) */
static void gemm(const uint32_t *A, int64_t lda, int64_t ka, int64_t M, const uint32_t *B, int64_t ldb, int64_t N,
                 int64_t kpairs, float *C, int64_t ldc, int accumulate) {
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
        const int64_t left = (N - n0) / 16;
        const int nv = left < 4 ? (int)left : 4;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mr = M - m0 < 4 ? (int)(M - m0) : 4;
            const uint32_t *a = A + m0 * lda;
            float *c = C + m0 * ldc + n0;
            const uint32_t *b = B + n0;
            switch (nv) {
                case 4: micro(4, a, lda, ka, mr, b, ldb, kpairs, c, ldc, accumulate); break;
                case 3: micro(3, a, lda, ka, mr, b, ldb, kpairs, c, ldc, accumulate); break;
                case 2: micro(2, a, lda, ka, mr, b, ldb, kpairs, c, ldc, accumulate); break;
                default: micro(1, a, lda, ka, mr, b, ldb, kpairs, c, ldc, accumulate); break;
            }
        }
    }
}

/* a bf16 matrix with rows of even length (row stride ld elements, even) as words for `gemm`'s A */
#define ROWS(x, ld) ((const uint32_t *)(x)), ((ld) / 2), 1

static inline int64_t up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* words[p][j] = (x[j][2p], x[j][2p + 1]) for p < D/2, j < Tn (0 past T): the transposed operand of a product
   over D (S = Q Kᵀ, dP = dO Vᵀ) */
static void pack_over_d(const bf16 *x, int64_t st, int64_t T, int64_t Tn, int64_t D, uint32_t *words) {
    for (int64_t p = 0; p < D / 2; p++)
        for (int64_t j = 0; j < Tn; j++) {
            uint32_t w = 0;
            if (j < T) memcpy(&w, x + j * st + 2 * p, sizeof w);
            words[p * Tn + j] = w;
        }
}

/* words[p][d] = (x[2p][d], x[2p + 1][d]) for p < Tn/2 (0 past T): an operand of a product over positions */
static void pack_over_t(const bf16 *x, int64_t st, int64_t T, int64_t Tn, int64_t D, uint32_t *words) {
    for (int64_t p = 0; p < Tn / 2; p++) {
        uint32_t *w = words + p * D;
        if (2 * p + 1 < T) {
            const bf16 *lo = x + 2 * p * st, *hi = lo + st;
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) w[d] = pair(lo[d], hi[d]);
        } else if (2 * p < T) {
            const bf16 *lo = x + 2 * p * st;
            for (int64_t d = 0; d < D; d++) w[d] = pair(lo[d], 0);
        } else {
            memset(w, 0, sizeof(uint32_t) * D);
        }
    }
}

/* exp(x) for 16 x <= 0: Cephes' polynomial, as in label_logprobs.c (smaller than −87 gives 0) */
static inline __m512 exp16(__m512 x) {
    const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 q = _mm512_set1_ps(1.9875691500e-4f);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
    q = _mm512_fmadd_ps(_mm512_mul_ps(q, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(kept, _mm512_scalef_ps(q, n));
}

static inline __mmask16 allowed16(const uint8_t *allowed) {
    return _mm_test_epi8_mask(_mm_loadu_si128((const __m128i *)allowed), _mm_set1_epi8((char)0xFF));
}

/* 16 floats rounded to bf16 (nearest even), and back */
static inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
static inline __m512 from_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* x (n floats, a multiple of 16) split into bf16 parts: hi = bf16(x), lo = bf16(x − hi) */
static inline void split16(const float *x, int64_t n, bf16 *hi, bf16 *lo) {
    for (int64_t j = 0; j < n; j += 16) {
        const __m512 v = _mm512_loadu_ps(x + j);
        const __m256i h = to_bf16(v);
        _mm256_storeu_si256((__m256i *)(hi + j), h);
        _mm256_storeu_si256((__m256i *)(lo + j), to_bf16(_mm512_sub_ps(v, from_bf16(h))));
    }
}

/* n floats (a multiple of 16) rounded to bf16 */
static inline void round16(const float *x, int64_t n, bf16 *out) {
    for (int64_t j = 0; j < n; j += 16) _mm256_storeu_si256((__m256i *)(out + j), to_bf16(_mm512_loadu_ps(x + j)));
}

/* one row of P from one row of S, over Tp columns (T rounded up to 16; `allowed` is 0 past T): softmax of
   scaling · s over the allowed keys, 0 elsewhere (the first T keys alike where none is allowed); P's row and its
   bf16 parts hi and lo */
static void softmax_row(const float *s, const uint8_t *allowed, int64_t T, int64_t Tp, float scaling, float *p,
                        bf16 *hi, bf16 *lo) {
    const __m512 sc = _mm512_set1_ps(scaling), lowest = _mm512_set1_ps(-3.0e38f);
    __m512 mv = lowest;
    for (int64_t j = 0; j < Tp; j += 16)
        mv = _mm512_max_ps(mv, _mm512_mask_mul_ps(lowest, allowed16(allowed + j), sc, _mm512_loadu_ps(s + j)));
    const float m = _mm512_reduce_max_ps(mv);
    if (m > -3.0e38f) {
        const __m512 mm = _mm512_set1_ps(m);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < Tp; j += 16) {
            const __m512 e = _mm512_maskz_mov_ps(allowed16(allowed + j), exp16(_mm512_fmsub_ps(sc, _mm512_loadu_ps(s + j), mm)));
            _mm512_storeu_ps(p + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int64_t j = 0; j < Tp; j += 16) _mm512_storeu_ps(p + j, _mm512_mul_ps(_mm512_loadu_ps(p + j), inv));
    } else {
        for (int64_t j = 0; j < Tp; j++) p[j] = j < T ? 1.0f / (float)T : 0.0f;
    }
    split16(p, Tp, hi, lo);
}

/* words[j] = (x[j], y[j]) for j < n, 0 for n ≤ j < width: two rows of a product's B operand over their index */
static void interleave(const bf16 *x, const bf16 *y, int64_t n, int64_t width, uint32_t *words) {
    #pragma omp simd
    for (int64_t j = 0; j < n; j++) words[j] = pair(x[j], y[j]);
    for (int64_t j = n; j < width; j++) words[j] = 0;
}

/* Returns 0, or 1 where scratch memory could not be had. P may be NULL (nothing kept: no backward to come). */
int attention_forward(const bf16 *q, const bf16 *k, const bf16 *v, const uint8_t *mask, bf16 *out, float *P,
                      int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t D, float scaling, int64_t qsb,
                      int64_t qsh, int64_t qst, int64_t ksb, int64_t ksh, int64_t kst, int64_t vsb, int64_t vsh,
                      int64_t vst) {
    const int64_t g = H / Hkv, Tn = up(T, 16);
    int failed = 0;
    #pragma omp parallel
    {
        uint32_t *kw = malloc(sizeof(uint32_t) * (D / 2) * Tn);
        uint32_t *vw = malloc(sizeof(uint32_t) * (Tn / 2) * D);
        float *s = malloc(sizeof(float) * T * Tn);
        float *prow = malloc(sizeof(float) * Tn);
        bf16 *hi = malloc(sizeof(bf16) * T * Tn), *lo = malloc(sizeof(bf16) * T * Tn);
        float *o = malloc(sizeof(float) * T * D);
        const int ok = kw && vw && s && prow && hi && lo && o;
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < B * Hkv; item++) {
            if (!ok) continue;
            const int64_t b = item / Hkv, kvh = item % Hkv;
            pack_over_d(k + b * ksb + kvh * ksh, kst, T, Tn, D, kw);
            pack_over_t(v + b * vsb + kvh * vsh, vst, T, Tn, D, vw);
            for (int64_t hh = 0; hh < g; hh++) {
                const int64_t h = kvh * g + hh;
                gemm(ROWS(q + b * qsb + h * qsh, qst), T, kw, Tn, Tn, D / 2, s, Tn, 0);
                for (int64_t i = 0; i < T; i++) {
                    float *pr = P ? P + ((b * H + h) * T + i) * Tn : prow;
                    softmax_row(s + i * Tn, mask + (b * T + i) * Tn, T, Tn, scaling, pr, hi + i * Tn, lo + i * Tn);
                }
                gemm(ROWS(hi, Tn), T, vw, D, D, Tn / 2, o, D, 0);
                gemm(ROWS(lo, Tn), T, vw, D, D, Tn / 2, o, D, 1);
                for (int64_t i = 0; i < T; i++) round16(o + i * D, D, out + ((b * T + i) * H + h) * D);
            }
        }
        free(kw); free(vw); free(s); free(prow); free(hi); free(lo); free(o);
    }
    return failed;
}

/* dst (T rows of D, row stride ld) = the transpose of acc (D × Tn floats), rounded to bf16 */
static void store_transposed(const float *acc, int64_t Tn, int64_t T, int64_t D, bf16 *dst, int64_t ld) {
    for (int64_t j = 0; j < T; j++)
        for (int64_t d = 0; d < D; d++) dst[j * ld + d] = f32_to_bf16(acc[d * Tn + j]);
}

int attention_backward(const bf16 *q, const bf16 *k, const bf16 *v, const float *P, const bf16 *dout, bf16 *dq,
                       bf16 *dk, bf16 *dv, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t D, float scaling,
                       int64_t qsb, int64_t qsh, int64_t qst, int64_t ksb, int64_t ksh, int64_t kst, int64_t vsb,
                       int64_t vsh, int64_t vst) {
    /* dV and dK are computed transposed, dVᵀ = dOᵀ P and dKᵀ = Qᵀ dS over the group's query rows (R of them, head
       by head, each head's T rows padded to Tn): their A operand is dO's and Q's rows packed in pairs (read down
       the pairs), their B operand P's and dS's rows interleaved in pairs; no matrix is transposed element by
       element but the two results */
    const int64_t g = H / Hkv, Tn = up(T, 16), R = g * Tn;
    int failed = 0;
    #pragma omp parallel
    {
        uint32_t *vtw = malloc(sizeof(uint32_t) * (D / 2) * Tn);  /* Vᵀ for dP = dO Vᵀ */
        uint32_t *kw = malloc(sizeof(uint32_t) * (Tn / 2) * D);   /* K for dQ = dS K */
        uint32_t *dow = malloc(sizeof(uint32_t) * (R / 2) * D);   /* the group's dO rows in pairs: dVᵀ's A */
        uint32_t *qw = malloc(sizeof(uint32_t) * (R / 2) * D);    /* the group's Q rows in pairs: dKᵀ's A */
        uint32_t *phw = malloc(sizeof(uint32_t) * (R / 2) * Tn), *plw = malloc(sizeof(uint32_t) * (R / 2) * Tn);
        uint32_t *dsw = malloc(sizeof(uint32_t) * (R / 2) * Tn);  /* P's parts and dS, rows in pairs: B operands */
        bf16 *ds = calloc((size_t)Tn * Tn, sizeof(bf16));
        bf16 *ph = calloc((size_t)Tn * Tn, sizeof(bf16)), *pl = calloc((size_t)Tn * Tn, sizeof(bf16));
        float *dp = malloc(sizeof(float) * T * Tn), *acc = malloc(sizeof(float) * D * Tn);
        const int ok = vtw && kw && dow && qw && phw && plw && dsw && ds && ph && pl && dp && acc;
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < B * Hkv; item++) {
            if (!ok) continue;
            const int64_t b = item / Hkv, kvh = item % Hkv;
            pack_over_d(v + b * vsb + kvh * vsh, vst, T, Tn, D, vtw);
            pack_over_t(k + b * ksb + kvh * ksh, kst, T, Tn, D, kw);
            for (int64_t hh = 0; hh < g; hh++) {
                const int64_t h = kvh * g + hh;
                const bf16 *dob = dout + (b * T * H + h) * D;  /* row i at dob + i · H · D */
                const float *pb = P + (b * H + h) * T * Tn;
                pack_over_t(dob, H * D, T, Tn, D, dow + hh * (Tn / 2) * D);
                pack_over_t(q + b * qsb + h * qsh, qst, T, Tn, D, qw + hh * (Tn / 2) * D);
                gemm(ROWS(dob, H * D), T, vtw, Tn, Tn, D / 2, dp, Tn, 0);
                for (int64_t i = 0; i < T; i++) {
                    const float *pr = pb + i * Tn, *dpr = dp + i * Tn;
                    __m512 dv16 = _mm512_setzero_ps();
                    for (int64_t j = 0; j < Tn; j += 16)  /* P is 0 past T */
                        dv16 = _mm512_fmadd_ps(_mm512_loadu_ps(pr + j), _mm512_loadu_ps(dpr + j), dv16);
                    const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(dv16)), sc = _mm512_set1_ps(scaling);
                    for (int64_t j = 0; j < Tn; j += 16) {  /* so is dS */
                        const __m512 pj = _mm512_loadu_ps(pr + j);
                        const __m512 d = _mm512_mul_ps(_mm512_mul_ps(sc, pj), _mm512_sub_ps(_mm512_loadu_ps(dpr + j), delta));
                        _mm256_storeu_si256((__m256i *)(ds + i * Tn + j), to_bf16(d));
                    }
                    split16(pr, Tn, ph + i * Tn, pl + i * Tn);
                }
                for (int64_t ip = 0; ip < Tn / 2; ip++) {  /* (rows T … Tn − 1 of ds, ph, pl stay 0) */
                    const int64_t at = (hh * (Tn / 2) + ip) * Tn;
                    interleave(ds + 2 * ip * Tn, ds + (2 * ip + 1) * Tn, Tn, Tn, dsw + at);
                    interleave(ph + 2 * ip * Tn, ph + (2 * ip + 1) * Tn, Tn, Tn, phw + at);
                    interleave(pl + 2 * ip * Tn, pl + (2 * ip + 1) * Tn, Tn, Tn, plw + at);
                }
                gemm(ROWS(ds, Tn), T, kw, D, D, Tn / 2, acc, D, 0);  /* dQ = dS K */
                for (int64_t i = 0; i < T; i++) round16(acc + i * D, D, dq + ((b * T + i) * H + h) * D);
            }
            gemm(dow, 1, D, D, phw, Tn, Tn, R / 2, acc, Tn, 0);  /* dVᵀ = dOᵀ P, P in two parts */
            gemm(dow, 1, D, D, plw, Tn, Tn, R / 2, acc, Tn, 1);
            store_transposed(acc, Tn, T, D, dv + (b * T * Hkv + kvh) * D, Hkv * D);
            gemm(qw, 1, D, D, dsw, Tn, Tn, R / 2, acc, Tn, 0);  /* dKᵀ = Qᵀ dS */
            store_transposed(acc, Tn, T, D, dk + (b * T * Hkv + kvh) * D, Hkv * D);
        }
        free(vtw); free(kw); free(dow); free(qw); free(phw); free(plw); free(dsw); free(ds); free(ph); free(pl);
        free(dp); free(acc);
    }
    return failed;
}
