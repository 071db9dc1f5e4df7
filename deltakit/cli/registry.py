"""The commands for this machine's named models and its HTTP service: registry add/list/remove, serve, token.

The service's own dependencies (uvicorn, FastAPI) load inside serve and token only, never on import.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DeltakitError
from ..registry import Registry, service_roots
from ..units import human_bytes
from ._common import _emit, _port, _progress, _say, _Terminated

if TYPE_CHECKING:
    from ._common import _Subparsers


def _cmd_registry_add(args: argparse.Namespace) -> int:
    registry = Registry()
    entry = registry.add(args.name, args.path, force=args.force, hub_id=args.hub_id, progress=_progress(args))
    on_hub = f", on the Hub as {entry.hub_id}" if entry.hub_id else ""
    _say(f"registered {entry.name!r}: {entry.kind} at {entry.path}{on_hub}, fingerprint {entry.fingerprint}")
    roots = service_roots(registry.home)
    if not any(Path(entry.path).is_relative_to(root) for root in roots):
        print(
            f"deltakit: warning: {entry.path} lies outside the folders the service may read "
            f"({', '.join(map(str, roots))}): `deltakit serve` refuses {entry.name!r} until its folder is in "
            "DELTAKIT_ROOTS (a JSON list of folders)",
            file=sys.stderr,
        )
    return 0


def _cmd_registry_list(args: argparse.Namespace) -> int:
    registry = Registry()
    entries = registry.entries()
    if args.json:
        _emit([asdict(e) for e in entries.values()])
        return 0
    if not entries:
        _say(f"no names registered in {registry.path}")
    for e in entries.values():
        extra = f", for base {e.base_fingerprint[:16]}..." if e.base_fingerprint else ""
        _say(f"{e.name}  {e.kind}  {human_bytes(e.size)}  {e.path}  fingerprint {e.fingerprint[:16]}...{extra}")
    return 0


def _cmd_registry_remove(args: argparse.Namespace) -> int:
    entry = Registry().remove(args.name)
    _say(f"forgot {entry.name!r} ({entry.path} is left as it is)")
    return 0


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
  DELTAKIT_EXECUTOR            local, or ray: each job a task on a Ray cluster
  DELTAKIT_RAY_ADDRESS         the cluster (auto, or HOST:PORT; else RAY_ADDRESS)
  DELTAKIT_RAY_JOB_CPUS        CPUs each job's task holds (1)
  DELTAKIT_RAY_JOB_MEMORY      bytes each job's task holds (2 GiB)
  DELTAKIT_RAY_RETRIES         reruns of a task whose worker died (1)

Serve on 127.0.0.1 behind a reverse proxy (TLS, request and connection limits)
when others must reach it.
"""


def add_registry_parsers(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit registry add|list|remove``, ``deltakit serve`` and ``deltakit token create``."""
    p = sub.add_parser("registry", parents=[common], help="name local models and deltas")
    registry = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    r = registry.add_parser("add", parents=[common], help="register a checkpoint (fingerprinted now) or a delta")
    r.add_argument("name", help="the name to give it: letters, digits, '.', '_' and '-'")
    r.add_argument("path", help="a checkpoint (file or folder) or a delta package folder")
    r.add_argument("--force", action="store_true", help="replace a name registered to another fingerprint")
    r.add_argument(
        "--hub-id", help="the model's repo id on the Hub (ORG/NAME): model cards of deltas made from it name it"
    )
    r.set_defaults(run=_cmd_registry_add)
    r = registry.add_parser("list", parents=[common], help="list the registered names")
    r.add_argument("--json", action="store_true", help="print as JSON")
    r.set_defaults(run=_cmd_registry_list)
    r = registry.add_parser("remove", parents=[common], help="forget a name (its files are left alone)")
    r.add_argument("name", help="the registered name to forget")
    r.set_defaults(run=_cmd_registry_remove)

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
