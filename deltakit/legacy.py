"""Deltas published by older tools, rebuilt as those tools rebuild them, streamed in bounded memory.

- ``fastchat``: FastChat's ``apply_delta`` (Vicuna, Panda): both models in fp16, ``base += delta``
  rounded to fp16; when the delta's embedding or head has more rows than the base (Vicuna v0's
  32001), the base is added to the shared rows and the new rows are taken as they are.
- ``alpaca``: Stanford Alpaca's ``weight_diff.py recover``: both in fp32, ``diff + base``; when the
  diff has more rows, the base gains rows equal to the mean of its rows first, as Alpaca's
  ``smart_tokenizer_and_embedding_resize`` does for its ``[PAD]`` token.

Legacy deltas record no digests, so the result is checked only for shape and the report gives its
fingerprint; ``deltakit make --from-legacy`` turns such a release into a format-1 package.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .codecs import Bytes, add_decode, cast_bits
from .dtypes import itemsize
from .errors import UnsupportedInputError
from .formats.checkpoint import Checkpoint, RangeReader, open_checkpoint
from .formats.safetensors import TensorInfo, TensorSpec
from .hashing import file_sha256, fingerprint
from .progress import ProgressFactory, no_progress
from .staging import StagedFolder, check_output_free
from .streaming import (
    Chunk,
    as_bytes,
    element_ranges,
    open_output_shards,
    plan_output,
    read_range,
    stream_outputs,
    write_index,
)

if TYPE_CHECKING:
    from .engine import MakeReport

__all__ = ["LEGACY_KINDS", "LegacyReport", "apply_legacy_delta", "detect_legacy_kind", "make_delta_from_legacy"]

LEGACY_KINDS = ("fastchat", "alpaca")
_DTYPE = {"fastchat": "F16", "alpaca": "F32"}
_DEFAULT_SHARD_SIZE = 5_000_000_000
# Buffers older LLaMA conversions carry and FastChat's models never load.
_IGNORED_BASE_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class LegacyReport:
    """What a legacy rebuild wrote; ``grown`` lists tensors whose rows outnumber the base's."""

    out: Path
    kind: str
    tensors: int
    grown: tuple[str, ...]
    bytes_written: int
    files: tuple[str, ...]
    shards: tuple[str, ...]
    fingerprint: str


@dataclass(frozen=True)
class _Step:
    name: str
    base: TensorInfo
    delta: TensorInfo
    shard: int


def detect_legacy_kind(delta: Checkpoint) -> str:
    """``alpaca`` for fp32 diffs (Alpaca published fp32), ``fastchat`` otherwise."""
    dtypes = {t.dtype for t in delta.tensors.values()}
    return "alpaca" if dtypes == {"F32"} else "fastchat"


def _pair(base: Checkpoint, delta: Checkpoint) -> list[tuple[str, TensorInfo, TensorInfo]]:
    pairs = []
    for name, d in delta.tensors.items():
        b = base.tensors.get(name)
        if b is None:
            raise UnsupportedInputError(
                f"the delta has tensor {name!r}, which the base lacks: this delta is not for this base",
                path=delta.root,
                tensor=name,
            )
        grows = len(d.shape) >= 1 and d.shape[1:] == b.shape[1:] and d.shape[0] > b.shape[0]
        if d.shape != b.shape and not grows:
            raise UnsupportedInputError(
                f"tensor {name!r} is {list(d.shape)} in the delta but {list(b.shape)} in the base"
                + (
                    ": the delta's vocabulary does not match the base's" if "embed" in name or "lm_head" in name else ""
                ),
                path=delta.root,
                tensor=name,
            )
        pairs.append((name, b, d))
    missing = [n for n in base.tensors if n not in delta.tensors and not n.endswith(_IGNORED_BASE_SUFFIXES)]
    if missing:
        raise UnsupportedInputError(
            f"the delta lacks base tensor {missing[0]!r}: it is not a full-model delta for this base",
            path=delta.root,
            tensor=missing[0],
        )
    return pairs


