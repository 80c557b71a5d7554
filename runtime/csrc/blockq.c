/* prefixkit's CPU kernel for block-quantised matmuls, as an ONNX Runtime custom-operator library.
 *
 * prefixkit.MatMulQ4(A, B, scales, block_sum, offsets) -> Y = A @ W, with
 *     W[k, n] = scales[n, b] * (q[n, k] - 8) + offsets[b, n],  b = k / 32,
 * q the 4-bit values in B as MatMulNBits packs them ([N, K/32, 16] bytes, k even in the low
 * nibble). These are the initializers of the export's fallback (exporter/quantize.py:
 * MatMulNBits(A, B, scales) + (A @ block_sum) @ offsets); the kernel reads the same ones and
 * leaves block_sum unread. It computes in fp32 with fp32 activations, each block as
 * scales * ((q - 8) . a) and the offsets as (block sums of A) @ offsets, for any number of
 * rows: ONNX Runtime's exact int4 kernels are fast for one row only.
 *
 * With the attribute activations = 16 or 8 (exports quantised as int4-a16, int4-a8, ...), each
 * row's activations are first rounded to integers per block of 32, x = round(a * L / max|a|) with
 * L = 16256 (127 * 128) or 127 (llama.cpp's Q8 activations), and a block's products are summed
 * exactly in integers, with AVX-512 VNNI where the CPU has it, from weights packed for it once
 * when the kernel is created. 16 bits keep results within about 2e-5 of the fp32 ones; 8 bits
 * are faster and move them by about 2e-3 (both relative to the largest output).
 *
 * Columns are shared out over ONNX Runtime's intra-op threads (KernelContext_ParallelFor).
 * The AVX-512 path is chosen at run time; elsewhere a portable loop computes the same sums.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "ort_abi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PK_X86 1
#endif

#define BLOCK 32
#define COL_TASK 32  /* columns per parallel task */

typedef struct {
    const OrtApi *api;
    int64_t K, N;
    int bits;
    int activations;      /* attribute activations: 32 (fp32), or 16 or 8: rounded to integers per block */
    uint8_t *packed;      /* integer activations with VNNI: the weights for vpdpbusd (pack), else NULL */
    float *packed_scales; /* [ceil(N/16)][K/32][16] */
    int32_t *packed_zeros; /* MatMulQ8: the zero points, likewise */
} Q4Kernel;

typedef struct {
    const float *a;        /* [M, K] */
    const uint8_t *q;      /* [N, K/32, 16]; MatMulQ8: the high nibbles */
    const uint8_t *q_low;  /* MatMulQ8: the low nibbles, [N, K/32, 16] */
    const uint8_t *zero_high, *zero_low; /* MatMulQ8: zero points' nibbles, [N, ceil(K/64)] */
    const float *scales;   /* [N, K/32] */
    const float *offsets;  /* [K/32, N]; NULL for MatMulQ8 */
    const float *split;    /* per row and block: a at even k [16], then at odd k [16] */
    const float *sums;     /* [M, K/32] */
    float *y;              /* [M, N] */
    /* Integer activations (else NULL), per row and block: x [32] as int8 digits, x = xq (8 bits)
     * or 128 xq + xlo (16 bits); its scale (a = scale * x); minus the sum of x. */
    const int8_t *xq, *xlo;
    const float *xs;
    const int32_t *xz;
    const uint8_t *packed; /* integer activations with VNNI: Q4Kernel.packed */
    const float *packed_scales;
    const int32_t *packed_zeros;
    int64_t M, K, N;
    int avx512;
    int positions; /* the rows are the positions of sequences (a prefill), not one token of each */
} Q4Call;

/* A block's weights as integers q (0..15 or 0..255) and its zero point z: W = scale * (q - z). */
static inline int block_zero(const Q4Call *c, int64_t n, int64_t b) {
    if (!c->q_low) return 8;
    const int64_t at = n * ((c->K / BLOCK + 1) / 2) + b / 2;
    const int shift = (int)((b & 1) * 4);
    return ((c->zero_high[at] >> shift) & 15) * 16 + ((c->zero_low[at] >> shift) & 15);
}
static inline int block_q(const Q4Call *c, int64_t n, int64_t b, int i) {
    const int64_t at = (n * (c->K / BLOCK) + b) * 16 + i / 2;
    const int shift = (i & 1) * 4, q = (c->q[at] >> shift) & 15;
    return c->q_low ? q * 16 + ((c->q_low[at] >> shift) & 15) : q;
}

/* A block's weight as the op defines it: element i of the block (k = 32 b + i). */
static inline float weight_at(const Q4Call *c, int64_t n, int64_t b, int i) {
    return c->scales[n * (c->K / BLOCK) + b] * (float)(block_q(c, n, b, i) - block_zero(c, n, b));
}

/* With integer activations: per block, the integer sum of q x minus z times the sum of x (exact
 * in int32), times the weights' scale, times the activations' scale, added in one rounding; then
 * MatMulQ4's offsets times the fp32 block sums of the activations. The VNNI path computes the
 * same numbers. */
static void columns_portable_integer(const Q4Call *c, int64_t n0, int64_t n1) {
    const int64_t nb = c->K / BLOCK;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t r = 0; r < c->M; r++) {
            float total = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *x = c->xq + (r * nb + b) * BLOCK;
                int32_t dot = block_zero(c, n, b) * c->xz[r * nb + b];
                for (int i = 0; i < BLOCK; i++)
                    dot += block_q(c, n, b, i) * (c->xlo ? 128 * x[i] + c->xlo[(r * nb + b) * BLOCK + i] : x[i]);
                total = fmaf((float)dot * c->scales[n * nb + b], c->xs[r * nb + b], total);
            }
            for (int64_t b = 0; c->offsets && b < nb; b++)
                total = fmaf(c->sums[r * nb + b], c->offsets[b * c->N + n], total);
            c->y[r * c->N + n] = total;
        }
}

