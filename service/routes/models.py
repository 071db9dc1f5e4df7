"""Models: registered names (bases, deltas, built models) and the model store's repositories, their
revisions and lineage; imports into the store, from a folder the service may read or an upload."""

from __future__ import annotations

import shutil
import uuid
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Header, Query, Request, Response, status

from deltakit.errors import InputNotFoundError
from deltakit.modelstore import ModelStore, RepoRevision, RepoSummary, check_store_repo_id
from deltakit.registry import Entry

from ..deps import Read, RegistryDep, RunnerDep, SettingsDep, StoreDep, Write
from ..jobs import Runner
from ..schemas import (
    ImportRequest,
    JobOut,
    ModelOut,
    Name,
    RepoListed,
    RepoOut,
    RevisionOut,
    StoredFileOut,
)
from ..store import KeyReused
from ..uploads import receive_upload
from .jobs import IdempotencyKeyReused

__all__ = ["UPLOAD_PATH", "router"]

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Read])
UPLOAD_PATH = "/v1/models/upload"  # the one route whose body may be larger than DELTAKIT_MAX_BODY_BYTES


def _out(entry: Entry) -> ModelOut:
    return ModelOut(
        name=entry.name,
        kind=entry.kind,  # type: ignore[arg-type]
        fingerprint=entry.fingerprint,
        base_fingerprint=entry.base_fingerprint,
        size=entry.size,
    )


def _listed(repo: RepoSummary) -> RepoListed:
    latest = repo.latest
    return RepoListed(
        name=repo.repo_id,
        kind="repo",
        revisions=len(repo.revisions),
        commit=latest.commit,
        storage=latest.storage,
        stored_bytes=latest.stored_bytes,
        full_bytes=latest.full_bytes,
        base_model=latest.base_model,
        relation=latest.relation,
        derived=list(repo.derived),
    )


def _built_from(models: ModelStore, rev: RepoRevision) -> list[str]:
    chain, seen = [], {rev.commit}
    while rev.base_commit is not None and rev.base_commit not in seen:
        seen.add(rev.base_commit)
        rev = models.catalog.revision_by_commit(rev.base_commit)
        chain.append(f"{rev.repo_id}@{rev.commit}")
    return chain


def _revision_out(models: ModelStore, rev: RepoRevision) -> RevisionOut:
    return RevisionOut(
        repo_id=rev.repo_id,
        commit=rev.commit,
        number=rev.revision_number,
        created=rev.created,
        storage=rev.storage,
        stored_bytes=rev.stored_bytes,
        full_bytes=rev.full_bytes,
        base_model=rev.base_model,
        base_commit=rev.base_commit,
        relation=rev.relation,
        signer=rev.signer,
        note=rev.note,
        built_from=_built_from(models, rev),
        files=[StoredFileOut(path=f.path, size=f.size, sha256=f.sha256) for f in rev.files],
    )


@router.get("")
def list_models(registry: RegistryDep, runner: RunnerDep) -> list[ModelOut | RepoListed]:
    """The registered names, then the model store's repositories (kind ``repo``), as ``deltakit registry list
    --json`` prints them."""
    listed: list[ModelOut | RepoListed] = [_out(e) for e in registry.entries().values()]
    if runner.models is not None:
        listed += [_listed(r) for r in runner.models.repositories()]
    return listed


def _check_import(runner: Runner, repo_id: str, base: str | None) -> None:
    """What an import would refuse about its names, refused now: 422 for a malformed repo id, 404 for a base
    the store does not hold."""
    models = runner.model_store()
    check_store_repo_id(repo_id)
    if base is not None:
        models.base_revision(base)


def _accepted(job: JobOut, response: Response) -> JobOut:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.post("", status_code=status.HTTP_202_ACCEPTED, dependencies=[Write])
def import_model(
    request: ImportRequest,
    store: StoreDep,
    runner: RunnerDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Import a model into the store as a job (kind ``import``): the same request while it is queued or
    running (or the same Idempotency-Key) gets the same job back."""
    params = request.params()
    if idempotency_key is not None and (earlier := store.by_key(idempotency_key)) is not None:
        if (earlier.kind, earlier.params) != ("import", params):
            raise IdempotencyKeyReused(f"Idempotency-Key {idempotency_key!r} was used for another request")
        return _accepted(JobOut.of(earlier), response)
    _check_import(runner, request.repo_id, request.base)
    runner.resolve_source(request.source)  # 404 or 403 now, not a failed job later
    try:
        job, created = store.create_job("import", params, idempotency_key)
    except KeyReused as e:
        raise IdempotencyKeyReused(f"Idempotency-Key {idempotency_key!r} was used for another request") from e
    if created:
        runner.submit(job.id)
    return _accepted(JobOut.of(job), response)


@router.post("/upload", status_code=status.HTTP_202_ACCEPTED, dependencies=[Write])
async def upload_model(
    request: Request,
    response: Response,
    store: StoreDep,
    runner: RunnerDep,
    settings: SettingsDep,
    repo_id: Annotated[str, Query(min_length=3, max_length=200)],
    base: Annotated[str | None, Query(min_length=3, max_length=300)] = None,
    relation: Annotated[Literal["finetune", "adapter", "quantized", "merge"] | None, Query()] = None,
) -> JobOut:
    """Import a model uploaded as ``multipart/form-data`` (one part per file, its file name the file's path in
    the model), at most ``DELTAKIT_MAX_UPLOAD_BYTES``: streamed to a folder under the home, then imported by a
    job (kind ``import``). A refused upload leaves nothing behind."""
    await anyio.to_thread.run_sync(_check_import, runner, repo_id, base)  # before a byte of the body is read
    upload = uuid.uuid4().hex
    folder = runner.uploads_dir / upload
    folder.mkdir(parents=True)
    try:
        await receive_upload(request, folder, settings.max_upload_bytes)
        params = {"repo_id": repo_id, "upload": upload}
        params |= {k: v for k, v in (("base", base), ("relation", relation)) if v is not None}
        job, _ = await anyio.to_thread.run_sync(store.create_job, "import", params, None)
    except BaseException:
        await anyio.to_thread.run_sync(shutil.rmtree, folder, True)
        raise
    runner.submit(job.id)  # the job owns the folder now, and removes it once it ran
    return _accepted(JobOut.of(job), response)


@router.get("/{name}")
def get_model(name: Name, registry: RegistryDep) -> ModelOut:
    entry = registry.get(name)
    if entry is None:
        raise InputNotFoundError(f"no model or delta is registered as {name!r}")
    return _out(entry)


@router.get("/{org}/{name}")
def get_repo(org: str, name: str, runner: RunnerDep) -> RepoOut:
    """A repository of the model store: every revision with its storage, sizes, base and signer, and the
    repositories that derive from it."""
    models = runner.model_store()
    repo_id = check_store_repo_id(f"{org}/{name}")
    summary = next((r for r in models.repositories() if r.repo_id == repo_id), None)
    if summary is None:
        raise InputNotFoundError(f"the store has no repository {repo_id!r}", argument="repo_id")
    return RepoOut(
        repo_id=repo_id,
        revisions=[_revision_out(models, r) for r in summary.revisions],
        derived=list(summary.derived),
    )


@router.get("/{org}/{name}/revisions/{revision}")
def get_revision(org: str, name: str, revision: str, runner: RunnerDep) -> RevisionOut:
    """One revision: ``main`` (the latest), a commit, or a revision number."""
    models = runner.model_store()
    return _revision_out(models, models.revision(check_store_repo_id(f"{org}/{name}"), revision))
