"""Make, apply and verify deltas: plan first, then stream chunk by chunk, hashing as bytes go by.

Memory is bounded by the chunks in flight (a few buffers of ``CHUNK_BYTES``), never by the model.
Outputs are built in a staging folder and renamed into place only once every digest has matched.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .codecs import CODECS, Bytes, Codec, cast_bits, count_differences
from .dtypes import is_float, itemsize
from .errors import BaseMismatchError, IntegrityError, UnsupportedInputError
from .formats.checkpoint import Checkpoint, RangeReader, open_checkpoint
from .formats.delta import FILES_DIR, DeltaPackage, open_delta, payload_file_name
from .formats.safetensors import SafetensorsWriter, TensorInfo, TensorSpec
from .hashing import TensorHasher, file_sha256, fingerprint
from .manifest import (
    MANIFEST_NAME,
    PAYLOAD_TAG,
    FileRecord,
    Manifest,
    ModelRecord,
    TargetRecord,
    TargetTensor,
    TensorRecord,
    load_manifest,
)
from .progress import ProgressBar, ProgressFactory, no_progress
from .staging import StagedFolder, check_output_free
from .streaming import (
    CHUNK_BYTES,
    DEFAULT_SHARD_SIZE,
    Chunk,
    OutputShard,
    OutputWriter,
    Prefetcher,
    as_bytes,
    element_ranges,
    open_output_shards,
    paired_chunks,
    plan_output,
    plan_shards,
    read_range,
    write_index,
)
from .units import human_bytes

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ApplyPlan",
    "ApplyReport",
    "ApplyStep",
    "MakeReport",
    "Mismatch",
    "VerifyReport",
    "apply_delta",
    "checkpoint_digests",
    "make_delta",
    "plan_apply",
    "verify_delta",
    "verify_model",
]

log = logging.getLogger(__name__)

_SAMPLE_CAP_BYTES = 1 << 30
_PAYLOAD_METADATA = {"format": "pt", "deltakit": PAYLOAD_TAG}


# --------------------------------------------------------------------------------------------------
# Chunk plumbing shared by make, apply and verify


# --------------------------------------------------------------------------------------------------
# make


@dataclass(frozen=True)
class MakeReport:
    """What ``make`` wrote: tensors per encoding, sizes, and what the publisher should know.

    Attributes:
        encodings: number of target tensors per encoding.
        payload_bytes: bytes of the payload files.
        target_bytes: bytes of the target's tensors.
        raw_tensors: stored as they are (copies of fine-tuned weights), with the reason.
        dropped: base tensors the target does not have.
        cast: target tensors whose base tensor was cast to the target's dtype first.
        inexact_elements: for ``add``, elements whose rebuild differs from the fine-tune.
        ignored_weight_files: weight files of the target in other formats, not carried.
    """

    out: Path
    manifest: Manifest
    encodings: dict[str, int]
    payload_bytes: int
    target_bytes: int
    raw_tensors: dict[str, str]
    dropped: tuple[str, ...]
    cast: tuple[str, ...]
    inexact_elements: int
    inexact_tensors: tuple[str, ...]
    files: int
    ignored_weight_files: tuple[str, ...]


@dataclass(frozen=True)
class _MakeStep:
    name: str
    target: TensorInfo
    base: TensorInfo | None
    encoding: str  # planned: xor, add, rows or raw; xor/add may turn into copy
    codec: Codec | None
    raw_reason: str = ""

    @property
    def spec(self) -> TensorSpec:
        return self.target.spec


def _classify(name: str, target: TensorInfo, base: TensorInfo | None, codec: Codec) -> _MakeStep:
    if base is None:
        return _MakeStep(name, target, None, "raw", None, "not in the base")
    same_dtype = base.dtype == target.dtype
    if not same_dtype and not (is_float(base.dtype) and is_float(target.dtype)):
        return _MakeStep(name, target, None, "raw", None, f"base is {base.dtype}, target {target.dtype}")
    use = codec if codec.accepts(target.dtype) else CODECS["xor"]
    if base.shape == target.shape:
        return _MakeStep(name, target, base, use.name, use)
    grows = (
        len(base.shape) >= 1
        and len(base.shape) == len(target.shape)
        and base.shape[1:] == target.shape[1:]
        and 0 < base.shape[0] < target.shape[0]
    )
    if grows:
        return _MakeStep(name, target, base, "rows", use)
    return _MakeStep(name, target, None, "raw", None, f"base shape {list(base.shape)}, target {list(target.shape)}")


class _PayloadShards:
    """Payload shards written in one pass; tensors found identical to the base are left out."""

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], shard_size: int) -> None:
        self.folder = folder
        groups = plan_shards(specs, shard_size)
        self._writers = [
            SafetensorsWriter(folder / f"payload-{i}.tmp", group, _PAYLOAD_METADATA) for i, group in enumerate(groups)
        ]
        self._shard_of = {spec.name: i for i, group in enumerate(groups) for spec in group}
        self._current: SafetensorsWriter | None = None

    def begin(self, name: str) -> None:
        self._current = self._writers[self._shard_of[name]]
        self._current.begin(name)

    def write(self, data: memoryview) -> None:
        assert self._current is not None
        self._current.write(data)

    def end(self) -> None:
        assert self._current is not None
        self._current.end()
        self._current = None

    def finish(self) -> dict[str, FileRecord]:
        """Close every shard, drop empty ones, give the rest their final names; hash them."""
        kept = []
        for writer in self._writers:
            writer.finish()
            if writer.tensors:
                kept.append(writer.path)
            else:
                writer.path.unlink()
        records: dict[str, FileRecord] = {}
        for i, path in enumerate(kept, start=1):
            final = self.folder / payload_file_name(i, len(kept))
            path.rename(final)
            records[final.name] = FileRecord(*file_sha256(final))
        return records

    def abort(self) -> None:
        for writer in self._writers:
            writer.abort()


@dataclass
class _MakeState:
    """Per-tensor running state while make streams one tensor."""

    step: _MakeStep
    target_hash: TensorHasher = field(default_factory=TensorHasher)
    base_hash: TensorHasher = field(default_factory=TensorHasher)
    rebuild_hash: TensorHasher | None = None
    started: bool = False  # payload for this tensor has begun
    inexact: int = 0


def _make_chunks(steps: Sequence[_MakeStep]) -> Iterator[Chunk]:
    for i, step in enumerate(steps):
        yield from paired_chunks(i, step.target, step.base)


def make_delta(
    base: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    codec: str = "xor",
    name: str | None = None,
    base_name: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: ProgressFactory = no_progress,
) -> MakeReport:
    """Write a format-1 delta package that rebuilds ``target`` from ``base``.

    Args:
        base: the base checkpoint (file or folder).
        target: the fine-tuned checkpoint.
        out: the package folder to create; it must not exist or be empty.
        codec: ``xor`` (lossless, default) or ``add`` (task vector, rebuilt in fp32).
        name: the target's name in the manifest (default: the target folder's name).
        base_name: the base's name in the manifest (default: the base folder's name).
        shard_size: the most payload bytes per payload file.
        progress: a progress bar factory; bytes of the target are reported.

    Returns:
        A :class:`MakeReport`; the package is complete on disk when it returns.

    Example:
        >>> report = make_delta("llama-7b", "panda-7b", "panda-7b-delta")  # doctest: +SKIP
        >>> report.encodings
        {'xor': 289, 'rows': 2, 'copy': 1}
    """
    if codec not in CODECS:
        raise UnsupportedInputError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    out = Path(out)
    check_output_free(out)
    base_ckpt = open_checkpoint(base)
    target_ckpt = open_checkpoint(target)
    chosen = CODECS[codec]
    steps = [_classify(n, t, base_ckpt.tensors.get(n), chosen) for n, t in target_ckpt.tensors.items()]
    for step in steps:
        if step.encoding == "raw":
            log.info("tensor %r is stored raw (%s)", step.name, step.raw_reason)

    with StagedFolder(out) as staged:
        shards = _PayloadShards(staged.path, [s.spec for s in steps], shard_size)
        try:
            target_records, base_digests, inexact = _stream_make(steps, base_ckpt, shards, progress)
        except BaseException:
            shards.abort()
            raise
        payload = shards.finish()
        files = _carry_files(target_ckpt, staged.path / FILES_DIR)
        base_records = {
            n: TensorRecord(info.dtype, info.shape, base_digests[n]) for n, info in base_ckpt.tensors.items()
        }
        manifest = Manifest(
            created_by=f"deltakit {__version__}",
            base=ModelRecord(
                name=base_name or _default_name(base_ckpt),
                fingerprint=_fingerprint_of(base_records),
                tensors=base_records,
            ),
            target=TargetRecord(
                name=name or _default_name(target_ckpt),
                fingerprint=_fingerprint_of(target_records),
                tensors=target_records,
                files=files,
            ),
            payload=payload,
            dropped=tuple(n for n in base_ckpt.tensors if n not in target_ckpt.tensors),
        )
        (staged.path / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        staged.commit()

    encodings = Counter(t.encoding for t in target_records.values())
    return MakeReport(
        out=out,
        manifest=manifest,
        encodings=dict(sorted(encodings.items())),
        payload_bytes=sum(f.size for f in payload.values()),
        target_bytes=target_ckpt.nbytes,
        raw_tensors={s.name: s.raw_reason for s in steps if s.encoding == "raw"},
        dropped=manifest.dropped,
        cast=tuple(n for n, t in target_records.items() if t.cast_from),
        inexact_elements=sum(inexact.values()),
        inexact_tensors=tuple(n for n, k in inexact.items() if k),
        files=len(files),
        ignored_weight_files=target_ckpt.ignored_weight_files,
    )


def _default_name(ckpt: Checkpoint) -> str:
    return ckpt.source.stem if ckpt.source.is_file() else ckpt.source.resolve().name


def _fingerprint_of(records: dict[str, TensorRecord] | dict[str, TargetTensor]) -> str:
    return fingerprint((n, r.dtype, r.shape, r.digest) for n, r in records.items())


def _encode_chunk(step: _MakeStep, segment: int, views: list[memoryview]) -> tuple[Bytes, Bytes, Bytes]:
    """Returns (target bits, base bits cast to the target dtype, payload bits) for one chunk."""
    target_bits = as_bytes(views[0])
    if segment == 1 or step.base is None:
        return target_bits, target_bits, target_bits
    base_bits = as_bytes(views[1])
    if step.base.dtype != step.target.dtype:
        base_bits = cast_bits(base_bits, step.base.dtype, step.target.dtype)
    assert step.codec is not None
    return target_bits, base_bits, step.codec.encode(target_bits, base_bits, step.target.dtype)


def _stream_make(
    steps: Sequence[_MakeStep],
    base_ckpt: Checkpoint,
    shards: _PayloadShards,
    progress: ProgressFactory,
) -> tuple[dict[str, TargetTensor], dict[str, str], dict[str, int]]:
    records: dict[str, TargetTensor] = {}
    base_digests: dict[str, str] = {}
    inexact: dict[str, int] = {}
    total = sum(s.target.nbytes for s in steps)
    bar = progress(total, "make")
    state: _MakeState | None = None

    def finish(state: _MakeState) -> None:
        step = state.step
        source = state.target_hash.hexdigest()
        if step.base is not None:
            base_digests[step.name] = state.base_hash.hexdigest()
        encoding = step.encoding
        if encoding in ("xor", "add") and not state.started:
            encoding = "copy"
        elif not state.started:  # raw or rows: always written (zero-size tensors included)
            shards.begin(step.name)
        if encoding != "copy":
            shards.end()
        digest = source
        if state.rebuild_hash is not None and encoding != "copy":
            digest = state.rebuild_hash.hexdigest()
        t = step.target
        records[step.name] = TargetTensor(
            dtype=t.dtype,
            shape=t.shape,
            digest=digest,
            encoding=encoding,
            cast_from=step.base.dtype if step.base is not None and step.base.dtype != t.dtype else None,
            codec=step.codec.name if encoding == "rows" and step.codec else None,
            base_rows=step.base.shape[0] if encoding == "rows" and step.base else None,
            source_digest=source if digest != source else None,
            inexact=state.inexact if state.rebuild_hash is not None and encoding != "copy" else None,
        )
        if state.rebuild_hash is not None and encoding != "copy":
            inexact[step.name] = state.inexact

    def emit(state: _MakeState, segment: int, target_bits: Bytes, base_bits: Bytes, payload: Bytes) -> None:
        shards.write(payload.data.cast("B") if payload.size else memoryview(b""))
        if state.rebuild_hash is not None:
            if segment == 0:
                assert state.step.codec is not None
                rebuilt = state.step.codec.decode(base_bits, payload, state.step.target.dtype)
                state.inexact += count_differences(rebuilt, target_bits, state.step.target.dtype)
            else:
                rebuilt = target_bits
            state.rebuild_hash.update(rebuilt.data)

    def catch_up(state: _MakeState, upto: int, reader: RangeReader) -> None:
        """The tensor was identical to the base up to element ``upto``: encode that prefix now."""
        step = state.step
        assert step.base is not None
        t_item, b_item = itemsize(step.target.dtype), itemsize(step.base.dtype)
        for a, b in element_ranges(0, upto, max(t_item, b_item)):
            views = []
            for info, item in ((step.target, t_item), (step.base, b_item)):
                view = memoryview(bytearray((b - a) * item))
                reader.read_into(info.path, info.start + a * item, view)
                views.append(view)
            emit(state, 0, *_encode_chunk(step, 0, views))

    with RangeReader() as reader:
        for chunk, views in Prefetcher(reader).run(_make_chunks(steps)):
            step = steps[chunk.owner]
            if state is None or state.step is not step:
                if state is not None:
                    finish(state)
                state = _MakeState(step)
                if step.codec is not None and not step.codec.exact:
                    state.rebuild_hash = TensorHasher()
                if step.encoding in ("raw", "rows"):
                    shards.begin(step.name)
                    state.started = True
            state.target_hash.update(views[0])
            if len(views) > 1:
                state.base_hash.update(views[1])
            target_bits, base_bits, payload = _encode_chunk(step, chunk.segment, views)
            if not state.started:
                if np.array_equal(target_bits, base_bits):
                    bar.update(len(views[0]))
                    continue
                shards.begin(step.name)
                state.started = True
                catch_up(state, chunk.first, reader)
            emit(state, chunk.segment, target_bits, base_bits, payload)
            bar.update(len(views[0]))
        if state is not None:
            finish(state)
        for name, info in base_ckpt.tensors.items():
            if name not in base_digests:
                base_digests[name] = _hash_tensor(reader, info)
    bar.close()
    return records, base_digests, inexact


def _hash_tensor(reader: RangeReader, info: TensorInfo, bar: ProgressBar | None = None) -> str:
    hasher = TensorHasher()
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
        digests = {name: _hash_tensor(reader, info, bar) for name, info in ckpt.tensors.items()}
    bar.close()
    return digests


def _carry_files(ckpt: Checkpoint, dest: Path) -> dict[str, FileRecord]:
    records: dict[str, FileRecord] = {}
    for rel in ckpt.extra_files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        records[rel] = _copy_hashed(ckpt.root / rel, target)
    return records


def _copy_hashed(src: Path, dst: Path) -> FileRecord:
    """Copy a file and hash it in the same read."""
    return FileRecord(*file_sha256(src, copy_to=dst))


# --------------------------------------------------------------------------------------------------
# apply


@dataclass(frozen=True)
class ApplyStep:
    """One output tensor: where its inputs lie and where its bytes go."""

    name: str
    target: TargetTensor
    base: TensorInfo | None
    payload: TensorInfo | None
    shard: int
    start: int
    end: int


@dataclass(frozen=True)
class ApplyPlan:
    """Everything apply will read and write, decided before the first byte moves.

    Attributes:
        sample: base tensors whose digests are checked first, before streaming starts.
    """

    base: Checkpoint
    delta: DeltaPackage
    steps: tuple[ApplyStep, ...]
    shards: tuple[OutputShard, ...]
    sample: tuple[str, ...]

    @property
    def manifest(self) -> Manifest:
        return self.delta.manifest

    @property
    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(s.name, s.target.dtype, s.target.shape) for s in self.steps]

    @property
    def read_bytes(self) -> int:
        return sum((s.base.nbytes if s.base else 0) + (s.payload.nbytes if s.payload else 0) for s in self.steps)

    @property
    def write_bytes(self) -> int:
        return sum(shard.layout.size for shard in self.shards)

    def describe(self) -> str:
        """A human-readable account of the plan, for ``--dry-run``."""
        m = self.manifest
        counts = Counter(s.target.encoding for s in self.steps)
        lines = [
            f"delta    {self.delta.root}  ({m.target.name} from {m.base.name})",
            f"base     {self.base.root}  fingerprint {m.base.fingerprint[:16]}... (expected)",
            f"checks   names, dtypes and shapes of {len(self.steps)} tensors: ok; "
            f"digests first: {', '.join(self.sample) or 'none'}",
            f"tensors  {len(self.steps)}: " + ", ".join(f"{n} {e}" for e, n in sorted(counts.items())),
            f"reads    {human_bytes(self.read_bytes)} (base and payload)",
            f"writes   {human_bytes(self.write_bytes)} in {len(self.shards)} file(s)"
            + (" + model.safetensors.index.json" if len(self.shards) > 1 else ""),
            f"files    {len(m.target.files)} carried: " + ", ".join(sorted(m.target.files)),
        ]
        for shard in self.shards:
            names = [s.name for s in self.steps if self.shards[s.shard] is shard]
            lines.append(f"  {shard.name}: {len(names)} tensors, {human_bytes(shard.layout.size)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ApplyReport:
    """What apply built: every tensor and file of it matched the manifest's digests."""

    out: Path
    target_name: str
    tensors: int
    encodings: dict[str, int]
    bytes_written: int
    files: tuple[str, ...]
    shards: tuple[str, ...]
    fingerprint: str


