"""Write-behind for streaming jobs: output bytes hashed and written one chunk behind the decoding.

Each output file is written in order by a sink that goes around the page cache (O_DIRECT) where
the filesystem takes it; :func:`write_model` streams a whole model into its planned shards.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .codecs import Bytes
from .formats.checkpoint import RangeReader
from .formats.safetensors import TensorSpec
from .hashing import TensorHasher
from .layout import OutputShard, plan_output, write_index
from .progress import ProgressBar
from .reading import Chunk, Prefetcher, by_tensor

__all__ = [
    "DIRECT_ALIGN",
    "OutputWriter",
    "open_output_shards",
    "set_direct",
    "stream_outputs",
    "write_all",
    "write_model",
]

# Direct writes (O_DIRECT) go in blocks of this many bytes, at offsets and from memory aligned to
# DIRECT_ALIGN (a page: what every Linux filesystem that takes O_DIRECT accepts).
DIRECT_ALIGN = 4096
DIRECT_BLOCK = 8 << 20


def write_all(fd: int, view: memoryview, offset: int | None = None) -> None:
    """Write every byte of ``view`` to ``fd``: at its position, or at ``offset`` (``pwrite``)."""
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


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
    page-aligned blocks, and a full block is written by the flush thread while the other fills, so
    the kernel copies nothing into a page cache that nothing reads back (measured: BENCHMARKS.md, the
    I/O floors of make and apply). The bytes up to the first aligned offset, and the tail after the
    last full block, are written the ordinary way; where O_DIRECT is refused, everything is, and
    written ranges are handed to the kernel for write-back as they go, so the final fsync finds
    little left.
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
    try:
        for owner, run in by_tensor(Prefetcher(reader).run(chunks), lambda item: item[0].owner):
            hasher = TensorHasher()
            for chunk, views in run:
                data = produce(chunk, views)
                writer.submit(shard_of_owner[owner], data, hasher)
                bar.update(int(data.size))
            writer.wait()  # the tensor's last chunk is hashed
            digests.append(hasher.hexdigest())
        writer.finish()
    finally:
        writer.close()
    return digests


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
