"""A local, fake Hugging Face Hub for tests: the real huggingface_hub and hf_xet clients talk to it over HTTP.

``FakeHub`` is an HTTP server (``ThreadingHTTPServer`` on 127.0.0.1, ephemeral port, background thread; its
Xet storage also uses blake3 and lz4) that stores repos on disk under a root folder and speaks the subset of
the Hub's protocol that huggingface_hub 2.4.0 and hf_xet 1.8 use for publishing and fetching::

    with FakeHub(tmp_path / "hub", token="hf_test") as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")

What it implements (routes as the client calls them; ``{type}s`` is ``models``, ``datasets`` or ``spaces``,
and ``{prefix}`` is ``""``, ``datasets/`` or ``spaces/``):

- ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``PUT /api/{type}s/{repo}/settings`` (private);
  creating a repo makes an initial commit holding ``.gitattributes``, as the real Hub does (``gitattributes=False``
  makes that first commit empty). An existing repo answers 409 with its ``url``, which ``exist_ok=True`` needs.
- ``GET /api/{type}s/{repo}[/revision/{rev}]`` (``model_info``, ``repo_info``, ``repo_exists``; ``?blobs=true``
  adds sizes and LFS info to ``siblings``), ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]`` (``list_repo_tree``,
  ``list_repo_files``; no pagination), ``POST .../paths-info/{rev}``, ``GET .../refs``, ``GET .../commits/{rev}``,
  ``POST|DELETE .../branch/{name}``, ``POST .../tag/{rev}``, ``DELETE .../tag/{name}``.
- ``POST /api/{type}s/{repo}/preupload/{rev}``: each file is ``lfs`` when it is at least ``lfs_threshold`` bytes,
  has a suffix in ``lfs_suffixes`` or (``lfs_binary``) a NUL byte in its 512-byte sample, else ``regular``;
  empty files are always regular. A path already holding the same kind of file returns its ``oid`` (git sha1 for
  regular files, sha256 for LFS), which is how the client drops unchanged files from a commit.
- ``POST /{prefix}{repo}.git/info/lfs/objects/batch`` (basic transfer only): objects the repo already holds get no
  ``actions`` (the client then sends nothing); others get an upload ``href`` to ``PUT /_fakehub/lfs/{ticket}``,
  which, like a pre-signed S3 URL, needs no token. The PUT checks size and sha256 of what arrives (400 otherwise).
- ``POST /api/{type}s/{repo}/commit/{branch}`` (NDJSON: ``header`` with ``summary``, ``description``,
  ``parentCommit``; ``file`` base64; ``lfsFile``; ``deletedFile``; ``deletedFolder``). Every commit is a full
  snapshot (path -> sha256, git blob id, size, lfs) with a fresh 40-hex id; ``parentCommit`` other than the
  branch head gives 412; an ``lfsFile`` the repo has not received gives 422.
- ``HEAD|GET /{prefix}{repo}/resolve/{rev}/{path}`` by branch, tag or (full or >= 7 char) commit sha, served
  directly (no CDN redirect) with ``X-Repo-Commit``, ``ETag`` (git blob sha1 for regular files, sha256 for LFS
  files), ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Content-Length``, ``Accept-Ranges`` and single
  ``Range: bytes=`` requests (206/416), which the client uses to resume a download that broke mid-stream.
- ``POST /api/validate-yaml`` checks a card's metadata as the Hub documents it (``hubcard.py``): 400 with
  ``{"errors": [{"message": ...}]}`` when it is wrong, ``warnings`` otherwise; a commit whose ``README.md``
  fails the same check is refused with 400 (the client validates before committing, the Hub again on push),
  ``GET /api/whoami-v2``, ``GET /api/agent-harnesses`` (an empty registry, see below).
- Errors are JSON ``{"error": ...}`` with ``X-Error-Message`` and, where the client relies on it, ``X-Error-Code``
  (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) so it raises ``RepositoryNotFoundError`` etc.
- Auth: with ``token`` set, writes (create/delete repo, settings, branch, tag, preupload, LFS batch, commit)
  need ``Authorization: Bearer <token>`` (401 otherwise), reads of private repos need it too (401 +
  ``RepoNotFound``, like the Hub), and a wrong token is refused everywhere with the Hub's ``Invalid credentials
  in Authorization header``. ``token=None`` turns auth off.

- Multipart LFS: objects of at least ``multipart_threshold`` bytes get part URLs (``header``: ``chunk_size``
  and ``00001``...) to ``PUT /_fakehub/part/{ticket}/{n}`` (ETag: the part's md5, as S3 answers) and a
  completion ``href`` (``POST /_fakehub/complete/{ticket}``) that checks the parts' ETags, size and sha256.
- ``GET /api/{type}s/{repo}`` derives ``cardData``, ``library_name``, ``pipeline_tag`` and ``tags`` (the card's,
  the library, ``license:X``, ``base_model:ID`` and ``base_model:RELATION:ID``) from README.md's front matter.
- ``hub.throttle(fragment)``: the next request whose path holds it answers 429 with ``Retry-After``.

- Xet, as the unmodified ``hf_xet`` client speaks it (see ``xetcas.py`` for the CAS side):
  ``GET /api/{type}s/{repo}/xet-{read|write}-token/{rev}`` gives a CAS URL and token (JSON body and
  ``X-Xet-*`` headers); the CAS lives under ``/_fakehub/cas/{instance}`` and hands out self-authorising
  xorb fetch URLs under ``/_fakehub/xorb/{instance}``; ``POST /v1/telemetry`` is accepted. A commit's
  ``lfsFile`` whose sha256 a shard registered becomes a Xet-backed file: ``resolve`` adds ``X-Xet-Hash`` and
  ``Link: <...xet-read-token/{commit}>; rel="xet-auth"``, tree and paths-info add ``xetHash``, and its bytes
  (rebuilt from the chunks, sha256 checked) are still served plainly to a client with Xet off.
  ``fail_uploads_after`` fails xorb and shard uploads with a 400 (hf_xet retries 5xx for minutes);
  ``tamper`` on a Xet-backed file makes the CAS serve the new bytes under the recorded hash.

Not implemented: the LFS ``verify`` action, discussions (a ``create_pr`` commit lands on ``refs/pr/N``, nothing more),
gated repos, pagination,
``.gitignore``/``.gitattributes`` semantics, cross-repo LFS duplication, CDN redirects, real git objects.

Test hooks: ``hub.lfs_uploads`` / ``hub.lfs_uploaded_oids`` (LFS objects actually received and verified),
``hub.requests`` (every ``(method, path)`` served), ``hub.fail_uploads_after(n)`` (simulated interruption),
``hub.tamper(...)`` (served bytes differ from recorded hashes), ``hub.seed(...)`` (make a repo without the
client), and ``hub.head/commits/read`` to inspect what was stored.

Pointing huggingface_hub 2.4.0 at it. The client reads its environment ONCE, at import, into
``huggingface_hub.constants`` (``HF_ENDPOINT`` -> ``ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE``,
``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_TOKEN_PATH``...). Setting an
environment variable inside a test that runs after the import changes nothing in-process; the code reads the
module attributes at call time, so patch those (``configure_client`` below does all of it):

- endpoint: pass ``endpoint=hub.endpoint`` to ``HfApi``, ``hf_hub_download`` and ``snapshot_download`` (all
  accept it), or patch ``constants.ENDPOINT`` AND ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_url``
  builds download URLs from the template, then swaps the ``ENDPOINT`` prefix for ``endpoint=``).
- Xet: ``hf_xet`` is installed, so ``upload_folder`` takes the Xet pipeline and ``create_commit`` uploads through
  Xet unless ``constants.HF_HUB_DISABLE_XET`` is True (``is_xet_available()`` reads it at call time);
  ``configure_client(..., xet=False)`` takes the LFS path. hf_xet reads ``HF_XET_CACHE`` from the environment.
- offline: ``constants.HF_HUB_OFFLINE = True`` (``is_offline_mode()`` returns it; every request then raises
  ``OfflineModeIsEnabled`` in the session's request hook and downloads fall back to the cache).
- cache: pass ``cache_dir=`` or patch ``constants.HF_HUB_CACHE``.
- token: ``get_token()`` reads the ``HF_TOKEN`` environment variable at call time, then the file at
  ``constants.HF_TOKEN_PATH``; pass ``token=False`` for a call that must be anonymous.
- telemetry: unless ``constants.HF_HUB_DISABLE_TELEMETRY`` is True, building the User-Agent of the first request
  of the process fetches ``{constants.ENDPOINT}/api/agent-harnesses`` (AI-agent detection, 3 s timeout) and caches
  it at ``constants.AGENT_HARNESSES_PATH``: with ``ENDPOINT`` left at huggingface.co that is a real network call.
  FakeHub answers that route with an empty registry.
- for a subprocess (CLI tests), the environment works: ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1``,
  ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HOME``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE=1``; ``configure_client`` sets them.

Client behaviour worth knowing: ``http_backoff`` retries 408/429/500/502/503/504 five times with 1+2+4+8+8 s
of sleep, which is why ``fail_uploads_after`` fails with 507 by default (not retried, so a publish dies at once);
a failed LFS upload never reaches the commit, so nothing is committed. Downloads check only the size (the
client never hashes what it downloads): ``tamper`` with same-size bytes is served and cached silently, with other
sizes an LFS file fails the client's "Consistency check" while a regular file (sized by ``Content-Length``) is
cached as is. Partial downloads are written to a per-process temp file that is deleted on failure: resuming with
``Range`` only happens within one ``http_get`` call after a broken stream.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import hubcard
from xetcas import XetError, XetStore

if TYPE_CHECKING:
    import pytest

__all__ = ["Commit", "FakeHub", "FileEntry", "configure_client", "set_offline"]

DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024
# The patterns of the .gitattributes the Hub writes into every new repo.
DEFAULT_LFS_SUFFIXES: tuple[str, ...] = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gz", ".h5", ".joblib", ".mlmodel", ".model", ".msgpack",
    ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar", ".safetensors",
    ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)  # fmt: skip
DEFAULT_FAIL_STATUS = 507  # a 5xx that huggingface_hub's http_backoff does not retry
# The Hub asks for multipart LFS uploads of large objects (S3 parts); tests lower both to see it.
DEFAULT_MULTIPART_THRESHOLD = 5 * 1024**3
DEFAULT_PART_SIZE = 64 * 1024**2
USER = "fakehub-user"

_TYPE_BY_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_API_ACTIONS = frozenset(
    {"revision", "tree", "paths-info", "preupload", "commit", "refs", "commits", "branch", "tag", "settings"}
)
_LFS_BATCH_SUFFIX = ".git/info/lfs/objects/batch"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------- data model


def git_blob_sha1(data: bytes) -> str:
    """Git's blob id: what the Hub reports (and the client compares) for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit: ``oid`` is the git blob id (of the content, or of the LFS pointer)."""

    sha256: str
    size: int
    lfs: bool
    oid: str
    xet_hash: str | None = None  # the file's hash in Xet storage, when it was uploaded through Xet

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid

    @property
    def preupload_oid(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    id: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)
    tampered: dict[str, dict[str, str]] = field(default_factory=dict)  # commit -> path -> served sha256

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_type": self.repo_type,
            "repo_id": self.repo_id,
            "private": self.private,
            "created_at": self.created_at,
            "commits": {
                cid: {**vars(c), "files": {p: vars(e) for p, e in c.files.items()}} for cid, c in self.commits.items()
            },
            "branches": self.branches,
            "tags": self.tags,
            "lfs_oids": sorted(self.lfs_oids),
            "tampered": self.tampered,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Repo:
        commits = {
            cid: Commit(**{**c, "files": {p: FileEntry(**e) for p, e in c["files"].items()}})
            for cid, c in data["commits"].items()
        }
        return cls(
            repo_type=data["repo_type"],
            repo_id=data["repo_id"],
            private=data["private"],
            created_at=data["created_at"],
            commits=commits,
            branches=data["branches"],
            tags=data["tags"],
            lfs_oids=set(data["lfs_oids"]),
            tampered=data["tampered"],
        )


