"""`ccra-export triton`: every config.pbtxt parsed back as Triton's ModelConfig, and a real Triton
(the tritonserver binary of PyPI's nvidia-pytriton, Python backend only) serving the repository
to tritonclient over gRPC streaming and HTTP, with ccra_vision batched by Triton's dynamic batcher.
A split bundle (build --split-vision) is served as ccra_vision_tower + ccra_head, the tower called
only when ccra_vlm's tower cache misses.

The TensorRT and ONNX Runtime backends are not in that binary: their configs are checked here,
not served. Every wait is bounded; the server is stopped however the tests end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2 as pb2

from ccra_export.cli import main
from ccra_export.core.errors import BundleError, ConfigError
from ccra_export.core.manifest import read_manifest
from ccra_export.core.vision_graphs import part_records
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.tower_cache import DEFAULT_TOWER_CACHE_MIB
from ccra_export.runtime.vlm_pipeline import Pipeline
from ccra_export.serve.triton import repository as triton_repo
from ccra_export.serve.triton.config import (
    HEAD_MODEL,
    TOWER_MODEL,
    VISION_MODEL,
    VLM_MODEL,
    batching,
    part_manifest,
    vision_config,
)
from ccra_export.serve.triton.repository import RepoOptions, choose_vision_backend, write_repository
from ccra_export.serve.triton.tensors import read_text, text_tensor
from ccra_export.serve.triton.vlm_model import decode_request_image
from tests.bundles import build
from tests.servers import free_port
from tests.test_generation import PROMPT

NEW_TOKENS = 8
SECOND_PROMPT = "What colour is the animal's fur?"  # another question about the same image
QUEUE_DELAY_US = 300_000  # long enough that concurrent requests reach the batcher together on a busy CPU


def parse(path: Path):
    """config.pbtxt -> ModelConfig, as Triton parses it (an unknown field raises)."""
    return text_format.Parse(path.read_text(), pb2.ModelConfig())


def write(bundle: Path, repo: Path, *extra: str):
    return CliRunner().invoke(main, ["triton", "--bundle", str(bundle), "--repo", str(repo), *extra])


def dims(spec: dict) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in spec["shape"][1:]]


def type_name(field) -> str:
    return pb2.DataType.Name(field.data_type)


# ---------------------------------------------------------------- configs, no server


def test_default_repository_configs_parse_as_model_config(single_bundle, tmp_path):
    result = write(single_bundle, tmp_path / "repo")
    assert result.exit_code == 0, result.output
    assert "onnxruntime_onnx" in result.output and "no TensorRT engine" in result.output
    manifest = read_manifest(single_bundle)
    repo = tmp_path / "repo"
    vision = parse(repo / "ccra_vision" / "config.pbtxt")
    assert vision.name == "ccra_vision" and vision.platform == "onnxruntime_onnx" and not vision.backend
    axis = manifest["dynamic_axes"]["batch"]
    assert vision.max_batch_size == axis["max"]
    assert list(vision.dynamic_batching.preferred_batch_size) == sorted({axis["opt"], axis["max"]} - {1})
    assert vision.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [i.name for i in vision.input] == [s["name"] for s in manifest["graph"]["inputs"]]
    assert [list(i.dims) for i in vision.input] == [dims(s) for s in manifest["graph"]["inputs"]]
    assert [list(o.dims) for o in vision.output] == [dims(s) for s in manifest["graph"]["outputs"]]
    assert [type_name(i) for i in vision.input] == ["TYPE_FP32", "TYPE_FP32", "TYPE_INT64"]
    assert vision.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU  # the LM was built for the CPU
    graph = repo / "ccra_vision" / "1" / "model.onnx"
    assert graph.read_bytes() == (single_bundle / manifest["graph"]["parts"][0]["file"]).read_bytes()

    vlm = parse(repo / "ccra_vlm" / "config.pbtxt")
    assert vlm.backend == "python" and vlm.max_batch_size == 0 and vlm.model_transaction_policy.decoupled
    inputs = {i.name: i for i in vlm.input}
    assert type_name(inputs["image"]) == "TYPE_UINT8" and type_name(inputs["prompt"]) == "TYPE_STRING"
    assert not inputs["image"].optional and not inputs["prompt"].optional
    assert {n for n, i in inputs.items() if i.optional} == {"max_new_tokens", "temperature", "top_p", "seed", "stream"}
    assert [(o.name, type_name(o)) for o in vlm.output] == [("text", "TYPE_STRING")]
    assert vlm.parameters["bundle"].string_value == "bundle"
    copy = repo / "ccra_vlm" / "1" / vlm.parameters["bundle"].string_value
    assert read_manifest(copy)["files"] == manifest["files"]  # a whole bundle, sizes checked
    assert "class TritonPythonModel(VlmModel)" in (repo / "ccra_vlm" / "1" / "model.py").read_text()
    assert "tritonserver --model-repository" in (repo / "README.md").read_text()


def fake_engine_manifest(manifest: dict, sha: str | None) -> dict:
    """The bundle's manifest as if `ccra-export engine` had built a fused-graph engine on an H100."""
    profile = {
        spec["name"]: [[b, *[7 if isinstance(d, str) else d for d in spec["shape"][1:]]] for b in (2, 4, 16)]
        for spec in manifest["graph"]["inputs"]
    }
    engine = {
        "tensorrt_version": "10.13.0",
        "gpu": "NVIDIA H100",
        "compute_capability": "9.0",
        "plugin_sha256": sha,
        "parts": [{"part": "vision", "file": "vision.engine", "profile": profile}],  # format 3: one part
    }
    return {**manifest, "engine": engine, "plugin": {"node": "ccra::LPWCA"}, "export": {**manifest["export"]}}


