"""What an engine build and an engine load do around TensorRT, tested without it: the timing cache
(keyed by device and version, never a reason to lose a built engine) and the plugin library (never
serialised into the engine; only the installed library whose hash the record names is loaded, once
per process). The builder runs against a recording stand-in for the ``tensorrt`` module."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ccra_export.core.errors import BackendUnavailableError, BundleError, ConfigError
from ccra_export.core.hashing import sha256_file
from ccra_export.engine import timing_cache
from ccra_export.engine.plan import PrecisionPlan, Profile
from ccra_export.engine.settings import TrtOptions
from ccra_export.runtime.engine_compat import (
    PLUGIN_LIBRARY_ENV,
    PluginLibraries,
    engine_plugin,
    installed_plugin_library,
)

# --- the timing cache -------------------------------------------------------------------------


class FakeCache:
    def __init__(self, data: bytes, fail: bool = False) -> None:
        self.data, self.fail = data, fail

    def serialize(self) -> bytes:
        if self.fail:
            raise RuntimeError("serialize failed")
        return b"cache:" + self.data


class FakeConfig:
    """IBuilderConfig's timing-cache calls (python/src/infer/pyCore.cpp): ``refuse`` holds the
    serialised caches ``set_timing_cache`` rejects (a mismatch returns False, NvInfer.h)."""

    def __init__(self, refuse: tuple[bytes, ...] = (), serialize_fails: bool = False) -> None:
        self.refuse, self.serialize_fails = refuse, serialize_fails
        self.attached: FakeCache | None = None

    def create_timing_cache(self, data: bytes) -> FakeCache:
        return FakeCache(bytes(data), self.serialize_fails)

    def set_timing_cache(self, cache: FakeCache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False  # a cache of another device is never forced on this one
        if cache.data in self.refuse:
            return False
        self.attached = cache
        return True

    def get_timing_cache(self) -> FakeCache | None:
        return self.attached


def test_the_cache_file_is_keyed_by_device_and_tensorrt_version(tmp_path):
    base = tmp_path / "timing.cache"
    h100 = timing_cache.keyed_path(base, "NVIDIA H100 80GB HBM3", "9.0", "10.3.0")
    assert h100 == tmp_path / "timing-nvidia-h100-80gb-hbm3-sm9.0-trt10.3.0.cache"
    others = {
        timing_cache.keyed_path(base, "NVIDIA H100 80GB HBM3", "9.0", "11.1.0"),
        timing_cache.keyed_path(base, "NVIDIA Jetson AGX Orin", "8.7", "10.3.0"),
        timing_cache.keyed_path(base, "NVIDIA A10", "8.6", "10.3.0"),
    }
    assert h100 not in others and len(others) == 3 and all(p.parent == tmp_path for p in others)


def test_a_cache_of_this_device_is_attached(tmp_path):
    path = tmp_path / "t.cache"
    path.write_bytes(b"mine")
    config, warnings = FakeConfig(), []
    assert timing_cache.attach(config, path, warnings.append).data == b"mine" and not warnings


def test_a_refused_cache_is_replaced_by_a_fresh_one_with_a_warning(tmp_path):
    path = tmp_path / "t.cache"
    path.write_bytes(b"another gpu")
    config, warnings = FakeConfig(refuse=(b"another gpu",)), []
    cache = timing_cache.attach(config, path, warnings.append)
    assert cache is not None and cache.data == b"" and config.attached is cache
    assert len(warnings) == 1 and "refused by TensorRT" in warnings[0]
    assert timing_cache.save(config, path, warnings.append) and path.read_bytes() == b"cache:"


def test_without_any_cache_the_build_goes_on_and_nothing_is_saved(tmp_path):
    path = tmp_path / "t.cache"
    path.write_bytes(b"x")
    config, warnings = FakeConfig(refuse=(b"x", b"")), []
    assert timing_cache.attach(config, path, warnings.append) is None
    assert not timing_cache.save(config, path, warnings.append)  # the case that used to raise after the build
    assert path.read_bytes() == b"x" and len(warnings) == 3 and "the build had none" in warnings[-1]


@pytest.mark.parametrize("failure", ["serialize", "unwritable"])
def test_a_cache_that_cannot_be_saved_is_a_warning(tmp_path, failure):
    config, warnings = FakeConfig(serialize_fails=failure == "serialize"), []
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    path = (tmp_path / "t.cache") if failure == "serialize" else blocker / "sub" / "t.cache"
    timing_cache.attach(config, path, warnings.append)
    assert timing_cache.save(config, path, warnings.append) is False
    assert len(warnings) == 1 and "not saved" in warnings[0] and not path.exists()


# --- the plugin library -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin_libraries(tmp_path_factory) -> tuple[Path, Path]:
    """Two ELF shared objects exporting getCreators (what check_plugin_library accepts), different bytes."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to make a stand-in plugin library")
    out = tmp_path_factory.mktemp("plugins")
    made = []
    for index in (1, 2):
        source = out / f"p{index}.c"
        source.write_text(f"void* getCreators(int* n) {{ *n = {index}; return 0; }}\n")
        library = out / f"libp{index}.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
        made.append(library)
    return made[0], made[1]


