"""Say what a path holds: a model checkpoint or a delta package, its tensors, dtypes, sizes, encodings.

Only headers and the manifest are read, so inspecting a 13B model takes milliseconds; a
checkpoint's fingerprint, which needs every byte hashed, is computed only on request.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .engine import checkpoint_digests
from .formats.checkpoint import open_checkpoint
from .formats.delta import open_delta
from .hashing import fingerprint
from .manifest import MANIFEST_NAME
from .progress import ProgressFactory, no_progress

__all__ = ["Inspection", "TensorSummary", "inspect_path"]


@dataclass(frozen=True)
class TensorSummary:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    encoding: str | None = None


@dataclass(frozen=True)
class Inspection:
    """What a checkpoint or delta package holds.

    Attributes:
        kind: ``checkpoint`` or ``delta``.
        bytes_by_dtype: tensor bytes per dtype (the target's, for a delta).
        fingerprint: the checkpoint's fingerprint, when asked for.
        base/target: for a delta, the names and fingerprints from its manifest.
    """

    path: str
    kind: str
    tensors: tuple[TensorSummary, ...]
    total_bytes: int
    bytes_by_dtype: dict[str, int]
    files: tuple[str, ...]
    fingerprint: str | None = None
    created_by: str | None = None
    base_name: str | None = None
    base_fingerprint: str | None = None
    target_name: str | None = None
    target_fingerprint: str | None = None
    encodings: dict[str, int] | None = None
    payload_bytes: int | None = None
    dropped: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _by_dtype(tensors: tuple[TensorSummary, ...]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for t in tensors:
        counts[t.dtype] += t.nbytes
    return dict(sorted(counts.items()))


def inspect_path(
    path: str | Path, *, with_fingerprint: bool = False, progress: ProgressFactory = no_progress
) -> Inspection:
    """Describe a checkpoint (file or folder) or a delta package.

    Args:
        path: what to inspect.
        with_fingerprint: for a checkpoint, hash every tensor to give its fingerprint.
    """
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        package = open_delta(path)
        m = package.manifest
        tensors = tuple(
            TensorSummary(n, t.dtype, t.shape, package.payload[n].nbytes if n in package.payload else 0, t.encoding)
            for n, t in m.target.tensors.items()
        )
        return Inspection(
            path=str(path),
            kind="delta",
            tensors=tensors,
            total_bytes=sum(t.nbytes for t in tensors),
            bytes_by_dtype=_by_dtype(tensors),
            files=tuple(m.target.files),
            created_by=m.created_by,
            base_name=m.base.name,
            base_fingerprint=m.base.fingerprint,
            target_name=m.target.name,
            target_fingerprint=m.target.fingerprint,
            encodings=dict(sorted(Counter(t.encoding for t in m.target.tensors.values()).items())),
            payload_bytes=package.payload_bytes,
            dropped=m.dropped,
        )
    ckpt = open_checkpoint(path)
    tensors = tuple(TensorSummary(n, t.dtype, t.shape, t.nbytes) for n, t in ckpt.tensors.items())
    digest = None
    if with_fingerprint:
        digests = checkpoint_digests(ckpt, progress)
        digest = fingerprint((n, t.dtype, t.shape, digests[n]) for n, t in ckpt.tensors.items())
    return Inspection(
        path=str(path),
        kind="checkpoint",
        tensors=tensors,
        total_bytes=ckpt.nbytes,
        bytes_by_dtype=_by_dtype(tensors),
        files=ckpt.extra_files,
        fingerprint=digest,
    )
