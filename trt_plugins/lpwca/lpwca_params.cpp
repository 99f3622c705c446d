#include "lpwca_params.h"

#include <cmath>
#include <cstring>
#include <sstream>

namespace ccra {
namespace lpwca {

const char* const kFieldNames[kNumFields] = {"num_heads", "epsilon", "head_scale", "layer_scale"};
const FieldType kFieldTypes[kNumFields] = {FieldType::kInt32, FieldType::kFloat32, FieldType::kFloat32,
                                           FieldType::kFloat32};

namespace {

constexpr size_t kWorkspaceAlignment = 256;

bool fail(std::string* error, const std::string& message) {
    if (error != nullptr) *error = "ccra::LPWCA: " + message;
    return false;
}

}  // namespace

bool parse_fields(const FieldView* fields, int32_t count, Attributes* out, std::string* error) {
    Attributes parsed = *out;
    for (int32_t i = 0; i < count; ++i) {
        const FieldView& field = fields[i];
        if (field.name == nullptr) continue;
        for (int32_t k = 0; k < kNumFields; ++k) {
            if (std::strcmp(field.name, kFieldNames[k]) != 0) continue;
            if (field.type != kFieldTypes[k] || field.length != 1 || field.data == nullptr) {
                return fail(error, std::string("field '") + field.name + "' must be one " +
                                       (kFieldTypes[k] == FieldType::kInt32 ? "int32" : "float32"));
            }
            switch (k) {
                case 0: std::memcpy(&parsed.num_heads, field.data, sizeof(int32_t)); break;
                case 1: std::memcpy(&parsed.epsilon, field.data, sizeof(float)); break;
                case 2: std::memcpy(&parsed.head_scale, field.data, sizeof(float)); break;
                default: std::memcpy(&parsed.layer_scale, field.data, sizeof(float)); break;
            }
        }
    }
    if (!validate_attributes(parsed, error)) return false;
    *out = parsed;
    return true;
}

void fields_of(const Attributes& attributes, FieldView out[kNumFields]) {
    const void* data[kNumFields] = {&attributes.num_heads, &attributes.epsilon, &attributes.head_scale,
                                    &attributes.layer_scale};
    for (int32_t k = 0; k < kNumFields; ++k) out[k] = FieldView{kFieldNames[k], data[k], kFieldTypes[k], 1};
}

bool validate_attributes(const Attributes& a, std::string* error) {
    if (a.num_heads < 1 || a.num_heads > kMaxHeads) {
        return fail(error, "num_heads " + std::to_string(a.num_heads) + " outside [1, " + std::to_string(kMaxHeads) + "]");
    }
    if (!(a.epsilon > 0.0f) || !std::isfinite(a.epsilon)) return fail(error, "epsilon must be positive and finite");
    if (!(a.head_scale > 0.0f) || !std::isfinite(a.head_scale)) return fail(error, "head_scale must be positive and finite");
    if (!(a.layer_scale > 0.0f) || !std::isfinite(a.layer_scale)) return fail(error, "layer_scale must be positive and finite");
    return true;
}

bool make_shape(const int64_t* v, int32_t v_rank, const int64_t* w, int32_t w_rank, const int64_t* b, int32_t b_rank,
                int32_t num_heads, Shape* out, std::string* error) {
    if (v_rank != 4) return fail(error, "features must be [B, L, N, Dv], got rank " + std::to_string(v_rank));
    if (w_rank != 3) return fail(error, "query_weights must be [B, H+1, Dv], got rank " + std::to_string(w_rank));
    if (b_rank != 3) return fail(error, "query_bias must be [B, L, H], got rank " + std::to_string(b_rank));
    for (int32_t i = 0; i < 4; ++i) {
        if (v[i] < 1) return fail(error, "features has an empty dimension");
    }
    std::ostringstream why;
    if (w[0] != v[0] || b[0] != v[0]) {
        why << "batch differs between inputs: features " << v[0] << ", query_weights " << w[0] << ", query_bias " << b[0];
    } else if (w[2] != v[3]) {
        why << "query_weights width " << w[2] << " != features width " << v[3];
    } else if (w[1] != num_heads + 1) {
        why << "query_weights has " << w[1] << " rows; num_heads " << num_heads << " needs " << num_heads + 1;
    } else if (b[1] != v[1] || b[2] != num_heads) {
        why << "query_bias must be [B, L=" << v[1] << ", H=" << num_heads << "], got [" << b[0] << ", " << b[1] << ", "
            << b[2] << "]";
    } else if (v[1] > kMaxLayers) {
        why << "L = " << v[1] << " layers exceeds the kernel limit " << kMaxLayers;
    } else if (v[1] * v[2] > INT32_MAX) {
        why << "L * N = " << v[1] * v[2] << " positions exceeds 2^31 - 1";
    } else if (num_heads < 1 || num_heads > kMaxHeads) {
        why << "num_heads " << num_heads << " outside [1, " << kMaxHeads << "]";
    }
    if (!why.str().empty()) return fail(error, why.str());
    *out = Shape{v[0], v[1], v[2], v[3], num_heads};
    return true;
}

void output_dims(int32_t index, const int64_t v[4], int64_t out[3]) {
    for (int32_t i = 0; i < 3; ++i) out[i] = v[kOutputDimSource[index][i]];
}

bool supports_combination(int32_t position, DType type, bool linear_format, DType features_type) {
    if (!linear_format) return false;
    switch (position) {
        case 0: return type == DType::kFloat32 || type == DType::kFloat16;
        case 1:
        case 2: return type == DType::kFloat32;
        case 3: return type == features_type && (type == DType::kFloat32 || type == DType::kFloat16);
        case 4: return type == DType::kFloat32;  // the map: FP32 whatever the features (see the header)
        default: return false;
    }
}

size_t workspace_bytes(const Shape& s) {
    const size_t positions = static_cast<size_t>(s.batch) * s.layers * s.patches;
    const size_t floats = positions * (static_cast<size_t>(s.heads) + 2) + static_cast<size_t>(s.batch) * s.heads * 3;
    return floats * sizeof(float) + 5 * kWorkspaceAlignment;  // each of the 5 buffers is aligned
}

}  // namespace lpwca
}  // namespace ccra
