"""One helper (core/extras.py) answers "is this extra installed", and every install hint is the
checkout's own command: ccra-export is not on a package index, so a hint naming
``ccra-export[extra]`` would send pip to fetch whatever an index serves under that name."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement

from ccra_export.cli import main
from ccra_export.core.errors import MissingDependencyError
from ccra_export.core.extras import EXTRAS, available, install_hint, missing, require
from tests.test_install_extras import PROJECT, expand

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "ccra_export", *(ROOT / stage for stage in ("export", "calibration", "engine", "runtime", "serve"))]
#: a package-index name with extras; a path ending in the checkout's folder name (/opt/ccra-export[gpu]) is fine
INDEX_NAME = re.compile(r"(?<![\w/.-])ccra-export\[")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _brought_by(extra: str) -> set[str]:
    """Distributions an extra brings: its requirements and, where installed, theirs (one level)."""
    names = set()
    for line in expand(extra):
        requirement = Requirement(line)
        names.add(_norm(requirement.name))
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for sub in map(Requirement, requires):
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in requirement.extras or {""}):
                names.add(_norm(sub.name))
    return names


def test_no_hint_names_the_package_on_an_index():
    files = [p for folder in SOURCES for p in folder.rglob("*.py")]
    files += [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if INDEX_NAME.search(line)
    ]
    assert not found, "\n".join(found)
    assert INDEX_NAME.search("pip install 'ccra-export[gpu]'") and not INDEX_NAME.search("'/opt/ccra-export[gpu]'")


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_each_extra_the_code_checks_brings_the_modules_it_looks_for(extra):
    assert extra in PROJECT["optional-dependencies"]
    brings = _brought_by(extra)
    distributions = importlib.metadata.packages_distributions()
    for module in EXTRAS[extra].modules:
        top = module.split(".")[0]
        providers = {_norm(d) for d in distributions.get(top, [])} or {_norm(top)}  # not installed: its own name
        assert providers & brings, f"[{extra}] looks for {module} (from {providers}) but brings {sorted(brings)}"


def test_a_missing_extra_is_one_line_with_the_checkout_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then finds nothing, as without it
    assert missing("explain") == ["matplotlib"] and not available("explain")
    with pytest.raises(MissingDependencyError) as refused:
        require("explain", "drawing the map")
    assert str(refused.value) == (
        "drawing the map needs matplotlib, which draws the maps (matplotlib not installed): "
        'pip install -e ".[explain]" in the ccra-export checkout'
    )
    assert install_hint("export").endswith("(on a Jetson, install JetPack's PyTorch first)")


def test_every_extra_installed_here_is_available():
    assert [extra for extra in EXTRAS if extra != "tensorrt" and not available(extra)] == []  # [dev] has them


@pytest.mark.parametrize(
    ("blocked", "args", "extra"),
    [
        ("fastapi", ["serve"], "serve"),
        ("matplotlib", ["explain", "--prompt", "What is it?", "--out", "{tmp}/why"], "explain"),
        ("matplotlib", ["run", "--prompt", "What is it?", "--attention-map", "{tmp}/map.png"], "explain"),
        ("tritonclient", ["triton", "--repo", "{tmp}/repo"], "triton"),
    ],
)
def test_verbs_refuse_without_their_extra_before_any_work(blocked, args, extra, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (0, 0, 255)).save(photo)
    argv = [a.format(tmp=tmp_path) for a in args]
    verb, rest = argv[0], argv[1:]
    image = ["--image", str(photo)] if verb in ("explain", "run") else []
    result = CliRunner().invoke(main, [verb, "--bundle", str(tmp_path), *image, *rest])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [result.output.strip()], result.output
    assert f'({blocked} not installed): pip install -e ".[{extra}]" in the ccra-export checkout' in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]  # nothing written


def test_building_the_language_model_without_the_builder_names_the_input_that_asked(tmp_path, monkeypatch):
    from ccra_export.export.lm_export import build_decoder

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(MissingDependencyError) as refused:
        build_decoder(tmp_path, tmp_path / "out", "int4")
    assert refused.value.field == "lm_precision"
    assert 'pip install -e ".[lm]" in the ccra-export checkout' in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_no_hand_written_extra_check_outside_the_helper():
    """find_spec is how "is it installed" is asked without importing; only core/extras.py asks."""
    offenders = []
    for folder in SOURCES:
        for path in folder.rglob("*.py"):
            if path == ROOT / "ccra_export" / "core" / "extras.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "find_spec":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
