"""A model's files uploaded as ``multipart/form-data``, streamed into a folder as they arrive: never held in
memory, counted against a limit, and every part's file name checked as a path inside the model."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import IO

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from deltakit.errors import DeltakitError, NoSpaceError, UnsupportedInputError

__all__ = ["PayloadTooLarge", "check_upload_path", "receive_upload"]

_MAX_FILES = 100_000
_MAX_PATH = 1024


class PayloadTooLarge(DeltakitError, ValueError):
    """An upload larger than the service takes (``DELTAKIT_MAX_UPLOAD_BYTES``)."""


def check_upload_path(name: str) -> str:
    """``name`` if it is a relative path of plain parts (no ``..``, no leading ``/``, no hidden part, which an
    import would skip); else ``UnsupportedInputError`` naming it."""
    parts = name.split("/")
    if (
        not name
        or len(name) > _MAX_PATH
        or "\\" in name
        or "\0" in name
        or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
    ):
        raise UnsupportedInputError(
            f"{name!r} is not a file path inside a model (relative, no '..', no empty or hidden parts)",
            argument="files",
        )
    return name


class _Parts:
    """The parser's callbacks: each part's headers, then its bytes into ``folder/<its file name>``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: list[str] = []
        self._field = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = b""
        self._value = b""
        self._out: IO[bytes] | None = None
        self.ended = False

    def on_part_begin(self) -> None:
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        filename = options.get(b"filename")
        if filename is None:
            raise UnsupportedInputError(
                "every part of an upload is a file of the model, its file name the file's path", argument="files"
            )
        path = check_upload_path(filename.decode("utf-8", "replace"))
        if len(self.paths) >= _MAX_FILES:
            raise UnsupportedInputError(f"an upload holds at most {_MAX_FILES} files", argument="files")
        target = self.folder / path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(target, "xb")  # noqa: SIM115 - closed at the part's end (or by close())
        except (FileExistsError, NotADirectoryError) as e:
            raise UnsupportedInputError(f"the upload holds {path!r} twice (or as a file and a folder)") from e
        self.paths.append(path)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._out is not None
        try:
            self._out.write(data[start:end])
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError("the service's disk is full: the upload cannot be kept") from e
            raise

    def on_part_end(self) -> None:
        self.close()

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def receive_upload(request: Request, folder: Path, limit: int) -> list[str]:
    """Write the files of the multipart body of ``request`` under ``folder`` (each part's file name its path
    there), reading at most ``limit`` bytes of body; returns their paths. The caller removes the folder when
    this raises.

    Raises:
        PayloadTooLarge: the body goes past ``limit``.
        UnsupportedInputError: the body is not ``multipart/form-data`` of files with safe paths.
    """
    kind, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UnsupportedInputError(
            "an upload is multipart/form-data, one part per file of the model", argument="files"
        )
    parts = _Parts(folder)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": parts.on_part_begin,
            "on_header_field": parts.on_header_field,
            "on_header_value": parts.on_header_value,
            "on_header_end": parts.on_header_end,
            "on_headers_finished": parts.on_headers_finished,
            "on_part_data": parts.on_part_data,
            "on_part_end": parts.on_part_end,
            "on_end": parts.on_end,
        },
        max_header_count=8,
        max_header_size=4096 + _MAX_PATH,
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(
                    f"the upload is larger than this service takes ({limit} bytes, DELTAKIT_MAX_UPLOAD_BYTES)",
                    expected=limit,
                )
            if chunk:
                await anyio.to_thread.run_sync(parser.write, chunk)  # file writes off the event loop
        parser.finalize()
    except FormParserError as e:
        raise UnsupportedInputError(f"the upload is not valid multipart/form-data ({e})", argument="files") from e
    finally:
        parts.close()
    if not parts.ended:
        raise UnsupportedInputError("the upload ended before its closing boundary", argument="files")
    if not parts.paths:
        raise UnsupportedInputError("the upload holds no files", argument="files")
    return parts.paths
