"""`ccra-export triton`: a Triton Inference Server model repository that serves a bundle as it is.

    REPO/
      README.md                 how to start Triton on it (Triton reads only the model folders)
      ccra_vision/
        config.pbtxt            tensorrt_plan | onnxruntime_onnx | python, dims and batching from the manifest
        libccra_lpwca_plugin_static.so  the LPWCA TensorRT plugin, registering at load (tensorrt_plan
                                with a fused graph only; Triton loads it with a plain dlopen)
        1/model.plan            the engine, or 1/model.onnx, or 1/model.py + the ONNX graph
      ccra_vlm/
        config.pbtxt            python backend, decoupled (a split bundle: tower_model, head_model, tower_cache_mib)
        1/model.py              subclasses ccra_export.serve.triton.vlm_model.VlmModel
        1/bundle/               the whole bundle (manifest, language model, tokenizer, graphs)

A split bundle (``build --split-vision``) has ``ccra_vision_tower/`` (vision_tower.onnx or
vision_tower.engine) and ``ccra_head/`` (ccra_head.onnx or ccra_head.engine, and the plugin for a
fused head) in place of ``ccra_vision/``, each laid out and configured like it from its own part
record; ``ccra_vlm`` calls the tower only for images missing from its tower-output cache.

The repository is self-contained: it can be copied to another machine or mounted into a
container without the bundle. Files are hard-linked from the bundle where they are on the same
filesystem (no second copy on disk; bundles are replaced by rename, never edited in place) and
copied otherwise. It is written to a staging directory and renamed into place when complete.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ccra_export import __version__
from ccra_export.core.atomic import staged_directory
from ccra_export.core.errors import BundleError, ConfigError, Remedy, no_language_model
from ccra_export.core.genai_config import GENAI_CONFIG, read_genai_config
from ccra_export.core.hashing import sha256_file
from ccra_export.core.manifest import MANIFEST_NAME, bundle_path, read_manifest
from ccra_export.core.manifest_schema import EngineTarget, Manifest
from ccra_export.core.platform import gpus
from ccra_export.core.plugin_library import CREATOR_SYMBOLS, NotAPluginLibrary, check_plugin_library, dynamic_symbols
from ccra_export.core.vision_graphs import engine_records, is_split, part_records
from ccra_export.runtime.tower_cache import DEFAULT_TOWER_CACHE_MIB
from ccra_export.serve.triton.config import (
    HEAD_MODEL,
    HEAD_MODEL_PARAMETER,
    PLATFORMS,
    PYTHON_BACKEND,
    TEXT_TYPES,
    TOWER_CACHE_PARAMETER,
    TOWER_MODEL,
    TOWER_MODEL_PARAMETER,
    VISION_MODEL,
    VISION_MODEL_PARAMETER,
    VLM_MODEL,
    Batching,
    batching,
    model_config_pb2,
    part_manifests,
    to_pbtxt,
    vision_config,
    vlm_config,
)

VISION_BACKENDS = ("auto", "tensorrt", "onnxruntime", "python")
DEVICES = ("auto", "gpu", "cpu")
VERSION = "1"
BUNDLE_DIR = "bundle"

_SHIM = '''"""{model}: written by `ccra-export triton` {version}; the code is {module}.

Triton's Python backend stub runs this file with the Python it finds (a container's python3, or
the first python3 on PATH): ccra-export must be installed there.
"""

import triton_python_backend_utils as pb_utils

try:
    from {module} import {cls}
except ImportError as exc:
    raise ImportError(
        "{model}: the Python that runs Triton's Python backend cannot import ccra_export "
        f"({{exc}}); install it there from a copy of the ccra-export checkout (pip install '/opt/ccra-export[gpu]', "
        "or [cpu]), or put the environment that has it first on PATH"
    ) from exc


class TritonPythonModel({cls}):
    pb = pb_utils
'''


@dataclass(frozen=True)
class RepoOptions:
    """What `ccra-export triton` writes; the defaults are the CLI's."""

    vision_backend: str = "auto"
    device: str = "auto"
    text_type: str = "string"
    max_queue_delay_us: int = 2000
    vision_instances: int = 1
    vlm_instances: int = 1
    max_new_tokens: int = 256
    plugin_library: Path | None = None
    tower_cache_mib: float = DEFAULT_TOWER_CACHE_MIB  # split bundles: ccra_vlm's cache of tower outputs


