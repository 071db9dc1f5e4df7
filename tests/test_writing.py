"""The write-behind shared by apply, convert and merge: direct writes in aligned blocks, exact bytes."""

from __future__ import annotations

import os

from deltakit import writing


def _write_through(tmp_path, pieces, headers):
    """Write ``pieces`` ((shard, bytes) in order) after ``headers`` with an OutputWriter; returns
    each file's bytes and each piece's BLAKE3 digest as the writer hashed it."""
    import numpy as np

    from deltakit.hashing import TensorHasher

    fds = []
    for k, header in enumerate(headers):
        fds.append(os.open(tmp_path / f"shard-{k}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        writing.write_all(fds[-1], memoryview(header))
    hashers = [TensorHasher() for _ in pieces]
    writer = writing.OutputWriter(fds)
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
        return writing.set_direct(fd, True)
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

    monkeypatch.setattr(writing, "DIRECT_BLOCK", 65_536)
    blocks: list[tuple[int, int, bool]] = []
    write_block = writing._write_block

    def spy(fd, view, offset):
        direct = bool(writing.fcntl.fcntl(fd, writing.fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
        blocks.append((offset, len(view), direct))
        write_block(fd, view, offset)

    monkeypatch.setattr(writing, "_write_block", spy)
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
    monkeypatch.setattr(writing, "DIRECT_BLOCK", 65_536)
    monkeypatch.setattr(writing, "set_direct", lambda fd, on: False)
    pieces, expected = _pieces_and_files(_HEADERS, _SIZES, seed=1)
    files, _ = _write_through(tmp_path, pieces, _HEADERS)
    assert files == expected


def test_a_direct_write_refused_midway_falls_back_to_ordinary_writes(tmp_path, monkeypatch):
    """A filesystem that takes the O_DIRECT flag but refuses a write (EINVAL) gets that block again,
    and the rest of the file, the ordinary way: nothing is lost, nothing fails."""
    import errno

    monkeypatch.setattr(writing, "DIRECT_BLOCK", 65_536)
    write_all = writing.write_all
    refused = []

    def picky(fd, view, offset=None):
        flags = writing.fcntl.fcntl(fd, writing.fcntl.F_GETFL)
        if offset is not None and flags & getattr(os, "O_DIRECT", 0) and len(refused) < 1:
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        write_all(fd, view, offset)

    monkeypatch.setattr(writing, "write_all", picky)
    pieces, expected = _pieces_and_files(_HEADERS, _SIZES, seed=2)
    files, _ = _write_through(tmp_path, pieces, _HEADERS)
    assert files == expected
    if _direct_works(tmp_path):
        assert len(refused) == 1
