/* y (M, N) = x (M, K) · Wᵀ in float32 with AVX2 + FMA, for decoding (a few rows) and its prefill; see thin.py.
 *
 * A product of 8 rows by a weight of N × K does 8 multiply-adds per weight it reads, so decoding is bound by
 * streaming the weights from memory. W is stored in panels of 24 output columns, each panel K × 24 contiguous
 * (panel p, row k holds W[24p .. 24p + 23, k]): one pass reads a panel front to back while 4 rows of x, broadcast
 * one value at a time, multiply its three 8-wide vectors into 12 accumulators. The other row blocks of x read the
 * same panel again from the core's cache, not from memory. Panels are split between threads (OpenMP, the runtime
 * torch itself uses). Plain version:
 *     for m < M, n < N: y[m][n] = sum over k of x[m][k] · W[n][k]
 */
#include <immintrin.h>
#include <stdint.h>

#define PANEL 24

/* R rows (1 to 4) of x against one panel: y[r][0..24) for r < R; R is a constant where this is inlined */
static inline __attribute__((always_inline)) void
panel_rows(const float *x, int64_t K, const float *wp, float *y, int64_t ldy, const int R, int prefetch) {
    __m256 acc[4][3];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 3; j++) acc[r][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const float *q = wp + k * PANEL;
        if (prefetch) _mm_prefetch((const char *)(q + 16 * PANEL), _MM_HINT_T0);  /* 16 rows of the panel ahead */
        __m256 w0 = _mm256_loadu_ps(q), w1 = _mm256_loadu_ps(q + 8), w2 = _mm256_loadu_ps(q + 16);
        for (int r = 0; r < R; r++) {
            __m256 b = _mm256_broadcast_ss(x + r * K + k);
            acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(b, w2, acc[r][2]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 3; j++) _mm256_storeu_ps(y + r * ldy + 8 * j, acc[r][j]);
}

/* x (M, K) row-major; panels (N / 24, K, 24); y (M, N) row-major; N a multiple of 24. Many rows (a prefill) go
 * in chunks of CHUNK, so the rows a panel meets stay in the core's cache (128 × 1536 floats: 768 KB). */
#define CHUNK 128
void thin_linear(const float *x, const float *panels, float *y, int64_t M, int64_t N, int64_t K) {
    int64_t count = N / PANEL;
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK) {
        int64_t end = M < m0 + CHUNK ? M : m0 + CHUNK;
#pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < count; p++) {
            const float *wp = panels + p * K * PANEL;
            float *yp = y + p * PANEL;
            int64_t m = m0;
            for (; m + 4 <= end; m += 4) panel_rows(x + m * K, K, wp, yp + m * N, N, 4, m == m0);
            switch (end - m) { /* the last 1-3 rows */
                case 3: panel_rows(x + m * K, K, wp, yp + m * N, N, 3, m == m0); break;
                case 2: panel_rows(x + m * K, K, wp, yp + m * N, N, 2, m == m0); break;
                case 1: panel_rows(x + m * K, K, wp, yp + m * N, N, 1, m == m0); break;
            }
        }
    }
}
