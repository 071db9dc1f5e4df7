"""Delta packages on disk (formats 1 and 2): the manifest, the payload shards, the target's other files.

Opening a package checks everything that costs no more than a header read: payload files present
at their recorded sizes, headers valid, and each payload tensor of the dtype and shape the manifest
says. Hashing every byte is :func:`deltakit.engine.verify_delta`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, InputNotFoundError, IntegrityError
from ..files import require_regular
from ..manifest import PAYLOAD_TAGS, Manifest, TargetTensor, load_manifest
from .safetensors import TensorInfo, read_header

__all__ = ["FILES_DIR", "DeltaPackage", "open_delta", "payload_file_name"]

FILES_DIR = "files"


def payload_file_name(index: int, count: int) -> str:
    """``delta-00001-of-00003.safetensors``: the name of payload shard ``index`` (1-based)."""
    return f"delta-{index:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class DeltaPackage:
    """A delta package whose manifest and payload headers agree."""

    root: Path
    manifest: Manifest
    payload: dict[str, TensorInfo]

    @property
    def format(self) -> int:
        return self.manifest.format

    @property
    def payload_bytes(self) -> int:
        return sum(f.size for f in self.manifest.payload.values())


def _payload_shape(version: int, target: TargetTensor) -> tuple[str, tuple[int, ...]]:
    """A format 1 payload tensor has the target's dtype and shape; a format 2 one is the coded bytes."""
    if version == 1:
        return target.dtype, target.shape
    return "U8", (target.coded_bytes,)


def open_delta(path: str | Path) -> DeltaPackage:
    """Read a delta package's manifest and payload headers, and check that they agree.

    Raises:
        InputNotFoundError: the folder, or a payload file or carried file it lists, is missing.
        UnsupportedInputError: one of them is a FIFO, device or folder, not a regular file.
        ManifestError: ``deltakit.json`` is missing or malformed.
        IntegrityError: a file's size differs from the manifest's (truncated, or another file).
        FormatError: a payload header is invalid or disagrees with the manifest.
    """
    root = Path(path)
    if root.is_file():
        raise FormatError(f"{root} is a file; a delta package is a folder holding deltakit.json", path=root)
    manifest = load_manifest(root)
    payload: dict[str, TensorInfo] = {}
    for name, record in manifest.payload.items():
        file = root / name
        if not file.exists():
            raise InputNotFoundError(f"{root}: payload file {name} is missing", path=file)
        size = require_regular(file).st_size  # a FIFO there is refused by name, never waited on
        if size != record.size:
            raise IntegrityError(
                f"{file}: {size} bytes, but the manifest records {record.size} (truncated or replaced)",
                path=file,
                expected=record.size,
                actual=size,
            )
        header = read_header(file)
        tag = PAYLOAD_TAGS[manifest.format]
        if header.metadata.get("deltakit") != tag:
            raise FormatError(
                f"{file}: not a deltakit format {manifest.format} payload (metadata 'deltakit' is not {tag!r})",
                path=file,
            )
        for tensor_name, info in header.tensors.items():
            if tensor_name in payload:
                raise FormatError(
                    f"{file}: tensor {tensor_name!r} is also in {payload[tensor_name].path.name}",
                    path=file,
                    tensor=tensor_name,
                )
            payload[tensor_name] = info
    for name, target in manifest.target.tensors.items():
        found = payload.get(name)
        if not target.has_payload:
            if found is not None:
                raise FormatError(
                    f"{found.path}: holds tensor {name!r}, which the manifest marks 'copy'",
                    path=found.path,
                    tensor=name,
                )
            continue
        if found is None:
            raise FormatError(f"{root}: the payload lacks tensor {name!r}", path=root, tensor=name)
        want = _payload_shape(manifest.format, target)
        if (found.dtype, found.shape) != want:
            raise FormatError(
                f"{found.path}: tensor {name!r} is {found.dtype} {list(found.shape)}, "
                f"the manifest says {want[0]} {list(want[1])}",
                path=found.path,
                tensor=name,
            )
    stray = [n for n in payload if n not in manifest.target.tensors]
    if stray:
        raise FormatError(
            f"{payload[stray[0]].path}: tensor {stray[0]!r} is not in the manifest",
            path=payload[stray[0]].path,
            tensor=stray[0],
        )
    for rel, record in manifest.target.files.items():
        file = root / FILES_DIR / rel
        if not file.exists():
            raise InputNotFoundError(f"{root}: carried file {FILES_DIR}/{rel} is missing", path=file)
        size = require_regular(file).st_size
        if size != record.size:
            raise IntegrityError(
                f"{file}: {size} bytes, but the manifest records {record.size}",
                path=file,
                expected=record.size,
                actual=size,
            )
    ordered = {n: payload[n] for n in manifest.target.tensors if n in payload}
    return DeltaPackage(root, manifest, ordered)
