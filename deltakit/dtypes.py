"""Tensor element types as safetensors names them, with their sizes and torch equivalents.

deltakit records dtypes by their safetensors names (``F16``, ``BF16``...) everywhere: in headers,
in the manifest, in reports. torch is imported only when a dtype must become a torch one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["FLOAT_DTYPES", "ITEMSIZE", "is_float", "itemsize", "to_torch"]

ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name; ``KeyError`` if deltakit does not know it."""
    return ITEMSIZE[dtype]


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def to_torch(dtype: str) -> torch.dtype:
    import torch

    result: torch.dtype = getattr(torch, _TORCH_NAMES[dtype])
    return result
