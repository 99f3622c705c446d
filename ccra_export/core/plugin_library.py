"""Is this file a TensorRT plugin library? Read its ELF header and dynamic symbols, never load it.

TensorRT's ``loadLibrary`` dlopens a plugin library and looks up ``getCreators`` (IPluginV3) or
``getPluginCreators`` (IPluginV2). Handing it a text file, an executable or a library built for
another architecture fails deep inside TensorRT (or runs the file's constructors), so the flag is
checked here first, from the bytes alone: loading a library to check it would run its code.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ccra_export.core.errors import ConfigError, Remedy

CREATOR_SYMBOLS = ("getCreators", "getPluginCreators")
_ELF_MAGIC = b"\x7fELF"
_ET_DYN = 3
_SHT_DYNSYM = 11
_MAX_BYTES = 2 << 30  # a plugin library is megabytes; refuse reading gigabytes on a wrong path


class NotAPluginLibrary(ValueError):
    """The bytes are not what a plugin library is; the message says what they are instead."""


def dynamic_symbols(path: Path) -> set[str]:
    """Names of the symbols a 64-bit little-endian ELF shared object defines for dynamic linking."""
    data = path.read_bytes()
    if data[:4] != _ELF_MAGIC:
        raise NotAPluginLibrary("not an ELF file")
    if data[4:6] != b"\x02\x01":
        raise NotAPluginLibrary("not a 64-bit little-endian ELF file")
    if struct.unpack_from("<H", data, 16)[0] != _ET_DYN:
        raise NotAPluginLibrary("an ELF file but not a shared object (build it with -shared)")
    try:
        return _defined_dynamic_symbols(data)
    except (struct.error, IndexError, ValueError):
        raise NotAPluginLibrary("a truncated or malformed ELF file") from None


def _defined_dynamic_symbols(data: bytes) -> set[str]:
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names: set[str] = set()
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != _SHT_DYNSYM or not entsize:
            continue
        strtab_offset, strtab_size = sections[link][4], sections[link][5]
        strings = data[strtab_offset : strtab_offset + strtab_size]
        for entry in range(offset, offset + size, entsize):
            st_name, _st_info, _st_other, st_shndx = struct.unpack_from("<IBBH", data, entry)
            if st_shndx and st_name:  # defined here, not imported
                names.add(strings[st_name : strings.index(b"\0", st_name)].decode("ascii", "replace"))
    return names


def check_plugin_library(path: str | Path, field: str = "plugin_library") -> Path:
    """``path``, once it is an ELF shared object that exports TensorRT's plugin creator entry point;
    else a ConfigError naming ``field``, the input that gave it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("no such file", field=field, value=path)
    if path.stat().st_size > _MAX_BYTES:
        raise ConfigError(f"{path.stat().st_size} bytes; not a plugin library", field=field, value=path)
    try:
        symbols = dynamic_symbols(path)
    except (OSError, NotAPluginLibrary) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc
        raise ConfigError(f"{reason}; expected the TensorRT plugin library (.so)", field=field, value=path) from None
    if not symbols & set(CREATOR_SYMBOLS):
        raise ConfigError(
            f"exports neither {' nor '.join(CREATOR_SYMBOLS)}; expected the LPWCA TensorRT plugin library",
            field=field,
            value=path,
            remedy=Remedy("plugins build"),
        )
    return path
