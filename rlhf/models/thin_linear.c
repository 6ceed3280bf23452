/* y (M, N) = x (M, K) · Wᵀ in float32 with AVX2 + FMA, for decoding (a few rows) and its prefill; see thin.py.
 *
 * A product of 8 rows by a weight of N × K does 8 multiply-adds per weight it reads, so decoding is bound by
 * streaming the weights from memory. W is stored in panels of 24 output columns, each panel K × 24 contiguous
 * (panel p, row k holds W[24p .. 24p + 23, k]): one pass reads a panel front to back while 4 rows of x, broadcast
 * one value at a time, multiply its three 8-wide vectors into 12 accumulators (all the registers there are).
 * Panels are split between threads (OpenMP, the runtime torch itself uses). Plain version:
 *     for m < M, n < N: y[m][n] = sum over k of x[m][k] · W[n][k]
 *
 * More than 4 rows read a panel more than once. A decoding step (up to 16 rows) takes each panel 32 of its rows
 * (3 KB) at a time, and every 4 rows pass over those while they are in the core's first-level cache, the running
 * sums kept in y between pieces: memory is read in one steady stream. Read whole, the second 4 rows re-read a
 * 55–147 KB panel from the second-level cache while no weight came from memory. With that and the prefetch of
 * both cache lines of a row, 8 rows of the embedded model's products took 37.0 → 30.9 ms (median of 40; 4 rows:
 * 28 ms, a plain sum over the same bytes 21 ms; 2-core AMD EPYC). A prefill's hundreds of rows go in chunks of
 * CHUNK rows over whole panels, which it reads once per chunk. */
#include <immintrin.h>
#include <stdint.h>

#define PANEL 24
#define PIECE 32 /* panel rows (of K) a decoding step's rows take at a time */
#define STEP_ROWS 16 /* at most this many rows: a decoding step */

/* R rows (1 to 4) of x (row stride ldx) against K rows of a panel: y[r][0..24) for r < R, added to what y holds
 * unless `first`; R is a constant where this is inlined */
static inline __attribute__((always_inline)) void
panel_rows(const float *x, int64_t ldx, int64_t K, const float *wp, float *y, int64_t ldy, const int R,
           int prefetch, int first) {
    __m256 acc[4][3];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 3; j++) acc[r][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + r * ldy + 8 * j);
    for (int64_t k = 0; k < K; k++) {
        const float *q = wp + k * PANEL;
        if (prefetch) { /* 16 rows of the panel ahead, both cache lines a 96-byte row can touch */
            _mm_prefetch((const char *)(q + 16 * PANEL), _MM_HINT_T0);
            _mm_prefetch((const char *)(q + 16 * PANEL + 16), _MM_HINT_T0);
        }
        __m256 w0 = _mm256_loadu_ps(q), w1 = _mm256_loadu_ps(q + 8), w2 = _mm256_loadu_ps(q + 16);
        for (int r = 0; r < R; r++) {
            __m256 b = _mm256_broadcast_ss(x + r * ldx + k);
            acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(b, w2, acc[r][2]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 3; j++) _mm256_storeu_ps(y + r * ldy + 8 * j, acc[r][j]);
}

/* rows m0 … end − 1 of x against panel rows k0 … k0 + K − 1 (`first`: the first of them, y not yet written) */
static void panel_block(const float *x, int64_t ldx, int64_t K, const float *wp, float *y, int64_t ldy, int64_t m0,
                        int64_t end, int first) {
    int64_t m = m0;
    for (; m + 4 <= end; m += 4) panel_rows(x + m * ldx, ldx, K, wp, y + m * ldy, ldy, 4, m == m0, first);
    switch (end - m) { /* the last 1-3 rows */
        case 3: panel_rows(x + m * ldx, ldx, K, wp, y + m * ldy, ldy, 3, m == m0, first); break;
        case 2: panel_rows(x + m * ldx, ldx, K, wp, y + m * ldy, ldy, 2, m == m0, first); break;
        case 1: panel_rows(x + m * ldx, ldx, K, wp, y + m * ldy, ldy, 1, m == m0, first); break;
    }
}

/* x (M, K) row-major; panels (N / 24, K, 24); y (M, N) row-major; N a multiple of 24. Many rows (a prefill) go
 * in chunks of CHUNK, so the rows a panel meets stay in the core's cache (128 × 1536 floats: 768 KB). */
#define CHUNK 128
void thin_linear(const float *x, const float *panels, float *y, int64_t M, int64_t N, int64_t K) {
    int64_t count = N / PANEL;
    if (M <= STEP_ROWS) {
#pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < count; p++)
            for (int64_t k0 = 0; k0 < K; k0 += PIECE)
                panel_block(x + k0, K, K - k0 < PIECE ? K - k0 : PIECE, panels + (p * K + k0) * PANEL,
                            y + p * PANEL, N, 0, M, k0 == 0);
        return;
    }
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK) {
        int64_t end = M < m0 + CHUNK ? M : m0 + CHUNK;
#pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < count; p++) panel_block(x, K, K, panels + p * K * PANEL, y + p * PANEL, N, m0, end, 1);
    }
}

