"""Jobs: create, watch (polling or server-sent events), list, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Response, status
from fastapi.responses import StreamingResponse

from deltakit.errors import InputNotFoundError, OutputExistsError

from ..deps import Read, RunnerDep, StoreDep, Write
from ..schemas import JobOut, JobRequest
from ..store import ACTIVE, Store

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_EVENT_SECONDS = 0.5


def _job(store: Store, job_id: str) -> JobOut:
    job = store.get(job_id)
    if job is None:
        raise InputNotFoundError(f"no job has id {job_id!r}")
    return JobOut.of(job)


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
    for field, kind in (("base", "model"), ("target", "model"), ("model", "model"), ("delta", "delta")):
        if field in params:
            runner.resolve(params[field], kind=kind)  # 404 or 403 now, not a failed job later
    if "output" in params and runner.registry.get(params["output"]) is not None:
        raise OutputExistsError(f"{params['output']!r} is already a registered name; choose another output name")
    job, created = store.create_job(request.kind, params, idempotency_key)
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


@router.delete("/{job_id}", status_code=status.HTTP_202_ACCEPTED, dependencies=[Write])
def cancel_job(job_id: str, store: StoreDep, runner: RunnerDep) -> JobOut:
    """Cancel a queued or running job: it stops, and its temporary output is removed."""
    job = _job(store, job_id)
    if job.state in ACTIVE:
        runner.cancel(job_id)
    return _job(store, job_id)


@router.get(
    "/{job_id}/events",
    dependencies=[Read],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "progress events until the job ends"}},
)
async def job_events(job_id: str, store: StoreDep) -> StreamingResponse:
    _job(store, job_id)

    async def events() -> AsyncIterator[str]:
        last = None
        while True:
            job = await asyncio.to_thread(_job, store, job_id)
            body = job.model_dump_json()
            if body != last:
                name = "progress" if job.state in ACTIVE else "end"
                yield f"event: {name}\ndata: {body}\n\n"
                last = body
            if job.state not in ACTIVE:
                return
            await asyncio.sleep(_EVENT_SECONDS)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
