"""Up-front validation of a LLaVA-1.5 (+ CCRA) checkpoint directory, before any slow work.

Everything a build will read is checked here from config.json, the tokenizer and the safetensors
headers alone (a few hundred kilobytes at 7B, no tensor is read): sizes bounded, types checked,
every tensor's byte range inside its file, the shapes of every tensor the toolkit loads against
config.json / ``ccra_config``, and, when a language model is requested, the tokenizer, its
``<image>`` id and the attention head size. So a bad checkpoint is one line naming the file at
fault (``ccra.safetensors``, ``config.json``, ``model.safetensors``, ``tokenizer.json``) in
seconds, not a traceback after minutes of export and parity.

The safetensors headers are read by the safetensors library itself (``safe_open``, which maps the
file and reads nothing past the header), so this check and the loader agree on what a valid file
is; its refusals become one line naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ccra_export.core.config import (
    DEFAULT_CCRA_MODULE,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_IMAGE_SIZE,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    CCRAConfig,
    ModelConfig,
    VisionTowerConfig,
    check_float,
    check_int,
    check_module_path,
)
from ccra_export.core.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
CCRA_WEIGHTS = "ccra.safetensors"
CCRA_CONFIG_KEY = "ccra_config"
CCRA_MODULE_KEY = "ccra_module"  #: ``package.module:Factory`` of a plug-in CCRA module (docs/ccra.md)
TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
IMAGE_TOKEN = "<image>"
#: config.json and the shard index are kilobytes; anything past this is not a config.
MAX_JSON_BYTES = 64 << 20
#: Published tokenizer.json files are megabytes (Llama 3: 9 MiB, Gemma: 34 MiB).
MAX_TOKENIZER_BYTES = 512 << 20
#: ONNX Runtime's CPU GroupQueryAttention runs head sizes that are multiples of this only.
CPU_ATTENTION_HEAD_MULTIPLE = 16

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# Every published spelling of the LLaVA tensor prefixes (llava-hf 4.x and 5.x saves).
TOWER_KEY = re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(?P<rest>.+)$")
PROJECTOR_KEY = re.compile(r"^(?:model\.)?multi_modal_projector\.(?P<rest>.+)$")
EMBED_TOKENS_KEY = re.compile(r"(?:^|\.)embed_tokens\.weight$")
ENCODER_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.")
_LM_KEY = re.compile(r"^(?:model\.)?language_model\.(?:model\.)?(?P<rest>.+)$")
_HEAD_KEY = re.compile(r"^(?:language_model\.)?lm_head\.weight$")
_LM_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(?P<part>.+)$")
_POSITIONS = "embeddings.position_embedding.weight"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype (safetensors' name, ``F32``) and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: its tensors by name and its string metadata."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


@dataclass(frozen=True)
class LanguageModelRequest:
    """``--lm-precision``: what the language model build needs from the checkpoint.

    ``cpu_attention``: the decoder runs on ONNX Runtime's CPU GroupQueryAttention (a CPU target,
    or a CUDA target checked on a machine without CUDA); ``why`` says so in messages."""

    precision: str
    cpu_attention: bool
    why: str


@dataclass(frozen=True)
class CheckedCheckpoint:
    """What validation established: the model config and the weight files' headers."""

    root: Path
    config: ModelConfig
    weight_files: list[Path]
    headers: dict[Path, SafetensorsHeader]
    ccra_file: Path | None
    embed_tokens: tuple[Path, str] | None  # (file, tensor name) of the LM token embedding table
    image_token_id: int | None = None  # the tokenizer's <image> id, when a language model was requested
    text: dict[str, int] = field(default_factory=dict)  # the language model's effective sizes


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {_shown(dup)}")
    return dict(pairs)


