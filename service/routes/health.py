"""Liveness and readiness, the only endpoints open without a token."""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import SettingsDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "the job store or data root is not usable"}})
def readyz(store: StoreDep, settings: SettingsDep) -> JSONResponse:
    try:
        store.counts()
        writable = os.access(settings.home, os.W_OK)
    except Exception as e:  # readiness reports, it never raises
        return JSONResponse({"status": "unavailable", "detail": type(e).__name__}, status_code=503)
    if not writable:
        return JSONResponse({"status": "unavailable", "detail": "the data root is not writable"}, status_code=503)
    return JSONResponse({"status": "ready"})