_SAMPLE_PATTERN = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings)\.|(^|\.)(layers|h|blocks)\.0\.")


def _choose_sample(steps: Sequence[ApplyStep]) -> tuple[str, ...]:
    """The embedding and first layer: where a wrong or differently converted base shows first."""
    with_base = [s for s in steps if s.base is not None]
    chosen = [s for s in with_base if _SAMPLE_PATTERN.search(s.name)] or with_base[:3]
    sample, budget = [], _SAMPLE_CAP_BYTES
    for step in chosen:
        assert step.base is not None
        if step.base.nbytes <= budget:
            sample.append(step.name)
            budget -= step.base.nbytes
    return tuple(sample)


def plan_apply(
    base: str | Path, delta: str | Path | DeltaPackage, *, shard_size: int = DEFAULT_SHARD_SIZE
) -> ApplyPlan:
    """Read headers and the manifest, check the base's names, dtypes and shapes, lay out the output.

    Raises:
        BaseMismatchError: the base lacks a tensor the delta needs, or has it in another dtype or shape.
    """
    package = delta if isinstance(delta, DeltaPackage) else open_delta(delta)
    m = package.manifest
    ckpt = open_checkpoint(base)
    for name, target in m.target.tensors.items():
        if not target.needs_base:
            continue
        want = m.base.tensors[name]
        have = ckpt.tensors.get(name)
        if have is None:
            raise BaseMismatchError(
                f"base {ckpt.root} lacks tensor {name!r}, which the delta needs: it is not "
                f"{m.base.name!r} (fingerprint {m.base.fingerprint[:16]}...)",
                path=ckpt.root,
                tensor=name,
            )
        if (have.dtype, have.shape) != (want.dtype, want.shape):
            raise BaseMismatchError(
                f"base tensor {name!r} is {have.dtype} {list(have.shape)}, but the delta was made from "
                f"{want.dtype} {list(want.shape)} ({m.base.name!r}): another model, or another conversion",
                path=have.path,
                tensor=name,
                expected=f"{want.dtype} {list(want.shape)}",
                actual=f"{have.dtype} {list(have.shape)}",
            )
    specs = [TensorSpec(n, t.dtype, t.shape) for n, t in m.target.tensors.items()]
    shards, shard_of = plan_output(specs, shard_size)
    steps = []
    for spec in specs:  # in output order: plan_output keeps the order it was given
        target = m.target.tensors[spec.name]
        index = shard_of[spec.name]
        start, end = shards[index].layout.offsets[spec.name]
        steps.append(
            ApplyStep(
                spec.name,
                target,
                ckpt.tensors[spec.name] if target.needs_base else None,
                package.payload.get(spec.name),
                index,
                start,
                end,
            )
        )
    weight_names = {s.name for s in shards} | {"model.safetensors.index.json"}
    clash = sorted(weight_names & set(m.target.files))
    if clash:
        raise UnsupportedInputError(
            f"{package.root}: carried file {clash[0]!r} would overwrite a rebuilt weight file", path=package.root
        )
    return ApplyPlan(ckpt, package, tuple(steps), tuple(shards), _choose_sample(steps))


