"""Chunk plumbing shared by every streaming job: read-ahead, write-behind, output layout.

Jobs describe their work as :class:`Chunk` objects (byte ranges to read, in order); the
:class:`Prefetcher` reads them ahead on worker threads, and the :class:`OutputWriter` hashes and
writes results one chunk behind, so reading, computing and writing overlap in bounded memory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import mmap
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from .codecs import Bytes
from .dtypes import itemsize
from .formats.checkpoint import RangeReader
from .formats.safetensors import FileLayout, TensorInfo, TensorSpec, plan_layout
from .hashing import TensorHasher
from .progress import ProgressBar

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_SHARD_SIZE",
    "OUTPUT_METADATA",
    "Arena",
    "Chunk",
    "OutputShard",
    "OutputWriter",
    "Prefetcher",
    "Read",
    "as_bytes",
    "element_ranges",
    "open_output_shards",
    "paired_chunks",
    "plan_output",
    "plan_shards",
    "read_range",
    "set_direct",
    "stream_outputs",
    "write_index",
    "write_model",
]

T = TypeVar("T")
R = TypeVar("R")

CHUNK_BYTES = 8 << 20
PREFETCH_DEPTH = 3
READAHEAD_BYTES = 64 << 20  # reads the kernel is asked to start ahead of the chunks read now
OUTPUT_METADATA = {"format": "pt"}


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
    next, which is what lets :class:`OutputWriter` write chunk N while chunk N + 1 is decoded.

    With ``mapped`` (where the OS can populate a mapping at once), chunks are mapped read-only
    instead of copied into the ring: the copy out of the page cache costs a core-second for every
    6 GB read here, a fifth of what make or apply spends. A mapped chunk lives as long as its views.
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
        READAHEAD_BYTES before the chunk is: the disk keeps reading while both threads decode.
        Measured from a cold cache at 500 MB/s, format 2 apply read at 200-350 MB/s without it."""
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


