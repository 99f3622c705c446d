"""The bundle manifest: what was built, from what, for which runtime, and its file hashes.

A bundle directory holds the graph files, ``manifest.json`` and ``parity.json``. Loading a bundle
checks the manifest before anything runs, so a stale or foreign bundle fails with one line.
Writers and readers share one model (``manifest_schema.Manifest``): ``new_manifest`` builds it,
``write_manifest`` validates it as ``read_manifest`` will before writing; ``read_manifest``
reads format 3 and format 2 (reshaped in memory by ``manifest_schema.migrate_v2``).
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from ccra_export import __version__
from ccra_export.core import atomic
from ccra_export.core.errors import BundleError
from ccra_export.core.hashing import sha256_file
from ccra_export.core.manifest_schema import (
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    AxisRange,
    BackendRecord,
    CalibrationRecord,
    EngineRecord,
    ExportRecord,
    FileEntry,
    GraphRecord,
    ImageProcessorRecord,
    LanguageModelRecord,
    Manifest,
    ModelRecord,
    ParityRecord,
    PluginRecord,
    ReferenceRecord,
    SourceRecord,
    TensorSpec,
    migrate_v2,
    relative_bundle_path,
    validate_manifest,
    validate_record,
)

MANIFEST_NAME = "manifest.json"
PARITY_NAME = "parity.json"
ENGINE_PARITY_FILE = "parity_engine.json"
MAX_MANIFEST_BYTES = 16 * 2**20
_Record = TypeVar("_Record")


def tensor_spec(name: str, dtype: str, shape: list[int | str]) -> TensorSpec:
    """One graph input/output: symbolic dimensions are strings (``batch``, ``text_len``)."""
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def new_manifest(
    *,
    model: ModelRecord,
    variant: str,
    source: SourceRecord,
    precision: str,
    export: ExportRecord,
    graph: GraphRecord,
    dynamic_axes: dict[str, AxisRange],
    files: dict[str, FileEntry],
    backend: BackendRecord,
    parity: ParityRecord,
    reference: ReferenceRecord | None,
    engine: EngineRecord | None,
    plugin: PluginRecord | None,
    calibration: CalibrationRecord | None,
    language_model: LanguageModelRecord | None,
    image_processor: ImageProcessorRecord,
    ccra_parameters: int,
) -> Manifest:
    """A new bundle's manifest in the current format, with this tool's version and host."""
    return Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        tool_version=__version__,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        host={"machine": platform.machine(), "python": platform.python_version()},
        model=model,
        variant=variant,  # type: ignore[typeddict-item]  # the schema checks the literal on write
        ccra_parameters=ccra_parameters,
        source=source,
        precision=precision,  # type: ignore[typeddict-item]
        export=export,
        graph=graph,
        dynamic_axes=dynamic_axes,
        files=files,
        backend=backend,
        parity=parity,
        reference=reference,
        engine=engine,
        plugin=plugin,
        calibration=calibration,
        language_model=language_model,
        image_processor=image_processor,
    )


def write_manifest(bundle: str | Path, manifest: Manifest) -> None:
    """Write ``bundle/manifest.json`` after checking it exactly as ``read_manifest`` will (schema,
    every file listed, sizes): a writer that builds a bad record fails here, at build time, in
    one line, instead of in a user's reader."""
    path = Path(bundle) / MANIFEST_NAME
    try:
        as_read = json.loads(json.dumps(manifest, allow_nan=False))  # what a reader will parse
        validate_manifest(as_read)
    except ValueError as exc:
        raise BundleError(
            f"{path}: the manifest this ccra-export {__version__} was about to write is invalid ({exc}); "
            "nothing was written: please report this bug"
        ) from None
    check_sizes(bundle, manifest)
    atomic.write_json(path, manifest)


def manifest_record(kind: type[_Record], data: Any, key: str) -> _Record:
    """``data`` (a dict built elsewhere: a config's ``to_dict``, a dataclass's fields) as the record
    ``kind`` the schema types at ``key``, as a reader will parse it: a writer's records are typed
    by the schema its reader uses, and a bad one fails the build in one line."""
    try:
        return validate_record(kind, data, key)
    except ValueError as exc:
        raise BundleError(f"{MANIFEST_NAME}: this ccra-export {__version__} built an invalid record ({exc})") from None


def file_entries(bundle: Path, names: list[str]) -> dict[str, FileEntry]:
    """``{file name: {sha256, bytes}}`` for files inside the bundle directory."""
    return {name: file_entry(bundle / name) for name in names}


def file_entry(path: Path) -> FileEntry:
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
    """Load ``manifest.json`` (format 3, or format 2 reshaped into it), validate it against the
    schema and check the files it lists are inside the bundle and of the recorded size (hashes are
    ``verify_files``: seconds per GB). Every failure is one line naming the bundle, the key as the
    file writes it, or the file."""
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
    version = data.get("format_version")
    moved: dict[str, str] = {}
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"{path}: bundle format version {version!r} was written by ccra-export {data.get('tool_version')}; "
            f"this is {__version__} (reads formats {', '.join(map(str, READABLE_VERSIONS))}): rebuild the bundle"
        )
    if version == 2:
        data, moved = migrate_v2(data)
    try:
        manifest = validate_manifest(data, moved)
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


def verify_files(bundle: str | Path, manifest: Manifest, only: set[str] | None = None) -> None:
    """Refuse a bundle whose files changed since the build (edited graph, same-size corruption);
    ``only``: re-hash just these of its files (sizes are checked for all)."""
    check_sizes(bundle, manifest)
    for name, entry in manifest["files"].items():
        if only is not None and name not in only:
            continue
        if sha256_file(Path(bundle) / name) != entry["sha256"]:
            raise BundleError(
                f"{Path(bundle) / name}: sha256 differs from the manifest; the file changed after the build"
            )


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")