def _check_sample(plan: ApplyPlan, reader: RangeReader) -> None:
    m = plan.manifest
    for name in plan.sample:
        info = plan.base.tensors[name]
        want = m.base.tensors[name].digest
        got = _hash_tensor(reader, info)
        if got != want:
            raise BaseMismatchError(
                f"base tensor {name!r} differs from the one the delta was made from: it is not "
                f"{m.base.name!r} (expected blake3 {want[:16]}..., got {got[:16]}...); another model "
                "or another conversion of it",
                path=info.path,
                tensor=name,
                expected=want,
                actual=got,
            )
        log.debug("base tensor %s matches", name)


def _apply_chunks(steps: Sequence[ApplyStep]) -> Iterator[Chunk]:
    for i, step in enumerate(steps):
        t = step.target
        t_item = itemsize(t.dtype)
        numel = math.prod(t.shape)
        if step.base is None:  # raw
            assert step.payload is not None
            for a, b in element_ranges(0, numel, t_item):
                yield Chunk(i, 0, a, b, (read_range(step.payload, t_item, a, b),))
            continue
        b_item = itemsize(step.base.dtype)
        shared = math.prod(step.base.shape)
        for a, b in element_ranges(0, shared, max(t_item, b_item)):
            reads = [read_range(step.base, b_item, a, b)]
            if step.payload is not None:
                reads.append(read_range(step.payload, t_item, a, b))
            yield Chunk(i, 0, a, b, tuple(reads))
        if step.payload is not None:
            for a, b in element_ranges(shared, numel, t_item, at_least_one=False):
                yield Chunk(i, 1, a, b, (read_range(step.payload, t_item, a, b),))


