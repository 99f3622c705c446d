"""A bad checkpoint is refused up front (issue 13, item 5), and requested options are honoured or
refused (item 6).

Every case corrupts a copy of the tiny CCRA checkpoint one way and runs `ccra-export build` as a
user does: exit code 2, one `error:` line that starts with the file at fault, no traceback, no
export step started, nothing left beside the checkpoint, in seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from ccra_export.cli import main
from ccra_export.core.errors import CheckpointError, ConfigError
from ccra_export.model.checkpoint_check import (
    LanguageModelRequest,
    read_safetensors_header,
    validate_checkpoint,
)

CCRA = "ccra.safetensors"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
DELETE = object()
#: A refused build spends its time importing and reading headers: far below one tiny export.
FAIL_FAST_S = 15.0


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------- ways to corrupt


def edit_config(**changes: object) -> Callable[[Path], None]:
    """config.json with ``section__key=value`` (``DELETE`` removes the key)."""

    def damage(ckpt: Path) -> None:
        config = json.loads((ckpt / CONFIG).read_text())
        for key, value in changes.items():
            section, _, field = key.partition("__")
            target, name = (config[section], field) if field else (config, section)
            if value is DELETE:
                target.pop(name, None)
            else:
                target[name] = value
        (ckpt / CONFIG).write_text(json.dumps(config))

    return damage


def read_raw(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_raw(file: Path, header: bytes, body: bytes) -> None:
    file.write_bytes(len(header).to_bytes(8, "little") + header + body)


def edit_header(name: str, mutate: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite the JSON header of ``name`` (data untouched)."""

    def damage(ckpt: Path) -> None:
        header, body = read_raw(ckpt / name)
        mutate(header)
        write_raw(ckpt / name, json.dumps(header).encode(), body)

    return damage


def raw_header(name: str, header: bytes) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        _, body = read_raw(ckpt / name)
        write_raw(ckpt / name, header, body)

    return damage


def header_length(name: str, length: int) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(length.to_bytes(8, "little") + data[8:])

    return damage


def truncate(name: str, drop: int) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[:-drop])

    return damage


def tensor_field(name: str, tensor: str, **fields: object) -> Callable[[Path], None]:
    return edit_header(name, lambda header: header[tensor].update(fields))


def ccra_config(**changes: object) -> Callable[[Path], None]:
    """ccra.safetensors' ``ccra_config`` metadata with fields changed (``DELETE`` removes one)."""

    def mutate(header: dict) -> None:
        config = json.loads(header["__metadata__"]["ccra_config"])
        for key, value in changes.items():
            if value is DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        header["__metadata__"]["ccra_config"] = json.dumps(config)

    return edit_header(CCRA, mutate)


def ccra_metadata(value: str | None) -> Callable[[Path], None]:
    def mutate(header: dict) -> None:
        if value is None:
            header["__metadata__"].pop("ccra_config")
        else:
            header["__metadata__"]["ccra_config"] = value

    return edit_header(CCRA, mutate)


def remove(name: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).unlink()


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / name).write_text(text)


