// CUDA kernels of the fused LPWCA node (CCRA stages 2 and 3, folded form; see lpwca_math.h).
//
// V is read twice, and nothing [B, L, N, Dv]-sized is written:
//   1. scores_kernel     one warp per (layer, patch): LayerNorm moments + H+1 dot products
//                        -> head scores [B,H,L*N] and layer dots [B,L*N]          (pass 1 over V)
//                        (scores_staged_kernel: the folded weights in shared memory, 64 positions a
//                        block, half2/float4 feature reads; the direct kernel is the fallback)
//   2. softmax_stats     one block per (image, head): max and 1/sum of the joint softmax
//   3. layer_weights     one thread per patch: A (written out, FP32 whatever the features: its mean
//                        1/(L*N) is below FP16's smallest normal), G = L*N*A, softmax over layers
//                        -> coefficients alpha*G [B,L*N]
//   4. reduce_layers     one block per patch: F = sum_l coef * V                   (pass 2 over V)
// The joint softmax spans all L*N positions of an image, so its scores must be stored before
// they are normalised: that [B,H,L*N] FP32 buffer is the only large scratch (workspace_bytes).
#include <cuda_fp16.h>

#include <atomic>
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "lpwca_math.h"
#include "lpwca_kernel.h"

namespace ccra {
namespace lpwca {
namespace kernels {  // named, not anonymous: nvcc 13 + `using namespace nvinfer1` elsewhere

constexpr int kWarpSize = 32;
constexpr int kScoreWarpsPerBlock = 8;
constexpr int kPositionsPerBlock = 64;  // staged weights are read once per this many positions
constexpr int kReduceThreads = 256;
constexpr int kLayerThreads = 128;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
}

__device__ __forceinline__ Moments warp_moments(Moments m) {
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        Moments other{__shfl_xor_sync(kFullMask, m.count, offset), __shfl_xor_sync(kFullMask, m.mean, offset),
                      __shfl_xor_sync(kFullMask, m.m2, offset)};
        m = moments_merge(m, other);
    }
    return m;
}

// Block-wide reduction of one float (max or sum), result broadcast to every thread.
template <bool kMax>
__device__ float block_reduce(float v, float* shared) {
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(kFullMask, v, offset);
        v = kMax ? fmaxf(v, other) : v + other;
    }
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
    v = threadIdx.x < warps ? shared[threadIdx.x] : (kMax ? -FLT_MAX : 0.0f);
    if (warp == 0) {
        for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
            const float other = __shfl_xor_sync(kFullMask, v, offset);
            v = kMax ? fmaxf(v, other) : v + other;
        }
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    v = shared[0];
    __syncthreads();
    return v;
}

// sum_d w_h[d] per (image, head): the LayerNorm mean's coefficient in every head score.
__global__ void weight_sums_kernel(const float* __restrict__ weights, float* __restrict__ sums, Shape s) {
    __shared__ float shared[kWarpSize];
    const int head = blockIdx.x, image = blockIdx.y;
    const float* w = weights + (static_cast<int64_t>(image) * (s.heads + 1) + head) * s.width;
    float acc = 0.0f;
    for (int64_t d = threadIdx.x; d < s.width; d += blockDim.x) acc += w[d];
    acc = block_reduce<false>(acc, shared);
    if (threadIdx.x == 0) sums[image * s.heads + head] = acc;
}

// Reduce one position's per-lane moments and dot products over the warp; lane 0 writes its H head
// scores and the layer dot product.
__device__ __forceinline__ void write_scores(Moments m, float (&dots)[kMaxHeads + 1], int64_t p, int image, int lane,
                                             const float* __restrict__ bias, const float* __restrict__ weight_sums,
                                             float* __restrict__ scores, float* __restrict__ dot_z, const Shape& s,
                                             const Attributes& a) {
    const int64_t positions = s.layers * s.patches;
    m = warp_moments(m);
#pragma unroll
    for (int h = 0; h <= kMaxHeads; ++h) {
        if (h <= s.heads) dots[h] = warp_sum(dots[h]);
    }
    if (lane != 0) return;
    const float rstd = inverse_std(m, a.epsilon);
    const int64_t layer = p / s.patches;
#pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
        if (h < s.heads) {
            scores[(static_cast<int64_t>(image) * s.heads + h) * positions + p] =
                head_score(dots[h], m.mean, rstd, weight_sums[image * s.heads + h],
                           bias[(image * s.layers + layer) * s.heads + h], a.head_scale);
        }
    }
