"""`ccra-export doctor`: what is installed and usable here, and the fix for what is not; with a
bundle, its memory budget (``core.memory_budget``) and how many decode slots fit a Jetson module.

Detection reads files and runs commands (``core.platform``), never imports torch.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ccra_export.core.errors import BundleError, MissingDependencyError, no_language_model
from ccra_export.core.extras import install_command, install_hint, missing
from ccra_export.core.genai_config import GENAI_CONFIG, read_genai_config
from ccra_export.core.manifest import bundle_path, read_manifest
from ccra_export.core.manifest_schema import Manifest
from ccra_export.core.memory_budget import (
    MEASURED_OVERHEAD,
    MIB,
    Footprint,
    KVLayout,
    MemoryBudget,
    RuntimeOverhead,
    plan,
)
from ccra_export.core.platform import TEGRA_RELEASE, detect_jetson, gpus, run_quiet
from ccra_export.runtime.backends import tensorrt_status
from ccra_export.runtime.lpwca_cpu import library_path
from ccra_export.runtime.ort_session import INSTALL_ORT, import_onnxruntime, ort_distributions
from ccra_export.runtime.tower_cache import DEFAULT_TOWER_CACHE_MIB, tower_bytes_per_image
from ccra_export.runtime.vlm_pipeline import LM_DIR

PLUGIN_ENV = "CCRA_LPWCA_PLUGIN"
DEFAULT_PLUGIN = Path("build/plugins/trt_plugins/libccra_lpwca_plugin.so")


@dataclass
class Check:
    component: str
    ok: bool
    detail: str
    fix: str = ""


def _ort_checks() -> list[Check]:
    """ONNX Runtime: which distribution(s) are installed (two break each other), its providers."""
    dists = ort_distributions()
    names = ", ".join(f"{name} {version}" for name, version in dists.items())
    try:
        ort = import_onnxruntime()
    except MissingDependencyError as exc:
        return [Check("ONNX Runtime", False, names or "not installed", str(exc))]
    providers = ort.get_available_providers()
    checks = [Check("ONNX Runtime", True, f"{ort.__version__}, providers: {', '.join(providers)}")]
    checks.append(
        Check(
            "ONNX Runtime distributions",
            len(dists) <= 1,
            names if len(dists) <= 1 else f"{len(dists)} installed: {names}; they overwrite each other's files",
            ""
            if len(dists) <= 1
            else f"keep one: pip uninstall -y {' '.join(dists)}, then install the one you need "
            f"({install_command('cpu')} or {install_command('gpu')} in the ccra-export checkout; on a Jetson, "
            "Jetson AI Lab's onnxruntime-gpu)",
        )
    )
    for provider, use in (("CUDAExecutionProvider", "CUDA"), ("TensorrtExecutionProvider", "--backend ort-trt")):
        checks.append(
            Check(
                f"ORT {provider}",
                provider in providers,
                "available" if provider in providers else "absent",
                ""
                if provider in providers
                else f"for {use}: install onnxruntime-gpu (and only it) "
                "built for your CUDA; on Jetson, the Jetson AI Lab onnxruntime-gpu wheel",
            )
        )
    return checks


def _lm_device_check() -> Check:
    """Which language-model builds (--lm-device) this machine can run."""
    try:
        providers = import_onnxruntime().get_available_providers()
    except MissingDependencyError:
        return Check("Language model devices", False, "none: ONNX Runtime is not installed", INSTALL_ORT)
    devices = ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in providers else [])
    return Check(
        "Language model devices",
        True,
        ", ".join(devices),
        ""
        if "cuda" in devices
        else "a bundle built with --lm-device cuda needs ONNX Runtime's CUDA provider: the onnxruntime-gpu build "
        "for your CUDA (Jetson: JetPack's or Jetson AI Lab's wheel, see docs/install.md)",
    )


def _export_stack_check() -> Check:
    absent = missing("export")
    if absent:
        return Check(
            "PyTorch export stack",
            False,
            f"{', '.join(absent)} not installed: this machine can run, check (recorded reference) and build engines",
            f"only `build` needs it: {install_hint('export')}",
        )
    return Check("PyTorch export stack", True, f"torch {importlib.metadata.version('torch')}: `build` works here")


def run_checks() -> list[Check]:
    checks = _ort_checks()
    usable, reason = tensorrt_status()
    checks.append(
        Check(
            "TensorRT",
            usable,
            reason,
            ""
            if usable
            else (
                "Jetson: TensorRT comes with JetPack (sudo apt install nvidia-jetpack; python3-libnvinfer for Python). "
                "x86: NVIDIA's tensorrt wheel or tarball (TensorRT >= 10)"
            ),
        )
    )
    found = gpus()
    checks.append(
        Check(
            "GPU",
            bool(found),
            ", ".join(f"{n} (sm {cc})" for n, cc in found) or "none visible",
            "" if found else "needs an NVIDIA GPU and driver (nvidia-smi should list it)",
        )
    )
    jetson = detect_jetson()
    if jetson is not None:
        jetpack = f"JetPack {jetson.jetpack}" if jetson.jetpack else "JetPack unknown"
        checks.append(
            Check(
                "Jetson",
                True,
                f"{jetson.model or 'unknown module'}, L4T {jetson.l4t} ({jetpack})",
                ""
                if (jetson.jetpack or "").startswith(("6", "7"))
                else "the TensorRT plugin needs TensorRT >= 10: JetPack 6 or newer",
            )
        )
    else:
        checks.append(Check("Jetson", True, f"not a Jetson ({TEGRA_RELEASE} absent)"))
    checks.append(_lm_device_check())
    checks.append(_export_stack_check())
    cudart = run_quiet(["nvcc", "--version"])
    version = re.search(r"release ([\d.]+)", cudart or "")
    checks.append(
        Check(
            "CUDA toolkit (nvcc)",
            bool(version),
            f"nvcc {version[1]}" if version else "nvcc not found",
            "" if version else "only needed to build the plugin: install the CUDA toolkit (JetPack has it)",
        )
    )
    plugin = Path(os.environ.get(PLUGIN_ENV, DEFAULT_PLUGIN))
    checks.append(
        Check(
            "LPWCA TensorRT plugin",
            plugin.is_file(),
            str(plugin) if plugin.is_file() else f"{plugin} not built",
            "" if plugin.is_file() else f"ccra-export plugins build (or set {PLUGIN_ENV})",
        )
    )
    try:
        checks.append(Check("LPWCA CPU kernel", True, str(library_path())))
    except Exception as exc:  # BackendUnavailableError with its own fix
        checks.append(Check("LPWCA CPU kernel", False, str(exc), "pip install -e . (builds it with CMake)"))
    checks.append(
        Check(
            "CMake",
            shutil.which("cmake") is not None,
            shutil.which("cmake") or "not found",
            "" if shutil.which("cmake") else "apt install cmake (needed for the native libraries)",
        )
    )
    return checks


# --- the memory budget of a bundle (`ccra-export doctor --bundle B`) ---


def _onnx_files(path: Path, root: Path, where: str) -> tuple[Path, list[Path]]:
    """An ONNX file and the external-data files its initializers name (each inside ``root``); the
    graph is read without its data, so a multi-GB decoder costs kilobytes here."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...: all mean an unreadable graph
        raise BundleError(
            f"{path}: unreadable ONNX graph ({type(exc).__name__}); `ccra-export check` re-hashes it"
        ) from None
    names: dict[str, None] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
            if location is not None:
                names.setdefault(location, None)
    folder = path.parent.resolve().relative_to(root.resolve()).as_posix()
    data = [bundle_path(root, f"{folder}/{name}" if folder != "." else name, where) for name in names]
    return path, data


