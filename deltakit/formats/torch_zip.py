"""PyTorch checkpoints (``pytorch_model.bin``, Meta's ``consolidated.NN.pth``) read without running them.

A checkpoint written by ``torch.save`` is a zip archive: a pickle (``data.pkl``) that describes the
tensors, and one uncompressed entry per storage. This module reads the pickle with an unpickler
that knows only tensor rebuilding and plain containers, and refuses anything else: no code from the
file runs, which is stricter than ``torch.load(..., weights_only=True)``. Each tensor becomes a byte
range of the archive, so the engine streams ``.bin`` files with ``pread`` exactly as it streams
safetensors, in bounded memory.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from ..dtypes import ITEMSIZE
from ..errors import DeltakitError, FormatError, InputNotFoundError, UnsafePickleError, UnsupportedInputError
from ..files import open_regular
from .safetensors import TensorInfo, TensorSpec

__all__ = ["MAX_PICKLE_BYTES", "MAX_PICKLE_OPS", "TorchZipWriter", "read_torch_zip"]

# A 65B model's data.pkl is well under 1 MB; a pickle this large is not a state dict.
MAX_PICKLE_BYTES = 64 << 20

_STORAGE_DTYPES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


_MAX_RANK = 8
_MAX_DIM = 1 << 48


def _size(values: Any) -> tuple[int, ...]:
    """A shape or stride: at most 8 non-negative ints below 2**48; anything else is refused."""
    if not isinstance(values, tuple | list) or len(values) > _MAX_RANK:
        raise UnsafePickleError(f"a tensor size is a {type(values).__name__} of the wrong length, not a shape")
    if not all(type(v) is int and 0 <= v < _MAX_DIM for v in values):
        raise UnsafePickleError("a tensor size holds something other than small non-negative integers")
    return tuple(values)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise UnsafePickleError("a tensor is rebuilt from something that is not a storage")
    if type(offset) is not int or not 0 <= offset < _MAX_DIM:
        raise UnsafePickleError("a tensor's storage offset is not a small non-negative integer")
    shape, strides = _size(size), _size(stride)
    if len(strides) != len(shape):
        raise UnsafePickleError("a tensor's stride and size differ in length")
    return _TensorRef(storage, offset, shape, strides)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


class _StorageType:
    """Stands for ``torch.HalfStorage`` and its kin: only its dtype matters here."""

    def __init__(self, name: str) -> None:
        self.dtype = _STORAGE_DTYPES[name]


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,  # called with no arguments only (load_reduce)
    ("torch", "Size"): _size,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}

# The opcodes torch.save emits (protocols 2 to 4); any other one is refused before it runs.
_OPCODES = {
    op.code.encode("latin-1")[0]
    for op in pickletools.opcodes
    if op.name
    in {
        "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "NONE", "NEWTRUE", "NEWFALSE",
        "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINUNICODE",
        "EMPTY_DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
        "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "BINPUT", "LONG_BINPUT", "MEMOIZE",
        "BINGET", "LONG_BINGET", "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID",
    }
}  # fmt: skip


# torch.save spends about 32 pickle operations a tensor: this cap allows some 65,000 tensors in one
# file (a 65B model has 723 in all) while bounding what a hostile pickle makes the unpickler build:
# at most one object per operation, a few hundred MB and a second or two at the cap.
MAX_PICKLE_OPS = 1 << 21

# A state dict is a few levels deep (a checkpoint dict, the state dict, a tensor's arguments); a
# pickle nesting deeper is built to exhaust the C stack of whatever walks it later.
MAX_NESTING = 32


class _StateDictUnpickler(pickle._Unpickler):  # the pure-Python one: its dispatch table can be narrowed
    """Knows tensors, storages and ``OrderedDict``; every other global, and any opcode torch does not
    emit, is refused by name. Dict keys must be strings, so nothing crafted is ever hashed, and
    errors name types, never the crafted objects themselves.

    Containers may nest at most ``MAX_NESTING`` deep. The depth of each container is known when it is
    built, because a container that has been placed inside another is sealed: torch.save fills every
    list and dict before it places it, so a pickle that grows a sealed one is refused.
    """

    # the pure-Python unpickler's internals, which these overrides use
    stack: list[Any]
    append: Callable[[Any], None]
    pop_mark: Callable[[], list[Any]]
    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = {
        code: fn for code, fn in pickle._Unpickler.dispatch.items() if code in _OPCODES
    }

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._ops = 0  # operations run so far, against MAX_PICKLE_OPS
        self._depth: dict[int, int] = {}  # id of each container built so far -> its nesting depth
        self._sealed: set[int] = set()
        self._alive: list[Any] = []  # holds every container, so that no id is reused while loading

    def _nest(self, container: Any, children: Iterable[Any] = ()) -> Any:
        """Record that ``container`` now holds ``children``, sealing them; refuse too deep a nest."""
        key = id(container)
        if key in self._sealed:
            raise UnsafePickleError("the pickle changes a container after placing it in another; torch.save never does")
        depth = self._depth.get(key)
        if depth is None:
            self._alive.append(container)
            depth = 1
        for child in children:
            inner = self._depth.get(id(child))
            if inner is not None:
                if type(child) is not tuple:  # tuples cannot grow (and the empty one is shared)
                    self._sealed.add(id(child))
                depth = max(depth, inner + 1)
        if depth > MAX_NESTING:
            raise UnsafePickleError(
                f"the pickle nests containers more than {MAX_NESTING} deep; a state dict needs a few levels"
            )
        self._depth[key] = depth
        return container

    def _check_keys(self, keys: Iterable[Any]) -> None:
        if not all(type(k) is str for k in keys):
            raise UnsafePickleError("a dict key is not a string; a state dict maps names to tensors")

    def load_empty_tuple(self) -> None:
        self.append(self._nest(()))

    def load_tuple(self) -> None:
        items = self.pop_mark()
        self.append(self._nest(tuple(items), items))

    def load_tuple1(self) -> None:
        self.stack[-1] = self._nest((self.stack[-1],), self.stack[-1:])

    def load_tuple2(self) -> None:
        items = self.stack[-2:]
        self.stack[-2:] = [self._nest(tuple(items), items)]

    def load_tuple3(self) -> None:
        items = self.stack[-3:]
        self.stack[-3:] = [self._nest(tuple(items), items)]

    def load_empty_list(self) -> None:
        self.append(self._nest([]))

    def load_list(self) -> None:
        items = self.pop_mark()
        self.append(self._nest(list(items), items))

    def load_append(self) -> None:
        value = self.stack.pop()
        target = self.stack[-1]
        if type(target) is not list:
            raise UnsafePickleError(f"the pickle appends to a {type(target).__name__}, not a list")
        self._nest(target, [value]).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not list:
            raise UnsafePickleError(f"the pickle appends to a {type(target).__name__}, not a list")
        self._nest(target, items).extend(items)

    def load_empty_dictionary(self) -> None:
        self.append(self._nest({}))

    def _set_items(self, items: list[Any]) -> None:
        target = self.stack[-1]
        if not isinstance(target, dict):
            raise UnsafePickleError(f"the pickle sets items of a {type(target).__name__}, not a dict")
        keys, values = items[0::2], items[1::2]
        self._check_keys(keys)
        self._nest(target, values)
        for key, value in zip(keys, values, strict=True):
            target[key] = value

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_items([key, value])

    def load_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise UnsafePickleError("the pickle sets a dict item without a value")
        self._set_items(items)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        function = self.stack[-1]
        if type(args) is not tuple:
            raise UnsafePickleError(f"the pickle calls {getattr(function, '__name__', 'a function')} on a non-tuple")
        if function is collections.OrderedDict:
            if args:  # torch.save writes OrderedDict() and then sets its items, which are checked there
                raise UnsafePickleError("the pickle builds an OrderedDict from arguments; torch.save never does")
            self.stack[-1] = self._nest(collections.OrderedDict())
            return
        self.stack[-1] = function(*args)

    def load_build(self) -> None:
        state = self.stack.pop()
        if not isinstance(self.stack[-1], collections.OrderedDict) or not isinstance(state, dict):
            raise UnsafePickleError("the pickle sets the state of something other than a state dict")
        self._check_keys(state)  # _metadata and its kin: nothing deltakit needs, so dropped

    dispatch[pickle.EMPTY_TUPLE[0]] = load_empty_tuple
    dispatch[pickle.TUPLE[0]] = load_tuple
    dispatch[pickle.TUPLE1[0]] = load_tuple1
    dispatch[pickle.TUPLE2[0]] = load_tuple2
    dispatch[pickle.TUPLE3[0]] = load_tuple3
    dispatch[pickle.EMPTY_LIST[0]] = load_empty_list
    dispatch[pickle.LIST[0]] = load_list
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.EMPTY_DICT[0]] = load_empty_dictionary
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"the pickle asks for {module[:100]}.{name[:100]}, which is not part of a tensor state dict; "
                "refusing to load it (it could run code)",
                actual=f"{module[:100]}.{name[:100]}",
            )
        return allowed

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unknown persistent id (a {type(pid).__name__})")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or type(key) is not str or type(numel) is not int:
            raise UnsafePickleError("malformed storage reference")
        if not 0 <= numel < _MAX_DIM or len(key) > 64:
            raise UnsafePickleError("storage reference out of range")
        return _StorageRef(key, storage_type.dtype, numel)


def _counted(op: Callable[[Any], None]) -> Callable[[_StateDictUnpickler], None]:
    """``op``, refused once the pickle has run ``MAX_PICKLE_OPS`` operations: every object the
    unpickler builds costs one, so this bounds its time and memory by far less than the size cap."""

    def counted(self: _StateDictUnpickler) -> None:
        self._ops += 1
        if self._ops > MAX_PICKLE_OPS:
            raise UnsafePickleError(
                f"data.pkl runs more than {MAX_PICKLE_OPS} operations; "
                "a state dict needs about 32 a tensor: it is not a state dict"
            )
        op(self)

    return counted


# every opcode the unpickler accepts goes through the count
_StateDictUnpickler.dispatch = {code: _counted(op) for code, op in _StateDictUnpickler.dispatch.items()}


def _read_small(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int = 16) -> bytes:
    """At most ``limit`` bytes of an entry: a compressed entry is never inflated past what is asked
    (``ZipFile.read`` would inflate a whole chunk at once, whatever its header promises)."""
    with archive.open(info) as entry:
        return entry.read(limit)


_DESCRIPTOR = b"PK\x07\x08"


def _descriptor_agrees(tail: bytes, info: zipfile.ZipInfo) -> bool:
    """Whether ``tail`` starts with a data descriptor that repeats the central directory's CRC and sizes.

    The descriptor's signature is optional in the zip specification, but every writer of checkpoints
    (torch's miniz, Python's zipfile) writes it, and without it a data range shifted by four bytes
    would read the descriptor's own fields as one.
    """
    expected = (info.CRC, info.compress_size, info.file_size)
    return tail.startswith(_DESCRIPTOR) and any(
        len(tail) >= 4 + struct.calcsize(layout) and struct.unpack_from(layout, tail, 4) == expected
        for layout in ("<III", "<IQQ")  # zip64 descriptors carry 8-byte sizes
    )


def _data_start(archive: Path, raw: BinaryIO, info: zipfile.ZipInfo, limit: int) -> int:
    """Where an entry's bytes start, from its local header, checked against the central directory.

    The local header's extra field may differ from the central directory's (torch pads it to align
    storages), so the data's start comes from the local header alone; a wrong extra length there
    would shift every byte silently. So the data must end where the entry's data descriptor (which
    repeats the CRC and sizes) or, without one, the next entry begins: ``limit``.
    """
    raw.seek(info.header_offset)
    local = raw.read(30)
    where = f"{archive}: zip entry {info.filename}"
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise FormatError(f"{where} has no local header", path=archive)
    flags, method, crc, compressed, size, name_len, extra_len = struct.unpack("<2xHH4xIIIHH", local[4:30])
    if raw.read(name_len) != info.orig_filename.encode("utf-8" if flags & 0x800 else "cp437", "replace"):
        raise FormatError(f"{where}: the local header names another file than the central directory", path=archive)
    start = int(info.header_offset) + 30 + int(name_len) + int(extra_len)
    end = start + int(info.compress_size)
    if method != info.compress_type:
        raise FormatError(f"{where}: the local header and central directory disagree on compression", path=archive)
    if flags & 0x08:  # sizes follow the data, in a descriptor
        raw.seek(end)
        tail = raw.read(min(24, max(limit - end, 0)))
        agrees = _descriptor_agrees(tail, info) and end + 16 <= limit
    else:
        sizes_agree = (crc, compressed, size) == (info.CRC, info.compress_size, info.file_size)
        zip64 = compressed == size == 0xFFFFFFFF
        agrees = (sizes_agree or zip64) and end == limit
    if not agrees:
        raise FormatError(
            f"{where}: its data does not end where the archive says (a wrong extra-field length in its local "
            "header would shift every byte): the file is damaged",
            path=archive,
        )
    return start


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def read_torch_zip(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of a ``torch.save`` zip archive, as byte ranges of the file, in pickle order.

    Raises:
        UnsafePickleError: the pickle asks for anything beyond tensors and plain containers.
        UnsupportedInputError: the legacy (pre-zip) format, a compressed entry, a big-endian file,
            a tensor stored non-contiguously, or a FIFO, device or folder in place of the file.
        FormatError: the archive or pickle is malformed; the message names the file and tensor.
    """
    path = Path(path)
    try:
        with open_regular(path) as archive_file, open_regular(path) as raw:
            return _read_torch_zip(path, archive_file, raw)
    except UnsafePickleError as e:
        if e.path is not None:
            raise
        raise UnsafePickleError(f"{path}: {e}", path=path, actual=e.actual) from e
    except InputNotFoundError as e:
        raise InputNotFoundError(f"{path}: no such file", path=path) from e
    except DeltakitError:
        raise
    except Exception as e:  # a damaged archive fails in many ways inside zipfile, zlib and struct
        raise FormatError(f"{path}: damaged or unreadable archive: {type(e).__name__}: {e}", path=path) from e