def record(sha: str | None) -> dict:
    return {"file": "vision.engine", "tensorrt_version": "10.3.0", "compute_capability": "8.7", "plugin_sha256": sha}


def test_an_engine_without_the_fused_node_needs_no_library():
    assert engine_plugin(record(None), None) is None  # type: ignore[arg-type]


def test_a_fused_engine_without_a_library_is_refused_in_one_line():
    with pytest.raises(BundleError) as info:
        engine_plugin(record("ab" * 32), None, "out/b")  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("bundle out/b: its engine runs the fused ccra::LPWCA node") and "\n" not in message
    assert "abababababababab" in message and PLUGIN_LIBRARY_ENV in message


def test_only_the_library_the_record_names_is_accepted(plugin_libraries):
    built_with, other = plugin_libraries
    digest = sha256_file(built_with)
    assert engine_plugin(record(digest), built_with) == (built_with, digest)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^plugin_library .*libp2\.so: sha256 .* is not the library this engine"):
        engine_plugin(record(digest), other)  # type: ignore[arg-type]


def test_a_file_that_is_no_plugin_library_is_refused_before_hashing(tmp_path):
    text = tmp_path / "libccra_lpwca_plugin.so"
    text.write_text("#!/bin/sh\n")
    with pytest.raises(ConfigError, match="not an ELF file"):
        engine_plugin(record(sha256_file(text)), text)  # type: ignore[arg-type]


def test_the_installed_library_comes_from_the_caller_then_the_environment(tmp_path):
    assert installed_plugin_library(tmp_path / "a.so", {PLUGIN_LIBRARY_ENV: "/b.so"}) == tmp_path / "a.so"
    assert installed_plugin_library(None, {PLUGIN_LIBRARY_ENV: "/b.so"}) == Path("/b.so")
    assert installed_plugin_library(None, {}) is None


