"""The bundle model: one typed manifest for its writers and readers, format 3, format 2 still read.

``tests/fixtures/manifest_v2/`` holds manifests the previous release (format 2, git 7a7bfa1) wrote:
a single graph, a split bundle, the plain variant and the demo's INT8 bundle with a language model.
Format 2 shaped a single graph (``graph.file``), its engine and its calibration record
differently from a split bundle's; format 3 always lists parts.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ccra_export.cli import main
from ccra_export.core.errors import BundleError
from ccra_export.core.manifest import MANIFEST_NAME, manifest_record, read_manifest, write_manifest
from ccra_export.core.manifest_schema import (
    FORMAT_VERSION,
    ImageProcessorRecord,
    ModelRecord,
    migrate_v2,
    validate_manifest,
)
from ccra_export.core.vision_graphs import engine_records, is_split, part_records, parts_from_manifest
from ccra_export.engine.plan import PrecisionPlan, Profile, engine_record

FIXTURES = Path(__file__).parent / "fixtures" / "manifest_v2"
IMAGE = Path(__file__).resolve().parents[1] / "docs" / "explain_example.png"
FORMAT_2 = sorted(path.stem for path in FIXTURES.glob("*.json"))


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def as_format_2(manifest: dict) -> dict:
    """A format 3 manifest as the previous release wrote it: a single graph's file, external data and
    its engine's fields at the top of ``graph`` and ``engine``; a calibration record holding its
    first graph's counts and cache at the top and a split bundle's head under ``graphs``."""
    old = copy.deepcopy(manifest)
    old["format_version"] = 2
    graph = old["graph"]
    if len(graph["parts"]) == 1:
        (part,) = graph["parts"]
        old["graph"] = {"file": part["file"], "external_data": part["external_data"], **graph}
        del old["graph"]["parts"]
    engine = old["engine"]
    if engine and len(engine["parts"]) == 1:
        (part,) = engine["parts"]
        old["engine"] = {**{k: v for k, v in engine.items() if k != "parts"}, **part}
        del old["engine"]["part"]
    calibration = old["calibration"]
    if calibration:
        first, *others = calibration.pop("parts")
        calibration.update({k: v for k, v in first.items() if k != "part"})
        if others:
            calibration["graphs"] = {p["part"]: {k: v for k, v in p.items() if k != "part"} for p in others}
            calibration["graph"] = first["part"]
    if old["language_model"]:  # written by format 3 releases only (optional there): recipe, eval set, decoder
        for key in ("quant", "evaluation", "decoder"):
            old["language_model"].pop(key, None)
    return old


def engine_build(file: str, plugin_sha256: str | None = None) -> dict:
    """One engine's record, as ``engine.plan.engine_record`` wrote it in format 2 and still does."""
    plan = PrecisionPlan(True, (), "strongly typed")
    profile = Profile({"pixel_values": ((1, 3, 56, 56), (1, 3, 56, 56), (8, 3, 56, 56))})
    settings = {"file": file, "workspace_mib": 2048, "optimization_level": 3}
    return dict(engine_record("10.3.0", "Orin", "8.7", plugin_sha256, plan, profile, settings))


ENGINE_PARITY = {"file": "reference.npz", "passed": True, "reference": "PyTorch"}


# ---------------------------------------------------------------- format 2, read


@pytest.mark.parametrize("name", FORMAT_2)
def test_format_2_reads_as_format_3_and_loses_nothing(name):
    written = fixture(name)
    assert written["format_version"] == 2
    migrated, _ = migrate_v2(written)
    manifest = validate_manifest(migrated)
    assert manifest["format_version"] == FORMAT_VERSION == 3
    names = [part["name"] for part in part_records(manifest)]
    assert names == (["vision_tower", "ccra_head"] if "parts" in written["graph"] else ["vision"])
    assert "file" not in manifest["graph"] and is_split(manifest) == (len(names) == 2)
    if names == ["vision"]:  # the single graph's record is the one part, with the graph's interface
        assert part_records(manifest)[0]["file"] == written["graph"]["file"]
        assert part_records(manifest)[0]["inputs"] == written["graph"]["inputs"]
    if written["calibration"]:
        assert [p["part"] for p in manifest["calibration"]["parts"]] == names
    assert as_format_2(manifest) == written  # only keys moved: every value is where the old file had it


