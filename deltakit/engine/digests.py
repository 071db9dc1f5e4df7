"""Digests over tensors read chunk by chunk, and the hashed file copy that make and apply share.

Every digest is BLAKE3 over a tensor's raw bytes (DESIGN.md): independent of files and sharding.
"""

from __future__ import annotations

from pathlib import Path

from ..formats.checkpoint import Checkpoint, RangeReader
from ..formats.safetensors import TensorInfo
from ..hashing import TensorHasher, file_sha256, fingerprint
from ..manifest import (
    FileRecord,
    TargetTensor,
    TensorRecord,
)
from ..progress import ProgressBar, ProgressFactory, no_progress
from ..reading import CHUNK_BYTES


def default_name(ckpt: Checkpoint) -> str:
    return ckpt.source.stem if ckpt.source.is_file() else ckpt.source.resolve().name


def fingerprint_of(records: dict[str, TensorRecord] | dict[str, TargetTensor]) -> str:
    return fingerprint((n, r.dtype, r.shape, r.digest) for n, r in records.items())


def hash_tensor(reader: RangeReader, info: TensorInfo, bar: ProgressBar | None = None) -> str:
    """The BLAKE3 digest of one tensor read from disk, hashed on every core (nothing else runs)."""
    hasher = TensorHasher(parallel=True)
    buffer = bytearray(min(CHUNK_BYTES, info.nbytes))
    for offset in range(info.start, info.end, CHUNK_BYTES):
        view = memoryview(buffer)[: min(CHUNK_BYTES, info.end - offset)]
        reader.read_into(info.path, offset, view)
        hasher.update(view)
        if bar is not None:
            bar.update(len(view))
    return hasher.hexdigest()


def checkpoint_digests(ckpt: Checkpoint, progress: ProgressFactory = no_progress) -> dict[str, str]:
    """The BLAKE3 digest of every tensor of a checkpoint, read chunk by chunk."""
    bar = progress(ckpt.nbytes, "hash")
    with RangeReader() as reader:
        digests = {name: hash_tensor(reader, info, bar) for name, info in ckpt.tensors.items()}
    bar.close()
    return digests


def carry_files(ckpt: Checkpoint, dest: Path) -> dict[str, FileRecord]:
    records: dict[str, FileRecord] = {}
    for rel in ckpt.extra_files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        records[rel] = copy_hashed(ckpt.root / rel, target)
    return records


def copy_hashed(src: Path, dst: Path) -> FileRecord:
    """Copy a file and hash it in the same read."""
    return FileRecord(*file_sha256(src, copy_to=dst))
