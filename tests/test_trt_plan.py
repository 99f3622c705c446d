"""TensorRT build decisions made without TensorRT: typing/flags per version, profiles, engine checks,
ONNX Runtime TensorRT EP options, and `doctor`'s detection (fixture files from real devices)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.cli.output import error_line
from ccra_export.core.config import preset
from ccra_export.core.errors import BundleError, ConfigError
from ccra_export.core.graph_scopes import CCRA_SCOPE, in_scope, node_scope
from ccra_export.core.platform import jetson_info, parse_nvidia_smi, parse_tegra_release, visible_gpus
from ccra_export.engine import ort_trt
from ccra_export.engine.plan import (
    TrtVersion,
    engine_record,
    fp32_islands,
    optimization_profiles,
    pinned_layer,
    precision_plan,
)
from ccra_export.runtime.engine_compat import check_engine
from ccra_export.runtime.vision_backend import cuda_provider_options

FIXTURES = Path(__file__).parent / "fixtures"
INPUTS = [
    {"name": "pixel_values", "dtype": "float16", "shape": ["batch", 3, 336, 336]},
    {"name": "text_embeds", "dtype": "float16", "shape": ["batch", "text_len", 4096]},
    {"name": "text_mask", "dtype": "int64", "shape": ["batch", "text_len"]},
]
AXES = {"batch": {"min": 1, "opt": 1, "max": 8}, "text_len": {"min": 1, "opt": 64, "max": 512}}


class TestPrecisionPlan:
    @pytest.mark.parametrize(
        ("version", "precision", "strong", "flags"),
        [
            # JetPack 6: strongly typed too, since our FP16/INT8 graphs carry FP32 islands that weak
            # typing with the FP16 flag would let TensorRT run in FP16
            ("10.3.0", "fp16", True, ()),
            ("10.3.0", "int8", True, ()),
            ("10.13.2", "fp32", True, ()),
            ("11.1.0", "fp16", True, ()),  # TensorRT 11: strongly typed, flags are gone
            ("11.1.0", "int8", True, ()),
        ],
    )
    def test_auto_is_strongly_typed(self, version, precision, strong, flags):
        plan = precision_plan(TrtVersion.parse(version), precision)
        assert (plan.strongly_typed, plan.builder_flags, plan.pin_fp32) == (strong, flags, False)

    @pytest.mark.parametrize(
        ("precision", "flags", "pin"),
        [
            ("fp16", ("FP16", "OBEY_PRECISION_CONSTRAINTS"), True),
            ("int8", ("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"), True),
            ("fp32", (), False),
        ],
    )
    def test_weak_typing_on_request_pins_the_islands(self, precision, flags, pin):
        plan = precision_plan(TrtVersion.parse("10.3.0"), precision, "weak")
        assert (plan.strongly_typed, plan.builder_flags, plan.pin_fp32) == (False, flags, pin)

    def test_strong_typing_on_request_with_tensorrt_10(self):
        plan = precision_plan(TrtVersion.parse("10.3.0"), "fp16", "strong")
        assert plan.strongly_typed is True and plan.builder_flags == ()
        assert "strongly typed on request" in plan.why

    def test_impossible_requests(self):
        with pytest.raises(ConfigError, match="removed weak typing"):
            precision_plan(TrtVersion.parse("11.0.0"), "fp16", "weak")
        with pytest.raises(ConfigError, match="need TensorRT >= 10"):
            precision_plan(TrtVersion.parse("8.6.1"), "fp16")

    def test_every_flag_name_exists_in_tensorrt_10(self):
        # The flag names are getattr'd on trt.BuilderFlag; TensorRT 10's enum has these spellings
        # (checked by name in NVIDIA's tensorrt-cu12-bindings 10.16 and cu13 11.4 binaries).
        weak = {f for p in ("fp16", "int8") for f in precision_plan(TrtVersion(10, 3, 0), p, "weak").builder_flags}
        assert weak == {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"}


def test_islands_of_an_fp16_graph_are_what_the_conversion_kept_fp32():
    """The pinned list comes from the graph's own types: Softmax and the CCRA module, not the tower."""
    from ccra_export.export.fp16 import convert_to_fp16
    from ccra_export.export.onnx_export import export_model_proto
    from ccra_export.model.vision_model import build_model

    proto = convert_to_fp16(export_model_proto(build_model(preset("tiny"), seed=0)))
    islands = set(fp32_islands(proto, "fp16"))
    nodes = {n.name: n for n in proto.graph.node}
    assert islands and all(name in nodes for name in islands)
    assert {nodes[n].op_type for n in islands} >= {"Softmax"}
    assert any(in_scope(nodes[n], CCRA_SCOPE) for n in islands)  # the CCRA module stays FP32
    tower = [n for n in proto.graph.node if any("encoder" in scope for scope in node_scope(n))]
    tower_matmuls = [n for n in tower if n.op_type == "MatMul"]
    assert tower_matmuls and not any(n.name in islands for n in tower_matmuls)  # the tower runs FP16
    assert fp32_islands(proto, "fp32") == ()
    assert pinned_layer("node_Softmax_12", frozenset({"node_Softmax_12"}))
    assert pinned_layer("node_Softmax_12_3", frozenset({"node_Softmax_12"}))  # the parser's extra layers
    assert not pinned_layer("node_Softmax_123", frozenset({"node_Softmax_12"}))
    # a layer named like another node is that node's, not an extra layer of an island
    assert not pinned_layer("node_Add_1", frozenset({"node_Add"}), frozenset({"node_Add", "node_Add_1"}))


