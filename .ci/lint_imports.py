"""Check shared/DESIGN.md's import rules (pyproject's [tool.importlinter]) on the whole package.

import-linter finds modules on disk below the root package's folder, but the stage folders
(export/, calibration/, engine/, runtime/) are mapped into ``ccra_export`` by setuptools'
package-dir and live elsewhere. So the import package is assembled in a scratch directory
(symlinks, no build), every module is counted, and lint-imports runs there.

    python .ci/lint_imports.py            # exit status of lint-imports
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """``{import package: source folder}`` from pyproject.toml's setuptools package-dir."""
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = config.get("package-dir", {})
    return {name: root / mapped.get(name, name.replace(".", "/")) for name in config["packages"]}


def assemble(dest: Path, root: Path = ROOT) -> int:
    """Lay out the import package under ``dest`` as an installed copy would be; returns its module count."""
    count = 0
    for package, folder in sorted(package_dirs(root).items()):
        target = dest / package.replace(".", "/")
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(folder.glob("*.py")):
            (target / source.name).symlink_to(source)
            count += 1
    return count


def seen_modules(path: Path) -> int:
    """How many modules grimp finds in the assembled package (every one must be seen)."""
    code = "import grimp, sys; print(len(grimp.build_graph('ccra_export').modules))"
    env = {**os.environ, "PYTHONPATH": str(path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=path, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"lint_imports: grimp could not read the package: {last}")
    return int(result.stdout.strip())


def lint(root: Path = ROOT, extra_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="ccra-imports-") as scratch:
        tree = Path(scratch)
        laid_out = assemble(tree, root)
        seen = seen_modules(tree)
        if seen != laid_out:
            sys.exit(f"lint_imports: grimp saw {seen} modules of {laid_out}; the contracts would miss some")
        env = {**os.environ, "PYTHONPATH": str(tree)}
        command = ["lint-imports", str(root / "pyproject.toml"), "--no-cache", *extra_args]
        result = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
        result.stdout = f"{laid_out} modules checked\n{result.stdout}"
        return result


if __name__ == "__main__":
    outcome = lint(extra_args=tuple(sys.argv[1:]))
    sys.stdout.write(outcome.stdout)
    sys.stderr.write(outcome.stderr)
    sys.exit(outcome.returncode)
