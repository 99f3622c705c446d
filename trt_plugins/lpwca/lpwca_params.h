// Everything about the LPWCA node that is not math and not TensorRT: attributes, plugin fields,
// shape rules, supported type/format combinations, workspace size, validation with readable
// errors. Plain C++17 with no TensorRT or CUDA types, so CI (which has neither TensorRT headers
// nor a GPU) compiles and tests it; the IPluginV3 wrapper only converts arguments to these types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ccra {
namespace lpwca {

constexpr int32_t kMaxHeads = 16;    // per-head partial dot products live in registers
constexpr int64_t kMaxLayers = 64;   // the softmax over layers is held per thread
constexpr int32_t kNumInputs = 3;    // features, query_weights, query_bias
constexpr int32_t kNumOutputs = 2;   // fused, attention

struct Attributes {
    int32_t num_heads = 0;
    float epsilon = 1e-5f;
    float head_scale = 0.0f;
    float layer_scale = 0.0f;
};

struct Shape {
    int64_t batch = 0;
    int64_t layers = 0;
    int64_t patches = 0;
    int64_t width = 0;
    int32_t heads = 0;
};

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kOther = 2 };

// A TensorRT PluginField without TensorRT types.
enum class FieldType : int32_t { kInt32 = 0, kFloat32 = 1, kOther = 2 };
struct FieldView {
    const char* name;
    const void* data;
    FieldType type;
    int32_t length;
};

constexpr int32_t kNumFields = 4;
extern const char* const kFieldNames[kNumFields];  // num_heads, epsilon, head_scale, layer_scale
extern const FieldType kFieldTypes[kNumFields];

// Fills `out` from plugin fields (as the ONNX parser passes node attributes, or from a
// serialised engine). Unknown names are ignored (plugin_version / plugin_namespace never reach
// here); a known name with the wrong type or length is an error.
bool parse_fields(const FieldView* fields, int32_t count, Attributes* out, std::string* error);
// The fields to serialise, pointing into `attributes` (which must outlive the views).
void fields_of(const Attributes& attributes, FieldView out[kNumFields]);

bool validate_attributes(const Attributes& attributes, std::string* error);

// Concrete input dims -> Shape, checking that the three inputs agree and are within kernel limits.
bool make_shape(const int64_t* features, int32_t features_rank, const int64_t* weights, int32_t weights_rank,
                const int64_t* bias, int32_t bias_rank, int32_t num_heads, Shape* out, std::string* error);

// Which features dim each output dim is: fused [B, N, Dv], attention [B, L, N].
constexpr int32_t kOutputDimSource[kNumOutputs][3] = {{0, 2, 3}, {0, 1, 2}};

// Output dims: fused [B, N, Dv], attention [B, L, N]; `index` selects the output.
void output_dims(int32_t index, const int64_t features[4], int64_t out[3]);

// Type/format combinations the kernels implement. `position` counts inputs then outputs;
// features and the fused output share one type (float32 or float16); the two query inputs and the
// attention map are float32. The map is FP32 even for FP16 features: its mean is 1/(L*N), 7.5e-5 at
// llava-1.5-7b sizes, below FP16's smallest normal (6.1e-5), so most of an FP16 map is subnormal.
bool supports_combination(int32_t position, DType type, bool linear_format, DType features_type);

// Scratch for scores [B,H,L*N], layer dots [B,L*N], coefficients [B,L*N], softmax stats [B,H,2]
// and query weight sums [B,H]: the only [B,H,L,N]-sized buffer is the joint softmax's scores.
size_t workspace_bytes(const Shape& shape);

}  // namespace lpwca
}  // namespace ccra
