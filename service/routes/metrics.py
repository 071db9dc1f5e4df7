"""Prometheus text exposition of job counts, bytes processed and durations."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from ..deps import Read, StoreDep

router = APIRouter(tags=["metrics"], dependencies=[Read])


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(store: StoreDep) -> str:
    counts = store.counts()
    processed, seconds, finished = store.totals()
    lines = ["# HELP deltakit_jobs Jobs by state.", "# TYPE deltakit_jobs gauge"]
    lines += [f'deltakit_jobs{{state="{state}"}} {n}' for state, n in counts.items()]
    lines += [
        "# HELP deltakit_bytes_processed_total Bytes processed by finished jobs.",
        "# TYPE deltakit_bytes_processed_total counter",
        f"deltakit_bytes_processed_total {processed}",
        "# HELP deltakit_job_duration_seconds Time finished jobs ran.",
        "# TYPE deltakit_job_duration_seconds summary",
        f"deltakit_job_duration_seconds_sum {seconds:.6f}",
        f"deltakit_job_duration_seconds_count {finished}",
    ]
    return "\n".join(lines) + "\n"
