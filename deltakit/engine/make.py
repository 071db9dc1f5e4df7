"""make: compute a delta package from a base and a fine-tune, streaming chunk by chunk.

Tensors identical to the base become ``copy``; the rest are encoded by the chosen codec into payload shards.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__
from ..codecs import CODECS, Buffer, Bytes, Codec, cast_bits, count_differences, differs, fresh, kernels
from ..codecs.frames import Frame, encode_frame
from ..dtypes import is_float, itemsize
from ..errors import RawWeightsError, UnsupportedInputError
from ..formats.checkpoint import Checkpoint, RangeReader, open_checkpoint
from ..formats.delta import FILES_DIR, payload_file_name
from ..formats.safetensors import SafetensorsWriter, TensorInfo, TensorSpec
from ..hashing import TensorHasher, file_sha256
from ..layout import DEFAULT_SHARD_SIZE, plan_shards
from ..manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    PAYLOAD_TAGS,
    READABLE_FORMATS,
    FileRecord,
    Manifest,
    ModelRecord,
    TargetRecord,
    TargetTensor,
    TensorRecord,
)
from ..progress import ProgressFactory, no_progress
from ..reading import Arena, Chunk, Prefetcher, as_bytes, by_tensor, element_ranges, paired_chunks
from ..staging import StagedFolder, check_output_free
from ..units import human_bytes
from .digests import carry_files, default_name, fingerprint_of, hash_tensor

log = logging.getLogger(__name__)

MAKE_CODECS = ("xor", "add")
DEFAULT_LEVEL = 1  # measured: on fine-tune low bytes, zstd 1 codes smaller and faster than 3 (BENCHMARKS.md)
SMALLEST_LEVEL = 19
MIN_SAVING = 1 / 16  # a frame that codes less than this much smaller is stored: decoding it would cost more
_SAMPLE_BYTES = 256 << 10  # measured: as good a choice as 1 MiB on the real fine-tune, a quarter of the work
# A delta that would store more than this share of the target's bytes raw is no delta of that base.
MAX_RAW_SHARE = 0.5


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


def _refuse_raw_weights(steps: Sequence[_MakeStep], base: Checkpoint, target: Checkpoint) -> None:
    """Refuse a delta that would publish whole weights: a fine-tune adds vocabulary rows and seldom
    drops them (a Qwen2.5 one resized to its tokenizer does: ``allow_raw`` stores that embedding whole),
    so a target with fewer rows than its base is likely the base itself, named as the target; and a
    target mostly stored raw shares little with the base it names."""
    for step in steps:
        held = base.tensors.get(step.name)
        shape = step.target.shape
        if (
            held is not None
            and len(held.shape) == len(shape) >= 1
            and held.shape[1:] == shape[1:]
            and held.shape[0] > shape[0]
        ):
            raise RawWeightsError(
                f"{step.name} has {shape[0]} rows in the target {target.source} and {held.shape[0]} in the base "
                f"{base.source}: a fine-tune seldom has fewer rows than its base, so base and target look swapped "
                "(unless the fine-tune cut a vocabulary padded past its tokenizer's, as resizing Qwen2.5's "
                "embedding to the tokenizer's length does), and the delta would store the smaller one's rows raw",
                path=target.source,
                tensor=step.name,
                expected=f"at least {held.shape[0]} rows",
                actual=shape[0],
            )
    raw = [s for s in steps if s.encoding == "raw"]
    raw_bytes = sum(s.target.nbytes for s in raw)
    if target.nbytes and raw_bytes > MAX_RAW_SHARE * target.nbytes:
        raise RawWeightsError(
            f"{len(raw)} of the {len(steps)} tensors of {target.source} ({human_bytes(raw_bytes)} of "
            f"{human_bytes(target.nbytes)}) have no counterpart of the same shape and dtype in {base.source} "
            f"({raw[0].name}: {raw[0].raw_reason}): the delta would store them raw, as copies of whole weights, "
            "so this base is not the one the target was fine-tuned from",
            path=base.source,
            tensor=raw[0].name,
            expected=f"at most {MAX_RAW_SHARE:.0%} of the target raw",
            actual=f"{raw_bytes / target.nbytes:.0%}",
        )


class _PayloadShards:
    """Payload shards written in one pass; tensors found identical to the base are left out.

    In format 2 a tensor's payload is its coded frames, a ``U8`` tensor whose size is known only
    once written; the header, written last into reserved room, records it. A file's SHA-256 must
    start with that header, so each shard is read back once for it: on a thread of its own as soon
    as the stream has moved on to the next shard, so only the last one's hash is left at the end.
    """

    # Flushed behind the writing, so the final fsync waits for little (make in BENCHMARKS.md); kept in
    # the page cache, unlike apply's output (writing.OutputWriter): read back for the SHA-256.
    WRITEBACK_BYTES = 64 << 20

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], shard_size: int, version: int) -> None:
        self.folder = folder
        self.version = version
        metadata = {"format": "pt", "deltakit": PAYLOAD_TAGS[version]}
        groups = plan_shards(specs, shard_size)
        self._writers = [
            SafetensorsWriter(folder / f"payload-{i}.tmp", group, metadata, writeback=self.WRITEBACK_BYTES)
            for i, group in enumerate(groups)
        ]
        self._shard_of = {spec.name: i for i, group in enumerate(groups) for spec in group}
        self._current: SafetensorsWriter | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="deltakit-write")
        self._pending: Future[None] | None = None
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="deltakit-sha256")
        self._closed: dict[int, Future[tuple[str, int]] | None] = {}  # shard -> its hash (None: empty)

    def begin(self, name: str) -> None:
        self.wait()
        shard = self._shard_of[name]
        for earlier in range(shard):  # tensors come in shard order: the shards before are complete
            self._close(earlier)
        self._current = self._writers[shard]
        self._current.begin(name)

    def _close(self, shard: int) -> None:
        """Write a complete shard's header and start hashing it (or drop it, if it holds nothing)."""
        if shard in self._closed:
            return
        writer = self._writers[shard]
        writer.finish()
        if writer.tensors:
            self._closed[shard] = self._hasher.submit(file_sha256, writer.path)
        else:
            writer.path.unlink()
            self._closed[shard] = None

    def write(self, pieces: Sequence[Bytes | bytes]) -> None:
        """Write a chunk's pieces now."""
        self.wait()
        self._write(pieces)

    def write_behind(self, pieces: Sequence[Bytes | bytes]) -> None:
        """Write a chunk's pieces on the writer thread, while the caller hashes the next chunk.

        One chunk in flight at most, as in apply: pieces may be views of a read-ahead slot's memory,
        which stays valid until the chunk after next is asked for; the caller calls :meth:`wait`
        before that.
        """
        self.wait()
        self._pending = self._pool.submit(self._write, pieces)

    def wait(self) -> None:
        """Block until the chunk in flight is written (re-raising its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write(self, pieces: Sequence[Bytes | bytes]) -> None:
        assert self._current is not None
        for piece in pieces:
            if isinstance(piece, np.ndarray):
                if piece.size:
                    self._current.write(piece.data.cast("B"))
            else:
                self._current.write(piece)

    def end(self) -> None:
        self.wait()
        assert self._current is not None
        self._current.end(as_bytes=self.version >= 2)
        self._current = None

    def finish(self) -> dict[str, FileRecord]:
        """Close every shard, drop empty ones, give the rest their final names with their SHA-256."""
        self.wait()
        self._pool.shutdown()
        for shard in range(len(self._writers)):
            self._close(shard)
        kept = [
            (self._writers[shard].path, hashed.result()) for shard, hashed in sorted(self._closed.items()) if hashed
        ]
        self._hasher.shutdown()
        records: dict[str, FileRecord] = {}
        for i, (path, (sha256, size)) in enumerate(kept, start=1):
            final = self.folder / payload_file_name(i, len(kept))
            path.rename(final)
            records[final.name] = FileRecord(sha256, size)
        return records

    def abort(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._hasher.shutdown(cancel_futures=True)
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
    frames: list[Frame] = field(default_factory=list)


@dataclass(frozen=True)
class _Encoded:
    """One chunk, encoded on a reading thread: what the ordered loop hashes and writes."""

    identical: bool  # target and (cast) base bits are equal: no payload needed so far
    pieces: list[Bytes | bytes]  # the payload bytes to write, in order
    frame: Frame | None  # format 2: the frame record of ``pieces``
    rebuilt: Bytes | None  # for inexact codecs: what apply will rebuild from this chunk
    inexact: int  # elements of ``rebuilt`` that differ from the target


@dataclass(frozen=True)
class _Coding:
    """How make codes payload bytes: the package format, and for format 2 the zstd settings."""

    version: int
    level: int
    min_saving: float

    def encode(self, step: _MakeStep, segment: int, views: list[memoryview], buffer: Buffer = fresh) -> _Encoded:
        """Encode one chunk; the payload may lie in ``buffer``'s memory (valid until its next use)."""
        target_bits, base_bits = _chunk_bits(step, segment, views)
        codec = step.codec if segment == 0 and step.base is not None else None
        # an exact codec in format 2 is fused into the framing's pass; the others make their payload first
        fused = codec is not None and codec.exact and self.version >= 2
        payload = target_bits
        if codec is not None and not fused:
            payload = codec.encode(target_bits, base_bits, step.target.dtype, buffer)
        identical = codec is not None and not differs(target_bits, base_bits)  # stops at the first difference
        rebuilt, inexact = None, 0
        if step.codec is not None and not step.codec.exact:
            if codec is not None:
                rebuilt = codec.decode(base_bits, payload, step.target.dtype)  # fresh: the payload is kept
                inexact = count_differences(rebuilt, target_bits, step.target.dtype)
            else:
                rebuilt = target_bits
        if self.version == 1:
            return _Encoded(identical, [payload], None, rebuilt, inexact)
        frame, pieces = encode_frame(
            target_bits if fused else payload,
            itemsize(step.target.dtype),
            split=_split_of(step),
            level=self.level,
            min_saving=self.min_saving,
            buffer=buffer,
            base=base_bits if fused else None,
            transform=codec.name if fused and codec is not None else None,
        )
        return _Encoded(identical, pieces, frame, rebuilt, inexact)