def test_tensorrt_plan_config_names_the_plugin_library(single_bundle, tmp_path, monkeypatch):
    """Config only: no TensorRT here. The manifest is edited in memory; the bundle copy gets a stand-in engine."""
    bundle = tmp_path / "bundle"
    shutil.copytree(single_bundle, bundle)
    (bundle / "vision.engine").write_bytes(b"engine")
    plugin = tmp_path / "libccra_lpwca_plugin.so"
    plugin.write_bytes(b"\x7fELF plugin")
    static = tmp_path / "libccra_lpwca_plugin_static.so"  # what Triton's plain dlopen can register
    static.write_bytes(b"\x7fELF static plugin")
    from ccra_export.core.hashing import sha256_file

    manifest = fake_engine_manifest(read_manifest(single_bundle), sha256_file(plugin))
    monkeypatch.setattr(triton_repo, "read_manifest", lambda _: manifest)
    monkeypatch.setattr(triton_repo, "check_plugin_library", lambda path: Path(path))
    monkeypatch.setattr(triton_repo, "dynamic_symbols", lambda path: set())
    monkeypatch.setattr(triton_repo, "gpus", lambda: [("NVIDIA H100 80GB HBM3", "9.0")])
    with pytest.raises(ConfigError, match=r"^plugin_library: the engine runs the fused"):
        write_repository(bundle, tmp_path / "r0", RepoOptions())
    result = write_repository(bundle, tmp_path / "repo", RepoOptions(plugin_library=plugin))
    assert result.vision_backend == "tensorrt" and "built for this GPU" in result.reason
    vision = parse(tmp_path / "repo" / "ccra_vision" / "config.pbtxt")
    assert vision.platform == "tensorrt_plan" and vision.default_model_filename == "model.plan"
    assert vision.max_batch_size == 16  # the engine's profile, not the manifest's axes
    assert list(vision.dynamic_batching.preferred_batch_size) == [4, 16]
    assert vision.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert vision.parameters["lpwca_plugin_library"].string_value == static.name
    assert (tmp_path / "repo" / "ccra_vision" / static.name).read_bytes() == static.read_bytes()
    assert not (tmp_path / "repo" / "ccra_vision" / plugin.name).exists()  # getCreators: a dlopen registers nothing
    assert (tmp_path / "repo" / "ccra_vision" / "1" / "model.plan").read_bytes() == b"engine"
    assert f"--backend-config=tensorrt,plugins=/models/ccra_vision/{static.name}" in result.launch
    assert "LD_PRELOAD" not in result.launch
    assert result.launch in (tmp_path / "repo" / "README.md").read_text()
    other = tmp_path / "other.so"
    other.write_bytes(b"\x7fELF another")
    with pytest.raises(ConfigError, match="not the library the engine was built with"):
        write_repository(bundle, tmp_path / "r1", RepoOptions(plugin_library=other))
    monkeypatch.setattr(triton_repo, "dynamic_symbols", lambda path: {"getCreators"})
    with pytest.raises(ConfigError, match=r"libccra_lpwca_plugin_static\.so beside it exports getCreators"):
        write_repository(bundle, tmp_path / "r2", RepoOptions(plugin_library=plugin))
    static.unlink()
    with pytest.raises(ConfigError, match=r"plain dlopen, which registers nothing .* expected libccra_lpwca_plugin_st"):
        write_repository(bundle, tmp_path / "r3", RepoOptions(plugin_library=plugin))


