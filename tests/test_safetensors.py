"""The validating reader against hostile headers, and the writer against the reference library."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from deltakit.errors import SafetensorsHeaderError
from deltakit.formats import SafetensorsWriter, TensorSpec, plan_layout, read_header
from deltakit.formats.safetensors import MAX_HEADER_BYTES


def file_with(tmp_path: Path, header: object, data: bytes = b"", *, raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_reads_what_the_reference_writer_writes(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.zeros(0, 2, dtype=torch.float16),
        "c": torch.tensor(1.5, dtype=torch.bfloat16),
        "d": torch.arange(5, dtype=torch.int64),
        "e": torch.tensor([True, False]),
    }
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    raw = path.read_bytes()
    for name, t in tensors.items():
        info = header.tensors[name]
        assert info.shape == tuple(t.shape)
        expected = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        assert raw[info.start : info.end] == expected


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"t": entry("F32", [2], 0, 8)}, b"\0" * 4, "truncated"),
        ({"t": entry("F32", [2], 0, 8)}, b"\0" * 12, "trailing data"),
        ({"t": entry("F32", [2], 0, 4)}, b"\0" * 4, "needs 8"),
        ({"t": entry("F32", [2], 8, 0)}, b"", "end before they begin"),
        ({"t": entry("F32", [1], 4, 8)}, b"\0" * 8, "leaves a gap at byte 0"),
        ({"t": entry("F32", [2], 0, 8), "u": entry("F32", [1], 4, 8)}, b"\0" * 8, "overlaps"),
        ({"t": entry("Q4", [2], 0, 2)}, b"\0\0", "unknown or unsupported dtype"),
        ({"t": entry("F32", [-1], 0, 0)}, b"", "non-negative"),
        ({"t": entry("F32", [True], 0, 4)}, b"\0" * 4, "non-negative"),
        ({"t": {"dtype": "F32", "shape": [1]}}, b"", "exactly dtype, shape and data_offsets"),
        ({"t": entry("F32", [1], 0, 4) | {"extra": 1}}, b"\0" * 4, "exactly dtype"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
        ([1, 2], b"", "does not start with"),
    ],
)
def test_hostile_headers_get_specific_errors(tmp_path, header, data, message):
    path = file_with(tmp_path, header, data)
    with pytest.raises(SafetensorsHeaderError, match=message) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_header_size_cap_and_bounds(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(SafetensorsHeaderError, match="byte cap"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(SafetensorsHeaderError, match="holds only 2"):
        read_header(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsHeaderError, match="too short"):
        read_header(path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'{"t": ', "not valid JSON"),
        (
            b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
            b'"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}',
            "duplicate key",
        ),
    ],
)
def test_malformed_json_headers(tmp_path, raw, message):
    with pytest.raises(SafetensorsHeaderError, match=message):
        read_header(file_with(tmp_path, None, raw=raw))


@pytest.mark.parametrize("writeback", [None, 16], ids=["plain", "flushed-behind"])
def test_writer_output_matches_the_reference_library_bytes(tmp_path, writeback, monkeypatch):
    """The same bytes whether or not the writer flushes to disk behind its writes; with
    ``writeback``, it does flush (from a thread of its own) as the bytes pass the threshold."""
    flushed: list[int] = []
    real = getattr(os, "fdatasync", os.fsync)

    def fdatasync(fd: int) -> None:
        flushed.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync, raising=False)
    tensors = {"w": torch.randn(4, 3), "b": torch.arange(6, dtype=torch.int16), "e": torch.zeros(0)}
    specs = [
        TensorSpec(n, {torch.float32: "F32", torch.int16: "I16"}[t.dtype], tuple(t.shape)) for n, t in tensors.items()
    ]
    path = tmp_path / "w.safetensors"
    writer = SafetensorsWriter(path, specs, {"format": "pt"}, writeback=writeback)
    for name in ("b", "w", "e"):  # any order, any subset of the candidates
        writer.begin(name)
        t = tensors[name]
        writer.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        writer.end()
    writer.finish()
    loaded = load_file(str(path))
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)
    header = read_header(path)
    assert list(header.tensors) == ["b", "w", "e"]
    assert header.data_start % 8 == 0
    assert bool(flushed) == (writeback is not None)


def test_plan_layout_header_is_what_the_reference_library_parses(tmp_path):
    specs = [TensorSpec("x", "F16", (2, 2)), TensorSpec("y", "BF16", ())]
    layout = plan_layout(specs, {"format": "pt"})
    data = bytes(range(8)) + b"\x01\x02"
    path = tmp_path / "p.safetensors"
    path.write_bytes(layout.header + data)
    assert layout.size == path.stat().st_size
    assert len(layout.header) % 8 == 0
    loaded = load_file(str(path))
    assert loaded["x"].view(torch.uint8).reshape(-1).tolist() == list(range(8))
    assert loaded["y"].shape == ()
    # and the bytes agree with what the reference writer would have given for the tensors
    ref = save({"x": loaded["x"], "y": loaded["y"]}, metadata={"format": "pt"})
    assert ref.endswith(data) or ref.endswith(data[8:] + data[:8])