static void columns_portable(const Q4Call *c, int64_t n0, int64_t n1) {
    const int64_t nb = c->K / BLOCK;
    if (c->xq) {
        columns_portable_integer(c, n0, n1);
        return;
    }
    for (int64_t n = n0; n < n1; n++)
        for (int64_t r = 0; r < c->M; r++) {
            const float *x = c->a + r * c->K;
            float total = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                float dot = 0.0f;
                for (int i = 0; i < BLOCK; i++) dot += weight_at(c, n, b, i) * x[b * BLOCK + i];
                total += dot;
                if (c->offsets) total += c->offsets[b * c->N + n] * c->sums[r * nb + b];
            }
            c->y[r * c->N + n] = total;
        }
}

/* Scratch kept per thread and grown as needed: fresh buffers of this size (up to a few hundred
 * KB) come from mmap, and their page faults cost more than the work. One for a call's prepared
 * activations, one for a task's decoded weights (a call's thread runs tasks too). */
static __thread PkScratch call_scratch, task_scratch;

float *pk_scratch(PkScratch *s, size_t floats) {
    if (floats > s->capacity) {
        free(s->buffer);
        s->buffer = (float *)aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        s->capacity = s->buffer ? floats : 0;
    }
    return s->buffer;
}

#ifdef PK_X86
#define PK_TARGET __attribute__((target("avx512f,avx512bw,avx512dq"), always_inline)) static inline

/* A block's 32 weights as the op defines them: the elements at even k, then at odd k.
 * MatMulQ4: scales * (q - 8). The table holds q - 8 for q = 0..15 times the scale; vpermps
 * looks weights up by nibble, reading the low 4 bits of each index, so no mask is needed.
 * MatMulQ8: scales * (q - z), q = 16 * high nibble + low nibble, z likewise. */
PK_TARGET void decode_block(const Q4Call *c, int64_t n, int64_t b, __m512 *even, __m512 *odd) {
    const int64_t nb = c->K / BLOCK, at = n * nb + b;
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c->q + at * 16)));
    if (!c->q_low) {
        const __m512 steps = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
        __m512 table = _mm512_mul_ps(steps, _mm512_set1_ps(c->scales[at]));
        *even = _mm512_permutexvar_ps(v, table);
        *odd = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
        return;
    }
    const __m512i nibble = _mm512_set1_epi32(15), high = _mm512_set1_epi32(0xF0);
    __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c->q_low + at * 16)));
    __m512i z = _mm512_set1_epi32(block_zero(c, n, b));
    __m512 scale = _mm512_set1_ps(c->scales[at]);
    __m512i qe = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(v, nibble), 4), _mm512_and_si512(lo, nibble));
    __m512i qo = _mm512_or_si512(_mm512_and_si512(v, high), _mm512_srli_epi32(lo, 4));
    *even = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(qe, z)), scale);
    *odd = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(qo, z)), scale);
}

/* A decode step streams every weight from memory once, and the hardware prefetcher alone left
 * the FMAs waiting on it (smollm2 int4, greedy: 9.6-10.3 ms a token without this, 6.9-7.2 with
 * it, in the same hour). So while the columns [n, n + C) go through their blocks, block b
 * requests part b of the bytes of the columns AHEAD further on (columns are contiguous in B and
 * in the scales). Addresses are integers: past the last column they point beyond the arrays,
 * which a prefetch may do but pointer arithmetic may not. */
#define AHEAD 16
PK_TARGET void prefetch_part(uintptr_t base, int64_t from, int64_t to) {  /* the lines starting in it */
    const uintptr_t end = base + (uintptr_t)to;
    for (uintptr_t at = (base + (uintptr_t)from + 63) & ~(uintptr_t)63; at < end; at += 64)
        _mm_prefetch((const char *)at, _MM_HINT_T0);
}
PK_TARGET void prefetch_ahead(const Q4Call *c, int64_t n, const int C, int64_t b) {
    const int64_t nb = c->K / BLOCK, at = (n + AHEAD) * nb;
    prefetch_part((uintptr_t)c->q + at * 16, b * C * 16, (b + 1) * C * 16);
    if (c->q_low) prefetch_part((uintptr_t)c->q_low + at * 16, b * C * 16, (b + 1) * C * 16);
    prefetch_part((uintptr_t)c->scales + at * 4, b * C * 4, (b + 1) * C * 4);
}

/* y[r0 + r, n + j] = the sum of acc[j][r]'s lanes, for both tiles below: one reduction, so a
 * row's sums are the same on either path. */
PK_TARGET void store_sums(const Q4Call *c, __m512 acc[4][5], int64_t n, int64_t r0, const int R, const int C) {
    for (int j = 0; j < C; j++)
        for (int r = 0; r < R; r++) c->y[(r0 + r) * c->N + n + j] = _mm512_reduce_add_ps(acc[j][r]);
}

/* y[r0 .. r0+R, n .. n+C] without the offsets, each column's weights decoded here, once for
 * all R rows; the C columns share each load of a row's activations. */
