"""The read pipeline shared by make and apply: what it asks of the kernel, and in what order."""

from __future__ import annotations

import os

from deltakit import streaming
from deltakit.formats.checkpoint import RangeReader
from deltakit.streaming import Chunk, Prefetcher, Read


def test_reads_are_handed_to_the_kernel_ahead_of_the_chunks_being_read(tmp_path, monkeypatch):
    """Each chunk's ranges are hinted (WILLNEED) once, in order, before any thread reads them, and
    the hints run READAHEAD_BYTES ahead: from a disk, reading then overlaps with decoding."""
    monkeypatch.setattr(streaming, "READAHEAD_BYTES", 3000)
    data = os.urandom(20 * 1000)
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    chunks = [Chunk(k, 0, 0, 0, (Read(path, k * 1000, 1000),)) for k in range(20)]
    events: list[tuple[str, int]] = []
    with RangeReader() as reader:
        hint, read_into = reader.will_need, reader.read_into

        def hinted(p, offset, length):
            events.append(("hint", offset))
            hint(p, offset, length)

        def read(p, offset, view):
            events.append(("read", offset))
            read_into(p, offset, view)

        monkeypatch.setattr(reader, "will_need", hinted)
        monkeypatch.setattr(reader, "read_into", read)
        got = [bytes(views[0]) for _, views in Prefetcher(reader).run(chunks)]
    assert got == [data[k * 1000 : (k + 1) * 1000] for k in range(20)]
    assert [offset for kind, offset in events if kind == "hint"] == [k * 1000 for k in range(20)]
    for i, (kind, offset) in enumerate(events):
        if kind == "read":
            furthest = max(o for k, o in events[:i] if k == "hint")
            assert furthest >= min(offset + 3000, 19000), (offset, furthest)


def _write_through(tmp_path, pieces, headers):
    """Write ``pieces`` ((shard, bytes) in order) after ``headers`` with an OutputWriter; returns
    each file's bytes and each piece's BLAKE3 digest as the writer hashed it."""
    import numpy as np

    from deltakit.hashing import TensorHasher

    fds = []
    for k, header in enumerate(headers):
        fds.append(os.open(tmp_path / f"shard-{k}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        streaming.write_all(fds[-1], memoryview(header))
    hashers = [TensorHasher() for _ in pieces]
    writer = streaming.OutputWriter(fds)
    try:
        for (shard, data), hasher in zip(pieces, hashers, strict=True):
            writer.submit(shard, np.frombuffer(data, dtype=np.uint8), hasher)
        writer.finish()
    finally:
        writer.close()
        for fd in fds:
            os.close(fd)
    return [(tmp_path / f"shard-{k}").read_bytes() for k in range(len(headers))], [h.hexdigest() for h in hashers]


def _direct_works(folder) -> bool:
    fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        return streaming.set_direct(fd, True)
    finally:
        os.close(fd)
        os.unlink(folder / "probe")


def _pieces_and_files(headers, sizes, seed=0):
    import random

    rng = random.Random(seed)
    pieces, files = [], [bytearray(h) for h in headers]
    for shard, size in sizes:
        data = rng.randbytes(size)
        pieces.append((shard, data))
        files[shard] += data
    return pieces, [bytes(f) for f in files]


# headers of odd lengths, a piece smaller than the head's remainder, pieces across block edges, an
# empty piece, two files, and tails that end off the alignment
_HEADERS = [b"h" * 1001, b"k" * 4096]
_SIZES = [(0, 10), (0, 3000), (0, 70_000), (0, 0), (0, 65_536 * 3 + 17), (1, 5), (1, 200_000), (1, 65_536)]


def test_the_output_goes_to_disk_directly_in_aligned_blocks(tmp_path, monkeypatch):
    """Where the filesystem takes O_DIRECT, whole aligned blocks are written with it (the page cache
    copies nothing), the unaligned head and tail the ordinary way; the files hold exactly the bytes."""
    import blake3
    import pytest

    monkeypatch.setattr(streaming, "DIRECT_BLOCK", 65_536)
    blocks: list[tuple[int, int, bool]] = []
    write_block = streaming._write_block

    def spy(fd, view, offset):
        direct = bool(streaming.fcntl.fcntl(fd, streaming.fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
        blocks.append((offset, len(view), direct))
        write_block(fd, view, offset)

    monkeypatch.setattr(streaming, "_write_block", spy)
    pieces, expected = _pieces_and_files(_HEADERS, _SIZES)
    files, digests = _write_through(tmp_path, pieces, _HEADERS)
    assert files == expected
    assert digests == [blake3.blake3(data).hexdigest() for _, data in pieces]
    if not _direct_works(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT: only the ordinary path ran")
    assert blocks and all(direct for _, _, direct in blocks)
    assert all(offset % 4096 == 0 and size % 4096 == 0 for offset, size, _ in blocks)
    assert sum(size for _, size, _ in blocks) > 0.9 * sum(len(d) for _, d in pieces)


def test_without_direct_writes_the_output_is_the_same(tmp_path, monkeypatch):
    """A filesystem (or OS) that refuses O_DIRECT gets every byte the ordinary way: the same files."""
    monkeypatch.setattr(streaming, "DIRECT_BLOCK", 65_536)
    monkeypatch.setattr(streaming, "set_direct", lambda fd, on: False)
    pieces, expected = _pieces_and_files(_HEADERS, _SIZES, seed=1)
    files, _ = _write_through(tmp_path, pieces, _HEADERS)
    assert files == expected


def test_a_direct_write_refused_midway_falls_back_to_ordinary_writes(tmp_path, monkeypatch):
    """A filesystem that takes the O_DIRECT flag but refuses a write (EINVAL) gets that block again,
    and the rest of the file, the ordinary way: nothing is lost, nothing fails."""
    import errno

    monkeypatch.setattr(streaming, "DIRECT_BLOCK", 65_536)
    write_all = streaming.write_all
    refused = []

    def picky(fd, view, offset=None):
        flags = streaming.fcntl.fcntl(fd, streaming.fcntl.F_GETFL)
        if offset is not None and flags & getattr(os, "O_DIRECT", 0) and len(refused) < 1:
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        write_all(fd, view, offset)

    monkeypatch.setattr(streaming, "write_all", picky)
    pieces, expected = _pieces_and_files(_HEADERS, _SIZES, seed=2)
    files, _ = _write_through(tmp_path, pieces, _HEADERS)
    assert files == expected
    if _direct_works(tmp_path):
        assert len(refused) == 1
