"""The language model's ``genai_config.json`` (onnxruntime-genai's format), read as untrusted input.

The runtime sizes its KV cache from this file and opens the decoder it names, so the numbers are
bounded and the file name is a path inside the bundle (checked where it is opened) before either
happens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict

from ccra_export.core.errors import BundleError
from ccra_export.core.manifest_schema import RelPath, first_error

GENAI_CONFIG = "genai_config.json"
_OPEN = ConfigDict(extra="allow", strict=True)

Count = Annotated[int, Field(gt=0, le=1 << 16)]


@with_config(_OPEN)
class DecoderConfig(TypedDict):
    filename: RelPath
    num_hidden_layers: Count
    num_key_value_heads: Count
    head_size: Count
    inputs: dict[str, str]
    outputs: dict[str, str]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


@with_config(_OPEN)
class GenaiModelConfig(TypedDict):
    decoder: DecoderConfig
    context_length: Annotated[int, Field(gt=0, le=1 << 20)]
    eos_token_id: Annotated[list[Annotated[int, Field(ge=0)]], BeforeValidator(_as_list)]


_ADAPTER = TypeAdapter(GenaiModelConfig)


def read_genai_config(path: Path) -> GenaiModelConfig:
    """The ``model`` section of ``genai_config.json``, validated; one line naming the key otherwise."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{path}: unreadable ({exc}); `ccra-export check` re-hashes the bundle's files") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object with a 'model' section")
    try:
        return _ADAPTER.validate_python(raw.get("model"))
    except ValidationError as exc:
        raise BundleError(f"{path}: {first_error(exc, ('model',))}") from None
