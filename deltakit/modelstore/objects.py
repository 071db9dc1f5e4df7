"""Where the model store keeps its bytes: immutable objects under string keys, on a local disk or in a bucket.

Objects are written once, completely or not at all, and never changed; the catalog says what they mean.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import InputNotFoundError, UnsupportedInputError
from ..staging import fsync_path

__all__ = ["KEY", "LocalObjects", "Objects", "check_key", "open_objects"]

# A key is a relative, slash-separated name of plain parts: no '..', no leading slash, nothing a file
# system or a bucket would read another way.
KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")


def check_key(key: str) -> str:
    """``key`` if it is a valid object key; else an ``UnsupportedInputError`` naming it."""
    if len(key) > 512 or not KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise UnsupportedInputError(f"{key!r} is not a valid object key")
    return key


@runtime_checkable
class Objects(Protocol):
    """An object store: the model store's bytes, by key.

    Every method may raise ``InputNotFoundError`` for a missing key; writes are atomic (a reader sees
    the whole object or none).
    """

    def describe(self) -> str:
        """Where the objects live, for messages and the page (``/srv/deltakit/store``, ``s3://bucket/prefix``)."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key`` (replacing nothing: an existing key is left as it is)."""
        ...

    def get_file(self, key: str, dest: Path) -> None:
        """Write the object to ``dest`` (a temporary name first, then renamed into place)."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The object as a file on this machine, to read in place, or None where the store is remote."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        ...

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every key that starts with ``prefix``, in no particular order."""
        ...


class LocalObjects:
    """Objects as files under one folder (the default store, ``$DELTAKIT_HOME/store``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as e:
            raise InputNotFoundError(f"the store has no object {key!r}", path=str(self._path(key))) from e

    def put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        if dest.is_file():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        temp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            try:
                os.link(path, temp)  # same disk: no copy; the source is never written again
            except OSError:
                _copy(Path(path), temp)
            fsync_path(temp)
            os.replace(temp, dest)
        finally:
            temp.unlink(missing_ok=True)

    def get_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise InputNotFoundError(f"the store has no object {key!r}", path=str(src))
        temp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            _copy(src, temp)
            os.replace(temp, dest)
        finally:
            temp.unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        if not path.is_file():
            raise InputNotFoundError(f"the store has no object {key!r}", path=str(path))
        return path

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys(self, prefix: str = "") -> Iterator[str]:
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key


def open_objects(spec: str | None, home: Path) -> Objects:
    """The store that ``spec`` (the DELTAKIT_STORE setting) names.

    Args:
        spec: None or '' for a folder under ``home``; ``s3://BUCKET/PREFIX`` for an S3-compatible bucket
            (endpoint and keys from the usual AWS variables, read by boto3).
        home: the service's data root.

    Raises:
        UnsupportedInputError: ``spec`` is neither, or boto3 (the ``s3`` extra) is not installed.
        ObjectStoreError: the bucket does not exist, refuses the credentials, or cannot be reached.

    Example:
        >>> open_objects(None, Path("/srv/deltakit")).describe()
        '/srv/deltakit/store'
    """
    if not spec:
        return LocalObjects(Path(home) / "store")
    if not spec.startswith("s3://"):
        raise UnsupportedInputError(
            f"DELTAKIT_STORE={spec!r} is neither empty (a folder under the home) nor s3://BUCKET/PREFIX",
            argument="store",
        )
    bucket, _, prefix = spec[len("s3://") :].partition("/")
    try:
        from .s3 import S3Objects
    except ImportError as e:
        raise UnsupportedInputError(
            f"DELTAKIT_STORE={spec!r} needs boto3: pip install 'deltakit-llm[s3]' ({e})", argument="store"
        ) from e
    try:
        return S3Objects(bucket, prefix)
    except UnsupportedInputError as e:
        raise UnsupportedInputError(f"DELTAKIT_STORE={spec!r}: {e}", argument="store") from e


def _copy(src: Path, dest: Path) -> None:
    with open(src, "rb") as i, open(dest, "wb") as o:
        while block := i.read(8 << 20):
            o.write(block)
        o.flush()
        os.fsync(o.fileno())
