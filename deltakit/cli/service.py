"""The commands for the HTTP service: serve runs it, token creates its bearer tokens.

The service's own dependencies (uvicorn, FastAPI) load inside these commands only, never on import.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import DeltakitError
from ._common import _port, _Terminated

if TYPE_CHECKING:
    from ._common import _Subparsers


def _cmd_serve(args: argparse.Namespace) -> int:
    from deltakit_service.server import serve  # the service's own dependencies load only here

    try:
        serve(args.host, args.port)
    except _Terminated:  # uvicorn stopped gracefully on SIGTERM, then raised it again: a clean stop, as Ctrl-C
        return 0
    except SystemExit as e:  # uvicorn exits 3 when it cannot bind; its own log line says why
        if e.code not in (0, None):
            raise DeltakitError(f"the service could not start on {args.host}:{args.port} (see the line above)") from e
    return 0


def _cmd_token_create(args: argparse.Namespace) -> int:
    from deltakit_service.settings import load_settings
    from deltakit_service.store import Store

    store = Store(load_settings().database)
    try:
        print(store.create_token(args.scope))  # alone on stdout, shown once: only its hash is kept
    finally:
        store.close()
    return 0


_SERVE_ENVIRONMENT = """\
Every endpoint but /healthz and /readyz needs a bearer token: make one with
`deltakit token create --scope read|write` (on the same DELTAKIT_HOME) and send
it as `Authorization: Bearer TOKEN`.

Environment (or a .env file in the working folder):
  DELTAKIT_HOME                the data root: registry.json, jobs.sqlite3, and the
                               models/ (apply, convert) and deltas/ (make) that jobs
                               write into (default ~/.local/share/deltakit)
  DELTAKIT_ROOTS               a JSON list of folders registered names may resolve
                               into, besides the home: '["/models", "/deltas"]'
  DELTAKIT_WORKERS             jobs running at once (1)
  DELTAKIT_MAX_BODY_BYTES      the largest request body (65536)
  DELTAKIT_MAX_CONNECTIONS     open connections at most (1000; lowered to fit the
                               open-file limit)
  DELTAKIT_HEADER_TIMEOUT      seconds to send a request head (10)
  DELTAKIT_KEEP_ALIVE_TIMEOUT  seconds an idle connection stays open (5)
  DELTAKIT_SHUTDOWN_GRACE      seconds a stop waits for running jobs (10); the
                               process then exits, marking them failed
  DELTAKIT_MIN_FREE_BYTES      free space under which /readyz answers 503 (64 MiB)
  DELTAKIT_CACHE_BYTES         disk budget of the rebuilt-model cache (100 GiB)
  DELTAKIT_MAX_UPLOAD_BYTES    the largest model upload, POST /v1/models/upload (64 GiB)
  DELTAKIT_EXECUTOR            local, or ray: each job a task on a Ray cluster
  DELTAKIT_RAY_ADDRESS         the cluster (auto, or HOST:PORT; else RAY_ADDRESS)
  DELTAKIT_RAY_JOB_CPUS        CPUs each job's task holds (1)
  DELTAKIT_RAY_JOB_MEMORY      bytes each job's task holds (2 GiB)
  DELTAKIT_RAY_RETRIES         reruns of a task whose worker died (1)

Serve on 127.0.0.1 behind a reverse proxy (TLS, request and connection limits)
when others must reach it.
"""


def add_service_parsers(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit serve`` and ``deltakit token create``."""
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="run the HTTP service for a model registry",
        description="Run the HTTP service for the model registry of DELTAKIT_HOME: jobs, models, metrics.",
        epilog=_SERVE_ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (8000)")
    p.set_defaults(run=_cmd_serve)

    p = sub.add_parser("token", parents=[common], help="bearer tokens for the HTTP service")
    tokens = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tokens.add_parser("create", parents=[common], help="print a new token once; only its hash is stored")
    t.add_argument("--scope", choices=["read", "write"], required=True)
    t.set_defaults(run=_cmd_token_create)