def _bytes(paths: list[Path]) -> int:
    return sum(path.stat().st_size for path in paths)


def kv_layout(bundle: Path) -> KVLayout:
    """The decoder's KV cache as the runtime allocates it: the shape from ``genai_config.json``, the
    element type from the decoder graph's own ``past_key_values`` input (an INT8 or FP16 cache
    says so there, whatever the bundle's precision)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    decoder_dir = bundle / LM_DIR / "decoder"
    config_path = decoder_dir / GENAI_CONFIG
    config = read_genai_config(config_path)
    decoder = config["decoder"]
    path = bundle_path(decoder_dir, decoder["filename"], f"{config_path}: model.decoder.filename")
    name = decoder["inputs"].get("past_key_names", "past_key_values.%d.key") % 0
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:
        raise BundleError(
            f"{path}: unreadable ONNX graph ({type(exc).__name__}); `ccra-export check` re-hashes it"
        ) from None
    found = next((i for i in graph.input if i.name == name), None)
    if found is None:
        raise BundleError(f"{path}: no input {name!r}, which {config_path} names as the first layer's past keys")
    dtype = tensor_dtype_to_np_dtype(found.type.tensor_type.elem_type)
    return KVLayout(
        layers=decoder["num_hidden_layers"],
        kv_heads=decoder["num_key_value_heads"],
        head_size=decoder["head_size"],
        dtype=dtype.name,
        itemsize=dtype.itemsize,
        max_context=config["context_length"],
    )


def _vision_bytes(bundle: Path, manifest: Manifest) -> tuple[int, str]:
    """The vision stage's file bytes: its TensorRT engines where the bundle has one per graph (what
    ``--backend auto`` runs on a Jetson), else its ONNX graphs and their external data."""
    engine = manifest["engine"]
    parts = manifest["graph"]["parts"]
    if engine and len(engine["parts"]) == len(parts):
        files = [
            bundle_path(bundle, p["file"], f"manifest engine.parts[{i}].file") for i, p in enumerate(engine["parts"])
        ]
        return _bytes(files), "TensorRT engines"
    files = []
    for i, part in enumerate(parts):
        files.append(bundle_path(bundle, part["file"], f"manifest graph.parts[{i}].file"))
        files += [
            bundle_path(bundle, name, f"manifest graph.parts[{i}].external_data") for name in part["external_data"]
        ]
    return _bytes(files), "ONNX graphs"


def bundle_footprint(
    bundle: Path, tower_cache_mib: float = DEFAULT_TOWER_CACHE_MIB, overhead: RuntimeOverhead = MEASURED_OVERHEAD
) -> Footprint:
    """What serving ``bundle`` holds before any conversation: the language model's files, the vision
    graphs or engines, the tower cache at its bound (``serve --tower-cache-mib``), and ``overhead``."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)  # checks every listed file is there at its recorded size
    if not manifest.get("language_model"):
        raise no_language_model(bundle)
    lm_dir = bundle / LM_DIR
    config_path = lm_dir / "decoder" / GENAI_CONFIG
    decoder_name = read_genai_config(config_path)["decoder"]["filename"]
    decoder = bundle_path(lm_dir / "decoder", decoder_name, f"{config_path}: model.decoder.filename")
    decoder_file, decoder_data = _onnx_files(decoder, bundle, f"{decoder}: external data")
    embed_file, embed_data = _onnx_files(lm_dir / "embed.onnx", bundle, f"{lm_dir / 'embed.onnx'}: external data")
    vision_bytes, vision_kind = _vision_bytes(bundle, manifest)
    per_image = tower_bytes_per_image(manifest)
    return Footprint(
        decoder_bytes=_bytes([decoder_file, *decoder_data]),
        embeddings_bytes=_bytes([embed_file, *embed_data]),
        vision_bytes=vision_bytes,
        vision_kind=vision_kind,
        tower_cache_bytes=int(tower_cache_mib * MIB) if per_image else 0,
        tower_image_bytes=per_image,
        overhead=overhead,
    )