def _split_of(step: _MakeStep) -> str:
    return "bytes" if itemsize(step.target.dtype) > 1 else "none"


def _read_pair(reader: RangeReader, step: _MakeStep, first: int, last: int) -> list[memoryview]:
    """The target's and the base's bytes of elements [first, last), read into fresh memory: the views
    of a chunk of the shared elements, as the prefetcher gives them."""
    assert step.base is not None
    views = []
    for info in (step.target, step.base):
        item = itemsize(info.dtype)
        view = memoryview(bytearray((last - first) * item))
        reader.read_into(info.path, info.start + first * item, view)
        views.append(view)
    return views


def _choose_transform(
    step: _MakeStep,
    reader: RangeReader,
    coding: _Coding,
    *,
    samples: int,
    chunk: list[memoryview] | None = None,
) -> _MakeStep:
    """For the lossless codec, ``xor`` or ``sub``: whichever codes smaller on samples of the tensor.

    Samples of up to 256 KiB, spread evenly over the elements the base shares, cost a few
    milliseconds a tensor; a fine-tune's tensor is alike all through, so they choose well. With
    ``chunk`` (the target and base bytes of a chunk of the shared elements) and one sample, the
    sample is the middle of that chunk, which is already in memory.
    """
    if step.base is None or step.codec is None or step.codec.name != "xor":
        return step
    t_item, b_item = itemsize(step.target.dtype), itemsize(step.base.dtype)
    shared = math.prod(step.base.shape)
    count = min(shared, max(8, _SAMPLE_BYTES // max(t_item, b_item)))
    if count == 0:
        return step
    samples = max(1, min(samples, shared // count))  # samples that would overlap add nothing
    sizes = dict.fromkeys(("xor", "sub"), 0)
    for k in range(samples):
        if samples == 1 and chunk is not None:
            have = len(chunk[0]) // t_item
            first, last = (have - min(count, have)) // 2, (have + min(count, have)) // 2
            views = [v[first * item : last * item] for v, item in zip(chunk, (t_item, b_item), strict=True)]
        else:
            first = (shared - count) * k // max(1, samples - 1) if samples > 1 else (shared - count) // 2
            views = _read_pair(reader, step, first, first + count)
        target_bits, base_bits = _chunk_bits(step, 0, views)
        for name in sizes:
            frame, _ = encode_frame(
                target_bits,
                t_item,
                split=_split_of(step),
                level=coding.level,
                min_saving=0.0,
                base=base_bits,
                transform=name,
            )
            sizes[name] += frame.coded_size(t_item)
    best = CODECS["sub"] if sizes["sub"] < sizes["xor"] else CODECS["xor"]
    encoding = step.encoding if step.encoding == "rows" else best.name
    return replace(step, encoding=encoding, codec=best)


class _Chooser:
    """Chooses each tensor's transform on the reading threads, as its first chunk is coded, so the
    choice costs no pass of its own; a thread coding a later chunk of the tensor waits for it."""

    def __init__(self, steps: list[_MakeStep], reader: RangeReader, coding: _Coding, samples: int) -> None:
        self.steps = steps  # updated in place: the ordered loop reads a step after its chunk is coded
        self._reader, self._coding, self._samples = reader, coding, samples
        self._chosen: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def step(self, chunk: Chunk, views: list[memoryview]) -> _MakeStep:
        i = chunk.owner
        if self._samples == 0:
            return self.steps[i]
        with self._lock:
            mine = i not in self._chosen
            event = self._chosen.setdefault(i, threading.Event())
        if mine:
            try:
                sample = views if chunk.segment == 0 and len(views) > 1 else None
                self.steps[i] = _choose_transform(
                    self.steps[i], self._reader, self._coding, samples=self._samples, chunk=sample
                )
            finally:
                event.set()
        else:
            event.wait()
        return self.steps[i]


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
    format: int = FORMAT_VERSION,
    level: int = DEFAULT_LEVEL,
    smallest: bool = False,
    allow_raw: bool = False,
    replace: bool = False,
    progress: ProgressFactory = no_progress,
) -> MakeReport:
    """Write a delta package that rebuilds ``target`` from ``base``.

    Format 2 (the default) codes the payload losslessly: per tensor, the transform against the
    base that codes smallest (``xor`` or ``sub`` for the lossless codec), the elements split into
    byte streams, each frame zstd-coded or stored as it is where coding does not pay.

    Args:
        base: the base checkpoint (file or folder).
        target: the fine-tuned checkpoint.
        out: the package folder to create; it must not exist or be empty.
        codec: ``xor`` (lossless, default; in format 2 each tensor gets ``xor`` or ``sub``, whichever
            codes smaller) or ``add`` (task vector, rebuilt in fp32).
        name: the target's name in the manifest (default: the target folder's name).
        base_name: the base's name in the manifest (default: the base folder's name).
        shard_size: the most payload bytes per payload file (format 2: counted before coding).
        format: the package format, 2 (compressed) or 1 (raw payload, for older readers).
        level: the zstd level for format 2; low levels decode fastest.
        smallest: format 2: spend time for the smallest payload (zstd level 19, every frame coded
            that gets any smaller, the transform tried on more of each tensor).
        allow_raw: store the tensors without a counterpart raw even where that is most of the target,
            or where the target has fewer rows than the base (otherwise :class:`RawWeightsError`).
        replace: replace an existing package at ``out`` once the new one is complete (until then the old
            one stays as it was).
        progress: a progress bar factory; bytes of the target are reported.

    Returns:
        A :class:`MakeReport`; the package is complete on disk when it returns.

    Raises:
        RawWeightsError: the delta would publish whole weights (base and target look swapped, or
            the base is not the target's), unless ``allow_raw``.

    Example:
        >>> report = make_delta("llama-7b", "panda-7b", "panda-7b-delta")  # doctest: +SKIP
        >>> report.encodings
        {'xor': 289, 'rows': 2, 'copy': 1}
    """
    if codec not in MAKE_CODECS:
        raise UnsupportedInputError(
            f"unknown codec {codec!r}; choose one of {', '.join(MAKE_CODECS)}",
            expected=MAKE_CODECS,
            actual=codec,
            argument="codec",
        )
    if format not in READABLE_FORMATS:
        raise UnsupportedInputError(
            f"unknown package format {format}; choose one of {READABLE_FORMATS}",
            expected=READABLE_FORMATS,
            actual=format,
            argument="format",
        )
    out = Path(out)
    check_output_free(out, replace=replace)
    if format >= 2:
        kernels.warm_up()
    base_ckpt = open_checkpoint(base)
    target_ckpt = open_checkpoint(target)
    chosen = CODECS[codec]
    steps = [_classify(n, t, base_ckpt.tensors.get(n), chosen) for n, t in target_ckpt.tensors.items()]
    if not allow_raw:
        _refuse_raw_weights(steps, base_ckpt, target_ckpt)
    for step in steps:
        if step.encoding == "raw":
            log.info("tensor %r is stored raw (%s)", step.name, step.raw_reason)
    coding = _Coding(format, SMALLEST_LEVEL if smallest else level, 0.0 if smallest else MIN_SAVING)
    # format 2's lossless codec: each tensor's transform is chosen as its first chunk is coded
    samples = (8 if smallest else 1) if format >= 2 and codec == "xor" else 0
    specs = [s.spec if format == 1 else TensorSpec(s.name, "U8", (s.target.nbytes,)) for s in steps]

    with StagedFolder(out, replace=replace) as staged:
        shards = _PayloadShards(staged.path, specs, shard_size, format)
        stream = _MakeStream(steps, shards, coding, samples)
        try:
            stream.run(base_ckpt, progress)
        except BaseException:
            shards.abort()
            raise
        payload = shards.finish()
        files = carry_files(target_ckpt, staged.path / FILES_DIR)
        target_records, inexact = stream.records, stream.inexact
        base_records = {
            n: TensorRecord(info.dtype, info.shape, stream.base_digests[n]) for n, info in base_ckpt.tensors.items()
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
            format=format,
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


def _chunk_bits(step: _MakeStep, segment: int, views: list[memoryview]) -> tuple[Bytes, Bytes]:
    """Returns (target bits, base bits cast to the target dtype) for one chunk; a chunk with no base
    (a raw tensor, a grown tensor's new rows) gives its target bits twice."""
    target_bits = as_bytes(views[0])
    if segment == 1 or step.base is None:
        return target_bits, target_bits
    base_bits = as_bytes(views[1])
    if step.base.dtype != step.target.dtype:
        base_bits = cast_bits(base_bits, step.base.dtype, step.target.dtype)
    return target_bits, base_bits


class _MakeStream:
    """One pass over every step's chunks: coded on the reading threads (each tensor's transform chosen
    from ``samples`` samples as its first chunk is coded; none for no choice), hashed and written in
    order. Collects each target tensor's record, each base tensor's digest, and inexact elements."""

    def __init__(self, steps: list[_MakeStep], shards: _PayloadShards, coding: _Coding, samples: int) -> None:
        self.steps = steps  # a step's transform is chosen in place, before its first chunk comes out
        self.shards, self.coding, self.samples = shards, coding, samples
        self.records: dict[str, TargetTensor] = {}
        self.base_digests: dict[str, str] = {}
        self.inexact: dict[str, int] = {}

    def run(self, base_ckpt: Checkpoint, progress: ProgressFactory) -> None:
        bar = progress(sum(s.target.nbytes for s in self.steps), "make")
        with RangeReader() as reader:
            chooser = _Chooser(self.steps, reader, self.coding, self.samples)

            def work(chunk: Chunk, views: list[memoryview], arena: Arena) -> _Encoded:  # on a reading thread
                return self.coding.encode(chooser.step(chunk, views), chunk.segment, views, arena.take)

            chunks = Prefetcher(reader, mapped=True).map(_make_chunks(self.steps), work)
            for owner, run in by_tensor(chunks, lambda item: item[0].owner):
                state = self._start(self.steps[owner])
                for chunk, views, encoded in run:
                    state.target_hash.update(views[0])  # while the chunk before is written
                    if len(views) > 1:
                        state.base_hash.update(views[1])
                    self.shards.wait()  # before the next chunk is asked for, which may recycle this one's memory
                    if state.started or not encoded.identical:
                        if not state.started:
                            self._catch_up(state, chunk.first, reader)
                        self._emit(state, encoded, behind=True)
                    bar.update(len(views[0]))
                self._finish(state)
            for name, info in base_ckpt.tensors.items():
                if name not in self.base_digests:
                    self.base_digests[name] = hash_tensor(reader, info)
        bar.close()

    def _start(self, step: _MakeStep) -> _MakeState:
        state = _MakeState(step)
        if step.codec is not None and not step.codec.exact:
            state.rebuild_hash = TensorHasher()
        if step.encoding in ("raw", "rows"):
            self.shards.begin(step.name)
            state.started = True
        return state

    def _catch_up(self, state: _MakeState, upto: int, reader: RangeReader) -> None:
        """The tensor was identical to the base up to element ``upto``: start its payload, and encode
        that prefix now."""
        step = state.step
        assert step.base is not None
        self.shards.begin(step.name)
        state.started = True
        widest = max(itemsize(step.target.dtype), itemsize(step.base.dtype))
        for a, b in element_ranges(0, upto, widest):
            self._emit(state, self.coding.encode(step, 0, _read_pair(reader, step, a, b)))

    def _emit(self, state: _MakeState, encoded: _Encoded, *, behind: bool = False) -> None:
        if behind:
            self.shards.write_behind(encoded.pieces)
        else:
            self.shards.write(encoded.pieces)
        if encoded.frame is not None and encoded.frame.elements:
            state.frames.append(encoded.frame)
        if state.rebuild_hash is not None and encoded.rebuilt is not None:
            state.inexact += encoded.inexact
            state.rebuild_hash.update(encoded.rebuilt.data)

    def _finish(self, state: _MakeState) -> None:
        step = state.step
        source = state.target_hash.hexdigest()
        if step.base is not None:
            self.base_digests[step.name] = state.base_hash.hexdigest()
        encoding = step.encoding
        if encoding not in ("raw", "rows") and not state.started:
            encoding = "copy"
        elif not state.started:  # raw or rows: always written (zero-size tensors included)
            self.shards.begin(step.name)
        if encoding != "copy":
            self.shards.end()
        digest = source
        if state.rebuild_hash is not None and encoding != "copy":
            digest = state.rebuild_hash.hexdigest()
        t = step.target
        framed = self.coding.version >= 2 and encoding != "copy"
        self.records[step.name] = TargetTensor(
            dtype=t.dtype,
            shape=t.shape,
            digest=digest,
            encoding=encoding,
            cast_from=step.base.dtype if step.base is not None and step.base.dtype != t.dtype else None,
            codec=step.codec.name if encoding == "rows" and step.codec else None,
            base_rows=step.base.shape[0] if encoding == "rows" and step.base else None,
            source_digest=source if digest != source else None,
            inexact=state.inexact if state.rebuild_hash is not None and encoding != "copy" else None,
            split=_split_of(step) if framed else None,
            frames=tuple(state.frames) if framed else None,
        )
        if state.rebuild_hash is not None and encoding != "copy":
            self.inexact[step.name] = state.inexact
