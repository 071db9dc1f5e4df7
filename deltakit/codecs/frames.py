"""Format 2 payload framing: a tensor's payload words, split into byte streams, coded frame by frame.

Pure functions over byte arrays: :func:`encode_frame` turns one frame's elements into coded bytes
and a :class:`Frame` record; :func:`decode_frame` turns them back, refusing any frame whose sizes
disagree with its record before allocating or decoding anything. docs/FORMAT.md is the spec.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import zstandard

from . import Buffer, Bytes, fresh, kernels

__all__ = [
    "BLOCK_BYTES",
    "CODERS",
    "MAX_FRAME_BYTES",
    "MIN_FRAME_BYTES",
    "SPLITS",
    "CorruptFrame",
    "Frame",
    "Rebuild",
    "decode_frame",
    "encode_frame",
    "stream_count",
]

# A frame decodes to at most this many bytes: the size of one read-ahead buffer, so a frame (and the
# base elements beside it) always fits the buffers apply already holds.
MAX_FRAME_BYTES = 8 << 20
# A tensor's frame table holds at most ceil(elements * widest itemsize / MIN_FRAME_BYTES) + 1 frames:
# every frame costs apply a read, a decode call and a record, so a table of tiny frames would cost
# far more than the bytes it rebuilds. make's frames cover MAX_FRAME_BYTES each but the last of a
# segment (a rows tensor has two), which leaves this rule 8x to spare.
MIN_FRAME_BYTES = 1 << 20
CODERS = ("zstd", "stored")
SPLITS = ("bytes", "none")


class CorruptFrame(ValueError):
    """A frame cannot be decoded to the size its record gives; the caller names the tensor and offset."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One independently decodable frame of a tensor's payload.

    Attributes:
        elements: how many payload elements the frame decodes to.
        coder: ``zstd`` (one zstd frame per byte stream) or ``stored`` (the payload bytes as they are).
        streams: for ``zstd``, the coded size of each stream in order; empty for ``stored``.
    """

    elements: int
    coder: str
    streams: tuple[int, ...] = ()

    def coded_size(self, itemsize: int) -> int:
        return self.elements * itemsize if self.coder == "stored" else sum(self.streams)


def stream_count(split: str, itemsize: int) -> int:
    """Byte streams per frame: one per byte of the element for ``bytes``, else one."""
    return itemsize if split == "bytes" else 1


def _payload_words(values: Bytes, itemsize: int, base: Bytes | None, transform: str | None, buffer: Buffer) -> Bytes:
    """The payload elements whole: ``values`` themselves, or ``transform`` of them against ``base``."""
    if transform is None:
        return values
    assert base is not None
    payload = buffer("payload", values.size)
    kernels.transform_words(values, base, itemsize, payload, transform)
    return payload


def encode_frame(
    values: Bytes,
    itemsize: int,
    *,
    split: str,
    level: int,
    min_saving: float,
    buffer: Buffer = fresh,
    base: Bytes | None = None,
    transform: str | None = None,
) -> tuple[Frame, list[Bytes | bytes]]:
    """Code one frame (a whole number of elements).

    Args:
        values: the frame's bytes, little-endian elements of ``itemsize`` bytes: the payload itself,
            or with ``transform``, the target's elements.
        split: ``bytes`` (one stream per byte of the element) or ``none``.
        level: the zstd level.
        min_saving: the fraction of the raw size that coding must save, else the frame is stored.
        base: the base's bytes for the same elements, for ``transform``.
        transform: ``xor`` or ``sub``: the payload is this transform of ``values`` against ``base``,
            computed in the same pass that splits the byte streams.

    Returns:
        The frame record and the pieces to write, in order (a stored frame's may lie in ``buffer``).
    """
    elements = values.size // itemsize
    if values.size == 0:
        return Frame(0, "stored"), []
    count = stream_count(split, itemsize)
    if count == 1:
        streams = [_payload_words(values, itemsize, base, transform, buffer)]
    else:
        planes = buffer("planes", values.size)
        kernels.split_streams(values, itemsize, planes, base=base, transform=transform)
        streams = list(planes.reshape(count, -1))
    compressor = _compressor(level)
    coded = [compressor.compress(stream.data) for stream in streams]
    if sum(len(c) for c in coded) > values.size * (1.0 - min_saving):
        payload = streams[0] if count == 1 else _payload_words(values, itemsize, base, transform, buffer)
        return Frame(elements, "stored"), [payload]
    return Frame(elements, "zstd", tuple(len(c) for c in coded)), list(coded)


# Rebuilding through a ``rebuild`` function (``add``'s float arithmetic) in blocks of this many bytes
# keeps its passes in L2: measured 1.4x faster than whole-frame passes on 8 MiB frames.
BLOCK_BYTES = 256 << 10


class Rebuild(Protocol):
    """``rebuild(payload, first, buffer) -> target``: the target bytes of a block of payload bytes
    that starts at byte ``first`` of the frame; its result may lie in ``buffer("out", size)``."""

    def __call__(self, payload: Bytes, first: int, buffer: Buffer, /) -> Bytes: ...


def decode_frame(
    coded: memoryview,
    frame: Frame,
    itemsize: int,
    split: str,
    *,
    buffer: Buffer = fresh,
    base: Bytes | None = None,
    transform: str | None = None,
    rebuild: Rebuild | None = None,
) -> Bytes:
    """Decode one frame to its ``frame.elements * itemsize`` payload bytes; with ``transform``, to the
    target bytes rebuilt against ``base`` in the same pass; with ``rebuild``, to the target bytes it
    makes of the payload, block by block.

    Without either, a stored frame comes back as a view of ``coded``, with no copy.

    Args:
        buffer: where to decode: ``buffer(name, size)`` gives scratch memory (by default a new array;
            apply passes memory it reuses from frame to frame).
        base: the base's bytes for the frame's elements, for ``transform``.
        transform: ``xor`` or ``sub``, the lossless transform the payload was made with.
        rebuild: turns payload bytes into target bytes (the ``add`` codec's decode against the base).

    Raises:
        CorruptFrame: the coded bytes are not what the record says, or do not decode to exactly
            the recorded size (truncated, padded, or a decompression bomb).
    """
    raw = frame.elements * itemsize
    if len(coded) != frame.coded_size(itemsize):
        raise CorruptFrame(f"{len(coded)} coded bytes, but the frame record says {frame.coded_size(itemsize)}")
    if frame.coder == "stored":
        payload: Bytes = np.frombuffer(coded, dtype=np.uint8)
    else:
        count = stream_count(split, itemsize)
        if len(frame.streams) != count:
            raise CorruptFrame(f"{len(frame.streams)} streams; split {split!r} of {itemsize}-byte elements has {count}")
        plane = raw // count
        decoded = buffer("planes", raw)
        offset = 0
        for k, size in enumerate(frame.streams):
            _decompress_into(coded[offset : offset + size], decoded[k * plane : (k + 1) * plane], k)
            offset += size
        if count == 1:
            payload = decoded
        else:  # join the streams, and undo the transform in the same pass
            out = buffer("frame", raw)
            kernels.join_streams(decoded, itemsize, out, base=base, transform=transform)
            if rebuild is None:
                return out
            payload, transform = out, None
    if transform is not None:
        assert base is not None
        out = buffer("frame", raw)
        kernels.untransform_words(payload, base, itemsize, out, transform)
        return out
    if rebuild is None:
        return payload
    out = buffer("rebuilt", raw)
    step = max(1, BLOCK_BYTES // itemsize) * itemsize
    for a in range(0, raw, step):
        b = min(raw, a + step)

        def block_buffer(name: str, size: int, a: int = a) -> Bytes:
            return out[a : a + size] if name == "out" else buffer(f"block-{name}", size)

        target = rebuild(payload[a:b], a, block_buffer)
        if not np.may_share_memory(target, out):
            out[a:b] = target
    return out


_LOCAL = threading.local()  # zstandard's (de)compressors are not safe to share between threads

# At level 1, zstd's match finder with a 256-entry hash table and 7-byte matches: on fine-tune
# payloads (whose low byte streams are near-random, with runs where weights did not change) it codes
# the low streams twice as fast as level 1's own parameters, and no larger (BENCHMARKS.md). Any zstd
# decoder reads the result; other levels are zstd's as they are.
FAST_LEVEL_TUNING = {1: {"hash_log": 8, "min_match": 7}}


def _compressor(level: int) -> zstandard.ZstdCompressor:
    compressors: dict[int, zstandard.ZstdCompressor] = _LOCAL.__dict__.setdefault("compressors", {})
    if level not in compressors:
        tuning = FAST_LEVEL_TUNING.get(level, {})
        params = zstandard.ZstdCompressionParameters.from_level(level, write_content_size=True, **tuning)
        compressors[level] = zstandard.ZstdCompressor(compression_params=params)
    return compressors[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_LOCAL, "decompressor"):
        _LOCAL.decompressor = zstandard.ZstdDecompressor()
    decompressor: zstandard.ZstdDecompressor = _LOCAL.decompressor
    return decompressor


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _frame_parameters(source: memoryview, stream: int) -> zstandard.FrameParameters:
    """The header fields of the zstd frame ``source`` starts with; a header cut short or malformed
    (a stream of little more than the magic number) is a corrupt frame, not a zstandard error."""
    try:
        return zstandard.get_frame_parameters(source)
    except zstandard.ZstdError as e:
        raise CorruptFrame(f"stream {stream}: not a zstd frame ({e})") from e


def _frame_length(source: memoryview, stream: int) -> int:
    """The bytes one zstd frame takes (RFC 8878 section 3.1.1), walked block header by block header:
    python-zstandard tells a frame's decoded size but not where it ends."""
    params = _frame_parameters(source, stream)
    try:
        position = zstandard.frame_header_size(source)
    except zstandard.ZstdError as e:
        raise CorruptFrame(f"stream {stream}: not a zstd frame ({e})") from e
    while True:
        if position + 3 > len(source):
            raise CorruptFrame(f"stream {stream}: truncated within its zstd frame")
        header = int.from_bytes(source[position : position + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise CorruptFrame(f"stream {stream}: a zstd block of the reserved type")
        position += 3 + (1 if kind == 1 else size)  # an RLE block holds one byte
        if last:
            return position + (4 if params.has_checksum else 0)


def _decompress_into(source: memoryview, out: Bytes, stream: int) -> None:
    """One zstd frame, exactly ``len(source)`` bytes long, that must decode to exactly ``out.size``
    bytes, written straight into ``out``.

    The frame's declared size and its length are checked before anything is decoded (no skippable
    frame, nothing after it); decoding stops at ``out``'s end and refuses data past it.
    """
    if bytes(source[:4]) != _ZSTD_MAGIC:
        raise CorruptFrame(f"stream {stream}: not a zstd frame (it must start with the zstd magic number)")
    params = _frame_parameters(source, stream)
    if params.content_size != out.size:
        declared = "no size" if params.content_size == zstandard.CONTENTSIZE_UNKNOWN else f"{params.content_size} bytes"
        raise CorruptFrame(f"stream {stream}: declares {declared}, the frame needs {out.size}")
    length = _frame_length(source, stream)
    if length != len(source):
        raise CorruptFrame(f"stream {stream}: its zstd frame is {length} bytes of the {len(source)} it is given")
    try:
        reader = _decompressor().stream_reader(source, read_size=max(1, len(source)))
        view, got = out.data, 0
        while got < out.size:
            n = reader.readinto(view[got:])
            if n == 0:
                break
            got += n
        extra = reader.read(1)
    except zstandard.ZstdError as e:
        raise CorruptFrame(f"stream {stream}: cannot be decoded ({e})") from e
    if got != out.size or extra:
        raise CorruptFrame(f"stream {stream}: decodes to {'more than ' if extra else ''}{got} bytes, not {out.size}")