def plan_shards(specs: Sequence[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def output_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


def write_all(fd: int, view: memoryview, offset: int | None = None) -> None:
    """Write every byte of ``view`` to ``fd``: at its position, or at ``offset`` (``pwrite``)."""
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


# Direct writes (O_DIRECT) go in blocks of this many bytes, at offsets and from memory aligned to
# DIRECT_ALIGN (a page: what every Linux filesystem that takes O_DIRECT accepts).
DIRECT_ALIGN = 4096
DIRECT_BLOCK = 8 << 20


def set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; False where the OS or the filesystem refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return True


def _write_block(fd: int, view: memoryview, offset: int) -> None:
    """Write one aligned block; a filesystem that took O_DIRECT but refuses the write (EINVAL: a
    larger sector, say) gets this block and the rest of the file written the ordinary way."""
    try:
        write_all(fd, view, offset)
    except OSError as e:
        if e.errno != errno.EINVAL or not set_direct(fd, False):
            raise
        write_all(fd, view, offset)


class _ShardSink:
    """One output file, written in order from where its header ends.

    Bytes go to the disk with O_DIRECT where the filesystem takes it: they are copied into one of two
    page-aligned blocks, and a full block is written by the flush thread while the other fills. The
    page cache then holds none of the output, and the kernel copies nothing. Measured on the 2-core
    VM of BENCHMARKS.md: apply's writes of 1.9 GB through the page cache cost 1.6 to 2.2 core-seconds
    of kernel copying (perf), and ``dd`` wrote 1.9 GB at 300-500 MB/s buffered with ``fdatasync``,
    1.4 GB/s with O_DIRECT; apply took half the time. The bytes up to the first aligned offset, and
    the tail after the last full block, are written the ordinary way; where O_DIRECT is refused,
    everything is, and written ranges are handed to the kernel for write-back as they go, so the
    final fsync finds little left.
    """

    _WRITEBACK_BYTES = 64 << 20

    def __init__(self, fd: int, flusher: ThreadPoolExecutor) -> None:
        self.fd = fd
        self._flusher = flusher
        self.position = os.lseek(fd, 0, os.SEEK_CUR)  # where the next byte goes
        self._direct: bool | None = None  # decided when the position first reaches an aligned offset
        self._blocks: list[mmap.mmap] = []
        self._filling = 0  # which block fills
        self._fill = 0  # bytes in it
        self._flushes: list[Future[None] | None] = [None, None]
        self._advised = self.position

    def write(self, view: memoryview) -> None:
        if self._direct is None:
            lead = -self.position % DIRECT_ALIGN
            if lead:
                self._buffered(view[:lead])
                view = view[lead:]
                if not view:
                    return
            self._direct = set_direct(self.fd, True)
            if self._direct:
                self._blocks = [mmap.mmap(-1, DIRECT_BLOCK), mmap.mmap(-1, DIRECT_BLOCK)]
        if not self._direct:
            self._buffered(view)
            return
        while view:
            block = self._blocks[self._filling]
            n = min(len(view), DIRECT_BLOCK - self._fill)
            block[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == DIRECT_BLOCK:
                self._flush_block()

    def _buffered(self, view: memoryview) -> None:
        write_all(self.fd, view, self.position)
        self.position += len(view)
        if hasattr(os, "posix_fadvise") and self.position - self._advised >= self._WRITEBACK_BYTES:
            os.posix_fadvise(self.fd, self._advised, self.position - self._advised, os.POSIX_FADV_DONTNEED)
            self._advised = self.position

    def _flush_block(self) -> None:
        """Hand the filling block to the flush thread and start filling the other one (once its
        own flush is done)."""
        index, size = self._filling, self._fill
        view = memoryview(self._blocks[index])[:size]
        self._flushes[index] = self._flusher.submit(_write_block, self.fd, view, self.position)
        self.position += size
        self._filling, self._fill = 1 - index, 0
        self.wait(self._filling)

    def wait(self, index: int) -> None:
        pending, self._flushes[index] = self._flushes[index], None
        if pending is not None:
            pending.result()

    def finish(self) -> None:
        """Write what is left: the aligned part of the last block directly, the rest the ordinary way."""
        if self._direct:
            tail = self._fill % DIRECT_ALIGN
            block, self._fill = self._filling, self._fill - tail
            rest = self._blocks[block][self._fill : self._fill + tail]  # a copy: mmap slices are bytes
            if self._fill:
                self._flush_block()
            self.wait(0)
            self.wait(1)
            set_direct(self.fd, False)
            self._direct = False
            self._blocks = []  # unmapped once the last flush has let go of them
            self._buffered(memoryview(rest))

    def abandon(self) -> None:
        """Wait for the flushes in flight (their errors are the job's failure, already raised)."""
        for index in (0, 1):
            with contextlib.suppress(OSError):
                self.wait(index)


class OutputWriter:
    """Hashes and writes output chunks on a thread of its own, one chunk behind the decoding.

    One chunk in flight at most: its bytes may be a view of a read-ahead buffer, which the
    prefetcher recycles only after the next chunk has been handed out. Each file is written by a
    :class:`_ShardSink` (O_DIRECT where the filesystem takes it), its full blocks by a second thread.
    """

    def __init__(self, fds: Sequence[int]) -> None:
        self._fds = fds
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltakit-write")
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltakit-flush")
        self._pending: Future[None] | None = None
        self._sinks: dict[int, _ShardSink] = {}

    def _write(self, shard: int, data: Bytes, hasher: TensorHasher) -> None:
        view = data.data.cast("B") if data.size else memoryview(b"")
        hasher.update(view)
        sink = self._sinks.get(shard)
        if sink is None:
            for other in self._sinks.values():  # files are written one after the other: the last
                other.finish()  # one is complete (one written again would go the ordinary way)
            sink = self._sinks[shard] = _ShardSink(self._fds[shard], self._flusher)
        sink.write(view)

    def submit(self, shard: int, data: Bytes, hasher: TensorHasher) -> None:
        self.wait()
        self._pending = self._pool.submit(self._write, shard, data, hasher)

    def wait(self) -> None:
        """Block until the chunk in flight is hashed and written (re-raising its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def finish(self) -> None:
        """Write out every file's last bytes: after it, each file holds everything submitted."""
        self.wait()
        for sink in self._sinks.values():
            sink.finish()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            for sink in self._sinks.values():
                sink.abandon()
            self._pool.shutdown(wait=True)
            self._flusher.shutdown(wait=True)


@dataclass(frozen=True)
class OutputShard:
    """One output safetensors file, its header fixed before any data is written."""

    name: str
    layout: FileLayout


def plan_output(specs: Sequence[TensorSpec], shard_size: int) -> tuple[tuple[OutputShard, ...], dict[str, int]]:
    """Lay out a model's tensors in HF-named shards; returns the shards and each tensor's shard index."""
    groups = plan_shards(specs, shard_size)
    shards = tuple(
        OutputShard(output_name(i + 1, len(groups)), plan_layout(group, OUTPUT_METADATA))
        for i, group in enumerate(groups)
    )
    shard_of = {spec.name: i for i, group in enumerate(groups) for spec in group}
    return shards, shard_of


def open_output_shards(folder: Path, shards: Sequence[OutputShard]) -> list[int]:
    """Create each shard file (never an existing one) and write its header; data follows in order."""
    fds: list[int] = []
    try:
        for shard in shards:
            fds.append(os.open(folder / shard.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            write_all(fds[-1], memoryview(shard.layout.header))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def write_index(
    folder: Path, shards: Sequence[OutputShard], shard_of: dict[str, int], specs: Iterable[TensorSpec]
) -> None:
    """``model.safetensors.index.json``, written last, once every shard is complete; only when sharded."""
    if len(shards) < 2:
        return
    index = {
        "metadata": {"total_size": sum(spec.nbytes for spec in specs)},
        "weight_map": {name: shards[i].name for name, i in shard_of.items()},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def stream_outputs(
    reader: RangeReader,
    chunks: Iterable[Chunk],
    produce: Callable[[Chunk, list[memoryview]], Bytes],
    shard_of_owner: Sequence[int],
    fds: Sequence[int],
    bar: ProgressBar,
) -> list[str]:
    """Read ``chunks`` ahead, turn each into output bytes with ``produce``, write them behind.

    Returns the BLAKE3 digest of every owner's (tensor's) output, by owner index. Every owner must
    yield at least one chunk, in order.
    """
    digests: list[str] = []
    writer = OutputWriter(fds)
    hasher = TensorHasher()
    try:
        for chunk, views in Prefetcher(reader).run(chunks):
            if chunk.owner != len(digests) - 1:
                if digests:
                    writer.wait()
                    digests[-1] = hasher.hexdigest()
                hasher = TensorHasher()
                digests.append("")
            data = produce(chunk, views)
            writer.submit(shard_of_owner[chunk.owner], data, hasher)
            bar.update(int(data.size))
        if digests:
            writer.wait()
            digests[-1] = hasher.hexdigest()
        writer.finish()
    finally:
        writer.close()
    return digests


DEFAULT_SHARD_SIZE = 5_000_000_000


def write_model(
    folder: Path,
    specs: Sequence[TensorSpec],
    shard_size: int,
    reader: RangeReader,
    chunks: Iterable[Chunk],
    produce: Callable[[Chunk, list[memoryview]], Bytes],
    bar: ProgressBar,
) -> tuple[list[str], tuple[OutputShard, ...]]:
    """Stream a model's tensors (chunk owners index ``specs``) into HF safetensors shards plus index.

    Returns each tensor's BLAKE3 digest and the shards written.
    """
    shards, shard_of = plan_output(specs, shard_size)
    fds = open_output_shards(folder, shards)
    try:
        digests = stream_outputs(reader, chunks, produce, [shard_of[s.name] for s in specs], fds, bar)
    finally:
        for fd in fds:
            os.close(fd)
    write_index(folder, shards, shard_of, specs)
    return digests, shards