def test_profiles_resolve_every_symbolic_axis():
    profile = optimization_profiles(INPUTS, AXES, {"batch": {"opt": 2}})
    assert profile.shapes["pixel_values"] == ((1, 3, 336, 336), (2, 3, 336, 336), (8, 3, 336, 336))
    assert profile.shapes["text_mask"] == ((1, 1), (2, 64), (8, 512))
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        optimization_profiles(INPUTS, AXES, {"batch": {"opt": 9}})
    with pytest.raises(ConfigError, match="symbolic axis 'seq'"):
        optimization_profiles([{"name": "x", "shape": ["seq"]}], AXES, {})


def test_engine_compatibility():
    plan = precision_plan(TrtVersion(10, 3, 0), "fp16")
    record = engine_record("10.3.0", "Orin", "8.7", "abc", plan, optimization_profiles(INPUTS, AXES, {}), {})
    check_engine(record, "10.3.0", "8.7", "abc")  # same everything: accepted
    with pytest.raises(BundleError) as info:
        check_engine(record, "10.7.0", "9.0", "abc", "out/vlm")
    message = str(info.value)
    assert "TensorRT 10.3.0 built it, this is TensorRT 10.7.0" in message and "this GPU is 9.0" in message
    assert "rebuild it here" in message and "(the engine step with bundle=out/vlm, force)" in message
    assert "`ccra-export engine --bundle out/vlm --force`" in error_line(info.value)  # the CLI's words
    assert "\n" not in message
    with pytest.raises(BundleError, match="plugin library differs"):
        check_engine(record, "10.3.0", "8.7", "def")


@pytest.mark.parametrize(
    ("version", "typing"), [("10.3.0", "auto"), ("10.3.0", "strong"), ("10.3.0", "weak"), ("11.1.0", "auto")]
)
def test_fp32_engines_clear_tf32(version, typing):
    """TensorRT enables TF32 by default (NvInfer.h, BuilderFlag::kTF32: "Enabled by default"): it rounds
    FP32 matmul inputs to 10 mantissa bits, far outside the FP32 parity bound, so FP32 plans clear it."""
    assert precision_plan(TrtVersion.parse(version), "fp32", typing).cleared_flags == ("TF32",)
    assert precision_plan(TrtVersion.parse(version), "fp16", typing).cleared_flags == ()