def shard_index(weight_map: dict[str, str]) -> Callable[[Path], None]:
    return write("model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))


def unreadable(reason: str) -> str:
    """The line for a file safetensors refuses: our framing, then safetensors' own reason."""
    return f"not a readable safetensors file (Error while deserializing header: {reason}"


LM = ("--lm-precision", "fp32", "--lm-device", "cpu")
CLASS_EMBED = "vision_tower.embeddings.class_embedding"

# (id, damage, extra build flags, file the line must start with, what it must say)
CASES = [
    # config.json: sizes bounded, typed, positive
    ("text-layers-1e6", edit_config(text_config__num_hidden_layers=10**6), (), CONFIG, "outside the supported range"),
    ("vision-layers-1e6", edit_config(vision_config__num_hidden_layers=10**6), (), CONFIG, "num_hidden_layers 1000000"),
    ("negative-hidden", edit_config(vision_config__hidden_size=-64), (), CONFIG, "vision_config.hidden_size -64"),
    ("float-hidden", edit_config(text_config__hidden_size=96.5), (), CONFIG, "must be an integer, got 96.5"),
    ("string-heads", edit_config(vision_config__num_attention_heads="4"), (), CONFIG, "must be an integer, got '4'"),
    ("bool-layers", edit_config(vision_config__num_hidden_layers=True), (), CONFIG, "must be an integer, got True"),
    ("vocab-1e8", edit_config(text_config__vocab_size=10**8), (), CONFIG, "vocab_size 100000000"),
    ("image-token-negative", edit_config(image_token_index=-1), (), CONFIG, "image_token_index -1"),
    ("positions-huge", edit_config(text_config__max_position_embeddings=2**40), (), CONFIG, "max_position_embeddings"),
    ("vision-config-string", edit_config(vision_config="clip"), (), CONFIG, "vision_config must be a JSON object"),
    (
        "infinite-size",
        write(CONFIG, '{"model_type": "llava", "text_config": {"hidden_size": 1e999}}'),
        (),
        CONFIG,
        "must be an integer, got inf",
    ),
    (
        "huge-int-literal",
        write(CONFIG, '{"model_type": "llava", "image_token_index": ' + "9" * 5000 + "}"),
        (),
        CONFIG,
        "not valid JSON",
    ),
    ("duplicate-key", write(CONFIG, '{"model_type": "llava", "model_type": "llava"}'), (), CONFIG, "duplicate key"),
    ("config-not-json", write(CONFIG, "{not json"), (), CONFIG, "not valid JSON"),
    # safetensors headers: refused by safetensors itself (safe_open), in one line naming the file
    ("header-length-absurd", header_length(WEIGHTS, 2**63), (), WEIGHTS, unreadable("header too large")),
    ("header-not-json", raw_header(WEIGHTS, b"\xff\xfe not json at all"), (), WEIGHTS, unreadable("invalid UTF-8")),
    ("header-not-object", raw_header(WEIGHTS, b"[1, 2, 3]"), (), WEIGHTS, unreadable("invalid JSON in header")),
    ("absurd-tensor", tensor_field(WEIGHTS, CLASS_EMBED, shape=[10**12, 10**12]), (), WEIGHTS, unreadable("overflow")),
    (
        "offsets-past-end",
        tensor_field(WEIGHTS, CLASS_EMBED, data_offsets=[0, 2**62]),
        (),
        WEIGHTS,
        unreadable(f"invalid offset for tensor `{CLASS_EMBED}`"),
    ),
    (
        "negative-dim",
        tensor_field(WEIGHTS, CLASS_EMBED, shape=[-64]),
        (),
        WEIGHTS,
        unreadable("invalid JSON in header: invalid value: integer `-64`"),
    ),
    (
        "unknown-dtype",
        tensor_field(WEIGHTS, CLASS_EMBED, dtype="F128"),
        (),
        WEIGHTS,
        unreadable("invalid JSON in header: unknown variant `F128`"),
    ),
    ("truncated", truncate(WEIGHTS, 100), (), WEIGHTS, unreadable("incomplete metadata, file not fully covered")),
    ("int-weights", tensor_field(WEIGHTS, CLASS_EMBED, dtype="I32"), (), WEIGHTS, "expected floating-point weights"),
    ("ccra-header-absurd", header_length(CCRA, 2**40), (), CCRA, unreadable("header too large")),
    ("ccra-garbage", write(CCRA, "garbage"), (), CCRA, unreadable("header too small")),
    (
        "shard-outside",
        shard_index({CLASS_EMBED: "../elsewhere.safetensors"}),
        (),
        "model.safetensors.index.json",
        "expected a file name in",
    ),
    # tensor shapes against config.json
    (
        "vision-intermediate",
        edit_config(vision_config__intermediate_size=256),
        (),
        WEIGHTS,
        "weights do not match config.json vision_config: vision_tower.encoder.layers.0.mlp.fc1.bias has shape [128]",
    ),
    (
        "vision-fewer-layers",
        edit_config(vision_config__num_hidden_layers=3),
        (),
        WEIGHTS,
        "is encoder layer 3, but config.json vision_config num_hidden_layers is 3",
    ),
    (
        "vocab-vs-embedding",
        edit_config(text_config__vocab_size=256),
        (),
        WEIGHTS,
        "text_config (vocab_size, hidden_size)",
    ),
    (
        "lm-intermediate",
        edit_config(text_config__intermediate_size=384),
        LM,
        WEIGHTS,
        "weights do not match config.json text_config",
    ),
    ("lm-more-layers", edit_config(text_config__num_hidden_layers=3), LM, "", "no language-model tensor layers.2."),
    ("lm-fewer-layers", edit_config(text_config__num_hidden_layers=1), LM, WEIGHTS, "is decoder layer 1"),
    # ccra.safetensors' ccra_config: typed, and its errors name ccra.safetensors, not config.json
    ("feature-layers-string", ccra_config(feature_layers="1,2,3"), (), CCRA, "feature_layers must be a list"),
    ("feature-layers-floats", ccra_config(feature_layers=[1.0, 2.0, 3.0]), (), CCRA, "must be an integer, got 1.0"),
    ("attn-dim-float", ccra_config(attn_dim=32.5), (), CCRA, "attn_dim must be an integer, got 32.5"),
    ("eps-string", ccra_config(layer_norm_eps="1e-5"), (), CCRA, "layer_norm_eps must be a finite number"),
    ("eps-negative", ccra_config(layer_norm_eps=-1.0), (), CCRA, "layer_norm_eps must be positive"),
    ("ccra-unknown-key", ccra_config(dropout=0.1), (), CCRA, "unknown key 'dropout'"),
    ("ccra-missing-key", ccra_config(text_hidden_size=DELETE), (), CCRA, "text_hidden_size is missing"),
    ("ccra-config-not-json", ccra_metadata("{oops"), (), CCRA, "ccra_config is not valid JSON"),
    ("ccra-config-absent", ccra_metadata(None), (), CCRA, "metadata has no 'ccra_config' entry"),
    ("feature-layer-out-of-tower", ccra_config(feature_layers=[1, 2, 9]), (), CCRA, "feature_layers [9] out of range"),
    ("ccra-heads-vs-dim", ccra_config(num_heads=5), (), CCRA, "attn_dim 32 must be a positive multiple of num_heads 5"),
    (
        "text-width-vs-embedding",
        ccra_config(text_hidden_size=64),
        (),
        CCRA,
        "text_hidden_size 64 disagrees with the language model's embedding width",
    ),
    (
        "ccra-tensor-shape",
        tensor_field(CCRA, "layer_embed", shape=[4, 24]),
        (),
        CCRA,
        "layer_embed has shape [4, 24], expected [3, 32]",
    ),
    # what --lm-precision needs, found before the vision export
    ("no-tokenizer", remove(TOKENIZER), LM, "", "no tokenizer (tokenizer.json or tokenizer.model)"),
    ("image-id-disagrees", edit_config(image_token_index=5), LM, TOKENIZER, "<image> is token 127"),
    (
        "head-size-12",
        edit_config(text_config__num_attention_heads=8, text_config__head_dim=DELETE),
        LM,
        CONFIG,
        "head size 12 (hidden_size 96 / num_attention_heads 8) is not a multiple of 16",
    ),
    (
        "kv-heads",
        edit_config(text_config__num_key_value_heads=4),
        LM,
        CONFIG,
        "not a multiple of num_key_value_heads 4",
    ),
    ("tokenizer-corrupt", write(TOKENIZER, "{not json"), (), TOKENIZER, "not a readable tokenizer"),
]


@pytest.mark.parametrize(("damage", "flags", "file", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_checkpoint_is_refused_before_the_export(checkpoint_copy, damage, flags, file, message):
    damage(checkpoint_copy)
    parent = checkpoint_copy.parent
    before = sorted(p.name for p in parent.iterdir())
    out = parent / "bundle"
    start = time.perf_counter()
    result = _invoke("build", "--model", checkpoint_copy, "--precision", "fp32", "-o", out, *flags)
    elapsed = time.perf_counter() - start

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    line = lines[0]
    where = checkpoint_copy / file if file else checkpoint_copy
    assert line.startswith(f"error: {where}:"), line
    assert message in line, line
    if file == CCRA:
        assert CONFIG not in line.split(":", 2)[1], line  # the error names ccra.safetensors first
    # found before any slow work, and nothing written
    assert "Exporting" not in result.output and "Parity" not in result.output, result.output
    assert elapsed < FAIL_FAST_S, f"refused after {elapsed:.1f} s"
    assert not out.exists()
    assert sorted(p.name for p in parent.iterdir()) == before


def test_the_good_checkpoints_pass_validation(ccra_checkpoint, plain_checkpoint):
    request = LanguageModelRequest("fp32", cpu_attention=True, why="test")
    checked = validate_checkpoint(ccra_checkpoint, request)
    assert checked.image_token_id == 127 and checked.config.variant == "ccra"
    assert checked.embed_tokens is not None and checked.embed_tokens[1].endswith("embed_tokens.weight")
    assert validate_checkpoint(plain_checkpoint).config.variant == "plain"


def test_header_reader_agrees_with_safetensors(ccra_checkpoint):
    for name in (WEIGHTS, CCRA):
        header = read_safetensors_header(ccra_checkpoint / name)
        with safe_open(str(ccra_checkpoint / name), "np") as handle:
            assert set(header.tensors) == set(handle.keys())
            assert header.metadata == handle.metadata()
            for key in handle.keys():
                assert header.tensors[key].shape == tuple(handle.get_slice(key).get_shape())
        # and with the header's JSON as the file holds it (the reader goes through safetensors)
        raw, _ = read_raw(ccra_checkpoint / name)
        assert header.metadata == raw.pop("__metadata__", {}) and header.metadata
        assert {k: (e.dtype, list(e.shape)) for k, e in header.tensors.items()} == {
            k: (v["dtype"], v["shape"]) for k, v in raw.items()
        }


@pytest.mark.parametrize("stray_first", [True, False], ids=["stray-first", "stray-last"])
def test_duplicate_tensor_names_cannot_hide_bytes(checkpoint_copy, stray_first):
    """A name listed twice, the copies on different bytes: whichever copy a JSON parser keeps, the
    other one's bytes are left uncovered, which safetensors refuses; so readers that keep the
    first or the last copy cannot be handed different tensors under one name."""
    header, body = read_raw(checkpoint_copy / WEIGHTS)
    real = header[CLASS_EMBED]
    size = real["data_offsets"][1] - real["data_offsets"][0]
    stray = {**real, "data_offsets": [len(body), len(body) + size]}  # its own bytes, appended
    copies = [stray, real] if stray_first else [real, stray]
    text = json.dumps(header).replace(
        f'"{CLASS_EMBED}": {json.dumps(real)}', ", ".join(f'"{CLASS_EMBED}": {json.dumps(c)}' for c in copies)
    )
    assert text.count(CLASS_EMBED) == 2
    write_raw(checkpoint_copy / WEIGHTS, text.encode(), body + b"\0" * size)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file \("):
        read_safetensors_header(checkpoint_copy / WEIGHTS)


def test_gap_between_tensors_is_refused(checkpoint_copy):
    """safetensors requires the tensors to tile the data section exactly; a gap hides bytes."""

    def shift(header: dict) -> None:
        begin, end = header[CLASS_EMBED]["data_offsets"]
        header[CLASS_EMBED]["data_offsets"] = [begin + 4, end + 4]

    edit_header(WEIGHTS, shift)(checkpoint_copy)
    result = _invoke("build", "--model", checkpoint_copy, "-o", checkpoint_copy.parent / "b")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: {checkpoint_copy / WEIGHTS}: not a readable safetensors file" in result.stderr


# --------------------------------------------------------------------------- item 6: options


def test_opset_17_is_written_and_calib_data_without_int8_warns(tmp_path):
    """--opset 17 yields an opset-17 graph (no exporter traceback, manifest says 17); --calib-data
    with FP32 is named in a warning, not silently dropped."""
    calib = tmp_path / "calib"
    calib.mkdir()
    out = tmp_path / "b17"
    flags = ("--precision", "fp32", "--opset", "17", "--calib-data", calib)
    result = _invoke("build", "--model", "tiny", "--random-weights", *flags, "-o", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "version converter" not in result.output
    stderr = " ".join(result.stderr.split())  # rich wraps long warning lines
    assert "warning: --calib-data" in stderr and "ignored; INT8 calibration applies to --precision int8 only" in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export"]["opset"]["ai.onnx"] == 17

    import onnx

    for name in ("vision_tower.onnx", "ccra_head.onnx"):  # CCRA: split by default, both graphs lowered
        model = onnx.load(str(out / name))
        assert {op.domain or "ai.onnx": op.version for op in model.opset_import}["ai.onnx"] == 17
        onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize(("opset", "message"), [(16, "opset >= 17"), (24, "supports opsets 17..23")])
def test_unsupported_opsets_are_refused(tmp_path, opset, message):
    result = _invoke("build", "--model", "tiny", "--random-weights", "--opset", opset, "-o", tmp_path / "b")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()

    from ccra_export.export.onnx_export import check_opset
    from ccra_export.workflows.build import BuildOptions, build_bundle

    with pytest.raises(ConfigError, match=message):
        check_opset(opset)
    with pytest.raises(ConfigError, match=message):  # the Python API: refused before the export
        build_bundle(BuildOptions(model="tiny", output=tmp_path / "api", random_weights=True, opset=opset))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_ccra_config_written_before_plugins_still_loads(checkpoint_copy):
    """ccra.safetensors from before `--ccra-module` has no ``options``: it is the reconstruction's."""
    ccra_config(options=DELETE)(checkpoint_copy)
    header = json.loads(read_safetensors_header(checkpoint_copy / CCRA).metadata["ccra_config"])
    assert "options" not in header and "module" not in header
    checked = validate_checkpoint(checkpoint_copy)
    assert checked.config.ccra.options == {} and not checked.config.ccra.is_plugin
