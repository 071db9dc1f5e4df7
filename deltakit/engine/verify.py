"""verify: check a delta package, a base, or a rebuilt model against a manifest's digests.

Verification returns a report rather than raising, so callers can show every mismatch at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..files import describe_mode
from ..formats.checkpoint import Checkpoint, RangeReader, open_checkpoint
from ..formats.delta import FILES_DIR, open_delta
from ..hashing import file_sha256
from ..manifest import (
    FileRecord,
    TargetTensor,
    TensorRecord,
    load_manifest,
)
from ..progress import ProgressFactory, no_progress
from .digests import hash_tensor


@dataclass(frozen=True)
class Mismatch:
    """A tensor or file whose content differs from what the manifest records."""

    name: str
    expected: str
    actual: str


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of a verification: never raised, always returned.

    Attributes:
        subject: what was checked (a delta package, a base, a rebuilt model).
        checked: how many tensors and files were compared.
        counts: ``checked`` by kind: ``payload files`` and ``carried files`` (by SHA-256), ``base tensors``
            and ``model tensors`` (by BLAKE3), ``payload tensors`` (the tensors the payload files hold,
            their headers checked against the manifest, their digests not: that is apply's work).
        missing: recorded in the manifest, absent on disk.
        extra: on disk, not in the manifest (reported, not a failure).
        mismatched: present, with other content, dtype or shape.
    """

    subject: str
    checked: int
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched


def _check_files(
    folder: Path,
    records: dict[str, FileRecord],
    prefix: str = "",
    progress: ProgressFactory = no_progress,
    description: str = "verify files",
) -> tuple[int, list[str], list[Mismatch]]:
    missing, mismatched = [], []
    bar = progress(sum(r.size for r in records.values()), description)
    for rel, record in records.items():
        path = folder / rel
        if not path.is_file():
            if path.exists():  # a FIFO or a folder under the file's name: named, never opened
                mismatched.append(Mismatch(prefix + rel, "a regular file", describe_mode(path.stat().st_mode)))
            else:
                missing.append(prefix + rel)
            continue
        digest, _ = file_sha256(path, on_bytes=bar.update)
        if digest != record.sha256:
            mismatched.append(Mismatch(prefix + rel, f"sha256 {record.sha256}", f"sha256 {digest}"))
    bar.close()
    return len(records), missing, mismatched


def _check_tensors(
    ckpt: Checkpoint,
    records: dict[str, TensorRecord] | dict[str, TargetTensor],
    progress: ProgressFactory,
    description: str,
) -> tuple[int, list[str], list[str], list[Mismatch]]:
    missing = [n for n in records if n not in ckpt.tensors]
    extra = [n for n in ckpt.tensors if n not in records]
    mismatched = []
    present = [n for n in records if n in ckpt.tensors]
    bar = progress(sum(ckpt.tensors[n].nbytes for n in present), description)
    with RangeReader() as reader:
        for name in present:
            want, info = records[name], ckpt.tensors[name]
            if (info.dtype, info.shape) != (want.dtype, want.shape):
                mismatched.append(
                    Mismatch(name, f"{want.dtype} {list(want.shape)}", f"{info.dtype} {list(info.shape)}")
                )
                bar.update(info.nbytes)
                continue
            got = hash_tensor(reader, info, bar)
            if got != want.digest:
                mismatched.append(Mismatch(name, f"blake3 {want.digest}", f"blake3 {got}"))
    bar.close()
    return len(records), missing, extra, mismatched


def verify_delta(
    delta: str | Path, *, base: str | Path | None = None, progress: ProgressFactory = no_progress
) -> VerifyReport:
    """Check a delta package's payload and carried files against its manifest; with ``base``,
    also that the base holds exactly the tensors the delta was made from.

    Raises only when the package cannot be read at all (no or malformed manifest).
    """
    root = Path(delta)
    m = load_manifest(root)
    checked, missing, mismatched = _check_files(root, m.payload, progress=progress, description="verify payload")
    n, miss, bad = _check_files(root / FILES_DIR, m.target.files, f"{FILES_DIR}/")
    checked, missing, mismatched = checked + n, missing + miss, mismatched + bad
    counts = {"payload files": len(m.payload), "carried files": n}
    extra: list[str] = []
    if not missing and not mismatched:
        open_delta(root)  # payload headers agree with the manifest, or a FormatError says where not
        counts["payload tensors"] = len(m.target.tensors)
    subject = f"delta {root}"
    if base is not None:
        n, miss, extra, bad = _check_tensors(open_checkpoint(base), m.base.tensors, progress, "verify base")
        checked, missing, mismatched = checked + n, missing + miss, mismatched + bad
        counts["base tensors"] = n
        subject += f" with base {base}"
    return VerifyReport(subject, checked, tuple(missing), tuple(extra), tuple(mismatched), counts)


def verify_model(model: str | Path, delta: str | Path, *, progress: ProgressFactory = no_progress) -> VerifyReport:
    """Check a rebuilt model's tensors and files against the target digests of a delta's manifest."""
    m = load_manifest(delta)
    ckpt = open_checkpoint(model)
    checked, missing, extra, mismatched = _check_tensors(ckpt, m.target.tensors, progress, "verify model")
    n, miss, bad = _check_files(ckpt.root, m.target.files)
    return VerifyReport(
        f"model {model} against {m.target.name!r}",
        checked + n,
        tuple(missing + miss),
        tuple(extra),
        tuple(mismatched + bad),
        {"model tensors": checked, "carried files": n},
    )
