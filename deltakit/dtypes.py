"""Tensor element types as safetensors names them, with their sizes and torch equivalents.

deltakit records dtypes by their safetensors names (``F16``, ``BF16``...) everywhere: in headers,
in the manifest, in reports. torch is imported only when a dtype must become a torch one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["FLOAT_DTYPES", "ITEMSIZE", "SHAPE_LIMIT", "is_float", "itemsize", "shape_fault", "to_torch"]

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


# safetensors counts dimensions, elements and bytes in 64 bits: each must stay below this.
SHAPE_LIMIT = 1 << 64


def shape_fault(shape: object, dtype: str) -> str | None:
    """Why ``shape`` cannot describe a ``dtype`` tensor in a safetensors file, or ``None`` if it can.

    The rules of the safetensors header reader, shared with the manifest reader so that no manifest
    makes apply write a header that safetensors refuses: a list of non-negative integers, each below
    2^64; the running product of the dimensions (the element count, as the reference computes it) and
    the byte size below 2^64 too. ``dtype`` must be one of :data:`ITEMSIZE`.
    """
    if not isinstance(shape, list | tuple) or not all(type(d) is int and 0 <= d < SHAPE_LIMIT for d in shape):
        shown = list(shape) if isinstance(shape, list | tuple) else shape
        return f"shape {shown!r} is not a list of non-negative 64-bit integers"
    numel = 1
    for dim in shape:
        numel *= dim
        if numel >= SHAPE_LIMIT:
            return f"shape {list(shape)!r} has more elements than 64 bits can count"
    if numel * ITEMSIZE[dtype] >= SHAPE_LIMIT:
        return f"{dtype} {list(shape)!r} has more bytes than 64 bits can count"
    return None


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name; ``KeyError`` if deltakit does not know it."""
    return ITEMSIZE[dtype]


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def to_torch(dtype: str) -> torch.dtype:
    import torch

    result: torch.dtype = getattr(torch, _TORCH_NAMES[dtype])
    return result