def _read_torch_zip(path: Path, archive_file: BinaryIO, raw: BinaryIO) -> dict[str, TensorInfo]:
    """``read_torch_zip`` on ``path``, opened twice: once for zipfile, once for its raw bytes."""
    if not zipfile.is_zipfile(archive_file):
        raise UnsupportedInputError(
            f"{path}: not a zip archive; this is the legacy torch.save format (torch < 1.6): "
            "load and save it again with a current torch",
            path=path,
        )
    try:
        with zipfile.ZipFile(archive_file) as archive:
            entries = {info.filename: info for info in archive.infolist()}
            pickles = [name for name in entries if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise FormatError(f"{path}: expected one */data.pkl in the archive, found {len(pickles)}", path=path)
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = entries.get(prefix + "byteorder")
            if byteorder is not None and _read_small(archive, byteorder).strip() != b"little":
                raise UnsupportedInputError(f"{path}: a big-endian checkpoint; only little-endian is read", path=path)
            pickled = _read_small(archive, entries[pickles[0]], MAX_PICKLE_BYTES + 1)
            if len(pickled) > MAX_PICKLE_BYTES:
                raise FormatError(f"{path}: data.pkl is larger than the {MAX_PICKLE_BYTES} byte cap", path=path)
            try:
                state = _StateDictUnpickler(io.BytesIO(pickled)).load()
            except (UnsafePickleError, FormatError):
                raise
            except KeyError as e:  # the narrowed dispatch table has no entry for this opcode
                op = e.args[0] if e.args and isinstance(e.args[0], int) else None
                what = f"pickle opcode {bytes([op])!r}, which torch.save never writes" if op is not None else e
                raise UnsafePickleError(f"{path}: data.pkl uses {what}; refusing it", path=path) from e
            except Exception as e:  # any malformed pickle: the unpickler raises many kinds
                raise FormatError(f"{path}: data.pkl is not a readable pickle: {type(e).__name__}", path=path) from e
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            if not isinstance(state, dict):
                raise FormatError(f"{path}: the pickle holds a {type(state).__name__}, not a state dict", path=path)
            limits = _entry_limits(archive)
            tensors: dict[str, TensorInfo] = {}
            for name, ref in state.items():
                if not name.isascii() and not _encodable(name):
                    raise FormatError(
                        f"{path}: a tensor name is not valid Unicode (a lone surrogate): "
                        f"{name.encode('utf-8', 'replace').decode()!r}",
                        path=path,
                    )
                if name == "__metadata__":
                    raise FormatError(
                        f"{path}: holds a tensor named '__metadata__', the name safetensors keeps for its metadata: "
                        "rename it",
                        path=path,
                        tensor=name,
                    )
                if not isinstance(ref, _TensorRef):
                    raise UnsupportedInputError(
                        f"{path}: entry {name!r} is a {type(ref).__name__}, not a tensor", path=path, tensor=str(name)
                    )
                tensors[name] = _locate(path, raw, entries, limits, prefix, name, ref)
            return tensors
    except zipfile.BadZipFile as e:
        raise FormatError(f"{path}: damaged zip archive: {e}", path=path) from e


def _encodable(name: str) -> bool:
    try:  # pickles decode with surrogatepass, so a name can hold a lone surrogate that no file can
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _entry_limits(archive: zipfile.ZipFile) -> dict[str, int]:
    """For each entry, where the next one (or the central directory) begins: no entry's data may pass it."""
    ordered = sorted(archive.infolist(), key=lambda info: info.header_offset)
    ends = [info.header_offset for info in ordered[1:]] + [archive.start_dir]
    return {info.filename: int(end) for info, end in zip(ordered, ends, strict=True)}


def _locate(
    path: Path,
    raw: BinaryIO,
    entries: dict[str, zipfile.ZipInfo],
    limits: dict[str, int],
    prefix: str,
    name: str,
    ref: _TensorRef,
) -> TensorInfo:
    item = ITEMSIZE[ref.storage.dtype]
    info = entries.get(f"{prefix}data/{ref.storage.key}")
    if info is None:
        raise FormatError(f"{path}: tensor {name!r} refers to a storage the archive lacks", path=path, tensor=name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise UnsupportedInputError(f"{path}: storage of {name!r} is compressed", path=path, tensor=name)
    if info.file_size != ref.storage.numel * item:
        raise FormatError(
            f"{path}: storage of {name!r} holds {info.file_size} bytes, not {ref.storage.numel} x {item}",
            path=path,
            tensor=name,
        )
    numel = math.prod(ref.shape)
    if numel and ref.stride != _contiguous_strides(ref.shape):
        raise UnsupportedInputError(
            f"{path}: tensor {name!r} is stored non-contiguously (stride {list(ref.stride)}); "
            "save it again with contiguous tensors",
            path=path,
            tensor=name,
        )
    if ref.offset < 0 or ref.offset + numel > ref.storage.numel:
        raise FormatError(f"{path}: tensor {name!r} reaches past its storage", path=path, tensor=name)
    start = _data_start(path, raw, info, limits[info.filename]) + ref.offset * item
    return TensorInfo(name, ref.storage.dtype, ref.shape, path, start, start + numel * item)


_STORAGE_CLASSES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}


class TorchZipWriter:
    """Writes a checkpoint that ``torch.load(..., weights_only=True)`` reads, one tensor at a time.

    The pickle is written first, from the tensor list alone; then each tensor's storage streams into
    its own uncompressed zip entry, so no tensor is ever held whole.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], *, prefix: str = "archive") -> None:
        import torch  # the pickle must name torch's own rebuild function and storage classes
        import torch._utils

        self.path = path
        self._prefix = prefix
        self._specs = specs
        self._next = 0
        storage_types = {dtype: getattr(torch, name) for dtype, name in _STORAGE_CLASSES.items()}

        class _Storage:
            def __init__(self, key: str, spec: TensorSpec) -> None:
                self.key, self.spec = key, spec

        class _Tensor:
            def __init__(self, storage: _Storage) -> None:
                self.storage = storage

            def __reduce__(self) -> tuple[Any, ...]:
                shape = self.storage.spec.shape
                hooks: collections.OrderedDict[str, Any] = collections.OrderedDict()
                args = (self.storage, 0, tuple(shape), _contiguous_strides(shape), False, hooks)
                return (torch._utils._rebuild_tensor_v2, args)

        def persistent_id(obj: object) -> tuple[Any, ...] | None:
            if isinstance(obj, _Storage):
                return ("storage", storage_types[obj.spec.dtype], obj.key, "cpu", obj.spec.numel)
            return None

        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=2)
        pickler.persistent_id = persistent_id  # type: ignore[method-assign]
        pickler.dump({spec.name: _Tensor(_Storage(str(i), spec)) for i, spec in enumerate(specs)})
        self._zip = zipfile.ZipFile(path, "x", zipfile.ZIP_STORED, allowZip64=True)
        self._zip.writestr(f"{prefix}/data.pkl", buffer.getvalue())
        self._zip.writestr(f"{prefix}/byteorder", "little")

    def write_tensor(self, chunks: Iterable[bytes | memoryview]) -> None:
        """The next tensor's bytes, in order; their total must be the tensor's size."""
        spec = self._specs[self._next]
        written = 0
        with self._zip.open(f"{self._prefix}/data/{self._next}", "w", force_zip64=True) as entry:
            for chunk in chunks:
                entry.write(chunk)
                written += len(chunk)
        if written != spec.nbytes:
            raise FormatError(
                f"{self.path}: tensor {spec.name!r} got {written} bytes, not {spec.nbytes}", path=self.path
            )
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._specs):
            raise FormatError(f"{self.path}: {len(self._specs) - self._next} tensors were not written", path=self.path)
        self._zip.writestr(f"{self._prefix}/version", "3\n")
        self._zip.close()

    def abort(self) -> None:
        self._zip.close()