PK_TARGET void tile_avx512(const Q4Call *c, int64_t n, int64_t r0, const int R, const int C) {
    const int64_t nb = c->K / BLOCK;
    __m512 acc[4][5];
    for (int j = 0; j < C; j++)
        for (int r = 0; r < R; r++) acc[j][r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 even[4], odd[4];
        prefetch_ahead(c, n, C, b);
        for (int j = 0; j < C; j++) decode_block(c, n + j, b, &even[j], &odd[j]);
        for (int r = 0; r < R; r++) {
            const float *s = c->split + ((r0 + r) * nb + b) * 32;
            __m512 xe = _mm512_loadu_ps(s), xo = _mm512_loadu_ps(s + 16);
            for (int j = 0; j < C; j++) acc[j][r] = _mm512_fmadd_ps(odd[j], xo, _mm512_fmadd_ps(even[j], xe, acc[j][r]));
        }
    }
    store_sums(c, acc, n, r0, R, C);
}

/* The same from weights decoded beforehand into `decoded` (columns from n0, [nb][32] each):
 * each block's activations for the R rows stay in registers while the C columns' weights go by. */
PK_TARGET void tile_decoded_avx512(const Q4Call *c, const float *decoded, int64_t n0, int64_t n, int64_t r0,
                                   const int R, const int C) {
    const int64_t nb = c->K / BLOCK;
    __m512 acc[4][5];
    for (int j = 0; j < C; j++)
        for (int r = 0; r < R; r++) acc[j][r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 xe[4], xo[4];
        for (int r = 0; r < R; r++) {
            const float *s = c->split + ((r0 + r) * nb + b) * 32;
            xe[r] = _mm512_loadu_ps(s), xo[r] = _mm512_loadu_ps(s + 16);
        }
        for (int j = 0; j < C; j++) {
            const float *w = decoded + ((n + j - n0) * nb + b) * 32;
            __m512 we = _mm512_loadu_ps(w), wo = _mm512_loadu_ps(w + 16);
            for (int r = 0; r < R; r++) acc[j][r] = _mm512_fmadd_ps(wo, xo[r], _mm512_fmadd_ps(we, xe[r], acc[j][r]));
        }
    }
    store_sums(c, acc, n, r0, R, C);
}

/* The tile for `rows` rows, the row count a constant in each call so that the accumulators
 * stay in registers. */
#define PK_DECODING(C)                                                    \
    switch (rows) {                                                       \
    case 1: tile_avx512(c, n, r0, 1, C); break;                           \
    case 2: tile_avx512(c, n, r0, 2, C); break;                           \
    case 3: tile_avx512(c, n, r0, 3, C); break;                           \
    case 4: tile_avx512(c, n, r0, 4, C); break;                           \
    default: tile_avx512(c, n, r0, 5, C); break;                          \
    }
#define PK_DECODED(C)                                                     \
    switch (rows) {                                                       \
    case 1: tile_decoded_avx512(c, decoded, n0, n, r0, 1, C); break;      \
    case 2: tile_decoded_avx512(c, decoded, n0, n, r0, 2, C); break;      \
    case 3: tile_decoded_avx512(c, decoded, n0, n, r0, 3, C); break;      \
    default: tile_decoded_avx512(c, decoded, n0, n, r0, 4, C); break;     \
    }

/* A prefill's rows (MatMulQ4 only): the task's 32 columns decoded once into a panel [K][32],
 * k by k, then each row a chain of FMAs over k with the columns in two vectors. A row's sums do
 * not depend on the other rows here either; they are summed in another order than a decode
 * step's, which is one row per sequence and always takes the path above. */
PK_TARGET void panel_tile(const Q4Call *c, const float *panel, int64_t n0, __mmask16 valid0, __mmask16 valid1,
                          int64_t r0, const int R) {
    __m512 acc[12][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const float *a = c->a + r0 * c->K;
    for (int64_t k = 0; k < c->K; k++) {
        __m512 w0 = _mm512_load_ps(panel + k * 32), w1 = _mm512_load_ps(panel + k * 32 + 16);
        for (int r = 0; r < R; r++) {
            __m512 x = _mm512_set1_ps(a[r * c->K + k]);
            acc[r][0] = _mm512_fmadd_ps(w0, x, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, x, acc[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_mask_storeu_ps(c->y + (r0 + r) * c->N + n0, valid0, acc[r][0]);
        _mm512_mask_storeu_ps(c->y + (r0 + r) * c->N + n0 + 16, valid1, acc[r][1]);
    }
}

__attribute__((target("avx512f,avx512bw,avx512dq"))) static int
panel_avx512(const Q4Call *c, int64_t n0, int64_t n1) {
    const int64_t nb = c->K / BLOCK;
    float *panel = pk_scratch(&task_scratch, (size_t)(c->K * 32));
    if (!panel) return 0;
    const int64_t cols = n1 - n0;
    const __mmask16 valid[2] = {(__mmask16)(cols >= 16 ? 0xFFFF : (1u << cols) - 1),
                                (__mmask16)(cols <= 16 ? 0 : (1u << (cols - 16)) - 1)};
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i column_bytes = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)(nb * 16)));
    const __m512i column_blocks = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)nb));
    const __m512i nibble = _mm512_set1_epi32(15);
    for (int h = 0; h < 2; h++) {
        const uint8_t *q = c->q + (n0 + 16 * h) * nb * 16;
        const float *scales = c->scales + (n0 + 16 * h) * nb;
        for (int64_t b = 0; b < nb; b++) {
            __m512 d = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid[h],
                                                _mm512_add_epi32(column_blocks, _mm512_set1_epi32((int)b)), scales, 4);
            __m512 shift = _mm512_mul_ps(d, _mm512_set1_ps(-8.0f));
            for (int w = 0; w < 4; w++) { /* 4 bytes of each column's block: 8 values of k */
                __m512i v = _mm512_mask_i32gather_epi32(
                    _mm512_setzero_si512(), valid[h], _mm512_add_epi32(column_bytes, _mm512_set1_epi32((int)(b * 16 + 4 * w))),
                    q, 1);
                for (int t = 0; t < 8; t++) { /* d * (q - 8) in one rounding, as decode_block's table gives it */
                    __m512 value = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 4 * t), nibble));
                    _mm512_store_ps(panel + (b * 32 + 8 * w + t) * 32 + 16 * h, _mm512_fmadd_ps(value, d, shift));
                }
            }
        }
    }
    const int64_t tiles = (c->M + 11) / 12;
    for (int64_t t = 0; t < tiles; t++) {
        int64_t r0 = c->M * t / tiles;
        switch ((int)(c->M * (t + 1) / tiles - r0)) {
        case 1: panel_tile(c, panel, n0, valid[0], valid[1], r0, 1); break;
        case 2: panel_tile(c, panel, n0, valid[0], valid[1], r0, 2); break;
        case 3: panel_tile(c, panel, n0, valid[0], valid[1], r0, 3); break;
        case 4: panel_tile(c, panel, n0, valid[0], valid[1], r0, 4); break;
        case 5: panel_tile(c, panel, n0, valid[0], valid[1], r0, 5); break;
        case 6: panel_tile(c, panel, n0, valid[0], valid[1], r0, 6); break;
        case 7: panel_tile(c, panel, n0, valid[0], valid[1], r0, 7); break;
        case 8: panel_tile(c, panel, n0, valid[0], valid[1], r0, 8); break;
        case 9: panel_tile(c, panel, n0, valid[0], valid[1], r0, 9); break;
        case 10: panel_tile(c, panel, n0, valid[0], valid[1], r0, 10); break;
        case 11: panel_tile(c, panel, n0, valid[0], valid[1], r0, 11); break;
        default: panel_tile(c, panel, n0, valid[0], valid[1], r0, 12); break;
        }
    }
    return 1;
}

