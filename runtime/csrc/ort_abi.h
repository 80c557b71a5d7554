/* The few parts of ONNX Runtime's C API that prefixkit's kernels use, declared here because
 * the onnxruntime wheel ships no headers.
 *
 * The C API is append-only: a function keeps its place in the OrtApi table in every later
 * release, so a function is called through its index. The indices are those of API version
 * 17 (onnxruntime 1.17), the first with KernelContext_ParallelFor, and hold for every
 * onnxruntime since. OrtCustomOp is laid out as its version 16 has it (CreateKernelV2 and
 * KernelComputeV2, which return a status); onnxruntime reads no field past that version.
 */
#ifndef PREFIXKIT_ORT_ABI_H
#define PREFIXKIT_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#define PK_ORT_API_VERSION 17
#define PK_CUSTOM_OP_VERSION 16

typedef struct OrtApi OrtApi; /* opaque here: a table of function pointers */
typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtSessionOptions OrtSessionOptions;

typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

enum { PK_ORT_FAIL = 1, PK_ORT_INVALID_ARGUMENT = 2 };                    /* OrtErrorCode */
enum { PK_TENSOR_FLOAT = 1, PK_TENSOR_UINT8 = 2, PK_TENSOR_INT32 = 6 }; /* ONNXTensorElementDataType */

/* Index of each function in the OrtApi table. */
enum {
    PK_CreateStatus = 0,
    PK_CreateCustomOpDomain = 26,
    PK_CustomOpDomain_Add = 27,
    PK_AddCustomOpDomain = 28,
    PK_GetTensorMutableData = 51,
    PK_GetTensorElementType = 60,
    PK_GetDimensionsCount = 61,
    PK_GetDimensions = 62,
    PK_GetTensorTypeAndShape = 65,
    PK_KernelInfoGetAttribute_float = 85,
    PK_KernelInfoGetAttribute_int64 = 86,
    PK_KernelContext_GetInputCount = 88,
    PK_KernelContext_GetInput = 90,
    PK_KernelContext_GetOutput = 91,
    PK_ReleaseStatus = 93,
    PK_ReleaseTensorTypeAndShapeInfo = 99,
    PK_KernelInfoGetConstantInput_tensor = 249,
    PK_KernelContext_ParallelFor = 274,
};

typedef OrtStatus *(*PkCreateStatus)(int code, const char *msg);
typedef OrtStatus *(*PkCreateCustomOpDomain)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*PkCustomOpDomain_Add)(OrtCustomOpDomain *domain, const void *op);
typedef OrtStatus *(*PkAddCustomOpDomain)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef OrtStatus *(*PkGetTensorMutableData)(OrtValue *value, void **out);
typedef OrtStatus *(*PkGetTensorElementType)(const OrtTensorTypeAndShapeInfo *info, int *out);
typedef OrtStatus *(*PkGetDimensionsCount)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*PkGetDimensions)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t n);
typedef OrtStatus *(*PkGetTensorTypeAndShape)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(*PkKernelInfoGetAttribute_float)(const OrtKernelInfo *info, const char *name, float *out);
typedef OrtStatus *(*PkKernelInfoGetAttribute_int64)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef OrtStatus *(*PkKernelContext_GetInputCount)(const OrtKernelContext *context, size_t *out);
typedef OrtStatus *(*PkKernelContext_GetInput)(const OrtKernelContext *context, size_t index, const OrtValue **out);
typedef OrtStatus *(*PkKernelContext_GetOutput)(OrtKernelContext *context, size_t index, const int64_t *dims,
                                                size_t n, OrtValue **out);
typedef void (*PkReleaseStatus)(OrtStatus *status);
typedef OrtStatus *(*PkKernelInfoGetConstantInput_tensor)(const OrtKernelInfo *info, size_t index, int *is_constant,
                                                          const OrtValue **out);
typedef void (*PkReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(*PkKernelContext_ParallelFor)(const OrtKernelContext *context, void (*fn)(void *, size_t),
                                                  size_t total, size_t num_batch, void *user_data);

/* PK_CALL(api, GetDimensions)(info, dims, n) */
#define PK_CALL(api, name) ((Pk##name)((void *const *)(api))[PK_##name])

/* OrtCustomOp, version 16. */
typedef struct PkCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct PkCustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(*GetName)(const struct PkCustomOp *op);
    const char *(*GetExecutionProviderType)(const struct PkCustomOp *op);
    int (*GetInputType)(const struct PkCustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct PkCustomOp *op);
    int (*GetOutputType)(const struct PkCustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct PkCustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct PkCustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct PkCustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct PkCustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct PkCustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct PkCustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct PkCustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct PkCustomOp *op);
    OrtStatus *(*CreateKernelV2)(const struct PkCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                 void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
} PkCustomOp;

/* prefixkit's own helpers, in blockq.c, shared by its kernels. */
int pk_use_avx512(void);                                   /* whether to take the AVX-512 paths */
int pk_use_vnni(void);                                     /* and AVX-512 VNNI's */
OrtStatus *pk_fail(const OrtApi *api, const char *message); /* an invalid-argument status */
OrtStatus *pk_tensor_shape(const OrtApi *api, const OrtValue *value, int64_t *dims, size_t room, size_t *count);
typedef struct {
    float *buffer;
    size_t capacity;
} PkScratch;
float *pk_scratch(PkScratch *s, size_t floats); /* s's buffer of at least `floats`, grown as needed; NULL if out of memory */

#endif
