"""Model checkpoints on disk: which tensors a folder holds, where their bytes lie, what else it carries.

A checkpoint is a safetensors, PyTorch ``.bin`` or Meta ``.pth`` file, or a folder of them, sharded
or not. Only headers (and pickles, without running them) are read here; tensor bytes are read later,
range by range, through :class:`RangeReader`, whatever the format.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from types import TracebackType

from ..errors import FormatError, InputNotFoundError, IntegrityError, UnsupportedInputError
from ..files import open_regular_fd, read_json_object
from ..manifest import MANIFEST_NAME
from .safetensors import TensorInfo, read_header
from .torch_zip import read_torch_zip

__all__ = ["Checkpoint", "RangeReader", "is_weight_file", "open_checkpoint"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")
_WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".msgpack.index.json", ".h5.index.json")


def is_weight_file(name: str) -> bool:
    """True for files that hold weights (or index them) in any common format."""
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(_WEIGHT_INDEX_SUFFIXES)


@dataclass(frozen=True)
class Checkpoint:
    """The tensors of a model checkpoint and the other files beside them.

    Attributes:
        source: the path as given (a folder, or a lone ``.safetensors`` file).
        root: the folder (or, for a lone file, its parent).
        tensors: every tensor, in file order, with the byte range that holds it.
        weight_files: the safetensors files (and index) the tensors come from.
        extra_files: other files in the folder, relative to ``root`` (config, tokenizer...).
        ignored_weight_files: weight files in other formats beside the safetensors ones, not read.
    """

    source: Path
    root: Path
    tensors: dict[str, TensorInfo]
    weight_files: tuple[Path, ...]
    extra_files: tuple[str, ...]
    ignored_weight_files: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _walk_files(root: Path) -> list[str]:
    """Relative paths of the files under root, hidden files and folders skipped, sorted.

    A FIFO, socket or device is listed too, so that whoever reads it refuses it by name; a link
    that leads nowhere is not."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            full = Path(folder) / name
            if full.exists() and not full.is_dir():
                found.append(full.relative_to(root).as_posix())
    return sorted(found)


def _read_index(index_path: Path) -> dict[str, str]:
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError(f"{index_path}: 'weight_map' must map tensor names to file names", path=index_path)
    for file_name in set(weight_map.values()):
        if Path(file_name).name != file_name or file_name in ("", ".", ".."):
            raise FormatError(
                f"{index_path}: shard {file_name!r} is not a plain file name in the same folder",
                path=index_path,
            )
    return weight_map


Reader = Callable[[Path], dict[str, TensorInfo]]


def _read_safetensors(path: Path) -> dict[str, TensorInfo]:
    return read_header(path).tensors


@dataclass(frozen=True)
class _Layout:
    """One way a folder can hold weights: an index file, or shard files matching a pattern."""

    index: str
    pattern: str
    reader: Reader


_LAYOUTS = (
    _Layout("model.safetensors.index.json", "*.safetensors", _read_safetensors),
    _Layout("pytorch_model.bin.index.json", "pytorch_model*.bin", read_torch_zip),
)


def _reader_for(path: Path) -> Reader:
    if path.name.endswith(".safetensors"):
        return _read_safetensors
    if path.suffix in (".bin", ".pth", ".pt"):
        return read_torch_zip
    raise UnsupportedInputError(f"{path}: not a .safetensors, .bin or .pth checkpoint file", path=path)


def _collect(shards: list[Path], reader: Reader) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in reader(shard).items():
            if name in tensors:
                raise FormatError(
                    f"tensor {name!r} is in both {tensors[name].path.name} and {shard.name}",
                    path=shard,
                    tensor=name,
                )
            tensors[name] = info
    return tensors


