"""TensorRT engine build settings, shared by `build --backend trt|ort-trt` and `ccra-export engine`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: the timing cache's base name: each GPU and TensorRT version gets its own file beside it
#: (``engine.timing_cache.keyed_path``: timing-<gpu>-sm<cc>-trt<version>.cache)
DEFAULT_TIMING_CACHE = Path.home() / ".cache" / "ccra-export" / "timing.cache"


@dataclass
class TrtOptions:
    """Typing mode, workspace pool, builder optimization level and timing cache of an engine build
    (``timing_cache``: the base name, keyed by device and TensorRT version; None: no cache)."""

    typing: str = "auto"
    workspace_mib: int = 2048  # Jetson shares DRAM with the CPU: keep the pool bounded
    optimization_level: int = 3
    timing_cache: Path | None = DEFAULT_TIMING_CACHE


@dataclass
class ProfileOptions:
    """The optimization profile's flags. None keeps the default: at build, batch 1..8 tuned for 1
    and 1..512 instruction tokens tuned for 64; for `ccra-export engine`, the manifest's."""

    max_batch: int | None = None
    opt_batch: int | None = None
    max_text_len: int | None = None
    opt_text_len: int | None = None

    def overrides(self) -> dict[str, dict[str, int]]:
        """The flags given, as ``{axis: {"max"|"opt": value}}`` on top of a manifest's axes."""
        given: dict[str, dict[str, int]] = {}
        for axis, key, value in (
            ("batch", "max", self.max_batch),
            ("batch", "opt", self.opt_batch),
            ("text_len", "max", self.max_text_len),
            ("text_len", "opt", self.opt_text_len),
        ):
            if value is not None:
                given.setdefault(axis, {})[key] = value
        return given
