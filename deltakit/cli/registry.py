"""The commands for this machine's named models and model store: registry add, import, list and remove."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..registry import Registry, deltakit_home, service_roots
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


def _cmd_registry_import(args: argparse.Namespace) -> int:
    from ..modelstore import ModelStore
    from ..signing import trusted_keys

    trusted = trusted_keys(args.trust or ())
    store = ModelStore()
    try:
        report = store.import_model(args.repo_id, args.path, base=args.base, trusted=trusted, progress=_progress(args))
    finally:
        store.close()
    if args.json:
        _emit(report)
    if report.storage == "delta":
        how = "found by its tensors" if report.base_found else "as given"
        stored = f"a delta against {report.base_model}@{report.base_commit} ({how}, {report.relation})"
    else:
        stored = "whole"
    share = report.stored_bytes / report.full_bytes if report.full_bytes else 1.0
    _say(
        f"imported {report.repo_id} revision {report.revision_number} (commit {report.commit}): {stored}; "
        f"{human_bytes(report.stored_bytes)} stored for {human_bytes(report.full_bytes)} in {report.files} files "
        f"({share:.1%})"
    )
    if report.note:
        _say(f"note: {report.note}")
    if report.signer:
        _say(f"signed by {report.signer} (a trusted key); signature checked over every file")
    return 0


def _store_repositories() -> list[dict[str, object]]:
    """The model store's repositories as ``registry list`` shows them (none if the store was never used)."""
    from ..modelstore import ModelStore

    if not (deltakit_home() / "store.sqlite3").is_file():
        return []
    store = ModelStore()
    try:
        summaries = store.repositories()
    finally:
        store.close()
    return [
        {
            "name": s.repo_id,
            "kind": "repo",
            "revisions": len(s.revisions),
            "commit": s.latest.commit,
            "storage": s.latest.storage,
            "stored_bytes": s.latest.stored_bytes,
            "full_bytes": s.latest.full_bytes,
            "base_model": s.latest.base_model,
            "relation": s.latest.relation,
            "derived": list(s.derived),
        }
        for s in summaries
    ]


def _cmd_registry_list(args: argparse.Namespace) -> int:
    registry = Registry()
    entries = registry.entries()
    repos = _store_repositories()
    if args.json:
        _emit([asdict(e) for e in entries.values()] + repos)
        return 0
    if not entries and not repos:
        _say(f"no names registered in {registry.path}, and no models imported")
    for e in entries.values():
        extra = f", for base {e.base_fingerprint[:16]}..." if e.base_fingerprint else ""
        _say(f"{e.name}  {e.kind}  {human_bytes(e.size)}  {e.path}  fingerprint {e.fingerprint[:16]}...{extra}")
    for r in repos:
        base = f", {r['relation']} of {r['base_model']}" if r["base_model"] else ""
        _say(
            f"{r['name']}  {r['storage']}  {human_bytes(int(str(r['stored_bytes'])))} stored of "
            f"{human_bytes(int(str(r['full_bytes'])))}  revision {r['revisions']} ({str(r['commit'])[:12]}){base}"
        )
    return 0


def _cmd_registry_remove(args: argparse.Namespace) -> int:
    entry = Registry().remove(args.name)
    _say(f"forgot {entry.name!r} ({entry.path} is left as it is)")
    return 0


def add_registry_parsers(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit registry add|import|list|remove``."""
    p = sub.add_parser("registry", parents=[common], help="name local models and deltas; import models into the store")
    registry = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    r = registry.add_parser("add", parents=[common], help="register a checkpoint (fingerprinted now) or a delta")
    r.add_argument("name", help="the name to give it: letters, digits, '.', '_' and '-'")
    r.add_argument("path", help="a checkpoint (file or folder) or a delta package folder")
    r.add_argument("--force", action="store_true", help="replace a name registered to another fingerprint")
    r.add_argument(
        "--hub-id", help="the model's repo id on the Hub (ORG/NAME): model cards of deltas made from it name it"
    )
    r.set_defaults(run=_cmd_registry_add)
    r = registry.add_parser(
        "import",
        parents=[common],
        help="store a model in the model store (a fine-tune as a delta against its base), as a new revision",
    )
    r.add_argument("repo_id", metavar="ORG/NAME", help="the repository to store it as")
    r.add_argument("path", help="the model folder (its files are stored exactly as they are)")
    r.add_argument(
        "--base",
        metavar="ORG/NAME[@REV]",
        help="the stored base it was fine-tuned from (default: found among stored models by its tensors)",
    )
    r.add_argument(
        "--relation",
        choices=("finetune", "adapter", "quantized", "merge"),
        help="how it derives from its base, as the Hub's model tree says it (default: finetune; quantized for "
        "GGUF files, adapter for a PEFT adapter)",
    )
    r.add_argument(
        "--trust",
        action="append",
        metavar="PUB",
        help="refuse the model unless its model.sig was made by this EC public key (PEM; repeatable; a folder "
        "of *.pub; keys in DELTAKIT_HOME/trusted_keys/ count too), over every file",
    )
    r.add_argument("--json", action="store_true", help="print the import report as JSON")
    r.set_defaults(run=_cmd_registry_import)
    r = registry.add_parser("list", parents=[common], help="list the registered names and imported models")
    r.add_argument("--json", action="store_true", help="print as JSON")
    r.set_defaults(run=_cmd_registry_list)
    r = registry.add_parser("remove", parents=[common], help="forget a name (its files are left alone)")
    r.add_argument("name", help="the registered name to forget")
    r.set_defaults(run=_cmd_registry_remove)
