"""Deltas published by older tools, rebuilt as those tools rebuild them, streamed in bounded memory.

- ``fastchat``: FastChat's ``apply_delta`` (Vicuna, Panda): both models in fp16, ``base += delta``
  rounded to fp16; when the delta's embedding or head has more rows than the base (Vicuna v0's
  32001), the base is added to the shared rows and the new rows are taken as they are.
- ``alpaca``: Stanford Alpaca's ``weight_diff.py recover``: both in fp32, ``diff + base``; when the
  diff has more rows, the base gains rows equal to the mean of its rows first, as Alpaca's
  ``smart_tokenizer_and_embedding_resize`` does for its ``[PAD]`` token. That mean is summed in fp64
  chunk by chunk (bounded memory) where torch sums in fp32, so the ``[PAD]`` row may differ from
  Alpaca's in the last bit; every other element is exact.
- ``oasst-xor``: OpenAssistant's ``xor_codec.py``: every file of the release is gzip(file XOR the
  base's file of the same name, zero-padded or cut to length); the files come back byte for byte
  only from byte-identical base files, so each rebuilt checkpoint file is validated before use.

Legacy deltas record no digests, so the result is checked only for shape and the report gives its
fingerprint; ``deltakit make --from-legacy`` turns such a release into a deltakit package.
"""

from __future__ import annotations

import gzip
import math
import shutil
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .codecs import Bytes, add_decode, cast_bits
from .dtypes import itemsize
from .engine import MakeReport, checkpoint_digests, make_delta
from .engine.make import DEFAULT_LEVEL
from .errors import BaseMismatchError, DeltakitError, FormatError, InputNotFoundError, UnsupportedInputError
from .files import open_regular, read_regular, require_regular
from .formats.checkpoint import Checkpoint, RangeReader, is_weight_file, open_checkpoint
from .formats.safetensors import TensorInfo, TensorSpec
from .hashing import algorithm_of, file_hexdigest, file_sha256, fingerprint, read_checksum_file
from .layout import DEFAULT_SHARD_SIZE
from .manifest import FORMAT_VERSION
from .progress import ProgressBar, ProgressFactory, no_progress
from .reading import Chunk, as_bytes, element_ranges, paired_chunks
from .staging import StagedFolder, check_free_space, check_output_free
from .units import human_bytes
from .writing import write_model

__all__ = [
    "LEGACY_KINDS",
    "LegacyReport",
    "apply_legacy_delta",
    "detect_legacy_kind",
    "is_xor_release",
    "make_delta_from_legacy",
]

LEGACY_KINDS = ("fastchat", "alpaca", "oasst-xor")
_DTYPE = {"fastchat": "F16", "alpaca": "F32"}
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
    verified: bool = False


@dataclass(frozen=True)
class _Step:
    name: str
    base: TensorInfo
    delta: TensorInfo


def detect_legacy_kind(delta: Checkpoint) -> str:
    """``alpaca`` for fp32 diffs (Alpaca published fp32), ``fastchat`` otherwise."""
    dtypes = {t.dtype for t in delta.tensors.values()}
    return "alpaca" if dtypes == {"F32"} else "fastchat"


def _pair(base: Checkpoint, delta: Checkpoint) -> list[tuple[str, TensorInfo, TensorInfo]]:
    pairs = []
    for name, d in delta.tensors.items():
        if name.endswith(_IGNORED_BASE_SUFFIXES):  # buffers, not weights: older deltas carry them
            continue
        b = base.tensors.get(name)
        if b is None:
            raise UnsupportedInputError(
                f"the delta has tensor {name!r}, which the base lacks: this delta is not for this base",
                path=delta.root,
                tensor=name,
            )
        grows = len(d.shape) == 2 and d.shape[1:] == b.shape[1:] and d.shape[0] > b.shape[0]
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


def mean_abs(reader: RangeReader, info: TensorInfo, elements: int = _PROBE_ELEMENTS) -> float:
    """Mean |x| over the finite values among a tensor's first ``elements``: how large its values are."""
    n = min(math.prod(info.shape), elements)
    buffer = bytearray(n * itemsize(info.dtype))
    reader.read_into(info.path, info.start, memoryview(buffer))
    values = cast_bits(np.frombuffer(buffer, dtype=np.uint8), info.dtype, "F64").view(np.float64)
    finite = values[np.isfinite(values)]
    return float(np.abs(finite).mean()) if finite.size else 0.0


