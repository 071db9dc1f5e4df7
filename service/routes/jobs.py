"""Jobs: create, watch (polling or server-sent events), list, cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response, status
from fastapi.responses import StreamingResponse

from deltakit.errors import DeltakitError, InputNotFoundError, OutputExistsError, UnsupportedInputError
from deltakit.gguf import check_gguf

from ..deps import Read, RunnerDep, StoreDep, Write
from ..jobs import Runner
from ..schemas import JobOut, JobRequest, Problem
from ..store import ACTIVE, KeyReused, Store

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_EVENT_SECONDS = 0.5
_STREAM_SECONDS = 300.0


class IdempotencyKeyReused(DeltakitError, ValueError):
    """An Idempotency-Key came back with a different request."""


class JobFinished(DeltakitError, ValueError):
    """The job already ended."""


def _job(store: Store, job_id: str) -> JobOut:
    job = store.get(job_id)
    if job is None:
        raise InputNotFoundError(f"no job has id {job_id!r}")
    return JobOut.of(job)


def _check_gguf(runner: Runner, params: dict[str, Any]) -> None:
    """What a GGUF job (convert, or apply to gguf) checks before writing, checked at submission; the
    problem names registered models, never the server's paths."""
    quant = str(params.get("quant") or "f16")
    try:
        if "model" in params:
            check_gguf(runner.resolve(str(params["model"]), kind="model").path, quant=quant)
        else:
            base = runner.resolve(str(params["base"]), kind="model").path
            check_gguf(base, delta=runner.resolve(str(params["delta"]), kind="delta").path, quant=quant)
    except InputNotFoundError as e:  # a file the model lacks: the request cannot be carried out (422)
        raise UnsupportedInputError(runner.public(str(e))) from e
    except DeltakitError as e:
        e.message = runner.public(e.message)
        raise


@router.post("", status_code=status.HTTP_202_ACCEPTED, dependencies=[Write])
def create_job(
    request: JobRequest,
    store: StoreDep,
    runner: RunnerDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Queue a job; the same request while it is queued or running (or the same Idempotency-Key) gets
    the same job back."""
    params = request.params()
    if idempotency_key is not None and (earlier := store.by_key(idempotency_key)) is not None:
        if (earlier.kind, earlier.params) != (request.kind, params):
            raise IdempotencyKeyReused(f"Idempotency-Key {idempotency_key!r} was used for another request")
        return JobOut.of(earlier)
    for field, kind in (("base", "model"), ("target", "model"), ("model", "model"), ("delta", "delta")):
        if field in params:
            runner.resolve(str(params[field]), kind=kind)  # 404 or 403 now, not a failed job later
    if request.kind == "convert" or (request.kind == "apply" and params.get("to") == "gguf"):
        _check_gguf(runner, params)  # 422 now for what the job would refuse, not a failed job later
    if request.output is not None and runner.registry.get(request.output) is not None:
        raise OutputExistsError(f"{request.output!r} is already a registered name; choose another output name")
    try:
        job, created = store.create_job(request.kind, params, idempotency_key)
    except KeyReused as e:  # a concurrent request with this key and another body got there first
        raise IdempotencyKeyReused(f"Idempotency-Key {idempotency_key!r} was used for another request") from e
    if created:
        runner.submit(job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job)


@router.get("", dependencies=[Read])
def list_jobs(store: StoreDep) -> list[JobOut]:
    return [JobOut.of(j) for j in store.recent()]


@router.get("/{job_id}", dependencies=[Read])
def get_job(job_id: str, store: StoreDep) -> JobOut:
    return _job(store, job_id)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Write],
    responses={409: {"model": Problem, "description": "the job already ended"}},
)
def cancel_job(job_id: str, store: StoreDep, runner: RunnerDep) -> JobOut:
    """Cancel a queued or running job: it stops, and its temporary output is removed."""
    job = _job(store, job_id)
    if job.state not in ACTIVE:
        raise JobFinished(f"job {job_id} already ended {job.state}; there is nothing to cancel")
    runner.cancel(job_id)
    return _job(store, job_id)


@router.get(
    "/{job_id}/events",
    dependencies=[Read],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "progress events until the job ends"}},
)
async def job_events(job_id: str, store: StoreDep, runner: RunnerDep) -> StreamingResponse:
    _job(store, job_id)

    async def events() -> AsyncIterator[str]:
        last = None
        deadline = time.monotonic() + _STREAM_SECONDS  # watchers reconnect; nothing holds a stream forever
        while time.monotonic() < deadline and not runner.stopping:
            job = await asyncio.to_thread(_job, store, job_id)
            seen = (job.state, job.progress)
            if seen != last:
                name = "progress" if job.state in ACTIVE else "end"
                yield f"event: {name}\ndata: {job.model_dump_json()}\n\n"
                last = seen
            if job.state not in ACTIVE:
                return
            await asyncio.sleep(_EVENT_SECONDS)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
