"""Every command-line option, declared once: its flags, its help and the options field it fills.

A verb lists the declarations it takes (``@options(...)``) and receives their values gathered by
destination: ``dest="int8.method"`` arrives as ``int8={"method": ...}``, which ``into`` turns into
the workflow's own dataclass (``Int8Options``). So a flag is written in one place; the dataclasses
in ``workflows`` and ``engine`` hold the defaults the Python API shares.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from ccra_export.cli.output import command_line
from ccra_export.core.config import PRESETS
from ccra_export.core.errors import CCRAExportError, ConfigError
from ccra_export.core.plugin_library import check_plugin_library
from ccra_export.engine.settings import DEFAULT_TIMING_CACHE
from ccra_export.runtime.tower_cache import DEFAULT_TOWER_CACHE_MIB

T = TypeVar("T")


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN and infinities: every comparison with NaN is False,
    so a NaN threshold would pass any error and a NaN temperature would sample garbage."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        converted = super().convert(value, param, ctx)
        if not math.isfinite(converted):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return converted


#: a seed numpy and torch both take: [0, 2**64)
SEED = click.IntRange(0, 2**64 - 1)


@dataclass(frozen=True)
class Opt:
    """One click option and the dotted field paths its value fills (``also``: extra copies)."""

    dest: str
    decorator: Callable[[Callable[..., Any]], Callable[..., Any]]
    also: tuple[str, ...] = ()

    @property
    def param(self) -> str:
        return self.dest.replace(".", "__")


def opt(dest: str, *flags: str, also: tuple[str, ...] = (), **attrs: Any) -> Opt:
    """``click.option(*flags, **attrs)`` whose value goes to ``dest`` (and ``also``)."""
    return Opt(dest, click.option(*flags, dest.replace(".", "__"), **attrs), also)


def options(*declared: Opt | tuple[Opt, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Apply the declared options in the order listed (as --help shows them); the command gets
    their values nested by destination."""
    flat = [o for item in declared for o in (item if isinstance(item, tuple) else (item,))]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            nested: dict[str, Any] = {}
            for o in flat:
                value = values.pop(o.param)
                for path in (o.dest, *o.also):
                    _put(nested, path, value)
            return command(**values, **nested)

        for o in reversed(flat):
            wrapper = o.decorator(wrapper)
        return wrapper

    return decorate


