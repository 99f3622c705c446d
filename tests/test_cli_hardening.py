"""Option values refused at the door, in one line naming the flag (issue 26, items 6, 8 and 9):
an output that would replace its own inputs, non-finite cache sizes, Triton counts past their
protobuf types and a default answer length past the bundle's context."""

from __future__ import annotations

import math
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from ccra_export.cli import main
from ccra_export.core.errors import ConfigError
from ccra_export.runtime.tower_cache import TowerCache
from ccra_export.serve.triton.repository import RepoOptions, write_repository


def invoke(*args: str):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert all(fragment in line for fragment in fragments), line
    return line


def usage_error(result, flag: str) -> None:
    """click's refusal of a value its type does not take: exit 2, the flag named, no traceback."""
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}'" in result.stderr and "Traceback" not in result.output, result.output


@pytest.fixture
def bundle_copy(tmp_path, ccra_bundle):
    """The bundle in a folder of its own, beside a photo, so --force has something to delete."""
    home = tmp_path / "work"
    shutil.copytree(ccra_bundle, home / "bundle")
    Image.new("RGB", (64, 48), (10, 200, 30)).save(home / "photo.png")
    return home / "bundle"


def test_explain_refuses_an_out_that_is_or_holds_the_bundle_or_the_image(bundle_copy):
    home = bundle_copy.parent
    photo = home / "photo.png"
    for out, what in ((bundle_copy, "bundle"), (home, "bundle"), (bundle_copy / "maps", "bundle")):
        result = invoke("explain", "--bundle", bundle_copy, "--image", photo, "--prompt", "q", "--out", out, "--force")
        one_line_error(result, f"--out {out}: overlaps the {what}")
        assert (bundle_copy / "manifest.json").is_file() and photo.is_file()  # nothing was deleted
    pictures = home / "pictures"
    pictures.mkdir()
    shutil.copy(photo, pictures / "p.png")
    result = invoke(
        "explain", "--bundle", bundle_copy, "--image", pictures / "p.png", "--prompt", "q", "--out", pictures, "--force"
    )
    one_line_error(result, f"--out {pictures}: overlaps the image")
    assert (pictures / "p.png").is_file()


def test_run_refuses_an_attention_map_over_its_own_image(bundle_copy):
    photo = bundle_copy.parent / "photo.png"
    before = photo.read_bytes()
    for target, fragment in ((photo, "is the --image"), (bundle_copy / "map.png", "is inside the --bundle")):
        result = invoke("run", "--bundle", bundle_copy, "--image", photo, "--prompt", "q", "--attention-map", target)
        one_line_error(result, f"--attention-map {target}: {fragment}")
    assert photo.read_bytes() == before


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("verb", ["serve", "run", "triton"])
def test_a_non_finite_tower_cache_is_refused_by_every_verb(tmp_path, verb, value):
    rest = {"serve": [], "run": ["--image", tmp_path / "x.png", "--prompt", "q"], "triton": ["--repo", tmp_path / "r"]}
    result = invoke(verb, "--bundle", tmp_path, *rest[verb], "--tower-cache-mib", value)
    usage_error(result, "--tower-cache-mib")
    assert not (tmp_path / "r").exists()


def test_the_python_apis_refuse_a_non_finite_tower_cache_too(tmp_path):
    for value in (math.nan, math.inf, -1.0):
        with pytest.raises(ConfigError, match="tower_cache_mib"):
            TowerCache.from_mib(value)
        with pytest.raises(ConfigError, match="tower_cache_mib"):
            write_repository(tmp_path, tmp_path / "r", RepoOptions(tower_cache_mib=value))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--vision-instances", 2**31),
        ("--vlm-instances", 2**31),
        ("--vlm-instances", 0),
        ("--max-queue-delay-us", 2**64),
        ("--max-queue-delay-us", -1),
        ("--max-new-tokens", 2**31),
    ],
)
def test_triton_counts_past_their_protobuf_types_are_refused(tmp_path, ccra_bundle, flag, value):
    result = invoke("triton", "--bundle", ccra_bundle, "--repo", tmp_path / "r", flag, value)
    usage_error(result, flag)
    assert not (tmp_path / "r").exists()


def test_triton_refuses_a_default_answer_longer_than_the_context(tmp_path, ccra_bundle):
    from ccra_export.core.genai_config import read_genai_config

    context = read_genai_config(ccra_bundle / "lm" / "decoder" / "genai_config.json")["context_length"]
    result = invoke("triton", "--bundle", ccra_bundle, "--repo", tmp_path / "r", "--max-new-tokens", context)
    one_line_error(result, f"--max-new-tokens {context}", f"context of {context} tokens")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="vision_instances"):
        write_repository(ccra_bundle, tmp_path / "r", RepoOptions(vision_instances=2**31))


def test_build_refuses_an_output_that_holds_its_checkpoint(tmp_path, ccra_checkpoint):
    """`build --force` replaces its output: an output that is, holds or sits in the checkpoint is
    refused before anything is written, and the checkpoint stays."""
    old_bundle = tmp_path / "old-bundle"
    old_bundle.mkdir()
    (old_bundle / "manifest.json").write_text("{}")  # a bundle --force would replace
    checkpoint = shutil.copytree(ccra_checkpoint, old_bundle / "checkpoint")
    for output in (old_bundle, checkpoint):
        args = ["build", "--model", str(checkpoint), "--precision", "fp32", "--output", str(output), "--force"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert "--output" in result.stderr and "overlaps the checkpoint" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (checkpoint / "config.json").is_file() and (old_bundle / "manifest.json").read_text() == "{}"
