"""Codecs: pure functions that turn (target, base) chunks into payload and back.

Every function takes and returns flat ``uint8`` numpy arrays holding the raw bytes of a chunk of
elements, plus the safetensors dtype that gives those bytes meaning. Working on bytes keeps NaN
payloads, signed zeros and subnormals exactly as they are wherever a codec does no arithmetic.
XOR needs only numpy; the float arithmetic (``add``, casts) uses torch, imported on first use, since
numpy has no bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from ..dtypes import is_float, itemsize, to_torch

if TYPE_CHECKING:
    import torch

__all__ = [
    "CODECS",
    "Buffer",
    "Bytes",
    "Codec",
    "LoraTerm",
    "Transform",
    "add_decode",
    "add_encode",
    "cast_bits",
    "count_differences",
    "differs",
    "fresh",
    "lora_merge_rows",
    "xor_bits",
]

Bytes = npt.NDArray[np.uint8]


class Buffer(Protocol):
    """Where a codec puts its result and temporaries: ``buffer(name, size)`` gives ``size`` bytes.

    The default gives fresh arrays; streaming callers pass memory they reuse from chunk to chunk,
    since a fresh array costs a page fault per 4 KiB when it is first written.
    """

    def __call__(self, name: str, size: int, /) -> Bytes: ...


def fresh(name: str, size: int) -> Bytes:
    """A :class:`Buffer` that allocates a new array each time."""
    return np.empty(size, dtype=np.uint8)


class Transform(Protocol):
    """``(a, b, dtype, buffer=fresh) -> bytes``: a codec's encode or decode."""

    def __call__(self, a: Bytes, b: Bytes, dtype: str, /, buffer: Buffer = fresh) -> Bytes: ...


def _words(*arrays: Bytes) -> list[npt.NDArray[np.generic]]:
    """Byte arrays of one length viewed as 64-bit words when the length and every address allow
    (eight times fewer element operations), else as they are."""
    if arrays[0].size % 8 == 0 and all(a.ctypes.data % 8 == 0 for a in arrays):
        return [a.view(np.uint64) for a in arrays]
    return list(arrays)


def xor_bits(a: Bytes, b: Bytes, out: Bytes | None = None) -> Bytes:
    """Bitwise XOR of two byte arrays of equal length (its own inverse)."""
    if out is None:
        out = np.empty_like(a)
    x, y, z = _words(a, b, out)
    np.bitwise_xor(x, y, out=z)
    return out


def _values(bits: Bytes, dtype: str) -> torch.Tensor:
    import torch

    if bits.size == 0:  # from_numpy gives a zero-stride tensor, which cannot be re-viewed
        return torch.empty(0, dtype=to_torch(dtype))
    if not bits.flags.writeable:  # a mapped file's bytes: torch wants memory it could write to
        bits = bits.copy()
    return torch.from_numpy(bits).view(to_torch(dtype))


def _bits(values: torch.Tensor, *, nan_source: torch.Tensor) -> Bytes:
    """The bytes of ``values``, every NaN where ``nan_source`` has one made the canonical quiet NaN.

    torch's conversions and arithmetic keep NaN payloads in their vector loops but not in their
    scalar tails, and where a tail falls depends on the chunk length and the thread count; without
    this, a rebuild on another machine could differ in the bits of a NaN.
    """
    import torch

    array: Bytes = values.contiguous().view(torch.uint8).numpy()
    nan = torch.isnan(nan_source)
    if bool(nan.any()):  # written as bits: torch has no masked_fill for the float8 types
        if array.base is not None and not array.flags.writeable:
            array = array.copy()
        word = _UINT[values.element_size()]
        array.view(word)[nan.reshape(-1).numpy()] = word(CANONICAL_NAN[str(values.dtype)])
    return array


# The NaN every cast and float rebuild writes, by torch dtype: what torch's own scalar conversion
# gives for float("nan") (docs/FORMAT.md lists them).
CANONICAL_NAN = {
    "torch.float64": 0x7FF8000000000000,
    "torch.float32": 0x7FC00000,
    "torch.float16": 0x7E00,
    "torch.bfloat16": 0x7FC0,
    "torch.float8_e4m3fn": 0x7F,
    "torch.float8_e5m2": 0x7F,
}


def _compute_dtype(dtype: str) -> torch.dtype:
    return to_torch("F64" if dtype == "F64" else "F32")


def cast_bits(bits: Bytes, from_dtype: str, to_dtype: str) -> Bytes:
    """Re-encode elements from one float dtype to another, rounding to nearest even; NaNs become
    the canonical quiet NaN, so the result is the same on every machine."""
    values = _values(bits, from_dtype)
    return _bits(values.to(to_torch(to_dtype)), nan_source=values)


def add_encode(target: Bytes, base: Bytes, dtype: str, buffer: Buffer = fresh) -> Bytes:
    """Task vector: ``target - base`` computed in fp32 (fp64 for F64), stored in ``dtype``."""
    wide = _compute_dtype(dtype)
    diff = (_values(target, dtype).to(wide) - _values(base, dtype).to(wide)).to(to_torch(dtype))
    return _bits(diff, nan_source=diff)