/* The panels of the weights W_0 … W_{count − 1} (rows[i] × K each, row-major) stacked along their rows, N rows in
 * all: panel p, row k holds W[24p .. 24p + 23][k], zeros past N. What torch.cat and a strided copy into the panels'
 * transposed view did: the embedded model's 10 trainable blocks, packed again every PPO step, took ~50 ms that way
 * (2-core AMD EPYC); here each panel's 24 source rows are read side by side and the panel written front to back. */
void pack_panels(const float *const *weights, const int64_t *rows, int64_t count, int64_t K, float *panels) {
    int64_t N = 0;
    for (int64_t i = 0; i < count; i++) N += rows[i];
    const int64_t P = (N + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < P; p++) {
        const float *src[PANEL];
        for (int64_t j = 0, i = 0, first = 0; j < PANEL; j++) { /* the source row of each of the panel's columns */
            int64_t n = p * PANEL + j;
            while (i < count && n >= first + rows[i]) first += rows[i++];
            src[j] = i < count ? weights[i] + (n - first) * K : 0;
        }
        float *out = panels + p * K * PANEL;
        for (int64_t k = 0; k < K; k++)
            for (int j = 0; j < PANEL; j++) out[k * PANEL + j] = src[j] ? src[j][k] : 0.f;
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * One decoding step of a Llama model's blocks for B rows (one new token each), in float32: what
 * LlamaDecoder.forward does for a step, with its ~20 eager operations a layer (each a few to tens of µs of fixed
 * cost: ~15 ms a token for 30 layers on a 2-core CPU, a third of the step) done here in one call. Per layer:
 *     h = rms_norm(x) · norm1;  q, k, v = h · Wqkvᵀ;  q, k rotated (x·cos + roll(x, d/2)·sin±)
 *     k, v written into the cache at position `pos`;  each query head attends over cache positions ≤ pos
 *     (scores · scale + bias, softmax in float32, · values);  x += out · Woᵀ
 *     h = rms_norm(x) · norm2;  g, u = h · Wgate_upᵀ;  x += (silu(g) · u) · Wdownᵀ
 * and after layer `record` − 1, x is copied into `recorded` at (b, pos). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

static void rms_norm_rows(const float *x, const float *w, float eps, float *y, int64_t B, int64_t H) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * H;
        float sum = 0.f;
        for (int64_t i = 0; i < H; i++) sum += xb[i] * xb[i];
        float inv = 1.f / sqrtf(sum / (float)H + eps);
        for (int64_t i = 0; i < H; i++) y[b * H + i] = w[i] * (xb[i] * inv);
    }
}