def test_auto_picks_the_engine_only_for_this_gpu(single_bundle):
    manifest = fake_engine_manifest(read_manifest(single_bundle), None)
    unfused = {**manifest, "plugin": None}
    assert choose_vision_backend(single_bundle, unfused, "auto", [("H100", "9.0")])[0] == "tensorrt"
    kind, why = choose_vision_backend(single_bundle, unfused, "auto", [("L4", "8.9")])
    assert kind == "onnxruntime" and "8.9" in why and "9.0" in why
    kind, why = choose_vision_backend(single_bundle, unfused, "auto", [])
    assert kind == "onnxruntime" and "no GPU" in why
    kind, why = choose_vision_backend(single_bundle, manifest, "auto", [])  # fused: ONNX Runtime only from Python
    assert kind == "python" and "Python backend" in why
    with pytest.raises(BundleError, match="this machine has L4"):
        choose_vision_backend(single_bundle, unfused, "tensorrt", [("L4", "8.9")])
    assert choose_vision_backend(single_bundle, unfused, "tensorrt", []) == ("tensorrt", "")  # written for elsewhere
    with pytest.raises(ConfigError, match="fused"):
        choose_vision_backend(single_bundle, manifest, "onnxruntime", [])
    with pytest.raises(BundleError, match="holds no TensorRT engine"):
        choose_vision_backend(single_bundle, read_manifest(single_bundle), "tensorrt", [])


def test_onnxruntime_gpu_and_python_configs(single_bundle):
    manifest = read_manifest(single_bundle)
    policy = batching(manifest, 500, use_engine=False)
    gpu = vision_config(manifest, "onnxruntime_onnx", policy, gpu=True, instances=2)
    parsed = text_format.Parse(text_format.MessageToString(gpu), pb2.ModelConfig())
    assert parsed.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU and parsed.instance_group[0].count == 2
    python = vision_config(manifest, "python", policy, gpu=False, parameters={"graph": "vision.onnx"})
    assert (
        python.backend == "python"
        and not python.platform
        and python.dynamic_batching.max_queue_delay_microseconds == 500
    )


def test_refusals_are_one_line(single_bundle, tmp_path):
    not_bundle = tmp_path / "empty"
    not_bundle.mkdir()
    result = write(not_bundle, tmp_path / "repo")
    assert result.exit_code == 2 and "no manifest.json" in result.output and "Traceback" not in result.output
    no_lm = tmp_path / "no-lm"
    shutil.copytree(single_bundle, no_lm, copy_function=os.link)
    manifest = json.loads((no_lm / "manifest.json").read_text())
    (no_lm / "manifest.json").unlink()  # a hard link: write a new file, the session bundle stays as it is
    (no_lm / "manifest.json").write_text(json.dumps({**manifest, "language_model": None}))
    result = write(no_lm, tmp_path / "repo")
    assert result.exit_code == 2 and "holds no language model" in result.output
    assert not (tmp_path / "repo").exists()
    repo = tmp_path / "taken"
    repo.mkdir()
    (repo / "keep.txt").write_text("mine")
    result = write(single_bundle, repo)
    assert result.exit_code == 2 and "--force" in result.output and (repo / "keep.txt").exists()
    result = write(single_bundle, repo, "--force")
    assert result.exit_code == 0, result.output
    assert not (repo / "keep.txt").exists() and (repo / "ccra_vlm" / "config.pbtxt").is_file()
    result = write(single_bundle, single_bundle / "repo")
    assert result.exit_code == 2 and "--repo" in result.output and "overlaps the bundle" in result.output
    result = write(single_bundle, tmp_path / "r", "--vision-backend", "tvm")
    assert result.exit_code == 2 and "Invalid value for '--vision-backend'" in result.output
    help_text = CliRunner().invoke(main, ["triton", "--help"]).output
    for flag in (
        "--bundle",
        "--repo",
        "--vision-backend",
        "--device",
        "--text-type",
        "--max-queue-delay-us",
        "--force",
    ):
        assert flag in help_text


class FakeTensor:
    def __init__(self, name, array):
        self._name, self.array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self.array


class FakePb:
    Tensor = FakeTensor


def test_string_text_tensors_and_image_errors():
    """The TYPE_STRING branch, which this machine's Triton (24.10 with numpy 2) cannot run end to end."""
    tensor = text_tensor(FakePb, "text", "chat noir é", "string")
    assert tensor.as_numpy().dtype == object and read_text(tensor, "string") == "chat noir é"
    from ccra_export.runtime.inputs import InputError

    with pytest.raises(InputError, match="not a readable image"):
        decode_request_image(b"not an image", 1000)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buffer, format="PNG")
    with pytest.raises(InputError, match="40x30 pixels; the limit is 100"):
        decode_request_image(buffer.getvalue(), 100)