def read_json(path: Path, expected: str) -> dict[str, Any]:
    """A JSON object file, bounded in size; ``expected`` says what the file should be."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected {expected}")
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {size} bytes; expected {expected} (at most {MAX_JSON_BYTES >> 20} MiB)")
        data = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


# --------------------------------------------------------------------------- safetensors headers


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The header of ``path`` as safetensors reads it. ``safe_open`` refuses what the format
    forbids before any tensor is read: a header length past the file or over its 100 MB limit, a
    header that is not UTF-8 JSON of the format's shape (an unknown dtype, a negative size), a
    shape whose byte size disagrees with its ``data_offsets``, and byte ranges that overlap, leave
    a gap or do not cover the data section exactly."""
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {}
            for name in handle.keys():
                part = handle.get_slice(name)
                tensors[name] = TensorEntry(part.get_dtype(), tuple(part.get_shape()))
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from None
    except OSError as exc:  # safetensors' own OSErrors carry the reason in their text, not errno
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or _one_line(exc)})") from None
    return SafetensorsHeader(path, tensors, metadata)


def weight_files(root: Path) -> list[Path]:
    """The Hugging Face weight files: the shard index's, else every ``*.safetensors`` but CCRA's."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "a safetensors shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map object")
        names = set(weight_map.values())
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or name == CCRA_WEIGHTS:
                raise CheckpointError(f"{index}: weight_map names {_shown(name)}; expected a file name in {root}")
        files = sorted(root / name for name in names)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{missing[0]}: listed in {index.name} but missing")
        return files
    files = sorted(p for p in root.glob("*.safetensors") if p.name != CCRA_WEIGHTS)
    if not files:
        raise CheckpointError(
            f"{root}: no *.safetensors weights; expected Hugging Face LLaVA weights saved with "
            "save_pretrained (PyTorch .bin checkpoints are not read)"
        )
    return files


# --------------------------------------------------------------------------- config.json

# Integer sizes of config.json, by section: (low, high). Checked where present, then again on
# the effective values (Hugging Face's defaults fill the absent ones).
_VISION_INTS = {
    "hidden_size": (1, MAX_HIDDEN),
    "intermediate_size": (1, MAX_INTERMEDIATE),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, MAX_HEADS),
    "image_size": (1, MAX_IMAGE_SIZE),
    "patch_size": (1, MAX_IMAGE_SIZE),
    "num_channels": (1, 16),
}
_TEXT_INTS = {
    "hidden_size": (1, MAX_HIDDEN),
    "intermediate_size": (1, MAX_INTERMEDIATE),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, MAX_HEADS),
    "num_key_value_heads": (1, MAX_HEADS),
    "head_dim": (1, MAX_HIDDEN),
    "vocab_size": (1, MAX_VOCAB),
    "max_position_embeddings": (1, MAX_POSITIONS),
}
_TOP_INTS = {
    "image_token_index": (0, MAX_VOCAB - 1),
    "image_seq_length": (1, MAX_IMAGE_SIZE**2),
}


def _check_section(raw: Any, section: str, ints: dict[str, tuple[int, int]], where: str) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: {section} must be a JSON object, got {_shown(raw)}")
    for key, (low, high) in ints.items():
        if raw.get(key) is not None:
            try:
                check_int(raw[key], where, f"{section}.{key}" if section else key, low, high)
            except ConfigError as exc:
                raise CheckpointError(str(exc)) from None


def _hf_config(raw: dict[str, Any], path: Path) -> Any:
    """transformers' LlavaConfig, after every size in ``raw`` was type- and bound-checked."""
    from transformers import LlavaConfig

    if raw.get("model_type") != "llava":
        raise CheckpointError(f"{path}: model_type is {_shown(raw.get('model_type'))}; expected 'llava' (LLaVA-1.5)")
    _check_section(raw, "", _TOP_INTS, str(path))
    _check_section(raw.get("vision_config"), "vision_config", _VISION_INTS, str(path))
    _check_section(raw.get("text_config"), "text_config", _TEXT_INTS, str(path))
    try:
        hf = LlavaConfig.from_dict(raw)
    except Exception as exc:  # transformers raises many types for malformed configs
        raise CheckpointError(f"{path}: not a valid LlavaConfig ({_one_line(exc)})") from None
    for section, obj, ints in (
        ("vision_config", hf.vision_config, _VISION_INTS),
        ("text_config", hf.text_config, _TEXT_INTS),
    ):
        effective = {k: getattr(obj, k) for k in ints if getattr(obj, k, None) is not None}
        _check_section(effective, section, ints, str(path))
    return hf


