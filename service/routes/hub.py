"""The Hugging Face Hub's read API over the model store, under ``/hub``: with ``HF_ENDPOINT=.../hub`` and a
read token as ``HF_TOKEN``, huggingface_hub, ``hf download`` and transformers download from the registry.

Routes (as huggingface_hub 2.x calls them): ``GET /hub/api/models/{org}/{name}[/revision/{rev}]`` (model
info; ``?blobs=true`` adds sizes and LFS data), ``GET /hub/api/models/{org}/{name}/tree/{rev}[/{path}]``
(``list_repo_tree``, ``list_repo_files``, the listing ``snapshot_download`` starts from),
``POST /hub/api/models/{org}/{name}/paths-info/{rev}`` (``get_paths_info``), and
``GET|HEAD /hub/{org}/{name}/resolve/{rev}/{path}`` (the bytes, with ``Range``). Errors carry the Hub's
``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and ``X-Error-Message``, which
the client turns into its own exceptions. No Xet headers are ever sent, so clients download over HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qs

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from deltakit.errors import DeltakitError, InputNotFoundError, IntegrityError, UnsupportedInputError
from deltakit.modelstore.catalog import check_store_repo_id
from deltakit.modelstore.views import RepoRevision, Repositories, StoredFile

from ..hubfiles import OpenFileResponse, RangeNotSatisfiable, git_blob_id, is_lfs, lfs_pointer, parse_range

__all__ = ["HubRefusal", "refusal", "router"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_REVISION = re.compile(r"[A-Za-z0-9_.-]{1,128}")
# Threads that may wait in Repositories.file_path at once (a first request may wait for a whole rebuild);
# their own limiter keeps them from taking every thread the rest of the service runs on.
_FILE_WAITERS = 64
_BLOB_IDS_KEPT = 4096
_JOB_POLL_SECONDS = 0.1


class HubRefusal(Exception):
    """A request the Hub API refuses, with the Hub's status, ``X-Error-Code`` and message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


async def refusal(request: Request, exc: Exception) -> JSONResponse:
    """The Hub's error answer: ``{"error": message}``, ``X-Error-Message`` and, where the client relies on it,
    ``X-Error-Code``."""
    assert isinstance(exc, HubRefusal)
    words = " ".join(exc.message.split()).encode("ascii", "backslashreplace").decode("ascii")
    headers = {"X-Error-Message": words, **exc.headers}
    if exc.code is not None:
        headers["X-Error-Code"] = exc.code
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


def _reader(request: Request) -> str:
    """The request's token scope (read or write: both read), answered as the Hub answers: no token is the
    401 of a repository one may not see, an unknown token the Hub's ``Invalid credentials``."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    bearer = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        raise HubRefusal(
            401,
            "a deltakit token is required (HF_TOKEN or token=): ask the registry's operator",
            "RepoNotFound",
            bearer,
        )
    scope = request.app.state.store.token_scope(token.strip())
    if scope is None:
        raise HubRefusal(401, "Invalid credentials in Authorization header", headers=bearer)
    return str(scope)


router = APIRouter(prefix="/hub", tags=["hub"], dependencies=[Depends(_reader)], include_in_schema=False)


class _HubState:
    """What the routes keep per app: the threads for waits on the store, and the git blob ids of regular
    files by (commit, path), which are computed by reading the file (a commit never changes)."""

    def __init__(self) -> None:
        self.waiters = anyio.CapacityLimiter(_FILE_WAITERS)
        self._blob_ids: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    def blob_id(self, key: tuple[str, str]) -> str | None:
        with self._lock:
            return self._blob_ids.get(key)

    def keep_blob_id(self, key: tuple[str, str], blob_id: str) -> None:
        with self._lock:
            self._blob_ids[key] = blob_id
            while len(self._blob_ids) > _BLOB_IDS_KEPT:
                self._blob_ids.popitem(last=False)


async def _state(request: Request) -> _HubState:  # on the event loop: one state per app, made once
    state: _HubState | None = getattr(request.app.state, "hub", None)
    if state is None:
        state = request.app.state.hub = _HubState()
    return state


async def _models(request: Request) -> Repositories:
    models: Repositories | None = getattr(request.app.state, "models", None)
    if models is None:
        raise HubRefusal(503, "the model store is not available on this service")
    return models


Models = Annotated[Repositories, Depends(_models)]
State = Annotated[_HubState, Depends(_state)]


def _repo_id(org: str, name: str) -> str:
    """The repo id, by the very rule the store's imports are held to (what can be imported can be served)."""
    try:
        return check_store_repo_id(f"{org}/{name}")
    except UnsupportedInputError as e:
        raise HubRefusal(400, f"Invalid repo id: {org}/{name}") from e


