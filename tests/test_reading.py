"""The read pipeline shared by make and apply: what it asks of the kernel, and in what order."""

from __future__ import annotations

import os

from deltakit import reading
from deltakit.formats.checkpoint import RangeReader
from deltakit.reading import Chunk, Prefetcher, Read


def test_reads_are_handed_to_the_kernel_ahead_of_the_chunks_being_read(tmp_path, monkeypatch):
    """Each chunk's ranges are hinted (WILLNEED) once, in order, before any thread reads them, and
    the hints run READAHEAD_BYTES ahead: from a disk, reading then overlaps with decoding."""
    monkeypatch.setattr(reading, "READAHEAD_BYTES", 3000)
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


def test_chunks_come_in_one_run_per_tensor_and_a_run_ends_once_the_next_tensors_first_chunk_is_read():
    """The loop make, apply and write_model share: a tensor is finished after its last chunk, when
    exactly one chunk of the next tensor has been read (so the last chunk's buffers are still valid)."""
    from deltakit.reading import by_tensor

    owners = [0, 0, 1, 2, 2, 2]
    pulled: list[int] = []

    def chunks():
        for k, owner in enumerate(owners):
            pulled.append(k)
            yield Chunk(owner, 0, k, k + 1, ())

    runs = []
    for owner, run in by_tensor(chunks(), lambda chunk: chunk.owner):
        runs.append((owner, [chunk.first for chunk in run]))
        assert len(pulled) == min(len(owners), sum(len(r) for _, r in runs) + 1)
    assert runs == [(0, [0, 1]), (1, [2]), (2, [3, 4, 5])]