def _indexed(folder: Path, index_path: Path, reader: Reader) -> tuple[dict[str, TensorInfo], tuple[Path, ...]]:
    weight_map = _read_index(index_path)
    shards = [folder / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.exists():  # a FIFO or a folder there is refused by name when it is read
            raise InputNotFoundError(
                f"{index_path.name} lists {shard.name}, which is missing from {folder}", path=shard
            )
    tensors = _collect(shards, reader)
    for name, shard_name in weight_map.items():
        info = tensors.get(name)
        if info is None or info.path.name != shard_name:
            raise FormatError(
                f"{index_path.name} puts tensor {name!r} in {shard_name}, which does not hold it",
                path=folder / shard_name,
                tensor=name,
            )
    unindexed = sorted(set(tensors) - set(weight_map))
    if unindexed:
        raise FormatError(
            f"{index_path.name} does not list tensor {unindexed[0]!r} found in {tensors[unindexed[0]].path.name}",
            path=index_path,
            tensor=unindexed[0],
        )
    return tensors, (index_path, *shards)


def _folder_tensors(path: Path, top: list[str]) -> tuple[dict[str, TensorInfo], tuple[Path, ...]]:
    for layout in _LAYOUTS:
        index_path = path / layout.index
        if index_path.exists():
            return _indexed(path, index_path, layout.reader)
        shards = [path / name for name in top if fnmatch(name, layout.pattern)]
        if shards:
            return _collect(shards, layout.reader), tuple(shards)
    meta = [path / name for name in top if fnmatch(name, "consolidated.*.pth")]
    if len(meta) == 1:
        return _collect(meta, read_torch_zip), (meta[0],)
    if meta:
        raise UnsupportedInputError(
            f"{path} is a Meta checkpoint split into {len(meta)} model-parallel shards; merging them "
            "is not supported yet: convert it to the Hugging Face layout first",
            path=path,
        )
    others = [name for name in top if is_weight_file(name)]
    hint = f" (found {', '.join(others)})" if others else ""
    raise UnsupportedInputError(
        f"{path} holds no checkpoint deltakit reads: model.safetensors, pytorch_model.bin, "
        f"their sharded forms, or consolidated.00.pth{hint}",
        path=path,
    )


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read the headers of a checkpoint (file or folder) and validate them.

    A folder may hold safetensors (``model.safetensors``, shards with or without
    ``model.safetensors.index.json``), PyTorch ``.bin`` files (``pytorch_model.bin``, or shards with
    ``pytorch_model.bin.index.json``), or a single Meta ``consolidated.00.pth``; safetensors win when a
    folder holds several. A file may be ``.safetensors``, ``.bin`` or ``.pth``.

    Raises:
        InputNotFoundError: the path does not exist.
        UnsupportedInputError: it holds nothing deltakit reads (a delta package, say).
        FormatError: an index, header or pickle is inconsistent; the message names the file and tensor.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file or folder", path=path)
    if not path.is_dir():  # a file, or a FIFO or device that its reader refuses by name
        return Checkpoint(path, path.parent, _collect([path], _reader_for(path)), (path,), (), ())
    if (path / MANIFEST_NAME).exists():
        raise UnsupportedInputError(f"{path} is a deltakit delta package, not a model checkpoint", path=path)
    files = _walk_files(path)
    tensors, weight_files = _folder_tensors(path, [name for name in files if "/" not in name])
    used = {p.relative_to(path).as_posix() for p in weight_files}
    extra = tuple(name for name in files if name not in used and not is_weight_file(name))
    ignored = tuple(name for name in files if name not in used and is_weight_file(name))
    return Checkpoint(path, path, tensors, weight_files, extra, ignored)


def _cut_short(path: Path, end: int, length: int, offset: int) -> IntegrityError:
    return IntegrityError(
        f"{path}: ended at byte {end} while reading {length} bytes from {offset} (the file shrank or is truncated)",
        path=path,
    )


class RangeReader:
    """Reads byte ranges of files with ``pread`` into caller-owned buffers; one descriptor per file."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._unmappable: set[Path] = set()
        self._lock = threading.Lock()  # read-ahead threads share the descriptors

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = open_regular_fd(path)
                self._fds[path] = fd
            return fd

    def read_into(self, path: Path, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes of ``path`` from ``offset``; a short file is an error."""
        fd = self._fd(path)
        done = 0
        total = len(view)
        while done < total:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise _cut_short(path, offset + done, total, offset)
            done += n

    def map_range(self, path: Path, offset: int, length: int) -> memoryview | None:
        """The bytes of ``path`` from ``offset``, mapped read-only instead of copied: what the page cache
        holds is used in place. The mapping lasts as long as the returned view (or any array made
        from it); a short file is an error, as for :meth:`read_into`. ``None`` where the file system
        cannot map files (some FUSE mounts): read those with :meth:`read_into`."""
        if length == 0:
            return memoryview(b"")
        if path in self._unmappable:
            return None
        fd = self._fd(path)
        size = os.fstat(fd).st_size
        if offset + length > size:
            raise _cut_short(path, size, length, offset)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # map every page now, not fault by fault
        try:
            mapped = mmap.mmap(fd, offset + length - start, flags=flags, prot=mmap.PROT_READ, offset=start)
        except OSError:
            self._unmappable.add(path)
            return None
        return memoryview(mapped)[offset - start :]

    def will_need(self, path: Path, offset: int, length: int) -> None:
        """Ask the kernel to start reading a range into the page cache and return at once: reads
        from a disk then run ahead of the threads that decode, instead of taking turns with them."""
        if length and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):  # a hint: where it is refused, the read itself still comes
                os.posix_fadvise(self._fd(path), offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
