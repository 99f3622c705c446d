// CUDA launcher of the fused LPWCA node. No TensorRT types: the plugin and the C ABI used by the
// GPU test both call this.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <limits>

#include "lpwca_params.h"

namespace ccra {
namespace lpwca {

// features: float or __half per `features_type`, [B, L, N, Dv]; query_weights [B, H+1, Dv] and
// query_bias [B, L, H] float; fused [B, N, Dv] in the features type; attention [B, L, N] float
// whatever the features (its mean 1/(L*N) is below FP16's smallest normal at llava-1.5-7b sizes).
// `workspace` must hold workspace_bytes(shape); `workspace_size` is checked against it, unless it is
// kWorkspaceSizedByCaller (TensorRT: the engine sized it from getWorkspaceSize for the profile's max
// shapes and does not pass the size to enqueue). Accumulation and softmax are FP32 throughout.
constexpr size_t kWorkspaceSizedByCaller = std::numeric_limits<size_t>::max();

cudaError_t launch_forward(DType features_type, const void* features, const float* query_weights,
                           const float* query_bias, void* fused, float* attention, const Shape& shape,
                           const Attributes& attributes, void* workspace, size_t workspace_size, cudaStream_t stream);

}  // namespace lpwca
}  // namespace ccra