@dataclass
class RepoResult:
    repo: Path
    vision_backend: str  # tensorrt | onnxruntime | python
    platform: str  # the config's platform or backend
    reason: str  # why auto chose it ("" when asked for)
    gpu: bool  # the vision models' instance group
    batching: dict[str, Batching]  # each vision model's (ccra_vision; or ccra_vision_tower and ccra_head)
    copied: bool  # some files were copied rather than hard-linked (another filesystem)
    launch: str  # a tritonserver command line for this repository
    tower_cache_mib: float | None  # a split bundle's tower cache in ccra_vlm; None for a single graph
    notes: list[str] = field(default_factory=list)


def engine_gpu_mismatch(engine: EngineTarget, local: list[tuple[str, str]]) -> str | None:
    """Why the engine cannot run on this machine's GPUs, or None when one of them matches."""
    built = f"{engine.get('gpu') or 'a GPU'} (compute capability {engine['compute_capability']})"
    if not local:
        return f"the engine was built for {built} and this machine shows no GPU to run it on"
    if any(capability == engine["compute_capability"] for _, capability in local):
        return None
    here = ", ".join(f"{name} ({capability})" for name, capability in local)
    return f"the engine was built for {built}; this machine has {here}"


def fused(manifest: Manifest) -> bool:
    """The graph has the fused ccra::LPWCA node (a TensorRT plugin; ONNX Runtime runs it from Python)."""
    return bool(manifest.get("plugin")) or manifest.get("export", {}).get("lpwca") == "fused"


def choose_vision_backend(
    bundle: Path, manifest: Manifest, requested: str, local_gpus: list[tuple[str, str]]
) -> tuple[str, str]:
    """(tensorrt | onnxruntime | python, why auto chose it)."""
    if requested not in VISION_BACKENDS:
        raise ConfigError(f"expected one of {', '.join(VISION_BACKENDS)}", field="vision_backend", value=requested)
    engine = manifest.get("engine")
    if requested == "python":
        return "python", ""
    if requested == "tensorrt":
        if not engine:
            raise BundleError(
                f"bundle {bundle} holds no TensorRT engine; build one on the serving GPU",
                field="vision_backend",
                value=requested,
                remedy=Remedy("engine", (("bundle", bundle),)),
            )
        mismatch = engine_gpu_mismatch(engine, local_gpus)
        if mismatch and local_gpus:
            raise BundleError(
                f"{mismatch}; serve the vision graph on onnxruntime, or rebuild the engine on the serving GPU",
                field="vision_backend",
                value=requested,
                remedy=Remedy("engine", (("bundle", bundle), ("force", True))),
            )
        return "tensorrt", ""
    if requested == "onnxruntime":
        if fused(manifest):
            raise ConfigError(
                "the graph has the fused ccra::LPWCA node, whose ONNX Runtime kernel ccra-export registers from "
                "Python; Triton's ONNX Runtime backend cannot run it: serve the vision graph on the python backend, "
                "or on tensorrt with the bundle's engine",
                field="vision_backend",
                value=requested,
            )
        return "onnxruntime", ""
    if engine:
        mismatch = engine_gpu_mismatch(engine, local_gpus)
        if mismatch is None:
            return (
                "tensorrt",
                f"auto: the bundle's TensorRT engine was built for this GPU ({engine['compute_capability']})",
            )
        why = f"{mismatch} (a tensorrt vision backend, asked for, uses it anyway)"
    else:
        why = "the bundle holds no TensorRT engine"
    if fused(manifest):
        return "python", f"auto: {why}; the fused LPWCA node runs on ONNX Runtime only inside the Python backend"
    return "onnxruntime", f"auto: {why}"


