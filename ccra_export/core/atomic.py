"""Write-then-rename helpers so that an interrupted or failed build leaves no half artifact.

Every helper removes what it staged on *any* exception, ``KeyboardInterrupt`` included (the CLI
turns SIGTERM and SIGHUP into one, ``cli.output.terminate_like_interrupt``), so Ctrl-C, ``kill``,
``timeout`` and ``docker stop`` all leave nothing behind. A full disk ends as one
``NoSpaceError``, recognised by errno (ENOSPC, EDQUOT) on an ``OSError`` in the exception's chain
or, where a library or a child process keeps only the text, by the errno number as Python and
Rust print it (``says_no_space``). A writer that does not check its writes (ONNX's C++ shape
inference) leaves a short file that fails later when read back (protobuf's ``DecodeError``, no
errno at all): that failure counts as a full disk when the filesystem is found full *before* the
staged files are removed.
Publishing a staged directory is serialised between processes by a lock file beside it.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ccra_export.core.errors import BundleError, CCRAExportError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: publishing is not serialised there
    fcntl = None  # type: ignore[assignment]

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Where only the text of the OS error survives, its errno number as each source prints it (the
# number, not strerror's words, which follow the locale):
#   "[Errno 28]"      Python's OSError, as the last stderr line of a child process carries it
#                     (onnxruntime-genai's model builder, which export/lm_export.py runs)
#   "(os error 28)"   Rust's io::Error Display: safetensors' SafetensorError holds only this text
#   "Os { code: 28,"  Rust's io::Error Debug, which older safetensors releases printed
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]|\(os error (\d+)\)|\bOs \{ code: (\d+),")
#: below this much free space, a file that fails to read back (a short write) is a full disk
NEARLY_FULL_BYTES = 32 << 20
# What reading back a truncated file raises. The libraries' classes are looked up by their
# defining module in sys.modules: core imports none of them, and one that raised is loaded.
_READ_BACK_STDLIB: tuple[type[BaseException], ...] = (
    json.JSONDecodeError,
    zipfile.BadZipFile,  # numpy's .npz
    pickle.UnpicklingError,
    EOFError,
)
_READ_BACK_LIBRARIES = (
    ("google.protobuf.message", "DecodeError"),  # onnx.load
    ("onnx.onnx_cpp2py_export.checker", "ValidationError"),  # onnx.checker
    ("onnxruntime.capi.onnxruntime_pybind11_state", "InvalidProtobuf"),
    ("onnxruntime.capi.onnxruntime_pybind11_state", "InvalidGraph"),
    ("onnxruntime.capi.onnxruntime_pybind11_state", "Fail"),
    ("safetensors._safetensors_rust", "SafetensorError"),
)
_FULL_MARK = "_ccra_export_disk_full"


class NoSpaceError(BundleError):
    """The filesystem filled up while writing; everything staged has been removed."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_shared(path: str | Path) -> None:
    """Give a file another library wrote through ``mkstemp`` (0600) the mode the umask gives the
    rest of the bundle: a bundle is copied and read by other users (a service account, Triton)."""
    os.chmod(path, 0o666 & ~_umask())


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def says_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception in its chain is ENOSPC/EDQUOT: an ``OSError``'s errno, else
    the errno number in the text of a wrapper that dropped the ``OSError`` (``_ERRNO_TEXT``)."""
    for current in _chain(exc):
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS:
            return True
        for match in _ERRNO_TEXT.finditer(str(current)):
            if int(next(n for n in match.groups() if n is not None)) in NO_SPACE_ERRNOS:
                return True
    return False


def nearly_full(path: str | Path) -> bool:
    """Whether the filesystem holding ``path`` has less than ``NEARLY_FULL_BYTES`` free."""
    try:
        stats = os.statvfs(path)
    except (OSError, AttributeError):  # gone already, or no statvfs (Windows)
        return False
    return stats.f_bavail * stats.f_frsize < NEARLY_FULL_BYTES


def _out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, NoSpaceError) or getattr(exc, _FULL_MARK, False) or says_no_space(exc)


def _remove(path: Path) -> None:
    """``rmtree`` that finishes even when a signal's exception interrupts it (then re-raised)."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _read_back_errors() -> tuple[type[BaseException], ...]:
    """The read-back failure classes: the standard library's, and those of the loaded libraries."""
    found = list(_READ_BACK_STDLIB)
    for module, name in _READ_BACK_LIBRARIES:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def _reads_back_short(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a library failing to read a file back: what an unchecked
    write that ran out of space turns into later."""
    errors = _read_back_errors()
    return any(isinstance(current, errors) for current in _chain(exc))


def _discard(path: Path, exc: BaseException) -> None:
    """Remove ``path`` after ``exc``; first note on ``exc`` whether it is a read-back failure on
    a full disk, since the removal frees the space that tells. A ``CCRAExportError`` keeps its
    own message unless it quotes ENOSPC."""
    unexplained = isinstance(exc, Exception) and not isinstance(exc, CCRAExportError)
    if unexplained and not _out_of_space(exc) and _reads_back_short(exc) and nearly_full(path.parent):
        try:
            setattr(exc, _FULL_MARK, True)
        except AttributeError:  # pragma: no cover - every BaseException has a __dict__
            pass
    if path.is_dir() and not path.is_symlink():
        _remove(path)
    else:
        path.unlink(missing_ok=True)


def _raise_if_no_space(exc: BaseException, writing: Path) -> None:
    """Re-raise ``exc`` as one ``NoSpaceError`` line when the disk filled up."""
    if isinstance(exc, NoSpaceError) or not isinstance(exc, Exception) or not _out_of_space(exc):
        return
    raise NoSpaceError(
        f"no space left on device writing {writing}: nothing was left behind; free some space and run again"
    ) from exc


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary sibling and rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a bundle is shared
        os.replace(tmp, path)
    except BaseException as exc:
        _discard(Path(tmp), exc)
        _raise_if_no_space(exc, path)
        raise


@contextmanager
def publish_lock(final: str | Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``final`` (``flock``): one process at a time publishes there.

    The lock file is removed on release, while still held; a waiter that then gets the lock on
    the removed file sees that the path no longer names it and locks the new one instead."""
    final = Path(final)
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = final.parent / f".{final.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(path)
                same = (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the lock


def _publish(stage: Path, final: Path, *, replace: bool) -> Path | None:
    """Rename ``stage`` to ``final`` (under the publish lock); returns the old ``final`` to delete."""
    if not final.exists():
        os.replace(stage, final)
        return None
    if not final.is_dir():
        raise BundleError(f"{final}: exists and is not a directory")
    if not replace and any(final.iterdir()):
        raise BundleError(
            f"{final}: already holds files (another run wrote them meanwhile); pass {{force}} to replace",
            mentions=("force",),
        )
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    try:
        os.replace(final, trash / final.name)
        try:
            os.replace(stage, final)
        except BaseException:
            os.replace(trash / final.name, final)  # put the old one back
            raise
    except BaseException:
        _remove(trash)
        raise
    return trash


@contextmanager
def staged_directory(final: Path, *, replace: bool) -> Iterator[Path]:
    """Yield an empty staging directory beside ``final``; on success it becomes ``final``.

    On any exception (Ctrl-C and SIGTERM included) the staging directory is removed and
    ``final`` is untouched; a full disk is reported as one ``NoSpaceError``. With ``replace`` an
    existing ``final`` is swapped out only after the new one is complete. Two processes
    publishing into one ``final`` take turns (``publish_lock``): without ``replace`` the second
    gets a ``BundleError``, with it the last one wins; neither leaves a staging directory.
    """
    final = Path(final)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        yield stage
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp creates 0700
        with publish_lock(final):
            old = _publish(stage, final, replace=replace)
    except BaseException as exc:
        _discard(stage, exc)
        _raise_if_no_space(exc, final)
        raise
    if old is not None:
        _remove(old)


@contextmanager
def scratch_directory(beside: str | Path, label: str = "scratch") -> Iterator[Path]:
    """A temporary directory beside ``beside`` (``.NAME.LABEL-*``: same filesystem, so the
    build's intermediate files count against the disk it writes), removed however the block ends;
    a full disk is reported as one ``NoSpaceError``."""
    beside = Path(beside)
    parent = beside.resolve().parent
    scratch = Path(tempfile.mkdtemp(prefix=f".{beside.name}.{label}-", dir=parent))
    try:
        yield scratch
    except BaseException as exc:
        _discard(scratch, exc)
        _raise_if_no_space(exc, beside)
        raise
    _remove(scratch)


@contextmanager
def temporary_sibling(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, on error removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        _discard(Path(tmp), exc)
        _raise_if_no_space(exc, path)
        raise


def refuse_overlap(out: Path, field: str, instead: str, **inputs: str | Path) -> None:
    """Refuse an output directory that is, holds or sits inside one of the ``inputs`` (named by
    their keyword): replacing it with ``--force`` would delete the input."""
    target = Path(out).resolve()
    for name, path in inputs.items():
        source = Path(path).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise BundleError(
                f"overlaps the {name} {path}: replacing it would delete the {name}; {instead}",
                field=field,
                value=out,
            )