# ---------------------------------------------------------------- split bundles (build --split-vision)


@pytest.fixture(scope="module")
def split_bundle(ccra_bundle):
    """The CCRA checkpoint's bundle (vision_tower.onnx + ccra_head.onnx: split is the CCRA default) with its
    FP32 language model."""
    assert (ccra_bundle / "ccra_head.onnx").exists()
    return ccra_bundle


@pytest.fixture(scope="module")
def single_bundle(tmp_path_factory, ccra_checkpoint):
    """The CCRA checkpoint as one vision.onnx (--single-vision-graph) with its FP32 language model."""
    return build(tmp_path_factory.mktemp("single") / "bundle", ccra_checkpoint, "fp32", "--single-vision-graph")


def check_part_config(config, name: str, part: dict, axis: dict) -> None:
    """A split model's config against its own part record and the bundle's batch axis."""
    assert config.name == name
    assert config.max_batch_size == axis["max"]
    assert list(config.dynamic_batching.preferred_batch_size) == sorted({axis["opt"], axis["max"]} - {1})
    assert [i.name for i in config.input] == [s["name"] for s in part["inputs"]]
    assert [o.name for o in config.output] == [s["name"] for s in part["outputs"]]
    assert [list(i.dims) for i in config.input] == [dims(s) for s in part["inputs"]]
    assert [list(o.dims) for o in config.output] == [dims(s) for s in part["outputs"]]
    expected = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}
    assert [type_name(i) for i in config.input] == [expected[s["dtype"]] for s in part["inputs"]]


def test_split_repository_has_tower_and_head_models(split_bundle, tmp_path):
    manifest = read_manifest(split_bundle)
    tower, head = part_records(manifest)
    axis = manifest["dynamic_axes"]["batch"]
    repo = tmp_path / "repo"
    result = write(split_bundle, repo, "--tower-cache-mib", "64")
    assert result.exit_code == 0, result.output
    assert f"{TOWER_MODEL}: onnxruntime_onnx" in result.output and f"{HEAD_MODEL}: onnxruntime_onnx" in result.output
    assert "tower cache 64 MiB" in result.output
    assert sorted(p.name for p in repo.iterdir()) == sorted(["README.md", TOWER_MODEL, HEAD_MODEL, VLM_MODEL])
    for name, part in ((TOWER_MODEL, tower), (HEAD_MODEL, head)):
        config = parse(repo / name / "config.pbtxt")
        check_part_config(config, name, part, axis)
        assert config.platform == "onnxruntime_onnx"
        assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
        assert (repo / name / "1" / "model.onnx").read_bytes() == (split_bundle / part["file"]).read_bytes()
    assert [list(o.dims) for o in parse(repo / TOWER_MODEL / "config.pbtxt").output] == [[3, 16, 64]]
    vlm = parse(repo / VLM_MODEL / "config.pbtxt")
    parameters = {k: v.string_value for k, v in vlm.parameters.items()}
    assert parameters["tower_model"] == TOWER_MODEL and parameters["head_model"] == HEAD_MODEL
    assert parameters["tower_cache_mib"] == "64" and "vision_model" not in parameters
    assert vlm.model_transaction_policy.decoupled
    readme = (repo / "README.md").read_text()
    assert TOWER_MODEL in readme and HEAD_MODEL in readme and "64 MiB" in readme

    python = tmp_path / "python"
    assert write(split_bundle, python, "--vision-backend", "python").exit_code == 0
    for name, part in ((TOWER_MODEL, tower), (HEAD_MODEL, head)):
        config = parse(python / name / "config.pbtxt")
        check_part_config(config, name, part, axis)
        assert config.backend == "python" and not config.platform
        assert config.parameters["graph"].string_value == Path(part["file"]).name
        assert (python / name / "1" / part["file"]).read_bytes() == (split_bundle / part["file"]).read_bytes()
        assert "class TritonPythonModel(VisionModel)" in (python / name / "1" / "model.py").read_text()
    cache = parse(python / VLM_MODEL / "config.pbtxt").parameters["tower_cache_mib"].string_value
    assert float(cache) == DEFAULT_TOWER_CACHE_MIB


