"""Assemble the FastAPI app: settings, store, registry, job runner, routers, and error handlers."""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deltakit import __version__
from deltakit.errors import DeltakitError, InputNotFoundError, NoSpaceError, OutputExistsError
from deltakit.registry import Registry

from .deps import Read
from .jobs import NameOutsideRoots, Runner
from .models import open_model_store
from .problems import problem_fields
from .routes import health, hub, jobs, metrics, models, page
from .routes.jobs import JobFinished
from .settings import Settings, load_settings
from .store import Store
from .uploads import PayloadTooLarge

_STATUS: list[tuple[type[Exception], int]] = [
    (InputNotFoundError, 404),
    (NameOutsideRoots, 403),
    (OutputExistsError, 409),
    (JobFinished, 409),
    (PayloadTooLarge, 413),
    (NoSpaceError, 507),
]


def _problem(
    status: int,
    type_: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"type": type_, "title": title, "status": status, "detail": detail, **(extra or {})}
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


async def _deltakit_error(request: Request, exc: Exception) -> JSONResponse:
    status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 422)
    detail = str(exc)
    runner = getattr(request.app.state, "runner", None)
    if status == 507 and runner is not None:
        detail = runner.public(detail)  # a store's or output's disk: no server path goes out
    assert isinstance(exc, DeltakitError)
    fields = problem_fields(exc, detail)
    return _problem(status, type(exc).__name__, "the request cannot be carried out", fields.pop("detail"), extra=fields)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _problem(exc.status_code, "HTTPError", str(exc.detail), str(exc.detail), dict(exc.headers or {}))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return _problem(422, "ValidationError", "the request is not valid", detail)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return _problem(500, "InternalError", "an unexpected error", "see the service log")  # never a stack trace


class BodyLimit:
    """Refuse request bodies above a size with 413, whether announced or streamed: the body is read
    (up to the limit) before the app sees the request.

    Paths in ``streamed`` (an upload) have their own, larger limit: an announced length above it is refused
    here, and the body goes to the route unread, which streams it to disk and counts it."""

    def __init__(self, app: ASGIApp, limit: int, streamed: dict[str, int] | None = None) -> None:
        self.app, self.limit, self.streamed = app, limit, streamed or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.streamed.get(scope["path"], self.limit)
        too_large = _problem(413, "PayloadTooLarge", "request body too large", f"at most {limit} bytes")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(scope, receive, send)
            return
        if scope["path"] in self.streamed:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await too_large(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        replay = iter(messages)

        async def buffered() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, buffered, send)


def _own_home(home: Path) -> int:
    """One service per ``DELTAKIT_HOME``: an exclusive lock on ``home/service.lock``, held while it runs
    (the kernel drops it if the process dies). Returns the lock's file descriptor.

    Raises:
        OutputExistsError: another service holds it.
    """
    fd = os.open(home / "service.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise OutputExistsError(
            f"another deltakit serve is running on {home}; one service per DELTAKIT_HOME (stop it, or set "
            "another DELTAKIT_HOME)",
            path=home,
        ) from e
    return fd


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service app; its job store, registry and workers live as long as it does."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.home.mkdir(parents=True, exist_ok=True)
        owner = _own_home(settings.home)  # before recovery: it would fail a live server's running jobs
        try:
            store = Store(settings.database)
            registry = Registry(settings.home)
            model_store = open_model_store(settings)
            runner = Runner(settings, store, registry, model_store)
            app.state.settings, app.state.store, app.state.registry = settings, store, registry
            app.state.models, app.state.runner = model_store, runner
            runner.recover()
            try:
                yield
            finally:
                runner.shutdown()
                model_store.close()
                store.close()
        finally:
            os.close(owner)

    app = FastAPI(
        title="deltakit", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None
    )
    for router in (health.router, models.router, jobs.router, metrics.router, hub.router, page.router):
        app.include_router(router)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Read])
    def openapi() -> dict[str, Any]:  # behind a token like everything but health
        return app.openapi()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
        DeltakitError: _deltakit_error,
        hub.HubRefusal: hub.refusal,
        StarletteHTTPException: _http_error,
        RequestValidationError: _validation_error,
        Exception: _unexpected,
    }
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
    app.add_middleware(
        BodyLimit, limit=settings.max_body_bytes, streamed={models.UPLOAD_PATH: settings.max_upload_bytes}
    )
    return app