class FakeRegistry:
    """IPluginRegistry.load_library: a handle, or None once a library's creator is registered."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load_library(self, path: str) -> object | None:
        if self.loaded:
            return None  # the same creator (ccra LPWCA 1) is registered already
        self.loaded.append(path)
        return object()

    def deregister_library(self, handle: object) -> None:
        raise AssertionError("a loaded plugin library stays registered for the process")


def test_a_library_is_loaded_once_per_process(plugin_libraries):
    library, other = plugin_libraries
    registry, plugins = FakeRegistry(), PluginLibraries()
    for _ in range(3):  # build, then the parity runner and a second engine deserialise
        plugins.load(registry, library, sha256_file(library))
    assert registry.loaded == [str(library)]
    with pytest.raises(BackendUnavailableError, match=r"another LPWCA plugin library .* is loaded"):
        plugins.load(registry, other, sha256_file(other))


def test_a_library_tensorrt_refuses_is_one_line_not_a_hidden_error(plugin_libraries):
    library, _ = plugin_libraries
    registry = FakeRegistry()
    registry.loaded.append("loaded by someone else")  # e.g. the static-registration library, by ctypes
    with pytest.raises(BackendUnavailableError, match=r"loadLibrary refused it"):
        PluginLibraries().load(registry, library, sha256_file(library))


# --- the builder, against a recording stand-in for tensorrt ------------------------------------


def fake_tensorrt(config: FakeConfig, registry: FakeRegistry) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"

    class Logger:
        WARNING = 2

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    class Network:
        num_layers = 0

    class Parser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return True

    class Profile:
        def set_shape(self, *args: object) -> None:
            pass

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network()

        def create_builder_config(self) -> FakeConfig:
            return config

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, cfg: FakeConfig) -> bytes:
            return b"engine bytes"

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser
    trt.IProgressMonitor = type("IProgressMonitor", (), {"__init__": lambda self: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    trt.BuilderFlag = types.SimpleNamespace(TF32=1)
    trt.get_plugin_registry = lambda: registry
    return trt


class BuilderConfig(FakeConfig):
    """FakeConfig plus the settings the builder makes; setting plugins_to_serialize is an error."""

    def set_memory_pool_limit(self, pool: int, size: int) -> None:
        pass

    def set_flag(self, flag: int) -> None:
        pass

    def clear_flag(self, flag: int) -> None:
        pass

    def add_optimization_profile(self, profile: object) -> None:
        pass

    def __setattr__(self, name: str, value: object) -> None:
        assert name != "plugins_to_serialize", "the plugin library must not be serialised into the engine"
        object.__setattr__(self, name, value)


@pytest.fixture
def builder(monkeypatch):
    """engine.trt_builder imported against a stand-in tensorrt; the real modules are restored after."""

    def make(config: BuilderConfig, registry: FakeRegistry) -> types.ModuleType:
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(config, registry))
        for name in ("ccra_export.engine.trt_builder", "ccra_export.runtime.trt_engine"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        module = importlib.import_module("ccra_export.engine.trt_builder")
        monkeypatch.setattr(module.load_plugin.__globals__["PLUGINS"], "_loaded", {})
        return module

    yield make
    for name in ("ccra_export.engine.trt_builder", "ccra_export.runtime.trt_engine"):
        sys.modules.pop(name, None)
        package, _, attribute = name.rpartition(".")
        if hasattr(sys.modules[package], attribute):  # `from package import module` would find the stand-in
            delattr(sys.modules[package], attribute)


PLAN = PrecisionPlan(True, (), "strongly typed", ("TF32",))


def test_a_refused_timing_cache_never_costs_the_built_engine(builder, tmp_path):
    cache = tmp_path / "timing-x.cache"
    cache.write_bytes(b"old")
    config, warnings = BuilderConfig(refuse=(b"old", b"")), []
    trt_builder = builder(config, FakeRegistry())
    engine = trt_builder.build_engine(
        tmp_path / "g.onnx", PLAN, Profile(), TrtOptions(), cache_path=cache, warn=warnings.append
    )
    assert engine == b"engine bytes" and cache.read_bytes() == b"old"
    assert any("refused by TensorRT" in w for w in warnings) and any("not saved" in w for w in warnings)


def test_the_builder_loads_the_plugin_and_keeps_it_registered(builder, tmp_path, plugin_libraries):
    library, _ = plugin_libraries
    registry = FakeRegistry()
    trt_builder = builder(BuilderConfig(), registry)
    plugin = (library, sha256_file(library))
    cache = tmp_path / "t.cache"
    for _ in range(2):  # the tower and head engines of one process: loaded once, never deregistered
        assert trt_builder.build_engine(tmp_path / "g.onnx", PLAN, Profile(), TrtOptions(), plugin, cache_path=cache)
    assert registry.loaded == [str(library)]
    assert cache.read_bytes() == b"cache:cache:"  # the second build started from the cache the first saved
