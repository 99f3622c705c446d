// TensorRT IPluginV3 plugin for the fused ccra::LPWCA ONNX node (TensorRT 10 and 11).
//
// Deliberately thin: every method converts TensorRT types into the TensorRT-free types of
// lpwca_params.h (fields, dims, data types) and calls code that CI compiles and tests; the
// arithmetic is in lpwca_kernel.cu. The ONNX parser finds this creator by the node's op_type
// ("LPWCA"), plugin_version ("1") and plugin_namespace ("ccra") attributes, and hands it the
// node's attributes as the fields listed by getFieldNames().
//
// Two libraries are built from this file (CMakeLists.txt beside it):
//   libccra_lpwca_plugin.so         getCreators() / setLoggerFinder(): IPluginRegistry::loadLibrary,
//                                   trtexec --dynamicPlugins (never serialised into an engine)
//   libccra_lpwca_plugin_static.so  registration at load time (namespace "ccra"), for a plain dlopen:
//                                   Triton's plugins=, Polygraphy --plugins, trtexec --staticPlugins,
//                                   ctypes.CDLL before parsing (links libnvinfer: getPluginRegistry)
// One library with both would register the creator twice when loaded through loadLibrary.
#include <NvInferRuntime.h>

#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

#include "lpwca_params.h"
#include "lpwca_kernel.h"

namespace ccra {
namespace trt {

using nvinfer1::AsciiChar;
using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IExprBuilder;
using nvinfer1::ILogger;
using nvinfer1::ILoggerFinder;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginCreatorInterface;
using nvinfer1::IPluginResourceContext;
using nvinfer1::IPluginV3;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;
using nvinfer1::TensorRTPhase;

constexpr AsciiChar const* kPluginName = "LPWCA";
constexpr AsciiChar const* kPluginVersion = "1";
constexpr AsciiChar const* kPluginNamespace = "ccra";

// --- logging: the logger TensorRT hands the library, else stderr ---
class LoggerSlot {
public:
    void set(ILoggerFinder* finder) {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder == nullptr) mFinder = finder;
    }
    void error(std::string const& message) {
        std::lock_guard<std::mutex> lock(mMutex);
#if defined(CCRA_STATIC_REGISTRATION)
        ILogger* logger = getLogger();  // libnvinfer's logger: this library is loaded into a TensorRT process
#else
        ILogger* logger = mFinder != nullptr ? mFinder->findLogger() : nullptr;
#endif
        if (logger != nullptr) {
            logger->log(ILogger::Severity::kERROR, message.c_str());
        } else {
            std::fprintf(stderr, "[ccra LPWCA plugin] %s\n", message.c_str());
        }
    }

private:
    std::mutex mMutex;
    ILoggerFinder* mFinder{nullptr};
};

LoggerSlot gLogger;

// --- TensorRT types -> TensorRT-free types (argument passing only) ---
lpwca::DType to_dtype(DataType type) {
    if (type == DataType::kFLOAT) return lpwca::DType::kFloat32;
    if (type == DataType::kHALF) return lpwca::DType::kFloat16;
    return lpwca::DType::kOther;
}

lpwca::FieldType to_field_type(PluginFieldType type) {
    if (type == PluginFieldType::kINT32) return lpwca::FieldType::kInt32;
    if (type == PluginFieldType::kFLOAT32) return lpwca::FieldType::kFloat32;
    return lpwca::FieldType::kOther;
}

PluginFieldType from_field_type(lpwca::FieldType type) {
    return type == lpwca::FieldType::kInt32 ? PluginFieldType::kINT32 : PluginFieldType::kFLOAT32;
}

bool shape_of(nvinfer1::Dims const& v, nvinfer1::Dims const& w, nvinfer1::Dims const& b, int32_t heads,
              lpwca::Shape* shape, std::string* error) {
    return lpwca::make_shape(v.d, v.nbDims, w.d, w.nbDims, b.d, b.nbDims, heads, shape, error);
}

class LpwcaPlugin final : public IPluginV3,
                          public nvinfer1::IPluginV3OneCore,
                          public nvinfer1::IPluginV3OneBuild,
                          public nvinfer1::IPluginV3OneRuntime {
public:
    explicit LpwcaPlugin(lpwca::Attributes attributes) : mAttributes(attributes) {}

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
        switch (type) {
            case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
            case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
            case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    IPluginV3* clone() noexcept override {
        auto* copy = new (std::nothrow) LpwcaPlugin(mAttributes);
        if (copy != nullptr) copy->mShape = mShape;
        return copy;
    }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override { return kPluginName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kPluginVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return lpwca::kNumOutputs; }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                            int32_t nbOutputs) noexcept override {
        if (nbInputs != lpwca::kNumInputs || nbOutputs != lpwca::kNumOutputs) {
            gLogger.error("ccra::LPWCA: expects 3 inputs and 2 outputs");
            return -1;
        }
        // The profile's max dims are concrete: check them against the kernel's limits now, at
        // engine build, rather than at the first enqueue.
        std::string error;
        lpwca::Shape shape;
        if (!shape_of(in[0].max, in[1].max, in[2].max, mAttributes.num_heads, &shape, &error)) {
            gLogger.error(error + " (optimization profile max shapes)");
            return -1;
        }
        return 0;
    }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override {
        if (nbInputs != lpwca::kNumInputs || nbOutputs != lpwca::kNumOutputs) return -1;
        outputTypes[0] = inputTypes[0];  // F follows the features' type
        outputTypes[1] = DataType::kFLOAT;  // A is FP32: mostly subnormal in FP16 (lpwca_params.h)
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                            int32_t nbOutputs, IExprBuilder&) noexcept override {
        if (nbInputs != lpwca::kNumInputs || nbOutputs != lpwca::kNumOutputs || inputs[0].nbDims != 4) return -1;
        for (int32_t o = 0; o < lpwca::kNumOutputs; ++o) {
            outputs[o].nbDims = 3;
            for (int32_t i = 0; i < 3; ++i) outputs[o].d[i] = inputs[0].d[lpwca::kOutputDimSource[o][i]];
        }
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        if (nbInputs != lpwca::kNumInputs || nbOutputs != lpwca::kNumOutputs) return false;
        PluginTensorDesc const& desc = inOut[pos].desc;
        return lpwca::supports_combination(pos, to_dtype(desc.type), desc.format == TensorFormat::kLINEAR,
                                           to_dtype(inOut[0].desc.type));
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        lpwca::Shape shape;
        std::string error;
        if (nbInputs != lpwca::kNumInputs ||
            !shape_of(inputs[0].max, inputs[1].max, inputs[2].max, mAttributes.num_heads, &shape, &error)) {
            return 0;
        }
        return lpwca::workspace_bytes(shape);
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*,
                          int32_t nbOutputs) noexcept override {
        std::string error;
        if (nbInputs != lpwca::kNumInputs || nbOutputs != lpwca::kNumOutputs ||
            !shape_of(in[0].dims, in[1].dims, in[2].dims, mAttributes.num_heads, &mShape, &error)) {
            gLogger.error(error);
            return -1;
        }
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        // TensorRT allocated `workspace` with getWorkspaceSize() for the profile's largest shapes, which
        // bounds workspace_bytes() of any shape it lets through; the size is not passed to enqueue, so
        // the kernel's own size check (real for C-ABI callers that own their buffer) is waived here.
        cudaError_t const status = lpwca::launch_forward(
            to_dtype(inputDesc[0].type), inputs[0], static_cast<float const*>(inputs[1]),
            static_cast<float const*>(inputs[2]), outputs[0], static_cast<float*>(outputs[1]), mShape, mAttributes,
            workspace, lpwca::kWorkspaceSizedByCaller, stream);
        if (status != cudaSuccess) {
            gLogger.error(std::string("ccra::LPWCA enqueue: ") + cudaGetErrorString(status));
            return -1;
        }
        return 0;
    }

    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override {
        lpwca::FieldView views[lpwca::kNumFields];
        lpwca::fields_of(mAttributes, views);
        mFields.clear();
        for (auto const& view : views) {
            mFields.emplace_back(view.name, view.data, from_field_type(view.type), view.length);
        }
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
        return &mFieldCollection;
    }

private:
    lpwca::Attributes mAttributes;
    lpwca::Shape mShape{};
    std::vector<PluginField> mFields;
    PluginFieldCollection mFieldCollection{};
};

class LpwcaPluginCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    LpwcaPluginCreator() {
        for (int32_t k = 0; k < lpwca::kNumFields; ++k) {
            mFieldNames.emplace_back(lpwca::kFieldNames[k], nullptr, from_field_type(lpwca::kFieldTypes[k]), 1);
        }
        mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mFieldCollection.fields = mFieldNames.data();
    }

