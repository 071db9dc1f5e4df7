"""make: compute a delta package from a base and a fine-tune, streaming chunk by chunk.

Tensors identical to the base become ``copy``; the rest are encoded by the chosen codec into payload shards.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..codecs import CODECS, Bytes, Codec, cast_bits, count_differences
from ..dtypes import is_float, itemsize
from ..errors import UnsupportedInputError
from ..formats.checkpoint import Checkpoint, RangeReader, open_checkpoint
from ..formats.delta import FILES_DIR, payload_file_name
from ..formats.safetensors import SafetensorsWriter, TensorInfo, TensorSpec
from ..hashing import TensorHasher, file_sha256
from ..manifest import (
    MANIFEST_NAME,
    PAYLOAD_TAG,
    FileRecord,
    Manifest,
    ModelRecord,
    TargetRecord,
    TargetTensor,
    TensorRecord,
)
from ..progress import ProgressFactory, no_progress
from ..staging import StagedFolder, check_output_free
from ..streaming import (
    DEFAULT_SHARD_SIZE,
    Chunk,
    Prefetcher,
    as_bytes,
    element_ranges,
    paired_chunks,
    plan_shards,
)
from .digests import carry_files, default_name, fingerprint_of, hash_tensor

log = logging.getLogger(__name__)

_PAYLOAD_METADATA = {"format": "pt", "deltakit": PAYLOAD_TAG}


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
        files = carry_files(target_ckpt, staged.path / FILES_DIR)
        base_records = {
            n: TensorRecord(info.dtype, info.shape, base_digests[n]) for n, info in base_ckpt.tensors.items()
        }
        manifest = Manifest(
            created_by=f"deltakit {__version__}",
            base=ModelRecord(
                name=base_name or default_name(base_ckpt),
                fingerprint=fingerprint_of(base_records),
                tensors=base_records,
            ),
            target=TargetRecord(
                name=name or default_name(target_ckpt),
                fingerprint=fingerprint_of(target_records),
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
                base_digests[name] = hash_tensor(reader, info)
    bar.close()
    return records, base_digests, inexact
