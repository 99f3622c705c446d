"""TensorRT build decisions made without TensorRT: typing/flags per version, profiles, engine checks,
ONNX Runtime TensorRT EP options, and `doctor`'s detection (fixture files from real devices)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core.errors import BundleError, ConfigError
from ccra_export.core.platform import jetson_info, parse_nvidia_smi, parse_tegra_release
from ccra_export.engine import ort_trt
from ccra_export.engine.plan import TrtVersion, engine_record, optimization_profiles, precision_plan
from ccra_export.runtime.engine_compat import check_engine

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
            ("10.3.0", "fp16", False, ("FP16",)),  # JetPack 6: weak typing with builder flags
            ("10.3.0", "int8", False, ("INT8", "FP16")),
            ("10.13.2", "fp32", False, ()),
            ("11.1.0", "fp16", True, ()),  # TensorRT 11: strongly typed, flags are gone
            ("11.1.0", "int8", True, ()),
        ],
    )
    def test_auto_follows_the_installed_version(self, version, precision, strong, flags):
        plan = precision_plan(TrtVersion.parse(version), precision)
        assert (plan.strongly_typed, plan.builder_flags) == (strong, flags)

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
        # The flag names are getattr'd on trt.BuilderFlag; TensorRT 10's enum has exactly these spellings.
        assert {f for p in ("fp16", "int8") for f in precision_plan(TrtVersion(10, 3, 0), p).builder_flags} == {
            "FP16",
            "INT8",
        }


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
    assert "rebuild it here" in message and "`ccra-export engine --bundle out/vlm --force`" in message
    assert "\n" not in message
    with pytest.raises(BundleError, match="plugin library differs"):
        check_engine(record, "10.3.0", "8.7", "def")


def test_ort_tensorrt_ep_options(tmp_path):
    profile = optimization_profiles(INPUTS, AXES, {})
    options = ort_trt.provider_options(tmp_path, "fp16", profile, plugin_library=Path("/x/libccra_lpwca_plugin.so"))
    assert options["trt_fp16_enable"] is True and options["trt_int8_enable"] is False
    assert options["trt_engine_cache_path"] == str(tmp_path / "ort_trt_cache")
    assert options["trt_extra_plugin_lib_paths"] == "/x/libccra_lpwca_plugin.so"
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
