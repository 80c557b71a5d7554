/* prefixkit.Attention: the attention of prefixkit's fused exports, for ONNX Runtime's CPU.
 *
 * prefixkit.Attention(qkv, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
 * sin_cache) -> (output, present_key, present_value), attributes num_heads, kv_num_heads and
 * scale, is com.microsoft.GroupQueryAttention as the exports use it: query, key and value packed
 * in one input [B, S, (H + 2 G) D], rotary embeddings (halves, not interleaved) at positions
 * past + s, causal, each row's past length seqlens_k[b] + 1 - S (0 in a first prompt, see
 * past_of), present [B, G, M, D] either a
 * buffer of its own or the past's own (then written in place). The export's function body is
 * that GroupQueryAttention node, which ONNX Runtime runs where this library is not registered.
 *
 * Why: at a decode step GroupQueryAttention makes two small GEMM calls per row and head, about
 * 1.7 us each pair, which at 5 rows is 15% of an int4 step and at 16 rows 20%. Here each row
 * and head is a few hundred vector instructions. A row's result does not depend on the other
 * rows (each row and head is computed alone), so a row in a batch equals the row alone.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ort_abi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PK_X86 1
#endif

typedef struct {
    const OrtApi *api;
    int64_t heads, kv_heads;
    float scale;
} AttentionKernel;

typedef struct {
    const float *qkv, *cos, *sin;
    float *key, *value, *out; /* present [B, G, M, D]; out [B, S, H D] */
    const int32_t *seqlens;
    int64_t S, H, G, D, M;
    float scale;
    int avx512, first_prompt;
} AttentionCall;

/* Row b's positions before this call's, as GroupQueryAttention reads its inputs: S > 1 new
 * tokens with S == total_sequence_length are a first prompt, no row with a past (the rows
 * right-padded; a padded position's output is not used); otherwise seqlens_k[b] + 1 - S. */
static int64_t past_of(const AttentionCall *c, int64_t b) {
    return c->first_prompt ? 0 : (int64_t)c->seqlens[b] + 1 - c->S;
}

/* The rotary embedding of one head's vector x at position p, as GroupQueryAttention applies
 * it with rotary_interleaved = 0: the halves (a, b) become (a cos - b sin, b cos + a sin). */
static void rotate(const AttentionCall *c, const float *x, int64_t p, float *y) {
    const int64_t half = c->D / 2;
    const float *cos = c->cos + p * half, *sin = c->sin + p * half;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        y[i] = a * cos[i] - b * sin[i];
        y[i + half] = b * cos[i] + a * sin[i];
    }
}

static __thread PkScratch scores_scratch; /* a task's scores, per thread */

/* Softmax of q . key[t] * scale over t < L, then the weighted sum of value[t], into y. */
static void attend_portable(const AttentionCall *c, const float *q, const float *key, const float *value,
                            int64_t L, float *scores, float *y) {
    float top = -INFINITY, total = 0.0f;
    for (int64_t t = 0; t < L; t++) {
        float dot = 0.0f;
        for (int64_t i = 0; i < c->D; i++) dot += q[i] * key[t * c->D + i];
        scores[t] = dot * c->scale;
        top = scores[t] > top ? scores[t] : top;
    }
    for (int64_t t = 0; t < L; t++) total += scores[t] = expf(scores[t] - top);
    for (int64_t i = 0; i < c->D; i++) y[i] = 0.0f;
    for (int64_t t = 0; t < L; t++)
        for (int64_t i = 0; i < c->D; i++) y[i] += scores[t] * value[t * c->D + i];
    for (int64_t i = 0; i < c->D; i++) y[i] /= total;
}

#ifdef PK_X86
#define PK_TARGET __attribute__((target("avx512f,avx512dq"))) static

/* e^x for x <= 0 (arguments below -87 give e^-87): x = n ln 2 + r, |r| <= ln 2 / 2, e^r by its
 * Taylor series to r^6 (truncation under 1.2e-7 relative), times 2^n by vscalefps. */