_PROBE_ELEMENTS = 1 << 20


def _mean_abs(reader: RangeReader, info: TensorInfo) -> float:
    n = min(math.prod(info.shape), _PROBE_ELEMENTS)
    item = itemsize(info.dtype)
    buffer = bytearray(n * item)
    reader.read_into(info.path, info.start, memoryview(buffer))
    values = cast_bits(np.frombuffer(buffer, dtype=np.uint8), info.dtype, "F64").view(np.float64)
    return float(np.abs(values[np.isfinite(values)]).mean()) if n else 0.0


def _check_looks_like_differences(reader: RangeReader, pairs: Sequence[tuple[str, TensorInfo, TensorInfo]]) -> None:
    """Refuse a full model passed as a delta: fine-tuning differences are far smaller than weights."""
    probe = next(
        ((n, b, d) for n, b, d in pairs if len(b.shape) == 2 and b.shape == d.shape and "embed" not in n), None
    )
    if probe is None:
        return
    name, b, d = probe
    base_size, delta_size = _mean_abs(reader, b), _mean_abs(reader, d)
    if base_size and delta_size > 0.5 * base_size:
        raise UnsupportedInputError(
            f"{d.path.parent} does not look like a delta: its {name!r} is as large as the base's "
            f"(mean |x| {delta_size:.3g} against {base_size:.3g}), so it is probably a full model; "
            "pass the legacy kind explicitly (--legacy fastchat or alpaca) to apply it anyway",
            path=d.path,
            tensor=name,
        )


def _row_means(reader: RangeReader, info: TensorInfo) -> Bytes:
    """The mean of a matrix's rows, as fp32 bytes: accumulated in fp64 chunk by chunk, bounded memory."""
    import torch

    width, item = info.shape[1], itemsize(info.dtype)
    total = torch.zeros(width, dtype=torch.float64)
    for a, b in element_ranges(0, math.prod(info.shape), item):
        rows_a, rows_b = a // width * width, b // width * width  # whole rows only
        if rows_b <= rows_a:
            continue
        buffer = bytearray((rows_b - rows_a) * item)
        reader.read_into(info.path, info.start + rows_a * item, memoryview(buffer))
        bits = np.frombuffer(buffer, dtype=np.uint8)
        values = torch.from_numpy(cast_bits(bits, info.dtype, "F64").copy()).view(torch.float64)
        total += values.reshape(-1, width).sum(dim=0)
    mean: Bytes = (total / info.shape[0]).to(torch.float32).view(torch.uint8).numpy()
    return mean


def _chunks(steps: Sequence[_Step]) -> Iterator[Chunk]:
    for i, step in enumerate(steps):
        b, d = step.base, step.delta
        b_item, d_item = itemsize(b.dtype), itemsize(d.dtype)
        shared = math.prod(b.shape)
        for lo, hi in element_ranges(0, shared, max(b_item, d_item)):
            yield Chunk(i, 0, lo, hi, (read_range(b, b_item, lo, hi), read_range(d, d_item, lo, hi)))
        for lo, hi in element_ranges(shared, math.prod(d.shape), d_item, at_least_one=False):
            yield Chunk(i, 1, lo, hi, (read_range(d, d_item, lo, hi),))