#pragma unroll
    for (int h = 0; h <= kMaxHeads; ++h) {
        if (h == s.heads) dot_z[image * positions + p] = dots[h];
    }
}

// Vector loads: 2 halves (half2) or 4 floats (float4) per lane and step, weights likewise from
// shared memory (float2 / float4: conflict-free, lanes read consecutive 8 or 16 bytes).
template <typename T>
struct Vector;
template <>
struct Vector<__half> {
    static constexpr int kWidth = 2;
    __device__ static void load(const __half* p, float* x) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(p));
        x[0] = f.x, x[1] = f.y;
    }
    __device__ static void load_weights(const float* p, float* w) {
        const float2 f = *reinterpret_cast<const float2*>(p);
        w[0] = f.x, w[1] = f.y;
    }
};
template <>
struct Vector<float> {
    static constexpr int kWidth = 4;
    __device__ static void load(const float* p, float* x) {
        const float4 f = *reinterpret_cast<const float4*>(p);
        x[0] = f.x, x[1] = f.y, x[2] = f.z, x[3] = f.w;
    }
    __device__ static void load_weights(const float* p, float* w) { load(p, w); }
};

// The scores pass with the image's (H+1) x Dv folded weights staged once per block in shared
// memory (they were re-read from global memory for every position: ~36 KB of weights per 2 KB of
// FP16 features at llava-1.5-7b sizes), each block scoring kPositionsPerBlock positions, and
// features read as half2 / float4 when the width allows (kVector).
template <typename T, bool kVector>
__global__ void scores_staged_kernel(const T* __restrict__ features, const float* __restrict__ weights,
                                     const float* __restrict__ bias, const float* __restrict__ weight_sums,
                                     float* __restrict__ scores, float* __restrict__ dot_z, Shape s, Attributes a) {
    extern __shared__ float staged[];
    const int image = blockIdx.y, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int64_t positions = s.layers * s.patches;
    const int64_t staged_floats = static_cast<int64_t>(s.heads + 1) * s.width;
    const float* w = weights + static_cast<int64_t>(image) * staged_floats;
    for (int64_t i = threadIdx.x; i < staged_floats; i += blockDim.x) staged[i] = w[i];
    __syncthreads();
    constexpr int kStep = kVector ? Vector<T>::kWidth : 1;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * kPositionsPerBlock;
    for (int k = warp; k < kPositionsPerBlock; k += kScoreWarpsPerBlock) {
        const int64_t p = first + k;
        if (p >= positions) break;  // warp-uniform: the shuffles in write_scores stay converged
        const T* v = features + (image * positions + p) * s.width;
        Moments m = moments_empty();
        float dots[kMaxHeads + 1];
#pragma unroll
        for (int h = 0; h <= kMaxHeads; ++h) dots[h] = 0.0f;
        for (int64_t d = static_cast<int64_t>(lane) * kStep; d < s.width; d += kWarpSize * kStep) {
            float x[kStep];
            if constexpr (kVector) {
                Vector<T>::load(v + d, x);
            } else {
                x[0] = load(v + d);
            }
#pragma unroll
            for (int j = 0; j < kStep; ++j) m = moments_push(m, x[j]);
#pragma unroll
            for (int h = 0; h <= kMaxHeads; ++h) {
                if (h <= s.heads) {
                    float wv[kStep];
                    if constexpr (kVector) {
                        Vector<T>::load_weights(staged + h * s.width + d, wv);
                    } else {
                        wv[0] = staged[h * s.width + d];
                    }
#pragma unroll
                    for (int j = 0; j < kStep; ++j) dots[h] += x[j] * wv[j];
                }
            }
        }
        write_scores(m, dots, p, image, lane, bias, weight_sums, scores, dot_z, s, a);
    }
}

