// C ABI over the CUDA launcher, for the GPU test and benchmark (ctypes over torch CUDA tensors). No TensorRT.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "lpwca_params.h"
#include "lpwca_kernel.h"

namespace ccra::lpwca::capi {

// What both entry points check before any launch: the attributes, the shapes from the raw dims and
// the features' type. False with the reason in `error` (the C ABI's one line).
static bool checked_call(int features_dtype, const long long* features_dims, const long long* weights_dims,
                  const long long* bias_dims, int num_heads, float epsilon, float head_scale, float layer_scale,
                  Attributes* attributes, Shape* shape, DType* type, char* error, size_t error_size) {
    auto fail = [&](const std::string& message) {
        if (error != nullptr && error_size > 0) std::snprintf(error, error_size, "%s", message.c_str());
        return false;
    };
    std::string why;
    *attributes = Attributes{num_heads, epsilon, head_scale, layer_scale};
    int64_t v[4], w[3], b[3];
    std::copy(features_dims, features_dims + 4, v);
    std::copy(weights_dims, weights_dims + 3, w);
    std::copy(bias_dims, bias_dims + 3, b);
    if (!validate_attributes(*attributes, &why) || !make_shape(v, 4, w, 3, b, 3, num_heads, shape, &why)) {
        return fail(why);
    }
    *type = features_dtype == 1 ? DType::kFloat16 : features_dtype == 0 ? DType::kFloat32 : DType::kOther;
    if (*type == DType::kOther) return fail("ccra::LPWCA: features must be float32 or float16");
    return true;
}

static int cuda_failure(const char* what, cudaError_t status, char* error, size_t error_size) {
    if (error != nullptr && error_size > 0) std::snprintf(error, error_size, "%s%s", what, cudaGetErrorString(status));
    return 1;
}

}  // namespace ccra::lpwca::capi

extern "C" {

// Device pointers in, device pointers out; runs on `stream` (0: legacy default) and synchronises.
// features_dtype: 0 float32, 1 float16 (features and fused); attention is float32 either way.
// Returns 0, or 1 with a one-line reason in `error`.
int ccra_lpwca_cuda_forward(int features_dtype, const void* features, const float* query_weights,
                            const float* query_bias, const long long* features_dims, const long long* weights_dims,
                            const long long* bias_dims, int num_heads, float epsilon, float head_scale,
                            float layer_scale, void* fused, void* attention, void* stream, char* error,
                            size_t error_size) {
    using namespace ccra::lpwca;
    Attributes attributes;
    Shape shape;
    DType type;
    if (!capi::checked_call(features_dtype, features_dims, weights_dims, bias_dims, num_heads, epsilon, head_scale,
                            layer_scale, &attributes, &shape, &type, error, error_size)) {
        return 1;
    }
    const size_t bytes = workspace_bytes(shape);
    void* workspace = nullptr;
    cudaError_t status = cudaMalloc(&workspace, bytes);
    if (status != cudaSuccess) return capi::cuda_failure("cudaMalloc: ", status, error, error_size);
    auto s = static_cast<cudaStream_t>(stream);
    status = launch_forward(type, features, query_weights, query_bias, fused, static_cast<float*>(attention), shape,
                            attributes, workspace, bytes, s);
    if (status == cudaSuccess) status = cudaStreamSynchronize(s);
    cudaFree(workspace);
    return status == cudaSuccess ? 0 : capi::cuda_failure("ccra::LPWCA CUDA: ", status, error, error_size);
}

// Bytes of scratch ccra_lpwca_cuda_enqueue needs for these features dims [B, L, N, Dv] and heads.
size_t ccra_lpwca_cuda_workspace_bytes(const long long* features_dims, int num_heads) {
    ccra::lpwca::Shape shape{features_dims[0], features_dims[1], features_dims[2], features_dims[3], num_heads};
    return ccra::lpwca::workspace_bytes(shape);
}

// As ccra_lpwca_cuda_forward, but as TensorRT's enqueue runs it: the caller's workspace (checked
// against its size), queued on `stream`, no allocation and no synchronisation (the benchmark times
// this with CUDA events).
int ccra_lpwca_cuda_enqueue(int features_dtype, const void* features, const float* query_weights,
                            const float* query_bias, const long long* features_dims, const long long* weights_dims,
                            const long long* bias_dims, int num_heads, float epsilon, float head_scale,
                            float layer_scale, void* fused, void* attention, void* workspace, size_t workspace_size,
                            void* stream, char* error, size_t error_size) {
    using namespace ccra::lpwca;
    Attributes attributes;
    Shape shape;
    DType type;
    if (!capi::checked_call(features_dtype, features_dims, weights_dims, bias_dims, num_heads, epsilon, head_scale,
                            layer_scale, &attributes, &shape, &type, error, error_size)) {
        return 1;
    }
    const cudaError_t status = launch_forward(type, features, query_weights, query_bias, fused,
                                              static_cast<float*>(attention), shape, attributes, workspace,
                                              workspace_size, static_cast<cudaStream_t>(stream));
    return status == cudaSuccess ? 0 : capi::cuda_failure("ccra::LPWCA CUDA: ", status, error, error_size);
}

}  // extern "C"
