"""Row sources: where each output tensor's rows come from, read a block of rows at a time.

A conversion (Meta <-> HF, or to GGUF) describes every output tensor as one of these, then streams
it in :func:`row_blocks`; nothing holds a whole tensor unless it is one block.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .codecs import Bytes
from .dtypes import itemsize
from .errors import FormatError
from .formats.checkpoint import RangeReader
from .formats.safetensors import TensorInfo
from .reading import CHUNK_BYTES

__all__ = ["Concat", "Rotary", "Rows", "Slice", "Whole", "row_blocks", "rows_and_width"]


class Rows(Protocol):
    """A tensor's rows, read ``first:last`` as raw little-endian bytes."""

    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes: ...


def rows_and_width(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, elements per row)``; tensors of rank < 2 are one row."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


@dataclass(frozen=True)
class Whole:
    """A checkpoint's tensor as it is stored."""

    info: TensorInfo

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        _, width = rows_and_width(self.shape)
        row = width * itemsize(self.dtype)
        buffer = bytearray((last - first) * row)
        reader.read_into(self.info.path, self.info.start + first * row, memoryview(buffer))
        return np.frombuffer(buffer, dtype=np.uint8)


@dataclass(frozen=True)
class Concat:
    """Model-parallel parts joined along ``axis`` (0: rows follow rows; 1: each row's pieces side by side)."""

    parts: tuple[Rows, ...]
    axis: int

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0].shape
        total = sum(p.shape[self.axis] for p in self.parts)
        return (total, *first[1:]) if self.axis == 0 else (first[0], total, *first[2:])

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        if self.axis == 1:
            pieces = [p.read(reader, first, last).reshape(last - first, -1) for p in self.parts]
            return np.concatenate(pieces, axis=1).reshape(-1)
        out, offset = [], 0
        for part in self.parts:
            rows = part.shape[0]
            lo, hi = max(first, offset), min(last, offset + rows)
            if lo < hi:
                out.append(part.read(reader, lo - offset, hi - offset))
            offset += rows
        return np.concatenate(out) if out else np.empty(0, dtype=np.uint8)


@dataclass(frozen=True)
class Slice:
    """Rows (axis 0) or columns (axis 1) ``start:stop`` of a tensor: one model-parallel part of it."""

    inner: Rows
    axis: int
    start: int
    stop: int

    @property
    def dtype(self) -> str:
        return self.inner.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.inner.shape
        return (self.stop - self.start, *s[1:]) if self.axis == 0 else (s[0], self.stop - self.start, *s[2:])

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        if self.axis == 0:
            return self.inner.read(reader, self.start + first, self.start + last)
        item = itemsize(self.dtype)
        block = self.inner.read(reader, first, last).reshape(last - first, -1)
        return np.ascontiguousarray(block[:, self.start * item : self.stop * item]).reshape(-1)


@dataclass(frozen=True)
class Rotary:
    """q/k rows reordered within each head between Meta's interleaved rotary layout and HF's halves."""

    inner: Rows
    heads: int
    to_hf: bool

    def __post_init__(self) -> None:
        rows = self.inner.shape[0]
        if self.heads <= 0 or rows % self.heads or (rows // self.heads) % 2:
            raise FormatError(f"{rows} q/k rows do not split into {self.heads} heads of an even size")

    @property
    def dtype(self) -> str:
        return self.inner.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inner.shape

    @property
    def head_rows(self) -> int:
        return self.shape[0] // self.heads

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        rows = self.head_rows
        # HF row k * rows/2 + j is Meta row 2j + k (transformers' permute)
        meta_rows = np.concatenate([np.arange(0, rows, 2), np.arange(1, rows, 2)])
        order = meta_rows if self.to_hf else np.argsort(meta_rows)
        block = self.inner.read(reader, first, last).reshape((last - first) // rows, rows, -1)
        return np.ascontiguousarray(block[:, order, :]).reshape(-1)


def row_blocks(rows: Rows) -> Iterator[tuple[int, int]]:
    """``(first, last)`` row ranges of about CHUNK_BYTES each (whole heads for :class:`Rotary`); one
    empty range for a tensor without rows, so that it is still written."""
    count, width = rows_and_width(rows.shape)
    step = max(1, CHUNK_BYTES // max(1, width * itemsize(rows.dtype)))
    if isinstance(rows, Rotary):
        step = max(rows.head_rows, step // rows.head_rows * rows.head_rows)
    if count == 0:
        yield 0, 0
    for first in range(0, count, step):
        yield first, min(count, first + step)
