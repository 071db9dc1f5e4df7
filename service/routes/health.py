"""Liveness and readiness, the only endpoints open without a token."""

from __future__ import annotations

import os
import shutil
import sqlite3

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from deltakit.errors import NoSpaceError
from deltakit.units import human_bytes

from ..deps import SettingsDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse({"status": "unavailable", "detail": detail}, status_code=503)


@router.get("/readyz", responses={503: {"description": "the job store or data root is not usable"}})
def readyz(store: StoreDep, settings: SettingsDep) -> JSONResponse:
    """Ready when the job store takes a write (as a new job's would) and the data root has room."""
    try:
        store.counts()
        store.probe()
        writable = os.access(settings.home, os.W_OK)
        free = shutil.disk_usage(settings.home).free
    except NoSpaceError:
        return _unavailable("the job store cannot be written: its disk is full")
    except sqlite3.Error as e:
        return _unavailable(f"the job store cannot be written ({type(e).__name__})")
    except Exception as e:  # readiness reports, it never raises
        return _unavailable(type(e).__name__)
    if not writable:
        return _unavailable("the data root is not writable")
    if free < settings.min_free_bytes:
        return _unavailable(
            f"the data root has {human_bytes(free)} free, under the {human_bytes(settings.min_free_bytes)} "
            "DELTAKIT_MIN_FREE_BYTES asks for"
        )
    return JSONResponse({"status": "ready"})