def test_fp16_head_config_gives_the_map_in_fp32_and_an_older_bundle_its_fp16(bundles):
    """An FP16 bundle's map is FP32 (mostly subnormal in FP16 at llava sizes); Triton's config
    follows each graph's recorded types, so a bundle built before that still serves its FP16 map."""
    manifest = read_manifest(bundles("--model", "tiny", "--random-weights", "--precision", "fp16", "--seed", "3"))
    head = part_records(manifest)[-1]
    policy = batching(part_manifest(manifest, head), 2000, use_engine=False)

    def types(part: dict) -> dict[str, str]:
        config = vision_config(part_manifest(manifest, part), "onnxruntime_onnx", policy, gpu=False, name=HEAD_MODEL)
        return {o.name: type_name(o) for o in config.output}

    assert types(head) == {"visual_tokens": "TYPE_FP16", "lpwca_attention": "TYPE_FP32"}
    older = {**head, "outputs": [{**o, "dtype": "float16"} for o in head["outputs"]]}
    assert types(older) == {"visual_tokens": "TYPE_FP16", "lpwca_attention": "TYPE_FP16"}


def fake_split_engine_manifest(manifest: dict, sha: str | None) -> dict:
    """The split bundle's manifest as if `ccra-export engine` had built both engines (fused head) on an
    H100, each with its own profile: the tower up to batch 8, the head up to 16."""

    def profile(part: dict, batches: tuple[int, int, int]) -> dict:
        return {
            spec["name"]: [[b, *[7 if isinstance(d, str) else d for d in spec["shape"][1:]]] for b in batches]
            for spec in part["inputs"]
        }

    tower, head = part_records(manifest)
    engine = {
        "tensorrt_version": "10.13.0",
        "gpu": "NVIDIA H100",
        "compute_capability": "9.0",
        "plugin_sha256": sha,
        "parts": [
            {"part": "vision_tower", "file": "vision_tower.engine", "profile": profile(tower, (1, 2, 8))},
            {"part": "ccra_head", "file": "ccra_head.engine", "profile": profile(head, (2, 4, 16))},
        ],
    }
    return {**manifest, "engine": engine, "plugin": {"node": "ccra::LPWCA"}}


def test_split_tensorrt_plan_configs_give_the_plugin_to_the_head_only(split_bundle, tmp_path, monkeypatch):
    """Config only, as for a single graph: stand-in engines, the manifest edited in memory."""
    bundle = tmp_path / "bundle"
    shutil.copytree(split_bundle, bundle, copy_function=os.link)  # new files only: the module's bundle stays
    (bundle / "vision_tower.engine").write_bytes(b"tower engine")
    (bundle / "ccra_head.engine").write_bytes(b"head engine")
    plugin = tmp_path / "libccra_lpwca_plugin.so"
    plugin.write_bytes(b"\x7fELF plugin")
    static = tmp_path / "libccra_lpwca_plugin_static.so"
    static.write_bytes(b"\x7fELF static plugin")
    from ccra_export.core.hashing import sha256_file

    manifest = fake_split_engine_manifest(read_manifest(split_bundle), sha256_file(plugin))
    monkeypatch.setattr(triton_repo, "read_manifest", lambda _: manifest)
    monkeypatch.setattr(triton_repo, "check_plugin_library", lambda path: Path(path))
    monkeypatch.setattr(triton_repo, "dynamic_symbols", lambda path: set())
    monkeypatch.setattr(triton_repo, "gpus", lambda: [("NVIDIA H100 80GB HBM3", "9.0")])
    with pytest.raises(ConfigError, match=r"^plugin_library: the engine runs the fused"):
        write_repository(bundle, tmp_path / "r0", RepoOptions())
    repo = tmp_path / "repo"
    result = write_repository(bundle, repo, RepoOptions(plugin_library=plugin))
    assert result.vision_backend == "tensorrt" and "built for this GPU" in result.reason
    assert list(result.batching) == [TOWER_MODEL, HEAD_MODEL]
    tower, head = parse(repo / TOWER_MODEL / "config.pbtxt"), parse(repo / HEAD_MODEL / "config.pbtxt")
    for config in (tower, head):
        assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
        assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert tower.max_batch_size == 8 and list(tower.dynamic_batching.preferred_batch_size) == [2, 8]
    assert head.max_batch_size == 16 and list(head.dynamic_batching.preferred_batch_size) == [4, 16]
    assert [i.name for i in tower.input] == ["pixel_values"] and [o.name for o in tower.output] == ["tower_features"]
    assert [i.name for i in head.input] == ["tower_features", "text_embeds", "text_mask"]
    assert (repo / TOWER_MODEL / "1" / "model.plan").read_bytes() == b"tower engine"
    assert (repo / HEAD_MODEL / "1" / "model.plan").read_bytes() == b"head engine"
    assert head.parameters["lpwca_plugin_library"].string_value == static.name
    assert (repo / HEAD_MODEL / static.name).read_bytes() == static.read_bytes()
    assert "lpwca_plugin_library" not in tower.parameters and not (repo / TOWER_MODEL / static.name).exists()
    assert f"--backend-config=tensorrt,plugins=/models/{HEAD_MODEL}/{static.name}" in result.launch
    assert result.launch in (repo / "README.md").read_text()
    unfused = {**manifest, "plugin": None, "engine": {**manifest["engine"], "plugin_sha256": None}}
    monkeypatch.setattr(triton_repo, "read_manifest", lambda _: unfused)
    result = write_repository(bundle, tmp_path / "unfused", RepoOptions())
    assert result.launch == "tritonserver --model-repository=/models"
    assert not any(p.suffix == ".so" for p in (tmp_path / "unfused").rglob("*"))


