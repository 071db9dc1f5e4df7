"""Run the app on uvicorn with the limits a service open to a network needs: a connection cap below
the open-file limit, a deadline for request heads, errors about running out of files logged once an
interval, and a stop bounded by ``DELTAKIT_SHUTDOWN_GRACE`` even when a job will not stop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import resource
import sys
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .main import _own_home, create_app
from .settings import Settings, load_settings

__all__ = ["OnceAnInterval", "connection_limits", "serve"]

log = logging.getLogger(__name__)

_OUT_OF_FILES = (errno.EMFILE, errno.ENFILE)
_MIN_RESERVE = 64  # files kept for the jobs, the store and the server itself, whatever the cap


class OnceAnInterval(logging.Filter):
    """Let one record about running out of files (EMFILE, ENFILE) through per interval, as one line
    without its traceback, saying how many were left out since; other records pass untouched.

    Under a flood of connections, each failed accept or request would otherwise log a traceback:
    hundreds of thousands a minute, filling the disk the service needs."""

    def __init__(self, seconds: float = 60.0) -> None:
        super().__init__()
        self.seconds, self._next, self._dropped = seconds, 0.0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not (isinstance(error, OSError) and error.errno in _OUT_OF_FILES):
            return "Too many open files" not in record.getMessage() or self._admit(record, None)
        return self._admit(record, error)

    def _admit(self, record: logging.LogRecord, error: OSError | None) -> bool:
        now = time.monotonic()
        if now < self._next:
            self._dropped += 1
            return False
        self._next = now + self.seconds
        dropped = f"; {self._dropped} more since the last such line were not logged" if self._dropped else ""
        cause = f": {error}" if error is not None else ""
        record.msg = f"{record.getMessage()}{cause} (said at most once every {self.seconds:g} s{dropped})"
        record.args, record.exc_info, record.exc_text = (), None, None
        self._dropped = 0
        return True


def connection_limits(wanted: int) -> tuple[int, int]:
    """The connection cap and the listen backlog that fit under this process's open-file limit.

    The soft limit is raised to the hard one first (up to 65536). A reserve (a quarter of the limit, at
    least 64 files) stays for the jobs, the store and the server; the backlog, which is also how many
    connections one wake-up of the event loop accepts before the cap closes any, is half of it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    files = 65536 if soft == resource.RLIM_INFINITY else soft
    reserve = max(_MIN_RESERVE, files // 4)
    cap = max(8, min(wanted, files - reserve))
    return cap, max(8, min(2048, reserve // 2))


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and a cap on connections: past the
    cap, the oldest connection still waiting for (or sending) a request head is closed, so a flood of
    half-sent heads cannot hold every file the process may open, nor keep others out."""

    cap = 1000
    header_timeout = 10.0
    _said_full = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._opened = time.monotonic()
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.cap:
            idle = [
                c
                for c in self.connections
                if isinstance(c, _GuardedH11) and c is not self and c._awaiting_head() and not c.transport.is_closing()
            ]
            victim = min(idle, key=lambda c: c._opened, default=self)
            victim.transport.abort()
            now = time.monotonic()
            if now - _GuardedH11._said_full >= 60:
                _GuardedH11._said_full = now
                log.warning(
                    "more than %d connections (DELTAKIT_MAX_CONNECTIONS, under the open-file limit): closing "
                    "the oldest still sending a request head (said at most once a minute)",
                    self.cap,
                )
            if victim is self:
                return
        self._arm_head_timer()

    def _awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self._awaiting_head() and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    """Tells the jobs to stop as soon as the signal comes, not once every connection has closed, so that
    the grace covers both at once."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        runner = getattr(self._app.state, "runner", None)
        if runner is not None:
            runner.begin_stop()


def serve(host: str, port: int, settings: Settings | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C; the stop takes at most the settings' ``shutdown_grace`` and a
    moment: a job still running then is marked failed and the process exits without it.

    Raises:
        OutputExistsError: another service runs on the same home.
    """
    settings = settings or load_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    os.close(_own_home(settings.home))  # refused here in one line, not by a traceback from the app's start-up
    cap, backlog = connection_limits(settings.max_connections)
    guarded = type("GuardedH11", (_GuardedH11,), {"cap": cap, "header_timeout": settings.header_timeout})
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).addFilter(OnceAnInterval())
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        http=guarded,
        backlog=backlog,
        timeout_keep_alive=max(1, math.ceil(settings.keep_alive_timeout)),
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace),
    )
    try:
        _Server(config, app).run()
    finally:
        runner = getattr(app.state, "runner", None)
        if runner is not None:
            runner.shutdown()  # done already unless a second signal skipped the app's own shutdown
            if runner.abandoned:  # their threads would keep the interpreter from exiting
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