def memory_budget(
    bundle: Path,
    context: int | None = None,
    parallel: int = 1,
    tower_cache_mib: float = DEFAULT_TOWER_CACHE_MIB,
    measure: bool = False,
) -> MemoryBudget:
    """The bundle's budget at ``context`` tokens per slot for ``parallel`` slots. ``measure``: the
    runtime overhead measured now on this machine (``measure_overhead``, seconds) instead of the
    recorded figure. The context and slot count are checked before anything is measured."""
    bundle = Path(bundle)
    footprint = bundle_footprint(bundle, tower_cache_mib)  # the manifest first: "not a bundle" before any graph
    kv = kv_layout(bundle)
    budget = plan(footprint, kv, context, parallel)  # refuses a bad context or slot count first
    if measure:
        footprint = bundle_footprint(bundle, tower_cache_mib, measure_overhead(bundle, footprint, kv))
        budget = plan(footprint, kv, context, parallel)
    return budget


#: the measuring process: what `serve` imports (the server, when its extra is installed), the
#: pipeline on ONNX Runtime, one question answered; it reports its peak RSS and the tokens cached
_MEASURE = """
import contextlib, json, sys
from PIL import Image
with contextlib.suppress(ImportError):
    import ccra_export.serve.openai.api_server
from ccra_export.runtime.language_model import Sampling
from ccra_export.runtime.vlm_pipeline import Pipeline
pipeline = Pipeline.from_bundle(sys.argv[1], backend="ort", tower_cache_mib=0)
chat = pipeline.chat()
chat.ask("Describe the image.", Image.new("RGB", (64, 48), (128, 128, 128)), Sampling(max_new_tokens=8))
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss": peak, "tokens": chat.cache.length}))
"""
MEASURE_TIMEOUT_S = 900


def measure_overhead(bundle: Path, footprint: Footprint, kv: KVLayout) -> RuntimeOverhead:
    """The runtime overhead of serving ``bundle`` on this machine: the peak RSS of a fresh process
    that imports the server, loads the pipeline (ONNX Runtime, tower cache off: it is counted on its
    own) and answers one question, less the
    weights' file bytes and the KV bytes that answer wrote (the rest of a preallocated cache is
    never touched, so it is not resident). Linux only (it reads /proc)."""
    if not Path("/proc/self/status").is_file():
        raise BundleError("measuring the runtime overhead reads /proc/self/status: Linux only", field="measure")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(bundle)],
            capture_output=True,
            text=True,
            timeout=MEASURE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BundleError(
            f"loading and running it took over {MEASURE_TIMEOUT_S} s", field="bundle", value=bundle
        ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"the measuring process failed: {last}", field="bundle", value=bundle)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    peak, written = int(report["peak_rss"]), int(report["tokens"]) * kv.bytes_per_token
    overhead = max(0, peak - footprint.weights_bytes - written)
    return RuntimeOverhead(
        overhead,
        f"measured now: peak RSS {peak / MIB:.0f} MiB, less {footprint.weights_bytes / MIB:.1f} MiB of weights and "
        f"{written / MIB:.1f} MiB of KV written ({os.uname().machine}, ONNX Runtime CPU provider)",
    )