def place(source: Path, target: Path) -> bool:
    """Hard-link ``source`` at ``target`` (copy where linking fails); True when it was copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return False
    except OSError:  # another filesystem (EXDEV), or one without hard links
        shutil.copy2(source, target)
        return True


def mirror_bundle(bundle: Path, target: Path, manifest: Manifest) -> bool:
    """The manifest and the files it lists under ``target``; True if any was copied.

    Only what the manifest lists, each resolved inside the bundle (``bundle_path``): a stray file or
    a symlink out of a downloaded bundle is never carried into a repository meant to be shipped."""
    copied = place(bundle / MANIFEST_NAME, target / MANIFEST_NAME)
    for name in sorted(manifest["files"]):
        copied |= place(bundle_path(bundle, name, f"files[{name!r}]"), target / name)
    return copied


def check_paths(bundle: Path, repo: Path, force: bool) -> None:
    """Refuse a repository that would replace or sit inside the bundle, or replace files unasked."""
    root, out = bundle.resolve(), repo.resolve()
    if out == root or root.is_relative_to(out) or out.is_relative_to(root):
        raise BundleError(
            f"overlaps the bundle {bundle}; write the repository somewhere else", field="repo", value=repo
        )
    if repo.exists() and not repo.is_dir():
        raise BundleError("exists and is not a directory", field="repo", value=repo)
    if repo.is_dir() and any(repo.iterdir()) and not force:
        raise BundleError(
            "already holds files; pass {force} to replace it", field="repo", value=repo, mentions=("force",)
        )


def plugin_for_engine(manifest: Manifest, library: Path | None) -> Path | None:
    """The plugin library Triton loads for the engine (None for an unfused graph): the
    static-registration build beside ``library``, once ``library`` is checked against the hash the
    engine build recorded.

    Triton's TensorRT backend loads a plugin library with a plain dlopen (tensorrt_backend
    src/tensorrt.cc ``plugins``, src/shared_library.cc: RTLD_NOW | RTLD_LOCAL), as LD_PRELOAD would:
    nothing calls ``getCreators`` then, so only a library that registers its creator when loaded
    can serve the engine. CMake builds both from one source into one folder (trt_plugins/lpwca).
    """
    if not fused(manifest):
        return None
    if library is None:
        raise ConfigError(
            "the engine runs the fused ccra::LPWCA node as a TensorRT plugin; give the library it was built with "
            "(libccra_lpwca_plugin.so, built for the serving machine's TensorRT)",
            field="plugin_library",
        )
    library = check_plugin_library(library)
    recorded = (manifest.get("engine") or {}).get("plugin_sha256")
    if recorded and sha256_file(library) != recorded:
        raise ConfigError(
            "not the library the engine was built with (sha256 differs)", field="plugin_library", value=library
        )
    return static_registration_library(library)


def static_registration_library(library: Path) -> Path:
    """``libX_static.so`` beside ``libX.so``: an ELF shared object that does not export the
    ``getCreators`` entry point (it registers its creator from a constructor instead)."""
    static = library.with_name(f"{library.stem}_static{library.suffix}")
    if not static.is_file():
        raise ConfigError(
            f"Triton loads plugins with a plain dlopen, which registers nothing from this getCreators library; "
            f"expected {static.name}, built beside it from the same source (it needs libnvinfer at build)",
            field="plugin_library",
            value=library,
            remedy=Remedy("plugins build"),
        )
    try:
        symbols = dynamic_symbols(static)
    except (OSError, NotAPluginLibrary) as exc:
        raise ConfigError(f"{static.name} beside it: {exc}", field="plugin_library", value=library) from None
    if symbols & set(CREATOR_SYMBOLS):
        raise ConfigError(
            f"{static.name} beside it exports {' / '.join(sorted(symbols & set(CREATOR_SYMBOLS)))}: not the "
            "static-registration build",
            field="plugin_library",
            value=library,
            remedy=Remedy("plugins build"),
        )
    return static


def holds_lpwca(manifest: Manifest, model: str) -> bool:
    """The model's graph has the fused ccra::LPWCA node: the single graph or CCRA's head, never
    the CLIP tower."""
    return fused(manifest) and model != TOWER_MODEL


def write_vision_model(
    bundle: Path,
    model_dir: Path,
    manifest: Manifest,
    kind: str,
    policy: Batching,
    plugin: Path | None,
    *,
    gpu: bool,
    instances: int,
) -> bool:
    """One vision model's folder (``manifest``: a ``part_manifest``; the model is named by the
    folder); True when a file was copied."""
    copied = False
    parameters = {"tool_version": __version__}
    (graph,) = part_records(manifest)
    if kind == "tensorrt":
        copied |= place(bundle / engine_records(manifest)[graph["name"]]["file"], model_dir / VERSION / "model.plan")
        if plugin is not None:
            copied |= place(plugin, model_dir / plugin.name)
            parameters["lpwca_plugin_library"] = plugin.name
    else:
        name = "model.onnx" if kind == "onnxruntime" else Path(graph["file"]).name
        copied |= place(bundle / graph["file"], model_dir / VERSION / name)
        for external in graph["external_data"]:  # ONNX names them relative to the graph file
            copied |= place(bundle / external, model_dir / VERSION / Path(external).name)
        if kind == "python":
            parameters.update(graph=name, precision=manifest["precision"])
            (model_dir / VERSION / "model.py").write_text(_shim(model_dir.name, "triton.vision_model", "VisionModel"))
    platform = PLATFORMS.get(kind, PYTHON_BACKEND)
    config = vision_config(
        manifest, platform, policy, gpu=gpu, instances=instances, parameters=parameters, name=model_dir.name
    )
    (model_dir / "config.pbtxt").write_text(to_pbtxt(config))
    return copied


#: the protobuf types of the config fields the options fill (ModelInstanceGroup.count is int32,
#: DynamicBatching.max_queue_delay_microseconds uint64): past them the config cannot be written
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


def check_options(options: RepoOptions) -> None:
    """Every number within what the config's fields hold, finite and in range, before anything is read."""
    cache = options.tower_cache_mib
    if not isinstance(cache, int | float) or not math.isfinite(cache) or cache < 0:
        raise ConfigError("expected a finite number, 0 (no cache) or more", field="tower_cache_mib", value=f"{cache}")
    ranges = {
        "vision_instances": (1, INT32_MAX),
        "vlm_instances": (1, INT32_MAX),
        "max_queue_delay_us": (0, UINT64_MAX),
        "max_new_tokens": (1, INT32_MAX),
    }
    for name, (low, high) in ranges.items():
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"expected a whole number from {low} to {high}", field=name, value=value)


