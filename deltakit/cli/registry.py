"""The commands for this machine's named models and its HTTP service: registry add/list/remove, serve, token.

The service's own dependencies (uvicorn, FastAPI) load inside serve and token only, never on import.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import TYPE_CHECKING

from ..errors import DeltakitError
from ..registry import Registry
from ..units import human_bytes
from ._common import _emit, _port, _progress, _say, _Terminated

if TYPE_CHECKING:
    from ._common import _Subparsers


def _cmd_registry_add(args: argparse.Namespace) -> int:
    entry = Registry().add(args.name, args.path, force=args.force, hub_id=args.hub_id, progress=_progress(args))
    on_hub = f", on the Hub as {entry.hub_id}" if entry.hub_id else ""
    _say(f"registered {entry.name!r}: {entry.kind} at {entry.path}{on_hub}, fingerprint {entry.fingerprint}")
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

    p = sub.add_parser("serve", parents=[common], help="run the HTTP service for a model registry")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (8000)")
    p.set_defaults(run=_cmd_serve)

    p = sub.add_parser("token", parents=[common], help="bearer tokens for the HTTP service")
    tokens = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tokens.add_parser("create", parents=[common], help="print a new token once; only its hash is stored")
    t.add_argument("--scope", choices=["read", "write"], required=True)
    t.set_defaults(run=_cmd_token_create)