void decode_layers(int64_t B, int64_t H, int64_t nh, int64_t nkv, int64_t d, int64_t F, int64_t layers,
                   float *x, const float *cos, const float *sin, const float *const *norm1,
                   const float *const *norm2, const float *eps, const float *const *qkv_w, int64_t qkv_n,
                   const float *const *o_w, int64_t o_n, const float *const *gu_w, int64_t gu_n,
                   const float *const *down_w, int64_t down_n, float *keys_t, float *values, int64_t L,
                   int64_t pos, const float *bias, float scale, int64_t record, float *recorded) {
    const int64_t g = nh / nkv, end = pos + 1, half = d / 2, heads = nh + nkv;
    float *h = malloc(sizeof(float) * B * H);
    float *qkv = malloc(sizeof(float) * B * qkv_n);
    float *att = malloc(sizeof(float) * B * nh * d);
    float *o = malloc(sizeof(float) * B * o_n);
    float *gu = malloc(sizeof(float) * B * gu_n);
    float *act = malloc(sizeof(float) * B * F);
    float *down = malloc(sizeof(float) * B * down_n);
    float *scores = malloc(sizeof(float) * B * nh * end);
    for (int64_t l = 0; l < layers; l++) {
        float *kt = keys_t + l * B * nkv * d * L, *vv = values + l * B * nkv * L * d;
        rms_norm_rows(x, norm1[l], eps[2 * l], h, B, H);
        thin_linear(h, qkv_w[l], qkv, B, qkv_n, H);
        /* rotary on the query and key heads, then keys (transposed) and values into the cache */
        for (int64_t b = 0; b < B; b++) {
            const float *c = cos + b * d, *s = sin + b * d;
            for (int64_t hd = 0; hd < heads; hd++) {
                float *v = qkv + b * qkv_n + hd * d, r[256];
                for (int64_t i = 0; i < d; i++) r[i] = v[i] * c[i] + v[(i + half) % d] * s[i];
                memcpy(v, r, sizeof(float) * d);
            }
            for (int64_t j = 0; j < nkv; j++) {
                const float *k = qkv + b * qkv_n + (nh + j) * d, *val = qkv + b * qkv_n + (heads + j) * d;
                float *ktj = kt + (b * nkv + j) * d * L;
                for (int64_t i = 0; i < d; i++) ktj[i * L + pos] = k[i];
                memcpy(vv + ((b * nkv + j) * L + pos) * d, val, sizeof(float) * d);
            }
        }
        /* attention: every query head over the cache positions 0 … pos of its key/value head */
#pragma omp parallel for schedule(static)
        for (int64_t bh = 0; bh < B * nh; bh++) {
            int64_t b = bh / nh, hd = bh % nh, j = hd / g;
            const float *q = qkv + b * qkv_n + hd * d, *ktj = kt + (b * nkv + j) * d * L;
            const float *vj = vv + (b * nkv + j) * L * d, *bb = bias + b * end;
            float *sc = scores + bh * end, *out = att + b * nh * d + hd * d;
            for (int64_t t = 0; t < end; t++) sc[t] = 0.f;
            for (int64_t i = 0; i < d; i++) {
                const float qi = q[i], *row = ktj + i * L;
                for (int64_t t = 0; t < end; t++) sc[t] += qi * row[t];
            }
            float top = -INFINITY;
            for (int64_t t = 0; t < end; t++) {
                sc[t] = bb[t] + scale * sc[t];
                if (sc[t] > top) top = sc[t];
            }
            float sum = 0.f;
            for (int64_t t = 0; t < end; t++) {
                sc[t] = expf(sc[t] - top);
                sum += sc[t];
            }
            for (int64_t i = 0; i < d; i++) out[i] = 0.f;
            for (int64_t t = 0; t < end; t++) {
                const float p = sc[t] / sum, *vt = vj + t * d;
                for (int64_t i = 0; i < d; i++) out[i] += p * vt[i];
            }
        }
        thin_linear(att, o_w[l], o, B, o_n, nh * d);
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < H; i++) x[b * H + i] += o[b * o_n + i];
        rms_norm_rows(x, norm2[l], eps[2 * l + 1], h, B, H);
        thin_linear(h, gu_w[l], gu, B, gu_n, H);
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < F; i++) {
                float gate = gu[b * gu_n + i];
                act[b * F + i] = gate / (1.f + expf(-gate)) * gu[b * gu_n + F + i];
            }
        thin_linear(act, down_w[l], down, B, down_n, F);
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < H; i++) x[b * H + i] += down[b * down_n + i];
        if (l + 1 == record)
            for (int64_t b = 0; b < B; b++) memcpy(recorded + (b * L + pos) * H, x + b * H, sizeof(float) * H);
    }
    free(h); free(qkv); free(att); free(o); free(gu); free(act); free(down); free(scores);
}
