// A measurement, not part of prefixkit: how fast an exact int4 matmul with fp32 activations
// can be on this CPU for the row counts generation uses (1, 5 beams, batch 16), against ONNX
// Runtime's kernels. Built and timed by benchmarks/int4_kernel.py.
//
// y[M, N] = x[M, K] @ W[K, N], W per block of 32 along K and per column d * q + m (GGUF Q4_1),
// computed as sum over blocks of d * (q . x_block) + m * sum(x_block), in fp32 FMAs.
// Packed by groups of 16 columns: for group g and block b, 16 bytes per pair of k (k even in the
// low nibble, k odd in the high), 16 pairs -> 256 bytes, then d[16] and m[16] as floats.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define ROWS_MAX 8

static inline __attribute__((always_inline)) void group_kernel(const uint8_t *blk, int nblocks, const float *x, const float *sums, int K, const int M,
                         float *y, int N, int col0) {
    __m512 out[ROWS_MAX];
    for (int r = 0; r < M; r++) out[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi32(15);
    for (int b = 0; b < nblocks; b++) {
        const uint8_t *q = blk + (size_t)b * (256 + 128);
        const float *d = (const float *)(q + 256), *m = (const float *)(q + 256 + 64);
        __m512 acc[ROWS_MAX];
        for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
        const float *xb = x + b * 32;
        for (int p = 0; p < 16; p++) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * p)));
            __m512 q0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
            __m512 q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
            for (int r = 0; r < M; r++) {
                acc[r] = _mm512_fmadd_ps(q0, _mm512_set1_ps(xb[r * K + 2 * p]), acc[r]);
                acc[r] = _mm512_fmadd_ps(q1, _mm512_set1_ps(xb[r * K + 2 * p + 1]), acc[r]);
            }
        }
        __m512 dv = _mm512_loadu_ps(d), mv = _mm512_loadu_ps(m);
        for (int r = 0; r < M; r++) {
            out[r] = _mm512_fmadd_ps(dv, acc[r], out[r]);
            out[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sums[r * nblocks + b]), out[r]);
        }
    }
    for (int r = 0; r < M; r++) _mm512_storeu_ps(y + (size_t)r * N + col0, out[r]);
}

void q4mm(const uint8_t *packed, const float *x, float *y, int M, int K, int N, float *sums) {
    int nblocks = K / 32;
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nblocks; b++) {
            float s = 0; for (int k = 0; k < 32; k++) s += x[r * K + b * 32 + k]; sums[r * nblocks + b] = s;
        }
    size_t group_bytes = (size_t)nblocks * (256 + 128);
    #pragma omp parallel for schedule(static)
    for (int g = 0; g < N / 16; g++) {
        for (int r0 = 0; r0 < M; r0 += ROWS_MAX) {
            int rows = M - r0 < ROWS_MAX ? M - r0 : ROWS_MAX;
            const uint8_t *gb = packed + g * group_bytes; const float *xr = x + (size_t)r0 * K; const float *sr = sums + r0 * nblocks; float *yr = y + (size_t)r0 * N;
            switch (rows) {
#define CASE(R) case R: group_kernel(gb, nblocks, xr, sr, K, R, yr, N, g * 16); break;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
            }
        }
    }
}

void set_threads(int n) { omp_set_num_threads(n); }
