"""Safetensors without trust: a reader that validates every header, and a streaming writer.

The reader checks what the reference implementation checks (header size cap, UTF-8 JSON object,
known dtypes, 64-bit shapes, offsets contiguous from zero, sizes that agree with dtype and shape,
data ending exactly at the end of the file) and names the file and tensor in every error. It is
stricter in a few places: duplicate keys, extra entry fields and a null ``__metadata__`` are refused.
The writer fixes the header before any data, so tensors stream into place chunk by chunk.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import ITEMSIZE, shape_fault
from ..errors import FormatError, InputNotFoundError, SafetensorsHeaderError
from ..files import open_regular

__all__ = [
    "MAX_HEADER_BYTES",
    "FileLayout",
    "SafetensorsHeader",
    "SafetensorsWriter",
    "TensorInfo",
    "TensorSpec",
    "plan_layout",
    "read_header",
    "reserved_header_size",
]

# The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
_ALIGN = 8


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, safetensors dtype and shape: what a header entry says besides offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as a header describes it; ``start``/``end`` are absolute offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: tensors in data order, metadata, and the file's size."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _fail(path: Path, message: str, tensor: str | None = None) -> SafetensorsHeaderError:
    where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
    return SafetensorsHeaderError(where + message, path=path, tensor=tensor)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_uint(value: object) -> bool:
    return type(value) is int and value >= 0


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The header, with each tensor's absolute byte range in the file.

    Raises:
        SafetensorsHeaderError: naming the file (and tensor) for any violation of the format.
        InputNotFoundError: if the file does not exist.
        UnsupportedInputError: a FIFO, device or folder is there (refused without blocking on it).
    """
    path = Path(path)
    try:
        with open_regular(path) as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"file is {file_size} bytes, too short to hold a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise _fail(path, f"header claims {header_len} bytes, above the {MAX_HEADER_BYTES} byte cap")
            if 8 + header_len > file_size:
                raise _fail(
                    path, f"header claims {header_len} bytes but the file holds only {file_size - 8} after the size"
                )
            raw = f.read(header_len)
    except FileNotFoundError as e:
        raise InputNotFoundError(f"{path}: no such file", path=path) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from e
    if not text.startswith("{"):
        raise _fail(path, "header does not start with '{'; this is not a safetensors file")
    try:
        parsed = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"header is not valid JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise _fail(path, "header is not a JSON object")

    metadata = parsed.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _valid_unicode(k + v) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")

    data_start = 8 + header_len
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, entry in parsed.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, "entry must have exactly dtype, shape and data_offsets", name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise _fail(path, f"unknown or unsupported dtype {dtype!r}", name)
        if not isinstance(shape, list):
            raise _fail(path, f"shape {shape!r} is not a list of non-negative 64-bit integers", name)
        if not _valid_unicode(name):
            raise _fail(
                path, "tensor name is not valid Unicode (a lone surrogate)", name.encode("utf-8", "replace").decode()
            )
        fault = shape_fault(shape, dtype)
        if fault is not None:
            raise _fail(path, fault, name)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise _fail(path, f"data_offsets {offsets!r} is not a pair of non-negative integers", name)
        begin, end = offsets
        if end < begin:
            raise _fail(path, f"data_offsets {offsets!r} end before they begin", name)
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != expected:
            raise _fail(
                path,
                f"holds {end - begin} bytes but {dtype} {shape} needs {expected}",
                name,
            )
        entries.append((begin, end, name, dtype, tuple(shape)))

    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    tensors: dict[str, TensorInfo] = {}
    for begin, end, name, dtype, shape in entries:
        if begin != position:
            kind = "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position}"
            raise _fail(path, f"data_offsets [{begin}, {end}] {kind}", name)
        position = end
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    if data_start + position != file_size:
        raise _fail(
            path,
            f"tensors end at byte {data_start + position} but the file has {file_size} bytes "
            + ("(truncated?)" if data_start + position > file_size else "(trailing data)"),
        )
    return SafetensorsHeader(path, tensors, dict(metadata), data_start, file_size)


@dataclass(frozen=True)
class FileLayout:
    """Where each tensor of a safetensors file will lie, decided before any byte is written."""

    header: bytes
    offsets: dict[str, tuple[int, int]] = field(repr=False)  # absolute [start, end) per tensor
    size: int


