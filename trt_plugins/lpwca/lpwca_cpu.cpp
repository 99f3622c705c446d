// CPU reference kernel of the fused LPWCA node: the same per-position math as the CUDA kernel
// (ccra/lpwca_math.h) and the same two passes over V, so every fused graph runs and is
// parity-checked on a machine without a GPU. Exposed with a C ABI for ctypes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "lpwca_math.h"
#include "lpwca_params.h"

namespace ccra {
namespace lpwca {
namespace {

constexpr int64_t kChunk = 32;  // values per moment chunk: the CUDA warp width

void forward_one_image(const float* features, const float* weights, const float* bias, const Shape& s,
                       const Attributes& a, float* fused, float* attention) {
    const int64_t positions = s.layers * s.patches;
    const int32_t heads = s.heads;
    const int64_t width = s.width;
    std::vector<float> scores(static_cast<size_t>(heads) * positions);
    std::vector<float> dot_z(positions);
    std::vector<float> coefficient(positions);
    float weight_sum[kMaxHeads];
    for (int32_t h = 0; h < heads; ++h) {
        double sum = 0.0;
        for (int64_t d = 0; d < width; ++d) sum += weights[h * width + d];
        weight_sum[h] = static_cast<float>(sum);
    }

    // Pass 1 over V: LayerNorm moments and H + 1 dot products per position.
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < positions; ++p) {
        const float* v = features + p * width;
        // Moments per chunk of kChunk values (two-pass inside the chunk, which vectorises), merged
        // with the same moments_merge the CUDA kernel's warp reduction uses.
        Moments m = moments_empty();
        for (int64_t start = 0; start < width; start += kChunk) {
            const int64_t count = std::min<int64_t>(kChunk, width - start);
            float sum = 0.0f, m2 = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t d = start; d < start + count; ++d) sum += v[d];
            const float mean = sum / static_cast<float>(count);
#pragma omp simd reduction(+ : m2)
            for (int64_t d = start; d < start + count; ++d) m2 += (v[d] - mean) * (v[d] - mean);
            m = moments_merge(m, Moments{static_cast<float>(count), mean, m2});
        }
        float dots[kMaxHeads + 1] = {};
        for (int32_t h = 0; h <= heads; ++h) {
            const float* w = weights + h * width;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < width; ++d) acc += v[d] * w[d];
            dots[h] = acc;
        }
        const float rstd = inverse_std(m, a.epsilon);
        const int64_t layer = p / s.patches;
        for (int32_t h = 0; h < heads; ++h) {
            scores[h * positions + p] = head_score(dots[h], m.mean, rstd, weight_sum[h], bias[layer * heads + h], a.head_scale);
        }
        dot_z[p] = dots[heads];
    }

    // Joint softmax over all L*N positions, per head: max and normaliser.
    float head_max[kMaxHeads], head_inv_sum[kMaxHeads];
    for (int32_t h = 0; h < heads; ++h) {
        const float* row = scores.data() + h * positions;
        const float mx = *std::max_element(row, row + positions);
        double sum = 0.0;
        for (int64_t p = 0; p < positions; ++p) sum += std::exp(row[p] - mx);
        head_max[h] = mx;
        head_inv_sum[h] = static_cast<float>(1.0 / sum);
    }

    // Per patch: A (mean over heads), G = L*N*A, softmax over layers of the layer logits.
    const float total = static_cast<float>(positions);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < s.patches; ++n) {
        float logit[kMaxLayers], weight_g[kMaxLayers];
        float logit_max = -INFINITY;
        for (int64_t l = 0; l < s.layers; ++l) {
            const int64_t p = l * s.patches + n;
            float mean_attention = 0.0f;
            for (int32_t h = 0; h < heads; ++h) {
                mean_attention += std::exp(scores[h * positions + p] - head_max[h]) * head_inv_sum[h];
            }
            mean_attention /= static_cast<float>(heads);
            attention[p] = mean_attention;
            weight_g[l] = total * mean_attention;
            logit[l] = layer_logit(weight_g[l], dot_z[p], a.layer_scale);
            logit_max = std::max(logit_max, logit[l]);
        }
        float sum = 0.0f;
        for (int64_t l = 0; l < s.layers; ++l) sum += (logit[l] = std::exp(logit[l] - logit_max));
        for (int64_t l = 0; l < s.layers; ++l) coefficient[l * s.patches + n] = logit[l] / sum * weight_g[l];
    }

    // Pass 2 over V: F_n = sum_l alpha_{n,l} G_{l,n} V_{l,n}.
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < s.patches; ++n) {
        float* out = fused + n * width;
        std::fill(out, out + width, 0.0f);
        for (int64_t l = 0; l < s.layers; ++l) {
            const float c = coefficient[l * s.patches + n];
            const float* v = features + (l * s.patches + n) * width;
#pragma omp simd
            for (int64_t d = 0; d < width; ++d) out[d] += c * v[d];
        }
    }
}

void copy_error(const std::string& message, char* error, size_t error_size) {
    if (error != nullptr && error_size > 0) std::snprintf(error, error_size, "%s", message.c_str());
}

}  // namespace
}  // namespace lpwca
}  // namespace ccra

extern "C" {

int ccra_lpwca_max_heads(void) { return ccra::lpwca::kMaxHeads; }
long long ccra_lpwca_max_layers(void) { return ccra::lpwca::kMaxLayers; }

// features [B,L,N,Dv], query_weights [B,H+1,Dv], query_bias [B,L,H] -> fused [B,N,Dv], attention [B,L,N].
// All float32, contiguous. Returns 0, or 1 with a one-line reason in `error`.
int ccra_lpwca_cpu_forward(const float* features, const float* query_weights, const float* query_bias,
                           const long long* features_dims, const long long* weights_dims, const long long* bias_dims,
                           int num_heads, float epsilon, float head_scale, float layer_scale, float* fused,
                           float* attention, char* error, size_t error_size) {
    using namespace ccra::lpwca;
    std::string why;
    Attributes attributes{num_heads, epsilon, head_scale, layer_scale};
    Shape s;
    int64_t v[4], w[3], b[3];
    std::copy(features_dims, features_dims + 4, v);
    std::copy(weights_dims, weights_dims + 3, w);
    std::copy(bias_dims, bias_dims + 3, b);
    if (!validate_attributes(attributes, &why) || !make_shape(v, 4, w, 3, b, 3, num_heads, &s, &why)) {
        copy_error(why, error, error_size);
        return 1;
    }
    const int64_t per_image = s.layers * s.patches;
    for (int64_t i = 0; i < s.batch; ++i) {
        forward_one_image(features + i * per_image * s.width, query_weights + i * (s.heads + 1) * s.width,
                          query_bias + i * s.layers * s.heads, s, attributes, fused + i * s.patches * s.width,
                          attention + i * per_image);
    }
    return 0;
}

}  // extern "C"