// Fallback for weights larger than a block's shared memory: read from global memory per position.
template <typename T>
__global__ void scores_kernel(const T* __restrict__ features, const float* __restrict__ weights,
                              const float* __restrict__ bias, const float* __restrict__ weight_sums,
                              float* __restrict__ scores, float* __restrict__ dot_z, Shape s, Attributes a) {
    const int64_t positions = s.layers * s.patches;
    const int64_t p = static_cast<int64_t>(blockIdx.x) * kScoreWarpsPerBlock + threadIdx.x / kWarpSize;
    const int image = blockIdx.y, lane = threadIdx.x % kWarpSize;
    if (p >= positions) return;  // whole warps exit together: the shuffles below stay converged
    const T* v = features + (image * positions + p) * s.width;
    const float* w = weights + static_cast<int64_t>(image) * (s.heads + 1) * s.width;
    Moments m = moments_empty();
    float dots[kMaxHeads + 1];
#pragma unroll
    for (int h = 0; h <= kMaxHeads; ++h) dots[h] = 0.0f;
    for (int64_t d = lane; d < s.width; d += kWarpSize) {
        const float x = load(v + d);
        m = moments_push(m, x);
#pragma unroll
        for (int h = 0; h <= kMaxHeads; ++h) {
            if (h <= s.heads) dots[h] += x * w[h * s.width + d];
        }
    }
    write_scores(m, dots, p, image, lane, bias, weight_sums, scores, dot_z, s, a);
}

__global__ void softmax_stats_kernel(const float* __restrict__ scores, float* __restrict__ stats, Shape s) {
    __shared__ float shared[kWarpSize];
    const int head = blockIdx.x, image = blockIdx.y;
    const int64_t positions = s.layers * s.patches;
    const float* row = scores + (static_cast<int64_t>(image) * s.heads + head) * positions;
    float mx = -FLT_MAX;
    for (int64_t i = threadIdx.x; i < positions; i += blockDim.x) mx = fmaxf(mx, row[i]);
    mx = block_reduce<true>(mx, shared);
    float sum = 0.0f;
    for (int64_t i = threadIdx.x; i < positions; i += blockDim.x) sum += __expf(row[i] - mx);
    sum = block_reduce<false>(sum, shared);
    if (threadIdx.x == 0) {
        stats[(image * s.heads + head) * 2] = mx;
        stats[(image * s.heads + head) * 2 + 1] = 1.0f / sum;
    }
}

__global__ void layer_weights_kernel(const float* __restrict__ scores, const float* __restrict__ stats,
                                     const float* __restrict__ dot_z, float* __restrict__ coefficients,
                                     float* __restrict__ attention, Shape s, Attributes a) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int image = blockIdx.y;
    if (n >= s.patches) return;
    const int64_t positions = s.layers * s.patches;
    const float total = static_cast<float>(positions);
    float logit[kMaxLayers], weight_g[kMaxLayers];
    float logit_max = -FLT_MAX;
    for (int64_t l = 0; l < s.layers; ++l) {
        const int64_t p = l * s.patches + n;
        float mean_attention = 0.0f;
        for (int h = 0; h < s.heads; ++h) {
            const int64_t row = static_cast<int64_t>(image) * s.heads + h;
            mean_attention += __expf(scores[row * positions + p] - stats[row * 2]) * stats[row * 2 + 1];
        }
        mean_attention /= static_cast<float>(s.heads);
        attention[image * positions + p] = mean_attention;
        weight_g[l] = total * mean_attention;
        logit[l] = layer_logit(weight_g[l], dot_z[image * positions + p], a.layer_scale);
        logit_max = fmaxf(logit_max, logit[l]);
    }
    float sum = 0.0f;
    for (int64_t l = 0; l < s.layers; ++l) sum += (logit[l] = __expf(logit[l] - logit_max));
    const float inv = 1.0f / sum;
    for (int64_t l = 0; l < s.layers; ++l) coefficients[image * positions + l * s.patches + n] = logit[l] * inv * weight_g[l];
}