def test_format_2_engines_become_one_part_per_graph():
    single = fixture("single_fp32")
    flat = {**engine_build("reference.npz"), "parity": ENGINE_PARITY}  # `ccra-export engine` in format 2
    single["engine"] = flat
    manifest = validate_manifest(migrate_v2(single)[0])
    assert [p["part"] for p in manifest["engine"]["parts"]] == ["vision"]
    assert manifest["engine"]["parity"] == ENGINE_PARITY and "file" not in manifest["engine"]
    assert engine_records(manifest) == {"vision": flat}  # what a reader of one engine got in format 2
    assert as_format_2(manifest) == single

    split = fixture("split_fp16")
    tower, head = engine_build("reference.npz"), engine_build("reference.npz", "a" * 64)
    shared = ("tensorrt_version", "gpu", "compute_capability", "plugin_sha256")
    split["engine"] = {  # format 2's join: the shared fields once, each engine's own under parts
        **{k: head[k] for k in shared},
        "parts": [
            {"part": part, **{k: v for k, v in record.items() if k not in shared}}
            for part, record in (("vision_tower", tower), ("ccra_head", head))
        ],
    }
    manifest = validate_manifest(migrate_v2(split)[0])
    assert manifest["engine"] == split["engine"]  # already format 3's shape
    assert engine_records(manifest)["vision_tower"]["plugin_sha256"] == "a" * 64


@pytest.mark.parametrize(
    ("name", "edit", "key"),
    [
        ("single_fp32", lambda m: m["graph"].__setitem__("file", "../vision.onnx"), "graph.file"),
        ("single_fp32", lambda m: m["graph"].pop("external_data"), "graph.external_data"),
        ("single_fp32", lambda m: m["graph"]["inputs"][0].__setitem__("dtype", 5), "graph.inputs[0].dtype"),
        ("plain_fp32", lambda m: m["graph"].__setitem__("file", "other.onnx"), "graph.file"),
        (
            "single_fp32",
            lambda m: m.__setitem__("engine", {**engine_build("/tmp/vision.engine"), "parity": ENGINE_PARITY}),
            "engine.file",
        ),
        (
            "demo_int8_split_lm",
            lambda m: m["calibration"]["graphs"]["ccra_head"].__setitem__("ort_cache", "x.json"),
            "calibration.graphs.ccra_head.ort_cache",
        ),
        ("demo_int8_split_lm", lambda m: m["calibration"].pop("ort_cache"), "calibration.ort_cache"),
        ("split_fp16", lambda m: m["graph"]["parts"][1].__setitem__("file", "/x.onnx"), "graph.parts[1].file"),
    ],
)
def test_a_bad_format_2_manifest_names_the_key_as_written(name, edit, key):
    written = fixture(name)
    edit(written)
    with pytest.raises(ValueError) as info:
        validate_manifest(*migrate_v2(written))
    assert str(info.value).startswith(f"{key}:"), info.value
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the writers validate


def test_writer_refuses_a_malformed_record_before_writing(tmp_path):
    good = validate_manifest(migrate_v2(fixture("single_fp32"))[0])
    cases = {
        "graph.parts[0].name": lambda m: m["graph"]["parts"][0].__setitem__("name", "tower"),
        "graph.parts[0].external_data": lambda m: m["graph"]["parts"][0].pop("external_data"),
        "graph.parts": lambda m: m["graph"].__setitem__("parts", []),
        "engine.parts[0]": lambda m: m.__setitem__(
            "engine", {**engine_build("reference.npz"), "parts": [{"part": "vision", "file": "reference.npz"}]}
        ),
        "parity.thresholds.min_cosine": lambda m: m["parity"]["thresholds"].__setitem__("min_cosine", 2.0),
        "Out of range float values": lambda m: m["parity"]["thresholds"].__setitem__("min_cosine", float("nan")),
        "reference.file": lambda m: m["reference"].__setitem__("file", "missing.npz"),
    }
    for expected, edit in cases.items():
        manifest = copy.deepcopy(good)
        edit(manifest)
        with pytest.raises(BundleError) as info:
            write_manifest(tmp_path, manifest)
        message = str(info.value)
        assert expected in message and "\n" not in message and "bug" in message, (expected, message)
        assert not (tmp_path / MANIFEST_NAME).exists()