# ---------------------------------------------------------------- a real Triton


def pytriton_server() -> tuple[Path, Path, Path] | None:
    """(tritonserver, the Python backend folder, this Python's stub) from nvidia-pytriton, if installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = (
        root / "bin" / "tritonserver",
        root / "backends" / "python",
        root / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    return found if all(p.exists() for p in found) else None


def backend_directory(dest: Path, python_backend: Path, stub: Path) -> Path:
    """A backends folder Triton can use: the Python backend plus the stub built for this Python
    (nvidia-pytriton ships one stub per Python version and copies the right one in at run time)."""
    target = dest / "python"
    shutil.copytree(python_backend, target, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, target / "triton_python_backend_stub")
    return dest


def server_env(server: Path) -> dict[str, str]:
    """The stub links libpython: a pyenv (or any non-system) Python needs its LIBDIR on the library
    path, or the stub loads the system libpython. The stub's embedded Python takes its prefix from
    the first python3 on PATH, so this environment's bin goes first: ccra_export imports there."""
    libraries = [sysconfig.get_config_var("LIBDIR"), str(server.parents[3] / "nvidia_pytriton.libs")]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libraries, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@contextlib.contextmanager
def running_triton(repo: Path, workdir: Path, models: tuple[str, ...] = (VISION_MODEL, VLM_MODEL)):
    found = pytriton_server()
    if found is None:
        pytest.skip("no tritonserver binary: install nvidia-pytriton (it ships Triton with the Python backend)")
    server, python_backend, stub = found
    backends = backend_directory(workdir / "backends", python_backend, stub)
    http, grpc, metrics = free_port(), free_port(), free_port()
    command = [
        str(server),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        "--disable-auto-complete-config",  # Triton runs the configs exactly as written
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--metrics-port={metrics}",
        "--exit-timeout-secs=5",
    ]
    log_path = workdir / "tritonserver.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_env(server))
    try:
        deadline = time.monotonic() + 90
        ready = False
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                paths = ["/v2/health/ready", *(f"/v2/models/{model}/ready" for model in models)]
                ready = all(httpx.get(f"http://127.0.0.1:{http}{path}", timeout=2).status_code == 200 for path in paths)
            if ready:
                break
            time.sleep(0.25)
        if not ready:
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"tritonserver was not ready in 90 s (exit {process.poll()}):\n{tail}")
        yield f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def triton(single_bundle, tmp_path_factory):
    """Triton serving the repository `ccra-export triton --vision-backend python --text-type uint8` writes."""
    workdir = tmp_path_factory.mktemp("triton")
    repo = workdir / "repo"
    extra = ["--vision-backend", "python", "--text-type", "uint8", "--max-queue-delay-us", str(QUEUE_DELAY_US)]
    result = write(single_bundle, repo, *extra, "--max-new-tokens", str(NEW_TOKENS))
    assert result.exit_code == 0, result.output
    with running_triton(repo, workdir) as endpoints:
        yield endpoints