def _checked_path(path: str, repo_id: str) -> str:
    segments = path.split("/")
    if any(s in ("", ".", "..") for s in segments) or "\\" in path or "\0" in path:
        raise HubRefusal(400, f"Invalid path in {repo_id}: {path!r}")
    return path


async def _revision(models: Repositories, repo_id: str, revision: str) -> RepoRevision:
    """The revision, or the Hub's RepoNotFound / RevisionNotFound."""
    if not _REVISION.fullmatch(revision):
        raise HubRefusal(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    try:
        return await anyio.to_thread.run_sync(models.revision, repo_id, revision)
    except InputNotFoundError as e:
        if e.argument == "revision":
            raise HubRefusal(404, f"Invalid rev id: {revision}", "RevisionNotFound") from e
        raise HubRefusal(404, f"Repository not found: {repo_id}", "RepoNotFound") from e


def _entry_not_found(rev: RepoRevision, path: str) -> HubRefusal:
    # X-Repo-Commit lets the client remember that the file does not exist in this commit.
    return HubRefusal(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": rev.commit})


def _open(models: Repositories, rev: RepoRevision, stored: StoredFile) -> int:
    """An open descriptor of the file's bytes, checked for size (the store checked their SHA-256)."""
    fd = os.open(models.file_path(rev, stored.path), os.O_RDONLY)
    size = os.fstat(fd).st_size
    if size != stored.size:
        os.close(fd)
        raise IntegrityError(
            f"the store's copy of {stored.path} in {rev.repo_id} has {size} bytes, not the {stored.size} imported",
            path=stored.path,
            expected=stored.size,
            actual=size,
        )
    return fd


async def _in_thread(state: _HubState, call: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(call, limiter=state.waiters)


async def _blob_id(models: Repositories, state: _HubState, rev: RepoRevision, stored: StoredFile) -> str:
    """The file's git blob id: of its LFS pointer for a large file; for a regular one, the id the store recorded
    at import, else (a catalog older than that) of its bytes, read once."""
    if is_lfs(stored.path, stored.size):
        return git_blob_id(lfs_pointer(stored.sha256, stored.size))
    if stored.git_oid is not None:
        return stored.git_oid
    key = (rev.commit, stored.path)
    known = state.blob_id(key)
    if known is None:

        def read() -> str:
            fd = _open(models, rev, stored)
            try:
                return git_blob_id(os.pread(fd, stored.size, 0))
            finally:
                os.close(fd)

        known = await _in_thread(state, read)
        state.keep_blob_id(key, known)
    return known


async def _rebuild(request: Request, state: _HubState, models: Repositories, rev: RepoRevision, *, wait: bool) -> None:
    """Start (or join) the job that rebuilds ``rev`` into the store's cache where it is not there, and with
    ``wait`` wait for it to end: the rebuild is a job like any other (listed in /v1/jobs, with progress),
    one however many requests ask. A store without jobs (no runner of its own) rebuilds in ``file_path``."""
    runner = getattr(request.app.state, "runner", None)
    if runner is None or runner.models is not models:
        return
    job_id = await _in_thread(state, lambda: runner.rebuild_job(rev))
    while wait and job_id is not None:
        job = await _in_thread(state, lambda: runner.store.get(job_id))
        if job is None or job.state == "succeeded":
            return
        if job.state in ("failed", "cancelled"):
            why = (job.error or {}).get("detail", job.state)
            log.warning("the rebuild of %s@%s (job %s) ended %s: %s", rev.repo_id, rev.commit, job_id, job.state, why)
            status = 503 if job.state == "cancelled" else 500
            raise HubRefusal(status, f"the rebuild of {rev.repo_id}@{rev.commit} (job {job_id}) {job.state}: {why}")
        await anyio.sleep(_JOB_POLL_SECONDS)


def _lfs(stored: StoredFile) -> dict[str, Any] | None:
    if not is_lfs(stored.path, stored.size):
        return None
    return {"size": stored.size, "sha256": stored.sha256, "pointerSize": len(lfs_pointer(stored.sha256, stored.size))}


def _date(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def _model_info(models: Repositories, state: _HubState, rev: RepoRevision, blobs: bool) -> dict[str, Any]:
    siblings = []
    for stored in rev.files:
        sibling: dict[str, Any] = {"rfilename": stored.path}
        if blobs:
            sibling |= {"size": stored.size, "blobId": await _blob_id(models, state, rev, stored)}
            if (lfs := _lfs(stored)) is not None:
                sibling["lfs"] = lfs
        siblings.append(sibling)
    org = rev.repo_id.split("/")[0]
    names = [f.path for f in rev.files]
    tags = [
        tag
        for tag, suffix in (("safetensors", ".safetensors"), ("gguf", ".gguf"))
        if any(n.endswith(suffix) for n in names)
    ]
    info: dict[str, Any] = {
        "_id": hashlib.sha1(rev.repo_id.encode(), usedforsecurity=False).hexdigest()[:24],
        "id": rev.repo_id,
        "modelId": rev.repo_id,
        "author": org,
        "sha": rev.commit,
        "lastModified": _date(rev.created),
        "createdAt": _date(rev.created),
        "private": True,  # only a token holder sees it
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": tags,
        "siblings": siblings,
        "usedStorage": rev.stored_bytes,
    }
    if "config.json" in names:
        info["library_name"] = "transformers"
        tags.insert(0, "transformers")
    if rev.base_model is not None:
        card: dict[str, Any] = {"base_model": rev.base_model}
        tags.append(f"base_model:{rev.base_model}")
        if rev.relation is not None:
            card["base_model_relation"] = rev.relation
            tags.append(f"base_model:{rev.relation}:{rev.base_model}")
        info["cardData"] = card
    return info


@router.get("/api/models/{org}/{name}")
async def model_info(org: str, name: str, request: Request, models: Models, state: State) -> dict[str, Any]:
    rev = await _revision(models, _repo_id(org, name), "main")
    return await _model_info(models, state, rev, _flag(request, "blobs"))


@router.get("/api/models/{org}/{name}/revision/{revision}")
async def model_info_at(
    org: str, name: str, revision: str, request: Request, models: Models, state: State
) -> dict[str, Any]:
    rev = await _revision(models, _repo_id(org, name), revision)
    return await _model_info(models, state, rev, _flag(request, "blobs"))


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "false").lower() in ("1", "true")


def _folders(rev: RepoRevision) -> set[str]:
    return {"/".join(f.path.split("/")[:i]) for f in rev.files for i in range(1, f.path.count("/") + 1)}


def _folder_entry(rev: RepoRevision, folder: str) -> dict[str, Any]:
    inside = "".join(f"{f.path}:{f.sha256}\n" for f in rev.files if f.path.startswith(folder + "/"))
    oid = hashlib.sha1(inside.encode(), usedforsecurity=False).hexdigest()  # changes whenever its files do
    return {"type": "directory", "oid": oid, "size": 0, "path": folder}


async def _file_entry(models: Repositories, state: _HubState, rev: RepoRevision, stored: StoredFile) -> dict[str, Any]:
    item: dict[str, Any] = {
        "type": "file",
        "oid": await _blob_id(models, state, rev, stored),
        "size": stored.size,
        "path": stored.path,
    }
    if (lfs := _lfs(stored)) is not None:
        item["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
    return item


@router.get("/api/models/{org}/{name}/tree/{revision}")
@router.get("/api/models/{org}/{name}/tree/{revision}/{path:path}")
async def tree(
    org: str, name: str, revision: str, request: Request, models: Models, state: State, path: str = ""
) -> list[dict[str, Any]]:
    """The files and folders under ``path`` (the root by default), recursively with ``?recursive=true``; one page."""
    repo_id = _repo_id(org, name)
    path = _checked_path(path.strip("/"), repo_id) if path.strip("/") else ""
    rev = await _revision(models, repo_id, revision)
    folders = _folders(rev)
    if path and path not in folders:
        raise _entry_not_found(rev, path)  # a file, or nothing: the Hub lists folders only
    prefix = f"{path}/" if path else ""
    recursive = _flag(request, "recursive")

    def wanted(p: str) -> bool:
        return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

    items = [_folder_entry(rev, folder) for folder in folders if wanted(folder)]
    items += [await _file_entry(models, state, rev, stored) for stored in rev.files if wanted(stored.path)]
    return sorted(items, key=lambda i: str(i["path"]))


@router.post("/api/models/{org}/{name}/paths-info/{revision}")
async def paths_info(
    org: str, name: str, revision: str, request: Request, models: Models, state: State
) -> list[dict[str, Any]]:
    """The entries of the form's ``paths`` (``get_paths_info``, ``HfFileSystem``); paths that do not exist are
    left out, as the Hub leaves them out."""
    repo_id = _repo_id(org, name)
    rev = await _revision(models, repo_id, revision)
    asked = parse_qs((await request.body()).decode("utf-8", "replace")).get("paths", [])
    folders = _folders(rev)
    items = []
    for path in dict.fromkeys(p.strip("/") for p in asked):
        if (stored := rev.file(path)) is not None:
            items.append(await _file_entry(models, state, rev, stored))
        elif path in folders:
            items.append(_folder_entry(rev, path))
    return items


@router.api_route("/{org}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
async def resolve(
    org: str, name: str, revision: str, path: str, request: Request, models: Models, state: State
) -> Response:
    """The file's bytes (or a ``Range`` of them), with the headers the client builds its cache from: the ETag
    (the SHA-256 for an LFS file, as ``X-Linked-Etag`` too, with ``X-Linked-Size``; the git blob id for a
    regular one), ``X-Repo-Commit``, ``Content-Length`` and ``Accept-Ranges``.

    A revision the store keeps as a delta and has not rebuilt is rebuilt first, by a job (see ``_rebuild``);
    a HEAD answers from the catalog at once and only starts that job."""
    repo_id = _repo_id(org, name)
    path = _checked_path(path, repo_id)
    rev = await _revision(models, repo_id, revision)
    stored = rev.file(path)
    if stored is None:
        raise _entry_not_found(rev, path)
    headers = {"X-Repo-Commit": rev.commit, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=0"}
    if is_lfs(stored.path, stored.size):
        etag = f'"{stored.sha256}"'
        headers |= {"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(stored.size)}
    try:
        byte_range = parse_range(request.headers.get("range"), stored.size)
    except RangeNotSatisfiable:
        raise HubRefusal(
            416,
            f"Requested range not satisfiable: {stored.size} bytes",
            headers={"Content-Range": f"bytes */{stored.size}"},
        ) from None
    if "ETag" not in headers and stored.git_oid is not None:
        headers["ETag"] = f'"{stored.git_oid}"'
    if request.method == "HEAD" and "ETag" in headers:  # every header is known without the bytes
        await _rebuild(request, state, models, rev, wait=False)  # the GET that follows finds it begun
        if byte_range is not None:
            headers["Content-Range"] = byte_range.content_range
        length = stored.size if byte_range is None else byte_range.end - byte_range.start
        return Response(
            status_code=200 if byte_range is None else 206,
            headers={**headers, "Content-Length": str(length)},
            media_type="application/octet-stream",
        )
    try:
        await _rebuild(request, state, models, rev, wait=True)
        fd = await _in_thread(state, lambda: _open(models, rev, stored))
    except DeltakitError as e:  # the catalog lists the file: a store that cannot produce it is at fault
        log.error("%s@%s: cannot serve %s: %s", rev.repo_id, rev.commit, path, e)
        raise HubRefusal(
            500, f"the registry could not produce {path} of {rev.repo_id}@{rev.commit}; the service log says why"
        ) from e
    try:
        if "ETag" not in headers:  # a regular file, small: its git blob id from the bytes about to be sent
            known = state.blob_id((rev.commit, stored.path))
            if known is None:
                known = git_blob_id(await _in_thread(state, lambda: os.pread(fd, stored.size, 0)))
                state.keep_blob_id((rev.commit, stored.path), known)
            headers["ETag"] = f'"{known}"'
        if_range = request.headers.get("if-range")
        if byte_range is not None and if_range is not None and if_range != headers["ETag"]:
            byte_range = None  # the client holds bytes of another version: send this one whole
        if byte_range is None:
            return OpenFileResponse(fd, start=0, end=stored.size, status_code=200, headers=headers)
        headers["Content-Range"] = byte_range.content_range
        return OpenFileResponse(fd, start=byte_range.start, end=byte_range.end, status_code=206, headers=headers)
    except BaseException:
        os.close(fd)
        raise