def test_records_built_elsewhere_are_checked_as_the_reader_parses_them():
    processor = {
        "shortest_edge": 224,
        "crop_height": 224,
        "crop_width": 224,
        "image_mean": (0.5, 0.5, 0.5),  # a dataclass's tuple: the reader sees a JSON list
        "image_std": (0.5, 0.5, 0.5),
        "rescale_factor": 1 / 255,
        "resample": 3,
        "pad_to_square": True,
    }
    assert manifest_record(ImageProcessorRecord, processor, "image_processor")["image_mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(BundleError, match=r"model\.vision\.image_size: Input should be greater than 0"):
        model = fixture("single_fp32")["model"]
        manifest_record(ModelRecord, {**model, "vision": {**model["vision"], "image_size": 0}}, "model")


# ---------------------------------------------------------------- built bundles


@pytest.fixture(scope="module")
def single_fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("format") / "single"
    result = cli(
        "build", "--model", "tiny", "--random-weights", "--precision", "fp32", "--single-vision-graph", "-o", out
    )
    assert result.exit_code == 0, result.output
    return out


def test_a_single_graph_is_a_one_part_list(single_fp32):
    manifest = read_manifest(single_fp32)
    assert manifest["format_version"] == 3 and set(manifest["graph"]) == {"inputs", "outputs", "parts"}
    (part,) = manifest["graph"]["parts"]
    assert part["name"] == "vision" and part["file"] == "vision.onnx" and part["external_data"] == []
    assert part["inputs"] == manifest["graph"]["inputs"] and part["outputs"] == manifest["graph"]["outputs"]
    assert [p.name for p in parts_from_manifest(manifest)] == ["vision"] and not is_split(manifest)
    assert manifest["export"]["split_vision"] is False and manifest["engine"] is None
    assert MANIFEST_NAME not in manifest["files"]  # nothing hashes the manifest: a migration keeps every hash


def test_engine_writes_format_3_into_a_format_2_bundle(single_fp32, tmp_path, monkeypatch):
    """`ccra-export engine` on a format 2 bundle (TensorRT stood in for by ONNX Runtime: the engine
    file is a placeholder, the runner the ONNX graph): the manifest comes back in format 3, validated
    on write, and the bundle still checks."""
    from ccra_export.runtime.vision_backend import OrtBackend
    from ccra_export.workflows import engine as engine_workflow

    bundle = tmp_path / "bundle"
    shutil.copytree(single_fp32, bundle)
    old = as_format_2(json.loads((bundle / MANIFEST_NAME).read_text()))
    assert set(old["graph"]) == set(fixture("single_fp32")["graph"])  # shaped as the previous release wrote
    (bundle / MANIFEST_NAME).write_text(json.dumps(old))

    def fake_build(graph, engine_path, precision, profile, library, trt_options, steps):
        engine_path.write_bytes(b"engine")
        settings = {"file": engine_path.name, "workspace_mib": 2048, "optimization_level": 3}
        record = engine_record("10.3.0", "Orin", "8.7", None, PrecisionPlan(True, (), "test"), profile, settings)
        return OrtBackend(graph), record

    monkeypatch.setattr(engine_workflow, "tensorrt_status", lambda: (True, "TensorRT (stand-in)"))
    monkeypatch.setattr(engine_workflow, "build_trt_engine", fake_build)
    report = engine_workflow.add_engine(bundle, trt_options=engine_workflow.TrtOptions(), reference="recorded")
    assert report.passed
    written = json.loads((bundle / MANIFEST_NAME).read_text())
    assert written["format_version"] == 3 and written["tool_version"] == old["tool_version"]
    assert [p["part"] for p in written["engine"]["parts"]] == ["vision"] and "file" not in written["engine"]
    assert written["engine"]["parts"][0]["file"] == "vision.engine" and written["engine"]["parity"]["passed"]
    assert "vision.engine" in written["files"] and "file" not in written["graph"]
    assert cli("check", "--bundle", bundle, "--reference", "recorded").exit_code == 0


@pytest.mark.parametrize("which", ["fp32_bundle", "ccra_bundle"])  # a single graph (plain) and a split one
def test_a_format_2_bundle_opens_runs_and_checks(which, request, tmp_path):
    source = request.getfixturevalue(which)
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    old = as_format_2(json.loads((bundle / MANIFEST_NAME).read_text()))
    like = fixture("plain_fp32" if which == "fp32_bundle" else "demo_int8_split_lm")
    assert old.keys() == like.keys() and old["graph"].keys() == like["graph"].keys()
    assert old["language_model"].keys() == fixture("demo_int8_split_lm")["language_model"].keys()
    (bundle / MANIFEST_NAME).write_text(json.dumps(old))
    on_disk = (bundle / MANIFEST_NAME).read_bytes()

    want = read_manifest(source)
    for key in ("quant", "evaluation", "decoder"):  # what format 2 never wrote
        want["language_model"].pop(key, None)
    assert read_manifest(bundle) == want  # the same model in memory
    checked = cli("check", "--bundle", bundle, "--reference", "recorded")  # re-hashes every file
    assert checked.exit_code == 0, checked.output
    ran = cli(
        "run", "--verify", "--bundle", bundle, "--image", IMAGE, "--prompt", "What is this?", "--max-new-tokens", 2
    )
    assert ran.exit_code == 0, ran.output
    refused = cli("engine", "--bundle", bundle)  # no TensorRT here: one line, and the bundle left as it was
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert (bundle / MANIFEST_NAME).read_bytes() == on_disk