template <typename T>
__global__ void reduce_layers_kernel(const T* __restrict__ features, const float* __restrict__ coefficients,
                                     T* __restrict__ fused, Shape s) {
    __shared__ float coef[kMaxLayers];
    const int64_t n = blockIdx.x;
    const int image = blockIdx.y;
    const int64_t positions = s.layers * s.patches;
    for (int64_t l = threadIdx.x; l < s.layers; l += blockDim.x) coef[l] = coefficients[image * positions + l * s.patches + n];
    __syncthreads();
    for (int64_t d = threadIdx.x; d < s.width; d += blockDim.x) {
        float acc = 0.0f;
        for (int64_t l = 0; l < s.layers; ++l) acc += coef[l] * load(features + ((image * s.layers + l) * s.patches + n) * s.width + d);
        store(fused + (image * s.patches + n) * s.width + d, acc);
    }
}

// Per-device values cached for the life of the process, so an enqueue makes no attribute query:
// a device's opt-in shared memory never changes, and a kernel's dynamic shared memory limit, once
// raised on a device, stays raised (until a cudaDeviceReset, which nothing in a TensorRT process
// does). Slots are indexed by device ordinal; 0 means not known yet.
constexpr int kCachedDevices = 64;

// cudaDevAttrMaxSharedMemoryPerBlockOptin of `device`, queried once per device.
static cudaError_t max_optin_shared_memory(int device, int* bytes) {
    static std::atomic<int> cache[kCachedDevices];
    if (device >= 0 && device < kCachedDevices) {
        const int cached = cache[device].load(std::memory_order_relaxed);
        if (cached > 0) {
            *bytes = cached;
            return cudaSuccess;
        }
    }
    const cudaError_t status = cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (status == cudaSuccess && *bytes > 0 && device >= 0 && device < kCachedDevices) {
        cache[device].store(*bytes, std::memory_order_relaxed);
    }
    return status;
}

// Per staged kernel ([features half?][vector?]) and device, the dynamic shared memory limit already
// set. `static` at namespace scope: internal linkage, so two libraries built from this file (the
// plugin's two variants, the C ABI) never share it, as a template's static local would (a GNU
// unique symbol) while each has its own kernels.
static std::atomic<int> gRaised[2][2][kCachedDevices];

// Raise `kernel`'s dynamic shared memory limit on `device` to at least `bytes`; `raised` is that
// kernel's per-device record of the limit already set (a benign race sets the same value twice).
template <typename Kernel>
cudaError_t allow_shared_memory(Kernel kernel, int device, int bytes, std::atomic<int>* raised) {
    const bool cacheable = device >= 0 && device < kCachedDevices;
    if (cacheable && raised[device].load(std::memory_order_relaxed) >= bytes) return cudaSuccess;
    const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (status == cudaSuccess && cacheable) {
        int previous = raised[device].load(std::memory_order_relaxed);
        while (previous < bytes && !raised[device].compare_exchange_weak(previous, bytes)) {
        }
    }
    return status;
}