@pytest.fixture(scope="module")
def photo(cat):
    buffer = io.BytesIO()
    cat.resize((160, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pipeline(single_bundle):
    return Pipeline.from_bundle(single_bundle)


@pytest.fixture(scope="module")
def greedy_pieces(pipeline, photo) -> list[str]:
    """The pieces ``Pipeline.generate`` streams for the request (text at UTF-8 boundaries: a random
    tiny model may answer in bytes that make fewer pieces than tokens)."""
    picture = Image.open(io.BytesIO(photo)).convert("RGB")
    pieces: list[str] = []
    sampling = Sampling(max_new_tokens=NEW_TOKENS, stop_ids=pipeline.lm.eos_ids)
    pipeline.generate(picture, PROMPT, sampling, on_text=pieces.append)
    return pieces


@pytest.fixture(scope="module")
def greedy(greedy_pieces) -> str:
    return "".join(greedy_pieces)


def grpc_input(name: str, array: np.ndarray, datatype: str):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def utf8(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8)


def stream_vlm(url: str, inputs: list, timeout: float = 60.0) -> tuple[list[str], list[str]]:
    """ccra_vlm over a gRPC stream: (text pieces, errors), until Triton's final-response flag."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    pieces, errors = [], []
    try:
        client.async_stream_infer("ccra_vlm", inputs, enable_empty_final_response=True)
        deadline = time.monotonic() + timeout
        while True:
            result, error = events.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                errors.append(str(error))
                break
            text = result.as_numpy("text")
            if text is not None:
                pieces.append(text.tobytes().decode())
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    return pieces, errors


def test_grpc_stream_gives_the_pipelines_greedy_answer_token_by_token(triton, photo, greedy, greedy_pieces):
    _, grpc_url, _ = triton
    inputs = [grpc_input("image", np.frombuffer(photo, np.uint8), "UINT8"), grpc_input("prompt", utf8(PROMPT), "UINT8")]
    pieces, errors = stream_vlm(grpc_url, inputs)
    assert not errors
    # one response per piece the pipeline streams (a piece ends at a UTF-8 boundary, so a random tiny
    # model answering in partial byte sequences streams fewer pieces than tokens)
    assert pieces == greedy_pieces, (pieces, greedy_pieces)
    assert "".join(pieces) == greedy


def http_text(value) -> str:
    """A UINT8 output in Triton's JSON (a one-element tensor comes back as a bare number)."""
    return bytes(value if isinstance(value, list) else [value]).decode()


def test_http_generate_and_generate_stream(triton, photo, greedy, greedy_pieces):
    """tritonclient.http refuses decoupled models (Triton answers 501); HTTP clients use the generate
    extension: /generate for one response (stream false), /generate_stream for server-sent events."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http_url, _, _ = triton
    body = {"image": list(photo), "prompt": list(PROMPT.encode()), "max_new_tokens": NEW_TOKENS}
    one = httpx.post(f"http://{http_url}/v2/models/ccra_vlm/generate", json={**body, "stream": False}, timeout=60)
    assert one.status_code == 200, one.text
    assert http_text(one.json()["text"]) == greedy
    events = httpx.post(f"http://{http_url}/v2/models/ccra_vlm/generate_stream", json=body, timeout=60)
    data = [json.loads(line[len("data: ") :]) for line in events.text.splitlines() if line.startswith("data: ")]
    assert [http_text(d["text"]) for d in data] == greedy_pieces and "".join(greedy_pieces) == greedy
    client = httpclient.InferenceServerClient(http_url)
    tensor = httpclient.InferInput("image", [len(photo)], "UINT8")
    tensor.set_data_from_numpy(np.frombuffer(photo, np.uint8))
    with pytest.raises(InferenceServerException, match="decoupled"):
        client.infer("ccra_vlm", [tensor])


def test_bad_requests_get_one_line_errors_and_triton_keeps_serving(triton, photo):
    _, grpc_url, _ = triton
    bad_image = [grpc_input("image", utf8("not a png"), "UINT8"), grpc_input("prompt", utf8(PROMPT), "UINT8")]
    _, errors = stream_vlm(grpc_url, bad_image)
    assert len(errors) == 1 and "image: not a readable image" in errors[0]
    hot = [
        grpc_input("image", np.frombuffer(photo, np.uint8), "UINT8"),
        grpc_input("prompt", utf8(PROMPT), "UINT8"),
        grpc_input("temperature", np.array([-1.0], np.float32), "FP32"),
    ]
    _, errors = stream_vlm(grpc_url, hot)
    assert len(errors) == 1 and "temperature: -1.0" in errors[0] and "--" not in errors[0]
    sampled = [*hot[:2], grpc_input("max_new_tokens", np.array([3], np.int32), "INT32")]
    pieces, errors = stream_vlm(grpc_url, sampled)
    assert not errors and pieces


def test_concurrent_vision_requests_are_batched(triton, pipeline):
    """Several requests at once: Triton's statistics show fewer executions than inferences, and each
    batched answer equals the vision graph run on that request alone."""
    import tritonclient.grpc as grpcclient

    _, grpc_url, _ = triton
    client = grpcclient.InferenceServerClient(grpc_url)
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(6):  # one prompt length: Triton batches requests whose shapes match
        requests.append(
            {
                "pixel_values": rng.standard_normal((1, 3, 56, 56)).astype(np.float32),
                "text_embeds": rng.standard_normal((1, 5, 96)).astype(np.float32),
                "text_mask": np.ones((1, 5), np.int64),
            }
        )
    types = {"pixel_values": "FP32", "text_embeds": "FP32", "text_mask": "INT64"}

    def stats() -> tuple[int, int]:
        model = client.get_inference_statistics("ccra_vision").model_stats[0]
        return model.inference_count, model.execution_count

    inferences, executions = stats()
    answers: queue.Queue = queue.Queue()
    for index, feed in enumerate(requests):
        inputs = [grpc_input(name, array, types[name]) for name, array in feed.items()]
        client.async_infer(
            "ccra_vision", inputs, callback=lambda result, error, i=index: answers.put((i, result, error))
        )
    received = [answers.get(timeout=60) for _ in requests]
    assert all(error is None for _, _, error in received), [error for _, _, error in received]
    after_inferences, after_executions = stats()
    assert after_inferences - inferences == len(requests)
    assert after_executions - executions < len(requests), "no two requests were batched together"
    for index, result, _ in received:
        alone = pipeline.vision.run(requests[index])
        np.testing.assert_allclose(result.as_numpy("visual_tokens"), alone["visual_tokens"], rtol=1e-5, atol=1e-5)
    client.close()


def test_triton_log_shows_no_python_errors(triton):
    """Runs last: nothing the models did printed a traceback (DLPack capsules, BLS, error responses)."""
    _, _, log_path = triton
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log and "PyCapsule" not in log, log[-3000:]


@pytest.fixture(scope="module")
def split_triton(split_bundle, tmp_path_factory):
    """Triton serving a split bundle's repository (--vision-backend python --text-type uint8)."""
    workdir = tmp_path_factory.mktemp("split-triton")
    repo = workdir / "repo"
    result = write(
        split_bundle, repo, "--vision-backend", "python", "--text-type", "uint8", "--max-new-tokens", str(NEW_TOKENS)
    )
    assert result.exit_code == 0, result.output
    with running_triton(repo, workdir, (TOWER_MODEL, HEAD_MODEL, VLM_MODEL)) as endpoints:
        yield endpoints


def test_split_second_question_about_an_image_runs_only_the_head(split_triton, split_bundle, photo):
    """Two questions about one image over gRPC streaming: each answer is the split pipeline's greedy
    answer, and Triton's statistics show the tower ran once (the second request hit ccra_vlm's tower
    cache) while the head ran for both."""
    import tritonclient.grpc as grpcclient

    _, grpc_url, log_path = split_triton
    local = Pipeline.from_bundle(split_bundle)
    picture = Image.open(io.BytesIO(photo)).convert("RGB")
    greedy = Sampling(max_new_tokens=NEW_TOKENS, stop_ids=local.lm.eos_ids)
    for prompt in (PROMPT, SECOND_PROMPT):
        inputs = [
            grpc_input("image", np.frombuffer(photo, np.uint8), "UINT8"),
            grpc_input("prompt", utf8(prompt), "UINT8"),
        ]
        pieces, errors = stream_vlm(grpc_url, inputs)
        assert not errors and pieces
        assert "".join(pieces) == local.generate(picture, prompt, greedy), prompt
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        counts = {
            name: client.get_inference_statistics(name).model_stats[0].inference_count
            for name in (TOWER_MODEL, HEAD_MODEL)
        }
    finally:
        client.close()
    assert counts == {TOWER_MODEL: 1, HEAD_MODEL: 2}
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log and "PyCapsule" not in log, log[-3000:]


def test_only_the_files_the_manifest_lists_are_carried(single_bundle, tmp_path):
    """A stray file or a symlink out of a downloaded bundle never lands in a repository meant to be shipped."""
    bundle = tmp_path / "bundle"
    shutil.copytree(single_bundle, bundle, copy_function=os.link)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the repository")
    (bundle / "notes").symlink_to(secret)
    (bundle / "stray.bin").write_bytes(b"x")
    result = write(bundle, tmp_path / "repo")
    assert result.exit_code == 0, result.output
    carried = tmp_path / "repo" / "ccra_vlm" / "1" / "bundle"
    assert not (carried / "notes").exists() and not (carried / "stray.bin").exists()
    listed = set(read_manifest(single_bundle)["files"]) | {"manifest.json"}
    assert {str(p.relative_to(carried)) for p in carried.rglob("*") if p.is_file()} == listed