def test_onnx_runtime_cuda_provider_turns_tf32_off_for_fp32(tmp_path):
    assert cuda_provider_options("fp32") == {"use_tf32": "0"} and cuda_provider_options("fp16") == {}
    profile = optimization_profiles(INPUTS, AXES, {})
    options = ort_trt.provider_options(tmp_path, "fp32", profile)
    assert ort_trt.providers(options, "fp32")[1] == ("CUDAExecutionProvider", {"use_tf32": "0"})


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_ort_tensorrt_ep_options_leave_precision_to_the_graph(tmp_path, precision):
    """No trt_fp16_enable / trt_int8_enable: with either, the provider builds a weakly typed network
    that may run the FP32 islands in FP16; with neither, it builds it strongly typed (TensorRT > 8)."""
    profile = optimization_profiles(INPUTS, AXES, {})
    options = ort_trt.provider_options(tmp_path, precision, profile)
    assert options["trt_fp16_enable"] is False and options["trt_int8_enable"] is False
    assert options["trt_engine_cache_path"] == str(tmp_path / "ort_trt_cache")
    assert "trt_extra_plugin_lib_paths" not in options  # a plain dlopen: the IPluginV3 library registers nothing
    assert options["trt_profile_max_shapes"] == "pixel_values:8x3x336x336,text_embeds:8x512x4096,text_mask:8x512"
    assert ort_trt.providers(options)[0] == ("TensorrtExecutionProvider", options)


class TestDoctor:
    def test_jetson_orin_jetpack_6(self):
        info = jetson_info((FIXTURES / "nv_tegra_release_r36.3").read_text(), (FIXTURES / "model_orin").read_text())
        assert (info.l4t, info.jetpack, info.compute_capability) == ("R36.3.0", "6.0", "8.7")
        assert info.model == "NVIDIA Jetson AGX Orin Developer Kit"

    def test_jetson_xavier_jetpack_5(self):
        info = jetson_info(
            (FIXTURES / "nv_tegra_release_r35.4").read_text(), (FIXTURES / "model_xavier_nx").read_text()
        )
        assert (info.l4t, info.jetpack, info.compute_capability) == ("R35.4.1", "5.1.2", "7.2")

    def test_not_a_release_file(self):
        assert parse_tegra_release("Ubuntu 22.04") is None

    def test_nvidia_smi(self):
        assert parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0\nNVIDIA A10, 8.6\n") == [
            ("NVIDIA H100 80GB HBM3", "9.0"),
            ("NVIDIA A10", "8.6"),
        ]

    def test_gpu_list_follows_cuda_visible_devices(self):
        smi = "0, GPU-aaaa1111-22, NVIDIA H100 80GB HBM3, 9.0\n1, GPU-bbbb3333-44, NVIDIA A10, 8.6\n"
        h100, a10 = ("NVIDIA H100 80GB HBM3", "9.0"), ("NVIDIA A10", "8.6")
        assert visible_gpus(smi, None) == [h100, a10]  # unset: every GPU
        assert visible_gpus(smi, "1") == [a10]
        assert visible_gpus(smi, "GPU-bbbb,0") == [a10, h100]  # UUID prefixes, CUDA's order
        assert visible_gpus(smi, "") == [] and visible_gpus(smi, "-1") == []  # hidden
        assert visible_gpus(smi, "0,7,1") == [h100]  # an invalid entry hides the rest, as CUDA does

    def test_says_plainly_that_tensorrt_is_absent_here(self):
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("TensorRT is installed on this machine")
        result = CliRunner().invoke(main, ["doctor", "--json"])
        assert result.exit_code == 0
        import json

        checks = {c["component"]: c for c in json.loads(result.stdout)}
        assert checks["TensorRT"]["ok"] is False and "TensorRT is not installed" in checks["TensorRT"]["detail"]
        assert "JetPack" in checks["TensorRT"]["fix"]
        assert checks["ONNX Runtime"]["ok"] is True


@pytest.mark.parametrize(
    ("backend", "message"),
    [("trt", "--backend trt: TensorRT is not installed"), ("ort-trt", "no TensorrtExecutionProvider")],
)
def test_gpu_backends_say_what_is_missing_in_one_line(tmp_path, backend, message):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed on this machine")
    result = CliRunner().invoke(
        main, ["build", "--model", "tiny", "--random-weights", "--backend", backend, "-o", str(tmp_path / "b")]
    )
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()