__attribute__((target("avx512f,avx512dq"), always_inline)) static inline __m512 exp_avx512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln 2, high bits */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-6f), r);      /* and the rest */
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The same for D a multiple of 16, up to 256. */
PK_TARGET void attend_avx512(const AttentionCall *c, const float *q, const float *key, const float *value,
                             int64_t L, float *scores, float *y) {
    const int V = (int)(c->D / 16);
    __m512 qv[16], acc[16];
    for (int v = 0; v < V; v++) qv[v] = _mm512_loadu_ps(q + 16 * v), acc[v] = _mm512_setzero_ps();
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < L; t++) {
        __m512 dot = _mm512_mul_ps(qv[0], _mm512_loadu_ps(key + t * c->D));
        for (int v = 1; v < V; v++) dot = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(key + t * c->D + 16 * v), dot);
        scores[t] = _mm512_reduce_add_ps(dot) * c->scale;
    }
    int64_t t = 0;
    for (; t + 16 <= L; t += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(scores + t));
    if (t < L) top = _mm512_mask_max_ps(top, (__mmask16)((1u << (L - t)) - 1), top, _mm512_loadu_ps(scores + t));
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sums = _mm512_setzero_ps();
    for (t = 0; t < L; t += 16) {
        const __mmask16 valid = (__mmask16)(L - t >= 16 ? 0xFFFF : (1u << (L - t)) - 1);
        __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, scores + t), shift));
        e = _mm512_maskz_mov_ps(valid, e);
        _mm512_mask_storeu_ps(scores + t, valid, e);
        sums = _mm512_add_ps(sums, e);
    }
    for (t = 0; t < L; t++) {
        const __m512 p = _mm512_set1_ps(scores[t]);
        for (int v = 0; v < V; v++) acc[v] = _mm512_fmadd_ps(p, _mm512_loadu_ps(value + t * c->D + 16 * v), acc[v]);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sums));
    for (int v = 0; v < V; v++) _mm512_storeu_ps(y + 16 * v, _mm512_mul_ps(acc[v], inverse));
}
#endif

/* Task b * H + h: head h of row b, every new position s attending to the row's first
 * past + s + 1 positions (the new keys and values are in place already). */
static void head_task(void *data, size_t task) {
    const AttentionCall *c = (const AttentionCall *)data;
    const int64_t b = (int64_t)task / c->H, h = (int64_t)task % c->H, g = h / (c->H / c->G);
    const int64_t past = past_of(c, b);
    float q[256];
    float *scores = pk_scratch(&scores_scratch, (size_t)(past + c->S));
    if (!scores) { /* out of memory in a pool thread, which cannot return a status: say so in NaNs */
        for (int64_t s = 0; s < c->S; s++)
            for (int64_t i = 0; i < c->D; i++) c->out[((b * c->S + s) * c->H + h) * c->D + i] = NAN;
        return;
    }
    const float *key = c->key + (b * c->G + g) * c->M * c->D, *value = c->value + (b * c->G + g) * c->M * c->D;
    for (int64_t s = 0; s < c->S; s++) {
        rotate(c, c->qkv + ((b * c->S + s) * (c->H + 2 * c->G) + h) * c->D, past + s, q);
        float *y = c->out + ((b * c->S + s) * c->H + h) * c->D;
#ifdef PK_X86
        if (c->avx512) {
            attend_avx512(c, q, key, value, past + s + 1, scores, y);
            continue;
        }
#endif
        attend_portable(c, q, key, value, past + s + 1, scores, y);
    }
}