def _decode_chunk(step: ApplyStep, segment: int, views: list[memoryview]) -> Bytes:
    """The output bytes of one chunk; may be a view of the read buffers (raw and copy chunks)."""
    t = step.target
    if step.base is None or segment == 1:
        return as_bytes(views[-1])
    base_bits = as_bytes(views[0])
    if t.cast_from is not None:
        base_bits = cast_bits(base_bits, t.cast_from, t.dtype)
    if step.payload is None:  # copy
        return base_bits
    return CODECS[t.codec or t.encoding].decode(base_bits, as_bytes(views[1]), t.dtype)


def apply_delta(
    base: str | Path,
    delta: str | Path,
    out: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: ProgressFactory = no_progress,
) -> ApplyReport:
    """Rebuild the delta's target from ``base`` into ``out``, checking every digest on the way.

    The checks run cheapest first: names, dtypes and shapes, then the digests of the embedding and
    first layer, then every tensor as it streams. On any failure nothing is left at ``out``.

    Args:
        base: the base checkpoint (file or folder).
        delta: the delta package folder.
        out: the model folder to create; it must not exist or be empty.
        shard_size: the most bytes per output safetensors file.
        progress: a progress bar factory; output bytes are reported.

    Raises:
        OutputExistsError: ``out`` exists and is not empty (checked before anything else).
        BaseMismatchError: the base is not the one the delta was made from.
        IntegrityError: the payload or a carried file is corrupt.

    Example:
        >>> apply_delta("llama-7b", "panda-7b-delta", "panda-7b")  # doctest: +SKIP
    """
    out = Path(out)
    check_output_free(out)
    plan = plan_apply(base, delta, shard_size=shard_size)
    m = plan.manifest
    with RangeReader() as reader:
        _check_sample(plan, reader)  # before anything is created on disk
    verified = set(plan.sample)
    with RangeReader() as reader, StagedFolder(out) as staged:
        fds = open_output_shards(staged.path, plan.shards)
        try:
            bar = progress(sum(spec.nbytes for spec in plan.specs), "apply")
            _stream_apply(plan, reader, fds, verified, bar)
            bar.close()
        finally:
            for fd in fds:
                os.close(fd)
        write_index(staged.path, plan.shards, {s.name: s.shard for s in plan.steps}, plan.specs)
        for rel, record in m.target.files.items():
            dest = staged.path / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            copied = _copy_hashed(plan.delta.root / FILES_DIR / rel, dest)
            if copied != record:
                raise IntegrityError(
                    f"{plan.delta.root / FILES_DIR / rel}: sha256 {copied.sha256[:16]}... differs from the "
                    f"manifest's {record.sha256[:16]}...: the delta's file is corrupt",
                    path=plan.delta.root / FILES_DIR / rel,
                    expected=record.sha256,
                    actual=copied.sha256,
                )
        staged.commit()
    return ApplyReport(
        out=out,
        target_name=m.target.name,
        tensors=len(plan.steps),
        encodings=dict(sorted(Counter(s.target.encoding for s in plan.steps).items())),
        bytes_written=plan.write_bytes,
        files=tuple(m.target.files),
        shards=tuple(s.name for s in plan.shards),
        fingerprint=m.target.fingerprint,
    )


