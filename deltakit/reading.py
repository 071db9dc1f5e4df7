"""Read-ahead for every streaming job: chunks (byte ranges to read, in order) read on worker threads.

Jobs describe their work as :class:`Chunk` objects; the :class:`Prefetcher` reads them ahead into a
ring of buffers (or maps them), hints the kernel further ahead, and yields them in order.
"""

from __future__ import annotations

import math
import mmap
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import TypeVar

import numpy as np

from .codecs import Bytes
from .dtypes import itemsize
from .formats.checkpoint import RangeReader
from .formats.safetensors import TensorInfo

__all__ = [
    "CHUNK_BYTES",
    "Arena",
    "Chunk",
    "Prefetcher",
    "Read",
    "as_bytes",
    "by_tensor",
    "element_ranges",
    "paired_chunks",
    "read_range",
]

T = TypeVar("T")
R = TypeVar("R")

CHUNK_BYTES = 8 << 20
PREFETCH_DEPTH = 3
READAHEAD_BYTES = 64 << 20  # reads the kernel is asked to start ahead of the chunks read now


@dataclass(frozen=True)
class Read:
    path: Path
    offset: int
    length: int


@dataclass(frozen=True)
class Chunk:
    """One unit of streamed work: up to two byte ranges to read, and who it belongs to."""

    owner: int  # index of the tensor (step) this chunk belongs to
    segment: int  # which segment of that tensor
    first: int  # element range [first, last) within the segment's tensor
    last: int
    reads: tuple[Read, ...]
    frame: int = -1  # format 2: the index of the frame this chunk decodes, in the tensor's frame table