/* ---- Integer activations on AVX-512 VNNI ---- */
#define PK_VNNI_TARGET "avx512f,avx512bw,avx512dq,avx512vnni"
#define PK_VNNI __attribute__((target(PK_VNNI_TARGET), always_inline)) static inline

/* Rows r0 .. r0+R of the 16 columns of group g, without the offsets. vpdpbusd multiplies 4 bytes
 * of weights (unsigned) by 4 bytes of activations (signed) and adds them in each of 16 lanes, so
 * a lane is a column and the 4 bytes 4 values of k (pack lays them out so). A block's integer sum
 * starts at minus the zero point times the sum of its activations. MatMulQ4 (wide = 0) packs two
 * values in a byte, MatMulQ8 (wide = 1) one. 16-bit activations (split = 1) are two int8 digits,
 * x = 128 high + low: two chains of vpdpbusd, the high one shifted by 7 bits. */
PK_VNNI void tile_integer(const Q4Call *c, int64_t g, int64_t r0, const int R, __mmask16 valid, const int wide,
                          const int split) {
    const int64_t nb = c->K / BLOCK, stride = wide ? 512 : 256;
    const uint8_t *w = c->packed + g * nb * stride;
    const float *d = c->packed_scales + g * nb * 16;
    const int32_t *z = c->packed_zeros ? c->packed_zeros + g * nb * 16 : NULL;
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_part((uintptr_t)w + nb * stride, b * stride, (b + 1) * stride); /* the next group's */
        prefetch_part((uintptr_t)d + nb * 64, b * 64, (b + 1) * 64);
        __m512i q[8];
        for (int v = 0; v < (wide ? 8 : 4); v++) {
            __m512i bytes = _mm512_load_si512((const void *)(w + b * stride + v * 64));
            if (wide) {
                q[v] = bytes;
            } else {
                q[2 * v] = _mm512_and_si512(bytes, nibble);
                q[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
            }
        }
        const __m512 scale = _mm512_load_ps(d + b * 16);
        const __m512i zero = wide ? _mm512_load_si512((const void *)(z + b * 16)) : _mm512_setzero_si512();
        for (int r = 0; r < R; r++) {
            const int64_t rb = (r0 + r) * nb + b;
            const int32_t *x = (const int32_t *)(c->xq + rb * BLOCK);
            __m512i dot = wide ? _mm512_mullo_epi32(zero, _mm512_set1_epi32(c->xz[rb]))
                               : _mm512_set1_epi32(8 * c->xz[rb]);
            if (split) {
                const int32_t *lo = (const int32_t *)(c->xlo + rb * BLOCK);
                __m512i high = _mm512_setzero_si512();
                for (int t = 0; t < 8; t++) high = _mm512_dpbusd_epi32(high, q[t], _mm512_set1_epi32(x[t]));
                for (int t = 0; t < 8; t++) dot = _mm512_dpbusd_epi32(dot, q[t], _mm512_set1_epi32(lo[t]));
                dot = _mm512_add_epi32(dot, _mm512_slli_epi32(high, 7));
            } else {
                for (int t = 0; t < 8; t++) dot = _mm512_dpbusd_epi32(dot, q[t], _mm512_set1_epi32(x[t]));
            }
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), scale), _mm512_set1_ps(c->xs[rb]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(c->y + (r0 + r) * c->N + g * 16, valid, acc[r]);
}

#define PK_INTEGER_TILE(WIDE, SPLIT)                                      \
    switch ((int)(c->M * (t + 1) / tiles - r0)) {                         \
    case 1: tile_integer(c, g, r0, 1, valid, WIDE, SPLIT); break;         \
    case 2: tile_integer(c, g, r0, 2, valid, WIDE, SPLIT); break;         \
    case 3: tile_integer(c, g, r0, 3, valid, WIDE, SPLIT); break;         \
    case 4: tile_integer(c, g, r0, 4, valid, WIDE, SPLIT); break;         \
    case 5: tile_integer(c, g, r0, 5, valid, WIDE, SPLIT); break;         \
    case 6: tile_integer(c, g, r0, 6, valid, WIDE, SPLIT); break;         \
    case 7: tile_integer(c, g, r0, 7, valid, WIDE, SPLIT); break;         \
    default: tile_integer(c, g, r0, 8, valid, WIDE, SPLIT); break;        \
    }

/* The columns [n0, n1) of every row, in tiles of up to 8 rows: each row's result does not depend
 * on the others (nor on the tile it falls in), decode step or prefill alike. */
__attribute__((target(PK_VNNI_TARGET), noinline)) static void columns_integer(const Q4Call *c, int64_t n0, int64_t n1) {
    const int64_t tiles = (c->M + 7) / 8;
    for (int64_t g = n0 / 16; g * 16 < n1; g++) {
        const int64_t cols = n1 - g * 16;
        const __mmask16 valid = (__mmask16)(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
        for (int64_t t = 0; t < tiles; t++) {
            int64_t r0 = c->M * t / tiles;
            if (c->xlo) {
                if (c->q_low) PK_INTEGER_TILE(1, 1) else PK_INTEGER_TILE(0, 1)
            } else {
                if (c->q_low) PK_INTEGER_TILE(1, 0) else PK_INTEGER_TILE(0, 0)
            }
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512dq"))) static void
columns_avx512(const Q4Call *c, int64_t n0, int64_t n1) {
    const int64_t nb = c->K / BLOCK;
    if (c->offsets) /* read after the tiles, 64 bytes from each of nb rows of [nb, N] */
        for (int64_t b = 0; b < nb; b++) prefetch_part((uintptr_t)(c->offsets + b * c->N), n0 * 4, n1 * 4);
    if (c->packed) {
        columns_integer(c, n0, n1);
        goto offsets;
    }
    if (c->positions && !c->q_low && panel_avx512(c, n0, n1)) goto offsets;
    /* Up to 5 rows, each tile decodes its weights in registers; more rows, the columns' weights
     * are decoded once into a buffer that every row tile reads. */
    float *decoded = NULL;
    if (c->M > 5 && (decoded = pk_scratch(&task_scratch, (size_t)((n1 - n0) * c->K)))) {
        for (int64_t n = n0; n < n1; n++)
            for (int64_t b = 0; b < nb; b++) {
                __m512 even, odd;
                prefetch_ahead(c, n, 1, b);
                decode_block(c, n, b, &even, &odd);
                float *w = decoded + ((n - n0) * nb + b) * 32;
                _mm512_storeu_ps(w, even), _mm512_storeu_ps(w + 16, odd);
            }
    }
    const int most = decoded ? 4 : 5;
    const int64_t tiles = (c->M + most - 1) / most; /* row tiles as even as can be */
    for (int64_t t = 0; t < tiles; t++) {
        int64_t r0 = c->M * t / tiles;
        int rows = (int)(c->M * (t + 1) / tiles - r0);
        int64_t n = n0;
        if (decoded) {
            for (; n + 4 <= n1; n += 4) PK_DECODED(4)
            for (; n < n1; n++) PK_DECODED(1)
        } else {
            for (; n + 4 <= n1; n += 4) PK_DECODING(4)
            for (; n < n1; n++) PK_DECODING(1)
        }
    }
offsets:
    /* The offsets, with the columns in the vector: y[r, n0:n1] += sums[r, :] @ offsets[:, n0:n1]. */
    for (int64_t r = 0; c->offsets && r < c->M; r++) {
        int64_t n = n0;
        for (; n + 16 <= n1; n += 16) {
            __m512 y = _mm512_loadu_ps(c->y + r * c->N + n);
            for (int64_t b = 0; b < nb; b++)
                y = _mm512_fmadd_ps(_mm512_set1_ps(c->sums[r * nb + b]), _mm512_loadu_ps(c->offsets + b * c->N + n), y);
            _mm512_storeu_ps(c->y + r * c->N + n, y);
        }
        for (; n < n1; n++) {
            float y = c->y[r * c->N + n];
            for (int64_t b = 0; b < nb; b++) y += c->sums[r * nb + b] * c->offsets[b * c->N + n];
            c->y[r * c->N + n] = y;
        }
    }
}
#endif

static void column_task(void *data, size_t task) {
    const Q4Call *c = (const Q4Call *)data;
    int64_t n0 = (int64_t)task * COL_TASK, n1 = n0 + COL_TASK < c->N ? n0 + COL_TASK : c->N;
#ifdef PK_X86
    if (c->avx512 && (!c->xq || c->packed)) {
        columns_avx512(c, n0, n1);
        return;
    }
#endif
    columns_portable(c, n0, n1);
}

int pk_use_avx512(void) {
    static int chosen = -1;
    if (chosen < 0) {
        const char *forced = getenv("PREFIXKIT_KERNEL_PORTABLE");
        chosen = 0;
#ifdef PK_X86
        __builtin_cpu_init();
        chosen = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512dq") && !(forced && *forced && strcmp(forced, "0"));
#endif
    }
    return chosen;
}

static OrtStatus *data(const OrtApi *api, const OrtValue *value, const void **out) {
    void *p;
    OrtStatus *status = PK_CALL(api, GetTensorMutableData)((OrtValue *)value, &p);
    *out = p;
    return status;
}

int pk_use_vnni(void) {
    static int chosen = -1;
    if (chosen < 0) {
        chosen = 0;
#ifdef PK_X86
        chosen = pk_use_avx512() && __builtin_cpu_supports("avx512vnni");
#endif
    }
    return chosen;
}

/* The weights as tile_integer reads them: per group of 16 columns and block, 64-byte vectors in which
 * lane c holds 4 values of k of column 16g + c. MatMulQ8: vector t holds k = 4t .. 4t+3, a byte
 * each. MatMulQ4: vector v holds k = 8v .. 8v+3 in the low nibbles and 8v+4 .. 8v+7 in the high
 * ones. Columns past N are zero (weights, scales and zero points). */
static int pack(Q4Kernel *k, const Q4Call *c) {
    const int64_t nb = k->K / BLOCK, groups = (k->N + 15) / 16, stride = k->bits == 8 ? 512 : 256;
    k->packed = (uint8_t *)aligned_alloc(64, (size_t)(groups * nb * stride));
    k->packed_scales = (float *)aligned_alloc(64, (size_t)(groups * nb * 64));
    if (k->bits == 8) k->packed_zeros = (int32_t *)aligned_alloc(64, (size_t)(groups * nb * 64));
    if (!k->packed || !k->packed_scales || (k->bits == 8 && !k->packed_zeros)) return 0;
    memset(k->packed, 0, (size_t)(groups * nb * stride));
    memset(k->packed_scales, 0, (size_t)(groups * nb * 64));
    if (k->packed_zeros) memset(k->packed_zeros, 0, (size_t)(groups * nb * 64));
    for (int64_t n = 0; n < k->N; n++)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t g = n / 16, lane = n % 16, at = (g * nb + b) * 16 + lane;
            uint8_t *out = k->packed + (g * nb + b) * stride + lane * 4;
            /* The block's 16 bytes hold k = 2j in the low nibble of byte j and 2j + 1 in the high
             * one (block_q); MatMulQ8's low nibbles likewise in q_low. */
            const uint8_t *high = c->q + (n * nb + b) * 16, *low = c->q_low ? c->q_low + (n * nb + b) * 16 : NULL;
            if (k->bits == 8) {
                for (int i = 0; i < BLOCK; i += 2) {
                    const uint8_t h = high[i / 2], l = low[i / 2];
                    out[(i / 4) * 64 + i % 4] = (uint8_t)(((h & 15) << 4) | (l & 15));
                    out[(i / 4) * 64 + i % 4 + 1] = (uint8_t)((h & 0xF0) | (l >> 4));
                }
            } else {
                for (int v = 0; v < 4; v++) /* k = 8v .. 8v+3 low, 8v+4 .. 8v+7 high: bytes 4v, 4v+1 and 4v+2, 4v+3 */
                    for (int t = 0; t < 4; t += 2) {
                        const uint8_t a = high[4 * v + t / 2], d = high[4 * v + 2 + t / 2];
                        out[v * 64 + t] = (uint8_t)((a & 15) | ((d & 15) << 4));
                        out[v * 64 + t + 1] = (uint8_t)((a >> 4) | (d & 0xF0));
                    }
            }
            k->packed_scales[at] = c->scales[n * nb + b];
            if (k->packed_zeros) k->packed_zeros[at] = block_zero(c, n, b);
        }
    return 1;
}

/* For integer activations on VNNI: the weights packed once, from the node's constant inputs. Where
 * they are not constant, or the CPU has no VNNI, the portable loop computes the same numbers. */
static OrtStatus *prepare_integer(Q4Kernel *k, const OrtApi *api, const OrtKernelInfo *info) {
    if (!pk_use_vnni()) return NULL;
    /* The inputs pack reads: MatMulQ4's B and scales; MatMulQ8's B_high, zero_high, B_low, scales and
     * zero_low (compute() below names them all). */
    static const size_t q4_weights[] = {1, 2}, q8_weights[] = {1, 3, 4, 5, 6};
    const size_t *weights = k->bits == 8 ? q8_weights : q4_weights, count = k->bits == 8 ? 5 : 2;
    const void *p[7] = {0};
    for (size_t i = 0; i < count; i++) {
        const OrtValue *value;
        int constant = 0;
        OrtStatus *status = PK_CALL(api, KernelInfoGetConstantInput_tensor)(info, weights[i], &constant, &value);
        if (status || !constant) return status;
        if ((status = data(api, value, &p[weights[i]]))) return status;
    }
    Q4Call c = {0};
    c.K = k->K, c.N = k->N, c.q = (const uint8_t *)p[1];
    if (k->bits == 4) {
        c.scales = (const float *)p[2];
    } else {
        c.zero_high = (const uint8_t *)p[3], c.q_low = (const uint8_t *)p[4];
        c.scales = (const float *)p[5], c.zero_low = (const uint8_t *)p[6];
    }
    if (!pack(k, &c)) return PK_CALL(api, CreateStatus)(PK_ORT_FAIL, "prefixkit: out of memory");
    return NULL;
}

/* ---- The custom operator ---- */

OrtStatus *pk_fail(const OrtApi *api, const char *message) {
    return PK_CALL(api, CreateStatus)(PK_ORT_INVALID_ARGUMENT, message);
}

OrtStatus *pk_tensor_shape(const OrtApi *api, const OrtValue *value, int64_t *dims, size_t room, size_t *count) {
    OrtTensorTypeAndShapeInfo *info;
    OrtStatus *status = PK_CALL(api, GetTensorTypeAndShape)(value, &info);
    if (status) return status;
    status = PK_CALL(api, GetDimensionsCount)(info, count);
    if (!status && *count > room) status = pk_fail(api, "prefixkit: an input has more dimensions than its operator takes");
    if (!status) status = PK_CALL(api, GetDimensions)(info, dims, *count);
    PK_CALL(api, ReleaseTensorTypeAndShapeInfo)(info);
    return status;
}

static void destroy(void *kernel) {
    Q4Kernel *k = (Q4Kernel *)kernel;
    free(k->packed), free(k->packed_scales), free(k->packed_zeros), free(k);
}

static OrtStatus *create(const OrtApi *api, const OrtKernelInfo *info, void **kernel, int bits) {
    Q4Kernel *k = (Q4Kernel *)calloc(1, sizeof(Q4Kernel));
    if (!k) return PK_CALL(api, CreateStatus)(PK_ORT_FAIL, "prefixkit: out of memory");
    k->api = api, k->bits = bits;
    OrtStatus *status = PK_CALL(api, KernelInfoGetAttribute_int64)(info, "K", &k->K);
    if (!status) status = PK_CALL(api, KernelInfoGetAttribute_int64)(info, "N", &k->N);
    if (!status && (k->K <= 0 || k->K % BLOCK || k->N <= 0))
        status = pk_fail(api, "prefixkit.MatMulQ4/Q8: K must be a positive multiple of 32 and N positive");
    if (!status) { /* activations: 8 or 16, or absent (fp32) */
        int64_t activations = 32;
        OrtStatus *absent = PK_CALL(api, KernelInfoGetAttribute_int64)(info, "activations", &activations);
        if (absent) PK_CALL(api, ReleaseStatus)(absent), activations = 32;
        if (activations != 8 && activations != 16 && activations != 32)
            status = pk_fail(api, "prefixkit.MatMulQ4/Q8: activations must be 8, 16 or 32");
        k->activations = (int)activations;
        if (!status && activations != 32) status = prepare_integer(k, api, info);
    }
    if (status) {
        destroy(k);
        return status;
    }
    *kernel = k;
    return NULL;
}

/* v rounded to the nearest integer, ties to even, as rintf in the default rounding mode, for
 * |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits. Inline, where lrintf and fmaxf were
 * libm calls for every activation of every call. */
static inline int32_t round_even(float v) { return (int32_t)((v + 12582912.0f) - 12582912.0f); }

/* A block's 32 activations as integers x = round(a * levels / max|a|), ties to even: the int8
 * values xq (8 bits, levels 127) or the digits x = 128 xq + xlo (16 bits, levels 16256 = 127 *
 * 128); *scale = max|a| / levels (a = scale * x) and *minus_sum = -(sum of x). */
static void round_block(const float *a, float levels, int two_digits, int8_t *xq, int8_t *xlo, float *scale,
                        int32_t *minus_sum) {
    float most = 0.0f;
    for (int i = 0; i < BLOCK; i++) most = fabsf(a[i]) > most ? fabsf(a[i]) : most;
    const float inverse = most > 0.0f ? levels / most : 0.0f;
    int32_t total = 0;
    for (int i = 0; i < BLOCK; i++) {
        const int32_t x = round_even(a[i] * inverse), high = (x + 64) >> 7;
        if (two_digits) xq[i] = (int8_t)high, xlo[i] = (int8_t)(x - 128 * high);
        else xq[i] = (int8_t)x;
        total += x;
    }
    *scale = most / levels, *minus_sum = -total;
}

/* MatMulQ4(A, B, scales, block_sum, offsets); MatMulQ8(A, B_high, scales_high, zero_high,
 * B_low, scales, zero_low). Inputs are checked by ONNX Runtime against the types declared
 * below; shapes follow from K and N, as in the exporter. */
static OrtStatus *compute(void *kernel, OrtKernelContext *context) {
    Q4Kernel *k = (Q4Kernel *)kernel;
    const OrtApi *api = k->api;
    const size_t n_inputs = k->bits == 4 ? 5 : 7;
    const OrtValue *inputs[7];
    OrtStatus *status;
    for (size_t i = 0; i < n_inputs; i++)
        if ((status = PK_CALL(api, KernelContext_GetInput)(context, i, &inputs[i]))) return status;
    int64_t dims[8];
    size_t count;
    if ((status = pk_tensor_shape(api, inputs[0], dims, 8, &count))) return status;
    if (count < 1 || dims[count - 1] != k->K) return pk_fail(api, "prefixkit.MatMulQ4/Q8: A's last dimension is not K");
    int64_t M = 1;
    for (size_t i = 0; i + 1 < count; i++) M *= dims[i];
    const int positions = count >= 3 && dims[count - 2] > 1;
    dims[count - 1] = k->N;
    OrtValue *out;
    if ((status = PK_CALL(api, KernelContext_GetOutput)(context, 0, dims, count, &out))) return status;

    Q4Call c = {0};
    const void *p[7];
    for (size_t i = 0; i < n_inputs; i++)
        if ((status = data(api, inputs[i], &p[i]))) return status;
    c.M = M, c.K = k->K, c.N = k->N, c.avx512 = pk_use_avx512(), c.positions = positions;
    c.a = (const float *)p[0], c.q = (const uint8_t *)p[1];
    if (k->bits == 4) {
        c.scales = (const float *)p[2], c.offsets = (const float *)p[4];
    } else {
        c.zero_high = (const uint8_t *)p[3], c.q_low = (const uint8_t *)p[4];
        c.scales = (const float *)p[5], c.zero_low = (const uint8_t *)p[6];
    }
    void *y;
    if ((status = PK_CALL(api, GetTensorMutableData)(out, &y))) return status;
    c.y = (float *)y;
    if (M == 0) return NULL;

    /* Per row and block, in the call's scratch: the block's sum, and the activations split by
     * parity of k (fp32 activations) or rounded to integers (round_block). */
    const int64_t nb = k->K / BLOCK, blocks = M * nb;
    const int integer = k->activations != 32;
    float *scratch = pk_scratch(&call_scratch, (size_t)(blocks * (integer ? 3 + 2 * BLOCK / 4 : 32 + 1)));
    if (!scratch) return PK_CALL(api, CreateStatus)(PK_ORT_FAIL, "prefixkit: out of memory");
    float *split = NULL, *sums = scratch, *xs = NULL;
    int32_t *xz = NULL;
    int8_t *xq = NULL, *xlo = NULL;
    if (integer) { /* per block: the sum, the scale, minus the integers' sum, int8 digits [32], low digits [32] */
        xs = sums + blocks, xz = (int32_t *)(xs + blocks), xq = (int8_t *)(xz + blocks), xlo = xq + blocks * BLOCK;
    } else { /* per block: the activations split [32], then the sums */
        split = scratch, sums = scratch + blocks * 32;
    }
    const float levels = k->activations == 16 ? 16256.0f : 127.0f;
    for (int64_t rb = 0; rb < blocks; rb++) {
        const float *x = c.a + rb * BLOCK;
        float *s = split ? split + rb * 32 : NULL, total = 0.0f;
        for (int j = 0; j < 16; j++) {
            if (s) s[j] = x[2 * j], s[16 + j] = x[2 * j + 1];
            total += x[2 * j] + x[2 * j + 1];
        }
        sums[rb] = total;
        if (integer)
            round_block(x, levels, k->activations == 16, xq + rb * BLOCK, xlo + rb * BLOCK, &xs[rb], &xz[rb]);
    }
    if (integer) {
        c.xq = xq, c.xlo = k->activations == 16 ? xlo : NULL, c.xs = xs, c.xz = xz;
        c.packed = k->packed, c.packed_scales = k->packed_scales, c.packed_zeros = k->packed_zeros;
    }
    c.split = split, c.sums = sums;
    size_t tasks = (size_t)((k->N + COL_TASK - 1) / COL_TASK);
    status = PK_CALL(api, KernelContext_ParallelFor)(context, column_task, tasks, 0, &c);
    return status;
}

static OrtStatus *q4_create(const PkCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op;
    return create(api, info, kernel, 4);
}
static OrtStatus *q8_create(const PkCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op;
    return create(api, info, kernel, 8);
}
static const char *q4_name(const PkCustomOp *op) { (void)op; return "MatMulQ4"; }
static const char *q8_name(const PkCustomOp *op) { (void)op; return "MatMulQ8"; }
static const char *cpu_provider(const PkCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int q4_input_type(const PkCustomOp *op, size_t i) { (void)op; return i == 1 ? PK_TENSOR_UINT8 : PK_TENSOR_FLOAT; }
static int q8_input_type(const PkCustomOp *op, size_t i) {
    (void)op;
    return i == 2 || i == 5 || i == 0 ? PK_TENSOR_FLOAT : PK_TENSOR_UINT8;
}
static size_t q4_inputs(const PkCustomOp *op) { (void)op; return 5; }
static size_t q8_inputs(const PkCustomOp *op) { (void)op; return 7; }
static int float_type(const PkCustomOp *op, size_t i) { (void)op; (void)i; return PK_TENSOR_FLOAT; }
static size_t one(const PkCustomOp *op) { (void)op; return 1; }
static int required(const PkCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int zero(const PkCustomOp *op) { (void)op; return 0; }

#define PK_OP(NAME, CREATE, INPUT_TYPE, INPUTS)                                                     \
    {                                                                                               \
        .version = PK_CUSTOM_OP_VERSION, .GetName = NAME, .GetExecutionProviderType = cpu_provider, \
        .GetInputType = INPUT_TYPE, .GetInputTypeCount = INPUTS, .GetOutputType = float_type,       \
        .GetOutputTypeCount = one, .KernelDestroy = destroy, .GetInputCharacteristic = required,    \
        .GetOutputCharacteristic = required, .GetInputMemoryType = required,                        \
        .GetVariadicInputMinArity = zero, .GetVariadicInputHomogeneity = zero,                      \
        .GetVariadicOutputMinArity = zero, .GetVariadicOutputHomogeneity = zero,                    \
        .CreateKernelV2 = CREATE, .KernelComputeV2 = compute,                                       \
    }

static const PkCustomOp matmul_q4 = PK_OP(q4_name, q4_create, q4_input_type, q4_inputs);
static const PkCustomOp matmul_q8 = PK_OP(q8_name, q8_create, q8_input_type, q8_inputs);
extern const PkCustomOp pk_attention; /* attention.c */

/* Called by onnxruntime (SessionOptions.register_custom_ops_library). With an onnxruntime older
 * than API 17 nothing is registered, and the graph's nodes run their fallback bodies. */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    const OrtApi *api = base->GetApi(PK_ORT_API_VERSION);
    if (!api) return NULL;
    OrtCustomOpDomain *domain; /* kept for the life of the process, as sessions refer to it */
    OrtStatus *status = PK_CALL(api, CreateCustomOpDomain)("prefixkit", &domain);
    if (!status) status = PK_CALL(api, CustomOpDomain_Add)(domain, &matmul_q4);
    if (!status) status = PK_CALL(api, CustomOpDomain_Add)(domain, &matmul_q8);
    if (!status) status = PK_CALL(api, CustomOpDomain_Add)(domain, &pk_attention);
    if (!status) status = PK_CALL(api, AddCustomOpDomain)(options, domain);
    return status;
}
