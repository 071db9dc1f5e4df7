"""Opening the files deltakit reads: regular files only, so a FIFO or a device never blocks a job.

A FIFO opened for reading blocks until a writer comes, and reading a character device never ends;
each input file is therefore opened without blocking, checked to be a regular file, and only then read.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from .errors import FormatError, InputNotFoundError, UnsupportedInputError

__all__ = [
    "MAX_JSON_BYTES",
    "describe_mode",
    "json_object",
    "open_regular",
    "open_regular_fd",
    "read_json_object",
    "read_regular",
    "read_regular_text",
    "require_regular",
]

# The largest JSON file deltakit reads as an input (configs, indexes, tokenizer files).
MAX_JSON_BYTES = 64 << 20


def describe_mode(mode: int) -> str:
    """What a file of this ``st_mode`` is, in words ("a FIFO", "a folder", ...)."""
    for test, words in (
        (stat.S_ISREG, "a file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return words
    return "of an unknown kind"


def require_regular(path: str | Path) -> os.stat_result:
    """The ``stat`` of ``path`` (links followed) if it is a regular file; else a named error.

    Raises:
        InputNotFoundError: nothing is there.
        UnsupportedInputError: something other than a regular file is there.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise InputNotFoundError(f"{path} does not exist", path=path) from e
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedInputError(f"{path} is {describe_mode(st.st_mode)}, not a regular file", path=path)
    return st


def open_regular_fd(path: str | Path) -> int:
    """A descriptor of ``path`` opened for reading (blocking reads), refusing anything but a regular
    file without blocking on it; the caller closes it.

    The check runs on the opened descriptor, so a file swapped for a FIFO after a ``stat`` is caught too.

    Raises:
        InputNotFoundError: nothing is there.
        UnsupportedInputError: a FIFO, socket, device or folder is there.
    """
    require_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise InputNotFoundError(f"{path} does not exist", path=path) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsupportedInputError(f"{path} is {describe_mode(st.st_mode)}, not a regular file", path=path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def open_regular(path: str | Path, *, buffering: int = -1) -> Iterator[BinaryIO]:
    """Open ``path`` for binary reading, refusing anything but a regular file without blocking on it
    (see :func:`open_regular_fd`); ``buffering=0`` gives an unbuffered file, as :func:`open` does.

    Raises:
        InputNotFoundError: nothing is there.
        UnsupportedInputError: a FIFO, socket, device or folder is there.
    """
    fd = open_regular_fd(path)
    try:
        f = os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_regular(path: str | Path, *, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path``; with ``limit``, at most ``limit + 1`` of them are read,
    so a caller can tell an oversized file without reading it whole."""
    with open_regular(path) as f:
        return f.read() if limit is None else f.read(limit + 1)


def read_regular_text(path: str | Path) -> str:
    """The UTF-8 text of the regular file ``path``."""
    return read_regular(path).decode("utf-8")


def json_object(data: bytes, shown: str | Path) -> dict[str, Any]:
    """``data`` parsed as one JSON object; ``shown`` names it in the error.

    Raises:
        FormatError: not UTF-8, not JSON, or not an object.
    """
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{shown}: cannot read: {e}", path=shown) from e
    if not isinstance(value, dict):
        raise FormatError(f"{shown}: not a JSON object but {type(value).__name__}", path=shown)
    return value


def read_json_object(path: str | Path, *, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in the regular file ``path``, of at most ``limit`` bytes.

    Raises:
        InputNotFoundError: nothing is there.
        UnsupportedInputError: a FIFO, socket, device or folder is there.
        FormatError: larger than ``limit``, not UTF-8, not JSON, or not an object.
    """
    try:
        data = read_regular(path, limit=limit)
    except OSError as e:
        if isinstance(e, InputNotFoundError):
            raise
        raise FormatError(f"{path}: cannot read: {e.strerror or e}", path=path) from e
    if len(data) > limit:
        raise FormatError(f"{path}: larger than the {limit} byte cap of a JSON file deltakit reads", path=path)
    return json_object(data, path)