def _header_bytes(entries: Iterable[tuple[TensorSpec, int, int]], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    for spec, begin, end in entries:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [begin, end]}
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def plan_layout(specs: Sequence[TensorSpec], metadata: dict[str, str], *, header_size: int | None = None) -> FileLayout:
    """Lay tensors out in the given order after a header padded with spaces.

    Args:
        specs: the tensors, in the order their data will follow the header.
        metadata: the ``__metadata__`` strings.
        header_size: pad the header to exactly this many bytes (a size reserved earlier);
            by default to the next multiple of 8, as the reference writer does.
    """
    relative: list[tuple[TensorSpec, int, int]] = []
    position = 0
    for spec in specs:
        relative.append((spec, position, position + spec.nbytes))
        position += spec.nbytes
    raw = _header_bytes(relative, metadata)
    if header_size is None:
        header_size = -(-(8 + len(raw)) // _ALIGN) * _ALIGN - 8
    if len(raw) > header_size:
        raise ValueError(f"header needs {len(raw)} bytes, more than the {header_size} reserved")
    header = struct.pack("<Q", header_size) + raw + b" " * (header_size - len(raw))
    start = len(header)
    offsets = {spec.name: (start + begin, start + end) for spec, begin, end in relative}
    return FileLayout(header, offsets, start + position)


def reserved_header_size(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> int:
    """A header size that fits any subset of ``specs``, in any order."""
    widest = sum(spec.nbytes for spec in specs)
    raw = _header_bytes(((spec, widest, widest) for spec in specs), metadata)
    return -(-(8 + len(raw)) // _ALIGN) * _ALIGN - 8


class SafetensorsWriter:
    """Appends tensors to a new safetensors file; the header is written last, into reserved room.

    Reserving the header for every tensor that *may* be written lets the caller decide per tensor,
    after streaming it, whether it is kept: data is only ever appended, in one pass.
    Data is written to ``path`` directly; callers keep ``path`` inside a staging folder.

    With ``writeback``, every time that many more bytes have been written the file is flushed to
    disk (``fdatasync``) on a thread of its own, one flush at a time: the kernel would otherwise
    hold every written page dirty until the caller's final fsync (up to a tenth of RAM by default),
    which then waits for all of it. Flushed pages stay in the page cache, so reading the file back
    (for its SHA-256) costs no disk reads.
    """

    def __init__(
        self, path: Path, candidates: Sequence[TensorSpec], metadata: dict[str, str], *, writeback: int | None = None
    ) -> None:
        self.path = path
        self.metadata = dict(metadata)
        self._header_size = reserved_header_size(candidates, self.metadata)
        self._candidates = {spec.name: spec for spec in candidates}
        self._file = open(path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._file.seek(8 + self._header_size)
        self._written: list[TensorSpec] = []
        self._open: TensorSpec | None = None
        self._open_bytes = 0
        self._writeback = writeback
        self._unflushed = 0
        self._flusher: ThreadPoolExecutor | None = None
        self._flushing: Future[None] | None = None

    @property
    def tensors(self) -> list[TensorSpec]:
        return list(self._written)

    def begin(self, name: str) -> None:
        """Start the tensor ``name``; it must be one of the candidates and not written yet."""
        if self._open is not None:
            raise RuntimeError(f"tensor {self._open.name!r} is still open")
        self._open = self._candidates.pop(name)
        self._open_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._file.write(data)
        self._open_bytes += len(data)
        self._unflushed += len(data)
        if self._writeback is not None and self._unflushed >= self._writeback:
            self._flush_behind()

    def _flush_behind(self) -> None:
        """Start an ``fdatasync`` of what is written so far, unless one is still running."""
        if self._flushing is not None:
            if not self._flushing.done():
                return
            self._flushing.result()  # an I/O error surfaces here
        if self._flusher is None:
            self._flusher = ThreadPoolExecutor(1, thread_name_prefix="deltakit-flush")
        self._file.flush()
        self._unflushed = 0
        self._flushing = self._flusher.submit(self._flush, self._file.fileno())

    def _flush(self, fd: int) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync
        except OSError as e:  # fdatasync's own error names no file
            raise OSError(e.errno, f"writing to disk failed: {e.strerror}", str(self.path)) from e

    def _stop_flushing(self) -> None:
        """Wait for the flush in flight (re-raising its error) and end its thread."""
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
            self._flusher = None
        if self._flushing is not None:
            flushing, self._flushing = self._flushing, None
            flushing.result()

    def end(self, *, as_bytes: bool = False) -> None:
        """Close the open tensor; with ``as_bytes``, record it as the ``U8`` bytes written (at most
        its candidate's size), for coded payloads whose size is known only once written."""
        spec = self._open
        if spec is None:
            raise RuntimeError("no tensor is open")
        if as_bytes and self._open_bytes <= spec.nbytes:
            spec = TensorSpec(spec.name, "U8", (self._open_bytes,))
        if self._open_bytes != spec.nbytes:
            raise FormatError(
                f"{self.path}: tensor {spec.name!r} got {self._open_bytes} bytes, expected {spec.nbytes}",
                path=self.path,
                tensor=spec.name,
            )
        self._written.append(spec)
        self._open = None

    def finish(self) -> int:
        """Write the header into its reserved room and close; returns the file's size."""
        if self._open is not None:
            raise RuntimeError(f"tensor {self._open.name!r} is still open")
        layout = plan_layout(self._written, self.metadata, header_size=self._header_size)
        try:
            self._stop_flushing()
            self._file.seek(0)
            self._file.write(layout.header)
        finally:
            self._file.close()
        return layout.size

    def abort(self) -> None:
        try:
            self._stop_flushing()
        except OSError:
            pass  # the file is being dropped: a failed flush of it changes nothing
        finally:
            self._file.close()