def check_max_new_tokens(bundle: Path, max_new_tokens: int) -> None:
    """The default answer length must leave the prompt room in the language model's context."""
    context = read_genai_config(bundle / "lm" / "decoder" / GENAI_CONFIG)["context_length"]  # vlm_pipeline.LM_DIR
    if max_new_tokens >= context:
        raise ConfigError(
            f"leaves no room for a prompt in the language model's context of {context} tokens; expected fewer",
            field="max_new_tokens",
            value=max_new_tokens,
        )


def write_repository(bundle: str | Path, repo: str | Path, options: RepoOptions, *, force: bool = False) -> RepoResult:
    """Write the model repository for ``bundle`` at ``repo`` (see the module docstring)."""
    bundle, repo = Path(bundle), Path(repo)
    model_config_pb2()  # tritonclient missing: one line before anything is read or written
    if options.device not in DEVICES:
        raise ConfigError(f"expected one of {', '.join(DEVICES)}", field="device", value=options.device)
    if options.text_type not in TEXT_TYPES:
        raise ConfigError(f"expected one of {', '.join(TEXT_TYPES)}", field="text_type", value=options.text_type)
    check_options(options)
    manifest = read_manifest(bundle)
    if not manifest.get("language_model"):
        raise no_language_model(bundle)
    check_max_new_tokens(bundle, options.max_new_tokens)
    check_paths(bundle, repo, force)
    local_gpus = gpus()
    kind, reason = choose_vision_backend(bundle, manifest, options.vision_backend, local_gpus)
    plugin = plugin_for_engine(manifest, options.plugin_library) if kind == "tensorrt" else None
    if kind == "tensorrt":
        gpu = True
    elif options.device == "auto":
        gpu = manifest["language_model"]["device"] == "cuda"
    else:
        gpu = options.device == "gpu"
    models = {
        model: (view, batching(view, options.max_queue_delay_us, use_engine=kind == "tensorrt"))
        for model, view in part_manifests(manifest)
    }
    plugin_model = next((model for model in models if holds_lpwca(manifest, model)), None) if plugin else None
    split = is_split(manifest)
    try:
        repo.parent.mkdir(parents=True, exist_ok=True)
        copied = False
        with staged_directory(repo, replace=force) as stage:
            for model, (view, policy) in models.items():
                copied |= write_vision_model(
                    bundle,
                    stage / model,
                    view,
                    kind,
                    policy,
                    plugin if model == plugin_model else None,
                    gpu=gpu,
                    instances=options.vision_instances,
                )
            vlm_dir = stage / VLM_MODEL
            copied |= mirror_bundle(bundle, vlm_dir / VERSION / BUNDLE_DIR, manifest)
            (vlm_dir / VERSION / "model.py").write_text(_shim(VLM_MODEL, "triton.vlm_model", "VlmModel"))
            vlm_parameters = {"bundle": BUNDLE_DIR}
            if split:
                vlm_parameters[TOWER_MODEL_PARAMETER] = TOWER_MODEL
                vlm_parameters[HEAD_MODEL_PARAMETER] = HEAD_MODEL
                vlm_parameters[TOWER_CACHE_PARAMETER] = f"{options.tower_cache_mib:g}"
            else:
                vlm_parameters[VISION_MODEL_PARAMETER] = VISION_MODEL
            vlm_parameters.update(default_max_new_tokens=str(options.max_new_tokens), tool_version=__version__)
            config = vlm_config(options.text_type, instances=options.vlm_instances, parameters=vlm_parameters)
            (vlm_dir / "config.pbtxt").write_text(to_pbtxt(config))
            launch = launch_command(plugin.name if plugin else None, plugin_model or VISION_MODEL)
            cache_mib = options.tower_cache_mib if split else None
            (stage / "README.md").write_text(repo_readme(bundle, kind, reason, launch, options.text_type, cache_mib))
    except OSError as exc:  # permissions, a failed copy: one line, nothing half-written (staged)
        raise BundleError(f"cannot write the repository ({exc.strerror or exc})", field="repo", value=repo) from None
    notes = []
    if kind == "tensorrt" and not local_gpus:
        notes.append(f"not checked against a GPU here: {engine_gpu_mismatch(manifest['engine'], local_gpus)}")
    if kind == "tensorrt":
        notes.append(
            "the engine runs only under the TensorRT version that built it "
            f"({manifest['engine'].get('tensorrt_version')}): pick the Triton release that ships it"
        )
    policies = {model: policy for model, (_, policy) in models.items()}
    platform = PLATFORMS.get(kind, PYTHON_BACKEND)
    tower_cache = options.tower_cache_mib if split else None
    return RepoResult(repo, kind, platform, reason, gpu, policies, copied, launch, tower_cache, notes)


