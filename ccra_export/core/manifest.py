"""The bundle manifest: what was built, from what, for which runtime, and its file hashes.

A bundle directory holds the graph files, ``manifest.json`` and ``parity.json``. Loading a bundle
checks the manifest before anything runs, so a stale or foreign bundle fails with one line.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ccra_export import __version__
from ccra_export.core.errors import BundleError
from ccra_export.core.hashing import sha256_file

MANIFEST_NAME = "manifest.json"
PARITY_NAME = "parity.json"
GRAPH_FILE = "vision.onnx"
ENGINE_FILE = "vision.engine"
ENGINE_PARITY_FILE = "parity_engine.json"
FORMAT = "ccra-export-bundle"
FORMAT_VERSION = 1


def tensor_spec(name: str, dtype: str, shape: list[int | str]) -> dict[str, Any]:
    """One graph input/output: symbolic dimensions are strings (``batch``, ``text_len``)."""
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def new_manifest(**fields: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        **fields,
    }


def file_entries(bundle: Path, names: list[str]) -> dict[str, str]:
    """``{file name: sha256}`` for files inside the bundle directory."""
    return {name: sha256_file(bundle / name) for name in names}


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``manifest.json``; every failure is one line naming the bundle."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"--bundle {bundle}: not a directory; expected a bundle written by `ccra-export build`")
    if not path.is_file():
        raise BundleError(f"--bundle {bundle}: no {MANIFEST_NAME}; expected a bundle written by `ccra-export build`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a ccra-export manifest (format field is not {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {manifest.get('format_version')} was written by ccra-export "
            f"{manifest.get('tool_version')}; this is {__version__} (format {FORMAT_VERSION}): rebuild the bundle"
        )
    return manifest


def verify_files(bundle: str | Path, manifest: dict[str, Any]) -> None:
    """Refuse a bundle whose graph files changed since the build (truncated copy, edited graph)."""
    bundle = Path(bundle)
    for name, expected in manifest.get("files", {}).items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{path}: missing; the manifest lists it: rebuild or re-copy the bundle")
        if sha256_file(path) != expected:
            raise BundleError(f"{path}: sha256 differs from the manifest; the file changed after the build")