// The staged scores kernel where the image's folded weights fit a block's shared memory (opting in
// past the 48 KB default: 69 KB for 16 heads at Dv 1024), else the direct one.
template <typename T>
cudaError_t launch_scores(const T* features, const float* weights, const float* bias, const float* weight_sums,
                          float* scores, float* dot_z, const Shape& s, const Attributes& a, cudaStream_t stream) {
    const int64_t positions = s.layers * s.patches;
    const auto batch = static_cast<unsigned>(s.batch);
    const size_t staged_bytes = static_cast<size_t>(s.heads + 1) * s.width * sizeof(float);
    int device = 0, optin = 0;
    cudaError_t status = cudaGetDevice(&device);  // the calling thread's current device: no driver query
    if (status == cudaSuccess) status = max_optin_shared_memory(device, &optin);
    if (status != cudaSuccess) return status;
    if (staged_bytes <= static_cast<size_t>(optin)) {
        const bool vector = s.width % Vector<T>::kWidth == 0;
        auto kernel = vector ? scores_staged_kernel<T, true> : scores_staged_kernel<T, false>;
        std::atomic<int>* raised = gRaised[std::is_same<T, __half>::value ? 1 : 0][vector ? 1 : 0];
        status = allow_shared_memory(kernel, device, static_cast<int>(staged_bytes), raised);
        if (status != cudaSuccess) return status;
        const auto blocks = static_cast<unsigned>((positions + kPositionsPerBlock - 1) / kPositionsPerBlock);
        kernel<<<dim3(blocks, batch), kScoreWarpsPerBlock * kWarpSize, staged_bytes, stream>>>(
            features, weights, bias, weight_sums, scores, dot_z, s, a);
        return cudaGetLastError();
    }
    const auto blocks = static_cast<unsigned>((positions + kScoreWarpsPerBlock - 1) / kScoreWarpsPerBlock);
    scores_kernel<T><<<dim3(blocks, batch), kScoreWarpsPerBlock * kWarpSize, 0, stream>>>(
        features, weights, bias, weight_sums, scores, dot_z, s, a);
    return cudaGetLastError();
}

template <typename T>
cudaError_t forward(const T* features, const float* weights, const float* bias, T* fused, float* attention,
                    const Shape& s, const Attributes& a, float* scores, float* dot_z, float* coefficients,
                    float* stats, float* weight_sums, cudaStream_t stream) {
    const auto batch = static_cast<unsigned>(s.batch);
    weight_sums_kernel<<<dim3(s.heads, batch), kReduceThreads, 0, stream>>>(weights, weight_sums, s);
    const cudaError_t launched = launch_scores(features, weights, bias, weight_sums, scores, dot_z, s, a, stream);
    if (launched != cudaSuccess) return launched;
    softmax_stats_kernel<<<dim3(s.heads, batch), kReduceThreads, 0, stream>>>(scores, stats, s);
    const auto patch_blocks = static_cast<unsigned>((s.patches + kLayerThreads - 1) / kLayerThreads);
    layer_weights_kernel<<<dim3(patch_blocks, batch), kLayerThreads, 0, stream>>>(scores, stats, dot_z, coefficients,
                                                                                    attention, s, a);
    reduce_layers_kernel<T><<<dim3(static_cast<unsigned>(s.patches), batch), kReduceThreads, 0, stream>>>(
        features, coefficients, fused, s);
    return cudaGetLastError();
}

}  // namespace kernels

cudaError_t launch_forward(DType features_type, const void* features, const float* query_weights,
                           const float* query_bias, void* fused, float* attention, const Shape& shape,
                           const Attributes& attributes, void* workspace, size_t workspace_size, cudaStream_t stream) {
    if (workspace_size < workspace_bytes(shape) || shape.batch > 65535) return cudaErrorInvalidValue;
    const size_t positions = static_cast<size_t>(shape.batch) * shape.layers * shape.patches;
    const size_t per_head = static_cast<size_t>(shape.batch) * shape.heads;
    auto carve = [cursor = static_cast<char*>(workspace)](size_t floats) mutable {
        float* out = reinterpret_cast<float*>(cursor);
        cursor += (floats * sizeof(float) + 255) / 256 * 256;
        return out;
    };
    float* scores = carve(positions * shape.heads);
    float* dot_z = carve(positions);
    float* coefficients = carve(positions);
    float* stats = carve(per_head * 2);
    float* weight_sums = carve(per_head);
    if (features_type == DType::kFloat16) {
        return kernels::forward(static_cast<const __half*>(features), query_weights, query_bias, static_cast<__half*>(fused),
                                attention, shape, attributes, scores, dot_z, coefficients, stats, weight_sums, stream);
    }
    if (features_type == DType::kFloat32) {
        return kernels::forward(static_cast<const float*>(features), query_weights, query_bias, static_cast<float*>(fused),
                                attention, shape, attributes, scores, dot_z, coefficients, stats, weight_sums, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace lpwca
}  // namespace ccra
