"""The commands for this machine's named models: registry add, list and remove."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..registry import Registry, service_roots
from ..units import human_bytes
from ._common import _emit, _progress, _say

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


def add_registry_parsers(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit registry add|list|remove``."""
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
