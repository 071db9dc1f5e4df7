"""The delta manifest (``deltakit.json``, formats 1 and 2) as frozen dataclasses, to and from JSON.

Reading validates every field: a manifest comes from whoever published the delta, so nothing in it
is trusted, least of all the file paths it names.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .codecs.frames import CODERS, MAX_FRAME_BYTES, MIN_FRAME_BYTES, SPLITS, Frame, stream_count
from .dtypes import ITEMSIZE, is_float, itemsize, shape_fault
from .errors import InputNotFoundError, ManifestError
from .files import read_regular
from .hashing import fingerprint

__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PAYLOAD_TAGS",
    "READABLE_FORMATS",
    "FileRecord",
    "Manifest",
    "ModelRecord",
    "TargetRecord",
    "TargetTensor",
    "TensorRecord",
    "load_manifest",
]

FORMAT_VERSION = 2  # the format make writes; every format in READABLE_FORMATS stays readable
READABLE_FORMATS = (1, 2)
MANIFEST_NAME = "deltakit.json"
PAYLOAD_TAGS = {1: "delta/1", 2: "delta/2"}
# Format 2 adds ``sub`` (bit patterns subtracted modulo 2^bits, zigzag-mapped) beside ``xor``.
ENCODINGS = {
    1: frozenset({"xor", "add", "rows", "raw", "copy"}),
    2: frozenset({"xor", "sub", "add", "rows", "raw", "copy"}),
}
ROW_CODECS = {1: frozenset({"xor", "add"}), 2: frozenset({"xor", "sub", "add"})}
# A 70B model's manifest is about 1 MB; anything near this cap is not a manifest.
MAX_MANIFEST_BYTES = 64 << 20
# Every array or object a real manifest holds spans more than this many bytes (the smallest, a frame
# record such as [8388608, "stored"], spans 20); a text of empty ones ("[[],[],...]") costs json.loads
# 16 s and 1.8 GB at 63 MiB, so the count is checked first.
MIN_BYTES_PER_CONTAINER = 8
# Frames in one manifest: 8 TB of model at 8 MiB a frame. The cap bounds what parsing a hostile
# manifest of tiny frames costs (about 300 MB and a few seconds at the cap).
MAX_FRAMES = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorRecord:
    """A tensor as it must be: dtype, shape and the BLAKE3 digest of its bytes."""

    dtype: str
    shape: tuple[int, ...]
    digest: str


@dataclass(frozen=True)
class TargetTensor:
    """A target tensor and how to rebuild it from the base tensor of the same name.

    Attributes:
        encoding: ``xor``, ``add``, ``rows``, ``raw`` or ``copy`` (see DESIGN.md).
        cast_from: the base tensor's dtype when it differs and is cast to ``dtype`` first.
        codec: for ``rows``, how the shared leading rows are encoded (``xor`` or ``add``).
        base_rows: for ``rows``, how many leading rows the base provides.
        source_digest: for ``add``, the fine-tune's own digest where the rebuild differs from it.
        inexact: for ``add``, how many elements of the rebuild differ from the fine-tune.
        split: format 2, tensors with payload: how payload elements are split into byte streams.
        frames: format 2, tensors with payload: the frame table, in payload order.
    """

    dtype: str
    shape: tuple[int, ...]
    digest: str
    encoding: str
    cast_from: str | None = None
    codec: str | None = None
    base_rows: int | None = None
    source_digest: str | None = None
    inexact: int | None = None
    split: str | None = None
    frames: tuple[Frame, ...] | None = None

    @property
    def coded_bytes(self) -> int:
        """Bytes of this tensor's format 2 payload (the sum of its frames' coded sizes)."""
        return sum(f.coded_size(itemsize(self.dtype)) for f in self.frames or ())

    @property
    def needs_base(self) -> bool:
        return self.encoding != "raw"

    @property
    def has_payload(self) -> bool:
        return self.encoding != "copy"


@dataclass(frozen=True)
class FileRecord:
    """A file, by size and SHA-256."""

    sha256: str
    size: int


@dataclass(frozen=True)
class ModelRecord:
    """The base model a delta applies to."""

    name: str
    fingerprint: str
    tensors: dict[str, TensorRecord]


@dataclass(frozen=True)
class TargetRecord:
    """The model a delta rebuilds: its tensors, and its non-weight files (kept under ``files/``)."""

    name: str
    fingerprint: str
    tensors: dict[str, TargetTensor]
    files: dict[str, FileRecord]


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild and check a target from its base: ``deltakit.json``."""

    created_by: str
    base: ModelRecord
    target: TargetRecord
    payload: dict[str, FileRecord]
    dropped: tuple[str, ...] = ()
    hash: str = "blake3"
    format: int = field(default=FORMAT_VERSION)

    def to_json(self) -> str:
        """Serialise with stable key order; optional tensor fields appear only when set."""
        return json.dumps(_manifest_to_dict(self), indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate a manifest; every problem is a :class:`ManifestError` naming the field."""
        containers = text.count("[") + text.count("{")
        if containers * MIN_BYTES_PER_CONTAINER > len(text):
            raise ManifestError(
                f"{source}: {containers} JSON arrays and objects in {len(text)} characters; a manifest's records "
                f"each span at least {MIN_BYTES_PER_CONTAINER}",
                path=source,
                expected=f"at most {len(text) // MIN_BYTES_PER_CONTAINER}",
                actual=containers,
            )
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ManifestError(f"{source}: not valid JSON: {e}", path=source) from e
        try:  # JSON escapes can smuggle in lone surrogates, which no file name or tensor name may hold
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ManifestError(f"{source}: holds a string that is not valid Unicode ({e.reason})", path=source) from e
        return _manifest_from_dict(data, source)


def load_manifest(folder: str | Path) -> Manifest:
    """Read ``deltakit.json`` from a delta package folder.

    Raises:
        InputNotFoundError: the folder does not exist.
        UnsupportedInputError: ``deltakit.json`` is a FIFO, device or folder (never read, so never waited on).
        ManifestError: it is missing, unreadable, oversized or invalid.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        raw = read_regular(path, limit=MAX_MANIFEST_BYTES)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: larger than the {MAX_MANIFEST_BYTES} byte cap", path=path)
        text = raw.decode("utf-8")
    except FileNotFoundError as e:
        if not Path(folder).exists():
            raise InputNotFoundError(f"{folder}: no such delta package", path=folder) from e
        raise ManifestError(f"{folder} holds no {MANIFEST_NAME}: it is not a deltakit delta package", path=path) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read: {e}", path=path) from e
    return Manifest.from_json(text, source=str(path))


def _tensor_dict(record: TensorRecord | TargetTensor) -> dict[str, Any]:
    out: dict[str, Any] = {"dtype": record.dtype, "shape": list(record.shape), "digest": record.digest}
    if isinstance(record, TargetTensor):
        out["encoding"] = record.encoding
        for key in ("cast_from", "codec", "base_rows", "source_digest", "inexact", "split"):
            value = getattr(record, key)
            if value is not None:
                out[key] = value
        if record.frames is not None:
            out["frames"] = [[f.elements, f.coder, *f.streams] for f in record.frames]
    return out


def _files_dict(files: dict[str, FileRecord]) -> dict[str, Any]:
    return {name: {"sha256": f.sha256, "size": f.size} for name, f in files.items()}


def _manifest_to_dict(m: Manifest) -> dict[str, Any]:
    return {
        "format": m.format,
        "created_by": m.created_by,
        "hash": m.hash,
        "base": {
            "name": m.base.name,
            "fingerprint": m.base.fingerprint,
            "tensors": {n: _tensor_dict(t) for n, t in m.base.tensors.items()},
        },
        "target": {
            "name": m.target.name,
            "fingerprint": m.target.fingerprint,
            "tensors": {n: _tensor_dict(t) for n, t in m.target.tensors.items()},
            "files": _files_dict(m.target.files),
        },
        "payload": _files_dict(m.payload),
        "dropped": list(m.dropped),
    }


class _Reader:
    """Typed field access that names the offending field in its errors."""

    def __init__(self, source: str, version: int = FORMAT_VERSION) -> None:
        self.source = source
        self.version = version
        self.frames = 0  # frames read so far, against MAX_FRAMES

    def fail(self, where: str, message: str) -> ManifestError:
        return ManifestError(f"{self.source}: {where}: {message}", path=self.source)

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "must be a JSON object")
        return value

    def get(self, obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if key not in obj:
            raise self.fail(where, f"missing field {key!r}")
        value = obj[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self.fail(f"{where}.{key}", f"has the wrong type ({type(value).__name__})")
        return value

    def opt(self, obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
        return None if obj.get(key) is None else self.get(obj, key, kind, where)

    def digest(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise self.fail(where, "must be 64 lowercase hex digits")
        return value

    def fingerprint(self, value: Any, tensors: dict[str, TensorRecord] | dict[str, TargetTensor], where: str) -> str:
        """A fingerprint must be the one its tensor records give: it names the model to users, the
        registry and the service, so a manifest cannot claim another model's."""
        claimed = self.digest(value, where)
        actual = fingerprint((n, t.dtype, t.shape, t.digest) for n, t in tensors.items())
        if claimed != actual:
            raise self.fail(where, f"is {claimed[:16]}..., but its tensor records give {actual[:16]}...")
        return claimed

    def count(self, value: Any, where: str) -> int:
        if type(value) is not int or value < 0:
            raise self.fail(where, "must be a non-negative integer")
        return value

    def dtype(self, value: Any, where: str) -> str:
        if value not in ITEMSIZE:
            raise self.fail(where, f"unknown dtype {value!r}")
        return str(value)

    def shape(self, value: Any, dtype: str, where: str) -> tuple[int, ...]:
        """A shape apply can write: what the safetensors header reader accepts, by the same rules."""
        if not isinstance(value, list):
            raise self.fail(where, "must be a list of non-negative integers")
        shape = tuple(self.count(d, where) for d in value)
        fault = shape_fault(shape, dtype)
        if fault is not None:
            raise self.fail(where, fault)
        return shape

    def tensor(self, name: str, value: Any, where: str) -> TensorRecord:
        where = f"{where}[{name!r}]"
        obj = self.obj(value, where)
        dtype = self.dtype(self.get(obj, "dtype", str, where), f"{where}.dtype")
        return TensorRecord(
            dtype=dtype,
            shape=self.shape(self.get(obj, "shape", list, where), dtype, f"{where}.shape"),
            digest=self.digest(self.get(obj, "digest", str, where), f"{where}.digest"),
        )

    def target_tensor(self, name: str, value: Any, where: str) -> TargetTensor:
        base = self.tensor(name, value, where)
        where = f"{where}[{name!r}]"
        obj = value
        encoding = self.get(obj, "encoding", str, where)
        if encoding not in ENCODINGS[self.version]:
            raise self.fail(f"{where}.encoding", f"unknown encoding {encoding!r} in format {self.version}")
        cast_from = self.opt(obj, "cast_from", str, where)
        codec = self.opt(obj, "codec", str, where)
        base_rows = self.opt(obj, "base_rows", int, where)
        source_digest = self.opt(obj, "source_digest", str, where)
        inexact = self.opt(obj, "inexact", int, where)
        if cast_from is not None:
            self.dtype(cast_from, f"{where}.cast_from")
        if source_digest is not None:
            self.digest(source_digest, f"{where}.source_digest")
        if inexact is not None:
            self.count(inexact, f"{where}.inexact")
        if encoding == "rows":
            if codec not in ROW_CODECS[self.version]:
                raise self.fail(
                    f"{where}.codec", f"a rows tensor needs codec {' or '.join(sorted(ROW_CODECS[self.version]))}"
                )
            if base_rows is None or not base.shape or not 0 < self.count(base_rows, where) < base.shape[0]:
                raise self.fail(f"{where}.base_rows", "must be between 1 and the target's rows - 1")
        split, frames = self.framing(obj, base, encoding, base_rows, cast_from, where)
        return TargetTensor(
            base.dtype,
            base.shape,
            base.digest,
            encoding,
            cast_from,
            codec,
            base_rows,
            source_digest,
            inexact,
            split,
            frames,
        )

    def framing(
        self,
        obj: dict[str, Any],
        t: TensorRecord,
        encoding: str,
        base_rows: int | None,
        cast_from: str | None,
        where: str,
    ) -> tuple[str | None, tuple[Frame, ...] | None]:
        """Format 2's split and frame table; checked so that apply can size every buffer from them."""
        if self.version < 2 or encoding == "copy":
            if "split" in obj or "frames" in obj:
                raise self.fail(where, "split and frames belong to format 2 tensors with a payload")
            return None, None
        split = self.get(obj, "split", str, where)
        if split not in SPLITS:
            raise self.fail(f"{where}.split", f"unknown split {split!r}")
        size = itemsize(t.dtype)
        widest = max(size, itemsize(cast_from) if cast_from else size)
        numel = math.prod(t.shape)
        boundary = base_rows * math.prod(t.shape[1:]) if base_rows is not None else numel
        frames: list[Frame] = []
        position = 0
        table = self.get(obj, "frames", list, where)
        most = -(-numel * widest // MIN_FRAME_BYTES) + 1
        if len(table) > most:
            raise self.fail(
                f"{where}.frames",
                f"{len(table)} frames for {numel} elements; at most {most} "
                f"(one per {MIN_FRAME_BYTES} bytes of {widest}-byte elements, plus one)",
            )
        self.frames += len(table)
        if self.frames > MAX_FRAMES:
            raise self.fail(f"{where}.frames", f"brings the manifest past {MAX_FRAMES} frames")
        for i, value in enumerate(table):
            here = f"{where}.frames[{i}]"
            if not isinstance(value, list) or len(value) < 2:
                raise self.fail(here, "must be [elements, coder, stream sizes...]")
            elements, coder, streams = self.count(value[0], here), value[1], tuple(value[2:])
            if coder not in CODERS:
                raise self.fail(here, f"unknown coder {coder!r}")
            if not 0 < elements * widest <= MAX_FRAME_BYTES:
                raise self.fail(here, f"{elements} elements is not between 1 and {MAX_FRAME_BYTES // widest}")
            if position < boundary < position + elements:
                raise self.fail(here, f"crosses the base's last row (element {boundary})")
            if coder == "stored" and streams:
                raise self.fail(here, "a stored frame has no stream sizes")
            if coder == "zstd":
                if len(streams) != stream_count(split, size):
                    raise self.fail(here, f"needs {stream_count(split, size)} stream sizes for split {split!r}")
                if sum(self.count(n, here) for n in streams) > elements * size:
                    raise self.fail(here, "its coded streams are larger than the frame they decode to")
            frames.append(Frame(elements, coder, streams))
            position += elements
        if position != numel:
            raise self.fail(f"{where}.frames", f"cover {position} elements; the tensor has {numel}")
        return split, tuple(frames)

    def files(self, value: Any, where: str, *, nested: bool) -> dict[str, FileRecord]:
        obj = self.obj(value, where)
        files: dict[str, FileRecord] = {}
        for name, entry in obj.items():
            here = f"{where}[{name!r}]"
            _check_relative_path(self, name, here, nested=nested)
            entry = self.obj(entry, here)
            files[name] = FileRecord(
                sha256=self.digest(self.get(entry, "sha256", str, here), f"{here}.sha256"),
                size=self.count(self.get(entry, "size", int, here), f"{here}.size"),
            )
        return files


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _check_relative_path(r: _Reader, name: str, where: str, *, nested: bool) -> None:
    """Refuse names that could escape the folder they are written into."""
    pure = PurePosixPath(name)
    bad = (
        not name
        or pure.is_absolute()
        or "\\" in name
        or "\x00" in name
        or any(part in ("", ".", "..") or part.startswith(".") for part in name.split("/"))
        or (not nested and len(pure.parts) != 1)
    )
    if bad:
        raise r.fail(where, "is not a safe relative file name")


def _check_against_base(r: _Reader, name: str, t: TargetTensor, base: TensorRecord | None) -> None:
    """A target tensor's encoding must agree with its base record: apply trusts that they do."""
    where = f"target.tensors[{name!r}]"
    if not t.needs_base:
        if t.cast_from is not None or t.codec is not None or t.base_rows is not None:
            raise r.fail(where, "a raw tensor takes no cast_from, codec or base_rows")
        return
    if base is None:
        raise r.fail(where, f"encoding {t.encoding!r} needs a base tensor of that name")
    if base.dtype != (t.cast_from or t.dtype):
        raise r.fail(where, f"base is {base.dtype}, but cast_from says {t.cast_from or t.dtype}")
    if t.cast_from is not None and not (is_float(t.cast_from) and is_float(t.dtype)):
        raise r.fail(f"{where}.cast_from", "casts are between float dtypes only")
    if t.encoding == "rows":
        assert t.base_rows is not None  # checked by target_tensor
        if base.shape != (t.base_rows, *t.shape[1:]):
            raise r.fail(where, f"base shape {list(base.shape)} is not base_rows {t.base_rows} x the target's rows")
    else:
        if base.shape != t.shape:
            raise r.fail(where, f"base shape {list(base.shape)} differs from the target's {list(t.shape)}")
        if t.codec is not None or t.base_rows is not None:
            raise r.fail(where, "codec and base_rows belong to 'rows' tensors only")
    if "add" in (t.encoding, t.codec) and not is_float(t.dtype):
        raise r.fail(where, f"'add' applies to float tensors, not {t.dtype}")


def _manifest_from_dict(data: Any, source: str) -> Manifest:
    r = _Reader(source)
    top = r.obj(data, "manifest")
    version = r.get(top, "format", int, "manifest")
    if version not in READABLE_FORMATS:
        raise r.fail(
            "format",
            f"is {version}; this deltakit reads formats {', '.join(map(str, READABLE_FORMATS))}"
            + (" (upgrade deltakit)" if version > max(READABLE_FORMATS) else ""),
        )
    r.version = version
    hash_name = r.get(top, "hash", str, "manifest")
    if hash_name != "blake3":
        raise r.fail("hash", f"is {hash_name!r}; only 'blake3' is known")
    base = r.obj(r.get(top, "base", dict, "manifest"), "base")
    target = r.obj(r.get(top, "target", dict, "manifest"), "target")
    base_tensors = {n: r.tensor(n, v, "base.tensors") for n, v in r.get(base, "tensors", dict, "base").items()}
    target_tensors = {
        n: r.target_tensor(n, v, "target.tensors") for n, v in r.get(target, "tensors", dict, "target").items()
    }
    for name, t in target_tensors.items():
        _check_against_base(r, name, t, base_tensors.get(name))
    dropped = r.get(top, "dropped", list, "manifest") if "dropped" in top else []
    if not all(isinstance(n, str) for n in dropped):
        raise r.fail("dropped", "must be a list of tensor names")
    return Manifest(
        format=version,
        created_by=r.get(top, "created_by", str, "manifest"),
        hash=hash_name,
        base=ModelRecord(
            name=r.get(base, "name", str, "base"),
            fingerprint=r.fingerprint(r.get(base, "fingerprint", str, "base"), base_tensors, "base.fingerprint"),
            tensors=base_tensors,
        ),
        target=TargetRecord(
            name=r.get(target, "name", str, "target"),
            fingerprint=r.fingerprint(
                r.get(target, "fingerprint", str, "target"), target_tensors, "target.fingerprint"
            ),
            tensors=target_tensors,
            files=r.files(r.get(target, "files", dict, "target"), "target.files", nested=True),
        ),
        payload=r.files(r.get(top, "payload", dict, "manifest"), "payload", nested=False),
        dropped=tuple(dropped),
    )
