"""The ONNX Runtime distribution is an explicit choice: extras that never bring two, a README and CI
that name the extra, and one line (exit 2, no traceback) where ONNX Runtime is not importable."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from ccra_export.runtime.ort_session import ort_distributions

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
NAME = PROJECT["name"]

# Which ONNX Runtime distribution a requirement brings with it: itself, or through its own
# requirements (checked against the installed metadata below where the package is installed here).
ORT_FLAVOUR = {
    "onnxruntime": "cpu",
    "onnxruntime-gpu": "gpu",
    "onnxruntime-genai": "cpu",  # Requires-Dist: onnxruntime
    "onnxruntime-genai-cuda": "gpu",  # Requires-Dist: onnxruntime-gpu
}
# onnxruntime* packages that bring no ONNX Runtime: no onnxruntime requirement of their own
NO_ORT = {"onnxruntime-extensions"}


def _name(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


def expand(extra: str | None, seen: frozenset[str] = frozenset()) -> list[str]:
    """The requirements an extra (None: the base install) brings, self-references followed."""
    listed = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    found = []
    for line in listed:
        requirement = Requirement(line)
        if requirement.name == NAME:
            for inner in sorted(requirement.extras - seen):
                found += expand(inner, seen | {inner})
        else:
            found.append(line)
    return found


def flavours(extra: str | None) -> set[str]:
    return {ORT_FLAVOUR[n] for n in map(_name, expand(extra)) if n in ORT_FLAVOUR}


EXTRAS = sorted(PROJECT["optional-dependencies"])


def test_base_install_has_no_onnx_runtime_distribution():
    names = {_name(r) for r in PROJECT["dependencies"]}
    assert not names & set(ORT_FLAVOUR), "the base install must leave the ONNX Runtime distribution to an extra"
    assert {n for n in names if n.startswith("onnxruntime")} <= NO_ORT


@pytest.mark.parametrize("extra", EXTRAS)
def test_every_extra_brings_at_most_one_onnx_runtime(extra):
    unknown = {n for n in map(_name, expand(extra)) if n.startswith("onnxruntime")} - set(ORT_FLAVOUR) - NO_ORT
    assert not unknown, f"[{extra}]: say which ONNX Runtime {unknown} brings (ORT_FLAVOUR / NO_ORT)"
    assert len(flavours(extra)) <= 1, f"[{extra}] brings both the CPU and the GPU ONNX Runtime"


def test_cpu_and_gpu_extras_and_what_builds_on_them():
    assert {_name(r) for r in PROJECT["optional-dependencies"]["cpu"]} == {"onnxruntime"}
    assert {_name(r) for r in PROJECT["optional-dependencies"]["gpu"]} == {"onnxruntime-gpu"}
    assert flavours("lm") == {"cpu"} and flavours("lm-gpu") == {"gpu"}
    assert "onnxruntime" in {_name(r) for r in expand("dev")} and flavours("dev") == {"cpu"}


@pytest.mark.parametrize("package", sorted(set(ORT_FLAVOUR) | NO_ORT))
def test_what_the_table_says_matches_installed_metadata(package):
    try:
        requires = importlib.metadata.requires(package) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{package} is not installed here")
    brings = {_name(r) for r in requires if "extra ==" not in r} & {"onnxruntime", "onnxruntime-gpu"}
    if package in NO_ORT:
        assert not brings
    elif package not in ("onnxruntime", "onnxruntime-gpu"):
        assert brings == {"onnxruntime" if ORT_FLAVOUR[package] == "cpu" else "onnxruntime-gpu"}


def test_this_environment_has_exactly_one_onnx_runtime():
    assert len(ort_distributions()) == 1, ort_distributions()


def test_readme_commands_name_the_extra_and_ci_runs_the_readme_one():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r'pip install -e "\.\[([^\]]*)\]"', readme)
    # the main job builds the demo; its extra brings [lm], with the CPU runtime
    assert "demo" in commands and "cpu,dev" in commands
    ci = (ROOT / ".ci" / "run").read_text()
    installs = re.findall(r"^pip install --quiet (.+)$", ci, re.M)
    assert installs == ["torch==2.13.0", '-e ".[cpu,dev]"', "--no-deps nvidia-pytriton==0.7.0"]
    test_command = next(line for line in readme.splitlines() if "python -m pytest" in line and "pip install" in line)
    assert all(f"pip install {i}" in test_command for i in installs)


# A machine with no ONNX Runtime: `import onnxruntime` fails (and, with HIDE, no distribution is
# recorded either); torch is absent too, as on a Jetson base install.
_WITHOUT_ORT = """
import importlib.metadata, sys
sys.modules["onnxruntime"] = None
sys.modules["torch"] = None
if {hide}:
    real = importlib.metadata.packages_distributions
    importlib.metadata.packages_distributions = lambda: {{k: v for k, v in real().items() if k != "onnxruntime"}}
from ccra_export.cli import main
main()
"""


def run_without_ort(*args: str, hide_distribution: bool = True) -> subprocess.CompletedProcess:
    code = _WITHOUT_ORT.format(hide=hide_distribution)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The one error line (progress lines of the steps that ran before it may precede it)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("verb", ["check", "run", "bench", "bench --vision-only"])
def test_commands_refuse_in_one_line_without_onnx_runtime(verb, ccra_bundle, photo):
    args = [*verb.split(), "--bundle", ccra_bundle]
    if verb == "run":
        args += ["--image", photo, "--prompt", "What is it?"]
    result = run_without_ort(*args)
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith('error: ONNX Runtime is not installed: pip install -e ".[cpu]" in the ccra-export checkout')
    assert "[gpu]" in line and "Jetson" in line


def test_a_broken_onnx_runtime_is_named_in_one_line(ccra_bundle):
    result = run_without_ort("check", "--bundle", ccra_bundle, hide_distribution=False)
    assert result.returncode == 2
    line = one_line(result)
    version = importlib.metadata.version(next(iter(ort_distributions())))
    assert "is installed but does not import" in line and version in line


def test_doctor_without_onnx_runtime_says_so_and_the_fix():
    result = run_without_ort("doctor", "--json")
    assert result.returncode == 0, result.stderr
    checks = {c["component"]: c for c in json.loads(result.stdout)}
    assert checks["ONNX Runtime"]["ok"] is False and checks["ONNX Runtime"]["detail"] == "not installed"
    assert 'pip install -e ".[cpu]"' in checks["ONNX Runtime"]["fix"]


def test_doctor_names_the_installed_distribution():
    from ccra_export.workflows.doctor import run_checks

    row = next(c for c in run_checks() if c.component == "ONNX Runtime distributions")
    (name, version), *_ = ort_distributions().items()
    assert row.ok and row.detail == f"{name} {version}"


def test_doctor_warns_when_two_distributions_are_installed(monkeypatch):
    from ccra_export.workflows import doctor

    monkeypatch.setattr(doctor, "ort_distributions", lambda: {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    row = next(c for c in doctor.run_checks() if c.component == "ONNX Runtime distributions")
    assert row.ok is False and "onnxruntime 1.32.0, onnxruntime-gpu 1.31.1" in row.detail
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in row.fix