def _model_config(hf: Any, raw: dict[str, Any], path: Path) -> ModelConfig:
    """The plain (CCRA-less) ModelConfig of a LlavaConfig; CCRA is added once ccra_config is checked."""
    vc = hf.vision_config
    if vc.model_type != "clip_vision_model":
        raise CheckpointError(f"{path}: vision_config is {_shown(vc.model_type)}; expected 'clip_vision_model'")
    layer = hf.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise CheckpointError(f"{path}: vision_feature_layer must be one layer index, got {_shown(layer)}")
    if hf.vision_feature_select_strategy != "default":
        raise CheckpointError(
            f"{path}: vision_feature_select_strategy {_shown(hf.vision_feature_select_strategy)} is not "
            "supported; LLaVA-1.5 uses 'default' (CLS dropped)"
        )
    if not isinstance(vc.hidden_act, str) or not isinstance(hf.projector_hidden_act, str):
        raise CheckpointError(f"{path}: hidden_act / projector_hidden_act must be activation names")
    vision = VisionTowerConfig(
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size,
        num_layers=vc.num_hidden_layers,
        num_heads=vc.num_attention_heads,
        layer_norm_eps=vc.layer_norm_eps,
        hidden_act=vc.hidden_act,
        num_channels=vc.num_channels,
    )
    config = ModelConfig(
        name=path.parent.name,
        vision=vision,
        lm_hidden_size=hf.text_config.hidden_size,
        vision_feature_layer=layer,
        projector_act=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
    )
    try:
        config.validate(str(path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    seq_len = raw.get("image_seq_length")
    if seq_len is not None and seq_len != vision.num_patches:
        raise CheckpointError(
            f"{path}: image_seq_length {seq_len} disagrees with vision_config image_size "
            f"{vision.image_size} / patch_size {vision.patch_size} = {vision.num_patches} patches"
        )
    return config


def model_config_from_hf(config_path: Path, ccra: CCRAConfig | None) -> ModelConfig:
    """ModelConfig from a LLaVA config.json, with Hugging Face's defaults for omitted fields."""
    raw = read_json(config_path, "a Hugging Face LLaVA-1.5 config.json")
    config = _model_config(_hf_config(raw, config_path), raw, config_path)
    if ccra is not None:
        _check_ccra(ccra, config.vision, config_path)
    return config.with_ccra(ccra)


def _text_sizes(hf: Any) -> dict[str, int]:
    text = hf.text_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "vocab_size": text.vocab_size,
        "attention_bias": bool(getattr(text, "attention_bias", False)),
        "mlp_bias": bool(getattr(text, "mlp_bias", False)),
    }


def _check_attention(text: dict[str, int], request: LanguageModelRequest, path: Path) -> None:
    heads, kv_heads, head_dim = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]
    if heads % kv_heads:
        raise CheckpointError(
            f"{path}: text_config num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    if request.cpu_attention and head_dim % CPU_ATTENTION_HEAD_MULTIPLE:
        raise CheckpointError(
            f"{path}: text_config head size {head_dim} (hidden_size {text['hidden_size']} / num_attention_heads "
            f"{heads}) is not a multiple of {CPU_ATTENTION_HEAD_MULTIPLE}, which ONNX Runtime's CPU "
            f"GroupQueryAttention needs; the language model runs there ({request.why})"
        )


# --------------------------------------------------------------------------- ccra.safetensors

_CCRA_FIELDS = {f.name: f for f in dataclasses.fields(CCRAConfig)}
_CCRA_REQUIRED = [
    n for n, f in _CCRA_FIELDS.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
]


def parse_ccra_config(metadata: dict[str, str], path: Path) -> CCRAConfig:
    """The CCRAConfig stored as JSON in ``ccra.safetensors``' metadata, every field's type checked."""
    where = f"{path}: {CCRA_CONFIG_KEY}"
    if CCRA_CONFIG_KEY not in metadata:
        raise CheckpointError(f"{path}: metadata has no {CCRA_CONFIG_KEY!r} entry (the CCRAConfig as JSON)")
    try:
        fields = json.loads(metadata[CCRA_CONFIG_KEY], object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where} is not valid JSON ({_one_line(exc)})") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {_shown(fields)}")
    unknown = sorted(set(fields) - set(_CCRA_FIELDS))
    if unknown:
        raise CheckpointError(f"{where}: unknown key {_shown(unknown[0])}; expected {', '.join(_CCRA_FIELDS)}")
    missing = [n for n in _CCRA_REQUIRED if n not in fields]
    if missing:
        raise CheckpointError(f"{where}: {missing[0]} is missing")
    layers = fields["feature_layers"]
    if not isinstance(layers, list):
        raise CheckpointError(f"{where}: feature_layers must be a list of layer indices, got {_shown(layers)}")
    if not isinstance(fields.get("options", {}), dict):
        raise CheckpointError(f"{where}: options must be a JSON object (the CCRA module's own settings)")
    ccra = CCRAConfig(**{**fields, "feature_layers": tuple(layers)})
    try:  # types and bounds; the layer range needs the tower and is checked by _check_ccra
        if ccra.module is not None:
            check_module_path(ccra.module, f"{where}: module")
        for layer in ccra.feature_layers:
            check_int(layer, where, "feature_layers entry", 0, MAX_LAYERS)
        check_int(ccra.text_hidden_size, where, "text_hidden_size", 1, MAX_HIDDEN)
        check_int(ccra.attn_dim, where, "attn_dim", 1, MAX_HIDDEN)
        check_int(ccra.num_heads, where, "num_heads", 1, MAX_HEADS)
        check_float(ccra.layer_scale_init, where, "layer_scale_init")
        check_float(ccra.layer_norm_eps, where, "layer_norm_eps", positive=True)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    return ccra