def _check_looks_like_differences(reader: RangeReader, pairs: Sequence[tuple[str, TensorInfo, TensorInfo]]) -> None:
    """Refuse a full model passed as a delta: fine-tuning differences are far smaller than weights."""
    probe = next(
        ((n, b, d) for n, b, d in pairs if len(b.shape) == 2 and b.shape == d.shape and "embed" not in n), None
    )
    if probe is None:
        return
    name, b, d = probe
    base_size, delta_size = mean_abs(reader, b), mean_abs(reader, d)
    if base_size and delta_size > 0.5 * base_size:
        raise UnsupportedInputError(
            f"{d.path.parent} does not look like a delta: its {name!r} is as large as the base's "
            f"(mean |x| {delta_size:.3g} against {base_size:.3g}), so it is probably a full model, "
            "and no legacy kind was given",
            path=d.path,
            tensor=name,
            expected=f"mean |x| at most {0.5 * base_size:.3g}",
            actual=f"{delta_size:.3g}",
            argument="kind",
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
        yield from paired_chunks(i, step.delta, step.base)  # views: delta, then base (segment 0)


def apply_legacy_delta(
    base: str | Path,
    delta: str | Path,
    out: str | Path,
    *,
    kind: str | None = None,
    checksums: str | Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    replace: bool = False,
    progress: ProgressFactory = no_progress,
) -> LegacyReport:
    """Rebuild a fine-tune from ``base`` and a delta published by an older tool.

    Args:
        kind: ``fastchat`` or ``alpaca``; by default ``alpaca`` for an all-fp32 delta, else ``fastchat``,
            after checking that the delta holds differences rather than a full model; ``oasst-xor``
            for a folder of gzip-compressed XORed files.
        checksums: for ``oasst-xor``, a file of ``<md5 or sha256>  <name>`` lines for the rebuilt files
            (from the release's model card). Without it the rebuild cannot be verified: XOR against a
            wrong base still yields well-formed files, even their zip CRCs consistent, of wrong weights.
        replace: replace an existing model at ``out`` once the new one is complete (until then the old
            one stays as it was).

    Raises:
        UnsupportedInputError: the delta's tensors do not pair with the base's (another model, or a
            vocabulary that does not match).
    """
    out = Path(out)
    check_output_free(out, replace=replace)
    if kind == "oasst-xor" or (kind is None and is_xor_release(delta)):
        sums = Path(checksums) if checksums else None
        return _rebuild_xor_release(Path(base), Path(delta), out, sums, progress, replace=replace)
    base_ckpt, delta_ckpt = open_checkpoint(base), open_checkpoint(delta)
    pairs = _pair(base_ckpt, delta_ckpt)
    if kind is None:
        with RangeReader() as reader:
            _check_looks_like_differences(reader, pairs)
        kind = detect_legacy_kind(delta_ckpt)
    if kind not in LEGACY_KINDS:
        raise UnsupportedInputError(
            f"unknown legacy delta kind {kind!r}; choose one of {', '.join(LEGACY_KINDS)}",
            expected=LEGACY_KINDS,
            actual=kind,
            argument="kind",
        )
    dtype = _DTYPE[kind]
    specs = [TensorSpec(name, dtype, d.shape) for name, _, d in pairs]
    steps = [_Step(name, b, d) for name, b, d in pairs]

    with RangeReader() as reader, StagedFolder(out, replace=replace) as staged:
        means = {
            s.name: _row_means(reader, s.base) for s in steps if kind == "alpaca" and s.delta.shape != s.base.shape
        }

        def produce(chunk: Chunk, views: list[memoryview]) -> Bytes:
            step = steps[chunk.owner]
            if chunk.segment == 0:
                delta_bits = cast_bits(as_bytes(views[0]), step.delta.dtype, dtype)
                base_bits = cast_bits(as_bytes(views[1]), step.base.dtype, dtype)
                return add_decode(base_bits, delta_bits, dtype)
            delta_bits = cast_bits(as_bytes(views[0]), step.delta.dtype, dtype)
            if step.name not in means:  # fastchat: new rows as the delta has them
                return delta_bits
            columns = np.arange(chunk.first, chunk.last) % step.delta.shape[1]
            mean_rows = means[step.name].view(np.float32)[columns].view(np.uint8)
            return add_decode(mean_rows, delta_bits, dtype)

        bar = progress(sum(spec.nbytes for spec in specs), f"apply ({kind} delta)")
        digests, shards = write_model(staged.path, specs, shard_size, reader, _chunks(steps), produce, bar)
        bar.close()
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


_GZIP_MAGIC = b"\x1f\x8b"
_XOR_BLOCK = 8 << 20


def _is_gzip(path: Path) -> bool:
    return read_regular(path, limit=1)[:2] == _GZIP_MAGIC


def is_xor_release(path: str | Path) -> bool:
    """An OpenAssistant XOR release: a folder whose weight files are gzip streams."""
    folder = Path(path)
    return folder.is_dir() and any(p.is_file() and is_weight_file(p.name) and _is_gzip(p) for p in folder.iterdir())


# A rebuilt file is the base's file of the same name, changed: a little larger at most (a grown
# vocabulary, a longer config). A payload that promises more is a decompression bomb or a mismatch.
_XOR_GROWTH_SLACK = 64 << 20


def _promised_size(payload: Path, base: Path) -> int:
    """The size ``payload`` inflates to, as its gzip trailer gives it, refused if out of proportion.

    The trailer holds the size modulo 2**32, so of the sizes it allows, the one nearest the base
    file's is taken; inflating then stops one byte past it, and gzip's own check of the trailer
    catches any other.
    """
    with open_regular(payload) as f:
        f.seek(0, 2)
        if f.tell() < 18:  # a gzip header and trailer alone take 18 bytes
            raise FormatError(f"{payload}: too short to be a gzip stream: the file is damaged", path=payload)
        f.seek(-4, 2)
        trailer = int.from_bytes(f.read(4), "little")
    base_size = require_regular(base).st_size
    wraps = max(0, round((base_size - trailer) / (1 << 32)))
    promised = trailer + wraps * (1 << 32)
    if promised > 2 * base_size + _XOR_GROWTH_SLACK:
        raise FormatError(
            f"{payload}: inflates to {human_bytes(promised)} by its gzip trailer, out of proportion to the base's "
            f"{base.name} ({human_bytes(base_size)}): a damaged file or a decompression bomb",
            path=payload,
            expected=2 * base_size + _XOR_GROWTH_SLACK,
            actual=promised,
        )
    return promised


def _xor_file(payload: Path, base: Path, dest: Path, promised: int, bar: ProgressBar) -> None:
    """``gunzip(payload) XOR base``, the base zero-padded or cut to the payload's length, streamed,
    never inflating more than one byte past ``promised``."""
    written = 0
    try:
        with (
            open_regular(payload) as fpayload,
            gzip.GzipFile(fileobj=fpayload, mode="rb") as fin,
            open_regular(base) as fbase,
            open(dest, "xb") as fout,
        ):
            while block := fin.read(min(_XOR_BLOCK, promised + 1 - written)):
                written += len(block)
                if written > promised:
                    raise FormatError(
                        f"{payload}: inflates past the {promised} bytes its gzip trailer gives: "
                        "a damaged file or a decompression bomb",
                        path=payload,
                        expected=promised,
                    )
                mask = fbase.read(len(block))
                data = np.frombuffer(block, dtype=np.uint8)
                key = np.zeros(len(block), dtype=np.uint8)
                key[: len(mask)] = np.frombuffer(mask, dtype=np.uint8)
                fout.write(np.bitwise_xor(data, key).tobytes())
                bar.update(len(block))
            if fin.read(1):  # the whole stream, so that gzip checks its CRC and length
                raise FormatError(f"{payload}: inflates past the {promised} bytes its gzip trailer gives", path=payload)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise FormatError(f"{payload}: damaged gzip stream ({e}): download the release file again", path=payload) from e
    if written != promised:
        raise FormatError(
            f"{payload}: inflates to {written} bytes, not the {promised} its gzip trailer gives", path=payload
        )


def _rebuild_xor_release(
    base: Path, release: Path, out: Path, checksums_file: Path | None, progress: ProgressFactory, *, replace: bool
) -> LegacyReport:
    if not base.is_dir():
        raise UnsupportedInputError(f"{base}: an XOR release needs the base folder its files were XORed against")
    checksums = (
        {Path(n).name: d for n, d in read_checksum_file(checksums_file).items()} if checksums_file is not None else None
    )
    files = sorted(p for p in release.iterdir() if p.is_file() and not p.name.startswith("."))
    encoded = [p for p in files if _is_gzip(p)]
    for payload in encoded:
        if not (base / payload.name).is_file():
            raise InputNotFoundError(
                f"the XOR release has {payload.name}, which the base lacks: the release was made against "
                "a base laid out differently",
                path=base / payload.name,
            )
    promised = {p: _promised_size(p, base / p.name) for p in encoded}
    check_free_space(out, sum(promised.values()) + sum(p.stat().st_size for p in files if p not in promised))
    bar = progress(sum(promised.values()), "apply (oasst-xor)")
    with StagedFolder(out, replace=replace) as staged:
        for payload in encoded:
            _xor_file(payload, base / payload.name, staged.path / payload.name, promised[payload], bar)
        for plain in files:
            if plain not in encoded:  # added_tokens.json travels as it is
                file_sha256(plain, copy_to=staged.path / plain.name)
        bar.close()
        for name, expected in (checksums or {}).items():
            rebuilt = staged.path / name
            actual = file_hexdigest(rebuilt, algorithm_of(expected)) if rebuilt.is_file() else expected
            if actual != expected:
                raise BaseMismatchError(
                    f"{name} rebuilt from {release} does not match its published checksum: the base files are "
                    "not byte-identical to the ones the release was XORed against (same conversion, same "
                    "transformers version)",
                    path=base / name,
                    expected=expected,
                    actual=actual,
                )
        try:
            ckpt = open_checkpoint(staged.path)
        except DeltakitError as e:
            raise BaseMismatchError(
                f"the files rebuilt from {release} are not a valid checkpoint ({e}): the base files are not "
                "byte-identical to the ones the release was XORed against (same conversion, same transformers "
                "version); compare their checksums with the release's model card",
                path=base,
            ) from e
        digests = checkpoint_digests(ckpt)
        staged.commit()
    return LegacyReport(
        out=out,
        kind="oasst-xor",
        tensors=len(ckpt.tensors),
        grown=(),
        bytes_written=sum((out / p.name).stat().st_size for p in files),
        files=tuple(p.name for p in files),
        shards=tuple(p.name for p in encoded if is_weight_file(p.name)),
        fingerprint=fingerprint((n, t.dtype, t.shape, digests[n]) for n, t in ckpt.tensors.items()),
        verified=bool(checksums) and all(p.name in (checksums or {}) for p in encoded),
    )


def make_delta_from_legacy(
    base: str | Path,
    legacy: str | Path,
    out: str | Path,
    *,
    kind: str | None = None,
    checksums: str | Path | None = None,
    name: str | None = None,
    base_name: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    format: int = FORMAT_VERSION,
    level: int = DEFAULT_LEVEL,
    smallest: bool = False,
    replace: bool = False,
    progress: ProgressFactory = no_progress,
) -> tuple[LegacyReport, MakeReport]:
    """Re-package a legacy release as a deltakit delta, so it gains per-tensor digests.

    The fine-tune is rebuilt the legacy way into a temporary folder beside ``out`` (so that much disk
    is needed for a while), then diffed against ``base`` with the lossless ``xor`` codec.
    """
    out = Path(out)
    check_output_free(out, replace=replace)
    if (kind == "oasst-xor" or (kind is None and is_xor_release(legacy))) and checksums is None:
        raise UnsupportedInputError(
            f"{legacy} is an XOR release, which rebuilds plausible weights from any base: re-packaging it "
            "would record digests of whatever came out; pass the release's published checksums",
            path=legacy,
        )
    scratch = out.parent / f".{out.name}.legacy-{uuid.uuid4().hex[:12]}.tmp"
    try:
        rebuilt = apply_legacy_delta(
            base, legacy, scratch, kind=kind, checksums=checksums, shard_size=shard_size, progress=progress
        )
        made = make_delta(
            base,
            scratch,
            out,
            name=name or Path(legacy).resolve().name,
            base_name=base_name,
            shard_size=shard_size,
            format=format,
            level=level,
            smallest=smallest,
            replace=replace,
            progress=progress,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rebuilt, made