def _stream_apply(
    plan: ApplyPlan,
    reader: RangeReader,
    fds: Sequence[int],
    verified: set[str],
    bar: ProgressBar,
) -> None:
    m = plan.manifest
    steps = plan.steps
    current = -1
    base_hash = out_hash = TensorHasher()
    writer = OutputWriter(fds)

    def finish(index: int) -> None:
        step = steps[index]
        if step.base is not None and step.name not in verified:
            want, got = m.base.tensors[step.name].digest, base_hash.hexdigest()
            if got != want:
                raise BaseMismatchError(
                    f"base tensor {step.name!r} differs from the one the delta was made from "
                    f"({m.base.name!r}): expected blake3 {want[:16]}..., got {got[:16]}...",
                    path=step.base.path,
                    tensor=step.name,
                    expected=want,
                    actual=got,
                )
        writer.wait()  # the tensor's last chunk is hashed
        got = out_hash.hexdigest()
        if got != step.target.digest:
            raise IntegrityError(
                f"rebuilt tensor {step.name!r} does not match the target digest (expected blake3 "
                f"{step.target.digest[:16]}..., got {got[:16]}...): the delta's payload is corrupt",
                path=step.payload.path if step.payload else None,
                tensor=step.name,
                expected=step.target.digest,
                actual=got,
            )

    try:
        for chunk, views in Prefetcher(reader).run(_apply_chunks(steps)):
            if chunk.owner != current:
                if current >= 0:
                    finish(current)
                current = chunk.owner
                base_hash, out_hash = TensorHasher(), TensorHasher()
            step = steps[chunk.owner]
            rebuilt = _decode_chunk(step, chunk.segment, views)
            writer.submit(step.shard, rebuilt, out_hash)
            if step.base is not None and chunk.segment == 0 and step.name not in verified:
                base_hash.update(views[0])
            bar.update(rebuilt.size)
        if current >= 0:
            finish(current)
    finally:
        writer.close()


# --------------------------------------------------------------------------------------------------
# verify


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
        missing: recorded in the manifest, absent on disk.
        extra: on disk, not in the manifest (reported, not a failure).
        mismatched: present, with other content, dtype or shape.
    """

    subject: str
    checked: int
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    mismatched: tuple[Mismatch, ...] = ()

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
            got = _hash_tensor(reader, info, bar)
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
    extra: list[str] = []
    if not missing and not mismatched:
        open_delta(root)  # payload headers agree with the manifest, or a FormatError says where not
    subject = f"delta {root}"
    if base is not None:
        n, miss, extra, bad = _check_tensors(open_checkpoint(base), m.base.tensors, progress, "verify base")
        checked, missing, mismatched = checked + n, missing + miss, mismatched + bad
        subject += f" with base {base}"
    return VerifyReport(subject, checked, tuple(missing), tuple(extra), tuple(mismatched))


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
    )