def _ccra_module(
    ccra: CCRAConfig,
    given: str | None,
    header: SafetensorsHeader,
    ccra_file: Path,
    raw: dict[str, Any],
    config_path: Path,
) -> str | None:
    """Which CCRA module the weights are for: ``given`` (the ``ccra_module`` input), else the checkpoint's
    ``ccra_module`` (``ccra.safetensors`` metadata, ccra_config's ``module``, config.json), else the
    reconstruction."""
    candidates = [
        ("", given),  # the input itself: its error names the field
        (f"{ccra_file}: metadata {CCRA_MODULE_KEY}", header.metadata.get(CCRA_MODULE_KEY)),
        (f"{ccra_file}: {CCRA_CONFIG_KEY} module", ccra.module),
        (f"{config_path}: {CCRA_MODULE_KEY}", raw.get(CCRA_MODULE_KEY)),
    ]
    for where, value in candidates:
        if value is not None:
            try:
                module = check_module_path(value, where, field=None if where else "ccra_module")
            except ConfigError as exc:
                raise CheckpointError(exc.message, field=exc.field) from None
            return None if module == DEFAULT_CCRA_MODULE else module
    return None


def _check_ccra(ccra: CCRAConfig, vision: VisionTowerConfig, path: Path) -> None:
    try:
        ccra.validate(vision, f"{path}: {CCRA_CONFIG_KEY}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


# --------------------------------------------------------------------------- tensor shapes


def _shape_error(file: Path, name: str, got: tuple[int, ...], want: tuple[int, ...], source: str) -> CheckpointError:
    return CheckpointError(
        f"{file}: weights do not match {source}: {name} has shape {list(got)}, expected {list(want)}"
    )


def _float_entry(header: SafetensorsHeader, name: str) -> TensorEntry:
    entry = header.tensors[name]
    if entry.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{header.path}: {name} is {entry.dtype}; expected floating-point weights")
    return entry


def _vision_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes the loader's model holds (built on the meta device: nothing allocated)."""
    from ccra_export.model.vision_model import CCRAVisionModel

    with torch.device("meta"):
        model = CCRAVisionModel(config)
    prefix = "vision_tower.vision_model." if hasattr(model.vision_tower, "vision_model") else "vision_tower."
    shapes = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            shapes[f"tower.{name[len(prefix) :]}"] = tuple(tensor.shape)
        else:
            shapes[name] = tuple(tensor.shape)
    return shapes


def _check_vision_tensors(
    headers: dict[Path, SafetensorsHeader], config: ModelConfig, config_path: Path
) -> tuple[Path, str] | None:
    """Tower, projector and embedding table shapes; returns where the embedding table is."""
    expected = _vision_shapes(config)
    embed = None
    for file, header in headers.items():
        for name in header.tensors:
            if (match := TOWER_KEY.match(name)) is not None:
                rest = match["rest"]
                layer = ENCODER_LAYER_KEY.match(rest)
                if layer is not None:
                    index = int(layer[1])
                    if index >= config.vision.num_layers:
                        raise CheckpointError(
                            f"{file}: {name} is encoder layer {index}, but {config_path.name} vision_config "
                            f"num_hidden_layers is {config.vision.num_layers}"
                        )
                    rest = f"encoder.layers.0.{rest[layer.end() :]}"  # every layer has layer 0's shapes
                key, source = f"tower.{rest}", f"{config_path.name} vision_config"
                if rest == _POSITIONS:
                    _check_positions(config, header.tensors[name].shape, file, name, config_path)
                    continue
            elif (match := PROJECTOR_KEY.match(name)) is not None:
                key = f"multi_modal_projector.{match['rest']}"
                source = f"{config_path.name} (vision_config hidden_size, text_config hidden_size)"
            else:
                if EMBED_TOKENS_KEY.search(name):
                    embed = (file, name)
                continue
            want = expected.get(key)
            entry = _float_entry(header, name)
            if want is not None and entry.shape != want:
                raise _shape_error(file, name, entry.shape, want, source)
    return embed


def _check_positions(config: ModelConfig, shape: tuple[int, ...], file: Path, name: str, config_path: Path) -> None:
    positions = config.num_patches + 1
    if len(shape) != 2 or shape[0] != positions:
        raise CheckpointError(
            f"{config_path}: vision_config image_size {config.vision.image_size} / patch_size "
            f"{config.vision.patch_size} gives {positions} positions, but {file.name} {name} has shape "
            f"{list(shape)}: the config's image size does not match the checkpoint"
        )
    if shape[1] != config.vision.hidden_size:
        raise _shape_error(file, name, shape, (positions, config.vision.hidden_size), f"{config_path.name}")


def _check_ccra_tensors(header: SafetensorsHeader, config: ModelConfig) -> None:
    """ccra.safetensors holds exactly the CCRA module's tensors, in the shapes its ccra_config gives."""
    from ccra_export.model.ccra_plugin import CCRAModuleSpec, make_module

    assert config.ccra is not None
    with torch.device("meta"):
        spec = CCRAModuleSpec(config.ccra, config.vision.hidden_size, config.num_patches)
        module = make_module(config.ccra.module_path, spec)
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    source = f"its {CCRA_CONFIG_KEY} and config.json vision_config"
    if config.ccra.is_plugin:
        source = f"the state_dict of {config.ccra.module} ({source})"
    missing = sorted(set(expected) - set(header.tensors))
    unexpected = sorted(set(header.tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        count = len(missing) + len(unexpected)
        more = f" (+{count - 1} more)" if count > 1 else ""
        raise CheckpointError(f"{header.path}: weights do not match {source}: {what}{more}")
    for name, want in expected.items():
        entry = _float_entry(header, name)
        if entry.shape != want:
            raise _shape_error(header.path, name, entry.shape, want, source)


def _lm_shapes(text: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Llama-family tensor shapes by LlamaForCausalLM name (``layers.N.`` for every layer)."""
    d, inner, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    q, kv = text["num_attention_heads"] * text["head_dim"], text["num_key_value_heads"] * text["head_dim"]
    per_layer: dict[str, tuple[int, ...]] = {
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (inner, d),
        "mlp.up_proj.weight": (inner, d),
        "mlp.down_proj.weight": (d, inner),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
    }
    if text["attention_bias"]:
        per_layer.update({f"self_attn.{p}_proj.bias": (n,) for p, n in (("q", q), ("k", kv), ("v", kv))})
    shapes = {"embed_tokens.weight": (vocab, d), "norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for layer in range(text["num_hidden_layers"]):
        shapes.update({f"layers.{layer}.{part}": shape for part, shape in per_layer.items()})
    return shapes


def _check_lm_tensors(
    headers: dict[Path, SafetensorsHeader], text: dict[str, int], config_path: Path, tied: bool
) -> None:
    """The language model's tensors (what the decoder builder reads) against config.json text_config."""
    expected = _lm_shapes(text)
    source = f"{config_path.name} text_config"
    found: set[str] = set()
    for file, header in headers.items():
        for name in header.tensors:
            if (match := _LM_KEY.match(name)) is not None:
                key = match["rest"]
            elif _HEAD_KEY.match(name):
                key = "lm_head.weight"
            else:
                continue
            layer = _LM_LAYER_KEY.match(key)
            if layer is not None and int(layer[1]) >= text["num_hidden_layers"]:
                raise CheckpointError(
                    f"{file}: {name} is decoder layer {layer[1]}, but {source} num_hidden_layers is "
                    f"{text['num_hidden_layers']}"
                )
            want = expected.get(key)
            if want is None:
                continue
            entry = _float_entry(header, name)
            if entry.shape != want:
                raise _shape_error(file, name, entry.shape, want, source)
            found.add(key)
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - found - optional, key=lambda n: (len(n), n))
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{config_path.parent}: no language-model tensor {missing[0]}{more} in the safetensors files, "
            f"which {source} (num_hidden_layers {text['num_hidden_layers']}) needs for {{lm_precision}}",
            mentions=("lm_precision",),
        )


# --------------------------------------------------------------------------- tokenizer


def _tokenizer(root: Path, *, sentencepiece: bool) -> tuple[Path, Any] | None:
    """(file, tokenizer with ``token_to_id``/vocab size) from tokenizer.json, else (``sentencepiece``)
    tokenizer.model converted by transformers."""
    path = root / TOKENIZER_FILE
    if path.is_file():
        from tokenizers import Tokenizer

        size = path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"{path}: {size} bytes; a tokenizer.json is at most {MAX_TOKENIZER_BYTES >> 20} MiB")
        try:
            return path, Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception for malformed files
            raise CheckpointError(f"{path}: not a readable tokenizer ({_one_line(exc)})") from None
    path = root / SENTENCEPIECE_FILE
    if sentencepiece and path.is_file():
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(root))
        except Exception as exc:  # sentencepiece / protobuf / transformers errors of every kind
            raise CheckpointError(f"{path}: not a readable tokenizer ({_one_line(exc)})") from None
        return path, hf.backend_tokenizer if hasattr(hf, "backend_tokenizer") else None
    return None


