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

# What a command's argument names, and so where it is looked up. Each parser declares its own, in the
# order they resolve: ``p.set_defaults(resolve={"base": MODEL, "delta": DELTA})``.
MODEL = "model"  # a registered name, a path, or a Hub model repo id (fetched; checked later, where used)
DELTA = "delta"  # a registered name, a path, or a Hub delta repo id (fetched, every file checked)
DELTA_OR_MODEL = "delta or model"  # as DELTA for a Hub repo with a deltakit.json, else as MODEL
SUBJECT = "subject"  # verify's PATH: a delta (DELTA), or with --delta the model checked against it (MODEL)
LOCAL = "local"  # a registered name or a path; never a Hub repo id


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
    """The arguments the command declared (``resolve``) become paths; a command that declares none,
    such as ``registry add``, takes its names as they are.

    A declared ``base`` also sets ``args.base_hub_id``, for model cards: the Hub id it is registered
    with, or the one it was named by."""
    declared: dict[str, str] = getattr(args, "resolve", {})
    if not declared:
        return
    registry = Registry()
    base = getattr(args, "base", None)
    if "base" in declared and base is not None:
        entry = registry.get(base)
        spec = is_repo_spec(base) and not Path(base).exists()
        args.base_hub_id = entry.hub_id if entry is not None else parse_repo_spec(base)[0] if spec else None
    for attribute, role in declared.items():
        value = getattr(args, attribute, None)
        if isinstance(value, list):
            setattr(args, attribute, [_resolve_as(registry, role, v, args) for v in value])
        elif value is not None:
            setattr(args, attribute, _resolve_as(registry, role, value, args))


def _resolve_as(registry: Registry, role: str, name: str, args: argparse.Namespace) -> str:
    if role == SUBJECT:
        role = DELTA if getattr(args, "delta", None) is None else MODEL
    if role == MODEL:
        return _resolve_model(registry, name)
    if role == DELTA:
        return _resolve_delta(registry, name)
    if role == DELTA_OR_MODEL:
        return _resolve(registry, name, _fetch_delta_or_model)
    return str(registry.resolve(name))
