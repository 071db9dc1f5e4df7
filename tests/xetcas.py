"""The Xet storage (CAS) half of the test Hub: what the unmodified ``hf_xet`` client uploads to and
downloads from, as the Xet protocol specification and the hf_xet 1.8 client define it.

``hubserver.FakeHub`` routes to a :class:`XetStore`:

- ``POST {cas}/v1/xorbs/default/{hash}``: a xorb, sent without its footer: chunks of an 8-byte header
  (version 0, compressed length u24, scheme 0 none / 1 LZ4 / 2 byte-grouped LZ4, uncompressed length u24)
  and their payload. The chunk headers must tile the body exactly.
- ``POST {cas}/v1/shards``: a shard without lookup tables or footer: a 48-byte header, the file section
  (per file: a header, one entry per segment, verification entries, the sha256 metadata entry; a
  bookend of 0xFF) and the xorb section (per new xorb: a header and one entry per chunk; a bookend).
  Every hash is recomputed: each chunk's (blake3 keyed with the data key, after decoding), each xorb's
  (the merkle tree of its chunks), each file's and each segment's verification hash. A shard that
  disagrees is refused (400), so a test passes only if the client's bytes are exactly what it says.
- ``GET {cas}/v1/reconstructions/{file}`` with ``Range: bytes=S-E`` over the file: terms (one per
  overlapping segment) and one fetch entry per xorb, whose URL needs no token, as a presigned URL.
- The v2 shard and reconstruction routes, xorb grants and the global dedup query answer 404: the client
  falls back to the v1 routes (and a 404 on dedup means "not known").

Hashes are written as the Xet protocol writes them: the 32 bytes as four little-endian u64 in hex.
"""

from __future__ import annotations

import hashlib
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["XetError", "XetStore", "xet_hash_string"]

_DATA_KEY = bytes(
    [102, 151, 245, 119, 91, 149, 80, 222, 49, 53, 203, 172, 165, 151, 24, 28,
     157, 228, 33, 16, 155, 235, 43, 88, 180, 208, 176, 75, 147, 173, 242, 41]
)  # fmt: skip
_INTERNAL_NODE_KEY = bytes(
    [1, 126, 197, 199, 165, 71, 41, 150, 253, 148, 102, 102, 180, 138, 2, 230,
     93, 221, 83, 111, 55, 199, 109, 210, 248, 99, 82, 230, 74, 83, 113, 63]
)  # fmt: skip
_VERIFICATION_KEY = bytes(
    [127, 24, 87, 214, 206, 86, 237, 102, 18, 127, 249, 19, 231, 165, 195, 243,
     164, 205, 38, 213, 181, 219, 73, 230, 65, 36, 152, 127, 40, 251, 148, 195]
)  # fmt: skip
_SHARD_TAG = b"HFRepoMetaData\x00" + bytes(
    [85, 105, 103, 69, 106, 123, 129, 87, 131, 165, 189, 217, 92, 205, 209, 74, 169]
)
_BOOKEND = b"\xff" * 32
_RECORD = 48
_WITH_VERIFICATION = 1 << 31
_WITH_METADATA = 1 << 30