class HubHTTPError(Exception):
    """An HTTP error answer: status, message, and the ``X-Error-Code`` the client dispatches on."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def _repo_not_found(repo_id: str, status: int = 404) -> HubHTTPError:
    return HubHTTPError(status, f"Repository not found: {repo_id}", "RepoNotFound")


# ------------------------------------------------------------------------------------------------------ storage


class _Store:
    """Repos (JSON per repo) and content-addressed objects (by sha256) on disk, guarded by one lock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self._seq = 0
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        for meta in sorted((root / "repos").glob("**/repo.json")):
            repo = _Repo.from_json(json.loads(meta.read_text()))
            self.repos[(repo.repo_type, repo.repo_id)] = repo

    # objects
    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.root / "tmp" / secrets.token_hex(8)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def adopt(self, tmp: Path, sha256: str) -> None:
        path = self.object_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)

    def entry_for(self, data: bytes, *, lfs: bool) -> FileEntry:
        sha = self.put_bytes(data)
        oid = git_blob_sha1(lfs_pointer(sha, len(data))) if lfs else git_blob_sha1(data)
        return FileEntry(sha256=sha, size=len(data), lfs=lfs, oid=oid)

    # repos
    def save(self, repo: _Repo) -> None:
        path = self.root / "repos" / f"{repo.repo_type}s" / repo.repo_id / "repo.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo.to_json()))
        os.replace(tmp, path)

    def get(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _repo_not_found(repo_id)
        return repo

    def resolve(self, repo: _Repo, revision: str) -> str:
        """Branch, tag, ``refs/heads/x``, ``refs/tags/x``, full commit id or a unique prefix of >= 7 chars."""
        rev = revision.removeprefix("refs/heads/")
        if rev in repo.branches:
            return repo.branches[rev]
        rev = revision.removeprefix("refs/tags/")
        if rev in repo.tags:
            return repo.tags[rev]
        if revision in repo.commits:
            return revision
        if re.fullmatch(r"[0-9a-f]{7,39}", revision):
            found = [cid for cid in repo.commits if cid.startswith(revision)]
            if len(found) == 1:
                return found[0]
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def new_commit(
        self, repo: _Repo, branch: str, files: dict[str, FileEntry], title: str, description: str = ""
    ) -> Commit:
        parent = repo.branches.get(branch)
        self._seq += 1
        digest = json.dumps(
            [parent, title, description, sorted((p, e.oid) for p, e in files.items()), self._seq, time.time_ns()]
        )
        commit = Commit(
            id=hashlib.sha1(digest.encode()).hexdigest(),
            parent=parent,
            title=title,
            description=description,
            date=_now(),
            files=dict(sorted(files.items())),
        )
        repo.commits[commit.id] = commit
        repo.branches[branch] = commit.id
        self.save(repo)
        return commit

    def create_repo(self, repo_type: str, repo_id: str, *, private: bool, gitattributes: bool) -> _Repo:
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        files = {}
        if gitattributes:
            lines = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in DEFAULT_LFS_SUFFIXES)
            files[".gitattributes"] = self.entry_for(lines.encode(), lfs=False)
        self.repos[(repo_type, repo_id)] = repo
        self.new_commit(repo, "main", files, "initial commit")
        return repo


