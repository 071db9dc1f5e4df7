"""Model checkpoints on disk: which tensors a folder holds, where their bytes lie, what else it carries.

A checkpoint is a single ``.safetensors`` file, or a folder holding ``model.safetensors``, a sharded
set described by ``model.safetensors.index.json``, or plain ``*.safetensors`` shards. Only headers
are read here; tensor bytes are read later, range by range, through :class:`RangeReader`.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ..errors import FormatError, InputNotFoundError, IntegrityError, UnsupportedInputError
from ..manifest import MANIFEST_NAME
from .safetensors import TensorInfo, read_header

__all__ = ["Checkpoint", "RangeReader", "is_weight_file", "open_checkpoint"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
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
    """Relative paths of regular files under root, hidden files and folders skipped, sorted."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            full = Path(folder) / name
            if full.is_file():
                found.append(full.relative_to(root).as_posix())
    return sorted(found)


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{index_path}: cannot read the shard index: {e}", path=index_path) from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError(f"{index_path}: 'weight_map' must map tensor names to file names", path=index_path)
    for file_name in set(weight_map.values()):
        if Path(file_name).name != file_name:
            raise FormatError(
                f"{index_path}: shard {file_name!r} is not a plain file name in the same folder",
                path=index_path,
            )
    return weight_map


def _collect(shards: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_header(shard).tensors.items():
            if name in tensors:
                raise FormatError(
                    f"tensor {name!r} is in both {tensors[name].path.name} and {shard.name}",
                    path=shard,
                    tensor=name,
                )
            tensors[name] = info
    return tensors


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read the headers of a safetensors checkpoint (file or folder) and validate them.

    Raises:
        InputNotFoundError: the path does not exist.
        UnsupportedInputError: it holds no safetensors weights (a delta package, ``.bin`` only...).
        FormatError: an index or header is inconsistent; the message names the file and tensor.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file or folder", path=path)
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise UnsupportedInputError(f"{path}: not a .safetensors file", path=path)
        tensors = _collect([path])
        return Checkpoint(path, path.parent, tensors, (path,), (), ())
    if (path / MANIFEST_NAME).exists():
        raise UnsupportedInputError(f"{path} is a deltakit delta package, not a model checkpoint", path=path)

    files = _walk_files(path)
    top = [name for name in files if "/" not in name]
    index_path = path / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = _read_index(index_path)
        shard_names = sorted(set(weight_map.values()))
        shards = [path / name for name in shard_names]
        for shard in shards:
            if not shard.is_file():
                raise InputNotFoundError(
                    f"{index_path.name} lists {shard.name}, which is missing from {path}", path=shard
                )
        tensors = _collect(shards)
        for name, shard_name in weight_map.items():
            info = tensors.get(name)
            if info is None or info.path.name != shard_name:
                raise FormatError(
                    f"{index_path.name} puts tensor {name!r} in {shard_name}, which does not hold it",
                    path=path / shard_name,
                    tensor=name,
                )
        unindexed = sorted(set(tensors) - set(weight_map))
        if unindexed:
            raise FormatError(
                f"{index_path.name} does not list tensor {unindexed[0]!r} found in {tensors[unindexed[0]].path.name}",
                path=index_path,
                tensor=unindexed[0],
            )
        weight_files = (index_path, *shards)
    else:
        shards = [path / name for name in top if name.endswith(".safetensors")]
        if not shards:
            others = [name for name in top if is_weight_file(name)]
            hint = f" (found {', '.join(others)}: only safetensors is read for now)" if others else ""
            raise UnsupportedInputError(f"{path} holds no .safetensors weights{hint}", path=path)
        tensors = _collect(shards)
        weight_files = tuple(shards)

    used = {p.relative_to(path).as_posix() for p in weight_files}
    extra = tuple(name for name in files if name not in used and not is_weight_file(name))
    ignored = tuple(name for name in files if name not in used and is_weight_file(name))
    return Checkpoint(path, path, tensors, weight_files, extra, ignored)


class RangeReader:
    """Reads byte ranges of files with ``pread`` into caller-owned buffers; one descriptor per file."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
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
                fd = os.open(path, os.O_RDONLY)
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
                raise IntegrityError(
                    f"{path}: ended at byte {offset + done} while reading {total} bytes from {offset} "
                    "(the file shrank or is truncated)",
                    path=path,
                )
            done += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