def _check_tokenizer(root: Path, hf: Any, text: dict[str, int], request: LanguageModelRequest | None) -> int | None:
    """The tokenizer parses; with a language model it must exist and agree with config.json."""
    found = _tokenizer(root, sentencepiece=request is not None)  # calibration reads tokenizer.json only
    if request is None:
        return None
    if found is None:
        raise CheckpointError(
            f"{root}: no tokenizer ({TOKENIZER_FILE} or {SENTENCEPIECE_FILE}); {{lm_precision}} needs the "
            "checkpoint's tokenizer for the runtime and the decoder builder",
            mentions=("lm_precision",),
        )
    path, tokenizer = found
    if tokenizer is None:
        raise CheckpointError(
            f"{path}: a slow (sentencepiece-only) tokenizer; {{lm_precision}} needs {TOKENIZER_FILE}",
            mentions=("lm_precision",),
        )
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    config_path = root / CONFIG_FILE
    if image_id is None:
        raise CheckpointError(
            f"{path}: has no {IMAGE_TOKEN} token; {config_path.name} image_token_index is {hf.image_token_index}"
        )
    if image_id != hf.image_token_index:
        raise CheckpointError(
            f"{path}: {IMAGE_TOKEN} is token {image_id}, but {config_path} image_token_index is "
            f"{hf.image_token_index}; they must agree"
        )
    vocab = text["vocab_size"]
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab:
        raise CheckpointError(
            f"{path}: {size} tokens, more than {config_path.name} text_config vocab_size {vocab} (the embedding rows)"
        )
    return image_id


