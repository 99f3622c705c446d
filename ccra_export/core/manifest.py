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
from ccra_export.core.manifest_schema import Manifest, relative_bundle_path, validate_manifest

MANIFEST_NAME = "manifest.json"
PARITY_NAME = "parity.json"
GRAPH_FILE = "vision.onnx"
ENGINE_FILE = "vision.engine"
ENGINE_PARITY_FILE = "parity_engine.json"
FORMAT = "ccra-export-bundle"
FORMAT_VERSION = 2  # 2: files carry sizes; the manifest has a schema (manifest_schema.py)
MAX_MANIFEST_BYTES = 16 * 2**20


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


def file_entries(bundle: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{file name: {sha256, bytes}}`` for files inside the bundle directory."""
    return {name: file_entry(bundle / name) for name in names}


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def bundle_path(bundle: str | Path, name: str, where: str) -> Path:
    """``bundle/name``, refusing a name that is absolute, not normalised, or that resolves (symlinks
    followed) outside the bundle directory; ``where`` names the entry that holds ``name``."""
    try:
        relative_bundle_path(name)
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}") from None
    root = Path(bundle).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise BundleError(f"{where}: {name!r} resolves to {path}, outside the bundle {root}")
    return root / name


def read_manifest(bundle: str | Path) -> Manifest:
    """Load ``manifest.json``, validate it against the schema and check the files it lists are
    inside the bundle and of the recorded size (hashes are ``verify_files``: seconds per GB).
    Every failure is one line naming the bundle, the key or the file."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(
            "not a directory; expected a bundle written by `ccra-export build`", field="bundle", value=bundle
        )
    if not path.is_file():
        raise BundleError(
            f"no {MANIFEST_NAME}; expected a bundle written by `ccra-export build`", field="bundle", value=bundle
        )
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes; a manifest is under {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: not a ccra-export manifest (format field is not {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {data.get('format_version')!r} was written by ccra-export "
            f"{data.get('tool_version')}; this is {__version__} (format {FORMAT_VERSION}): rebuild the bundle"
        )
    try:
        manifest = validate_manifest(data)
    except ValueError as exc:
        raise BundleError(f"{path}: {exc}") from None
    check_sizes(bundle, manifest)
    return manifest


def check_sizes(bundle: str | Path, manifest: Manifest) -> None:
    """Every listed file is a regular file inside the bundle, of the size the build recorded: the
    cheap check that catches a truncated or half-copied bundle before a runtime parses it."""
    for name, entry in manifest["files"].items():
        path = bundle_path(bundle, name, f"{Path(bundle) / MANIFEST_NAME}: files")
        if not path.is_file():
            raise BundleError(f"{path}: missing; the manifest lists it: rebuild or re-copy the bundle")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(
                f"{path}: {size} bytes, the manifest records {entry['bytes']}: the file was truncated or changed "
                "after the build; re-copy the bundle (`ccra-export check` re-hashes every file)"
            )


def verify_files(bundle: str | Path, manifest: Manifest) -> None:
    """Refuse a bundle whose files changed since the build (edited graph, same-size corruption)."""
    check_sizes(bundle, manifest)
    for name, entry in manifest["files"].items():
        if sha256_file(Path(bundle) / name) != entry["sha256"]:
            raise BundleError(
                f"{Path(bundle) / name}: sha256 differs from the manifest; the file changed after the build"
            )


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")
