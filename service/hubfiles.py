"""Files as the Hugging Face Hub describes and serves them: which count as large (LFS), their git ids and
ETags, ``Range`` requests, and a response that streams an already-open file so that the cache may drop
the file while it is being sent."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

import anyio
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = [
    "LFS_SIZE",
    "ByteRange",
    "OpenFileResponse",
    "git_blob_id",
    "is_lfs",
    "lfs_pointer",
    "parse_range",
]

# A file at least this large is stored in LFS whatever its name (the Hub's preupload rule).
LFS_SIZE = 10 * 1024 * 1024
# The suffixes of the .gitattributes the Hub writes into every new repository, and GGUF, which the Hub
# stores in LFS as a binary file; a name that ends with one of them is an LFS file at any size.
_LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gz", ".h5", ".joblib", ".mlmodel", ".model",
    ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar",
    ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)  # fmt: skip


def is_lfs(path: str, size: int) -> bool:
    """Whether the Hub would keep ``path`` in LFS: by its suffix, or by its size. Such a file's ETag is its
    SHA-256, which the client can know without reading the file; a regular file's ETag is its git blob id."""
    return size >= LFS_SIZE or path.lower().endswith(_LFS_SUFFIXES) or "tfevents" in path


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer git keeps in place of an LFS file; its git blob id is the file's ``oid`` in tree listings."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_id(data: bytes) -> str:
    """git's id of a blob holding ``data`` (SHA-1 of ``blob <size>\\0<data>``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class ByteRange:
    """The bytes ``[start, end)`` of a file of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end - 1}/{self.size}"


class RangeNotSatisfiable(ValueError):
    """A ``Range`` that starts at or past the end of the file (the Hub answers 416)."""


# at most 19 digits a bound (2^63 > 10^18): a longer number is no range of any file, and past 4300 digits
# int() itself refuses it
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*", re.IGNORECASE)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one range ``header`` asks for, or None for the whole file.

    As S3 (behind the Hub's downloads) does, a header that is not one ``bytes=`` range (several ranges, another
    unit, an end before the start) is ignored and the whole file is sent.

    Raises:
        RangeNotSatisfiable: the range starts at or past the end of the file, or asks for the last 0 bytes.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header)
    if match is None or not (match[1] or match[2]):
        return None
    if not match[1]:  # bytes=-N: the last N bytes
        suffix = int(match[2])
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return ByteRange(max(size - suffix, 0), size, size)
    start = int(match[1])
    if match[2] and int(match[2]) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(header)
    end = min(int(match[2]) + 1, size) if match[2] else size
    return ByteRange(start, end, size)


class OpenFileResponse(Response):
    """Send ``[start, end)`` of the open file ``fd`` (closed once sent, or when the client leaves).

    The file is opened before the response starts, so a cache that evicts it meanwhile cannot take it away;
    reads run on worker threads, in chunks large enough that the threads cost little; a HEAD request gets
    the headers only. A client that disconnects stops the reading."""

    chunk_size = 1 << 20

    def __init__(self, fd: int, *, start: int, end: int, status_code: int, headers: dict[str, str]) -> None:
        self.fd, self.start, self.end = fd, start, end
        self.status_code = status_code
        self.media_type = "application/octet-stream"
        self.background: BackgroundTask | None = None
        self.init_headers({**headers, "content-length": str(end - start)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if scope["method"].upper() == "HEAD" or self.start == self.end:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    await self._send_bytes(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()
        finally:
            os.close(self.fd)

    async def _send_bytes(self, send: Send) -> None:
        offset = self.start
        while offset < self.end:
            chunk = await anyio.to_thread.run_sync(os.pread, self.fd, min(self.chunk_size, self.end - offset), offset)
            if not chunk:  # the file shrank under us: end the body short rather than hang
                raise OSError(f"the file ended at byte {offset} of {self.end}")
            offset += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": offset < self.end})
