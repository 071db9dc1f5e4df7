"""How names on the command line become paths: a registered name, then a path, then a Hub repo id.

Runs after parsing and before the command; a Hub repo id is fetched (and a delta checked) here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ..errors import HubError, InputNotFoundError
from ..hub import FetchedDelta, fetch_delta, fetch_model, is_repo_spec, parse_repo_spec
from ..registry import Registry
from ._common import _say
from .delta import _cmd_inspect, _cmd_verify
from .registry import _cmd_registry_add, _cmd_registry_remove, _cmd_serve, _cmd_token_create

_PATH_ARGUMENTS = ("base", "target", "path", "source", "from_legacy")


def _not_a_local_typo(name: str) -> None:
    """``pair/bsae`` where ``pair/`` is a folder here is a mistyped path, not a Hub repo id: say so at
    once, rather than after the Hub's retries."""
    first = Path(name).parts[0]
    if Path(first).is_dir():
        raise InputNotFoundError(
            f"{name}: no such file or folder (a folder {first}/ is here, so it is not looked up as a Hub repo id)",
            path=name,
        )


def _resolve(registry: Registry, name: str, fetch: Callable[[str], FetchedDelta], checked: str = "") -> str:
    """A registered name, then a path, then a Hub repo id (fetched into the cache with ``fetch``)."""
    if registry.get(name) is not None or Path(name).exists() or not is_repo_spec(name):
        return str(registry.resolve(name))
    _not_a_local_typo(name)
    fetched = fetch(name)
    _say(f"fetched {fetched.repo_id} at {fetched.revision} (commit {fetched.commit[:12]}){checked}")
    return str(fetched.path)


def _fetch_delta_or_model(spec: str) -> FetchedDelta:
    """A Hub repo to inspect: a delta when it holds a ``deltakit.json`` (checked), else a model."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return fetch_delta(spec)
    except HubError as e:
        if not isinstance(e.__cause__, EntryNotFoundError):  # the repo has no deltakit.json
            raise
        return fetch_model(spec)


def _resolve_delta(registry: Registry, name: str) -> str:
    """A delta: a Hub one is fetched with every file checked against its manifest."""
    return _resolve(registry, name, fetch_delta, ", every file checked")


def _resolve_model(registry: Registry, name: str) -> str:
    """A model: a Hub one is checked later, tensor by tensor, where it is used."""
    return _resolve(registry, name, fetch_model)


def _resolve_names(args: argparse.Namespace) -> None:
    """Registered names become their paths; deltas may also be Hub repo ids; anything else must exist."""
    if args.run in (_cmd_registry_add, _cmd_registry_remove, _cmd_serve, _cmd_token_create):
        return
    registry = Registry()
    base = getattr(args, "base", None)
    if base is not None:  # the base's Hub id, for a model card: registered with it, or named by it
        entry = registry.get(base)
        spec = is_repo_spec(base) and not Path(base).exists()
        args.base_hub_id = entry.hub_id if entry is not None else parse_repo_spec(base)[0] if spec else None
    for attribute in _PATH_ARGUMENTS:
        value = getattr(args, attribute, None)
        if value is not None:
            if args.run is _cmd_verify and attribute == "path" and getattr(args, "delta", None) is None:
                setattr(args, attribute, _resolve_delta(registry, value))
            elif args.run is _cmd_inspect and attribute == "path":
                setattr(args, attribute, _resolve(registry, value, _fetch_delta_or_model))
            elif attribute in ("base", "target") or (args.run is _cmd_verify and attribute == "path"):
                setattr(args, attribute, _resolve_model(registry, value))
            else:
                setattr(args, attribute, str(registry.resolve(value)))
    if getattr(args, "delta", None) is not None:
        deltas = args.delta if isinstance(args.delta, list) else [args.delta]
        resolved = [_resolve_delta(registry, d) for d in deltas]
        args.delta = resolved if isinstance(args.delta, list) else resolved[0]