def element_ranges(first: int, last: int, widest_item: int, *, at_least_one: bool = True) -> Iterator[tuple[int, int]]:
    """Element ranges of at most CHUNK_BYTES each; one empty range for an empty tensor, so every
    tensor passes through the chunk loop (zero-size tensors included)."""
    if first == last:
        if at_least_one:
            yield first, last
        return
    per = max(8, (CHUNK_BYTES // widest_item) // 8 * 8)
    for start in range(first, last, per):
        yield start, min(last, start + per)


def read_range(info: TensorInfo, itemsize: int, first: int, last: int) -> Read:
    return Read(info.path, info.start + first * itemsize, (last - first) * itemsize)


def paired_chunks(owner: int, primary: TensorInfo, secondary: TensorInfo | None) -> Iterator[Chunk]:
    """Chunks of ``primary`` read beside the same elements of ``secondary``, which may be shorter (fewer
    rows): segment 0 reads both over the shared elements, segment 1 the rest of ``primary`` alone."""
    p_item = itemsize(primary.dtype)
    if secondary is None:
        for a, b in element_ranges(0, math.prod(primary.shape), p_item):
            yield Chunk(owner, 0, a, b, (read_range(primary, p_item, a, b),))
        return
    s_item = itemsize(secondary.dtype)
    shared = math.prod(secondary.shape)
    for a, b in element_ranges(0, shared, max(p_item, s_item)):
        yield Chunk(owner, 0, a, b, (read_range(primary, p_item, a, b), read_range(secondary, s_item, a, b)))
    # the new rows are sized by the wider item too: a format 2 frame's elements are bounded by the wider
    # of the target's and the base's (cast) item sizes, for every segment (docs/FORMAT.md, section 4)
    for a, b in element_ranges(shared, math.prod(primary.shape), max(p_item, s_item), at_least_one=False):
        yield Chunk(owner, 1, a, b, (read_range(primary, p_item, a, b),))


def by_tensor(items: Iterable[T], owner: Callable[[T], int]) -> Iterator[tuple[int, Iterator[T]]]:
    """``items`` (a job's chunks or their results, in order) in runs, one per tensor: ``(owner, run)``.

    The consumer takes a run to its end, then finishes that tensor before asking for the next run.
    As in a loop that finishes the previous tensor when the owner changes, the next tensor's first
    item has been read when a run ends: a consumer that holds views of a run's last chunk must be
    done with them before it asks for the next run (the prefetcher recycles their buffers then).
    """
    return groupby(items, key=owner)


class Arena:
    """Scratch buffers kept from chunk to chunk, by name; each grows to the largest size asked of it."""

    def __init__(self) -> None:
        self._buffers: dict[str, Bytes] = {}

    def take(self, key: str, size: int) -> Bytes:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[key] = np.empty(size, dtype=np.uint8)
        return buffer[:size]


class Prefetcher:
    """Reads chunks ahead on worker threads into a ring of reusable buffers, yielding them in order.

    The ring has ``depth + 1`` slots: when the consumer asks for chunk N + 1, the slot of chunk N - 1
    is refilled. So a yielded chunk's buffers stay valid until the consumer asks for the chunk after
    next, which is what lets :class:`~deltakit.writing.OutputWriter` write chunk N while chunk N + 1
    is decoded.

    With ``mapped`` (where the OS can populate a mapping at once), chunks are mapped read-only
    instead of copied into the ring, which spares a copy out of the page cache (BENCHMARKS.md). A
    mapped chunk lives as long as its views.
    """

    def __init__(self, reader: RangeReader, depth: int = PREFETCH_DEPTH, *, mapped: bool = False) -> None:
        self._reader = reader
        self._depth = depth
        self._mapped = mapped and hasattr(mmap, "MAP_POPULATE")
        size = 0 if self._mapped else CHUNK_BYTES
        self._slots = [[bytearray(size), bytearray(size)] for _ in range(depth + 1)]
        self._arenas = [Arena() for _ in range(depth + 1)]

    def _fill(self, chunk: Chunk, index: int) -> list[memoryview]:
        slot = self._slots[index]
        views = []
        for k, read in enumerate(chunk.reads):
            mapped = self._reader.map_range(read.path, read.offset, read.length) if self._mapped else None
            if mapped is not None:
                views.append(mapped)
                continue
            if read.length > len(slot[k]):  # a format 2 frame cut larger than today's chunks (bounded on reading)
                slot[k] = bytearray(read.length)
            view = memoryview(slot[k])[: read.length]
            self._reader.read_into(read.path, read.offset, view)
            views.append(view)
        return views

    def map(
        self, chunks: Iterable[Chunk], work: Callable[[Chunk, list[memoryview], Arena], T]
    ) -> Iterator[tuple[Chunk, list[memoryview], T]]:
        """Like :meth:`run`, with ``work(chunk, views, arena)`` done on the reading thread right after
        the read: CPU-heavy steps (coding, decoding) then run on both reading threads, in parallel.

        ``arena`` is the slot's own scratch memory: what ``work`` returns from it stays valid as long
        as the slot's read buffers do. Reusing it spares a page fault per 4 KiB of every chunk.
        """

        def fill_and_work(chunk: Chunk, index: int) -> tuple[list[memoryview], T]:
            views = self._fill(chunk, index)
            return views, work(chunk, views, self._arenas[index])

        for chunk, (views, result) in self._pipeline(chunks, fill_and_work):
            yield chunk, views, result

    def run(self, chunks: Iterable[Chunk]) -> Iterator[tuple[Chunk, list[memoryview]]]:
        yield from self._pipeline(chunks, self._fill)

    def _hinted(self, chunks: Iterable[Chunk]) -> Iterator[Chunk]:
        """``chunks`` in order, each one's reads handed to the kernel to start (``will_need``) about
        READAHEAD_BYTES before the chunk is: the disk keeps reading while both threads decode
        (cold-cache apply in BENCHMARKS.md)."""
        ahead: deque[tuple[Chunk, int]] = deque()
        hinted = 0
        for chunk in chunks:
            for read in chunk.reads:
                self._reader.will_need(read.path, read.offset, read.length)
            size = sum(read.length for read in chunk.reads)
            ahead.append((chunk, size))
            hinted += size
            while hinted > READAHEAD_BYTES:
                first, first_size = ahead.popleft()
                hinted -= first_size
                yield first
        for chunk, _ in ahead:
            yield chunk

    def _pipeline(self, chunks: Iterable[Chunk], fill: Callable[[Chunk, int], R]) -> Iterator[tuple[Chunk, R]]:
        pending: list[tuple[Chunk, Future[R]]] = []
        source = self._hinted(chunks)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltakit-read") as pool:
            index = 0

            def submit() -> None:
                nonlocal index
                chunk = next(source, None)
                if chunk is not None:
                    pending.append((chunk, pool.submit(fill, chunk, index % len(self._slots))))
                    index += 1

            for _ in range(self._depth):
                submit()
            try:
                while pending:
                    chunk, future = pending.pop(0)
                    result = future.result()
                    yield chunk, result
                    submit()  # reuses the slot just consumed
            finally:
                for _, future in pending:
                    future.cancel()


def as_bytes(view: memoryview) -> Bytes:
    return np.frombuffer(view, dtype=np.uint8)