def add_decode(base: Bytes, payload: Bytes, dtype: str, buffer: Buffer = fresh) -> Bytes:
    """``base + payload`` in fp32 (fp64 for F64), rounded to ``dtype``."""
    wide = _compute_dtype(dtype)
    total = (_values(base, dtype).to(wide) + _values(payload, dtype).to(wide)).to(to_torch(dtype))
    return _bits(total, nan_source=total)


def _xor_encode(target: Bytes, base: Bytes, dtype: str, buffer: Buffer = fresh) -> Bytes:
    return xor_bits(target, base, buffer("out", target.size))


def _xor_decode(base: Bytes, payload: Bytes, dtype: str, buffer: Buffer = fresh) -> Bytes:
    return xor_bits(base, payload, buffer("out", base.size))


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _sub_encode(target: Bytes, base: Bytes, dtype: str, buffer: Buffer = fresh) -> Bytes:
    """Bit patterns as unsigned integers, ``target - base`` modulo 2^bits, zigzag-mapped so that
    small differences of either sign become small numbers (0, -1, 1, -2 -> 0, 1, 2, 3)."""
    size = itemsize(dtype)
    out, sign = buffer("out", target.size), buffer("tmp", target.size)
    diff, high = out.view(_INT[size]), sign.view(_INT[size])
    np.subtract(target.view(_UINT[size]), base.view(_UINT[size]), out=out.view(_UINT[size]))
    np.right_shift(diff, 8 * size - 1, out=high)  # arithmetic: all ones where negative
    np.left_shift(diff, 1, out=diff)
    np.bitwise_xor(diff, high, out=diff)
    return out


def _sub_decode(base: Bytes, payload: Bytes, dtype: str, buffer: Buffer = fresh) -> Bytes:
    word = _UINT[itemsize(dtype)]
    out, tmp = buffer("out", base.size), buffer("tmp", base.size)
    zigzag, result, half = payload.view(word), out.view(word), tmp.view(word)
    np.bitwise_and(zigzag, word(1), out=result)
    np.negative(result, out=result)  # all ones where the difference is negative
    np.right_shift(zigzag, word(1), out=half)
    np.bitwise_xor(result, half, out=result)
    np.add(result, base.view(word), out=result)
    return out


def differs(a: Bytes, b: Bytes) -> bool:
    """Whether two byte arrays of equal length differ, compared 1 MiB at a time and stopping at the
    first block that does: a changed tensor is told from its first block."""
    step = 1 << 20
    return any(not np.array_equal(a[i : i + step], b[i : i + step]) for i in range(0, a.size, step))


def count_differences(a: Bytes, b: Bytes, dtype: str) -> int:
    """How many elements of two byte arrays differ bitwise."""
    word = _UINT[itemsize(dtype)]
    return int(np.count_nonzero(a.view(word) != b.view(word)))


@dataclass(frozen=True)
class Codec:
    """A named pair of pure functions over byte chunks.

    Attributes:
        encode: ``(target, base, dtype, buffer=fresh) -> payload``.
        decode: ``(base, payload, dtype, buffer=fresh) -> target``.
        exact: whether ``decode(base, encode(t, base)) == t`` bit for bit, always.
        accepts: whether the codec can encode tensors of a dtype.

    Results and temporaries go where ``buffer`` says (names ``out`` and ``tmp``); the inputs are
    never written to.
    """

    name: str
    encode: Transform
    decode: Transform
    exact: bool
    accepts: Callable[[str], bool]


CODECS: dict[str, Codec] = {
    "xor": Codec("xor", _xor_encode, _xor_decode, exact=True, accepts=lambda dtype: True),
    "sub": Codec("sub", _sub_encode, _sub_decode, exact=True, accepts=lambda dtype: True),
    "add": Codec("add", add_encode, add_decode, exact=False, accepts=is_float),
}


@dataclass(frozen=True)
class LoraTerm:
    """``scale * (B @ A)`` for one adapter, A and B as fp32 torch tensors; ``transposed`` for
    weights stored (in, out), where the product's transpose is added."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool


def lora_merge_rows(rows: Bytes, dtype: str, shape: tuple[int, ...], first: int, terms: list[LoraTerm]) -> Bytes:
    """Rows ``first:first + n`` of ``W + sum(scale * B @ A)``, computed in fp32, rounded to ``dtype``.

    Raises:
        OverflowError: the result holds an infinity or NaN where ``W`` holds a finite value (a LoRA
            with non-finite weights, or an update too large for ``dtype``).

    Args:
        rows: the bytes of whole rows of the weight ``W`` (shape ``(out, in)``, or ``(in, out)``
            when a term is transposed).
        shape: the weight's full shape.
        first: the index of the first row in ``rows``.
    """
    import torch

    width = shape[1]
    count = rows.size // itemsize(dtype) // width
    w = _values(rows, dtype).to(torch.float32).reshape(count, width)
    finite = torch.isfinite(w)
    for term in terms:
        if term.transposed:
            w += term.scale * (term.b @ term.a[:, first : first + count]).T
        else:
            w += term.scale * (term.b[first : first + count] @ term.a)
    merged = w.to(to_torch(dtype)).reshape(-1)
    if not bool((torch.isfinite(merged) | ~finite.reshape(-1)).all()):
        raise OverflowError("the merge makes infinite or NaN values where the weight has finite ones")
    return _bits(merged, nan_source=merged)