    IPluginV3* createPlugin(AsciiChar const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
        std::vector<lpwca::FieldView> views;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
            PluginField const& f = fc->fields[i];
            views.push_back(lpwca::FieldView{f.name, f.data, to_field_type(f.type), f.length});
        }
        lpwca::Attributes attributes;
        std::string error;
        if (!lpwca::parse_fields(views.data(), static_cast<int32_t>(views.size()), &attributes, &error)) {
            gLogger.error(error + " (node " + (name != nullptr ? name : "?") + ")");
            return nullptr;
        }
        return new (std::nothrow) LpwcaPlugin(attributes);
    }

    PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
    AsciiChar const* getPluginName() const noexcept override { return kPluginName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kPluginVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

private:
    std::vector<PluginField> mFieldNames;
    PluginFieldCollection mFieldCollection{};
};

}  // namespace trt
}  // namespace ccra

#if defined(CCRA_STATIC_REGISTRATION)
namespace ccra {
namespace trt {
// Not REGISTER_TENSORRT_PLUGIN: its PluginRegistrar registers under namespace "" (NvInferRuntime.h),
// while TensorRT's ONNX parser looks a plugin node's creator up by op_type, plugin_version and
// plugin_namespace (onnx-tensorrt FallbackPluginImporter -> IPluginRegistry::getCreator), and our
// node says "ccra". Registered under the creator's own namespace, as TensorRT OSS's plugin library
// does (plugin/api/inferPlugin.cpp: setPluginNamespace(libNamespace), registerCreator(.., libNamespace)).
struct StaticRegistration {
    StaticRegistration() { ::getPluginRegistry()->registerCreator(creator, kPluginNamespace); }
    LpwcaPluginCreator creator{};
};
StaticRegistration const gStaticRegistration{};
}  // namespace trt
}  // namespace ccra
#else
extern "C" TENSORRTAPI nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static ccra::trt::LpwcaPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

extern "C" TENSORRTAPI void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { ccra::trt::gLogger.set(finder); }
#endif
