"""TensorRT's timing cache: one file per GPU and TensorRT version, and never a reason to lose an engine.

A timing cache records tactic timings of one device: ``IBuilderConfig::setTimingCache`` refuses a
cache made on a device with other CUDA properties (``ignoreMismatch`` false, NvInfer.h) and returns
false, after which the config has no cache to serialise. So the file is keyed by the GPU (name and
compute capability) and the TensorRT version in its name, a refused cache is replaced by a fresh
one, and reading or writing it only ever costs a warning line: the cache saves build time, the
engine is what the build is for.

TensorRT-free: the builder config is duck-typed (``create_timing_cache``, ``set_timing_cache``,
``get_timing_cache`` of TensorRT's Python API, python/src/infer/pyCore.cpp), so CI tests it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ccra_export.core.atomic import temporary_sibling

Warn = Callable[[str], None]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def keyed_path(base: Path, gpu: str, compute_capability: str, trt_version: str) -> Path:
    """``base`` with the device and TensorRT version in its name: ``timing.cache`` becomes
    ``timing-nvidia-h100-80gb-hbm3-sm9.0-trt10.3.0.cache`` beside it."""
    key = f"{_slug(gpu)}-sm{_slug(compute_capability)}-trt{_slug(trt_version)}"
    return base.with_name(f"{base.stem}-{key}{base.suffix or '.cache'}")


def _read(path: Path, warn: Warn) -> bytes:
    if not path.is_file():
        return b""
    try:
        return path.read_bytes()
    except OSError as exc:
        warn(f"timing cache {path} unreadable ({exc.strerror or exc}): starting a fresh one")
        return b""


def attach(config: Any, path: Path | None, warn: Warn) -> Any:
    """Give ``config`` the cache in ``path`` (a fresh one when there is none, or when TensorRT refuses
    it); returns the attached cache, which must outlive the build (NvInfer.h), or None without one."""
    if path is None:
        return None
    cache = config.create_timing_cache(_read(path, warn))
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    warn(f"timing cache {path} refused by TensorRT (made on another device or version): starting a fresh one")
    cache = config.create_timing_cache(b"")
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    warn("TensorRT refused a fresh timing cache too: building without one")
    return None


def save(config: Any, path: Path | None, warn: Warn) -> bool:
    """Write the config's cache to ``path`` (atomically: a half-written file is never read back);
    True when written. A failure is a warning: the engine is built already."""
    if path is None:
        return False
    cache = config.get_timing_cache()
    if cache is None:
        warn(f"timing cache {path} not saved: the build had none")
        return False
    try:
        data = bytes(cache.serialize())
        path.parent.mkdir(parents=True, exist_ok=True)
        with temporary_sibling(path) as tmp:
            tmp.write_bytes(data)
    except Exception as exc:  # OSError, a full disk (BundleError), TensorRT's own errors: never the engine
        warn(f"timing cache {path} not saved ({getattr(exc, 'strerror', None) or exc})")
        return False
    return True
