"""apply: rebuild a fine-tune from its base and a delta package; plan first, then stream.

Cheap checks run first (names, dtypes, shapes, sampled digests); every tensor's digest is checked as it is written.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..codecs import CODECS, Buffer, Bytes, cast_bits, kernels
from ..codecs.frames import CorruptFrame, Rebuild, decode_frame
from ..dtypes import itemsize
from ..errors import BaseMismatchError, CorruptFrameError, IntegrityError, UnsupportedInputError
from ..formats.checkpoint import Checkpoint, RangeReader, open_checkpoint
from ..formats.delta import FILES_DIR, DeltaPackage, open_delta
from ..formats.safetensors import TensorInfo, TensorSpec
from ..hashing import TensorHasher
from ..layout import DEFAULT_SHARD_SIZE, OutputShard, plan_output, write_index
from ..manifest import (
    Manifest,
    TargetTensor,
)
from ..progress import ProgressBar, ProgressFactory, no_progress
from ..reading import Arena, Chunk, Prefetcher, Read, as_bytes, by_tensor, element_ranges, read_range
from ..staging import StagedFolder, check_free_space, check_output_free
from ..writing import OutputWriter, open_output_shards
from .digests import copy_hashed, hash_tensor

log = logging.getLogger(__name__)

_SAMPLE_CAP_BYTES = 1 << 30
_SAMPLE_PATTERN = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings)\.|(^|\.)(layers|h|blocks)\.0\.")
# Tensors up to this size are rebuilt in memory for a consumer that needs them whole; larger ones (a 7B's
# embedding with a grown vocabulary, 0.4 GB in fp16; Llama 3.2 1B's tied 128k-row embedding, 0.5 GB) go
# through a scratch file, so that one beside a BPE vocabulary's memory stays under the 1 GiB yardstick.
MEMORY_TENSOR_BYTES = 256 << 20


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

    def warm_up(self) -> None:
        """Start loading the frame decoder's compiled kernels in the background (format 2), so that
        it overlaps the checks before streaming; a plan that is only shown needs none."""
        if self.manifest.format >= 2:
            kernels.warm_up()

    def check_sample(self) -> None:
        """Check the digests of the sampled base tensors (embedding, first layer): where a wrong or
        differently converted base shows first, in seconds.

        Raises:
            BaseMismatchError: a sampled tensor differs from the one the delta was made from.
        """
        m = self.manifest
        with RangeReader() as reader:
            for name in self.sample:
                info = self.base.tensors[name]
                want = m.base.tensors[name].digest
                got = hash_tensor(reader, info)
                if got != want:
                    raise BaseMismatchError(
                        f"base tensor {name!r} differs from the one the delta was made from: it is not "
                        f"{m.base.name!r} (expected blake3 {want[:16]}..., got {got[:16]}...); another model "
                        "or another conversion of it",
                        path=info.path,
                        tensor=name,
                        expected=want,
                        actual=got,
                        argument="base",
                    )
                log.debug("base tensor %s matches", name)

    def copy_carried(self, rel: str, dest: Path) -> None:
        """Copy the carried file ``rel`` to ``dest``, checked against the manifest's SHA-256 as it goes.

        Raises:
            IntegrityError: the delta's copy is corrupt.
        """
        record = self.manifest.target.files[rel]
        source = self.delta.root / FILES_DIR / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        copied = copy_hashed(source, dest)
        if copied != record:
            raise IntegrityError(
                f"{source}: sha256 {copied.sha256[:16]}... differs from the manifest's {record.sha256[:16]}...: "
                "the delta's file is corrupt",
                path=source,
                expected=record.sha256,
                actual=copied.sha256,
                argument="delta",
            )

    def finish_folder(self, folder: Path) -> None:
        """What follows the tensors: the shard index (when sharded), the carried files, checked, and the
        package's signature of the rebuilt model (``model.sig``) when the model is laid out as signed."""
        from ..signing import carry_model_signature

        shard_of = {s.name: s.shard for s in self.steps}
        write_index(folder, self.shards, shard_of, self.specs)
        for rel in self.manifest.target.files:
            self.copy_carried(rel, folder / rel)
        carry_model_signature(self.delta.root, folder, shard_of)

    def report(self, out: Path) -> ApplyReport:
        m = self.manifest
        return ApplyReport(
            out=out,
            target_name=m.target.name,
            tensors=len(self.steps),
            encodings=dict(sorted(Counter(s.target.encoding for s in self.steps).items())),
            bytes_written=self.write_bytes,
            files=tuple(m.target.files),
            shards=tuple(s.name for s in self.shards),
            fingerprint=m.target.fingerprint,
        )


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
                argument="base",
            )
        if (have.dtype, have.shape) != (want.dtype, want.shape):
            raise BaseMismatchError(
                f"base tensor {name!r} is {have.dtype} {list(have.shape)}, but the delta was made from "
                f"{want.dtype} {list(want.shape)} ({m.base.name!r}): another model, or another conversion",
                path=have.path,
                tensor=name,
                expected=f"{want.dtype} {list(want.shape)}",
                actual=f"{have.dtype} {list(have.shape)}",
                argument="base",
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
            f"{package.root}: carried file {clash[0]!r} would overwrite a rebuilt weight file",
            path=package.root,
            argument="delta",
        )
    return ApplyPlan(ckpt, package, tuple(steps), tuple(shards), _choose_sample(steps))