# ---------------------------------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive connections of the client's pool must not block shutdown

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client hung up: nothing to print
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as with the real Hub: every answer carries Content-Length
    server: _Server

    # connection bookkeeping, so that stopping the hub closes idle keep-alive connections
    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # no stderr noise
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # request side
    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        hub._record(method, url.path)
        segments = [s for s in url.path.split("/") if s]  # still percent-encoded: revisions may hold "%2F"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if (throttled := hub._throttled(url.path)) is not None:
                b"".join(self.iter_body())  # read what was sent, so the connection stays usable
                raise throttled
            if segments[:2] in (["_fakehub", "cas"], ["_fakehub", "xorb"]) or segments == ["v1", "telemetry"]:
                hub._xet_route(self, method, segments, b"".join(self.iter_body()))
                return
            if method == "PUT" and segments[:2] == ["_fakehub", "lfs"] and len(segments) == 3:
                hub._lfs_put(self, segments[2])  # consumes the body itself, streaming it to disk
                return
            if method == "PUT" and segments[:2] == ["_fakehub", "part"] and len(segments) == 4:
                hub._part_put(self, segments[2], int(segments[3]))
                return
            body = b"".join(self.iter_body())
            if method == "POST" and segments[:2] == ["_fakehub", "complete"] and len(segments) == 3:
                self.send_json(*hub._complete_multipart(segments[2], _json_body(body)))
                return
            reply = hub._route(self, method, segments, query, body)
            if reply is not None:  # None: the route wrote its own answer (file downloads)
                self.send_json(*reply)
        except HubHTTPError as e:
            self.send_error_json(e)
        except ConnectionError:  # the client went away
            self.close_connection = True
        except Exception as e:  # a bug in the fake: answer, and drop the connection to stay in sync
            self.close_connection = True
            self.send_error_json(HubHTTPError(500, f"FakeHub internal error: {e!r}"))

    def iter_body(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, _CHUNK))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            remaining -= len(chunk)
            yield chunk

    def bearer(self) -> str | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            return None
        return auth.removeprefix("Bearer ").strip()

    # response side
    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_text(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, error: HubHTTPError) -> None:
        message = " ".join(error.message.split()).encode("latin-1", "replace").decode("latin-1")
        headers = {"X-Error-Message": message, **error.headers}
        if error.code is not None:
            headers["X-Error-Code"] = error.code
        self.send_json(error.status, {"error": error.message}, headers)

    def send_file(self, path: Path, headers: dict[str, str]) -> None:
        """200 with the whole file, or 206/416 for a single ``Range: bytes=`` request."""
        total = path.stat().st_size
        start, end, status = 0, total - 1, 200
        if (range_header := self.headers.get("Range")) is not None:
            parsed = _parse_range(range_header, total)
            if parsed is None:
                raise HubHTTPError(
                    416, f"Range not satisfiable: {range_header}", headers={"Content-Range": f"*/{total}"}
                )
            start, end = parsed
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{total}"}
        self.send_response(status)
        for k, v in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(end - start + 1)}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with path.open("rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = f.read(min(remaining, _CHUNK))
                self.wfile.write(chunk)
                remaining -= len(chunk)


def _parse_range(header: str, total: int) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or not (match[1] or match[2]):
        return None
    if not match[1]:  # suffix: the last N bytes
        start, end = max(total - int(match[2]), 0), total - 1
    else:
        start = int(match[1])
        end = min(int(match[2]), total - 1) if match[2] else total - 1
    return (start, end) if start <= end else None


def _split_repo(segments: list[str]) -> tuple[str, list[str]]:
    """``[ns, name, action, ...]`` or ``[name, action, ...]`` -> (repo_id, rest)."""
    if len(segments) >= 2 and segments[1] not in _API_ACTIONS and not segments[1].startswith("xet-"):
        return f"{segments[0]}/{segments[1]}", segments[2:]
    return segments[0], segments[1:]


def _type_and_rest(segments: list[str]) -> tuple[str, list[str]]:
    """Strip the optional ``datasets/`` or ``spaces/`` prefix of non-API URLs."""
    if segments and segments[0] in ("datasets", "spaces"):
        return _TYPE_BY_PLURAL[segments[0]], segments[1:]
    return "model", segments


Reply = tuple[int, Any, dict[str, str]]  # status, JSON payload, extra headers


# ------------------------------------------------------------------------------------------------------ FakeHub


class FakeHub:
    """A Hub-compatible HTTP server on 127.0.0.1 storing repos under ``root``; use it as a context manager.

    Args:
        root: folder for objects and repo metadata (restarting a FakeHub on the same root keeps the repos).
        token: the one token accepted for writes and private reads; ``None`` disables auth.
        lfs_threshold: files of at least this many bytes are LFS files.
        lfs_suffixes: files ending with one of these (case-insensitive) are LFS files.
        lfs_binary: files whose first 512 bytes hold a NUL byte are LFS files (the Hub refuses binary git blobs).
        gitattributes: new repos start with a commit holding the Hub's default ``.gitattributes``.
    """

    def __init__(
        self,
        root: Path,
        token: str | None = "hf_test",
        *,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        lfs_suffixes: tuple[str, ...] = DEFAULT_LFS_SUFFIXES,
        lfs_binary: bool = True,
        gitattributes: bool = True,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        self.root = Path(root)
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.lfs_suffixes = tuple(s.lower() for s in lfs_suffixes)
        self.lfs_binary = lfs_binary
        self.gitattributes = gitattributes
        self.lfs_uploads = 0
        self.lfs_bytes_received = 0  # bytes of the LFS objects received and kept
        self.lfs_uploaded_oids: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self._store = _Store(self.root)
        self._tickets: dict[str, tuple[str, str, str, int]] = {}  # ticket -> (repo_type, repo_id, oid, size)
        self._upload_budget: int | None = None
        self._fail_status = DEFAULT_FAIL_STATUS
        self.xet = XetStore(self.root / "xet")
        self._xet_id = secrets.token_hex(8)  # in the CAS URL: hf_xet's local dedup cache is keyed by it
        self._cas_token = "xet_" + secrets.token_hex(16)
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.multipart_uploads = 0
        self._parts: dict[str, dict[int, Path]] = {}  # multipart ticket -> part number -> received part
        self._throttles: list[list[Any]] = []  # [path fragment, times left, Retry-After seconds]
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> FakeHub:
        if self._server is None:
            self._server = _Server(self)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakehub", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for conn in list(server.connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 2
        while server.connections and time.monotonic() < deadline:  # let the handler threads see EOF and exit
            time.sleep(0.01)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not running: use it as a context manager or call start()")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # test hooks
    def fail_uploads_after(self, n: int | None, *, status: int = DEFAULT_FAIL_STATUS) -> None:
        """Accept ``n`` more LFS uploads, then answer every further LFS PUT with ``status`` (``None`` heals).

        The body is read and dropped, and the object is not stored. The default 507 is not retried by the
        client; 500/502/503/504 are retried 5 times with 23 s of backoff in total before the client gives up.
        """
        with self._store.lock:
            self._upload_budget = n
            self._fail_status = status

    def throttle(self, fragment: str, *, times: int = 1, retry_after: int = 1) -> None:
        """The next ``times`` requests whose path holds ``fragment`` get 429 with ``Retry-After``, as the
        Hub answers a client over its rate limit."""
        with self._store.lock:
            self._throttles.append([fragment, times, retry_after])

    def _throttled(self, path: str) -> HubHTTPError | None:
        with self._store.lock:
            for rule in self._throttles:
                if rule[0] in path and rule[1] > 0:
                    rule[1] -= 1
                    return HubHTTPError(429, "Too Many Requests", headers={"Retry-After": str(rule[2])})
        return None

    def tamper(self, repo_id: str, path: str, data: bytes, *, revision: str = "main", repo_type: str = "model") -> None:
        """Serve ``data`` for ``path`` at ``revision`` while headers keep the recorded ETag, size and hashes."""
        with self._store.lock:
            repo = self._store.get(repo_type, repo_id)
            commit = self._store.resolve(repo, revision)
            if path not in repo.commits[commit].files:
                raise KeyError(f"{path} is not in {repo_id}@{revision}")
            repo.tampered.setdefault(commit, {})[path] = self._store.put_bytes(data)
            self._store.save(repo)
            entry = repo.commits[commit].files[path]
            if entry.xet_hash is not None:  # Xet downloads read the CAS, not the resolve URL
                self.xet.substitute(entry.xet_hash, None if hashlib.sha256(data).hexdigest() == entry.sha256 else data)

    def seed(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        private: bool = False,
        branch: str = "main",
        message: str = "seed",
    ) -> str:
        """Create the repo if needed and commit ``files`` (LFS or not by the same rules as preupload)."""
        with self._store.lock:
            repo = self._store.repos.get((repo_type, repo_id))
            if repo is None:
                repo = self._store.create_repo(repo_type, repo_id, private=private, gitattributes=self.gitattributes)
            base = repo.branches.get(branch) or repo.branches["main"]
            tree = dict(repo.commits[base].files)
            for path, data in files.items():
                lfs = self._is_lfs(path, len(data), data[:512])
                tree[path] = self._store.entry_for(data, lfs=lfs)
                if lfs:
                    repo.lfs_oids.add(tree[path].sha256)
            repo.branches.setdefault(branch, base)
            return self._store.new_commit(repo, branch, tree, message).id

    def head(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self._store.lock:
            return self._store.resolve(self._store.get(repo_type, repo_id), revision)

    def commits(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[Commit]:
        """The history of ``revision``, newest first."""
        with self._store.lock:
            repo = self._store.get(repo_type, repo_id)
            out, cid = [], self._store.resolve(repo, revision)
            while cid is not None:
                out.append(repo.commits[cid])
                cid = repo.commits[cid].parent
            return out

    def read(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> bytes:
        """The recorded (untampered) content of a file."""
        with self._store.lock:
            repo = self._store.get(repo_type, repo_id)
            entry = repo.commits[self._store.resolve(repo, revision)].files[path]
            return self._store.object_path(entry.sha256).read_bytes()

    # internals shared by the handlers
    def _record(self, method: str, path: str) -> None:
        with self._store.lock:
            self.requests.append((method, path))

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        if size == 0:
            return False
        return (
            size >= self.lfs_threshold
            or path.lower().endswith(self.lfs_suffixes)
            or (self.lfs_binary and b"\0" in sample)
        )

    def _authenticated(self, handler: _Handler) -> bool:
        """True with the right token (or auth off), False with none; a wrong token is refused, as the Hub does."""
        if self.token is None:
            return True
        token = handler.bearer()
        if token is None:
            return False
        if token != self.token:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return True

    def _require_write(self, handler: _Handler) -> None:
        if not self._authenticated(handler):
            raise HubHTTPError(401, "Unauthorized: this operation needs a token (Authorization: Bearer ...)")

    def _readable(self, handler: _Handler, repo_type: str, repo_id: str) -> _Repo:
        authed = self._authenticated(handler)
        repo = self._store.get(repo_type, repo_id)
        if repo.private and not authed:
            raise _repo_not_found(repo_id, status=401)
        return repo

    def _writable(self, handler: _Handler, repo_type: str, repo_id: str) -> _Repo:
        self._require_write(handler)
        return self._store.get(repo_type, repo_id)

    def _url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

    # routing
    def _route(self, h: _Handler, method: str, segs: list[str], query: dict[str, str], body: bytes) -> Reply | None:
        repo_type, rest = _type_and_rest(segs)
        for i in (1, 2):
            if method in ("GET", "HEAD") and len(rest) > i + 1 and rest[i] == "resolve":
                path = "/".join(unquote(s) for s in rest[i + 2 :])
                self._resolve(h, repo_type, "/".join(rest[:i]), unquote(rest[i + 1]), path)
                return None
        with self._store.lock:
            if segs[:1] == ["api"]:
                return self._route_api(h, method, segs[1:], query, body)
            if method == "POST" and "/".join(rest).endswith(_LFS_BATCH_SUFFIX):
                repo_id = unquote("/".join(rest))[: -len(_LFS_BATCH_SUFFIX)]
                return self._lfs_batch(h, repo_type, repo_id, _json_body(body))
        raise HubHTTPError(404, f"FakeHub has no route for {method} /{'/'.join(segs)}")

    def _route_api(self, h: _Handler, method: str, segs: list[str], query: dict[str, str], body: bytes) -> Reply:
        match method, segs:
            case "GET", ["whoami-v2"]:
                return self._whoami(h)
            case "GET", ["agent-harnesses"]:
                return 200, {"standardEnvVars": [], "harnesses": {}}, {}
            case "POST", ["validate-yaml"]:
                return self._validate_yaml(h, _json_body(body))
            case "POST", ["repos", "create"]:
                return self._create_repo(h, _json_body(body))
            case "DELETE", ["repos", "delete"]:
                return self._delete_repo(h, _json_body(body))
            case _, [plural, *rest] if plural in _TYPE_BY_PLURAL and rest:
                repo_id, tail = _split_repo(rest)
                if not _REPO_ID.match(repo_id):
                    raise HubHTTPError(400, f"Invalid repo id: {repo_id}")
                return self._route_repo(h, method, _TYPE_BY_PLURAL[plural], repo_id, tail, query, body)
        raise HubHTTPError(404, f"FakeHub has no route for {method} /api/{'/'.join(segs)}")

    def _route_repo(
        self, h: _Handler, method: str, rt: str, repo_id: str, tail: list[str], query: dict[str, str], body: bytes
    ) -> Reply:
        rev = unquote(tail[1]) if len(tail) > 1 else "main"
        match method, tail[:1]:
            case "GET", []:
                return self._info(h, rt, repo_id, "main", query)
            case "GET", ["revision"]:
                return self._info(h, rt, repo_id, rev, query)
            case "GET", ["tree"]:
                path = "/".join(unquote(s) for s in tail[2:])
                return self._tree(h, rt, repo_id, rev, path, query.get("recursive", "false").lower() == "true")
            case "POST", ["paths-info"]:
                form = parse_qs(body.decode())
                return self._paths_info(h, rt, repo_id, rev, form.get("paths", []))
            case "POST", ["preupload"]:
                return self._preupload(h, rt, repo_id, rev, _json_body(body))
            case "POST", ["commit"]:
                if query.get("create_pr") in ("1", "true", "True"):
                    return self._open_pull_request(h, rt, repo_id, rev, body)
                return self._commit(h, rt, repo_id, rev, body)
            case "GET", ["refs"]:
                return self._refs(h, rt, repo_id)
            case "GET", ["commits"]:
                return self._list_commits(h, rt, repo_id, rev)
            case "POST" | "DELETE", ["branch"]:
                return self._branch(h, method, rt, repo_id, rev, _json_body(body) if body else {})
            case "POST" | "DELETE", ["tag"]:
                return self._tag(h, method, rt, repo_id, rev, _json_body(body) if body else {})
            case "PUT", ["settings"]:
                return self._settings(h, rt, repo_id, _json_body(body))
            case "GET", ["xet-read-token" | "xet-write-token" as action]:
                return self._xet_token(h, rt, repo_id, write=action == "xet-write-token")
        raise HubHTTPError(404, f"FakeHub has no route for {method} {rt} {repo_id} {'/'.join(tail)}")

    # account and repos
    def _whoami(self, h: _Handler) -> Reply:
        if not self._authenticated(h) or self.token is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        auth = {"type": "access_token", "accessToken": {"displayName": "fakehub", "role": "write"}}
        return 200, {"type": "user", "name": USER, "fullname": USER, "orgs": [], "auth": auth}, {}

    def _create_repo(self, h: _Handler, payload: dict[str, Any]) -> Reply:
        self._require_write(h)
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else str(name)
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX or not _REPO_ID.match(repo_id):
            raise HubHTTPError(400, f"Invalid repo: {repo_type} {repo_id}")
        url = self._url(repo_type, repo_id)
        if (repo_type, repo_id) in self._store.repos:
            return 409, {"error": "You already created this repo", "url": url}, {"X-Error-Message": "Repo exists"}
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self._store.create_repo(repo_type, repo_id, private=private, gitattributes=self.gitattributes)
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _delete_repo(self, h: _Handler, payload: dict[str, Any]) -> Reply:
        self._require_write(h)
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else str(name)
        repo = self._store.get(payload.get("type") or "model", repo_id)
        del self._store.repos[(repo.repo_type, repo.repo_id)]
        (self.root / "repos" / f"{repo.repo_type}s" / repo.repo_id / "repo.json").unlink(missing_ok=True)
        return 200, {}, {}

    def _settings(self, h: _Handler, rt: str, repo_id: str, payload: dict[str, Any]) -> Reply:
        repo = self._writable(h, rt, repo_id)
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        elif "private" in payload:
            repo.private = bool(payload["private"])
        self._store.save(repo)
        return 200, {}, {}

    def _info(self, h: _Handler, rt: str, repo_id: str, rev: str, query: dict[str, str]) -> Reply:
        repo = self._readable(h, rt, repo_id)
        commit = repo.commits[self._store.resolve(repo, rev)]
        blobs = query.get("blobs", "false").lower() == "true"
        siblings = []
        for path, entry in commit.files.items():
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling |= {"size": entry.size, "blobId": entry.oid}
                if entry.lfs:
                    pointer = len(lfs_pointer(entry.sha256, entry.size))
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": pointer}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(f"{rt}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else USER,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            **self._card_fields(commit),
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        return 200, info, {}

    def _card_fields(self, commit: Commit) -> dict[str, Any]:
        """What the Hub derives from a README's YAML front matter: ``cardData``, ``library_name``,
        ``pipeline_tag``, and tags (the card's, the library, ``license:X``, ``base_model:...``)."""
        entry = commit.files.get("README.md")
        text = self._store.object_path(entry.sha256).read_text(errors="replace") if entry is not None else ""
        match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
        if match is None:
            return {"tags": []}
        import yaml  # huggingface_hub's own dependency

        card = yaml.safe_load(match[1]) or {}
        if not isinstance(card, dict):
            return {"tags": []}
        tags = [t for t in (card.get("tags") or []) if isinstance(t, str)]
        if isinstance(card.get("library_name"), str):
            tags.append(card["library_name"])
        if isinstance(card.get("license"), str):
            tags.append(f"license:{card['license']}")
        bases = card.get("base_model")
        relation = card.get("base_model_relation")
        for base in [bases] if isinstance(bases, str) else bases or []:
            tags.append(f"base_model:{base}")
            if isinstance(relation, str):
                tags.append(f"base_model:{relation}:{base}")
        fields: dict[str, Any] = {"cardData": card, "tags": tags}
        for key in ("library_name", "pipeline_tag"):
            if isinstance(card.get(key), str):
                fields[key] = card[key]
        return fields

    # listing
    def _tree_entry(self, path: str, entry: FileEntry) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
        if entry.lfs:
            pointer = len(lfs_pointer(entry.sha256, entry.size))
            item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": pointer}
        if entry.xet_hash is not None:
            item["xetHash"] = entry.xet_hash
        return item

    @staticmethod
    def _dirs(files: dict[str, FileEntry]) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

    def _dir_entry(self, path: str, files: dict[str, FileEntry]) -> dict[str, Any]:
        content = "".join(f"{p}:{e.oid}\n" for p, e in files.items() if p.startswith(path + "/"))
        return {"type": "directory", "oid": hashlib.sha1(content.encode()).hexdigest(), "size": 0, "path": path}

    def _tree(self, h: _Handler, rt: str, repo_id: str, rev: str, path: str, recursive: bool) -> Reply:
        repo = self._readable(h, rt, repo_id)
        commit_id = self._store.resolve(repo, rev)
        files = repo.commits[commit_id].files
        dirs = self._dirs(files)
        if path and path not in dirs:
            raise HubHTTPError(
                404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit_id}
            )  # a file, or nothing
        prefix = f"{path}/" if path else ""
        depth = prefix.count("/")

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or p.count("/") == depth)

        items = [self._dir_entry(d, files) for d in sorted(dirs) if wanted(d)]
        items += [self._tree_entry(p, e) for p, e in files.items() if wanted(p)]
        return 200, sorted(items, key=lambda i: i["path"]), {}

    def _paths_info(self, h: _Handler, rt: str, repo_id: str, rev: str, paths: list[str]) -> Reply:
        repo = self._readable(h, rt, repo_id)
        files = repo.commits[self._store.resolve(repo, rev)].files
        dirs = self._dirs(files)
        items = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                items.append(self._tree_entry(p, files[p]))
            elif p in dirs:
                items.append(self._dir_entry(p, files))
        return 200, items, {}

    def _refs(self, h: _Handler, rt: str, repo_id: str) -> Reply:
        repo = self._readable(h, rt, repo_id)

        def refs(kind: str, table: dict[str, str]) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(table.items())]

        branches = {n: c for n, c in repo.branches.items() if not n.startswith("refs/pr/")}
        pulls = [
            {"name": n.removeprefix("refs/pr/"), "ref": n, "targetCommit": c}
            for n, c in sorted(repo.branches.items())
            if n.startswith("refs/pr/")
        ]
        payload = {
            "branches": refs("heads", branches),
            "tags": refs("tags", repo.tags),
            "converts": [],
            "pullRequests": pulls,
        }
        return 200, payload, {}

    def _list_commits(self, h: _Handler, rt: str, repo_id: str, rev: str) -> Reply:
        repo = self._readable(h, rt, repo_id)
        out, cid = [], self._store.resolve(repo, rev)
        while cid is not None:
            c = repo.commits[cid]
            out.append(
                {
                    "id": c.id,
                    "title": c.title,
                    "message": c.description,
                    "authors": [{"user": USER}],
                    "date": c.date,
                }
            )
            cid = c.parent
        return 200, out, {}

    def _branch(self, h: _Handler, method: str, rt: str, repo_id: str, name: str, payload: dict[str, Any]) -> Reply:
        repo = self._writable(h, rt, repo_id)
        if method == "DELETE":
            if name not in repo.branches or name == "main":
                raise HubHTTPError(404 if name != "main" else 403, f"Cannot delete branch {name}", "RevisionNotFound")
            del repo.branches[name]
        else:
            if name in repo.branches:
                raise HubHTTPError(409, f"Reference already exists: refs/heads/{name}")
            repo.branches[name] = self._store.resolve(repo, payload.get("startingPoint") or "main")
        self._store.save(repo)
        return 200, {}, {}

    def _tag(self, h: _Handler, method: str, rt: str, repo_id: str, rev: str, payload: dict[str, Any]) -> Reply:
        repo = self._writable(h, rt, repo_id)
        if method == "DELETE":
            if repo.tags.pop(rev, None) is None:
                raise HubHTTPError(404, f"Tag not found: {rev}", "RevisionNotFound")
        else:
            tag = str(payload.get("tag"))
            if tag in repo.tags:
                raise HubHTTPError(409, f"Tag already exists: {tag}")
            repo.tags[tag] = self._store.resolve(repo, rev)
        self._store.save(repo)
        return 200, {}, {}

    # upload
    def _preupload(self, h: _Handler, rt: str, repo_id: str, rev: str, payload: dict[str, Any]) -> Reply:
        repo = self._writable(h, rt, repo_id)
        commit_id = self._store.resolve(repo, rev)
        files = repo.commits[commit_id].files
        out = []
        for f in payload.get("files", []):
            path, size, sample = f["path"], int(f["size"]), base64.b64decode(f.get("sample", ""))
            lfs = self._is_lfs(path, size, sample)
            item: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if (existing := files.get(path)) is not None and existing.lfs == lfs:
                item["oid"] = existing.preupload_oid
            out.append(item)
        return 200, {"files": out, "commitOid": commit_id}, {}

    def _lfs_batch(self, h: _Handler, rt: str, repo_id: str, payload: dict[str, Any]) -> Reply:
        repo = self._writable(h, rt, repo_id)
        if payload.get("operation") != "upload":
            raise HubHTTPError(400, "FakeHub's LFS batch endpoint only does uploads")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            if oid in repo.lfs_oids:
                objects.append({"oid": oid, "size": size})  # already there: no actions, nothing is sent
                continue
            ticket = secrets.token_urlsafe(16)
            self._tickets[ticket] = (rt, repo_id, oid, size)
            upload: dict[str, Any] = {
                "href": f"{self.endpoint}/_fakehub/lfs/{ticket}",
                "expires_at": "2999-01-01T00:00:00.000Z",
            }
            if size >= self.multipart_threshold:  # as the Hub does: part URLs in the header, completion at href
                count = -(-size // self.part_size)
                upload["href"] = f"{self.endpoint}/_fakehub/complete/{ticket}"
                upload["header"] = {"chunk_size": str(self.part_size)} | {
                    f"{n:05d}": f"{self.endpoint}/_fakehub/part/{ticket}/{n}" for n in range(1, count + 1)
                }
                self._parts[ticket] = {}
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload}})
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def _reserve_upload(self) -> bool:
        with self._store.lock:
            if self._upload_budget is None:
                return True
            if self._upload_budget <= 0:
                return False
            self._upload_budget -= 1
            return True

    def _refund_upload(self) -> None:
        with self._store.lock:
            if self._upload_budget is not None:
                self._upload_budget += 1

    def _lfs_put(self, h: _Handler, ticket: str) -> None:
        """Stream the body to a temp file while hashing it; store it only if size and sha256 match."""
        with self._store.lock:
            target = self._tickets.get(ticket)
        allowed = target is not None and self._reserve_upload()
        digest, size, stored = hashlib.sha256(), 0, False
        tmp = self.root / "tmp" / secrets.token_hex(8)
        try:
            with tmp.open("wb") as f:
                for chunk in h.iter_body():
                    digest.update(chunk)
                    size += len(chunk)
                    if allowed:
                        f.write(chunk)
            if target is None:
                raise HubHTTPError(403, "Unknown or expired upload URL")
            if not allowed:
                raise HubHTTPError(self._fail_status, "Simulated storage failure (FakeHub.fail_uploads_after)")
            rt, repo_id, oid, expected_size = target
            if size != expected_size or digest.hexdigest() != oid:
                raise HubHTTPError(400, f"Uploaded content does not match: sha256 {digest.hexdigest()}, {size} bytes")
            with self._store.lock:
                stored = True
                self._store.adopt(tmp, oid)
                repo = self._store.get(rt, repo_id)
                repo.lfs_oids.add(oid)
                self._store.save(repo)
                self._tickets.pop(ticket, None)
                self.lfs_uploads += 1
                self.lfs_bytes_received += size
                self.lfs_uploaded_oids.append(oid)
            h.send_json(200, None, {"ETag": f'"{oid}"'})
        finally:
            if allowed and not stored:
                self._refund_upload()
            tmp.unlink(missing_ok=True)

    # Xet
    @property
    def cas_url(self) -> str:
        return f"{self.endpoint}/_fakehub/cas/{self._xet_id}"

    def _xet_token(self, h: _Handler, rt: str, repo_id: str, *, write: bool) -> Reply:
        """A CAS token for a repo, as the Hub gives one: in the body for hf_xet, in headers for
        huggingface_hub's downloads."""
        if write:
            self._writable(h, rt, repo_id)
        else:
            self._readable(h, rt, repo_id)
        expires = int(time.time()) + 3600  # clients refresh within a minute of expiry
        body = {"accessToken": self._cas_token, "exp": expires, "casUrl": self.cas_url}
        headers = {
            "X-Xet-Cas-Url": self.cas_url,
            "X-Xet-Access-Token": self._cas_token,
            "X-Xet-Token-Expiration": str(expires),
        }
        return 200, body, headers

    def _xet_route(self, h: _Handler, method: str, segments: list[str], body: bytes) -> None:
        """The CAS API (token-checked), the xorb fetch URLs (self-authorising) and hf_xet's telemetry."""
        if segments == ["v1", "telemetry"]:
            h.send_json(204, None)
            return
        try:
            if segments[1] == "xorb":
                if segments[2:3] != [self._xet_id] or len(segments) != 4 or method != "GET":
                    raise XetError(403, "unknown fetch URL")
                data, first, last, total = self.xet.xorb_range(segments[3], h.headers.get("Range"))
                h.send_response(206)
                for name, value in {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {first}-{last}/{total}",
                    "Content-Length": str(len(data)),
                }.items():
                    h.send_header(name, value)
                h.end_headers()
                h.wfile.write(data)
                return
            if segments[2:3] != [self._xet_id] or h.headers.get("Authorization") != f"Bearer {self._cas_token}":
                raise XetError(401, "a valid CAS token is required")
            route = segments[3:]
            if method == "POST" and route[:2] in (["v1", "xorbs"], ["v1", "shards"]) and not self._reserve_upload():
                # a 4xx: hf_xet retries every 5xx but 501 for minutes, so a simulated failure must not be one
                raise XetError(400, "Simulated storage failure (FakeHub.fail_uploads_after)")
            match method, route:
                case "POST", ["v1", "xorbs", "default", name]:
                    h.send_json(200, {"was_inserted": self.xet.put_xorb(name, body)})
                case "POST", ["v1", "shards"]:
                    self.xet.put_shard(body)
                    h.send_json(200, {"result": 1})
                case "GET", ["v1", "reconstructions", name]:
                    fetch = f"{self.endpoint}/_fakehub/xorb/{self._xet_id}/{{xorb}}"
                    h.send_json(200, self.xet.reconstruction(name, h.headers.get("Range"), fetch))
                case _:  # v2 routes, xorb grants, the global dedup query: the client falls back on 404
                    raise XetError(404, f"no CAS route {method} /{'/'.join(route)}")
        except XetError as e:
            h.send_json(e.status, {"error": str(e)})

    def _part_put(self, h: _Handler, ticket: str, number: int) -> None:
        """One part of a multipart upload, kept aside until the completion request; its ETag is its md5,
        as S3 answers."""
        data = b"".join(h.iter_body())
        with self._store.lock:
            if ticket not in self._parts:
                raise HubHTTPError(403, "Unknown or expired upload URL")
            part = self.root / "tmp" / f"{ticket}.{number}"
            part.write_bytes(data)
            self._parts[ticket][number] = part
        h.send_json(200, None, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _complete_multipart(self, ticket: str, payload: dict[str, Any]) -> Reply:
        """Join the parts in the order and with the ETags the client lists; keep the object only if the
        whole has the announced size and sha256."""
        with self._store.lock:
            target, parts = self._tickets.get(ticket), self._parts.get(ticket)
            if target is None or parts is None:
                raise HubHTTPError(403, "Unknown or expired upload URL")
            rt, repo_id, oid, size = target
            listed = payload.get("parts") or []
            if payload.get("oid") != oid or [p.get("partNumber") for p in listed] != sorted(parts):
                raise HubHTTPError(400, "The completion request does not list the uploaded parts")
            digest, joined = hashlib.sha256(), self.root / "tmp" / f"{ticket}.joined"
            with joined.open("wb") as out:
                for item in listed:
                    data = parts[item["partNumber"]].read_bytes()
                    if item.get("etag", "").strip('"') != hashlib.md5(data).hexdigest():
                        raise HubHTTPError(400, f"Part {item['partNumber']}: the ETag does not match what was received")
                    digest.update(data)
                    out.write(data)
            if joined.stat().st_size != size or digest.hexdigest() != oid:
                joined.unlink()
                raise HubHTTPError(400, f"Uploaded content does not match: sha256 {digest.hexdigest()}")
            self._store.adopt(joined, oid)
            repo = self._store.get(rt, repo_id)
            repo.lfs_oids.add(oid)
            self._store.save(repo)
            for part in parts.values():
                part.unlink(missing_ok=True)
            del self._parts[ticket], self._tickets[ticket]
            self.lfs_uploads += 1
            self.lfs_bytes_received += size
            self.multipart_uploads += 1
            self.lfs_uploaded_oids.append(oid)
        return 200, {"success": True}, {}

    def _commit(self, h: _Handler, rt: str, repo_id: str, rev: str, body: bytes) -> Reply:
        repo = self._writable(h, rt, repo_id)
        branch = rev.removeprefix("refs/heads/")
        if branch not in repo.branches:
            self._store.resolve(repo, rev)  # 404 RevisionNotFound for unknown revisions
            raise HubHTTPError(400, f"Can only commit to a branch, not to {rev}")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        summary = header.get("summary") or ""
        if not summary:
            raise HubHTTPError(400, "A commit needs a summary")
        head = repo.branches[branch]
        parent = header.get("parentCommit")
        if parent and not head.startswith(str(parent).lower()):
            raise HubHTTPError(412, f"A commit has happened since {parent}: {branch} is at {head}")
        tree = dict(repo.commits[head].files)
        for line in lines[1:]:
            self._apply(repo, tree, line["key"], line["value"], head)
        card = tree.get("README.md")
        if card is not None and card != repo.commits[head].files.get("README.md"):
            errors, _ = hubcard.check(self._store.object_path(card.sha256).read_text(errors="replace"))
            if errors:
                raise HubHTTPError(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
        commit = self._store.new_commit(repo, branch, tree, summary, header.get("description") or "")
        url = f"{self._url(rt, repo_id)}/commit/{commit.id}"
        return 200, {"success": True, "commitOid": commit.id, "commitUrl": url, "hookOutput": ""}, {}

    def _validate_yaml(self, h: _Handler, body: dict[str, Any]) -> Reply | None:
        content = body.get("content")
        if not isinstance(content, str):
            raise HubHTTPError(400, '"content" must be a string')
        if body.get("repoType", "model") not in ("model", "dataset", "space"):
            raise HubHTTPError(400, '"repoType" must be one of [model, dataset, space]')
        errors, warnings = hubcard.check(content)
        status = 400 if errors else 200
        if h.headers.get("Accept") == "text/plain":  # what RepoCard.validate asks for, and raises with
            h.send_text(status, "\n".join(f"- {m}" for m in errors + warnings))
            return None
        answer = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
        return status, answer, {}

    def _open_pull_request(self, h: _Handler, rt: str, repo_id: str, rev: str, body: bytes) -> Reply:
        """A commit opened as a pull request: the Hub keeps it on a ref ``refs/pr/N`` made from the
        target branch, and answers with the discussion's URL."""
        repo = self._writable(h, rt, repo_id)
        target = rev.removeprefix("refs/heads/")
        if target not in repo.branches:
            raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        number = 1 + sum(1 for name in repo.branches if name.startswith("refs/pr/"))
        ref = f"refs/pr/{number}"
        repo.branches[ref] = repo.branches[target]
        status, payload, headers = self._commit(h, rt, repo_id, ref, body)
        payload["pullRequestUrl"] = f"{self._url(rt, repo_id)}/discussions/{number}"
        return status, payload, headers

    def _apply(self, repo: _Repo, tree: dict[str, FileEntry], key: str, value: dict[str, Any], head: str) -> None:
        path = str(value.get("path", "")).strip("/")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubHTTPError(400, f"Unsupported encoding for {path}")
            tree[path] = self._store.entry_for(base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile" and str(value["oid"]) not in repo.lfs_oids and str(value["oid"]) in self.xet.by_sha256:
            xet_file = self.xet.by_sha256[str(value["oid"])]  # uploaded through Xet: the shard named its sha256
            if value.get("size") not in (None, xet_file.size):
                raise HubHTTPError(422, f"Xet file {xet_file.hash} has {xet_file.size} bytes, not {value['size']}")
            sha = self._store.put_bytes(self.xet.plain(xet_file))  # served as it is when Xet is off
            pointer = lfs_pointer(sha, xet_file.size)
            tree[path] = FileEntry(sha, xet_file.size, lfs=True, oid=git_blob_sha1(pointer), xet_hash=xet_file.hash)
        elif key == "lfsFile":
            oid = str(value["oid"])
            if oid not in repo.lfs_oids:
                raise HubHTTPError(422, f"LFS object {oid} for {path} was never uploaded to {repo.repo_id}")
            size = self._store.object_path(oid).stat().st_size
            if value.get("size") not in (None, size):
                raise HubHTTPError(422, f"LFS object {oid} has {size} bytes, not {value['size']}")
            pointer = lfs_pointer(oid, size)
            tree[path] = FileEntry(sha256=oid, size=size, lfs=True, oid=git_blob_sha1(pointer))
        elif key == "deletedFile":
            if tree.pop(path, None) is None:
                raise HubHTTPError(404, "A file with this name doesn't exist", "EntryNotFound", {"X-Repo-Commit": head})
        elif key == "deletedFolder":
            gone = [p for p in tree if p.startswith(path + "/")]
            if not gone:
                raise HubHTTPError(404, "A folder with this name doesn't exist", "EntryNotFound")
            for p in gone:
                del tree[p]
        else:
            raise HubHTTPError(400, f"FakeHub does not implement commit operation {key!r}")

    # download
    def _resolve(self, h: _Handler, rt: str, repo_id: str, revision: str, path: str) -> None:
        with self._store.lock:
            repo = self._readable(h, rt, repo_id)
            commit_id = self._store.resolve(repo, revision)
            entry = repo.commits[commit_id].files.get(path)
            if entry is None:
                raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit_id})
            served = repo.tampered.get(commit_id, {}).get(path, entry.sha256)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit_id,
            "ETag": f'"{entry.etag}"',
        }
        if entry.lfs:
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        if entry.xet_hash is not None:  # what tells the client to download it through Xet
            token_url = f"{self.endpoint}/api/{rt}s/{repo_id}/xet-read-token/{commit_id}"
            headers |= {"X-Xet-Hash": entry.xet_hash, "Link": f'<{token_url}>; rel="xet-auth"'}
        h.send_file(self._store.object_path(served), headers)


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except json.JSONDecodeError as e:
        raise HubHTTPError(400, f"Malformed JSON body: {e}") from e
    if not isinstance(data, dict):
        raise HubHTTPError(400, "Expected a JSON object")
    return data


# --------------------------------------------------------------------------------------------- client helpers


def configure_client(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path, *, token: str | None = None, xet: bool = True
) -> None:
    """Point huggingface_hub (already imported or not, and subprocesses) at ``endpoint``, caching under ``home``.

    Patches the ``huggingface_hub.constants`` the client reads at call time, and sets the environment for
    subprocesses; ``token`` becomes ``HF_TOKEN`` (else any ambient token is removed); ``xet`` leaves Xet on,
    as users have it (False takes the LFS path). Undone by ``monkeypatch``.
    """
    from huggingface_hub import constants

    home = Path(home)
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": not xet,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "0" if xet else "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_XET_CACHE": str(home / "xet"),  # hf_xet reads it from the environment, in this process too
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """Switch huggingface_hub's offline mode in-process (``constants.HF_HUB_OFFLINE``) and for subprocesses."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