def _shim(model: str, module: str, cls: str) -> str:
    return _SHIM.format(model=model, version=__version__, module=f"ccra_export.serve.{module}", cls=cls)


def launch_command(plugin: str | None, plugin_model: str = VISION_MODEL, models: str = "/models") -> str:
    """tritonserver's command line for the repository mounted at ``models``: the plugin, kept in
    ``plugin_model``'s folder, handed to the TensorRT backend (``--backend-config=tensorrt,plugins=``,
    which dlopens it before any model loads; unlike LD_PRELOAD it stays out of the Python backend's
    stub processes)."""
    plugins = f" --backend-config=tensorrt,plugins={models}/{plugin_model}/{plugin}" if plugin else ""
    return f"tritonserver --model-repository={models}{plugins}"


_RUNS_ON = {
    "tensorrt": "the bundle's TensorRT engine, platform `tensorrt_plan`",
    "onnxruntime": "the ONNX graph on Triton's ONNX Runtime backend, platform `onnxruntime_onnx`",
    "python": "the ONNX graph in ONNX Runtime inside Triton's Python backend",
}


def repo_readme(
    bundle: Path, kind: str, reason: str, launch: str, text_type: str, tower_cache_mib: float | None = None
) -> str:
    """The repository's README.md: what each model is and the command that serves it.
    ``tower_cache_mib``: a split bundle's tower cache (None for a single graph)."""
    prompt = "TYPE_STRING" if text_type == "string" else "UTF-8 bytes in a TYPE_UINT8 vector"
    why = f" ({reason})" if reason else ""
    if tower_cache_mib is None:
        vision = [f"- `{VISION_MODEL}`: {_RUNS_ON[kind]}{why}; dynamically batched."]
        calls = f"calls `{VISION_MODEL}` through BLS"
    else:
        vision = [
            f"- `{TOWER_MODEL}`: the CLIP tower graph (`vision_tower.onnx`: pixels -> tower features), "
            f"{_RUNS_ON[kind]}{why}; dynamically batched.",
            f"- `{HEAD_MODEL}`: CCRA's head graph (`ccra_head.onnx`: tower features + the question -> visual "
            f"tokens), {_RUNS_ON[kind]}; dynamically batched.",
        ]
        cache = f"up to {tower_cache_mib:g} MiB per instance" if tower_cache_mib else "disabled: --tower-cache-mib 0"
        calls = (
            f"calls `{HEAD_MODEL}` through BLS for every request and `{TOWER_MODEL}` only for an image not in its "
            f"tower-output cache ({cache})"
        )
    lines = [
        f"# Triton model repository for {bundle.resolve().name}",
        "",
        f"Written by `ccra-export triton` {__version__} from `{bundle.resolve()}`.",
        "",
        *vision,
        f"- `{VLM_MODEL}`: Python backend, decoupled; {calls}. Inputs `image` (the encoded file, TYPE_UINT8) "
        f"and `prompt` ({prompt}); optional `max_new_tokens`, `temperature`, `top_p`, `seed`, `stream`; output "
        "`text` (one response per piece of text; `stream` false: one response).",
        "",
        "Serve it with this folder mounted at /models, ccra-export installed in the Python that runs Triton's "
        "Python backend (in NVIDIA's Triton container, from a copy of the ccra-export checkout: "
        "`pip install '/opt/ccra-export[gpu]'`; ccra-export's docs/triton.md has the Dockerfile):",
        "",
        "```",
        launch,
        "```",
        "",
        "See ccra-export's docs/triton.md for containers, Jetson and clients.",
        "",
    ]
    return "\n".join(lines)


__all__ = ["DEVICES", "VISION_BACKENDS", "RepoOptions", "RepoResult", "write_repository"]