def _put(nested: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        nested = nested.setdefault(key, {})
    nested[leaf] = value


def into(cls: type[T], values: dict[str, Any]) -> T:
    """The dataclass ``cls`` from nested option values; fields not given keep their defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name not in values:
            continue
        value = values[field.name]
        kind = hints[field.name]
        kwargs[field.name] = into(kind, value) if dataclasses.is_dataclass(kind) and isinstance(value, dict) else value
    return cls(**kwargs)


BACKEND_HELP = (
    "What runs the graph. auto: TensorRT when it imports and sees a GPU (an engine is built into the bundle), "
    "else ONNX Runtime (CUDA provider if installed, else CPU); ort: ONNX Runtime; trt: a native TensorRT engine; "
    "ort-trt: ONNX Runtime's TensorRT execution provider."
)
#: what each backend a bundle runs on means, for the verbs that run one (each lists only its own)
RUN_BACKENDS = {
    "auto": "the bundle's TensorRT engine where TensorRT is usable, else ONNX Runtime",
    "ort": "ONNX Runtime",
    "trt": "the bundle's TensorRT engine",
    "ort-trt": "ONNX Runtime's TensorRT execution provider (builds and caches its engine in the bundle; portable "
    "graphs only: the provider cannot run the LPWCA plugin node)",
}


def run_backend(*choices: str) -> Opt:
    """``--backend`` of a verb that runs a bundle, its help naming only the backends it takes."""
    described = "; ".join(f"{choice}: {RUN_BACKENDS[choice]}" for choice in choices)
    return backend(*choices, help=f"What runs the vision graph. {described}.")


def backend(*choices: str, help: str = BACKEND_HELP) -> Opt:
    """``--backend``: the verbs differ only in which backends they offer."""
    return opt("backend", "--backend", type=click.Choice(choices), default="auto", show_default=True, help=help)


def max_new_tokens(default: int, minimum: int, help: str) -> tuple[Opt, Opt]:
    """``--max-new-tokens`` (`run`'s name, the one name) and ``--new-tokens``, `bench`'s old name kept as
    a hidden deprecated alias: the command gets both and merges them with ``deprecated_alias``."""
    return (
        opt(
            "max_new_tokens",
            "--max-new-tokens",
            default=default,
            show_default=True,
            type=click.IntRange(minimum),
            help=help,
        ),
        opt("new_tokens", "--new-tokens", type=click.IntRange(minimum), hidden=True, help="Old --max-new-tokens."),
    )


class OptionError(CCRAExportError):
    """Two flags that cannot be given together."""


def deprecated_alias(param: str, value: T, alias_value: T | None, flag: str, alias: str) -> T:
    """``flag``'s value, given as itself or as its deprecated ``alias`` (a warning on stderr says so);
    both given with different values is one line, exit 2."""
    if alias_value is None:
        return value
    source = click.get_current_context().get_parameter_source(param)
    if source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None) and value != alias_value:
        raise OptionError(f"{alias} {alias_value} and {flag} {value}: {alias} is the old name of {flag}; give one")
    click.echo(f"warning: {alias} is deprecated; use {flag}", err=True)
    return alias_value


def tower_cache_mib(holder: str = "", skips: str = "runs only CCRA's head") -> Opt:
    """``--tower-cache-mib``, declared once; ``holder`` says who keeps the cache (Triton: each instance)."""
    return opt(
        "tower_cache_mib",
        "--tower-cache-mib",
        default=DEFAULT_TOWER_CACHE_MIB,
        show_default=True,
        type=FiniteFloat(0.0, 1 << 20),
        help=f"Split bundles (build --split-vision): memory {holder}for cached vision-tower outputs, keyed by the "
        f"image's content, so a second question about an image {skips}. One llava-1.5-7b image takes 27 MiB "
        "(FP16) to 54 MiB (FP32); 0 disables the cache.",
    )


TOWER_CACHE_MIB = tower_cache_mib()
CCRA_MODULE_CHECK = opt(
    "ccra_module",
    "--ccra-module",
    metavar="PKG.MOD:FACTORY",
    help="A bundle built with a plug-in CCRA module: name it again (as recorded in its manifest) to rebuild the "
    "PyTorch reference; a manifest never makes ccra-export import code.",
)
BUNDLE = opt(
    "bundle", "--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory written by `build`."
)
LM_BUNDLE = opt(
    "bundle",
    "--bundle",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle built with --lm-precision (a language model inside).",
)
IMAGE = opt("image", "--image", required=True, type=click.Path(path_type=Path), help="Image file (jpg, png, ...).")
MODEL_OVERRIDE = opt(
    "model_override",
    "--model",
    metavar="demo|DIR",
    help="The checkpoint the bundle was built from, to recompute its PyTorch reference (a bundle built from "
    "demo finds the shipped one by itself; without it, the PyTorch outputs recorded at build are used).",
)


def _plugin_library(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Checked on entry for every verb, whether or not the graph will need it."""
    try:
        return None if value is None else check_plugin_library(value)
    except ConfigError as exc:
        remedy = f" ({command_line(exc.remedy)})" if exc.remedy is not None else ""
        raise click.BadParameter(exc.message + remedy) from None  # click names the flag and the value


PLUGIN_LIBRARY = opt(
    "plugin_library",
    "--plugin-library",
    type=click.Path(path_type=Path, dir_okay=False),
    callback=_plugin_library,
    help="The LPWCA TensorRT plugin library built for this machine (libccra_lpwca_plugin.so, `ccra-export plugins "
    "build`): a fused engine needs it. `build` and `engine` record its sha256; it is loaded (never taken from the "
    "bundle) only when its hash matches. Default: $CCRA_LPWCA_PLUGIN_LIBRARY.",
)


def reference(help: str) -> Opt:
    """``--reference``: what a verb compares with, PyTorch now or what the build recorded."""
    return opt(
        "reference",
        "--reference",
        type=click.Choice(["auto", "pytorch", "recorded"]),
        default="auto",
        show_default=True,
        help=help,
    )


REFERENCE = reference(
    "What parity compares against. pytorch: the PyTorch model rebuilt from the bundle's source, on fresh "
    "inputs; recorded: the PyTorch outputs the build stored in the bundle (no PyTorch or checkpoint needed); "
    "auto: pytorch where PyTorch and the source are at hand, else recorded."
)

# Parity run and thresholds (ParityOptions), shared by `build` and `check`.
PARITY = (
    opt(
        "parity.batch",
        "--parity-batch",
        default=2,
        show_default=True,
        type=click.IntRange(1, 64),
        help="Batch size of the parity inputs.",
    ),
    opt(
        "parity.text_len",
        "--parity-text-len",
        default=16,
        show_default=True,
        type=click.IntRange(1, 4096),
        help="Instruction length (tokens) of the parity inputs.",
    ),
    opt(
        "parity.min_cosine",
        "--min-cosine",
        type=FiniteFloat(-1.0, 1.0),
        help="Override the cosine-similarity threshold (default per precision: fp32 0.99999, fp16 0.999).",
    ),
    opt(
        "parity.max_scaled_abs_err",
        "--max-abs-err",
        type=FiniteFloat(0.0),
        help="Override the max |error| / max |reference| threshold (default: 1e-4 for fp32, off for fp16).",
    ),
)

# TensorRT builder settings (TrtOptions), shared by `build` (--backend trt / ort-trt) and `engine`.
ENGINE = (
    opt(
        "trt.typing",
        "--trt-typing",
        type=click.Choice(["auto", "strong", "weak"]),
        default="auto",
        show_default=True,
        help="TensorRT engine typing. auto (= strong): the ONNX graph's types decide, so the FP32 islands of FP16 "
        "and INT8 graphs (Softmax, the CCRA module) stay FP32. weak (TensorRT 10 only; 11 removed it): FP16/INT8 "
        "builder flags for speed, the FP32 islands pinned with layer precisions and OBEY_PRECISION_CONSTRAINTS.",
    ),
    opt(
        "trt.workspace_mib",
        "--workspace-mib",
        default=2048,
        show_default=True,
        type=click.IntRange(64),
        help="TensorRT workspace pool limit (Jetson shares its DRAM with the CPU).",
    ),
    opt(
        "trt.optimization_level",
        "--opt-level",
        default=3,
        show_default=True,
        type=click.IntRange(0, 5),
        help="TensorRT builder optimization level (higher: longer build, possibly faster engine).",
    ),
    opt(
        "trt.timing_cache",
        "--timing-cache",
        type=click.Path(path_type=Path, dir_okay=False),
        default=DEFAULT_TIMING_CACHE,
        show_default=True,
        help="TensorRT timing cache base name, read before and written after every engine build: one file per GPU "
        "and TensorRT version beside it (timing-<gpu>-sm<cc>-trt<version>.cache); a cache TensorRT refuses is "
        "replaced, never the build's failure.",
    ),
)

# The optimization profile (ProfileOptions): recorded at build, overridden per engine.
PROFILE = (
    opt(
        "profile.max_batch",
        "--max-batch",
        type=click.IntRange(1),
        help="Largest batch of the optimization profile. Default: 8 at build; the manifest's for `engine`.",
    ),
    opt(
        "profile.opt_batch",
        "--opt-batch",
        type=click.IntRange(1),
        help="Batch TensorRT tunes its kernels for (the profile's opt shape). Default: 1; the manifest's for `engine`.",
    ),
    opt(
        "profile.max_text_len",
        "--max-text-len",
        type=click.IntRange(1),
        help="Longest instruction (tokens) of the profile. Default: 512 at build; the manifest's for `engine`.",
    ),
    opt(
        "profile.opt_text_len",
        "--opt-text-len",
        type=click.IntRange(1),
        help="Instruction length TensorRT tunes for. Default: 64 (or --max-text-len if smaller); the manifest's "
        "for `engine`.",
    ),
)

# INT8 calibration (Int8Options).
INT8 = (
    opt(
        "int8.calib_data",
        "--calib-data",
        type=click.Path(path_type=Path),
        help="INT8: folder of .jpg/.png calibration images (other precisions ignore it, with a warning).",
    ),
    opt(
        "int8.prompts",
        "--prompts",
        type=click.Path(path_type=Path, dir_okay=False),
        help="INT8: one instruction per image (file-name order), else a default set of instructions.",
    ),
    opt(
        "int8.method",
        "--calib-method",
        type=click.Choice(["entropy", "minmax", "percentile"]),
        default="entropy",
        show_default=True,
        help="INT8 calibration: KL-divergence histogram, min/max, or 99.999th percentile.",
    ),
    opt(
        "int8.batch_size",
        "--calib-batch-size",
        default=4,
        show_default=True,
        type=click.IntRange(1),
        help="INT8: images per batch.",
    ),
    opt(
        "int8.holdout",
        "--holdout",
        type=click.IntRange(1),
        help="INT8: images kept out of calibration for parity (default 10%).",
    ),
    opt(
        "int8.limit",
        "--max-calib-images",
        type=click.IntRange(2),
        help="INT8: use at most this many images of the folder.",
    ),
    opt(
        "int8.quantize_ccra",
        "--int8-ccra",
        is_flag=True,
        help="INT8: quantize the CCRA module's matmuls too (kept float by default).",
    ),
    opt(
        "int8.pad_to_square",
        "--pad-to-square/--no-pad-to-square",
        default=True,
        show_default=True,
        help="Preprocess like LLaVA-1.5 (image_aspect_ratio 'pad') before CLIP's resize and crop.",
    ),
)

# What `build` exports (BuildOptions' own fields).
EXPORT = (
    opt(
        "model",
        "--model",
        required=True,
        metavar="demo|PRESET|DIR",
        help=f"demo (the shipped CCRA-LLaVA trained on the shapes task), a random preset ({', '.join(PRESETS)}) with "
        "--random-weights, or a local Hugging Face LLaVA-1.5 checkpoint directory (docs/bundle.md: checkpoint layout).",
    ),
    opt(
        "output",
        "--output",
        "-o",
        required=True,
        type=click.Path(path_type=Path),
        help="Bundle directory to write; must be new or empty (or a bundle, with --force).",
    ),
    opt(
        "precision",
        "--precision",
        type=click.Choice(["fp32", "fp16", "int8"]),
        default="fp16",
        show_default=True,
        help="Precision of the exported graph. fp16: weights, compute and I/O (Softmax and the CCRA module kept "
        "FP32). int8: Q/DQ graph calibrated on --calib-data (FP32 I/O; LayerNorm, Softmax and CCRA kept float).",
    ),
    opt(
        "random_weights",
        "--random-weights",
        is_flag=True,
        help="Fill a preset with seeded random weights (tests, benchmarks, trying the toolchain).",
    ),
    opt(
        "plain",
        "--plain",
        is_flag=True,
        help="With a preset: the plain LLaVA-1.5 variant (projector only, no CCRA; input pixel_values only).",
    ),
    opt(
        "seed",
        "--seed",
        also=("parity.seed",),
        default=0,
        show_default=True,
        type=SEED,
        help="Seed for --random-weights and for the parity inputs.",
    ),
    opt(
        "force",
        "--force",
        is_flag=True,
        help="Replace an existing bundle in --output (only once the new one is complete).",
    ),
    opt(
        "opset",
        "--opset",
        default=20,
        show_default=True,
        type=click.IntRange(17, 23),
        help="ONNX opset (>= 17 for LayerNormalization). torch's exporter writes 18 and later; 17 (TensorRT 8.5/8.6, "
        "JetPack 5) is exported at 18 and lowered with onnx's version converter.",
    ),
    opt(
        "external_data",
        "--external-data",
        type=click.Choice(["auto", "always", "never"]),
        default="auto",
        show_default=True,
        help="Store weights in vision.onnx.data. auto: when they exceed 1.5 GiB (protobuf's limit is 2 GiB).",
    ),
    opt(
        "ccra_fp16",
        "--ccra-fp16/--ccra-fp32",
        default=False,
        show_default=True,
        help="With --precision fp16: run the CCRA module in FP16 too (LPWCA's re-weighting can overflow FP16).",
    ),
    opt(
        "lpwca",
        "--lpwca",
        type=click.Choice(["auto", "fused", "portable"]),
        default="auto",
        show_default=True,
        help="LPWCA as one ccra::LPWCA node (fused: the TensorRT plugin; the C++ CPU kernel under ONNX Runtime) "
        "or as standard ops (portable). auto: fused for TensorRT, portable for ONNX Runtime.",
    ),
    opt(
        "ccra_module",
        "--ccra-module",
        metavar="PKG.MOD:FACTORY",
        help="The CCRA module to export, a torch.nn.Module built by FACTORY(spec) (docs/ccra.md); "
        "its weights are read from ccra.safetensors by its own state_dict names. Default: the checkpoint's "
        "ccra_module entry, else the reconstruction (ccra_export.model.ccra_module:reconstruction).",
    ),
    opt(
        "split_vision",
        "--split-vision/--single-vision-graph",
        default=None,
        help="CCRA (the default for CCRA models): export vision_tower.onnx (pixels -> the stacked layer states "
        "CCRA reads) and ccra_head.onnx (those states + the instruction -> visual tokens) instead of one "
        "vision.onnx. The runtime caches tower outputs per image (--tower-cache-mib), so a second question about "
        "an image runs only the head. --single-vision-graph: one vision.onnx (plain LLaVA-1.5 always is).",
    ),
    opt(
        "lm_precision",
        "--lm-precision",
        type=click.Choice(["int4", "int8", "fp16", "fp32"]),
        help="Also build the language model (onnxruntime-genai builder: INT4 MatMulNBits, INT8, FP16 or FP32) into "
        "the bundle, for `ccra-export run`. Needs a checkpoint with its tokenizer.",
    ),
    opt(
        "lm_quant.recipe",
        "--lm-quant",
        type=click.Choice(["auto", "default", "rtn", "k_quant", "k_quant_mixed"]),
        default="auto",
        show_default=True,
        help="INT4/INT8 decoders: the model builder's weight-only recipe. default: the builder's own (round to "
        "nearest); rtn: round to nearest, the builder's rtn pass; k_quant: llama.cpp's k-quant scale search; "
        "k_quant_mixed: k_quant with the LM head and the most sensitive MatMuls in INT8. auto: k_quant_mixed "
        "for int4, default for int8 (measured: docs/language-model.md).",
    ),
    opt(
        "lm_quant.block_size",
        "--lm-block-size",
        type=click.Choice(["16", "32", "64", "128", "256"]),
        default="32",
        show_default=True,
        callback=lambda _ctx, _param, value: int(value),
        help="INT4/INT8 decoders: weights sharing one scale, along the input channels.",
    ),
    opt(
        "lm_quant.accuracy_level",
        "--lm-accuracy-level",
        type=click.IntRange(1, 4),
        help="INT4/INT8 decoders: the activations' type in MatMulNBits, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
        "(default: the builder's for the device, 4 on the CPU).",
    ),
    opt(
        "lm_device",
        "--lm-device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="Where the language model will run. cuda: the builder's CUDA target (FP16 activations, INT4/INT8 "
        "weights, CUDA attention), for a Jetson or a datacenter GPU; it is built and checked on any machine (on "
        "the CPU provider where there is no GPU). auto: the vision backend's device (CUDA for TensorRT or where "
        "ONNX Runtime has the CUDA provider), else cpu.",
    ),
    opt(
        "lm_decoder.context",
        "--context",
        type=click.IntRange(1),
        metavar="N",
        help="With --lm-precision: the tokens a sequence may hold (prompt, image and answer), 1 to the model's "
        "max_position_embeddings (default: that). The runtime allocates the KV cache for this many tokens; a longer "
        "prompt is refused.",
    ),
    opt(
        "lm_decoder.kv_cache",
        "--kv-cache",
        type=click.Choice(["fp", "int8"]),
        default="fp",
        show_default=True,
        help="With --lm-precision (CPU decoders): the KV cache's type. fp: the decoder's own (FP32 on the CPU); "
        "int8: the model builder's static per-channel INT8 cache (a quarter of FP32's bytes), its scales calibrated "
        "on the build's parity prompts and its quality bounded (docs/language-model.md).",
    ),
    opt(
        "lm_decoder.prune_lm_head",
        "--prune-lm-head/--no-prune-lm-head",
        default=True,
        show_default=True,
        help="With --lm-precision: compute the LM head on the last prompt position only during prefill (the others' "
        "logits are never used; parity steps token by token where it needs them).",
    ),
)
