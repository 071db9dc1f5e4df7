"""Tensor element types as safetensors names them, with their sizes and torch equivalents.

deltakit records dtypes by their safetensors names (``F16``, ``BF16``...) everywhere: in headers,
in the manifest, in reports.
"""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "ITEMSIZE", "from_torch", "is_float", "itemsize", "to_torch"]

_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

ITEMSIZE: dict[str, int] = {name: dtype.itemsize for name, dtype in _TORCH.items()}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

_FROM_TORCH = {dtype: name for name, dtype in _TORCH.items()}


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name; ``KeyError`` if deltakit does not know it."""
    return ITEMSIZE[dtype]


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def to_torch(dtype: str) -> torch.dtype:
    return _TORCH[dtype]


def from_torch(dtype: torch.dtype) -> str:
    return _FROM_TORCH[dtype]