def _decode_frame(step: ApplyStep, chunk: Chunk, coded: memoryview, base_bits: Bytes | None, arena: Arena) -> Bytes:
    """A frame's output bytes: its payload, rebuilt against ``base_bits`` where the chunk has a base."""
    t = step.target
    assert t.frames is not None and t.split is not None and step.payload is not None
    frame = t.frames[chunk.frame]
    rebuild: Rebuild | None = None
    transform = None
    if base_bits is not None:
        codec = CODECS[t.codec or t.encoding]
        if codec.exact:  # undone in the pass that joins the byte streams
            transform = codec.name
        else:
            decode, base = codec.decode, base_bits

            def rebuild(payload: Bytes, first: int, buffer: Buffer) -> Bytes:
                return decode(base[first : first + payload.size], payload, t.dtype, buffer)

    try:
        return decode_frame(
            coded,
            frame,
            itemsize(t.dtype),
            t.split,
            buffer=arena.take,
            base=base_bits,
            transform=transform,
            rebuild=rebuild,
        )
    except CorruptFrame as e:
        offset = chunk.reads[-1].offset
        raise CorruptFrameError(
            f"{step.payload.path}: tensor {step.name!r}, frame {chunk.frame} (elements {chunk.first} to "
            f"{chunk.last}, bytes {offset} to {offset + len(coded)} of the file) is corrupt: {e}",
            path=step.payload.path,
            tensor=step.name,
            actual=offset,
            argument="delta",
        ) from e


def _apply_chunks(steps: Sequence[ApplyStep]) -> Iterator[Chunk]:
    for i, step in enumerate(steps):
        if step.target.frames is not None:
            yield from _framed_chunks(i, step)
            continue
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


def _framed_chunks(i: int, step: ApplyStep) -> Iterator[Chunk]:
    """Format 2: one chunk per frame, reading the frame's coded bytes beside its base elements."""
    t = step.target
    assert step.payload is not None and t.frames is not None
    t_item = itemsize(t.dtype)
    shared = math.prod(step.base.shape) if step.base is not None else 0
    if not t.frames:  # a zero-size tensor: one empty chunk, so it passes through the loop
        yield Chunk(i, 1, 0, 0, (Read(step.payload.path, step.payload.start, 0),))
        return
    first, offset = 0, step.payload.start
    for k, frame in enumerate(t.frames):
        last, coded = first + frame.elements, frame.coded_size(t_item)
        reads = [Read(step.payload.path, offset, coded)]
        if first < shared:
            assert step.base is not None
            reads.insert(0, read_range(step.base, itemsize(step.base.dtype), first, last))
        yield Chunk(i, 0 if first < shared else 1, first, last, tuple(reads), frame=k)
        first, offset = last, offset + coded