def apply_legacy_delta(
    base: str | Path,
    delta: str | Path,
    out: str | Path,
    *,
    kind: str | None = None,
    shard_size: int = _DEFAULT_SHARD_SIZE,
    progress: ProgressFactory = no_progress,
) -> LegacyReport:
    """Rebuild a fine-tune from ``base`` and a delta published by an older tool.

    Args:
        kind: ``fastchat`` or ``alpaca``; by default ``alpaca`` for an all-fp32 delta, else ``fastchat``,
            after checking that the delta holds differences rather than a full model.

    Raises:
        UnsupportedInputError: the delta's tensors do not pair with the base's (another model, or a
            vocabulary that does not match).
    """
    out = Path(out)
    check_output_free(out)
    base_ckpt, delta_ckpt = open_checkpoint(base), open_checkpoint(delta)
    pairs = _pair(base_ckpt, delta_ckpt)
    if kind is None:
        with RangeReader() as reader:
            _check_looks_like_differences(reader, pairs)
        kind = detect_legacy_kind(delta_ckpt)
    if kind not in LEGACY_KINDS:
        raise UnsupportedInputError(f"unknown legacy delta kind {kind!r}; choose one of {', '.join(LEGACY_KINDS)}")
    dtype = _DTYPE[kind]
    specs = [TensorSpec(name, dtype, d.shape) for name, _, d in pairs]
    shards, shard_of = plan_output(specs, shard_size)
    steps = [_Step(name, b, d, shard_of[name]) for name, b, d in pairs]

    with RangeReader() as reader, StagedFolder(out) as staged:
        means = {
            s.name: _row_means(reader, s.base) for s in steps if kind == "alpaca" and s.delta.shape != s.base.shape
        }

        def produce(chunk: Chunk, views: list[memoryview]) -> Bytes:
            step = steps[chunk.owner]
            if chunk.segment == 0:
                base_bits = cast_bits(as_bytes(views[0]), step.base.dtype, dtype)
                delta_bits = cast_bits(as_bytes(views[1]), step.delta.dtype, dtype)
                return add_decode(base_bits, delta_bits, dtype)
            delta_bits = cast_bits(as_bytes(views[0]), step.delta.dtype, dtype)
            if step.name not in means:  # fastchat: new rows as the delta has them
                return delta_bits
            columns = np.arange(chunk.first, chunk.last) % step.delta.shape[1]
            mean_rows = means[step.name].view(np.float32)[columns].view(np.uint8)
            return add_decode(mean_rows, delta_bits, dtype)

        fds = open_output_shards(staged.path, shards)
        try:
            bar = progress(sum(spec.nbytes for spec in specs), f"apply ({kind} delta)")
            digests = stream_outputs(reader, _chunks(steps), produce, [s.shard for s in steps], fds, bar)
            bar.close()
        finally:
            for fd in fds:
                os.close(fd)
        write_index(staged.path, shards, shard_of, specs)
        for rel in delta_ckpt.extra_files:
            (staged.path / rel).parent.mkdir(parents=True, exist_ok=True)
            file_sha256(delta_ckpt.root / rel, copy_to=staged.path / rel)
        staged.commit()
    return LegacyReport(
        out=out,
        kind=kind,
        tensors=len(steps),
        grown=tuple(s.name for s in steps if s.delta.shape != s.base.shape),
        bytes_written=sum(s.layout.size for s in shards),
        files=delta_ckpt.extra_files,
        shards=tuple(s.name for s in shards),
        fingerprint=fingerprint((s.name, s.dtype, s.shape, dg) for s, dg in zip(specs, digests, strict=True)),
    )


def make_delta_from_legacy(
    base: str | Path,
    legacy: str | Path,
    out: str | Path,
    *,
    kind: str | None = None,
    name: str | None = None,
    base_name: str | None = None,
    shard_size: int = _DEFAULT_SHARD_SIZE,
    progress: ProgressFactory = no_progress,
) -> tuple[LegacyReport, MakeReport]:
    """Re-package a legacy release as a format-1 delta, so it gains per-tensor digests.

    The fine-tune is rebuilt the legacy way into a temporary folder beside ``out`` (so that much disk
    is needed for a while), then diffed against ``base`` with the lossless ``xor`` codec.
    """
    from .engine import make_delta  # engine does not import this module: no cycle

    out = Path(out)
    check_output_free(out)
    scratch = out.parent / f".{out.name}.legacy-{uuid.uuid4().hex[:12]}.tmp"
    try:
        rebuilt = apply_legacy_delta(base, legacy, scratch, kind=kind, shard_size=shard_size, progress=progress)
        made = make_delta(
            base,
            scratch,
            out,
            name=name or Path(legacy).resolve().name,
            base_name=base_name,
            shard_size=shard_size,
            progress=progress,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rebuilt, made
