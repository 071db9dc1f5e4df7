"""Say what a path is and holds: a deltakit delta, a LoRA adapter, an HF or Meta checkpoint, or a
legacy delta; its tensors, dtypes and sizes; and what ``deltakit apply`` would do with it.

Only headers, manifests and a few small tensors are read, so inspecting a 13B model takes
milliseconds; a checkpoint's fingerprint, which needs every byte hashed, is computed only on request.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .dtypes import is_float, itemsize
from .engine import checkpoint_digests
from .formats.checkpoint import Checkpoint, RangeReader, open_checkpoint
from .formats.delta import open_delta
from .formats.peft import is_adapter, open_adapter
from .formats.safetensors import TensorInfo
from .formats.torch_zip import read_torch_zip
from .hashing import fingerprint
from .legacy import detect_legacy_kind, is_xor_release, mean_abs
from .manifest import MANIFEST_NAME
from .progress import ProgressFactory, no_progress
from .signing import PublicKey, check_package

__all__ = ["KINDS", "Inspection", "TensorSummary", "inspect_path"]

KINDS = {
    "delta": "deltakit delta package",
    "lora-adapter": "PEFT LoRA adapter",
    "hf-checkpoint": "Hugging Face model checkpoint",
    "meta-checkpoint": "Meta (original LLaMA) checkpoint",
    "legacy-delta": "legacy delta (a model folder of differences)",
}


@dataclass(frozen=True)
class TensorSummary:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    encoding: str | None = None


@dataclass(frozen=True)
class Inspection:
    """What a path holds.

    Attributes:
        kind: one of :data:`KINDS`.
        apply: what ``deltakit apply`` would do with it, in a sentence.
        bytes_by_dtype: tensor bytes per dtype (the target's, for a delta).
        fingerprint: the checkpoint's fingerprint, when asked for.
        base/target: for a delta, the names and fingerprints from its manifest.
        legacy_kind: for a legacy delta, ``fastchat`` or ``alpaca``.
        signer: for a signed delta, its signer's key fingerprint (``SHA256:...``) once the signature
            verified; ``signer_fingerprint`` the same in hex (see deltakit.signing).
    """

    path: str
    kind: str
    apply: str
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
    target_bytes: int | None = None
    dropped: tuple[str, ...] = ()
    legacy_kind: str | None = None
    format: int | None = None
    signer: str | None = None
    signer_fingerprint: str | None = None

    @property
    def description(self) -> str:
        if self.format is not None:
            return f"{KINDS[self.kind]} (format {self.format}{', compressed' if self.format >= 2 else ''})"
        return KINDS[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"description": self.description}


def _by_dtype(tensors: tuple[TensorSummary, ...]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for t in tensors:
        counts[t.dtype] += t.nbytes
    return dict(sorted(counts.items()))


def _summaries(tensors: dict[str, TensorInfo]) -> tuple[TensorSummary, ...]:
    return tuple(TensorSummary(n, t.dtype, t.shape, t.nbytes) for n, t in tensors.items())


def _inspect_delta(path: Path, trusted: Sequence[PublicKey]) -> Inspection:
    package = open_delta(path)
    signer = check_package(path, trusted)
    m = package.manifest
    tensors = tuple(
        TensorSummary(n, t.dtype, t.shape, package.payload[n].nbytes if n in package.payload else 0, t.encoding)
        for n, t in m.target.tensors.items()
    )
    return Inspection(
        path=str(path),
        kind="delta",
        apply=f"rebuilds {m.target.name!r} from a base with fingerprint {m.base.fingerprint[:16]}... "
        f"({m.base.name!r}), every tensor checked against its digest",
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
        target_bytes=sum(math.prod(t.shape) * itemsize(t.dtype) for t in m.target.tensors.values()),
        dropped=m.dropped,
        format=m.format,
        signer=str(signer) if signer is not None else None,
        signer_fingerprint=signer.fingerprint if signer is not None else None,
    )


def _inspect_adapter(path: Path) -> Inspection:
    adapter = open_adapter(path)
    infos = {p.a.name: p.a for p in adapter.pairs.values() if p.a is not None}
    infos |= {p.b.name: p.b for p in adapter.pairs.values()}
    infos |= adapter.replacements
    tensors = _summaries(infos)
    config = adapter.config
    scales = sorted({round(p.scale, 6) for p in adapter.pairs.values()})
    return Inspection(
        path=str(path),
        kind="lora-adapter",
        apply=f"merges W + scale * (B @ A) into {len(adapter.pairs)} base tensors (r={config.get('r')}, "
        f"scale {', '.join(map(str, scales)) or '-'}), replaces {len(adapter.replacements)} whole"
        + (f" ({', '.join(adapter.replacements)})" if adapter.replacements else ""),
        tensors=tensors,
        total_bytes=sum(t.nbytes for t in tensors),
        bytes_by_dtype=_by_dtype(tensors),
        files=adapter.extra_files,
        base_name=config.get("base_model_name_or_path"),
    )


def _checkpoint_kind(ckpt: Checkpoint) -> str:
    names = ckpt.tensors
    if "tok_embeddings.weight" in names or any(n.startswith("layers.0.attention.") for n in names):
        return "meta-checkpoint"
    norms = [t for n, t in names.items() if n.endswith("norm.weight") and is_float(t.dtype) and t.nbytes]
    if norms:
        with RangeReader() as reader:
            # a model's norm weights sit near 1; in a delta they are differences, near 0
            if mean_abs(reader, norms[0], 1 << 16) < 0.1:
                return "legacy-delta"
    return "hf-checkpoint"


def inspect_path(
    path: str | Path,
    *,
    with_fingerprint: bool = False,
    trusted: Sequence[PublicKey] = (),
    progress: ProgressFactory = no_progress,
) -> Inspection:
    """Describe a delta package, a LoRA adapter, or a checkpoint (HF, Meta, or a legacy delta).

    Args:
        path: what to inspect.
        with_fingerprint: for a checkpoint, hash every tensor to give its fingerprint.
        trusted: for a delta, the keys one of which must have signed it (see deltakit.signing.check_package).

    Raises:
        SignatureError: a delta's signature does not verify; UntrustedSignerError: with ``trusted``, it is
            unsigned or signed by another key.
    """
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return _inspect_delta(path, trusted)
    if is_adapter(path):
        return _inspect_adapter(path)
    if is_xor_release(path):
        files = tuple(sorted(p.name for p in path.iterdir() if p.is_file()))
        return Inspection(
            path=str(path),
            kind="legacy-delta",
            apply="as --delta, rebuilds each file as gunzip(file) XOR the base's file of the same name; "
            "verified only with --checksums from the release's model card",
            tensors=(),
            total_bytes=sum((path / f).stat().st_size for f in files),
            bytes_by_dtype={},
            files=files,
            legacy_kind="oasst-xor",
        )
    meta = sorted(path.glob("consolidated.*.pth")) if path.is_dir() else []
    if len(meta) > 1:
        tensors = _summaries(read_torch_zip(meta[0]))
        return Inspection(
            path=str(path),
            kind="meta-checkpoint",
            apply=f"split into {len(meta)} model-parallel shards: `deltakit convert` it to the HF layout first; "
            "tensors below are those of the first shard",
            tensors=tensors,
            total_bytes=sum(p.stat().st_size for p in meta),
            bytes_by_dtype=_by_dtype(tensors),
            files=tuple(sorted(p.name for p in path.iterdir() if p.is_file() and p not in meta)),
        )
    ckpt = open_checkpoint(path)
    tensors = _summaries(ckpt.tensors)
    digest = None
    if with_fingerprint:
        digests = checkpoint_digests(ckpt, progress)
        digest = fingerprint((n, t.dtype, t.shape, digests[n]) for n, t in ckpt.tensors.items())
    kind = _checkpoint_kind(ckpt)
    legacy_kind = detect_legacy_kind(ckpt) if kind == "legacy-delta" else None
    apply = {
        "hf-checkpoint": "serves as --base; as --delta it would be refused unless --legacy names its kind",
        "meta-checkpoint": "serves as --base for deltas made from the same Meta checkpoint; HF-named deltas need "
        "an HF conversion of it (`deltakit convert`)",
        "legacy-delta": f"as --delta, rebuilds a fine-tune the {legacy_kind} way (base + differences)",
    }[kind]
    return Inspection(
        path=str(path),
        kind=kind,
        apply=apply,
        tensors=tensors,
        total_bytes=ckpt.nbytes,
        bytes_by_dtype=_by_dtype(tensors),
        files=ckpt.extra_files,
        fingerprint=digest,
        legacy_kind=legacy_kind,
    )
