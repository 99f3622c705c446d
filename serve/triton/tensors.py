"""Moving numpy arrays in and out of Triton's Python backend through DLPack, never ``as_numpy``.

The Python backend stub builds numpy arrays with pybind11. A stub built with pybind11 < 2.12
(Triton <= 24.10, e.g. the one in PyPI's nvidia-pytriton 0.7) reads numpy 2's dtype layout
wrong: ``as_numpy()`` returns the first element repeated, ``Tensor(name, array)`` sends zero
bytes, and a TYPE_STRING input crashes the stub before the model sees it (fixed in Triton's
python_backend#384). DLPack hands over the raw buffer, so numeric tensors here work with numpy 1
and 2 on every stub. TYPE_STRING still goes through ``as_numpy`` (DLPack has no strings): the
``uint8`` text type of ccra_vlm exists for stubs where that is broken.

``pb`` is the ``triton_python_backend_utils`` module, passed in: it exists only inside the stub.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

_CONSUMED = b"used_dltensor"  # the name numpy's capsule destructor reads as "someone took the data"
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_is_valid.restype = ctypes.c_int
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_set_name.restype = ctypes.c_int


def to_numpy(tensor: Any) -> np.ndarray:
    """A Triton tensor (request input, BLS output) as a numpy array that owns its memory."""
    return np.array(np.from_dlpack(tensor), copy=True)


def from_numpy(pb: Any, name: str, array: np.ndarray) -> Any:
    """A Triton tensor holding a copy of ``array``.

    The stub takes the DLPack capsule and renames it ``used_dlpack``; numpy's capsule destructor
    only recognises ``used_dltensor`` and would report an error for every tensor, so the consumed
    capsule is given that name. The stub keeps the array alive through the DLPack deleter."""
    owned = np.array(array, copy=True, order="C")  # writable: numpy refuses to export read-only arrays
    capsule = owned.__dlpack__()
    tensor = pb.Tensor.from_dlpack(name, capsule)
    if not _capsule_is_valid(capsule, b"dltensor"):
        _capsule_set_name(capsule, _CONSUMED)
    return tensor


def read_text(tensor: Any, text_type: str) -> str:
    """A prompt: one Triton string, or UTF-8 bytes in a UINT8 vector."""
    if text_type == "string":
        value = tensor.as_numpy().reshape(-1)
        if value.size != 1:
            raise ValueError(f"{tensor.name()}: expected one string, got {value.size}")
        item = value[0]
        data = item if isinstance(item, bytes) else str(item).encode()
    else:
        data = to_numpy(tensor).astype(np.uint8).tobytes()
    return data.decode("utf-8")


def text_tensor(pb: Any, name: str, text: str, text_type: str) -> Any:
    """``text`` as a Triton tensor of the model's text type."""
    if text_type == "string":
        return pb.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))
    return from_numpy(pb, name, np.frombuffer(text.encode("utf-8"), dtype=np.uint8))


def read_bytes(tensor: Any) -> bytes:
    """A UINT8 vector (an encoded image) as bytes."""
    return to_numpy(tensor).astype(np.uint8, copy=False).tobytes()


def read_scalar(tensor: Any | None) -> Any:
    """A one-element optional input as a Python scalar, or None when the request left it out."""
    if tensor is None:
        return None
    value = to_numpy(tensor).reshape(-1)
    if value.size != 1:
        raise ValueError(f"{tensor.name()}: expected one value, got {value.size}")
    return value[0].item()