static OrtStatus *compute(void *kernel, OrtKernelContext *context) {
    AttentionKernel *k = (AttentionKernel *)kernel;
    const OrtApi *api = k->api;
    const OrtValue *in[7];
    void *p[7];
    int64_t dims[7][4];
    size_t count[7];
    OrtStatus *status;
    for (size_t i = 0; i < 7; i++) {
        if ((status = PK_CALL(api, KernelContext_GetInput)(context, i, &in[i]))) return status;
        if ((status = pk_tensor_shape(api, in[i], dims[i], 4, &count[i]))) return status;
        if ((status = PK_CALL(api, GetTensorMutableData)((OrtValue *)in[i], &p[i]))) return status;
    }
    const int64_t H = k->heads, G = k->kv_heads;
    if (count[0] != 3 || count[1] != 4 || count[2] != 4 || count[3] != 1 || count[5] != 2 || count[6] != 2)
        return pk_fail(api, "prefixkit.Attention: inputs of unexpected rank");
    const int64_t B = dims[0][0], S = dims[0][1], D = dims[0][2] / (H + 2 * G), Mp = dims[1][2];
    if (D * (H + 2 * G) != dims[0][2] || D % 2 || D > 256 || dims[5][1] * 2 != D || dims[1][0] != B ||
        dims[1][1] != G || dims[1][3] != D || dims[3][0] != B || memcmp(dims[1], dims[2], sizeof dims[1]))
        return pk_fail(api, "prefixkit.Attention: input shapes do not agree");
    const int32_t total = *(const int32_t *)p[4];
    const int64_t M = Mp > total ? Mp : total;
    int64_t out_dims[3] = {B, S, H * D}, present_dims[4] = {B, G, M, D};
    OrtValue *out[3];
    if ((status = PK_CALL(api, KernelContext_GetOutput)(context, 0, out_dims, 3, &out[0]))) return status;
    for (size_t i = 1; i < 3; i++)
        if ((status = PK_CALL(api, KernelContext_GetOutput)(context, i, present_dims, 4, &out[i]))) return status;
    void *o[3];
    for (size_t i = 0; i < 3; i++)
        if ((status = PK_CALL(api, GetTensorMutableData)(out[i], &o[i]))) return status;

    AttentionCall c = {0};
    c.qkv = (const float *)p[0], c.cos = (const float *)p[5], c.sin = (const float *)p[6];
    c.out = (float *)o[0], c.key = (float *)o[1], c.value = (float *)o[2];
    c.S = S, c.H = H, c.G = G, c.D = D, c.M = M, c.scale = k->scale, c.avx512 = pk_use_avx512() && D % 16 == 0;
    c.seqlens = (const int32_t *)p[3], c.first_prompt = S > 1 && S == total;
    for (int64_t b = 0; b < B; b++) {
        const int64_t past = past_of(&c, b);
        if (past < 0 || past + S > M || past + S > dims[5][0])
            return pk_fail(api, "prefixkit.Attention: seqlens_k out of range for the cache or the rotary tables");
    }
    const float *past_key = (const float *)p[1], *past_value = (const float *)p[2];
    if (c.key != past_key) /* a present of its own: the past's positions, then zeros */
        for (int64_t bg = 0; bg < B * G; bg++) {
            const int64_t keep = past_of(&c, bg / G) * D;
            memcpy(c.key + bg * M * D, past_key + bg * Mp * D, (size_t)keep * sizeof(float));
            memcpy(c.value + bg * M * D, past_value + bg * Mp * D, (size_t)keep * sizeof(float));
            memset(c.key + bg * M * D + keep, 0, (size_t)(M * D - keep) * sizeof(float));
            memset(c.value + bg * M * D + keep, 0, (size_t)(M * D - keep) * sizeof(float));
        }
    for (int64_t b = 0; b < B; b++) /* the new positions' keys (rotated) and values */
        for (int64_t s = 0; s < S; s++)
            for (int64_t g = 0; g < G; g++) {
                const float *row = c.qkv + ((b * S + s) * (H + 2 * G) + H + g) * D;
                const int64_t at = ((b * G + g) * M + past_of(&c, b) + s) * D;
                rotate(&c, row, past_of(&c, b) + s, c.key + at);
                memcpy(c.value + at, row + G * D, (size_t)D * sizeof(float));
            }
    if (B * S == 0) return NULL;
    if (!pk_scratch(&scores_scratch, (size_t)M)) /* this thread's; a pool thread short of memory writes NaNs */
        return PK_CALL(api, CreateStatus)(PK_ORT_FAIL, "prefixkit: out of memory");
    return PK_CALL(api, KernelContext_ParallelFor)(context, head_task, (size_t)(B * H), 0, &c);
}

static OrtStatus *create(const PkCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op;
    AttentionKernel *k = (AttentionKernel *)calloc(1, sizeof(AttentionKernel));
    if (!k) return PK_CALL(api, CreateStatus)(PK_ORT_FAIL, "prefixkit: out of memory");
    OrtStatus *status;
    k->api = api;
    if ((status = PK_CALL(api, KernelInfoGetAttribute_int64)(info, "num_heads", &k->heads)) ||
        (status = PK_CALL(api, KernelInfoGetAttribute_int64)(info, "kv_num_heads", &k->kv_heads)) ||
        (status = PK_CALL(api, KernelInfoGetAttribute_float)(info, "scale", &k->scale))) {
        free(k);
        return status;
    }
    if (k->heads <= 0 || k->kv_heads <= 0 || k->heads % k->kv_heads || k->scale <= 0.0f) {
        free(k);
        return pk_fail(api, "prefixkit.Attention: num_heads must be a positive multiple of kv_num_heads, scale > 0");
    }
    *kernel = k;
    return NULL;
}

static void destroy(void *kernel) { free(kernel); }
static const char *name(const PkCustomOp *op) { (void)op; return "Attention"; }
static const char *cpu_provider(const PkCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int input_type(const PkCustomOp *op, size_t i) {
    (void)op;
    return i == 3 || i == 4 ? PK_TENSOR_INT32 : PK_TENSOR_FLOAT;
}
static size_t inputs(const PkCustomOp *op) { (void)op; return 7; }
static int float_type(const PkCustomOp *op, size_t i) { (void)op; (void)i; return PK_TENSOR_FLOAT; }
static size_t outputs(const PkCustomOp *op) { (void)op; return 3; }
static int required(const PkCustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int zero(const PkCustomOp *op) { (void)op; return 0; }

const PkCustomOp pk_attention = {
    .version = PK_CUSTOM_OP_VERSION, .GetName = name, .GetExecutionProviderType = cpu_provider,
    .GetInputType = input_type, .GetInputTypeCount = inputs, .GetOutputType = float_type,
    .GetOutputTypeCount = outputs, .KernelDestroy = destroy, .GetInputCharacteristic = required,
    .GetOutputCharacteristic = required, .GetInputMemoryType = required, .GetVariadicInputMinArity = zero,
    .GetVariadicInputHomogeneity = zero, .GetVariadicOutputMinArity = zero, .GetVariadicOutputHomogeneity = zero,
    .CreateKernelV2 = create, .KernelComputeV2 = compute,
};
