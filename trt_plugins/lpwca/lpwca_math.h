// Per-position math of the fused LPWCA node, shared by the CPU reference kernel and the CUDA
// kernels (every function is __host__ __device__ under nvcc). The folded algebra is derived in
// shared/CCRA.md: the LPWCA keys and the layer-attention keys are never materialised; each
// (layer, patch) position costs one LayerNorm moment pass and H+1 dot products.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define CCRA_HD __host__ __device__ __forceinline__
#else
#define CCRA_HD inline
#endif

namespace ccra {
namespace lpwca {

// Running mean / sum of squared deviations (Welford), mergeable across threads (Chan et al.).
// Robust where E[x^2] - E[x]^2 is not: CLIP hidden states have channels of magnitude ~100.
struct Moments {
    float count;
    float mean;
    float m2;
};

CCRA_HD Moments moments_empty() { return Moments{0.0f, 0.0f, 0.0f}; }

CCRA_HD Moments moments_push(Moments m, float x) {
    m.count += 1.0f;
    const float delta = x - m.mean;
    m.mean += delta / m.count;
    m.m2 += delta * (x - m.mean);
    return m;
}

CCRA_HD Moments moments_merge(Moments a, Moments b) {
    if (b.count == 0.0f) return a;
    if (a.count == 0.0f) return b;
    const float count = a.count + b.count;
    const float delta = b.mean - a.mean;
    const float wb = b.count / count;
    return Moments{count, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

// 1 / sqrt(var + eps) with the biased variance, as LayerNorm uses.
CCRA_HD float inverse_std(Moments m, float epsilon) { return 1.0f / sqrtf(m.m2 / m.count + epsilon); }

// LPWCA score of one head at one position:
//   q_h . (LN(v) W_k + b_k + E_l)_h / sqrt(dh)
//     = ((v . w_h - mean * sum(w_h)) * rstd + bias_{l,h}) * head_scale
// with w_h = gamma_k * (W_k,h^T q_h) and bias_{l,h} = beta_k . u_h + b_k,h . q_h + E_l,h . q_h.
CCRA_HD float head_score(float dot, float mean, float rstd, float weight_sum, float bias, float head_scale) {
    return ((dot - mean * weight_sum) * rstd + bias) * head_scale;
}

// Layer-attention logit: (W_lq q) . (G v W_lk^T + b_lk) / sqrt(da) = G (v . z) / sqrt(da) + const,
// z = W_lk^T W_lq q. The constant is the same for every layer and cancels in softmax over layers.
CCRA_HD float layer_logit(float weight_g, float dot_z, float layer_scale) { return weight_g * dot_z * layer_scale; }

}  // namespace lpwca
}  // namespace ccra