# --------------------------------------------------------------------------- the whole checkpoint


def validate_checkpoint(
    path: str | Path, language_model: LanguageModelRequest | None = None, ccra_module: str | None = None
) -> CheckedCheckpoint:
    """Check everything a build reads from the checkpoint, from configs and headers alone.

    ``language_model``: also what ``--lm-precision`` needs (tokenizer, ``<image>`` id, attention
    head size, the decoder's tensors). ``ccra_module``: ``--ccra-module``, which takes precedence
    over the checkpoint's own ``ccra_module`` entry (``ccra.safetensors`` metadata, then
    config.json). Every failure is one CheckpointError naming the file."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError("not a directory and not a preset name", field="model", value=root)
    config_path = root / CONFIG_FILE
    raw = read_json(config_path, "a Hugging Face LLaVA-1.5 config.json")
    hf = _hf_config(raw, config_path)
    config = _model_config(hf, raw, config_path)
    text = _text_sizes(hf)
    if language_model is not None:
        _check_attention(text, language_model, config_path)

    files = weight_files(root)
    headers = {file: read_safetensors_header(file) for file in files}
    ccra_file = root / CCRA_WEIGHTS
    if ccra_file.exists():
        ccra_header = read_safetensors_header(ccra_file)
        ccra = parse_ccra_config(ccra_header.metadata, ccra_file)
        ccra = dataclasses.replace(
            ccra, module=_ccra_module(ccra, ccra_module, ccra_header, ccra_file, raw, config_path)
        )
        _check_ccra(ccra, config.vision, ccra_file)
        if ccra.text_hidden_size != text["hidden_size"]:
            raise CheckpointError(
                f"{ccra_file}: {CCRA_CONFIG_KEY} text_hidden_size {ccra.text_hidden_size} disagrees with the "
                f"language model's embedding width, {config_path.name} text_config hidden_size {text['hidden_size']}"
            )
        config = config.with_ccra(ccra)
        _check_ccra_tensors(ccra_header, config)
    else:
        ccra_file = None

    embed = _check_vision_tensors(headers, config, config_path)
    if embed is not None:
        file, name = embed
        shape = headers[file].tensors[name].shape
        want = (text["vocab_size"], text["hidden_size"])
        if shape != want:
            width = f" (CCRA's text width is {config.ccra.text_hidden_size})" if config.ccra else ""
            raise CheckpointError(
                f"{file}: the embedding table {name} has shape {list(shape)}, but {config_path.name} text_config "
                f"(vocab_size, hidden_size) is {list(want)}{width}"
            )
    if language_model is not None:
        tied = bool(getattr(hf.text_config, "tie_word_embeddings", False) or getattr(hf, "tie_word_embeddings", False))
        _check_lm_tensors(headers, text, config_path, tied)
    image_id = _check_tokenizer(root, hf, text, language_model)
    return CheckedCheckpoint(root, config, files, headers, ccra_file, embed, image_id, text)
