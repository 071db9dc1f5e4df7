"""Codecs: pure functions that turn (target, base) chunks into payload and back.

Every function takes and returns flat ``uint8`` tensors holding the raw bytes of a chunk of
elements, plus the safetensors dtype that gives those bytes meaning. Working on bytes keeps NaN
payloads, signed zeros and subnormals exactly as they are wherever a codec does no arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..dtypes import is_float, to_torch

__all__ = ["CODECS", "Codec", "add_decode", "add_encode", "cast_bits", "count_differences", "xor_bits"]


def _words(bits: torch.Tensor) -> torch.Tensor:
    """View bytes as 64-bit words when the length allows: eight times fewer element operations."""
    if bits.numel() % 8 == 0 and bits.data_ptr() % 8 == 0:
        return bits.view(torch.int64)
    return bits


def xor_bits(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bitwise XOR of two byte tensors of equal length (its own inverse)."""
    if out is None:
        out = torch.empty_like(a)
    torch.bitwise_xor(_words(a), _words(b), out=_words(out))
    return out


def _values(bits: torch.Tensor, dtype: str) -> torch.Tensor:
    return bits.view(to_torch(dtype))


def _bits(values: torch.Tensor) -> torch.Tensor:
    return values.contiguous().view(torch.uint8)


def _compute_dtype(dtype: str) -> torch.dtype:
    return torch.float64 if dtype == "F64" else torch.float32


def cast_bits(bits: torch.Tensor, from_dtype: str, to_dtype: str) -> torch.Tensor:
    """Re-encode elements from one float dtype to another, rounding to nearest even."""
    return _bits(_values(bits, from_dtype).to(to_torch(to_dtype)))


def add_encode(target: torch.Tensor, base: torch.Tensor, dtype: str) -> torch.Tensor:
    """Task vector: ``target - base`` computed in fp32 (fp64 for F64), stored in ``dtype``."""
    wide = _compute_dtype(dtype)
    diff = _values(target, dtype).to(wide) - _values(base, dtype).to(wide)
    return _bits(diff.to(to_torch(dtype)))


def add_decode(base: torch.Tensor, payload: torch.Tensor, dtype: str) -> torch.Tensor:
    """``base + payload`` in fp32 (fp64 for F64), rounded to ``dtype``."""
    wide = _compute_dtype(dtype)
    total = _values(base, dtype).to(wide) + _values(payload, dtype).to(wide)
    return _bits(total.to(to_torch(dtype)))


def _xor_encode(target: torch.Tensor, base: torch.Tensor, dtype: str) -> torch.Tensor:
    return xor_bits(target, base)


def _xor_decode(base: torch.Tensor, payload: torch.Tensor, dtype: str) -> torch.Tensor:
    return xor_bits(base, payload)


def count_differences(a: torch.Tensor, b: torch.Tensor, dtype: str) -> int:
    """How many elements of two byte tensors differ bitwise."""
    size = to_torch(dtype).itemsize
    int_view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return int((a.view(int_view) != b.view(int_view)).sum())


@dataclass(frozen=True)
class Codec:
    """A named pair of pure functions over byte chunks.

    Attributes:
        encode: ``(target, base, dtype) -> payload``.
        decode: ``(base, payload, dtype) -> target``.
        exact: whether ``decode(base, encode(t, base)) == t`` bit for bit, always.
        accepts: whether the codec can encode tensors of a dtype.
    """

    name: str
    encode: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
    decode: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
    exact: bool
    accepts: Callable[[str], bool]


CODECS: dict[str, Codec] = {
    "xor": Codec("xor", _xor_encode, _xor_decode, exact=True, accepts=lambda dtype: True),
    "add": Codec("add", add_encode, add_decode, exact=False, accepts=is_float),
}