class XetError(Exception):
    """A request the CAS refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def xet_hash_string(raw: bytes) -> str:
    """A hash as the Xet protocol prints it: each 8-byte group reversed, then hex."""
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


def _keyed(key: bytes, data: bytes) -> bytes:
    import blake3  # deltakit's own dependency

    return blake3.blake3(data, key=key).digest()


def _merkle(entries: list[tuple[bytes, int]]) -> bytes:
    """The aggregated hash of ``(hash, size)`` leaves: groups of 2 to 9 cut where a hash is 0 mod 4."""
    if not entries:
        return bytes(32)
    level = list(entries)
    while len(level) > 1:
        merged, i = [], 0
        while i < len(level):
            rest = level[i:]
            cut = len(rest)
            if len(rest) > 2:
                cut = min(9, len(rest))
                for j in range(2, cut):
                    if struct.unpack_from("<Q", rest[j][0], 24)[0] % 4 == 0:
                        cut = j + 1
                        break
            group = rest[:cut]
            text = "".join(f"{xet_hash_string(h)} : {size}\n" for h, size in group).encode()
            merged.append((_keyed(_INTERNAL_NODE_KEY, text), sum(size for _, size in group)))
            i += cut
        level = merged
    return level[0][0]


def _decode_chunk(scheme: int, payload: bytes) -> bytes:
    if scheme == 0:
        return payload
    import lz4.frame

    data = lz4.frame.decompress(payload)
    if scheme == 1:
        return data
    n, out, start = len(data), bytearray(len(data)), 0  # byte grouping: four planes, then interleaved back
    for k in range(4):
        length = n // 4 + (1 if n % 4 > k else 0)
        out[k::4] = data[start : start + length]
        start += length
    return bytes(out)


@dataclass(frozen=True)
class _Chunk:
    start: int  # offset of its 8-byte header in the xorb
    end: int
    length: int  # uncompressed
    scheme: int


@dataclass
class _Xorb:
    data: bytes
    chunks: list[_Chunk]
    hashes: list[bytes] = field(default_factory=list)  # known once a shard describes it

    def plain(self, first: int, last: int) -> bytes:
        return b"".join(_decode_chunk(c.scheme, self.data[c.start + 8 : c.end]) for c in self.chunks[first:last])


@dataclass(frozen=True)
class _Segment:
    xorb: str
    length: int
    first: int
    last: int  # exclusive


@dataclass(frozen=True)
class XetFile:
    """A file the CAS can rebuild: its Xet hash, size, sha256, and segments."""

    hash: str
    size: int
    sha256: str
    segments: tuple[_Segment, ...]


def _parse_chunks(body: bytes) -> list[_Chunk]:
    chunks, pos = [], 0
    while pos < len(body):
        if pos + 8 > len(body):
            raise XetError(400, f"xorb: a chunk header is cut off at byte {pos}")
        version, scheme = body[pos], body[pos + 4]
        compressed = int.from_bytes(body[pos + 1 : pos + 4], "little")
        length = int.from_bytes(body[pos + 5 : pos + 8], "little")
        if version != 0 or scheme not in (0, 1, 2):
            raise XetError(400, f"xorb: chunk at byte {pos} has version {version}, scheme {scheme}")
        chunks.append(_Chunk(pos, pos + 8 + compressed, length, scheme))
        pos += 8 + compressed
    if pos != len(body) or not chunks:
        raise XetError(400, "xorb: the chunk headers do not tile the body")
    return chunks


class XetStore:
    """Xorbs, files and the sha256 -> file map the Hub's commits resolve ``lfsFile`` lines through."""

    def __init__(self, root: Path | None = None) -> None:
        """``root``: where xorbs and shards are kept, so that a store made again on it holds them."""
        self.root = root
        self.lock = threading.Lock()
        self.xorbs: dict[str, _Xorb] = {}
        self.files: dict[str, XetFile] = {}
        self.by_sha256: dict[str, XetFile] = {}
        self.served: dict[str, XetFile] = {}  # files whose bytes a test replaced (see substitute)
        self.bytes_received = 0  # xorb and shard bodies: what the client actually sent
        if root is not None:
            for path in sorted((root / "xorbs").glob("*")):
                self.xorbs[path.name] = _Xorb(path.read_bytes(), _parse_chunks(path.read_bytes()))
            for path in sorted((root / "shards").glob("*.shard")):  # in the order they came
                self.put_shard(path.read_bytes(), replay=True)

    def put_xorb(self, name: str, body: bytes) -> bool:
        """Store a xorb under its hash (checked when a shard lists its chunks); False if already held."""
        chunks = _parse_chunks(body)
        with self.lock:
            self.bytes_received += len(body)
            if name in self.xorbs:
                return False
            self.xorbs[name] = _Xorb(body, chunks)
            self._keep("xorbs", name, body)
            return True

    def _keep(self, kind: str, name: str, body: bytes) -> None:
        if self.root is not None:
            path = self.root / kind / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_bytes(body)
            path.with_suffix(".tmp").replace(path)

    def put_shard(self, body: bytes, *, replay: bool = False) -> None:
        """Register the xorbs and files a shard describes, after checking every hash in it."""
        with self.lock:
            if not replay:
                self.bytes_received += len(body)
            if body[:32] != _SHARD_TAG or len(body) < _RECORD:
                raise XetError(400, "shard: wrong header tag")
            files, pos = self._file_section(body, _RECORD)
            pos = self._xorb_section(body, pos)
            if pos != len(body):
                raise XetError(400, f"shard: {len(body) - pos} bytes after the xorb section")
            for parsed in files:
                file = self._check_file(parsed)
                self.files[file.hash] = file
                self.by_sha256[file.sha256] = file
            if not replay:
                self._keep("shards", f"{len(list((self.root or Path()).glob('shards/*.shard'))):08d}.shard", body)

    def _record(self, body: bytes, pos: int) -> tuple[bytes, bytes]:
        if pos + _RECORD > len(body):
            raise XetError(400, "shard: cut off inside a record")
        return body[pos : pos + 32], body[pos + 32 : pos + _RECORD]

    def _file_section(self, body: bytes, pos: int) -> tuple[list[tuple[bytes, int, list, list, bytes | None]], int]:
        files = []
        while True:
            file_hash, rest = self._record(body, pos)
            flags, count = struct.unpack_from("<II", rest)
            pos += _RECORD
            if file_hash == _BOOKEND:
                return files, pos
            segments = []
            for _ in range(count):
                xorb, rest = self._record(body, pos)
                _, length, first, last = struct.unpack_from("<IIII", rest)
                segments.append((xet_hash_string(xorb), length, first, last))
                pos += _RECORD
            checks = []
            if flags & _WITH_VERIFICATION:
                for _ in range(count):
                    checks.append(self._record(body, pos)[0])
                    pos += _RECORD
            sha = None
            if flags & _WITH_METADATA:
                sha = self._record(body, pos)[0]
                pos += _RECORD
            files.append((file_hash, flags, segments, checks, sha))

    def _xorb_section(self, body: bytes, pos: int) -> int:
        while True:
            xorb_hash, rest = self._record(body, pos)
            _, count, total, _ = struct.unpack_from("<IIII", rest)
            pos += _RECORD
            if xorb_hash == _BOOKEND:
                return pos
            name = xet_hash_string(xorb_hash)
            xorb = self.xorbs.get(name)
            if xorb is None:
                raise XetError(400, f"shard: xorb {name} was never uploaded")
            leaves = []
            for _ in range(count):
                chunk_hash, rest = self._record(body, pos)
                _, length = struct.unpack_from("<II", rest)
                leaves.append((chunk_hash, length))
                pos += _RECORD
            if [c.length for c in xorb.chunks] != [length for _, length in leaves] or sum(
                c.length for c in xorb.chunks
            ) != total:
                raise XetError(400, f"shard: xorb {name}'s chunks differ from the uploaded ones")
            for index, (chunk_hash, _) in enumerate(leaves):
                if _keyed(_DATA_KEY, xorb.plain(index, index + 1)) != chunk_hash:
                    raise XetError(400, f"shard: a chunk of xorb {name} does not hash to what the shard says")
            if xet_hash_string(_merkle(leaves)) != name:
                raise XetError(400, f"shard: xorb {name} is not the merkle hash of its chunks")
            xorb.hashes = [h for h, _ in leaves]

    def _check_file(self, parsed: tuple[bytes, int, list, list, bytes | None]) -> XetFile:
        file_hash, _flags, segments, checks, sha = parsed
        name = xet_hash_string(file_hash)
        if sha is None:
            raise XetError(400, f"shard: file {name} has no sha256, which the Hub needs to commit it")
        leaves: list[tuple[bytes, int]] = []
        parts = []
        for index, (xorb_name, length, first, last) in enumerate(segments):
            xorb = self.xorbs.get(xorb_name)
            if xorb is None or not xorb.hashes or not 0 <= first < last <= len(xorb.chunks):
                raise XetError(400, f"shard: file {name} refers to chunks of xorb {xorb_name} the CAS does not hold")
            hashes = xorb.hashes[first:last]
            if sum(c.length for c in xorb.chunks[first:last]) != length:
                raise XetError(400, f"shard: file {name} segment {index} has the wrong length")
            if checks and _keyed(_VERIFICATION_KEY, b"".join(hashes)) != checks[index]:
                raise XetError(400, f"shard: file {name} segment {index} fails its verification hash")
            leaves += [(h, c.length) for h, c in zip(hashes, xorb.chunks[first:last], strict=True)]
            parts.append(_Segment(xorb_name, length, first, last))
        computed = _keyed(bytes(32), _merkle(leaves)) if leaves else bytes(32)
        if xet_hash_string(computed) != name:
            raise XetError(400, f"shard: file {name} is not the hash of its chunks")
        # the sha256 is stored as four big-endian u64 groups: the Xet string form gives the usual hex
        return XetFile(name, sum(p.length for p in parts), xet_hash_string(sha), tuple(parts))

    def substitute(self, name: str, data: bytes | None) -> None:
        """Serve ``data`` for file ``name`` from now on (``None``: its own bytes again), while every
        hash the Hub advertises stays the recorded one: a test's stand-in for storage that went bad.
        The bytes go into a xorb of uncompressed chunks of at most 64 KiB, hashed as the client would."""
        with self.lock:
            if data is None:
                self.served.pop(name, None)
                return
            pieces = [data[i : i + (64 << 10)] for i in range(0, len(data), 64 << 10)] or [b""]
            body = b"".join(
                bytes([0]) + len(p).to_bytes(3, "little") + bytes([0]) + len(p).to_bytes(3, "little") + p
                for p in pieces
            )
            leaves = [(_keyed(_DATA_KEY, p), len(p)) for p in pieces]
            xorb = xet_hash_string(_merkle(leaves))
            self.xorbs[xorb] = _Xorb(body, _parse_chunks(body), [h for h, _ in leaves])
            segment = _Segment(xorb, len(data), 0, len(pieces))
            self.served[name] = XetFile(name, len(data), hashlib.sha256(data).hexdigest(), (segment,))

    def plain(self, file: XetFile) -> bytes:
        """The file's bytes, rebuilt from its chunks, checked against its sha256."""
        with self.lock:
            data = b"".join(self.xorbs[s.xorb].plain(s.first, s.last) for s in file.segments)
        if len(data) != file.size or hashlib.sha256(data).hexdigest() != file.sha256:
            raise XetError(500, f"file {file.hash} does not rebuild to its sha256")
        return data

    def reconstruction(self, name: str, byte_range: str | None, fetch_url: str) -> dict[str, object]:
        """Terms for the bytes ``byte_range`` (``bytes=S-E``, inclusive) of file ``name``, and where to
        fetch each xorb: ``fetch_url`` formatted with ``xorb``."""
        with self.lock:
            file = self.served.get(name) or self.files.get(name)
            if file is None:
                raise XetError(404, f"no file {name}")
            start, end = 0, file.size - 1
            if byte_range:
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", byte_range.strip())
                if match is None:
                    raise XetError(400, f"unreadable Range {byte_range!r}")
                start = int(match[1])
                end = min(int(match[2]), file.size - 1) if match[2] else file.size - 1
            if start >= file.size or end < start:
                raise XetError(416, "the range starts past the end of the file")
            terms, fetch, offset, first_offset = [], {}, 0, None
            for segment in file.segments:
                if offset + segment.length <= start:
                    offset += segment.length
                    continue
                if offset > end:
                    break
                if first_offset is None:
                    first_offset = start - offset
                terms.append(
                    {
                        "hash": segment.xorb,
                        "unpacked_length": segment.length,
                        "range": {"start": segment.first, "end": segment.last},
                    }
                )
                xorb = self.xorbs[segment.xorb]
                fetch[segment.xorb] = [
                    {
                        "range": {"start": 0, "end": len(xorb.chunks)},
                        "url": fetch_url.format(xorb=segment.xorb),
                        "url_range": {"start": 0, "end": len(xorb.data) - 1},
                    }
                ]
                offset += segment.length
            return {"offset_into_first_range": first_offset or 0, "terms": terms, "fetch_info": fetch}

    def xorb_range(self, name: str, byte_range: str | None) -> tuple[bytes, int, int, int]:
        """The bytes of a xorb a fetch URL asks for: ``(data, first, last, total)``."""
        with self.lock:
            xorb = self.xorbs.get(name)
        if xorb is None:
            raise XetError(404, f"no xorb {name}")
        total = len(xorb.data)
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", (byte_range or "").strip())
        first, last = (int(match[1]), min(int(match[2]), total - 1)) if match else (0, total - 1)
        if first > last:
            raise XetError(416, "range past the end of the xorb")
        return xorb.data[first : last + 1], first, last, total
