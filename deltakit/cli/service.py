"""The commands for the HTTP service: serve runs it, token creates, lists and revokes its bearer tokens.

The service's own dependencies (uvicorn, FastAPI) load inside these commands only, never on import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ..errors import DeltakitError
from ._common import _emit, _port, _say, _Terminated

if TYPE_CHECKING:
    from deltakit_service.store import Store

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
    from deltakit_service.store import token_id as id_of

    with _token_store() as store:
        token = store.create_token(args.scope, name=args.name)
    print(token)  # alone on stdout, shown once: only its hash is kept
    token_id = id_of(token)
    named = f" {args.name!r}" if args.name else ""
    print(
        f"made {args.scope} token {token_id}{named}: it is shown this once; `deltakit token revoke {token_id}` "
        "withdraws it",
        file=sys.stderr,
    )
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    with _token_store() as store:
        tokens = store.list_tokens()
        where = store.path
    if args.json:
        _emit(
            {
                "tokens": [
                    {
                        "id": t.id,
                        "scope": t.scope,
                        "name": t.name,
                        "created": _when(t.created),
                        "last_used": _when(t.last_used) if t.last_used is not None else None,
                    }
                    for t in tokens
                ]
            }
        )
        return 0
    if not tokens:
        _say(f"no tokens in {where}: `deltakit token create --scope read|write` makes one")
        return 0
    _say(f"{'ID':<12}  {'SCOPE':<5}  {'CREATED':<20}  {'LAST USED':<20}  NAME")
    for t in tokens:
        used = _when(t.last_used) if t.last_used is not None else "never"
        _say(f"{t.id:<12}  {t.scope:<5}  {_when(t.created):<20}  {used:<20}  {t.name or ''}".rstrip())
    return 0


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    with _token_store() as store:
        token = store.revoke_token(args.token_id)
    named = f" {token.name!r}" if token.name else ""
    _say(f"revoked {token.scope} token {token.id}{named}: requests bearing it are refused from now on")
    return 0


@contextmanager
def _token_store() -> Iterator[Store]:
    from deltakit_service.settings import load_settings
    from deltakit_service.store import Store

    store = Store(load_settings().database)
    try:
        yield store
    finally:
        store.close()


def _when(seconds: float) -> str:
    """A time as ISO 8601 in UTC, to the second (``2026-12-06T11:40:03Z``)."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
  DELTAKIT_TRUST               a JSON list of public keys (PEM) or folders of them:
                               every import must carry a model.sig by one of them
                               (as do keys in DELTAKIT_HOME/trusted_keys/)
  DELTAKIT_WORKERS             jobs running at once (1)
  DELTAKIT_MAX_BODY_BYTES      the largest request body (65536)
  DELTAKIT_MAX_CONNECTIONS     open connections at most (1000; lowered to fit the
                               open-file limit)
  DELTAKIT_HEADER_TIMEOUT      seconds to send a request head (10)
  DELTAKIT_KEEP_ALIVE_TIMEOUT  seconds an idle connection stays open (5)
  DELTAKIT_SHUTDOWN_GRACE      seconds a stop waits for running jobs (10); the
                               process then exits, marking them failed
  DELTAKIT_MIN_FREE_BYTES      free space under which /readyz answers 503 (64 MiB)
  DELTAKIT_STORE               where the model store keeps its objects: unset for
                               DELTAKIT_HOME/store, or s3://BUCKET/PREFIX (endpoint
                               and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
                               AWS_SECRET_ACCESS_KEY, AWS_REGION; pip install
                               'deltakit-llm[s3]')
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
    """``deltakit serve`` and ``deltakit token create|list|revoke``."""
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
    t.add_argument("--name", help="a label to tell it apart in `token list` (who or what uses it)")
    t.set_defaults(run=_cmd_token_create)
    t = tokens.add_parser(
        "list", parents=[common], help="list the tokens by id, scope, name and use (never the tokens)"
    )
    t.add_argument("--json", action="store_true", help="print as JSON")
    t.set_defaults(run=_cmd_token_list)
    t = tokens.add_parser("revoke", parents=[common], help="withdraw a token: it is refused from the next request on")
    t.add_argument("token_id", metavar="ID", help="the token's id, as `token list` shows it")
    t.set_defaults(run=_cmd_token_revoke)
