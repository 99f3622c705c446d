// Unit tests of the TensorRT-free plugin logic and the shared math (run by ctest in CI).
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "lpwca_math.h"
#include "lpwca_params.h"

using namespace ccra::lpwca;

static int failures = 0;
#define EXPECT(cond)                                                       \
    do {                                                                   \
        if (!(cond)) {                                                     \
            std::fprintf(stderr, "%s:%d: FAILED: %s\n", __FILE__, __LINE__, #cond); \
            ++failures;                                                    \
        }                                                                  \
    } while (0)

static bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

static void test_fields_round_trip() {
    Attributes a{8, 1e-6f, 0.17677669f, 0.0625f};
    FieldView views[kNumFields];
    fields_of(a, views);
    Attributes b;
    std::string error;
    EXPECT(parse_fields(views, kNumFields, &b, &error));
    EXPECT(b.num_heads == 8 && b.epsilon == 1e-6f && b.head_scale == a.head_scale && b.layer_scale == 0.0625f);
}

static void test_fields_errors() {
    Attributes out;
    std::string error;
    const float heads_as_float = 8.0f;
    FieldView wrong_type{"num_heads", &heads_as_float, FieldType::kFloat32, 1};
    EXPECT(!parse_fields(&wrong_type, 1, &out, &error));
    EXPECT(contains(error, "num_heads") && contains(error, "int32"));
    const int32_t too_many = kMaxHeads + 1;
    const float scale = 0.5f;
    FieldView fields[] = {{"num_heads", &too_many, FieldType::kInt32, 1},
                          {"head_scale", &scale, FieldType::kFloat32, 1},
                          {"layer_scale", &scale, FieldType::kFloat32, 1},
                          {"plugin_version", "1", FieldType::kOther, 1}};
    EXPECT(!parse_fields(fields, 4, &out, &error));
    EXPECT(contains(error, "num_heads 17 outside [1, 16]"));
    const int32_t heads = 4;
    fields[0].data = &heads;
    EXPECT(parse_fields(fields, 4, &out, &error));  // unknown fields ignored
    EXPECT(out.num_heads == 4);
}

static void test_shapes() {
    const int64_t v[4] = {2, 23, 576, 1024}, w[3] = {2, 9, 1024}, b[3] = {2, 23, 8};
    Shape s;
    std::string error;
    EXPECT(make_shape(v, 4, w, 3, b, 3, 8, &s, &error));
    EXPECT(s.batch == 2 && s.layers == 23 && s.patches == 576 && s.width == 1024 && s.heads == 8);
    int64_t out[3];
    output_dims(0, v, out);
    EXPECT(out[0] == 2 && out[1] == 576 && out[2] == 1024);
    output_dims(1, v, out);
    EXPECT(out[0] == 2 && out[1] == 23 && out[2] == 576);
    EXPECT(workspace_bytes(s) >= sizeof(float) * (2ull * 23 * 576 * 10 + 2 * 8 * 2));

    const int64_t w_bad_rows[3] = {2, 8, 1024};
    EXPECT(!make_shape(v, 4, w_bad_rows, 3, b, 3, 8, &s, &error) && contains(error, "needs 9"));
    const int64_t w_bad_batch[3] = {3, 9, 1024};
    EXPECT(!make_shape(v, 4, w_bad_batch, 3, b, 3, 8, &s, &error) && contains(error, "batch differs"));
    const int64_t w_bad_width[3] = {2, 9, 768};
    EXPECT(!make_shape(v, 4, w_bad_width, 3, b, 3, 8, &s, &error) && contains(error, "width 768"));
    const int64_t v_many_layers[4] = {2, 65, 576, 1024}, b_many[3] = {2, 65, 8};
    EXPECT(!make_shape(v_many_layers, 4, w, 3, b_many, 3, 8, &s, &error) && contains(error, "kernel limit 64"));
    EXPECT(!make_shape(v, 3, w, 3, b, 3, 8, &s, &error) && contains(error, "rank 3"));
}

static void test_type_combinations() {
    EXPECT(supports_combination(0, DType::kFloat16, true, DType::kFloat16));
    EXPECT(supports_combination(0, DType::kFloat32, true, DType::kFloat32));
    EXPECT(!supports_combination(0, DType::kOther, true, DType::kOther));
    EXPECT(!supports_combination(0, DType::kFloat16, false, DType::kFloat16));  // linear only
    EXPECT(supports_combination(1, DType::kFloat32, true, DType::kFloat16));
    EXPECT(!supports_combination(2, DType::kFloat16, true, DType::kFloat16));  // query inputs stay fp32
    EXPECT(supports_combination(3, DType::kFloat16, true, DType::kFloat16));
    EXPECT(!supports_combination(3, DType::kFloat32, true, DType::kFloat16));  // F follows the features
    EXPECT(supports_combination(4, DType::kFloat32, true, DType::kFloat16));   // the map is always FP32
    EXPECT(!supports_combination(4, DType::kFloat16, true, DType::kFloat16));
    EXPECT(!supports_combination(5, DType::kFloat32, true, DType::kFloat32));
}

static void test_moments_match_two_pass() {
    std::vector<float> x(1024);
    for (size_t i = 0; i < x.size(); ++i) x[i] = 300.0f + 40.0f * std::sin(0.37f * i) + (i % 7 == 0 ? 250.0f : 0.0f);
    double mean = 0, m2 = 0;
    for (float v : x) mean += v;
    mean /= x.size();
    for (float v : x) m2 += (v - mean) * (v - mean);
    // Eight "lanes" each push a strided subset, then merge: the CUDA kernel's reduction order.
    Moments lanes[8];
    for (auto& lane : lanes) lane = moments_empty();
    for (size_t i = 0; i < x.size(); ++i) lanes[i % 8] = moments_push(lanes[i % 8], x[i]);
    Moments total = moments_empty();
    for (const auto& lane : lanes) total = moments_merge(total, lane);
    EXPECT(std::fabs(total.mean - mean) < 1e-3 * std::fabs(mean));
    EXPECT(std::fabs(total.m2 - m2) < 1e-4 * m2);
    const float rstd = inverse_std(total, 1e-5f);
    EXPECT(std::fabs(rstd - 1.0 / std::sqrt(m2 / x.size() + 1e-5)) < 1e-4 * rstd);
}

int main() {
    test_fields_round_trip();
    test_fields_errors();
    test_shapes();
    test_type_combinations();
    test_moments_match_two_pass();
    if (failures == 0) std::printf("lpwca_params_test: all checks passed\n");
    return failures == 0 ? 0 : 1;
}