def _decode_chunk(step: ApplyStep, chunk: Chunk, views: list[memoryview], arena: Arena) -> Bytes:
    """The output bytes of one chunk, in the chunk's arena or a view of its read buffers (raw, copy
    and stored chunks); both stay valid until the chunk's slot is read into again."""
    t = step.target
    base_bits = None
    if step.base is not None and chunk.segment == 0:
        base_bits = as_bytes(views[0])
        if t.cast_from is not None:
            base_bits = cast_bits(base_bits, t.cast_from, t.dtype)
    if chunk.frame >= 0:
        return _decode_frame(step, chunk, views[-1], base_bits, arena)
    if base_bits is None:  # raw, or the new rows of a grown tensor
        return as_bytes(views[-1])
    if step.payload is None:  # copy
        return base_bits
    return CODECS[t.codec or t.encoding].decode(base_bits, as_bytes(views[1]), t.dtype, arena.take)


def apply_delta(
    base: str | Path,
    delta: str | Path,
    out: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    replace: bool = False,
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
        replace: replace an existing model at ``out`` once the new one is complete and every digest
            matched (until then the old one stays as it was).
        progress: a progress bar factory; output bytes are reported.

    Raises:
        OutputExistsError: ``out`` exists and is not empty, without ``replace`` (checked before anything else).
        BaseMismatchError: the base is not the one the delta was made from.
        IntegrityError: the payload or a carried file is corrupt.

    Example:
        >>> apply_delta("llama-7b", "panda-7b-delta", "panda-7b")  # doctest: +SKIP
    """
    out = Path(out)
    check_output_free(out, replace=replace)
    plan = plan_apply(base, delta, shard_size=shard_size)
    plan.warm_up()
    m = plan.manifest
    check_free_space(out, plan.write_bytes + sum(f.size for f in m.target.files.values()))
    plan.check_sample()  # before anything is created on disk
    verified = set(plan.sample)
    with RangeReader() as reader, StagedFolder(out, replace=replace) as staged:
        fds = open_output_shards(staged.path, plan.shards)
        try:
            bar = progress(sum(spec.nbytes for spec in plan.specs), "apply")
            _stream_apply(plan, reader, fds, verified, bar)
            bar.close()
        finally:
            for fd in fds:
                os.close(fd)
        plan.finish_folder(staged.path)
        staged.commit()
    return plan.report(out)


def apply_shard(plan: ApplyPlan, index: int, folder: Path, verified: set[str]) -> dict[str, str]:
    """Rebuild output shard ``index`` alone into ``folder`` (a leftover of an earlier attempt is
    replaced), fsync it, and return its tensors' digests: the unit of work one machine of a cluster
    does. Each tensor is checked as it ends, as :func:`apply_delta` checks it."""
    shard = plan.shards[index]
    (folder / shard.name).unlink(missing_ok=True)
    (fd,) = open_output_shards(folder, [shard])
    fds = [-1] * len(plan.shards)
    fds[index] = fd
    try:
        with RangeReader() as reader:
            steps = [s for s in plan.steps if s.shard == index]
            digests = _stream_apply(plan, reader, fds, verified, no_progress(shard.layout.size, "apply"), steps)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digests


def _check_rebuilt(m: Manifest, step: ApplyStep, base_hash: TensorHasher, got: str, verified: set[str]) -> None:
    """A tensor once all its chunks went by: its base bytes (unless checked before) and its rebuilt
    bytes (digest ``got``) must be the manifest's."""
    if step.base is not None and step.name not in verified:
        want, base_got = m.base.tensors[step.name].digest, base_hash.hexdigest()
        if base_got != want:
            raise BaseMismatchError(
                f"base tensor {step.name!r} differs from the one the delta was made from "
                f"({m.base.name!r}): expected blake3 {want[:16]}..., got {base_got[:16]}...",
                path=step.base.path,
                tensor=step.name,
                expected=want,
                actual=base_got,
                argument="base",
            )
    if got != step.target.digest:
        raise IntegrityError(
            f"rebuilt tensor {step.name!r} does not match the target digest (expected blake3 "
            f"{step.target.digest[:16]}..., got {got[:16]}...): the delta's payload is corrupt",
            path=step.payload.path if step.payload else None,
            tensor=step.name,
            expected=step.target.digest,
            actual=got,
            argument="delta",
        )


def _rebuilt_runs(
    steps: Sequence[ApplyStep], reader: RangeReader, verified: set[str], bar: ProgressBar, *, mapped: bool = False
) -> Iterator[tuple[ApplyStep, Iterator[Bytes], TensorHasher]]:
    """Every step rebuilt, in order: the step, its chunks' output bytes (each valid until the chunk
    after next is asked for), and the hasher of its base bytes, which has seen every base byte of the
    chunks gone by (unless the tensor was checked already, in ``verified``). Take a step's chunks to
    their end before asking for the next step."""

    def work(chunk: Chunk, views: list[memoryview], arena: Arena) -> Bytes:  # on a reading thread
        return _decode_chunk(steps[chunk.owner], chunk, views, arena)

    def rebuilt(
        step: ApplyStep, run: Iterator[tuple[Chunk, list[memoryview], Bytes]], base_hash: TensorHasher
    ) -> Iterator[Bytes]:
        hashes_base = step.base is not None and step.name not in verified
        for chunk, views, data in run:
            if hashes_base and chunk.segment == 0:
                base_hash.update(views[0])
            yield data
            bar.update(data.size)

    chunks = Prefetcher(reader, mapped=mapped).map(_apply_chunks(steps), work)
    for owner, run in by_tensor(chunks, lambda item: item[0].owner):
        base_hash = TensorHasher()
        yield steps[owner], rebuilt(steps[owner], run, base_hash), base_hash


def rebuilt_tensors(
    plan: ApplyPlan, reader: RangeReader, verified: set[str], bar: ProgressBar, *, scratch: Path
) -> Iterator[tuple[ApplyStep, Bytes]]:
    """Each target tensor rebuilt whole and checked against its digests, in the plan's order: what a
    consumer that must not see unverified bytes (a GGUF writer) reads from.

    A tensor of at most ``MEMORY_TENSOR_BYTES`` is held in memory; a larger one is written to a file in
    ``scratch`` and read back mapped, so memory stays bounded whatever the model. The bytes yielded are
    valid until the next tensor is asked for.
    """
    for step, chunks, base_hash in _rebuilt_runs(plan.steps, reader, verified, bar):
        out_hash = TensorHasher()
        size = math.prod(step.target.shape) * itemsize(step.target.dtype)
        filled = 0
        if size <= MEMORY_TENSOR_BYTES:
            held = np.empty(size, dtype=np.uint8)
            for data in chunks:
                out_hash.update(data.data)
                held[filled : filled + data.size] = data
                filled += data.size
            _check_rebuilt(plan.manifest, step, base_hash, out_hash.hexdigest(), verified)
            yield step, held
            del held  # before the next tensor is allocated: one embedding-sized tensor at a time, not two
            continue
        with tempfile.TemporaryFile(dir=scratch, prefix=".deltakit-tensor-") as spill:
            for data in chunks:
                out_hash.update(data.data)
                spill.write(data.data)
                filled += data.size
            _check_rebuilt(plan.manifest, step, base_hash, out_hash.hexdigest(), verified)
            spill.flush()
            yield step, np.memmap(spill, dtype=np.uint8, mode="r", shape=(filled,)) if filled else np.empty(0, np.uint8)


def _stream_apply(
    plan: ApplyPlan,
    reader: RangeReader,
    fds: Sequence[int],
    verified: set[str],
    bar: ProgressBar,
    steps: Sequence[ApplyStep] | None = None,
) -> dict[str, str]:
    """Rebuild ``steps`` (by default the whole plan) into the shard files ``fds`` (indexed by shard;
    only the steps' own need be open), checking each tensor's digests as it ends; returns them."""
    steps = plan.steps if steps is None else steps
    writer = OutputWriter(fds)
    digests: dict[str, str] = {}
    try:
        for step, chunks, base_hash in _rebuilt_runs(steps, reader, verified, bar, mapped=True):
            out_hash = TensorHasher()
            for data in chunks:
                writer.submit(step.shard, data, out_hash)
            writer.wait()  # the tensor's last chunk is hashed
            digests[step.name] = out_hash.hexdigest()
            _check_rebuilt(plan.manifest, step, base_hash, digests[step.name], verified)
        writer.finish()
    finally:
        writer.close()
    return digests
